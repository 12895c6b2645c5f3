"""The candidate bank: every (layer, candidate) quantized once, in memory or on disk.

Calibrate once (Hessians and ``mean|x|`` of every linear's input, unquantized inputs), then
quantize every (layer, candidate) once: GPTQ with one Cholesky factorisation per layer shared by
all its GPTQ candidates, solved together as one stack of rows; AWQ with one scale search per
scaling group and spec, using the group's linear-output error computed from the Hessian (no second
activation pass); RTN of a layer's weight and of its AWQ-scaled weight as one rounding per spec.
On CUDA the layers that read one input (q/k/v; gate/up) share those stacks too, and their
objectives are computed together (each CUDA kernel launch costs about as much as a small one's
work). Each entry keeps its packed weight, exact stored bytes and layer objective
``tr((W - Q) H (W - Q)^T)`` (with its per-output-row terms, which the output Fisher turns into
estimated loss increases for the knapsack).

A stored bank (``build_bank(store=DIR)``, :func:`bank_for`) writes each layer's entries as
safetensors with their sha256 in ``bank.json`` (written last: its presence marks a complete bank);
loading checks every file, and :func:`bank_for` reuses a bank only for the same model weights,
calibration tokens and options. It is built one decoder block at a time, each block claimed with
an atomic file in the folder (:mod:`gransearch.claims`): several workers sharing the folder build
one bank together, byte for byte the bank one process builds, a killed worker's block is taken
over, and a killed build resumes from its finished blocks.
"""

from __future__ import annotations

import contextlib
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

from ._files import atomic_write, sha256_file
from ._heap import heap_frozen
from .algorithms.awq import apply_clip, awq_grid_scales, awq_search_hessian_specs, clip_ratios_hessian, hessian_factor
from .algorithms.gptq import gptq_many, gptq_prepare
from .algorithms.layer import quantize_layer
from .algorithms.rtn import rtn
from .allocate import candidate_specs, check_candidates
from .arch import arch_of, block_index, clips_after_awq, foldable, get_module, linear_weight, model_linears
from .claims import held, try_claim
from .data import tokens_sha256
from .errors import BankError, NonFiniteError, check_device, check_float_model, check_int
from .plan import model_fingerprint, weights_fingerprint
from .profiles import get_profile
from .quantizer import QuantizedWeight, check_params, check_weight
from .sensitivity import output_fisher
from .methods import GPTQOptions, Method
from .spec import QuantSpec, as_granularity, parse_spec
from .study import POLL_SECONDS, worker_id

log = logging.getLogger(__name__)

# GPTQ of the layers that read one input (q/k/v; gate/up) as one stacked solve in the bank: None
# (the default) does it on CUDA only; True or False forces it (tests compare the two on the CPU)
STACK_SHARED_INPUTS: Optional[bool] = None

__all__ = ["Bank", "BankEntry", "BankSize", "StoredEntry", "bank_config", "bank_for", "bank_size", "build_bank", "pareto_front"]


OBJECTIVE_BATCH_BYTES = 512 * 2**20  # stacked (GPU) bank: the float32 rows one batch of entries' objectives holds, all temporaries


@dataclass
class _Part:
    """Rows ``r0:r1`` of a rounding ``stack`` (several weights rounded as one), and that part's weight."""

    qweight: QuantizedWeight
    stack: QuantizedWeight
    r0: int
    r1: int

    @classmethod
    def whole(cls, q: QuantizedWeight) -> "_Part":
        return cls(q, q, 0, q.shape[0])


def _parts(q: QuantizedWeight, sizes: Sequence[int]) -> list[_Part]:
    """The parts of a rounding of stacked weights of ``sizes`` rows each."""
    bounds = np.cumsum([0, *sizes]).tolist()
    return [_Part(w, q, r0, r1) for w, r0, r1 in zip(q.split_rows(sizes), bounds[:-1], bounds[1:])]


def _own_rows(q: QuantizedWeight, r0: int, r1: int) -> QuantizedWeight:
    """Rows ``r0:r1`` of ``q`` in buffers of their own (a weight whose blocks span rows is only ever whole)."""
    rows = slice(None) if (r0, r1) == (0, q.shape[0]) else slice(r0, r1)
    return QuantizedWeight(q.codes[rows].clone(), q.scale[rows].clone(), None if q.zero is None else q.zero[rows].clone(), q.spec,
                           None if q.g_idx is None else q.g_idx.clone())


@dataclass
class _Queued:
    """A bank entry made but not yet kept: its layer, key, the float weight it is measured against and
    where its rounding lies."""

    name: str
    key: str
    entry: "BankEntry"
    W: torch.Tensor
    part: _Part


@dataclass
class BankSize:
    """What a stored bank will take on disk, before it is built: bytes per candidate key (summed
    over the layers that have it) and in all (packed codes, scales, zeros, AWQ input scales and
    per-row objectives; the files' small headers aside). Dominated-candidate pruning
    (``build_bank(prune="dominated")``) stores less; this is the bound."""

    per_candidate: dict
    total: int
    entries: int
    model_bytes: int  # the linears' float32 bytes, for scale

    def table(self, top: Optional[int] = None) -> str:
        rows = sorted(self.per_candidate.items(), key=lambda kv: -kv[1])[:top]
        lines = [f"bank on disk: {_fmt(self.total)} for {self.entries} entries "
                 f"({self.total / max(self.model_bytes, 1):.2f}x the linears in float32)"]
        lines += [f"  {k:24s} {_fmt(v):>10s}" for k, v in rows]
        return "\n".join(lines)


def _entry_keys(shape, methods, specs) -> list[tuple[Method, object]]:
    """The (method, spec) entries build_bank makes for one layer, in its order (see build_layer)."""
    out = []
    for spec in specs:
        if Method.LLAMACPP in methods and Method.LLAMACPP.accepts(spec):
            out.append((Method.LLAMACPP, spec))
        if getattr(spec, "is_ggml", False):
            continue
        out += [(m, spec) for m in (Method.RTN, Method.GPTQ, Method.AWQ, Method.AWQ_GPTQ) if m in methods]
    return out


