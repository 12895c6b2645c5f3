"""GPTQ: Hessian-aware rounding (Frantar et al., 2022), as a pure function of a weight and a Hessian.

The columns of ``W`` (``[out, in]``) are quantized one at a time; the rounding error of each
column is spread over the columns not yet quantized through the inverse Hessian, which minimises
the layer objective ``tr((W - Q) H (W - Q)^T)`` greedily. Faithful to the paper and the reference
code:

* dead inputs (``H[i, i] == 0``) get ``H[i, i] = 1`` and a zero weight column;
* dampening ``damp * mean(diag(H))`` is added to the diagonal;
* the upper Cholesky factor of ``H^-1`` drives the updates; lazy batches of ``block_size`` columns
  apply the accumulated error to the rest of the matrix once per batch;
* per-group parameters are taken at each group boundary from the *partially updated* weights, or
  all up front from the original weights with ``static_groups``; per-channel and per-tensor
  parameters are taken up front;
* ``act_order`` quantizes columns by descending ``diag(H)``. Because gransearch stores groups as
  contiguous input columns (no ``g_idx`` tensor), act-order with groups uses static groups.

When the Cholesky factorisation fails the dampening is raised tenfold, up to ``max_damp_tries``
times, with a warning; the value used is recorded in the result.

Worked example (``H = I``: no correlation between inputs, so GPTQ has nothing to exploit and
equals round-to-nearest)::

    >>> import torch, gransearch as gs
    >>> w = torch.randn(8, 64)
    >>> spec = gs.QuantSpec.parse("w4g32")
    >>> torch.equal(gs.gptq(w, torch.eye(64), spec).qweight.codes, gs.rtn(w, spec).codes)
    True
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..quantizer import (ClipArg, QuantizedWeight, block_clip_ratios, block_view, check_params, check_weight, qparams, stored_zero)
from ..spec import QuantSpec

log = logging.getLogger(__name__)

__all__ = ["gptq", "gptq_many", "gptq_prepare", "GPTQPrepared", "GPTQResult", "CholeskyError", "cuda_graphs_enabled", "set_cuda_graphs"]


class CholeskyError(ValueError):
    """The damped Hessian stayed indefinite after every dampening increase."""


@dataclass
class GPTQResult:
    qweight: QuantizedWeight
    damp: float  # the relative dampening finally used
    damp_raised: bool  # True when the Cholesky needed more than the requested dampening
    n_dead: int  # input columns with a zero Hessian diagonal
    loss: float  # the reference code's error estimate, sum((w - q)^2 / d^2) / 2


def _factor_in_place(Hd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of ``Hd^-1`` written over ``Hd`` (cholesky, cholesky_inverse,
    cholesky again, each into the same storage: the same numbers as out of place, one matrix of
    memory instead of three); ``info`` is non-zero when a factorisation failed. Falls back to
    out-of-place calls where a backend refuses the aliasing."""
    info = torch.zeros((), dtype=torch.int32, device=Hd.device)
    try:
        torch.linalg.cholesky_ex(Hd, out=(Hd, info))
        if int(info) != 0:
            return Hd, info
        torch.cholesky_inverse(Hd, out=Hd)
        torch.linalg.cholesky_ex(Hd, upper=True, out=(Hd, info))
        return Hd, info
    except RuntimeError:
        pass
    L, info = torch.linalg.cholesky_ex(Hd)
    if int(info) != 0:
        return L, info
    return torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)


def _inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int, name: Optional[str]) -> tuple[torch.Tensor, float, bool]:
    diag_mean = float(torch.mean(torch.diag(H)))
    idx = torch.arange(H.shape[0], device=H.device)
    rel = damp
    for attempt in range(max_tries + 1):
        Hd = H.clone()
        Hd[idx, idx] += rel * diag_mean
        U, info = _factor_in_place(Hd)  # H and one [in, in] matrix: a large layer's Hessian is 0.8 GB at 14336 inputs
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            if attempt:
                msg = f"GPTQ{' ' + name if name else ''}: Cholesky failed at dampening {damp:g}; succeeded at {rel:g}"
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                log.warning(msg)
            return U, rel, attempt > 0
        del U, Hd
        rel *= 10.0
    where = f" for {name}" if name else ""
    raise CholeskyError(
        f"the Hessian{where} (shape {tuple(H.shape)}) is not positive definite even with dampening "
        f"{rel / 10:g} x mean(diag(H)): the calibration inputs are degenerate (too few tokens, or NaN/Inf "
        "activations). Use more calibration data, a larger damp, or method='rtn' for this layer"
    )


