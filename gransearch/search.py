"""``optimize``: per-layer method, bit width and granularity under an exact byte budget.

How a search runs (no quantization math lives here):

1. **Bank** (:mod:`gransearch.bank`): every (layer, candidate) quantized once on the unquantized
   inputs, with its exact stored bytes and layer objective.
2. **Trials** only assemble layers from the bank into a working copy of the model and measure
   perplexity on a validation slice (never the test split), reported window by window so that
   hopeless trials are pruned. A trial's byte cost is computed analytically first; no over-budget
   plan is ever evaluated or returned.
3. **Warm starts.** Every uniform configuration that fits is enqueued, and so is the allocation
   that minimises the summed layer losses under the budget (:mod:`gransearch.allocate`: a
   multiple-choice knapsack solved exactly). The default knapsack loss of an entry is its estimated
   loss increase: per-output-row layer objectives weighted by the layer's output Fisher
   (:mod:`gransearch.sensitivity`). Optuna (TPE) then tunes how the knapsack weighs layers: a
   multiplier per layer type and per depth quarter, and which loss it uses (Fisher-weighted, raw,
   or relative to the layer's output energy). Every knapsack solution fits the budget by
   construction.
4. **Final.** The best plans by proxy perplexity are re-quantized sequentially with
   :func:`gransearch.quantize` (as a user would apply them) and measured on the final token
   stream; the result reports proxy and final perplexity side by side.

The study (:mod:`gransearch.study`) is bound to everything its values depend on, so a resumed or
shared search never mixes incomparable trials. The budget counts the whole model as stored: packed
linears plus every floating-point parameter at its dtype, counted once
(:func:`gransearch.plan.plan_nbytes`); ``budget_gb`` is in GB (10^9 bytes).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._heap import heap_frozen
from .allocate import (candidate_keys, candidate_specs, check_budget, check_candidates, cost_and_losses, depth_quarter, layer_kind,
                       solve_knapsack, solve_tied, uniform_keys)
from .arch import block_index, fused_sets, get_module, linear_weight, model_linears
from .export import float_dtype_of
from .profiles import get_profile
from .bank import Bank, BankEntry, Stages, bank_config, bank_for, build_bank
from .data import tokens_sha256
from .errors import BankError, BudgetError, SearchError, check_device, check_float_model, check_int, check_positive
from .evaluate import kl_divergence, perplexity, reference_logprobs
from .evaluate import windows as eval_windows_of
from .offload import DiskModel, counted
from .offload import perplexity as disk_perplexity
from .plan import GB, LayerPlan, QuantPlan, model_fingerprint, weights_fingerprint
from .quantizer import QuantizedWeight
from .study import (POLL_SECONDS, SEARCH_RECORD_VERSION, PerTrialReads, bind_study, check_workers, enqueue_missing, open_study, run_trials, storage_lock,
                    worker_id)

PROXIES = ("ppl", "kl")  # what a trial measures on the validation windows

log = logging.getLogger(__name__)

__all__ = ["optimize", "OptimizeResult", "ParetoPoint", "BudgetError", "BankError",
           # where they lived before the bank and the allocation got their own modules
           "Bank", "bank_for", "build_bank", "candidate_specs", "solve_knapsack"]

# the bank options optimize() uses (recorded in its search record, so they are passed explicitly)
_BANK_DEFAULTS = dict(damp=0.01, awq_grid=20, awq_rank=64, fisher_windows=16)


# ------------------------------------------------------------------------------------------------
# results


@dataclass
class ParetoPoint:
    nbytes: int
    ppl: float
    plan: QuantPlan
    trial: int


@dataclass
class OptimizeResult:
    plan: QuantPlan
    nbytes: int
    ppl: float  # final perplexity of the returned plan (sequential re-quantization), or proxy if no final stage
    proxy_ppl: float
    pareto: list[ParetoPoint]
    study: object
    finals: list[dict] = field(default_factory=list)  # every finalist: plan summary, bytes, proxy, final, seconds by stage
    baselines: dict[str, float] = field(default_factory=dict)  # uniform key -> proxy perplexity
    bank_seconds: float = 0.0
    search_seconds: float = 0.0
    # where this process's trial loop went: sampling, knapsack, duplicate check, assembly, evaluation, and
    # the rest (Optuna's storage and pruner, worker bookkeeping); waits for the GPU at each boundary
    trial_stages: dict = field(default_factory=dict)
    # where this process's bank build went (stage -> seconds; empty when the bank was loaded whole)
    bank_stages: dict = field(default_factory=dict)

    @property
    def proxy_gap(self) -> float:
        """Relative gap between the final and the proxy perplexity of the returned plan."""
        return self.ppl / self.proxy_ppl - 1.0

    @property
    def n_trials(self) -> int:
        """Complete and pruned trials of the study (failed ones, retried, and enqueued ones not yet run excluded)."""
        import optuna

        return len(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))


# ------------------------------------------------------------------------------------------------
# the search


def trial_cache_bytes(device_bytes: int) -> int:
    """The default cap of the trial assembler's entry cache on a GPU of ``device_bytes``: a quarter."""
    return device_bytes // 4


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Assembler:
    """Puts bank entries into a working copy of the model (float weights, nothing packed).

    On a GPU the entries a trial uses are kept there, up to ``cache_bytes`` (default: a quarter of
    the device's memory), least recently used first out. When every entry's float weight fits in
    that (a small model: the bank of 12 of SmolLM2-135M takes 5.1 GB in float32), the weights
    themselves are kept, in the model's dtype and layout, and a later trial choosing the same entry
    points the layer at its kept weight: nothing is computed or copied. The entries a trial uses
    first are made together (:meth:`_keep_all`). Otherwise the unpacked codes (one byte per weight)
    and scales are kept, and a later trial dequantizes them on the device instead of reading,
    unpacking and dequantizing the entry on the CPU and copying the float weight over.
    """

    def __init__(self, model: nn.Module, bank: Bank, device=None, cache_bytes: Optional[int] = None):
        self.model = copy.deepcopy(model).eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.bank = bank
        self.mods = [get_module(self.model, n) for n in bank.layers]
        self.current = [-1] * len(bank.layers)
        if cache_bytes is None and self.device.type == "cuda":
            cache_bytes = trial_cache_bytes(torch.cuda.get_device_properties(self.device).total_memory)
        self.cache_bytes = cache_bytes or 0
        self.cache: "collections.OrderedDict[tuple[int, int], object]" = collections.OrderedDict()  # entries, or weights
        self.cached = 0
        weights = sum(len(row) * _tensor_bytes(linear_weight(m)) for row, m in zip(bank.entries, self.mods))
        self.keeps_weights = bool(self.cache_bytes) and weights <= self.cache_bytes

    def _cached(self, key: tuple[int, int], make, nbytes) -> object:
        hit = self.cache.pop(key, None)
        if hit is None:
            hit = make()
            self.cached += nbytes(hit)
            while self.cache and self.cached > self.cache_bytes:
                self.cached -= nbytes(self.cache.popitem(last=False)[1])
        self.cache[key] = hit
        return hit

    def _entry(self, i: int, c: int) -> BankEntry:
        e = self.bank.entries[i][c]
        if not self.cache_bytes:
            return e
        return self._cached((i, c), lambda: e.to(self.device), lambda hit: hit.resident_nbytes)

    def _as_param(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """A float ``[out, in]`` weight as layer ``i``'s weight parameter holds it (dtype, layout)."""
        return (w if isinstance(self.mods[i], nn.Linear) else w.t()).to(self.mods[i].weight.dtype).contiguous()

    def _weight(self, i: int, c: int) -> torch.Tensor:
        """Entry ``c`` of layer ``i`` as the layer's weight parameter holds it (dtype, device, layout)."""
        return self._cached((i, c), lambda: self._as_param(i, self.bank.entries[i][c].to(self.device).effective_weight()), _tensor_bytes)

    def _keep_all(self, missing: list[tuple[int, int]]) -> None:
        """The kept weights of the ``missing`` entries (every one fits: nothing is evicted), those of one
        spec and input width dequantized as one stack of rows: one copy to the device per buffer and one
        dequantization for all of them, not one per layer (a trial of new entries, such as a uniform
        plan, changes every layer). Entries whose blocks span rows, ggml blocks and scattered groups
        are made one by one."""
        def keep(i: int, c: int, w: torch.Tensor) -> None:  # w: the entry's dequantized rows on the device, divided in place
            s = self.bank.entries[i][c].in_scale
            w = self._as_param(i, w if s is None else w.div_(s.to(self.device).unsqueeze(0)))  # in place: no dead rows kept
            self._cached((i, c), lambda: w, _tensor_bytes)

        stacks: dict[tuple, list] = {}
        for i, c in missing:
            q = self.bank.entries[i][c].quantized()  # on the host (read from disk if stored): once
            alone = getattr(q.spec, "is_ggml", False) or q.spec.granularity.spans_rows or q.g_idx is not None
            stacks.setdefault(("alone", i, c) if alone else (str(q.spec), q.shape[1], q.scale.dtype), []).append((i, c, q))
        for key, items in stacks.items():
            if key[0] == "alone":
                i, c, q = items[0]
                keep(i, c, q.to(self.device).dequantize())
                continue
            qs = [q for _, _, q in items]
            zero = None if qs[0].zero is None else torch.cat([q.zero for q in qs])
            stacked = QuantizedWeight(torch.cat([q.codes for q in qs]), torch.cat([q.scale for q in qs]), zero, qs[0].spec).to(self.device)
            for (i, c, _), w in zip(items, stacked.dequantize().split([q.shape[0] for q in qs])):
                keep(i, c, w)

    @torch.no_grad()
    def load(self, choice: Sequence[int]) -> nn.Module:
        changed = [(i, c) for i, c in enumerate(choice) if self.current[i] != c]
        if self.keeps_weights:
            self._keep_all([(i, c) for i, c in changed if (i, c) not in self.cache])
        for i, c in changed:
            if self.keeps_weights:
                self.mods[i].weight.data = self._weight(i, c)  # the layer now reads the kept tensor
            else:
                linear_weight(self.mods[i]).copy_(self._entry(i, c).effective_weight())
            self.current[i] = c
        return self.model


class _DiskPlan:
    """A trial's model when the float model is read from disk: the folder, and each linear's
    weight from its chosen bank entry (applied as the block is read; see
    :func:`gransearch.offload.perplexity`)."""

    def __init__(self, disk, bank: Bank, choice: Sequence[int]):
        self.disk, self.bank = disk, bank
        self.choice = {n: c for n, c in zip(bank.layers, choice)}
        self.index = {n: i for i, n in enumerate(bank.layers)}

    def weight(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.index:
            return None
        return self.bank.entries[self.index[name]][self.choice[name]].effective_weight()


class _DiskAssembler:
    """:class:`_Assembler` for a model read from disk: nothing is copied; each trial's weights are
    read from the stored bank as its blocks run."""

    def __init__(self, disk, bank: Bank, device=None):
        self.disk, self.bank = disk, bank
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def load(self, choice: Sequence[int]) -> "_DiskPlan":
        return _DiskPlan(self.disk, self.bank, choice)


def _check_disk_search(model, proxy, objective_fn, final_ids, n_final, bank, bank_dir, final_dir, prof):
    """The model read from disk (a :class:`~gransearch.offload.DiskModel`), after refusing what a
    search from disk does not do; ``None`` for a model in memory."""
    check_float_model(model, "a search")  # a DiskModel answers for itself
    if not isinstance(model, DiskModel):
        return None
    if proxy != "ppl" or objective_fn is not None:
        raise ValueError("a search of a model read from disk measures perplexity (proxy='ppl', no objective_fn)")
    if bank is None and not bank_dir:
        raise ValueError("a search of a model read from disk keeps its bank on disk: give bank_dir")
    if final_ids is not None and n_final > 0 and not (final_dir or bank_dir):
        raise ValueError("a search of a model read from disk writes its finalists' checkpoints: give final_dir")
    if prof.format == "gguf":
        raise ValueError("the gguf profile needs the model in memory (llama.cpp's quantizer and the Q8_0 embedding)")
    return model


SAMPLERS = ("independent", "multivariate")


def _sampler(name: str, seed: int):
    """Optuna's TPE sampler for a trial's knapsack weights: ``independent`` (each weight from its
    own history) or ``multivariate`` (all weights jointly). The joint form needs ``group=True``:
    the uniform and seed trials suggest no weights, and Optuna's plain multivariate TPE samples
    only the weights every finished trial has, which is then none (it fell back to independent
    sampling, trial for trial, in every search before this option existed)."""
    import optuna

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    if name == "independent":
        return optuna.samplers.TPESampler(seed=seed)
    with warnings.catch_warnings():  # multivariate and group are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def _plan_from_keys(bank: Bank, keys: Sequence[str], fingerprint: str, meta=None) -> QuantPlan:
    """The plan of a trial: ``keys[i]`` is the ``method:spec`` of layer ``bank.layers[i]``."""
    layers = {n: LayerPlan.from_key(k, bank.gptq) for n, k in zip(bank.layers, keys)}  # GPTQ layers keep the bank's options
    return QuantPlan(layers, fingerprint, dict(meta or {}))


def _plan_id(keys: Sequence[str]) -> str:
    """A plan's identity: a hash of its content (``method:spec`` per layer), never of bank positions."""
    return hashlib.sha1(",".join(keys).encode()).hexdigest()[:16]


def _search_record(model, calib, bank, candidates, act_order, shapes, budget, objective_fn, eval_ids, seqlen, eval_windows,
                   profile="research", float_dtype=None, bank_prune=None, proxy="ppl", bank_opts=_BANK_DEFAULTS) -> dict:
    """What every trial value of a search depends on (see :mod:`gransearch.study`)."""
    methods, bits, granularities = candidates
    if objective_fn is None and eval_ids is None:
        raise ValueError("eval_ids (the validation token stream of the proxy objective) is required unless objective_fn is given")
    if bank is not None:
        if bank.config.get("weights") not in (None, weights_fingerprint(model)):
            raise BankError("the bank was built for another model (other weights): build one for this model")
        bconf = dict(bank.config)
        cand_keys = sorted({k for row in bank.keys for k in row})
    else:
        bconf = bank_config(model, calib, methods, bits, granularities, profile=profile, prune=bank_prune, act_order=act_order,
                            **bank_opts)
        cand_keys = candidate_keys(shapes, methods, bits, granularities, profile)
    if objective_fn is None:
        kind = {"ppl": "perplexity", "kl": "kl-divergence"}[proxy]  # a KL study measures against these very weights (bank.weights)
        measure = {"kind": kind, "eval_sha256": tokens_sha256(eval_windows_of(eval_ids, seqlen, eval_windows)), "seqlen": seqlen,
                   "eval_windows": eval_windows}
    else:
        measure = {"kind": "custom", "name": getattr(objective_fn, "__qualname__", type(objective_fn).__name__)}
    record = {"version": SEARCH_RECORD_VERSION, "budget_bytes": budget, "bank": bconf, "candidates": cand_keys, "proxy": measure}
    if float_dtype is not None:  # the budget counts floats at this dtype (absent: as loaded, the old records)
        record["float_dtype"] = str(float_dtype).removeprefix("torch.")
    return record


def _pareto(complete, plan_of) -> list[ParetoPoint]:
    """Bytes against proxy perplexity: the trials no smaller-or-equal trial beats."""
    pareto: list[ParetoPoint] = []
    for t in sorted(complete, key=lambda t: (t.user_attrs["nbytes"], t.value)):
        if not pareto or t.value < pareto[-1].ppl:
            pareto.append(ParetoPoint(t.user_attrs["nbytes"], t.value, plan_of(t), t.number))
    return pareto


def _seed_choices(seed_plans: dict, bank, costs, fixed: int, budget: int) -> dict[str, list[int]]:
    """``{name: bank index per layer}`` of the seed plans; ``ValueError`` naming a layer or key the
    bank lacks, or a plan over the budget."""
    out = {}
    for name, plan in seed_plans.items():
        layers = plan.layers if hasattr(plan, "layers") else plan
        keys = {n: (lp.key() if hasattr(lp, "key") else str(lp)) for n, lp in layers.items()}
        missing = [n for n in bank.layers if n not in keys]
        if missing:
            raise ValueError(f"seed plan {name!r} names no candidate for {len(missing)} layers, e.g. {missing[0]}")
        choice = []
        for i, n in enumerate(bank.layers):
            if keys[n] not in bank.keys[i]:
                raise ValueError(f"seed plan {name!r}: {n} takes {keys[n]}, which is not in the bank (its candidates: "
                                 f"{', '.join(bank.keys[i][:8])}...)")
            choice.append(bank.index(i, keys[n]))
        nbytes = fixed + int(sum(costs[i, c] for i, c in enumerate(choice)))
        if nbytes > budget:
            raise ValueError(f"seed plan {name!r} takes {nbytes:,} bytes, over the budget of {budget:,}")
        out[name] = choice
    return out


ONLY = "only:"  # a warm start named "only:<method>": the knapsack over that method's candidates alone


def _method_mask(bank: Bank, method: str, shape) -> np.ndarray:
    """``[layers, K]``: true where the bank's candidate is made by ``method``."""
    mask = np.zeros(shape, dtype=bool)
    for i, keys in enumerate(bank.keys):
        for j, k in enumerate(keys):
            mask[i, j] = k.split(":", 1)[0] == method
    return mask


def _restricted_starts(bank: Bank, costs: np.ndarray, capacity: int) -> list[str]:
    """The methods whose candidates alone can fill the budget, when the bank holds several: each
    gets a warm start of its own. Layer objectives of different methods are not comparable for the
    proxy (GPTQ's is the lowest by construction and can lose on perplexity), so the knapsack over
    all of them can miss a plan that one method alone makes."""
    methods = sorted({k.split(":", 1)[0] for keys in bank.keys for k in keys})
    if len(methods) < 2:
        return []
    out = []
    for m in methods:
        mask = _method_mask(bank, m, costs.shape)
        if mask.any(axis=1).all() and int(np.where(mask, costs, np.iinfo(np.int64).max).min(axis=1).sum()) <= capacity:
            out.append(m)
    return out


def _ranked(complete) -> list:
    """Complete trials by proxy perplexity, one per distinct plan."""
    ranked, seen = [], set()
    for t in sorted(complete, key=lambda t: t.value):
        if t.user_attrs["plan_id"] not in seen:
            seen.add(t.user_attrs["plan_id"])
            ranked.append(t)
    return ranked


def _finals(model, trials, plan_of, calib, final_ids, seqlen, batch_size, device, verbose, disk=None, final_dir=None):
    """Re-quantize each trial's plan sequentially (as a user applies it) and measure it on
    ``final_ids``; returns ``(best final perplexity, its trial, one record per finalist)``. From
    disk (``disk``), each finalist is quantized block by block into ``final_dir/trial-N`` (a
    compressed-tensors checkpoint) and that checkpoint is measured, read block by block."""
    from .quantize import quantize

    finals, best = [], None
    for t in trials:
        plan = plan_of(t)
        record = {}
        t0 = time.perf_counter()
        if disk is not None:
            folder = os.path.join(final_dir, f"trial-{t.number}")
            res = quantize(disk, plan, calib, device=device, save=folder, verbose=verbose)
            t1 = time.perf_counter()
            fin = disk_perplexity(DiskModel(folder), final_ids, seqlen, batch_size, device=device, verbose=verbose).ppl
            record["checkpoint"] = folder
        else:
            work = copy.deepcopy(model)
            res = quantize(work, plan, calib, device=device, objective=False, verbose=verbose)  # GPTQ options from the plan's layers
            if device is not None:
                work.to(device)
            t1 = time.perf_counter()
            fin = perplexity(work, final_ids, seqlen=seqlen, batch_size=batch_size, verbose=verbose).ppl
            del work
        # where the finalist's time went: quantize (of it, the per-layer solves: GPTQ, AWQ's searches), evaluate
        record["seconds"] = {"quantize": round(t1 - t0, 3), "layer solves": round(sum(r.seconds for r in res.records), 3),
                             "evaluation": round(time.perf_counter() - t1, 3)}
        finals.append({"trial": t.number, "nbytes": t.user_attrs["nbytes"], "proxy_ppl": t.value, "final_ppl": fin,
                       "kind": t.user_attrs.get("kind"), "summary": plan.summary(), **record})
        if best is None or fin < best[0]:
            best = (fin, t)
    return best[0], best[1], finals


@heap_frozen
def optimize(
    model: nn.Module,
    budget_gb: Optional[float] = None,
    *,
    calib,
    eval_ids: torch.Tensor,
    final_ids: Optional[torch.Tensor] = None,
    budget_bytes: Optional[int] = None,
    methods: Sequence[str] = ("rtn", "gptq", "awq"),
    bits: Sequence[int] = (2, 3, 4, 8),
    granularities: Sequence = ("tensor", "channel", 32, 64, 128),
    n_trials: int = 60,
    timeout: Optional[float] = None,
    storage: Optional[str] = None,
    study_name: Optional[str] = None,
    seed: int = 0,
    device=None,
    seqlen: int = 512,
    eval_windows: Optional[int] = 16,
    batch_size: int = 4,
    n_final: int = 2,
    act_order: bool = True,
    bank: Optional[Bank] = None,
    bank_dir: Optional[str] = None,
    objective_fn: Optional[Callable[[nn.Module, Callable[[int, float], None]], float]] = None,
    warm_start: bool = True,
    study_attrs: Optional[dict] = None,
    profile: str = "research",
    seed_plans: Optional[dict] = None,
    float_dtype=None,
    bank_prune: Optional[str] = None,
    max_bank_gb: Optional[float] = None,
    proxy: str = "ppl",
    final_dir: Optional[str] = None,
    sampler: str = "independent",
    awq_rank: Optional[int] = _BANK_DEFAULTS["awq_rank"],
    verbose: bool = True,
) -> OptimizeResult:
    """Search each layer's method, bit width and granularity under a byte budget.

    ``budget_gb`` (GB = 10^9 bytes) or ``budget_bytes``: the whole model as stored. ``calib``:
    calibration windows; ``eval_ids``: the validation token stream of the proxy objective
    (``eval_windows`` windows of ``seqlen``); ``final_ids``: the stream the finalists are measured on
    (the test split; ``None`` skips the final stage). ``storage``/``study_name``: an Optuna storage
    URL (``sqlite:///run/study.db``) -- running again resumes and loses no finished trial.
    ``act_order``: GPTQ's column order in the bank and the final re-quantization (ignored when a
    ``bank`` is given: its own options are used). ``bank_dir``: keep the candidate bank on disk
    there (memory then holds one layer's candidates while building) and reuse it when the same
    search runs again (:func:`bank_for`). ``objective_fn(model, report)`` replaces the
    perplexity objective (tests). ``warm_start=False``
    enqueues no baselines (extra workers joining a study). ``n_trials`` counts the study's complete
    and pruned trials, whichever process ran them (failed ones are retried, not counted).
    ``study_attrs``: user attributes stored on the study once it is checked (the CLI keeps its run
    configuration there for workers). ``seed_plans``: ``{name: plan}`` (a :class:`QuantPlan` or
    ``{linear name: "method:spec"}`` naming bank candidates for every linear) run as warm starts
    too, e.g. llama.cpp's own mix of a preset; one over the budget or outside the bank is refused by
    name. ``profile``: ``"research"`` (every candidate, gransearch's
    byte layout), ``"vllm"`` or ``"vllm-asym"`` (only what vLLM serves, fused layers sharing a spec, bytes of the
    compressed-tensors checkpoint; :mod:`gransearch.profiles`). ``float_dtype``: the dtype the
    budget counts floating-point tensors at (default: as loaded for ``research``, the model's
    published dtype for ``vllm``, as :func:`gransearch.save_quantized` writes them). ``bank_prune="dominated"``
    keeps only each layer's Pareto front of (bytes, layer objective) in the bank; ``max_bank_gb``
    refuses a stored bank (``bank_dir``) larger than that (see :func:`build_bank`). ``proxy``: what a
    trial measures on the validation windows: ``"ppl"`` (perplexity) or ``"kl"`` (the mean KL
    divergence per token from ``model`` itself, in nats: it sees only what quantization changed, so
    it tells plans apart on fewer tokens; the float model's log-probabilities of the windows are
    kept in memory as float16, :func:`~gransearch.evaluate.reference_logprobs`). With ``"kl"`` the
    proxy values (``proxy_ppl``, the Pareto front, ``baselines``) are KL divergences; the final
    stage still measures perplexity. ``sampler``: how Optuna's TPE draws a trial's loss-table choice
    and weights, ``"independent"`` (each from its own history; the default, and what every
    documented search used) or ``"multivariate"`` (jointly). ``awq_rank``: the bank's AWQ searches
    measure a candidate's error with the top-``awq_rank`` eigen-factor of each input Hessian (the
    default, 64), or with the exact Hessian (``None``: no eigendecomposition, more arithmetic per
    grid point; better choices by the layer objective, docs/scale.md; ignored when a ``bank`` is
    given). ``model`` may be a :class:`~gransearch.offload.DiskModel` (larger than
    memory): the bank is built from disk into ``bank_dir``, each trial is scored block by block
    (:func:`gransearch.offload.perplexity`; the same values as in memory), and each finalist is quantized
    from disk into ``final_dir/trial-N`` (default: ``finals`` beside ``bank_dir``), a checkpoint measured
    as written. Returns an
    :class:`OptimizeResult`; ``model`` itself is not modified.

    Resuming is safe: the study records everything its trial values depend on (weights, candidates,
    budget, calibration, proxy windows) and a study made for another search raises
    :class:`~gransearch.errors.StudyMismatchError` naming what changed; trials store their plans
    by content; trials of dead workers are marked failed and lost warm starts are run again.
    """
    # long on purpose: the trial closures below share the bank, its cost and loss tables and the study,
    # so a trial reads top to bottom in one place; every separable step is a named helper above
    import optuna

    if (budget_gb is None) == (budget_bytes is None):
        raise ValueError("give exactly one of budget_gb (in GB, 10^9 bytes) or budget_bytes")
    budget = int(budget_bytes) if budget_bytes is not None else int(round(budget_gb * GB))
    n_trials = check_int("n_trials", n_trials, 1)
    seqlen = check_int("seqlen", seqlen, 2)
    eval_windows = check_int("eval_windows", eval_windows, 1, allow_none=True)
    batch_size = check_int("batch_size", batch_size, 1)
    n_final = check_int("n_final", n_final, 0)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0 (or None), got {timeout!r}")
    check_candidates(methods, bits, granularities)
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {', '.join(PROXIES)}, got {proxy!r}")
    if proxy != "ppl" and objective_fn is not None:
        raise ValueError("objective_fn replaces the proxy: leave proxy='ppl' when giving one")
    prof = get_profile(profile)
    prof.check_candidates(bits, granularities)
    check_device(device)
    max_bank = None if max_bank_gb is None else int(check_positive("max_bank_gb", max_bank_gb) * GB)
    bank_opts = dict(_BANK_DEFAULTS, awq_rank=check_int("awq_rank", awq_rank, 1, allow_none=True))
    disk = _check_disk_search(model, proxy, objective_fn, final_ids, n_final, bank, bank_dir, final_dir, prof)
    net, float_dtype = counted(model, float_dtype, prof.float_dtype_of_model)  # a DiskModel: its meta model, floats as loaded
    if float_dtype is not None or prof.float_dtype_of_model:
        float_dtype = float_dtype_of(net, float_dtype)
    fingerprint = model_fingerprint(net)
    names = [r.name for r in model_linears(net)]
    fixed, shapes = check_budget(net, names, bits, granularities, budget, prof, float_dtype, methods)
    if prof.format == "gguf":
        from .export.gguf import embeddings_rounded

        if not embeddings_rounded(net, "Q8_0"):
            log.warning("the gguf profile counts the token embedding as Q8_0, but this model computes with the float one: call "
                        "gransearch.export.gguf.round_embeddings(model) first so that the search scores what the GGUF stores")

    # ---- the study: bound to everything its values depend on, checked before any bank work
    if objective_fn is None and eval_ids is None:
        raise ValueError("eval_ids (the validation token stream of the proxy objective) is required unless objective_fn is given")
    record = _search_record(model, calib, bank, (methods, bits, granularities), act_order, shapes, budget,
                            objective_fn, eval_ids, seqlen, eval_windows, prof.name, float_dtype, bank_prune, proxy, bank_opts)
    # both read the study once per trial (PerTrialReads), not once per weight and per window
    sampler, pruner = PerTrialReads().wrap(_sampler(sampler, seed), optuna.pruners.MedianPruner(n_startup_trials=8, n_warmup_steps=1))
    study_name = study_name or f"gransearch-{fingerprint}-{budget}"
    study = open_study(storage, study_name, sampler=sampler, pruner=pruner)
    with storage_lock(storage):
        bind_study(study, record, storage=storage, extra_attrs=study_attrs)
    check_workers(study, storage)

    if bank is None and bank_dir:
        bank = bank_for(model, calib, bank_dir, methods, bits, granularities, act_order=act_order, device=device, verbose=verbose,
                        profile=prof.name, prune=bank_prune, max_bytes=max_bank, **bank_opts)
    elif bank is None:
        bank = build_bank(model, calib, methods, bits, granularities, act_order=act_order, device=device, verbose=verbose,
                          profile=prof.name, prune=bank_prune, **bank_opts)
    if bank.layers != names:
        raise BankError("the bank was built for another model (its layers differ)")
    L = len(names)
    costs, bases = cost_and_losses(bank)
    capacity = budget - fixed
    types = sorted({layer_kind(n) for n in names})
    n_blocks = 1 + max((block_index(n) or 0 for n in names), default=0)
    quarters = [depth_quarter(n, n_blocks) for n in names]

    assembler = _Assembler(model, bank, device) if disk is None else _DiskAssembler(disk, bank, device)
    stage = Stages(assembler.device)  # the trial loop's seconds by stage (OptimizeResult.trial_stages)
    tied = [[names.index(n) for n in g] for g in fused_sets(names)] if prof.fused else None

    reference = None
    if proxy == "kl":  # the float model's log-probabilities of the proxy windows, once
        reference = reference_logprobs(model, eval_ids, seqlen, batch_size=batch_size, max_windows=eval_windows, verbose=verbose)

    def evaluate(mdl, report):
        if isinstance(mdl, _DiskPlan):  # block by block from disk: one report, at the end
            res = disk_perplexity(mdl.disk, eval_ids, seqlen, batch_size, eval_windows, device=device, weights=mdl.weight, verbose=False)
            report(res.n_windows, res.nll)
            return res.ppl
        if objective_fn is not None:
            return float(objective_fn(mdl, report))
        if reference is not None:
            return kl_divergence(mdl, eval_ids, reference, seqlen=seqlen, batch_size=batch_size, max_windows=eval_windows,
                                 verbose=False, on_window=report).kl
        return perplexity(mdl, eval_ids, seqlen=seqlen, batch_size=batch_size, max_windows=eval_windows,
                          verbose=False, on_window=report).ppl

    uniform = uniform_keys(bank, costs, fixed, budget)
    seeds = _seed_choices(seed_plans or {}, bank, costs, fixed, budget)

    def choice_for(trial) -> tuple[list[int], dict]:
        key = trial.user_attrs.get("uniform")
        if key is not None:
            return [bank.index(i, key) for i in range(L)], {"kind": "uniform", "uniform": key}
        seed = trial.user_attrs.get("seed")
        if seed is not None:
            if seed not in seeds:
                raise optuna.TrialPruned(f"seed plan {seed!r} was not given to this run")
            return seeds[seed], {"kind": "seed", "seed": seed}
        with stage("sampling"):
            mode = trial.suggest_categorical("objective", list(bases))  # the knapsack's loss table (name kept: stored studies resume)
            w_type = {t: trial.suggest_float(f"w_{t}", 0.1, 10.0, log=True) for t in types}
            w_depth = [trial.suggest_float(f"w_depth{q}", 0.1, 10.0, log=True) for q in range(4)]
        base = bases[mode]
        warm = trial.user_attrs.get("warm") or ""
        if warm.startswith(ONLY):  # one method's candidates alone
            base = np.where(_method_mask(bank, warm[len(ONLY):], base.shape), base, np.inf)
        weights = np.array([w_type[layer_kind(n)] * w_depth[q] for n, q in zip(names, quarters)])
        with stage("knapsack"):
            if tied is None:
                choice = solve_knapsack(costs, base * weights[:, None], capacity)
            else:  # fused serving sets take one spec: chosen jointly
                choice = solve_tied(costs, base * weights[:, None], bank.keys, tied, capacity)
        if choice is None:
            raise optuna.TrialPruned("knapsack infeasible")
        return choice, {"kind": "knapsack"}

    def claim(trial):  # under the storage lock, as the trial is taken: a dead worker's trial is recognised on resume
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("device", str(assembler.device))

    def measured_elsewhere(trial, cid):
        """The value of this plan if another trial measured it, or waits for the one measuring it now
        (claims are made under the storage lock, so two workers never measure one plan); ``None``
        when this trial must measure it."""
        S = optuna.trial.TrialState
        with storage_lock(storage):
            trial.set_user_attr("plan_id", cid)
            others = [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.RUNNING))
                      if t.user_attrs.get("plan_id") == cid and t.number != trial.number]
        while others:
            done = [t for t in others if t.state == S.COMPLETE]
            if done:
                trial.set_user_attr("duplicate_of", done[0].number)
                return done[0].value
            time.sleep(POLL_SECONDS)
            check_workers(study, storage)
            ids = {t.number for t in others}
            others = [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.RUNNING)) if t.number in ids]
        return None

    def run_trial(trial):
        choice, meta = choice_for(trial)
        nbytes = fixed + int(sum(costs[i, c] for i, c in enumerate(choice)))
        if nbytes > budget:  # cannot happen by construction; never evaluate such a plan
            raise RuntimeError(f"internal error: plan of {nbytes} bytes over the budget {budget}")
        keys = [bank.keys[i][c] for i, c in enumerate(choice)]
        cid = _plan_id(keys)
        trial.set_user_attr("nbytes", nbytes)
        trial.set_user_attr("keys", keys)
        for k, v in meta.items():
            trial.set_user_attr(k, v)
        with stage("duplicate check"):
            value = measured_elsewhere(trial, cid)
        if value is not None:  # the same plan was measured already: never twice
            return value
        with stage("assembly"):
            mdl = assembler.load(choice)

        def report(step, running_nll):
            trial.report(math.exp(running_nll) if objective_fn is None and reference is None else running_nll, step)
            if meta["kind"] not in ("uniform", "seed") and trial.should_prune():  # baselines and seeds are measured whole
                raise optuna.TrialPruned()

        with stage("evaluation"):
            return evaluate(mdl, report)

    if warm_start:  # a new study gets every warm start; a resumed one those it lost (failed, killed)
        neutral = {**{f"w_{t}": 1.0 for t in types}, **{f"w_depth{q}": 1.0 for q in range(4)}}
        warm = {mode: {"objective": mode, **neutral} for mode in bases}
        first = next(iter(bases))  # the Fisher-weighted table when the bank has it
        warm.update({ONLY + m: {"objective": first, **neutral} for m in _restricted_starts(bank, costs, capacity)})
        with storage_lock(storage):
            enqueue_missing(study, uniform, warm, seeds=list(seeds))
    t_search = time.perf_counter()
    # failed trials (errors, dead workers) are not counted, so their warm starts run again within n_trials;
    # every worker stops when the study holds n_trials counted trials, whoever ran them
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_trials(study, storage, run_trial, n_trials, timeout=timeout, verbose=verbose, on_start=claim)
    search_seconds = time.perf_counter() - t_search
    trial_stages = stage.report(search_seconds, "other (storage, pruner, bookkeeping)")
    log.info("trial loop stages (seconds): %s", trial_stages)

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise SearchError("no trial completed: raise n_trials or the timeout")

    accounting = {} if prof.name == "research" and float_dtype is None else {
        "profile": prof.name, "format": prof.format, "float_dtype": None if float_dtype is None else str(float_dtype).removeprefix("torch.")}
    if proxy != "ppl":  # the trial values (meta "proxy_ppl") are this measure
        accounting["proxy"] = proxy

    def plan_of(t) -> QuantPlan:
        return _plan_from_keys(bank, t.user_attrs["keys"], fingerprint, {"trial": t.number, "proxy_ppl": t.value, "nbytes": t.user_attrs["nbytes"],
                                                             "budget_bytes": budget, "kind": t.user_attrs.get("kind"), **accounting})

    pareto = _pareto(complete, plan_of)
    baselines = {t.user_attrs["uniform"]: t.value for t in complete if t.user_attrs.get("uniform")}
    ranked = _ranked(complete)
    best_t, final_ppl, finals = ranked[0], ranked[0].value, []
    if final_ids is not None and n_final > 0:
        final_ppl, best_t, finals = _finals(model, ranked[:n_final], plan_of, calib, final_ids, seqlen, batch_size, device, verbose,
                                            disk, final_dir or (os.path.join(os.path.dirname(os.path.abspath(bank_dir)), "finals")
                                                                if bank_dir else None))
    plan = plan_of(best_t)
    plan.meta["final_ppl"] = final_ppl
    return OptimizeResult(plan, best_t.user_attrs["nbytes"], final_ppl, best_t.value, pareto, study, finals, baselines,
                          bank.seconds, search_seconds, trial_stages, dict(bank.stage_seconds))
