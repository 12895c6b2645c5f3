"""Run the README's first command's search again and say whether its result moved.

    python scripts/readme_check.py [--out runs/readme-check] [--existing --commit C] [--record FILE]

Runs ``gransearch optimize`` with the README's arguments into ``--out`` (a fresh folder; with
``--existing`` it reads a folder that such a run finished instead of running it, and a record
needs ``--commit``, the commit that run was made at), then compares
its plan, layer by layer, with ``docs/data/search/cpu/budget-w4g64/plan.json`` (the plan
``docs/search.md`` reports; its perplexities are shown against that run's ``summary.json`` too, for
information), and its proxy and final perplexities with the newest record of this
check made on a CPU of this machine's family (``docs/data/search/cpu-*/readme-w4g64*.json``: an
AMD EPYC's in ``cpu-epyc``, an Intel Xeon's in ``cpu-xeon``). GPTQ's float arithmetic moves with
the CPU, so another family can find other digits, or another plan. Prints the comparison and
exits 1 when the plan differs or a perplexity differs from that record; with no record of this
family it prints the difference from the newest record of another and says so, and only the plan
decides. ``--record FILE`` writes the run's ``summary.json`` (its storage path removed) with the
comparison, the commit and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from eval_speed import cpu_name, machine  # noqa: E402  (the benchmarks' description of the machine)
from vs_llmcompressor import commit as checkout_commit  # noqa: E402  (the benchmarks' commit of a record)

ARGS = ["optimize", "--model", "smollm2-135m", "--data", "wiki-sample", "--budget-like", "w4g64", "--bits", "3,4,8",
        "--grans", "channel,32,64", "--trials", "60", "--n-final", "1"]
REFERENCE_PLAN = os.path.join(ROOT, "docs", "data", "search", "cpu", "budget-w4g64", "plan.json")
REFERENCE_SUMMARY = os.path.join(os.path.dirname(REFERENCE_PLAN), "summary.json")  # its figures (its machine was not recorded)
RECORDS = os.path.join(ROOT, "docs", "data", "search", "cpu-*", "readme-w4g64*.json")
FAMILIES = ("EPYC", "Xeon", "Ryzen", "Threadripper", "Core", "Neoverse", "Graviton", "Apple")  # as CPU names spell them


def _layers(path: str) -> dict:
    """``{layer: (method, spec)}`` of a plan file."""
    with open(path) as f:
        layers = json.load(f)["layers"]
    return {name: (v["method"], v["spec"]) for name, v in layers.items()}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _depth(commit: str) -> int:
    """How many commits lead to ``commit`` (0 when this history does not hold it)."""
    try:
        return int(_git("rev-list", "--count", commit.removesuffix("+dirty")))
    except (subprocess.CalledProcessError, ValueError):
        return 0


def cpu_family(description: str) -> str | None:
    """The CPU family a machine's description names (``EPYC``, ``Xeon``, ...; ``None``: none known)."""
    words = re.findall(r"[A-Za-z0-9]+", description)
    return next((f for f in FAMILIES if f in words), None)


def _last_record(family: str | None = None) -> tuple[str, dict] | None:
    """The newest record of this check (of a CPU of ``family`` when given): by its ``date``, then by
    its commit's depth in the history (a clone's files all have the time of the clone)."""
    found = []
    for path in glob.glob(RECORDS):
        with open(path) as f:
            rec = json.load(f)
        if "summary" in rec and (family is None or cpu_family(rec.get("machine", "")) == family):
            found.append((rec.get("date", ""), _depth(rec.get("commit", "")), path, rec))
    if not found:
        return None
    _, _, path, rec = max(found)
    return path, rec


