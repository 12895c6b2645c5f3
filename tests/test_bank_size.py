"""The bank on disk: its size known before it is built, dominated candidates dropped, a size limit."""

import os

import pytest
import torch

import gransearch as gs
from gransearch.bank import bank_for, bank_size, build_bank, pareto_front
from gransearch.errors import BankError

from .test_search import budget_between, calib, fake_objective
from .tiny import tiny_model

CANDS = (("rtn", "gptq", "awq"), (3, 4, 8), ("channel", 16))


def _data_bytes(folder):
    """Bytes of the tensors in the bank's layer files (their headers aside)."""
    from safetensors import safe_open

    total = 0
    for f in os.listdir(folder):
        if f.startswith("layer") and f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as fh:
                total += sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys())
    return total


def test_size_is_known_before_the_bank_is_built(tmp_path):
    model = tiny_model("llama")
    size = bank_size(model, *CANDS)
    bank = bank_for(model, calib(), str(tmp_path / "bank"), *CANDS, verbose=False)
    assert size.entries == sum(len(k) for k in bank.keys)
    assert sorted(size.per_candidate) == sorted({k for row in bank.keys for k in row})
    actual = _data_bytes(tmp_path / "bank")
    # the bound counts AWQ's input scale on every AWQ entry; v_proj has none (no fold under grouped-query attention)
    no_fold = sum(e.in_scale is None for row, keys in zip(bank.entries, bank.keys) for e, k in zip(row, keys) if k.startswith("awq:"))
    in_f = {r.name: r.shape[1] for r in gs.arch.model_linears(model)}
    unscaled = sum(4 * in_f[n] for n, row, keys in zip(bank.layers, bank.entries, bank.keys)
                   for e, k in zip(row, keys) if k.startswith("awq:") and e.in_scale is None)
    assert no_fold > 0 and size.total - unscaled == actual
    assert "B" in size.table(top=3) and len(size.table(top=3).splitlines()) == 4


def test_pareto_front():
    assert pareto_front([10, 10, 20, 30], [5.0, 4.0, 4.5, 1.0]) == [1, 3]
    assert pareto_front([10, 10], [1.0, 1.0]) == [0, 1]  # exact ties both stay
    assert pareto_front([5], [float("inf")]) == [0]


def test_pruned_bank_keeps_each_layers_front_and_the_search_runs(tmp_path):
    model = tiny_model("llama")
    full = build_bank(model, calib(), *CANDS, verbose=False)
    pruned = bank_for(model, calib(), str(tmp_path / "bank"), *CANDS, prune="dominated", verbose=False)
    dropped = 0
    for i in range(len(full.layers)):
        nb = [e.nbytes for e in full.entries[i]]
        ob = [e.objective for e in full.entries[i]]
        keep = [full.keys[i][j] for j in pareto_front(nb, ob)]
        assert pruned.keys[i] == keep
        dropped += len(full.keys[i]) - len(keep)
        for e, k in zip(pruned.entries[i], pruned.keys[i]):
            j = full.keys[i].index(k)
            assert e.nbytes == nb[j] and e.objective == ob[j]
    assert dropped > len(full.layers)  # at least one per layer on average: same-spec methods lose to GPTQ/AWQ
    assert _data_bytes(tmp_path / "bank") < bank_size(model, *CANDS).total
    assert pruned.config["prune"] == "dominated" and "prune" not in full.config
    budget = budget_between(model, 0.5)
    res = gs.optimize(model, budget_bytes=budget, calib=calib(), eval_ids=torch.zeros(1, dtype=torch.long), methods=CANDS[0],
                      bits=CANDS[1], granularities=CANDS[2], n_trials=6, bank_prune="dominated", bank_dir=str(tmp_path / "bank"),
                      objective_fn=fake_objective(model), verbose=False)
    assert res.nbytes <= budget
    for i, name in enumerate(pruned.layers):  # every chosen candidate is one the pruned bank kept
        lp = res.plan.layers[name]
        assert f"{lp.method}:{lp.spec}" in pruned.keys[i]


def test_a_bank_over_the_limit_is_refused(tmp_path):
    model = tiny_model("llama")
    size = bank_size(model, *CANDS)
    with pytest.raises(BankError, match="prune"):  # refused before any work: no folder content
        build_bank(model, calib(), *CANDS, store=str(tmp_path / "a"), max_bytes=size.total // 2, verbose=False)
    assert not os.path.exists(tmp_path / "a" / "build.json")
    with pytest.raises(BankError, match="projects to"):  # pruned, but still far too big: stopped after its first block
        build_bank(model, calib(), *CANDS, store=str(tmp_path / "b"), max_bytes=size.total // 50, prune="dominated", verbose=False)
    ok = build_bank(model, calib(), *CANDS, store=str(tmp_path / "c"), max_bytes=size.total, verbose=False)
    assert len(ok.layers) == len(gs.arch.model_linears(model))
    with pytest.raises(ValueError, match="prune="):
        build_bank(model, calib(), *CANDS, prune="smallest", verbose=False)
