"""llama.cpp as the judge: perplexity of a GGUF file and llama.cpp's own quantizer.

This module binds llama.cpp through ``llama-cpp-python`` (its low-level ctypes API over
``llama.h``; the ``gguf`` extra installs it, building llama.cpp from source once, about 4 minutes
on 2 cores; pip caches the built wheel). Nothing here imports torch models: files go in, numbers
and files come out.

* :func:`perplexity` scores token windows with llama.cpp on the CPU, with the same protocol as
  :func:`gransearch.perplexity` (non-overlapping windows, each scored alone, ``seqlen - 1``
  predicted tokens per window), so the two numbers compare directly.
* :func:`quantize_weight` rounds one weight with llama.cpp's quantizer (``ggml_quantize_chunk``,
  what ``llama_model_quantize`` runs for every tensor), optionally weighted by an importance
  matrix: the ``llamacpp`` method, and the only maker of K-quant candidates.
* :func:`quantize_file` runs ``llama_model_quantize``: a preset (``Q4_K_M``, ``Q3_K_S`` ...),
  per-tensor type overrides and an importance matrix (:func:`imatrix_from_stats`), from an F32
  GGUF that :func:`gransearch.export.gguf.save_gguf` writes.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import math
import os
import re
import time
from typing import Optional

import numpy as np
import torch

from .evaluate import Perplexity, windows

log = logging.getLogger(__name__)

__all__ = ["available", "perplexity", "kl_divergence", "quantize_file", "quantize_weight", "PRESETS", "imatrix_from_stats", "LlamaCppError"]

# llama.cpp's presets (llama_ftype) by the name its quantize tool takes
PRESETS = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13,
    "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29,
    "IQ4_XS": 30, "IQ1_M": 31,
}


class LlamaCppError(RuntimeError):
    """llama.cpp refused a file or failed while running it."""


_BACKEND = None
_LOG_CB = None
_RECENT: collections.deque = collections.deque(maxlen=6)  # llama.cpp's last warnings and errors


def available() -> bool:
    """Whether the llama.cpp binding is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _lib():
    global _BACKEND, _LOG_CB
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError("scoring with llama.cpp needs its binding: pip install 'gransearch[gguf]' "
                          "(llama-cpp-python, which builds llama.cpp from source once)") from exc
    if _BACKEND is None:
        @llama_cpp.llama_log_callback
        def _quiet(level, text, user_data):  # llama.cpp's own log goes to our logger at debug level
            line = text.decode("utf-8", "replace").rstrip()
            if level >= 3 and line:  # warnings and errors: kept to explain a refusal
                _RECENT.append(line)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(line)

        _LOG_CB = _quiet
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        _BACKEND = llama_cpp
    return _BACKEND


@contextlib.contextmanager
def _model(path: str):
    lib = _lib()
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 0
    # llama.cpp's CPU "extra buffer types" repack Q4_0/Q8_0 weights into interleaved layouts; in this
    # build (llama-cpp-python 0.3.36, on AVX-512 machines) decoding a repacked model crashes, its own
    # quantize output included. The plain layout runs the same Q8_0 activation arithmetic.
    mp.use_extra_bufts = False
    _RECENT.clear()
    model = lib.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise LlamaCppError(f"llama.cpp could not load {path}: {' | '.join(_RECENT) or 'no reason given'}")
    try:
        yield model
    finally:
        lib.llama_model_free(model)


