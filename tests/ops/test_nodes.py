"""Row tiles cover every row once, in order; one tile when torch runs several threads."""

import torch

from looplm.ops.nodes import row_tiles, tracked


def test_tiles_cover_the_rows_in_order(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    tiles = row_tiles(10, 3, budget=7)  # 2 rows of 3 elements per tile
    assert [(b.start, b.stop) for b in tiles] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert torch.cat([torch.arange(10)[b] for b in tiles]).tolist() == list(range(10))
    assert row_tiles(3, 100, budget=7) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert row_tiles(0, 5, budget=7) == []


def test_one_tile_with_several_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert row_tiles(10, 3, budget=7) == [slice(0, 10)]


def test_tracked_and_the_plain_paths_agree_with_the_autograd_nodes():
    from looplm.layers.ffn import swiglu
    from looplm.layers.norms import l2_normalize, rms_norm
    from looplm.ops.attention import apply_rope, rope_cos_sin
    from looplm.ops.conv import causal_conv1d

    x = torch.randn(2, 6, 3, 8, requires_grad=True)
    w, z, sw = torch.randn(8, requires_grad=True), torch.randn(2, 6, 3, 8), torch.rand(2, 6, 3)
    cos, sin = rope_cos_sin(torch.arange(6), 8)
    cw = torch.randn(24, 4, requires_grad=True)
    calls = [lambda: rms_norm(x, w, 1e-6, z), lambda: l2_normalize(x), lambda: swiglu(x, sw),
             lambda: apply_rope(x, cos, sin), lambda: causal_conv1d(x.flatten(2), cw, silu=True)[0]]
    assert tracked(x) and not tracked(z, None)
    for call in calls:
        node = call()
        assert node.grad_fn is not None
        with torch.no_grad():
            assert not tracked(x)
            torch.testing.assert_close(call(), node.detach())
