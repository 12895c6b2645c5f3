"""GGUF export, proven by the gguf package's dequantizer, transformers' GGUF reader and llama.cpp itself."""

import json

import numpy as np
import pytest
import torch

import gransearch as gs
from gransearch.export import gguf as G
from gransearch.plan import plan_nbytes

from .conftest import calib_windows
from .tiny import tiny_model, token_stream

gguf = pytest.importorskip("gguf", reason="needs the gguf package (assets/dev extra)")
needs_llamacpp = pytest.mark.skipif(not gs.llamacpp.available(), reason="needs llama-cpp-python (the gguf extra)")

SEQ = 64


def _ids():
    return token_stream(4096, seed=5)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"])
def test_blocks_are_what_ggml_dequantizes(type_name):
    """Our codes written as ggml blocks dequantize (by the gguf package, which mirrors ggml) to exactly
    our weights, read back bit for bit, and take the bytes the cost model counts."""
    spec = G.SPEC_OF_TYPE[type_name]
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 160, generator=g) * torch.linspace(0.1, 3, 160)
    W[3, :32] = 0.0  # an all-zero block
    q = gs.rtn(W, spec, clip="search")
    raw = G.encode(q)
    assert raw.dtype == np.uint8 and raw.nbytes == G.ggml_nbytes((24, 160), type_name) == gs.layer_nbytes((24, 160), spec, "gguf")
    assert np.array_equal(gguf.quants.dequantize(raw, G.ggml_type(type_name)), q.dequantize().numpy())
    back = G.decode(raw, type_name, (24, 160))
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scale, q.scale)
    assert (back.zero is None and q.zero is None) or torch.equal(back.zero, q.zero)
    assert G.ggml_type_of(spec) == type_name


def test_ggml_block_bytes():
    assert G.ggml_nbytes((576, 576), "Q4_0") == 576 * 18 * 18
    assert G.ggml_nbytes((10, 256), "Q4_1") == 10 * 8 * 20
    assert G.ggml_nbytes((10, 256), "Q5_1") == 10 * 8 * 24
    assert G.ggml_nbytes((10, 512), "Q6_K") == 10 * 2 * 210
    assert G.ggml_nbytes((10, 512), "Q2_K") == 10 * 2 * 84
    with pytest.raises(ValueError, match="blocks of 256"):
        G.ggml_nbytes((10, 576), "Q4_K")
    with pytest.raises(ValueError, match="unknown ggml type"):
        G.ggml_nbytes((10, 64), "Q9_9")
    with pytest.raises(ValueError, match="no GGUF type"):
        gs.layer_nbytes((8, 64), gs.QuantSpec.parse("w4g64"), "gguf")


