"""GGUF: llama.cpp's file format, one ggml type per tensor.

A GGUF written here holds, per tensor, one of llama.cpp's block types (``ggml`` types). The legacy
*symmetric* types are exactly gransearch specs, so every method (RTN, GPTQ, AWQ, AWQ+GPTQ) can
produce them and the codes are written unchanged:

=========  ============  ==========================================================  =======
ggml type  spec          one block of 32 weights                                     bytes
=========  ============  ==========================================================  =======
``Q4_0``   ``w4g32s``    float16 ``d``; 16 bytes: ``q[j] | q[j+16] << 4``            18
``Q5_0``   ``w5g32s``    float16 ``d``; uint32 of the 5th bits; 16 bytes of low nibbles  22
``Q8_0``   ``w8g32s``    float16 ``d``; 32 int8                                       34
``Q4_1``   ``w4g32f``    float16 ``d``, float16 ``m``; 16 bytes as ``Q4_0``             20
``Q5_1``   ``w5g32f``    float16 ``d``, float16 ``m``; the rest as ``Q5_0``             24
=========  ============  ==========================================================  =======

The weight is ``d * (q - 2**(b-1))`` in both libraries: gransearch's symmetric code ``c`` with its
implied zero point ``2**(b-1)`` *is* ggml's unsigned ``q`` (Q4_0, Q5_0), and ggml's signed Q8_0
value is ``c - 128``. Our scale is ggml's ``d`` (both float16). Only the scale each chooses differs
(ggml: ``d = -max/2**(b-1)`` from the signed extreme; gransearch: ``2*amax/(2**b - 1)``, or the
clip ratio a method picked); llama.cpp reads any ``d``. ``Q4_1``/``Q5_1`` are the *float-offset*
specs: ``w = d * q + m`` in both libraries, with gransearch's float16 offset as ggml's ``m``.

Other types (the K-quants with 256-weight super-blocks; ``IQ4_NL``/``IQ4_XS``) are
:class:`~gransearch.spec.GGMLSpec`: only llama.cpp's own quantizer makes them (method
``llamacpp``), they are kept as raw blocks (:class:`GGMLWeight`) and dequantized with the ``gguf``
package.

Tensor names and layouts follow llama.cpp's converter: for ``llama``-family models the rows of
``q_proj``/``k_proj`` are permuted head by head (``permute_qk``); the row permutation moves whole
rows, so codes and scales move with them unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..quantizer import QuantizedWeight
from ..spec import GGML_TYPES, GGMLSpec, PerGroup, QuantSpec

log = logging.getLogger(__name__)

__all__ = [
    "SPEC_OF_TYPE",
    "TYPE_OF_SPEC",
    "ggml_type_of",
    "ggml_nbytes",
    "encode",
    "decode",
    "permute_qk",
    "unpermute_qk",
    "save_gguf",
    "SavedGGUF",
    "GGMLWeight",
    "gguf_float_nbytes",
    "GGUF_ARCHS",
    "gguf_names",
    "round_embeddings",
    "llamacpp_activations",
]

# gransearch spec <-> ggml type, for the types whose codes gransearch writes unchanged
SPEC_OF_TYPE = {
    "Q4_0": QuantSpec(4, PerGroup(32), symmetric=True),
    "Q5_0": QuantSpec(5, PerGroup(32), symmetric=True),
    "Q8_0": QuantSpec(8, PerGroup(32), symmetric=True),
    "Q4_1": QuantSpec(4, PerGroup(32), float_zero=True),
    "Q5_1": QuantSpec(5, PerGroup(32), float_zero=True),
}
TYPE_OF_SPEC = {str(s): t for t, s in SPEC_OF_TYPE.items()}

# HF model_type -> GGUF architecture written for it without a source GGUF (llama-family only)
GGUF_ARCHS = {"llama": "llama"}
# how llama.cpp's converter changes HF tensors, per GGUF architecture: q/k rows permuted head by head
# (llama's rotary layout), and a constant added to norm weights (Gemma stores 1 + w)
GGUF_LAYOUT = {"llama": {"permute_qk": True, "norm_offset": 0.0}, "gemma3": {"permute_qk": False, "norm_offset": 1.0}}


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a dependency of the assets/dev extras
        raise ImportError("GGUF needs the gguf package: pip install gguf") from exc
    return gguf


def ggml_type(name: str):
    """The ``gguf.GGMLQuantizationType`` called ``name`` (``"Q4_0"``, ``"F32"``, ``"Q6_K"``...)."""
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r}: use one of {', '.join(t.name for t in gguf.GGMLQuantizationType)}") from None


def ggml_type_of(spec) -> Optional[str]:
    """The ggml type of ``spec``: the one that stores its codes unchanged (``w4g32s`` -> ``Q4_0``), a
    :class:`~gransearch.spec.GGMLSpec`'s own (``Q3_K``), else ``None``."""
    if getattr(spec, "is_ggml", False):
        return spec.type
    return TYPE_OF_SPEC.get(str(spec))


