"""The repository's check scripts, on stand-in run folders (no search is run)."""

import glob
import json
import os
import runpy
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_check(cpu: str = "AMD EPYC 9B14"):
    """scripts/readme_check.py's functions, on a machine whose CPU is named ``cpu`` (an AMD EPYC's
    records are kept: the checks do not depend on the CPU that runs the tests)."""
    check = runpy.run_path(os.path.join(ROOT, "scripts", "readme_check.py"))
    check["main"].__globals__["cpu_name"] = lambda: cpu
    return check


def _finished_run(tmp_path, cpu: str = "AMD EPYC 9B14", **summary):
    """A folder as the README's command leaves it: the reference plan and the summary of the record
    a run on that CPU is compared with."""
    check = _readme_check(cpu)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(check["REFERENCE_PLAN"], out / "plan.json")
    (_, last), _ = check["reference"]()  # the record a run on this machine is compared with
    (out / "summary.json").write_text(json.dumps({**last["summary"], "storage": "sqlite:////elsewhere/study.db", **summary}))
    return check, out


def _move_first_layer(out) -> tuple[str, int]:
    """Give the first layer of the run folder's plan another spec; returns its name and the layer count."""
    plan = json.loads((out / "plan.json").read_text())
    name = sorted(plan["layers"])[0]
    plan["layers"][name]["spec"] = "w8c" if plan["layers"][name]["spec"] != "w8c" else "w4c"
    (out / "plan.json").write_text(json.dumps(plan))
    return name, len(plan["layers"])


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
    assert rec["plan_equal_to_docs_data_search_cpu_budget-w4g64"] is True
    compared = [k for k in rec if k.startswith("proxy_and_final_equal_to_docs_data_search_cpu-")]
    assert len(compared) == 1 and rec[compared[0]] is True and rec["that_record_of_this_cpu_family"] is True
    docs = json.load(open(os.path.join(ROOT, "docs", "data", "search", "cpu", "budget-w4g64", "summary.json")))
    assert rec["proxy_and_final_equal_to_docs_data_search_cpu_budget-w4g64"] == (docs["final_ppl"] == rec["summary"]["final_ppl"])


def test_readme_check_fails_when_a_layer_or_a_perplexity_moved(tmp_path, capsys):
    check, out = _finished_run(tmp_path)
    name, n = _move_first_layer(out)
    assert check["main"](["--out", str(out), "--existing"]) == 1
    assert f"1 of {n} layers differ, first ['{name}']" in capsys.readouterr().out
    (tmp_path / "again").mkdir()
    check, out = _finished_run(tmp_path / "again", final_ppl=21.8)
    assert check["main"](["--out", str(out), "--existing"]) == 1
    assert "final_ppl: 21.8 against" in capsys.readouterr().out


def test_readme_check_compares_with_records_of_the_same_cpu_family(tmp_path, capsys):
    """Each stored record names its CPU family, and a run is compared with the newest of its own;
    on a family without a record the perplexities are shown against another's and only the plan
    decides."""
    check = _readme_check()
    family = check["cpu_family"]
    assert family("AMD EPYC, 2 cores, x86_64, torch 2.13.0+cpu") == "EPYC"
    assert family("x86_64 (Intel(R) Xeon(R) Processor), 2 cores, torch 2.13.0+cpu (2 threads), no GPU") == "Xeon"
    assert family("AMD EPYC 7B13 64-Core Processor") == "EPYC" and family("Intel(R) Core(TM) i7-1185G7") == "Core"
    assert family("x86_64, 2 cores, torch 2.13.0+cpu") is None
    records = glob.glob(check["RECORDS"])
    assert records and all(family(json.load(open(p))["machine"]) for p in records)
    for cpu, name in (("AMD EPYC 9B14", "EPYC"), ("Intel(R) Xeon(R) Platinum 8481C", "Xeon")):
        (path, rec), own = _readme_check(cpu)["reference"]()
        assert own and family(rec["machine"]) == name
    check, out = _finished_run(tmp_path, cpu="Neoverse-V2", final_ppl=21.8)
    assert check["main"](["--out", str(out), "--existing"]) == 0  # no record of this family: the plan decides
    said = capsys.readouterr().out
    assert "no record of this check on a CPU of this machine's family (Neoverse-V2)" in said and "final_ppl: 21.8 against" in said
    _move_first_layer(out)
    assert check["main"](["--out", str(out), "--existing"]) == 1


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
