"""Scale folds that leave a model's function unchanged (AWQ, SmoothQuant).

For a scaling group (see :mod:`gransearch.arch`), the output channel ``c`` of the preceding module
is divided by ``s[c]`` and the input column ``c`` of every following linear multiplied by ``s[c]``.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import linear_weight

__all__ = ["fold_scales", "scale_input_columns"]


@torch.no_grad()
def scale_input_columns(m: nn.Module, s: torch.Tensor) -> None:
    linear_weight(m).mul_(s.to(m.weight.dtype).to(m.weight.device).unsqueeze(0))


@torch.no_grad()
def fold_scales(prev: nn.Module, norm: str | None, linears: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the ``linears``' inputs by ``s``.

    ``norm``: ``"rms"`` (``x * w``), ``"gemma"`` (``x * (1 + w)``), ``"ln"`` (``x * w + b``) or
    ``None`` when ``prev`` is a linear layer (Linear or Conv1D) whose outputs feed the linears.
    """
    s = s.float()
    dev, dt = prev.weight.device, prev.weight.dtype
    sd = s.to(dev)
    if norm == "gemma":
        prev.weight.copy_(((1.0 + prev.weight.float()) / sd - 1.0).to(dt))
    elif norm in ("rms", "ln"):
        prev.weight.copy_((prev.weight.float() / sd).to(dt))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / sd).to(dt))
    elif norm is None:
        w = linear_weight(prev)  # [out, in]: divide its output rows
        w.copy_((w.float() / sd.unsqueeze(1)).to(dt))
        if prev.bias is not None:
            prev.bias.copy_((prev.bias.float() / sd).to(dt))
    else:
        raise ValueError(f"unknown norm kind {norm!r}")
    for lin in linears:
        scale_input_columns(lin, s)
