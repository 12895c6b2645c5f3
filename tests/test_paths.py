"""Paths that had no test: a registered architecture, the full-logits perplexity, GPTQ's clip,
activation fake-quantization and weight clipping through ``quantize``."""

import pytest
import torch

import gransearch as gs
from gransearch.arch import ARCHS, arch_of, get_module, register_arch
from gransearch.qlinear import QuantLinear

from .conftest import calib_windows
from .tiny import tiny_model, token_stream


def test_register_arch_gives_an_unknown_model_type_its_table_row():
    model = tiny_model("llama")
    model.config.model_type = "llama-clone"
    assert arch_of(model).generic  # unknown: the generic fallback, which refuses AWQ
    with pytest.raises(ValueError, match="AWQ needs"):
        gs.quantize(model, "w4c", calib_windows(), method="awq", verbose=False)
    register_arch("llama-clone", ARCHS["llama"])
    try:
        info = arch_of(model)
        assert not info.generic and info.groups == ARCHS["llama"].groups
        a, b = tiny_model("llama"), model
        ra = gs.quantize(a, "w4c", calib_windows(), method="awq", verbose=False)
        rb = gs.quantize(b, "w4c", calib_windows(), method="awq", verbose=False)
        assert [r.awq_ratio for r in ra.records] == [r.awq_ratio for r in rb.records]
        for r in ra.records:
            assert torch.equal(get_module(a, r.name).dequantized_weight(), get_module(b, r.name).dequantized_weight())
    finally:
        del ARCHS["llama-clone"]


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_full_logits_fallback_equals_the_chunked_loss(kind):
    """A model type without a known head layout is scored from its own logits: same perplexity."""
    model = tiny_model(kind)
    ids = token_stream(1024, seed=4)
    chunked = gs.perplexity(model, ids, seqlen=64, batch_size=3, verbose=False)
    model.config.model_type = "mystery-head"
    full = gs.perplexity(model, ids, seqlen=64, batch_size=3, verbose=False)
    assert full.n_tokens == chunked.n_tokens
    assert full.ppl == pytest.approx(chunked.ppl, rel=1e-5)


@pytest.mark.parametrize("clip", [0.8, "search"])
def test_gptq_with_identity_hessian_and_clip_equals_clipped_rtn(clip):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    spec = gs.QuantSpec.parse("w3g16")
    g = gs.gptq(w, torch.eye(64), spec, clip=clip).qweight
    r = gs.rtn(w, spec, clip=clip)
    assert torch.equal(g.codes, r.codes) and torch.equal(g.scale, r.scale)
    assert not torch.equal(r.codes, gs.rtn(w, spec).codes)  # the clip did something


def test_quantize_applies_act_spec_and_clip():
    model = tiny_model("llama")
    ref = {n: get_module(model, n).weight.detach().clone() for n in [r.name for r in gs.arch.model_linears(model)]}
    act = gs.ActSpec(8, "token", dynamic=True)
    gs.quantize(model, "w4g16", None, method="rtn", clip=0.9, act_spec=act, verbose=False)
    for name, w in ref.items():
        m = get_module(model, name)
        assert isinstance(m, QuantLinear) and m.act_spec == act
        assert torch.equal(m.dequantized_weight(), gs.rtn(w, gs.QuantSpec.parse("w4g16"), clip=0.9).dequantize())
    # activation fake-quantization changes the outputs, by little at 8 bits per token
    x = token_stream(64, seed=9).view(1, -1)
    with torch.no_grad():
        on = model(x).logits
        gs.set_act_quant(model, None)
        off = model(x).logits
    assert not torch.equal(on, off) and (on - off).abs().max() < 0.1 * off.abs().max()


def test_foldable_groups_and_input_kinds():
    """AWQ's fold check lives in arch: under grouped-query attention v -> o cannot fold (v is narrower
    than o's input); q/k/v, gate/up and down read one tensor each."""
    from gransearch.arch import arch_of, foldable, get_blocks, input_kinds

    model = tiny_model("llama")  # 4 heads, 2 key/value heads
    info = arch_of(model)
    block = get_blocks(model)[0]
    fold = {g.prev: foldable(block, g) for g in info.groups}
    assert fold == {"input_layernorm": True, "self_attn.v_proj": False, "post_attention_layernorm": True, "mlp.up_proj": True}
    assert input_kinds(model) == {"q_proj+k_proj+v_proj": ["q_proj", "k_proj", "v_proj"], "o_proj": ["o_proj"],
                                  "gate_proj+up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}