def test_qk_permutation_round_trips_and_interleaves_halves():
    t = torch.arange(4 * 8).reshape(4 * 8, 1)  # 4 heads of 8 rows
    p = G.permute_qk(t, 4)
    assert torch.equal(G.unpermute_qk(p, 4), t)
    # head 0: rows 0..3 are the first rotary half, 4..7 the second; llama.cpp interleaves them
    assert p[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_transformers_reads_the_written_weights(tmp_path):
    """transformers' own GGUF reader (which undoes llama.cpp's q/k permutation) gets our weights back."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    G.save_gguf(model, str(tmp_path / "m.gguf"), embd_type="F32")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ours = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ours[k]), k


def _plan_by_kind(model, choice: dict):
    """A plan giving each linear ``choice[its kind] = (spec, method)``."""
    layers = {r.name: gs.LayerPlan.from_key("{1}:{0}".format(*choice[r.name.rsplit(".", 1)[-1]])) for r in gs.arch.model_linears(model)}
    return gs.QuantPlan(layers, gs.plan.model_fingerprint(model))


def _mixed_plan(model):
    """A plan that uses every symmetric GGUF type and method, by layer kind."""
    return _plan_by_kind(model, {"q_proj": ("w4g32s", "gptq"), "k_proj": ("w4g32s", "awq"), "v_proj": ("w8g32s", "rtn"),
                                 "o_proj": ("w5g32s", "gptq"), "gate_proj": ("w4g32s", "awq+gptq"), "up_proj": ("w5g32s", "awq"),
                                 "down_proj": ("w8g32s", "gptq")})


def _float_offset_plan(model):
    """Q4_1 and Q5_1 (float-offset specs) from gransearch's own methods, beside Q4_0 and Q8_0."""
    return _plan_by_kind(model, {"q_proj": ("w4g32f", "gptq"), "k_proj": ("w5g32f", "awq"), "v_proj": ("w5g32f", "rtn"),
                                 "o_proj": ("w4g32f", "awq+gptq"), "gate_proj": ("w4g32s", "gptq"), "up_proj": ("w4g32f", "rtn"),
                                 "down_proj": ("w8g32s", "gptq")})


@needs_llamacpp
def test_llamacpp_scores_the_unquantized_export_as_torch_does(tmp_path):
    model = tiny_model("llama")
    G.save_gguf(model, str(tmp_path / "f32.gguf"), embd_type="F32")
    ids = _ids()
    ours = gs.perplexity(model, ids, seqlen=SEQ, verbose=False)
    theirs = gs.llamacpp.perplexity(str(tmp_path / "f32.gguf"), ids, seqlen=SEQ, verbose=False)
    assert theirs.n_tokens == ours.n_tokens and theirs.n_windows == ours.n_windows
    assert abs(theirs.ppl / ours.ppl - 1) < 1e-4


@needs_llamacpp
@pytest.mark.parametrize("plan_kind", ["Q4_0", "mixed", "float-offset"])
def test_llamacpp_scores_the_quantized_export_as_torch_does(tmp_path, plan_kind):
    """llama.cpp's perplexity of the written file equals the torch model's within 1%; emulating its
    8-bit activation blocks in torch closes most of the rest. The tensor bytes are the plan's count."""
    model = tiny_model("llama")
    G.round_embeddings(model, "Q8_0")
    plan = {"Q4_0": lambda m: gs.QuantPlan.uniform(m, "w4g32s", "gptq"), "mixed": _mixed_plan, "float-offset": _float_offset_plan}[plan_kind](model)
    gs.quantize(model, plan, calib_windows(), verbose=False)
    ids = _ids()
    torch_ppl = gs.perplexity(model, ids, seqlen=SEQ, verbose=False).ppl
    with G.llamacpp_activations(model):
        emulated = gs.perplexity(model, ids, seqlen=SEQ, verbose=False).ppl
    saved = G.save_gguf(model, str(tmp_path / "q.gguf"))
    assert saved.tensor_nbytes == plan_nbytes(model, plan.layers, "gguf")
    reader = gguf.GGUFReader(saved.path)
    assert sum(int(t.n_bytes) for t in reader.tensors) == saved.tensor_nbytes
    want = {"Q4_0": {"Q4_0"}, "mixed": {"Q4_0", "Q5_0", "Q8_0"}, "float-offset": {"Q4_1", "Q5_1", "Q4_0", "Q8_0"}}[plan_kind]
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk") and t.name.endswith("weight")
            and "norm" not in t.name} == want
    cpp = gs.llamacpp.perplexity(saved.path, ids, seqlen=SEQ, verbose=False).ppl
    assert abs(cpp / torch_ppl - 1) < 0.01
    assert abs(cpp / emulated - 1) < 1e-3


@needs_llamacpp
def test_llamacpp_kl_divergence_is_torchs(tmp_path):
    """llama.cpp's KL divergence of a quantized file from the F32 file equals torch's KL of the same
    weights from the float model within 5% (its activation rounding is the rest); a file against
    itself diverges by nothing."""
    from gransearch.evaluate import kl_divergence, reference_logprobs

    model = tiny_model("llama")
    ids = _ids()
    f32 = G.save_gguf(model, str(tmp_path / "f32.gguf"), embd_type="F32").path
    self_kl = gs.llamacpp.kl_divergence(f32, f32, ids, seqlen=SEQ, verbose=False)
    assert abs(self_kl.kl) < 1e-6 and self_kl.top1 == 1 and abs(self_kl.ppl / self_kl.ref_ppl - 1) < 1e-6
    ref = reference_logprobs(model, ids, seqlen=SEQ, batch_size=4, verbose=False)
    G.round_embeddings(model, "Q8_0")
    gs.quantize(model, _float_offset_plan(model), calib_windows(), verbose=False)
    ours = kl_divergence(model, ids, ref, seqlen=SEQ, batch_size=4, verbose=False)
    theirs = gs.llamacpp.kl_divergence(G.save_gguf(model, str(tmp_path / "q.gguf")).path, f32, ids, seqlen=SEQ, verbose=False)
    assert theirs.n_tokens == ours.n_tokens and ours.kl > 10 * ours.kl_se > 0
    assert abs(theirs.kl / ours.kl - 1) < 0.05
    assert abs(theirs.ppl / ours.ppl - 1) < 0.01
    # perplexity kept per window: the paired change of two files is their ratio, with a standard error
    a = gs.llamacpp.perplexity(str(tmp_path / "q.gguf"), ids, seqlen=SEQ, verbose=False)
    b = gs.llamacpp.perplexity(f32, ids, seqlen=SEQ, verbose=False)
    change, se = a.paired_change(b)
    assert len(a.window_nll) == a.n_windows and abs(change - (a.ppl / b.ppl - 1)) < 1e-9 and se > 0
    with pytest.raises(ValueError, match="per-window"):
        a.paired_change(gs.perplexity(model, ids, seqlen=SEQ, verbose=False))


