"""Pure tensor functions: quantization parameters, integer codes, dequantization, bit packing.

Conventions (fixed, because the byte accounting in :mod:`gransearch.cost` depends on them):

* Codes are unsigned integers in ``[0, 2**bits - 1]``; ``w ~= (code - zero) * scale``.
* Asymmetric: the block range ``[min(w, 0), max(w, 0)]`` (zero always representable, as in the
  GPTQ reference quantizer) is mapped onto the codes; ``zero`` is an integer code stored packed at
  ``bits`` bits.
* Float offset (``float_zero`` specs, llama.cpp's ``Q4_1``/``Q5_1``): the block range ``[min(w),
  max(w)]`` (zero need not be in it) is mapped onto the codes and ``min`` is stored in float16:
  ``w ~= code * scale + min``. Internally ``zero = -min / scale`` (a float), so the formula above
  holds and every algorithm runs unchanged; the stored weight dequantizes as ``code * scale + min``.
* Symmetric: ``scale = 2 * max|w| / (2**bits - 1)`` and the implied ``zero = 2**(bits-1)``; no
  zeros are stored. Because there is one more negative level than positive ones, ``+max|w|``
  lands half a step above the top level (error exactly ``scale / 2``), as in GPTQ. ``-max|w|``
  lands half a step from both -7 and -8 steps: the scale, rounded up to float16, puts it on -7,
  where GPTQ's reference and llm-compressor's float32 scales round it to -8 (half to even). The
  error's size is the same; docs/quantization.md measures what its sign costs.
* Scales are stored in float16; every function here rounds them to float16 *before* computing
  codes, so the stored parameters reproduce the computed dequantization bit for bit.
* Packing: element ``i`` of a flattened code tensor occupies bits ``[i*b, (i+1)*b)`` of a
  little-endian bit stream (least significant bit first). For 8 bits that is one code per byte,
  for 4 bits two per byte (low nibble first), for 2 bits four per byte; 3, 5, 6 and 7 bits are
  dense streams that cross byte boundaries. ``n`` codes take ``ceil(n * b / 8)`` bytes.

Shapes: a weight is ``[out, in]``; quantization parameters are ``[out, n_groups_per_row]``, and
``[1, 1]`` for per-tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .spec import QuantSpec

__all__ = [
    "QuantizedWeight",
    "group_index",
    "check_weight",
    "block_view",
    "qparams",
    "quantize_codes",
    "dequantize_codes",
    "rtn_values",
    "fake_quant",
    "search_clip_ratio",
    "block_clip_ratios",
    "pack_codes",
    "unpack_codes",
    "DEFAULT_CLIP_GRID",
]

_FP16_MAX = torch.finfo(torch.float16).max
# Smallest positive float16 (a subnormal): the floor of every stored scale.
_FP16_TINY = 2.0**-24
# Shrink ratios tried by the clip search: 1.00, 0.99, ..., 0.50 (AWQ searches down to 0.5 too).
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(51))

ClipArg = Union[None, float, str]


def _shape_text(shape, name: Optional[str]) -> str:
    where = f" ({name})" if name else ""
    return f"weight of shape {tuple(shape)}{where}"


def check_weight(weight: torch.Tensor, spec: QuantSpec, name: Optional[str] = None) -> None:
    """Validate a weight for ``spec``: 2-D, finite, and divisible into the spec's groups."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"{_shape_text(weight.shape, name)} is not 2-D [out, in]; "
            "reshape it (or transpose a Conv1D weight) before quantizing"
        )
    try:
        spec.check_shape(tuple(weight.shape))
    except ValueError as exc:
        if name:
            raise ValueError(f"{name}: {exc}") from None
        raise
    if not weight.is_floating_point():
        raise ValueError(f"{_shape_text(weight.shape, name)} has dtype {weight.dtype}, not float")
    if not bool(torch.isfinite(weight).all()):
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int(torch.isinf(weight).sum())
        raise ValueError(
            f"{_shape_text(weight.shape, name)} contains {n_nan} NaN and {n_inf} Inf values; "
            "quantization needs finite weights: check the checkpoint or the preceding fold"
        )


