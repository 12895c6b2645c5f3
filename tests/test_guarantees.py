"""What gransearch guarantees (README, "Guarantees"): nothing wrong leaves the library.

Each test reproduces a way a result used to come out wrong without a word: a resumed search that
changed its candidates, a run folder reused for another model, a GGUF cache keyed on a file name,
a corrupted bank file, NaN weights, and warm starts lost to a failed or killed trial.
"""

import json
import os
import socket
import subprocess
import sys

import optuna
import pytest
import torch

import gransearch as gs
from gransearch.arch import get_module
from gransearch.cli import main
from gransearch.errors import BankError, NonFiniteError, StudyMismatchError
from gransearch.bank import Bank, bank_for, build_bank

from .test_search import BITS, GRANS, budget_between, calib, fake_objective
from .tiny import tiny_model, token_stream

SMALL = {"--n-calib": "4", "--calib-seqlen": "32", "--seqlen": "32", "--eval-windows": "4", "--batch-size": "2", "--n-final": "0"}


def _optimize_argv(model, text, out, **over):
    opts = {"--budget-like": "w4g32", "--bits": "4,8", "--grans": "channel,32", "--methods": "rtn,gptq", "--trials": "10", **SMALL}
    opts.update(over)
    argv = ["optimize", "--model", model, "--data", text, "--out", str(out), "--device", "cpu", "--quiet"]
    for k, v in opts.items():
        argv += [k, v]
    return argv


def _trial_values(out):
    study = optuna.load_study(study_name=f"gransearch-{os.path.basename(out)}", storage=f"sqlite:///{out}/study.db")
    return {t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}


# 1. a resumed search never mixes candidates or proxies ----------------------------------------


def test_resume_with_reordered_candidates_keeps_every_plan_and_the_budget(cli_assets, tmp_path, capsys):
    """Reordering --bits/--grans used to rebuild the bank in another order under the same study, whose
    trials stored bank positions: plan.json came out w8 everywhere and over the budget."""
    model_dir, _, text = cli_assets
    out = tmp_path / "run"
    assert main(_optimize_argv(model_dir, text, out)) == 0
    first = json.loads((out / "summary.json").read_text())
    before = _trial_values(out)
    assert main(_optimize_argv(model_dir, text, out, **{"--bits": "8,4", "--grans": "32,channel", "--trials": "12"})) == 0
    summary = json.loads((out / "summary.json").read_text())
    plan = gs.QuantPlan.load(str(out / "plan.json"))
    model, _ = gs.load_model(model_dir)
    assert plan.nbytes(model) == summary["plan_bytes"] <= summary["budget_bytes"] == first["budget_bytes"]
    assert summary["trials"] == 12 and summary["proxy_ppl"] <= first["proxy_ppl"]
    after = _trial_values(out)
    assert all(after[k] == v for k, v in before.items())  # the resumed study kept every measured value
    # each trial's stored plan, rebuilt by content, costs what the trial recorded
    study = optuna.load_study(study_name=f"gransearch-{out.name}", storage=f"sqlite:///{out}/study.db")
    names = list(plan.layers)
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            layers = {n: gs.LayerPlan.from_key(k) for n, k in zip(names, t.user_attrs["keys"])}
            assert gs.plan.plan_nbytes(model, layers) == t.user_attrs["nbytes"] <= summary["budget_bytes"]
    capsys.readouterr()


@pytest.mark.parametrize("change, what", [
    ({"--bits": "4"}, "candidates"),
    ({"--methods": "rtn"}, "candidates"),
    ({"--seqlen": "64"}, "proxy.seqlen"),
    ({"--eval-windows": "3"}, "proxy.eval_windows"),
    ({"--n-calib": "5"}, "bank.calib_sha256"),
    ({"--budget-like": "w4c"}, "budget_bytes"),
    ({"--no-act-order": None}, "bank.act_order"),
])
def test_resume_with_another_search_is_refused(cli_assets, tmp_path, capsys, change, what):
    model_dir, _, text = cli_assets
    out = tmp_path / "run"
    assert main(_optimize_argv(model_dir, text, out, **{"--trials": "3"})) == 0
    plan_before = (out / "plan.json").read_text()
    argv = _optimize_argv(model_dir, text, out, **{k: v for k, v in change.items() if v is not None})
    argv += [k for k, v in change.items() if v is None]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "made for another search" in err and what in err and "new --out" in err and "Traceback" not in err
    assert (out / "plan.json").read_text() == plan_before  # nothing overwritten