@torch.no_grad()
def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    clip: ClipArg = None,
    max_damp_tries: int = 6,
    name: Optional[str] = None,
    prepared: Optional["GPTQPrepared"] = None,
) -> GPTQResult:
    """Quantize ``W`` ``[out, in]`` with GPTQ given the Hessian ``H`` ``[in, in]`` (``2/n X X^T``).

    ``clip`` is passed to the block quantizer when parameters are taken (``"search"`` is the
    reference code's optional MSE grid). Returns a :class:`GPTQResult`; ``H`` is not modified.
    ``prepared`` (from :func:`gptq_prepare` with the same ``H``, ``damp`` and ``act_order``) reuses
    one Cholesky factorisation for several candidates of the same layer.
    """
    check_weight(W, spec, name)
    _check_hessian(W, H, name)
    dev = W.device
    prep = _prepared(prepared, H.to(dev), damp, act_order, max_damp_tries, name)
    W = _dead_zeroed(W, prep)
    in_f = W.shape[1]
    gran = spec.granularity
    grouped = gran.grouped
    if act_order and grouped and not static_groups:
        log.info("GPTQ%s: act_order with groups uses static groups (contiguous group storage)", " " + name if name else "")
    scale_cols, zero_cols, known = _upfront_params(W, spec, clip, static_groups or act_order)
    Wp = W if prep.perm is None else W[:, prep.perm]
    hinv = prep.hinv.to(dev)
    if known:
        cols = _column_groups(prep, in_f, gran.width(in_f), dev)
        codes, loss = _solve_columns(Wp, hinv, scale_cols[:, cols], zero_cols[:, cols], spec.maxq, block_size)
    else:
        codes, loss, scale_cols, zero_cols = _solve_groups_in_loop(Wp, hinv, spec.maxq, spec, clip, block_size)
        check_params(scale_cols, zero_cols if spec.float_zero else None)
    return _result(codes, scale_cols, zero_cols, spec, prep, loss)


@torch.no_grad()
def gptq_many(
    W: torch.Tensor,
    H: torch.Tensor,
    specs: Sequence[QuantSpec],
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    max_damp_tries: int = 6,
    name: Optional[str] = None,
    prepared: Optional["GPTQPrepared"] = None,
) -> list[GPTQResult]:
    """:func:`gptq` of one weight under several specs, as few solves over the specs' stacked rows.

    GPTQ treats output rows independently given the shared inverse-Hessian factor, so several
    candidates run as one column loop over a ``[len(specs) * out, in]`` stack: the same arithmetic
    row by row, a fraction of the kernel launches and Python steps (what dominates on a GPU). The
    candidates whose quantization parameters are fixed up front (per-tensor, per-channel, and
    groups under ``act_order``, which uses static groups) make one stack; those whose groups are
    taken inside the loop from partially updated weights (grouped, ``act_order=False``) make one
    stack per group width, symmetry and offset kind, their bit widths given per row. Returns one
    result per spec, each equal to its own :func:`gptq` call.
    """
    _check_hessian(W, H, name)
    dev = W.device
    prep = _prepared(prepared, H.to(dev), damp, act_order, max_damp_tries, name)
    for spec in specs:
        check_weight(W, spec, name)
    in_f = W.shape[1]
    out: list[Optional[GPTQResult]] = [None] * len(specs)
    upfront, in_loop = [], {}
    for k, spec in enumerate(specs):
        if spec.granularity.grouped and not act_order:
            in_loop.setdefault((spec.granularity.width(in_f), spec.symmetric, spec.float_zero), []).append(k)
        else:
            upfront.append(k)
    W0 = _dead_zeroed(W, prep)
    out_f = W0.shape[0]
    Wp = W0 if prep.perm is None else W0[:, prep.perm]
    hinv = prep.hinv.to(dev)

    def rows_maxq(ks: list[int]) -> torch.Tensor:
        return torch.cat([torch.full((out_f,), float(specs[k].maxq), device=dev) for k in ks])

    if upfront:
        params, S, Z = [], [], []
        for k in upfront:
            spec = specs[k]
            sc, zc, _ = _upfront_params(W0, spec, None, True)
            cols = _column_groups(prep, in_f, spec.granularity.width(in_f), dev)
            params.append((sc, zc))
            S.append(sc[:, cols])
            Z.append(zc[:, cols])
        codes, loss = _solve_columns(Wp.repeat(len(upfront), 1), hinv, torch.cat(S), torch.cat(Z), rows_maxq(upfront), block_size)
        for j, k in enumerate(upfront):
            rows = slice(j * out_f, (j + 1) * out_f)
            out[k] = _result(codes[rows], *params[j], specs[k], prep, loss[rows])
    for ks in in_loop.values():  # as gptq() with its groups taken in the loop, every spec's rows at once (a spec alone too)
        codes, loss, S, Z = _solve_groups_in_loop(Wp.repeat(len(ks), 1), hinv, rows_maxq(ks), specs[ks[0]], None, block_size)
        for j, k in enumerate(ks):
            rows = slice(j * out_f, (j + 1) * out_f)
            check_params(S[rows], Z[rows] if specs[k].float_zero else None)
            out[k] = _result(codes[rows], S[rows], Z[rows], specs[k], prep, loss[rows])
    return out


