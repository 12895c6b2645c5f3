"""Bad input gets a clear error: malformed plans, bank files, stored run configurations and arguments
end in one line naming the problem (exit code 2 from the CLI), never in a traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch

import gransearch as gs
from gransearch.cli import main
from gransearch.errors import BankError, PlanFormatError
from gransearch.bank import Bank, bank_for

from .test_search import calib
from .tiny import VOCAB, tiny_model, token_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli_error(capsys, argv) -> str:
    """Run the CLI; it must fail with exit code 2 and a message, without a traceback."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert "Traceback" not in err and "error:" in err, err
    return err


# ---- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, says", [
    (["eval", "--seqlen", "1"], "--seqlen: expected an integer >= 2"),
    (["eval", "--seqlen", "abc"], "--seqlen: expected an integer >= 2"),
    (["eval", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["eval", "--max-windows", "0"], "--max-windows: expected an integer >= 1"),
    (["quantize", "--damp", "0"], "--damp: expected a finite number > 0"),
    (["quantize", "--damp", "-0.1"], "--damp: expected a finite number > 0"),
    (["quantize", "--damp", "nan"], "--damp: expected a finite number > 0"),
    (["quantize", "--awq-tokens", "0"], "--awq-tokens: expected an integer >= 1"),
    (["quantize", "--n-calib", "0"], "--n-calib: expected an integer >= 1"),
    (["optimize", "--out", "x", "--bits", ""], "--bits: give at least one bit width"),
    (["optimize", "--out", "x", "--bits", ",,"], "--bits: give at least one bit width"),
    (["optimize", "--out", "x", "--bits", "4,9"], "bad bit width '9'"),
    (["optimize", "--out", "x", "--grans", ""], "--grans: give at least one granularity"),
    (["optimize", "--out", "x", "--grans", "channel,g0"], "bad granularity 'g0'"),
    (["optimize", "--out", "x", "--grans", "rows"], "bad granularity 'rows'"),
    (["optimize", "--out", "x", "--methods", "rtn,hqq"], "bad method 'hqq'"),
    (["optimize", "--out", "x", "--trials", "0"], "--trials: expected an integer >= 1"),
    (["optimize", "--out", "x", "--eval-windows", "0"], "--eval-windows: expected an integer >= 1"),
    (["optimize", "--out", "x", "--budget-gb", "-1"], "--budget-gb: expected a finite number > 0"),
    (["optimize", "--out", "x", "--n-final", "-1"], "--n-final: expected an integer >= 0"),
    (["optimize", "--out", "x", "--awq-rank", "0"], "awq rank must be an integer >= 1 or 'exact'"),
    (["ablate", "weights", "--bits", "1"], "bad bit width '1'"),
    (["worker", "--storage", "x", "--study", "s", "--trials", "0"], "--trials: expected an integer >= 1"),
])
def test_bad_arguments_name_the_option_and_the_range(capsys, argv, says):
    assert says in _cli_error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_cuda_is_one_line(capsys, cli_assets):
    model_dir, _, text = cli_assets
    err = _cli_error(capsys, ["eval", "--model", model_dir, "--data", text, "--device", "cuda", "--quiet"])
    assert "no CUDA device is available" in err and "--device cpu" in err
    with pytest.raises(ValueError, match="no CUDA device"):
        gs.quantize(tiny_model("llama"), "w4c", calib(), method="rtn", device="cuda", verbose=False)


def test_missing_model_and_text_are_one_line(capsys, cli_assets, tmp_path):
    model_dir, _, text = cli_assets
    assert "does not exist" in _cli_error(capsys, ["eval", "--model", str(tmp_path / "nothing.gguf"), "--data", text, "--quiet"])
    assert "could not load model" in _cli_error(capsys, ["eval", "--model", str(tmp_path / "no-dir"), "--data", text, "--quiet"])
    assert "unknown text" in _cli_error(capsys, ["eval", "--model", model_dir, "--data", str(tmp_path / "none.txt"), "--quiet"])


