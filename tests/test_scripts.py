"""The repository's check scripts, on stand-in run folders (no search is run)."""

import json
import os
import runpy
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_check():
    return runpy.run_path(os.path.join(ROOT, "scripts", "readme_check.py"))


def _finished_run(tmp_path, **summary):
    """A folder as the README's command leaves it: the reference plan and the last record's summary."""
    check = _readme_check()
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(check["REFERENCE_PLAN"], out / "plan.json")
    _, last = check["_last_record"]()
    (out / "summary.json").write_text(json.dumps({**last["summary"], "storage": "sqlite:////elsewhere/study.db", **summary}))
    return check, out


def test_readme_check_passes_on_the_recorded_result_and_records_it(tmp_path, capsys):
    check, out = _finished_run(tmp_path)
    record = tmp_path / "record.json"
    with pytest.raises(SystemExit, match="name it with --commit"):  # a finished folder does not say which commit made it
        check["main"](["--out", str(out), "--existing", "--record", str(record)])
    assert check["main"](["--out", str(out), "--existing", "--record", str(record), "--commit", "abc1234"]) == 0
    assert "the same, layer for layer" in capsys.readouterr().out
    rec = json.loads(record.read_text())
    assert rec["commit"] == "abc1234" and rec["machine"]
    assert "storage" not in rec["summary"] and rec["wall_seconds_of_the_command"] is None
    assert [v for k, v in rec.items() if k.startswith(("plan_equal", "proxy_and_final_equal"))] == [True, True]


def test_readme_check_fails_when_a_layer_or_a_perplexity_moved(tmp_path, capsys):
    check, out = _finished_run(tmp_path)
    plan = json.loads((out / "plan.json").read_text())
    name = sorted(plan["layers"])[0]
    plan["layers"][name]["spec"] = "w8c" if plan["layers"][name]["spec"] != "w8c" else "w4c"
    (out / "plan.json").write_text(json.dumps(plan))
    assert check["main"](["--out", str(out), "--existing"]) == 1
    assert f"1 of {len(plan['layers'])} layers differ, first ['{name}']" in capsys.readouterr().out
    (tmp_path / "again").mkdir()
    check, out = _finished_run(tmp_path / "again", final_ppl=21.8)
    assert check["main"](["--out", str(out), "--existing"]) == 1
    assert "final_ppl: 21.8 against" in capsys.readouterr().out


def test_readme_check_refuses_a_folder_it_did_not_make(tmp_path):
    check = _readme_check()
    with pytest.raises(SystemExit, match="exists: remove it"):
        check["main"](["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="did not finish"):
        check["main"](["--out", str(tmp_path), "--existing"])


def test_search_cost_sorts_trials_by_kind(monkeypatch):
    """benchmarks/search_cost.py's trials by kind: with its grid and budget the first 10 trials are
    the 9 uniform plans and a knapsack warm start (what its 10-trial rows measured), and every
    finished trial is counted once, the proposed ones split into measured whole, pruned, repeats."""
    import gransearch as gs

    from .conftest import calib_windows
    from .tiny import tiny_model, token_stream

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # its sibling modules
    sc = runpy.run_path(os.path.join(ROOT, "benchmarks", "search_cost.py"))
    kinds_of = sc["trial_kinds"]
    model = tiny_model("llama")
    budget = gs.QuantPlan.uniform(model, "w4c", "rtn").nbytes(model)
    res = gs.optimize(model, budget_bytes=budget, calib=calib_windows(), eval_ids=token_stream(4096, seed=1), methods=("rtn", "gptq", "awq"),
                      bits=(3, 4), granularities=("channel", 64), n_trials=24, eval_windows=8, seqlen=64, n_final=0, verbose=False)
    first = sorted(res.study.trials, key=lambda t: t.number)[:10]
    assert [("uniform" in t.user_attrs, "warm" in t.user_attrs) for t in first] == [(True, False)] * 9 + [(False, True)]
    kinds = kinds_of(res.study)
    uniform, searched = kinds[sc["UNIFORM"]], kinds[sc["SEARCHED"]]
    assert len(uniform) == 9 and searched
    parts = [sc["MEASURED"], sc["PRUNED"], sc["REPEATS"]]
    assert sum(len(kinds.get(k, [])) for k in parts) == len(searched)
    finished = [t for t in res.study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert sum(len(v) for k, v in kinds.items() if k not in parts) == len(finished)
    assert all(s > 0 for v in kinds.values() for s in v)
