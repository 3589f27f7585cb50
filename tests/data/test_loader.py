"""BatchSampler / eval_batches: shift, determinism, resume, rank shards == single process."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from looplm.data.loader import BatchSampler, eval_batches
from looplm.data.tokens import TokenFile, TokenWriter
from looplm.errors import ConfigError, DataError

TOKENS = np.arange(1000) % 251


def take(sampler, n):
    return [next(sampler) for _ in range(n)]


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_windows_are_shifted_slices(mode):
    tokens = np.arange(1000)  # each id names its own position
    x, y = next(BatchSampler(tokens, 8, 16, seed=3, mode=mode))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    starts = x[:, :1]
    assert torch.equal(x, starts + torch.arange(16)) and torch.equal(y, x + 1)
    assert int(starts.min()) >= 0 and int(y.max()) < len(tokens)


def test_sequential_reads_consecutive_windows_and_wraps():
    s = BatchSampler(np.arange(50), 2, 10, mode="sequential")
    starts = [int(x[i, 0]) for x, _ in take(s, 3) for i in range(2)]
    assert starts == [0, 10, 20, 30, 0, 10]  # (50 - 1) // 10 = 4 windows, then wrap


def test_seed_determinism():
    a = take(BatchSampler(TOKENS, 4, 8, seed=1), 3)
    b = take(BatchSampler(TOKENS, 4, 8, seed=1), 3)
    c = take(BatchSampler(TOKENS, 4, 8, seed=2), 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_reads_the_same_batches(mode):
    full = take(BatchSampler(TOKENS, 4, 8, seed=5, mode=mode), 6)
    first = BatchSampler(TOKENS, 4, 8, seed=5, mode=mode)
    take(first, 2)
    state = dict(first.state_dict())
    resumed = BatchSampler(TOKENS, 4, 8, seed=5, mode=mode)
    resumed.load_state_dict(state)
    assert state["step"] == 2
    for (x, y), (fx, fy) in zip(take(resumed, 4), full[2:]):
        assert torch.equal(x, fx) and torch.equal(y, fy)


@given(
    world=st.sampled_from([1, 2, 3, 4]),
    per_rank=st.integers(1, 4),
    step=st.integers(0, 10_000),
    mode=st.sampled_from(["random", "sequential"]),
)
def test_rank_shards_union_is_the_single_process_batch(world, per_rank, step, mode):
    batch = world * per_rank
    single_x, single_y = BatchSampler(TOKENS, batch, 12, seed=7, mode=mode).batch(step)
    shards = [BatchSampler(TOKENS, batch, 12, seed=7, mode=mode, rank=r, world_size=world).batch(step)
              for r in range(world)]
    assert all(x.shape == (per_rank, 12) for x, _ in shards)
    assert torch.equal(torch.cat([x for x, _ in shards]), single_x)
    assert torch.equal(torch.cat([y for _, y in shards]), single_y)


def test_resume_under_another_world_size():
    one = BatchSampler(TOKENS, 4, 8, seed=1)
    take(one, 3)
    halves = [BatchSampler(TOKENS, 4, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(one.state_dict())
    x, _ = next(one)
    assert torch.equal(torch.cat([next(h)[0] for h in halves]), x)


def test_memory_mapped_token_file(tmp_path):
    with TokenWriter(tmp_path / "t.bin", 300, "x") as w:
        w.write(TOKENS)
    f = TokenFile(tmp_path / "t.bin")
    a, b = BatchSampler(f, 4, 8, seed=2).batch(9), BatchSampler(TOKENS, 4, 8, seed=2).batch(9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_errors():
    with pytest.raises(DataError, match="fewer than seq_len"):
        BatchSampler(np.arange(8), 2, 8)
    with pytest.raises(ConfigError, match="multiple of world_size=2"):
        BatchSampler(TOKENS, 3, 8, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        BatchSampler(TOKENS, 4, 8, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="mode"):
        BatchSampler(TOKENS, 4, 8, mode="shuffled")
    s = BatchSampler(TOKENS, 4, 8, seed=1)
    with pytest.raises(ConfigError, match="seq_len was 16, now 8"):
        s.load_state_dict({**s.state_dict(), "seq_len": 16})


def test_eval_batches_cover_the_file_once():
    tokens = np.arange(105)
    batches = list(eval_batches(tokens, 4, 10))
    assert [len(x) for x, _ in batches] == [4, 4, 2]  # (105 - 1) // 10 = 10 windows
    starts = [int(v) for x, _ in batches for v in x[:, 0]]
    assert starts == list(range(0, 100, 10))
    assert all(torch.equal(x + 1, y) for x, y in batches)
    sharded = [int(v) for r in range(3) for x, _ in eval_batches(tokens, 4, 10, rank=r, world_size=3)
               for v in x[:, 0]]
    assert sorted(sharded) == starts
    assert len(list(eval_batches(tokens, 4, 10, max_batches=2))) == 2


def test_random_windows_reach_both_ends():
    s = BatchSampler(np.arange(10), 4, 8)  # starts 0 or 1 only
    seen = {int(v) for x, _ in take(s, 20) for v in x[:, 0]}
    assert seen == {0, 1}