def bank_size(model: nn.Module, methods, bits, granularities, profile: str = "research") -> BankSize:
    """The disk size of the bank :func:`build_bank` would store for these candidates (no work done:
    shapes only), per candidate key and in all; see :class:`BankSize`."""
    from .cost import layer_nbytes

    check_candidates(methods, bits, granularities)
    methods = [Method.parse(m) for m in methods]
    prof = get_profile(profile)
    per: dict[str, int] = {}
    n = model_bytes = 0
    for ref in model_linears(model, arch_of(model)):
        out_f, in_f = ref.shape
        model_bytes += out_f * in_f * 4
        for m, spec in _entry_keys(ref.shape, methods, candidate_specs(ref.shape, bits, granularities, prof, methods)):
            b = layer_nbytes(ref.shape, spec) + 4 * out_f + 16 + (4 * in_f if m.uses_awq else 0)  # codes+params, rows, shape, AWQ scale
            per[f"{m}:{spec}"] = per.get(f"{m}:{spec}", 0) + b
            n += 1
    return BankSize(per, sum(per.values()), n, model_bytes)


def pareto_front(nbytes: Sequence[int], objectives: Sequence[float]) -> list[int]:
    """Indices of the candidates no other candidate dominates: one dominates another when it takes
    no more bytes and has no larger layer objective, and is strictly better in one of the two
    (so of two methods at one spec the worse goes, and so does a larger spec that is not better).
    Exact ties are all kept; the order of the input is kept.

        >>> pareto_front([10, 10, 20, 30], [5.0, 4.0, 4.5, 1.0])
        [1, 3]
    """
    keep = []
    for j, (b, o) in enumerate(zip(nbytes, objectives)):
        if not any((b2 <= b and o2 <= o) and (b2 < b or o2 < o) for b2, o2 in zip(nbytes, objectives)):
            keep.append(j)
    return keep


BANK_FORMAT, BANK_VERSION = "gransearch.bank", 2  # 2: sha256 of every file, weights in the config


@dataclass(frozen=True)
class StoredEntry:
    """Where a stored entry's packed buffers are: ``{prefix}qweight``, ``scales`` (and ``qzeros``) in ``path``."""

    path: str
    prefix: str
    shape: tuple[int, int]
    spec: QuantSpec


