"""The only model-specific code in gransearch, kept as data: one table keyed by ``config.model_type``.

For each architecture the table says

* ``blocks``: the attribute path of the ``nn.ModuleList`` of decoder blocks;
* ``linears``: the linear layers of one block, in execution order (names relative to the block);
* ``groups``: the scaling groups used by AWQ and SmoothQuant -- a module (``prev``: a norm or a
  linear) whose output feeds only ``linears``, so that dividing ``prev``'s output channels by ``s``
  and multiplying the linears' input channels by ``s`` leaves the function unchanged; ``inspect``
  is the part of the block whose output error AWQ measures; ``norm`` says how a norm applies its
  weight (``"rms"``: ``x * w``, ``"gemma"``: ``x * (1 + w)``, ``"ln"``: ``x * w + b``);
* ``conv1d``: the linears are ``transformers`` ``Conv1D`` (weight stored ``[in, out]``, GPT-2).

To support a new architecture, add a row to :data:`ARCHS` (or extend it at run time with
:func:`register_arch`). An unknown ``model_type`` falls back to quantizing every ``nn.Linear`` in
the first ``ModuleList`` whose length is ``num_hidden_layers``, without scaling groups (RTN and GPTQ
work; AWQ and SmoothQuant need a table row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = [
    "ARCHS", "ArchInfo", "HEAD_ON_BASE", "LinearRef", "NO_CLIP_LEAVES", "ScaleGroup", "arch_of", "block_index", "block_linears",
    "FUSED_IN_SERVING", "clips_after_awq", "foldable", "fused_sets", "get_blocks", "get_module", "input_kinds", "layer_kind", "linear_shape", "linear_weight",
    "model_linears", "register_arch", "set_module",
]

# model types whose causal-LM forward is exactly lm_head(base(x)) (with Gemma's soft-capping): the
# perplexity computes their loss in chunks from the final hidden states
HEAD_ON_BASE = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "gpt2", "opt", "phi3", "smollm3", "olmo", "olmo2", "starcoder2", "gpt_neox",
})

# linears whose output error passes through the attention softmax: AWQ searches no clip for them,
# as the reference code does (query/key projections of every layout, GPT-2's fused c_attn)
NO_CLIP_LEAVES = ("q_proj", "k_proj", "c_attn", "query", "key")


# linears a serving engine fuses into one (vLLM: QKVParallelLinear, MergedColumnParallelLinear): one
# fused layer has one quantization scheme, so these must share a spec to be servable
FUSED_IN_SERVING = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def fused_sets(names) -> list[list[str]]:
    """The linears among ``names`` that serving fuses, grouped: each set shares its parent module
    and its leaves form one of :data:`FUSED_IN_SERVING`; a set misses none of its parts."""
    by_parent: dict[tuple[str, int], list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        for k, fused in enumerate(FUSED_IN_SERVING):
            if leaf in fused:
                by_parent.setdefault((parent, k), []).append(n)
    return [sorted(v, key=lambda n: FUSED_IN_SERVING[k].index(n.rsplit(".", 1)[-1])) for (_, k), v in by_parent.items() if len(v) > 1]


def clips_after_awq(name: str) -> bool:
    """Whether AWQ's output-space clip search applies to the linear called ``name``."""
    return name.rsplit(".", 1)[-1] not in NO_CLIP_LEAVES


def layer_kind(name: str) -> str:
    """What a linear is across blocks (``q_proj``, ``down_proj``): its leaf name."""
    return name.rsplit(".", 1)[-1]


