"""Models larger than memory: quantized block by block from their safetensors files.

The from-disk run must give the codes the in-memory run gives, bit for bit, write a checkpoint that
transformers and gransearch load with the in-memory model's logits, and never hold more than one
block's weights at a time.
"""

import json
import os

import pytest
import torch

import gransearch as gs
from gransearch.arch import get_blocks, get_module
from gransearch.offload import DiskModel, checkpoint_files, float32_nbytes

from .tiny import tiny_model, token_stream


def _save_float(model, folder, dtype=torch.bfloat16, shards: int = 1):
    """A hub-style float checkpoint of ``model`` (bf16 by default), optionally sharded."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.config.save_pretrained(folder)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    names = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)


def _in_memory_copy(folder):
    """The float checkpoint loaded whole, in float32 (as load_model would)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _floats(folder):
    from safetensors.torch import load_file

    out = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            out.update({k: v for k, v in load_file(os.path.join(folder, f)).items() if v.is_floating_point() and "weight_scale" not in k})
    return out


def _codes(model):
    return {n: m.quantized_weight() for n, m in model.named_modules() if isinstance(m, gs.QuantLinear)}


@pytest.mark.parametrize("kind, spec, method, shards", [("llama", "w4g32", "gptq", 1), ("llama", "w4g32s", "awq+gptq", 3),
                                                         ("gemma3", "w3c", "rtn", 2), ("opt", "w4g32", "gptq", 1)])
def test_from_disk_gives_the_in_memory_codes_and_logits(tmp_path, kind, spec, method, shards):
    src = str(tmp_path / "float")
    _save_float(tiny_model(kind, seed=3), src, shards=shards)
    calib = token_stream(2048, seed=1)[:1024].reshape(16, 64)
    mem = _in_memory_copy(src)
    gs.quantize(mem, spec, calib, method, batch_size=4, verbose=False)
    # AWQ folds its scales into the norms, which bf16 would round: those are written in float32
    save_dtype = "float32" if "awq" in method else None
    res = gs.quantize(src, spec, calib, method, batch_size=4, save=str(tmp_path / "q"), save_dtype=save_dtype, verbose=False)
    assert res.model is None and res.mode == "from disk, block by block" and res.saved.n_quantized == len(res.records)
    back = gs.load_quantized(str(tmp_path / "q"), dtype=torch.float32)
    ours, theirs = _codes(mem), _codes(back)
    assert set(ours) == set(theirs) and len(ours) == len(res.records)
    for n, a in ours.items():
        b = theirs[n]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), n
        assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero), n
    x = token_stream(512, seed=9)[:256].reshape(2, 128)
    with torch.no_grad():
        want = mem(x).logits
        got = back(x).logits
    assert torch.equal(want, got)  # float tensors were bf16 to begin with: written exactly
    # the sharded checkpoint: one shard per block plus the rest, an index naming each tensor once
    with open(tmp_path / "q" / "model.safetensors.index.json") as fh:
        index = json.load(fh)
    n_blocks = len(get_blocks(mem))
    want_dtype = torch.float32 if save_dtype else torch.bfloat16  # default: the published dtype
    assert {v.dtype for k, v in _floats(tmp_path / "q").items()} == {want_dtype}
    assert len(set(index["weight_map"].values())) == n_blocks + 1
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]  # the temporary folder became q


def test_transformers_loads_the_sharded_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=4), src)
    calib = token_stream(2048, seed=1)[:512].reshape(8, 64)
    gs.quantize(src, "w4g32s", calib, "gptq", save=str(tmp_path / "q"), verbose=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)
    back = gs.load_quantized(str(tmp_path / "q"), dtype=torch.float32)
    x = token_stream(512, seed=2)[:128].reshape(2, 64)
    with torch.no_grad():
        assert float((hf(x).logits - back(x).logits).abs().max()) < 1e-4
    name = "model.layers.0.self_attn.q_proj"  # transformers decompressed the stored codes, not some float copy
    ours = get_module(back, name).dequantized_weight().float()
    assert torch.allclose(get_module(hf, name).weight.float(), ours, atol=1e-6)
    assert len(torch.unique(ours[0, :32])) <= 16  # a 4-bit group holds at most 16 values


