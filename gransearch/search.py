"""``optimize``: per-layer method, bit width and granularity under an exact byte budget.

How a search runs (no quantization math lives here):

1. **Bank.** Calibrate once (Hessians and ``mean|x|`` of every linear's input, unquantized inputs),
   then quantize every (layer, candidate) once: RTN; GPTQ with one Cholesky factorisation per
   layer shared by all its GPTQ candidates, solved together as one stack of rows; AWQ with one scale search per scaling group and spec,
   using the group's linear-output error computed from the Hessian (no second activation pass).
   Each entry keeps its packed weight, exact stored bytes and layer objective
   ``tr((W - Q) H (W - Q)^T)``.
2. **Trials** only assemble layers from the bank into a working copy of the model and measure
   perplexity on a validation slice (never the test split), reported window by window so that
   hopeless trials are pruned. A trial's byte cost is computed analytically first; no over-budget
   plan is ever evaluated or returned.
3. **Warm starts.** Every uniform configuration that fits is enqueued, and so is the allocation
   that minimises the summed layer objectives under the budget (a multiple-choice knapsack solved
   exactly with ``scipy.optimize.milp``). The default knapsack loss of an entry is its estimated
   loss increase: per-output-row layer objectives weighted by the layer's output Fisher
   (:mod:`gransearch.sensitivity`, one backward pass over a few calibration windows). Optuna (TPE)
   then tunes how the knapsack weighs layers: a multiplier per layer type and per depth quarter,
   and which loss it uses (Fisher-weighted, raw, or relative to the layer's output energy). Every
   knapsack solution fits the budget by construction.
4. **Final.** The best plans by proxy perplexity are re-quantized sequentially with
   :func:`gransearch.quantize` (as a user would apply them) and measured on the final token
   stream; the result reports proxy and final perplexity side by side.

The budget counts the whole model as stored: packed linears plus every floating-point parameter at
its dtype, counted once (:func:`gransearch.plan.plan_nbytes`); ``budget_gb`` is in GB (10^9 bytes).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms.awq import apply_clip, awq_search_hessian, clip_ratios_hessian, hessian_factor
from .algorithms.gptq import gptq, gptq_many, gptq_prepare
from .algorithms.rtn import rtn
from .arch import arch_of, get_module, linear_shape, linear_weight, model_linears
from .calibrate import calibrate
from .cost import layer_nbytes
from .errors import BankError, BudgetError, NonFiniteError, SearchError, check_device, check_int
from .evaluate import layer_objective, perplexity
from .evaluate import windows as eval_windows_of
from .plan import GB, LayerPlan, QuantPlan, float_nbytes, model_fingerprint, weights_fingerprint
from .quantizer import QuantizedWeight
from .sensitivity import output_fisher
from .spec import PerChannel, PerGroup, PerTensor, QuantSpec
from .study import SEARCH_RECORD_VERSION, bind_study, enqueue_missing, fail_dead_trials, open_study, storage_lock, worker_id

log = logging.getLogger(__name__)

__all__ = ["Bank", "bank_for", "build_bank", "candidate_specs", "solve_knapsack", "optimize", "OptimizeResult", "ParetoPoint", "BudgetError",
           "BankError"]
METHODS_BANK = ("rtn", "gptq", "awq", "awq+gptq")
# the bank options optimize() uses (recorded in its search record, so they are passed explicitly)
_BANK_DEFAULTS = dict(damp=0.01, awq_grid=20, awq_rank=64, fisher_windows=16)

_NO_CLIP = ("q_proj", "k_proj", "c_attn", "query", "key")


def candidate_specs(shape: tuple[int, int], bits: Sequence[int], granularities: Sequence) -> list[QuantSpec]:
    """Asymmetric specs for a layer: every bit width x every granularity that divides its input."""
    out = []
    for b in bits:
        for g in granularities:
            gran = _as_gran(g)
            if isinstance(gran, PerGroup) and shape[1] % gran.size:
                continue
            out.append(QuantSpec(int(b), gran))
    return out


def _as_gran(g):
    if isinstance(g, (PerTensor, PerChannel, PerGroup)):
        return g
    if isinstance(g, int):
        return PerGroup(g)
    if g in ("tensor", "t"):
        return PerTensor()
    if g in ("channel", "c"):
        return PerChannel()
    if isinstance(g, str) and g.startswith("g"):
        return PerGroup(int(g[1:]))
    raise ValueError(f"unknown granularity {g!r}: use 'tensor', 'channel', a group size or PerGroup(n)")


# ------------------------------------------------------------------------------------------------
# the bank


BANK_FORMAT, BANK_VERSION = "gransearch.bank", 2  # 2: sha256 of every file, weights in the config


@dataclass
class BankEntry:
    qweight: Optional[QuantizedWeight]  # None while the entry lives on disk (see ``source``)
    in_scale: Optional[torch.Tensor]  # AWQ: the layer computes x @ (dequant / s)^T
    nbytes: int
    objective: float
    row_objective: Optional[torch.Tensor] = None  # [out]: the objective's per-output-row terms (CPU)
    source: Optional[tuple] = None  # (safetensors file, tensor prefix, shape, spec) of a stored entry

    def quantized(self) -> QuantizedWeight:
        if self.qweight is not None:
            return self.qweight
        from safetensors import safe_open

        path, prefix, shape, spec = self.source
        with safe_open(path, framework="pt") as fh:
            stored = set(fh.keys())
            bufs = {k: fh.get_tensor(prefix + k) for k in ("qweight", "scales", "qzeros") if prefix + k in stored}
        return QuantizedWeight.from_packed(bufs, spec, shape)

    def effective_weight(self) -> torch.Tensor:
        w = self.quantized().dequantize()
        return w if self.in_scale is None else w / self.in_scale.unsqueeze(0)


@dataclass
class Bank:
    """Every candidate of every layer, quantized once on the unquantized inputs."""

    layers: list[str]
    keys: list[list[str]]  # per layer, the candidate keys "method:spec"
    entries: list[list[BankEntry]]
    out_energy: list[float]  # tr(W H W^T): the layer's output energy, for relative objectives
    seconds: float = 0.0
    gptq_options: dict = field(default_factory=dict)  # damp, act_order: recorded in every plan
    fisher: Optional[dict] = None  # {layer: [out] mean (dL/dy)^2} from gransearch.sensitivity
    config: dict = field(default_factory=dict)  # what the bank depends on (bank_config)
    sha256: list = field(default_factory=list)  # per layer file of a stored bank

    def fisher_losses(self) -> Optional[np.ndarray]:
        """``[layers, K]`` estimated loss increases ``sum_j F_j * row_objective_j`` (``inf``: no entry)."""
        if self.fisher is None:
            return None
        K = max(len(k) for k in self.keys)
        out = np.full((len(self.layers), K), np.inf)
        for i, name in enumerate(self.layers):
            f = self.fisher[name].double()
            for j, e in enumerate(self.entries[i]):
                out[i, j] = float(f @ e.row_objective.double())
        return out

    def index(self, layer: int, key: str) -> int:
        return self.keys[layer].index(key)

    def save_manifest(self, folder: str, config: dict) -> None:
        """Write ``bank.json`` (and ``fisher.safetensors``) for entries already stored in ``folder``.

        The manifest holds the sha256 of every file it refers to; :meth:`load` checks them.
        """
        fisher_sha = None
        if self.fisher is not None:
            fisher_sha = _write_safetensors({k: v.contiguous() for k, v in self.fisher.items()}, os.path.join(folder, "fisher.safetensors"))
        doc = {"format": BANK_FORMAT, "version": BANK_VERSION, "config": config, "layers": self.layers, "keys": self.keys,
               "nbytes": [[e.nbytes for e in row] for row in self.entries], "objectives": [[e.objective for e in row] for row in self.entries],
               "out_energy": self.out_energy, "seconds": self.seconds, "gptq_options": self.gptq_options, "fisher": self.fisher is not None,
               "sha256": self.sha256, "fisher_sha256": fisher_sha}
        tmp = os.path.join(folder, "bank.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, os.path.join(folder, "bank.json"))  # written last: its presence marks a complete bank

    @classmethod
    def load(cls, folder: str, config: Optional[dict] = None) -> Optional["Bank"]:
        """The bank stored in ``folder``; ``None`` if there is none, or it was built with another ``config``.

        Raises :class:`~gransearch.errors.BankError` naming the file when the manifest is malformed,
        a file is missing, or a file's sha256 differs from the one recorded when it was written
        (corruption); :func:`bank_for` then rebuilds the bank.
        """
        path = os.path.join(folder, "bank.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankError(f"{path}: not valid JSON ({exc}); remove the folder {folder} to rebuild the bank") from None
        if not isinstance(doc, dict) or doc.get("format") != BANK_FORMAT or doc.get("version") != BANK_VERSION:
            raise BankError(f"{path} is not a gransearch bank of version {BANK_VERSION}; remove the folder {folder} to rebuild it")
        if config is not None and doc.get("config") != json.loads(json.dumps(config)):
            return None
        try:
            return cls._from_manifest(folder, doc)
        except BankError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise BankError(f"{path}: malformed bank manifest or entry ({type(exc).__name__}: {exc}); "
                            f"remove the folder {folder} to rebuild the bank") from None

    @classmethod
    def _from_manifest(cls, folder: str, doc: dict) -> "Bank":
        from safetensors import safe_open
        from safetensors.torch import load_file

        layers, keys, sums = doc["layers"], doc["keys"], doc["sha256"]
        if not (isinstance(layers, list) and isinstance(keys, list) and isinstance(sums, list)) or not len(layers) == len(keys) == len(sums):
            raise BankError(f"{os.path.join(folder, 'bank.json')}: 'layers', 'keys' and 'sha256' must be lists of one length")
        entries = []
        for i, name in enumerate(layers):
            file = os.path.join(folder, f"layer{i:04d}.safetensors")
            _verify(file, sums[i], folder)
            row = []
            with safe_open(file, framework="pt") as fh:
                names = set(fh.keys())
                for j, key in enumerate(keys[i]):
                    spec = QuantSpec.parse(key.split(":", 1)[1])
                    in_scale = fh.get_tensor(f"{j}.in_scale") if f"{j}.in_scale" in names else None
                    shape = tuple(int(v) for v in fh.get_tensor(f"{j}.shape").tolist())
                    row.append(BankEntry(None, in_scale, int(doc["nbytes"][i][j]), float(doc["objectives"][i][j]), fh.get_tensor(f"{j}.rows"),
                                         (file, f"{j}.", shape, spec)))
            entries.append(row)
        fisher = None
        if doc["fisher"]:
            file = os.path.join(folder, "fisher.safetensors")
            _verify(file, doc["fisher_sha256"], folder)
            fisher = load_file(file)
        return cls(layers, keys, entries, doc["out_energy"], doc["seconds"], doc["gptq_options"], fisher, doc["config"], sums)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(file: str, expected, folder: str) -> None:
    if not os.path.isfile(file):
        raise BankError(f"bank file {file} is missing; remove the folder {folder} to rebuild the bank")
    if not isinstance(expected, str) or _sha256_file(file) != expected:
        raise BankError(f"bank file {file} is corrupted (its sha256 differs from the one recorded when it was written); "
                        f"remove the folder {folder} to rebuild the bank")


def _write_safetensors(tensors: dict, file: str) -> str:
    """Write ``tensors`` to ``file`` atomically; returns the file's sha256."""
    from safetensors.torch import save

    data = save(tensors)
    with open(file + ".tmp", "wb") as fh:
        fh.write(data)
    os.replace(file + ".tmp", file)  # atomic: a worker reading the bank never sees half a file
    return hashlib.sha256(data).hexdigest()