def block_index(name: str) -> Optional[int]:
    """The decoder block a module name belongs to (its first integer path component), else ``None``."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


@dataclass(frozen=True)
class ScaleGroup:
    prev: str
    linears: tuple[str, ...]
    inspect: str
    norm: Optional[str] = None  # "rms" | "gemma" | "ln" | None (prev is a linear)


@dataclass(frozen=True)
class ArchInfo:
    blocks: str
    linears: tuple[str, ...]
    groups: tuple[ScaleGroup, ...] = ()
    conv1d: bool = False
    generic: bool = False


def _llama_like(norm: str = "rms") -> ArchInfo:
    return ArchInfo(
        blocks="model.layers",
        linears=(
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        ),
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", norm),
            # v -> o only where v's output width equals o's input width (no grouped-query attention)
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", norm),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
        ),
    )


_GEMMA3 = ArchInfo(
    blocks="model.layers",
    linears=_llama_like().linears,
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", "gemma"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp", "gemma"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
)

_OPT = ArchInfo(
    blocks="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    groups=(
        ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", "ln"),
        ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ScaleGroup("final_layer_norm", ("fc1",), "fc1", "ln"),
        # ReLU(x / s) = ReLU(x) / s for s > 0, so fc1 -> fc2 is a valid fold
        ScaleGroup("fc1", ("fc2",), "fc2"),
    ),
)

_GPT2 = ArchInfo(
    blocks="transformer.h",
    linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    groups=(
        ScaleGroup("ln_1", ("attn.c_attn",), "attn", "ln"),
        ScaleGroup("ln_2", ("mlp.c_fc",), "mlp", "ln"),
    ),
    conv1d=True,
)

ARCHS: dict[str, ArchInfo] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "smollm3": _llama_like(),
    "gemma3_text": _GEMMA3,
    "opt": _OPT,
    "gpt2": _GPT2,
}


def register_arch(model_type: str, info: ArchInfo) -> None:
    """Add or replace a table row (for architectures gransearch does not ship)."""
    ARCHS[model_type] = info


def _get(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m


def _generic(model: nn.Module) -> ArchInfo:
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            lins = tuple(k for k, m in mod[0].named_modules() if isinstance(m, nn.Linear))
            if lins:
                return ArchInfo(blocks=name, linears=lins, generic=True)
    raise ValueError(
        f"cannot find decoder blocks in {type(model).__name__} (model_type "
        f"{getattr(model.config, 'model_type', None)!r}): add a row to gransearch.arch.ARCHS "
        "(register_arch) naming its block list and linear layers"
    )


def arch_of(model: nn.Module, allow_generic: bool = True) -> ArchInfo:
    """The table row for ``model``; the generic fallback for unknown types if allowed."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in ARCHS:
        return ARCHS[mtype]
    if not allow_generic:
        raise ValueError(
            f"model_type {mtype!r} has no row in gransearch.arch.ARCHS: add one with register_arch "
            f"(known: {sorted(ARCHS)})"
        )
    return _generic(model)


def get_blocks(model: nn.Module, info: Optional[ArchInfo] = None) -> nn.ModuleList:
    info = info or arch_of(model)
    return _get(model, info.blocks)


@dataclass
class LinearRef:
    """A linear layer of a block: its name in the model, its module, and its ``[out, in]`` shape."""

    name: str  # full name in the model, e.g. "model.layers.3.self_attn.q_proj"
    local: str  # name within the block, e.g. "self_attn.q_proj"
    module: nn.Module
    shape: tuple[int, int] = field(default=(0, 0))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (transposed for ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a Linear, Conv1D or already quantized layer."""
    if type(module).__name__ == "QuantLinear":
        return (module.out_features, module.in_features)
    w = linear_weight(module)
    return (int(w.shape[0]), int(w.shape[1]))


def block_linears(model: nn.Module, index: int, info: Optional[ArchInfo] = None) -> list[LinearRef]:
    """The quantizable linear layers of block ``index``, in execution order."""
    info = info or arch_of(model)
    block = get_blocks(model, info)[index]
    out = []
    for local in info.linears:
        mod = _get(block, local)
        out.append(LinearRef(f"{info.blocks}.{index}.{local}", local, mod, linear_shape(mod)))
    return out


def model_linears(model: nn.Module, info: Optional[ArchInfo] = None) -> list[LinearRef]:
    """Every quantizable linear of every block, in execution order."""
    info = info or arch_of(model)
    return [ref for i in range(len(get_blocks(model, info))) for ref in block_linears(model, i, info)]


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path = "a.b.c"``."""
    return _get(root, path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, leaf, new)


def foldable(block: nn.Module, group: ScaleGroup) -> bool:
    """Whether AWQ's input scales of ``group``'s linears fold into ``group.prev`` in ``block``: the
    linears must read exactly ``prev``'s output (``v -> o`` under grouped-query attention does not:
    ``v`` is narrower than ``o``'s input, so that group is skipped)."""
    prev = _get(block, group.prev)
    width = prev.weight.shape[0] if group.norm is not None else linear_weight(prev).shape[0]
    return all(linear_weight(_get(block, l)).shape[1] == width for l in group.linears)


def input_kinds(model: nn.Module) -> dict[str, list[str]]:
    """Linear leaf names grouped by the tensor they read (q/k/v share one input, gate/up another);
    without scaling groups, each linear on its own."""
    info = arch_of(model)
    if info.generic or not info.groups:
        return {layer_kind(r.name): [layer_kind(r.name)] for r in block_linears(model, 0, info)}
    return {"+".join(layer_kind(l) for l in g.linears): [layer_kind(l) for l in g.linears] for g in info.groups}
