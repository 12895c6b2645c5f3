"""SmoothQuant folds, activation fake-quantization and LLM.int8()-style decomposition."""

import pytest
import torch

import gransearch as gs
from gransearch.arch import arch_of, get_blocks, get_module
from gransearch.qlinear import QuantLinear, fake_quant_activation

from .test_model_level import calib_windows
from .tiny import tiny_model


def outlier_acts(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 64, generator=g)
    x[..., 5] *= 40.0  # an outlier channel, as in LLM activations
    return x


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "gemma3"])
def test_smoothquant_fold_preserves_logits_and_flattens_channels(kind):
    model = tiny_model(kind)
    info = arch_of(model)
    with torch.no_grad():  # plant an outlier channel in each first norm, as trained LLMs have
        for block in get_blocks(model, info):
            norm = get_module(block, info.groups[0].prev)
            norm.weight[3] = 30.0
    calib = calib_windows(4, 32)
    x = calib_windows(2, 24, seed=3)
    with torch.no_grad():
        ref = model(x).logits
    stats = gs.calibrate(model, calib, verbose=False)
    scales = gs.smoothquant(model, stats, alpha=0.5)
    assert len(scales) >= 2
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref, atol=1e-4, rtol=1e-4)
    after = gs.calibrate(model, calib, verbose=False)
    name = next(iter(scales))
    spread = lambda st: float(st.abs_max.max() / st.abs_max.median())  # noqa: E731
    assert spread(stats[name]) > 10
    assert spread(after[name]) < spread(stats[name]) / 3


def test_activation_granularities_order_and_outlier_columns():
    x = outlier_acts()
    err = {}
    for gran in ("tensor", "token", "channel"):
        q = fake_quant_activation(x, gs.ActSpec(8, gran))
        err[gran] = float(((q - x) ** 2).mean())
    assert err["channel"] < err["token"] <= err["tensor"] * 1.0001
    spec = gs.ActSpec(8, "tensor", outlier_threshold=20.0)
    q = fake_quant_activation(x, spec)
    assert torch.equal(q[..., 5], x[..., 5])  # kept in floating point
    assert float(((q - x) ** 2).mean()) < err["tensor"] / 10
    with pytest.raises(ValueError, match="static per-token"):
        gs.ActSpec(8, "token", dynamic=False)
    with pytest.raises(ValueError, match="act_scale"):
        fake_quant_activation(x, gs.ActSpec(8, "tensor", dynamic=False))


def test_static_activation_scales_and_outlier_share():
    model = tiny_model("llama")
    calib = calib_windows(4, 32)
    gs.quantize(model, "w8c", calib, method="rtn", verbose=False)
    x = calib_windows(2, 32, seed=4)
    with torch.no_grad():
        w8 = model(x).logits
    with pytest.raises(ValueError, match="calibration statistics"):
        gs.set_act_quant(model, gs.ActSpec(8, "tensor", dynamic=False))
    stats = gs.calibrate(model, calib, verbose=False)
    assert gs.set_act_quant(model, gs.ActSpec(8, "tensor", dynamic=False), stats) == 14
    with torch.no_grad():
        a8 = model(x).logits
    assert not torch.equal(a8, w8) and (a8 - w8).abs().max() < 0.1 * w8.abs().max()
    gs.set_act_quant(model, gs.ActSpec(8, "token", outlier_threshold=1.0))
    with torch.no_grad():
        model(x)
    share = gs.outlier_share(model)
    assert 0.0 < share < 1.0
    gs.set_act_quant(model, None)
    with torch.no_grad():
        assert torch.equal(model(x).logits, w8)
    assert all(m.act_spec is None for m in model.modules() if isinstance(m, QuantLinear))
