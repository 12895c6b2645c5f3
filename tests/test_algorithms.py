"""GPTQ and AWQ as pure functions: exactness, optimality properties, recovery."""

import warnings

import pytest
import torch

import gransearch as gs
from gransearch.algorithms.awq import apply_clip, awq_clip_ratios, awq_search
from gransearch.algorithms.gptq import CholeskyError
from gransearch.quantizer import qparams, quantize_codes

SPECS = [gs.QuantSpec.parse(s) for s in ("w4c", "w4g16", "w3g32", "w2t", "w4g16s", "w8c")]


def correlated_inputs(n=2048, d=64, outliers=(3, 17, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    x = z @ mix
    x[:, list(outliers)] *= 25.0
    return x


def hessian_of(x):
    return 2.0 / x.shape[0] * x.t() @ x


def objective(w, q, h):
    d = w - q
    return float(torch.einsum("oi,ij,oj->", d, h, d))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_identity_hessian_equals_rtn(spec, act_order):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    r = gs.gptq(w, torch.eye(64), spec, act_order=act_order, block_size=32)
    q = gs.rtn(w, spec)
    assert torch.equal(r.qweight.codes, q.codes)
    assert torch.equal(r.qweight.scale, q.scale)
    assert (q.zero is None and r.qweight.zero is None) or torch.equal(r.qweight.zero, q.zero)


@pytest.mark.parametrize("spec", [gs.QuantSpec.parse(s) for s in ("w4c", "w3c", "w4g16", "w3g16", "w4t")], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_outlier_inputs(spec, act_order):
    x = correlated_inputs()
    h = hessian_of(x)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    r = gs.gptq(w, h, spec, act_order=act_order)
    e_gptq = objective(w, r.qweight.dequantize(), h)
    e_rtn = objective(w, gs.rtn(w, spec).dequantize(), h)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert abs(gs.layer_objective(w, r.qweight.dequantize(), h) - e_gptq) <= 1e-4 * e_gptq


def slow_gptq(w, h, spec, damp=0.01):
    """The GPTQ equations column by column, in float64, without lazy batches or act-order."""
    w = w.double().clone()
    h = h.double().clone()
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g = spec.granularity.size if isinstance(spec.granularity, gs.PerGroup) else n
    codes = torch.zeros_like(w)
    s = z = None
    if not isinstance(spec.granularity, gs.PerGroup):
        s, z = qparams(w.float(), spec.bits, spec.symmetric)
        s, z = s.double(), z.double()
    for j in range(n):
        if isinstance(spec.granularity, gs.PerGroup) and j % g == 0:
            s, z = qparams(w[:, j : j + g].float(), spec.bits, spec.symmetric)
            s, z = s.double(), z.double()
        c = quantize_codes(w[:, j : j + 1], s, z, spec.maxq).double()
        q = (c - z) * s
        codes[:, j] = c[:, 0]
        err = (w[:, j : j + 1] - q) / hinv[j, j]
        w[:, j:] -= err * hinv[j : j + 1, j:]
    return codes.to(torch.uint8)


@pytest.mark.parametrize("spec", [gs.QuantSpec.parse(s) for s in ("w4c", "w3g16", "w4g32s")], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_matches_plain_column_by_column(spec, seed):
    x = correlated_inputs(d=96, outliers=(5, 50), seed=seed)
    x[:, 7] = 0.0  # a dead input
    h = hessian_of(x)
    w = torch.randn(20, 96, generator=torch.Generator().manual_seed(seed)) * 0.05
    res = gs.gptq(w, h, spec, block_size=32)
    fast = res.qweight.codes
    slow = slow_gptq(w, h, spec)
    assert torch.equal(fast, slow)
    assert res.n_dead == 1
    assert torch.equal(res.qweight.dequantize()[:, 7], torch.zeros(20))  # dead input: weight 0


def _lazy_batch_as_written_before(W1, Hinv1, S1, Z1, C1, maxq, group):
    """The column loop as it was before its zeros were split once per batch (commit db5f4ff)."""
    per_row = isinstance(maxq, torch.Tensor)
    Err1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        if group is not None and i % group.g == 0:  # each bit width's rows on their own, as gptq() takes them
            blk, sp = W1[:, i : i + group.g], group.spec
            for m in maxq.unique().tolist() if per_row else [sp.maxq]:
                rows = maxq == m if per_row else slice(None)
                sc, zc = qparams(blk[rows], int(m).bit_length(), sp.symmetric, 1.0, sp.float_zero)
                S1[rows, i : i + group.g], Z1[rows, i : i + group.g] = sc, zc
        s, z, w, d = S1[:, i], Z1[:, i], W1[:, i], Hinv1[i, i]
        c = torch.minimum(quantize_codes(w, s, z, float("inf")), maxq) if per_row else quantize_codes(w, s, z, maxq)
        q = (c - z) * s
        C1[:, i] = c
        err = (w - q) / d
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Err1


@pytest.mark.parametrize("case", ["columns", "ties", "per-row maxq", "groups", "groups float zero", "groups per-row maxq",
                                  "groups symmetric per-row maxq", "groups float zero per-row maxq"])
def test_lazy_batch_is_quantize_codes_column_by_column(case):
    """The column loop's own arithmetic (zeros split once per batch or group, outputs written in
    place) gives the same codes, errors and updated weights, bit for bit, as the loop written with
    quantize_codes per column: GPTQ's codes on the CPU are pinned."""
    from gransearch.algorithms.gptq import _Groups, _lazy_batch

    g = torch.Generator().manual_seed(len(case))
    rows, width = 40, 48
    W = torch.randn(rows, width, generator=g) * 0.05
    Hinv = torch.linalg.cholesky(hessian_of(correlated_inputs(d=width, outliers=(2, 30))) + torch.eye(width), upper=True)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(Hinv), upper=True)
    S = torch.rand(rows, width, generator=g) * 0.01 + 1e-3
    Z = torch.rand(rows, width, generator=g) * 15  # fractions: a float zero's rounding is exercised too
    maxq, group = 15, None
    if case == "ties":  # every w / s is k + 0.5 and the zeros are odd: rounding before or after adding them differs
        Hinv, S = torch.eye(width), torch.full((rows, width), 2.0**-7)
        W, Z = (torch.randint(-6, 6, (rows, width), generator=g) + 0.5) * S, torch.full((rows, width), 7.0)
    if case.endswith("per-row maxq"):  # gptq_many's stacks: rows of 3, 4 and 8 bits
        maxq = torch.tensor([7.0, 15.0, 255.0, 15.0] * (rows // 4))
    if case.startswith("groups"):
        group = _Groups(16, gs.QuantSpec.parse("w4g16" + ("f" if "float" in case else "s" if "symmetric" in case else "")), None)
    got, want = [[t.clone() for t in (W, S, Z, torch.zeros(rows, width))] for _ in range(2)]
    e_got = _lazy_batch(got[0], Hinv, got[1], got[2], got[3], maxq, group, True)
    e_want = _lazy_batch_as_written_before(want[0], Hinv, want[1], want[2], want[3], maxq, group)
    assert torch.equal(e_got, e_want)
    for a, b in zip(got, want):  # updated weights, scales, zeros, codes
        assert torch.equal(a, b)
    assert got[3].max() > 0 and not torch.equal(got[0], W)  # the loop did work


def test_qparams_per_row_widths_are_each_widths_own_and_checked():
    """``row_maxq`` gives every row the parameters of its own bit width (what a call per width
    gives), and a tensor of the wrong shape is refused with what it must be."""
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(5))
    x[3] = 0.0  # an all-zero row
    bits = [3, 4, 8] * 4
    row_maxq = torch.tensor([(1 << b) - 1 for b in bits], dtype=torch.float32).unsqueeze(1)
    for symmetric, float_zero in [(False, False), (True, False), (False, True)]:
        sc, zc = qparams(x, 4, symmetric, 0.9, float_zero, row_maxq=row_maxq)
        for r, b in enumerate(bits):
            s1, z1 = qparams(x[r : r + 1], b, symmetric, 0.9, float_zero)
            assert torch.equal(sc[r : r + 1], s1) and torch.equal(zc[r : r + 1], z1), (symmetric, float_zero, b)
    with pytest.raises(ValueError, match=r"row_maxq must hold each row's largest code as a \[12, 1\] tensor"):
        qparams(x, 4, False, row_maxq=row_maxq.flatten())


def test_gptq_multiply_adds_save_two_operations_a_column_and_keep_the_codes(monkeypatch):
    """The GPU's form of the column loop (``FUSED_MULTIPLY_ADDS``, forced here on the CPU) takes two
    operations fewer per column and rounds each product into its sum: the same codes but where a
    value falls within a rounding of a tie, the same loss within float32's rounding. The CPU's
    default stays the separate operations (pinned above)."""
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    gptq_mod = importlib.import_module("gransearch.algorithms.gptq")  # the module (the package exports the function)

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not func.is_view
            return func(*args, **(kwargs or {}))

    x = correlated_inputs(d=128, outliers=(3, 70))
    H = hessian_of(x)
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    out = {}
    for fused in (False, True):
        monkeypatch.setattr(gptq_mod, "FUSED_MULTIPLY_ADDS", fused)
        with Ops() as ops:
            r = gs.gptq(W.clone(), H, gs.QuantSpec.parse("w4g32"), act_order=True)
        out[fused] = (ops.n, r)
    monkeypatch.setattr(gptq_mod, "FUSED_MULTIPLY_ADDS", None)  # the default: on CUDA only
    assert not gptq_mod._fused("cpu") and gptq_mod._fused("cuda")
    (n_plain, plain), (n_fused, fused) = out[False], out[True]
    assert n_plain - n_fused == 2 * W.shape[1]
    same = (plain.qweight.codes == fused.qweight.codes).float().mean()
    assert same >= 0.999
    assert fused.loss == pytest.approx(plain.loss, rel=1e-3)


def test_gptq_dead_columns_and_shape_errors():
    h = hessian_of(correlated_inputs())
    h[5, :] = 0
    h[:, 5] = 0
    w = torch.randn(8, 64)
    r = gs.gptq(w, h, gs.QuantSpec.parse("w4c"))
    assert r.n_dead == 1
    deq = r.qweight.dequantize()
    assert torch.allclose(deq[:, 5], torch.zeros(8), atol=float(r.qweight.scale.float().max()) / 2 + 1e-6)
    with pytest.raises(ValueError, match="does not match"):
        gs.gptq(w, torch.eye(32), gs.QuantSpec.parse("w4c"))
    with pytest.raises(ValueError, match="NaN"):
        bad = h.clone()
        bad[0, 0] = float("nan")
        gs.gptq(w, bad, gs.QuantSpec.parse("w4c"))


def test_gptq_recovers_from_indefinite_hessian_with_warning():
    x = correlated_inputs(n=16)  # rank 16 < 64: singular
    h = hessian_of(x) - 0.5 * torch.eye(64) * hessian_of(x).diag().mean() * 0.05
    w = torch.randn(8, 64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = gs.gptq(w, h, gs.QuantSpec.parse("w4c"), damp=0.001)
    assert r.damp_raised and r.damp > 0.001
    assert any("Cholesky failed" in str(m.message) for m in rec)
    with pytest.raises(CholeskyError, match="not positive definite"):
        gs.gptq(w, -torch.eye(64) * 100 + torch.ones(64, 64) * 0.0, gs.QuantSpec.parse("w4c"), max_damp_tries=2)


def test_static_groups_differ_from_dynamic_and_both_beat_rtn():
    x = correlated_inputs()
    h = hessian_of(x)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    spec = gs.QuantSpec.parse("w3g16")
    dyn = gs.gptq(w, h, spec)
    sta = gs.gptq(w, h, spec, static_groups=True)
    # static groups take parameters from the original weights: exactly RTN's scales
    assert torch.equal(sta.qweight.scale, gs.rtn(w, spec).scale)
    assert not torch.equal(dyn.qweight.scale, sta.qweight.scale)
    e_rtn = objective(w, gs.rtn(w, spec).dequantize(), h)
    for r in (dyn, sta):
        assert objective(w, r.qweight.dequantize(), h) < e_rtn


# ------------------------------------------------------------------ AWQ


def test_awq_grid_includes_rtn_and_never_loses():
    x = correlated_inputs(n=512)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4)) * 0.1
    ref = x @ w.t()
    for spec in (gs.QuantSpec.parse("w4c"), gs.QuantSpec.parse("w3g16"), gs.QuantSpec.parse("w4t")):

        def loss_fn(cands):
            return float(((x @ cands[0].t() - ref) ** 2).mean())

        res = awq_search(x.abs().mean(0), [w], spec, loss_fn)
        rtn_loss = loss_fn([gs.rtn(w, spec).dequantize()])
        assert res.losses[0] == pytest.approx(rtn_loss, rel=1e-6)  # ratio 0 is RTN
        assert min(res.losses) <= res.losses[0]
        assert loss_fn([gs.rtn(w * res.scales, spec).dequantize() / res.scales]) == pytest.approx(min(res.losses), rel=1e-6)
        if spec.bits == 3:  # outlier channels: activation-aware scales help
            assert min(res.losses) < 0.9 * res.losses[0]


def test_awq_clip_never_worse_on_its_tokens():
    x = correlated_inputs(n=256)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5)) * 0.1
    w[0, 0] = 2.0
    for spec in (gs.QuantSpec.parse("w3c"), gs.QuantSpec.parse("w3g16"), gs.QuantSpec.parse("w4t")):
        r = awq_clip_ratios(w, x, spec)
        clipped = gs.rtn(apply_clip(w, spec, r), spec).dequantize()
        plain = gs.rtn(w, spec).dequantize()
        e = lambda q: float(((x @ (q - w).t()) ** 2).mean())  # noqa: E731
        assert e(clipped) <= e(plain) * (1 + 1e-6)
        assert float(r.min()) >= 0.5 and float(r.max()) <= 1.0


def test_hessian_forms_of_awq_match_token_forms():
    from gransearch.algorithms.awq import awq_search_hessian, clip_ratios_hessian

    x = correlated_inputs(n=512)
    h = hessian_of(x)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(6)) * 0.1
    spec = gs.QuantSpec.parse("w3g16")
    res_h = awq_search_hessian(x.abs().mean(0), [w], h, spec)
    res_x = awq_search(x.abs().mean(0), [w], spec, lambda c: float(((x @ (c[0] - w).t()) ** 2).sum()))
    # the same loss up to the factor 2/n: the same choice and proportional curves
    assert res_h.ratio == res_x.ratio
    assert torch.allclose(torch.tensor(res_h.losses), torch.tensor(res_x.losses) * 2 / x.shape[0], rtol=1e-3)
    for sp in (spec, gs.QuantSpec.parse("w3c"), gs.QuantSpec.parse("w3t")):
        assert torch.equal(clip_ratios_hessian(w, h, sp), awq_clip_ratios(w, x, sp))