@needs_llamacpp
def test_embedding_rounding_is_what_the_file_stores(tmp_path):
    """round_embeddings gives the torch model the embedding the GGUF stores; doing it twice changes nothing."""
    model = tiny_model("llama")
    G.round_embeddings(model, "Q8_0")
    once = model.get_input_embeddings().weight.detach().clone()
    G.round_embeddings(model, "Q8_0")
    assert torch.equal(once, model.get_input_embeddings().weight)
    saved = G.save_gguf(model, str(tmp_path / "e.gguf"))
    t = next(t for t in gguf.GGUFReader(saved.path).tensors if t.name == "token_embd.weight")
    assert t.tensor_type.name == "Q8_0"
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), once.numpy())


def test_unstorable_layers_and_architectures_are_refused(tmp_path):
    model = tiny_model("llama")
    gs.quantize(model, "w4g64", None, method="rtn", verbose=False)
    with pytest.raises(ValueError, match=r"quantized as w4g64, which GGUF cannot store.*profile='gguf'"):
        G.save_gguf(model, str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="needs its source GGUF"):
        G.save_gguf(tiny_model("opt"), str(tmp_path / "y.gguf"))
    with pytest.raises(FileNotFoundError, match="source GGUF"):
        G.save_gguf(tiny_model("llama"), str(tmp_path / "z.gguf"), source=str(tmp_path / "missing.gguf"))
    assert not (tmp_path / "x.gguf").exists()


@needs_llamacpp
def test_source_metadata_is_copied_and_mismatches_refused(tmp_path):
    """A GGUF written with a source keeps its metadata and tensor order; another model's source is refused."""
    model = tiny_model("llama")
    src = G.save_gguf(model, str(tmp_path / "src.gguf"), embd_type="F32").path
    gs.quantize(model, "w8g32s", None, method="rtn", verbose=False)
    out = G.save_gguf(model, str(tmp_path / "out.gguf"), source=src, embd_type="F32")
    r_src, r_out = gguf.GGUFReader(src), gguf.GGUFReader(out.path)
    assert [t.name for t in r_src.tensors] == [t.name for t in r_out.tensors]
    for key in ("llama.attention.head_count_kv", "tokenizer.ggml.model", "llama.rope.freq_base"):
        assert r_out.fields[key].contents() == r_src.fields[key].contents()
    assert r_out.fields["general.quantized_by"].contents() == "gransearch"
    other = tiny_model("llama", vocab=64)
    with pytest.raises(ValueError, match="differs from the source"):
        G.save_gguf(other, str(tmp_path / "bad.gguf"), source=src)


