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
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..quantizer import ClipArg, QuantizedWeight, block_clip_ratios, block_view, check_weight, qparams, quantize_codes
from ..spec import PerChannel, PerGroup, PerTensor, QuantSpec

log = logging.getLogger(__name__)

__all__ = ["gptq", "gptq_prepare", "GPTQPrepared", "GPTQResult", "CholeskyError"]


class CholeskyError(ValueError):
    """The damped Hessian stayed indefinite after every dampening increase."""


@dataclass
class GPTQResult:
    qweight: QuantizedWeight
    damp: float  # the relative dampening finally used
    damp_raised: bool  # True when the Cholesky needed more than the requested dampening
    n_dead: int  # input columns with a zero Hessian diagonal
    loss: float  # the reference code's error estimate, sum((w - q)^2 / d^2) / 2


def _inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int, name: Optional[str]) -> tuple[torch.Tensor, float, bool]:
    diag_mean = float(torch.mean(torch.diag(H)))
    idx = torch.arange(H.shape[0], device=H.device)
    rel = damp
    for attempt in range(max_tries + 1):
        Hd = H.clone()
        Hd[idx, idx] += rel * diag_mean
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if attempt:
                    msg = f"GPTQ{' ' + name if name else ''}: Cholesky failed at dampening {damp:g}; succeeded at {rel:g}"
                    warnings.warn(msg, RuntimeWarning, stacklevel=3)
                    log.warning(msg)
                return U, rel, attempt > 0
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
    out_f, in_f = W.shape
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match weight {tuple(W.shape)}{' (' + name + ')' if name else ''}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"the Hessian{' of ' + name if name else ''} contains NaN or Inf: check the calibration activations")
    dev = W.device
    W = W.detach().float().clone()
    gran = spec.granularity
    maxq = spec.maxq

    prep = prepared if prepared is not None else gptq_prepare(H.to(dev), damp=damp, act_order=act_order, max_damp_tries=max_damp_tries, name=name)
    if prep.act_order != act_order:
        raise ValueError("the prepared GPTQ factorisation was made with a different act_order")
    if prep.n_dead:
        W[:, prep.dead] = 0.0

    # parameters fixed up front: per-tensor, per-channel, static groups
    grouped = isinstance(gran, PerGroup)
    use_static = grouped and (static_groups or act_order)
    if act_order and grouped and not static_groups:
        log.info("GPTQ%s: act_order with groups uses static groups (contiguous group storage)", " " + name if name else "")
    g = gran.size if grouped else in_f
    n_groups = in_f // g
    scale_cols = torch.empty(out_f, n_groups, device=dev)
    zero_cols = torch.empty(out_f, n_groups, device=dev)
    if isinstance(gran, PerTensor):
        blocks = block_view(W, spec)
        s, z = qparams(blocks, spec.bits, spec.symmetric, block_clip_ratios(blocks, spec, clip))
        scale_cols.fill_(float(s)), zero_cols.fill_(float(z))
    elif isinstance(gran, PerChannel) or use_static:
        blocks = block_view(W, spec)  # [out * n_groups, g]
        s, z = qparams(blocks, spec.bits, spec.symmetric, block_clip_ratios(blocks, spec, clip))
        scale_cols.copy_(s.view(out_f, n_groups)), zero_cols.copy_(z.view(out_f, n_groups))
    params_known = not grouped or use_static
    if not params_known:
        # a lazy batch must hold whole groups, so each group's parameters see all earlier updates
        block_size = max(g, (block_size // g) * g)

    perm = prep.perm
    if perm is not None:
        W = W[:, perm]
    Hinv = prep.hinv.to(dev)

    codes = torch.zeros(out_f, in_f, device=dev)
    loss = torch.zeros(out_f, device=dev)
    # natural group of each (permuted) column, as Python ints: no device sync inside the loop
    col_group = ((perm.cpu() if perm is not None else torch.arange(in_f)) // g).tolist()

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if not params_known and col % g == 0:
                # parameters of the group starting here, from the partially updated weights
                blk = W1[:, i : i + g]
                ratio = block_clip_ratios(blk, spec, clip)
                s, z = qparams(blk, spec.bits, spec.symmetric, ratio)
                scale_cols[:, col // g] = s.squeeze(1)
                zero_cols[:, col // g] = z.squeeze(1)
            grp = col_group[col]
            s = scale_cols[:, grp]
            z = zero_cols[:, grp]
            w = W1[:, i]
            d = Hinv1[i, i]
            c = quantize_codes(w, s, z, maxq)
            q = (c - z) * s
            codes[:, col] = c
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        loss += Err1.pow(2).sum(1) / 2  # (w - q)^2 / d^2 / 2 per column, summed once per batch
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
    if isinstance(gran, PerTensor):
        scale_t, zero_t = scale_cols[:1, :1], zero_cols[:1, :1]
    else:
        scale_t, zero_t = scale_cols, zero_cols
    qw = QuantizedWeight(
        codes.to(torch.uint8),
        scale_t.to(torch.float16),
        None if spec.symmetric else zero_t.to(torch.uint8),
        spec,
    )
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
