"""Reading AWQ checkpoints in AutoAWQ's GEMM layout (AutoAWQ, GPTQModel's AWQ export, llm-awq
converted): ``qweight``, ``qzeros``, ``scales``.

So that a model quantized with AWQ elsewhere is scored with gransearch's perplexity, read block by
block, or set beside gransearch's own AWQ. Checked against GPTQModel 7.3's own AWQ packing and
dequantization (``benchmarks/read_gptqmodel.py``, its ``awq`` rows, reads checkpoints GPTQModel
wrote; the tests here write the layout by hand):

* ``qweight``: int32 ``[in, out*b/32]``: unlike GPTQ, the codes are packed along the *output*
  dimension, eight 4-bit codes per word, and within each word the fields hold the output columns
  in AutoAWQ's interleaved order ``(0, 2, 4, 6, 1, 3, 5, 7)`` (field ``i`` of word ``c`` holds
  output column ``8c + order[i]``).
* ``qzeros``: int32 ``[groups, out*b/32]``, the zero points packed the same way; ``scales``:
  ``[groups, out]`` (float16).
* ``w[o, i] = scales[g, o] * (c[i, o] - z[g, o])`` with ``g = i // group_size``: gransearch's
  arithmetic with the grids transposed. Zero points are stored as they are (no GPTQ v1 offset).
  AWQ's ``zero_point: true`` is asymmetric; a symmetric checkpoint (``zero_point: false``, GPTQModel's
  ``sym=True``) must store zero points of ``2^(b-1)``, which is what gransearch's symmetric specs
  mean, and is checked to.

Not read, each refused with the reason: other layouts than GEMM (``gemv``, ``gemv_fast``,
``marlin`` ...: load those with their tool), other widths than 4 bits (the GEMM layout's only one),
and groups that do not divide a layer's input width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import QuantSpec
from .compressed_tensors import unpack_int32
from .gptq import GPTQScheme, group_granularity, method_config, stored_layers

__all__ = ["AWQScheme", "parse_config", "layer_from_tensors", "ORDER"]

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of a word holds output column 8 * word + ORDER[i]


@dataclass
class AWQScheme(GPTQScheme):
    """An AWQ GEMM checkpoint's quantization config, checked to be one gransearch reads, and its
    quantized layers as the safetensors headers list them (``(qweight shape, scales shape)``)."""

    def layer_spec(self, name: str, in_f: int, out_f: int) -> QuantSpec:
        """The spec of the stored layer ``name`` of a ``[out_f, in_f]`` linear, from its shapes."""
        (rows, cols), (n_groups, s_cols) = self.layers[name]
        if rows != in_f or s_cols != out_f or cols * 32 != out_f * 4:
            raise ValueError(f"{name}: qweight {(rows, cols)} and scales {(n_groups, s_cols)} do not fit a [{out_f}, {in_f}] linear "
                             "in AWQ's 4-bit GEMM layout ([in, out/8] words)")
        return QuantSpec(4, group_granularity(name, n_groups, in_f, "AutoAWQ or GPTQModel"), symmetric=self.sym)

    def layer(self, tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec):
        return layer_from_tensors(tensors, name, spec)


def parse_config(folder: str) -> tuple[dict, AWQScheme]:
    """``(config.json, its scheme)`` of an AWQ checkpoint, refused with the reason when it is one
    gransearch does not read (see the module docstring)."""
    cfg, qc, path = method_config(folder, "awq", "an AWQ")
    layout = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if layout != "gemm":
        raise ValueError(f"{path}: AWQ layout {layout!r}; gransearch reads AutoAWQ's GEMM layout: load it with AutoAWQ or GPTQModel, "
                         "or save it as GEMM")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{path}: {bits}-bit AWQ; the GEMM layout gransearch reads packs 4-bit codes")
    sym = not bool(qc.get("zero_point", not qc.get("sym", False)))
    return cfg, AWQScheme(bits, int(qc.get("group_size", qc.get("q_group_size", 128))), sym, 2, stored_layers(folder))


def _unpack_columns(packed: torch.Tensor, out_f: int) -> torch.Tensor:
    """The 4-bit codes of AWQ words ``[rows, out/8]`` as ``[rows, out]`` in output-column order."""
    fields = unpack_int32(packed, 4, out_f)  # field i of word c at column 8c + i
    where = torch.empty(out_f, dtype=torch.long)
    cols = torch.arange(out_f)
    where[(cols // 8) * 8 + torch.tensor(ORDER)[cols % 8]] = cols  # output column 8c + ORDER[i] sits at 8c + i
    return fields[:, where]


def layer_from_tensors(tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec):
    """The :class:`~gransearch.quantizer.QuantizedWeight` AWQ stores under ``name``: the codes, the
    scales in their stored dtype and (asymmetric) the zero points, exactly."""
    from ..quantizer import QuantizedWeight

    try:
        qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
    except KeyError as exc:
        raise ValueError(f"{name}: the checkpoint lacks {exc.args[0]}") from None
    in_f, out_f = qweight.shape[0], scales.shape[1]
    if tuple(qzeros.shape) != (scales.shape[0], qweight.shape[1]) or not scales.is_floating_point():
        raise ValueError(f"{name}: qzeros {tuple(qzeros.shape)} and scales {tuple(scales.shape)} ({scales.dtype}) do not fit a "
                         f"[{out_f}, {in_f}] {spec} layer")
    codes = _unpack_columns(qweight, out_f).t().contiguous()
    zero = _unpack_columns(qzeros, out_f).t().contiguous()
    if spec.symmetric:
        if bool((zero != 8).any()):
            raise ValueError(f"{name}: the config says zero_point=false (symmetric) but the stored zero points are not all 8")
        zero = None
    return QuantizedWeight(codes, scales.t().contiguous(), zero, spec)