def reference() -> tuple[tuple[str, dict] | None, bool]:
    """The record a run on this machine is compared with, and whether it was made on a CPU of this
    machine's family (else: the newest record of any)."""
    family = cpu_family(cpu_name())
    own = _last_record(family) if family else None
    return (own, True) if own is not None else (_last_record(), False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "readme-check"))
    ap.add_argument("--existing", action="store_true", help="compare a folder a finished run left; run nothing")
    ap.add_argument("--record", help="write the summary and the comparison to this JSON file")
    ap.add_argument("--commit", help="the commit the run was made at, for the record (needed with --existing; else this checkout's at the start)")
    args = ap.parse_args(argv)
    if args.existing and args.record and not args.commit:
        sys.exit("--existing cannot tell which commit made the run it compares: name it with --commit for the record")
    cli = os.path.join(os.path.dirname(sys.executable), "gransearch")
    wall, commit = None, args.commit
    if not args.existing:
        commit = commit or checkout_commit(ROOT)
        if os.path.exists(args.out):
            sys.exit(f"{args.out} exists: remove it (a check runs the whole search in a fresh folder), or pass --existing to compare it")
        t0 = time.perf_counter()
        subprocess.run([cli if os.path.exists(cli) else "gransearch", *ARGS, "--out", args.out], check=True)
        wall = round(time.perf_counter() - t0, 1)
    summary_path = os.path.join(args.out, "summary.json")
    if not os.path.exists(summary_path):
        sys.exit(f"{summary_path} is missing: the run in {args.out} did not finish (the same command resumes it)")
    with open(summary_path) as f:
        summary = json.load(f)
    summary.pop("storage", None)  # a path on this machine
    ours, ref = _layers(os.path.join(args.out, "plan.json")), _layers(REFERENCE_PLAN)
    moved = sorted(n for n in set(ours) | set(ref) if ours.get(n) != ref.get(n))
    print(f"plan against {os.path.relpath(REFERENCE_PLAN, ROOT)}: "
          + ("the same, layer for layer" if not moved else f"{len(moved)} of {len(ref)} layers differ, first {moved[:3]}"))
    with open(REFERENCE_SUMMARY) as f:
        docs = json.load(f)
    same_as_docs = all(docs[k] == summary[k] for k in ("proxy_ppl", "final_ppl"))
    print(f"proxy_ppl and final_ppl against {os.path.relpath(REFERENCE_SUMMARY, ROOT)} (the figures docs/search.md reports): "
          + ("equal" if same_as_docs else ", ".join(f"{summary[k]!r} against {docs[k]!r}" for k in ("proxy_ppl", "final_ppl"))))
    last, ours_family = reference()
    if not ours_family:
        print(f"no record of this check on a CPU of this machine's family ({cpu_name() or 'unknown'}): "
              "the perplexities are compared with the newest record of another, and GPTQ's arithmetic moves with the CPU, "
              "so only the plan decides; --record docs/data/search/cpu-FAMILY/readme-w4g64-COMMIT.json keeps this run's")
    same_ppl = None
    if last is not None:
        path, rec = last
        pairs = [(k, rec["summary"][k], summary[k]) for k in ("proxy_ppl", "final_ppl")]
        same_ppl = all(a == b for _, a, b in pairs)
        for k, a, b in pairs:
            print(f"{k}: {b!r} against {a!r} in {os.path.relpath(path, ROOT)} (commit {rec.get('commit')}): "
                  + ("equal" if a == b else f"{b / a - 1:+.4%}"))
    if args.record:
        record = {
            "what": "the README's first command's search (gransearch " + " ".join(ARGS) + f" --out {os.path.relpath(args.out, ROOT)}), "
                    "run by scripts/readme_check.py; summary is its summary.json (the storage path removed)",
            "machine": machine(),
            "commit": commit,
            "date": datetime.date.today().isoformat(),
            "plan_equal_to_" + os.path.relpath(REFERENCE_PLAN, ROOT).replace("/", "_").removesuffix("_plan.json"): not moved,
            "proxy_and_final_equal_to_" + os.path.relpath(REFERENCE_SUMMARY, ROOT).replace("/", "_").removesuffix("_summary.json"): same_as_docs,
            "proxy_and_final_equal_to_" + (os.path.relpath(last[0], ROOT).replace("/", "_").removesuffix(".json") if last else "none"): same_ppl,
            "that_record_of_this_cpu_family": ours_family,
            "wall_seconds_of_the_command": wall,
            "summary": summary,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
        tmp = args.record + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        shutil.move(tmp, args.record)
        print(f"record: {args.record}")
    return 0 if not moved and (same_ppl is not False or not ours_family) else 1


if __name__ == "__main__":
    sys.exit(main())
