"""Self-speculative decoding: lossless greedy output for every model family and draft kind,
the sampled distribution is the model's, rollback restores the state of the accepted tokens,
bad inputs fail with one clear error."""

from __future__ import annotations

import math

import pytest
import torch

from looplm import speculative
from looplm.draft_heads import ExitHead, new_heads, save_heads
from looplm.errors import CheckpointError, ConfigError
from looplm.generate import generate_ids
from looplm.layers import kv_cache
from looplm.layers.mixers import KVState, RecurrentState
from looplm.speculative import SpecStats, build_drafter, speculative_ids, truncate_state, verify
from tests.model.util import model

# init_std=1 gives tiny random models varied greedy outputs, so drafts are also rejected
MODELS = {
    "attention": dict(mixer="attention"),
    "gated_deltanet": dict(mixer="gated_deltanet"),
    "hybrid": dict(mixer="gated_deltanet", attn_every=2),
    "mor": dict(mixer="attention", n_recursions=3, router="token_choice"),
    "mor_gdn": dict(mixer="gated_deltanet", n_recursions=3, router="expert_choice", selection="threshold"),
    "moe": dict(mixer="attention", ffn="moe", n_experts=3, top_k=2),
}
PROMPT = [3, 4, 5, 3, 4, 5, 3, 4, 7, 1, 2, 9, 3, 4]


def _model(name):
    return model(init_std=1.0, **MODELS[name])


def _heads_file(m, kind, count, path, vocab=None):
    torch.manual_seed(5)
    heads = new_heads(m, kind, count, vocab)
    with torch.no_grad():  # random weights: drafts that differ from the model's
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_heads(heads, path)
    return f"heads:{path}"


def _drafts(m, name, tmp_path):
    if m.config.n_recursions > 1:
        model_drafts = ["recursions:1", "recursions:2", "ngram:2+recursions:1"]
    else:
        model_drafts = ["layers:1", "layers:3", _heads_file(m, "exit", 2, tmp_path / "exit.safetensors"),
                        "ngram:2+layers:2"]
    shortlist = torch.arange(0, m.config.vocab_size, 2)  # Medusa heads drafting the even ids only
    medusa = _heads_file(m, "medusa", 3, tmp_path / "medusa.safetensors")
    return ["ngram:3", *model_drafts, medusa, "ngram:3+" + medusa,
            _heads_file(m, "medusa", 2, tmp_path / "even.safetensors", shortlist)]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_plain_decoding(name, tmp_path):
    m = _model(name)
    want = generate_ids(m, [PROMPT], max_new_tokens=24)[0]
    for spec in _drafts(m, name, tmp_path):
        for gamma in (1, 3, 5):
            stats = SpecStats()
            got = speculative_ids(m, PROMPT, draft=spec, gamma=gamma, max_new_tokens=24, stats=stats)
            assert got == want, (spec, gamma)
            assert stats.tokens == 23 and stats.accepted <= stats.proposed  # after the prompt's token
            assert stats.rounds + stats.accepted == 23  # one forward per round, one token of its own


def test_shortlisted_heads_draft_only_their_ids_and_round_trip(tmp_path):
    m = _model("attention")
    vocab = torch.tensor([1, 4, 9, 16])
    spec = _heads_file(m, "medusa", 3, tmp_path / "short.safetensors", vocab)
    drafter = build_drafter(m, spec)
    assert torch.equal(drafter.heads.vocab, vocab)
    drafter.observe(torch.randn(m.config.d_model))
    for temperature in (0.0, 1.0):
        sampler = speculative._Sampler(temperature, None, None, None, torch.Generator().manual_seed(0))
        drafts, qs = drafter.propose(PROMPT, 3, sampler)
        assert len(drafts) == 3 and set(drafts) <= set(vocab.tolist())
        if temperature:  # the draft distributions are zero outside the shortlist
            assert all(float(q[vocab].sum()) == pytest.approx(1.0) for q in qs)


def test_combined_draft_takes_turns():
    """``ngram:N+layers:K``: prompt lookup drafts where the context repeats, the model draft
    elsewhere; both kinds of round happen and the output is plain greedy decoding's."""
    m = _model("attention")
    drafter = build_drafter(m, "ngram:2+layers:2")
    assert isinstance(drafter, speculative.CombinedDrafter)
    used = []
    propose = drafter.propose

    def spy(context, g, sampler):
        out = propose(context, g, sampler)
        used.append(type(drafter.used).__name__)
        return out

    drafter.propose = spy
    got = speculative_ids(m, PROMPT, draft=drafter, gamma=3, max_new_tokens=24)
    assert got == generate_ids(m, [PROMPT], max_new_tokens=24)[0]
    assert {"NgramDrafter", "ModelDrafter"} <= set(used)


