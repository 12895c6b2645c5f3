"""Reading compressed-tensors checkpoints other tools wrote (llm-compressor's layout: ``Linear``
targets, regex groups, ignore lists, scales in the model's dtype), proven against compressed-tensors'
own quantizer: the checkpoints here are written by compressed-tensors' ``ModelCompressor``, as
llm-compressor's ``save_pretrained`` does, and every weight gransearch reads back must equal
compressed-tensors' fake-quantized weight exactly."""

import json
import math

import pytest
import torch

import gransearch as gs
from gransearch.export import compressed_tensors as ct

from .tiny import tiny_model, token_stream

compressed_tensors = pytest.importorskip("compressed_tensors", reason="needs the export extra: pip install compressed-tensors")

IGNORED = "model.layers.0.self_attn.q_proj"


def _write(folder, dtype=torch.bfloat16, asym_group=32, extra_groups=True):
    """A tiny Llama quantized by compressed-tensors itself (min-max parameters from its own
    ``calculate_qparams``) and saved compressed: 4-bit asymmetric groups on every ``Linear``, 8-bit
    symmetric channels on ``re:.*down_proj`` (the more specific target wins), one layer and the head
    ignored. Returns ``{layer: compressed-tensors' dequantized weight}``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_model("llama").to(dtype)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, symmetric=False, strategy="group",
                                                                                          group_size=asym_group))}
    if extra_groups:
        groups["group_1"] = QuantizationScheme(targets=["re:.*down_proj"], weights=QuantizationArgs(num_bits=8, symmetric=True,
                                                                                                    strategy="channel"))
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=["lm_head", IGNORED]))
    want = {}
    for name, m in model.named_modules():
        args = getattr(getattr(m, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        w = m.weight.detach()
        k = args.group_size if args.strategy == "group" else w.shape[1]
        blocks = w.reshape(w.shape[0], -1, k)
        scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
        m.weight_scale.data = scale.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data = zero.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
        zp = getattr(m, "weight_zero_point", None)
        want[name] = fake_quantize(w, m.weight_scale, zp if zp is not None else torch.zeros_like(m.weight_scale), args)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(folder))
    compressor.update_config(str(folder))
    return want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reads_what_compressed_tensors_writes_exactly(tmp_path, dtype):
    want = _write(tmp_path, dtype)
    model = gs.load_quantized(str(tmp_path))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, gs.QuantLinear)}
    assert set(layers) == set(want) and len(layers) == 13  # 14 linears, one ignored
    assert isinstance(gs.arch.get_module(model, IGNORED), torch.nn.Linear)
    for name, m in layers.items():
        assert str(m.spec) == ("w8cs" if name.endswith("down_proj") else "w4g32"), name
        assert m.scales.dtype == dtype  # kept as stored, not rounded to float16
        got = m.quantized_weight().dequantize(dtype)
        assert torch.equal(got, want[name]), name

    # the same model from disk, block by block, and through gs.load_model (what `gransearch eval` uses)
    ids = token_stream(1024, seed=3)
    ppl = gs.perplexity(model, ids, seqlen=64, batch_size=2, verbose=False).ppl
    assert math.isfinite(ppl)
    disk = gs.offload.DiskModel(str(tmp_path), dtype=dtype)
    assert set(disk.quantized) == set(want)
    assert gs.offload.perplexity(disk, ids, seqlen=64, batch_size=2, verbose=False).ppl == pytest.approx(ppl, rel=1e-5)
    # gs.load_model sends it to load_quantized (the CLI test below loads one through it, tokenizer included)
    assert gs.models._readable_checkpoint(str(tmp_path)) == (True, None)


def test_reads_what_transformers_dequantizes(tmp_path):
    """A uniform asymmetric checkpoint: transformers' own load (dequantize=True) computes the same
    weights as gransearch's reader."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _write(tmp_path, torch.bfloat16, extra_groups=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=CompressedTensorsConfig(dequantize=True),
                                              dtype=torch.bfloat16)
    ours = gs.load_quantized(str(tmp_path))
    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, gs.QuantLinear):
            theirs = gs.arch.get_module(hf, name).weight.detach()
            assert torch.equal(m.dequantized_weight().to(theirs.dtype), theirs), name
            n += 1
    assert n == 13


