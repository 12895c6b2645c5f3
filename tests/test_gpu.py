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
    if method == "gptq":  # AWQ alone collects no Hessian, so it has no layer objective
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


def test_bank_on_gpu_stacks_shared_inputs_with_the_separate_solves_codes(monkeypatch):
    """On CUDA the bank solves q/k/v and gate/up as one GPTQ stack; forced apart on the same GPU,
    the entries agree (a taller stack may pick other kernels: ties only)."""
    from gransearch import bank as bank_mod

    args = (tiny_model("llama"), calib(), ("rtn", "gptq"), (3, 4), ("channel", 16))
    stacked = build_bank(*args, device="cuda", verbose=False)
    monkeypatch.setattr(bank_mod, "STACK_SHARED_INPUTS", False)
    apart = build_bank(*args, device="cuda", verbose=False)
    assert stacked.keys == apart.keys
    for ea, eb in zip(apart.entries, stacked.entries):
        for a, b in zip(ea, eb):
            assert (a.qweight.codes == b.qweight.codes).float().mean() > 0.999
            assert b.objective == pytest.approx(a.objective, rel=1e-3, abs=1e-6)


def test_stored_entries_unpacked_on_gpu_are_the_hosts(tmp_path):
    """A stored bank entry moved to the GPU is unpacked there: the same codes, scales and zeros as
    unpacked on the host, for every width the bank stores."""
    bank = build_bank(tiny_model("llama"), calib(), ("rtn", "awq"), (3, 4, 8), ("channel", 16), store=str(tmp_path), verbose=False)
    for row in bank.entries:
        for e in row:
            host, dev = e.quantized(), e.to("cuda").qweight
            assert dev.codes.device.type == "cuda" and torch.equal(dev.codes.cpu(), host.codes)
            assert torch.equal(dev.scale.cpu(), host.scale)
            assert (host.zero is None and dev.zero is None) or torch.equal(dev.zero.cpu(), host.zero)


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


