"""Reading GPTQ-format checkpoints (GPTQModel, AutoGPTQ). The checkpoints here are packed by hand,
bit by bit in plain Python, from the layout GPTQModel documents in its code (codes packed along
the input into int32 words, zero points along the output, v1 zero points stored minus one with
GPTQModel's word-wise subtraction); benchmarks/read_gptqmodel.py reads ones GPTQModel wrote."""

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

import gransearch as gs

from .tiny import check_reads_everywhere, token_stream


def _pack(values: torch.Tensor, bits: int) -> list[int]:
    """Unsigned ``bits``-bit values as one little-endian bit stream of 32-bit words (element ``j``
    at bit ``j * bits``), each word as an unsigned Python int."""
    words = [0] * math.ceil(len(values) * bits / 32)
    for j, v in enumerate(values.tolist()):
        for b in range(bits):
            if (int(v) >> b) & 1:
                pos = j * bits + b
                words[pos // 32] |= 1 << (pos % 32)
    return words


def _int32(words) -> torch.Tensor:
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def _gptq_layer(w: torch.Tensor, bits: int, group: int, sym: bool, version: int, order=None):
    """GPTQ tensors of ``w`` [out, in] quantized by min-max rounding, and the weight they hold.
    ``order``: the column order of ``desc_act`` (GPTQ forms each group of consecutive columns in
    that order and stores ``g_idx[order[k]] = k // group``); the codes stay in the input's order."""
    out_f, in_f = w.shape
    group = in_f if group == -1 else group
    g_idx = torch.arange(in_f) // group
    if order is not None:  # quantize the columns in ``order``, then put everything back in the input's order
        w = w[:, order]
    top = (1 << bits) - 1
    blocks = w.reshape(out_f, in_f // group, group)
    if sym:
        scale = (blocks.abs().amax(-1) / (top // 2 + 1)).clamp_min(1e-6).half()
        zero = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.int64)
    else:
        lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
        scale = ((hi - lo) / top).clamp_min(1e-6).half()
        zero = torch.round(-lo / scale.float()).long().clamp(0, top)
        zero[::3, 0] = 0  # zero points of 0: v1 stores -1, which borrows from the next field
    codes = torch.clamp(torch.round(blocks / scale.float()[..., None]) + zero[..., None], 0, top).long().reshape(out_f, in_f)
    want = ((codes.reshape(out_f, -1, group) - zero[..., None]) * scale.float()[..., None]).reshape(out_f, in_f)
    if order is not None:
        inv = torch.argsort(order)
        codes, want, g_idx = codes[:, inv], want[:, inv], g_idx[inv]
    qweight = torch.stack([_int32(_pack(codes[o], bits)) for o in range(out_f)], 1)  # [in*bits/32, out]
    rows = []
    for g in range(zero.shape[1]):
        z = zero[:, g]
        if version == 1 and 32 % bits:  # 3 bits: each field minus one, modulo 2^bits (GPTQModel)
            words = _pack((z - 1) % (1 << bits), bits)
        elif version == 1:  # each word minus 0x11111111 (4-bit), borrows carried across fields (GPTQModel)
            words = [(x - sum(1 << (bits * k) for k in range(32 // bits))) % (1 << 32) for x in _pack(z, bits)]
        else:
            words = _pack(z, bits)
        rows.append(_int32(words))
    tensors = {"qweight": qweight, "qzeros": torch.stack(rows), "scales": scale.t().contiguous(),
               "g_idx": g_idx.to(torch.int32)}
    return tensors, want


def _write(folder, cli_assets, bits=4, group=32, sym=False, version=1, quant_config=True, dynamic=None, desc_act=False, **qc_extra):
    """A tiny llama (the CLI assets' float model, tokenizer included) saved in GPTQ's layout;
    ``dynamic``: ``{layer name suffix: (bits, group)}`` written instead of the config's, as
    GPTQModel's per-module overrides do; ``desc_act``: each layer's columns quantized in a random
    order of their own. Returns ``{layer: the weight it holds}``."""
    gen = torch.Generator().manual_seed(5)
    model_dir = cli_assets[0]
    shutil.copytree(model_dir, folder)
    from safetensors.torch import load_file

    (folder / "model.safetensors").unlink()
    floats = load_file(f"{model_dir}/model.safetensors")
    tensors, want = {}, {}
    for key, t in floats.items():
        name = key.removesuffix(".weight")
        if ".layers." in key and key.endswith("proj.weight"):
            b, g = next((v for k, v in (dynamic or {}).items() if name.endswith(k)), (bits, group))
            order = torch.randperm(t.shape[1], generator=gen) if desc_act else None
            layer, want[name] = _gptq_layer(t, b, g, sym, version, order)
            tensors.update({f"{name}.{k}": v for k, v in layer.items()})
        else:
            tensors[key] = t
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
          "checkpoint_format": "gptq" if version == 1 else "gptq_v2", "pack_dtype": "int32", **qc_extra}
    if quant_config:
        cfg["quantization_config"] = qc
    else:  # AutoGPTQ: the settings in quantize_config.json beside a plain config
        (folder / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"}))
    (folder / "config.json").write_text(json.dumps(cfg))
    return want


@pytest.mark.parametrize("bits, group, sym, version", [(4, 32, False, 1), (4, 32, True, 1), (3, 32, False, 1), (8, -1, True, 1),
                                                       (2, 32, False, 2), (4, 64, False, 2)])
def test_reads_gptq_checkpoints_exactly(tmp_path, cli_assets, bits, group, sym, version):
    want = _write(tmp_path / "q", cli_assets, bits, group, sym, version)
    model = gs.load_quantized(str(tmp_path / "q"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, gs.QuantLinear)}
    assert set(layers) == set(want) and len(layers) == 14
    for name, m in layers.items():  # one group as wide as the row is a channel
        gran = "c" if group in (-1, m.in_features) else f"g{group}"
        assert str(m.spec) == f"w{bits}{gran}{'s' if sym else ''}", name
        assert m.scales.dtype == torch.float16
        assert torch.equal(m.quantized_weight().dequantize(torch.float32), want[name]), name

    check_reads_everywhere(tmp_path / "q", model, 14)
    with pytest.raises(ValueError, match="already quantized"):
        gs.quantize(model, "w4g32", None, method="rtn", verbose=False)
    # float16 scales, integer zero points: written again as compressed-tensors, bit for bit
    gs.save_quantized(model, str(tmp_path / "ct"))
    back = gs.load_quantized(str(tmp_path / "ct"))
    for name, m in layers.items():
        assert torch.equal(back.get_submodule(name).quantized_weight().dequantize(torch.float32), want[name]), name


def test_per_module_overrides_read_from_the_shapes(tmp_path, cli_assets):
    """GPTQModel's ``dynamic`` overrides give some modules other bits or groups than the config's:
    each layer's bits come from its packed rows and its groups from its scales."""
    want = _write(tmp_path / "q", cli_assets, bits=4, group=32, dynamic={"down_proj": (8, -1), "v_proj": (3, 64)})
    model = gs.load_quantized(str(tmp_path / "q"))
    specs = {n: str(m.spec) for n, m in model.named_modules() if isinstance(m, gs.QuantLinear)}
    assert specs["model.layers.1.mlp.down_proj"] == "w8c" and specs["model.layers.0.self_attn.v_proj"] == "w3c"
    assert specs["model.layers.0.mlp.up_proj"] == "w4g32"
    assert all(torch.equal(model.get_submodule(n).quantized_weight().dequantize(torch.float32), w) for n, w in want.items())


def test_autogptq_quantize_config_json_reads(tmp_path, cli_assets):
    want = _write(tmp_path / "q", cli_assets, quant_config=False)
    model = gs.load_quantized(str(tmp_path / "q"))
    m = model.get_submodule(next(iter(want)))
    assert torch.equal(m.quantized_weight().dequantize(torch.float32), want[next(iter(want))])
    assert set(gs.offload.DiskModel(str(tmp_path / "q")).quantized) == set(want)


def _edit_config(folder, **change):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensor(folder, key, change):
    from safetensors.torch import load_file

    t = load_file(str(folder / "model.safetensors"))
    t[key] = change(t[key])
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


LAYER = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("config, tensor, message", [
    ({"checkpoint_format": "marlin"}, None, "checkpoint_format 'marlin'"),
    ({"pack_dtype": "int16"}, None, "packed in int16 words"),
    ({}, ("g_idx", lambda g: g.clamp(max=2)), f"{LAYER}: g_idx does not give each of the 4 groups 32 columns"),
    ({}, ("g_idx", lambda g: g - 1), f"{LAYER}: g_idx does not give each of the 4 groups 32 columns"),
    ({}, ("g_idx", lambda g: g[:-1]), rf"{LAYER}: g_idx \(127,\) does not fit 128 input columns"),
    ({"sym": True}, None, "sym=True but the stored zero points are not all 8"),
    ({}, ("scales", lambda s: s[:3]), f"{LAYER}: 3 groups do not divide the 128 input columns"),
])
def test_what_is_not_read_is_refused_with_the_reason(tmp_path, cli_assets, config, tensor, message):
    folder = tmp_path / "q"
    _write(folder, cli_assets)
    _edit_config(folder, **config)
    if tensor:
        _edit_tensor(folder, f"{LAYER}.{tensor[0]}", tensor[1])
    with pytest.raises(ValueError, match=message):
        gs.load_quantized(str(folder))
    with pytest.raises(ValueError, match=message):  # from disk: when the config is read, or the layer's block
        _read_all(folder)


def _read_all(folder):
    disk = gs.offload.DiskModel(str(folder))
    gs.offload.perplexity(disk, token_stream(256, vocab=disk.config.vocab_size), seqlen=64, batch_size=2, verbose=False)


def test_a_refused_checkpoint_transformers_cannot_load_says_both_reasons(tmp_path, cli_assets, monkeypatch):
    """gs.load_model leaves a checkpoint gransearch refuses to transformers; when that fails too
    (GPTQ there needs optimum or GPTQModel), the error gives gransearch's reason beside transformers'."""
    import transformers

    _write(tmp_path / "q", cli_assets, checkpoint_format="marlin")

    def missing(*_, **__):
        raise ImportError("Loading a GPTQ quantized model requires optimum")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", missing)
    with pytest.raises(ValueError, match=r"checkpoint_format 'marlin'.*transformers could not load it either \(Loading a GPTQ"):
        gs.load_model(str(tmp_path / "q"))


def test_desc_act_per_channel_reads(tmp_path, cli_assets):
    """Act-order per channel stores g_idx all zeros: one group, in order; it reads."""
    want = _write(tmp_path / "q", cli_assets, bits=4, group=-1, sym=True, desc_act=True)
    model = gs.load_quantized(str(tmp_path / "q"))
    assert all(torch.equal(model.get_submodule(n).quantized_weight().dequantize(torch.float32), w) for n, w in want.items())


@pytest.mark.parametrize("bits, sym, version", [(4, False, 1), (3, True, 2)])
def test_desc_act_with_groups_reads_with_its_group_index(tmp_path, cli_assets, bits, sym, version):
    """desc_act=True with groups: each group is ``group`` consecutive columns of the activation
    order, so g_idx scatters it along the row. The layer reads with its g_idx and holds the weight
    exactly, in memory and from disk; writers that have no layout for it refuse it by name."""
    want = _write(tmp_path / "q", cli_assets, bits=bits, group=32, sym=sym, version=version, desc_act=True)
    model = gs.load_quantized(str(tmp_path / "q"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, gs.QuantLinear)}
    assert set(layers) == set(want)
    for name, m in layers.items():
        assert str(m.spec) == f"w{bits}g32{'s' if sym else ''}" and m.g_idx is not None, name
        assert torch.equal(m.quantized_weight().dequantize(torch.float32), want[name]), name
        in_order = gs.QuantizedWeight(m.quantized_weight().codes, m.quantized_weight().scale, m.quantized_weight().zero, m.spec)
        assert not torch.equal(in_order.dequantize(torch.float32), want[name])  # the group index is what makes it right
        assert m.stored_nbytes() == m.quantized_weight().nbytes == gs.layer_nbytes((m.out_features, m.in_features), m.spec) + 4 * m.in_features

    ids = token_stream(1024, vocab=model.config.vocab_size, seed=3)
    ppl = gs.perplexity(model, ids, seqlen=64, batch_size=2, verbose=False).ppl
    disk = gs.offload.DiskModel(str(tmp_path / "q"))
    assert gs.offload.perplexity(disk, ids, seqlen=64, batch_size=2, verbose=False).ppl == pytest.approx(ppl, rel=1e-5)

    # a state_dict round trip keeps the group index
    fresh = gs.load_quantized(str(tmp_path / "q"))
    name = next(iter(want))
    fresh.get_submodule(name).g_idx = None
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.get_submodule(name).g_idx, layers[name].g_idx)

    with pytest.raises(ValueError, match=r"model\.layers\.0\..*groups are in activation order.*compressed-tensors no longer loads"):
        gs.save_quantized(model, str(tmp_path / "ct"))
    with pytest.raises(ValueError, match=r"groups are in activation order.*GGUF"):
        gs.save_gguf(model, str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("tied", [True, False])
def test_a_quantized_head_is_read_and_scores_in_memory_and_from_disk(tmp_path, tied):
    """GPTQModel's ``lm_head=True`` stores the head quantized, beside the float embedding, even where
    the config ties them: the head is its own layer then, in memory and from disk (which scored the
    embedding instead, or failed for an untied head, before)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    tensors, want = {}, {}
    for key, t in model.state_dict().items():
        name = key.removesuffix(".weight")
        if key.endswith("proj.weight") or key == "lm_head.weight":
            layer, want[name] = _gptq_layer(t.contiguous(), 4, 32, False, 1)
            tensors.update({f"{name}.{k}": v for k, v in layer.items()})
        else:
            tensors[key] = t.contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": False, "lm_head": True}
    (tmp_path / "config.json").write_text(json.dumps(doc))

    ours = gs.load_quantized(str(tmp_path))
    assert isinstance(ours.lm_head, gs.QuantLinear) and torch.equal(ours.lm_head.dequantized_weight(), want["lm_head"])
    assert torch.equal(ours.model.embed_tokens.weight, model.model.embed_tokens.weight)  # not the head's codes
    ids = token_stream(1024, vocab=256, seed=3)
    ppl = gs.perplexity(ours, ids, seqlen=64, batch_size=2, verbose=False).ppl
    # the same model with float layers holding the read weights: the head's codes are what scores
    ref = copy.deepcopy(model)
    for name, w in want.items():
        ref.get_submodule(name).weight = torch.nn.Parameter(w)
    assert ppl == pytest.approx(gs.perplexity(ref, ids, seqlen=64, batch_size=2, verbose=False).ppl, rel=1e-5)
    disk = gs.offload.DiskModel(str(tmp_path))
    assert gs.offload.perplexity(disk, ids, seqlen=64, batch_size=2, verbose=False).ppl == pytest.approx(ppl, rel=1e-5)
    assert disk.head_quantized
    # written again as compressed-tensors, the head stays its own quantized layer
    gs.save_quantized(ours, str(tmp_path / "ct"))
    back = gs.load_quantized(str(tmp_path / "ct"))
    assert not back.config.tie_word_embeddings and torch.equal(back.lm_head.dequantized_weight(), want["lm_head"])
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight)
