"""``QuantLinear``: a linear layer whose weight is stored as packed integer codes."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import QuantizedWeight
from .spec import ActSpec, QuantSpec

__all__ = ["QuantLinear", "fake_quant_activation"]


def fake_quant_activation(
    x: torch.Tensor, spec: ActSpec, static_scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Symmetric fake-quantization of activations ``[..., in]``.

    * ``tensor``: one scale ``max|x| / qmax`` over the whole input (or the calibrated one);
    * ``token``: one scale per row (token), dynamic only;
    * ``channel``: one scale per input feature (an ideal reference: integer GEMMs cannot apply it).
    """
    qmax = (1 << (spec.bits - 1)) - 1
    xf = x.float()
    keep = None
    if spec.outlier_threshold is not None:
        keep = xf.abs().reshape(-1, xf.shape[-1]).amax(0) > spec.outlier_threshold  # [in] float columns
        xf = xf.masked_fill(keep, 0.0)
    if spec.dynamic:
        if spec.granularity == "tensor":
            amax = xf.abs().amax()
        elif spec.granularity == "token":
            amax = xf.abs().amax(dim=-1, keepdim=True)
        else:
            amax = xf.abs().reshape(-1, xf.shape[-1]).amax(dim=0)
    else:
        if static_scale is None:
            raise ValueError("static activation quantization needs calibrated scales (act_scale)")
        amax = static_scale.float()
    scale = (amax / qmax).clamp_min(1e-8)
    q = torch.clamp(torch.round(xf / scale), -qmax - 1, qmax) * scale
    if keep is not None:
        q = torch.where(keep, x.float(), q)
    return q.to(x.dtype)


class QuantLinear(nn.Module):
    """A linear layer holding packed codes, float16 scales and packed zeros in its ``state_dict``.

    ``forward(x)`` equals ``F.linear(x, qweight.dequantize(), bias)`` (optionally after activation
    fake-quantization with ``act_spec``). The dequantized weight is cached in a non-persistent
    buffer after the first call (``cache=True``), so repeated evaluation costs one unpack.

    Build one with :meth:`from_float`::

        >>> import torch, gransearch as gs
        >>> lin = torch.nn.Linear(64, 8)
        >>> q = gs.QuantLinear.from_float(lin, gs.rtn(lin.weight, gs.QuantSpec.parse("w4c")))
        >>> q.stored_nbytes() == gs.layer_nbytes((8, 64), gs.QuantSpec.parse("w4c"))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        act_spec: Optional[ActSpec] = None,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.act_spec = act_spec
        self.compute_dtype = dtype
        self.cache = cache
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(0, dtype=torch.float16))
        if not spec.symmetric:
            self.register_buffer("qzeros", torch.empty(0, dtype=torch.float16 if getattr(spec, "float_zero", False) else torch.uint8))
        else:
            self.qzeros = None
        self.register_buffer("act_scale", None)
        self.register_buffer("g_idx", None)  # groups in activation order: each input column's group (QuantizedWeight.g_idx)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._w_cache: Optional[torch.Tensor] = None
        # LLM.int8()-style decomposition counters: columns kept in float / columns seen
        self.outlier_columns = 0
        self.seen_columns = 0

    def set_act_quant(self, act_spec: Optional[ActSpec], act_scale: Optional[torch.Tensor] = None) -> None:
        """Enable (or, with ``None``, disable) activation fake-quantization on this layer.

        ``act_scale``: calibrated ``max|x|`` for static specs (scalar for ``tensor``, ``[in]`` for
        ``channel``).
        """
        if act_spec is not None and not act_spec.dynamic and act_scale is None:
            raise ValueError("a static ActSpec needs act_scale (the calibrated max|x|)")
        self.act_spec = act_spec
        self.act_scale = None if act_scale is None else act_scale.detach().float().to(self.qweight.device)
        self.outlier_columns = self.seen_columns = 0

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        qweight: QuantizedWeight,
        act_spec: Optional[ActSpec] = None,
        cache: bool = True,
    ) -> "QuantLinear":
        """Wrap ``linear``'s bias (kept as is) and the quantized weight's packed buffers."""
        out_f, in_f = qweight.shape
        if (out_f, in_f) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"quantized weight of shape {(out_f, in_f)} does not fit the linear layer "
                f"[{linear.out_features}, {linear.in_features}]"
            )
        dtype = linear.weight.dtype
        m = cls(in_f, out_f, qweight.spec, bias=linear.bias is not None, dtype=dtype, act_spec=act_spec, cache=cache)
        dev = linear.weight.device
        for k, v in qweight.packed().items():
            setattr(m, k, v.to(dev))
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def quantized_weight(self) -> QuantizedWeight:
        bufs = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            bufs["qzeros"] = self.qzeros
        if self.g_idx is not None:
            bufs["g_idx"] = self.g_idx
        return QuantizedWeight.from_packed(bufs, self.spec, (self.out_features, self.in_features))

    def dequantized_weight(self) -> torch.Tensor:
        if self._w_cache is not None:
            return self._w_cache
        w = self.quantized_weight().dequantize(self.compute_dtype)
        if self.cache:
            self._w_cache = w
        return w

    def stored_nbytes(self) -> int:
        """Bytes of the packed weight buffers (codes, scales, zeros, a ``g_idx``); the bias is not counted."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros, self.g_idx) if t is not None)

    def _apply(self, fn, *args, **kwargs):  # keep the cache consistent with .to()/.cuda()
        self._w_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # packed buffers have data-dependent sizes: adopt the incoming shapes
        for name in ("qweight", "scales", "qzeros", "act_scale", "g_idx"):
            key = prefix + name
            if key in state_dict and (getattr(self, name, None) is not None or name in ("act_scale", "g_idx")):
                setattr(self, name, torch.empty_like(state_dict[key]))
        self._w_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            if self.act_spec.outlier_threshold is not None:
                cols = x.abs().reshape(-1, x.shape[-1]).amax(0) > self.act_spec.outlier_threshold
                self.outlier_columns += int(cols.sum())
                self.seen_columns += cols.numel()
            x = fake_quant_activation(x, self.act_spec, self.act_scale)
        w = self.dequantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        act = f", act={self.act_spec}" if self.act_spec is not None else ""
        order = ", g_idx (groups in activation order)" if self.g_idx is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}{order}{act}"
