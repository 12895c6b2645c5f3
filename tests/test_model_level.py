"""Calibration hooks, folds and whole-model quantization on tiny Llama / OPT / GPT-2 / Gemma-3 models."""

import pytest
import torch

import gransearch as gs
from gransearch.arch import arch_of, block_linears, get_blocks, get_module, model_linears
from gransearch.arch import linear_weight
from gransearch.fold import fold_scales
from gransearch.qlinear import QuantLinear

from .conftest import calib_windows
from .tiny import tiny_model, token_stream

KINDS = ["llama", "opt", "gpt2", "gemma3"]




def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_folds_preserve_logits(kind):
    model = tiny_model(kind)
    x = calib_windows(2, 24)
    with torch.no_grad():
        ref = model(x).logits
    info = arch_of(model)
    g = torch.Generator().manual_seed(0)
    n_folds = 0
    for i in range(len(get_blocks(model, info))):
        block = get_blocks(model, info)[i]
        for grp in info.groups:
            prev = get_module(block, grp.prev)
            lins = [get_module(block, l) for l in grp.linears]
            width = linear_weight(lins[0]).shape[1]
            prev_out = prev.weight.shape[0] if grp.norm else linear_weight(prev).shape[0]
            if prev_out != width:
                continue
            fold_scales(prev, grp.norm, lins, torch.rand(width, generator=g) * 3 + 0.2)
            n_folds += 1
    assert n_folds >= 2 * len(get_blocks(model, info))
    with torch.no_grad():
        out = model(x).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_calibrate_hessians_chunked_equal_one_pass_and_match_direct(kind):
    model = tiny_model(kind)
    calib = calib_windows(6, 32)
    before = n_hooks(model)
    a = gs.calibrate(model, calib, batch_size=1, verbose=False)
    b = gs.calibrate(model, calib, batch_size=6, verbose=False)
    assert n_hooks(model) == before
    names = [r.name for r in model_linears(model)]
    assert set(a) == set(names)
    for n in names:
        assert a[n].n == b[n].n == 6 * 32
        assert torch.allclose(a[n].hessian, b[n].hessian, rtol=1e-5, atol=1e-5)
        assert torch.allclose(a[n].abs_max, b[n].abs_max)
    # against inputs captured directly by a plain forward of the whole model
    target = names[-1]
    mod = get_module(model, target)
    seen = []
    h = mod.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        model(calib)
    h.remove()
    x = torch.cat(seen)
    direct = 2.0 / x.shape[0] * x.t() @ x
    assert torch.allclose(a[target].hessian, direct, rtol=1e-4, atol=1e-4)
    assert torch.allclose(a[target].abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-6)
    assert len(a[target].token_max) == 1  # the batches' chunks joined once, after the pass
    assert torch.allclose(a[target].token_maxima, x.abs().amax(1), rtol=1e-5, atol=1e-6)


def test_block_statistics_without_token_maxima_are_the_same():
    """GPTQ's and the bank's passes collect no per-token maxima; the rest is the same bit for bit, and
    asking those statistics for token maxima says why there are none."""
    from gransearch.calibrate import BlockRunner, collect_block_stats

    model = tiny_model("llama")
    calib = calib_windows(4, 32)
    runner = BlockRunner(model, calib, batch_size=2)
    try:
        runner.enter(0)
        full = collect_block_stats(runner, 0)
        lean = collect_block_stats(runner, 0, token_max=False)
    finally:
        runner.close()
    assert set(full) == set(lean)
    for n in full:
        for k in ("hessian", "abs_mean", "mean_sq", "abs_max"):
            assert torch.equal(getattr(full[n], k), getattr(lean[n], k)), (n, k)
        assert lean[n].token_max == [] and full[n].token_maxima.numel() == 4 * 32
        with pytest.raises(ValueError, match="token_max=False"):
            lean[n].token_maxima


def test_no_hooks_survive_errors_and_empty_calibration():
    model = tiny_model("llama")
    before = n_hooks(model)
    with pytest.raises(Exception):
        gs.calibrate(model, torch.full((2, 16), 10_000), verbose=False)  # token ids out of range
    assert n_hooks(model) == before
    with pytest.raises(ValueError, match="empty"):
        gs.calibrate(model, torch.zeros(0, 16, dtype=torch.long), verbose=False)
    with pytest.raises(ValueError, match="empty"):
        gs.quantize(model, "w4c", torch.zeros(0, 16, dtype=torch.long), verbose=False)
    assert n_hooks(model) == before


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", gs.METHODS)
def test_quantize_whole_model(kind, method):
    model = tiny_model(kind)
    ids = token_stream(3000, seed=1)
    before = n_hooks(model)
    ppl_fp = gs.perplexity(model, ids, seqlen=64, verbose=False).ppl
    res = gs.quantize(model, "w4g16", calib_windows(), method=method, verbose=False)
    assert n_hooks(model) == before
    lin_names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(lin_names) == len(res.records) == len(arch_of(model).linears) * len(get_blocks(model))
    assert all(r.method == method and r.spec == "w4g16" for r in res.records)
    # by default objectives come only where GPTQ computes the Hessians anyway (RTN needs no calibration pass)
    if method in ("gptq", "awq+gptq"):
        assert all(r.objective >= 0 for r in res.records)
    else:
        assert all(r.objective is None for r in res.records)
    assert res.nbytes == sum(m.stored_nbytes() for m in model.modules() if isinstance(m, QuantLinear))
    ppl_q = gs.perplexity(model, ids, seqlen=64, verbose=False).ppl
    assert ppl_q == ppl_q and ppl_q < 5 * ppl_fp  # finite and not destroyed
    if method.startswith("awq"):
        assert any(r.awq_ratio is not None for r in res.records)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_w8_keeps_logits_and_gptq_beats_rtn_on_block0(kind):
    calib = calib_windows(16, 32)
    x = calib_windows(2, 32, seed=5)
    fp = tiny_model(kind)
    with torch.no_grad():
        ref = fp(x).logits
    m8 = tiny_model(kind)
    gs.quantize(m8, "w8c", calib, method="gptq", verbose=False)
    with torch.no_grad():
        out = m8(x).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    objs = {}
    for method in ("rtn", "gptq"):
        m = tiny_model(kind)
        res = gs.quantize(m, "w3c", calib, method=method, objective=True, verbose=False)
        # block 0 sees the same (unquantized) inputs for both methods
        objs[method] = sum(r.objective for r in res.records if ".0." in r.name)
    assert objs["gptq"] < objs["rtn"]