@contextlib.contextmanager
def _window_logits(path: str, win: torch.Tensor, seqlen: int, n_threads: Optional[int]):
    """A context giving an iterator of ``(window index, float32 logits [seqlen, vocab])``: each
    window of ``win`` decoded alone from an empty cache by llama.cpp, every position's logits (a view
    valid until the next window)."""
    lib = _lib()
    with _model(path) as model:
        vocab = lib.llama_model_get_vocab(model)
        n_vocab = lib.llama_vocab_n_tokens(vocab)
        if int(win.max()) >= n_vocab:
            raise ValueError(f"token id {int(win.max())} is outside the GGUF's vocabulary of {n_vocab}")
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = seqlen
        cp.n_seq_max = 1
        threads = n_threads or max(1, os.cpu_count() or 1)
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        ctx = lib.llama_init_from_model(model, cp)
        if not ctx:
            raise LlamaCppError(f"llama.cpp could not create a context of {seqlen} tokens for {path}")
        batch = lib.llama_batch_init(seqlen, 0, 1)

        def gen():
            for w in range(win.shape[0]):
                lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
                batch.n_tokens = seqlen
                for i, t in enumerate(win[w].tolist()):
                    batch.token[i] = t
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True
                rc = lib.llama_decode(ctx, batch)
                if rc != 0:
                    raise LlamaCppError(f"llama_decode failed with code {rc} on window {w} of {path}")
                yield w, np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(seqlen, n_vocab))

        try:
            yield gen()
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)


