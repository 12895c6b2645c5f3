"""Calibration: forward hooks collect streaming per-layer statistics, block by block.

Execution (as in the GPTQ reference code): the inputs of block 0 are captured once (the model runs
up to block 0 and stops); then each block runs over all calibration batches in turn, its outputs
becoming the next block's inputs. Only one block's activations live at a time, so peak memory is
the model plus one block's inputs and outputs. With ``device="cuda"`` each block is moved to the
GPU while it runs and back afterwards; the rest of the model stays where it is.

Per linear input ``x`` (``[tokens, in]``) the statistics are:

* ``hessian``: ``H = 2/n * sum x x^T`` (float32) -- GPTQ's Hessian of the layer objective;
* ``abs_mean``, ``abs_max``: per input channel mean and max of ``|x|`` (AWQ, SmoothQuant);
* ``token_max``: the max ``|x|`` of every token (activation-quantization studies).

No hook survives :func:`calibrate`, also when it raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchInfo, arch_of, block_linears, get_blocks
from .errors import NonFiniteError, check_int, check_token_ids, nonfinite_cause

log = logging.getLogger(__name__)

__all__ = ["LayerStats", "BlockRunner", "SpilledStates", "calibrate", "as_batches"]


@dataclass
class LayerStats:
    """Streaming statistics of one linear layer's input."""

    in_features: int
    with_hessian: bool = True
    n: int = 0
    acc: Optional[torch.Tensor] = None  # sum x x^T, float32 [in, in]: blocks on and above the diagonal only
    abs_sum: Optional[torch.Tensor] = None  # [in]
    sq_sum: Optional[torch.Tensor] = None  # float64 [in]: sum x_j^2, kept without the Hessian too
    abs_max: Optional[torch.Tensor] = None  # [in]
    token_max: list = field(default_factory=list)  # per-token max |x| chunks, on the inputs' device until host_token_max()
    with_moments: bool = False
    with_token_max: bool = True  # False: no per-token maxima (GPTQ's and the bank's passes read none)
    moments: Optional[torch.Tensor] = None  # float64 sums of x, x^2, x^3, x^4 over every element

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., in]``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        a = x.abs()
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64, device=x.device)
            self.sq_sum = torch.zeros(self.in_features, dtype=torch.float64, device=x.device)
            self.abs_max = torch.zeros(self.in_features, device=x.device)
            if self.with_hessian:
                self.acc = torch.zeros(self.in_features, self.in_features, device=x.device)
        self.abs_sum += a.sum(0, dtype=torch.float64)
        self.sq_sum += (a * a).sum(0, dtype=torch.float64)
        torch.maximum(self.abs_max, a.amax(0), out=self.abs_max)
        if self.with_token_max:
            self.token_max.append(a.amax(1))  # kept where x is: a copy to the host here would wait for the GPU every batch
        if self.with_hessian:
            _add_gram_upper(self.acc, x)
        if self.with_moments:
            xd = x.double()
            x2 = xd * xd
            m = torch.stack([xd.sum(), x2.sum(), (x2 * xd).sum(), (x2 * x2).sum()]).cpu()
            self.moments = m if self.moments is None else self.moments + m
        self.n += x.shape[0]

    @property
    def xtx(self) -> Optional[torch.Tensor]:
        """``sum x x^T`` (float32, symmetric)."""
        if self.acc is None:
            return None
        return _mirror_upper(self.acc.clone())

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n * sum x x^T`` (float32)."""
        if self.n == 0 or self.acc is None:
            raise ValueError("no calibration tokens reached this layer (empty calibration set?)")
        return self.xtx.mul_(2.0 / self.n)  # in place on xtx's own copy: one [in, in] matrix, not two

    def take_hessian(self) -> torch.Tensor:
        """:attr:`hessian` made in place from the accumulator, which this statistic gives up (the
        last layer to read it: no ``[in, in]`` copy). The same numbers as :attr:`hessian`."""
        if self.n == 0 or self.acc is None:
            raise ValueError("no calibration tokens reached this layer (empty calibration set?)")
        full, self.acc = self.acc, None
        return _mirror_upper(full).mul_(2.0 / self.n)

    @property
    def mean_sq(self) -> torch.Tensor:
        """``mean x_j^2`` per input column (float32): llama.cpp's importance matrix, ``diag(H) / 2``."""
        if self.n == 0 or self.sq_sum is None:
            raise ValueError("no calibration tokens reached this layer (empty calibration set?)")
        return (self.sq_sum / self.n).float()

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis ``E[(x - mu)^4] / var^2`` of every input element (3 for a Gaussian)."""
        if self.moments is None:
            raise ValueError("kurtosis needs moments: calibrate(..., moments=True)")
        n = self.n * self.in_features
        m1, m2, m3, m4 = (self.moments / n).tolist()
        var = m2 - m1 * m1
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        return c4 / (var * var) if var > 0 else float("nan")

    @property
    def token_maxima(self) -> torch.Tensor:
        """The max ``|x|`` of every token seen, in order (on the CPU)."""
        if not self.with_token_max:
            raise ValueError("these statistics were collected without per-token maxima (token_max=False): use gs.calibrate")
        self.host_token_max()
        return self.token_max[0] if self.token_max else torch.zeros(0)

    def host_token_max(self) -> None:
        """The per-token maxima gathered so far, moved to the host in one transfer (one wait for
        the GPU per pass, not one per batch); :func:`collect_block_stats` calls it after its pass."""
        if self.token_max and (len(self.token_max) > 1 or self.token_max[0].device.type != "cpu"):
            self.token_max = [torch.cat(self.token_max).cpu()]

    def to(self, device) -> "LayerStats":
        for k in ("acc", "abs_sum", "sq_sum", "abs_max"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.to(device))
        return self


def _mirror_upper(full: torch.Tensor) -> torch.Tensor:
    """``full`` (an accumulator of :func:`_add_gram_upper`) made symmetric in place: the column
    blocks below the diagonal copied from those above it."""
    d = full.shape[0]
    b = _gram_block(d)
    for i in range(0, d, b):
        full[i + b :, i : i + b] = full[i : i + b, i + b :].t()
    return full


def _gram_block(d: int) -> int:
    """Column block of the Gram accumulation: about 384 wide (one block below 512 columns)."""
    nb = max(1, round(d / 384))
    return -(-d // nb)


def _add_gram_upper(acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += x^T x`` on the column blocks on and above the diagonal only.

    ``x^T x`` is symmetric: with ``k`` column blocks, ``k (k + 1) / 2`` of the ``k^2`` block
    products suffice (10 of 16 for a 1536-wide input, 3 of 4 at 576); the rest is mirrored when
    the Hessian is read. On CPUs the Gram matrix costs about as much as the block's own forward
    pass, so this is most of the calibration overhead we can remove.
    """
    d = x.shape[1]
    b = _gram_block(d)
    if b >= d:
        acc.addmm_(x.t(), x)
        return
    for i in range(0, d, b):
        xi = x[:, i : i + b].t()
        acc[i : i + b, i:].addmm_(xi, x[:, i:])