def _solve_groups_in_loop(Wp: torch.Tensor, hinv: torch.Tensor, maxq, spec: QuantSpec, clip: ClipArg, block_size: int):
    """The column loop with each group's parameters taken at its first column from the partially
    updated weights (:class:`_Groups`; ``spec`` gives all but the bits when ``maxq`` is per row):
    codes, loss, and the ``[rows, n_groups]`` scales and zeros as taken, unchecked. A lazy batch
    holds whole groups (at least one), so each group's parameters see every earlier column's update."""
    g = spec.granularity.width(Wp.shape[1])
    S, Z = torch.empty_like(Wp), torch.empty_like(Wp)
    codes, loss = _solve_columns(Wp, hinv, S, Z, maxq, max(g, (block_size // g) * g), _Groups(g, spec, clip))
    return codes, loss, S[:, ::g], Z[:, ::g]


def _prepared(prepared: Optional["GPTQPrepared"], H: torch.Tensor, damp: float, act_order: bool, max_damp_tries: int,
              name: Optional[str]) -> "GPTQPrepared":
    """``prepared`` if given (checked against ``act_order``), else a new factorisation of ``H``."""
    if prepared is None:
        return gptq_prepare(H, damp=damp, act_order=act_order, max_damp_tries=max_damp_tries, name=name)
    if prepared.act_order != act_order:
        raise ValueError("the prepared GPTQ factorisation was made with a different act_order")
    return prepared


def _check_hessian(W: torch.Tensor, H: torch.Tensor, name: Optional[str]) -> None:
    in_f = W.shape[-1]
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match weight {tuple(W.shape)}{' (' + name + ')' if name else ''}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"the Hessian{' of ' + name if name else ''} contains NaN or Inf: check the calibration activations")


def _dead_zeroed(W: torch.Tensor, prep: "GPTQPrepared") -> torch.Tensor:
    W = W.detach().float().clone()
    if prep.n_dead:
        W[:, prep.dead.to(W.device)] = 0.0
    return W


def _upfront_params(W: torch.Tensor, spec: QuantSpec, clip: ClipArg, static: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``[out, n_groups]`` scales and zeros fixed before the column loop, and whether they all are
    (per-group parameters without ``static`` are taken inside the loop)."""
    out_f, in_f = W.shape
    gran = spec.granularity
    n_groups = in_f // gran.width(in_f)
    scale_cols = torch.empty(out_f, n_groups, device=W.device)
    zero_cols = torch.empty(out_f, n_groups, device=W.device)
    if gran.spans_rows:
        blocks = block_view(W, spec)
        sc, zc = qparams(blocks, spec.bits, spec.symmetric, block_clip_ratios(blocks, spec, clip), spec.float_zero)
        scale_cols.fill_(float(sc)), zero_cols.fill_(float(zc))
        return scale_cols, zero_cols, True
    if not gran.grouped or static:
        blocks = block_view(W, spec)  # [out * n_groups, g]
        sc, zc = qparams(blocks, spec.bits, spec.symmetric, block_clip_ratios(blocks, spec, clip), spec.float_zero)
        scale_cols.copy_(sc.view(out_f, n_groups)), zero_cols.copy_(zc.view(out_f, n_groups))
        return scale_cols, zero_cols, True
    return scale_cols, zero_cols, False


def _column_groups(prep: "GPTQPrepared", in_f: int, g: int, device) -> torch.Tensor:
    """The natural group of each column in solve (possibly permuted) order."""
    order = prep.perm if prep.perm is not None else torch.arange(in_f)
    return order.to(device) // g


@dataclass(frozen=True)
class _Groups:
    """Per-group parameters taken inside the column loop, at each group's first column, from the
    partially updated weights. With the loop's ``maxq`` per row, ``spec`` gives everything but the
    bits (group width, symmetry, offset), so specs that differ only in bits are solved as one stack."""

    g: int
    spec: QuantSpec
    clip: ClipArg

    def take(self, W1: torch.Tensor, i: int, S1: torch.Tensor, Z1: torch.Tensor, maxq, check: bool) -> None:
        blk = W1[:, i : i + self.g]
        sp = self.spec
        per_row = isinstance(maxq, torch.Tensor)
        if per_row and isinstance(self.clip, str):  # the clip search takes one width
            raise ValueError("GPTQ: a clip search needs one bit width per column loop")
        sc, zc = qparams(blk, sp.bits, sp.symmetric, block_clip_ratios(blk, sp, self.clip), sp.float_zero, check=check,
                         row_maxq=maxq.unsqueeze(1) if per_row else None)
        S1[:, i : i + self.g], Z1[:, i : i + self.g] = sc, zc

    @property
    def capturable(self) -> bool:  # a fixed clip ratio or none: the clip search syncs with the host
        return not isinstance(self.clip, str)


def _solve_columns(W, Hinv, S, Z, maxq, block_size, group: Optional[_Groups] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ column loop over ``W`` ``[rows, in]`` (solve order), in lazy batches of ``block_size``.

    ``S``, ``Z``: each column's scale and zero per row (with ``group``, they are filled as the loop
    reaches each group's first column); ``maxq``: an int or a per-row tensor. Returns the float
    codes and the per-row error estimate ``sum((w - q)^2 / d^2) / 2``. ``W`` is updated in place.

    On a CUDA device each lazy batch runs as a captured CUDA graph (:class:`_GraphedBatch`): the
    same kernels without a launch from Python per operation, so the same numbers as eager mode.
    """
    rows, in_f = W.shape
    codes = torch.zeros_like(W)
    loss = torch.zeros(rows, device=W.device)
    graphs = _use_graphs(W, group)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        Err1 = None
        if graphs:
            try:
                Err1 = _GraphedBatch.get(rows, i2 - i1, maxq, group, W.device).run(W, Hinv, S, Z, codes, maxq, i1, i2)
            except RuntimeError as exc:  # a backend that cannot capture: say so once, carry on eagerly
                set_cuda_graphs(False)
                graphs = False
                msg = f"GPTQ: CUDA graph capture failed ({exc}); the column loop runs eagerly from now on"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                log.warning(msg)
        if Err1 is None:
            W1 = W[:, i1:i2].clone()
            Err1 = _lazy_batch(W1, Hinv[i1:i2, i1:i2], S[:, i1:i2], Z[:, i1:i2], codes[:, i1:i2], maxq, group, True)
        loss += Err1.pow(2).sum(1) / 2  # (w - q)^2 / d^2 / 2 per column, summed once per batch
        W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])
    return codes, loss


def _use_graphs(W: torch.Tensor, group: Optional[_Groups]) -> bool:
    return cuda_graphs_enabled() and W.is_cuda and (group is None or group.capturable)


def _lazy_batch(W1, Hinv1, S1, Z1, C1, maxq, group: Optional[_Groups], check: bool) -> torch.Tensor:
    """One lazy batch of the column loop on ``W1`` ``[rows, B]`` (updated in place); writes the codes
    into ``C1`` (and the group parameters into ``S1``, ``Z1``) and returns the scaled errors.

    Each column gives :func:`~gransearch.quantizer.quantize_codes`'s codes and errors bit for bit,
    with the zeros' integer and fractional parts split once per batch (per group when the loop takes
    the groups) instead of once per column, the codes and errors written into their outputs, and
    the zero's integer part added to the codes once per batch: each column clamps to the bounds less
    it (:func:`_split_zeros` says why that is exact). 9 operations a column instead of 15, each a
    kernel launch on a GPU. Where :data:`FUSED_MULTIPLY_ADDS` says so (on CUDA by default), the
    error's numerator and the rank-one update of the batch's later columns are multiply-adds
    (``addcmul``, ``addr_``): 7 operations, the product no longer rounded before the sum, so a code
    may fall on the other side of a tie than on the CPU, whose codes stay those of the separate
    operations."""
    fused = _fused(W1.device)
    Err1 = torch.zeros_like(W1)
    # round(zero), zero - round(zero), and the codes' bounds less round(zero): -round(zero), maxq - round(zero)
    Zr1, Zf1, Lo1, Hi1 = (torch.empty_like(Z1) for _ in range(4))
    if group is None:
        _split_zeros(Z1, Zr1, Zf1, Lo1, Hi1, maxq)
    for i in range(W1.shape[1]):
        if group is not None and i % group.g == 0:  # batches start at group boundaries
            group.take(W1, i, S1, Z1, maxq, check)
            j = slice(i, i + group.g)
            _split_zeros(Z1[:, j], Zr1[:, j], Zf1[:, j], Lo1[:, j], Hi1[:, j], maxq)
        s, w, d, c = S1[:, i], W1[:, i], Hinv1[i, i], C1[:, i]
        t = torch.addcdiv(Zf1[:, i], w, s)  # w / s + (zero - round(zero)): one operation, the same numbers
        torch.round(t, out=t)
        torch.clamp(t, Lo1[:, i], Hi1[:, i], out=c)  # the code less round(zero), added back once per batch (below)
        q = c - Zf1[:, i]  # code - zero
        if fused:  # w - q s and the rank-one update as multiply-adds
            err = torch.addcmul(w, q, s, value=-1, out=Err1[:, i]).div_(d)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
        else:
            err = torch.div(w - q * s, d, out=Err1[:, i])
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))  # not -=, whose assignment copies the view onto itself
    C1 += Zr1
    return Err1