def test_at_most_one_block_is_in_memory(tmp_path, monkeypatch):
    """Reading block i+1 happens only after block i was dropped; the float weights never coexist."""
    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=5), src)
    held, peak = set(), [0]
    load, release = DiskModel.load_block, DiskModel.release_block

    def on_load(self, i):
        load(self, i)
        held.add(i)
        peak[0] = max(peak[0], len(held))

    def on_release(self, i):
        release(self, i)
        held.discard(i)
        assert all(p.is_meta for p in get_blocks(self.model)[i].parameters())

    monkeypatch.setattr(DiskModel, "load_block", on_load)
    monkeypatch.setattr(DiskModel, "release_block", on_release)
    calib = token_stream(1024, seed=1)[:512].reshape(8, 64)
    dm = DiskModel(src)
    assert all(p.is_meta for p in get_blocks(dm.model).parameters())  # nothing of the blocks read yet
    gs.quantize(dm, "w4g32", calib, "gptq", save=str(tmp_path / "q"), verbose=False)
    assert peak[0] == 1 and not held
    stats = gs.calibrate(DiskModel(src), calib, verbose=False)  # calibration reads blocks the same way
    assert set(stats) == {r.name for r in gs.arch.model_linears(dm.model)}


def test_freed_memory_is_handed_back_when_the_resident_set_grew(tmp_path, monkeypatch):
    """release_block trims the heap the first time, then only once the resident set grew TRIM_BYTES
    past where the last trim left it; where the resident set cannot be read, at every block."""
    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=5), src)
    rss, trims = [1000], []

    def trim():
        trims.append(rss[0])
        rss[0] = 1000  # what the trim gave back

    monkeypatch.setattr(gs.offload, "release_freed_memory", trim)
    monkeypatch.setattr(gs.offload, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(gs.offload, "TRIM_BYTES", 500)
    dm = DiskModel(src)

    def cycle(i, grown):
        dm.load_block(i)
        rss[0] = 1000 + grown
        dm.release_block(i)
        assert all(p.is_meta for p in get_blocks(dm.model)[i].parameters())

    cycle(0, 0)  # no trim yet to measure from
    assert trims == [1000]
    cycle(1, 499)
    cycle(0, 499)
    assert trims == [1000]
    cycle(1, 500)
    assert trims == [1000, 1500]
    monkeypatch.setattr(gs.offload, "resident_bytes", lambda: None)
    cycle(0, 0)
    cycle(1, 0)
    assert len(trims) == 4


def test_from_disk_refusals(tmp_path):
    src = str(tmp_path / "float")
    _save_float(tiny_model("llama"), src)
    calib = token_stream(1024, seed=1)[:256].reshape(4, 64)
    with pytest.raises(ValueError, match="save=DIR"):
        gs.quantize(src, "w4g32", calib, "rtn", verbose=False)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        gs.quantize(src, "w4g32", calib, "rtn", save=str(other), verbose=False)
    assert (other / "a.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        DiskModel(str(empty))
    torch.save({}, str(empty / "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        checkpoint_files(str(empty))
    # a failed run leaves neither a checkpoint nor its temporary folder
    with pytest.raises(ValueError):
        gs.quantize(src, "w4g48", calib, "rtn", save=str(tmp_path / "bad"), verbose=False)
    assert not (tmp_path / "bad").exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    # a quantized checkpoint is replaced by a new one
    gs.quantize(src, "w4g32", calib, "rtn", save=str(tmp_path / "q"), verbose=False)
    gs.quantize(src, "w8c", calib, "rtn", save=str(tmp_path / "q"), verbose=False)
    assert {str(m.spec) for m in _codes(gs.load_quantized(str(tmp_path / "q"))).values()} == {"w8c"}


def test_float32_size_from_headers(tmp_path):
    model = tiny_model("llama")
    src = str(tmp_path / "float")
    _save_float(model, src, shards=2)
    tied = model.config.tie_word_embeddings
    expect = sum(p.numel() * 4 for n, p in model.state_dict().items() if n != "lm_head.weight" or not tied)
    assert float32_nbytes(src) == expect


def test_cli_quantize_from_disk_says_so_and_matches_in_memory(cli_assets, tmp_path, capsys):
    """`gransearch quantize --from-disk --save DIR` writes the checkpoint `quantize --save` writes in
    memory (the same codes), and names its mode; without --save it is refused."""
    from gransearch.cli import main

    model_dir, _, text = cli_assets
    common = ["quantize", "--model", model_dir, "--data", text, "--spec", "w4g16", "--method", "gptq", "--n-calib", "4",
              "--calib-seqlen", "32", "--seqlen", "32", "--quiet", "--json"]
    assert main(common + ["--skip-fp-eval", "--save", str(tmp_path / "mem")]) == 0
    capsys.readouterr()
    assert main(common + ["--from-disk", "--save", str(tmp_path / "disk"), "--out", str(tmp_path / "run")]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["mode"] == "from disk, block by block" and "from disk" in cap.err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["saved"]["quantized_bytes"] == summary["saved"]["quantized_bytes"]
    a, b = _codes(gs.load_quantized(str(tmp_path / "mem"))), _codes(gs.load_quantized(str(tmp_path / "disk")))
    assert a.keys() == b.keys() and all(torch.equal(a[n].codes, b[n].codes) for n in a)
    assert os.path.exists(tmp_path / "disk" / "tokenizer.json")
    assert main(common + ["--from-disk"]) != 0
    assert "give --save DIR" in capsys.readouterr().err


def test_spilled_calibration_states_give_the_same_codes(tmp_path):
    """Hidden states kept in files between blocks (memory independent of the window count) change
    nothing; from disk they spill beside the checkpoint by default and are removed afterwards."""
    from gransearch.calibrate import BlockRunner, SpilledStates

    model = tiny_model("llama", seed=6)
    calib = token_stream(2048, seed=1)[:1024].reshape(16, 64)
    runner = BlockRunner(model, calib, batch_size=4, spill=str(tmp_path / "s"))
    assert isinstance(runner.inputs, SpilledStates) and len(runner.inputs) == 4 and runner.n_tokens() == 1024
    files = os.listdir(runner.inputs.dir)
    assert len(files) == 4
    runner.run(0, advance=True)
    assert len(os.listdir(runner.inputs.dir)) == 4 and not os.path.exists(os.path.join(tmp_path, "s", files[0]))
    runner.close()
    assert os.listdir(tmp_path / "s") == []
    a, b = tiny_model("llama", seed=6), tiny_model("llama", seed=6)
    gs.quantize(a, "w4g32", calib, "awq+gptq", batch_size=4, verbose=False)
    gs.quantize(b, "w4g32", calib, "awq+gptq", batch_size=4, spill=str(tmp_path / "s"), verbose=False)
    ca, cb = _codes(a), _codes(b)
    assert all(torch.equal(ca[n].codes, cb[n].codes) and torch.equal(ca[n].scale, cb[n].scale) for n in ca)
    assert os.listdir(tmp_path / "s") == []
    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=6), src)
    gs.quantize(src, "w4g32", calib, "gptq", batch_size=4, save=str(tmp_path / "q"), verbose=False)
    assert sorted(os.listdir(tmp_path)) == ["float", "q", "s"]  # the states folder beside q is gone


def test_bank_from_disk_is_the_bank_in_memory(tmp_path):
    """`bank_for(DiskModel)`: the same fingerprint, keys, bytes, objectives and codes as the bank of
    the model loaded whole (no output Fisher from disk: both built without it), a block at a time."""
    from gransearch.bank import bank_for, build_bank
    from gransearch.plan import model_fingerprint, weights_fingerprint

    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=7), src)
    calib = token_stream(2048, seed=1)[:512].reshape(8, 64)
    mem = _in_memory_copy(src)
    dm = DiskModel(src)
    assert weights_fingerprint(dm) == weights_fingerprint(mem) and model_fingerprint(dm) == model_fingerprint(mem)
    cands = (("rtn", "gptq", "awq"), (3, 4), ("channel", 32))
    a = build_bank(mem, calib, *cands, fisher_windows=0, verbose=False)
    b = bank_for(dm, calib, str(tmp_path / "bank"), *cands, fisher_windows=16, verbose=False)  # from disk: no Fisher, with a warning
    assert b.fisher is None and b.keys == a.keys and b.config["weights"] == a.config["weights"]
    for ra, rb in zip(a.entries, b.entries):
        for x, y in zip(ra, rb):
            assert x.nbytes == y.nbytes and x.objective == y.objective
            assert torch.equal(x.effective_weight(), y.effective_weight())
    assert all(p.is_meta for p in get_blocks(dm.model).parameters())  # every block dropped again


def test_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """A from-disk run killed with SIGKILL leaves its hidden partial and states folders; the next run
    writing the same checkpoint removes those of dead processes and leaves a live one's alone."""
    import socket
    import subprocess
    import sys

    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=8), src)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [tmp_path / f".q.partial-{host}-{dead.pid}-abc", tmp_path / f".q.states-{host}-{dead.pid}-def"]
    live = tmp_path / f".q.partial-{host}-{os.getpid()}-ghi"
    for d in stale + [live]:
        d.mkdir()
        (d / "0.safetensors").write_bytes(b"x")
    calib = token_stream(1024, seed=1)[:256].reshape(4, 64)
    gs.quantize(src, "w4g32", calib, "gptq", save=str(tmp_path / "q"), verbose=False)
    assert not any(d.exists() for d in stale) and live.exists()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == [live.name]