def test_act_order_static_groups_and_mixed_plan():
    model = tiny_model("llama")
    names = [r.name for r in model_linears(model)]
    plan = {n: ("gptq" if i % 2 else "rtn", "w4g16" if i % 3 else "w8c") for i, n in enumerate(names[:-2])}
    res = gs.quantize(model, plan, calib_windows(), act_order=True, static_groups=True, verbose=False)
    assert [r.name for r in res.records] == names[:-2]
    assert not isinstance(get_module(model, names[-1]), QuantLinear)  # not in the plan: stays float
    with pytest.raises(ValueError, match="another model"):
        gs.quantize(tiny_model("llama"), {"model.layers.9.mlp.up_proj": ("rtn", "w4c")}, calib_windows(), verbose=False)
    with pytest.raises(ValueError, match="does not divide"):
        gs.quantize(tiny_model("llama"), "w4g48", calib_windows(), verbose=False)
    with pytest.raises(ValueError, match="unknown method"):
        gs.quantize(tiny_model("llama"), "w4c", calib_windows(), method="hqq", verbose=False)


def test_generic_fallback_for_unknown_architecture():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    info = arch_of(model)
    assert info.generic and len(info.linears) == 7
    with pytest.raises(ValueError, match="gransearch.arch"):
        arch_of(model, allow_generic=False)
    with pytest.raises(ValueError, match="AWQ needs"):
        gs.quantize(model, "w4c", calib_windows(), method="awq", verbose=False)
    res = gs.quantize(model, "w4c", calib_windows(), method="gptq", verbose=False)
    assert len(res.records) == 14
    assert block_linears(model, 0, info)[0].local == info.linears[0]


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_objective_off_gives_identical_weights(method):
    calib = calib_windows(8, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = gs.quantize(a, "w3g16", calib, method=method, awq_tokens=64, objective=True, verbose=False)
    rb = gs.quantize(b, "w3g16", calib, method=method, awq_tokens=64, objective=False, verbose=False)
    assert all(r.objective is not None for r in ra.records) and all(r.objective is None for r in rb.records)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_linears_reading_one_input_share_one_statistic():
    stats = gs.calibrate(tiny_model("llama"), calib_windows(2, 16), verbose=False)
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert stats["model.layers.0.mlp.gate_proj"] is stats["model.layers.0.mlp.up_proj"]
    assert stats["model.layers.0.self_attn.o_proj"] is not q


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "gemma3"])
def test_shared_statistics_match_per_layer_direct_hooks(kind):
    """Sharing must follow tensor identity: a reused address must not alias two inputs."""
    model = tiny_model(kind)
    calib = calib_windows(4, 32)
    gs.quantize(model, "w8c", calib, method="rtn", objective=False, verbose=False)  # where reuse showed up
    stats = gs.calibrate(model, calib, verbose=False)
    direct = {}
    handles = []
    for name in stats:
        def grab(m, a, name=name):
            x = a[0].reshape(-1, a[0].shape[-1]).float()
            direct[name] = direct.get(name, 0) + x.t() @ x
        handles.append(get_module(model, name).register_forward_pre_hook(grab))
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    for name, st in stats.items():
        assert torch.allclose(st.xtx, direct[name], rtol=1e-4, atol=1e-3), name


@pytest.mark.parametrize("d", [64, 576, 700, 1536])
def test_blocked_gram_accumulation_is_the_full_symmetric_product(d):
    """Hessians accumulate only the column blocks on and above the diagonal; reading mirrors them."""
    from gransearch.calibrate import LayerStats

    g = torch.Generator().manual_seed(d)
    x = torch.randn(900, d, generator=g, dtype=torch.float64)
    st = LayerStats(d)
    for part in x.float().split(300):
        st.update(part)
    ref = x.t() @ x
    assert torch.equal(st.xtx, st.xtx.t())
    assert torch.allclose(st.xtx.double(), ref, rtol=1e-5, atol=1e-3)
    assert torch.allclose(st.hessian.double(), ref * 2 / 900, rtol=1e-5, atol=1e-5)