def _fused(device) -> bool:
    return torch.device(device).type == "cuda" if FUSED_MULTIPLY_ADDS is None else FUSED_MULTIPLY_ADDS


def _split_zeros(Z: torch.Tensor, Zr: torch.Tensor, Zf: torch.Tensor, Lo: torch.Tensor, Hi: torch.Tensor, maxq) -> None:
    """``Zr = round(Z)``, ``Zf = Z - Zr``: the two parts :func:`quantize_codes` adds around its
    rounding; ``Lo = -Zr``, ``Hi = maxq - Zr``: the bounds of a code less ``Zr``. All exact: ``Zf``
    is the difference of two floats at most 0.5 apart (a multiple of the zero's last place, or
    Sterbenz's lemma below 1), the rest are sums of integers, so ``clamp(round(x) + Zr, 0, maxq)`` is
    ``clamp(round(x), Lo, Hi) + Zr`` and ``code - Z`` is ``(code - Zr) - Zf``, bit for bit."""
    torch.round(Z, out=Zr)
    torch.sub(Z, Zr, out=Zf)
    torch.neg(Zr, out=Lo)
    torch.add(Lo, maxq.unsqueeze(1) if isinstance(maxq, torch.Tensor) else maxq, out=Hi)


_CUDA_GRAPHS = os.environ.get("GRANSEARCH_CUDA_GRAPHS", "1") != "0"

