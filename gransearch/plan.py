"""Per-layer quantization plans: plain data, saved as versioned JSON, applied by ``quantize``.

A plan maps every quantized linear (by its name in the model) to a method and a spec, and carries
a fingerprint of the model it was made for (a hash of every planned layer's name and shape, plus
the model type) so that applying it to another model fails loudly::

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
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

from .arch import arch_of, get_module, linear_shape, model_linears
from .cost import layer_nbytes
from .spec import QuantSpec

__all__ = ["LayerPlan", "QuantPlan", "PLAN_FORMAT", "PLAN_VERSION", "model_fingerprint", "float_nbytes", "plan_nbytes", "GB"]

PLAN_FORMAT = "gransearch.plan"
PLAN_VERSION = 1
GB = 10**9  # budgets are in GB (10^9 bytes), everywhere


@dataclass(frozen=True)
class LayerPlan:
    method: str
    spec: QuantSpec

    def __post_init__(self) -> None:
        from .quantize import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {METHODS}")
        if isinstance(self.spec, str):
            object.__setattr__(self, "spec", QuantSpec.parse(self.spec))

    def key(self) -> str:
        return f"{self.method}:{self.spec}"

    @classmethod
    def from_key(cls, key: str) -> "LayerPlan":
        method, spec = key.split(":")
        return cls(method, QuantSpec.parse(spec))


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model type and every quantizable linear's name and ``[out, in]`` shape."""
    h = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for ref in model_linears(model, arch_of(model)):
        h.update(f"{ref.name}:{ref.shape[0]}x{ref.shape[1]};".encode())
    return h.hexdigest()[:16]


def _planned_names(model: nn.Module) -> list[str]:
    return [r.name for r in model_linears(model, arch_of(model))]


def float_nbytes(model: nn.Module, exclude: Optional[set] = None) -> int:
    """Bytes of every parameter and buffer-free weight not in ``exclude`` (linear names), counted once."""
    exclude = exclude or set()
    seen = set()
    total = 0
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if mname in exclude and pname == "weight":
                continue
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def plan_nbytes(model: nn.Module, layers: dict[str, "LayerPlan"]) -> int:
    """Stored bytes of ``model`` quantized with ``layers`` (see the module docstring)."""
    total = float_nbytes(model, exclude=set(layers))
    for name, lp in layers.items():
        total += layer_nbytes(linear_shape(get_module(model, name)), lp.spec)
    return total


@dataclass
class QuantPlan:
    """``layers``: ``{linear name: LayerPlan}``; ``fingerprint``: of the model it was made for."""

    layers: dict[str, LayerPlan]
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls, model: nn.Module, spec: Union[QuantSpec, str], method: str = "gptq") -> "QuantPlan":
        sp = QuantSpec.parse(spec) if isinstance(spec, str) else spec
        return cls({n: LayerPlan(method, sp) for n in _planned_names(model)}, model_fingerprint(model), {"uniform": f"{method}:{sp}"})

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if this plan was made for another model."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise ValueError(
                f"this plan was made for another model (fingerprint {self.fingerprint}, this model {fp}): "
                "its layer names or shapes differ. Make a new plan for this model"
            )

    def nbytes(self, model: nn.Module) -> int:
        return plan_nbytes(model, self.layers)

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
            "layers": {n: {"method": lp.method, "spec": str(lp.spec)} for n, lp in self.layers.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPlan":
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a gransearch plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is not supported (this gransearch reads version {PLAN_VERSION})")
        layers = {n: LayerPlan(e["method"], QuantSpec.parse(e["spec"])) for n, e in d["layers"].items()}
        return cls(layers, d["fingerprint"], d.get("meta", {}))

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1, sort_keys=False)

    @classmethod
    def load(cls, path: str) -> "QuantPlan":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))