def test_a_read_checkpoint_is_not_quantized_again(tmp_path):
    _write(tmp_path)
    model = gs.load_quantized(str(tmp_path))
    with pytest.raises(ValueError, match="already quantized .*needs the float model"):
        gs.quantize(model, "w4g64", None, method="rtn", verbose=False)
    with pytest.raises(ValueError, match="already quantized"):
        gs.quantize(str(tmp_path), "w4g64", None, method="rtn", save=str(tmp_path / "again"), verbose=False)
    # bfloat16 scales are exact in float16: a read checkpoint can be written again, bit for bit
    gs.save_quantized(model, str(tmp_path / "again"))
    back = gs.load_quantized(str(tmp_path / "again"), dtype=torch.bfloat16)
    for name, m in model.named_modules():
        if isinstance(m, gs.QuantLinear):
            assert torch.equal(m.dequantized_weight(), gs.arch.get_module(back, name).dequantized_weight()), name
    # float32 scales are not: writing them as float16 would round them, so it is refused by name
    _write(tmp_path / "f32", torch.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: .*float16 cannot hold exactly"):
        gs.save_quantized(gs.load_quantized(str(tmp_path / "f32")), str(tmp_path / "f32-again"))


def _edit(folder, change):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg["quantization_config"])
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    (lambda qc: qc["config_groups"]["group_0"].update(input_activations={"num_bits": 8, "type": "int", "strategy": "token"}),
     "quantizes activations"),
    (lambda qc: qc["config_groups"]["group_0"].update(format="int-quantized"), "format 'int-quantized'"),
    (lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "quantized KV cache"),
    (lambda qc: qc.update(quantization_status="frozen"), "only compressed checkpoints"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "channel/group"),
])
def test_what_is_not_read_is_refused_with_the_reason(tmp_path, change, message):
    _write(tmp_path)
    _edit(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        gs.load_quantized(str(tmp_path))
    with pytest.raises(ValueError, match="does not read"):
        gs.offload.DiskModel(str(tmp_path))


def test_actorder_group_reads_with_its_group_index(tmp_path):
    """compressed-tensors before 0.19 wrote ``actorder="group"``: GPTQ formed each group of consecutive
    columns in activation order and ``weight_g_idx[i]`` names column ``i``'s group (its
    ``_process_quantization`` sorts the columns by it; benchmarks/read_ct_actorder_group.py checks
    the reading against 0.18 itself). Written here by hand: each layer quantized in a random column
    order, its codes put back in the input's order. gransearch reads it exactly, in memory and from
    disk; writing it again is refused (compressed-tensors no longer loads it)."""
    import copy

    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    floats = copy.deepcopy(model)
    gs.quantize(model, "w4g32", None, method="rtn", verbose=False)
    gs.save_quantized(model, str(tmp_path))
    spec = gs.QuantSpec.parse("w4g32")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    want = {}
    for name, m in floats.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            order = torch.randperm(m.in_features, generator=gen)
            inv = torch.argsort(order)
            q = gs.rtn(m.weight.detach()[:, order], spec)  # groups of 32 consecutive columns of the order
            want[name] = q.dequantize(torch.float32)[:, inv]
            tensors.update(ct.layer_tensors(name, gs.QuantizedWeight(q.codes[:, inv], q.scale, q.zero, spec)))
            tensors[f"{name}.weight_g_idx"] = (torch.arange(m.in_features) // 32)[inv].to(torch.int32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _edit(tmp_path, lambda qc: qc["config_groups"]["group_0"]["weights"].update(actorder="group"))

    ours = gs.load_quantized(str(tmp_path))
    for name, w in want.items():
        m = gs.arch.get_module(ours, name)
        assert m.g_idx is not None and torch.equal(m.quantized_weight().dequantize(torch.float32), w), name
    ids = token_stream(1024, seed=3)
    ppl = gs.perplexity(ours, ids, seqlen=64, batch_size=2, verbose=False).ppl
    disk = gs.offload.DiskModel(str(tmp_path))
    assert gs.offload.perplexity(disk, ids, seqlen=64, batch_size=2, verbose=False).ppl == pytest.approx(ppl, rel=1e-5)
    with pytest.raises(ValueError, match=r"groups are in activation order .*actorder='group' was removed"):
        gs.save_quantized(ours, str(tmp_path / "again"))

    # a weight_g_idx that does not make groups of 32 is named
    tensors["model.layers.0.mlp.up_proj.weight_g_idx"][:5] = 0
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: weight_g_idx does not give each of the \d+ groups 32 columns"):
        gs.load_quantized(str(tmp_path))


def test_a_stored_tensor_that_does_not_fit_its_scheme_is_named(tmp_path):
    _write(tmp_path)
    _edit(tmp_path, lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=16))
    with pytest.raises(ValueError, match=r"model\.layers\.\d\.\w+\.\w+_proj: packed codes .* do not fit"):
        gs.load_quantized(str(tmp_path))


def test_targets_resolve_as_compressed_tensors_resolves_them():
    """Exact names before patterns before classes, the ignore list over all, and gransearch's own
    anchored names by lookup; a target that would quantize a non-linear module is refused."""
    model = tiny_model("llama")
    w4, w8, w3 = (gs.QuantSpec.parse(s) for s in ("w4g32", "w8cs", "w3c"))
    scheme = ct.CheckpointScheme([(["Linear"], w4), (["re:.*mlp\\..*"], w8), (["model.layers.1.mlp.up_proj"], w3)],
                                 ["lm_head", "re:.*k_proj"])
    got = scheme.resolve(model)
    assert len(got) == 12 and not any(n.endswith("k_proj") for n in got)
    assert got["model.layers.1.mlp.up_proj"] == w3 and got["model.layers.0.mlp.up_proj"] == w8
    assert got["model.layers.0.self_attn.q_proj"] == w4
    own = ct.CheckpointScheme([([f"re:^{n.replace('.', chr(92) + '.')}$" for n in got], w4)], ["lm_head"])
    assert set(own.resolve(model)) == set(got)
    with pytest.raises(ValueError, match="Embedding"):
        ct.CheckpointScheme([(["Embedding"], w4)], []).resolve(model)
    with pytest.raises(ValueError, match="no layer of the model matches"):
        ct.CheckpointScheme([(["Conv2d"], w4)], []).resolve(model)


def test_cli_reads_an_asymmetric_checkpoint_in_memory_and_from_disk(cli_assets, tmp_path, capsys):
    """`gransearch eval --model CHECKPOINT` reads it with gransearch's reader (transformers does not
    reload asymmetric checkpoints), in memory as from disk; `quantize` refuses it as a source."""
    from gransearch.cli import main

    model_dir, _, text = cli_assets
    q = str(tmp_path / "q")
    common = ["--data", text, "--seqlen", "32", "--max-windows", "4", "--json", "--quiet"]
    assert main(["quantize", "--model", model_dir, "--spec", "w4g32", "--method", "rtn", "--skip-fp-eval", "--save", q] + common) == 0
    capsys.readouterr()
    assert main(["eval", "--model", q] + common) == 0
    mem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", q, "--from-disk"] + common) == 0
    disk = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mem["perplexity"] == disk["perplexity"] and math.isfinite(mem["perplexity"])
    refused = [["quantize", "--spec", "w4g32", "--method", "rtn", "--skip-fp-eval"],
               ["optimize", "--budget-like", "w4g64", "--trials", "2", "--out", str(tmp_path / "run")],
               ["diagnose", "--out", str(tmp_path / "diag")],
               ["ablate", "weights", "--out", str(tmp_path / "abl")]]
    for argv in refused:
        assert main(argv + ["--model", q, "--data", text, "--seqlen", "32", "--max-windows", "4", "--quiet"]) == 2, argv[0]
        assert "already quantized" in capsys.readouterr().err, argv[0]


@pytest.fixture
def fake_hub(monkeypatch):
    """A hub whose repositories are local folders (``{repo id: folder}``), answering as
    huggingface_hub's ``snapshot_download``/``hf_hub_download``/``get_safetensors_metadata`` do:
    the snapshot's path, a file's path, or an error for a repository it does not hold. Records the
    file patterns each snapshot asked for."""
    import huggingface_hub

    repos, asked = {}, []

    def folder(repo_id):
        if repo_id not in repos:
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id} is not on this hub")
        return repos[repo_id]

    def snapshot_download(repo_id, allow_patterns=None, **_):
        asked.append(list(allow_patterns or []))
        return folder(repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **_: f"{folder(repo_id)}/{filename}")
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata",
                        lambda repo_id, **_: type("Meta", (), {"parameter_count": {"BF16": 10**12, "I32": 5}})())
    return repos, asked


