"""The delta-rule ops: step, recurrent, parallel and chunk forms agree, in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from looplm.ops import delta_chunkwise
from looplm.ops.delta_rule import delta_chunk, delta_parallel, delta_recurrent, delta_step


def make(b, t, h, dk, dv, *, gated, seed=0, dtype=torch.float32, decay=1.0, state=True):
    """Random inputs: unit-norm keys, beta in (0, 1), log-decays g in (-decay, 0]."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, k, v = rnd(b, t, h, dk), F.normalize(rnd(b, t, h, dk), dim=-1), rnd(b, t, h, dv)
    beta = torch.rand(b, t, h, generator=gen, dtype=dtype)
    g = -decay * torch.rand(b, t, h, generator=gen, dtype=dtype) if gated else None
    s0 = rnd(b, h, dk, dv) if state else None
    return q, k, v, beta, g, s0


def assert_close(got, want, rel=1e-4):
    """Max abs error within ``rel`` of the reference's scale (its max magnitude)."""
    scale = want.abs().max().clamp_min(1e-6)
    err = (got - want).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x scale {scale:.3g}"


shapes = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 70),  # T
    st.integers(1, 3),  # H
    st.sampled_from([4, 8, 16]),  # dk
    st.sampled_from([3, 8, 16]),  # dv
    st.sampled_from([1, 5, 16, 64]),  # chunk
)


@given(shapes, st.booleans(), st.booleans())
def test_forms_agree(shape, gated, with_state):
    b, t, h, dk, dv, c = shape
    q, k, v, beta, g, s0 = make(b, t, h, dk, dv, gated=gated, state=with_state)
    o_ref, s_ref = delta_recurrent(q, k, v, beta, g, initial_state=s0)
    for o, s in (
        delta_parallel(q, k, v, beta, g, initial_state=s0),
        delta_chunk(q, k, v, beta, g, initial_state=s0, chunk_size=c),
    ):
        assert o.shape == (b, t, h, dv) and s.shape == (b, h, dk, dv)
        assert_close(o, o_ref)
        assert_close(s, s_ref)


def test_scale_argument():
    q, k, v, beta, g, _ = make(1, 9, 2, 8, 8, gated=True)
    o1, _ = delta_chunk(q, k, v, beta, g, scale=0.3, chunk_size=4)
    o2, _ = delta_recurrent(q * (0.3 / 8**-0.5), k, v, beta, g)
    assert_close(o1, o2)


def grads_and_outputs(fn, inputs, gated, **kw):
    """Outputs of ``fn`` and the gradients of a fixed weighted loss w.r.t. every input."""
    xs = [x.clone().requires_grad_() for x in inputs]
    q_, k_, v_, beta_, *rest = xs
    g_ = rest[0] if gated else None
    o, s = fn(q_, k_, v_, beta_, g_, initial_state=rest[-1], **kw)
    w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    ((o * w).sum() + s.square().sum()).backward()
    return [o.detach(), s.detach()] + [x.grad for x in xs]


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_agree(gated):
    q, k, v, beta, g, s0 = make(2, 23, 2, 8, 6, gated=gated, dtype=torch.float64, seed=1)
    inputs = [x for x in (q, k, v, beta, g, s0) if x is not None]
    want = grads_and_outputs(delta_recurrent, inputs, gated)
    for got in (grads_and_outputs(delta_chunk, inputs, gated, chunk_size=5),
                grads_and_outputs(delta_parallel, inputs, gated)):
        for a, b in zip(got, want):
            assert_close(a, b, rel=1e-9)


@pytest.mark.parametrize("gated", [False, True])
def test_kernel_tiles_change_nothing(gated, monkeypatch):
    """On one thread the kernel runs its per-chunk parts in tiles of chunk-groups; uneven tiles
    (7 chunks x 4 groups in tiles of 3) give the reference's outputs and gradients."""
    monkeypatch.setattr(delta_chunkwise, "TILE_ELEMENTS", 3 * 4 * 8)  # 3 x [C=4, dk=8]
    assert torch.get_num_threads() == 1
    q, k, v, beta, g, s0 = make(2, 27, 2, 8, 6, gated=gated, dtype=torch.float64, seed=3)
    inputs = [x for x in (q, k, v, beta, g, s0) if x is not None]
    want = grads_and_outputs(delta_recurrent, inputs, gated)
    for a, b in zip(grads_and_outputs(delta_chunk, inputs, gated, chunk_size=4), want):
        assert_close(a, b, rel=1e-9)


def test_gradcheck_chunk():
    q, k, v, beta, g, s0 = make(1, 7, 1, 3, 2, gated=True, dtype=torch.float64, seed=2)
    xs = [x.requires_grad_() for x in (q, k, v, beta, g, s0)]

    def fn(q, k, v, beta, g, s0):
        return delta_chunk(q, k, v, beta, g, initial_state=s0, chunk_size=3)

    assert torch.autograd.gradcheck(fn, xs)