def test_resume_with_another_proxy_text_is_refused(cli_assets, tmp_path, capsys):
    from .conftest import write_text

    model_dir, _, text = cli_assets
    out = tmp_path / "run"
    assert main(_optimize_argv(model_dir, text, out, **{"--trials": "3"})) == 0
    other = write_text(tmp_path / "other.txt", seed=7)
    capsys.readouterr()
    assert main(_optimize_argv(model_dir, other, out, **{"--trials": "3"})) == 2
    err = capsys.readouterr().err
    assert "proxy.eval_sha256" in err and "bank.calib_sha256" in err


# 2. a run folder or bank is never reused for another model of the same shapes --------------------


def test_run_folder_of_another_model_with_the_same_shapes_is_refused(cli_assets, tmp_path, capsys):
    model_a, model_b, text = cli_assets
    out = tmp_path / "run"
    assert main(_optimize_argv(model_a, text, out, **{"--trials": "3"})) == 0
    manifest = (out / "bank" / "bank.json").read_text()
    capsys.readouterr()
    assert main(_optimize_argv(model_b, text, out, **{"--trials": "3"})) == 2
    err = capsys.readouterr().err
    assert "bank.weights" in err and "made for another search" in err
    assert (out / "bank" / "bank.json").read_text() == manifest  # A's bank untouched
    a, _ = gs.load_model(model_a)
    b, _ = gs.load_model(model_b)
    assert gs.plan.model_fingerprint(a) == gs.plan.model_fingerprint(b)  # plans: shapes only, on purpose
    assert gs.plan.weights_fingerprint(a) != gs.plan.weights_fingerprint(b)
    with pytest.raises(BankError, match="another model"):  # the Python API refuses the folder too
        bank_for(b, calib(), str(out / "bank"), ("rtn", "gptq"), (4, 8), ("channel", 32), verbose=False)


def test_weights_fingerprint_sees_one_changed_weight_and_ignores_nothing_else():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert gs.plan.weights_fingerprint(a) == gs.plan.weights_fingerprint(b)
    with torch.no_grad():
        get_module(b, "model.layers.1.mlp.down_proj").weight[0, 0] += 1.0  # element 0 is always sampled
    assert gs.plan.weights_fingerprint(a) != gs.plan.weights_fingerprint(b)
    assert gs.plan.model_fingerprint(a) == gs.plan.model_fingerprint(b)


# 3. the GGUF cache is keyed on content ----------------------------------------------------------


def test_gguf_cache_key_is_the_content_not_the_name(tmp_path, monkeypatch):
    from gransearch import models

    monkeypatch.setenv("GRANSEARCH_CACHE", str(tmp_path / "cache"))
    converted = []

    def fake_convert(path, out_dir):
        os.makedirs(out_dir)
        with open(path, "rb") as src, open(os.path.join(out_dir, "model.safetensors"), "wb") as dst:
            dst.write(src.read())
        converted.append(path)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fa, fb = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    fa.write_bytes(b"GGUF" + b"\x01" * 4096)
    fb.write_bytes(b"GGUF" + b"\x02" * 4096)  # same name, same size, other content
    ta, tb = models._resolve(str(fa)), models._resolve(str(fb))
    assert ta != tb and len(converted) == 2
    assert open(os.path.join(tb, "model.safetensors"), "rb").read() == fb.read_bytes()
    (tmp_path / "c").mkdir()
    fc = tmp_path / "c" / "model.gguf"
    fc.write_bytes(fa.read_bytes())
    assert models._resolve(str(fc)) == ta and len(converted) == 2  # same content: the same conversion
    fa.write_bytes(b"GGUF" + b"\x03" * 4096)  # rewritten in place, same size
    os.utime(fa, ns=(1, 1))
    assert models._resolve(str(fa)) not in (ta, tb) and len(converted) == 3


