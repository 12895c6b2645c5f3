"""Typed quantization specifications.

Granularity is the shape of the block of weights that shares one scale (and one zero point):

* :class:`PerTensor`  -- the whole ``[out, in]`` matrix,
* :class:`PerChannel` -- one output row (``in`` weights),
* :class:`PerGroup`   -- ``size`` consecutive weights of one row, along the input dimension.

``PerGroup(in_features)`` is the same quantizer as ``PerChannel()``; the two are kept distinct
because their text forms differ and because ``PerChannel`` works for any layer width.

A :class:`QuantSpec` has a short text form used by the CLI and by plan files::

    >>> QuantSpec.parse("w4g64")
    QuantSpec(bits=4, granularity=PerGroup(size=64), symmetric=False)
    >>> str(QuantSpec(8, PerChannel(), symmetric=True))
    'w8cs'

Grammar: ``w<bits>`` then ``t`` (per-tensor), ``c`` (per-channel) or ``g<size>`` (per-group), then
an optional ``s`` for symmetric or ``f`` for a float offset (``w4g32f`` is llama.cpp's ``Q4_1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "Granularity",
    "as_granularity",
    "QuantSpec",
    "GGMLSpec",
    "GGML_TYPES",
    "LEGACY_GGML",
    "parse_spec",
    "ActSpec",
    "MIN_BITS",
    "MAX_BITS",
]

MIN_BITS = 2
MAX_BITS = 8


class Granularity:
    """The block of weights that shares one scale: every question about it is answered here.

    A block is ``width(in_features)`` consecutive input columns of one output row, except for
    :class:`PerTensor`, whose one block spans every row (``spans_rows``). ``grouped`` is true when
    a row holds several blocks, whose parameters GPTQ takes as it reaches them.
    """

    spans_rows = False
    grouped = False

    def width(self, in_features: int) -> int:
        """Input columns of one row that share a scale."""
        return in_features

    def fits(self, in_features: int) -> bool:
        """Whether this granularity can quantize a layer ``in_features`` wide."""
        return True

    def n_groups(self, out_features: int, in_features: int) -> int:
        """How many scales a ``[out, in]`` weight stores."""
        rows, cols = self.params_shape(out_features, in_features)
        return rows * cols

    def params_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of the scale (and zero) grid of a ``[out, in]`` weight."""
        return (1, 1) if self.spans_rows else (out_features, in_features // self.width(in_features))

    def block_view(self, weight):
        """``[out, in]`` -> ``[n_blocks, block_size]``: each row of the view shares one scale."""
        out_f, in_f = weight.shape
        if self.spans_rows:
            return weight.reshape(1, out_f * in_f)
        g = self.width(in_f)
        return weight if g == in_f else weight.reshape(out_f * (in_f // g), g)

    def tag(self) -> str:
        """The letter(s) in a spec's text form: ``t``, ``c`` or ``g<size>``."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The word used in tables and on the command line: ``tensor``, ``channel`` or ``g<size>``."""
        raise NotImplementedError


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole weight matrix."""

    spans_rows = True

    def tag(self) -> str:
        return "t"

    @property
    def name(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per output channel (row of ``[out, in]``)."""

    def tag(self) -> str:
        return "c"

    @property
    def name(self) -> str:
        return "channel"


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``size`` consecutive input weights of each output row."""

    size: int
    grouped = True

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"PerGroup size must be a positive integer, got {self.size!r}")

    def width(self, in_features: int) -> int:
        return self.size

    def fits(self, in_features: int) -> bool:
        return in_features % self.size == 0

    def block_view(self, weight):
        out_f, in_f = weight.shape
        return weight.reshape(out_f * (in_f // self.size), self.size)

    def tag(self) -> str:
        return f"g{self.size}"

    @property
    def name(self) -> str:
        return f"g{self.size}"


def as_granularity(g) -> Granularity:
    """A :class:`Granularity` from itself, a group size, or a word: ``tensor``/``t``,
    ``channel``/``c``, ``g64`` or ``"64"``."""
    if isinstance(g, Granularity):
        return g
    if isinstance(g, int) and not isinstance(g, bool):
        return PerGroup(g)
    if isinstance(g, str):
        t = g.strip().lower()
        if t in ("tensor", "t"):
            return PerTensor()
        if t in ("channel", "c"):
            return PerChannel()
        m = re.fullmatch(r"g?(\d+)", t)
        if m:
            return PerGroup(int(m.group(1)))
    raise ValueError(f"unknown granularity {g!r}: use 'tensor', 'channel' or a group size such as 64")


_SPEC_RE = re.compile(r"^w(\d+)(t|c|g(\d+))([sf]?)$")


@dataclass(frozen=True)
class QuantSpec:
    """Integer weight quantization: ``bits`` in 2..8, a granularity, symmetric or asymmetric.

    Asymmetric specs store an integer zero point per block (packed at ``bits``); symmetric specs
    use the implied zero point ``2**(bits-1)`` and store none. ``float_zero`` specs (text suffix
    ``f``) are asymmetric with a float16 offset per block instead: ``w = scale * code + min``, the
    block's range ``[min, max]`` need not hold zero (llama.cpp's ``Q4_1``/``Q5_1`` are ``w4g32f``/``w5g32f``).
    """

    bits: int
    granularity: Granularity = PerChannel()
    symmetric: bool = False
    float_zero: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"QuantSpec bits must be an integer, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"QuantSpec bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}; "
                "use an integer width such as 8, 4 or 3"
            )
        if not isinstance(self.granularity, Granularity) or type(self.granularity) is Granularity:
            raise ValueError(
                "QuantSpec granularity must be PerTensor(), PerChannel() or PerGroup(size), "
                f"got {self.granularity!r}"
            )
        if self.float_zero and self.symmetric:
            raise ValueError("a QuantSpec is symmetric (no offset) or has a float offset (float_zero), not both")

    @property
    def maxq(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def __str__(self) -> str:
        return f"w{self.bits}{self.granularity.tag()}{'s' if self.symmetric else 'f' if self.float_zero else ''}"

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Parse the short form (``w4g64``, ``w8c``, ``w8t``, ``w4g32s``, ``w4g32f``)."""
        m = _SPEC_RE.match(text.strip().lower())
        if m is None:
            raise ValueError(
                f"cannot parse quantization spec {text!r}: expected w<bits>(t|c|g<size>)[s|f], "
                "for example w4g64, w8c, w8t, w4g64s or w4g32f"
            )
        bits = int(m.group(1))
        if m.group(2) == "t":
            gran: Granularity = PerTensor()
        elif m.group(2) == "c":
            gran = PerChannel()
        else:
            gran = PerGroup(int(m.group(3)))
        return cls(bits, gran, symmetric=m.group(4) == "s", float_zero=m.group(4) == "f")

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` when this spec cannot quantize a weight of ``shape``."""
        if len(shape) != 2:
            raise ValueError(
                f"weight of shape {tuple(shape)} is not 2-D [out, in]; reshape it before quantizing"
            )
        out_f, in_f = shape
        if out_f < 1 or in_f < 1:
            raise ValueError(f"weight of shape {tuple(shape)} is empty")
        if not self.granularity.fits(in_f):
            raise ValueError(
                f"group size {self.granularity.size} does not divide the input dimension {in_f} "
                f"of the weight of shape {tuple(shape)}; choose a group size that divides {in_f} "
                "or use PerChannel()"
            )


# llama.cpp block types whose layout is not a gransearch code grid: (weights per block, bytes per block)
GGML_TYPES = {"Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
              "IQ4_NL": (32, 18), "IQ4_XS": (256, 136)}
# llama.cpp's legacy types by name, as the gransearch code grids they are (every method makes them)
LEGACY_GGML = {"Q4_0": "w4g32s", "Q5_0": "w5g32s", "Q8_0": "w8g32s", "Q4_1": "w4g32f", "Q5_1": "w5g32f"}


@dataclass(frozen=True)
class GGMLSpec:
    """A llama.cpp block type that is not a gransearch code grid: the K-quants (``Q2_K`` ... ``Q6_K``:
    super-blocks of 256 weights whose sub-block scales are themselves quantized), the non-linear
    4-bit grids ``IQ4_NL`` (blocks of 32) and ``IQ4_XS`` (256). Only llama.cpp's quantizer makes them
    (method ``llamacpp``); their text form is the type's name. The legacy types are code grids
    (:data:`LEGACY_GGML`: ``Q4_1`` is ``w4g32f``), which every method makes.

        >>> GGMLSpec("Q3_K").bits, str(GGMLSpec("Q3_K"))
        (3.4375, 'Q3_K')
    """

    type: str
    is_ggml = True
    symmetric = True  # no zero-point buffer of its own: everything is in the blocks
    float_zero = False

    def __post_init__(self) -> None:
        if self.type not in GGML_TYPES:
            raise ValueError(f"unknown ggml type {self.type!r}: llama.cpp types gransearch takes are {', '.join(GGML_TYPES)} "
                             "(and the legacy " + ", ".join(f"{k} ({v})" for k, v in LEGACY_GGML.items()) + ")")

    @property
    def block(self) -> int:
        """Weights per block (along a row)."""
        return GGML_TYPES[self.type][0]

    @property
    def bits(self) -> float:
        """Stored bits per weight, scales included."""
        n, nb = GGML_TYPES[self.type]
        return 8 * nb / n

    def nbytes(self, shape: tuple[int, int]) -> int:
        self.check_shape(shape)
        n, nb = GGML_TYPES[self.type]
        return shape[0] * (shape[1] // n) * nb

    def __str__(self) -> str:
        return self.type

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """``ValueError`` unless ``shape`` is ``[out, in]`` with ``in`` a multiple of the block."""
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"weight of shape {tuple(shape)} is not a non-empty 2-D [out, in]")
        if shape[1] % self.block:
            raise ValueError(f"{self.type} stores rows in blocks of {self.block} weights; the input dimension {shape[1]} "
                             f"of the weight of shape {tuple(shape)} is not a multiple (llama.cpp falls back to another type there)")


def parse_spec(text):
    """A :class:`QuantSpec` (``w4g32s``) or a :class:`GGMLSpec` (``Q3_K``) from its text form; a
    legacy llama.cpp type's name is its code grid (``Q4_1`` -> ``w4g32f``)."""
    if isinstance(text, (QuantSpec, GGMLSpec)):
        return text
    t = str(text).strip()
    if t.upper() in GGML_TYPES:
        return GGMLSpec(t.upper())
    if t.upper() in LEGACY_GGML:
        return QuantSpec.parse(LEGACY_GGML[t.upper()])
    return QuantSpec.parse(t)


_ACT_GRANS = ("tensor", "token", "channel")


@dataclass(frozen=True)
class ActSpec:
    """Activation fake-quantization applied to a linear layer's input.

    ``granularity``: ``"tensor"`` (one scale for the whole input), ``"token"`` (one per row /
    token) or ``"channel"`` (one per input feature: an ideal that integer GEMMs cannot use, kept
    as a reference). ``dynamic`` computes scales from each input; static uses ``static_scale``
    (calibrated ``max|x|``), a scalar for tensor granularity or a vector for channel granularity.
    Activation quantization is symmetric. ``outlier_threshold`` (LLM.int8()-style decomposition,
    for analysis): input columns where any ``|x|`` of the current input exceeds it stay in floating
    point; the weight stays as quantized (LLM.int8() keeps those weight columns in float16 too).
    """

    bits: int = 8
    granularity: str = "token"
    dynamic: bool = True
    outlier_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        if self.outlier_threshold is not None and not self.outlier_threshold > 0:
            raise ValueError(f"outlier_threshold must be positive, got {self.outlier_threshold}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"ActSpec bits must be an integer in 2..16, got {self.bits!r}")
        if self.granularity not in _ACT_GRANS:
            raise ValueError(
                f"ActSpec granularity must be one of {_ACT_GRANS}, got {self.granularity!r}"
            )
        if not self.dynamic and self.granularity == "token":
            raise ValueError(
                "static per-token activation scales do not exist (tokens vary per input); "
                "use dynamic=True or granularity='tensor'/'channel'"
            )

    def __str__(self) -> str:
        g = {"tensor": "t", "token": "k", "channel": "c"}[self.granularity]
        out = f"a{self.bits}{g}{'d' if self.dynamic else 's'}"
        return out + (f"o{self.outlier_threshold:g}" if self.outlier_threshold else "")
