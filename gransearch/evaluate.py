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

__all__ = ["Perplexity", "perplexity", "windows", "layer_objective", "chunked_nll", "LOGITS_BUDGET", "KLDivergence",
           "reference_logprobs", "kl_divergence", "kl_rows"]

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
    window_nll: Optional[tuple] = None  # mean NLL of each window, where the scorer keeps them (llama.cpp's does)

    def __float__(self) -> float:
        return self.ppl

    def paired_change(self, other: "Perplexity") -> tuple[float, float]:
        """``(change, standard error)`` of this perplexity relative to ``other`` on the same windows:
        ``exp(mean d) - 1`` with ``d`` the per-window difference of mean NLL, and its standard error
        over windows (so a change smaller than about two standard errors is a tie on these windows)."""
        if self.window_nll is None or other.window_nll is None or len(self.window_nll) != len(other.window_nll):
            raise ValueError("paired_change needs the per-window NLLs of both results on the same windows (llama.cpp's perplexity keeps them)")
        d = torch.tensor(self.window_nll, dtype=torch.float64) - torch.tensor(other.window_nll, dtype=torch.float64)
        m = float(d.mean())
        se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
        return math.exp(m) - 1, math.exp(m) * se

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
    from .offload import DiskModel

    if isinstance(model, DiskModel):  # larger than memory: block by block (on the CPU; gs.offload.perplexity takes a device)
        from . import offload

        res = offload.perplexity(model, ids, seqlen, batch_size, max_windows, chunk_tokens=chunk_tokens, verbose=verbose)
        if on_window is not None:
            on_window(res.n_windows, res.nll)
        return res
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


@dataclass(frozen=True)
class KLDivergence:
    """The result of :func:`kl_divergence` (and :func:`gransearch.llamacpp.kl_divergence`).

    ``kl``: the mean over predicted tokens of ``KL(reference || model)`` in nats; ``kl_se``: its
    standard error over windows; ``top1``: the share of tokens whose most likely next token is the
    reference's; ``ppl`` / ``ref_ppl``: the two models' perplexities on the same tokens.
    """

    kl: float
    kl_se: float
    top1: float
    ppl: float
    ref_ppl: float
    n_tokens: int
    n_windows: int
    seqlen: int
    seconds: float

    def __float__(self) -> float:
        return self.kl

    @classmethod
    def from_sums(cls, window_kl: torch.Tensor, same: float, nll: float, ref_nll: float, seqlen: int, seconds: float) -> "KLDivergence":
        """The result from per-window KL sums ``[n_windows]`` and the token totals of the top-token
        agreements and both models' NLLs (``seqlen - 1`` predicted tokens per window)."""
        n_win = int(window_kl.numel())
        n_tok = n_win * (seqlen - 1)
        means = window_kl.double() / (seqlen - 1)
        se = float(means.std() / math.sqrt(n_win)) if n_win > 1 else float("nan")
        return cls(float(means.mean()), se, same / n_tok, math.exp(nll / n_tok), math.exp(ref_nll / n_tok), n_tok, n_win, seqlen, seconds)

    def __str__(self) -> str:
        return (f"KL divergence {self.kl:.5f} +- {self.kl_se:.5f} nats/token, same top token {100 * self.top1:.2f}%, perplexity "
                f"{self.ppl:.4f} (reference {self.ref_ppl:.4f}) over {self.n_windows} windows x {self.seqlen} tokens")


