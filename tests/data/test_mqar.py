"""MQAR generator: disjoint key/value halves, correct answers, exact loss mask, determinism."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from looplm.data.mqar import IGNORE_INDEX, make_mqar


@given(
    n_pairs=st.integers(1, 16),
    extra=st.integers(0, 40),
    half=st.integers(16, 200),
    seed=st.integers(0, 10_000),
)
def test_answers_are_the_values_paired_earlier(n_pairs: int, extra: int, half: int, seed: int) -> None:
    vocab, seq_len = 2 * half, 4 * n_pairs + extra
    b = make_mqar(3, vocab_size=vocab, seq_len=seq_len, n_pairs=n_pairs, seed=seed)
    assert b.inputs.shape == b.targets.shape == (3, seq_len)
    for x, y in zip(b.inputs.tolist(), b.targets.tolist()):
        keys, values = x[0 : 2 * n_pairs : 2], x[1 : 2 * n_pairs : 2]
        assert all(k < half for k in keys) and all(v >= half for v in values)
        assert len(set(keys)) == len(set(values)) == n_pairs
        pairs = dict(zip(keys, values))
        answered = [t for t, lab in enumerate(y) if lab != IGNORE_INDEX]
        # the mask covers exactly one answer per key, all after the context
        assert len(answered) == n_pairs
        assert sorted(x[t] for t in answered) == sorted(keys)
        for t in answered:
            assert t >= 2 * n_pairs
            assert y[t] == pairs[x[t]] == x[t + 1]


def test_same_seed_same_data_other_seed_other_data() -> None:
    a = make_mqar(8, vocab_size=512, seq_len=128, n_pairs=8, seed=3)
    b = make_mqar(8, vocab_size=512, seq_len=128, n_pairs=8, seed=3)
    c = make_mqar(8, vocab_size=512, seq_len=128, n_pairs=8, seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_gaps_follow_a_power_law_short_gaps_common() -> None:
    b = make_mqar(400, vocab_size=1024, seq_len=512, n_pairs=4, seed=0)
    pos = (b.targets != IGNORE_INDEX).nonzero()[:, 1].float() - 8
    n_slots = (512 - 8) // 2
    # far more queries in the first tenth of the query region than in the last tenth
    first = (pos < 2 * n_slots / 10).sum()
    last = (pos >= 2 * n_slots * 9 / 10).sum()
    assert first > 3 * last


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_pairs=0), "n_pairs"),
        (dict(vocab_size=7), "vocab_size"),
        (dict(seq_len=10, n_pairs=4), "seq_len"),
        (dict(vocab_size=8, n_pairs=5, seq_len=64), "n_pairs"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make_mqar(2, **kwargs)
