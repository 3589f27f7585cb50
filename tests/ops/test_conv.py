"""Short causal depthwise convolution: full form == step form == explicit sum; state carries."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import looplm.ops.conv as conv_module
from looplm.ops.conv import causal_conv1d, causal_conv1d_step


def explicit(x, w, b):
    B, T, D = x.shape
    K = w.shape[1]
    xp = torch.cat((x.new_zeros(B, K - 1, D), x), 1)
    return sum(xp[:, j:j + T] * w[:, j] for j in range(K)) + (0 if b is None else b)


@given(B=st.integers(1, 3), T=st.integers(1, 12), D=st.integers(1, 6), K=st.integers(1, 5),
       split=st.integers(0, 12), bias=st.booleans())
def test_forms_agree(B, T, D, K, split, bias):
    split = min(split, T)
    x, w = torch.randn(B, T, D), torch.randn(D, K)
    b = torch.randn(D) if bias else None
    y, state = causal_conv1d(x, w, b)
    torch.testing.assert_close(y, explicit(x, w, b), atol=1e-5, rtol=1e-5)
    assert state.shape == (B, K - 1, D)
    # prefill the first `split` tokens, then step through the rest
    ys, s = [], None
    if split:
        y0, s = causal_conv1d(x[:, :split], w, b)
        ys.append(y0)
    for t in range(split, T):
        yt, s = causal_conv1d_step(x[:, t], w, b, s)
        ys.append(yt[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, state)


@pytest.mark.parametrize("T,K", [(7, 4), (2, 4), (5, 1), (1, 3)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("one_row_tiles", [False, True])
def test_hand_written_backward_matches_autograd_of_the_explicit_sum(T, K, with_state, one_row_tiles,
                                                                     monkeypatch):
    if one_row_tiles:  # the tile loop as it runs on large inputs
        monkeypatch.setattr(conv_module, "_TILE", 1)
    g = torch.Generator().manual_seed(T * 10 + K)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((2, T, 3), (3, K), (3,)))
    state = torch.randn(2, K - 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = state if with_state else None
    inputs = (x, w, b, state) if with_state else (x, w, b)

    def conv(*a):
        return causal_conv1d(a[0], a[1], a[2], a[3] if with_state else None, silu=True)[0]

    assert torch.autograd.gradcheck(conv, inputs)
    # the explicit form over the state and x, then SiLU
    xp = torch.cat((state if with_state else x.new_zeros(2, K - 1, 3), x), 1)
    ref = torch.nn.functional.silu(sum(xp[:, j:j + T] * w[:, j] for j in range(K)) + b)
    torch.testing.assert_close(causal_conv1d(x, w, b, s, silu=True)[0], ref)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(ref, inputs, gy)
    got = torch.autograd.grad(causal_conv1d(x, w, b, s, silu=True)[0], inputs, gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_gradients_reach_weight_and_input():
    x = torch.randn(2, 7, 3, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    causal_conv1d(x, w)[0].square().sum().backward()
    assert x.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_bad_shapes_name_the_argument():
    x, w = torch.randn(2, 5, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match="state"):
        causal_conv1d(x, w, state=torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match="x"):
        causal_conv1d_step(x, w)
