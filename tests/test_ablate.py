"""Ablations and diagnostics on tiny models: rows match direct computations, CSVs resume."""

import csv
import math

import pytest
import torch

import gransearch as gs
from gransearch import ablate
from gransearch.arch import get_module, linear_weight, model_linears
from gransearch.calibrate import hooks
from gransearch.bank import build_bank

from .tiny import tiny_model, token_stream

SEQ = 32


def data():
    ids = token_stream(4096, seed=3)
    return gs.sample_windows(ids, 8, SEQ, seed=0), ids[:640]


def ppl(model, ids):
    return gs.perplexity(model, ids, seqlen=SEQ, batch_size=4, verbose=False).ppl


def no_eval(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a row already in the CSV was evaluated again")

    monkeypatch.setattr(ablate, "perplexity", boom)


def test_weight_ablation_rows_and_resume(tmp_path, monkeypatch, caplog):
    model = tiny_model("llama")
    calib, ids = data()
    out = str(tmp_path / "w.csv")
    rows = gs.ablate_weights(model, calib, ids, methods=("rtn", "gptq"), bits=(4, 3), granularities=("channel", 32, 48),
                             out=out, seqlen=SEQ, verbose=False)
    assert "do not divide" in caplog.text  # groups of 48 divide neither 64 nor 128
    assert [(r["method"], r["spec"]) for r in rows] == [("fp", "fp")] + [
        (m, s) for s in ("w4c", "w4g32", "w3c", "w3g32") for m in ("rtn", "gptq")]
    by = {(r["method"], r["spec"]): r for r in rows}
    # the unquantized row and the RTN rows equal direct evaluations (RTN does not depend on inputs)
    assert float(by[("fp", "fp")]["ppl"]) == pytest.approx(ppl(model, ids), rel=1e-4)
    for spec in ("w4c", "w3g32"):
        q = tiny_model("llama")
        gs.quantize(q, spec, calib, method="rtn", objective=False, verbose=False)
        assert float(by[("rtn", spec)]["ppl"]) == pytest.approx(ppl(q, ids), rel=1e-4)
        plan = gs.QuantPlan.uniform(model, spec, "rtn")
        assert int(by[("rtn", spec)]["model_bytes"]) == plan.nbytes(model)
    # the model itself is untouched
    assert ppl(model, ids) == pytest.approx(float(by[("fp", "fp")]["ppl"]), rel=1e-6)
    # resume: every row comes from the CSV, nothing is evaluated or duplicated
    no_eval(monkeypatch)
    again = gs.ablate_weights(model, calib, ids, methods=("rtn", "gptq"), bits=(4, 3), granularities=("channel", 32),
                              out=out, seqlen=SEQ, verbose=False)
    assert again == rows
    with open(out) as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    md = ablate.weights_markdown(rows)
    assert "| 3 | g32 |" in md and md.count("\n|") == 2 + 4


def test_weight_ablation_computes_only_missing_rows(tmp_path):
    model = tiny_model("llama")
    calib, ids = data()
    out = str(tmp_path / "w.csv")
    first = gs.ablate_weights(model, calib, ids, methods=("rtn",), bits=(4,), granularities=("channel",), out=out, seqlen=SEQ, verbose=False)
    both = gs.ablate_weights(model, calib, ids, methods=("rtn", "awq"), bits=(4,), granularities=("channel",), out=out, seqlen=SEQ, verbose=False)
    assert both[:2] == first and [r["method"] for r in both] == ["fp", "rtn", "awq"]


def test_ablation_csv_is_never_resumed_for_another_run(tmp_path, caplog):
    """A CSV's rows belong to one model, calibration and evaluation slice: another model of the same
    shapes, or another slice, is refused instead of mixing its rows with the stored ones."""
    calib, ids = data()
    out = str(tmp_path / "w.csv")
    kw = dict(methods=("rtn",), bits=(4,), granularities=("channel",), out=out, seqlen=SEQ, verbose=False)
    gs.ablate_weights(tiny_model("llama"), calib, ids, **kw)
    with pytest.raises(gs.StudyMismatchError, match="weights: was"):
        gs.ablate_weights(tiny_model("llama", seed=1), calib, ids, **kw)
    with pytest.raises(gs.StudyMismatchError, match="eval_sha256"):
        gs.ablate_weights(tiny_model("llama"), calib, ids[:320], **kw)
    with pytest.raises(gs.StudyMismatchError, match="calib_sha256"):
        gs.ablate_weights(tiny_model("llama"), calib[:4], ids, **kw)
    act = str(tmp_path / "a.csv")
    akw = dict(alphas=(), thresholds=(), attribution=False, out=act, seqlen=SEQ, verbose=False)
    gs.ablate_activations(tiny_model("llama"), calib, ids, **akw)
    with pytest.raises(gs.StudyMismatchError, match="weight_spec"):
        gs.ablate_activations(tiny_model("llama"), calib, ids, weight_spec="w4c", **akw)
    # a CSV from before records existed is adopted once, with a warning
    legacy = tmp_path / "legacy.csv"
    legacy.write_text((tmp_path / "w.csv").read_text())
    with caplog.at_level("WARNING", logger="gransearch.study"):
        gs.ablate_weights(tiny_model("llama"), calib, ids, **{**kw, "out": str(legacy)})
    assert "no record" in caplog.text


def test_bank_awq_gptq_entries():
    """AWQ+GPTQ in the bank: GPTQ in the scaled space lowers the summed objective below AWQ's; layers
    without a valid fold (v -> o under grouped-query attention) fall back to RTN / GPTQ as quantize does."""
    model = tiny_model("llama")
    with torch.no_grad():  # an outlier input channel, as in real models
        model.model.layers[0].input_layernorm.weight[3] *= 20
    calib, _ = data()
    bank = build_bank(model, calib, ("rtn", "gptq", "awq", "awq+gptq"), (3,), ("channel",), verbose=False)
    awq, both = 0.0, 0.0
    for i, name in enumerate(bank.layers):
        e = {k.split(":")[0]: bank.entries[i][j] for j, k in enumerate(bank.keys[i])}
        if name.endswith("o_proj"):  # 2 KV heads x 16 = 32 outputs of v, 64 inputs of o: no fold
            assert torch.equal(e["awq"].effective_weight(), e["rtn"].effective_weight())
            assert torch.equal(e["awq+gptq"].effective_weight(), e["gptq"].effective_weight())
        else:
            assert e["awq"].in_scale is not None and e["awq+gptq"].in_scale is not None
            awq += e["awq"].objective
            both += e["awq+gptq"].objective
    assert both < awq


def test_activation_ablation(tmp_path, monkeypatch):
    model = tiny_model("llama")
    calib, ids = data()
    out = str(tmp_path / "a.csv")
    rows = gs.ablate_activations(model, calib, ids, alphas=(0.5,), thresholds=(1e9, 0.5), out=out, seqlen=SEQ, verbose=False)
    by = {r["config"]: r for r in rows}
    assert len(rows) == 1 + 6 + 2 + 4 + 4  # fp, W only + 5 granularities, SmoothQuant x 2, outliers x 4, 4 input kinds
    q = tiny_model("llama")
    gs.quantize(q, "w8c", calib, method="rtn", objective=False, verbose=False)
    assert float(by["W only"]["ppl"]) == pytest.approx(ppl(q, ids), rel=1e-4)
    assert gs.set_act_quant(q, gs.ActSpec(8, "token"), only=lambda n: n.endswith("down_proj")) == 2
    assert [n for n, m in q.named_modules() if isinstance(m, gs.QuantLinear) and m.act_spec is not None] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    gs.set_act_quant(q, gs.ActSpec(8, "token"))
    assert float(by["A8 token dynamic"]["ppl"]) == pytest.approx(ppl(q, ids), rel=1e-4)
    # a threshold nothing exceeds keeps no column and changes nothing; a tiny one keeps many
    assert float(by["outliers > 1e+09 + A8 token dynamic"]["outlier_share"]) == 0.0
    assert by["outliers > 1e+09 + A8 token dynamic"]["ppl"] == by["A8 token dynamic"]["ppl"]
    assert float(by["outliers > 0.5 + A8 token dynamic"]["outlier_share"]) > 0.1
    kinds = [r["config"] for r in rows if r["kind"] == "attribution"]
    assert kinds == [f"A8 tensor static on {k} only" for k in ("q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj")]
    no_eval(monkeypatch)
    assert gs.ablate_activations(model, calib, ids, alphas=(0.5,), thresholds=(1e9, 0.5), out=out, seqlen=SEQ, verbose=False) == rows
    assert "| W only |" in ablate.activations_markdown(rows)


def test_kurtosis_matches_direct_computation():
    model = tiny_model("opt")
    calib, _ = data()
    stats = gs.calibrate(model, calib, moments=True, verbose=False)
    name = model_linears(model)[3].name
    xs = []
    with hooks([get_module(model, name).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))]):
        with torch.no_grad():
            for b in calib.split(8):
                model(input_ids=b)
    x = torch.cat(xs).double().flatten()
    c = x - x.mean()
    direct = float((c**4).mean() / (c * c).mean() ** 2)
    assert stats[name].kurtosis == pytest.approx(direct, rel=1e-6)
    with pytest.raises(ValueError, match="moments"):
        gs.calibrate(model, calib, verbose=False)[name].kurtosis


