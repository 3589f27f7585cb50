"""Row blocks cover every row once, in order; one block when torch runs several threads."""

import torch

from looplm.ops.blocks import row_blocks


def test_blocks_cover_the_rows_in_order(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    blocks = row_blocks(10, 3, budget=7)  # 2 rows of 3 elements per block
    assert [(b.start, b.stop) for b in blocks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert torch.cat([torch.arange(10)[b] for b in blocks]).tolist() == list(range(10))
    assert row_blocks(3, 100, budget=7) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert row_blocks(0, 5, budget=7) == []


def test_one_block_with_several_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert row_blocks(10, 3, budget=7) == [slice(0, 10)]
