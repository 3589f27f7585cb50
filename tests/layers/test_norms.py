"""Hand-written norm backwards equal autograd of the composite forms (float64, gradcheck)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import looplm.layers.norms as norms_module
from looplm.layers.norms import HeadRMSNorm, RMSNorm, l2_normalize, rms_norm
from tests.threads import torch_threads


def _inputs(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.fixture(params=[False, True], ids=["one_tile", "row_tiles"])
def tiles(request, monkeypatch):
    if request.param:  # one row per tile: the loop as it runs on large inputs
        monkeypatch.setattr(norms_module, "_TILE", 1)


@pytest.mark.parametrize("gated", [False, True])
def test_rms_norm_matches_composite_and_gradcheck(gated, tiles):
    x, w, z = _inputs((2, 3, 5), (5,), (2, 3, 5))
    gate = z if gated else None
    ref = F.rms_norm(x, (5,), w, 1e-6) * (F.silu(z) if gated else 1)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, gate), ref)
    inputs = (x, w, z) if gated else (x, w)
    gy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(rms_norm(x, w, 1e-6, gate), inputs, gy),
                         torch.autograd.grad(ref, inputs, gy)):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda *a: rms_norm(a[0], a[1], 1e-6, a[2] if gated else None), inputs)


def test_l2_normalize_matches_f_normalize_and_gradcheck(tiles):
    (x,) = _inputs((3, 4, 2, 6))
    torch.testing.assert_close(l2_normalize(x), F.normalize(x, dim=-1))
    gy = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(l2_normalize(x), x, gy)[0],
                               torch.autograd.grad(F.normalize(x, dim=-1), x, gy)[0])
    assert torch.autograd.gradcheck(l2_normalize, (x,))
    assert l2_normalize(torch.zeros(2, 3)).abs().sum() == 0


def test_modules_keep_nn_rmsnorm_parameters_and_dtype():
    norm, head = RMSNorm(8), HeadRMSNorm(4)
    assert list(norm.state_dict()) == ["weight"] and norm.eps == 1e-6
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), norm.weight, 1e-6))
    xh = x.view(2, 3, 2, 4)
    torch.testing.assert_close(head(xh), F.rms_norm(xh, (4,), head.weight, 1e-6))
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(not norms_module.cpp_ext.available(), reason="no C++ kernel built here")
@given(rows=st.integers(1, 70), dim=st.sampled_from([1, 7, 16, 33, 384]), threads=st.sampled_from([1, 2]),
       need_w=st.booleans(), gated=st.booleans())
def test_rms_norm_kernel_float32_matches_float64_composite(rows, dim, threads, need_w, gated):
    g = torch.Generator().manual_seed(rows * 31 + dim)
    x = torch.randn(rows, dim, generator=g, requires_grad=True)
    w = (1 + 0.3 * torch.randn(dim, generator=g)).requires_grad_(need_w)
    z = (2 * torch.randn(rows, dim, generator=g)).requires_grad_() if gated else None
    gy = torch.randn(rows, dim, generator=g)
    inputs = [t for t in (x, w if need_w else None, z) if t is not None]
    with torch_threads(threads):
        y = rms_norm(x, w, 1e-6, z)
        assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_RMSNormKernelBackward"
        grads = torch.autograd.grad(y, inputs, gy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_() if gated else None
    ref = F.rms_norm(x64, (dim,), w64, 1e-6) * (F.silu(z64) if gated else 1)
    want = torch.autograd.grad(ref, [t for t in (x64, w64 if need_w else None, z64) if t is not None],
                               gy.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-4 * (1 + exp.abs().max().item()))


@pytest.mark.skipif(not norms_module.cpp_ext.available(), reason="no C++ kernel built here")
@pytest.mark.parametrize("gated", [False, True])
def test_rms_norm_kernel_gives_the_same_bits_on_any_thread_count(gated):
    """A run resumed on another thread count must reproduce an uninterrupted one bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 48, generator=g, requires_grad=True)
    w = torch.randn(48, generator=g, requires_grad=True)
    z = torch.randn(1000, 48, generator=g, requires_grad=True) if gated else None
    gy = torch.randn(1000, 48, generator=g)
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            y = rms_norm(x, w, 1e-6, z)
            results.append([y, *torch.autograd.grad(y, [t for t in (x, w, z) if t is not None], gy)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