def test_drafts_are_rejected_and_accepted():
    """The parity test exercises both paths: some drafts are accepted, some rejected."""
    stats = SpecStats()
    speculative_ids(_model("hybrid"), PROMPT, draft="layers:2", gamma=3, max_new_tokens=24, stats=stats)
    assert 0 < stats.accepted < stats.proposed


def test_eos_ends_and_tokens_stream():
    m = _model("attention")
    want = generate_ids(m, [PROMPT], max_new_tokens=12)[0]
    got = speculative_ids(m, PROMPT, draft="layers:2", gamma=4, max_new_tokens=12, eos_id=want[5])
    assert got == want[:want.index(want[5]) + 1]


# ---------------------------------------------------------------- sampling keeps the distribution

V = 6


def _small():
    return model(vocab_size=V, init_std=1.0, mixer="attention")


def _exact_pairs(m, prompt, temperature, top_k):
    """The model's joint distribution of generated tokens 2 and 3 (the first token marginalised)."""
    sampler = speculative._Sampler(temperature, top_k, None, None, None)

    def probs(ids):
        return sampler.probs(m(torch.tensor([ids])).logits[:, -1])[0]

    joint = torch.zeros(V, V)
    with torch.no_grad():
        p1 = probs(prompt)
        for a in range(V):
            p2 = probs(prompt + [a])
            for b in range(V):
                joint[b] += p1[a] * p2[b] * probs(prompt + [a, b])
    return joint.double()


def _pair_counts(m, prompt, spec, draws, temperature, top_k):
    counts = torch.zeros(V, V, dtype=torch.float64)
    drafter = build_drafter(m, spec)
    for seed in range(draws):
        got = speculative_ids(m, prompt, draft=drafter, gamma=3, max_new_tokens=4, temperature=temperature,
                              top_k=top_k, seed=seed)
        counts[got[1], got[2]] += 1
    return counts


def _chi2_fails(counts, probs):
    """Whether a chi-square test rejects ``probs`` for ``counts`` at p = 0.001 (cells with an
    expected count below 5 pooled; Wilson-Hilferty approximation of the quantile)."""
    n = counts.sum()
    expected = probs.flatten() * n
    observed = counts.flatten()
    small = expected < 5
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    k = len(exp) - 1
    quantile = k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3
    return stat > quantile


@pytest.mark.parametrize("spec,temperature,top_k", [("layers:1", 1.0, None), ("ngram:2", 0.8, 4)])
def test_sampling_keeps_the_model_distribution(spec, temperature, top_k, monkeypatch):
    torch.manual_seed(0)
    m = _small()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    want = _exact_pairs(m, prompt, temperature, top_k)
    counts = _pair_counts(m, prompt, spec, 400, temperature, top_k)
    assert not _chi2_fails(counts, want)
    # the test has power: accepting every draft (a wrong rule) is detected with the same draws
    monkeypatch.setattr(speculative, "_accept", lambda logits, drafts, qs, sampler: (
        len(drafts), speculative._Sampler.pick(sampler, sampler.probs(logits[-1:])[0])))
    assert _chi2_fails(_pair_counts(m, prompt, spec, 400, temperature, top_k), want)


# ---------------------------------------------------------------- rollback


def _states_equal(a, b, exact):
    assert torch.equal(a.positions, b.positions) and a.layers.keys() == b.layers.keys()
    for key in a.layers:
        x, y = a.layers[key], b.layers[key]
        assert type(x) is type(y)
        parts = ("conv", "ssm") if isinstance(x, RecurrentState) else ("k", "v", "key_mask", "pos", "seen")
        for part in parts:
            if exact:
                assert torch.equal(getattr(x, part), getattr(y, part)), (key, part)
            else:
                torch.testing.assert_close(getattr(x, part), getattr(y, part), atol=1e-5, rtol=1e-5)


def _reject_second(m, state, pending):
    """(drafts whose first token is the model's greedy token and second is not, the model's
    token in place of the second)."""
    first = int(m(torch.tensor([pending]), state=state).logits[0, -1].argmax())
    second = int(m(torch.tensor([pending + [first]]), state=state).logits[0, -1].argmax())
    return [first, (second + 1) % m.config.vocab_size, 0], second