@pytest.mark.parametrize("kind, tie", [("llama", True), ("llama", False), ("gemma3", True), ("opt", True)])
def test_perplexity_from_disk_is_the_in_memory_perplexity(tmp_path, kind, tie):
    """Block by block from the safetensors files, the numbers of the model loaded whole (tied and
    untied heads; Gemma's per-layer attention types and soft-capping; OPT's layout)."""
    model = tiny_model(kind, seed=4)
    if not tie:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    src = str(tmp_path / "float")
    _save_float(model, src, shards=2)
    ids = token_stream(2048, seed=6)
    want = gs.perplexity(_in_memory_copy(src), ids, seqlen=64, batch_size=3, max_windows=7, verbose=False)
    dm = DiskModel(src)
    calls = []
    for i, b in enumerate(get_blocks(dm.model)):
        b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    got = gs.perplexity(dm, ids, seqlen=64, batch_size=3, max_windows=7, verbose=False)
    assert got.n_tokens == want.n_tokens and got.nll == want.nll  # the same arithmetic, bit for bit
    assert all(p.is_meta for b in get_blocks(dm.model) for p in b.parameters())  # nothing left loaded
    n_blocks, n_batches = len(get_blocks(dm.model)), -(-7 // 3)
    # block 0 once more per batch to capture its inputs; then each block once per batch, no extra pass
    assert sorted(calls) == sorted([0] * n_batches + list(range(n_blocks)) * n_batches)


def test_perplexity_from_disk_with_replaced_weights_scores_that_model(tmp_path):
    """weights(name) replaces linears as their blocks are read: a plan scored without the model in
    memory gets the perplexity of the model holding those weights."""
    from gransearch.arch import linear_weight, model_linears

    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=5), src)
    mem = _in_memory_copy(src)
    spec = gs.QuantSpec.parse("w3g16")
    new = {r.name: gs.rtn(linear_weight(r.module), spec).dequantize() for r in model_linears(mem)}
    with torch.no_grad():
        for r in model_linears(mem):
            linear_weight(r.module).copy_(new[r.name])
    ids = token_stream(2048, seed=8)
    want = gs.perplexity(mem, ids, seqlen=64, batch_size=2, max_windows=6, verbose=False)
    got = gs.offload.perplexity(DiskModel(src), ids, seqlen=64, batch_size=2, max_windows=6, weights=new.get, verbose=False)
    plain = gs.offload.perplexity(DiskModel(src), ids, seqlen=64, batch_size=2, max_windows=6, verbose=False)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6) and abs(got.ppl - plain.ppl) > 1e-3 * plain.ppl


