"""Allocation: which candidate each layer may take, and which it gets under a byte budget.

* **Candidates**: the specs a layer can take (every bit width x every granularity that divides its
  input), checked before any work; the ``method:spec`` keys a search can meet.
* **Budget**: the feasible range of a budget, from the candidate specs alone.
* **Tables**: per layer and candidate, the exact stored bytes and the knapsack's loss tables.
* **Knapsack**: one candidate per layer minimising the summed loss under the budget, exactly.
* **Layer kinds**: the groups the search weighs together (leaf name, depth quarter).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from torch import nn

from .arch import block_index, get_module, layer_kind, linear_shape
from .errors import BudgetError, NonFiniteError
from .methods import Method
from .plan import GB, float_nbytes
from .profiles import get_profile
from .spec import PerChannel, QuantSpec, as_granularity

__all__ = ["solve_knapsack", "candidate_specs", "check_candidates", "candidate_keys", "check_budget", "cost_and_losses",
           "uniform_keys", "layer_kind", "depth_quarter", "solve_tied"]


def candidate_specs(shape: tuple[int, int], bits: Sequence[int], granularities: Sequence, profile=None, methods=None) -> list:
    """The specs a layer can take: every bit width x every granularity that divides its input, as
    ``profile`` allows (default ``research``: all of them, asymmetric), and the profile's own types
    (the ``gguf`` profile's K-quants) when ``methods`` holds the method that makes them."""
    return get_profile(profile or "research").specs(shape, bits, granularities, methods)


def check_candidates(methods, bits, granularities) -> None:
    """Non-empty, known methods, bit widths and granularities; ``ValueError`` naming the option."""
    if not methods or not bits or not granularities:
        empty = [n for n, v in (("methods", methods), ("bits", bits), ("granularities", granularities)) if not v]
        raise ValueError(f"{', '.join(empty)} must not be empty: e.g. methods=('rtn', 'gptq', 'awq'), bits=(3, 4, 8), "
                         "granularities=('channel', 64)")
    for m in methods:
        Method.parse(m)
    for b in bits:
        QuantSpec(b, PerChannel())  # raises naming the accepted range
    for g in granularities:
        as_granularity(g)


def candidate_keys(shapes, methods, bits, granularities, profile=None) -> list[str]:
    """Every ``method:spec`` some layer of these ``[out, in]`` shapes can take (before any bank is built)."""
    specs = {sp for shape in shapes for sp in candidate_specs(shape, bits, granularities, profile, methods)}
    return sorted({f"{m}:{sp}" for m in set(methods) for sp in specs if Method.parse(m).accepts(sp)})


def check_budget(model: nn.Module, names: list[str], bits, granularities, budget: int, profile=None,
                 float_dtype=None, methods=None) -> tuple[int, list]:
    """``(float bytes outside the linears, linear shapes)``; :class:`BudgetError` naming the feasible
    range when no plan fits or no search is needed. Needs only the candidate specs, so it runs
    before any bank work. ``float_dtype``: the dtype floating-point tensors are counted at (default:
    each at its own)."""
    prof = get_profile(profile or "research")
    fixed = float_nbytes(model, exclude=set(names), dtype=float_dtype, format=prof.format)
    full = float_nbytes(model, dtype=float_dtype, format=prof.format)
    shapes = [linear_shape(get_module(model, n)) for n in names]
    per_layer = [[prof.nbytes(s, sp) for sp in prof.specs(s, bits, granularities, methods)
                  if methods is None or any(Method.parse(m).accepts(sp) for m in methods)] for s in shapes]
    if any(not c for c in per_layer):
        bad = names[[i for i, c in enumerate(per_layer) if not c][0]]
        raise ValueError(f"no candidate spec fits layer {bad} {shapes[names.index(bad)]} in the {prof.name} profile: "
                         "add 'channel' or a group size that divides its input")
    smallest = fixed + sum(min(c) for c in per_layer)
    if budget < smallest:
        raise BudgetError(f"budget {budget:,} bytes ({budget / GB:.4f} GB) is below the smallest possible model "
                          f"({smallest:,} bytes = {smallest / GB:.4f} GB with the smallest candidate everywhere); "
                          f"the feasible range is {smallest / GB:.4f} to {full / GB:.4f} GB")
    if budget >= full:
        raise BudgetError(f"budget {budget / GB:.4f} GB is not below the unquantized model ({full / GB:.4f} GB): "
                          f"nothing to search; the feasible range is {smallest / GB:.4f} to {full / GB:.4f} GB")
    return fixed, shapes


def cost_and_losses(bank) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``costs [layers, K]`` (bytes) of a :class:`~gransearch.bank.Bank` and the knapsack's loss
    tables by name (``inf``: no entry): ``fisher`` (when the bank has the output Fisher), ``raw``
    layer objectives, and ``relative`` (over the layer's output energy)."""
    L, K = len(bank.layers), max(len(k) for k in bank.keys)
    costs = np.zeros((L, K), dtype=np.int64)
    raw = np.full((L, K), np.inf)
    for i in range(L):
        for j, e in enumerate(bank.entries[i]):
            costs[i, j] = e.nbytes
            raw[i, j] = e.objective
    rel = raw / np.array(bank.out_energy, dtype=float).clip(min=1e-30)[:, None]
    fis = bank.fisher_losses()
    return costs, ({"raw": raw, "relative": rel} if fis is None else {"fisher": fis, "raw": raw, "relative": rel})


def uniform_keys(bank, costs: np.ndarray, fixed: int, budget: int) -> list[str]:
    """Every ``method:spec`` every layer has whose uniform plan fits, the largest (usually best) first."""
    fits = []
    for key in sorted({k for row in bank.keys for k in row}):
        if all(key in row for row in bank.keys):
            cost = fixed + sum(costs[i, bank.index(i, key)] for i in range(len(bank.layers)))
            if cost <= budget:
                fits.append((cost, key))
    return [key for _, key in sorted(fits, reverse=True)]


def depth_quarter(name: str, n_blocks: int) -> int:
    """Which quarter of the model's depth (0..3) the linear called ``name`` sits in."""
    b = block_index(name)
    return 0 if b is None else min(3, 4 * b // max(1, n_blocks))


def solve_knapsack(costs: np.ndarray, losses: np.ndarray, capacity: int) -> Optional[list[int]]:
    """Pick one candidate per layer minimising the summed loss with summed cost <= capacity.

    ``costs``, ``losses``: ``[layers, K]`` (``inf`` loss marks a missing candidate). Exact, with
    ``scipy.optimize.milp``; ``None`` when infeasible.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    L, K = losses.shape
    if np.isnan(losses).any():
        raise NonFiniteError(f"knapsack losses hold NaN (layer {int(np.argwhere(np.isnan(losses))[0][0])}): a bank entry or the "
                             "output Fisher is not finite")
    valid = np.isfinite(losses)
    idx = np.flatnonzero(valid.ravel())
    n = idx.size
    c = losses.ravel()[idx].astype(float)
    c = c / max(np.abs(c).max(), 1e-30)
    A = lil_matrix((L + 1, n))
    for j, flat in enumerate(idx):
        A[flat // K, j] = 1.0
        A[L, j] = float(costs.ravel()[flat])
    lo = np.concatenate([np.ones(L), [-np.inf]])
    hi = np.concatenate([np.ones(L), [float(capacity)]])
    res = milp(c, constraints=LinearConstraint(A.tocsr(), lo, hi), integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": 60})
    if res.x is None:
        return None
    x = np.round(res.x).astype(int)
    choice = [-1] * L
    for j in np.flatnonzero(x):
        flat = idx[j]
        choice[flat // K] = int(flat % K)
    if min(choice) < 0:
        return None
    return choice


def solve_tied(costs: np.ndarray, losses: np.ndarray, keys: Sequence[Sequence[str]], groups: Sequence[Sequence[int]],
               capacity: int) -> Optional[list[int]]:
    """:func:`solve_knapsack` where the layers of each group (a fused serving set) take one spec.

    A group and a spec make one item: its cost is the members' summed bytes at that spec, its loss
    the sum over members of their best method at that spec (costs do not depend on the method, and
    the loss is additive, so this is exact). Layers in no group are items on their own. Returns one
    candidate index per layer, or ``None`` when infeasible.
    """
    L = costs.shape[0]
    grouped = {i for g in groups for i in g}
    items = [list(g) for g in groups] + [[i] for i in range(L) if i not in grouped]
    per_item = []
    for members in items:
        options = {}
        for i in members:
            for j, key in enumerate(keys[i]):
                if np.isfinite(losses[i, j]):
                    spec = key.split(":", 1)[1]
                    best = options.setdefault(spec, {}).get(i)
                    if best is None or losses[i, j] < losses[i, best]:
                        options[spec][i] = j
        per_item.append([(sp, js) for sp, js in sorted(options.items()) if len(js) == len(members)])
    K = max(len(o) for o in per_item)
    if K == 0:
        return None
    c = np.zeros((len(items), K), dtype=np.int64)
    f = np.full((len(items), K), np.inf)
    for g, opts in enumerate(per_item):
        for k, (_, js) in enumerate(opts):
            c[g, k] = sum(int(costs[i, j]) for i, j in js.items())
            f[g, k] = sum(float(losses[i, j]) for i, j in js.items())
    pick = solve_knapsack(c, f, capacity)
    if pick is None:
        return None
    choice = [-1] * L
    for g, k in enumerate(pick):
        for i, j in per_item[g][k][1].items():
            choice[i] = j
    return choice