# 4. corrupted bank entries are detected -----------------------------------------------------------


CANDS = (("rtn", "gptq", "awq"), (3, 4), ("channel", 16))


@pytest.mark.parametrize("stacked", [False, True])
def test_stored_bank_of_every_method_is_the_bank_in_memory(tmp_path, monkeypatch, stacked):
    """A stored bank of all four methods (AWQ and AWQ+GPTQ entries share their input scales; stacked,
    the layers of a group share their roundings' buffers) is written, and reads back as the bank
    built in memory, entry for entry."""
    from gransearch import bank as bank_mod

    monkeypatch.setattr(bank_mod, "STACK_SHARED_INPUTS", stacked)
    cands = (("rtn", "gptq", "awq", "awq+gptq"), (4,), ("channel", 16))
    stored = bank_for(tiny_model("llama"), calib(), str(tmp_path / "bank"), *cands, fisher_windows=0, verbose=False)
    mem = build_bank(tiny_model("llama"), calib(), *cands, fisher_windows=0, verbose=False)
    assert stored.keys == mem.keys and any(k.startswith("awq+gptq:") for k in mem.keys[0])
    for rs, rm in zip(stored.entries, mem.entries):
        for a, b in zip(rs, rm):
            assert torch.equal(a.effective_weight(), b.effective_weight()) and a.objective == b.objective


def test_corrupted_bank_file_is_named_and_rebuilt(tmp_path, caplog):
    model = tiny_model("llama")
    folder = tmp_path / "bank"
    bank_for(model, calib(), str(folder), *CANDS, verbose=False)
    layer = folder / "layer0003.safetensors"
    data = bytearray(layer.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])  # flip bytes inside the codes
    layer.write_bytes(bytes(data))
    with pytest.raises(BankError, match="layer0003.safetensors is corrupted"):
        Bank.load(str(folder))
    with caplog.at_level("WARNING", logger="gransearch.bank"):
        rebuilt = bank_for(model, calib(), str(folder), *CANDS, verbose=False)
    assert "corrupted" in caplog.text and "rebuilding" in caplog.text
    mem = build_bank(model, calib(), *CANDS, verbose=False)
    for rm, rd in zip(mem.entries, rebuilt.entries):
        for a, b in zip(rm, rd):
            assert torch.equal(a.effective_weight(), b.effective_weight())
    assert Bank.load(str(folder)) is not None  # whole again


# 5. NaN never becomes a number ------------------------------------------------------------------


@pytest.mark.parametrize("param, first_layer", [
    ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj"),
    ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj"),
    ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.mlp.gate_proj"),
])
def test_nan_weights_raise_and_name_the_layer(param, first_layer):
    model = tiny_model("llama")
    with torch.no_grad():
        dict(model.named_parameters())[param].fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=f"perplexity is not finite.*{param}"):
        gs.perplexity(model, token_stream(512), seqlen=64, verbose=False)
    with pytest.raises(NonFiniteError, match=f"calibration inputs of {first_layer} .*{param}"):
        gs.calibrate(model, calib(), verbose=False)
    with pytest.raises(NonFiniteError, match=first_layer):
        gs.optimize(model, budget_bytes=budget_between(tiny_model("llama")), calib=calib(), eval_ids=token_stream(1024), seqlen=32,
                    methods=("rtn",), bits=BITS, granularities=GRANS, n_trials=3, verbose=False)


@pytest.mark.parametrize("stacked", [False, True])
def test_bank_checks_read_with_the_objectives_still_raise(monkeypatch, stacked):
    """The bank rounds unchecked and reads its checks with the objectives, once per group of layers:
    a weight that is not finite, or one whose scales leave the float16 range, still raises the
    check's own error, naming the layer, whether the group is one layer (CPU) or stacked (CUDA)."""
    from gransearch import bank as bank_mod

    monkeypatch.setattr(bank_mod, "STACK_SHARED_INPUTS", stacked)
    model = tiny_model("llama")
    down = model.model.layers[1].mlp.down_proj  # the last linear: its output reaches no calibrated input
    with torch.no_grad():
        down.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*contains 1 NaN"):
        build_bank(model, calib(), ("rtn",), (4,), ("channel",), fisher_windows=0, verbose=False)
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 3] = 3e6  # its row's 4-bit scale: 2 * 3e6 / 15 > 65504
    with pytest.raises(ValueError, match="float16 range"):
        build_bank(model, calib(), ("rtn",), (4,), ("channel",), fisher_windows=0, verbose=False)
    ok = build_bank(model, calib(), ("rtn",), (8,), ("channel",), fisher_windows=0, verbose=False)  # 2 * 3e6 / 255 fits
    assert len(ok.layers) == len(ok.entries)