# GPTQ's column loop with multiply-adds (see _lazy_batch): None on CUDA only (where each operation is a
# kernel launch or a graph node), True everywhere (to count or compare on the CPU), False nowhere
FUSED_MULTIPLY_ADDS: Optional[bool] = None


def cuda_graphs_enabled() -> bool:
    """Whether GPTQ's lazy batches run as CUDA graphs on a GPU (default; ``GRANSEARCH_CUDA_GRAPHS=0``
    or :func:`set_cuda_graphs` turns it off)."""
    return _CUDA_GRAPHS


def set_cuda_graphs(enabled: bool) -> bool:
    """Turn CUDA graphs for GPTQ on or off; returns the previous setting."""
    global _CUDA_GRAPHS
    old, _CUDA_GRAPHS = _CUDA_GRAPHS, bool(enabled)
    if not enabled:
        _GraphedBatch.cache.clear()
    return old


class _GraphedBatch:
    """One lazy batch of :func:`_lazy_batch` captured as a CUDA graph over static buffers, replayed
    for every batch of the same shape and quantizer (a column loop is 7 small kernels per column:
    launching them one by one from Python is what bounds GPTQ on a GPU). Graphs are kept in a small
    LRU cache keyed by shape, device, quantizer and arithmetic (multiply-adds or not)."""

    cache: "OrderedDict[tuple, _GraphedBatch]" = OrderedDict()
    max_cached = 16

    @classmethod
    def get(cls, rows: int, width: int, maxq, group: Optional[_Groups], device) -> "_GraphedBatch":
        per_row = isinstance(maxq, torch.Tensor)
        key = (rows, width, str(device), per_row, None if per_row else int(maxq), group, _fused(device))
        hit = cls.cache.pop(key, None)
        if hit is None:
            hit = cls(rows, width, per_row, None if per_row else maxq, group, device)
        cls.cache[key] = hit
        while len(cls.cache) > cls.max_cached:
            cls.cache.popitem(last=False)
        return hit

    def __init__(self, rows, width, per_row, maxq, group, device):
        f = dict(device=device, dtype=torch.float32)
        self.W1, self.S1, self.Z1, self.C1 = (torch.zeros(rows, width, **f) for _ in range(4))
        self.H1 = torch.eye(width, **f)
        self.maxq = torch.zeros(rows, **f) if per_row else maxq
        self.group, self.graph, self.err = group, None, None

    def _body(self) -> torch.Tensor:
        return _lazy_batch(self.W1, self.H1, self.S1, self.Z1, self.C1, self.maxq, self.group, False)

    def run(self, W, Hinv, S, Z, codes, maxq, i1: int, i2: int) -> torch.Tensor:
        self.W1.copy_(W[:, i1:i2]), self.H1.copy_(Hinv[i1:i2, i1:i2])
        if self.group is None:
            self.S1.copy_(S[:, i1:i2]), self.Z1.copy_(Z[:, i1:i2])
        if isinstance(maxq, torch.Tensor):
            self.maxq.copy_(maxq)
        if self.graph is None:
            self._capture()  # leaves the buffers as they were: the replay below does the batch
        self.graph.replay()
        codes[:, i1:i2].copy_(self.C1)
        if self.group is not None:
            S[:, i1:i2].copy_(self.S1), Z[:, i1:i2].copy_(self.Z1)
        return self.err

    def _capture(self) -> None:
        saved = [t.clone() for t in (self.W1, self.S1, self.Z1)]
        self._warm_up()
        self.graph, self.err = self._record()
        for t, v in zip((self.W1, self.S1, self.Z1), saved):  # the warm-up ran the batch: undo it
            t.copy_(v)

    def _warm_up(self) -> None:
        """One eager run on a side stream before the capture, as torch's CUDA graph docs ask."""
        dev = self.W1.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self._body()
        torch.cuda.current_stream(dev).wait_stream(side)

    def _record(self):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            err = self._body()
        return graph, err