def test_low_rank_hessian_factor_is_exact_at_full_rank_and_close_at_low_rank():
    from gransearch.algorithms.awq import awq_search_hessian, hessian_factor

    x = correlated_inputs(n=512)
    h = hessian_of(x)
    f = hessian_factor(h, 64)
    assert torch.allclose(f @ f.t(), h, rtol=1e-3, atol=1e-3 * float(h.abs().max()))
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(7)) * 0.1
    spec = gs.QuantSpec.parse("w3g16")
    exact = awq_search_hessian(x.abs().mean(0), [w], h, spec)
    approx = awq_search_hessian(x.abs().mean(0), [w], h, spec, rank=8)  # the 3 outlier channels dominate H
    assert abs(approx.ratio - exact.ratio) <= 0.1


@pytest.mark.parametrize("spec", ["w3g16", "w4c", "w4g16s", "w2g32", "w4g32f", "w3t"])
@pytest.mark.parametrize("rank", [None, 8])
def test_awq_grid_stacked_is_the_loop(monkeypatch, spec, rank):
    """The GPU's stacked grid (run here on the CPU) against the loop: the same choice and scales,
    curves equal up to the order of float32 sums, a group of several weights, and steps of a few
    grid points (a small batch budget) giving the curve of one step."""
    from gransearch.algorithms import awq
    from gransearch.algorithms.awq import awq_search_hessian

    x = correlated_inputs(n=512)
    h = hessian_of(x)
    g = torch.Generator().manual_seed(8)
    ws = [torch.randn(24, 64, generator=g) * 0.1, torch.randn(40, 64, generator=g) * 0.1]
    sp = gs.QuantSpec.parse(spec)
    loop = awq_search_hessian(x.abs().mean(0), ws, h, sp, rank=rank, batch=False)
    stacked = awq_search_hessian(x.abs().mean(0), ws, h, sp, rank=rank, batch=True)
    monkeypatch.setattr(awq, "GRID_BATCH_BYTES", 3 * 16 * 64 * 64)  # three grid points a step (the group's 64 rows stacked)
    stepped = awq_search_hessian(x.abs().mean(0), ws, h, sp, rank=rank, batch=True)
    assert loop.ratio == stacked.ratio == stepped.ratio and torch.equal(loop.scales, stacked.scales)
    assert torch.allclose(torch.tensor(stacked.losses), torch.tensor(loop.losses), rtol=1e-5)
    assert stepped.losses == stacked.losses
    assert len(set(loop.losses)) > 1  # a grid that chooses something


