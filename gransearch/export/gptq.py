"""Reading GPTQ-format checkpoints (GPTQModel, AutoGPTQ): ``qweight``, ``qzeros``, ``scales``, ``g_idx``.

So that a model quantized by GPTQModel is scored with gransearch's perplexity, read block by block
or inspected layer by layer, exactly as stored. Checked against GPTQModel 7.3's own packing and
dequantization (``benchmarks/read_gptqmodel.py`` reads checkpoints GPTQModel wrote; the tests here
write the layout by hand):

* ``qweight``: int32 ``[in*b/32, out]``, the unsigned codes ``c`` in ``[0, 2^b - 1]`` packed along
  the *input* dimension as one dense bit stream per column (element ``i`` starts at bit ``i*b``;
  3-bit elements straddle words), the same stream compressed-tensors packs along rows.
* ``scales``: ``[groups, out]`` (float16); ``qzeros``: int32 ``[groups, out*b/32]``, the zero points
  packed the same way along the *output* dimension; ``g_idx``: int32 ``[in]``, the group of each
  input column.
* ``w[o, i] = scales[g, o] * (c[i, o] - z[g, o])`` with ``g = g_idx[i]``: gransearch's
  ``w = (c - z) * scale`` with the grids transposed. A symmetric checkpoint (``sym``) stores
  ``z = 2^(b-1)``, which is what gransearch's symmetric specs mean, so it reads as one.
* ``checkpoint_format`` ``gptq`` (v1, the default GPTQModel writes and AutoGPTQ's only one) stores
  ``z - 1``; GPTQModel writes it by subtracting ``0x11111111`` (4-bit) from each packed int32 word
  and reads it back by adding that constant, so a zero point of 0 borrows from its neighbour and
  comes back exactly. gransearch reads it the same way: for 2, 4 and 8 bits the word-wise add,
  for 3 bits (fields straddle words) ``(field + 1) mod 2^b`` per field, as GPTQModel does.
  ``gptq_v2`` stores ``z`` itself.

``desc_act=True`` with groups: GPTQ quantized the columns in activation order and formed each group
of ``group_size`` consecutive columns *in that order*, so ``g_idx`` scatters a group's columns along
the row. Such a layer is read with its ``g_idx`` (:attr:`QuantizedWeight.g_idx
<gransearch.quantizer.QuantizedWeight>`): evaluated exactly, but not written again as
compressed-tensors or GGUF, which have no layout for it. A ``g_idx`` in order (``desc_act=False``,
GPTQModel's ``act_group_aware`` or ``static_groups``) is gransearch's own layout and is dropped;
per channel ``g_idx`` is all zeros. A ``g_idx`` whose groups do not each hold ``group_size`` columns
is refused.

Not read, each refused with the reason: other packing words than int32, GPTQModel's planar layouts
and other formats (``marlin``, ``bitblas`` ...), and groups that do not divide a layer's input width.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import get_module
from ..spec import PerChannel, PerGroup, QuantSpec
from .compressed_tensors import model_config, unpack_int32

__all__ = ["GPTQScheme", "quant_config", "parse_config", "stored_layers", "layer_from_tensors", "SUFFIXES"]

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
FORMATS = {"gptq": 1, "gptq_v2": 2}


def quant_config(folder: str) -> tuple[dict, dict, str]:
    """``(config.json, its quantization config, where that came from)``: config.json's
    ``quantization_config`` (any method), else AutoGPTQ's separate ``quantize_config.json`` (GPTQ),
    else ``{}``."""
    cfg, path = model_config(folder)
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and qc:
        return cfg, qc, path
    side = os.path.join(folder, "quantize_config.json")
    if os.path.isfile(side):
        with open(side, encoding="utf-8") as fh:
            return cfg, {"quant_method": "gptq", **json.load(fh)}, side
    return cfg, {}, path


@dataclass
class GPTQScheme:
    """A GPTQ checkpoint's quantization config, checked to be one gransearch reads, and its
    quantized layers as the safetensors headers list them: ``layers`` maps a layer name to its
    ``(qweight shape, scales shape)``."""

    bits: int
    group_size: int
    sym: bool
    version: int
    layers: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    suffixes = SUFFIXES

    def layer_spec(self, name: str, in_f: int, out_f: int) -> QuantSpec:
        """The spec of the stored layer ``name`` of a ``[out_f, in_f]`` linear: bits from the packed
        rows (GPTQModel's ``dynamic`` overrides may differ from the config's), groups from the scales."""
        (rows, cols), (n_groups, s_cols) = self.layers[name]
        if cols != out_f or s_cols != out_f or (rows * 32) % in_f:
            raise ValueError(f"{name}: qweight {(rows, cols)} and scales {(n_groups, s_cols)} do not fit a [{out_f}, {in_f}] linear")
        bits = rows * 32 // in_f
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"{name}: {bits}-bit codes; gransearch reads GPTQ's 2, 3, 4 and 8 bits")
        gran = group_granularity(name, n_groups, in_f, "GPTQModel")
        return QuantSpec(bits, gran, symmetric=self.sym)

    def resolve(self, model: nn.Module) -> dict[str, QuantSpec]:
        """``{linear name: spec}`` of ``model``'s layers the checkpoint stores quantized."""
        out = {}
        for name in self.layers:
            try:
                module = get_module(model, name)
            except AttributeError:
                raise ValueError(f"the checkpoint quantizes {name}, which the model does not have") from None
            if not isinstance(module, nn.Linear):
                raise ValueError(f"the checkpoint quantizes {name} ({type(module).__name__}); gransearch reads quantized linear "
                                 "layers only")
            out[name] = self.layer_spec(name, module.in_features, module.out_features)
        if not out:
            raise ValueError("the checkpoint stores no quantized layer (no *.qweight tensor)")
        return out

    def layer(self, tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec):
        return layer_from_tensors(tensors, name, spec, self.version)


