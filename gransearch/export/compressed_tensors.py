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
Layers whose groups are in activation order (a ``g_idx``) are read (``actorder="group"``, which
compressed-tensors 0.19 and later no longer load, and GPTQ's ``desc_act``) but not written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..arch import get_module
from ..spec import QuantSpec

log = logging.getLogger(__name__)

__all__ = ["pack_int32", "unpack_int32", "layer_tensors", "layer_from_tensors", "scheme_of",
           "quantization_config", "parse_config", "read_config", "CheckpointScheme"]

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
    if qw.g_idx is not None:
        raise ValueError(f"{name}: its groups are in activation order (a g_idx, read from a GPTQ desc_act or an old actorder='group' "
                         "checkpoint), which compressed-tensors no longer loads (actorder='group' was removed by 0.19): evaluate it "
                         "here, or quantize the float model with gransearch to export it")
    out_f, in_f = qw.shape
    try:
        scale = qw.scale_float16().cpu()
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    t = {f"{name}.weight_packed": pack_int32(qw.codes.cpu(), spec.bits),
         f"{name}.weight_scale": scale.reshape(spec.granularity.params_shape(out_f, in_f)).contiguous(),
         f"{name}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
    if not spec.symmetric:
        t[f"{name}.weight_zero_point"] = pack_int32(qw.zero.cpu(), spec.bits, dim=0)
    return t


def layer_from_tensors(tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec):
    """The :class:`~gransearch.quantizer.QuantizedWeight` stored under ``name`` (bit-identical codes,
    scales in their stored dtype: float16 from gransearch, the model's dtype from llm-compressor).
    Zero points are read packed along the output (compressed-tensors' layout) or, as older
    compressed-tensors wrote them, unpacked signed int8. A ``weight_g_idx`` (``actorder="group"``,
    which compressed-tensors wrote before 0.19 and no longer loads) is kept as the weight's
    ``g_idx``: column ``i`` takes the scale and zero point of group ``weight_g_idx[i]``."""
    from ..quantizer import QuantizedWeight, group_index

    try:
        out_f, in_f = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
    except KeyError as exc:
        raise ValueError(f"{name}: the checkpoint lacks {exc.args[0]}") from None
    want = spec.granularity.params_shape(out_f, in_f)
    if tuple(packed.shape) != (out_f, math.ceil(in_f * spec.bits / 32)) or tuple(scale.shape) != tuple(want) or not scale.is_floating_point():
        raise ValueError(f"{name}: packed codes {tuple(packed.shape)} and scales {tuple(scale.shape)} ({scale.dtype}) do not fit a "
                         f"[{out_f}, {in_f}] {spec} layer")
    codes = unpack_int32(packed, spec.bits, in_f)
    zp = tensors.get(f"{name}.weight_zero_point")
    mid = 1 << (spec.bits - 1)
    zero = None
    if spec.symmetric:
        if zp is not None and bool((zp != 0).any()):
            raise ValueError(f"{name}: the scheme is symmetric but its stored zero points are not all zero")
    elif zp is None:
        raise ValueError(f"{name}: the asymmetric scheme's weight_zero_point is missing")
    elif zp.dtype == torch.int32 and tuple(zp.shape) == (math.ceil(out_f * spec.bits / 32), want[1]):
        zero = unpack_int32(zp, spec.bits, out_f, dim=0)
    elif tuple(zp.shape) == tuple(want) and not zp.is_floating_point():
        z = zp.to(torch.int16) + mid
        if bool(((z < 0) | (z >= 2 * mid)).any()):
            raise ValueError(f"{name}: weight_zero_point holds values outside the signed {spec.bits}-bit range")
        zero = z.to(torch.uint8)
    else:
        raise ValueError(f"{name}: weight_zero_point {tuple(zp.shape)} ({zp.dtype}) fits neither the packed nor the unpacked layout")
    try:  # actorder="group" (compressed-tensors before 0.19): column i takes group weight_g_idx[i]'s parameters
        g_idx = group_index(tensors.get(f"{name}.weight_g_idx"), in_f, want[1], "weight_g_idx")
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return QuantizedWeight(codes, scale, zero, spec, g_idx)


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


# what a checkpoint may carry beside weight-only int schemes, and what reading it would need
_UNREAD = {"kv_cache_scheme": "a quantized KV cache", "sparsity_config": "sparse weights", "transform_config": "rotations (transforms)"}


@dataclass
class CheckpointScheme:
    """The ``quantization_config`` of a compressed-tensors checkpoint, checked to be one gransearch
    reads: weight-only ``pack-quantized`` int schemes per channel or group, nothing else.
    ``groups``: ``(targets, spec)`` in the config's order; ``ignore``: its ignore list."""

    groups: list[tuple[list[str], QuantSpec]]
    ignore: list[str]

    suffixes = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")  # a layer's tensors

    @property
    def specs(self) -> list[QuantSpec]:
        return [spec for _, spec in self.groups]

    def layer(self, tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec):
        """The stored layer ``name`` (:func:`layer_from_tensors`)."""
        return layer_from_tensors(tensors, name, spec)

    def _exact(self) -> Optional[dict[str, QuantSpec]]:
        """``{layer: spec}`` when every target is ``re:^<escaped name>$`` (what gransearch writes), else ``None``."""
        out = {}
        for targets, spec in self.groups:
            for t in targets:
                inner = t[4:-1] if t.startswith("re:^") and t.endswith("$") else None
                if inner is None or re.search(r"(?<!\\)[.*+?()\[\]{}|^$]", inner):
                    return None
                out[re.sub(r"\\(.)", r"\1", inner)] = spec
        return out

    def resolve(self, model: nn.Module) -> dict[str, QuantSpec]:
        """``{linear name: spec}`` of ``model``'s quantized layers, as compressed-tensors matches them:
        a target is a module's exact name, ``re:<pattern>`` (``re.match`` on the name) or a class name
        (``Linear``), the ignore list likewise; a module several groups match takes the most specific
        target's group (exact names, then patterns, then classes); matched modules without a weight
        (activations under a broad pattern) hold nothing and are passed over."""
        exact = self._exact()
        if exact is not None:  # gransearch's own targets: one lookup per layer
            for name in list(exact):
                try:
                    module = get_module(model, name)
                except AttributeError:
                    raise ValueError(f"the checkpoint quantizes {name}, which the model does not have") from None
                if any(_matches(name, module, t) for t in self.ignore):
                    del exact[name]
                elif not isinstance(module, nn.Linear):
                    raise ValueError(f"the checkpoint quantizes {name} ({type(module).__name__}); gransearch reads quantized "
                                     "linear layers only")
            return exact
        by_target: dict[str, QuantSpec] = {}
        for targets, spec in self.groups:
            for t in targets:
                by_target[t] = spec  # a later group's identical target wins, as in compressed-tensors
        names = sorted(t for t in by_target if not t.startswith("re:"))  # exact names and class names
        patterns = sorted(t for t in by_target if t.startswith("re:"))
        out: dict[str, QuantSpec] = {}
        for name, module in model.named_modules():
            if not name or any(_matches(name, module, t) for t in self.ignore):
                continue
            hit = next((t for t in names + patterns if _name_matches(name, t)), None)
            if hit is None:
                hit = next((t for t in names if _class_matches(module, t)), None)
            if hit is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                continue  # no weight (an activation a pattern also matches): nothing of it is stored
            if not isinstance(module, nn.Linear):
                raise ValueError(f"the checkpoint quantizes {name} ({type(module).__name__}, target {hit!r}); gransearch reads "
                                 "quantized linear layers only: load it with transformers")
            out[name] = by_target[hit]
        missing = [t for t in by_target if not any(_name_matches(n, t) or _class_matches(get_module(model, n), t) for n in out)]
        if not out:
            raise ValueError(f"no layer of the model matches the checkpoint's targets {list(by_target)}")
        if missing:
            log.warning("targets that match no quantized layer: %s", missing)
        return out


def _name_matches(name: str, target: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _class_matches(module: nn.Module, target: str) -> bool:
    return any(cls.__name__ == target for cls in type(module).__mro__)


def _matches(name: str, module: nn.Module, target: str) -> bool:
    return _name_matches(name, target) or _class_matches(module, target)


def model_config(folder: str) -> tuple[dict, str]:
    """``(config.json's contents, its path)`` of a model folder; a clear error where there is none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json: not a saved model folder")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh), path


def parse_config(folder: str) -> tuple[dict, CheckpointScheme]:
    """``(config.json, its scheme)`` of a compressed-tensors checkpoint, refused with the reason when
    it holds anything gransearch does not read (activation quantization, other formats, g_idx ...)."""
    cfg, path = model_config(folder)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else None
        raise ValueError(f"{path}: not a compressed-tensors checkpoint" + (f" (quant_method {method!r})" if method else ""))
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"{path}: quantization_status is {qc.get('quantization_status')!r}: only compressed checkpoints "
                         "(save_pretrained(..., save_compressed=True)) are read")
    for key, what in _UNREAD.items():
        if qc.get(key):
            raise ValueError(f"{path}: the checkpoint has {what} ({key}), which gransearch does not read: load it with transformers")
    groups = []
    for gname, group in (qc.get("config_groups") or {}).items():
        fmt = group.get("format") or qc.get("format")
        if fmt != FORMAT:
            raise ValueError(f"{path}: config group {gname} is in format {fmt!r}; gransearch reads {FORMAT} (int4/int8 weight-only): "
                             "load it with transformers")
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"{path}: config group {gname} quantizes activations; gransearch reads weight-only schemes: "
                             "load it with transformers")
        w = group.get("weights") or {}
        try:
            spec = spec_of(w)
        except ValueError as exc:
            raise ValueError(f"{path}: config group {gname}: {exc}") from None
        groups.append((list(group.get("targets") or []), spec))
    if not groups:
        raise ValueError(f"{path}: the quantization_config has no config groups")
    return cfg, CheckpointScheme(groups, list(qc.get("ignore") or []))


def read_config(folder: str, model: nn.Module) -> tuple[dict, dict[str, QuantSpec]]:
    """``(config.json, {layer name: spec})`` of a compressed-tensors ``pack-quantized`` checkpoint,
    its targets matched against ``model``'s modules: one gransearch wrote (exact layer names), or one
    another tool wrote (llm-compressor's ``Linear`` targets and ignore lists)."""
    cfg, scheme = parse_config(folder)
    return cfg, scheme.resolve(model)