@dataclass
class BankEntry:
    qweight: Optional[QuantizedWeight]  # None while the entry lives on disk (see ``source``)
    in_scale: Optional[torch.Tensor]  # AWQ: the layer computes x @ (dequant / s)^T
    nbytes: int
    objective: float
    row_objective: Optional[torch.Tensor] = None  # [out]: the objective's per-output-row terms (CPU)
    source: Optional[StoredEntry] = None  # where a stored entry's buffers are

    def quantized(self, device=None) -> QuantizedWeight:
        """The quantized weight (read from disk if stored), on ``device`` if given: a stored entry's
        packed buffers are moved there and unpacked there (on a GPU: fewer bytes over the bus, and
        the unpacking off the host; integer arithmetic, so the same codes)."""
        if self.qweight is not None:
            return self.qweight if device is None else self.qweight.to(device)
        from safetensors import safe_open

        path, prefix, shape, spec = self.source.path, self.source.prefix, self.source.shape, self.source.spec
        with safe_open(path, framework="pt") as fh:
            stored = set(fh.keys())
            bufs = {k: fh.get_tensor(prefix + k) for k in ("qweight", "scales", "qzeros") if prefix + k in stored}
        if device is None or getattr(spec, "is_ggml", False):  # ggml blocks are decoded on the host
            q = QuantizedWeight.from_packed(bufs, spec, shape)
            return q if device is None else q.to(device)
        return QuantizedWeight.from_packed({k: v.to(device) for k, v in bufs.items()}, spec, shape)

    def effective_weight(self) -> torch.Tensor:
        w = self.quantized().dequantize()
        return w if self.in_scale is None else w / self.in_scale.unsqueeze(0)

    def to(self, device) -> "BankEntry":
        """A copy whose codes, scales, zeros (read from disk if stored) and AWQ scales are on
        ``device``: its :meth:`effective_weight` is computed there, with the same numbers."""
        return BankEntry(self.quantized(device), None if self.in_scale is None else self.in_scale.to(device), self.nbytes,
                         self.objective, self.row_objective)

    @property
    def resident_nbytes(self) -> int:
        """Bytes of its unpacked codes (one byte each), scales, zeros and AWQ scales in memory."""
        q = self.quantized() if self.qweight is None else self.qweight
        ts = [q.codes, q.scale] + [t for t in (q.zero, self.in_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class Bank:
    """Every candidate of every layer, quantized once on the unquantized inputs."""

    layers: list[str]
    keys: list[list[str]]  # per layer, the candidate keys "method:spec"
    entries: list[list[BankEntry]]
    out_energy: list[float]  # tr(W H W^T): the layer's output energy, for relative objectives
    seconds: float = 0.0
    gptq: GPTQOptions = GPTQOptions()  # the options of its GPTQ entries: carried by every plan's GPTQ layers
    fisher: Optional[dict] = None  # {layer: [out] mean (dL/dy)^2} from gransearch.sensitivity
    config: dict = field(default_factory=dict)  # what the bank depends on (bank_config)
    sha256: list = field(default_factory=list)  # per layer file of a stored bank
    stage_seconds: dict = field(default_factory=dict)  # where this process's build time went (empty when loaded)

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
               "out_energy": self.out_energy, "gptq_options": self.gptq.to_dict(), "fisher": self.fisher is not None,
               "sha256": self.sha256, "fisher_sha256": fisher_sha}
        # the build time is kept beside it: bank.json holds only what the entries are, so a bank built by
        # several workers is byte for byte the one a single process builds
        atomic_write(os.path.join(folder, "timing.json"), json.dumps({"seconds": self.seconds}))
        atomic_write(os.path.join(folder, "bank.json"), json.dumps(doc))  # written last: its presence marks a complete bank

    @classmethod
    def load(cls, folder: str, config: Optional[dict] = None, verify: bool = True) -> Optional["Bank"]:
        """The bank stored in ``folder``; ``None`` if there is none, or it was built with another ``config``.

        Raises :class:`~gransearch.errors.BankError` naming the file when the manifest is malformed,
        a file is missing, or a file's sha256 differs from the one recorded when it was written
        (corruption); :func:`bank_for` then rebuilds the bank. ``verify=False`` skips the layer files'
        sha256 (only for a bank whose files were just checked: hashing a large bank takes minutes).
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
            return cls._from_manifest(folder, doc, verify)
        except BankError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise BankError(f"{path}: malformed bank manifest or entry ({type(exc).__name__}: {exc}); "
                            f"remove the folder {folder} to rebuild the bank") from None

    @classmethod
    def _from_manifest(cls, folder: str, doc: dict, verify: bool = True) -> "Bank":
        from safetensors import safe_open
        from safetensors.torch import load_file

        layers, keys, sums = doc["layers"], doc["keys"], doc["sha256"]
        if not (isinstance(layers, list) and isinstance(keys, list) and isinstance(sums, list)) or not len(layers) == len(keys) == len(sums):
            raise BankError(f"{os.path.join(folder, 'bank.json')}: 'layers', 'keys' and 'sha256' must be lists of one length")
        entries = []
        for i, name in enumerate(layers):
            file = os.path.join(folder, f"layer{i:04d}.safetensors")
            if verify:
                _verify(file, sums[i], folder)
            elif not os.path.isfile(file):
                raise BankError(f"bank file {file} is missing; remove the folder {folder} to rebuild the bank")
            row = []
            with safe_open(file, framework="pt") as fh:
                names = set(fh.keys())
                for j, key in enumerate(keys[i]):
                    spec = parse_spec(key.split(":", 1)[1])
                    in_scale = fh.get_tensor(f"{j}.in_scale") if f"{j}.in_scale" in names else None
                    shape = tuple(int(v) for v in fh.get_tensor(f"{j}.shape").tolist())
                    row.append(BankEntry(None, in_scale, int(doc["nbytes"][i][j]), float(doc["objectives"][i][j]), fh.get_tensor(f"{j}.rows"),
                                         StoredEntry(file, f"{j}.", shape, spec)))
            entries.append(row)
        fisher = None
        if doc["fisher"]:
            file = os.path.join(folder, "fisher.safetensors")
            _verify(file, doc["fisher_sha256"], folder)
            fisher = load_file(file)
        seconds = doc.get("seconds")  # banks stored before timing.json kept it in the manifest
        if seconds is None:
            try:
                with open(os.path.join(folder, "timing.json"), encoding="utf-8") as fh:
                    seconds = float(json.load(fh)["seconds"])
            except (OSError, ValueError, KeyError, TypeError):
                seconds = 0.0
        return cls(layers, keys, entries, doc["out_energy"], seconds, GPTQOptions.from_dict(doc["gptq_options"]), fisher, doc["config"], sums)


def _verify(file: str, expected, folder: str) -> None:
    if not os.path.isfile(file):
        raise BankError(f"bank file {file} is missing; remove the folder {folder} to rebuild the bank")
    if not isinstance(expected, str) or sha256_file(file) != expected:
        raise BankError(f"bank file {file} is corrupted (its sha256 differs from the one recorded when it was written); "
                        f"remove the folder {folder} to rebuild the bank")


def _write_safetensors(tensors: dict, file: str) -> str:
    """Write ``tensors`` to ``file`` atomically; returns the file's sha256."""
    from safetensors.torch import save

    data = save(tensors)
    atomic_write(file, data)  # a worker reading the bank never sees half a file
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
    seen = set()  # safetensors refuses buffers shared between names (AWQ and AWQ+GPTQ share their input scales)
    for k, v in tensors.items():
        if v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    digest = _write_safetensors(tensors, file)
    for j, e in enumerate(row):
        e.source = StoredEntry(file, f"{j}.", tuple(e.qweight.shape), e.qweight.spec)
        e.qweight = None
    return digest


class _BuildFolder:
    """A stored bank while it is built: ``build.json`` (the bank's config), ``block{b}.claim`` (held by
    the worker building block ``b``) and ``block{b}.json`` (its layers' keys, bytes, objectives and file
    sha256: the block is done). A folder holding parts of another config is cleared first."""

    def __init__(self, folder: str, config: dict):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        config = json.loads(json.dumps(config))
        stale = os.path.join(folder, "bank.json")
        if os.path.exists(stale):
            os.remove(stale)  # rebuilt in place: no longer complete until the end
        path = os.path.join(folder, "build.json")
        try:
            with open(path, encoding="utf-8") as fh:
                same = json.load(fh) == config
        except (OSError, ValueError):
            same = False
        if not same:  # parts of another bank (or none): start clean
            for f in os.listdir(folder):
                if f.startswith(("block", "layer", "fisher", "timing")):
                    os.remove(os.path.join(folder, f))
            atomic_write(path, json.dumps(config, sort_keys=True))

    def _path(self, b: int, ext: str) -> str:
        return os.path.join(self.folder, f"block{b:04d}.{ext}")

    def done(self, b: int) -> bool:
        return os.path.exists(self._path(b, "json"))

    def claim(self, b: int) -> bool:
        return try_claim(self._path(b, "claim"))

    def held(self, b: int):
        return held(self._path(b, "claim"))

    def finish(self, b: int, part: dict, seconds: float) -> None:
        atomic_write(self._path(b, "json"), json.dumps({"layers": part, "seconds": seconds, "worker": worker_id()}))

    def _read(self, b: int) -> dict:
        path = self._path(b, "json")
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError) as exc:
            raise BankError(f"bank part {path} is unreadable ({exc}); remove the folder {self.folder} to rebuild the bank") from None

    def parts(self, blocks: list[int]) -> dict:
        out = {}
        for b in blocks:
            out.update(self._read(b)["layers"])
        return out

    def forget(self, b: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(b, "json"))

    def damaged(self, layers_of: dict) -> list[int]:
        """The done blocks whose layer files (``layers_of[b]``: layer indices) are missing or differ
        from the sha256 their part recorded."""
        bad = []
        for b, idx in layers_of.items():
            sums = {v["index"]: v["sha256"] for v in self._read(b)["layers"].values()}
            for i in idx:
                file = os.path.join(self.folder, f"layer{i:04d}.safetensors")
                if not os.path.isfile(file) or sha256_file(file) != sums.get(i):
                    bad.append(b)
                    break
        return bad

    def seconds(self, blocks: list[int]) -> float:
        """The bank's build time: every block's, whoever built it."""
        return float(sum(self._read(b).get("seconds", 0.0) for b in blocks))