def group_granularity(name: str, n_groups: int, in_f: int, tool: str):
    """Per channel for one group per row, else groups of ``in_f / n_groups`` columns; a partial last
    group (``n_groups`` not dividing ``in_f``) is refused, naming ``tool`` to load it with."""
    if n_groups == 1:
        return PerChannel()
    if in_f % n_groups == 0:
        return PerGroup(in_f // n_groups)
    raise ValueError(f"{name}: {n_groups} groups do not divide the {in_f} input columns evenly (a partial last group); "
                     f"gransearch's groups tile the row: load it with {tool}, or quantize with a group size that divides {in_f}")


def method_config(folder: str, method: str, what: str) -> tuple[dict, dict, str]:
    """:func:`quant_config` of a checkpoint whose ``quant_method`` is ``method``; refused, naming
    ``what`` it is not, otherwise."""
    cfg, qc, path = quant_config(folder)
    if str(qc.get("quant_method", "")).lower() != method:
        raise ValueError(f"{path}: not {what} checkpoint" + (f" (quant_method {qc.get('quant_method')!r})" if qc else ""))
    return cfg, qc, path


def parse_config(folder: str) -> tuple[dict, GPTQScheme]:
    """``(config.json, its scheme)`` of a GPTQ checkpoint, refused with the reason when it is one
    gransearch does not read (see the module docstring)."""
    cfg, qc, path = method_config(folder, "gptq", "a GPTQ")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{path}: checkpoint_format {fmt!r}; gransearch reads GPTQ's own layouts ({', '.join(FORMATS)}): "
                         "load it with GPTQModel")
    pack = str(qc.get("pack_dtype") or "int32").replace("torch.", "")
    if pack != "int32":
        raise ValueError(f"{path}: codes packed in {pack} words; gransearch reads int32 packing (GPTQModel's default)")
    bits, group_size = int(qc.get("bits", 4)), int(qc.get("group_size", -1))
    sym = bool(qc.get("sym", True))
    return cfg, GPTQScheme(bits, group_size, sym, FORMATS[fmt], stored_layers(folder))


def stored_layers(folder: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{layer: (qweight shape, scales shape)}`` of the packed layers the safetensors headers of
    ``folder`` list (GPTQ's and AWQ's tensor names), read without loading a tensor."""
    from safetensors import safe_open

    from ..offload import checkpoint_files

    layers: dict[str, list] = {}
    for tname, file in checkpoint_files(folder).items():
        stem, _, suffix = tname.rpartition(".")
        if suffix in ("qweight", "scales"):
            layers.setdefault(stem, [None, None, file])[0 if suffix == "qweight" else 1] = tname
    shapes = {}
    for stem, (qw, sc, file) in sorted(layers.items()):
        if qw is None or sc is None:
            raise ValueError(f"{folder}: {stem} has {'qweight' if qw else 'scales'} but not {'scales' if qw else 'qweight'}")
        with safe_open(file, framework="pt") as fh:
            shapes[stem] = (tuple(fh.get_slice(qw).get_shape()), tuple(fh.get_slice(sc).get_shape()))
    return shapes


def _v1_zeros(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The zero points of a v1 checkpoint (stored minus one), decoded as GPTQModel decodes them."""
    mask = (1 << bits) - 1
    if 32 % bits == 0:  # word-wise add of 1 in every field, carries included (GPTQModel's v1 -> v2)
        one = sum(1 << (bits * j) for j in range(32 // bits))
        words = (qzeros.to(torch.int64) & 0xFFFFFFFF) + one
        return unpack_int32(words & 0xFFFFFFFF, bits, n)
    return (unpack_int32(qzeros, bits, n).to(torch.int16) + 1).bitwise_and(mask).to(torch.uint8)


def layer_from_tensors(tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec, version: int = 1):
    """The :class:`~gransearch.quantizer.QuantizedWeight` GPTQ stores under ``name``: the codes,
    the scales in their stored dtype and (asymmetric) the zero points, exactly."""
    from ..quantizer import QuantizedWeight, group_index

    try:
        qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
    except KeyError as exc:
        raise ValueError(f"{name}: the checkpoint lacks {exc.args[0]}") from None
    bits = spec.bits
    in_f = qweight.shape[0] * 32 // bits
    out_f = scales.shape[1]
    n_groups = scales.shape[0]
    if tuple(qzeros.shape) != (n_groups, math.ceil(out_f * bits / 32)) or not scales.is_floating_point():
        raise ValueError(f"{name}: qzeros {tuple(qzeros.shape)} and scales {tuple(scales.shape)} ({scales.dtype}) do not fit a "
                         f"[{out_f}, {in_f}] {spec} layer")
    try:
        g_idx = group_index(tensors.get(f"{name}.g_idx"), in_f, n_groups)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    codes = unpack_int32(qweight, bits, in_f, dim=0).t().contiguous()
    zero = _v1_zeros(qzeros, bits, out_f) if version == 1 else unpack_int32(qzeros, bits, out_f)
    zero = zero.t().contiguous()
    if spec.symmetric:
        if bool((zero != 1 << (bits - 1)).any()):
            raise ValueError(f"{name}: the config says sym=True but the stored zero points are not all {1 << (bits - 1)}")
        zero = None
    return QuantizedWeight(codes, scales.t().contiguous(), zero, spec, g_idx)
