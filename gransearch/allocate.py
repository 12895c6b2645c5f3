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

    ``costs``, ``losses``: ``[layers, K]`` (``inf`` loss marks a missing candidate). Exact; ``None``
    when infeasible. Each search trial solves one, so it is cut down without losing its optimum
    before the exact solve (benchmarks/knapsack.py: milliseconds where HiGHS on the whole table took
    a large share of a GPU trial, and stopped at its default relative gap of 1e-4):

    1. a candidate that another of its layer matches or beats in both bytes and loss is dropped
       (of equal ones, the lowest index stays);
    2. the LP relaxation's multiplier ``lam`` of the capacity (a greedy walk up each layer's lower
       convex hull) bounds every plan's loss from below by ``L = sum_i min_j (loss + lam * cost) -
       lam * capacity``, and the greedy's own plan bounds the optimum from above by ``U``. A plan's
       loss is at least ``L`` plus the sum of its candidates' reduced costs ``loss + lam * cost -
       min_j (...)``, so a candidate whose reduced cost exceeds ``U - L`` is in no plan better than
       the greedy's: dropped;
    3. the rest is solved exactly by dynamic programming over partial plans (layers with one
       candidate left are fixed), keeping those no other matches or beats in both bytes and loss and
       whose Lagrangian bound does not exceed ``U``. Should it weigh more than ``_MAX_WORK`` partial
       plans in all, ``scipy.optimize.milp`` (HiGHS, relative gap 0) solves the cut-down table instead.
    """
    if np.isnan(losses).any():
        raise NonFiniteError(f"knapsack losses hold NaN (layer {int(np.argwhere(np.isnan(losses))[0][0])}): a bank entry or the "
                             "output Fisher is not finite")
    costs = np.asarray(costs, dtype=np.int64)
    losses = np.asarray(losses, dtype=float)
    keep = _undominated(costs, losses)
    if any(not k for k in keep) or sum(int(costs[i, k[0]]) for i, k in enumerate(keep)) > capacity:
        return None  # a layer without a candidate, or the cheapest plan over the capacity
    lam, upper = _lagrange(costs.tolist(), losses.tolist(), keep, capacity)
    if lam is None:  # every layer's best candidate fits with the others': that plan is optimal
        return [k[-1] for k in keep]
    kept = np.zeros(costs.shape, dtype=bool)
    for i, k in enumerate(keep):
        kept[i, k] = True
    reduced = np.where(kept, losses + lam * costs, np.inf)  # inf: not a candidate any more
    least = reduced.min(axis=1)
    lower = sum(least.tolist()) - lam * capacity  # summed in layer order, as a plan's loss is
    tol = 1e-9 * max(abs(upper), abs(lower), lam * capacity, 1e-30)  # floating-point rounding never drops the optimum
    near = (reduced - least[:, None] <= upper - lower + tol).tolist()
    keep = [[j for j in k if row[j]] for k, row in zip(keep, near)]
    choice = _pareto_dp(costs, losses, keep, capacity, lam, upper + tol, least)
    return choice if choice is not None else _milp(costs, losses, keep, capacity)


def _undominated(costs: np.ndarray, losses: np.ndarray) -> list[list[int]]:
    """Per layer (row), the finite candidates that no other of the layer matches or beats in both
    bytes and loss, by cost ascending (so loss strictly descending); of equal ones, the lowest index.
    All layers at once: each row sorted by (cost, loss, index), and a candidate kept when its loss is
    below every finite loss before it."""
    cols = np.broadcast_to(np.arange(costs.shape[1]), costs.shape)
    order = np.lexsort((cols, losses, costs), axis=-1)
    f = np.take_along_axis(losses, order, axis=-1)
    finite = np.isfinite(f)
    running = np.minimum.accumulate(np.where(finite, f, np.inf), axis=-1)
    before = np.concatenate([np.full((f.shape[0], 1), np.inf), running[:, :-1]], axis=1)
    return [o[m].tolist() for o, m in zip(order, finite & (f < before))]


def _lagrange(costs: list[list[int]], losses: list[list[float]], keep: list[list[int]], capacity: int) -> tuple[Optional[float], float]:
    """``(lam, U)``: the LP relaxation's multiplier of the capacity (``None`` when every layer's best
    candidate fits) and the loss of the feasible plan a greedy walk along the same hull steps takes.
    ``costs`` and ``losses`` as Python lists: the walk is scalar work, and Python's float arithmetic
    is numpy's float64 arithmetic, digit for digit."""
    steps = []  # (slope, layer, from, to): one move up a layer's lower convex hull, loss saved per byte
    for i, k in enumerate(keep):
        c, f = costs[i], losses[i]
        hull = [k[0]]
        for j in k[1:]:
            while len(hull) >= 2 and (f[hull[-1]] - f[hull[-2]]) * (c[j] - c[hull[-2]]) >= (f[j] - f[hull[-2]]) * (c[hull[-1]] - c[hull[-2]]):
                hull.pop()  # the last point lies on or above the segment from the one before it to j
            hull.append(j)
        steps += [((f[a] - f[b]) / (c[b] - c[a]), i, a, b) for a, b in zip(hull, hull[1:])]
    steps.sort(key=lambda s: -s[0])
    at = [k[0] for k in keep]
    room = capacity - sum(costs[i][j] for i, j in enumerate(at))
    lam, blocked = None, set()
    for slope, i, a, b in steps:
        if i in blocked:
            continue
        step = costs[i][b] - costs[i][a]
        if step <= room:
            at[i], room = b, room - step
        else:  # the LP takes the first step that does not fit in part: its slope prices a byte
            lam = float(slope) if lam is None else lam
            blocked.add(i)
    return lam, float(sum(losses[i][j] for i, j in enumerate(at)))


