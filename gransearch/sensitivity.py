"""How much the model's loss cares about each linear layer's output: a diagonal Fisher estimate.

A quantized layer changes its output by ``dy = x dW^T``. To second order, with the empirical
Fisher standing in for the Hessian of the loss, the loss grows by about
``1/2 sum_tokens sum_j g_j^2 dy_j^2``, where ``g = dL/dy`` is the gradient of the summed
next-token loss with respect to the layer's output. Taking ``g`` and ``dy`` as uncorrelated,

    delta_L  ~  1/2 sum_j F_j * mean_tokens(dy_j^2),   F_j = sum_tokens g_j^2,

and ``mean_tokens(dy_j^2)`` is the ``j``-th diagonal entry of ``dW (X^T X / n) dW^T``: the per-row
layer objective that the bank already computes (up to the factor 2 of ``H = 2/n X^T X``).
:func:`output_fisher` returns ``F`` for every block linear, from one forward and backward pass over
a few calibration windows; :func:`gransearch.optimize` weighs its layer objectives with it, so
that the knapsack allocates bits where the loss, not only the layer output, is sensitive (as
HAWQ-style and Fisher-based mixed-precision methods do).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .arch import model_linears
from .errors import NonFiniteError, nonfinite_cause

__all__ = ["output_fisher"]

FISHER_GPU_TOKENS = 4096  # on a GPU, the tokens of one forward and backward pass (the windows per pass follow)


def output_fisher(
    model: nn.Module,
    calib: torch.Tensor,
    *,
    n_windows: Optional[int] = 16,
    batch_size: Optional[int] = None,
    device=None,
    verbose: bool = True,
) -> dict[str, torch.Tensor]:
    """``{linear name: F}`` with ``F[j]`` the mean over tokens of ``(dL/dy_j)^2`` (``[out]``, CPU).

    ``calib``: token windows ``[n, seqlen]`` (the first ``n_windows`` are used); ``L`` is the summed
    next-token cross-entropy. Runs on ``device`` (the model is moved there and back) or where the
    model is. Parameters get no gradients and are not modified. ``batch_size``: windows per forward
    and backward pass; by default 2 on the CPU, and on a GPU as many as hold ``FISHER_GPU_TOKENS``
    tokens (at least 2), where each pass is a chain of small kernels for a small model. Each token's
    gradient is its own window's, so the batch changes only the order of the float32 sums.
    """
    # long on purpose: hooks, gradient flags and the device move must be undone in one finally block
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.shape[0] == 0:
        raise ValueError("output_fisher needs calibration windows [n, seqlen] with n >= 1")
    windows = calib[:n_windows] if n_windows else calib
    refs = model_linears(model)
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    if batch_size is None:
        batch_size = max(2, FISHER_GPU_TOKENS // windows.shape[1]) if dev.type == "cuda" else 2
    flags = [p.requires_grad for p in model.parameters()]
    acc: dict[str, torch.Tensor] = {}
    handles = []

    def on_output(name):
        def hook(module, inputs, output):
            if output.requires_grad:
                def grad_hook(g):
                    sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                    acc[name] = acc[name] + sq if name in acc else sq
                output.register_hook(grad_hook)
        return hook

    def needs_grad(module, inputs, output):
        return output.detach().requires_grad_(True)  # the graph starts at the embeddings

    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if dev != home:
            model.to(dev)
        handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
        handles += [r.module.register_forward_hook(on_output(r.name)) for r in refs]
        n_tok = 0
        with torch.enable_grad():
            for i in tqdm(range(0, windows.shape[0], batch_size), desc="fisher", disable=not verbose):
                x = windows[i : i + batch_size].to(dev)
                logits = model(input_ids=x, use_cache=False).logits
                # every position's logits as they are, the last one's target ignored: the gradients of the next-token
                # losses, with no copy of all but the last position and no zero-filled gradient to copy back into
                target = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], 1).reshape(-1)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, reduction="sum", ignore_index=-100)
                loss.backward()
                n_tok += x.numel()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        if dev != home:
            model.to(home)
        model.train(was_training)
    missing = [r.name for r in refs if r.name not in acc]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[0]} (and {len(missing) - 1} more): is the layer used by the forward pass?")
    # every layer's sums come over at once (on a GPU one wait, not one per layer and check)
    host = torch.cat([acc[r.name] for r in refs]).cpu().split([acc[r.name].numel() for r in refs])
    for r, v in zip(refs, host):  # in model order: name the first layer whose output gradients went bad
        if not bool(torch.isfinite(v).all()):
            cause = nonfinite_cause(model, "the loss or an activation overflowed (try float32)")
            raise NonFiniteError(f"the output Fisher of {r.name} is not finite: {cause}")
    by_name = {r.name: v for r, v in zip(refs, host)}
    return {name: by_name[name] / n_tok for name in acc}  # in the order the gradients arrived, as always
