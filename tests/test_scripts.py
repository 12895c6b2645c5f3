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
    assert check["main"](["--out", str(out), "--existing", "--record", str(record)]) == 0
    assert "the same, layer for layer" in capsys.readouterr().out
    rec = json.loads(record.read_text())
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