@pytest.mark.parametrize("batch", [False, True])
def test_awq_search_of_several_specs_is_each_specs_search(batch):
    """The bank's search of every spec of a group (stacked: all grids queued, the losses read once)
    gives each spec's own search, a per-tensor spec (always the loop) among them."""
    from gransearch.algorithms.awq import awq_grid_scales, awq_search_hessian, awq_search_hessian_specs

    x = correlated_inputs(n=512)
    h = hessian_of(x)
    g = torch.Generator().manual_seed(8)
    ws = [torch.randn(24, 64, generator=g) * 0.1, torch.randn(40, 64, generator=g) * 0.1]
    specs = [gs.QuantSpec.parse(s) for s in ("w3g16", "w4c", "w3t", "w4g32f")]
    grid = awq_grid_scales(x.abs().mean(0), 20)
    many = awq_search_hessian_specs(x.abs().mean(0), ws, h, specs, rank=8, batch=batch, grid=grid)
    for sp, res in zip(specs, many):
        one = awq_search_hessian(x.abs().mean(0), ws, h, sp, rank=8, batch=batch, grid=grid)
        assert res.ratio == one.ratio and torch.equal(res.scales, one.scales) and res.losses == one.losses, sp


def test_awq_grid_scales_are_awq_scales_point_by_point():
    """The grid's scales, computed for all points at once, are each point's awq_scales bit for bit
    (the CPU's pinned codes rest on them), ratio 0 (all ones) and 1/2 included."""
    from gransearch.algorithms.awq import awq_grid_scales, awq_scales

    act = correlated_inputs(n=256).abs().mean(0)
    act[3] = 0.0  # floored at 1e-4
    for n_grid in (1, 2, 20):
        grid = awq_grid_scales(act, n_grid)
        assert len(grid) == n_grid
        for k, s in enumerate(grid):
            assert torch.equal(s, awq_scales(act, k / n_grid)), (n_grid, k)