@heap_frozen
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
    profile: str = "research",
    prune: Optional[str] = None,
    max_bytes: Optional[int] = None,
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
    they are made and read back only when a trial assembles them, so that memory holds one block's
    candidates at a time (a bank is ``K`` quantized copies of the model). Blocks are claimed in the
    folder, so processes given the same folder (and the same model, calibration and options)
    build the bank together. Use :func:`bank_for` to reuse a stored bank.

    AWQ's choices (scale ratio on ``awq_grid`` points, per-channel clip) measure the output error
    with the top-``awq_rank`` eigen-factor of each Hessian (``None``: the exact Hessian); the
    recorded layer objectives are always exact.

    Size: the bank's disk size per candidate (:func:`bank_size`) is logged before any work.
    ``prune="dominated"`` keeps only each layer's :func:`pareto_front` of (bytes, layer objective):
    of two methods at one spec the worse is dropped, and so is a larger candidate that is not
    better. ``max_bytes`` (stored banks): a bank whose size bound exceeds it is refused before any
    work unless pruning is on; with pruning, the build stops with :class:`BankError` as soon as the
    finished blocks project past it.
    """
    # long on purpose: one pass over the layers computes every candidate from one Hessian, one GPTQ
    # factorisation and the group's AWQ scales while they are in memory; splitting it would hold them longer
    t0 = time.perf_counter()
    from .offload import DiskModel

    source = model if isinstance(model, DiskModel) else None
    check_float_model(model, "a candidate bank")
    if source is not None:
        model = source.model
        if fisher_windows:
            log.warning("a bank built from disk has no output Fisher (it needs a backward pass through the whole model): "
                        "fisher_windows=0, the knapsack weighs layer objectives as they are")
            fisher_windows = 0
    info = arch_of(model)
    check_candidates(methods, bits, granularities)
    check_device(device)
    awq_rank = check_int("awq_rank", awq_rank, 1, allow_none=True)
    if prune not in (None, "dominated"):
        raise ValueError(f"prune={prune!r}: use None (keep every candidate) or 'dominated'")
    size = bank_size(model, methods, bits, granularities, profile)
    log.info("%s", size.table(top=8))
    if store and max_bytes is not None and size.total > max_bytes and prune is None:
        raise BankError(f"the bank would take {_fmt(size.total)} on disk, more than the {_fmt(max_bytes)} allowed. "
                        f"Largest candidates: {_largest(size)}. Drop some (fewer bits or group sizes, e.g. no 8-bit or "
                        "g32), or let dominated candidates go (prune='dominated', CLI --prune-bank)")
    methods = [Method.parse(m) for m in methods]
    use_awq, use_gptq = any(m.uses_awq for m in methods), any(m.uses_gptq for m in methods)
    if use_awq and info.generic:
        raise ValueError("AWQ candidates need the architecture table's scaling groups; drop 'awq' or add a row in gransearch.arch")
    # the float model's statistics: given (shared between banks), or block by block as the blocks are built
    per_block = _BlockStats(source or model, calib, device) if stats is None else None
    stats = {} if stats is None else stats

    def fisher_of() -> Optional[dict]:
        """The output Fisher, after the blocks: a NaN in the model is then named by the first layer whose
        inputs it reaches (the calibration check), not by the backward pass, which spreads it everywhere."""
        if not (fisher_windows and calib is not None):
            return None
        windows = calib if isinstance(calib, torch.Tensor) else torch.cat(list(calib))
        return output_fisher(model, windows, n_windows=fisher_windows, device=device, verbose=verbose)

    refs = model_linears(model, info)
    names = [r.name for r in refs]
    prof = get_profile(profile)
    specs = {r.name: candidate_specs(r.shape, bits, granularities, prof, methods) for r in refs}
    code_specs = {n: [sp for sp in v if not getattr(sp, "is_ggml", False)] for n, v in specs.items()}  # what GPTQ and AWQ make
    keys: dict[str, list[str]] = {n: [] for n in names}
    entries: dict[str, list[BankEntry]] = {n: [] for n in names}
    energy = {}

    # the work runs on ``device`` (else where the model is); entries are kept on the CPU
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    stage = Stages(dev)

    # Entries are queued on the device and kept (on the CPU) when their group of layers is done: their
    # objectives, the checks skipped on the way (finite weights, float16-range scales) and the layers'
    # output energies come over in one transfer per group, not one wait each (on a GPU every read of a
    # number waits for the queue behind it). So on a GPU the roundings are no timed stage (a stage
    # waits for the GPU at its edges); settle() waits for the queue instead, and its seconds hold the
    # objectives' products with the roundings queued among them. Stacked (on CUDA, or as
    # STACK_SHARED_INPUTS says), a group's objectives are a few products over all its entries' rows
    # (OBJECTIVE_BATCH_BYTES at a time) instead of a chain of small ones per entry.
    stacked = dev.type == "cuda" if STACK_SHARED_INPUTS is None else STACK_SHARED_INPUTS
    queued: list[_Queued] = []
    checks: list[tuple[torch.Tensor, Callable[[], None]]] = []  # 0-d "bad" flags, read with the objectives, and what raises then
    energies: list[tuple[str, torch.Tensor]] = []  # (layer, tr(W H W^T) as a 0-d tensor)

    def queue(name, method, spec, part: "_Part", in_scale, W) -> None:
        entry = BankEntry(part.qweight, in_scale, prof.nbytes(tuple(W.shape), spec), 0.0)
        queued.append(_Queued(name, f"{method}:{spec}", entry, W, part))

    def check_later(q: QuantizedWeight) -> None:
        """The float16-range check of an unchecked rounding, read with the objectives."""
        bad = ~torch.isfinite(q.scale).all()
        if q.float_zero:
            bad = bad | ~torch.isfinite(q.zero).all()
        checks.append((bad, lambda: check_params(q.scale.float(), q.zero.float() if q.float_zero else None)))

    def rtn_parts(mats: list, spec) -> list["_Part"]:
        """RTN of each weight in ``mats`` (one input width) as one rounding of their stacked rows: bit for
        bit the separate roundings, as no block crosses a row (per-tensor specs are rounded one by one)."""
        if spec.granularity.spans_rows or len(mats) == 1:
            stacks = [(rtn(m, spec, check=False), [m.shape[0]]) for m in mats]
        else:
            stacks = [(rtn(torch.cat(mats), spec, check=False), [m.shape[0] for m in mats])]
        out = []
        for q, sizes in stacks:
            check_later(q)
            out += _parts(q, sizes)
        return out

    def objective_rows(H: torch.Tensor) -> list[torch.Tensor]:
        """Each queued entry's per-row objective ``((W - Q) H (W - Q)^T)_jj`` on the device."""
        if not stacked:  # entry by entry: the CPU's pinned numbers
            out = []
            for q in queued:
                d = q.W - q.entry.effective_weight().to(q.W.device)  # llama.cpp's roundings are made on the host
                out.append(((d @ H) * d).sum(1))
            return out
        deq: dict[int, torch.Tensor] = {}  # each stacked rounding dequantized once

        def eff(q: _Queued) -> torch.Tensor:
            p = q.part
            if id(p.stack) not in deq:
                deq[id(p.stack)] = p.stack.dequantize().to(q.W.device)  # llama.cpp's roundings are made on the host
            w = deq[id(p.stack)][p.r0 : p.r1]
            return w if q.entry.in_scale is None else w / q.entry.in_scale.unsqueeze(0)

        last = {id(q.part.stack): k for k, q in enumerate(queued)}  # where each dequantized stack can go
        out, i = [], 0
        while i < len(queued):  # as many entries at once as OBJECTIVE_BATCH_BYTES holds (at least one)
            j, nbytes = i, 0
            while j < len(queued) and (j == i or nbytes + 16 * queued[j].W.numel() <= OBJECTIVE_BATCH_BYTES):
                nbytes += 16 * queued[j].W.numel()  # float32: the weight, its rounding, the difference, d @ H
                j += 1
            batch = queued[i:j]
            d = torch.cat([q.W for q in batch]) - torch.cat([eff(q) for q in batch])
            out += list(((d @ H) * d).sum(1).split([q.W.shape[0] for q in batch]))
            for k in [k for k in deq if last[k] < j]:
                del deq[k]
            i = j
        return out

    @stage("objectives and copies", wait_first=False)
    def settle(H: torch.Tensor) -> None:
        """The queued entries' objectives, checks and energies read in one transfer; the entries kept
        (on the CPU, each stacked rounding brought over once)."""
        rows = objective_rows(H)
        sizes = [r.numel() for r in rows]
        flat = torch.cat(rows)
        if stacked:  # each entry's total in one sum over the batch
            seg = torch.repeat_interleave(torch.arange(len(rows), device=flat.device), torch.tensor(sizes, device=flat.device),
                                          output_size=flat.numel())  # its size given: not read back from the device
            totals = torch.zeros(len(rows), dtype=flat.dtype, device=flat.device).index_add_(0, seg, flat)
        else:  # the CPU's pinned sums, entry by entry
            totals = torch.stack([r.sum() for r in rows])
        parts = [flat.float(), totals.float()] + ([torch.stack([e for _, e in energies]).float()] if energies else [])
        parts += [torch.stack([bad for bad, _ in checks]).float()] if checks else []
        host = torch.cat(parts).cpu()  # the one wait of the group
        stacks: dict[int, QuantizedWeight] = {}
        users: dict[int, int] = {}  # entries per stacked rounding
        for q in queued:
            stacks.setdefault(id(q.part.stack), q.part.stack)
            users[id(q.part.stack)] = users.get(id(q.part.stack), 0) + 1
        on_host = {k: s.to("cpu") for k, s in stacks.items()}
        scales: dict[int, torch.Tensor] = {}
        for q in queued:
            if q.entry.in_scale is not None and id(q.entry.in_scale) not in scales:
                scales[id(q.entry.in_scale)] = q.entry.in_scale.cpu()
        n, m = sum(sizes), len(rows)
        with torch.profiler.record_function("gransearch: on the host"):  # from here on only host memory is touched
            try:
                vals = host[n:].tolist()  # the totals, energies and check flags
                for (_, raise_now), bad in zip(checks, vals[m + len(energies) :]):
                    if bad:
                        raise_now()  # a weight that is not finite, or a scale beyond float16: the check skipped before
                for (name, _), v in zip(energies, vals[m : m + len(energies)]):
                    energy[name] = v
                for q, r, total in zip(queued, host[:n].split(sizes), vals[:m]):
                    if not math.isfinite(total):
                        raise NonFiniteError(f"the layer objective of {q.name} with {q.key} is not finite: its weights, Hessian or "
                                             "quantized weights hold NaN or infinity")
                    e, p = q.entry, q.part
                    e.objective, e.row_objective = total, r.clone()
                    if users[id(p.stack)] == 1 and (p.r0, p.r1) == (0, p.stack.shape[0]):
                        e.qweight = on_host[id(p.stack)]  # a rounding of its own: nothing more to copy
                    else:  # the entry's own rows (a stored layer file holds no shared buffers)
                        e.qweight = _own_rows(on_host[id(p.stack)], p.r0, p.r1)
                    if e.in_scale is not None:
                        e.in_scale = scales[id(e.in_scale)]
                    keys[q.name].append(q.key)
                    entries[q.name].append(e)
            finally:
                queued.clear(), checks.clear(), energies.clear()

    # one low-rank factor per distinct input Hessian (q/k/v and gate/up share theirs)
    factors: dict[int, Optional[torch.Tensor]] = {}

    def factor_of(name):
        st = stats[name]
        if awq_rank is None or awq_rank >= st.in_features:
            return None
        if id(st) not in factors:
            factors[id(st)] = hessian_factor(st.hessian.to(dev), awq_rank)
        return factors[id(st)]

    def awq_groups(b: int) -> list[list[str]]:
        """The names of block ``b``'s scaling groups that have a valid fold (AWQ searches those)."""
        block = get_module(model, f"{info.blocks}.{b}")
        return [[f"{info.blocks}.{b}.{l}" for l in grp.linears] for grp in info.groups if foldable(block, grp)]

    @stage("awq hessian factors")
    def factors_block(b: int) -> None:
        """The low-rank factors of block ``b``'s scaling groups' Hessians, before the searches that read
        them: a stage of its own, since an eigendecomposition (float64) may cost more on a GPU than the
        grid it serves. The clip search reads the same factors (its layers share the groups' inputs)."""
        for gnames in awq_groups(b):
            factor_of(gnames[0])

    # AWQ scales are searched once per scaling group and spec (the group shares one fold), block by block
    awq_scales: dict[tuple[str, str], torch.Tensor] = {}

    @stage("awq scale search")
    def awq_block(b: int) -> None:
        for gnames in awq_groups(b):
            ws = [linear_weight(get_module(model, n)).detach().float().to(dev) for n in gnames]
            H = stats[gnames[0]].hessian.to(dev)
            act = stats[gnames[0]].abs_mean.to(dev)
            grid = awq_grid_scales(act, awq_grid)  # the same for every spec
            sps = code_specs[gnames[0]]
            # every spec's grid before any loss is read (on a GPU one wait per group, not per spec); unchecked: a
            # weight that is not finite gives non-finite losses, and the search then raises what the check would
            found = awq_search_hessian_specs(act, ws, H, sps, n_grid=awq_grid, factor=factor_of(gnames[0]), grid=grid, check=False)
            for spec, res in zip(sps, found):
                for n in gnames:
                    awq_scales[(n, str(spec))] = res.scales

    opts = GPTQOptions(damp=damp, act_order=act_order)

    def plain_gptq_of(group: list, Ws: list) -> dict[str, list["_Part"]]:
        """Plain GPTQ of every spec of the layers in ``group`` (weights ``Ws``), which read one input
        (one Hessian): the same rounding as quantize_layer(W, H, Method.GPTQ, spec), solved as one stack
        of rows on one factorisation (tests/test_algorithms.py checks the two agree). Spec -> one part
        per layer."""
        sps = code_specs[group[0].name]
        name = "+".join(r.name for r in group)
        H = stats[group[0].name].hessian.to(dev)
        with stage("gptq"):
            prep = gptq_prepare(H, damp=damp, act_order=act_order, name=name)
            results = gptq_many(torch.cat(Ws) if len(Ws) > 1 else Ws[0], H, sps, damp=damp, act_order=act_order, prepared=prep, name=name)
        return {str(sp): _parts(r.qweight, [W.shape[0] for W in Ws]) for sp, r in zip(sps, results)}

    def gptq_groups(refs: list) -> list[list]:
        """The block's layers grouped for :func:`plain_gptq_of` and :func:`build_group`: stacked (on CUDA,
        or as ``STACK_SHARED_INPUTS`` says) the layers that share a Hessian and their specs go together,
        as in ``gs.quantize``, which cuts the column loops (launch-bound on a GPU) from 7 to 4 per Llama
        block; else one by one, which keeps the CPU's pinned codes (a taller stack may round a tie the
        other way)."""
        if not stacked:
            return [[r] for r in refs]
        groups: dict[tuple, list] = {}
        for r in refs:
            sps = specs[r.name]
            spans = any(not getattr(sp, "is_ggml", False) and sp.granularity.spans_rows for sp in sps)  # a per-tensor scale: alone
            key = (r.name,) if spans else (id(stats[r.name]), tuple(map(str, sps)))
            groups.setdefault(key, []).append(r)
        return list(groups.values())

    def build_group(group: list, Ws: list, plain_gptq: dict[str, list["_Part"]]) -> None:
        """Every entry of the layers in ``group`` (one input, one Hessian; weights ``Ws``): per spec, the
        RTN of their weights and of their AWQ-scaled weights as one rounding, then the entries queued
        in each layer's order (llama.cpp, RTN, GPTQ, AWQ, AWQ+GPTQ) and settled together."""
        H = stats[group[0].name].hessian.to(dev)
        for ref, W in zip(group, Ws):
            checks.append((~torch.isfinite(W).all(), lambda W=W, ref=ref: check_weight(W, specs[ref.name][0], ref.name)))
            energies.append((ref.name, ((W @ H) * W).sum()))  # tr(W H W^T): the float layer's output energy
        for spec in specs[group[0].name]:
            ggml = getattr(spec, "is_ggml", False)
            awq = {}  # layer -> (AWQ scales, scaled and clipped weight, its Hessian)
            if use_awq and not ggml:
                for ref, W in zip(group, Ws):
                    s = awq_scales.get((ref.name, str(spec)))
                    if s is None:
                        continue
                    Wsc = W * s.unsqueeze(0)
                    Hs = H / s.unsqueeze(0) / s.unsqueeze(1)  # Hessian of the scaled inputs x / s
                    if clips_after_awq(ref.name):
                        F = factor_of(ref.name)
                        Fs = None if F is None else F / s.unsqueeze(1)  # its factor: D^-1 F
                        with stage("awq clip search"):
                            Wsc = apply_clip(Wsc, spec, clip_ratios_hessian(Wsc, Hs, spec, factor=Fs))
                    awq[ref.name] = (s, Wsc, Hs)
            # RTN, and AWQ where a layer has no valid fold (e.g. v -> o under grouped-query attention:
            # quantize() leaves it unscaled and unclipped, so its AWQ is RTN and its AWQ+GPTQ is GPTQ)
            plain = [] if ggml else [i for i, r in enumerate(group) if Method.RTN in methods or (Method.AWQ in methods and r.name not in awq)]
            scaled = [i for i, r in enumerate(group) if r.name in awq] if Method.AWQ in methods else []
            rounded = rtn_parts([Ws[i] for i in plain] + [awq[group[i].name][1] for i in scaled], spec) if plain or scaled else []
            rtn_of = dict(zip(plain, rounded[: len(plain)]))
            awq_of = dict(zip(scaled, rounded[len(plain) :]))
            for i, (ref, W) in enumerate(zip(group, Ws)):
                if Method.LLAMACPP in methods and Method.LLAMACPP.accepts(spec):  # llama.cpp's quantizer, weighted by diag(H)
                    queue(ref.name, Method.LLAMACPP, spec, _Part.whole(quantize_layer(W, H, Method.LLAMACPP, spec, name=ref.name).qweight), None, W)
                if ggml:
                    continue  # only llama.cpp makes its K-quants
                if Method.RTN in methods:
                    queue(ref.name, Method.RTN, spec, rtn_of[i], None, W)
                if Method.GPTQ in methods:
                    queue(ref.name, Method.GPTQ, spec, plain_gptq[str(spec)][i], None, W)
                if ref.name in awq:
                    s, Wsc, Hs = awq[ref.name]
                    if Method.AWQ in methods:
                        queue(ref.name, Method.AWQ, spec, awq_of[i], s, W)
                    if Method.AWQ_GPTQ in methods:
                        q = quantize_layer(Wsc, Hs, Method.AWQ_GPTQ, spec, opts, name=ref.name).qweight
                        queue(ref.name, Method.AWQ_GPTQ, spec, _Part.whole(q), s, W)
                elif use_awq:
                    if Method.AWQ in methods:
                        queue(ref.name, Method.AWQ, spec, rtn_of[i], None, W)
                    if Method.AWQ_GPTQ in methods:
                        queue(ref.name, Method.AWQ_GPTQ, spec, plain_gptq[str(spec)][i], None, W)
        settle(H)

    blocks: dict[int, list] = {}
    for ref in refs:  # the unit of work (and of claims between workers): one decoder block's linears
        blocks.setdefault(block_index(ref.name) or 0, []).append(ref)

    @torch.profiler.record_function("gransearch: blocks")
    def build_block(b: int) -> None:
        t_block = time.perf_counter()
        if per_block is not None:
            with stage("statistics"):
                stats.update(per_block.of(b))
        if use_awq and not info.generic:
            factors_block(b)
            awq_block(b)
        for group in gptq_groups(blocks[b]):
            Ws = [linear_weight(r.module).detach().float().to(dev) for r in group]
            build_group(group, Ws, plain_gptq_of(group, Ws) if use_gptq else {})
            for ref in group:
                if prune == "dominated":
                    keep = pareto_front([e.nbytes for e in entries[ref.name]], [e.objective for e in entries[ref.name]])
                    keys[ref.name] = [keys[ref.name][j] for j in keep]
                    entries[ref.name] = [entries[ref.name][j] for j in keep]
        for k in [k for k in awq_scales if k[0] in {r.name for r in blocks[b]}]:
            del awq_scales[k]
        if per_block is not None:  # this block's statistics and weights are done with
            for r in blocks[b]:
                stats.pop(r.name, None)
            factors.clear()  # keyed by id(): a freed statistic's id may come back
            per_block.done(b)
        stage.add("blocks", time.perf_counter() - t_block)

    config = bank_config(source or model, calib, methods, bits, granularities, damp=damp, act_order=act_order, awq_grid=awq_grid,
                         awq_rank=awq_rank, fisher_windows=fisher_windows, profile=profile, prune=prune)
    if not store:
        for b in tqdm(list(blocks), desc="bank", disable=not verbose):
            build_block(b)
        if per_block is not None:
            per_block.close()
        with stage("output fisher"):
            fisher = fisher_of()
        return Bank(names, [keys[n] for n in names], [entries[n] for n in names], [energy[n] for n in names], time.perf_counter() - t0,
                    opts, fisher, config, [], bank_stages(stage))

    # stored: blocks are claimed in the folder, so that workers sharing it build the bank together (and a
    # killed build resumes from its finished blocks); each block's layer files, then its part record, then release
    folder = _BuildFolder(store, config)
    bar = tqdm(total=len(blocks), desc="bank", disable=not verbose)
    while True:
        todo = [b for b in blocks if not folder.done(b)]
        bar.n = len(blocks) - len(todo)
        bar.refresh()
        if not todo:  # every block done: check the files they recorded (a resumed or corrupted folder)
            bad = folder.damaged({b: [names.index(r.name) for r in blocks[b]] for b in blocks})
            if not bad:
                break
            log.warning("bank blocks %s have missing or corrupted files: building them again", bad)
            for b in bad:
                folder.forget(b)
            continue
        b = next((b for b in todo if folder.claim(b)), None)
        if b is None:  # every unfinished block is being built by another worker: wait for it (or its death)
            time.sleep(POLL_SECONDS)
            continue
        t_block = time.perf_counter()
        with folder.held(b):
            if folder.done(b):  # finished by a worker we took for dead
                continue
            build_block(b)
            part = {}
            for ref in blocks[b]:
                i = names.index(ref.name)
                with stage("store"):
                    digest = _store_layer(store, i, entries[ref.name])
                part[ref.name] = {"index": i, "sha256": digest, "keys": keys[ref.name],
                                  "nbytes": [e.nbytes for e in entries[ref.name]], "objectives": [e.objective for e in entries[ref.name]],
                                  "out_energy": energy[ref.name]}
                entries[ref.name] = []  # on disk now: memory holds one block's candidates at a time
            folder.finish(b, part, time.perf_counter() - t_block)
        if max_bytes is not None and prune is not None:  # unpruned, the size bound was checked before any work
            _check_projection(store, folder, blocks, names, size, max_bytes)
    bar.close()
    if per_block is not None:
        per_block.close()
    parts = folder.parts(list(blocks))
    table = [[BankEntry(None, None, int(nb), float(ob)) for nb, ob in zip(parts[n]["nbytes"], parts[n]["objectives"])] for n in names]
    with stage("output fisher"):
        fisher = fisher_of()
    bank = Bank(names, [parts[n]["keys"] for n in names], table, [parts[n]["out_energy"] for n in names],
                folder.seconds(list(blocks)), opts, fisher, config, [parts[n]["sha256"] for n in names])
    bank.save_manifest(store, config)  # every worker that gets here writes the same bytes
    loaded = Bank.load(store, config, verify=False)  # damaged() has just hashed every layer file
    loaded.stage_seconds = bank_stages(stage)
    return loaded