def _store_layer(folder: str, i: int, row: list[BankEntry]) -> str:
    """Write one layer's entries (packed) to ``folder/layer{i}.safetensors`` and free their codes;
    returns the file's sha256."""
    file = os.path.join(folder, f"layer{i:04d}.safetensors")
    tensors = {}
    for j, e in enumerate(row):
        for k, v in e.qweight.packed().items():
            tensors[f"{j}.{k}"] = v.contiguous()
        tensors[f"{j}.shape"] = torch.tensor(e.qweight.shape)
        tensors[f"{j}.rows"] = e.row_objective.contiguous()
        if e.in_scale is not None:
            tensors[f"{j}.in_scale"] = e.in_scale.contiguous()
    digest = _write_safetensors(tensors, file)
    for j, e in enumerate(row):
        e.source = (file, f"{j}.", e.qweight.shape, e.qweight.spec)
        e.qweight = None
    return digest


@torch.no_grad()
def build_bank(
    model: nn.Module,
    calib,
    methods: Sequence[str] = ("rtn", "gptq", "awq"),
    bits: Sequence[int] = (2, 3, 4, 8),
    granularities: Sequence = ("tensor", "channel", 32, 64, 128),
    *,
    damp: float = 0.01,
    act_order: bool = True,
    awq_grid: int = 20,
    awq_rank: Optional[int] = 64,
    device=None,
    stats: Optional[dict] = None,
    fisher_windows: int = 16,
    store: Optional[str] = None,
    verbose: bool = True,
) -> Bank:
    """Calibrate once and quantize every (layer, candidate) once. See the module docstring.

    ``methods``: any of ``"rtn"``, ``"gptq"``, ``"awq"`` and ``"awq+gptq"`` (GPTQ rounding of the
    AWQ-scaled and clipped weight, with the Hessian of the scaled inputs). ``stats``: the output of
    :func:`gransearch.calibrate` for this model, to share one calibration between several banks.
    ``damp`` and ``act_order`` are GPTQ's options; act-order is the default because plain GPTQ,
    quantized one-shot on unquantized inputs, is often worse than RTN at 3 and 4 bits
    (docs/quantization.md). They are recorded in the bank and in every plan made from it, so that
    :func:`gransearch.quantize` re-applies a plan with the same options. ``fisher_windows``
    calibration windows (0: none) give each layer's output Fisher (:mod:`gransearch.sensitivity`),
    which turns per-row layer objectives into estimated loss increases for the knapsack.

    ``store``: a folder; each layer's entries are written there packed (safetensors) as soon as
    they are made and read back only when a trial assembles them, so that memory holds one layer's
    candidates at a time (a bank is ``K`` quantized copies of the model). Use :func:`bank_for` to
    reuse a stored bank.

    AWQ's choices (scale ratio on ``awq_grid`` points, per-channel clip) measure the output error
    with the top-``awq_rank`` eigen-factor of each Hessian (``None``: the exact Hessian); the
    recorded layer objectives are always exact.
    """
    t0 = time.perf_counter()
    info = arch_of(model)
    check_candidates(methods, bits, granularities)
    check_device(device)
    use_awq = any(m.startswith("awq") for m in methods)
    if use_awq and info.generic:
        raise ValueError("AWQ candidates need the architecture table's scaling groups; drop 'awq' or add a row in gransearch.arch")
    if stats is None:
        stats = calibrate(model, calib, device=device, verbose=verbose)
    fisher = None
    if fisher_windows and calib is not None:
        windows = calib if isinstance(calib, torch.Tensor) else torch.cat(list(calib))
        fisher = output_fisher(model, windows, n_windows=fisher_windows, device=device, verbose=verbose)
    refs = model_linears(model, info)
    names = [r.name for r in refs]
    specs = {r.name: candidate_specs(r.shape, bits, granularities) for r in refs}
    keys: dict[str, list[str]] = {n: [] for n in names}
    entries: dict[str, list[BankEntry]] = {n: [] for n in names}
    energy = {}

    # the work runs on ``device`` (else where the model is); entries are kept on the CPU
    dev = torch.device(device) if device is not None else next(model.parameters()).device

    def add(name, method, spec, qw, in_scale, W, H):
        entry = BankEntry(qw, in_scale, layer_nbytes(tuple(W.shape), spec), 0.0)
        d = W - entry.effective_weight()
        rows = ((d @ H) * d).sum(1)
        entry.objective, entry.row_objective = float(rows.sum()), rows.cpu()
        if not math.isfinite(entry.objective):
            raise NonFiniteError(f"the layer objective of {name} with {method}:{spec} is not finite: its weights, Hessian or "
                                 "quantized weights hold NaN or infinity")
        if dev.type != "cpu":
            entry.qweight = QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), None if qw.zero is None else qw.zero.cpu(), qw.spec)
            entry.in_scale = None if in_scale is None else in_scale.cpu()
        keys[name].append(f"{method}:{spec}")
        entries[name].append(entry)

    # one low-rank factor per distinct input Hessian (q/k/v and gate/up share theirs)
    factors: dict[int, Optional[torch.Tensor]] = {}

    def factor_of(name):
        st = stats[name]
        if awq_rank is None or awq_rank >= st.in_features:
            return None
        if id(st) not in factors:
            factors[id(st)] = hessian_factor(st.hessian.to(dev), awq_rank)
        return factors[id(st)]

    # AWQ scales are searched once per scaling group and spec (the group shares one fold)
    awq_scales: dict[tuple[str, str], torch.Tensor] = {}
    if use_awq:
        n_blocks = len(refs) // max(1, len(info.linears))
        for b in range(n_blocks):
            block_prefix = f"{info.blocks}.{b}."
            for grp in info.groups:
                gnames = [block_prefix + l for l in grp.linears]
                block = get_module(model, f"{info.blocks}.{b}")
                prev = get_module(block, grp.prev)
                width = prev.weight.shape[0] if grp.norm else linear_weight(prev).shape[0]
                if any(linear_shape(get_module(model, n))[1] != width for n in gnames):
                    continue
                ws = [linear_weight(get_module(model, n)).detach().float().to(dev) for n in gnames]
                H = stats[gnames[0]].hessian.to(dev)
                for spec in specs[gnames[0]]:
                    res = awq_search_hessian(stats[gnames[0]].abs_mean.to(dev), ws, H, spec, n_grid=awq_grid, factor=factor_of(gnames[0]))
                    for n in gnames:
                        awq_scales[(n, str(spec))] = res.scales
    if store:
        os.makedirs(store, exist_ok=True)
        stale = os.path.join(store, "bank.json")
        if os.path.exists(stale):
            os.remove(stale)  # rebuilt in place: no longer complete until the end
    sums: list[str] = []  # sha256 of each stored layer file
    bar = tqdm(refs, desc="bank", disable=not verbose)
    for ref in bar:
        W = linear_weight(ref.module).detach().float().to(dev)
        H = stats[ref.name].hessian.to(dev)
        energy[ref.name] = layer_objective(W, torch.zeros_like(W), H)
        plain_gptq = {}
        if "gptq" in methods or "awq+gptq" in methods:  # one factorisation, one stacked solve for every spec
            prep = gptq_prepare(H, damp=damp, act_order=act_order, name=ref.name)
            results = gptq_many(W, H, specs[ref.name], damp=damp, act_order=act_order, prepared=prep, name=ref.name)
            plain_gptq = {str(sp): r.qweight for sp, r in zip(specs[ref.name], results)}
        leaf = ref.name.rsplit(".", 1)[-1]
        for spec in specs[ref.name]:
            if "rtn" in methods:
                add(ref.name, "rtn", spec, rtn(W, spec), None, W, H)
            if "gptq" in methods:
                add(ref.name, "gptq", spec, plain_gptq[str(spec)], None, W, H)
            if use_awq and (ref.name, str(spec)) in awq_scales:
                s = awq_scales[(ref.name, str(spec))]
                Ws = W * s.unsqueeze(0)
                Hs = H / s.unsqueeze(0) / s.unsqueeze(1)  # Hessian of the scaled inputs x / s
                if leaf not in _NO_CLIP:
                    F = factor_of(ref.name)
                    Fs = None if F is None else F / s.unsqueeze(1)  # its factor: D^-1 F
                    Ws = apply_clip(Ws, spec, clip_ratios_hessian(Ws, Hs, spec, factor=Fs))
                if "awq" in methods:
                    add(ref.name, "awq", spec, rtn(Ws, spec), s, W, H)
                if "awq+gptq" in methods:
                    add(ref.name, "awq+gptq", spec, gptq(Ws, Hs, spec, damp=damp, act_order=act_order, name=ref.name).qweight, s, W, H)
            elif use_awq:
                # no valid fold (e.g. v -> o under grouped-query attention): quantize() leaves the
                # layer unscaled and unclipped, so AWQ is RTN there and AWQ+GPTQ is GPTQ
                if "awq" in methods:
                    add(ref.name, "awq", spec, rtn(W, spec), None, W, H)
                if "awq+gptq" in methods:
                    add(ref.name, "awq+gptq", spec, plain_gptq[str(spec)], None, W, H)
        if store:
            sums.append(_store_layer(store, names.index(ref.name), entries[ref.name]))
    config = bank_config(model, calib, methods, bits, granularities, damp=damp, act_order=act_order, awq_grid=awq_grid,
                         awq_rank=awq_rank, fisher_windows=fisher_windows)
    bank = Bank(names, [keys[n] for n in names], [entries[n] for n in names], [energy[n] for n in names], time.perf_counter() - t0,
                {"damp": damp, "act_order": act_order}, fisher, config, sums)
    if store:
        bank.save_manifest(store, config)
    return bank