def test_search_of_a_model_on_disk_scores_its_plans_as_in_memory(tmp_path):
    """optimize() of a DiskModel: bank from disk, each trial scored block by block; every trial's
    value is the in-memory perplexity of its plan assembled from the same bank, bit for bit."""
    from gransearch.bank import Bank
    from gransearch.search import _Assembler

    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=7), src)
    mem = _in_memory_copy(src)
    calib = token_stream(2048, seed=1)[:1024].reshape(16, 64)
    val = token_stream(2048, seed=2)
    budget = gs.QuantPlan.uniform(mem, "w4g16", "rtn").nbytes(mem)
    kw = dict(budget_bytes=budget, calib=calib, eval_ids=val, methods=("rtn", "gptq"), bits=(3, 4, 8), granularities=("channel", 16),
              n_trials=8, seqlen=64, eval_windows=4, n_final=0, verbose=False)
    res = gs.optimize(DiskModel(src), bank_dir=str(tmp_path / "bank"), **kw)
    assert res.nbytes <= budget and res.plan.nbytes(mem) == res.nbytes
    bank = Bank.load(str(tmp_path / "bank"))
    asm = _Assembler(mem, bank)
    done = [t for t in res.study.trials if t.value is not None]
    assert len(done) >= 6
    for t in done:
        choice = [bank.keys[i].index(k) for i, k in enumerate(t.user_attrs["keys"])]
        want = gs.perplexity(asm.load(choice), val, seqlen=64, batch_size=4, max_windows=4, verbose=False).ppl
        assert t.value == want, t.number
    with pytest.raises(ValueError, match="bank_dir"):
        gs.optimize(DiskModel(src), **kw)
    # the final stage: the best plan quantized from disk into finals/trial-N and that checkpoint measured
    test = token_stream(1024, seed=4)
    fin = gs.optimize(DiskModel(src), bank_dir=str(tmp_path / "bank"), **{**kw, "n_final": 1, "final_ids": test})
    (rec,) = fin.finals
    assert rec["checkpoint"] == str(tmp_path / "finals" / f"trial-{rec['trial']}")
    q = gs.load_quantized(rec["checkpoint"], dtype=torch.float32)
    assert {n: str(m.spec) for n, m in _codes(q).items()} == {n: str(lp.spec) for n, lp in fin.plan.layers.items()}
    assert fin.ppl == rec["final_ppl"] == gs.perplexity(q, test, seqlen=64, batch_size=4, verbose=False).ppl
    # where the finalist's time went (benchmarks/scale_search.py records it for the 8B projection)
    sec = rec["seconds"]
    assert set(sec) == {"quantize", "layer solves", "evaluation"} and 0 < sec["layer solves"] <= sec["quantize"] and sec["evaluation"] > 0


