"""Core properties: quantizer, RTN, packing, QuantLinear, byte accounting, bad input."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import gransearch as gs
from gransearch.quantizer import block_view, fake_quant, qparams, quantize_codes, rtn_values

BITS = range(2, 9)
GRANS = [gs.PerTensor(), gs.PerChannel(), gs.PerGroup(16), gs.PerGroup(48)]
SPECS = [gs.QuantSpec(b, g, s) for b, g, s in itertools.product(BITS, GRANS, (False, True))]
SPECS += [gs.QuantSpec(b, g, float_zero=True) for b, g in itertools.product(BITS, GRANS)]  # float offsets (Q4_1's kind)


def _weight(out=24, inn=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[3, 5] = 9.0  # an outlier, so per-tensor and per-channel scales differ
    return w


def _expand(param, spec, shape):
    """Per-block parameter [out, n_groups] -> per-element [out, in]."""
    out_f, in_f = shape
    p = param.float()
    if isinstance(spec.granularity, gs.PerGroup):
        return p.repeat_interleave(spec.granularity.size, dim=1)
    return p.expand(out_f, in_f)


# ---------------------------------------------------------------- spec


def test_spec_text_round_trip_and_hash():
    for spec in SPECS:
        assert gs.QuantSpec.parse(str(spec)) == spec
        assert hash(gs.QuantSpec.parse(str(spec))) == hash(spec)
    assert str(gs.QuantSpec.parse("w4g64")) == "w4g64"
    assert gs.QuantSpec.parse("w8c") == gs.QuantSpec(8, gs.PerChannel())
    assert gs.QuantSpec.parse("w8t") == gs.QuantSpec(8, gs.PerTensor())
    assert gs.QuantSpec.parse("W4G32S") == gs.QuantSpec(4, gs.PerGroup(32), symmetric=True)
    assert len({gs.QuantSpec.parse("w4c"), gs.QuantSpec(4, gs.PerChannel())}) == 1


def test_float_offset_spec_text_bytes_and_fit():
    """``w4g32f``: a float16 scale and minimum per block (llama.cpp's Q4_1). It is not symmetric, its
    offset costs 2 bytes a block, and a block in [1, 2] has half the step of an integer zero (whose range must hold 0)."""
    spec = gs.QuantSpec.parse("w4g32f")
    assert spec == gs.QuantSpec(4, gs.PerGroup(32), float_zero=True) and str(spec) == "w4g32f" and not spec.symmetric
    assert gs.spec.parse_spec("Q4_1") == spec and gs.spec.parse_spec("Q5_1") == gs.QuantSpec.parse("w5g32f")
    with pytest.raises(ValueError, match="not both"):
        gs.QuantSpec(4, gs.PerGroup(32), symmetric=True, float_zero=True)
    with pytest.raises(ValueError):
        gs.QuantSpec.parse("w4g32sf")
    assert gs.layer_nbytes((8, 64), spec) == 8 * 64 // 2 + 16 * 2 + 16 * 2
    w = 1.0 + torch.rand(8, 64, generator=torch.Generator().manual_seed(0))  # every block in [1, 2]
    qf, qi = gs.rtn(w, spec), gs.rtn(w, gs.QuantSpec.parse("w4g32"))
    assert qf.zero.dtype == torch.float16 and torch.equal(qf.dequantize(), qf.codes.float().view(8, 2, 32).mul(qf.scale.float()[..., None])
                                                         .add(qf.zero.float()[..., None]).view(8, 64))
    assert float((qf.dequantize() - w).pow(2).sum()) < 0.35 * float((qi.dequantize() - w).pow(2).sum())
    with pytest.raises(ValueError, match="float offset"):
        gs.layer_nbytes((8, 64), spec, "compressed-tensors")


@pytest.mark.parametrize("bad", ["w1c", "w9c", "w4", "4g64", "w4g0", "w4x", ""])
def test_spec_parse_rejects(bad):
    with pytest.raises(ValueError):
        gs.QuantSpec.parse(bad)


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 4.0, True])
def test_spec_bits_validated(bits):
    with pytest.raises(ValueError, match="bits"):
        gs.QuantSpec(bits, gs.PerChannel())


# ---------------------------------------------------------------- quantizer properties


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_codes_in_range_and_requantize_identity(spec):
    w = _weight()
    q = gs.rtn(w, spec)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= spec.maxq and int(q.codes.min()) >= 0
    if q.zero is not None and not spec.float_zero:
        assert int(q.zero.max()) <= spec.maxq
    # dequantize, then quantize again with the stored parameters: identical codes
    deq = q.dequantize()
    scale = _expand(q.scale, spec, w.shape)
    zero = _expand(q.zero_float(), spec, w.shape)
    again = quantize_codes(deq, scale, zero, spec.maxq)
    assert torch.equal(again.to(torch.uint8), q.codes)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("clip", [None, 0.8, "search"])
def test_error_at_most_half_step_inside_range(spec, clip):
    w = _weight(seed=1)
    q = gs.rtn(w, spec, clip=clip)
    scale = _expand(q.scale, spec, w.shape)
    zero = _expand(q.zero_float(), spec, w.shape)
    lo, hi = (0 - zero) * scale, (spec.maxq - zero) * scale
    inside = (w >= lo - scale / 2) & (w <= hi + scale / 2)
    err = (w - q.dequantize()).abs()
    assert bool((err[inside] <= scale[inside] / 2 * (1 + 1e-5)).all())
    if clip is None:  # no clipping: every element is inside
        assert bool(inside.all())


def test_per_group_in_equals_per_channel_bit_for_bit():
    w = _weight()
    for bits, sym, clip in itertools.product(BITS, (False, True), (None, "search")):
        a = gs.rtn(w, gs.QuantSpec(bits, gs.PerGroup(w.shape[1]), sym), clip=clip)
        b = gs.rtn(w, gs.QuantSpec(bits, gs.PerChannel(), sym), clip=clip)
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.scale, b.scale)
        assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)
        assert torch.equal(a.dequantize(), b.dequantize())


def test_finer_granularity_lowers_error_on_outliers():
    w = _weight()
    errs = [((w - gs.rtn(w, gs.QuantSpec(4, g)).dequantize()) ** 2).sum() for g in (gs.PerTensor(), gs.PerChannel(), gs.PerGroup(16))]
    assert errs[0] > errs[1] > errs[2]


def test_clip_search_never_worse_than_full_range():
    w = _weight(seed=2)
    for spec in [gs.QuantSpec.parse(s) for s in ("w3c", "w4g16", "w2t", "w4cs")]:
        blocks = block_view(w, spec)
        e_full = ((gs.rtn(w, spec).dequantize() - w).abs() ** 2.4)
        e_clip = ((gs.rtn(w, spec, clip="search").dequantize() - w).abs() ** 2.4)
        # compared per block, the quantity the search minimises
        per_full = block_view(e_full, spec).sum(-1)
        per_clip = block_view(e_clip, spec).sum(-1)
        assert bool((per_clip <= per_full * (1 + 1e-6)).all()), spec
        assert blocks.shape[0] == per_full.shape[0]


def test_scales_are_float16_exact():
    w = _weight()
    spec = gs.QuantSpec.parse("w4g16")
    blocks = block_view(w, spec)
    scale, zero = qparams(blocks, 4, False)
    assert torch.equal(scale, scale.half().float())
    q = gs.rtn(w, spec)
    assert q.scale.dtype == torch.float16


@pytest.mark.parametrize("spec", ["w2c", "w3g32", "w4g64", "w8c", "w4t", "w4g32s", "w8cs", "w4g32f", "w5cf"])
def test_rounding_shortcuts_give_the_roundings_values(spec):
    """quantize_codes (one tensor rounded in place), fake_quant and rtn_values (no uint8 codes; the zero's
    integer part folded into the clamp) against the formulas they replace, written out: the codes bit for
    bit, the values equal, on weights with exact ties, zeros, huge and tiny blocks and clipping."""
    sp = gs.QuantSpec.parse(spec)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 128, generator=g) * torch.logspace(-4, 1, 24).unsqueeze(1)
    w[3] = torch.round(w[3] * 8) / 8  # many values on a half step
    w[5, :64] = 0.0
    w[6] = -0.0
    blocks = block_view(w, sp)
    for ratio in (1.0, 0.8, torch.linspace(0.5, 1.0, blocks.shape[0]).unsqueeze(1)):
        scale, zero = qparams(blocks, sp.bits, sp.symmetric, ratio, sp.float_zero, check=False)
        zr = torch.round(zero)
        codes = torch.clamp(torch.round(blocks / scale + (zero - zr)) + zr, 0, sp.maxq)  # the codes, as they were made
        new = quantize_codes(blocks, scale, zero, sp.maxq)
        assert torch.equal(new.view(torch.int32), codes.view(torch.int32))  # bit for bit, zeros' signs too
        assert torch.equal(fake_quant(blocks, scale, zero, sp.maxq, integer_zero=not sp.float_zero), (codes - zero) * scale)
        assert torch.equal(fake_quant(blocks, scale, zero, sp.maxq), (codes - zero) * scale)  # the default: any zero
        if isinstance(ratio, float):
            ref = gs.rtn(w, sp, clip=None if ratio == 1.0 else ratio, check=False).dequantize()
            assert torch.equal(rtn_values(w, sp, ratio), ref)
    bad = w.clone()
    bad[2, 7] = float("nan")
    assert not bool(torch.isfinite(rtn_values(bad, sp)).all())  # unchecked, but a NaN is not hidden


def test_all_zero_block_is_exact():
    w = torch.zeros(4, 32)
    w[0, :16] = torch.linspace(-1, 1, 16)
    q = gs.rtn(w, gs.QuantSpec.parse("w4g16"))
    assert torch.equal(q.dequantize()[1:], w[1:])


# ---------------------------------------------------------------- packing


def _reference_stream_pack(codes, bits):
    """Bit i of code j goes to stream position j*bits+i; bytes are LSB first."""
    stream = []
    for c in codes.tolist():
        stream.extend((c >> i) & 1 for i in range(bits))
    stream.extend([0] * ((-len(stream)) % 8))
    return torch.tensor([sum(b << k for k, b in enumerate(stream[i : i + 8])) for i in range(0, len(stream), 8)], dtype=torch.uint8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 13, 64, 1001])
def test_pack_round_trip_and_layout(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = gs.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(gs.unpack_codes(packed, bits, n), codes)
    # every width lays out its bits exactly as the dense LSB-first stream, and reads that stream back
    reference = _reference_stream_pack(codes, bits)
    assert torch.equal(packed, reference)
    assert torch.equal(gs.unpack_codes(torch.cat([reference, torch.full((5,), 255, dtype=torch.uint8)]), bits, n), codes)


def test_pack_known_bytes():
    assert gs.pack_codes(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert gs.pack_codes(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2).tolist() == [0b10010011]
    # 3 bits: 5, 7, 1 -> stream 101 111 100 (LSB first) -> bits 0..7 = 1,0,1,1,1,1,1,0 ; then 0
    assert gs.pack_codes(torch.tensor([5, 7, 1], dtype=torch.uint8), 3).tolist() == [0b01111101, 0]


# ---------------------------------------------------------------- QuantLinear and bytes


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_layer_nbytes_equals_stored_buffers(spec):
    w = _weight(out=17, inn=96)
    lin = torch.nn.Linear(96, 17)
    lin.weight.data.copy_(w)
    q = gs.rtn(w, spec)
    ql = gs.QuantLinear.from_float(lin, q)
    stored = sum(b.numel() * b.element_size() for n, b in ql.state_dict().items() if n != "bias")
    assert stored == gs.layer_nbytes((17, 96), spec) == q.nbytes == ql.stored_nbytes()


def test_layer_nbytes_documented_example():
    spec = gs.QuantSpec.parse("w4g128")
    assert gs.layer_nbytes((4096, 4096), spec) == 8_388_608 + 262_144 + 65_536 == 8_716_288
    assert abs(gs.bits_per_weight((4096, 4096), spec) - 4.156) < 1e-3
    assert gs.layer_nbytes((4096, 4096), gs.QuantSpec.parse("w4g128s")) == 8_388_608 + 262_144
    assert gs.layer_nbytes((10, 30), gs.QuantSpec.parse("w3t")) == math.ceil(300 * 3 / 8) + 2 + 1
    assert gs.layer_nbytes((10, 30), gs.QuantSpec.parse("w3c")) == 113 + 20 + math.ceil(30 / 8)


@pytest.mark.parametrize("spec", [gs.QuantSpec.parse(s) for s in ("w4g16", "w8c", "w3t", "w5g48s", "w4g16f")], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_quantlinear_forward_matches_dequantized(spec, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 20, bias=bias)
    q = gs.rtn(lin.weight, spec)
    ql = gs.QuantLinear.from_float(lin, q)
    x = torch.randn(3, 5, 96)
    ref = F.linear(x, q.dequantize(), lin.bias)
    assert torch.equal(ql(x), ref)
    # a fresh module loads the packed state dict and computes the same
    fresh = gs.QuantLinear(96, 20, spec, bias=bias)
    fresh.load_state_dict(ql.state_dict())
    assert torch.equal(fresh(x), ref)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_with_shape():
    spec = gs.QuantSpec.parse("w4g64")
    with pytest.raises(ValueError, match=r"group size 64 does not divide .* 96.*\(8, 96\)"):
        gs.rtn(torch.randn(8, 96), spec)
    with pytest.raises(ValueError, match=r"\(8, 64\).*1 NaN"):
        w = torch.randn(8, 64)
        w[1, 1] = float("nan")
        gs.rtn(w, spec)
    with pytest.raises(ValueError, match=r"\(8, 64\).*1 Inf"):
        w = torch.randn(8, 64)
        w[2, 2] = float("inf")
        gs.rtn(w, spec)
    with pytest.raises(ValueError, match=r"\(2, 8, 64\).*not 2-D"):
        gs.rtn(torch.randn(2, 8, 64), spec)
    with pytest.raises(ValueError, match="does not divide"):
        gs.layer_nbytes((8, 96), spec)
    with pytest.raises(ValueError, match="clip"):
        gs.rtn(torch.randn(8, 64), spec, clip=1.5)
    with pytest.raises(ValueError, match="bits"):
        gs.QuantSpec(12, gs.PerChannel())
    with pytest.raises(ValueError, match="layer.q"):
        gs.rtn(torch.randn(8, 96), spec, name="layer.q")


# ---- granularities and methods as types -------------------------------------------------------------------


@pytest.mark.parametrize("gran", [gs.PerTensor(), gs.PerChannel(), gs.PerGroup(8), gs.PerGroup(32)])
def test_granularity_knows_its_blocks_and_text(gran):
    """block_view, params_shape, n_groups and the text forms agree with one another and with the quantizer."""
    w = torch.randn(6, 32)
    blocks = gran.block_view(w)
    rows, cols = gran.params_shape(6, 32)
    assert blocks.shape[0] == rows * cols == gran.n_groups(6, 32)
    assert blocks.numel() == w.numel() and torch.equal(blocks.reshape(6, 32), w)
    q = gs.rtn(w, gs.QuantSpec(4, gran))
    assert tuple(q.scale.shape) == (rows, cols)
    assert gs.as_granularity(gran.name) == gran and gs.as_granularity(gran.tag()) == gran
    assert str(gs.QuantSpec(4, gran)).startswith(f"w4{gran.tag()}")


def test_granularity_fits_and_rejects():
    assert gs.PerGroup(8).fits(32) and not gs.PerGroup(12).fits(32) and gs.PerChannel().fits(7)
    assert gs.as_granularity(64) == gs.as_granularity("64") == gs.as_granularity("g64") == gs.PerGroup(64)
    for bad in ("rows", "gg64", "", True, 1.5):
        with pytest.raises(ValueError, match="granularity"):
            gs.as_granularity(bad)
    with pytest.raises(ValueError, match="granularity must be"):
        gs.QuantSpec(4, gs.Granularity())  # the base type is not a granularity of its own


def test_method_is_typed_text():
    m = gs.Method.parse("awq+gptq")
    assert m == "awq+gptq" and m.uses_awq and m.uses_gptq and str(m) == "awq+gptq"
    assert [x for x in gs.Method if x.uses_gptq] == [gs.Method.GPTQ, gs.Method.AWQ_GPTQ]
    assert not gs.Method.RTN.uses_awq and not gs.Method.RTN.uses_gptq
    with pytest.raises(ValueError, match="unknown method 'hqq': use one of rtn, gptq, awq, awq\\+gptq"):
        gs.Method.parse("hqq")
    assert gs.GPTQOptions.from_dict({"damp": 0.1}) == gs.GPTQOptions(damp=0.1)
    with pytest.raises(ValueError, match="unknown GPTQ options \\['dmap'\\]"):
        gs.GPTQOptions.from_dict({"dmap": 0.1})