@pytest.mark.parametrize("spec", ["w3g16", "w4c", "w4g16s", "w2g32", "w4g32f", "w3t"])
def test_clip_ratios_stacked_are_the_loop(monkeypatch, spec):
    """The GPU's stacked clip search (run here on the CPU) chooses the loop's ratio for every block,
    with all ratios in one step and with a few per step."""
    from gransearch.algorithms import awq
    from gransearch.algorithms.awq import clip_ratios_hessian

    x = correlated_inputs(n=512)
    h = hessian_of(x)
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(9)) * 0.1
    sp = gs.QuantSpec.parse(spec)
    loop = clip_ratios_hessian(w, h, sp, rank=8 if spec == "w4c" else None, batch=False)
    stacked = clip_ratios_hessian(w, h, sp, rank=8 if spec == "w4c" else None, batch=True)
    monkeypatch.setattr(awq, "GRID_BATCH_BYTES", 3 * 16 * 40 * 64)  # three ratios a step
    stepped = clip_ratios_hessian(w, h, sp, rank=8 if spec == "w4c" else None, batch=True)
    assert torch.equal(loop, stacked) and torch.equal(loop, stepped)
    assert spec == "w3t" or len(set(loop.flatten().tolist())) > 1  # ratios that differ between blocks


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_many_equals_gptq_spec_by_spec(act_order, monkeypatch):
    """The stacked solves of several specs are GPTQ row by row: the same codes, scales, zeros and
    loss as one gptq() call per spec (dead input columns included). Without act_order the specs
    whose groups are taken in the loop stack by group width, symmetry and offset kind, their bits
    per row: 12 specs in 5 column loops (the up-front ones, g32, g32 float offset, g64 symmetric, and
    g64 asymmetric alone: a stack of one)."""
    import importlib

    G = importlib.import_module("gransearch.algorithms.gptq")
    torch.manual_seed(3)
    W = torch.randn(24, 128)
    X = torch.randn(512, 128) * torch.linspace(0.2, 3.0, 128)
    X[:, 5] = 0.0  # a dead input
    H = 2 * X.T @ X / X.shape[0]
    names = ("w3g32", "w4c", "w2t", "w4g64s", "w8c", "w4g32", "w8g32", "w3g64s", "w2g32f", "w4g32f", "w4g64", "w8g64s")
    specs = [gs.QuantSpec.parse(s) for s in names]
    loops = []
    solve = G._solve_columns
    monkeypatch.setattr(G, "_solve_columns", lambda W, *a: loops.append(W.shape[0]) or solve(W, *a))
    many = G.gptq_many(W, H, specs, act_order=act_order)
    assert sorted(loops) == ([24, 24 * 2, 24 * 3, 24 * 3, 24 * 3] if not act_order else [24 * 12])
    for spec, m in zip(specs, many):
        one = gs.gptq(W, H, spec, act_order=act_order)
        assert torch.equal(m.qweight.codes, one.qweight.codes), spec
        assert torch.equal(m.qweight.scale, one.qweight.scale), spec
        assert (m.qweight.zero is None and one.qweight.zero is None) or torch.equal(m.qweight.zero, one.qweight.zero), spec
        assert m.loss == pytest.approx(one.loss, rel=1e-6) and m.n_dead == 1