def test_cli_optimize_from_disk_finds_the_in_memory_plan_and_saves_it(cli_assets, tmp_path, capsys):
    """`gransearch optimize --from-disk --save DIR`: the same trial values as the search in memory
    (so the same plan), and the plan quantized from disk into DIR."""
    from gransearch.cli import main

    model_dir, _, text = cli_assets
    common = ["optimize", "--model", model_dir, "--data", text, "--budget-like", "w4g16", "--methods", "rtn,gptq", "--bits", "3,4,8",
              "--grans", "channel,16", "--trials", "6", "--n-calib", "8", "--calib-seqlen", "32", "--seqlen", "32",
              "--eval-windows", "4", "--n-final", "0", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "mem")]) == 0
    mem = json.loads((tmp_path / "mem" / "summary.json").read_text())
    capsys.readouterr()
    assert main(common + ["--from-disk", "--out", str(tmp_path / "disk"), "--save", str(tmp_path / "q")]) == 0
    disk = json.loads((tmp_path / "disk" / "summary.json").read_text())
    assert disk["budget_bytes"] == mem["budget_bytes"] and disk["plan_bytes"] == mem["plan_bytes"]
    assert disk["proxy_ppl"] == mem["proxy_ppl"] and disk["plan"] == mem["plan"]
    assert disk["saved"]["quantized_bytes"] > 0 and os.path.exists(tmp_path / "q" / "config.json")
    plan = gs.QuantPlan.load(str(tmp_path / "disk" / "plan.json"))
    back = _codes(gs.load_quantized(str(tmp_path / "q")))
    assert {n: str(lp.spec) for n, lp in plan.layers.items()} == {n: str(q.spec) for n, q in back.items()}
    assert main(common + ["--from-disk", "--proxy", "kl", "--out", str(tmp_path / "kl")]) != 0
    assert "perplexity" in capsys.readouterr().err


