"""Write the quantized model as a checkpoint other tools load, and read it back.

:func:`save_quantized` writes a model quantized by :func:`gransearch.quantize` (its linears are
:class:`~gransearch.qlinear.QuantLinear`) as a compressed-tensors ``pack-quantized`` checkpoint:
``config.json`` with its ``quantization_config``, ``model.safetensors``, the generation config and,
when given, the tokenizer. ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it
(with ``compressed-tensors`` installed) and vLLM serves it when every layer is in the ``vllm``
profile (:mod:`gransearch.profiles`). :func:`load_quantized` reads it back with bit-identical codes.
The layout and how our codes map to compressed-tensors' are in :mod:`.compressed_tensors`.
:func:`load_quantized` also reads other tools' weight-only checkpoints: llm-compressor's
compressed-tensors ones, GPTQModel's or AutoGPTQ's GPTQ-format ones (:mod:`.gptq`) and AWQ ones in
AutoAWQ's GEMM layout (:mod:`.awq`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .._files import atomic_write
from ..arch import get_module, set_module
from ..qlinear import QuantLinear
from . import compressed_tensors as ct

log = logging.getLogger(__name__)

__all__ = ["save_quantized", "load_quantized", "load_in_transformers", "quantization_method", "read_scheme", "SavedModel", "ShardedWriter", "FORMATS",
           "float_dtype_of"]

FORMATS = ("compressed-tensors",)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SavedModel:
    """What :func:`save_quantized` wrote: the folder, the bytes of the quantized layers' tensors, of
    the floating-point tensors, and of the whole safetensors file (its header included)."""

    folder: str
    quantized_nbytes: int
    float_nbytes: int
    file_nbytes: int
    float_dtype: str
    n_quantized: int


def float_dtype_of(model: nn.Module, dtype: Union[None, str, torch.dtype] = None) -> torch.dtype:
    """The dtype floating-point tensors are written in: ``dtype`` if given, else the dtype the model
    was published in (``config.dtype``), else its parameters' dtype."""
    if dtype is None:
        dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        if dtype is None:
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"unknown float dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype.removeprefix("torch.")]
    if dtype not in _DTYPES.values():
        raise ValueError(f"float dtype {dtype} is not a float type a checkpoint stores: use one of {', '.join(_DTYPES)}")
    return dtype


def _quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _check_layers(qlayers: dict[str, QuantLinear], profile: Optional[str]) -> None:
    """Refuse (naming them) layers the format cannot store or, with ``profile``, vLLM cannot serve."""
    acts = sorted(n for n, m in qlayers.items() if m.act_spec is not None)
    if acts:
        raise ValueError(f"activation quantization is not exported (layers {acts[:3]}...): set_act_quant(model, None) first")
    ggml = sorted(n for n, m in qlayers.items() if getattr(m.spec, "is_ggml", False))
    if ggml:
        raise ValueError(f"{len(ggml)} layers are llama.cpp K-quants ({ggml[0]}: {qlayers[ggml[0]].spec}), which compressed-tensors cannot "
                         "store: write them with save_gguf")
    bad = sorted(n for n, m in qlayers.items() if m.spec.granularity.spans_rows)
    if bad:
        raise ValueError(f"per-tensor layers cannot be written as compressed-tensors: {', '.join(bad[:5])}"
                         f"{' and %d more' % (len(bad) - 5) if len(bad) > 5 else ''}; use per-channel or groups")
    if profile is not None:
        from ..profiles import get_profile

        prof = get_profile(profile)
        prof.check_layers({n: m.spec for n, m in qlayers.items()})
        untiled = prof.kernel_warnings({n: (m.out_features, m.in_features) for n, m in qlayers.items()})
        if untiled:
            log.warning("%d layers have shapes vLLM's Marlin kernels do not tile (out %% 64, in %% 128), e.g. %s: vLLM picks "
                        "another kernel for them or refuses to load (docs/export.md)", len(untiled), untiled[0])


