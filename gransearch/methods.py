"""The rounding methods, typed: what each one needs and does, in one place.

A :class:`Method` is a ``str`` (``Method.AWQ_GPTQ == "awq+gptq"``), so plans, bank keys and CLI
lists keep their text form while code asks the method what it is instead of parsing its name.
:class:`GPTQOptions` are GPTQ's knobs; a :class:`gransearch.plan.LayerPlan` that rounds with GPTQ
carries the options it was measured with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

__all__ = ["Method", "METHODS", "GPTQOptions"]


class Method(StrEnum):
    """``rtn`` (round to nearest), ``gptq`` (error-compensating rounding with the layer's Hessian),
    ``awq`` (activation-aware input scaling and clipping, then RTN), ``awq+gptq`` (AWQ's scaling
    and clipping, then GPTQ), ``llamacpp`` (llama.cpp's own quantizer, ``ggml_quantize_chunk``,
    weighted by an importance matrix from the layer's inputs: only for specs that are ggml types,
    see :mod:`gransearch.export.gguf`)."""

    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    AWQ_GPTQ = "awq+gptq"
    LLAMACPP = "llamacpp"

    @property
    def uses_hessian(self) -> bool:
        """Needs statistics of the layer's inputs (GPTQ's Hessian, llama.cpp's importance matrix)."""
        return self.uses_gptq or self is Method.LLAMACPP

    def accepts(self, spec) -> bool:
        """Whether this method can produce ``spec``: llama.cpp makes ggml types only, and only
        llama.cpp makes the types that are not gransearch codes (K-quants)."""
        from .export.gguf import ggml_type_of

        if self is Method.LLAMACPP:
            return ggml_type_of(spec) is not None
        return not getattr(spec, "is_ggml", False)

    @property
    def uses_awq(self) -> bool:
        """Scales the layer's input channels (folded into the preceding norm or linear) and clips."""
        return self in (Method.AWQ, Method.AWQ_GPTQ)

    @property
    def uses_gptq(self) -> bool:
        """Rounds with GPTQ, and so needs the layer's Hessian."""
        return self in (Method.GPTQ, Method.AWQ_GPTQ)

    @classmethod
    def parse(cls, text) -> "Method":
        """A method from its text; ``ValueError`` naming the accepted ones."""
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"unknown method {text!r}: use one of {', '.join(m.value for m in cls)}") from None


# the general methods (any spec); ``llamacpp`` is for ggml types only
METHODS = tuple(m.value for m in Method if m is not Method.LLAMACPP)


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's options: dampening (fraction of the mean Hessian diagonal), lazy-batch block size,
    column order by descending Hessian diagonal, group parameters from the original weights."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTQOptions":
        """Options from a plan's JSON; unknown keys are refused (a typo would silently change GPTQ)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown GPTQ options {sorted(unknown)}: use {sorted(cls.__dataclass_fields__)}")
        return cls(**d)