class _StopForward(Exception):
    pass


def as_batches(calib, batch_size: int) -> list[torch.Tensor]:
    """``[n, seqlen]`` token windows (or a list of ``[b, seqlen]`` tensors) -> batches."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 1:
            calib = calib.unsqueeze(0)
        if calib.numel() == 0 or calib.shape[0] == 0:
            raise ValueError("the calibration set is empty: pass token windows [n, seqlen] with n >= 1")
        return [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]
    batches = [b if b.dim() == 2 else b.unsqueeze(0) for b in calib]
    if not batches or all(b.numel() == 0 for b in batches):
        raise ValueError("the calibration set is empty: pass token windows [n, seqlen] with n >= 1")
    return batches


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[list]:
    """Remove every hook handle appended to the list on exit, whatever happens."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
        handles.clear()


class SpilledStates:
    """The hidden states of the calibration batches kept in files (safetensors, one per batch), so
    that memory holds one batch's states at a time however many windows calibrate: a list that
    :class:`BlockRunner` appends to and indexes. The files are removed when replaced or closed."""

    def __init__(self, folder: str, device):
        import tempfile

        os.makedirs(folder, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="states-", dir=folder)
        self.device = device
        self.shapes: list[tuple] = []

    def _path(self, j: int) -> str:
        return os.path.join(self.dir, f"{j}.safetensors")

    def append(self, x: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({"x": x.detach().contiguous().cpu()}, self._path(len(self.shapes)))
        self.shapes.append(tuple(x.shape))

    def __getitem__(self, j: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if j < 0 or j >= len(self.shapes):
            raise IndexError(j)
        return load_file(self._path(j))["x"].to(self.device)

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class BlockRunner:
    """Runs a model block by block over calibration batches.

    ``runner.inputs[j]`` holds the hidden states entering the current block for batch ``j``
    (``[b, T, H]``); ``runner.extra[j]`` the other positional and keyword arguments the model
    passed to its blocks (masks, positions, rotary embeddings). With ``spill=DIR`` the states live
    in files there (:class:`SpilledStates`): memory then does not grow with the number of
    calibration windows (long windows, many of them, large models); the arithmetic is the same.
    """

    def __init__(self, model: nn.Module, calib, batch_size: int = 8, device=None, info: Optional[ArchInfo] = None,
                 spill: Optional[str] = None):
        from .offload import DiskModel

        self.source = model if isinstance(model, DiskModel) else None  # blocks read from disk when they run
        model = model.model if self.source is not None else model
        self.model = model
        self.info = info or arch_of(model)
        self.blocks = get_blocks(model, self.info)
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.home
        self.batches = as_batches(calib, check_int("batch_size", batch_size, 1))
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        for b in self.batches:
            check_token_ids(b, getattr(emb, "num_embeddings", None), "the calibration ids")
        self.spill = spill
        self.inputs = self._store()
        self.extra: list[tuple[tuple, dict]] = []
        self.tuple_out = False  # whether the last block call returned a tuple (its first item is the states)
        self._capture()

    def _store(self):
        return SpilledStates(self.spill, self.device) if self.spill else []

    def close(self) -> None:
        """Remove spilled states (a no-op in memory)."""
        if isinstance(self.inputs, SpilledStates):
            self.inputs.close()

    @torch.no_grad()
    def _capture(self) -> None:
        block0 = self.blocks[0]

        def pre_hook(module, args, kwargs):
            self.inputs.append(args[0].detach().to(self.device))
            self.extra.append((_move(args[1:], self.device), _move(dict(kwargs), self.device)))
            raise _StopForward

        with hooks([block0.register_forward_pre_hook(pre_hook, with_kwargs=True)]):
            for b in self.batches:
                try:
                    self.model(input_ids=b.to(self.home), use_cache=False)
                except _StopForward:
                    pass
        if len(self.inputs) != len(self.batches):
            raise RuntimeError("could not capture the inputs of the first block")

    def enter(self, index: int) -> nn.Module:
        """Block ``index``, read from disk if needed and moved to the runner's device."""
        if self.source is not None:
            self.source.load_block(index)
        return self.blocks[index].to(self.device)

    def leave(self, index: int, release: bool = True) -> None:
        """Move block ``index`` back home; a block read from disk is dropped unless ``release=False``."""
        self.blocks[index].to(self.home)
        if self.source is not None and release:
            self.source.release_block(index)

    def call_block(self, block: nn.Module, j: int, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        args, kwargs = self.extra[j]
        out = block(self.inputs[j] if x is None else x, *args, **kwargs)
        self.tuple_out = isinstance(out, (tuple, list))
        return out[0] if self.tuple_out else out

    @torch.no_grad()
    def run(self, index: int, advance: bool = False, on_batch: Optional[Callable[[int], None]] = None) -> None:
        """Run block ``index`` over every batch; with ``advance`` its outputs become the inputs."""
        block = self.blocks[index]
        outs = self._store() if advance else None
        for j in range(len(self.inputs)):
            y = self.call_block(block, j)
            if advance:
                outs.append(y)
            if on_batch is not None:
                on_batch(j)
        if advance:
            self.close()
            self.inputs = outs

    def n_tokens(self) -> int:
        if isinstance(self.inputs, SpilledStates):
            return sum(s[0] * s[1] for s in self.inputs.shapes)
        return sum(x.shape[0] * x.shape[1] for x in self.inputs)


def collect_block_stats(
    runner: BlockRunner, index: int, names: Optional[Sequence[str]] = None, hessian: bool = True, advance: bool = False,
    moments: bool = False, token_max: bool = True,
) -> dict[str, LayerStats]:
    """One pass of block ``index``: hooks on its linears fill a :class:`LayerStats` each
    (``token_max=False``: without the per-token maxima, which only activation studies read).

    Linears that read the same tensor (q/k/v, gate/up) share one statistic object, computed once.
    With ``advance`` the block's outputs also become the runner's inputs (one pass for both).
    """
    refs = block_linears(runner.model, index, runner.info)
    if names is not None:
        refs = [r for r in refs if r.name in set(names)]
    stats: dict[str, LayerStats] = {}
    alias: dict[str, str] = {}
    # inputs seen in the current batch, held by reference: a freed tensor's memory could be reused
    # for a later input, so sharing is decided by object identity, never by address
    seen: list[tuple[torch.Tensor, str]] = []

    def make_hook(ref):
        def hook(module, args):
            x = args[0]
            if ref.name in alias:
                return
            owner = next((name for t, name in seen if t is x), None)
            if owner is not None and owner != ref.name:
                alias[ref.name] = owner
                return
            seen.append((x, ref.name))
            stats.setdefault(ref.name, LayerStats(ref.shape[1], with_hessian=hessian, with_moments=moments,
                                                  with_token_max=token_max)).update(x)

        return hook

    def next_batch(j):
        seen.clear()

    handles: list = []
    with hooks(handles):
        for ref in refs:
            handles.append(ref.module.register_forward_pre_hook(make_hook(ref)))
        runner.run(index, advance=advance, on_batch=next_batch)
    for st in stats.values():  # before the aliases: each statistic once
        st.host_token_max()
    for name, owner in alias.items():
        stats[name] = stats[owner]
    for ref in refs:  # in block order: the first layer whose inputs went bad is the one to name
        st = stats.get(ref.name)
        if st is not None and st.abs_max is not None and not bool(torch.isfinite(st.abs_max).all()):
            cause = nonfinite_cause(runner.model, "no parameter is non-finite, so an activation overflowed (try float32)")
            raise NonFiniteError(f"the calibration inputs of {ref.name} are not finite (NaN or infinity): {cause}")
    return stats


@torch.no_grad()
def calibrate(
    model: nn.Module,
    calib,
    *,
    batch_size: int = 8,
    device=None,
    hessian: bool = True,
    moments: bool = False,
    spill: Optional[str] = None,
    verbose: bool = True,
) -> dict[str, LayerStats]:
    """Statistics of every quantizable linear's input over the calibration windows.

    ``calib``: token windows ``[n, seqlen]`` (e.g. from :func:`gransearch.sample_windows`) or a list
    of ``[b, seqlen]`` batches. Blocks run one at a time (on ``device`` if given) on the outputs of
    the previous block; the model is not modified (a :class:`~gransearch.offload.DiskModel` is read
    one block at a time). Returns ``{linear name: LayerStats}``.
    ``hessian=False`` skips the Hessians (activation statistics only); ``moments=True`` also keeps
    the first four moments of the inputs (:attr:`LayerStats.kurtosis`); ``spill``: a folder for the
    blocks' hidden states (:class:`SpilledStates`), memory then independent of the window count. Raises
    :class:`~gransearch.errors.NonFiniteError` naming the first layer whose inputs hold NaN or
    infinity, and ``ValueError`` on token ids outside the vocabulary.

        >>> stats = calibrate(model, gs.sample_windows(train_ids, 128, 512))   # doctest: +SKIP
        >>> stats["model.layers.0.self_attn.q_proj"].hessian.shape              # doctest: +SKIP
        torch.Size([576, 576])
    """
    runner = BlockRunner(model, calib, batch_size, device, spill=spill)
    out: dict[str, LayerStats] = {}
    try:
        for i in tqdm(range(len(runner.blocks)), desc="calibrate", disable=not verbose):
            runner.enter(i)
            try:
                stats = collect_block_stats(runner, i, hessian=hessian, advance=True, moments=moments)
            finally:
                runner.leave(i)
            out.update({k: v.to("cpu") for k, v in stats.items()})
    finally:
        runner.close()
    return out