def test_library_checks_arguments_before_any_work():
    model = tiny_model("llama")
    ids = token_stream(512)
    for kw, says in (({"seqlen": 1}, "seqlen must be an integer >= 2"), ({"batch_size": 0}, "batch_size must be"),
                     ({"max_windows": 0}, "max_windows must be"), ({"seqlen": 64.0}, "seqlen must be an integer")):
        with pytest.raises(ValueError, match=says):
            gs.perplexity(model, ids, **{"seqlen": 64, **kw}, verbose=False)
    with pytest.raises(ValueError, match="integer token ids"):
        gs.perplexity(model, ids.float(), seqlen=64, verbose=False)
    with pytest.raises(ValueError, match=rf"outside the model's vocabulary \[0, {VOCAB}\)"):
        gs.perplexity(model, ids + VOCAB, seqlen=64, verbose=False)
    with pytest.raises(ValueError, match="calibration ids holds token ids in"):
        gs.calibrate(model, calib() + VOCAB, verbose=False)
    with pytest.raises(ValueError, match="calibration ids must hold integer"):
        gs.calibrate(model, calib().float(), verbose=False)
    for kw, says in (({"damp": 0.0}, "damp must be a finite number > 0"), ({"awq_tokens": 0}, "awq_tokens must be"),
                     ({"batch_size": 0}, "batch_size must be"), ({"block_size": 0}, "block_size must be")):
        with pytest.raises(ValueError, match=says):
            gs.quantize(tiny_model("llama"), "w4c", calib(), method="gptq", **kw, verbose=False)
    opt = dict(budget_bytes=10**9, calib=calib(), eval_ids=ids, verbose=False)
    for kw, says in (({"bits": ()}, "bits must not be empty"), ({"granularities": []}, "granularities must not be empty"),
                     ({"methods": ("rtn", "hqq")}, "unknown method 'hqq'"), ({"bits": (4, 12)}, "between 2 and 8"),
                     ({"granularities": ("rows",)}, "unknown granularity"), ({"n_trials": 0}, "n_trials must be"),
                     ({"seqlen": 1}, "seqlen must be"), ({"eval_windows": 0}, "eval_windows must be"),
                     ({"timeout": -5}, "timeout must be")):
        with pytest.raises(ValueError, match=says):
            gs.optimize(model, **{**opt, **kw})


# ---- plans -------------------------------------------------------------------------------------


def _good_plan_doc():
    return gs.QuantPlan.uniform(tiny_model("llama"), "w4g16", "gptq").to_dict()


@pytest.mark.parametrize("corrupt, says", [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: "", "not valid JSON"),
    (lambda text: "\xff\xfe garbage", "not valid JSON"),
    (lambda text: "[1, 2]", "a plan is a JSON object"),
    (lambda text: json.dumps({**json.loads(text), "format": "other"}), "not a gransearch plan"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "layers"}), "'layers' is missing"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "fingerprint"}), "'fingerprint' is missing"),
    (lambda text: json.dumps({**json.loads(text), "layers": []}), "'layers' is missing or not a JSON object"),
    (lambda text: json.dumps({**json.loads(text), "layers": {}}), "names no layer"),
    (lambda text: json.dumps({**json.loads(text), "layers": {"a": "w4c"}}), "layer 'a' must be an object"),
    (lambda text: json.dumps({**json.loads(text), "layers": {"a": {"method": "gptq"}}}), "layer 'a' must be an object"),
    (lambda text: json.dumps({**json.loads(text), "layers": {"a": {"method": "hqq", "spec": "w4c"}}}), "unknown method 'hqq'"),
    (lambda text: json.dumps({**json.loads(text), "layers": {"a": {"method": "rtn", "spec": "w4x"}}}), "cannot parse quantization spec"),
    (lambda text: json.dumps({**json.loads(text), "layers": {"a": {"method": "rtn", "spec": "w12c"}}}), "between 2 and 8"),
    (lambda text: json.dumps({**json.loads(text), "meta": 3}), "'meta' must be a JSON object"),
    (lambda text: json.dumps({**json.loads(text), "version": "1"}), "version '1' is not supported"),
])
def test_malformed_plans_name_the_file_and_the_problem(tmp_path, capsys, cli_assets, corrupt, says):
    path = tmp_path / "plan.json"
    path.write_text(corrupt(json.dumps(_good_plan_doc())), encoding="utf-8", errors="surrogateescape")
    with pytest.raises(PlanFormatError, match=says) as exc:
        gs.QuantPlan.load(str(path))
    assert str(path) in str(exc.value)
    model_dir, _, text = cli_assets
    err = _cli_error(capsys, ["quantize", "--model", model_dir, "--data", text, "--plan", str(path), "--quiet"])
    assert says.split("'")[0] in err