def test_diagnose_names_planted_outliers(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] *= 100  # activation outlier channel
        linear_weight(model.model.layers[0].self_attn.k_proj)[3] *= 50  # weight outlier row
    calib, _ = data()
    d = gs.diagnose(model, calib, verbose=False)
    assert len(d.layers) == 14
    assert {x.name for x in d.worst("act_outlier_ratio", 2)} == {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    assert d.worst("act_kurtosis", 1)[0].name in {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    assert d.worst("a_err_tensor", 1)[0].name in {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    assert d.worst("w_ratio", 1)[0].name == "model.layers.0.self_attn.k_proj"
    for x in d.layers:
        assert 0 < x.w_err_channel <= x.w_err_tensor * (1 + 1e-6) or math.isclose(x.w_err_channel, x.w_err_tensor, rel_tol=1e-3)
        assert x.a_err_token > 0 and x.a_err_tensor > 0
    d.to_csv(str(tmp_path / "d.csv"))
    with open(tmp_path / "d.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 14
    back = gs.Diagnosis.from_csv(str(tmp_path / "d.csv"))
    assert [x.name for x in back.layers] == [x.name for x in d.layers]
    assert back.layers[3].a_err_tensor == pytest.approx(d.layers[3].a_err_tensor, rel=1e-5)
    kinds = {k["kind"]: k for k in d.by_kind()}
    assert set(kinds) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert max(kinds, key=lambda k: kinds[k]["w_ratio_max"]) == "k_proj"
    assert d.heatmap("a_ratio", str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 1000
