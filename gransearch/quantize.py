"""Whole-model quantization: sequential, block by block, as the GPTQ reference code does.

For each decoder block, in order:

1. (AWQ methods) capture the inputs of the block's scaling groups and of the modules AWQ inspects,
   on up to ``awq_tokens`` calibration tokens; search each group's scales, fold them; search and
   apply the output-space clipping of each scaled linear (not ``q``/``k``, whose error passes
   through the softmax, as in the reference code);
2. one pass collects every linear's Hessian from the block's inputs (linears that read the same
   tensor, such as q/k/v, share one);
3. every linear is quantized (RTN, GPTQ, AWQ = RTN after the fold and clip, AWQ+GPTQ = GPTQ after
   them) and replaced by a :class:`~gransearch.qlinear.QuantLinear`;
4. a second pass through the *quantized* block gives the next block's inputs.

Per-layer records hold the method, spec, layer objective ``tr((W - Q) H (W - Q)^T)`` (``W`` the
float weight after any fold, ``H`` the Hessian of its inputs), seconds and the GPTQ dampening.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ._heap import heap_frozen
from .algorithms.awq import apply_clip, awq_clip_ratios, awq_search
from .algorithms.layer import LayerResult, quantize_layer, quantize_shared_input
from .arch import ArchInfo, arch_of, block_linears, clips_after_awq, foldable, get_blocks, get_module, linear_weight, model_linears, set_module
from .calibrate import BlockRunner, LayerStats, calibrate, collect_block_stats, hooks
from .errors import check_device, check_float_model, check_int, check_positive
from .evaluate import layer_objective
from .fold import fold_scales
from .qlinear import QuantLinear
from .quantizer import ClipArg, QuantizedWeight
from .methods import METHODS, GPTQOptions, Method
from .plan import LayerPlan
from .spec import ActSpec, GGMLSpec, QuantSpec, parse_spec

log = logging.getLogger(__name__)

__all__ = ["METHODS", "LayerRecord", "QuantizeResult", "quantize", "to_quant_linear", "resolve_plan", "set_act_quant", "outlier_share"]


PlanLike = Union[QuantSpec, str, Mapping[str, object]]


@dataclass
class LayerRecord:
    name: str
    method: str
    spec: str
    shape: tuple[int, int]
    nbytes: int
    objective: Optional[float]
    seconds: float
    damp: Optional[float] = None
    awq_ratio: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizeResult:
    """``model``: the quantized model (``None`` when it was read from disk block by block: it was
    never whole in memory; load ``saved.folder`` with :func:`gransearch.load_quantized`);
    ``records``: one per quantized linear; ``saved``: what ``save=`` wrote."""

    model: Optional[nn.Module]
    records: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    saved: Optional[object] = None
    mode: str = "in memory"

    @property
    def nbytes(self) -> int:
        """Stored bytes of the quantized linears (codes, scales, zeros)."""
        return sum(r.nbytes for r in self.records)


def resolve_plan(model: nn.Module, plan: PlanLike, method: str) -> dict[str, LayerPlan]:
    """``{linear name: LayerPlan}`` from a spec (uniform, with ``method``), a mapping
    ``{name: spec | (method, spec) | LayerPlan}``, or a :class:`~gransearch.plan.QuantPlan`."""
    info = arch_of(model)
    names = [r.name for r in model_linears(model, info)]
    if isinstance(plan, str):
        plan = parse_spec(plan)
    if isinstance(plan, (QuantSpec, GGMLSpec)):
        lp = LayerPlan(method, plan)
        return {n: lp for n in names}
    if hasattr(plan, "layers"):  # QuantPlan
        plan.check(model)
        plan = plan.layers
    out = {}
    for name, entry in plan.items():
        if name not in names:
            raise ValueError(f"plan names layer {name!r}, which this model does not have (a plan made for another model?)")
        try:
            if isinstance(entry, LayerPlan):
                out[name] = entry
            elif isinstance(entry, (QuantSpec, GGMLSpec, str)):
                out[name] = LayerPlan(method, entry)
            else:
                out[name] = LayerPlan(*entry)
        except ValueError as exc:
            raise ValueError(f"layer {name}: {exc}") from None
    return out


def _gptq_options(lp: LayerPlan, given: dict) -> GPTQOptions:
    """A layer's GPTQ options: each one given to :func:`quantize`, else the plan's, else the default."""
    base = lp.gptq or GPTQOptions()
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def to_quant_linear(module: nn.Module, qw: QuantizedWeight, act_spec: Optional[ActSpec] = None) -> QuantLinear:
    """A :class:`QuantLinear` replacing a Linear or Conv1D, keeping its bias."""
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, qw, act_spec=act_spec)
    out_f, in_f = qw.shape
    lin = nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(linear_weight(module).detach(), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return QuantLinear.from_float(lin, qw, act_spec=act_spec)


@torch.no_grad()
def _awq_block(
    runner: BlockRunner, index: int, info: ArchInfo, plan, awq_tokens: int, n_grid: int, clip_tokens: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """AWQ scale search + fold + clip for the groups of one block whose linears use AWQ.

    Returns the chosen ratio per linear and the folded weights before clipping (the reference of
    the layer objective: clipping is part of the quantization error).
    """
    # long on purpose: the hooks, the captured block calls and the loss closure must share one scope
    block = runner.blocks[index]
    prefix = f"{info.blocks}.{index}."
    groups = []
    for g in info.groups:
        names = [prefix + l for l in g.linears]
        awq_set = {n for n in names if n in plan and plan[n].method.uses_awq}
        if not awq_set:
            continue  # a fold is function-preserving, so one AWQ linear in the group is enough
        if not foldable(block, g):
            continue  # e.g. v -> o under grouped-query attention: no valid fold
        groups.append((g, get_module(block, g.prev), [get_module(block, l) for l in g.linears], names, awq_set))
    if not groups:
        return {}, {}
    # batches used by the search: the first ones, up to awq_tokens tokens
    n_b, tok = 0, 0
    while n_b < len(runner.inputs) and tok < awq_tokens:
        tok += runner.batches[n_b].numel()  # [b, T] token ids: the states' leading shape
        n_b += 1
    ratios: dict[str, float] = {}
    unclipped: dict[str, torch.Tensor] = {}
    for g, prev, lins, names, awq_set in groups:
        inspect = get_module(block, g.inspect)
        xs: list[torch.Tensor] = []
        calls: list[tuple[tuple, dict]] = []
        outs: list[torch.Tensor] = []

        def grab_x(m, a):
            xs.append(a[0].detach())

        def grab_call(m, a, kw):
            calls.append((a, dict(kw)))

        def grab_out(m, a, kw, o):
            outs.append((o[0] if isinstance(o, tuple) else o).detach())

        handles: list = []
        with hooks(handles):
            handles.append(lins[0].register_forward_pre_hook(grab_x))
            handles.append(inspect.register_forward_pre_hook(grab_call, with_kwargs=True))
            handles.append(inspect.register_forward_hook(grab_out, with_kwargs=True))
            for j in range(n_b):
                runner.call_block(block, j)
        x_all = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        act_mean = x_all.abs().float().mean(0)
        weights = [linear_weight(l).detach().clone() for l in lins]
        spec = plan[sorted(awq_set, key=names.index)[0]].spec

        def loss_fn(cands):
            for l, c in zip(lins, cands):
                linear_weight(l).copy_(c.to(l.weight.dtype))
            err, n = 0.0, 0
            for (a, kw), ref in zip(calls, outs):
                o = inspect(*a, **kw)
                o = o[0] if isinstance(o, tuple) else o
                err += float(((o.float() - ref.float()) ** 2).sum())
                n += ref.numel()
            for l, w in zip(lins, weights):
                linear_weight(l).copy_(w)
            return err / n

        res = awq_search(act_mean, weights, spec, loss_fn, n_grid)
        fold_scales(prev, g.norm, lins, res.scales)
        ratios.update({n: res.ratio for n in awq_set})
        # clip search on the scaled inputs, strided token sample as the reference code
        x_scaled = x_all / res.scales.to(x_all.device)
        step = max(1, x_scaled.shape[0] // clip_tokens)
        x_s = x_scaled[::step][:clip_tokens]
        for l, n in zip(lins, names):
            if not clips_after_awq(n) or n not in awq_set:
                continue
            sp = plan[n].spec
            w = linear_weight(l)
            unclipped[n] = w.detach().float().clone()
            r = awq_clip_ratios(w, x_s, sp)
            w.copy_(apply_clip(w, sp, r))
    return ratios, unclipped


def _rtn_only(model, plan, clip, act_spec, result: QuantizeResult, source=None, writer=None, verbose: bool = True) -> None:
    """RTN needs no calibration: quantize every planned linear directly, block by block (a model
    read from disk is read, written and dropped one block at a time)."""
    info = arch_of(model)
    n_blocks = len(get_blocks(model, info))
    for i in tqdm(range(n_blocks), desc="quantize (from disk)" if source is not None else "quantize", disable=not verbose):
        if source is not None:
            source.load_block(i)
        for ref in [r for r in block_linears(model, i, info) if r.name in plan]:
            t0 = time.perf_counter()
            sp = plan[ref.name].spec
            qw = quantize_layer(linear_weight(ref.module).detach().float(), None, Method.RTN, sp, clip=clip, name=ref.name).qweight
            set_module(model, ref.name, to_quant_linear(ref.module, qw, act_spec))
            result.records.append(LayerRecord(ref.name, "rtn", str(sp), tuple(qw.shape), qw.nbytes, None, time.perf_counter() - t0))
        _block_done(i, source, writer)


def _block_done(i: int, source, writer) -> None:
    """A block read from disk, once quantized: written as its checkpoint shard, then dropped."""
    if writer is not None:
        writer.write_block(i, source.block_prefix(i))
    if source is not None:
        source.release_block(i)


@heap_frozen
@torch.no_grad()
def quantize(
    model,
    spec_or_plan: PlanLike,
    calib,
    method: str = "gptq",
    *,
    batch_size: int = 8,
    device=None,
    damp: Optional[float] = None,
    block_size: Optional[int] = None,
    act_order: Optional[bool] = None,
    static_groups: Optional[bool] = None,
    clip: ClipArg = None,
    awq_tokens: int = 8192,
    awq_grid: int = 20,
    awq_clip_tokens: int = 512,
    act_spec: Optional[ActSpec] = None,
    objective: Optional[bool] = None,
    save: Optional[str] = None,
    save_dtype=None,
    spill=None,
    verbose: bool = True,
) -> QuantizeResult:
    """Quantize ``model`` in place and return it with per-layer records.

    ``spec_or_plan``: a :class:`QuantSpec` (or its text form) applied to every block linear with
    ``method``, or a mapping ``{linear name: (method, spec)}`` / a ``QuantPlan`` (layers not named
    stay in floating point). ``calib``: token windows ``[n, seqlen]``. ``method``: ``"rtn"``,
    ``"gptq"``, ``"awq"``, ``"awq+gptq"`` or, for ggml types (``w4g32s``, ``Q4_K``...), ``"llamacpp"``. GPTQ options: ``damp``, ``block_size``, ``act_order``,
    ``static_groups``; each one left ``None`` takes the value a plan's layer carries (a plan made
    by :func:`gransearch.optimize` records the bank's options on every GPTQ layer), else
    :class:`~gransearch.methods.GPTQOptions`' default (0.01, 128, ``False``, ``False``); ``clip`` is the weight-space clip of RTN and GPTQ (``None``, a ratio or
    ``"search"``). AWQ: ``awq_tokens`` calibration tokens for the scale search, ``awq_grid`` grid
    points, ``awq_clip_tokens`` tokens for the clip search. ``act_spec`` adds activation
    fake-quantization to every quantized linear. Blocks run on ``device`` if given. ``llamacpp``
    layers are weighted by the float model's mean ``x_j^2`` per input column (llama.cpp's importance
    matrix, as ``llama-imatrix`` computes it), from one statistics-only pass before the first block.

    ``objective``: whether records carry the layer objective ``tr((W - Q) H (W - Q)^T)``. The
    default (``None``) computes it only where GPTQ needs the Hessians anyway; then RTN needs no
    calibration pass at all (a second for SmolLM2 instead of minutes) and AWQ runs only over its
    ``awq_tokens`` search tokens (records get ``objective=None``). ``True`` always computes it.

    Models larger than memory: ``model`` may be a model folder (``config.json`` + safetensors) or a
    :class:`~gransearch.offload.DiskModel`. Then each block is read from disk when it runs,
    quantized, written to ``save`` as one shard of a compressed-tensors checkpoint and dropped, so
    memory holds the embeddings, one block and its calibration inputs, never the whole model; the
    codes are those an in-memory run gets. ``save`` (a folder) is required then; for a model in memory
    it writes :func:`gransearch.save_quantized`'s checkpoint after quantizing. ``save_dtype``: of the
    checkpoint's float tensors (default: the model's published dtype). ``result.mode`` says which
    mode ran (``"in memory"`` or ``"from disk, block by block"``), and the log says it too.

    ``spill``: where the calibration batches' hidden states are kept between blocks. ``None``
    (default): in memory for a model in memory, in a temporary folder beside ``save`` for a model
    read from disk, so that memory does not grow with the number of calibration windows; a folder path puts them there; ``False`` keeps them in memory. The results are the same.
    """
    # long on purpose: the block loop keeps the GPTQ reference order (AWQ fold, statistics, per-layer step,
    # advance) visible in one place; the per-layer step itself is algorithms.layer.quantize_layer
    t_start = time.perf_counter()
    from .offload import DiskModel

    source = None
    if isinstance(model, (str, os.PathLike)):
        source = DiskModel(os.fspath(model))
    elif isinstance(model, DiskModel):
        source = model
    check_float_model(source or model, "quantizing")
    if source is not None and save is None:
        raise ValueError("a model read from disk block by block is never whole in memory, so its quantized blocks must be "
                         "written as they are made: pass save=DIR (CLI: --save DIR)")
    mode = "from disk, block by block" if source is not None else "in memory"
    log.info("quantize: %s%s", mode, f" ({source.folder}, {source.n_blocks} blocks)" if source is not None else "")
    if source is not None:
        model = source.model
    batch_size = check_int("batch_size", batch_size, 1)
    block_size = None if block_size is None else check_int("block_size", block_size, 1)
    awq_tokens = check_int("awq_tokens", awq_tokens, 1)
    awq_grid = check_int("awq_grid", awq_grid, 1)
    awq_clip_tokens = check_int("awq_clip_tokens", awq_clip_tokens, 1)
    damp = check_positive("damp", damp, allow_none=True)
    check_device(device)
    info = arch_of(model)
    given = dict(damp=damp, block_size=block_size, act_order=act_order, static_groups=static_groups)
    plan = resolve_plan(model, spec_or_plan, method)
    for name, lp in plan.items():
        ref_shape = tuple(linear_weight(get_module(model, name)).shape)
        try:
            lp.spec.check_shape(ref_shape)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if lp.method.uses_awq and info.generic:
            raise ValueError(f"AWQ needs the scaling groups of the architecture table; add a row for {model.config.model_type!r} in gransearch.arch")
    methods = {lp.method for lp in plan.values()}
    gptq_used = any(m.uses_gptq for m in methods)
    objective = gptq_used if objective is None else objective
    needs_hessian = objective or any(m.uses_hessian for m in methods)
    result = QuantizeResult(None if source is not None else model, mode=mode)
    writer = None
    if source is not None:
        from .export import ShardedWriter

        writer = ShardedWriter(save, model, source.n_blocks, dtype=save_dtype)
    spill_dir = None
    if spill is None and source is not None:
        from .offload import scratch_dir

        spill = spill_dir = scratch_dir(save, "states")
    try:
        if not needs_hessian and methods == {"rtn"}:
            _rtn_only(model, plan, clip, act_spec, result, source, writer, verbose)
        else:
            _sequential(model, source, writer, plan, calib, methods, given, needs_hessian, objective, result, info, batch_size=batch_size,
                        device=device, clip=clip, awq_tokens=awq_tokens, awq_grid=awq_grid, awq_clip_tokens=awq_clip_tokens,
                        act_spec=act_spec, spill=spill or None, verbose=verbose)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if spill_dir is not None:
            import shutil

            shutil.rmtree(spill_dir, ignore_errors=True)
    if writer is not None:
        result.saved = writer.finish(source.info.blocks, source.tokenizer_files(), read=source.read_tensor)
    elif save is not None:
        from .export import save_quantized

        result.saved = save_quantized(model, save, dtype=save_dtype)
    result.seconds = time.perf_counter() - t_start
    log.info("quantized %d layers in %.1f s (%s)", len(result.records), result.seconds, mode)
    return result


def _sequential(model, source, writer, plan, calib, methods, given, needs_hessian, objective, result, info, *, batch_size, device, clip,
                awq_tokens, awq_grid, awq_clip_tokens, act_spec, spill, verbose) -> None:
    """The block loop of :func:`quantize` for methods that calibrate (GPTQ, AWQ, llama.cpp)."""
    if not needs_hessian and isinstance(calib, torch.Tensor) and calib.dim() == 2:
        # AWQ alone reads only the first whole batches that hold awq_tokens tokens
        n_batches = max(1, -(-awq_tokens // (batch_size * calib.shape[1])))
        calib = calib[: n_batches * batch_size]
    importance = {}
    if Method.LLAMACPP in methods:
        # llama.cpp's importance matrix comes from the float model (as llama-imatrix and the bank
        # make it), not from the inputs of the model quantized so far: one statistics-only pass
        float_stats = calibrate(source or model, calib, batch_size=batch_size, device=device, hessian=False, spill=spill, verbose=verbose)
        importance = {n: float_stats[n].mean_sq for n, lp in plan.items() if lp.method is Method.LLAMACPP and n in float_stats}
        del float_stats
    runner = BlockRunner(source or model, calib, batch_size, device, info, spill=spill)
    try:
        _block_loop(runner, model, source, writer, plan, methods, given, needs_hessian, objective, result, info, importance, clip=clip,
                    awq_tokens=awq_tokens, awq_grid=awq_grid, awq_clip_tokens=awq_clip_tokens, act_spec=act_spec, verbose=verbose)
    finally:
        runner.close()


def _block_loop(runner, model, source, writer, plan, methods, given, needs_hessian, objective, result, info, importance, *, clip,
                awq_tokens, awq_grid, awq_clip_tokens, act_spec, verbose) -> None:
    n_blocks = len(runner.blocks)
    bar = tqdm(range(n_blocks), desc="quantize (from disk)" if source is not None else "quantize", disable=not verbose)
    for i in bar:
        runner.enter(i)
        try:
            refs = [r for r in block_linears(model, i, info) if r.name in plan]
            stats: dict = {}
            if refs:
                ratios, unclipped = {}, {}
                if any(plan[r.name].method.uses_awq for r in refs):
                    ratios, unclipped = _awq_block(runner, i, info, plan, awq_tokens, awq_grid, awq_clip_tokens)
                stats = collect_block_stats(runner, i, [r.name for r in refs], token_max=False) if needs_hessian else {}
                readers = {}  # how many layers still read each statistic (q/k/v share one): the last takes its memory
                for r in refs:
                    if r.name in stats:
                        readers[id(stats[r.name])] = readers.get(id(stats[r.name]), 0) + 1
                fused = _shared_input_solves(refs, plan, stats, given, clip, runner.device) if needs_hessian else {}
                for ref in refs:
                    t0 = time.perf_counter()
                    lp = plan[ref.name]
                    m, sp = lp.method, lp.spec
                    W = linear_weight(ref.module).detach().float()
                    H = None
                    if needs_hessian:
                        st = stats.get(ref.name)
                        if st is None:
                            raise ValueError(f"no calibration input reached {ref.name}: the calibration set is empty or the layer is unused")
                        readers[id(st)] -= 1
                        H = st.hessian if readers[id(st)] else st.take_hessian()
                    r, t_fused = fused.get(ref.name, (None, 0.0))
                    if r is None:
                        r = quantize_layer(W, H, m, sp, _gptq_options(lp, given), clip=clip, name=ref.name, imatrix=importance.get(ref.name))  # W is folded and clipped for AWQ methods
                    t0 -= t_fused
                    qw, used_damp = r.qweight, r.damp
                    obj = layer_objective(unclipped.get(ref.name, W), qw.dequantize(), H) if objective else None
                    set_module(model, ref.name, to_quant_linear(ref.module, qw, act_spec).to(runner.device))
                    result.records.append(LayerRecord(ref.name, str(m), str(sp), ref.shape, qw.nbytes, obj,
                                                      time.perf_counter() - t0, used_damp, ratios.get(ref.name)))
            del stats
            runner.run(i, advance=True)  # the quantized block's outputs: the next block's inputs
        finally:
            runner.leave(i, release=False)
        _block_done(i, source, writer)
        if verbose:
            bar.set_postfix(block=i, layers=len(result.records))


def _shared_input_solves(refs, plan, stats, given, clip, device) -> dict[str, tuple[LayerResult, float]]:
    """On a GPU, the GPTQ solves of layers that read one input (q/k/v; gate/up) with one setting,
    done as one stacked solve (:func:`quantize_shared_input`): name -> (result, its share of the
    seconds). Empty on the CPU, where separate solves keep the codes pinned by the tests."""
    if torch.device(device).type != "cuda":
        return {}
    sets: dict = {}
    for ref in refs:
        lp, st = plan[ref.name], stats.get(ref.name)
        if st is None or not lp.method.uses_gptq or not isinstance(lp.spec, QuantSpec) or lp.spec.granularity.spans_rows:
            continue
        if clip is not None and lp.method is Method.GPTQ:
            continue
        sets.setdefault((id(st), str(lp.method), str(lp.spec), _gptq_options(lp, given)), []).append(ref)
    out = {}
    for (_, method, _, options), group in sets.items():
        if len(group) < 2:
            continue
        t0 = time.perf_counter()
        names = [r.name for r in group]
        Ws = [linear_weight(r.module).detach().float() for r in group]
        results = quantize_shared_input(Ws, stats[names[0]].hessian, method, plan[names[0]].spec, options, names)
        share = (time.perf_counter() - t0) / len(group)
        out.update({n: (r, share) for n, r in zip(names, results)})
    return out


def set_act_quant(
    model: nn.Module,
    act_spec: Optional[ActSpec],
    stats: Optional[Mapping[str, LayerStats]] = None,
    only: Optional[Callable[[str], bool]] = None,
) -> int:
    """Set activation fake-quantization on every :class:`QuantLinear` of ``model``.

    Static specs take their scales from ``stats`` (:func:`gransearch.calibrate` of this model):
    the largest ``max|x|`` for ``tensor``, the per-channel ``max|x|`` for ``channel``. ``None``
    disables activation quantization. ``only``: a predicate on the layer name; layers it rejects are
    left as they are. Returns the number of layers set.
    """
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) or (only is not None and not only(name)):
            continue
        scale = None
        if act_spec is not None and not act_spec.dynamic:
            if stats is None or name not in stats:
                raise ValueError(f"static activation quantization needs calibration statistics for {name}: pass stats=gs.calibrate(model, calib)")
            amax = stats[name].abs_max
            scale = amax.max() if act_spec.granularity == "tensor" else amax
        m.set_act_quant(act_spec, scale)
        n += 1
    return n


def outlier_share(model: nn.Module) -> float:
    """Share of input columns kept in floating point by the LLM.int8()-style decomposition so far."""
    kept = sum(m.outlier_columns for m in model.modules() if isinstance(m, QuantLinear))
    seen = sum(m.seen_columns for m in model.modules() if isinstance(m, QuantLinear))
    return kept / seen if seen else 0.0
