"""Outlier diagnostics: where per-tensor quantization hurts, layer by layer, and why.

:func:`diagnose` measures, per linear layer, the activation outlier ratio (largest over median
per-channel ``max|x|``), the kurtosis of activations and weights, and the relative output error of
per-tensor against per-channel weight quantization and of per-tensor against per-token activation
quantization. :class:`Diagnosis` summarises them by layer kind and writes CSVs and heatmaps.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms.rtn import rtn
from .arch import arch_of, block_linears, layer_kind, linear_weight
from .calibrate import BlockRunner, collect_block_stats, hooks
from .errors import check_float_model
from .evaluate import layer_objective
from .qlinear import fake_quant_activation
from .spec import ActSpec, PerChannel, PerTensor, QuantSpec

__all__ = ["diagnose", "Diagnosis", "LayerDiag"]


@dataclass
class LayerDiag:
    name: str
    block: int
    kind: str  # leaf name: q_proj, down_proj, ...
    act_outlier_ratio: float  # largest / median per-channel max|x|
    act_kurtosis: float
    weight_kurtosis: float
    w_err_tensor: float  # relative output error tr(dW H dW^T) / tr(W H W^T), per-tensor weights
    w_err_channel: float  # same, per-channel weights
    a_err_tensor: float  # relative output error ||(Q(x) - x) W^T||^2 / ||x W^T||^2, per-tensor static
    a_err_token: float  # same, per-token dynamic


@dataclass
class Diagnosis:
    layers: list[LayerDiag]
    weight_bits: int
    act_bits: int

    def rows(self) -> list[dict]:
        return [asdict(d) for d in self.layers]

    @classmethod
    def from_csv(cls, path: str, weight_bits: int = 8, act_bits: int = 8) -> "Diagnosis":
        """Read back a CSV written by :meth:`to_csv`."""
        with open(path, newline="") as fh:
            layers = [LayerDiag(**{k: (v if k in ("name", "kind") else int(v) if k == "block" else float(v)) for k, v in r.items()})
                      for r in csv.DictReader(fh)]
        return cls(layers, weight_bits, act_bits)

    def by_kind(self) -> list[dict]:
        """Per layer kind (q_proj, down_proj, ...): medians over blocks of every metric, and maxima
        of the two error ratios."""
        out = []
        for kind in dict.fromkeys(d.kind for d in self.layers):
            ds = [d for d in self.layers if d.kind == kind]

            def med(f):
                return float(torch.tensor([f(d) for d in ds], dtype=torch.float64).median())

            out.append({"kind": kind, "n": len(ds),
                        "act_outlier_ratio": med(lambda d: d.act_outlier_ratio), "act_kurtosis": med(lambda d: d.act_kurtosis),
                        "weight_kurtosis": med(lambda d: d.weight_kurtosis),
                        "w_ratio": med(lambda d: _metric(d, "w_ratio")), "w_ratio_max": max(_metric(d, "w_ratio") for d in ds),
                        "a_err_tensor": med(lambda d: d.a_err_tensor), "a_err_token": med(lambda d: d.a_err_token),
                        "a_ratio": med(lambda d: _metric(d, "a_ratio")), "a_ratio_max": max(_metric(d, "a_ratio") for d in ds)})
        return out

    def worst(self, metric: str = "a_ratio", k: int = 5) -> list[LayerDiag]:
        """The ``k`` layers with the largest ``metric``: a field of :class:`LayerDiag`, or
        ``"a_ratio"`` (per-tensor / per-token activation error) or ``"w_ratio"`` (per-tensor /
        per-channel weight error)."""
        return sorted(self.layers, key=lambda d: -_metric(d, metric))[:k]

    def to_csv(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, list(asdict(self.layers[0]).keys()))
            w.writeheader()
            for r in self.rows():
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    def heatmap(self, metric: str, path: str, title: Optional[str] = None) -> bool:
        """Blocks x layer kinds heatmap of ``metric`` (log10 colour scale); see :mod:`gransearch.report`."""
        from .report import diagnosis_heatmap

        return diagnosis_heatmap(self, metric, path, title)


def _metric(d: LayerDiag, metric: str) -> float:
    if metric == "a_ratio":
        return d.a_err_tensor / max(d.a_err_token, 1e-30)
    if metric == "w_ratio":
        return d.w_err_tensor / max(d.w_err_channel, 1e-30)
    return float(getattr(d, metric))


def _kurtosis(w: torch.Tensor) -> float:
    x = w.double().flatten()
    c = x - x.mean()
    var = (c * c).mean()
    return float((c**4).mean() / (var * var))


@torch.no_grad()
def diagnose(
    model: nn.Module,
    calib,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    batch_size: int = 8,
    device=None,
    verbose: bool = True,
) -> Diagnosis:
    """Outlier diagnostics of every quantizable linear layer (see :class:`LayerDiag`).

    Runs the model block by block over ``calib`` (two passes per block: statistics, then the
    activation-quantization errors with the calibrated per-tensor scale). Weight errors are RTN at
    ``weight_bits`` (asymmetric), measured in output space with the layer's Hessian.
    """
    # long on purpose: two passes per block share one block's statistics and hooks
    check_float_model(model, "diagnosing outliers")
    info = arch_of(model)
    runner = BlockRunner(model, calib, batch_size, device, info)
    out: list[LayerDiag] = []
    a_tensor = ActSpec(act_bits, "tensor", dynamic=False)
    a_token = ActSpec(act_bits, "token", dynamic=True)
    for i in tqdm(range(len(runner.blocks)), desc="diagnose", disable=not verbose):
        block = runner.blocks[i]
        block.to(runner.device)
        try:
            refs = block_linears(model, i, info)
            stats = collect_block_stats(runner, i, moments=True)
            err = {r.name: torch.zeros(3, dtype=torch.float64) for r in refs}  # tensor, token, reference

            def make_hook(ref):
                W = linear_weight(ref.module)
                amax = stats[ref.name].abs_max.max()

                def hook(module, args):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    Wf = W.float()
                    y = x @ Wf.t()
                    for j, (spec, sc) in enumerate(((a_tensor, amax), (a_token, None))):
                        d = (fake_quant_activation(x, spec, sc) - x) @ Wf.t()
                        err[ref.name][j] += float((d * d).sum())
                    err[ref.name][2] += float((y * y).sum())

                return hook

            handles: list = []
            with hooks(handles):
                for ref in refs:
                    handles.append(ref.module.register_forward_pre_hook(make_hook(ref)))
                runner.run(i, advance=True)
            for ref in refs:
                st = stats[ref.name]
                W = linear_weight(ref.module).detach().float()
                H = st.hessian
                energy = max(layer_objective(W, torch.zeros_like(W), H), 1e-30)
                wt = rtn(W, QuantSpec(weight_bits, PerTensor())).dequantize()
                wc = rtn(W, QuantSpec(weight_bits, PerChannel())).dequantize()
                amax = st.abs_max
                e = err[ref.name]
                ref_e = max(float(e[2]), 1e-30)
                out.append(LayerDiag(
                    name=ref.name, block=i, kind=layer_kind(ref.name),
                    act_outlier_ratio=float(amax.max() / amax.median().clamp_min(1e-12)),
                    act_kurtosis=st.kurtosis, weight_kurtosis=_kurtosis(W),
                    w_err_tensor=layer_objective(W, wt, H) / energy, w_err_channel=layer_objective(W, wc, H) / energy,
                    a_err_tensor=float(e[0]) / ref_e, a_err_token=float(e[1]) / ref_e))
        finally:
            block.to(runner.home)
    return Diagnosis(out, weight_bits, act_bits)