def check_candidates(methods, bits, granularities) -> None:
    """Non-empty, known methods, bit widths and granularities; ``ValueError`` naming the option."""
    if not methods or not bits or not granularities:
        empty = [n for n, v in (("methods", methods), ("bits", bits), ("granularities", granularities)) if not v]
        raise ValueError(f"{', '.join(empty)} must not be empty: e.g. methods=('rtn', 'gptq', 'awq'), bits=(3, 4, 8), "
                         "granularities=('channel', 64)")
    unknown = set(methods) - set(METHODS_BANK)
    if unknown:
        raise ValueError(f"unknown bank methods {sorted(unknown)}: use {', '.join(METHODS_BANK)}")
    for b in bits:
        QuantSpec(b, PerChannel())  # raises naming the accepted range
    for g in granularities:
        _as_gran(g)


def _gran_text(g) -> str:
    return _as_gran(g).tag()


def bank_config(model: nn.Module, calib, methods, bits, granularities, **options) -> dict:
    """What a stored bank depends on: the model (layer shapes and a sample of every weight), the
    calibration tokens and every option. Candidate lists are sets: their order changes nothing."""
    h = hashlib.sha256()
    for t in ([calib] if isinstance(calib, torch.Tensor) else list(calib or [])):
        h.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
    return {"fingerprint": model_fingerprint(model), "weights": weights_fingerprint(model), "calib_sha256": h.hexdigest()[:16],
            "methods": sorted(set(methods)), "bits": sorted({int(b) for b in bits}),
            "granularities": sorted({_gran_text(g) for g in granularities}), **options}


