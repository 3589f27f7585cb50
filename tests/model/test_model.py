"""LoopLM structure, routing, FLOPs accounting and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.routers import gather_index, topk_keep
from tests.model.util import VOCAB, model, tokens


def stacked(m, x, layers):
    """Reference: embed, the given layers one after another, norm, tied head."""
    h = m.embed(x)
    for b in layers:
        h, _, _ = b(h)
    return F.linear(m.norm(h), m.embed.weight)


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet"])
def test_one_recursion_no_router_is_a_plain_stack(mixer):
    m = model(mixer=mixer)
    x = tokens()
    ref = stacked(m, x, [*m.prelude, *m.core, *m.coda])
    torch.testing.assert_close(m(x).logits, ref, atol=1e-6, rtol=1e-6)


def test_recursion_without_router_cycles_the_shared_core():
    m = model(n_recursions=3, sharing="middle_cycle")
    x = tokens()
    ref = stacked(m, x, [*m.prelude, *m.core, *m.core, *m.core, *m.coda])
    torch.testing.assert_close(m(x).logits, ref, atol=1e-5, rtol=1e-5)
    assert m.num_params(unique=False) - m.num_params() == 2 * sum(p.numel() for p in m.core.parameters())


def test_loss_is_cross_entropy_ignoring_minus_100_and_padding():
    m = model()
    x = tokens()
    y = tokens(seed=3)
    y[0, :4] = -100
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, -2:] = False
    out = m(x, y, mask=mask)
    keep = (y != -100) & mask
    ref = F.cross_entropy(out.logits[keep], y[keep])
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("untied", [False, True])
def test_logits_at_answer_positions_give_the_full_loss_and_gradients(untied):
    """A sparse loss (MQAR's answers) with the head run only where it is supervised: the same loss,
    logits and gradients as the full head, and the head's FLOPs counted for those positions only."""
    m = model(tie_embeddings=not untied).train()
    x = tokens()
    y = torch.full_like(x, -100)
    y[0, 3], y[1, 7], y[1, 10] = 5, 9, 11
    at = y != -100
    full = m(x, y)
    full_grads = torch.autograd.grad(full.loss, list(m.parameters()))
    part = m(x, y, logits_at=at)
    part_grads = torch.autograd.grad(part.loss, list(m.parameters()))
    assert part.logits.shape == (3, VOCAB)
    torch.testing.assert_close(part.logits, full.logits[at])
    torch.testing.assert_close(part.loss, full.loss)
    for a, b in zip(part_grads, full_grads):
        torch.testing.assert_close(a, b)
    head = 2.0 * m.config.d_model * VOCAB
    assert full.stats["flops"] - part.stats["flops"] == pytest.approx(head * (x.numel() - 3))
    with pytest.raises(ValueError, match="logits_at"):
        m(x, y, logits_at=at.long())


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_router_gets_gradients_and_aux_loss(router):
    m = model(router=router, n_recursions=3).train()
    out = m(tokens(), tokens(seed=2))
    assert out.aux_loss > 0 and "router_loss" in out.stats
    (out.loss + out.aux_loss).backward()
    grads = [p.grad for p in m.router.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None for p in m.core.parameters() if p.requires_grad)


def test_expert_choice_keeps_capacity_hierarchically():
    caps = [1.0, 0.5, 0.25]
    m = model(router="expert_choice", n_recursions=3, capacity=caps)
    x = tokens(batch=3, length=12)
    depth = m(x).depth
    for r, c in enumerate(caps):
        assert ((depth > r).sum(1) == math.ceil(c * 12)).all()
    out = m(x, depth=depth)  # replaying the same routing is a fixed point
    assert torch.equal(out.depth, depth)


def test_threshold_selection_is_causal():
    m = model(router="expert_choice", selection="threshold", n_recursions=3)
    x = tokens(length=12)
    full = m(x)
    head = m(x[:, :5])
    assert torch.equal(full.depth[:, :5], head.depth)
    torch.testing.assert_close(full.logits[:, :5], head.logits, atol=1e-5, rtol=1e-5)


def test_token_choice_depth_matches_reach_stats():
    m = model(router="token_choice", n_recursions=3)
    with torch.no_grad():
        m.router.proj.weight.normal_(0, 1.0)
    out = m(tokens(batch=4))
    reach = [(out.depth > r).float().mean().item() for r in range(3)]
    assert out.stats["reach"] == pytest.approx(reach)
    assert out.depth.min() >= 1 and out.depth.max() <= 3


def test_gather_really_shrinks_the_core_input():
    """With capacity 1, 1/3, 1/3 the core's tensors at recursions 2 and 3 hold ⌈T/3⌉ tokens."""
    m = model(router="expert_choice", n_recursions=3, capacity=[1, 1 / 3, 1 / 3])
    widths = []
    m.core[0].register_forward_pre_hook(lambda mod, args: widths.append(args[0].shape[1]))
    m(tokens(length=12))
    assert widths == [12, 4, 4]


def test_expert_choice_spends_fewer_flops_than_all_tokens():
    kw = dict(n_recursions=3, mixer="attention", ffn="moe", n_experts=2, top_k=1)
    x = tokens(length=24)
    every = model(**kw)(x).stats
    mor = model(router="expert_choice", capacity=[1, 1 / 3, 1 / 3], **kw)(x).stats
    assert mor["flops"] < 0.75 * every["flops"]
    assert mor["reach"] == pytest.approx([1, 1 / 3, 1 / 3])


def test_flops_of_a_dense_transformer_by_hand():
    """Forward FLOPs = 2 · matmul weights · tokens + 4 · d · causal pairs per layer + head."""
    d, f, V, T, L = 32, 48, VOCAB, 10, 4
    m = model(n_prelude=1, n_core=2, n_coda=1)
    per_layer = 2 * (4 * d * d + 3 * d * f) * T + 4 * d * T * (T + 1) // 2
    expected = L * per_layer + 2 * d * V * T
    out = m(tokens(batch=1, length=T))
    assert out.stats["flops"] == pytest.approx(expected)
    assert out.stats["flops_per_token"] == pytest.approx(3 * expected / T)
    assert m.flops_per_token(T) == pytest.approx(3 * expected / T)


def test_flops_count_only_cached_keys_while_decoding():
    d, f, V = 32, 48, VOCAB
    m = model(n_prelude=0, n_coda=0)
    pre = m(tokens(batch=1, length=5), use_cache=True)
    out = m(tokens(batch=1, length=1), state=pre.state)
    expected = 2 * (2 * (4 * d * d + 3 * d * f) + d * V) + 2 * 4 * d * 6
    assert out.stats["flops"] == pytest.approx(expected)


@given(st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=1, max_size=4))
def test_gather_index_left_aligns_in_order(rows):
    keep = torch.tensor(rows)
    index, valid = gather_index(keep)
    assert index.shape[1] == int(keep.sum(1).max())
    for b in range(keep.shape[0]):
        n = int(keep[b].sum())
        assert valid[b].tolist() == [True] * n + [False] * (index.shape[1] - n)
        assert index[b, :n].tolist() == keep[b].nonzero().flatten().tolist()