@needs_llamacpp
def test_llamacpp_quantizer_takes_overrides_and_an_importance_matrix(tmp_path):
    """quantize_file runs llama.cpp's quantizer: per-tensor types are honoured, and an importance
    matrix from our calibration statistics changes the rounding."""
    model = tiny_model("llama")
    src = G.save_gguf(model, str(tmp_path / "f32.gguf"), embd_type="F32").path
    plain = gs.llamacpp.quantize_file(src, str(tmp_path / "q4.gguf"), "Q4_0", types={"blk.0.attn_v.weight": "Q8_0"})
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(plain).tensors}
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.1.attn_v.weight"] == "Q4_0" and types["blk.0.ffn_down.weight"] == "Q4_0"
    stats = gs.calibrate(model, calib_windows(), verbose=False)
    names = G.gguf_names(model)
    imat = gs.llamacpp.imatrix_from_stats(stats, names)
    assert set(imat) == set(names.values())
    for n, gname in names.items():  # llama.cpp's imatrix: mean x_j^2 per input column = half the Hessian's diagonal
        assert np.allclose(imat[gname], torch.diagonal(stats[n].hessian).numpy() / 2, rtol=1e-5)
    weighted = gs.llamacpp.quantize_file(src, str(tmp_path / "q4i.gguf"), "Q4_0", imatrix=imat)
    a = {t.name: np.array(t.data) for t in gguf.GGUFReader(plain).tensors}
    b = {t.name: np.array(t.data) for t in gguf.GGUFReader(weighted).tensors}
    assert not np.array_equal(a["blk.1.ffn_up.weight"], b["blk.1.ffn_up.weight"])
    with pytest.raises(ValueError, match="unknown llama.cpp preset"):
        gs.llamacpp.quantize_file(src, str(tmp_path / "x.gguf"), "Q4_Z")


def test_gguf_profile_search_returns_storable_plans_counted_exactly(tmp_path):
    model = tiny_model("llama")
    G.round_embeddings(model, "Q8_0")
    budget = plan_nbytes(model, gs.QuantPlan.uniform(model, "w5g32s", "rtn").layers, "gguf")
    res = gs.optimize(model, budget_bytes=budget, calib=calib_windows(), eval_ids=_ids(), final_ids=None, profile="gguf",
                      methods=("rtn", "gptq"), bits=(4, 5, 8), granularities=(32,), n_trials=6, seqlen=SEQ, eval_windows=4,
                      verbose=False)
    assert res.nbytes <= budget
    assert {str(lp.spec) for lp in res.plan.layers.values()} <= set(G.TYPE_OF_SPEC)
    assert res.plan.meta["format"] == "gguf"
    fresh = tiny_model("llama")
    G.round_embeddings(fresh, "Q8_0")
    gs.quantize(fresh, res.plan, calib_windows(), verbose=False)
    saved = G.save_gguf(fresh, str(tmp_path / "s.gguf"))
    assert saved.tensor_nbytes == res.nbytes == res.plan.nbytes(fresh)
    with pytest.raises(ValueError, match="gguf profile takes bits"):
        gs.optimize(model, budget_bytes=budget, calib=calib_windows(), eval_ids=_ids(), profile="gguf", bits=(3,), granularities=(32,),
                    n_trials=1, verbose=False)


def test_gguf_asym_profile_adds_q4_1_and_q5_1_from_every_method(tmp_path):
    """gguf-asym proposes the float-offset specs (Q4_1, Q5_1) beside gguf's; gguf does not. A search
    over it stores its bank, writes the plan as GGUF and counts its bytes exactly."""
    from gransearch.profiles import get_profile

    f = gs.QuantSpec.parse
    assert f("w4g32f") in get_profile("gguf-asym").specs((8, 64), (4, 5, 8), (32,)) and f("w5g32f") in get_profile("gguf-asym").specs((8, 64), (5,), (32,))
    assert not any(sp.float_zero for sp in get_profile("gguf").specs((8, 64), (4, 5, 8), (32,)))
    assert not get_profile("gguf").allows(f("w4g32f")) and get_profile("gguf-asym").allows(f("w4g32f"))
    assert not get_profile("vllm-asym").allows(f("w4g32f"))
    model = tiny_model("llama")
    G.round_embeddings(model, "Q8_0")
    budget = plan_nbytes(model, gs.QuantPlan.uniform(model, "w4g32f", "rtn").layers, "gguf")
    res = gs.optimize(model, budget_bytes=budget, calib=calib_windows(), eval_ids=_ids(), final_ids=None, profile="gguf-asym",
                      methods=("rtn", "gptq", "awq"), bits=(4, 5), granularities=(32,), n_trials=4, seqlen=SEQ, eval_windows=2,
                      bank_dir=str(tmp_path / "bank"), verbose=False)
    keys = {k for ks in gs.bank.Bank.load(str(tmp_path / "bank")).keys for k in ks}
    assert {"rtn:w4g32f", "gptq:w5g32f", "awq:w4g32f", "gptq:w4g32s"} <= keys
    fresh = tiny_model("llama")
    G.round_embeddings(fresh, "Q8_0")
    gs.quantize(fresh, res.plan, calib_windows(), verbose=False)
    saved = G.save_gguf(fresh, str(tmp_path / "s.gguf"))
    assert saved.tensor_nbytes == res.nbytes <= budget