class Stages:
    """Seconds per stage of timed work (``stage("name")`` as a context manager or decorator), waiting
    for the GPU at each boundary so that its queued work is counted where it was queued. Each stage
    is also a ``torch.profiler`` range named ``gransearch: <stage>``, so a profile of the work says
    how much of each stage's wall time the GPU spent computing (``benchmarks/search_cost.py
    --profile``)."""

    def __init__(self, dev: torch.device):
        self.dev = torch.device(dev)
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    @contextlib.contextmanager
    def __call__(self, name: str, wait_first: bool = True):
        if wait_first:  # else the GPU work queued before it is counted here too
            self._sync()
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(f"gransearch: {name}"):
                yield
        finally:
            self._sync()
            self.add(name, time.perf_counter() - t0)

    def unless_gpu(self, name: str):
        """Stage ``name`` where timing it costs no wait (not on a GPU, whose queued work is then
        counted by the next stage that waits for it); a context manager either way."""
        return contextlib.nullcontext() if self.dev.type == "cuda" else self(name)

    def add(self, name: str, seconds: float) -> None:
        """Counts ``seconds`` to stage ``name`` (timed by the caller)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def report(self, whole, rest: str, outside: Sequence[str] = ()) -> dict:
        """Each stage's seconds, and under ``rest`` what ``whole`` (a stage's name, or seconds) spent
        outside the stages; the stages named in ``outside`` ran outside ``whole``."""
        total = self.seconds.get(whole, 0.0) if isinstance(whole, str) else whole
        out = {k: round(v, 3) for k, v in self.seconds.items() if k != whole}
        inside = sum(v for k, v in self.seconds.items() if k != whole and k not in outside)
        out[rest] = round(max(0.0, total - inside), 3)
        return out


def bank_stages(stage: Stages) -> dict:
    """A bank build's stages, and what its blocks spent outside them (RTN and AWQ roundings, Python)."""
    out = stage.report("blocks", "other (rtn and awq rounding, python)", outside=("store", "output fisher"))
    log.info("bank stages (seconds): %s", out)
    return out


