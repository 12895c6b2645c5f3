"""Scale folds that leave a model's function unchanged (AWQ, SmoothQuant).

For a scaling group (see :mod:`gransearch.arch`), the output channel ``c`` of the preceding module
is divided by ``s[c]`` and the input column ``c`` of every following linear multiplied by ``s[c]``.
"""

from __future__ import annotations

import torch
from torch import nn

from .algorithms.smoothquant import smooth_scales
from .arch import arch_of, get_blocks, get_module, linear_weight

__all__ = ["fold_scales", "scale_input_columns", "smoothquant"]


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


@torch.no_grad()
def smoothquant(model: nn.Module, stats: dict, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into every norm-fed scaling group of ``model`` (in place).

    ``stats``: :func:`gransearch.calibrate` output of the *unsmoothed* model (``abs_max`` per input
    channel). Returns ``{first linear name: scales}``. Linear-to-linear groups are left alone, as
    in the paper. Re-calibrate afterwards if static activation scales are needed.
    """
    info = arch_of(model, allow_generic=False)
    out = {}
    for i, block in enumerate(get_blocks(model, info)):
        for g in info.groups:
            if g.norm is None:
                continue
            names = [f"{info.blocks}.{i}.{l}" for l in g.linears]
            lins = [get_module(block, l) for l in g.linears]
            s = smooth_scales(stats[names[0]].abs_max, [linear_weight(l) for l in lins], alpha)
            fold_scales(get_module(block, g.prev), g.norm, lins, s)
            out[names[0]] = s
    return out
