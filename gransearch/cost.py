"""Exact storage cost of quantized layers.

The storage format is fixed in :mod:`gransearch.quantizer`. A weight ``[out, in]`` at ``b`` bits
with blocks of ``g`` weights (``n = out*in/g`` blocks) costs exactly::

    ceil(out*in*b/8)          bytes of packed codes
  + n * 2                     bytes of float16 scales
  + ceil(n*b/8)               bytes of packed zeros (asymmetric specs only)

Per-channel is ``g = in`` (``n = out``); per-tensor is one block (``n = 1``).

    >>> from gransearch import QuantSpec, layer_nbytes
    >>> layer_nbytes((4096, 4096), QuantSpec.parse("w4g128"))
    8716288
"""

from __future__ import annotations

import math

from .spec import QuantSpec

__all__ = ["layer_nbytes", "layer_n_blocks", "bits_per_weight"]


def layer_n_blocks(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Number of blocks that each carry one scale (and one zero)."""
    spec.check_shape(tuple(shape))
    out_f, in_f = shape
    return spec.granularity.n_groups(out_f, in_f)


def layer_nbytes(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Bytes that a ``[out, in]`` weight quantized with ``spec`` occupies as stored (no bias)."""
    out_f, in_f = shape
    n = layer_n_blocks(shape, spec)
    codes = math.ceil(out_f * in_f * spec.bits / 8)
    scales = 2 * n
    zeros = 0 if spec.symmetric else math.ceil(n * spec.bits / 8)
    return codes + scales + zeros


def bits_per_weight(shape: tuple[int, int], spec: QuantSpec) -> float:
    """Stored bits per weight, scales and zeros included."""
    return 8.0 * layer_nbytes(shape, spec) / (shape[0] * shape[1])