def _tensors(model: nn.Module, fdt: torch.dtype, keep=None, read=None) -> tuple[dict[str, torch.Tensor], int, int]:
    """The checkpoint tensors of ``model`` whose names ``keep`` accepts (all by default): packed
    quantized layers, floating-point parameters in ``fdt`` (a tied tensor once, under its first
    name), persistent buffers. A parameter not in memory (``meta``) is taken from ``read(name)``
    (a model read from disk). Returns ``(tensors, quantized bytes, float bytes)``."""
    keep = keep or (lambda name: True)
    qlayers = {n: m for n, m in _quantized_layers(model).items() if keep(n)}
    tensors: dict[str, torch.Tensor] = {}
    qbytes = 0
    for name, m in qlayers.items():
        t = ct.layer_tensors(name, m.quantized_weight())
        qbytes += sum(v.numel() * v.element_size() for v in t.values())
        tensors.update(t)
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().to("cpu", fdt).contiguous()
    seen: dict[int, str] = {}
    fbytes = 0
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner = pname.rsplit(".", 1)[0]
        if isinstance(get_module(model, owner) if owner else model, QuantLinear) or not keep(pname):
            continue
        if id(p) in seen or (tied and pname == "lm_head.weight"):
            continue  # a tied tensor is stored once, under its first name
        seen[id(p)] = pname
        if p.is_meta:
            if read is None:
                raise ValueError(f"{pname} is not in memory: nothing to write")
            p = read(pname)
        v = p.detach().to("cpu", fdt if p.is_floating_point() else p.dtype).contiguous()
        tensors[pname] = v
        fbytes += v.numel() * v.element_size()
    for bname, b in model.named_buffers():
        owner = bname.rsplit(".", 1)[0]
        if isinstance(get_module(model, owner) if owner else model, QuantLinear) or not _persistent(model, bname) or not keep(bname):
            continue
        tensors[bname] = b.detach().cpu().contiguous()
        fbytes += tensors[bname].numel() * tensors[bname].element_size()
    return tensors, qbytes, fbytes


def _write_config(model: nn.Module, folder: str, specs: dict, fdt: torch.dtype, tokenizer=None) -> None:
    """``config.json`` with the ``quantization_config`` of ``specs`` (``{layer: spec}``; every other
    linear in ``ignore``), the generation config and the tokenizer."""
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in specs)
    cfg = copy.deepcopy(model.config)
    cfg.quantization_config = ct.quantization_config(specs, ignore)
    cfg.dtype = str(fdt).removeprefix("torch.")
    atomic_write(os.path.join(folder, "config.json"), json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_quantized(model: nn.Module, folder: str, format: str = "compressed-tensors", *, dtype=None, tokenizer=None,
                   profile: Optional[str] = None) -> SavedModel:
    """Write ``model`` (quantized by :func:`gransearch.quantize`) to ``folder`` in ``format``.

    ``dtype``: of the floating-point tensors (embeddings, norms, an untied head, biases); default
    the model's published dtype (:func:`float_dtype_of`). ``tokenizer``: saved beside it.
    ``profile``: ``"vllm"`` or ``"vllm-asym"`` refuses (naming the layers) a model vLLM cannot serve; see
    :func:`gransearch.profiles.check_plan`. Layers quantized per tensor or with activation
    quantization are refused: the format has no place for them.
    """
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    qlayers = _quantized_layers(model)
    if not qlayers:
        raise ValueError("the model has no quantized layer: quantize it first (gs.quantize(model, plan, calib))")
    _check_layers(qlayers, profile)
    fdt = float_dtype_of(model, dtype)
    tensors, qbytes, fbytes = _tensors(model, fdt)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):  # left by an earlier sharded save: it would name files this save does not hold
        os.remove(index)
    _write_config(model, folder, {n: m.spec for n, m in qlayers.items()}, fdt, tokenizer)
    return SavedModel(folder, qbytes, fbytes, os.path.getsize(path), str(fdt).removeprefix("torch."), len(qlayers))