@given(st.integers(1, 5), st.integers(0, 2 ** 16))
def test_topk_keep_picks_best_active(k, seed):
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(2, 9, generator=g)
    active = torch.rand(2, 9, generator=g) > 0.3
    keep = topk_keep(logit, active, torch.tensor([k, k]))
    for b in range(2):
        assert int(keep[b].sum()) == min(k, int(active[b].sum()))
        assert not (keep[b] & ~active[b]).any()
        if keep[b].any() and (active[b] & ~keep[b]).any():
            assert logit[b][keep[b]].min() >= logit[b][active[b] & ~keep[b]].max()


def test_bad_inputs_raise():
    m = model()
    x = tokens()
    with pytest.raises(ValueError, match="input_ids"):
        m(x.float())
    with pytest.raises(TypeError, match="mask"):
        m(x, mask=torch.ones_like(x))
    with pytest.raises(ValueError, match="targets"):
        m(x, x[:, :3])
    with pytest.raises(ValueError, match="state"):
        m(x, state=m.init_state(5))


@given(st.lists(st.booleans(), min_size=10, max_size=10).filter(any))
@settings(max_examples=10)
def test_masked_tokens_anywhere_are_as_if_absent(keep):
    """A mask with holes anywhere equals running the row without the masked tokens."""
    m = _HYBRID_MOR
    x = tokens(batch=1, length=10)
    mask = torch.tensor([keep])
    got = m(x, mask=mask).logits[mask]
    ref = m(x[mask][None]).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


_HYBRID_MOR = model(mixer="gated_deltanet", attn_every=2, router="expert_choice", selection="threshold",
                    n_recursions=3)


@pytest.mark.parametrize("mixer", ["attention", "retention"])
def test_runs_in_bfloat16(mixer):
    m = model(mixer=mixer, router="token_choice", n_recursions=2).to(torch.bfloat16)
    x = tokens()
    out = m(x, x, use_cache=True)
    step = m(x[:, :1], state=out.state)
    assert out.logits.dtype == step.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)


def test_moe_flops_count_only_experts_that_ran():
    x = tokens(batch=1, length=12)
    dense_route = model(ffn="moe", n_experts=4, top_k=2, shared_expert=True)
    assert dense_route(x).stats["flops_per_token"] == pytest.approx(dense_route.flops_per_token(12))
    zero = model(ffn="moe", n_experts=4, top_k=2, zero_experts=3)  # zero, copy, constant experts
    stats = zero(x).stats
    assert len(stats["expert_load"]) == 7
    share = sum(stats["expert_load"][:4])  # share of slots sent to real experts
    assert share < 1
    saved = (1 - share) * 2 * zero.core[0].ffn_cost.expert * 2 * 4  # top_k · 2 FLOPs · 4 layers
    assert stats["flops_per_token"] == pytest.approx(zero.flops_per_token(12) - 3 * saved, rel=1e-4)


def test_ffn_none_is_a_mixer_only_model():
    """``ffn="none"``: no FFN weights, and the FLOPs of the dense model minus its FFNs' matmuls."""
    dense, bare = model(mixer="gated_deltanet"), model(mixer="gated_deltanet", ffn="none")
    layers = [*dense.prelude, *dense.core, *dense.coda]
    assert all(b.ffn is None and b.ffn_norm is None for b in [*bare.prelude, *bare.core, *bare.coda])
    ffn_params = sum(p.numel() for b in layers for p in (*b.ffn.parameters(), *b.ffn_norm.parameters()))
    n_params = [sum(p.numel() for p in m.parameters()) for m in (dense, bare)]
    assert n_params[1] == n_params[0] - ffn_params
    x = tokens()
    ffn_flops = 2 * x.numel() * sum(b.ffn_cost.dense for b in layers)
    assert bare(x).stats["flops"] == pytest.approx(dense(x).stats["flops"] - ffn_flops, rel=1e-9)
