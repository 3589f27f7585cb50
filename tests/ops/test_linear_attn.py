"""Decay-family ops: step/recurrent/parallel/chunk forms agree (outputs, states, gradients),
survive strong decays, carry state across prefill pieces and decoding, and reject bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from looplm.ops import linear_attn
from looplm.ops.linear_attn import (
    decay_chunk,
    decay_parallel,
    decay_recurrent,
    decay_step,
    retention_log_decay,
)


def make(B, T, H, dk, dv, gate, *, seed=0, dtype=torch.float32, strength=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, dk, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, dv, generator=gen, dtype=dtype)
    shape = {"none": None, "scalar": (B, T, H), "dim": (B, T, H, dk)}[gate]
    g = None if shape is None else strength * F.logsigmoid(torch.randn(shape, generator=gen, dtype=dtype))
    s0 = torch.randn(B, H, dk, dv, generator=gen, dtype=dtype)
    return q, k, v, g, s0


def assert_rel_close(got, want, tol=1e-4):
    assert torch.isfinite(got).all()
    scale = want.abs().max().clamp_min(1e-6)
    err = (got - want).abs().max() / scale
    assert err <= tol, f"relative error {err:.2e} > {tol}"


@given(
    B=st.integers(1, 2), T=st.integers(1, 40), H=st.integers(1, 3), dk=st.integers(1, 6),
    dv=st.integers(1, 6), gate=st.sampled_from(["none", "scalar", "dim"]),
    chunk=st.sampled_from([1, 3, 4, 8, 16, 64]), with_state=st.booleans(), seed=st.integers(0, 99),
    scale=st.sampled_from([None, 0.3]),
)
def test_forms_agree_with_recurrent(B, T, H, dk, dv, gate, chunk, with_state, seed, scale):
    q, k, v, g, s0 = make(B, T, H, dk, dv, gate, seed=seed)
    s0 = s0 if with_state else None
    o_ref, s_ref = decay_recurrent(q, k, v, g, initial_state=s0, scale=scale)
    assert o_ref.shape == (B, T, H, dv) and s_ref.shape == (B, H, dk, dv)
    o, s = decay_parallel(q, k, v, g, initial_state=s0, scale=scale)
    assert_rel_close(o, o_ref)
    assert_rel_close(s, s_ref)
    o, s = decay_chunk(q, k, v, g, initial_state=s0, chunk_size=chunk, scale=scale)
    assert_rel_close(o, o_ref)
    assert_rel_close(s, s_ref)


def test_step_matches_explicit_update():
    q, k, v, g, s0 = make(2, 1, 3, 4, 5, "dim")
    o, s = decay_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0, scale=0.3)
    want_s = g[:, 0].exp()[..., None] * s0 + torch.einsum("bhk,bhv->bhkv", k[:, 0], v[:, 0])
    torch.testing.assert_close(s, want_s)
    torch.testing.assert_close(o, 0.3 * torch.einsum("bhk,bhkv->bhv", q[:, 0], want_s))


def grads(form, q, k, v, g, s0, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, s0) if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in (q, k, v, g, s0)]
    o, s = form(*args[:4], initial_state=args[4], **kw)
    w = torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view_as(o)  # a fixed, non-uniform weighting
    ((o * w).sum() + (s * s.detach().sign()).sum()).backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("gate", ["none", "scalar", "dim"])
@pytest.mark.parametrize("T,chunk,segment", [(37, 8, 1024), (33, 16, 1024), (20, 5, 1024), (37, 4, 8)])
def test_gradients_agree(gate, T, chunk, segment, monkeypatch):
    monkeypatch.setattr(linear_attn, "SEGMENT", segment)  # segment < T: the chunk form runs in pieces
    q, k, v, g, s0 = make(2, T, 2, 5, 3, gate, seed=T)
    want = grads(decay_recurrent, q, k, v, g, s0)
    for form, kw in ((decay_parallel, {}), (decay_chunk, {"chunk_size": chunk})):
        got = grads(form, q, k, v, g, s0, **kw)
        assert len(got) == len(want) == (5 if g is not None else 4)
        for a, b in zip(got, want):
            assert_rel_close(a, b)


@pytest.mark.parametrize("gate", ["scalar", "dim"])
@pytest.mark.parametrize("low", [-20.0, -1e3])
def test_strong_decays_stay_finite_and_agree(gate, low):
    B, T, H, dk, dv = 1, 150, 2, 4, 3
    q, k, v, _, s0 = make(B, T, H, dk, dv, "none", seed=3)
    gen = torch.Generator().manual_seed(4)
    shape = (B, T, H) if gate == "scalar" else (B, T, H, dk)
    g = low * torch.rand(shape, generator=gen)
    g[:, ::7] = 0.0  # mix strong decays with no decay at all
    o_ref, s_ref = decay_recurrent(q, k, v, g, initial_state=s0)
    for form, kw in ((decay_parallel, {}), (decay_chunk, {"chunk_size": 64}),
                     (decay_chunk, {"chunk_size": 128})):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g, s0)]
        o, s = form(*leaves[:4], initial_state=leaves[4], **kw)
        assert_rel_close(o, o_ref)
        assert_rel_close(s, s_ref)
        (o.sum() + s.sum()).backward()
        for t in leaves:
            assert torch.isfinite(t.grad).all()


@given(
    T=st.integers(2, 40), cuts=st.lists(st.integers(1, 39), max_size=3),
    gate=st.sampled_from(["none", "scalar", "dim"]), n_steps=st.integers(0, 5),
)
def test_chunked_prefill_then_decode_matches_one_pass(T, cuts, gate, n_steps):
    B, H, dk, dv = 2, 2, 4, 3
    q, k, v, g, s0 = make(B, T, H, dk, dv, gate, seed=T)
    o_all, s_all = decay_chunk(q, k, v, g, initial_state=s0, chunk_size=8)
    n_steps = min(n_steps, T - 1)
    bounds = sorted({0, T - n_steps, *(c for c in cuts if c < T - n_steps)})
    outs, state = [], s0
    for a, b in zip(bounds, bounds[1:]):
        o, state = decay_chunk(q[:, a:b], k[:, a:b], v[:, a:b], None if g is None else g[:, a:b],
                               initial_state=state, chunk_size=8)
        outs.append(o)
    for t in range(T - n_steps, T):
        o, state = decay_step(q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], state)
        outs.append(o[:, None])
    assert_rel_close(torch.cat(outs, 1), o_all)
    assert_rel_close(state, s_all)


@pytest.mark.parametrize("gate", ["none", "scalar", "dim"])
def test_identity_tokens_leave_state_and_outputs_unchanged(gate):
    q, k, v, g, s0 = make(1, 24, 2, 4, 3, gate, seed=5)
    keep = torch.ones(24, dtype=torch.bool)
    keep[[0, 5, 6, 17, 23]] = False  # tokens a router skipped: k = 0, g = 0 (q, v arbitrary)
    k2 = k * keep[:, None, None]
    g2 = None if g is None else g * (keep[:, None, None] if g.dim() == 4 else keep[:, None])
    o_skip, s_skip = decay_recurrent(q[:, keep], k[:, keep], v[:, keep],
                                     None if g is None else g[:, keep], initial_state=s0)
    o, s = decay_recurrent(q, k2, v, g2, initial_state=s0)
    assert torch.equal(s, s_skip)  # the step form is exact
    for form in (decay_recurrent, decay_parallel, decay_chunk):
        o, s = form(q, k2, v, g2, initial_state=s0)
        assert_rel_close(o[:, keep], o_skip, 1e-5)
        assert_rel_close(s, s_skip, 1e-5)


def test_retention_log_decay_matches_retnet():
    lg = retention_log_decay(4)
    assert lg.shape == (4,) and (lg < 0).all()
    torch.testing.assert_close(lg.exp(), torch.tensor([1 - 2.0 ** (-5 - h) for h in range(4)]))
    with pytest.raises(ValueError, match="n_heads"):
        retention_log_decay(0)


def test_other_dtypes_keep_their_dtype():
    q, k, v, g, s0 = make(1, 20, 2, 4, 3, "dim", dtype=torch.float64)
    o_ref, s_ref = decay_recurrent(q, k, v, g, initial_state=s0)
    o, s = decay_chunk(q, k, v, g, initial_state=s0, chunk_size=8)
    assert o.dtype == s.dtype == torch.float64
    assert_rel_close(o, o_ref, 1e-10)
    o16, s16 = decay_chunk(*(t.bfloat16() for t in (q, k, v, g)), initial_state=s0.bfloat16())
    assert o16.dtype == s16.dtype == torch.bfloat16
    assert_rel_close(o16.double(), o_ref, 0.05)


def test_empty_sequence_returns_initial_state():
    q, k, v, g, s0 = make(1, 0, 2, 4, 3, "scalar")
    for form in (decay_recurrent, decay_parallel, decay_chunk):
        o, s = form(q, k, v, g, initial_state=s0)
        assert o.shape == (1, 0, 2, 3)
        torch.testing.assert_close(s, s0)


@pytest.mark.parametrize("form", [decay_recurrent, decay_parallel, decay_chunk])
def test_bad_input_names_the_argument(form):
    q, k, v, g, s0 = make(2, 6, 3, 4, 5, "scalar")
    cases = [
        ((q, k[..., :3], v, g), {}, ValueError, "q and k"),
        ((q, k, v[:, :5], g), {}, ValueError, "v must match"),
        ((q, k, v.double(), g), {}, TypeError, "dtype"),
        ((q, k, v, g[..., :2]), {}, ValueError, "g must be"),
        ((q, k, v, g[:, :, :, None].expand(2, 6, 3, 5)), {}, ValueError, "g must be"),
        ((q, k, v, g.double()), {}, TypeError, "g must have dtype"),
        ((q, k, v, g), {"initial_state": s0[..., :4]}, ValueError, "initial_state"),
        ((q, k, v, g), {"initial_state": s0.double()}, TypeError, "initial_state"),
        ((q[0], k[0], v[0], g[0]), {}, ValueError, "q must have shape"),
    ]
    for args, kw, err, match in cases:
        with pytest.raises(err, match=match):
            form(*args, **kw)


def test_bad_step_and_chunk_arguments():
    q, k, v, g, s0 = make(2, 1, 3, 4, 5, "dim")
    with pytest.raises(ValueError, match="state"):
        decay_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0[:1])
    with pytest.raises(ValueError, match="g must be"):
        decay_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0, :, :2], s0)
    with pytest.raises(ValueError, match="q must have shape"):
        decay_step(q, k, v, g, s0)
    with pytest.raises(ValueError, match="chunk_size"):
        decay_chunk(q, k, v, g, chunk_size=0)
    o, s = decay_step(q[:, 0], k[:, 0], v[:, 0], None, None)  # state None means zeros
    torch.testing.assert_close(o, decay_step(q[:, 0], k[:, 0], v[:, 0], None, torch.zeros_like(s0))[0])
