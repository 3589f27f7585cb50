"""Mixture-of-Depths, learned halting, mixture of memories and the recurrent MoE router: their
exact reductions, the properties their papers define them by, and step decoding == full forward."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.layers.mixers import MIXERS, build_mixer
from looplm.layers.mom import MixtureOfMemories
from looplm.routers import HaltingRouter, causal_routing
from looplm.train.loop import evaluate
from tests.model.test_decode import decode
from tests.model.util import model, tokens


def randomize_routers(m, std=1.0, seed=3):
    """Router weights large enough that decisions differ between tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("router.", "mod_routers.")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


# --- Mixture-of-Depths -------------------------------------------------------------------------

def test_mod_capacity_one_is_the_plain_model():
    plain, mod = model(), model(layer_router="mod", mod_capacity=1.0)
    assert plain.state_dict().keys() == mod.state_dict().keys()
    x = tokens()
    torch.testing.assert_close(mod(x).logits, plain(x).logits, atol=0, rtol=0)


def test_mod_routes_every_other_layer():
    m = model(layer_router="mod", mod_capacity=0.5, n_prelude=1, n_core=2, n_coda=1)
    assert sorted(m.mod_routers) == ["coda_0", "core_0"]  # global layers 1 and 3


@settings(max_examples=10, deadline=None)
@given(T=st.integers(2, 16), capacity=st.sampled_from([0.125, 0.25, 0.5, 0.75]))
def test_mod_layer_runs_on_ceil_c_T_tokens(T, capacity):
    m = model(layer_router="mod", mod_capacity=capacity)
    seen = []
    m.coda[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    m(tokens(length=T))
    assert seen == [math.ceil(capacity * T)]


@pytest.mark.parametrize("kw", [{}, {"router": "expert_choice", "n_recursions": 2, "capacity": [1.0, 1.0]}])
def test_mod_configured_flops_are_the_counted_ones(kw):
    m = model(layer_router="mod", mod_capacity=0.25, **kw)
    plain = model(**kw)
    counted = m(tokens(length=64)).stats["flops_per_token"]
    assert m.flops_per_token(64) == pytest.approx(counted)
    assert counted < plain(tokens(length=64)).stats["flops_per_token"]


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet", "mom"])
def test_mod_decoding_with_causal_predictor_equals_forward(mixer):
    m = randomize_routers(model(layer_router="mod", mod_capacity=0.5, selection="threshold", mixer=mixer,
                                attn_every=2))
    x = tokens()
    full = m(x)
    got, sizes = decode(m, x)
    torch.testing.assert_close(got, full.logits, atol=1e-5, rtol=1e-5)


def test_mod_skipped_token_leaves_the_state():
    m = model(layer_router="mod", mod_capacity=0.5, selection="threshold", mixer="gated_deltanet")
    x = tokens(length=5)
    state = m(x, use_cache=True).state
    with torch.no_grad():
        m.mod_routers["coda_0"].bias.fill_(-100.0)  # nobody passes the last layer
    new = m(x[:, :1], state=state).state
    for key in state.layers:
        same = torch.equal(new.layers[key].ssm, state.layers[key].ssm)
        assert same == (key == "coda.0"), key


def test_mod_topk_and_causal_are_both_evaluated():
    m = randomize_routers(model(layer_router="mod", mod_capacity=0.5))
    batches = [(tokens(), tokens(seed=2))]
    ev = evaluate(m, batches)
    with causal_routing(m), torch.no_grad():
        causal = m(*batches[0]).loss.item()
    with torch.no_grad():
        topk = m(*batches[0]).loss.item()
    assert ev["val_loss"] == pytest.approx(causal) and ev["val_loss_topk"] == pytest.approx(topk)
    assert causal != topk


# --- learned halting ---------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 5), threshold=st.sampled_from([0.0, 0.1, 0.3]), seed=st.integers(0, 1000))
def test_halting_weights_sum_to_one(n, threshold, seed):
    router = HaltingRouter(4, n, threshold, 0.5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 2)
    rem, active, total, lams = torch.ones(3, 5), torch.ones(3, 5, dtype=torch.bool), 0, []
    for r in range(n):
        h = torch.randn(3, 5, 4, generator=g)
        lams.append(router.halt(r, h))
        w, rem, active = router.step(r, h, rem, active)
        total = total + w
        if threshold == 0:  # PonderNet's p_r = λ_r Π_{j<r} (1 − λ_j)
            expect = lams[-1] * torch.stack([1 - lam for lam in lams[:-1]]).prod(0) if r else lams[0]
            torch.testing.assert_close(w, expect)
    torch.testing.assert_close(total, torch.ones(3, 5))
    assert not active.any()


def test_halting_threshold_zero_runs_every_recursion():
    m = randomize_routers(model(router="halting", n_recursions=3, halting_threshold=0.0))
    assert (m(tokens()).depth == 3).all()
    m.router.threshold = 0.4
    assert (m(tokens()).depth < 3).any()


def test_halting_output_is_the_weighted_sum_of_recursions():
    m = randomize_routers(model(router="halting", n_recursions=3, halting_threshold=0.0))
    states, weights, coda_in = [], [], []
    m.core[-1].register_forward_hook(lambda mod, args, out: states.append(out[0]))
    step = m.router.step
    m.router.step = lambda *a, **k: weights.append(step(*a, **k)[0]) or step(*a, **k)
    m.coda[0].register_forward_pre_hook(lambda mod, args: coda_in.append(args[0]))
    m(tokens())
    explicit = sum(w[..., None] * h for w, h in zip(weights, states))
    torch.testing.assert_close(coda_in[0], explicit)


def test_act_ponder_cost_is_the_expected_depth():
    m = model(router="halting", n_recursions=3, halting_threshold=0.0, halting_loss="act")
    out = m(tokens())  # zero-initialised router: λ = 1/2, reaching 1, 1/2, 1/4
    assert out.stats["router_loss"] == pytest.approx(1.75)


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet"])
def test_halting_decoding_equals_forward(mixer):
    m = randomize_routers(model(router="halting", n_recursions=3, halting_threshold=0.3, mixer=mixer))
    x = tokens()
    full = m(x)
    assert (full.depth < 3).any() and (full.depth > 1).any()
    got, _ = decode(m, x)
    torch.testing.assert_close(got, full.logits, atol=1e-5, rtol=1e-5)
    got, _ = decode(m, x, full.depth)  # the replayed routing gives the same
    torch.testing.assert_close(got, full.logits, atol=1e-5, rtol=1e-5)


# --- mixture of memories -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gated_deltanet", "gla", "linear"])
def test_mom_one_memory_is_the_mixer(name):
    torch.manual_seed(0)
    mom = MixtureOfMemories(16, 2, memory=MIXERS[name].cls, memories=1, top_k=1, chunk_size=4)
    plain = build_mixer(name, 16, 2, chunk_size=4)
    plain.load_state_dict(mom.memories[0].state_dict())
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(mom(x)[0], plain(x)[0], atol=0, rtol=0)
    assert mom.init_state(2).nbytes() == plain.init_state(2).nbytes()


@pytest.mark.parametrize("memories,shared", [(2, False), (4, False), (4, True)])
def test_mom_state_is_m_times_the_mixer(memories, shared):
    mom = MixtureOfMemories(16, 2, memory=MIXERS["gated_deltanet"].cls, memories=memories, top_k=2,
                            shared=shared)
    one = build_mixer("gated_deltanet", 16, 2).init_state(3).nbytes()
    assert mom.init_state(3).nbytes() == (memories + shared) * one


def test_mom_token_updates_only_its_memories():
    torch.manual_seed(0)
    mom = MixtureOfMemories(16, 2, memory=MIXERS["gated_deltanet"].cls, memories=4, top_k=1)
    x = torch.randn(1, 1, 16)
    s0 = mom.init_state(1)
    _, s1 = mom(x, s0)
    chosen = int(mom.route(x)[0, 0].argmax())
    changed = [not torch.equal(a.ssm, b.ssm) for a, b in zip(s0.memories, s1.memories)]
    assert changed == [i == chosen for i in range(4)]


def test_mom_bad_config():
    with pytest.raises(Exception, match="memory_top_k"):
        model(mixer="mom", memories=2, memory_top_k=3)
    with pytest.raises(Exception, match="memory_mixer"):
        model(mixer="mom", memory_mixer="attention")


# --- recurrent MoE router ----------------------------------------------------------------------

def test_recurrent_router_with_zero_gru_is_the_independent_router():
    kw = dict(ffn="moe", n_experts=4, top_k=2)
    linear, rec = model(**kw), model(moe_router="recurrent", **kw)
    missing = rec.load_state_dict(linear.state_dict(), strict=False).missing_keys
    assert missing and all(".route_" in k or ".gru." in k for k in missing)
    x = tokens()
    assert not torch.allclose(rec(x).logits, linear(x).logits)  # the GRU's state changes the routing
    with torch.no_grad():
        for name, p in rec.named_parameters():
            if ".gru." in name:
                p.zero_()
    torch.testing.assert_close(rec(x).logits, linear(x).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("router", ["none", "expert_choice"])
def test_recurrent_router_decoding_equals_forward(router):
    n = 1 if router == "none" else 3
    m = model(ffn="moe", n_experts=4, top_k=2, moe_router="recurrent", router=router, n_recursions=n,
              selection="threshold")
    x = tokens()
    full = m(x)
    got, _ = decode(m, x)
    torch.testing.assert_close(got, full.logits, atol=1e-5, rtol=1e-5)


def test_recurrent_router_gets_gradients():
    m = model(ffn="moe", n_experts=4, top_k=2, moe_router="recurrent").train()
    x = tokens()
    out = m(x, x)
    (out.loss + out.aux_loss).backward()
    grads = {n: p.grad for n, p in m.named_parameters() if ".gru." in n or ".route_" in n}
    assert all(g is not None for g in grads.values())
    # the first MoE layer's GRU starts from a zero state, so its weight_hh alone has no gradient
    assert all(g.abs().sum() > 0 for n, g in grads.items() if not n.startswith("prelude.0.ffn.gru.weight_hh"))