def bank_for(model: nn.Module, calib, folder: str, methods=("rtn", "gptq", "awq"), bits=(2, 3, 4, 8),
             granularities=("tensor", "channel", 32, 64, 128), *, damp: float = 0.01, act_order: bool = True, awq_grid: int = 20,
             awq_rank: Optional[int] = 64, fisher_windows: int = 16, device=None, verbose: bool = True) -> Bank:
    """The bank stored in ``folder`` if it was built for this model, calibration and options; else
    build it there (entries on disk, see :func:`build_bank`). A killed build starts over; a
    corrupted or malformed stored bank is rebuilt (with a warning naming the file). A folder that
    holds the bank of *another model* (other weights) is refused, never overwritten."""
    opts = dict(damp=damp, act_order=act_order, awq_grid=awq_grid, awq_rank=awq_rank, fisher_windows=fisher_windows)
    config = bank_config(model, calib, methods, bits, granularities, **opts)
    manifest = os.path.join(folder, "bank.json")
    try:
        with open(manifest, encoding="utf-8") as fh:
            stored = json.load(fh).get("config", {})
    except (OSError, ValueError, AttributeError):
        stored = {}
    if isinstance(stored, dict) and stored.get("weights") not in (None, config["weights"]):
        raise BankError(f"the bank folder {folder} holds the candidates of another model (weights {stored.get('weights')}, this "
                        f"model {config['weights']}): use another bank_dir (CLI: another --out)")
    try:
        bank = Bank.load(folder, config)
    except BankError as exc:
        log.warning("%s -- rebuilding the bank", exc)
        bank = None
    if bank is not None:
        log.info("reusing the bank stored in %s", folder)
        return bank
    return build_bank(model, calib, methods, bits, granularities, device=device, store=folder, verbose=verbose, **opts)


