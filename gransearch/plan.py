"""Per-layer quantization plans: plain data, saved as versioned JSON, applied by ``quantize``.

A plan maps every quantized linear (by its name in the model) to a method and a spec (and, for the
GPTQ methods, the GPTQ options the layer was measured with, so that re-applying the plan rounds it
the same way), and carries
a fingerprint of the model it was made for (a hash of every planned layer's name and shape, plus
the model type) so that applying it to another architecture fails loudly. The fingerprint covers
shapes only, on purpose: a plan found on one checkpoint applies to another of the same architecture
(a fine-tune, say). What must not be mixed up -- stored banks and studies, whose numbers hold for
one set of weights only -- is keyed on :func:`weights_fingerprint` as well::

    plan = QuantPlan.uniform(model, "w4g64", "gptq")
    plan.save("plan.json")
    plan = QuantPlan.load("plan.json")
    gs.quantize(fresh_model, plan, calib)      # checks the fingerprint first

Byte accounting of a whole model (what a budget counts): the packed linears (codes, float16 scales,
packed zeros) plus every parameter left in floating point at its own dtype (embeddings, norms,
biases, an untied ``lm_head``); a tensor shared by several modules (tied embeddings) counts once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

import torch

from ._files import atomic_write
from .arch import arch_of, get_module, linear_shape, model_linears
from .cost import layer_nbytes
from .errors import PlanFormatError
from .methods import GPTQOptions, Method
from .spec import QuantSpec, parse_spec

__all__ = ["LayerPlan", "QuantPlan", "PLAN_FORMAT", "PLAN_VERSION", "model_fingerprint", "weights_fingerprint", "float_nbytes",
           "plan_nbytes", "GB"]

PLAN_FORMAT = "gransearch.plan"
PLAN_VERSION = 1
GB = 10**9  # budgets are in GB (10^9 bytes), everywhere


@dataclass(frozen=True)
class LayerPlan:
    """One layer's recipe: the rounding ``method``, the ``spec`` and, for the GPTQ methods, the
    :class:`~gransearch.methods.GPTQOptions` it was measured with (``None``: the caller's)."""

    method: Method
    spec: QuantSpec
    gptq: Optional[GPTQOptions] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method.parse(self.method))
        if isinstance(self.spec, str):
            object.__setattr__(self, "spec", parse_spec(self.spec))
        if not self.method.accepts(self.spec):
            raise ValueError(f"method {self.method} cannot make {self.spec}: " + (
                "llamacpp makes ggml types only (w4g32s, w5g32s, w8g32s, Q2_K..Q6_K)" if self.method == Method.LLAMACPP
                else f"{self.spec} is a llama.cpp type only its own quantizer makes: use method llamacpp"))
        if self.gptq is not None and not self.method.uses_gptq:
            object.__setattr__(self, "gptq", None)  # options of a rounding this layer does not use

    def key(self) -> str:
        """``method:spec``: what a bank stores and a trial chooses (options are the bank's)."""
        return f"{self.method}:{self.spec}"

    @classmethod
    def from_key(cls, key: str, gptq: Optional[GPTQOptions] = None) -> "LayerPlan":
        method, spec = key.split(":")
        return cls(method, parse_spec(spec), gptq)

    def to_dict(self) -> dict:
        out = {"method": str(self.method), "spec": str(self.spec)}
        if self.gptq is not None:
            out["gptq"] = self.gptq.to_dict()
        return out


