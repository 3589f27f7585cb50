"""``looplm.ops.qlinear``: the int8 / int4 few-row kernel equals its PyTorch reference (the same
arithmetic), stays within the int8-activation error bound of the dequantised matmul, and the
quantised embedding rows equal the dequantised table's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.ops import cpp_ext
from looplm.ops.qlinear import (
    GROUP,
    MAX_ROWS,
    bf16_rows,
    kernel_applies,
    qembedding,
    qlinear,
    qlinear_reference,
    qlinear_swiglu,
    quantize_rows,
    swiglu_applies,
)
from looplm.quant.formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from tests.threads import torch_threads

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")


def _parts(fmt: str, w: torch.Tensor, group: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(kernel parts, dequantised float weight) of ``w`` in ``fmt``."""
    if fmt == "int8":  # group 0: one scale per row
        p = quantize_int8(w, group or None)
        return [p["q"], p["scale"]], dequantize_int8(p["q"], p["scale"])
    if fmt == "int4":
        p = quantize_int4(w, group)
        return [p["packed"], p["scale"], p["offset"]], dequantize_int4(p["packed"], p["scale"], p["offset"])
    return [w], w


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4", "float32"]), rows=st.integers(1, 3 * MAX_ROWS),
       n=st.integers(1, 150), groups32=st.sampled_from([1, 2, 3, 4, 6, 18]),
       group=st.sampled_from([0, 32, 64, 96, 128]), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_kernel_equals_reference(fmt, rows, n, groups32, group, threads, seed):
    k = GROUP * groups32
    if fmt == "float32":  # float weights: a decoding step's few rows only
        rows = min(rows, MAX_ROWS)
    if (fmt == "int4" and group == 0) or k % max(group, 1):  # int8 group 0: per row
        group = 32
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    if seed % 3 == 0:
        x[:, :GROUP] = 0  # an all-zero group (scale 0)
    parts, _ = _parts(fmt, w, group)
    assert kernel_applies(x, parts)
    with torch_threads(threads), torch.no_grad():
        got = qlinear(x, parts)
    want = qlinear_reference(x, parts)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 2e-5 * (want.abs().max() + 1)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), rows=st.integers(2, 15), n=st.integers(1, 70),
       groups32=st.sampled_from([1, 2, 3, 4, 5, 6, 18, 48]), group=st.sampled_from([0, 32, 64, 128]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_a_row_among_others_equals_the_row_alone(fmt, rows, n, groups32, group, threads, seed):
    """A few rows (a verification's draft tokens) share each weight vector's unpacking; every row's
    result is bit for bit what a one-row product (a decoding step) gives, so speculative decoding
    with a quantised model stays lossless. From bf16_rows() rows on the bfloat16 route differs."""
    k = GROUP * groups32
    if (fmt == "int4" and group == 0) or k % max(group, 1):
        group = 32
    rows = min(rows, (bf16_rows() or 16) - 1)
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    x[seed % rows, :GROUP] = 0  # an all-zero activation group in one row
    parts, _ = _parts(fmt, w, group)
    with torch_threads(threads), torch.no_grad():
        together = qlinear(x, parts)
        alone = torch.cat([qlinear(x[t:t + 1], parts) for t in range(rows)])
    assert torch.equal(together, alone)


@needs_kernel
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int8", 32), ("int8", 192), ("int4", 32), ("int4", 64)])
def test_kernel_within_the_activation_rounding_bound(fmt, group):
    """|kernel - x Ŵᵀ| ≤ Σ_i (d_b(i)/2)·|Ŵ_i| (each int8 activation is off by at most half a step)."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 576, generator=gen), torch.randn(300, 576, generator=gen)
    parts, w_hat = _parts(fmt, w, group)
    with torch.no_grad():
        got = qlinear(x, parts).double()
    exact = x.double() @ w_hat.double().t()
    _, d = quantize_rows(x)
    half_step = (d.double() / 2).repeat_interleave(GROUP, dim=1)  # [3, 576]
    bound = half_step @ w_hat.double().abs().t()
    assert ((got - exact).abs() <= bound * (1 + 1e-4) + 1e-4).all()
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()  # and small in practice


@needs_kernel
def test_leading_dimensions_and_when_it_applies():
    w = torch.randn(40, 64)
    p = quantize_int8(w)
    parts = [p["q"], p["scale"]]
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        y = qlinear(x, parts)
    assert y.shape == (2, 1, 40)
    want = qlinear_reference(x.reshape(2, 64), parts)
    torch.testing.assert_close(y.reshape(2, 40), want, rtol=1e-5, atol=1e-5)
    assert kernel_applies(torch.randn(MAX_ROWS + 1, 64), parts)  # a prefill: quantised weights too
    assert not kernel_applies(torch.randn(MAX_ROWS + 1, 64), [w])  # float32: the caller's matmul
    assert not kernel_applies(torch.randn(1, 64, dtype=torch.float64), parts)
    assert not kernel_applies(torch.randn(1, 64, requires_grad=True), parts)
    assert not kernel_applies(torch.randn(1, 48), [p["q"][:, :48].contiguous(), p["scale"]])  # 48 % 32


@needs_kernel
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64)])
def test_embedding_rows_equal_the_dequantised_table(fmt, group):
    w = torch.randn(100, 128)
    parts, w_hat = _parts(fmt, w, group)
    ids = torch.tensor([[0, 99, 7], [7, 7, 1]])
    assert torch.equal(qembedding(ids, parts), w_hat[ids])
    with pytest.raises(RuntimeError, match="out of range"):
        qembedding(torch.tensor([100]), parts)


@needs_kernel
def test_bad_parts_are_rejected():
    x, z = torch.randn(1, 64), torch.zeros
    with pytest.raises(RuntimeError, match="int8 scale"):
        torch.ops.looplm.qlinear(x, [torch.zeros(4, 64, dtype=torch.int8), torch.zeros(5)])
    with pytest.raises(RuntimeError, match="int8 scale"):  # groups of 32 need [4, 2]
        torch.ops.looplm.qlinear(x, [torch.zeros(4, 64, dtype=torch.int8), torch.zeros(5, 2)])
    with pytest.raises(RuntimeError, match="int8 group size"):  # groups of 16
        torch.ops.looplm.qlinear(x, [torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 4)])
    with pytest.raises(RuntimeError, match="int4 packed"):
        torch.ops.looplm.qlinear(x, [z(4, 31, dtype=torch.uint8), z(4, 2), z(4, 2)])
    with pytest.raises(RuntimeError, match="group size"):
        torch.ops.looplm.qlinear(x, [z(4, 32, dtype=torch.uint8), z(4, 4), z(4, 4)])


@needs_kernel
@pytest.mark.skipif(not bf16_rows(), reason="no AMX bfloat16 matrix product in this build or CPU")
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 192)])
def test_many_rows_run_in_bfloat16(fmt, group):
    """From bf16_rows() rows on, quantised weights are dequantised and multiplied in bfloat16: the
    kernel equals the bfloat16 product of x and the dequantised weight (float32 sums), one row
    fewer takes the int8-activation path, and both stay near the float product."""
    gen = torch.Generator().manual_seed(2)
    rows = bf16_rows()
    x, w = torch.randn(rows + 3, 576, generator=gen), torch.randn(700, 576, generator=gen)
    parts, w_hat = _parts(fmt, w, group)
    with torch.no_grad():
        got = qlinear(x, parts)
        fewer = qlinear(x[:rows - 1], parts)
    bf16 = (x.bfloat16().double() @ w_hat.bfloat16().double().t()).float()
    assert (got - bf16).abs().max() <= 1e-5 * bf16.abs().max()
    assert torch.equal(fewer, qlinear_reference(x[:rows - 1], parts)) or \
        (fewer - qlinear_reference(x[:rows - 1], parts)).abs().max() <= 2e-5 * bf16.abs().max()
    exact = x.double() @ w_hat.double().t()
    for y in (got, fewer):
        assert (y.double() - exact[:len(y)]).abs().max() <= 0.02 * exact.abs().max()


@needs_kernel
@pytest.mark.skipif(not bf16_rows(), reason="no AMX bfloat16 matrix product in this build or CPU")
@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4", "float32"]), extra=st.integers(0, 40), f=st.integers(1, 100),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_swiglu_product_is_the_product_then_the_activation(fmt, extra, f, threads, seed):
    """qlinear_swiglu of a fused gate | up weight [2F, K] gives the same floats as the product on
    its bfloat16 route (qlinear for quantised weights, linear_bf16 for float32 ones) followed by
    the activation kernel, for any F (strips of 32 gate rows split anywhere) and row count."""
    gen = torch.Generator().manual_seed(seed)
    rows = bf16_rows() + extra
    x, w = torch.randn(rows, 96, generator=gen), torch.randn(2 * f, 96, generator=gen)
    parts, _ = _parts(fmt, w, 32)
    assert swiglu_applies(x, parts)
    with torch_threads(threads), torch.no_grad():
        h = qlinear(x, parts) if fmt != "float32" else torch.ops.looplm.linear_bf16(x, w)
        want = torch.ops.looplm.swiglu_forward(h.contiguous(), None)
        got = qlinear_swiglu(x, parts)
    assert torch.equal(got, want)


@needs_kernel
def test_swiglu_product_refuses_what_it_does_not_take():
    """Too few rows (the few-row kernels' route), an odd number of weight rows, and autograd are
    not qlinear_swiglu's; the op itself says which."""
    x, w = torch.randn(max(bf16_rows(), 1) + 2, 64), torch.randn(10, 64)
    assert not swiglu_applies(x[:1], [w])
    assert not swiglu_applies(x, [w[:9]])
    assert not swiglu_applies(x.requires_grad_(), [w])
    with pytest.raises(RuntimeError, match="even number of rows"):
        torch.ops.looplm.qlinear_swiglu(x.detach(), [w[:9]])
