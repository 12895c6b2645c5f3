"""Search profiles: which candidates a search may choose, and how their bytes are counted.

* ``research``: every bit width 2..8 and granularity the user lists (asymmetric), counted in
  gransearch's own packed layout (:func:`gransearch.cost.layer_nbytes`). Not every plan can be
  served: vLLM takes only some specs and fuses layers.
* ``vllm``: what vLLM's compressed-tensors WNA16 path serves *and* transformers reloads: 4 and 8
  bits symmetric (``uint4b8``, ``uint8b128``), per channel or in groups of 32, 64 or 128 along the
  input. Layers vLLM fuses (q/k/v, gate/up: :data:`gransearch.arch.FUSED_IN_SERVING`) share one
  spec, chosen jointly as one knapsack item; methods may differ inside a set (they change codes,
  not the format). Bytes are those the compressed-tensors checkpoint stores, and the
  floating-point tensors are counted at the dtype they are written in.
* ``vllm-asym``: ``vllm`` plus asymmetric 4 bits (``uint4`` with zero points, which vLLM's Marlin
  kernels run). transformers 5.24 with compressed-tensors 0.20 reloads such a checkpoint only when
  it has one scheme (``dequantize=True``; docs/export.md), so a mixed plan of this profile is for
  vLLM and gransearch. Asymmetric 8 bits is in neither: it passes vLLM's configuration checks but
  has no Marlin kernel.

* ``gguf``: what a GGUF stores for llama.cpp, from gransearch's own codes: ``w4g32s`` (``Q4_0``),
  ``w5g32s`` (``Q5_0``) and ``w8g32s`` (``Q8_0``), each layer on its own (GGUF has a type per tensor,
  nothing is fused). Bytes are llama.cpp's block bytes; the rest of the file is counted as
  :func:`gransearch.export.gguf.save_gguf` writes it (norms F32, token embedding Q8_0), so the budget
  is the file's tensor bytes. RTN, GPTQ, AWQ and AWQ+GPTQ all apply, and so does ``llamacpp``
  (llama.cpp's own quantizer weighted by the calibration's importance matrix), which also makes
  ``IQ4_NL`` (a non-linear 4-bit grid in blocks of 32) for every layer and the K-quants ``Q2_K`` ...
  ``Q6_K`` and ``IQ4_XS`` for the layers whose rows are multiples of 256 weights.
* ``gguf-asym``: ``gguf`` plus ``Q4_1`` and ``Q5_1`` (``w4g32f``, ``w5g32f``: a float16 scale and
  minimum per block of 32), from every method too. Kept apart because a model that was stored as
  Q4_1 (the packaged SmolLM2) is reproduced by it exactly: compare with ``gguf`` there.

Kernel shapes: vLLM's Marlin kernels tile the output in multiples of 64 and the input in multiples
of 128 (per tensor-parallel shard); a layer outside that falls back to other kernels or is refused
by vLLM at load. The profile does not drop such layers; :func:`Profile.kernel_warnings` names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from .cost import layer_nbytes
from .spec import GGMLSpec, PerChannel, PerGroup, QuantSpec, as_granularity

__all__ = ["Profile", "PROFILES", "get_profile"]


@dataclass(frozen=True)
class Profile:
    name: str
    format: str  # byte accounting: "gransearch" or "compressed-tensors"
    bits: Optional[tuple[int, ...]] = None  # allowed bit widths; None: any
    granularities: Optional[tuple] = None  # allowed granularities; None: any
    symmetric: dict = field(default_factory=dict)  # bits -> the symmetric variants proposed; missing: asymmetric only
    fused: bool = False  # fused serving sets share one spec
    float_dtype_of_model: bool = False  # floats counted at the dtype they are written in (not as loaded)
    ggml_types: tuple = ()  # llama.cpp types only its quantizer makes (method llamacpp), where a layer's rows fit them
    float_zero: tuple = ()  # bit widths whose float-offset variant (w4g32f: Q4_1) is proposed too

    def specs(self, shape: tuple[int, int], bits: Sequence[int], granularities: Sequence, methods=None) -> list:
        """The candidate specs of a ``[out, in]`` layer: ``bits`` x ``granularities`` that this
        profile allows and that divide the layer's input, with the profile's symmetric variants,
        then the profile's ggml types whose blocks fit the rows, when ``methods`` (``None``: any)
        holds ``llamacpp``."""
        out: list = []
        for b in bits:
            if self.bits is not None and int(b) not in self.bits:
                continue
            for g in granularities:
                gran = as_granularity(g)
                if not gran.fits(shape[1]) or (self.granularities is not None and gran not in self.granularities):
                    continue
                for sym in self.symmetric.get(int(b), (False,)):
                    out.append(QuantSpec(int(b), gran, symmetric=sym))
                if int(b) in self.float_zero:
                    out.append(QuantSpec(int(b), gran, float_zero=True))
        if self.ggml_types and (methods is None or "llamacpp" in [str(m) for m in methods]):
            out += [GGMLSpec(t) for t in self.ggml_types if shape[1] % GGMLSpec(t).block == 0]
        return out

    def nbytes(self, shape: tuple[int, int], spec: QuantSpec) -> int:
        return layer_nbytes(shape, spec, self.format)

    def allows(self, spec) -> bool:
        if getattr(spec, "is_ggml", False):
            return spec.type in self.ggml_types
        if self.bits is not None and spec.bits not in self.bits:
            return False
        if self.granularities is not None and spec.granularity not in self.granularities:
            return False
        if spec.float_zero:
            return self.name == "research" or spec.bits in self.float_zero
        return spec.symmetric in self.symmetric.get(spec.bits, (False, True) if self.name == "research" else (False,))

    def check_candidates(self, bits: Sequence[int], granularities: Sequence) -> None:
        """``ValueError`` when none of ``bits`` x ``granularities`` is in the profile."""
        if self.bits is not None and not set(int(b) for b in bits) & set(self.bits):
            raise ValueError(f"the {self.name} profile takes bits {list(self.bits)}; none of {list(bits)} is one of them")
        if self.granularities is not None and not {as_granularity(g) for g in granularities} & set(self.granularities):
            raise ValueError(f"the {self.name} profile takes granularities {[g.name for g in self.granularities]}; "
                             f"none of {list(granularities)} is one of them")

    def check_layers(self, specs: dict) -> None:
        """``ValueError`` naming every layer this profile cannot serve: a spec outside it, or a
        fused set whose parts differ."""
        from .arch import fused_sets

        bad = [f"{n} ({sp})" for n, sp in specs.items() if not self.allows(sp)]
        split = []
        if self.fused:
            for group in fused_sets(specs):
                if len({str(specs[n]) for n in group}) > 1:
                    split.append(" / ".join(f"{n.rsplit('.', 1)[-1]}={specs[n]}" for n in group) + f" in {group[0].rsplit('.', 1)[0]}")
        if bad or split:
            msg = [f"this plan cannot be served by {self.name}:"]
            if bad:
                msg.append(f"{len(bad)} layers use specs outside the profile ({', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''})")
            if split:
                msg.append(f"{len(split)} fused sets mix specs ({'; '.join(split[:3])}{'; ...' if len(split) > 3 else ''})")
            msg.append(f"search with profile='{self.name}' (CLI: --profile {self.name}) so that every plan is servable")
            raise ValueError(" ".join(msg))

    def kernel_warnings(self, shapes: dict) -> list[str]:
        """Layers whose ``[out, in]`` Marlin does not tile (out % 64, in % 128): vLLM picks another
        kernel or refuses them."""
        if not self.name.startswith("vllm"):
            return []
        return [f"{n} {tuple(s)}" for n, s in shapes.items() if s[0] % 64 or s[1] % 128]


_VLLM_GRANS = (PerChannel(), PerGroup(32), PerGroup(64), PerGroup(128))

PROFILES = {
    "research": Profile("research", "gransearch"),
    "vllm": Profile("vllm", "compressed-tensors", bits=(4, 8), granularities=_VLLM_GRANS, symmetric={4: (True,), 8: (True,)},
                    fused=True, float_dtype_of_model=True),
    "gguf": Profile("gguf", "gguf", bits=(4, 5, 8), granularities=(PerGroup(32),), symmetric={4: (True,), 5: (True,), 8: (True,)},
                    ggml_types=("IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")),
    "gguf-asym": Profile("gguf-asym", "gguf", bits=(4, 5, 8), granularities=(PerGroup(32),), symmetric={4: (True,), 5: (True,), 8: (True,)},
                         ggml_types=("IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"), float_zero=(4, 5)),
    "vllm-asym": Profile("vllm-asym", "compressed-tensors", bits=(4, 8), granularities=_VLLM_GRANS, symmetric={4: (False, True), 8: (True,)},
                         fused=True, float_dtype_of_model=True),
}


def get_profile(profile) -> Profile:
    """A :class:`Profile` by name (``research``, ``vllm``, ``vllm-asym``, ``gguf``, ``gguf-asym``) or itself."""
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {', '.join(PROFILES)}")
    return PROFILES[profile]