def kl_rows(ref_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: ``KL(ref || model)``, whether the top tokens agree, and both models' NLL of ``targets``.

    ``ref_logp``: the reference's log-probabilities ``[T, V]`` (any float dtype); ``logits``: the
    model's ``[T, V]``. float64 sums, float32 elementwise."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    logp = ref_logp.float()
    kl = (logp.exp() * (logp - logq)).sum(-1, dtype=torch.float64)
    same = logp.argmax(-1) == logq.argmax(-1)
    t = targets.view(-1, 1)
    return kl, same, -logq.gather(1, t).squeeze(1).double(), -logp.gather(1, t).squeeze(1).double()


def _logit_chunks(model: nn.Module, x: torch.Tensor, chunk_tokens: Optional[int] = None):
    """The model's logits of every predicted position of windows ``x`` ``[b, T]`` (positions
    ``0..T-2``, flattened to ``b * (T - 1)`` rows), as ``(row offset, float32 [c, V])`` chunks."""
    parts = None if model._forward_pre_hooks or model._forward_hooks else _head_parts(model)
    if parts is None:
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        yield 0, logits.reshape(-1, logits.shape[-1])
        return
    base, head, cap = parts
    hs = base(input_ids=x, use_cache=False)[0]  # [b, T, H]
    h = hs[:, :-1].reshape(-1, hs.shape[-1])
    vocab = getattr(model.config, "vocab_size", None) or 65536
    chunk = chunk_tokens or max(1, LOGITS_BUDGET // vocab)
    for i in range(0, h.shape[0], chunk):
        lg = head(h[i : i + chunk]).float()
        if cap:
            lg = lg.div_(cap).tanh_().mul_(cap)
        yield i, lg


@torch.no_grad()
def reference_logprobs(model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 1, max_windows: Optional[int] = None,
                       dtype: torch.dtype = torch.float16, verbose: bool = True) -> torch.Tensor:
    """The log-probabilities ``[n_windows, seqlen - 1, vocab]`` (``dtype``, on the CPU) of ``model``
    on the windows :func:`perplexity` scores: the reference of :func:`kl_divergence`. It takes
    ``n_windows * (seqlen - 1) * vocab * 2`` bytes in float16 (16 windows of 512 at SmolLM2's 49,152: 0.8 GB)."""
    w = windows(ids, check_int("seqlen", seqlen, 2), check_int("max_windows", max_windows, 1, allow_none=True))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    check_token_ids(ids, getattr(emb, "num_embeddings", None), "the evaluation ids")
    dev = next(model.parameters()).device
    out = None
    for i in tqdm(range(0, w.shape[0], batch_size), desc="reference", disable=not verbose, leave=False):
        x = w[i : i + batch_size].to(dev)
        for r, lg in _logit_chunks(model, x):
            lp = torch.log_softmax(lg, dim=-1).to("cpu", dtype)
            if out is None:
                out = torch.empty(w.shape[0] * (seqlen - 1), lp.shape[-1], dtype=dtype)
            out[i * (seqlen - 1) + r : i * (seqlen - 1) + r + lp.shape[0]] = lp
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError("the reference model's log-probabilities are not finite: its outputs are NaN or infinite")
    return out.view(w.shape[0], seqlen - 1, -1)


@torch.no_grad()
def kl_divergence(model: nn.Module, ids: torch.Tensor, reference: torch.Tensor, seqlen: int = 2048, batch_size: int = 1,
                  max_windows: Optional[int] = None, verbose: bool = True,
                  on_window: Optional[Callable[[int, float], None]] = None) -> KLDivergence:
    """``KL(reference || model)`` per predicted token, averaged, on :func:`perplexity`'s windows.

    ``reference``: :func:`reference_logprobs` of the reference model (the float one) on the same
    ``ids``, ``seqlen`` and windows. Unlike perplexity, the divergence from the float model measures
    only what quantization changed, so two plans are told apart on fewer tokens (llama.cpp's
    ``llama-perplexity --kl-divergence`` reports the same). ``on_window(i, running mean KL)`` is
    called after each batch."""
    w = windows(ids, check_int("seqlen", seqlen, 2), check_int("max_windows", max_windows, 1, allow_none=True))
    if tuple(reference.shape[:2]) != (w.shape[0], seqlen - 1):
        raise ValueError(f"the reference holds {tuple(reference.shape[:2])} windows x positions, these ids give {(w.shape[0], seqlen - 1)}: "
                         "compute it with reference_logprobs on the same ids, seqlen and max_windows")
    dev = next(model.parameters()).device
    per_window = torch.zeros(w.shape[0], dtype=torch.float64)
    same = nll = ref_nll = 0.0
    t0 = time.perf_counter()
    for i in tqdm(range(0, w.shape[0], batch_size), desc="kl", disable=not verbose, leave=False):
        x = w[i : i + batch_size].to(dev)
        tg = x[:, 1:].reshape(-1)
        ref = reference[i : i + x.shape[0]].reshape(-1, reference.shape[-1])
        for r, lg in _logit_chunks(model, x):
            kl, top, q, p = kl_rows(ref[r : r + lg.shape[0]].to(lg.device), lg, tg[r : r + lg.shape[0]])
            rows = torch.arange(r, r + lg.shape[0]) // (seqlen - 1)
            per_window.index_add_(0, i + rows, kl.cpu())
            same += float(top.sum())
            nll += float(q.sum())
            ref_nll += float(p.sum())
        if on_window is not None:
            on_window(i + x.shape[0], float(per_window[: i + x.shape[0]].sum()) / ((i + x.shape[0]) * (seqlen - 1)))
    res = KLDivergence.from_sums(per_window, same, nll, ref_nll, seqlen, time.perf_counter() - t0)
    if not math.isfinite(res.kl):
        where = nonfinite_cause(model, "no parameter is non-finite, so an activation overflowed (try float32)")
        raise NonFiniteError(f"the KL divergence is not finite: the model's outputs are NaN or infinite; {where}")
    return res


def layer_objective(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the output error of a linear layer over its calibration inputs.

    With ``H = 2/n sum x x^T`` this is twice the mean squared output error per token, the quantity
    GPTQ minimises. ``weight``, ``qweight``: ``[out, in]``; ``hessian``: ``[in, in]``.
    """
    d = (weight.float() - qweight.float()).to(hessian.device)
    return float(((d @ hessian.float()) * d).sum())  # one [out, in] x [in, in] matmul