def _is_disk(model) -> bool:
    from .offload import DiskModel

    return isinstance(model, DiskModel)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model type and every quantizable linear's name and ``[out, in]`` shape."""
    model = model.model if _is_disk(model) else model  # a DiskModel: its skeleton has the shapes
    h = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for ref in model_linears(model, arch_of(model)):
        h.update(f"{ref.name}:{ref.shape[0]}x{ref.shape[1]};".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values.

    Two checkpoints of one architecture (a base model and its fine-tune, two seeds) differ here
    while :func:`model_fingerprint` is the same. ``samples`` values per tensor, evenly strided over
    its flattened elements, read in float32 (exact for float16/bfloat16); about a millisecond per
    hundred tensors, whatever their size.
    """
    if _is_disk(model):  # a model read from disk: the same numbers, each tensor read from its file
        return model.weights_fingerprint(samples)
    h = hashlib.sha256(model_fingerprint(model).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _planned_names(model: nn.Module) -> list[str]:
    return [r.name for r in model_linears(model, arch_of(model))]


def float_nbytes(model: nn.Module, exclude: Optional[set] = None, dtype=None, format: str = "gransearch") -> int:
    """Bytes of every parameter not in ``exclude`` (linear names: their weights), counted once; at
    ``dtype`` if given (the dtype a checkpoint writes floats in), else each at its own. ``format="gguf"``
    counts what a GGUF stores instead (:func:`gransearch.export.gguf.gguf_float_nbytes`: norms in F32,
    the token embedding in Q8_0)."""
    if format == "gguf":
        from .export.gguf import gguf_float_nbytes

        return gguf_float_nbytes(model, exclude)
    exclude = exclude or set()
    seen = set()
    total = 0
    size = None if dtype is None else torch.empty(0, dtype=dtype).element_size()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if mname in exclude and pname == "weight":
                continue
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * (size if size is not None and p.is_floating_point() else p.element_size())
    return total


def plan_nbytes(model: nn.Module, layers: dict[str, "LayerPlan"], format: str = "gransearch", float_dtype=None) -> int:
    """Stored bytes of ``model`` quantized with ``layers`` (see the module docstring), its linears in
    ``format``'s layout and its floats at ``float_dtype`` (default: each at its own)."""
    total = float_nbytes(model, exclude=set(layers), dtype=float_dtype, format=format)
    for name, lp in layers.items():
        total += layer_nbytes(linear_shape(get_module(model, name)), lp.spec, format)
    return total


@dataclass
class QuantPlan:
    """``layers``: ``{linear name: LayerPlan}``; ``fingerprint``: of the model it was made for."""

    layers: dict[str, LayerPlan]
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls, model: nn.Module, spec: Union[QuantSpec, str], method: str = "gptq", gptq: Optional[GPTQOptions] = None) -> "QuantPlan":
        sp = parse_spec(spec) if isinstance(spec, str) else spec
        return cls({n: LayerPlan(method, sp, gptq) for n in _planned_names(model)}, model_fingerprint(model), {"uniform": f"{method}:{sp}"})

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if this plan was made for another model."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise ValueError(
                f"this plan was made for another model (fingerprint {self.fingerprint}, this model {fp}): "
                "its layer names or shapes differ. Make a new plan for this model"
            )

    def nbytes(self, model: nn.Module) -> int:
        """Whole-model bytes, counted as the search that made the plan counted them (its storage
        ``format`` and float dtype, recorded in ``meta``; default gransearch's layout, floats as loaded)."""
        fdt = self.meta.get("float_dtype")
        return plan_nbytes(model, self.layers, self.meta.get("format", "gransearch"), None if fdt is None else getattr(torch, fdt))

    def summary(self) -> dict[str, int]:
        """How many layers use each ``method:spec``."""
        out: dict[str, int] = {}
        for lp in self.layers.values():
            out[lp.key()] = out.get(lp.key(), 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "fingerprint": self.fingerprint,
            "layers": {n: lp.to_dict() for n, lp in self.layers.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> "QuantPlan":
        """A plan from its JSON document; :class:`PlanFormatError` naming ``source`` and the problem."""
        if not isinstance(d, dict):
            raise PlanFormatError(f"{source}: a plan is a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise PlanFormatError(f"{source}: not a gransearch plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        if d.get("version") != PLAN_VERSION:
            raise PlanFormatError(f"{source}: plan version {d.get('version')!r} is not supported (this gransearch reads version {PLAN_VERSION})")
        for key, typ in (("fingerprint", str), ("layers", dict)):
            if not isinstance(d.get(key), typ):
                raise PlanFormatError(f"{source}: {key!r} is missing or not a JSON {'string' if typ is str else 'object'}")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanFormatError(f"{source}: 'meta' must be a JSON object")
        if not d["layers"]:
            raise PlanFormatError(f"{source}: the plan names no layer")
        meta = dict(meta)
        shared = meta.pop("gptq", None)  # plans written before the options moved onto each layer
        layers = {}
        for name, e in d["layers"].items():
            if not isinstance(e, dict) or not isinstance(e.get("method"), str) or not isinstance(e.get("spec"), str):
                raise PlanFormatError(f"{source}: layer {name!r} must be an object with string fields 'method' and 'spec', got {e!r}")
            opts = e.get("gptq", shared)
            if opts is not None and not isinstance(opts, dict):
                raise PlanFormatError(f"{source}: layer {name!r}: 'gptq' must be a JSON object of GPTQ options, got {opts!r}")
            try:
                layers[name] = LayerPlan(e["method"], parse_spec(e["spec"]), None if opts is None else GPTQOptions.from_dict(opts))
            except (ValueError, TypeError) as exc:
                raise PlanFormatError(f"{source}: layer {name!r}: {exc}") from None
        return cls(layers, d["fingerprint"], meta)

    def save(self, path: str) -> None:
        """Write the plan as JSON (atomically: a reader never sees half a file)."""
        atomic_write(path, json.dumps(self.to_dict(), indent=1, sort_keys=False))

    @classmethod
    def load(cls, path: str) -> "QuantPlan":
        """Read a plan written by :meth:`save`; errors name the file and what is wrong with it."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"plan file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanFormatError(f"{path}: not valid JSON ({exc}); a truncated or hand-edited file? "
                                  "Write it again with QuantPlan.save or `gransearch optimize`") from None
        return cls.from_dict(doc, source=path)