def test_missing_plan_and_foreign_plan(tmp_path, capsys, cli_assets):
    model_dir, _, text = cli_assets
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gs.QuantPlan.load(str(tmp_path / "none.json"))
    gs.QuantPlan.uniform(tiny_model("opt"), "w4c", "rtn").save(str(tmp_path / "opt.json"))
    err = _cli_error(capsys, ["quantize", "--model", model_dir, "--data", text, "--plan", str(tmp_path / "opt.json"), "--quiet",
                              "--n-calib", "2", "--calib-seqlen", "32"])
    assert "made for another model" in err


# ---- banks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored_bank(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bank") / "b"
    bank_for(tiny_model("llama"), calib(), str(folder), ("rtn", "gptq"), (4,), ("channel",), verbose=False)
    return folder


def _copy_bank(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, says", [
    (lambda f: (f / "bank.json").write_text((f / "bank.json").read_text()[:100]), "bank.json: not valid JSON"),
    (lambda f: (f / "bank.json").write_text("[]"), "is not a gransearch bank"),
    (lambda f: (f / "bank.json").write_text(json.dumps({**json.loads((f / "bank.json").read_text()), "version": 0})), "is not a gransearch bank"),
    (lambda f: (f / "bank.json").write_text(json.dumps({k: v for k, v in json.loads((f / "bank.json").read_text()).items() if k != "keys"})),
     "malformed bank manifest"),
    (lambda f: (f / "bank.json").write_text(json.dumps({**json.loads((f / "bank.json").read_text()), "sha256": "x"})), "must be lists"),
    (lambda f: (f / "bank.json").write_text(json.dumps({**json.loads((f / "bank.json").read_text()), "nbytes": [[None]]})),
     "malformed bank manifest"),
    (lambda f: (f / "bank.json").write_text(json.dumps({**json.loads((f / "bank.json").read_text()), "gptq_options": {"dmap": 1}})),
     "unknown GPTQ options"),
    (lambda f: os.remove(f / "layer0002.safetensors"), "layer0002.safetensors is missing"),
    (lambda f: (f / "layer0001.safetensors").write_bytes((f / "layer0001.safetensors").read_bytes()[:-9]), "layer0001.safetensors is corrupted"),
    (lambda f: (f / "fisher.safetensors").write_bytes(b"\x00" * 64), "fisher.safetensors is corrupted"),
])
def test_malformed_bank_files_name_the_file(stored_bank, tmp_path, damage, says):
    folder = _copy_bank(stored_bank, tmp_path / "bank")
    damage(folder)
    with pytest.raises(BankError, match=says) as exc:
        Bank.load(str(folder))
    assert str(folder) in str(exc.value)
    # the search's own loader rebuilds a damaged bank instead of using it
    again = bank_for(tiny_model("llama"), calib(), str(folder), ("rtn", "gptq"), (4,), ("channel",), verbose=False)
    assert Bank.load(str(folder)) is not None and len(again.layers) == 14


# ---- workers and stored run configurations -----------------------------------------------------


