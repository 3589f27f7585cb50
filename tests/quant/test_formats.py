"""Formats: round-trip error bounds, exact packing, FP8/FP4 rounding per the definitions."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from looplm.quant import formats as qf

shapes = st.tuples(st.integers(1, 5), st.sampled_from([32, 64, 128, 256]))
scales = st.sampled_from([1e-4, 0.02, 1.0, 300.0])


def rand(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    w[0, : min(3, shape[1])] = torch.tensor([0.0, scale * 10, -scale * 10])[: min(3, shape[1])]
    return w


@given(shapes, scales, st.integers(0, 99))
def test_int8_round_trip_within_half_step(shape, scale, seed):
    w = rand(shape, scale, seed)
    parts = qf.quantize_int8(w)
    s = parts["scale"]
    assert torch.equal(s.to(torch.bfloat16).float(), s)  # bf16-exact for the packed kernel
    assert (parts["q"].abs() <= 127).all()
    err = (qf.dequantize_int8(parts["q"], s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()


@given(shapes, scales, st.integers(0, 99), st.sampled_from([32, 64, 96, 128, 256]))
def test_int8_groups_round_trip_within_half_step_of_their_own_scale(shape, scale, seed, g):
    if shape[1] % g:
        return
    w = rand(shape, scale, seed)
    fmt = qf.make_format("int8", g)
    parts = qf.quantize(w, fmt)
    assert parts["scale"].shape == (shape[0], shape[1] // g) and parts["scale"].dtype == torch.float32
    assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == fmt.part_shapes(*shape)
    assert (parts["q"].abs() <= 127).all()
    s = parts["scale"].repeat_interleave(g, 1)
    err = (qf.dequantize(parts, fmt) - w).abs()
    assert (err <= s / 2 * (1 + 1e-5)).all()
    # each group's scale is its own largest magnitude / 127, never more than the row's
    assert torch.allclose(s, w.abs().reshape(shape[0], -1, g).amax(-1).repeat_interleave(g, 1) / 127)
    assert (parts["scale"].amax(1) <= qf.quantize_int8(w)["scale"]).all()


def test_int8_group_sizes_are_checked():
    assert qf.make_format("int8").group_size is None and qf.make_format("int8").packed_op(64)
    assert qf.make_format("int8", 96).group_size == 96 and not qf.make_format("int8", 32).packed_op(64)
    for bad in (0, 16, 48, -32):
        with pytest.raises(ValueError, match=f"group_size={bad} for int8 must be a positive multiple of 32"):
            qf.make_format("int8", bad)
    assert not qf.make_format("int8", 64).supports(4, 96)
    with pytest.raises(ValueError, match="multiple of group_size"):
        qf.quantize_int8(torch.randn(4, 96), 64)


@given(shapes, scales, st.integers(0, 99), st.sampled_from(qf.GROUP_SIZES), st.booleans())
def test_int4_round_trip_within_half_step(shape, scale, seed, g, zp):
    if shape[1] % g:
        return
    w = rand(shape, scale, seed)
    parts = qf.quantize_int4(w, g, zp)
    assert parts["packed"].shape == (shape[0], shape[1] // 2) and parts["packed"].dtype == torch.uint8
    back = qf.dequantize_int4(parts["packed"], parts["scale"], parts["offset"])
    bound = parts["scale"].repeat_interleave(g, 1) / 2
    assert ((back - w).abs() <= bound * (1 + 1e-4) + 1e-6 * scale).all()


def test_int4_zero_point_beats_symmetric_on_shifted_weights():
    w = torch.rand(8, 64) + 1.0  # all positive: symmetric wastes half the codes
    e = [(qf.fake_quantize(w, qf.make_format("int4", 64, zp)) - w).abs().max() for zp in (True, False)]
    assert e[0] < e[1] / 1.5


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_nibble_packing_is_exact(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    p = qf.pack_nibbles(c)
    assert p.numel() == c.numel() // 2
    assert torch.equal(qf.unpack_nibbles(p), c)
    assert p[0] == codes[0] | (codes[1] << 4)


def test_fp4_codes_cover_the_e2m1_values_and_pack_exactly():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = qf.fp4_decode(codes)
    assert vals[:8].tolist() == list(qf.FP4_VALUES) and vals[8:].tolist() == [-v for v in qf.FP4_VALUES]
    keep = torch.tensor([c not in (0, 8) for c in range(16)])
    assert torch.equal(qf.fp4_encode(vals[keep]), codes[keep])  # every value encodes to itself
    assert qf.fp4_encode(torch.tensor([-0.0]))[0] == 0


@pytest.mark.parametrize(
    "x, expect",
    [(0.25, 0.0), (0.26, 0.5), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0),
     (5.1, 6.0), (7.9, 6.0), (1e9, 6.0), (-0.75, -1.0), (-2.6, -3.0), (0.1, 0.0)],
)
def test_fp4_rounds_to_nearest_even_and_saturates(x, expect):
    assert qf.fp4_decode(qf.fp4_encode(torch.tensor([x])))[0].item() == expect


@given(shapes, scales, st.integers(0, 99))
def test_fp4_mx_round_trip_bound_and_power_of_two_scales(shape, scale, seed):
    w = rand(shape, scale, seed)
    parts = qf.quantize_fp4_mx(w)
    back = qf.dequantize_fp4_mx(parts["packed"], parts["exponent"])
    group_scale = torch.exp2(parts["exponent"].float() - 127).repeat_interleave(32, 1)
    x = (w / group_scale).abs()
    assert (x < 8).all()  # the E8M0 rule: scale = 2^(floor(log2 amax) - 2)
    bound = torch.where(x <= 2, 0.25, torch.where(x <= 4, 0.5, torch.where(x <= 6, 1.0, 2.0))) * group_scale
    assert ((back - w).abs() <= bound).all()
    wb = w.reshape(shape[0], -1, 32).abs().amax(-1)
    assert ((wb / torch.exp2(parts["exponent"].float() - 127) >= 4) | (wb == 0)).all()


@pytest.mark.parametrize("name, rel, sub", [("fp8_e4m3", 2.0**-4, 2.0**-10), ("fp8_e5m2", 2.0**-3, 2.0**-17)])
def test_fp8_round_trip_within_relative_bound(name, rel, sub):
    w = rand((6, 256), 0.05, 1) * torch.logspace(-3, 3, 256)
    parts = qf.quantize_fp8(w, name)
    assert parts["q"].dtype == qf.FP8_DTYPES[name]
    s = parts["scale"][:, None]
    err = (qf.dequantize_fp8(parts["q"], parts["scale"]) - w).abs()
    assert (err <= torch.maximum(rel * w.abs(), sub * s) * (1 + 1e-6)).all()
    assert (parts["q"].float().abs().amax(1) == qf.FP8_MAX[name]).all()  # the row max maps to fmax


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_cast_saturates_keeps_zero_and_rounds_to_even(name):
    fmax = qf.FP8_MAX[name]
    x = torch.tensor([0.0, -0.0, fmax * 2, -fmax * 10, float("inf")])
    y = qf.cast_fp8(x, name).float()
    assert y.tolist() == [0.0, 0.0, fmax, -fmax, fmax]
    # 1 + half an ulp is a tie between 1 and 1 + ulp: rounds to 1 (even mantissa)
    ulp = 2.0**-3 if name == "fp8_e4m3" else 2.0**-2
    t = qf.cast_fp8(torch.tensor([1 + ulp / 2, 1 + 1.5 * ulp]), name).float().tolist()
    assert t == [1.0, 1 + 2 * ulp]


def test_bad_format_arguments_raise():
    with pytest.raises(ValueError, match="format="):
        qf.make_format("int3")
    with pytest.raises(ValueError, match="group_size"):
        qf.make_format("int4", 48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        qf.quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="weight matrix"):
        qf.quantize(torch.randn(4), qf.make_format("int8"))


def test_bits_per_weight():
    assert qf.make_format("int4", 64).bits == 5.0
    assert qf.make_format("fp4_mx").bits == 4.25
    assert qf.make_format("int8").bits == 8.0
    assert qf.make_format("int8", 32).bits == 9.0