# ------------------------------------------------------------------------------------------------
# allocation


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


def _layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _depth_quarter(name: str, n_blocks: int) -> int:
    for part in name.split("."):
        if part.isdigit():
            return min(3, 4 * int(part) // max(1, n_blocks))
    return 0


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
    finals: list[dict] = field(default_factory=list)  # every finalist: plan summary, bytes, proxy, final
    baselines: dict[str, float] = field(default_factory=dict)  # uniform key -> proxy perplexity
    bank_seconds: float = 0.0
    search_seconds: float = 0.0

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


class _Assembler:
    """Puts bank entries into a working copy of the model (float weights, nothing packed)."""

    def __init__(self, model: nn.Module, bank: Bank, device=None):
        self.model = copy.deepcopy(model).eval()
        if device is not None:
            self.model.to(device)
        self.bank = bank
        self.mods = [get_module(self.model, n) for n in bank.layers]
        self.current = [-1] * len(bank.layers)

    @torch.no_grad()
    def load(self, choice: Sequence[int]) -> nn.Module:
        for i, c in enumerate(choice):
            if self.current[i] != c:
                linear_weight(self.mods[i]).copy_(self.bank.entries[i][c].effective_weight())
                self.current[i] = c
        return self.model


def _plan_from_keys(bank: Bank, keys: Sequence[str], fingerprint: str, meta=None) -> QuantPlan:
    """The plan of a trial: ``keys[i]`` is the ``method:spec`` of layer ``bank.layers[i]``."""
    layers = {n: LayerPlan.from_key(k) for n, k in zip(bank.layers, keys)}
    meta = dict(meta or {})
    if any(lp.method in ("gptq", "awq+gptq") for lp in layers.values()):
        meta["gptq"] = dict(bank.gptq_options)
    return QuantPlan(layers, fingerprint, meta)


def _plan_id(keys: Sequence[str]) -> str:
    """A plan's identity: a hash of its content (``method:spec`` per layer), never of bank positions."""
    return hashlib.sha1(",".join(keys).encode()).hexdigest()[:16]


def _ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _all_candidate_keys(shapes, methods, bits, granularities) -> list[str]:
    """Every ``method:spec`` some layer can take (before any bank is built)."""
    specs = {str(sp) for shape in shapes for sp in candidate_specs(shape, bits, granularities)}
    return sorted(f"{m}:{sp}" for m in set(methods) for sp in specs)


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
    configuration there for workers). Returns an :class:`OptimizeResult`; ``model`` itself is not
    modified.

    Resuming is safe: the study records everything its trial values depend on (weights, candidates,
    budget, calibration, proxy windows) and a study made for another search raises
    :class:`~gransearch.errors.StudyMismatchError` naming what changed; trials store their plans
    by content; trials of dead workers are marked failed and lost warm starts are run again.
    """
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
    check_device(device)
    fingerprint = model_fingerprint(model)
    names = [r.name for r in model_linears(model)]
    fixed = float_nbytes(model, exclude=set(names))
    full = float_nbytes(model)

    # the feasible range needs only the candidate specs, so check it before building the bank
    shapes = [linear_shape(get_module(model, n)) for n in names]
    per_layer = [[layer_nbytes(s, sp) for sp in candidate_specs(s, bits, granularities)] for s in shapes]
    if any(not c for c in per_layer):
        bad = names[[i for i, c in enumerate(per_layer) if not c][0]]
        raise ValueError(f"no candidate spec fits layer {bad}: add 'channel' or a group size that divides its input")
    smallest = fixed + sum(min(c) for c in per_layer)
    if budget < smallest:
        raise BudgetError(f"budget {budget:,} bytes ({budget / GB:.4f} GB) is below the smallest possible model "
                          f"({smallest:,} bytes = {smallest / GB:.4f} GB with the smallest candidate everywhere); "
                          f"the feasible range is {smallest / GB:.4f} to {full / GB:.4f} GB")
    if budget >= full:
        raise BudgetError(f"budget {budget / GB:.4f} GB is not below the unquantized model ({full / GB:.4f} GB): "
                          f"nothing to search; the feasible range is {smallest / GB:.4f} to {full / GB:.4f} GB")

    # ---- the study: bound to everything its values depend on, checked before any bank work
    if objective_fn is None and eval_ids is None:
        raise ValueError("eval_ids (the validation token stream of the proxy objective) is required unless objective_fn is given")
    if bank is not None:
        if bank.config.get("weights") not in (None, weights_fingerprint(model)):
            raise BankError("the bank was built for another model (other weights): build one for this model")
        bconf = dict(bank.config)
        cand_keys = sorted({k for row in bank.keys for k in row})
    else:
        bconf = bank_config(model, calib, methods, bits, granularities, act_order=act_order, **_BANK_DEFAULTS)
        cand_keys = _all_candidate_keys(shapes, methods, bits, granularities)
    if objective_fn is None:
        proxy = {"kind": "perplexity", "eval_sha256": _ids_sha256(eval_windows_of(eval_ids, seqlen, eval_windows)), "seqlen": seqlen,
                 "eval_windows": eval_windows}
    else:
        proxy = {"kind": "custom", "name": getattr(objective_fn, "__qualname__", type(objective_fn).__name__)}
    record = {"version": SEARCH_RECORD_VERSION, "budget_bytes": budget, "bank": bconf, "candidates": cand_keys, "proxy": proxy}
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=8, n_warmup_steps=1)
    study_name = study_name or f"gransearch-{fingerprint}-{budget}"
    study = open_study(storage, study_name, sampler=sampler, pruner=pruner)
    with storage_lock(storage):
        bind_study(study, record, storage=storage, extra_attrs=study_attrs)
    fail_dead_trials(study)

    if bank is None and bank_dir:
        bank = bank_for(model, calib, bank_dir, methods, bits, granularities, act_order=act_order, device=device, verbose=verbose,
                        **_BANK_DEFAULTS)
    elif bank is None:
        bank = build_bank(model, calib, methods, bits, granularities, act_order=act_order, device=device, verbose=verbose,
                          **_BANK_DEFAULTS)
    if bank.layers != names:
        raise BankError("the bank was built for another model (its layers differ)")
    L = len(names)
    K = max(len(k) for k in bank.keys)
    costs = np.zeros((L, K), dtype=np.int64)
    raw = np.full((L, K), np.inf)
    for i in range(L):
        for j, e in enumerate(bank.entries[i]):
            costs[i, j] = e.nbytes
            raw[i, j] = e.objective
    rel = raw / np.array(bank.out_energy, dtype=float).clip(min=1e-30)[:, None]
    fis = bank.fisher_losses()
    bases = {"raw": raw, "relative": rel} if fis is None else {"fisher": fis, "raw": raw, "relative": rel}
    capacity = budget - fixed
    types = sorted({_layer_type(n) for n in names})
    n_blocks = 1 + max((int(p) for n in names for p in n.split(".") if p.isdigit()), default=0)
    quarters = [_depth_quarter(n, n_blocks) for n in names]

    assembler = _Assembler(model, bank, device)

    def evaluate(mdl, report):
        if objective_fn is not None:
            return float(objective_fn(mdl, report))
        return perplexity(mdl, eval_ids, seqlen=seqlen, batch_size=batch_size, max_windows=eval_windows,
                          verbose=False, on_window=report).ppl

    uniform_keys = []
    for key in sorted({k for row in bank.keys for k in row}):
        if all(key in row for row in bank.keys):
            cost = fixed + sum(costs[i, bank.index(i, key)] for i in range(L))
            if cost <= budget:
                uniform_keys.append((cost, key))
    uniform_keys.sort(reverse=True)  # the largest (usually best) first

    def choice_for(trial) -> tuple[list[int], dict]:
        key = trial.user_attrs.get("uniform")
        if key is not None:
            return [bank.index(i, key) for i in range(L)], {"kind": "uniform", "uniform": key}
        mode = trial.suggest_categorical("objective", list(bases))
        w_type = {t: trial.suggest_float(f"w_{t}", 0.1, 10.0, log=True) for t in types}
        w_depth = [trial.suggest_float(f"w_depth{q}", 0.1, 10.0, log=True) for q in range(4)]
        base = bases[mode]
        weights = np.array([w_type[_layer_type(n)] * w_depth[q] for n, q in zip(names, quarters)])
        choice = solve_knapsack(costs, base * weights[:, None], capacity)
        if choice is None:
            raise optuna.TrialPruned("knapsack infeasible")
        return choice, {"kind": "knapsack"}

    def objective(trial):
        trial.set_user_attr("worker", worker_id())  # first: a dead worker's trial is recognised on resume
        choice, meta = choice_for(trial)
        nbytes = fixed + int(sum(costs[i, c] for i, c in enumerate(choice)))
        if nbytes > budget:  # cannot happen by construction; never evaluate such a plan
            raise RuntimeError(f"internal error: plan of {nbytes} bytes over the budget {budget}")
        keys = [bank.keys[i][c] for i, c in enumerate(choice)]
        cid = _plan_id(keys)
        trial.set_user_attr("nbytes", nbytes)
        trial.set_user_attr("keys", keys)
        trial.set_user_attr("plan_id", cid)
        for k, v in meta.items():
            trial.set_user_attr(k, v)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get("plan_id") == cid:  # the same plan was measured already
                return t.value
        mdl = assembler.load(choice)

        def report(step, running_nll):
            trial.report(math.exp(running_nll) if objective_fn is None else running_nll, step)
            if meta["kind"] != "uniform" and trial.should_prune():
                raise optuna.TrialPruned()

        return evaluate(mdl, report)

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if warm_start:  # a new study gets every warm start; a resumed one those it lost (failed, killed)
        neutral = {**{f"w_{t}": 1.0 for t in types}, **{f"w_depth{q}": 1.0 for q in range(4)}}
        with storage_lock(storage):
            enqueue_missing(study, [key for _, key in uniform_keys], {mode: {"objective": mode, **neutral} for mode in bases})
    t_search = time.perf_counter()
    # failed trials (errors, dead workers) are not counted, so their warm starts run again within n_trials
    remaining = max(0, n_trials - len(study.get_trials(deepcopy=False, states=counted)))
    if remaining:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        stop = optuna.study.MaxTrialsCallback(n_trials, states=counted)
        study.optimize(objective, n_trials=remaining, timeout=timeout, show_progress_bar=verbose, catch=(), callbacks=[stop])
    search_seconds = time.perf_counter() - t_search

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise SearchError("no trial completed: raise n_trials or the timeout")

    def plan_of(t) -> QuantPlan:
        return _plan_from_keys(bank, t.user_attrs["keys"], fingerprint, {"trial": t.number, "proxy_ppl": t.value, "nbytes": t.user_attrs["nbytes"],
                                                             "budget_bytes": budget, "kind": t.user_attrs.get("kind")})

    pareto = []
    for t in sorted(complete, key=lambda t: (t.user_attrs["nbytes"], t.value)):
        if not pareto or t.value < pareto[-1].ppl:
            pareto.append(ParetoPoint(t.user_attrs["nbytes"], t.value, plan_of(t), t.number))
    baselines = {t.user_attrs["uniform"]: t.value for t in complete if t.user_attrs.get("uniform")}

    ranked, seen = [], set()
    for t in sorted(complete, key=lambda t: t.value):
        if t.user_attrs["plan_id"] not in seen:
            seen.add(t.user_attrs["plan_id"])
            ranked.append(t)
    finals = []
    best_t = ranked[0]
    best_final = None
    if final_ids is not None and n_final > 0:
        from .quantize import quantize

        for t in ranked[:n_final]:
            plan = plan_of(t)
            work = copy.deepcopy(model)
            quantize(work, plan, calib, device=device, objective=False, verbose=verbose)  # GPTQ options from plan.meta
            if device is not None:
                work.to(device)
            fin = perplexity(work, final_ids, seqlen=seqlen, batch_size=batch_size, verbose=verbose).ppl
            del work
            finals.append({"trial": t.number, "nbytes": t.user_attrs["nbytes"], "proxy_ppl": t.value, "final_ppl": fin,
                           "kind": t.user_attrs.get("kind"), "summary": plan.summary()})
            if best_final is None or fin < best_final[0]:
                best_final = (fin, t)
        best_t = best_final[1]
    plan = plan_of(best_t)
    final_ppl = best_final[0] if best_final else best_t.value
    plan.meta["final_ppl"] = final_ppl
    return OptimizeResult(plan, best_t.user_attrs["nbytes"], final_ppl, best_t.value, pareto, study, finals, baselines,
                          bank.seconds, search_seconds)