class _BlockStats:
    """The float model's calibration statistics one decoder block at a time (what
    :func:`gransearch.calibrate` computes for every layer at once, the same numbers): a runner
    advanced through the float blocks, so memory holds one block's Hessians. A worker asked for an
    earlier block than its runner has reached (a block taken over from a dead worker) starts again
    from the embeddings. A model read from disk has each block read while it is needed."""

    def __init__(self, model, calib, device, batch_size: int = 8):
        self.model, self.calib, self.device, self.batch_size = model, calib, device, batch_size
        self.runner, self.pos = None, 0

    def of(self, b: int) -> dict:
        from .calibrate import BlockRunner, collect_block_stats

        if self.runner is None or b < self.pos:
            self.close()
            self.runner, self.pos = BlockRunner(self.model, self.calib, self.batch_size, self.device), 0
        while self.pos < b:  # float forward only: the inputs of block b
            self.runner.enter(self.pos)
            try:
                self.runner.run(self.pos, advance=True)
            finally:
                self.runner.leave(self.pos)
            self.pos += 1
        self.runner.enter(b)
        try:
            out = collect_block_stats(self.runner, b, advance=True, token_max=False)
        finally:
            self.runner.leave(b, release=False)  # its weights are quantized next; done() drops them
        self.pos = b + 1
        return out

    def done(self, b: int) -> None:
        if self.runner is not None and self.runner.source is not None:
            self.runner.source.release_block(b)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner = None


