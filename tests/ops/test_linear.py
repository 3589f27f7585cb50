"""``looplm.ops.linear``: the small-row C++ kernel equals ``F.linear``; every other case is ``F.linear``."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from looplm.layers.linear import Linear
from looplm.ops import cpp_ext
from looplm.ops.linear import MAX_ROWS, MAX_STEP_ROWS, bf16_products, linear
from looplm.ops.qlinear import bf16_rows
from tests.amx import needs_amx
from tests.threads import torch_threads

needs_kernel = pytest.mark.skipif(not cpp_ext.available(), reason="no C++ kernel built here")


@needs_kernel
@given(rows=st.integers(1, MAX_ROWS), k=st.sampled_from([1, 15, 16, 37, 384]), n=st.sampled_from([1, 3, 130]),
       bias=st.booleans(), threads=st.sampled_from([1, 2]))
def test_small_rows_equal_f_linear(rows, k, n, bias, threads):
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    with torch_threads(threads):
        with torch.no_grad():
            got = linear(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert (got.double() - want).abs().max() <= 1e-5 * (want.abs().max() + 1)


@needs_kernel
@given(rows=st.sampled_from([9, 16, MAX_STEP_ROWS]), k=st.sampled_from([15, 576]),
       n=st.sampled_from([3, 130]))
def test_a_batch_decoding_step_equals_f_linear(rows, k, n):
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, w = torch.randn(rows, 1, k, generator=gen), torch.randn(n, k, generator=gen)
    with torch.no_grad():
        got = linear(x, w)
    want = F.linear(x.double(), w.double())
    assert got.shape == (rows, 1, n)
    assert (got.double() - want).abs().max() <= 1e-5 * (want.abs().max() + 1)
    many = torch.randn(rows, 2, k, generator=gen)  # more than one token per row: F.linear exactly
    assert torch.equal(linear(many, w), F.linear(many, w))


@needs_kernel
def test_leading_dims_and_non_contiguous_input():
    x = torch.randn(2, 6, 3).transpose(1, 2)[:, :1]  # [2, 1, 6], not contiguous
    w = torch.randn(5, 6)
    with torch.no_grad():
        got = linear(x, w)
    assert got.shape == (2, 1, 5)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_other_cases_are_f_linear_exactly():
    w, b = torch.randn(7, 9), torch.randn(7)
    many = torch.randn(MAX_ROWS + 1, 9)
    assert torch.equal(linear(many, w, b), F.linear(many, w, b))  # too many rows
    x64, w64 = torch.randn(2, 9, dtype=torch.float64), w.double()
    assert torch.equal(linear(x64, w64), F.linear(x64, w64))  # not float32
    x = torch.randn(2, 9, requires_grad=True)  # recorded for autograd: F.linear and its gradient
    y = linear(x, w, b)
    assert torch.equal(y, F.linear(x, w, b))
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 9))


def test_linear_module_is_an_nn_linear():
    m = Linear(4, 3)
    assert isinstance(m, nn.Linear)
    assert set(m.state_dict()) == set(nn.Linear(4, 3).state_dict())
    x = torch.randn(2, 4, requires_grad=True)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))


@needs_amx
@given(rows=st.integers(1, 80), k=st.sampled_from([32, 64, 576]), n=st.sampled_from([1, 17, 32, 100]),
       bias=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 100))
def test_bf16_products_are_the_bfloat16_product_from_bf16_rows_rows_on(rows, k, n, bias, threads, seed):
    """Inside bf16_products, float32 weights times bf16_rows() rows or more equal the product of x and
    W rounded to bfloat16 (float32 sums, bias added after); fewer rows, or outside, are float32."""
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(2, rows, k, generator=gen), torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    with torch_threads(threads), torch.no_grad():
        with bf16_products():
            got = linear(x, w, b)
        plain = linear(x, w, b)
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    rounded = x.bfloat16().double() @ w.bfloat16().double().t() + (0 if b is None else b.double())
    want = rounded if 2 * rows >= bf16_rows() else exact
    assert got.shape == (2, rows, n)
    assert (got.double() - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    assert (plain.double() - exact).abs().max() <= 1e-4 * (1 + exact.abs().max())


@needs_amx
def test_bf16_products_leave_autograd_and_other_threads_alone():
    x, w = torch.randn(64, 64), torch.randn(8, 64, requires_grad=True)
    seen = []
    with bf16_products():
        y = linear(x, w)  # recorded for autograd: F.linear in float32
        t = threading.Thread(target=lambda: seen.append(linear(x, w.detach())))
        t.start()
        t.join()
    exact = x.double() @ w.detach().double().t()
    assert (y.detach().double() - exact).abs().max() <= 1e-4 * exact.abs().max()
    assert (seen[0].double() - exact).abs().max() <= 1e-4 * exact.abs().max()
