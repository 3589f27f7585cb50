"""The unmasked forward (counts from shapes, one sync for the stats) agrees with the masked path
given an all-True mask (counts from tensors): logits, state, depth and every stat."""

import pytest
import torch

from tests.model.util import model, tokens


@pytest.mark.parametrize("overrides", [
    dict(mixer="gated_deltanet", n_recursions=2),
    dict(mixer="attention", n_recursions=2, kv_sharing=True),
    dict(mixer="gla", attn_every=2, ffn="moe", n_experts=3, top_k=2, zero_experts=2),
    dict(mixer="deltanet", ffn="moe", n_experts=2, top_k=1, shared_expert=True, n_recursions=2),
])
def test_unmasked_equals_all_true_mask(overrides):
    m = model(**overrides)
    x = tokens()
    full = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        a = m(x, x, use_cache=True)
        b = m(x, x, use_cache=True, mask=full)
        torch.testing.assert_close(a.logits, b.logits)
        assert torch.equal(a.depth, b.depth) and torch.equal(a.state.positions, b.state.positions)
        assert a.stats.keys() == b.stats.keys()
        for key in a.stats:
            assert a.stats[key] == pytest.approx(b.stats[key], rel=1e-6), key
        # one decoding step continues both states the same way
        nxt = a.logits[:, -1:].argmax(-1)
        sa, sb = m(nxt, state=a.state), m(nxt, state=b.state, mask=full[:, :1])
        torch.testing.assert_close(sa.logits, sb.logits)
        assert sa.stats["flops"] == pytest.approx(sb.stats["flops"], rel=1e-6)
        assert isinstance(sa.stats["flops"], float) and sa.stats["reach"] == [1.0] * m.config.n_recursions