def _largest(size: BankSize, n: int = 4) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(size.per_candidate.items(), key=lambda kv: -kv[1])[:n])


def _fmt(n: float) -> str:
    """Bytes as GB (MB below 0.1 GB)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _check_projection(store: str, folder: "_BuildFolder", blocks: dict, names: list[str], size: BankSize, max_bytes: int) -> None:
    """Refuse to go on when the blocks finished so far, scaled to the whole model, exceed ``max_bytes``."""
    done = [b for b in blocks if folder.done(b)]
    if not done:
        return
    layers = [names.index(r.name) for b in done for r in blocks[b]]
    stored = sum(os.path.getsize(os.path.join(store, f"layer{i:04d}.safetensors")) for i in layers
                 if os.path.exists(os.path.join(store, f"layer{i:04d}.safetensors")))
    share = len(layers) / max(1, len(names))
    projected = stored / share
    if projected > max_bytes:
        raise BankError(f"the pruned bank projects to {_fmt(projected)} on disk after {len(done)} of {len(blocks)} blocks, more "
                        f"than the {_fmt(max_bytes)} allowed. Largest candidates: {_largest(size)}: drop some")


def bank_config(model: nn.Module, calib, methods, bits, granularities, profile: str = "research", prune: Optional[str] = None,
                **options) -> dict:
    """What a stored bank depends on: the model (layer shapes and a sample of every weight), the
    calibration tokens, the profile, the pruning and every option. Candidate lists are sets: their order changes nothing."""
    prof = {} if get_profile(profile).name == "research" else {"profile": get_profile(profile).name}  # research banks keep their old key
    if prune:  # unpruned banks keep their old key
        options = {**options, "prune": prune}
    return {"fingerprint": model_fingerprint(model), "weights": weights_fingerprint(model), "calib_sha256": tokens_sha256(calib),
            "methods": sorted(set(methods)), "bits": sorted({int(b) for b in bits}),
            "granularities": sorted({as_granularity(g).tag() for g in granularities}), **prof, **options}


def bank_for(model: nn.Module, calib, folder: str, methods=("rtn", "gptq", "awq"), bits=(2, 3, 4, 8),
             granularities=("tensor", "channel", 32, 64, 128), *, damp: float = 0.01, act_order: bool = True, awq_grid: int = 20,
             awq_rank: Optional[int] = 64, fisher_windows: int = 16, device=None, profile: str = "research", prune: Optional[str] = None,
             max_bytes: Optional[int] = None, verbose: bool = True) -> Bank:
    """The bank stored in ``folder`` if it was built for this model, calibration and options; else
    build it there (entries on disk, see :func:`build_bank`), together with any other worker building
    the same bank in the same folder. A killed build resumes from its finished blocks; a
    corrupted or malformed stored bank is rebuilt (with a warning naming the file). A folder that
    holds the bank of *another model* (other weights) is refused, never overwritten."""
    opts = dict(damp=damp, act_order=act_order, awq_grid=awq_grid, awq_rank=check_int("awq_rank", awq_rank, 1, allow_none=True),
                fisher_windows=fisher_windows)
    config = bank_config(model, calib, methods, bits, granularities, profile=profile, prune=prune, **opts)
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
    return build_bank(model, calib, methods, bits, granularities, device=device, store=folder, profile=profile, prune=prune,
                      max_bytes=max_bytes, verbose=verbose, **opts)