def _bpe_tokenizer_with_merges():
    """The byte tokenizer of the CLI models plus four merges (llama.cpp wants a BPE vocabulary with merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("q", "u"), ("a", "n"), ("e", "r"), ("l", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@needs_llamacpp
def test_cli_quantize_and_eval_with_llamacpp(cli_assets, tmp_path, capsys):
    """quantize --save-gguf --llamacpp-eval, then eval --llamacpp on the file: transformers tokenizes
    the text from the written vocabulary and llama.cpp scores it, the same number both times."""
    from gransearch.cli import main

    from .conftest import CLI_VOCAB

    _, _, text = cli_assets
    model_dir = str(tmp_path / "bpe_model")
    tiny_model("llama", vocab=CLI_VOCAB).save_pretrained(model_dir)
    _bpe_tokenizer_with_merges().save_pretrained(model_dir)
    out = tmp_path / "tiny.gguf"
    assert main(["quantize", "--model", model_dir, "--data", text, "--spec", "w4g32s", "--method", "gptq", "--n-calib", "4",
                 "--calib-seqlen", "32", "--seqlen", "32", "--skip-fp-eval", "--save-gguf", str(out), "--llamacpp-eval",
                 "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    g = summary["saved_gguf"]
    assert g["types"]["Q4_0"] == 14 and g["tensor_bytes"] < g["file_bytes"]
    assert abs(g["ppl_llamacpp"] / summary["ppl_quantized"] - 1) < 0.01
    assert main(["eval", "--model", str(out), "--data", text, "--seqlen", "32", "--llamacpp", "--json", "--quiet"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["engine"] == "llama.cpp" and ev["perplexity"] == g["ppl_llamacpp"]
    assert main(["eval", "--model", str(out), "--data", text, "--seqlen", "32", "--llamacpp", "--reference", str(out), "--json", "--quiet"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(ev["kl_divergence"]) < 1e-6 and ev["same_top_token"] == 1 and ev["reference_perplexity"] == ev["perplexity"]
    assert main(["eval", "--model", str(out), "--data", text, "--reference", str(out), "--quiet"]) == 2
    assert "--reference takes" in capsys.readouterr().err
    assert main(["eval", "--model", model_dir, "--data", text, "--llamacpp", "--quiet"]) == 2
    assert "not one" in capsys.readouterr().err


# ---- K-quants: llama.cpp's own quantizer as a candidate maker ------------------------------------


def test_ggml_spec_text_bytes_and_plan_rules():
    from gransearch.spec import GGML_TYPES, GGMLSpec, parse_spec

    for t, (block, nb) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[G.ggml_type(t)] == (block, nb)
        assert parse_spec(t.lower()) == GGMLSpec(t) and str(GGMLSpec(t)) == t
        assert gs.layer_nbytes((8, 512), GGMLSpec(t), "gguf") == G.ggml_nbytes((8, 512), t) == gs.layer_nbytes((8, 512), GGMLSpec(t))
    assert GGMLSpec("Q6_K").bits == 6.5625
    with pytest.raises(ValueError, match="not a multiple"):
        GGMLSpec("Q4_K").check_shape((8, 576))
    with pytest.raises(ValueError, match="only its own quantizer makes: use method llamacpp"):
        gs.LayerPlan("rtn", "Q3_K")
    with pytest.raises(ValueError, match="llamacpp makes ggml types only"):
        gs.LayerPlan("llamacpp", "w4g64")
    model = tiny_model("llama-wide")
    plan = gs.QuantPlan({"model.layers.0.mlp.down_proj": gs.LayerPlan("llamacpp", "Q3_K")}, gs.plan.model_fingerprint(model))
    back = gs.QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.layers["model.layers.0.mlp.down_proj"].spec == GGMLSpec("Q3_K")
    if gs.llamacpp.available():
        gs.quantize(model, plan, calib_windows(), verbose=False)
        with pytest.raises(ValueError, match="K-quants .* write them with save_gguf"):
            gs.save_quantized(model, "/nonexistent/never-written")


@needs_llamacpp
@pytest.mark.parametrize("type_name", ["Q3_K", "Q4_0", "Q5_1"])
def test_quantize_weight_is_what_llama_quantize_writes(tmp_path, type_name):
    """Our per-weight call of llama.cpp's quantizer writes the bytes llama_model_quantize writes for
    that tensor, with and without an importance matrix."""
    from gransearch.spec import parse_spec

    model = tiny_model("llama-wide")
    src = G.save_gguf(model, str(tmp_path / "f32.gguf"), embd_type="F32").path
    W = model.model.layers[0].mlp.down_proj.weight.detach()
    imat = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(1)) + 0.05
    spec = parse_spec(type_name)  # Q4_0 and Q5_1 are the code grids w4g32s and w5g32f
    for im in (None, imat):
        out = gs.llamacpp.quantize_file(src, str(tmp_path / "q.gguf"), "Q8_0", types={"blk.0.ffn_down.weight": type_name},
                                        imatrix=None if im is None else {"blk.0.ffn_down.weight": im.numpy()})
        t = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ffn_down.weight")
        assert t.tensor_type.name == type_name
        ours = gs.llamacpp.quantize_weight(W, spec, im)
        raw = ours.raw.numpy() if type_name.endswith("K") else G.encode(ours)
        assert np.array_equal(np.asarray(t.data).reshape(raw.shape), raw)


@needs_llamacpp
def test_importance_matrix_lowers_the_weighted_error():
    """llama.cpp weights its rounding by the importance matrix: the error it weights goes down."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 512, generator=g)
    imat = torch.rand(512, generator=g) ** 4 + 1e-3  # a few columns matter most
    for sp in ("w4g32s", "Q3_K", "Q2_K"):
        spec = gs.spec.parse_spec(sp)
        plain = ((gs.llamacpp.quantize_weight(W, spec).dequantize() - W) ** 2 * imat).sum()
        weighted = ((gs.llamacpp.quantize_weight(W, spec, imat).dequantize() - W) ** 2 * imat).sum()
        assert weighted < plain, sp