def test_worker_on_unknown_storage_or_study_creates_nothing(tmp_path, capsys, cli_assets):
    db = tmp_path / "none.db"
    err = _cli_error(capsys, ["worker", "--storage", f"sqlite:///{db}", "--study", "s", "--quiet"])
    assert "no study database" in err and not db.exists()
    model_dir, _, text = cli_assets
    out = tmp_path / "run"
    assert main(["optimize", "--model", model_dir, "--data", text, "--out", str(out), "--budget-like", "w4c", "--bits", "4,8",
                 "--grans", "channel", "--methods", "rtn", "--trials", "2", "--n-calib", "2", "--calib-seqlen", "32", "--seqlen", "32",
                 "--eval-windows", "2", "--n-final", "0", "--quiet"]) == 0
    err = _cli_error(capsys, ["worker", "--storage", f"sqlite:///{out}/study.db", "--study", "nope", "--quiet"])
    assert "no study named 'nope'" in err and "gransearch-run" in err
    # a worker on the real study adds trials
    capsys.readouterr()
    assert main(["worker", "--storage", f"sqlite:///{out}/study.db", "--study", "gransearch-run", "--trials", "4", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trials"] == 4
    # and the same from Python; a worker with a device and a bank folder of its own
    assert gs.join_study(f"sqlite:///{out}/study.db", "gransearch-run", 5, verbose=False).n_trials == 5
    local = tmp_path / "local-bank"
    assert main(["worker", "--storage", f"sqlite:///{out}/study.db", "--study", "gransearch-run", "--trials", "6", "--device", "cpu",
                 "--bank-dir", str(local), "--quiet"]) == 0
    assert (local / "bank.json").exists()
    import optuna

    last = max(optuna.load_study(study_name="gransearch-run", storage=f"sqlite:///{out}/study.db").trials, key=lambda t: t.number)
    assert last.user_attrs["device"] == "cpu" and last.user_attrs["worker"].endswith(f":{os.getpid()}")
    with pytest.raises(ValueError, match="no study named"):
        gs.join_study(f"sqlite:///{out}/study.db", "nope")


def test_cli_awq_rank_exact_reaches_the_bank_and_the_workers(tmp_path, capsys, cli_assets):
    """``--awq-rank exact``: stored in the run configuration (workers read it) and in the bank's."""
    import optuna

    model_dir, _, text = cli_assets
    out = tmp_path / "run"
    assert main(["optimize", "--model", model_dir, "--data", text, "--out", str(out), "--budget-like", "w4c", "--bits", "4,8",
                 "--grans", "channel", "--methods", "rtn,awq", "--trials", "2", "--n-calib", "2", "--calib-seqlen", "32", "--seqlen", "32",
                 "--eval-windows", "2", "--n-final", "0", "--awq-rank", "exact", "--quiet"]) == 0
    study = optuna.load_study(study_name="gransearch-run", storage=f"sqlite:///{out}/study.db")
    assert json.loads(study.user_attrs["cli_config"])["awq_rank"] is None
    with open(out / "bank" / "bank.json") as fh:
        assert json.load(fh)["config"]["awq_rank"] is None
    capsys.readouterr()
    assert main(["worker", "--storage", f"sqlite:///{out}/study.db", "--study", "gransearch-run", "--trials", "3", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trials"] == 3


@pytest.mark.parametrize("tamper, says", [
    (lambda c: {**c, "bank_dir": "relative/bank"}, "must be an absolute path"),
    (lambda c: {**c, "bank_dir": "/nonexistent/bank"}, "does not exist on this machine"),
    (lambda c: {**c, "model": "/nonexistent/model.gguf"}, "does not exist on this machine"),
    (lambda c: {**c, "n_calib": -1}, "n_calib: expected an integer >= 1"),
    (lambda c: {**c, "bits": ""}, "bits: give at least one"),
    (lambda c: {**c, "methods": "rtn,evil"}, "bad method 'evil'"),
    (lambda c: {**c, "dtype": "float8"}, "dtype 'float8'"),
    (lambda c: {**c, "device": ["cpu"]}, "device ['cpu'] is not"),
    (lambda c: {**c, "data": "/etc/nothing.txt"}, "unknown text"),
    (lambda c: {**c, "extra": 1}, "unknown keys ['extra']"),
    (lambda c: {**c, "sampler": "random"}, "sampler 'random' is not one of"),
    (lambda c: {**c, "awq_rank": 0}, "awq_rank 0 is not an integer >= 1"),
    (lambda c: {**c, "awq_rank": "64"}, "awq_rank '64' is not an integer >= 1"),
    (lambda c: {**c, "budget_gb": 1.0}, "exactly one of budget_gb"),
    (lambda c: [1], "not a JSON object"),
])
def test_worker_treats_the_stored_run_configuration_as_untrusted(tmp_path, capsys, cli_assets, tamper, says):
    import optuna

    from gransearch.runs import check_run_config

    model_dir, _, text = cli_assets
    cfg = {"model": model_dir, "data": text, "dtype": "float32", "n_calib": 2, "calib_seqlen": 32, "seed": 0, "budget_gb": None,
           "budget_bytes": None, "budget_like": "w4c", "methods": "rtn", "bits": "4,8", "grans": "channel", "seqlen": 32,
           "eval_windows": 2, "batch_size": 2, "act_order": True, "device": "cpu", "bank_dir": None}
    check_run_config(dict(cfg))  # the untampered one is fine
    storage = f"sqlite:///{tmp_path}/study.db"
    optuna.create_study(study_name="s", storage=storage).set_user_attr("cli_config", json.dumps(tamper(cfg)))
    assert says in _cli_error(capsys, ["worker", "--storage", storage, "--study", "s", "--quiet"])


def test_trust_remote_code_reaches_the_model_loader(monkeypatch, capsys):
    seen = []

    def fake_load(name, **kw):
        seen.append(kw.get("trust_remote_code"))
        raise ValueError("stop here")

    monkeypatch.setattr(gs, "load_model", fake_load)
    for flag in ([], ["--trust-remote-code"]):
        _cli_error(capsys, ["optimize", "--out", str(os.devnull) + "-x", "--budget-gb", "1", *flag, "--quiet"])
    assert seen == [False, True]


def test_concurrent_optimize_on_a_fresh_folder(tmp_path, cli_assets):
    """Two searches started together on one new folder share the study; neither dies in an IntegrityError."""
    model_dir, _, text = cli_assets
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "gransearch.cli", "optimize", "--model", model_dir, "--data", text, "--out", str(out),
            "--budget-like", "w4c", "--bits", "4,8", "--grans", "channel", "--methods", "rtn", "--trials", "6", "--n-calib", "2",
            "--calib-seqlen", "32", "--seqlen", "32", "--eval-windows", "2", "--n-final", "0", "--quiet"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    import optuna

    study = optuna.load_study(study_name="gransearch-run", storage=f"sqlite:///{out}/study.db")
    uniform = [t.user_attrs["uniform"] for t in study.trials if t.user_attrs.get("uniform")]
    assert len(uniform) == len(set(uniform))  # warm starts enqueued once, not once per process


# ---- first use ---------------------------------------------------------------------------------


def test_rtn_needs_no_calibration_pass_by_default(monkeypatch):
    """RTN quantizes each weight alone: the default makes no calibration pass (no runner is built)."""
    q = sys.modules["gransearch.quantize"]  # the module (the package attribute is the function)

    def no_runner(*a, **k):
        raise AssertionError("RTN ran a calibration pass")

    monkeypatch.setattr(q, "BlockRunner", no_runner)
    model = tiny_model("llama")
    res = gs.quantize(model, "w4g16", None, method="rtn", verbose=False)
    assert len(res.records) == 14 and all(r.objective is None for r in res.records)
