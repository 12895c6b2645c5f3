"""Round-to-nearest (RTN) weight quantization."""

from __future__ import annotations

from typing import Optional

import torch

from ..quantizer import ClipArg, QuantizedWeight, block_clip_ratios, block_view, check_weight, qparams, quantize_with_params
from ..spec import QuantSpec

__all__ = ["rtn"]


def rtn(
    weight: torch.Tensor, spec: QuantSpec, clip: ClipArg = None, *, name: Optional[str] = None, check: bool = True
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` to the nearest level of each block's grid.

    ``clip``: ``None`` (the full range), a fixed shrink ratio in ``(0, 1]``, or ``"search"`` for the
    per-block ratio minimising the weight error (``|w - q|**2.4``, as GPTQ's optional grid).
    ``name`` only labels error messages. ``check=False`` skips the checks that wait for a GPU (a
    finite weight, float16-range scales): for callers that checked the weight already.

    Example -- the error is at most half a step inside the representable range::

        >>> import torch, gransearch as gs
        >>> w = torch.randn(16, 64)
        >>> q = gs.rtn(w, gs.QuantSpec.parse("w4g32"))
        >>> bool(((w - q.dequantize()).abs() <= q.scale.float().repeat_interleave(32, 1) / 2 + 1e-6).all())
        True
    """
    if check:
        check_weight(weight, spec, name)
    blocks = block_view(weight.detach().float(), spec)
    ratio = block_clip_ratios(blocks, spec, clip)
    scale, zero = qparams(blocks, spec.bits, spec.symmetric, ratio, spec.float_zero, check=check)
    return quantize_with_params(weight.detach(), spec, scale, zero)
