"""Quantization algorithms as pure functions of tensors (no model knowledge here)."""

from .rtn import rtn

__all__ = ["rtn"]