def test_a_hub_checkpoint_is_read_by_gransearch_from_its_snapshot(fake_hub, cli_assets, tmp_path, capsys):
    """A hub id of a compressed-tensors checkpoint goes through gransearch's reader (transformers
    does not reload asymmetric ones), in memory and from disk, with only configs, safetensors and
    tokenizer files fetched; a float hub model is read from disk from its snapshot too."""
    from gransearch.cli import main

    repos, asked = fake_hub
    model_dir, _, text = cli_assets
    q = str(tmp_path / "q")
    common = ["--data", text, "--seqlen", "32", "--max-windows", "4", "--json", "--quiet"]
    assert main(["quantize", "--model", model_dir, "--spec", "w4g32", "--method", "rtn", "--skip-fp-eval", "--save", q] + common) == 0
    repos.update({"someone/tiny-w4g32-asym": q, "someone/tiny": model_dir})
    capsys.readouterr()

    model, _ = gs.load_model("someone/tiny-w4g32-asym")
    want = gs.load_quantized(q)
    assert sum(isinstance(m, gs.QuantLinear) for m in model.modules()) == 14
    ids = token_stream(256, seed=5)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want(ids).logits)
    assert all("*.safetensors" in p and not any(x in p for x in ("*.bin", "*.pt", "*.py", "*")) for p in asked)

    assert main(["eval", "--model", "someone/tiny-w4g32-asym", "--from-disk"] + common) == 0
    disk = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", q] + common) == 0
    mem = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert disk["perplexity"] == mem["perplexity"]

    # a float hub model quantized block by block from its snapshot: the same checkpoint as from the folder
    out = [str(tmp_path / "hub-q"), str(tmp_path / "dir-q")]
    for src, dst in zip(("someone/tiny", model_dir), out):
        assert main(["quantize", "--model", src, "--from-disk", "--spec", "w4g32", "--method", "rtn", "--skip-fp-eval",
                     "--save", dst] + common) == 0
    from safetensors.torch import load_file

    a, b = ({k: load_file(f)[k] for k, f in gs.offload.checkpoint_files(d).items()} for d in out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_ids_that_cannot_be_fetched_say_what_to_do(fake_hub, cli_assets, capsys):
    from gransearch.cli import _quantize_mode, main

    _, _, text = cli_assets
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        gs.load_quantized("someone/missing")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1"):
        gs.offload.DiskModel("someone/missing")
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        gs.offload.DiskModel("no/such/folder")
    assert main(["eval", "--model", "no/such/folder", "--from-disk", "--data", text, "--quiet"]) == 2
    assert "is neither" in capsys.readouterr().err
    # a hub model larger than memory (as the hub lists its float weights) is read from disk without being asked
    args = type("Args", (), {"model": "someone/huge", "from_disk": False})()
    assert _quantize_mode(args).startswith("from disk, block by block (its float32 weights, 4000.0 GB")