def _correlated_problem(out_f=96, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * in_f, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.1
    return torch.randn(out_f, in_f, generator=g), 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("spec,act_order", [("w4g32", False), ("w3c", False), ("w4g64s", True), ("w4g32f", False), ("w8c", True)])
def test_gptq_cuda_graphs_give_the_eager_codes(spec, act_order):
    """The captured lazy batches replay the eager kernels: bit-identical codes, scales and zeros
    (and the graphs were really used: no fallback to eager mode)."""
    from gransearch.algorithms.gptq import _GraphedBatch, cuda_graphs_enabled, set_cuda_graphs

    W, H = (t.cuda() for t in _correlated_problem())
    sp = gs.QuantSpec.parse(spec)
    old = set_cuda_graphs(False)
    try:
        eager = gs.gptq(W, H, sp, act_order=act_order).qweight
        set_cuda_graphs(True)
        graphed = gs.gptq(W, H, sp, act_order=act_order).qweight
        assert cuda_graphs_enabled() and _GraphedBatch.cache
    finally:
        set_cuda_graphs(old)
    assert torch.equal(eager.codes, graphed.codes) and torch.equal(eager.scale, graphed.scale)
    assert (eager.zero is None) == (graphed.zero is None) and (eager.zero is None or torch.equal(eager.zero, graphed.zero))


def test_gptq_multiply_adds_on_gpu_keep_the_separate_operations_codes(monkeypatch):
    """On CUDA the column loop's multiply-adds are on by default; against the CPU's separate
    operations on the same GPU they may move a code across a tie, no more."""
    import importlib

    gptq_mod = importlib.import_module("gransearch.algorithms.gptq")
    W, H = (t.cuda() for t in _correlated_problem(seed=3))
    sp = gs.QuantSpec.parse("w4g32")
    assert gptq_mod._fused(W.device)
    fused = gs.gptq(W, H, sp, act_order=True)
    monkeypatch.setattr(gptq_mod, "FUSED_MULTIPLY_ADDS", False)
    separate = gs.gptq(W, H, sp, act_order=True)
    assert (fused.qweight.codes == separate.qweight.codes).float().mean() > 0.999
    assert fused.loss == pytest.approx(separate.loss, rel=1e-3)


def test_gptq_many_with_cuda_graphs_equals_one_by_one():
    W, H = (t.cuda() for t in _correlated_problem(seed=1))
    specs = [gs.QuantSpec.parse(s) for s in ("w3c", "w4c", "w8c", "w4g32", "w3g32", "w8g32", "w4g64f", "w3g64f")]  # groups of one width: one stack
    from gransearch.algorithms.gptq import gptq_many

    many = gptq_many(W, H, specs)
    for sp, r in zip(specs, many):
        one = gs.gptq(W, H, sp).qweight
        assert (one.codes == r.qweight.codes).float().mean() > 0.999


def test_shared_input_solve_on_gpu_matches_separate_solves():
    from gransearch.algorithms.layer import quantize_layer, quantize_shared_input

    W, H = (t.cuda() for t in _correlated_problem(out_f=192, seed=2))
    parts = [W[:64], W[64:96], W[96:]]
    sp = gs.QuantSpec.parse("w4g32")
    fused = quantize_shared_input(parts, H, "gptq", sp)
    for Wi, r in zip(parts, fused):
        one = quantize_layer(Wi, H, "gptq", sp).qweight
        assert (one.codes == r.qweight.codes).float().mean() > 0.999
        assert torch.allclose(one.scale.float(), r.qweight.scale.float(), rtol=1e-2)


@pytest.mark.parametrize("rank", [16, None])
@pytest.mark.parametrize("spec", ["w3g32", "w4c", "w4g64s"])
def test_stacked_awq_grid_on_gpu_chooses_the_loops_scales_and_clips(spec, rank):
    """The GPU's default (stacked grid points and clip ratios) against the loop on the same GPU,
    measuring with a low-rank factor of the Hessian and with the exact Hessian (``awq_rank=None``)."""
    from gransearch.algorithms.awq import awq_search_hessian, clip_ratios_hessian, hessian_factor

    W, H = (t.cuda() for t in _correlated_problem(out_f=192, seed=3))
    act = H.diagonal().sqrt()
    F = hessian_factor(H, rank) if rank else None
    sp = gs.QuantSpec.parse(spec)
    loop = awq_search_hessian(act, [W[:64], W[64:]], H, sp, factor=F, batch=False)
    stacked = awq_search_hessian(act, [W[:64], W[64:]], H, sp, factor=F)
    assert loop.ratio == stacked.ratio and torch.equal(loop.scales, stacked.scales)
    assert torch.allclose(torch.tensor(loop.losses), torch.tensor(stacked.losses), rtol=1e-4)
    a, b = clip_ratios_hessian(W, H, sp, factor=F, batch=False), clip_ratios_hessian(W, H, sp, factor=F)
    assert (a == b).float().mean() > 0.99


def test_output_fisher_batched_on_gpu_is_the_cpus():
    """On a GPU the output Fisher takes FISHER_GPU_TOKENS a pass (here every window at once), the CPU
    2 windows: each token's gradient is its own window's, so they agree up to float32 sums."""
    from gransearch.sensitivity import output_fisher

    model = tiny_model("llama")
    windows = calib()[:8]
    cpu = output_fisher(model, windows, n_windows=8, verbose=False)
    gpu = output_fisher(model, windows, n_windows=8, device="cuda", verbose=False)
    assert list(gpu) == list(cpu)
    for name in cpu:
        assert gpu[name].device.type == "cpu" and torch.allclose(gpu[name], cpu[name], rtol=1e-3, atol=1e-12), name


def test_trial_assembler_on_gpu_keeps_weights_and_gives_the_cpus():
    """On a GPU a small bank's float weights fit the assembler's cache: it keeps them and points the
    layers at them, with the weights the CPU's assembler copies in."""
    import numpy as np

    from gransearch.arch import linear_weight
    from gransearch.search import _Assembler

    model = tiny_model("llama")
    bank = build_bank(model, calib(), ("rtn", "gptq", "awq"), (3, 4), ("channel", 16), fisher_windows=0, verbose=False)
    cpu, gpu = _Assembler(model, bank), _Assembler(model, bank, device="cuda")
    assert gpu.keeps_weights
    rng = np.random.default_rng(0)
    for _ in range(3):
        choice = [int(rng.integers(len(k))) for k in bank.keys]
        a, b = cpu.load(choice), gpu.load(choice)
        for i, n in enumerate(bank.layers):
            assert torch.equal(linear_weight(get_module(a, n)), linear_weight(get_module(b, n)).cpu()), n
            assert get_module(b, n).weight.data_ptr() == gpu.cache[(i, choice[i])].data_ptr()
