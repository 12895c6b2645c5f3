"""Quantization algorithms as pure functions of tensors (no model knowledge here)."""

from .awq import awq_clip_ratios, awq_scales, awq_search
from .gptq import CholeskyError, GPTQResult, gptq
from .layer import GPTQOptions, quantize_layer, uses_gptq
from .rtn import rtn

__all__ = ["CholeskyError", "GPTQOptions", "GPTQResult", "awq_clip_ratios", "awq_scales", "awq_search", "gptq", "quantize_layer", "rtn",
           "uses_gptq"]
