"""The errors gransearch raises on bad input or bad state, and the checks that raise them.

Every expected failure is a ``ValueError`` subclass (or ``FileNotFoundError``/``ImportError`` at
the edges) whose message names the problem and the fix; the CLI prints such an error as one line
and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "BankError",
    "BudgetError",
    "NonFiniteError",
    "PlanFormatError",
    "SearchError",
    "StudyMismatchError",
    "check_int",
    "check_positive",
    "check_token_ids",
    "check_device",
    "check_float_model",
    "first_nonfinite_parameter",
    "nonfinite_cause",
]


class BudgetError(ValueError):
    """The budget cannot be met (below the smallest plan) or needs no search (above the float model)."""


class StudyMismatchError(ValueError):
    """A stored study (or run folder) was made for another search: other model weights, candidates,
    budget, calibration or proxy objective. Its trial values cannot be compared with this one's."""


class BankError(ValueError):
    """A stored candidate bank is incomplete, malformed or corrupted (a checksum does not match)."""


class PlanFormatError(ValueError):
    """A plan file is not a valid gransearch plan (bad JSON, missing keys, wrong types)."""


class NonFiniteError(ValueError):
    """NaN or infinity where a finite number is required (model outputs, activations, losses)."""


class SearchError(ValueError):
    """The search ran but produced nothing usable (no trial completed)."""


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> Optional[int]:
    """``value`` as an ``int >= minimum``; else ``ValueError`` naming the option and the range."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):  # int, numpy and torch integers
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    v = value.__index__()
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v}")
    return v


def check_positive(name: str, value, allow_none: bool = False) -> Optional[float]:
    """``value`` as a finite ``float > 0``; else ``ValueError`` naming the option."""
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_token_ids(ids: torch.Tensor, vocab_size: Optional[int], what: str) -> None:
    """Token ids must be an integer tensor with every value in ``[0, vocab_size)``."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{what} must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}: tokenize the text (gs.load_tokens)")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise ValueError(f"{what} holds token ids in [{lo}, {hi}], outside the model's vocabulary [0, {vocab_size}): "
                         "were they made with another model's tokenizer?")


def check_float_model(model, what: str) -> None:
    """Refuse a model whose linears are already quantized (loaded from a quantized checkpoint, or
    quantized before) where ``what`` needs the float weights: quantizing it again would round rounded
    weights, and a search would score candidates against them. A model read from disk
    (:class:`~gransearch.offload.DiskModel`) answers for itself (its ``check_float``)."""
    if hasattr(model, "check_float"):
        return model.check_float(what)
    quantized = [n for n, m in model.named_modules()
                 if type(m).__name__ in ("QuantLinear", "CompressedLinear") or hasattr(m, "weight_packed")]
    if quantized or getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        which = f"{len(quantized)} quantized layers, e.g. {quantized[0]}" if quantized else "its config has a quantization_config"
        raise ValueError(f"the model is already quantized ({which}): {what} needs the float model; load the unquantized "
                         "checkpoint instead")


def check_device(device) -> Optional[torch.device]:
    """A ``torch.device`` that exists here (``None`` stays ``None``); a clear error for CUDA without CUDA."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} ({exc}): use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but no CUDA device is available here: use --device cpu (device='cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def nonfinite_cause(model: torch.nn.Module, otherwise: str) -> str:
    """Why a model's numbers went non-finite: its first NaN/infinite parameter, else ``otherwise``."""
    bad = first_nonfinite_parameter(model)
    return f"parameter {bad} holds NaN or infinity" if bad else otherwise


def first_nonfinite_parameter(model: torch.nn.Module) -> Optional[str]:
    """Name of the first parameter or buffer holding NaN or infinity, else ``None``."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            return name
    return None