@needs_llamacpp
def test_kquant_search_is_written_and_scored_by_llamacpp(tmp_path):
    """The gguf profile with llamacpp offers K-quants where rows fit 256; a search at a budget only
    K-quants reach uses them; the stored bank reloads them bit for bit; the plan is written, counted
    exactly and scored by llama.cpp as torch scores it."""
    from gransearch.spec import GGMLSpec

    model = tiny_model("llama-wide")
    G.round_embeddings(model, "Q8_0")
    calib = calib_windows()
    specs = gs.allocate.candidate_specs((256, 512), (4, 5, 8), (32,), "gguf", ("rtn", "llamacpp"))
    assert GGMLSpec("Q2_K") in specs and GGMLSpec("Q6_K") in specs
    assert not any(getattr(s, "is_ggml", False) for s in gs.allocate.candidate_specs((256, 512), (4,), (32,), "gguf", ("rtn",)))
    q4 = plan_nbytes(model, gs.QuantPlan.uniform(model, "w4g32s", "rtn").layers, "gguf")
    res = gs.optimize(model, budget_bytes=q4 - 40_000, calib=calib, eval_ids=_ids(), final_ids=None, profile="gguf",
                      methods=("rtn", "llamacpp"), bits=(4, 5, 8), granularities=(32,), n_trials=6, seqlen=SEQ, eval_windows=4,
                      bank_dir=str(tmp_path / "bank"), verbose=False)
    assert res.nbytes <= q4 - 40_000
    assert any(getattr(lp.spec, "is_ggml", False) for lp in res.plan.layers.values())
    bank = gs.bank.Bank.load(str(tmp_path / "bank"))
    i = bank.layers.index("model.layers.0.mlp.down_proj")
    j = bank.keys[i].index("llamacpp:Q3_K")
    H = gs.calibrate(model, calib, verbose=False)["model.layers.0.mlp.down_proj"].hessian
    again = gs.llamacpp.quantize_weight(model.model.layers[0].mlp.down_proj.weight.detach(), GGMLSpec("Q3_K"), torch.diagonal(H) / 2)
    assert torch.equal(bank.entries[i][j].quantized().raw, again.raw)
    fresh = tiny_model("llama-wide")
    G.round_embeddings(fresh, "Q8_0")
    gs.quantize(fresh, res.plan, calib, verbose=False)
    ids = _ids()
    ours = gs.perplexity(fresh, ids, seqlen=SEQ, verbose=False).ppl
    with G.llamacpp_activations(fresh):
        emulated = gs.perplexity(fresh, ids, seqlen=SEQ, verbose=False).ppl
    saved = G.save_gguf(fresh, str(tmp_path / "k.gguf"))
    assert saved.tensor_nbytes == res.nbytes
    assert any(t.endswith("_K") for t in saved.types.values())
    cpp = gs.llamacpp.perplexity(saved.path, ids, seqlen=SEQ, verbose=False).ppl
    assert abs(cpp / ours - 1) < 0.01 and abs(cpp / emulated - 1) < 1e-3