def _result(codes, scale_cols, zero_cols, spec: QuantSpec, prep: "GPTQPrepared", loss) -> GPTQResult:
    if prep.perm is not None:
        codes = codes[:, torch.argsort(prep.perm.to(codes.device))]
    if spec.granularity.spans_rows:
        scale_cols, zero_cols = scale_cols[:1, :1], zero_cols[:1, :1]
    qw = QuantizedWeight(codes.to(torch.uint8), scale_cols.to(torch.float16), stored_zero(zero_cols, scale_cols, spec), spec)
    return GPTQResult(qw, prep.damp, prep.damp_raised, prep.n_dead, float(loss.sum()))


@dataclass
class GPTQPrepared:
    """What GPTQ needs from the Hessian, independent of the quantizer: shared by candidates."""

    hinv: torch.Tensor  # upper Cholesky factor of the damped inverse Hessian (permuted if act_order)
    perm: Optional[torch.Tensor]
    dead: torch.Tensor
    n_dead: int
    damp: float
    damp_raised: bool
    act_order: bool


@torch.no_grad()
def gptq_prepare(H: torch.Tensor, damp: float = 0.01, act_order: bool = False, max_damp_tries: int = 6, name: Optional[str] = None) -> GPTQPrepared:
    """Dead columns, optional act-order permutation, dampening and the inverse Cholesky factor."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    hinv, used, raised = _inverse_cholesky(H, damp, max_damp_tries, name)
    return GPTQPrepared(hinv, perm, dead, n_dead, used, raised, act_order)