def block_view(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``[out, in]`` -> ``[n_blocks, block_size]``: each row shares one scale and zero."""
    return spec.granularity.block_view(weight)


def _params_shape(shape: tuple[int, int], spec: QuantSpec) -> tuple[int, int]:
    return spec.granularity.params_shape(*shape)


def _round_up_fp16(scale: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales *up* to float16-representable values (returned as float32).

    Rounding up keeps the whole unclipped range representable, so that without clipping every
    element is within half a step of its level.
    """
    s16 = scale.to(torch.float16)
    low = s16.float() < scale  # no test of low.any(): that read would wait for a GPU (and break a CUDA graph)
    s16 = torch.where(low, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    return s16.float().clamp_min(_FP16_TINY)


def qparams(
    x: torch.Tensor, bits: int, symmetric: bool, ratio: Union[float, torch.Tensor] = 1.0, float_zero: bool = False,
    check: bool = True, row_maxq: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``x`` ``[R, C]`` (reduction over the last dimension).

    ``ratio`` (scalar or ``[R, 1]``) shrinks the range before the scale is taken (clipping).
    Returns float32 tensors ``[R, 1]``: ``scale`` holds float16-exact values, ``zero`` integers
    (``float_zero``: ``-min / scale`` with ``min`` float16-exact; see the module docstring).
    ``check=False`` skips the float16-range check (a host sync); the caller must then apply
    :func:`check_params` to the parameters it keeps. ``row_maxq`` (float ``[R, 1]``: each row's
    largest code ``2**bits - 1``) replaces ``bits`` row by row: rows of several bit widths in one
    call, each row's numbers those of its own width (GPTQ solves specs that differ only in bits as
    one stack).
    """
    maxq = (1 << bits) - 1
    if row_maxq is not None:
        if tuple(row_maxq.shape) != (x.shape[0], 1):
            raise ValueError(f"row_maxq must hold each row's largest code as a [{x.shape[0]}, 1] tensor, got shape {tuple(row_maxq.shape)}")
        maxq = row_maxq
    x = x.float()
    if float_zero:
        return _float_offset_params(x, maxq, ratio, check)
    zeros_r = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(dim=-1, keepdim=True), zeros_r)
    xmax = torch.maximum(x.amax(dim=-1, keepdim=True), zeros_r)
    if symmetric:
        amax = torch.maximum(-xmin, xmax) * ratio
        scale = 2.0 * amax / maxq
    else:
        xmin = xmin * ratio
        xmax = xmax * ratio
        scale = (xmax - xmin) / maxq
    # An all-zero block has no range: any positive scale represents it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _round_up_fp16(scale)
    if check:
        check_params(scale)
    if isinstance(maxq, torch.Tensor):  # per row: the same values as the scalar forms below
        half = (maxq + 1) * 0.5  # 2**(bits - 1), exact
        zero = half.expand_as(scale).clone() if symmetric else torch.minimum(torch.round(-xmin / scale).clamp_min(0), maxq)
    elif symmetric:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _float_offset_params(x: torch.Tensor, maxq: Union[int, torch.Tensor], ratio, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``float_zero`` parameters: the range ``[min, max]`` shrunk by ``ratio``, ``min`` rounded to
    float16 (as stored), the scale rounded up so that ``min + maxq * scale`` still reaches ``max``."""
    xmin = x.amin(dim=-1, keepdim=True) * ratio
    xmax = x.amax(dim=-1, keepdim=True) * ratio
    m = xmin.to(torch.float16).float()
    scale = (xmax - m) / maxq
    scale = _round_up_fp16(torch.where(scale > 0, scale, torch.ones_like(scale)))
    zero = -m / scale
    if check:
        check_params(scale, zero)
    return scale, zero


def check_params(scale: torch.Tensor, zero: Optional[torch.Tensor] = None) -> None:
    """Raise when a scale (or a float zero, hence its float16 offset) is not finite: the weight
    holds values beyond the float16 range its parameters are stored in."""
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"a quantization scale exceeds the float16 range ({_FP16_MAX:g}): "
                         "the weight has values too large to store with float16 scales")
    if zero is not None and not bool(torch.isfinite(zero).all()):
        raise ValueError(f"a quantization offset exceeds the float16 range ({_FP16_MAX:g}): "
                         "the weight has values too large to store with float16 parameters")


def stored_zero(zero: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> Optional[torch.Tensor]:
    """What a :class:`QuantizedWeight` stores for the internal ``zero`` of ``spec`` (same shape as
    ``scale``): nothing (symmetric), uint8 codes, or the float16 offset ``min = -zero * scale``."""
    if spec.symmetric:
        return None
    if getattr(spec, "float_zero", False):
        return (-zero.float() * scale.float()).to(torch.float16)
    return zero.to(torch.uint8)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float32) of ``x`` with broadcastable ``scale`` and ``zero``:
    ``round(x / scale + zero)``. The zero's integer part is added after rounding, so an integer zero
    gives ``round(x / scale) + zero`` bit for bit (ties included) and a float one (``float_zero``)
    rounds with its fraction."""
    zr = torch.round(zero)
    # one new tensor, rounded, shifted and clamped in place: ``addcdiv`` is ``(zero - zr) + 1 * x / scale``, the same
    # float32 operations as ``x / scale + (zero - zr)``
    return torch.addcdiv(zero - zr, x.float(), scale).round_().add_(zr).clamp_(0, maxq)


def _shifted_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantize_codes(x, scale, zero, maxq) - round(zero), round(zero))``, the first in three passes over
    ``x``: the rounded value clamped to ``[-round(zero), maxq - round(zero)]`` instead of shifted, clamped and
    shifted back. Exact: the values and bounds are integers far below 2**24."""
    zr = torch.round(zero)
    return torch.addcdiv(zero - zr, x.float(), scale).round_().clamp_(-zr, maxq - zr), zr


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` in float32."""
    return (codes.float() - zero) * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, integer_zero: bool = False) -> torch.Tensor:
    """Quantize then dequantize (float32): the values of ``dequantize_codes(quantize_codes(x, ...), scale,
    zero)`` (``torch.equal``; a zero may carry the other sign), in six passes over ``x`` instead of seven,
    any zero. ``integer_zero=True`` promises an integer ``zero`` (what :func:`qparams` gives unless
    ``float_zero``): ``code - zero`` is then the shifted code itself, four passes (for searches that only
    measure a rounding's error)."""
    c, zr = _shifted_codes(x, scale, zero, maxq)
    return c.mul_(scale) if integer_zero else c.add_(zr).sub_(zero).mul_(scale)


def rtn_values(weight: torch.Tensor, spec: QuantSpec, ratio: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """The values of ``rtn(weight, spec, clip=ratio, check=False).dequantize()`` (``torch.equal``; a zero
    may carry the other sign), without its uint8 codes and float16 parameters: the float ``[out, in]``
    weight a round-to-nearest gives, in six passes over the weight instead of eleven (AWQ's scale
    search rounds every grid point's scaled weights only to measure the error). Unchecked: a weight
    that is not finite gives values that are not finite."""
    blocks = block_view(weight.float(), spec)
    scale, zero = qparams(blocks, spec.bits, spec.symmetric, ratio, spec.float_zero, check=False)
    c, zr = _shifted_codes(blocks, scale, zero, spec.maxq)
    if spec.float_zero:  # QuantizedWeight.dequantize: code * scale + the float16 offset it stores
        out = c.add_(zr).mul_(scale).add_(stored_zero(zero, scale, spec).float())
    else:  # (code - zero) * scale, with zero an integer: the shifted code times the scale
        out = c.mul_(scale)
    return out.reshape(weight.shape)


def search_clip_ratio(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
    norm: float = 2.4,
    float_zero: bool = False,
) -> torch.Tensor:
    """Per-row shrink ratio ``[R, 1]`` minimising ``sum |x - fake_quant(x)|**norm`` over ``grid``.

    This is the weight-space grid search of the GPTQ reference quantizer (``mse=True``, norm 2.4).
    Ratio 1.0 should be in ``grid`` so the search is never worse than no clipping.
    """
    maxq = (1 << bits) - 1
    x = x.float()
    best_err = torch.full((x.shape[0], 1), float("inf"), device=x.device)
    best_ratio = torch.ones(x.shape[0], 1, device=x.device)
    for r in grid:
        scale, zero = qparams(x, bits, symmetric, r, float_zero)
        err = fake_quant(x, scale, zero, maxq, integer_zero=not float_zero).sub_(x).abs_().pow_(norm).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio


def block_clip_ratios(blocks: torch.Tensor, spec: QuantSpec, clip: ClipArg) -> Union[float, torch.Tensor]:
    """Resolve the ``clip`` argument for ``blocks`` ``[n_blocks, block_size]``.

    ``None`` or ``1.0``: no clipping; a float in ``(0, 1]``: that fixed ratio; ``"search"``: the
    per-block error-minimising ratio from :func:`search_clip_ratio`.
    """
    if clip is None:
        return 1.0
    if isinstance(clip, str):
        if clip != "search":
            raise ValueError(f"clip must be None, a ratio in (0, 1] or 'search', got {clip!r}")
        return search_clip_ratio(blocks, spec.bits, spec.symmetric, float_zero=spec.float_zero)
    ratio = float(clip)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"clip ratio must be in (0, 1], got {clip!r}")
    return ratio


# ----------------------------------------------------------------------------------------------
# bit packing


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in ``[0, 2**bits)``) into a 1-D uint8 bit stream."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can only pack widths 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    nbytes = (n * bits + 7) // 8
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-n) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
        return (flat.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
    # dense bit stream, LSB first: 8 codes fill exactly ``bits`` bytes, so each run of 8 codes is
    # one integer word, cut into its bytes
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=flat.device)
    words = (flat.view(-1, 8).to(torch.int64) << shifts).sum(dim=1)
    byte_shift = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=flat.device)
    return ((words.unsqueeze(1) >> byte_shift) & 0xFF).to(torch.uint8).reshape(-1)[:nbytes]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can only unpack widths 1..8, got {bits}")
    need = (n * bits + 7) // 8
    if packed.numel() < need:
        raise ValueError(f"packed buffer has {packed.numel()} bytes, {n} codes at {bits} bits need {need}")
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed[:n].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:n]
    words = packed[:need]  # runs of ``bits`` bytes, each 8 codes (see pack_codes)
    pad = (-need) % bits
    if pad:
        words = torch.cat([words, words.new_zeros(pad)])
    byte_shift = torch.arange(0, 8 * bits, 8, dtype=torch.int64, device=packed.device)
    words = (words.view(-1, bits).to(torch.int64) << byte_shift).sum(dim=1)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=packed.device)
    return ((words.unsqueeze(1) >> shifts) & mask).to(torch.uint8).reshape(-1)[:n]


# ----------------------------------------------------------------------------------------------
# the quantized weight


def group_index(g_idx: Optional[torch.Tensor], in_f: int, n_groups: int, what: str = "g_idx") -> Optional[torch.Tensor]:
    """A stored per-column group index (GPTQ's ``g_idx``, compressed-tensors' ``weight_g_idx``) as
    :class:`QuantizedWeight` holds it: ``None`` when there is none, when it is in order (group ``j``
    is columns ``[j*size, (j+1)*size)``: gransearch's own layout) or unset (compressed-tensors'
    ``-1``), else the int32 group of each of the ``in_f`` columns, checked to give each of the
    ``n_groups`` groups ``in_f / n_groups`` columns. A ``ValueError`` says what does not fit
    (``what``: the tensor's name in the checkpoint)."""
    if g_idx is None:
        return None
    g = g_idx.to(torch.int64)
    if tuple(g.shape) != (in_f,):
        raise ValueError(f"{what} {tuple(g.shape)} does not fit {in_f} input columns")
    size = in_f // n_groups
    if bool((g == -1).all()) or torch.equal(g, torch.arange(in_f) // size):
        return None
    if bool(((g < 0) | (g >= n_groups)).any()) or bool((torch.bincount(g, minlength=n_groups) != size).any()):
        raise ValueError(f"{what} does not give each of the {n_groups} groups {size} columns (values outside [0, {n_groups}) or "
                         "groups of other sizes), which is not a GPTQ group layout")
    return g.to(torch.int32)


@dataclass
class QuantizedWeight:
    """An integer-quantized ``[out, in]`` weight.

    ``codes``: uint8 ``[out, in]``; ``scale``: float16 ``[out, n_groups_per_row]`` (``[1, 1]``
    per-tensor; a layer read from another tool's checkpoint keeps that file's float dtype); ``zero``: uint8 of the same shape, or ``None`` for symmetric specs, or the float16
    offsets ``min`` for ``float_zero`` specs (``w = code * scale + min``).

    ``g_idx``: ``None`` (gransearch's layout: group ``j`` is the ``j``-th run of ``size`` columns),
    or, for a grouped layer read from a checkpoint whose GPTQ formed its groups in activation order
    (GPTQ's ``desc_act=True``, compressed-tensors' old ``actorder="group"``), the int32 group of each
    input column ``[in]``: a group's columns are scattered along the row, and each group still holds
    ``size`` columns (:func:`group_index`). Such a weight is read and evaluated exactly but has no
    layout in compressed-tensors (since 0.19) or GGUF: their writers refuse it.

    Example::

        >>> import torch, gransearch as gs
        >>> q = gs.rtn(torch.randn(8, 64), gs.QuantSpec.parse("w4g32"))
        >>> q.codes.shape, q.scale.shape, q.nbytes
        (torch.Size([8, 64]), torch.Size([8, 2]), 296)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    spec: QuantSpec
    g_idx: Optional[torch.Tensor] = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def float_zero(self) -> bool:
        return bool(getattr(self.spec, "float_zero", False))

    def zero_float(self) -> torch.Tensor:
        """The zero point in code units (``float_zero``: ``-min / scale``)."""
        if self.zero is None:
            return torch.full(self.scale.shape, float(1 << (self.spec.bits - 1)), device=self.scale.device)
        if self.float_zero:
            return -self.zero.float() / self.scale.float()
        return self.zero.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes represent, ``[out, in]``: ``(code - zero) * scale``, or ``code * scale
        + min`` for ``float_zero`` specs (ggml's arithmetic, so a GGUF reader gets these exact values)."""
        out_f, in_f = self.shape
        if self.g_idx is not None:  # groups scattered along the row: each column takes its group's parameters
            cols = self.g_idx.to(device=self.scale.device, dtype=torch.long)
            z = self.zero_float()[:, cols]
            return ((self.codes.float() - z) * self.scale.float()[:, cols]).to(dtype)
        grouped = self.spec.granularity.grouped
        c = self.codes.view(out_f, in_f // self.spec.granularity.width(in_f), -1).float() if grouped else self.codes.float()

        def per_block(p: torch.Tensor) -> torch.Tensor:  # [out, groups] -> broadcast over each group's columns
            return p.unsqueeze(-1) if grouped else p

        s = per_block(self.scale.float())
        w = c * s + per_block(self.zero.float()) if self.float_zero else (c - per_block(self.zero_float())) * s
        return w.reshape(out_f, in_f).to(dtype)

    def scale_float16(self) -> torch.Tensor:
        """The scales in float16, as gransearch's checkpoints and ggml store them; a layer read from
        another tool's checkpoint keeps its own dtype in memory, and is refused here when float16
        cannot hold its scales exactly (float32 scales), instead of being rounded silently."""
        if self.scale.dtype == torch.float16:
            return self.scale
        s16 = self.scale.to(torch.float16)
        if not torch.equal(s16.to(self.scale.dtype), self.scale):
            raise ValueError(f"this {self.spec} weight has {self.scale.dtype} scales that float16 cannot hold exactly (read from "
                             "another tool's checkpoint?); gransearch writes float16 scales: quantize the float model instead")
        return s16

    def split_rows(self, sizes: Sequence[int]) -> list["QuantizedWeight"]:
        """The weights of consecutive row ranges of ``sizes`` rows each: the parts of a stack of
        weights quantized as one (q/k/v solved together). Per-tensor specs share one scale across
        rows and cannot be split (into more than one part)."""
        if list(sizes) == [self.shape[0]]:
            return [self]
        if self.spec.granularity.spans_rows or sum(sizes) != self.shape[0]:
            raise ValueError(f"cannot split a {self.spec} weight of {self.shape[0]} rows into {list(sizes)} rows")
        out, r0 = [], 0
        for n in sizes:
            rows = slice(r0, r0 + n)
            out.append(QuantizedWeight(self.codes[rows], self.scale[rows], None if self.zero is None else self.zero[rows], self.spec, self.g_idx))
            r0 += n
        return out

    def packed(self) -> dict[str, torch.Tensor]:
        """The stored buffers: ``qweight`` (packed codes), ``scales``, if asymmetric ``qzeros`` and,
        for groups in activation order, ``g_idx``."""
        out = {"qweight": pack_codes(self.codes, self.spec.bits), "scales": self.scale.contiguous()}
        if self.zero is not None:  # float offsets are kept as they are (float16)
            out["qzeros"] = self.zero.contiguous() if self.float_zero else pack_codes(self.zero, self.spec.bits)
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx.to(torch.int32).contiguous()
        return out

    @classmethod
    def from_packed(
        cls, buffers: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]
    ) -> "QuantizedWeight":
        """The weight stored in ``buffers``; a ggml type's blocks come back as a
        :class:`~gransearch.export.gguf.GGMLWeight`."""
        if getattr(spec, "is_ggml", False):
            from .export.gguf import GGMLWeight

            return GGMLWeight.from_packed(buffers, spec, shape)
        out_f, in_f = shape
        codes = unpack_codes(buffers["qweight"], spec.bits, out_f * in_f).view(out_f, in_f)
        scale = buffers["scales"]  # float16, or as another tool's checkpoint stored them (load_quantized)
        zero = None
        if getattr(spec, "float_zero", False):
            zero = buffers["qzeros"].to(torch.float16).view(scale.shape)
        elif not spec.symmetric:
            zero = unpack_codes(buffers["qzeros"], spec.bits, scale.numel()).view(scale.shape)
        return cls(codes, scale, zero, spec, buffers.get("g_idx"))

    @property
    def nbytes(self) -> int:
        """Bytes as stored (packed codes + float16 scales + packed zeros, + the int32 ``g_idx``)."""
        from .cost import layer_nbytes

        return layer_nbytes(self.shape, self.spec) + (4 * self.shape[1] if self.g_idx is not None else 0)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(
            self.codes.to(device),
            self.scale.to(device),
            None if self.zero is None else self.zero.to(device),
            self.spec,
            None if self.g_idx is None else self.g_idx.to(device),
        )


def quantize_with_params(
    weight: torch.Tensor, spec: QuantSpec, scale_blocks: torch.Tensor, zero_blocks: torch.Tensor
) -> QuantizedWeight:
    """Build a :class:`QuantizedWeight` from per-block parameters ``[n_blocks, 1]``."""
    blocks = block_view(weight.float(), spec)
    codes = quantize_codes(blocks, scale_blocks, zero_blocks, spec.maxq)
    pshape = _params_shape(tuple(weight.shape), spec)
    scale = scale_blocks.reshape(pshape).to(torch.float16)
    zero = stored_zero(zero_blocks.reshape(pshape), scale_blocks.reshape(pshape), spec)
    return QuantizedWeight(codes.reshape(weight.shape).to(torch.uint8), scale, zero, spec)
