"""The compressed-tensors ``pack-quantized`` checkpoint: what transformers and vLLM load.

How a gransearch layer maps to compressed-tensors (checked against compressed-tensors 0.20's
``pack_to_int32``/``unpack_from_int32`` and its int quantizer, and proven by transformers loading
the files in ``tests/test_export.py``):

* compressed-tensors quantizes to *signed* integers ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` with a
  signed zero point ``zp``: ``w = (q - zp) * scale``. gransearch stores unsigned codes ``c`` in
  ``[0, 2^b - 1]`` and unsigned zeros ``z`` (symmetric specs: ``z = 2^(b-1)``):
  ``w = (c - z) * scale``. So ``q = c - 2^(b-1)`` and ``zp = z - 2^(b-1)`` (``0`` when symmetric).
* ``pack_to_int32`` adds the offset ``2^(b-1)`` back before packing, so the stored bits are our
  codes ``c``, densely: element ``i`` of a row starts at bit ``i*b`` of the row's int32 words
  (little-endian bit order, elements may straddle words), ``ceil(in*b/32)`` words per row.
* ``weight_zero_point`` (asymmetric specs) is the ``[out, groups]`` grid of ``zp + 2^(b-1) = z``
  packed the same way *along the output dimension*: ``[ceil(out*b/32), groups]`` int32.
* ``weight_scale``: ``[out, 1]`` per channel, ``[out, in/g]`` per group, written as float16 (our
  scales are float16-exact; ``scale_dtype`` says so in the config); ``weight_shape``: int64
  ``[out, in]``.

Per-tensor specs have no packed zero-point layout there and no vLLM kernel: they are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import torch

from ..spec import QuantSpec

__all__ = ["pack_int32", "unpack_int32", "layer_tensors", "layer_from_tensors", "scheme_of",
           "quantization_config"]

FORMAT = "pack-quantized"


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned ``bits``-bit codes ``[rows, cols]`` packed densely along ``dim`` into int32 words."""
    v = codes.to(torch.int64)
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    words = math.ceil(cols * bits / 32)
    pos = torch.arange(cols, dtype=torch.int64) * bits  # first bit of each element
    word, off = pos // 32, pos % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand(rows, -1), (v << off) & 0xFFFFFFFF)
    spill = off + bits > 32  # the element's high bits continue in the next word
    if bool(spill.any()):
        out.scatter_add_(1, (word[spill] + 1).expand(rows, -1), v[:, spill] >> (32 - off[spill]))
    out = out[:, :words]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # the same 32 bits, as int32
    return (out.t() if dim == 0 else out).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``n`` unsigned codes per row (or per column when ``dim=0``)."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.int64)], 1)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    val = (w[:, word] >> off) | (w[:, word + 1] << (32 - off))
    codes = (val & ((1 << bits) - 1)).to(torch.uint8)
    return (codes.t() if dim == 0 else codes).contiguous()


def _check(spec: QuantSpec, name: str) -> None:
    if getattr(spec, "float_zero", False):
        raise ValueError(f"{name}: {spec} has a float offset (llama.cpp's Q4_1/Q5_1 layout); compressed-tensors stores integer "
                         "zero points: use an integer-zero spec (w4g32) for compressed-tensors, or write a GGUF (save_gguf)")
    if spec.granularity.spans_rows:
        raise ValueError(f"{name}: per-tensor {spec} has no compressed-tensors pack-quantized layout (and no vLLM kernel); "
                         "use per-channel or groups (the 'vllm' search profile never proposes it)")


def layer_tensors(name: str, qw) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (a :class:`~gransearch.quantizer.QuantizedWeight`)."""
    spec = qw.spec
    _check(spec, name)
    out_f, in_f = qw.shape
    t = {f"{name}.weight_packed": pack_int32(qw.codes.cpu(), spec.bits),
         f"{name}.weight_scale": qw.scale.cpu().to(torch.float16).reshape(spec.granularity.params_shape(out_f, in_f)).contiguous(),
         f"{name}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
    if not spec.symmetric:
        t[f"{name}.weight_zero_point"] = pack_int32(qw.zero.cpu(), spec.bits, dim=0)
    return t


def layer_from_tensors(tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec):
    """The :class:`~gransearch.quantizer.QuantizedWeight` stored under ``name`` (bit-identical codes)."""
    from ..quantizer import QuantizedWeight

    out_f, in_f = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
    codes = unpack_int32(tensors[f"{name}.weight_packed"], spec.bits, in_f)
    scale = tensors[f"{name}.weight_scale"].to(torch.float16)
    zero = None
    if not spec.symmetric:
        zero = unpack_int32(tensors[f"{name}.weight_zero_point"], spec.bits, out_f, dim=0)
    return QuantizedWeight(codes, scale, zero, spec)


def scheme_of(spec: QuantSpec) -> dict:
    """The compressed-tensors ``weights`` quantization arguments of ``spec``."""
    grouped = spec.granularity.grouped
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": "group" if grouped else "channel",
            "group_size": spec.granularity.size if grouped else None, "dynamic": False, "actorder": None,
            "scale_dtype": "torch.float16", "zp_dtype": None if spec.symmetric else "torch.int8", "observer": "minmax"}


def spec_of(weights: dict) -> QuantSpec:
    """The gransearch spec of a compressed-tensors ``weights`` scheme (channel or group, int)."""
    from ..spec import PerChannel, PerGroup

    if weights.get("type", "int") != "int" or weights.get("strategy") not in ("channel", "group"):
        raise ValueError(f"only int channel/group pack-quantized schemes are read, got {weights}")
    gran = PerGroup(int(weights["group_size"])) if weights["strategy"] == "group" else PerChannel()
    return QuantSpec(int(weights["num_bits"]), gran, symmetric=bool(weights.get("symmetric", True)))


def quantization_config(layers: dict[str, QuantSpec], ignore: list[str]) -> dict:
    """``quantization_config``: one config group per distinct spec, targeting its layers by
    anchored regex of their exact names; ``ignore``: the linears left in floating point."""
    groups: dict[str, dict] = {}
    by_spec: dict[str, list[str]] = {}
    for name, spec in layers.items():
        by_spec.setdefault(str(spec), []).append(name)
    for i, (text, names) in enumerate(sorted(by_spec.items())):
        spec = layers[names[0]]
        groups[f"group_{i}"] = {"targets": [f"re:^{re.escape(n)}$" for n in names], "weights": scheme_of(spec),
                                "input_activations": None, "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def read_config(folder: str) -> tuple[dict, dict[str, QuantSpec]]:
    """``(config.json, {layer name: spec})`` of a checkpoint written by :func:`gransearch.save_quantized`."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json: not a saved model folder")
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors" or qc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a compressed-tensors {FORMAT} checkpoint")
    layers = {}
    for group in qc["config_groups"].values():
        spec = spec_of(group["weights"])
        for t in group["targets"]:
            if not t.startswith("re:^") or not t.endswith("$"):
                raise ValueError(f"{path}: target {t!r} is not an exact layer name (gransearch writes re:^name$)")
            layers[re.sub(r"\\(.)", r"\1", t[4:-1])] = spec
    return cfg, layers
