"""AWQ: activation-aware weight quantization (Lin et al., 2023), as pure functions of tensors.

Scale search: for a group of linear layers fed by one module, try per-input-channel scales
``s = mean|x|**r`` (normalised by ``sqrt(max(s) * min(s))``) for ``r`` in ``0, 1/n_grid, ...``;
multiply the weights' input columns by ``s``, quantize, divide back, and keep the ``r`` whose
block output error is least. ``r = 0`` gives ``s = 1`` (plain round-to-nearest), so the chosen
scales are never worse than RTN on the search batch. The caller folds ``1/s`` into the preceding
module (:mod:`gransearch.fold`), leaving the model's function unchanged before quantization.

Clip search: per block of the quantizer, the shrink ratio of the weight range (1.0 down to 0.55 in
steps of 0.05, as the reference code) that minimises the error of the block's contribution to the
layer *output* on sampled input tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..quantizer import block_view, check_weight, fake_quant, qparams, rtn_values
from ..spec import QuantSpec
from .rtn import rtn

__all__ = ["awq_scales", "awq_grid_scales", "awq_search", "awq_search_hessian", "awq_search_hessian_specs", "awq_clip_ratios", "clip_ratios_hessian", "apply_clip", "hessian_factor", "AWQSearch"]


def awq_scales(act_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """``mean|x|**ratio``, floored at 1e-4 and normalised so that ``max * min == 1``."""
    s = act_mean.float().pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_grid_scales(act_mean: torch.Tensor, n_grid: int) -> list[torch.Tensor]:
    """The scales of every grid point, ``awq_scales(act_mean, k / n_grid)`` for ``k < n_grid``: they
    depend on the activations alone, so a caller searching several specs computes them once. Each
    point's power is taken as :func:`awq_scales` takes it, the rest for all points at once: the same
    numbers, in a few operations instead of seven per point (each a kernel on a GPU)."""
    a = act_mean.float()
    s = torch.stack([a.pow(k / n_grid) for k in range(n_grid)]).clamp(min=1e-4)
    return list((s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()).unbind(0))


@dataclass
class AWQSearch:
    scales: torch.Tensor  # [in]
    ratio: float
    losses: list[float]  # one per grid point, ratio 0 first


@torch.no_grad()
def awq_search(
    act_mean: torch.Tensor,
    weights: Sequence[torch.Tensor],
    spec: QuantSpec,
    loss_fn: Callable[[list[torch.Tensor]], Union[float, torch.Tensor]],
    n_grid: int = 20,
    grid: Optional[Sequence[torch.Tensor]] = None,
    check: bool = True,
) -> AWQSearch:
    """Grid search of the scaling exponent.

    ``act_mean``: ``[in]`` mean ``|x|`` per input channel; ``weights``: the group's ``[out_k, in]``
    weights; ``loss_fn(candidates)`` returns the output error when the group's weights are replaced
    by ``candidates`` (same shapes, float), as a float or a 0-d tensor. Returns the best scales and
    the loss curve. Tensor losses are read once, after the whole grid: on a GPU the grid then runs
    without waiting for the device at every point. ``grid``: :func:`awq_grid_scales`, if computed.
    """
    scales = _checked_grid(act_mean, weights, spec, n_grid, grid, check)
    losses = []
    for s in scales:
        cands = [rtn_values(w.float() * s, spec) / s for w in weights]
        losses.append(loss_fn(cands))
    if any(isinstance(v, torch.Tensor) for v in losses):
        losses = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=scales[0].device) for v in losses]).tolist()
    return _best_of_grid([float(v) for v in losses], scales, weights, spec, n_grid)


def _checked_grid(act_mean, weights, spec: QuantSpec, n_grid: int, grid, check: bool = True) -> list[torch.Tensor]:
    """The weights checked once (not at every grid point; ``check=False``: not at all, a weight that
    is not finite then gives non-finite losses, which :func:`_best_of_grid` explains), and the grid's
    scales on their device."""
    for w in weights if check else ():
        check_weight(w, spec)
    return [s.to(weights[0].device) for s in (grid if grid is not None else awq_grid_scales(act_mean, n_grid))]


def _best_of_grid(losses: list[float], scales: Sequence[torch.Tensor], weights, spec: QuantSpec, n_grid: int) -> AWQSearch:
    """The first grid point of least loss; a non-finite loss raises what the skipped checks raise
    (a scale beyond float16), if that is why."""
    best = (float("inf"), 0.0, torch.ones_like(scales[0], dtype=torch.float32))
    for k, loss in enumerate(losses):
        if loss < best[0]:  # the first of equal losses, as the loop always chose
            best = (loss, k / n_grid, scales[k])
    for k, loss in enumerate(losses):
        if not math.isfinite(loss):
            for w in weights:
                rtn(w.float() * scales[k], spec)
    return AWQSearch(best[2].clone(), best[1], losses)  # its own tensor: a shared grid's scales serve other searches


GRID_BATCH_BYTES = 2**30  # the stacked grid points' weights one batched step holds (float32, all temporaries)


def _batched_losses(act_mean: torch.Tensor, weights: Sequence[torch.Tensor], spec: QuantSpec,
                    batch_error: Callable[[torch.Tensor], torch.Tensor], n_grid: int,
                    grid: Optional[Sequence[torch.Tensor]] = None, check: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`awq_search`'s losses with the grid points stacked: each step scales, rounds and measures
    as many points as ``GRID_BATCH_BYTES`` holds, in one set of kernels instead of one per point (on
    a GPU, where a layer's search is otherwise a chain of small launches). ``batch_error(d)``: the
    error ``[g]`` of the candidates whose differences from the weight are ``d`` ``[g, out, in]``. The scales and
    rounding are the loop's, element for element; the errors differ from the loop's only in the
    order of float32 sums. Not for specs whose blocks span rows (per-tensor). Returns the losses
    ``[n_grid]`` (float64, on the device: not read) and the grid's scales."""
    scales = _checked_grid(act_mean, weights, spec, n_grid, grid, check)
    dev = weights[0].device
    # the group's weights as one stack of rows: no block crosses a row, and its error is the sum of theirs
    ws = [torch.cat([w.float() for w in weights])] if len(weights) > 1 else [weights[0].float()]
    per_point = 4 * 4 * max(w.numel() for w in ws)  # float32: the scaled weight, its rounding, the difference, one spare
    step = max(1, min(n_grid, GRID_BATCH_BYTES // per_point))
    losses = torch.zeros(n_grid, dtype=torch.float64, device=dev)
    for k0 in range(0, n_grid, step):
        S = torch.stack(scales[k0 : k0 + step])[:, None, :]  # [g, 1, in]
        for w in ws:
            x = (w.unsqueeze(0) * S).reshape(-1, w.shape[1])  # [g * out, in]: blocks never cross rows
            # the difference w - rounding / S in one pass (``addcdiv``: w + (-rounding) / S, the same float32 operations)
            d = torch.addcdiv(w, rtn_values(x, spec).reshape(S.shape[0], *w.shape), S, value=-1)
            losses[k0 : k0 + S.shape[0]] += batch_error(d).double()
    return losses, scales


def _grouped(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` -> ``[out, ng, g]``, ``x`` -> ``[n, ng, g]`` where a block is ``g`` input columns of a row."""
    out_f, in_f = w.shape
    g = spec.granularity.width(in_f)
    return w.reshape(out_f, in_f // g, g), x.reshape(x.shape[0], in_f // g, g)


@torch.no_grad()
def awq_clip_ratios(
    w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5, rows_per_chunk: int = 256
) -> torch.Tensor:
    """Per-block shrink ratios ``[n_blocks, 1]`` minimising the output error on tokens ``x`` ``[n, in]``.

    For a block (``g`` input columns of one output row) the error is the mean over tokens of the
    squared difference of its partial output ``x_g . w_g``; per-tensor sums over every block.
    """
    w = w.float()
    x = x.float().to(w.device)
    out_f = w.shape[0]
    wg, xg = _grouped(w, x, spec)  # [out, ng, g], [n, ng, g]
    ratios = [1.0 - i / n_grid for i in range(int(max_shrink * n_grid))]
    if spec.granularity.spans_rows:
        blocks = block_view(w, spec)
        best_err, best_r = float("inf"), 1.0
        ref = torch.einsum("ogk,ngk->ogn", wg, xg)
        for r in ratios:
            s, z = qparams(blocks, spec.bits, spec.symmetric, r, spec.float_zero)
            q = fake_quant(w, s, z, spec.maxq, integer_zero=not spec.float_zero).reshape(wg.shape)
            err = float(((torch.einsum("ogk,ngk->ogn", q, xg) - ref) ** 2).mean())
            if err < best_err:
                best_err, best_r = err, r
        return torch.full((1, 1), best_r, device=w.device)
    out = []
    for o1 in range(0, out_f, rows_per_chunk):
        wc = wg[o1 : o1 + rows_per_chunk]  # [oc, ng, g]
        ref = torch.einsum("ogk,ngk->ogn", wc, xg)  # [oc, ng, n]
        flat = wc.reshape(-1, wc.shape[-1])  # [oc*ng, g]
        best_err = torch.full(flat.shape[:1], float("inf"), device=w.device)
        best_r = torch.ones(flat.shape[:1], device=w.device)
        for r in ratios:
            s, z = qparams(flat, spec.bits, spec.symmetric, r, spec.float_zero)
            q = fake_quant(flat, s, z, spec.maxq, integer_zero=not spec.float_zero).reshape(wc.shape)
            err = ((torch.einsum("ogk,ngk->ogn", q, xg) - ref) ** 2).mean(-1).reshape(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        out.append(best_r)
    return torch.cat(out).unsqueeze(1)


@torch.no_grad()
def apply_clip(w: torch.Tensor, spec: QuantSpec, ratios: torch.Tensor) -> torch.Tensor:
    """Clamp each block of ``w`` to its shrunk range ``[r * min(w, 0), r * max(w, 0)]`` (``float_zero``
    specs: ``[r * min(w), r * max(w)]``).

    Quantizing the clamped weight without further clipping then uses exactly the clipped scales.
    """
    blocks = block_view(w.float(), spec)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    if not spec.float_zero:  # an integer zero point needs 0 in the range
        zeros = torch.zeros(blocks.shape[0], 1, device=w.device)
        lo, hi = torch.minimum(lo, zeros), torch.maximum(hi, zeros)
    if spec.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    r = ratios.to(w.device)
    return torch.clamp(blocks, lo * r, hi * r).reshape(w.shape).to(w.dtype)


def _hessian_error(d: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr(d H d^T)`` as a float64 0-d tensor (read by the caller when it needs the number)."""
    return ((d @ H) * d).sum().double()


def hessian_factor(H: torch.Tensor, rank: int) -> torch.Tensor:
    """``F`` ``[in, r]`` with ``F F^T`` the best rank-``r`` approximation of the PSD ``H``."""
    evals, evecs = torch.linalg.eigh(H.double())
    top = torch.argsort(evals, descending=True)[:rank]
    return (evecs[:, top] * evals[top].clamp(min=0).sqrt()).float()


@torch.no_grad()
def awq_search_hessian(
    act_mean: torch.Tensor, weights: Sequence[torch.Tensor], H: torch.Tensor, spec: QuantSpec, n_grid: int = 20, rank: int | None = None,
    factor: torch.Tensor | None = None, batch: Optional[bool] = None, grid: Optional[Sequence[torch.Tensor]] = None,
    check: bool = True,
) -> AWQSearch:
    """AWQ's scale search with the group's *linear-output* error ``sum_k tr(dW_k H dW_k^T)``.

    With ``H = 2/n X^T X`` this is exact for the linears' outputs (no activation pass needed); the
    reference measures the error after the attention or MLP block instead. Used by the search bank.
    ``rank``: measure with the top-``rank`` eigen-factor of ``H`` (``||dW F||^2``), much cheaper;
    ``factor``: such a factor computed once by the caller. ``batch``: evaluate the grid points
    stacked (:func:`_batched_losses`; default: on a GPU, where the loop is launch-bound; the CPU
    keeps the loop, whose float32 sums its pinned codes were made with). ``grid``:
    :func:`awq_grid_scales` of ``act_mean``, when the caller searches several specs. ``check=False``:
    the caller has checked the weights (or checks them later); on a GPU each check waits for it.
    """
    return awq_search_hessian_specs(act_mean, weights, H, [spec], n_grid, rank, factor, batch, grid, check)[0]


@torch.no_grad()
def awq_search_hessian_specs(
    act_mean: torch.Tensor, weights: Sequence[torch.Tensor], H: torch.Tensor, specs: Sequence[QuantSpec], n_grid: int = 20,
    rank: int | None = None, factor: torch.Tensor | None = None, batch: Optional[bool] = None,
    grid: Optional[Sequence[torch.Tensor]] = None, check: bool = True,
) -> list[AWQSearch]:
    """:func:`awq_search_hessian` for each of ``specs``, with the same results. Stacked (on a GPU),
    every spec's grid is queued before any loss is read, and the losses are read at once: one wait
    for the device, not one per spec."""
    ws = [w.float() for w in weights]
    if factor is None and rank is not None and rank < H.shape[0]:
        factor = hessian_factor(H, rank)
    if batch is None:
        batch = ws[0].device.type == "cuda"
    if factor is not None:
        F = factor

        def batch_error(d):
            return (d @ F).pow(2).sum((1, 2))

        def loop_loss(cands):
            return sum(((w - c) @ F).pow(2).sum().double() for w, c in zip(ws, cands))
    else:
        Hf = H.float()

        def batch_error(d):
            return ((d @ Hf) * d).sum((1, 2))

        def loop_loss(cands):
            return sum(_hessian_error(w - c, Hf) for w, c in zip(ws, cands))
    out: list[Optional[AWQSearch]] = [None] * len(specs)
    queued = []  # (index, losses on the device, grid scales)
    for k, spec in enumerate(specs):
        if batch and not spec.granularity.spans_rows:
            queued.append((k, *_batched_losses(act_mean, ws, spec, batch_error, n_grid, grid, check)))
        else:
            out[k] = awq_search(act_mean, ws, spec, loop_loss, n_grid, grid, check)
    if queued:
        values = torch.stack([losses for _, losses, _ in queued]).tolist()  # the one read
        for (k, _, scales), v in zip(queued, values):
            out[k] = _best_of_grid(v, scales, ws, specs[k], n_grid)
    return out


@torch.no_grad()
def clip_ratios_hessian(
    w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5, rank: int | None = None,
    factor: torch.Tensor | None = None, batch: Optional[bool] = None,
) -> torch.Tensor:
    """Per-block shrink ratios minimising each block's output error ``d_b H_bb d_b^T`` (all tokens).

    ``rank`` (or a precomputed ``factor``): per-channel and per-tensor errors use the top-``rank``
    eigen-factor of ``H``. ``batch``: try the ratios stacked, as many at once as
    ``GRID_BATCH_BYTES`` holds (default: on a GPU; per-tensor specs always loop). The rounding is
    the loop's element for element; the errors differ only in the order of float32 sums.
    """
    w = w.float()
    H = H.float().to(w.device)
    out_f, in_f = w.shape
    ratios = [1.0 - i / n_grid for i in range(int(max_shrink * n_grid))]
    blocks = block_view(w, spec)
    if batch is None:
        batch = w.device.type == "cuda"
    batch = batch and not spec.granularity.spans_rows
    if spec.granularity.grouped:
        g = spec.granularity.width(in_f)
        ng = in_f // g
        Hb = torch.stack([H[k * g : (k + 1) * g, k * g : (k + 1) * g] for k in range(ng)])  # [ng, g, g]

        def err_of(q):  # q [..., out, in] -> [..., out * ng, 1]
            lead = q.shape[:-2]
            d = (q - w).reshape(-1, ng, g).transpose(0, 1)  # [ng, (...) out, g]
            e = (torch.bmm(d, Hb) * d).sum(-1).transpose(0, 1)  # [(...) out, ng]
            return e.reshape(*lead, -1, 1)
    else:
        F = factor if factor is not None else hessian_factor(H, rank) if rank is not None and rank < in_f else None

        def row_err(q):
            d = q - w
            return (d @ F).pow(2).sum(-1, keepdim=True) if F is not None else ((d @ H) * d).sum(-1, keepdim=True)

        if spec.granularity.spans_rows:
            def err_of(q):
                return row_err(q).sum().reshape(1, 1)
        else:
            err_of = row_err
    best_err = None
    best_r = None
    step = max(1, min(len(ratios), GRID_BATCH_BYTES // (4 * 4 * w.numel()))) if batch else 1
    for k0 in range(0, len(ratios), step):  # shrinking only lowers scales: the caller's quantization checks their range
        rs = ratios[k0 : k0 + step]
        if batch:
            # the ratios made on the device (a tensor copied from the host would wait for the GPU's queue), in float64 as
            # Python computes 1 - i / n_grid, then float32 as torch.tensor(ratios) would round them: the same numbers
            rt = (1.0 - torch.arange(k0, k0 + len(rs), dtype=torch.float64, device=w.device) / n_grid).float()
            r = rt.repeat_interleave(blocks.shape[0]).unsqueeze(1)  # [len(rs) * n_blocks, 1]
            stacked = blocks.repeat(len(rs), 1)
            s, z = qparams(stacked, spec.bits, spec.symmetric, r, spec.float_zero, check=False)
            q = fake_quant(stacked, s, z, spec.maxq, integer_zero=not spec.float_zero).reshape(len(rs), *w.shape)
            E = err_of(q)  # [len(rs), blocks, 1]
            k = E.argmin(0, keepdim=True)  # each block's first least error among these ratios, as the loop keeps it
            errs, rs = [E.gather(0, k)[0]], [rt.to(E.dtype)[k[0]]]
        else:
            s, z = qparams(blocks, spec.bits, spec.symmetric, rs[0], spec.float_zero, check=False)
            errs = [err_of(fake_quant(blocks, s, z, spec.maxq, integer_zero=not spec.float_zero).reshape(w.shape))]
        for ratio, e in zip(rs, errs):  # a ratio, or (stacked) each block's best ratio of the step
            ratio = ratio if isinstance(ratio, torch.Tensor) else torch.full_like(e, ratio)
            if best_err is None:
                best_err, best_r = e, ratio
            else:
                better = e < best_err
                best_err = torch.where(better, e, best_err)
                best_r = torch.where(better, ratio, best_r)
    return best_r