@pytest.mark.parametrize("form", [delta_recurrent, delta_parallel, delta_chunk])
def test_strong_decay_is_finite(form):
    q, k, v, beta, g, s0 = make(1, 130, 2, 8, 8, gated=True, decay=80.0)
    g[:, ::7] = -1e4  # near-total forgetting at some steps
    xs = [x.requires_grad_() for x in (q, k, v, beta, g, s0)]
    o, s = form(*xs[:5], initial_state=xs[5])
    (o.sum() + s.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(x.grad).all() for x in xs)
    if form is delta_chunk:
        o_ref, s_ref = delta_recurrent(*(x.detach() for x in xs[:5]), initial_state=xs[5].detach())
        assert_close(o, o_ref)
        assert_close(s, s_ref)


@given(st.integers(1, 40), st.integers(0, 40), st.booleans())
def test_prefill_then_decode(t_prefill, t_decode, gated):
    t = t_prefill + t_decode
    q, k, v, beta, g, s0 = make(2, t, 2, 8, 4, gated=gated)
    o_all, s_all = delta_chunk(q, k, v, beta, g, initial_state=s0, chunk_size=16)
    o_pre, state = delta_chunk(
        q[:, :t_prefill], k[:, :t_prefill], v[:, :t_prefill], beta[:, :t_prefill],
        None if g is None else g[:, :t_prefill], initial_state=s0, chunk_size=16,
    )
    outs = [o_pre]
    for i in range(t_prefill, t):
        g_i = None if g is None else g[:, i]
        o, state = delta_step(q[:, i], k[:, i], v[:, i], beta[:, i], g_i, state=state)
        outs.append(o[:, None])
    assert_close(torch.cat(outs, dim=1), o_all)
    assert_close(state, s_all)


@pytest.mark.parametrize("gated", [False, True])
def test_zero_key_beta_gate_is_exact_identity(gated):
    q, k, v, beta, g, s0 = make(1, 20, 2, 8, 8, gated=gated)
    skip = torch.zeros(20, dtype=torch.bool)
    skip[[0, 3, 4, 11, 19]] = True
    k2, beta2 = k.clone(), beta.clone()
    k2[:, skip], beta2[:, skip] = 0.0, 0.0
    g2 = None if g is None else g.clone()
    if g2 is not None:
        g2[:, skip] = 0.0
    keep = ~skip
    for form in (delta_recurrent, delta_parallel, delta_chunk):
        _, s_skip = form(q, k2, v, beta2, g2, initial_state=s0)
        _, s_kept = form(q[:, keep], k[:, keep], v[:, keep], beta[:, keep],
                         None if g is None else g[:, keep], initial_state=s0)
        assert_close(s_skip, s_kept, rel=1e-5)
    _, s = delta_step(q[:, 0], torch.zeros_like(k[:, 0]), v[:, 0], torch.zeros_like(beta[:, 0]),
                      None if g is None else torch.zeros_like(g[:, 0]), state=s0)
    assert torch.equal(s, s0)


def test_low_precision_inputs_keep_dtype():
    q, k, v, beta, g, s0 = make(1, 33, 2, 8, 8, gated=True)
    ref, _ = delta_chunk(q, k, v, beta, g, initial_state=s0)
    lo = [x.to(torch.bfloat16) for x in (q, k, v, beta, g, s0)]
    o, s = delta_chunk(*lo[:5], initial_state=lo[5], chunk_size=16)
    assert o.dtype == s.dtype == torch.bfloat16
    assert_close(o.float(), ref, rel=5e-2)


def test_empty_sequence():
    q, k, v, beta, g, s0 = make(1, 0, 2, 8, 4, gated=True)
    o, s = delta_chunk(q, k, v, beta, g, initial_state=s0)
    assert o.shape == (1, 0, 2, 4) and torch.equal(s, s0)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(k=torch.randn(1, 5, 2, 6)), "q and k"),
        (dict(v=torch.randn(1, 4, 2, 8)), "v must match"),
        (dict(beta=torch.rand(1, 5, 3)), "beta"),
        (dict(beta=None), "beta"),
        (dict(g=torch.rand(1, 5, 2, 8)), "g"),
        (dict(g=torch.rand(1, 5, 2, dtype=torch.float64)), "g"),
        (dict(initial_state=torch.zeros(1, 2, 8, 3)), "initial_state"),
        (dict(q=torch.randn(5, 2, 8)), "q"),
        (dict(v=torch.randn(1, 5, 2, 4).double()), "dtype"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(scale="big"), "scale"),
    ],
)
def test_bad_input_names_argument(change, name):
    args = dict(q=torch.randn(1, 5, 2, 8), k=torch.randn(1, 5, 2, 8), v=torch.randn(1, 5, 2, 4),
                beta=torch.rand(1, 5, 2), g=None, initial_state=None, chunk_size=4, scale=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=name):
        delta_chunk(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), args.pop("g"), **args)


def test_step_bad_state_names_argument():
    q = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="state"):
        delta_step(q, q, torch.randn(1, 2, 4), torch.rand(1, 2), state=torch.zeros(1, 2, 8, 8))