class ShardedWriter:
    """Writes a compressed-tensors checkpoint while the model is quantized block by block (a model
    read from disk, :class:`gransearch.offload.DiskModel`): one safetensors shard per decoder block
    as soon as the block is done, then the tensors outside the blocks, the index
    (``model.safetensors.index.json``), the config and the tokenizer files.

    Everything goes to a hidden folder beside ``folder`` that replaces it only when complete, so a
    killed run never leaves a folder that looks like a checkpoint; an existing ``folder`` that is
    not a compressed-tensors checkpoint (and not empty) is refused up front.
    """

    def __init__(self, folder: str, model: nn.Module, n_blocks: int, *, dtype=None, profile: Optional[str] = None):
        from ..offload import scratch_dir

        if os.path.isdir(folder) and os.listdir(folder):
            try:
                ct.parse_config(folder)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{folder} exists and is not a quantized checkpoint ({exc}): choose another save folder") from None
        self.folder = os.path.abspath(folder)
        self.tmp = scratch_dir(self.folder, "partial")
        self.model, self.n_shards, self.profile = model, n_blocks + 1, profile
        self.fdt = float_dtype_of(model, dtype)
        self.weight_map: dict[str, str] = {}
        self.specs: dict = {}
        self.qbytes = self.fbytes = 0

    def _shard(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"
        save_file(tensors, os.path.join(self.tmp, name), metadata={"format": "pt"})
        self.weight_map.update({t: name for t in tensors})

    def write_block(self, index: int, prefix: str) -> None:
        """Write the tensors whose names start with ``prefix`` (block ``index``) as its shard."""
        qlayers = {n: m for n, m in _quantized_layers(self.model).items() if n.startswith(prefix)}
        _check_layers(qlayers, self.profile)
        tensors, qb, fb = _tensors(self.model, self.fdt, keep=lambda n: n.startswith(prefix))
        self._shard(index + 1, tensors)
        self.specs.update({n: m.spec for n, m in qlayers.items()})
        self.qbytes, self.fbytes = self.qbytes + qb, self.fbytes + fb

    def finish(self, blocks_prefix: str, extra_files=(), tokenizer=None, read=None) -> SavedModel:
        """Write the tensors outside the blocks (those not in memory from ``read(name)``), the index
        and the config; move the folder in place."""
        import shutil

        if not self.specs:
            raise ValueError("no quantized layer was written: nothing to save")
        tensors, qb, fb = _tensors(self.model, self.fdt, keep=lambda n: not n.startswith(blocks_prefix + "."), read=read)
        self._shard(0, tensors)
        self.qbytes, self.fbytes = self.qbytes + qb, self.fbytes + fb
        total = sum(os.path.getsize(os.path.join(self.tmp, f)) for f in set(self.weight_map.values()))
        atomic_write(os.path.join(self.tmp, "model.safetensors.index.json"),
                     json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}, indent=1))
        for path in extra_files:
            if os.path.basename(path) != "config.json":
                shutil.copy2(path, os.path.join(self.tmp, os.path.basename(path)))
        _write_config(self.model, self.tmp, self.specs, self.fdt, tokenizer)
        if os.path.isdir(self.folder):
            shutil.rmtree(self.folder)
        os.chmod(self.tmp, 0o755)
        os.replace(self.tmp, self.folder)
        return SavedModel(self.folder, self.qbytes, self.fbytes, total, str(self.fdt).removeprefix("torch."), len(self.specs))

    def abort(self) -> None:
        """Remove what was written (the run failed)."""
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def _persistent(model: nn.Module, bname: str) -> bool:
    owner, _, leaf = bname.rpartition(".")
    mod = get_module(model, owner) if owner else model
    return leaf not in getattr(mod, "_non_persistent_buffers_set", set())


def quantization_method(folder: str) -> Optional[str]:
    """The ``quant_method`` of the checkpoint in ``folder`` (``"compressed-tensors"``, ``"gptq"`` ...,
    from config.json's ``quantization_config`` or AutoGPTQ's ``quantize_config.json``); ``None`` for
    a float model or a folder without a readable config."""
    from . import gptq

    try:
        _, qc, _ = gptq.quant_config(folder)
    except (OSError, ValueError, AttributeError):
        return None
    return str(qc.get("quant_method") or "?").lower() if qc else None


def read_scheme(folder: str):
    """``(config.json, scheme)`` of a quantized checkpoint gransearch reads: GPTQ's layout
    (:mod:`gransearch.export.gptq`) when its config says ``quant_method: gptq``, AWQ's GEMM layout
    (:mod:`gransearch.export.awq`) for ``awq``, else compressed-tensors ``pack-quantized``
    (:func:`compressed_tensors.parse_config`). The scheme's ``resolve(model)`` gives ``{layer: spec}``,
    its ``layer(tensors, name, spec)`` a stored layer, and its ``suffixes`` name a layer's tensors.
    Anything else is refused with the reason."""
    from . import awq, gptq

    method = quantization_method(folder)
    if method == "gptq":
        return gptq.parse_config(folder)
    if method == "awq":
        return awq.parse_config(folder)
    return ct.parse_config(folder)