def test_hessian_and_factor_in_place_are_the_out_of_place_numbers():
    """Memory savings that must change no number: the Hessian made in place from the accumulator
    (the last layer to read it), and the inverse-Hessian factor computed in one matrix's storage."""
    from gransearch.algorithms.gptq import _inverse_cholesky
    from gransearch.calibrate import LayerStats

    torch.manual_seed(4)
    st = LayerStats(1000)
    for _ in range(3):
        st.update(torch.randn(257, 1000) * torch.linspace(0.1, 4.0, 1000))
    H = st.hessian
    assert torch.equal(st.take_hessian(), H) and st.acc is None
    U, rel, raised = _inverse_cholesky(H, 0.01, 6, None)
    Hd = H.clone()
    Hd[torch.arange(1000), torch.arange(1000)] += 0.01 * float(torch.mean(torch.diag(H)))
    L, _ = torch.linalg.cholesky_ex(Hd)
    want, _ = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    assert torch.equal(U, want) and rel == 0.01 and not raised


def test_shared_input_solve_is_the_separate_solves_row_by_row():
    """q/k/v (or gate/up) stacked into one GPTQ solve give each weight its own solve's codes."""
    from gransearch.algorithms.layer import quantize_layer, quantize_shared_input

    g = torch.Generator().manual_seed(11)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    parts = [torch.randn(n, 64, generator=g) for n in (32, 16, 16)]
    for spec in ("w4g16", "w3c", "w4g32s"):
        sp = gs.QuantSpec.parse(spec)
        for Wi, r in zip(parts, quantize_shared_input(parts, H, "gptq", sp, names=("q", "k", "v"))):
            one = quantize_layer(Wi, H, "gptq", sp).qweight
            assert r.qweight.shape == one.shape
            assert torch.equal(one.codes, r.qweight.codes) and torch.equal(one.scale, r.qweight.scale)
            assert (one.zero is None) == (r.qweight.zero is None) and (one.zero is None or torch.equal(one.zero, r.qweight.zero))
    with pytest.raises(ValueError, match="per-row"):
        quantize_shared_input(parts, H, "gptq", gs.QuantSpec.parse("w4t"))
    with pytest.raises(ValueError, match="only GPTQ"):
        quantize_shared_input(parts, H, "rtn", gs.QuantSpec.parse("w4c"))


