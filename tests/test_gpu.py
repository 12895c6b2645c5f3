"""The GPU paths agree with the CPU ones (skipped where there is no CUDA device, as in CI)."""

import pytest
import torch

import gransearch as gs
from gransearch.arch import get_module
from gransearch.bank import build_bank

from .conftest import calib_windows
from .tiny import tiny_model, token_stream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """Full-precision float32 matmuls on the GPU, so that CPU and GPU results are comparable."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def calib():
    return calib_windows(stream_seed=2)


def test_perplexity_on_gpu_matches_cpu():
    ids = token_stream(2048, seed=5)
    cpu = gs.perplexity(tiny_model("llama"), ids, seqlen=64, verbose=False).ppl
    gpu = gs.perplexity(tiny_model("llama").cuda(), ids, seqlen=64, verbose=False).ppl
    assert gpu == pytest.approx(cpu, rel=1e-4)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_on_gpu_matches_cpu(method):
    res = {}
    for dev in ("cpu", "cuda"):
        m = tiny_model("llama")
        q = gs.quantize(m, "w4g16", calib(), method=method, device=dev, verbose=False)
        res[dev] = (m, q)
    objs = {dev: sum(r.objective for r in q.records) for dev, (_, q) in res.items()}
    assert objs["cuda"] == pytest.approx(objs["cpu"], rel=2e-2)
    name = res["cpu"][1].records[0].name
    a = get_module(res["cpu"][0], name).dequantized_weight()
    b = get_module(res["cuda"][0], name).dequantized_weight().cpu()
    assert (a == b).float().mean() > 0.98  # first layer: same inputs, a few ties may round apart


def test_bank_on_gpu_matches_cpu_and_is_stored_on_cpu():
    model = tiny_model("llama")
    args = (model, calib(), ("rtn", "gptq", "awq"), (3, 4), ("channel", 16))
    cpu = build_bank(*args, verbose=False)
    gpu = build_bank(*args, device="cuda", verbose=False)
    assert gpu.keys == cpu.keys
    for ec, eg in zip(cpu.entries, gpu.entries):
        for a, b in zip(ec, eg):
            assert b.qweight.codes.device.type == "cpu" and b.nbytes == a.nbytes
            assert b.objective == pytest.approx(a.objective, rel=5e-2, abs=1e-6)


def test_optimize_on_gpu_stays_in_budget_and_agrees_with_cpu():
    model = tiny_model("llama")
    val, test = token_stream(2048, seed=7), token_stream(2048, seed=8)
    budget = gs.QuantPlan.uniform(model, "w4g16", "rtn").nbytes(model)
    kw = dict(budget_bytes=budget, calib=calib(), eval_ids=val, final_ids=test, methods=("rtn", "gptq"), bits=(3, 4, 8),
              granularities=("channel", 16), n_trials=6, seqlen=64, eval_windows=8, n_final=1, verbose=False)
    res = {dev: gs.optimize(model, device=dev, **kw) for dev in ("cpu", "cuda")}
    for r in res.values():
        assert r.nbytes <= budget and r.plan.nbytes(model) == r.nbytes
    # the same uniform warm starts measure the same on both devices
    common = set(res["cpu"].baselines) & set(res["cuda"].baselines)
    assert common
    for key in common:
        assert res["cuda"].baselines[key] == pytest.approx(res["cpu"].baselines[key], rel=1e-2)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is not moved


def test_quantize_from_disk_on_gpu_matches_in_memory_on_gpu(tmp_path):
    """A model read from disk block by block, its blocks run on the GPU: the codes of the same run
    in memory on the GPU, and a checkpoint that loads."""
    from transformers import AutoModelForCausalLM

    from .test_offload import _codes, _save_float

    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=3), src)
    mem = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    gs.quantize(mem, "w4g16", calib(), "gptq", device="cuda", verbose=False)
    gs.quantize(src, "w4g16", calib(), "gptq", device="cuda", save=str(tmp_path / "q"), verbose=False)
    a, b = _codes(mem), _codes(gs.load_quantized(str(tmp_path / "q")))
    assert a.keys() == b.keys() and all(torch.equal(a[n].codes.cpu(), b[n].codes) for n in a)
