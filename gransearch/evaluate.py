"""Perplexity with the standard protocol, and the layer objective.

Protocol (as in the GPTQ and AWQ evaluations): the token stream is cut into non-overlapping
windows of ``seqlen`` tokens (the tail that does not fill a window is dropped); each window is
scored independently; perplexity is ``exp`` of the mean negative log-likelihood over every
predicted token (``seqlen - 1`` per window). All windows have the same length, so this equals
``exp`` of the mean of per-window losses that ``model(labels=...)`` reports.

The loss is computed from the final hidden states in chunks of tokens, so a large vocabulary
(Gemma 3: 262k) never materialises ``batch x seqlen x vocab`` float32 logits.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import HEAD_ON_BASE
from .errors import NonFiniteError, check_int, check_token_ids, nonfinite_cause

log = logging.getLogger(__name__)

__all__ = ["Perplexity", "perplexity", "windows", "layer_objective", "chunked_nll", "LOGITS_BUDGET"]

# float32 logits elements per loss chunk (64M elements = 256 MiB)
LOGITS_BUDGET = 1 << 26



@dataclass(frozen=True)
class Perplexity:
    """The result of :func:`perplexity`; ``float(result)`` is the perplexity."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_tokens: int  # predicted tokens
    n_windows: int
    seqlen: int
    seconds: float

    def __float__(self) -> float:
        return self.ppl

    def __str__(self) -> str:
        return (
            f"perplexity {self.ppl:.4f} over {self.n_windows} windows x {self.seqlen} tokens "
            f"({self.n_tokens} predicted) in {self.seconds:.1f} s"
        )


def windows(ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` of a token stream ``[N]`` (tail dropped)."""
    ids = ids.reshape(-1)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of {seqlen}: use a shorter seqlen")
    return ids[: n * seqlen].view(n, seqlen)


def _head_parts(model: nn.Module):
    """``(base, lm_head, softcap)`` when the loss can be chunked, else ``None``."""
    mtype = getattr(model.config, "model_type", None)
    if mtype not in HEAD_ON_BASE:
        return None
    base = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if base is None or head is None:
        return None
    cap = getattr(model.config, "final_logit_softcapping", None)
    return base, head, cap


def chunked_nll(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    softcap: Optional[float] = None,
    chunk_tokens: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Sum of ``-log p(target)`` over tokens, the logits computed ``chunk_tokens`` rows at a time.

    ``hidden``: ``[T, H]`` final hidden states; ``targets``: ``[T]``. Returns a float64 scalar.
    """
    if chunk_tokens is None:
        v = vocab_size or 65536
        chunk_tokens = max(1, LOGITS_BUDGET // v)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for i in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[i : i + chunk_tokens]).float()  # [c, V]
        if softcap:
            logits = logits.div_(softcap).tanh_().mul_(softcap)
        tgt = logits.gather(1, targets[i : i + chunk_tokens].unsqueeze(1)).squeeze(1)  # [c]
        # logsumexp in place: no second [c, V] temporary, one pass less over memory
        m = logits.amax(dim=-1, keepdim=True)
        lse = logits.sub_(m).exp_().sum(dim=-1).log_() + m.squeeze(1)
        total += (lse - tgt).double().sum()
    return total


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: Optional[int] = None,
    chunk_tokens: Optional[int] = None,
    verbose: bool = True,
    on_window: Optional[Callable[[int, float], None]] = None,
) -> Perplexity:
    """Perplexity of a causal LM over a token stream ``ids`` ``[N]`` (see the module docstring).

    ``batch_size`` windows run per forward; ``max_windows`` limits the windows (from the start);
    ``chunk_tokens`` sets the loss chunk (default: 256 MiB of float32 logits). ``on_window(i,
    running_nll)`` is called after each batch (the search uses it to report and prune).
    Runs where the model's parameters are; deterministic for a fixed thread count. Raises
    :class:`~gransearch.errors.NonFiniteError` when the result is NaN or infinite (naming the first
    non-finite parameter), ``ValueError`` on ids outside the vocabulary or a ``seqlen`` below 2.
    """
    seqlen = check_int("seqlen", seqlen, 2)
    batch_size = check_int("batch_size", batch_size, 1)
    max_windows = check_int("max_windows", max_windows, 1, allow_none=True)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    check_token_ids(ids, getattr(emb, "num_embeddings", None), "the evaluation ids")
    w = windows(ids, seqlen, max_windows)
    dev = next(model.parameters()).device
    # hooks on the whole model (compressed-tensors decompresses a loaded checkpoint on the first
    # forward) would be bypassed by calling the base and the head apart: use the full forward then
    parts = None if model._forward_pre_hooks or model._forward_hooks else _head_parts(model)
    vocab = getattr(model.config, "vocab_size", None)
    total = 0.0
    count = 0
    t0 = time.perf_counter()
    bar = tqdm(range(0, w.shape[0], batch_size), desc=f"perplexity@{seqlen}", disable=not verbose, leave=False)
    for i in bar:
        x = w[i : i + batch_size].to(dev)
        if parts is not None:
            base, head, cap = parts
            h = base(input_ids=x, use_cache=False)[0]  # [b, T, H]
            hh = h[:, :-1].reshape(-1, h.shape[-1])
            nll = chunked_nll(hh, x[:, 1:].reshape(-1), head, cap, chunk_tokens, vocab)
        else:  # unknown layout: let the model compute its logits
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            ).double()
        total += float(nll)
        count += x.shape[0] * (seqlen - 1)
        if verbose:
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
        if on_window is not None:
            on_window(i + x.shape[0], total / count)
    seconds = time.perf_counter() - t0
    mean = total / count
    if not math.isfinite(mean):
        where = nonfinite_cause(model, "no parameter is non-finite, so an activation overflowed (try float32)")
        raise NonFiniteError(f"perplexity is not finite (mean NLL {mean}): the model's outputs are NaN or infinite; {where}")
    return Perplexity(math.exp(mean), mean, count, int(w.shape[0]), seqlen, seconds)


def layer_objective(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the output error of a linear layer over its calibration inputs.

    With ``H = 2/n sum x x^T`` this is twice the mean squared output error per token, the quantity
    GPTQ minimises. ``weight``, ``qweight``: ``[out, in]``; ``hessian``: ``[in, in]``.
    """
    d = (weight.float() - qweight.float()).to(hessian.device)
    return float(((d @ hessian.float()) * d).sum())  # one [out, in] x [in, in] matmul