@pytest.mark.parametrize("spec,act_order", [("w4g16", False), ("w3c", False), ("w4g16f", False), ("w4g16s", True)])
def test_graphed_batch_plumbing_gives_the_eager_codes(monkeypatch, spec, act_order):
    """The CUDA-graph path's buffers (inputs copied in, codes and group parameters copied out, the
    error tensor reused across batches) checked on the CPU: a stand-in graph replays the eager body
    into the captured error tensor. The capture itself is tested on a GPU (tests/test_gpu.py)."""
    from types import SimpleNamespace

    import importlib

    G = importlib.import_module("gransearch.algorithms.gptq")  # the module (the package exports the function)

    def fake_record(self):  # a "graph" whose replay runs the eager body into the recorded error tensor
        err = self._body()
        return SimpleNamespace(replay=lambda: err.copy_(self._body())), err

    g = torch.Generator().manual_seed(5)
    X = torch.randn(600, 80, generator=g) @ torch.randn(80, 80, generator=g)
    H, W = 2 * X.T @ X / 600, torch.randn(24, 80, generator=g)
    sp = gs.QuantSpec.parse(spec)
    eager = gs.gptq(W, H, sp, act_order=act_order, block_size=32)
    monkeypatch.setattr(G, "_use_graphs", lambda W, group: True)
    monkeypatch.setattr(G._GraphedBatch, "_warm_up", lambda self: self._body())
    monkeypatch.setattr(G._GraphedBatch, "_record", fake_record)
    monkeypatch.setattr(G._GraphedBatch, "cache", __import__("collections").OrderedDict())
    graphed = gs.gptq(W, H, sp, act_order=act_order, block_size=32)
    assert len(G._GraphedBatch.cache) == 2  # full batches of 32 and the last one of 16
    a, b = eager.qweight, graphed.qweight
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero))
    assert graphed.loss == pytest.approx(eager.loss, rel=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_graphed_batch_body_never_reads_the_device(fused, monkeypatch):
    """What a CUDA graph captures must not wait for the device: a scalar read (``.item()``, ``bool``)
    or a shape that depends on values makes the capture fail, and GPTQ then runs eagerly for the
    rest of the process (the launch-bound loop of issue 15). Checked on the CPU by running the body
    on the ``meta`` device, which has no values to read: every form :func:`_use_graphs` sends to a
    graph runs there; the float16-range check and the clip search, which do read, are refused, so
    the check is able to fail."""
    import importlib

    G = importlib.import_module("gransearch.algorithms.gptq")  # the module (the package exports the function)
    monkeypatch.setattr(G, "FUSED_MULTIPLY_ADDS", fused)
    rows, width = 8, 32
    forms = [(False, 15, None), (True, None, None)]  # per-channel and per-tensor parameters: int or per-row maxq
    for spec, clip in [("w4g16", None), ("w4g16f", None), ("w3g16s", 0.9), ("w8g16", 1.0)]:
        sp = gs.QuantSpec.parse(spec)
        forms.append((False, 2**sp.bits - 1, G._Groups(16, sp, clip)))
        forms.append((True, None, G._Groups(16, sp, clip)))  # gptq_many's stack of specs that differ in bits
    for per_row, maxq, group in forms:
        assert group is None or group.capturable
        err = G._GraphedBatch(rows, width, per_row, maxq, group, "meta")._body()
        assert err.shape == (rows, width) and err.is_meta
    searched = G._Groups(16, gs.QuantSpec.parse("w4g16"), "search")
    assert not searched.capturable
    with pytest.raises(RuntimeError, match="meta"):
        G._GraphedBatch(rows, width, False, 15, searched, "meta")._body()
    checked = [torch.zeros(rows, width, device="meta") for _ in range(4)]
    with pytest.raises(RuntimeError, match="meta"):  # check=True: the eager loop's float16-range check reads
        G._lazy_batch(checked[0], torch.eye(width, device="meta"), *checked[1:], 15, G._Groups(16, gs.QuantSpec.parse("w4g16"), None), True)
