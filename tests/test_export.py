"""Export: the compressed-tensors checkpoint, proven by compressed-tensors and transformers reading it."""

import json
import os

import pytest
import torch

import gransearch as gs
from gransearch.cost import layer_nbytes
from gransearch.export import compressed_tensors as ct

from .conftest import calib_windows
from .tiny import tiny_model, token_stream

compressed_tensors = pytest.importorskip("compressed_tensors", reason="needs the export extra: pip install compressed-tensors")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_compressed_tensors_packing(bits, dim):
    """Our int32 packing of unsigned codes equals compressed-tensors' packing of the signed values
    (code - 2^(b-1)), for widths that straddle words and lengths that are not multiples of 32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (13, 70), generator=g, dtype=torch.int64).to(torch.uint8)
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    ours = ct.pack_int32(codes, bits, dim)
    theirs = pack_to_int32(signed, bits, packed_dim=dim)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    n = codes.shape[dim]
    assert torch.equal(ct.unpack_int32(theirs, bits, n, dim), codes)
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape, packed_dim=dim), signed)


def _quantized(spec, method="gptq", kind="llama"):
    model = tiny_model(kind)
    gs.quantize(model, spec, calib_windows(), method=method, verbose=False)
    return model


def _ppl(model, ids):
    return gs.perplexity(model, ids, seqlen=64, batch_size=4, verbose=False).ppl


# symmetric checkpoints load through transformers' compressed path; asymmetric ones need
# dequantize=True (transformers 5 + compressed-tensors 0.20 shape the zero point unpacked on load:
# vllm-project/llm-compressor#1618), which dequantizes in float16
@pytest.mark.parametrize("spec, method, sym", [("w4g64", "rtn", False), ("w8cs", "gptq", True), ("w4g32s", "awq", True),
                                               ("w4g32", "awq+gptq", False)])
def test_transformers_loads_the_export(tmp_path, spec, method, sym):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = _quantized(spec, method)
    saved = gs.save_quantized(model, str(tmp_path))
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), **kw)  # as a user would, without gransearch
    ids = token_stream(2048, seed=5)
    with torch.no_grad():
        x = ids[:128].reshape(2, 64)
        diff = float((model(x).logits - hf(x).logits).abs().max())
    ours, theirs = _ppl(model, ids), _ppl(hf, ids)
    assert abs(theirs / ours - 1) < 1e-4, (ours, theirs, diff)
    if sym:
        assert diff == 0.0  # the compressed path computes exactly our weights
    back = gs.load_quantized(str(tmp_path))
    for name, m in model.named_modules():
        if isinstance(m, gs.QuantLinear):
            a, b = m.quantized_weight(), gs.arch.get_module(back, name).quantized_weight()
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
            assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)
    assert _ppl(back, ids) == pytest.approx(ours, rel=1e-6)
    assert saved.n_quantized == 14


@pytest.mark.parametrize("spec", ["w4g64", "w4g32s"])
def test_transformers_load_lands_whole_on_the_device_asked(tmp_path, monkeypatch, spec):
    """gs.export.load_in_transformers picks the load path by the checkpoint's schemes and moves every
    tensor to the device: transformers 5.17's dequantize path leaves modules under compressed-tensors'
    CPU offloading, where .to() copied back into the CPU (a GPU benchmark ran on the CPU unnoticed);
    and a move that leaves tensors behind is an error, not a slow row."""
    import transformers

    model = _quantized(spec, "rtn")
    gs.save_quantized(model, str(tmp_path))
    ids = token_stream(2048, seed=5)
    hf = gs.export.load_in_transformers(str(tmp_path))
    assert _ppl(hf, ids) == pytest.approx(_ppl(model, ids), rel=1e-4)
    moved = gs.export.load_in_transformers(str(tmp_path), device="meta")
    assert {t.device.type for t in [*moved.parameters(), *moved.buffers()]} == {"meta"}
    load = transformers.AutoModelForCausalLM.from_pretrained

    def stuck(*a, **kw):  # a model whose .to() moves nothing
        m = load(*a, **kw)
        m.to = lambda *_, **__: m
        return m

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stuck)
    with pytest.raises(RuntimeError, match="elsewhere"):
        gs.export.load_in_transformers(str(tmp_path), device="meta")


def test_written_bytes_are_the_counted_bytes(tmp_path):
    """Every quantized layer's tensors in the file weigh exactly layer_nbytes(format='compressed-tensors'),
    the floats exactly float_nbytes at the written dtype, and the plan's count is their sum."""
    from safetensors import safe_open

    model = tiny_model("llama")
    plan = gs.QuantPlan.uniform(model, "w4g32", "rtn")
    first = next(iter(plan.layers))
    plan.layers[first] = gs.LayerPlan("rtn", "w3c")  # 3 bits: rows padded to whole int32 words
    shapes = {n: gs.arch.linear_shape(gs.arch.get_module(model, n)) for n in plan.layers}
    gs.quantize(model, plan, None, verbose=False)
    saved = gs.save_quantized(model, str(tmp_path), dtype="bfloat16")
    per_layer = {n: 0 for n in plan.layers}
    floats = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        for k in fh.keys():
            t = fh.get_tensor(k)
            owner, _, leaf = k.rpartition(".")
            if owner in per_layer and leaf != "bias":
                per_layer[owner] += t.numel() * t.element_size()
            else:
                assert t.dtype == torch.bfloat16
                floats += t.numel() * t.element_size()
    for n, lp in plan.layers.items():
        assert per_layer[n] == layer_nbytes(shapes[n], lp.spec, "compressed-tensors"), n
    fresh = tiny_model("llama")
    assert floats == saved.float_nbytes == gs.plan.float_nbytes(fresh, set(plan.layers), dtype=torch.bfloat16)
    assert saved.quantized_nbytes + saved.float_nbytes == gs.plan.plan_nbytes(fresh, plan.layers, "compressed-tensors", torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["quantization_config"]["ignore"] == ["lm_head"]
    groups = cfg["quantization_config"]["config_groups"]
    assert sorted(len(g["targets"]) for g in groups.values()) == [1, 13]


def test_per_tensor_and_activation_quantization_are_refused(tmp_path):
    model = _quantized("w4t", "rtn")
    with pytest.raises(ValueError, match="per-tensor layers cannot be written"):
        gs.save_quantized(model, str(tmp_path / "a"))
    model = _quantized("w4c", "rtn")
    gs.set_act_quant(model, gs.ActSpec(8, "token"))
    with pytest.raises(ValueError, match="activation quantization is not exported"):
        gs.save_quantized(model, str(tmp_path / "b"))
    with pytest.raises(ValueError, match="no quantized layer"):
        gs.save_quantized(tiny_model("llama"), str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "a")


def test_vllm_profile_refuses_unservable_plans_by_name(tmp_path):
    model = tiny_model("llama")
    plan = gs.QuantPlan.uniform(model, "w4g32", "gptq")
    q = next(n for n in plan.layers if n.endswith("q_proj"))
    plan.layers[q] = gs.LayerPlan("gptq", "w8cs")  # q/k/v of one block now mix specs
    down = next(n for n in plan.layers if n.endswith("down_proj"))
    plan.layers[down] = gs.LayerPlan("rtn", "w3g32")  # 3 bits: no vLLM kernel
    gs.quantize(model, plan, calib_windows(), verbose=False)
    with pytest.raises(ValueError) as exc:
        gs.save_quantized(model, str(tmp_path), profile="vllm")
    msg = str(exc.value)
    assert down in msg and "w3g32" in msg and "q_proj=w8cs / k_proj=w4g32 / v_proj=w4g32" in msg and "--profile vllm" in msg


def test_vllm_profile_search_is_servable_and_counted_exactly(tmp_path):
    """A vllm-profile search proposes only vLLM's specs, fused sets share one, and the saved
    checkpoint's tensors weigh exactly what the search counted."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    names = [r.name for r in gs.arch.model_linears(model)]
    full = gs.plan.float_nbytes(model)
    res = gs.optimize(model, budget_bytes=int(full * 0.55), calib=calib_windows(), eval_ids=token_stream(4096, seed=3), seqlen=64,
                      eval_windows=4, methods=("rtn", "gptq"), n_trials=12, n_final=0, profile="vllm", verbose=False)
    plan = res.plan
    specs = {n: lp.spec for n, lp in plan.layers.items()}
    gs.profiles.get_profile("vllm").check_layers(specs)
    assert {sp.bits for sp in specs.values()} <= {4, 8}
    for group in gs.arch.fused_sets(names):
        assert len({str(specs[n]) for n in group}) == 1
    assert plan.meta["format"] == "compressed-tensors" and plan.meta["float_dtype"] == "float32"
    assert res.nbytes <= int(full * 0.55) and plan.nbytes(model) == res.nbytes
    work = tiny_model("llama")
    gs.quantize(work, plan, calib_windows(), verbose=False)
    saved = gs.save_quantized(work, str(tmp_path), profile="vllm")
    assert saved.quantized_nbytes + saved.float_nbytes == res.nbytes
    assert all(sp.symmetric for sp in specs.values())  # the vllm profile: every plan reloads in transformers, exactly
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = token_stream(1024, seed=5)
    assert _ppl(hf, ids) == pytest.approx(_ppl(work, ids), rel=1e-6)


def test_tied_solve_is_the_best_joint_choice():
    """solve_tied against brute force on a small problem: one fused pair and a free layer."""
    import itertools

    import numpy as np

    from gransearch.allocate import solve_tied

    keys = [["rtn:w4c", "gptq:w4c", "rtn:w8cs"], ["rtn:w4c", "rtn:w8cs", "gptq:w8cs"], ["rtn:w4c", "rtn:w8cs"]]
    costs = np.array([[10, 10, 20], [10, 20, 20], [5, 9, 0]], dtype=np.int64)
    losses = np.array([[5.0, 4.0, 1.0], [6.0, 2.0, 1.5], [3.0, 0.5, np.inf]])
    for cap in (25, 35, 45, 49, 60):
        got = solve_tied(costs, losses, keys, [[0, 1]], cap)
        best = None
        for c in itertools.product(range(3), range(3), range(2)):
            same = keys[0][c[0]].split(":")[1] == keys[1][c[1]].split(":")[1]
            cost = sum(costs[i, j] for i, j in enumerate(c))
            if same and cost <= cap:
                loss = sum(losses[i, j] for i, j in enumerate(c))
                best = loss if best is None else min(best, loss)
        if best is None:
            assert got is None
        else:
            assert sum(losses[i, j] for i, j in enumerate(got)) == pytest.approx(best)


def test_cli_optimize_vllm_profile_saves_a_servable_checkpoint(cli_assets, tmp_path, capsys):
    """`gransearch optimize --profile vllm --save DIR`: one command, a checkpoint transformers loads
    whose tensors weigh what the summary says, and a plan within the budget counted the same way;
    then `quantize --plan --save` writes the same plan again."""
    from transformers import AutoModelForCausalLM

    from gransearch.cli import main

    model_dir, _, text = cli_assets
    out, save = tmp_path / "run", tmp_path / "ckpt"
    argv = ["optimize", "--model", model_dir, "--data", text, "--out", str(out), "--device", "cpu", "--quiet", "--profile", "vllm",
            "--budget-like", "w4g32", "--bits", "4,8", "--grans", "channel,32", "--methods", "rtn,gptq", "--trials", "6",
            "--n-calib", "4", "--calib-seqlen", "32", "--seqlen", "32", "--eval-windows", "2", "--batch-size", "2", "--n-final", "0",
            "--save", str(save)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accounting"] == {"profile": "vllm", "format": "compressed-tensors", "float_dtype": "float32"}
    assert summary["saved"]["tensor_bytes"] == summary["plan_bytes"] <= summary["budget_bytes"]
    hf = AutoModelForCausalLM.from_pretrained(str(save))
    assert hf.config.vocab_size > 0 and os.path.exists(save / "tokenizer.json")
    assert main(["quantize", "--model", model_dir, "--data", text, "--plan", str(out / "plan.json"), "--n-calib", "4",
                 "--calib-seqlen", "32", "--seqlen", "32", "--skip-fp-eval", "--quiet", "--json", "--save", str(tmp_path / "again")]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["saved"]["tensor_bytes"] == summary["plan_bytes"]


def test_profiles_candidates():
    vllm, asym = gs.profiles.get_profile("vllm"), gs.profiles.get_profile("vllm-asym")
    assert [str(s) for s in vllm.specs((64, 96), (3, 4, 8), ("tensor", "channel", 32, 64))] == ["w4cs", "w4g32s", "w8cs", "w8g32s"]
    assert [str(s) for s in asym.specs((64, 128), (4, 8), ("channel",))] == ["w4c", "w4cs", "w8cs"]
    with pytest.raises(ValueError, match="takes bits \\[4, 8\\]"):
        vllm.check_candidates((2, 3), ("channel",))
    with pytest.raises(ValueError, match="unknown profile 'tgi'"):
        gs.profiles.get_profile("tgi")