_MAX_WORK = 5_000_000  # partial plans the exact DP may weigh in all before the MILP takes over (SmolLM2's tables: under 0.2M)


def _pareto_dp(costs: np.ndarray, losses: np.ndarray, keep: list[list[int]], capacity: int, lam: float,
               limit: float, least: np.ndarray) -> Optional[list[int]]:
    """The exact solve over the candidates in ``keep``: layer by layer, the partial plans no other
    matches or beats in both bytes and loss, less those whose Lagrangian bound (``lam``; ``least``:
    each layer's least ``loss + lam * cost``) exceeds ``limit`` (the loss of a known plan). ``None``
    when it would weigh more than ``_MAX_WORK``."""
    choice = [k[0] if len(k) == 1 else -1 for k in keep]
    order = sorted((i for i, k in enumerate(keep) if len(k) > 1), key=lambda i: len(keep[i]))
    cost = np.array([sum(int(costs[i, k[0]]) for i, k in enumerate(keep) if len(k) == 1)], dtype=np.int64)
    loss = np.array([sum(float(losses[i, k[0]]) for i, k in enumerate(keep) if len(k) == 1)])
    best = least[order].tolist()
    rest = np.concatenate([np.cumsum(best[::-1])[::-1][1:], [0.0]])  # the bound's share of the layers still to come
    trail, work = [], 0
    for step, i in enumerate(order):
        c_i, f_i = costs[i, keep[i]], losses[i, keep[i]]
        work += cost.size * c_i.size
        if work > _MAX_WORK:
            return None
        c = (cost[:, None] + c_i[None, :]).ravel()
        f = (loss[:, None] + f_i[None, :]).ravel()
        ok = (c <= capacity) & (f + lam * c + rest[step] - lam * capacity <= limit)
        idx = np.flatnonzero(ok)
        idx = idx[np.lexsort((f[idx], c[idx]))]
        running = np.minimum.accumulate(f[idx])
        idx = idx[f[idx] < np.concatenate([[np.inf], running[:-1]])]  # strictly better than every cheaper state
        trail.append((idx // len(keep[i]), idx % len(keep[i])))
        cost, loss = c[idx], f[idx]
    if not loss.size:  # cannot happen (the greedy's plan stays within the limit); the MILP decides
        return None
    s = int(np.argmin(loss))
    for step in range(len(order) - 1, -1, -1):
        parent, pick = trail[step]
        choice[order[step]] = keep[order[step]][int(pick[s])]
        s = int(parent[s])
    return choice


def _milp(costs: np.ndarray, losses: np.ndarray, keep: list[list[int]], capacity: int, rel_gap: float = 0.0) -> Optional[list[int]]:
    """HiGHS over the candidates in ``keep`` (layers with one are fixed, not solved), stopping at
    ``rel_gap`` (0: exact, up to HiGHS' absolute gap of 1e-6 of the largest loss; its own default
    of 1e-4 is what this module used alone before 2026-11-27)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    choice = [k[0] if len(k) == 1 else -1 for k in keep]
    free = [i for i, k in enumerate(keep) if len(k) > 1]
    room = capacity - sum(int(costs[i, k[0]]) for i, k in enumerate(keep) if len(k) == 1)
    if not free:
        return choice if room >= 0 else None
    var = [(r, i, j) for r, i in enumerate(free) for j in keep[i]]
    n = len(var)
    data = np.concatenate([np.ones(n), [float(costs[i, j]) for _, i, j in var]])
    rows = np.concatenate([[r for r, _, _ in var], np.full(n, len(free))])
    A = csr_matrix((data, (rows, np.tile(np.arange(n), 2))), shape=(len(free) + 1, n))
    c = np.array([losses[i, j] for _, i, j in var])
    c = c - min(c.min(), 0.0)  # one candidate per layer: a shift changes no choice
    c = c / max(c.max(), 1e-30)
    lo = np.concatenate([np.ones(len(free)), [-np.inf]])
    hi = np.concatenate([np.ones(len(free)), [float(room)]])
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": 60, "mip_rel_gap": rel_gap})
    if res.x is None:
        return None
    for v in np.flatnonzero(np.round(res.x)):
        _, i, j = var[v]
        choice[i] = j
    return None if min(choice) < 0 else choice


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