@pytest.mark.parametrize("name", ["gated_deltanet", "hybrid", "mor_gdn", "attention", "mor"])
def test_rollback_equals_decoding_only_the_accepted_tokens(name):
    m = _model(name)
    sampler = speculative._Sampler(0.0, None, None, None, None)
    with torch.no_grad():
        pre = m(torch.tensor([PROMPT]), use_cache=True)
        pending = [int(pre.logits[0, -1].argmax())]
        state = pre.state
        fixed = any(not isinstance(s, KVState) for s in state.layers.values())
        drafts, second = _reject_second(m, state, pending)
        n, token, new, new_pending, _ = verify(m, state, pending, drafts, [None] * 3, sampler, fixed)
        assert n == 1 and token == second
        accepted = pending + drafts[:n]
        if fixed:  # kept back, then committed: exactly the state of running the accepted tokens
            assert new is state and new_pending == accepted + [token]
            new = m(torch.tensor([new_pending[:-1]]), state=new).state
        else:
            assert new_pending == [token]
        want = m(torch.tensor([accepted]), state=state).state
        _states_equal(new, want, exact=fixed)


def test_lag_commits_exactly():
    """Past LAG held-back tokens one forward commits them; the state is that of those tokens."""
    m = _model("gated_deltanet")
    sampler = speculative._Sampler(0.0, None, None, None, None)
    with torch.no_grad():
        state = m(torch.tensor([PROMPT]), use_cache=True).state
        pending = list(range(1, speculative.LAG + 1))
        drafts, _ = _reject_second(m, state, pending)
        n, token, new, new_pending, _ = verify(m, state, pending, drafts, [None] * 3, sampler, True)
        assert new_pending == [token] and new is not state
        _states_equal(new, m(torch.tensor([pending + drafts[:n]]), state=state).state, exact=True)


def test_truncate_keeps_appending_in_place():
    m = _model("attention")
    with torch.no_grad():
        state = m(torch.tensor([PROMPT]), use_cache=True).state
        longer = m(torch.tensor([[1, 2, 3]]), state=state).state
        cut = truncate_state(longer, len(PROMPT) + 1)
        key = next(iter(cut.layers))
        assert cut.layers[key].k.shape[1] == len(PROMPT) + 1 and int(cut.positions[0]) == len(PROMPT) + 1
        again = m(torch.tensor([[5]]), state=cut).state
        assert again.layers[key].k.data_ptr() == longer.layers[key].k.data_ptr()  # no copy
    with pytest.raises(ValueError, match="truncate"):
        kv_cache.truncate(cut.layers[key], 10_000)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name,spec,match", [
    ("attention", "layers:4", "K must be in 1..3"),
    ("attention", "layers:0", "K must be in 1..3"),
    ("attention", "ngram:0", "N must be at least 1"),
    ("attention", "recursions:1", "needs a recursive model"),
    ("mor", "recursions:3", "R must be in 1..2"),
    ("mor", "layers:1", "non-recursive"),
    ("attention", "layers:x", "not an integer"),
    ("attention", "tree:2", "KIND:VALUE"),
    ("attention", "ngram", "KIND:VALUE"),
])
def test_bad_draft_specs(name, spec, match):
    with pytest.raises(ConfigError, match=match):
        build_drafter(_model(name), spec)


def test_bad_heads_files(tmp_path):
    m = _model("attention")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_drafter(m, f"heads:{tmp_path / 'none.safetensors'}")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a draft heads file"):
        build_drafter(m, f"heads:{tmp_path / 'junk.safetensors'}")
    save_heads(ExitHead(16, 1), tmp_path / "narrow.safetensors")
    with pytest.raises(CheckpointError, match="d_model=16"):
        build_drafter(m, f"heads:{tmp_path / 'narrow.safetensors'}")


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=0), "gamma must be an integer >= 1"),
    (dict(gamma=2.5), "gamma must be an integer >= 1"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(state_format="int8"), "state_format"),
])
def test_bad_arguments(kwargs, match):
    m = _model("attention")
    with pytest.raises(ValueError, match=match):
        speculative_ids(m, PROMPT, draft="ngram:2", max_new_tokens=4, **kwargs)


def test_one_prompt_at_a_time():
    m = _model("attention")
    tokens = speculative.iter_speculative(m, [PROMPT, PROMPT], drafter=build_drafter(m, "ngram:2"),
                                          max_new_tokens=3)
    with pytest.raises(ValueError, match="one prompt at a time"):
        next(tokens)