def _row_chunks(n_vocab: int, seqlen: int):
    """Row slices of ``seqlen - 1`` predicted positions, 128 MiB of float64 logits each (not
    ``seqlen x vocab`` at once: 1 GiB at Gemma's vocabulary)."""
    rows = max(1, (1 << 24) // n_vocab)
    return [slice(i, min(i + rows, seqlen - 1)) for i in range(0, seqlen - 1, rows)]


def _finite(x: torch.Tensor, w: int, path: str) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        from .errors import NonFiniteError

        raise NonFiniteError(f"llama.cpp gave non-finite logits on window {w} of {path}")
    return x


def perplexity(path: str, ids: torch.Tensor, seqlen: int = 512, max_windows: Optional[int] = None,
               n_threads: Optional[int] = None, verbose: bool = True) -> Perplexity:
    """Perplexity of the GGUF at ``path`` on ``ids`` computed by llama.cpp (CPU).

    The protocol is :func:`gransearch.perplexity`'s: the windows of :func:`gransearch.evaluate.windows`,
    each decoded alone from an empty cache with the logits of every position, ``seqlen - 1``
    predicted tokens each, in llama.cpp's default context (F16 KV cache, as its perplexity tool
    runs). llama.cpp rounds the activations that meet a quantized weight
    to 8 bits in blocks of 32 (its CPU dot products): that is part of what it scores. The result
    keeps each window's mean NLL (``window_nll``), for :meth:`Perplexity.paired_change`.
    """
    from tqdm.auto import tqdm

    win = windows(ids, seqlen, max_windows).to(torch.int32)
    t0 = time.time()
    per_window = np.zeros(win.shape[0])
    with _window_logits(path, win, seqlen, n_threads) as decoded:
        for w, logits in tqdm(decoded, total=win.shape[0], desc="llama.cpp perplexity", disable=not verbose, leave=False):
            tgt = win[w, 1:].long()
            for sl in _row_chunks(logits.shape[1], seqlen):
                lg = torch.from_numpy(logits[sl].astype(np.float64))
                per_window[w] += float(_finite(torch.logsumexp(lg, dim=-1) - lg.gather(1, tgt[sl].unsqueeze(1)).squeeze(1), w, path).sum())
    n_tok = win.shape[0] * (seqlen - 1)
    nll = float(per_window.sum()) / n_tok
    return Perplexity(math.exp(nll), nll, n_tok, int(win.shape[0]), seqlen, time.time() - t0,
                      tuple(float(x) for x in per_window / (seqlen - 1)))


def kl_divergence(path: str, reference: str, ids: torch.Tensor, seqlen: int = 512, max_windows: Optional[int] = None,
                  n_threads: Optional[int] = None, verbose: bool = True):
    """``KL(reference || model)`` per predicted token of the GGUF at ``path`` against the GGUF
    ``reference`` (the float model), both decoded by llama.cpp window by window on
    :func:`perplexity`'s windows (what ``llama-perplexity --kl-divergence`` measures). Returns a
    :class:`gransearch.evaluate.KLDivergence` with both perplexities and the share of tokens whose
    most likely next token agrees."""
    from tqdm.auto import tqdm

    from .evaluate import KLDivergence, kl_rows

    win = windows(ids, seqlen, max_windows).to(torch.int32)
    t0 = time.time()
    per_window = np.zeros(win.shape[0])
    same = nll = ref_nll = 0.0
    with _window_logits(reference, win, seqlen, n_threads) as ref_dec, _window_logits(path, win, seqlen, n_threads) as dec:
        for (w, ref_logits), (_, logits) in tqdm(zip(ref_dec, dec), total=win.shape[0], desc="llama.cpp KL", disable=not verbose, leave=False):
            if ref_logits.shape != logits.shape:
                raise ValueError(f"{path} and {reference} have other vocabularies ({logits.shape[1]} and {ref_logits.shape[1]})")
            tgt = win[w, 1:].long()
            for sl in _row_chunks(logits.shape[1], seqlen):
                ref_lp = torch.log_softmax(_finite(torch.from_numpy(ref_logits[sl].astype(np.float64)), w, reference), dim=-1)
                kl, top, q, p = kl_rows(ref_lp, _finite(torch.from_numpy(logits[sl].astype(np.float64)), w, path), tgt[sl])
                per_window[w] += float(kl.sum())
                same += float(top.sum())
                nll += float(q.sum())
                ref_nll += float(p.sum())
    return KLDivergence.from_sums(torch.from_numpy(per_window), same, nll, ref_nll, seqlen, time.time() - t0)


_GGML = None


def _ggml():
    """ggml's own library from the binding's folder, with the quantizer's signatures declared."""
    global _GGML
    if _GGML is None:
        _lib()
        import llama_cpp

        folder = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        names = sorted(f for f in os.listdir(folder) if f.startswith("libggml-base.") or f.startswith("ggml-base."))
        if not names:
            raise ImportError(f"ggml's library is not in {folder}: reinstall llama-cpp-python")
        lib = ctypes.CDLL(os.path.join(folder, names[0]))
        f32p = ctypes.POINTER(ctypes.c_float)
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, f32p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, f32p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        _GGML = lib
    return _GGML


def quantize_weight(W: torch.Tensor, spec, imatrix: Optional[torch.Tensor] = None, name: Optional[str] = None):
    """``W`` ``[out, in]`` rounded by llama.cpp's quantizer to ``spec``'s ggml type.

    ``imatrix`` ``[in]``: the importance of each input column (llama.cpp's ``imatrix``, the mean of
    ``x_j^2``); ``None`` rounds unweighted, as ``llama-quantize`` without ``--imatrix``. Returns a
    :class:`~gransearch.quantizer.QuantizedWeight` for the types that are gransearch codes (Q4_0,
    Q5_0, Q8_0, Q4_1, Q5_1: bit-exact codes, scales and offsets) and a :class:`~gransearch.export.gguf.GGMLWeight` for
    the K-quants.
    """
    from gguf import GGML_QUANT_SIZES

    from .export.gguf import GGMLWeight, decode, ggml_type, ggml_type_of

    t = ggml_type_of(spec)
    if t is None:
        raise ValueError(f"{spec} is not a ggml type: llama.cpp's quantizer makes w4g32s (Q4_0), w5g32s (Q5_0), w8g32s (Q8_0), "
                         "w4g32f (Q4_1), w5g32f (Q5_1), Q2_K..Q6_K, IQ4_NL and IQ4_XS")
    spec.check_shape(tuple(W.shape))
    qt = ggml_type(t)
    block, nb = GGML_QUANT_SIZES[qt]
    rows, n = (int(s) for s in W.shape)
    src = np.ascontiguousarray(W.detach().to("cpu", torch.float32).numpy())
    if not np.isfinite(src).all():
        from .errors import NonFiniteError

        raise NonFiniteError(f"{name or 'the weight'} holds NaN or infinity: llama.cpp cannot quantize it")
    dst = np.empty((rows, n // block * nb), dtype=np.uint8)
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix.detach().to("cpu", torch.float32).numpy().reshape(-1))
        if im.shape != (n,):
            raise ValueError(f"{name or 'the weight'}: the importance matrix has {im.size} entries, the rows {n}")
    lib = _ggml()
    lib.ggml_quantize_init(int(qt))
    f32p = ctypes.POINTER(ctypes.c_float)
    size = lib.ggml_quantize_chunk(int(qt), src.ctypes.data_as(f32p), dst.ctypes.data_as(ctypes.c_void_p), 0, rows, n,
                                   None if im is None else im.ctypes.data_as(f32p))
    if size != dst.nbytes:
        raise LlamaCppError(f"ggml_quantize_chunk wrote {size} bytes for {name or 'the weight'}, expected {dst.nbytes}")
    if getattr(spec, "is_ggml", False):
        return GGMLWeight(torch.from_numpy(dst), spec)
    return decode(dst, t, (rows, n))


def imatrix_from_stats(stats: dict, gguf_names: dict) -> dict:
    """llama.cpp's importance matrix from gransearch calibration statistics.

    llama.cpp's ``imatrix`` of a weight is, per input column, the mean of ``x_j^2`` over the
    calibration tokens: the diagonal of ``X^T X / n``. gransearch's Hessian is ``2/n X^T X``, so the
    imatrix is half its diagonal. ``stats``: ``{hf linear name: LayerStats}`` (with ``H``);
    ``gguf_names``: ``{hf linear name: gguf tensor name}``. Returns ``{gguf name: float32 [in]}``.
    """
    out = {}
    for name, st in stats.items():
        if getattr(st, "acc", None) is None or not st.n or name not in gguf_names:
            continue
        out[gguf_names[name]] = (torch.diagonal(st.acc).double() / st.n).float().cpu().numpy()  # diag(sum x x^T) / n
    return out


def quantize_file(src: str, dst: str, preset: str = "Q8_0", *, types: Optional[dict] = None, imatrix: Optional[dict] = None,
                  pure: bool = False, n_threads: Optional[int] = None, embd_type: Optional[str] = None,
                  output_type: Optional[str] = None) -> str:
    """Run llama.cpp's quantizer (``llama_model_quantize``) from ``src`` (an F32/F16 GGUF) to ``dst``.

    ``preset``: llama.cpp's mix (:data:`PRESETS`); ``types``: ``{gguf tensor name: ggml type name}``
    overrides, applied as anchored patterns (llama.cpp's ``--tensor-type``); ``imatrix``:
    ``{gguf tensor name: float32 [in]}`` importance per input column (:func:`imatrix_from_stats`);
    ``pure``: every tensor at the preset's base type. ``embd_type``/``output_type``: the token
    embedding's and output's types (llama.cpp's ``--token-embedding-type``/``--output-tensor-type``).
    llama.cpp itself falls back to another type where a row is not a multiple of a K-quant's 256
    weights; read the file to see what each tensor got.
    """
    lib = _lib()
    from gguf import GGMLQuantizationType

    if preset.upper() not in PRESETS:
        raise ValueError(f"unknown llama.cpp preset {preset!r}: use one of {', '.join(PRESETS)}")
    p = lib.llama_model_quantize_default_params()
    p.ftype = PRESETS[preset.upper()]
    p.nthread = n_threads or max(1, os.cpu_count() or 1)
    p.pure = pure
    keep = []  # ctypes buffers that must outlive the call
    if embd_type:
        p.token_embedding_type = int(GGMLQuantizationType[embd_type.upper()])
    if output_type:
        p.output_tensor_type = int(GGMLQuantizationType[output_type.upper()])
    if types:
        arr = (lib.llama_model_tensor_override * (len(types) + 1))()
        for i, (name, t) in enumerate(sorted(types.items())):
            pat = ("^" + re.escape(name) + "$").encode()
            keep.append(pat)
            arr[i].pattern = pat
            arr[i].type = int(GGMLQuantizationType[t.upper()])
        arr[len(types)].pattern = None
        keep.append(arr)
        p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_tensor_override))
    if imatrix:
        arr = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(v, dtype=np.float32)
            nm = name.encode()
            keep += [buf, nm]
            arr[i].name = nm
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))
    tmp = dst + ".tmp"
    rc = lib.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(p))
    if rc != 0:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise LlamaCppError(f"llama_model_quantize({src} -> {dst}, {preset}) failed with code {rc}")
    os.replace(tmp, dst)
    return dst