def test_cli_eval_from_disk_is_the_in_memory_eval(cli_assets, capsys):
    from gransearch.cli import main

    model_dir, _, text = cli_assets
    common = ["eval", "--model", model_dir, "--data", text, "--seqlen", "32", "--max-windows", "5", "--json", "--quiet"]
    assert main(common) == 0
    mem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(common + ["--from-disk"]) == 0
    disk = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert disk["mode"] == "from disk, block by block" and "mode" not in mem
    assert disk["perplexity"] == mem["perplexity"] and disk["tokens_evaluated"] == mem["tokens_evaluated"]


@pytest.mark.parametrize("kind, spec, method", [("llama", "w4g16", "awq+gptq"), ("gemma3", "w3c", "gptq")])
def test_quantized_checkpoint_evaluated_from_disk_is_load_quantized(tmp_path, kind, spec, method):
    """A compressed-tensors checkpoint read block by block (codes dequantized as each block loads; AWQ's
    folded norms as stored) scores what gs.load_quantized scores, bit for bit; it cannot be quantized again."""
    src = str(tmp_path / "float")
    _save_float(tiny_model(kind, seed=2), src)
    calib = token_stream(2048, seed=1)[:1024].reshape(16, 64)
    gs.quantize(src, spec, calib, method, batch_size=4, save=str(tmp_path / "q"), save_dtype="float32", verbose=False)
    ids = token_stream(2048, seed=3)
    want = gs.perplexity(gs.load_quantized(str(tmp_path / "q"), dtype=torch.float32), ids, seqlen=64, batch_size=2, max_windows=5,
                         verbose=False)
    dm = DiskModel(str(tmp_path / "q"))
    assert len(dm.quantized) == len(_codes(gs.load_quantized(str(tmp_path / "q"))))
    got = gs.perplexity(dm, ids, seqlen=64, batch_size=2, max_windows=5, verbose=False)
    assert got.nll == want.nll
    with pytest.raises(ValueError, match="already quantized"):
        gs.quantize(dm, "w4g16", calib, "rtn", save=str(tmp_path / "again"), verbose=False)


def test_tied_table_stored_under_the_head_name(tmp_path):
    """transformers may save a tied embedding once, as lm_head.weight (the packaged SmolLM2's
    converted folder does): DiskModel reads it as the input embedding too."""
    from safetensors.torch import load_file, save_file

    src = str(tmp_path / "float")
    model = tiny_model("llama", seed=8)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    _save_float(model, src)
    path = os.path.join(src, "model.safetensors")
    state = load_file(path)
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, path, metadata={"format": "pt"})
    ids = token_stream(2048, seed=6)
    want = gs.perplexity(_in_memory_copy(src), ids, seqlen=64, batch_size=2, max_windows=4, verbose=False)
    dm = DiskModel(src)
    assert dm.weights_fingerprint() == gs.plan.weights_fingerprint(_in_memory_copy(src))
    assert gs.perplexity(dm, ids, seqlen=64, batch_size=2, max_windows=4, verbose=False).nll == want.nll


@pytest.mark.parametrize("profile, spec", [("research", "w4g32"), ("vllm", "w4g32s")])
def test_a_budget_counts_a_model_on_disk_as_optimize_does(tmp_path, profile, spec):
    """budget_like (the CLI's --budget-like, for the search and its workers) counts a DiskModel as
    optimize() does (floats at float32 for research, at the published dtype for vllm): the
    uniform plan of that spec, the only candidate, fills the budget to the byte."""
    src = str(tmp_path / "float")
    _save_float(tiny_model("llama", seed=1), src)
    dm = DiskModel(src)
    budget = gs.runs.budget_like(dm, spec, profile)
    res = gs.optimize(dm, budget_bytes=budget, calib=token_stream(1024, seed=1)[:512].reshape(8, 64), eval_ids=token_stream(512, seed=2),
                      methods=("rtn",), bits=(4,), granularities=(32,), n_trials=1, seqlen=64, eval_windows=2, n_final=0,
                      profile=profile, bank_dir=str(tmp_path / "bank"), verbose=False)
    assert res.nbytes == budget