@needs_llamacpp
def test_quantize_weights_llamacpp_by_the_float_models_importance():
    """gs.quantize gives llama.cpp's quantizer the float model's mean x^2 (as llama-imatrix and the bank
    do), not the inputs of the model quantized so far: a block-1 layer gets the bank's codes."""
    from gransearch.spec import GGMLSpec

    model, calib = tiny_model("llama-wide"), calib_windows()
    stats = gs.calibrate(model, calib, verbose=False)
    name = "model.layers.1.mlp.down_proj"
    assert torch.allclose(stats[name].mean_sq, torch.diagonal(stats[name].hessian) / 2, rtol=1e-5)
    W = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    want = gs.llamacpp.quantize_weight(W, GGMLSpec("Q3_K"), stats[name].mean_sq)
    gs.quantize(model, "Q3_K", calib, method="llamacpp", verbose=False)
    got = model.model.layers[1].mlp.down_proj.quantized_weight()
    assert torch.equal(got.raw, want.raw)


@needs_llamacpp
def test_cli_optimize_gguf_profile_saves_a_searched_gguf(cli_assets, tmp_path):
    """`gransearch optimize --profile gguf --proxy kl --save-gguf FILE --llamacpp-eval`: one command from
    model to a searched GGUF whose tensors weigh the plan's bytes, within the budget, scored by
    llama.cpp; the trials measured the KL divergence, and the run folder says so."""
    from gransearch.cli import main

    model_dir, _, text = cli_assets
    out, path = tmp_path / "run", tmp_path / "searched.gguf"
    argv = ["optimize", "--model", model_dir, "--data", text, "--out", str(out), "--device", "cpu", "--quiet", "--profile", "gguf",
            "--budget-like", "w5g32s", "--bits", "4,5,8", "--grans", "32", "--methods", "rtn,gptq,llamacpp", "--trials", "6",
            "--n-calib", "4", "--calib-seqlen", "32", "--seqlen", "32", "--eval-windows", "2", "--batch-size", "2", "--n-final", "0",
            "--save-gguf", str(path), "--llamacpp-eval", "--max-windows", "4", "--proxy", "kl"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accounting"]["format"] == "gguf" and summary["proxy"] == "kl" and 0 < summary["proxy_ppl"] < 1
    assert summary["proxy_gap"] is None
    g = summary["saved_gguf"]
    assert g["tensor_bytes"] == summary["plan_bytes"] <= summary["budget_bytes"]
    assert g["ppl_llamacpp"] > 1 and path.exists()
    plan = gs.QuantPlan.load(str(out / "plan.json"))
    assert {G.ggml_type_of(lp.spec) for lp in plan.layers.values()} <= {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL"}


@needs_llamacpp
def test_bank_with_llamacpp_entries_stacked_is_the_layer_by_layer_bank(monkeypatch):
    """The bank stacked as CUDA builds it, with llama.cpp's K-quants among the candidates (rounded on
    the host, one layer at a time, whatever the stacking): the same keys and codes as the CPU's
    layer-by-layer bank, objectives up to float32 rounding."""
    from gransearch import bank as bank_mod

    model = tiny_model("llama-wide")
    banks = {}
    for stacked in (False, True):
        monkeypatch.setattr(bank_mod, "STACK_SHARED_INPUTS", stacked)
        banks[stacked] = bank_mod.build_bank(model, calib_windows(), ("rtn", "gptq", "awq", "llamacpp"), (4,), (32,), profile="gguf",
                                             fisher_windows=0, verbose=False)
    one, fused = banks[False], banks[True]
    assert one.keys == fused.keys and any(k == "llamacpp:Q4_K" for k in one.keys[0])
    for i, name in enumerate(one.layers):
        for key, a, b in zip(one.keys[i], one.entries[i], fused.entries[i]):
            assert torch.equal(a.effective_weight(), b.effective_weight()), (name, key)
            assert a.objective == pytest.approx(b.objective, rel=1e-5), (name, key)
