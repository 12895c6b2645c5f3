"""Exact storage cost of quantized layers.

The storage format is fixed in :mod:`gransearch.quantizer`. A weight ``[out, in]`` at ``b`` bits
with blocks of ``g`` weights (``n = out*in/g`` blocks) costs exactly::

    ceil(out*in*b/8)          bytes of packed codes
  + n * 2                     bytes of float16 scales
  + ceil(n*b/8)               bytes of packed zeros (asymmetric specs only)
  + n * 2                     bytes of float16 offsets instead (``float_zero`` specs)

Per-channel is ``g = in`` (``n = out``); per-tensor is one block (``n = 1``).

``format="compressed-tensors"`` counts what that checkpoint stores instead
(:mod:`gransearch.export.compressed_tensors`): codes packed densely into int32 words per row
(``out * ceil(in*b/32) * 4``), float16 scales, zero points packed into int32 words along the output
dimension (``ceil(out*b/32) * groups * 4``, asymmetric only) and the int64 ``weight_shape`` (16).

``format="gguf"`` counts llama.cpp's block bytes (:mod:`gransearch.export.gguf`): ``w4g32s`` is
``Q4_0`` (18 bytes per 32 weights), ``w5g32s`` ``Q5_0`` (22), ``w8g32s`` ``Q8_0`` (34), ``w4g32f``
``Q4_1`` (20) and ``w5g32f`` ``Q5_1`` (24).

    >>> from gransearch import QuantSpec, layer_nbytes
    >>> layer_nbytes((4096, 4096), QuantSpec.parse("w4g128"))
    8716288
"""

from __future__ import annotations

import math

from .spec import QuantSpec

__all__ = ["layer_nbytes", "layer_n_blocks", "bits_per_weight", "FORMATS"]

FORMATS = ("gransearch", "compressed-tensors", "gguf")


def layer_n_blocks(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Number of blocks that each carry one scale (and one zero)."""
    spec.check_shape(tuple(shape))
    out_f, in_f = shape
    return spec.granularity.n_groups(out_f, in_f)


def layer_nbytes(shape: tuple[int, int], spec: QuantSpec, format: str = "gransearch") -> int:
    """Bytes that a ``[out, in]`` weight quantized with ``spec`` occupies as stored in ``format`` (no bias)."""
    if getattr(spec, "is_ggml", False):  # a llama.cpp block type is its blocks, whatever holds them
        if format == "compressed-tensors":
            raise ValueError(f"{spec} is a llama.cpp type: it has no compressed-tensors layout")
        return spec.nbytes(tuple(shape))
    out_f, in_f = shape
    n = layer_n_blocks(shape, spec)
    if format == "compressed-tensors":
        if spec.float_zero:
            raise ValueError(f"{spec} has a float offset: compressed-tensors stores integer zero points")
        if spec.granularity.spans_rows:
            raise ValueError(f"per-tensor {spec} has no compressed-tensors layout: use per-channel or groups")
        cols = spec.granularity.params_shape(out_f, in_f)[1]
        zeros = 0 if spec.symmetric else math.ceil(out_f * spec.bits / 32) * cols * 4
        return out_f * math.ceil(in_f * spec.bits / 32) * 4 + 2 * n + zeros + 16
    if format == "gguf":
        from .export.gguf import TYPE_OF_SPEC, ggml_nbytes

        if str(spec) not in TYPE_OF_SPEC:  # K-quants were counted above
            raise ValueError(f"{spec} has no GGUF type: GGUF layers take {', '.join(f'{s} ({t})' for s, t in TYPE_OF_SPEC.items())}")
        return ggml_nbytes(shape, TYPE_OF_SPEC[str(spec)])
    if format != "gransearch":
        raise ValueError(f"unknown storage format {format!r}: use one of {', '.join(FORMATS)}")
    codes = math.ceil(out_f * in_f * spec.bits / 8)
    scales = 2 * n
    zeros = 0 if spec.symmetric else 2 * n if spec.float_zero else math.ceil(n * spec.bits / 8)
    return codes + scales + zeros


def bits_per_weight(shape: tuple[int, int], spec: QuantSpec) -> float:
    """Stored bits per weight, scales and zeros included."""
    return 8.0 * layer_nbytes(shape, spec) / (shape[0] * shape[1])
