"""The per-layer step, written once: a method's rounding of one weight given its Hessian.

Sequential quantization (:func:`gransearch.quantize`) and the candidate bank
(:func:`gransearch.bank.build_bank`) both end each layer here. AWQ's part of ``awq`` and
``awq+gptq`` -- scaling the weight's input channels and clipping it -- happens before: this step
receives the scaled, clipped weight ``W`` and the Hessian of the scaled inputs ``H``, and rounds
with RTN (``rtn``, ``awq``) or GPTQ (``gptq``, ``awq+gptq``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..quantizer import ClipArg, QuantizedWeight
from ..methods import GPTQOptions, Method
from ..spec import QuantSpec
from .gptq import gptq
from .rtn import rtn

__all__ = ["GPTQOptions", "LayerResult", "quantize_layer", "quantize_shared_input", "uses_gptq"]


def uses_gptq(method) -> bool:
    """Whether ``method`` rounds with GPTQ (and so needs the layer's Hessian)."""
    return Method.parse(method).uses_gptq


@dataclass
class LayerResult:
    qweight: QuantizedWeight
    damp: Optional[float] = None  # the dampening GPTQ ended with (raised if a Cholesky failed)


def quantize_layer(W: torch.Tensor, H: Optional[torch.Tensor], method: str, spec: QuantSpec, options: GPTQOptions = GPTQOptions(),
                   clip: ClipArg = None, name: Optional[str] = None, imatrix: Optional[torch.Tensor] = None) -> LayerResult:
    """Round ``W`` ``[out, in]`` with ``method``'s rounding; ``H`` ``[in, in]`` is needed by GPTQ.

    ``llamacpp`` weights llama.cpp's quantizer by ``imatrix`` (the mean ``x_j^2`` per input column)
    when given, else by ``diag(H) / 2`` (the same quantity), and runs unweighted without either.

    ``clip`` (a ratio or ``"search"``) applies to plain ``rtn`` and ``gptq`` only: the AWQ methods
    have clipped ``W`` already, in output space.

        >>> import torch, gransearch as gs
        >>> from gransearch.algorithms.layer import quantize_layer
        >>> w = torch.randn(8, 32)
        >>> a = quantize_layer(w, torch.eye(32), "gptq", gs.QuantSpec.parse("w4c")).qweight
        >>> torch.equal(a.codes, gs.rtn(w, gs.QuantSpec.parse("w4c")).codes)   # identity Hessian: GPTQ is RTN
        True
    """
    method = Method.parse(method)
    if method is Method.LLAMACPP:
        from ..llamacpp import quantize_weight

        if imatrix is None and H is not None:
            imatrix = torch.diagonal(H) / 2  # mean x_j^2: llama.cpp's importance matrix
        return LayerResult(quantize_weight(W, spec, imatrix, name=name))
    if method.uses_gptq:
        if H is None:
            raise ValueError(f"{name or 'this layer'}: {method} needs the layer's Hessian")
        r = gptq(W, H, spec, damp=options.damp, block_size=options.block_size, act_order=options.act_order,
                 static_groups=options.static_groups, clip=clip if method is Method.GPTQ else None, name=name)
        return LayerResult(r.qweight, r.damp)
    return LayerResult(rtn(W, spec, clip=clip if method is Method.RTN else None, name=name))


def quantize_shared_input(Ws: Sequence[torch.Tensor], H: torch.Tensor, method: str, spec: QuantSpec,
                          options: GPTQOptions = GPTQOptions(), names: Sequence[str] = ()) -> list[LayerResult]:
    """GPTQ rounding of several weights that read the same input (q/k/v, gate/up) as one solve over
    their stacked rows, split back per weight.

    GPTQ treats rows independently given the shared inverse-Hessian factor, so this is the row by
    row arithmetic of :func:`quantize_layer` for each weight with a third of the column loops.
    Floating-point libraries may choose other kernels for the taller matrix, so codes can differ
    from separate solves where a value sits on a rounding tie: quantization uses this on GPUs only,
    where the column loop's launches dominate. Per-tensor specs (one scale over the whole weight)
    cannot be stacked and are refused.
    """
    method = Method.parse(method)
    if not method.uses_gptq or spec.granularity.spans_rows:
        raise ValueError(f"only GPTQ rounding with per-row parameters can be stacked, not {method} {spec}")
    r = gptq(torch.cat(list(Ws)), H, spec, damp=options.damp, block_size=options.block_size, act_order=options.act_order,
             static_groups=options.static_groups, name="+".join(names) or None)
    return [LayerResult(q, r.damp) for q in r.qweight.split_rows([W.shape[0] for W in Ws])]