@dataclass
class GGMLWeight:
    """A weight in a ggml block type gransearch has no code grid for (K-quants): the raw blocks,
    ``uint8 [out, bytes per row]``, as llama.cpp's quantizer wrote them. Dequantized by the ``gguf``
    package (its reference dequantizers mirror ggml's)."""

    raw: torch.Tensor
    spec: GGMLSpec

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.raw.shape[0]), int(self.raw.shape[1]) * self.spec.block // GGML_TYPES[self.spec.type][1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = _gguf().quants.dequantize(self.raw.cpu().numpy(), ggml_type(self.spec.type))
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(self.shape).to(self.raw.device, dtype)

    def packed(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.raw.contiguous()}

    @classmethod
    def from_packed(cls, buffers: dict, spec: GGMLSpec, shape: tuple[int, int]) -> "GGMLWeight":
        w = cls(buffers["qweight"].to(torch.uint8), spec)
        if w.shape != tuple(shape):
            raise ValueError(f"{spec} blocks of shape {tuple(buffers['qweight'].shape)} do not hold a [{shape[0]}, {shape[1]}] weight")
        return w

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def to(self, device) -> "GGMLWeight":
        return GGMLWeight(self.raw.to(device), self.spec)


def ggml_nbytes(shape: tuple[int, ...], type_name: str) -> int:
    """Bytes a tensor of ``shape`` (``[out, in]``: rows of ``in`` weights) occupies as ``type_name``.

    Blocks run along the row: ``in`` must be a multiple of the type's block size (32, or 256 for
    K-quants). ``ggml_nbytes((576, 576), "Q4_0")`` is ``576 * 18 * 18 = 186,624``.
    """
    gguf = _gguf()
    t = ggml_type(type_name)
    block, nb = gguf.GGML_QUANT_SIZES[t]
    n_per_row = int(shape[-1])
    if n_per_row % block:
        raise ValueError(f"{type_name} stores rows in blocks of {block} weights; a row of {n_per_row} is not a multiple: "
                         f"use a type with blocks of 32 (Q4_0, Q5_0, Q8_0) or keep the tensor in F16/F32")
    rows = math.prod(int(s) for s in shape[:-1])
    return rows * (n_per_row // block) * nb


def encode(q: QuantizedWeight) -> np.ndarray:
    """The ggml blocks of a quantized weight whose spec is a ggml type (:data:`TYPE_OF_SPEC`):
    ``uint8 [out, bytes per row]``, exactly what llama.cpp reads."""
    t = ggml_type_of(q.spec)
    if t is None:
        raise ValueError(f"{q.spec} has no ggml type: GGUF takes {', '.join(f'{s} ({t})' for s, t in TYPE_OF_SPEC.items())}")
    out_f, in_f = q.shape
    nblk = in_f // 32
    c = q.codes.to("cpu", torch.uint8).numpy().reshape(out_f * nblk, 32)
    d = q.scale_float16().cpu().numpy().reshape(out_f * nblk, 1).view(np.uint8)  # [n, 2]
    if t in ("Q4_1", "Q5_1"):  # the float16 minimum follows d; the codes are laid out as Q4_0/Q5_0's
        d = np.concatenate([d, q.zero.to("cpu", torch.float16).numpy().reshape(out_f * nblk, 1).view(np.uint8)], axis=1)
    if t == "Q8_0":
        qs = (c.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([d, qs], axis=1)
    elif t in ("Q4_0", "Q4_1"):
        qs = c[:, :16] | (c[:, 16:] << np.uint8(4))
        blocks = np.concatenate([d, qs], axis=1)
    else:  # Q5_0, Q5_1
        qh = np.packbits((c >> np.uint8(4)) & np.uint8(1), axis=1, bitorder="little")  # [n, 4]: bit j = 5th bit of q[j]
        lo = c & np.uint8(15)
        qs = lo[:, :16] | (lo[:, 16:] << np.uint8(4))
        blocks = np.concatenate([d, qh, qs], axis=1)
    return np.ascontiguousarray(blocks.reshape(out_f, -1))


def decode(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedWeight:
    """The :class:`QuantizedWeight` stored in ggml blocks ``raw`` (the inverse of :func:`encode`)."""
    spec = SPEC_OF_TYPE.get(type_name.upper())
    if spec is None:
        raise ValueError(f"{type_name} is not one of the types gransearch reads as codes ({', '.join(SPEC_OF_TYPE)})")
    out_f, in_f = shape
    type_name = type_name.upper()
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out_f * (in_f // 32), -1)
    d = b[:, :2].copy().view(np.float16).reshape(out_f, in_f // 32)
    zero = None
    if spec.float_zero:  # Q4_1, Q5_1: the float16 minimum, then the Q4_0/Q5_0 layout
        zero = torch.from_numpy(b[:, 2:4].copy().view(np.float16).reshape(out_f, in_f // 32))
        b = b[:, 2:]
    if type_name == "Q8_0":
        c = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    elif spec.bits == 4:
        qs = b[:, 2:]
        c = np.concatenate([qs & 15, qs >> 4], axis=1)
    else:
        qh = np.unpackbits(b[:, 2:6], axis=1, bitorder="little")  # [n, 32]
        qs = b[:, 6:]
        c = np.concatenate([qs & 15, qs >> 4], axis=1) | (qh << 4)
    codes = torch.from_numpy(c.reshape(out_f, in_f).astype(np.uint8))
    return QuantizedWeight(codes, torch.from_numpy(d.copy()), zero, spec)


def gguf_names(model: nn.Module, arch: str = "llama") -> dict:
    """``{HF linear name: GGUF tensor name}`` for the model's linears (llama.cpp's tensor map)."""
    gguf = _gguf()
    from ..arch import model_linears

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(arch_enum, model.config.num_hidden_layers)
    return {r.name: tmap.get_name(f"{r.name}.weight", try_suffixes=(".weight",)) for r in model_linears(model)}


def _qk_view(n_rows: int, n_head: int) -> tuple[int, int]:
    if n_rows % (2 * n_head):
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of rotary pairs")
    return n_head, n_rows // n_head // 2


def permute_qk(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF row order -> llama.cpp's for a ``q``/``k`` weight (rows ``[n_head * head_dim, ...]``):
    within each head, the two rotary halves are interleaved (llama.cpp's converter does this)."""
    h, half = _qk_view(t.shape[0], n_head)
    return t.reshape(h, 2, half, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_qk(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`."""
    h, half = _qk_view(t.shape[0], n_head)
    return t.reshape(h, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _permute_rows_q(q, n_head: int):
    if isinstance(q, GGMLWeight):  # each row is its own blocks: rows move whole
        return GGMLWeight(permute_qk(q.raw, n_head), q.spec)
    zero = None if q.zero is None else permute_qk(q.zero, n_head)
    return QuantizedWeight(permute_qk(q.codes, n_head), permute_qk(q.scale, n_head), zero, q.spec)


def _float_type_bytes(t: torch.Tensor, type_name: str) -> int:
    return ggml_nbytes(tuple(t.shape) if t.dim() > 1 else (1, t.numel()), type_name)


def gguf_float_nbytes(model: nn.Module, exclude: Optional[set] = None, embd_type: str = "Q8_0", float_type: str = "F32") -> int:
    """Bytes of the tensors a GGUF stores for ``model``'s parameters outside the linears in
    ``exclude``: 1-D tensors (norms, biases) in F32 as llama.cpp keeps them, the token embedding
    (and an untied output head) as ``embd_type``, other 2-D floats (unquantized linears) as
    ``float_type``. Tied tensors count once."""
    exclude = exclude or set()
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_ids = {id(emb.weight)} | ({id(head.weight)} if head is not None else set())
    seen, total = set(), 0
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if (mname in exclude and pname == "weight") or id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() < 2:
                total += 4 * p.numel()
            else:
                total += _float_type_bytes(p, embd_type if id(p) in embed_ids else float_type)
    return total


@dataclass
class SavedGGUF:
    """What :func:`save_gguf` wrote: the path, the tensors' bytes (the budget's count: every tensor's
    data, no header, no alignment padding), the file's bytes, and each tensor's ggml type."""

    path: str
    tensor_nbytes: int
    file_nbytes: int
    types: dict


def _copy_metadata(writer, reader, skip: set) -> None:
    gguf = _gguf()
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)


def _arch_metadata(writer, model: nn.Module, arch: str) -> None:
    """The hyperparameters llama.cpp needs for a llama-family model, from its HF config."""
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(getattr(c, "max_position_embeddings", 2048))
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(c.vocab_size)


def _ids_only_vocab(writer, vocab_size: int) -> None:
    """A placeholder SentencePiece-style vocabulary: llama.cpp then scores token ids (perplexity)
    but cannot turn text into the model's tokens."""
    gguf = _gguf()
    toks = ["<unk>", "<s>", "</s>"] + [f"<tok{i}>" for i in range(3, vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(toks[:vocab_size])
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types([int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.NORMAL)] * (vocab_size - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)


def _hf_bpe_vocab(writer, tokenizer, vocab_size: int) -> bool:
    """The model's byte-level BPE tokenizer as llama.cpp's ``gpt2`` vocabulary (tokens by id, merges,
    special ids). ``False`` when the tokenizer is not byte-level BPE with merges (SentencePiece,
    WordPiece..., or no merges, which llama.cpp refuses)."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    doc = json.loads(backend.to_str())
    if (doc.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(doc.get("pre_tokenizer")):
        return False
    if not doc["model"].get("merges"):
        return False  # llama.cpp refuses a BPE vocabulary without merges
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    toks = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    special = set(getattr(tokenizer, "all_special_ids", []))
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL)
             for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(toks)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id)):
        if tid is not None:
            setter(int(tid))
    writer.add_add_bos_token(False)
    return True


def _float_tensor(t: torch.Tensor, type_name: str) -> tuple[np.ndarray, object]:
    gguf = _gguf()
    a = t.detach().to("cpu", torch.float32).contiguous().numpy()
    qt = ggml_type(type_name)
    if qt == gguf.GGMLQuantizationType.F32:
        return a, None
    if qt == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16), None
    try:
        return gguf.quants.quantize(a, qt), qt
    except NotImplementedError:
        raise ValueError(f"the gguf package cannot write {type_name} from float weights: use F32, F16, Q8_0, Q4_0 or Q5_0") from None


def _gguf_tensors(model: nn.Module, arch: str, embd_type: str, float_type: str, verbose: bool) -> dict:
    """``{gguf name: (data, raw ggml type or None, type name)}`` for every tensor of ``model``, in the
    layout llama.cpp's converter gives ``arch`` (:data:`GGUF_LAYOUT`)."""
    from tqdm.auto import tqdm

    from ..qlinear import QuantLinear

    gguf = _gguf()
    permute, norm_offset = GGUF_LAYOUT[arch]["permute_qk"], GGUF_LAYOUT[arch]["norm_offset"]
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, model.config.num_hidden_layers)
    n_head = model.config.num_attention_heads
    n_kv = getattr(model.config, "num_key_value_heads", None) or n_head
    head = model.get_output_embeddings()
    embed_ids = {id(model.get_input_embeddings().weight)} | ({id(head.weight)} if head is not None else set())
    entries: list[tuple[str, str, object]] = []  # (HF name, module name, QuantLinear or parameter)
    seen: set = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            entries.append((f"{mname}.weight", mname, mod))
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:  # a tied tensor is written once, under its first name
                seen.add(id(p))
                entries.append((f"{mname}.{pname}", mname, p))
    tensors: dict[str, tuple[np.ndarray, object, str]] = {}
    for hf, mname, obj in tqdm(entries, desc="gguf", disable=not verbose, leave=False):
        gname = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"no GGUF name for {hf!r} in llama.cpp's {arch} tensor map")
        leaf = mname.rsplit(".", 1)[-1]
        qk_heads = (n_head if leaf == "q_proj" else n_kv if leaf == "k_proj" else None) if permute and hf.endswith(".weight") else None
        if isinstance(obj, QuantLinear):
            q = obj.quantized_weight()
            if getattr(q, "g_idx", None) is not None:
                raise ValueError(f"{mname}: its groups are in activation order (a g_idx, from a GPTQ desc_act or actorder='group' checkpoint), which GGUF's "
                                 "blocks of consecutive columns cannot store: quantize the float model for GGUF instead")
            t = ggml_type_of(q.spec)
            if t is None:
                raise ValueError(f"{mname} is quantized as {q.spec}, which GGUF cannot store: quantize GGUF layers with "
                                 f"{', '.join(TYPE_OF_SPEC)} (search with profile='gguf')")
            q = _permute_rows_q(q, qk_heads) if qk_heads else q
            tensors[gname] = (q.raw.cpu().numpy() if isinstance(q, GGMLWeight) else encode(q), ggml_type(t), t)
            continue
        w = obj.detach()
        if qk_heads:
            w = permute_qk(w, qk_heads)
        if norm_offset and w.dim() == 1 and "norm" in leaf:
            w = w.float() + norm_offset
        tname = "F32" if w.dim() < 2 else (embd_type if id(obj) in embed_ids else float_type)
        data, raw = _float_tensor(w, tname)
        tensors[gname] = (data, raw, tname)
    return tensors


def _source_order(reader, tensors: dict) -> list:
    """The source GGUF's tensor order; ``ValueError`` unless the model has exactly its tensors and shapes."""
    gguf = _gguf()
    src_names = [t.name for t in reader.tensors]
    missing = sorted(set(src_names) - set(tensors))
    extra = sorted(set(tensors) - set(src_names))
    if missing or extra:
        raise ValueError(f"the model does not match its source GGUF: missing {missing[:5]}, not in the source {extra[:5]}")
    for t in reader.tensors:  # GGUF lists shapes innermost first
        want = tuple(int(s) for s in t.shape)
        data, raw, _ = tensors[t.name]
        have = tuple(reversed(data.shape)) if raw is None else tuple(gguf.quant_shape_from_byte_shape(tuple(data.shape), raw)[::-1])
        if have != want:
            raise ValueError(f"{t.name}: the model's shape {tuple(reversed(have))} differs from the source's {tuple(reversed(want))}")
    return src_names


def save_gguf(model: nn.Module, path: str, *, source: Optional[str] = None, tokenizer=None, embd_type: str = "Q8_0",
              float_type: str = "F32", verbose: bool = True) -> SavedGGUF:
    """Write ``model`` (quantized by :func:`gransearch.quantize` with GGUF specs, or partly/not at all)
    as a GGUF file llama.cpp loads.

    ``source``: the GGUF the model came from (``"smollm2-135m"`` or a path); its metadata and
    tokenizer are copied and its tensor names and order are kept. Without it, ``llama``-family
    models get their hyperparameters from the HF config and the vocabulary of ``tokenizer`` when it
    is byte-level BPE (GPT-2 style, as llama.cpp's ``gpt2`` model; other tokenizers, and no
    tokenizer, give a placeholder vocabulary: llama.cpp then scores token ids but cannot tokenize
    text). With a source, ``gemma3`` is written too (its norms as ``1 + w``, as llama.cpp stores
    them). Other architectures raise ``ValueError``.

    Quantized linears are written in the ggml type of their spec (:data:`TYPE_OF_SPEC`); linears
    left in float as ``float_type``; the token embedding (and an untied ``output``) as ``embd_type``,
    rounded by the ``gguf`` package's reference quantizer (llama.cpp's own for these types);
    norms in F32. Use :func:`round_embeddings` first so that the torch model computes with the
    embedding the file stores.
    """
    gguf = _gguf()
    from ..models import PACKAGED_MODELS, packaged_gguf

    mtype = getattr(model.config, "model_type", None)
    reader = None
    if source is not None:
        src = packaged_gguf(source) if source in PACKAGED_MODELS else source
        if not os.path.exists(src):
            raise FileNotFoundError(f"source GGUF {src!r} does not exist")
        reader = gguf.GGUFReader(src)
        arch = str(reader.fields["general.architecture"].contents())
    elif mtype in GGUF_ARCHS:
        arch = GGUF_ARCHS[mtype]
    else:
        raise ValueError(f"writing GGUF for model_type {mtype!r} needs its source GGUF (source=...); "
                         f"without one only {', '.join(GGUF_ARCHS)} models are written")
    if arch not in GGUF_LAYOUT:
        raise ValueError(f"GGUF architecture {arch!r} is not written yet (its tensor layout differs from HF's): "
                         f"supported: {', '.join(GGUF_LAYOUT)}")
    tensors = _gguf_tensors(model, arch, embd_type, float_type, verbose)
    order = list(tensors) if reader is None else _source_order(reader, tensors)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    if reader is not None:
        # general.file_type is left out: llama.cpp guesses it from the tensors (a mix has no one type)
        _copy_metadata(writer, reader, skip={"general.architecture", "general.file_type"})
    else:
        _arch_metadata(writer, model, arch)
        if tokenizer is None or not _hf_bpe_vocab(writer, tokenizer, model.config.vocab_size):
            if tokenizer is not None:
                log.warning("the tokenizer is not byte-level BPE with merges: %s gets a placeholder vocabulary (llama.cpp scores token ids only)", path)
            _ids_only_vocab(writer, model.config.vocab_size)
    writer.add_string("general.quantized_by", "gransearch")
    total = 0
    for name in order:
        data, raw, _ = tensors[name]
        total += data.nbytes
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    os.replace(tmp, path)
    return SavedGGUF(path, total, os.path.getsize(path), {n: tensors[n][2] for n in order})


@torch.no_grad()
def _as_stored(w: torch.Tensor, type_name: str) -> np.ndarray:
    """float32 ``w`` as a GGUF stores it in ``type_name``: quantized and dequantized by the ``gguf`` package."""
    data, raw = _float_tensor(w, type_name)
    back = data.astype(np.float32) if raw is None else _gguf().quants.dequantize(data, raw)
    return np.ascontiguousarray(back).reshape(tuple(w.shape))


def embeddings_rounded(model: nn.Module, embd_type: str = "Q8_0") -> bool:
    """Whether the token embedding already holds what a GGUF stores as ``embd_type``."""
    if embd_type.upper() == "F32":
        return True
    w = model.get_input_embeddings().weight
    return bool(np.array_equal(_as_stored(w, embd_type), w.detach().float().cpu().numpy()))


@torch.no_grad()
def round_embeddings(model: nn.Module, embd_type: str = "Q8_0") -> None:
    """Replace the token embedding (and an untied output head) by what a GGUF stores as ``embd_type``
    (quantized and dequantized by the ``gguf`` package), so that torch and llama.cpp compute with
    the same values. F32 changes nothing."""
    if embd_type.upper() == "F32":
        return
    mods = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not mods[0].weight:
        mods.append(head)
    for m in mods:
        m.weight.copy_(torch.from_numpy(_as_stored(m.weight, embd_type)).to(m.weight.dtype))


def _q8_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``x`` rounded as llama.cpp's CPU matmuls round activations for quantized weights: blocks of
    ``block`` along the last dimension, ``d = max|x| / 127``, ``q = round(x / d)``. Legacy types
    (blocks of 32) pair with ``Q8_0``, whose ``d`` is stored in float16; K-quants (256) with ``Q8_K``,
    whose ``d`` stays float32."""
    shape = x.shape
    xb = x.float().reshape(-1, shape[-1] // block, block)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv).clamp(-127, 127)
    if block == 32:
        d = d.to(torch.float16).float()
    return (q * d).reshape(shape).to(x.dtype)


@contextlib.contextmanager
def llamacpp_activations(model: nn.Module, embd_type: str = "Q8_0"):
    """Within this block, ``model`` rounds the inputs of the matmuls whose weights a GGUF stores in
    a block type (every quantized linear, and the tied or untied output head when ``embd_type`` is
    one) as llama.cpp's CPU dot products do (:func:`_q8_blocks`: ``Q8_0``/``Q8_1`` for the types
    in blocks of 32, ``Q8_K`` for those in blocks of 256). This isolates what llama.cpp's arithmetic adds to the perplexity of
    the same weights."""
    from ..qlinear import QuantLinear

    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if embd_type.upper() not in ("F32", "F16", "BF16") and model.get_output_embeddings() is not None:
        mods.append(model.get_output_embeddings())
    def hook(mod, args):
        block = 256 if getattr(getattr(mod, "spec", None), "block", 32) >= 256 else 32  # Q8_K for 256-blocks, else Q8_0/Q8_1
        return (_q8_blocks(args[0], block),) + tuple(args[1:])

    hooks = [m.register_forward_pre_hook(hook) for m in mods]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