def test_nan_in_the_head_alone_is_caught_before_the_knapsack():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")  # no linear input is touched: only the loss
    with pytest.raises(NonFiniteError, match="output Fisher of model.layers"):
        build_bank(model, calib(), ("rtn",), (4,), ("channel",), verbose=False)


# 6. warm starts lost to a failed or killed trial are run again ---------------------------------


def _uniform_keys(model):
    bank = build_bank(model, calib(), ("rtn", "gptq"), BITS, GRANS, fisher_windows=0, verbose=False)
    budget = budget_between(model)
    fixed = gs.plan.float_nbytes(model, exclude=set(bank.layers))
    keys = {k for row in bank.keys for k in row}
    return {k for k in keys if fixed + sum(row[bank.index(i, k)].nbytes for i, row in enumerate(bank.entries)) <= budget}


def test_failed_baseline_is_rerun_on_resume(tmp_path):
    model = tiny_model("llama")
    storage = f"sqlite:///{tmp_path}/study.db"
    fn = fake_objective(model)
    calls = []

    def failing(mdl, report):  # the second trial (a uniform baseline) fails, as a NaN or an OOM would
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("boom")
        return fn(mdl, report)

    kw = dict(budget_bytes=budget_between(model), calib=calib(), eval_ids=None, methods=("rtn", "gptq"), bits=BITS, granularities=GRANS,
              storage=storage, study_name="s", verbose=False)
    failing.__qualname__ = fn.__qualname__  # one proxy objective for the study record
    with pytest.raises(ValueError, match="boom"):
        gs.optimize(model, objective_fn=failing, n_trials=20, **kw)
    res = gs.optimize(model, objective_fn=fn, n_trials=20, **kw)
    assert set(res.baselines) == _uniform_keys(model)
    failed = [t for t in res.study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs.get("uniform") in res.baselines


def test_killed_baseline_left_running_is_failed_and_rerun(tmp_path):
    model = tiny_model("llama")
    storage = f"sqlite:///{tmp_path}/study.db"
    fn = fake_objective(model)
    kw = dict(budget_bytes=budget_between(model), calib=calib(), eval_ids=None, methods=("rtn", "gptq"), bits=BITS, granularities=GRANS,
              storage=storage, study_name="s", objective_fn=fn, verbose=False)
    gs.optimize(model, n_trials=1, **kw)  # warm starts enqueued, one run
    study = optuna.load_study(study_name="s", storage=storage)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    trial = study.ask()  # the next waiting baseline, now RUNNING in a worker that died (SIGKILL leaves it so)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead}")
    lost = trial.user_attrs["uniform"]
    res = gs.optimize(model, n_trials=20, **kw)
    states = {t.number: t.state for t in res.study.trials}
    assert states[trial.number] == optuna.trial.TrialState.FAIL
    assert lost in res.baselines and set(res.baselines) == _uniform_keys(model)
    assert res.n_trials == 20  # the failed trial is not counted


def test_study_record_mismatch_via_api_names_every_change(tmp_path):
    model = tiny_model("llama")
    storage = f"sqlite:///{tmp_path}/study.db"
    fn = fake_objective(model)
    kw = dict(calib=calib(), eval_ids=None, methods=("rtn", "gptq"), granularities=GRANS, storage=storage, study_name="s",
              objective_fn=fn, n_trials=2, verbose=False)
    gs.optimize(model, budget_bytes=budget_between(model), bits=BITS, **kw)
    with pytest.raises(StudyMismatchError, match=r"budget_bytes: was .*candidates: removed \[gptq:w2c"):
        gs.optimize(model, budget_bytes=budget_between(model, 0.6), bits=(4, 8), **kw)
