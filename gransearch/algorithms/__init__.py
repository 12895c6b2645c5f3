"""Quantization algorithms as pure functions of tensors (no model knowledge here)."""

from .awq import awq_clip_ratios, awq_scales, awq_search
from .gptq import CholeskyError, GPTQResult, gptq
from .rtn import rtn

__all__ = ["CholeskyError", "GPTQResult", "awq_clip_ratios", "awq_scales", "awq_search", "gptq", "rtn"]