def load_quantized(folder: str, device=None, dtype=None, trust_remote_code: bool = False) -> nn.Module:
    """The quantized checkpoint in ``folder`` (or a hub id's), its quantized linears as
    :class:`~gransearch.qlinear.QuantLinear` holding the stored codes, scales and zeros exactly.
    Compute runs in ``dtype`` (default: the stored float dtype).

    It reads what :func:`save_quantized` writes, the weight-only ``pack-quantized`` checkpoints of
    other tools (llm-compressor's W4A16/W8A16 schemes, symmetric or not, per channel or group, their
    ``Linear`` targets and ignore lists), AWQ checkpoints in AutoAWQ's GEMM layout, and GPTQ-format
    checkpoints (GPTQModel, AutoGPTQ: v1 and v2 zero points, ``desc_act`` included: its layers keep
    their ``g_idx``); anything else (activation
    quantization, compressed-tensors' removed ``actorder='group'``, sparsity, other formats) is refused
    with the reason."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import model_folder

    folder = model_folder(folder, trust_remote_code)  # a hub id: its snapshot in the Hugging Face cache
    cfg_doc, scheme = read_scheme(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    stored = str(cfg_doc.get("dtype") or cfg_doc.get("torch_dtype") or "float32")
    fdt = float_dtype_of(nn.Module(), dtype) if dtype is not None else _DTYPES.get(stored, torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=fdt, trust_remote_code=trust_remote_code)
    layers = scheme.resolve(model)
    from ..offload import checkpoint_files

    tensors = {}
    for path in sorted(set(checkpoint_files(folder).values())):
        tensors.update(load_file(path))
    for name, spec in layers.items():
        lin = get_module(model, name)
        qw = scheme.layer(tensors, name, spec)
        bias = tensors.get(f"{name}.bias")
        if bias is not None and lin.bias is None:
            if bool(bias.any()):
                raise ValueError(f"{folder}: {name} stores a bias, which the model's layer does not have")
        elif bias is not None:
            lin.bias.data = bias.to(fdt)
        set_module(model, name, QuantLinear.from_float(lin, qw))
        for k in (*scheme.suffixes, "bias"):
            tensors.pop(f"{name}.{k}", None)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in layers and not k.endswith(("qweight", "scales", "qzeros"))]
    if unexpected:
        raise ValueError(f"{folder}: tensors the model does not have: {unexpected[:5]}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, QuantLinear):  # a quantized head is its own tensor, whatever the config said: keep it untied
        model.config.tie_word_embeddings = False
    elif getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {missing[:5]}")
    model.eval()
    return model.to(device) if device is not None else model


def load_in_transformers(folder: str, device=None, trust_remote_code: bool = False) -> nn.Module:
    """The checkpoint in ``folder`` (written by :func:`save_quantized`) loaded by transformers and
    compressed-tensors themselves, as a user serving it without gransearch would, on ``device``.

    Symmetric checkpoints load as compressed models (the layers decompress on the first forward).
    A checkpoint with an asymmetric scheme loads through ``CompressedTensorsConfig(dequantize=True)``,
    since this transformers/compressed-tensors pair shapes a packed zero point wrongly when it loads
    a compressed model (docs/export.md). On some transformers versions (5.17 with compressed-tensors
    0.20) the dequantize path leaves every module under compressed-tensors' CPU offloading, where
    ``model.to("cuda")`` keeps the weights on the CPU; that offloading is removed first, and the
    model is checked to be on ``device`` whole. Needs ``transformers`` and ``compressed-tensors``.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _, scheme = ct.parse_config(folder)
    kw = {} if all(sp.symmetric for sp in scheme.specs) else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code, **kw).eval()
    try:
        from compressed_tensors.offload import remove_dispatch
    except ImportError:  # older compressed-tensors: no offloading of its own
        pass
    else:
        remove_dispatch(model, onload_tensors=True)
    if device is None:
        return model
    device = torch.device(device)
    model.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device.type]
    if left:
        raise RuntimeError(f"{folder}: after moving the model to {device}, {len(left)} tensors are elsewhere ({left[:3]}); "
                           "this transformers/compressed-tensors pair keeps them there: load with device_map instead")
    return model
