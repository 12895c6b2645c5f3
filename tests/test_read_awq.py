"""Reading AWQ checkpoints in AutoAWQ's GEMM layout. The checkpoints here are packed by hand, field
by field in plain Python, from the layout AutoAWQ and GPTQModel write (4-bit codes packed along the
output dimension, eight per int32 word, the fields holding output columns 0, 2, 4, 6, 1, 3, 5, 7 of
their eight); benchmarks/read_gptqmodel.py's awq rows read ones GPTQModel wrote."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gransearch as gs

from .tiny import check_reads_everywhere

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _words(values: torch.Tensor) -> torch.Tensor:
    """``[rows, out]`` 4-bit values as AWQ GEMM words ``[rows, out/8]`` (int32)."""
    rows, out_f = values.shape
    out = []
    for r in range(rows):
        row = []
        for c in range(out_f // 8):
            word = 0
            for f in range(8):
                word |= int(values[r, 8 * c + ORDER[f]]) << (4 * f)
            row.append(word - (1 << 32) if word >= 1 << 31 else word)
        out.append(row)
    return torch.tensor(out, dtype=torch.int32)


def _awq_layer(w: torch.Tensor, group: int, sym: bool):
    """AWQ GEMM tensors of ``w`` [out, in] by min-max rounding, and the weight they hold."""
    out_f, in_f = w.shape
    blocks = w.reshape(out_f, in_f // group, group)
    if sym:
        scale = (blocks.abs().amax(-1) / 8).clamp_min(1e-6).half()
        zero = torch.full(scale.shape, 8, dtype=torch.int64)
    else:
        lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp_min(1e-6).half()
        zero = torch.round(-lo / scale.float()).long().clamp(0, 15)
    codes = torch.clamp(torch.round(blocks / scale.float()[..., None]) + zero[..., None], 0, 15).long().reshape(out_f, in_f)
    want = ((codes.reshape(out_f, -1, group) - zero[..., None]) * scale.float()[..., None]).reshape(out_f, in_f)
    return {"qweight": _words(codes.t()), "qzeros": _words(zero.t()), "scales": scale.t().contiguous()}, want


def _write(folder, cli_assets, group=32, sym=False, keys=None):
    """The CLI assets' tiny llama saved as AWQ GEMM; ``keys``: the config's fields beside
    ``quant_method``, ``bits`` and ``group_size`` (default AutoAWQ's ``zero_point`` and ``version``)."""
    shutil.copytree(cli_assets[0], folder)
    floats = load_file(str(folder / "model.safetensors"))
    tensors, want = {}, {}
    for key, t in floats.items():
        name = key.removesuffix(".weight")
        if ".layers." in key and key.endswith("proj.weight"):
            layer, want[name] = _awq_layer(t, group, sym)
            tensors.update({f"{name}.{k}": v for k, v in layer.items()})
        else:
            tensors[key] = t
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    keys = {"zero_point": not sym, "version": "gemm", "modules_to_not_convert": None} if keys is None else keys
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, **keys}
    (folder / "config.json").write_text(json.dumps(cfg))
    return want


@pytest.mark.parametrize("sym, keys", [(False, None), (True, {"zero_point": False, "version": "GEMM"}),
                                       (True, {"sym": True, "format": "gemm"})])
def test_reads_awq_gemm_checkpoints_exactly(tmp_path, cli_assets, sym, keys):
    """AutoAWQ's config keys (``zero_point``, ``version``) and GPTQModel's own (``sym``, ``format``)."""
    want = _write(tmp_path / "q", cli_assets, sym=sym, keys=keys)
    model = gs.load_quantized(str(tmp_path / "q"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, gs.QuantLinear)}
    assert set(layers) == set(want) and len(layers) == 14
    for name, m in layers.items():
        assert str(m.spec) == f"w4g32{'s' if sym else ''}", name
        assert torch.equal(m.quantized_weight().dequantize(torch.float32), want[name]), name

    check_reads_everywhere(tmp_path / "q", model, 14)
    # float16 scales, integer zero points: written again as compressed-tensors, bit for bit
    gs.save_quantized(model, str(tmp_path / "ct"))
    back = gs.load_quantized(str(tmp_path / "ct"))
    for name in want:
        assert torch.equal(back.get_submodule(name).quantized_weight().dequantize(torch.float32), want[name]), name


LAYER = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("change, message", [
    ({"version": "gemv"}, "AWQ layout 'gemv'"),
    ({"bits": 8}, "8-bit AWQ"),
    ({"zero_point": False}, f"{LAYER}: the config says zero_point=false .* not all 8"),
])
def test_what_is_not_read_is_refused_with_the_reason(tmp_path, cli_assets, change, message):
    _write(tmp_path / "q", cli_assets)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        gs.load_quantized(str(tmp_path / "q"))
