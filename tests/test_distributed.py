"""Many workers on one search: a real PostgreSQL study (and SQLite on one machine), a killed worker,
and the candidate bank built by every worker together.

The PostgreSQL tier starts its own server (tests/pgserver.py: initdb in a temporary folder, a free
local port) and stops it afterwards.
"""

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import gransearch as gs
from gransearch.claims import claim_is_dead, try_claim

from .test_search import ROOT, budget_between
from .tiny import tiny_model

N_TRIALS = 18
FAST_HEARTBEAT = {"GRANSEARCH_HEARTBEAT_SECONDS": "1", "GRANSEARCH_GRACE_SECONDS": "4"}


def _worker(storage, study, n, sleep, warm=True, bank_dir=None, host=None, slow_bank=0.0):
    env = dict(os.environ, PYTHONPATH=ROOT, GS_TEST_SLOW_BANK=str(slow_bank), **FAST_HEARTBEAT)
    if host:
        env["GRANSEARCH_WORKER_HOST"] = host
    args = [sys.executable, "-m", "tests.search_worker", storage, study, str(n), str(sleep), "1" if warm else "0"]
    return subprocess.Popen(args + ([bank_dir] if bank_dir else []), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _trials(storage, study):
    import optuna

    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _wait_for(cond, timeout=180, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except Exception:  # the study may not exist yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _three_workers_one_killed(storage, study, tmp_path, killed_host=None):
    """Three workers on one study of N_TRIALS; the third is SIGKILLed in the middle of a trial."""
    import optuna

    S = optuna.trial.TrialState
    bank = str(tmp_path / "bank")
    slow = _worker(storage, study, N_TRIALS, 30.0, bank_dir=bank, host=killed_host)  # its trial lasts 30 s: killed inside it
    _wait_for(lambda: any(t.state == S.RUNNING and str(t.user_attrs.get("worker", "")).endswith(f":{slow.pid}")
                          for t in _trials(storage, study)), what="the slow worker's first trial")
    others = [_worker(storage, study, N_TRIALS, 0.2, bank_dir=bank) for _ in range(2)]
    time.sleep(1.0)
    killed = next(t.number for t in _trials(storage, study) if t.state == S.RUNNING and str(t.user_attrs["worker"]).endswith(f":{slow.pid}"))
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    for p in others:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    trials = _trials(storage, study)
    counted = [t for t in trials if t.state in (S.COMPLETE, S.PRUNED)]
    assert len(counted) == N_TRIALS  # exactly N, whatever the number of workers
    dead = next(t for t in trials if t.number == killed)
    assert dead.state == S.FAIL  # by the heartbeat (another host) or the process check (this host)
    retry = [t for t in trials if t.system_attrs.get("retry_of") == killed]
    assert len(retry) == 1 and retry[0].state in (S.COMPLETE, S.PRUNED)  # re-run by another worker
    assert not retry[0].user_attrs["worker"].endswith(f":{slow.pid}")
    for k in ("uniform", "warm", "seed"):  # its warm start, if it was one, is the retry's too
        assert retry[0].user_attrs.get(k) == dead.user_attrs.get(k)
    measured = [t.user_attrs["plan_id"] for t in trials if t.state == S.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(measured) == len(set(measured))  # no plan evaluated twice
    for t in trials:
        if t.state == S.COMPLETE and "duplicate_of" in t.user_attrs:
            assert t.value == next(u.value for u in trials if u.number == t.user_attrs["duplicate_of"])
    model = tiny_model("llama")
    assert all(t.user_attrs["nbytes"] <= budget_between(model) for t in counted)
    assert {t.user_attrs["worker"].split(":")[-1] for t in counted} == {str(p.pid) for p in others}
    assert all(t.user_attrs["device"] == "cpu" for t in counted)
    warm = [t.user_attrs.get("uniform") for t in trials if t.user_attrs.get("uniform") and t.state != S.FAIL]
    assert len(warm) == len(set(warm))  # each warm start enqueued once, though three workers started together
    # Optuna's own CLI reads the study (docs/distributed.md shows the line)
    cli = os.path.join(os.path.dirname(sys.executable), "optuna")
    r = subprocess.run([cli, "trials", "--storage", storage, "--study-name", study, "-f", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == len(trials)
    return bank


def test_three_workers_one_killed_on_postgresql(postgres_url, tmp_path):
    """A real PostgreSQL study: 3 workers, one killed mid-trial on another 'host' (so only Optuna's
    heartbeat can find it dead); the study ends with exactly N counted trials, the killed trial
    failed and re-run by another worker, no plan measured twice, no plan over the budget."""
    _three_workers_one_killed(postgres_url, "pg-three", tmp_path, killed_host="elsewhere")


def test_three_workers_one_killed_on_sqlite(tmp_path):
    """The same on SQLite (one machine; the dead worker found by its process id)."""
    _three_workers_one_killed(f"sqlite:///{tmp_path}/study.db", "sqlite-three", tmp_path)


def test_bank_built_by_three_workers_is_the_bank_one_process_builds(tmp_path):
    """Three processes given one bank folder claim its blocks (each builds some); the finished bank is
    byte for byte the bank a single process builds, and every worker searches with it."""
    import optuna

    storage = f"sqlite:///{tmp_path}/study.db"
    one = _worker(storage, "alone", 3, 0.0, bank_dir=str(tmp_path / "one"))
    out, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    procs = [_worker(storage, "together", 6, 0.0, bank_dir=str(tmp_path / "many"), slow_bank=0.1) for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a, b = tmp_path / "one", tmp_path / "many"
    files = sorted(f for f in os.listdir(a) if f.startswith(("layer", "bank.json", "fisher")))
    assert files == sorted(f for f in os.listdir(b) if f.startswith(("layer", "bank.json", "fisher")))
    assert "bank.json" in files and len(files) > 3
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    builders = set()
    for f in os.listdir(b):
        assert not f.endswith((".claim", ".tmp"))  # every claim released, no temporary left
    for f in sorted(os.listdir(b)):
        if f.startswith("block") and f.endswith(".json"):
            builders.add(json.load(open(b / f)).get("worker"))
    assert len(builders) >= 2  # the work was shared
    S = optuna.trial.TrialState
    assert sum(t.state in (S.COMPLETE, S.PRUNED) for t in _trials(storage, "together")) == 6
    # a builder killed inside a block: the next worker takes its claim over, and the bank is the same
    c = tmp_path / "killed"
    k = _worker(storage, "killed", 3, 0.0, bank_dir=str(c), slow_bank=0.5)
    _wait_for(lambda: any(f.endswith(".claim") for f in os.listdir(c)), what="a claimed block")
    k.send_signal(signal.SIGKILL)
    k.wait()
    assert any(f.endswith(".claim") for f in os.listdir(c)) and "bank.json" not in os.listdir(c)
    q = _worker(storage, "killed", 3, 0.0, bank_dir=str(c))
    out, err = q.communicate(timeout=300)
    assert q.returncode == 0, err
    _, mismatch, errors = filecmp.cmpfiles(a, c, files, shallow=False)
    assert not mismatch and not errors


def test_killed_bank_builder_is_taken_over(tmp_path, monkeypatch):
    """A block claimed by a dead process is taken over; a live claim is respected."""
    path = str(tmp_path / "block0000.claim")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path, "w") as fh:
        fh.write(f"{gs.study.worker_id().rsplit(':', 1)[0]}:{dead.pid}")
    assert claim_is_dead(path) and try_claim(path)
    assert open(path).read() == gs.study.worker_id()
    assert not try_claim(path)  # ours now, alive: nobody else takes it
    with open(path, "w") as fh:  # another host's claim: alive while it is touched, dead after the grace period
        fh.write("otherhost:1")
    assert not claim_is_dead(path)
    old = time.time() - gs.study.GRACE_SECONDS - 5
    os.utime(path, (old, old))
    assert claim_is_dead(path) and try_claim(path)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_dead_trial_found_twice_is_retried_once(tmp_path):
    """Two workers that find the same dead trial (here: the check run twice, and the retry asked
    twice, as when a check and Optuna's heartbeat both see it) fail it and enqueue its retry once."""
    import optuna

    from gransearch.study import check_workers, open_study, retry_failed

    S = optuna.trial.TrialState
    storage = f"sqlite:///{tmp_path}/study.db"
    study = open_study(storage, "dead-twice")
    trial = study.ask()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists, on this host
    import socket

    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    check_workers(study, storage)
    check_workers(study, storage)
    failed = study._storage.get_trial(trial._trial_id)
    assert failed.state == S.FAIL
    retry_failed(study, failed)  # a second finder
    retries = [t for t in study.get_trials() if t.system_attrs.get("retry_of") == trial.number]
    assert len(retries) == 1 and retries[0].state == S.WAITING
