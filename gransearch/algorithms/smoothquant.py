"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

For input channel ``j`` of a group of linears fed by one norm,
``s_j = max|X_j|**alpha / max_k max_i |W_k[i, j]|**(1 - alpha)``; the norm's output is divided by
``s`` and the weights' input columns multiplied by ``s`` (a fold, :mod:`gransearch.fold`), which
flattens the activation channels that per-tensor and per-token quantization cannot represent.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["smooth_scales"]


def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5, floor: float = 1e-5) -> torch.Tensor:
    """Per-input-channel smoothing scales ``[in]`` (``alpha`` is the migration strength, 0..1).

    ``act_absmax``: ``[in]`` calibrated ``max|x|``; ``weights``: the group's ``[out_k, in]`` weights.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    w_max = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0).clamp(min=floor)
    a_max = act_absmax.float().to(w_max.device).clamp(min=floor)
    return (a_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=floor)
