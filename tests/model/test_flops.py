"""FLOPs accounting against counts written out by hand from the architecture.

Dense: Kaplan's 6·N·tokens plus the attention term. MoR and MoE: only what tokens ran, counted
here from the routing the forward reports (``depth``) or recomputed from the router weights.
"""

import pytest
import torch
import torch.nn.functional as F

from looplm.model import LoopConfig, LoopLM

B, T, V, D = 2, 24, 64, 32


def tiny(**kw) -> LoopLM:
    torch.manual_seed(0)
    base = dict(vocab_size=V, d_model=D, n_heads=2, n_core=2, max_seq_len=T, d_ffn=64)
    return LoopLM(LoopConfig(**{**base, **kw}))


def ids() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def attn_layer_params(d: int, ffn: int) -> int:
    """q, k, v, o projections and a SwiGLU (gate, up, down) of one attention layer."""
    return 4 * d * d + 3 * d * ffn


def test_dense_transformer_is_6N_plus_attention():
    model = tiny(n_core=3)
    out = model(ids())
    n = 3 * attn_layer_params(D, 64) + D * V  # non-embedding matmuls + the (tied) output head
    pairs = B * T * (T + 1) / 2  # causal (query, key) pairs per layer
    expected = 6 * n * B * T + 3 * 3 * 4 * D * pairs  # QKᵀ and AV: 2·d FLOPs each per pair, ×3 training
    counted = 3 * out.stats["flops"]
    assert counted == pytest.approx(expected, rel=0.10)
    assert counted == pytest.approx(expected, rel=1e-6)  # and in fact exactly this convention
    assert out.stats["flops_per_token"] == pytest.approx(counted / (B * T))
    assert model.flops_per_token(T) == pytest.approx(counted / (B * T), rel=1e-6)


def core_cost(active: torch.Tensor, layers: int) -> float:
    """Forward FLOPs of ``layers`` attention layers on the tokens where ``active [B,T]``: matmuls per
    active token, causal attention among the active tokens of each row."""
    n = active.sum(1).double()
    return float(layers * (2 * attn_layer_params(D, 64) * n.sum() + 4 * D * (n * (n + 1) / 2).sum()))


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_mor_counts_only_the_recursions_tokens_ran(router):
    model = tiny(n_prelude=1, n_core=1, n_coda=1, n_recursions=3, sharing="middle_cycle", router=router)
    out = model(ids())
    depth = out.depth
    assert depth.min() >= 1 and depth.max() <= 3
    expected = core_cost(torch.ones(B, T, dtype=torch.bool), 2)  # prelude + coda
    expected += sum(core_cost(depth > r, 1) for r in range(3))
    expected += 2 * D * V * B * T  # head
    expected += 2 * D * 3 * B * T  # expert-choice scores every token at each of 3 recursions;
    # token-choice scores 3 depths once per token: the same count
    all_three = core_cost(torch.ones(B, T, dtype=torch.bool), 5) + 2 * D * V * B * T
    assert out.stats["flops"] < all_three
    assert out.stats["flops"] == pytest.approx(expected, rel=1e-6)
    assert out.stats["reach"] == pytest.approx([float((depth > r).float().mean()) for r in range(3)])


def test_moe_counts_only_the_experts_tokens_were_sent_to():
    model = tiny(n_core=1, ffn="moe", n_experts=4, top_k=2, zero_experts=3)
    seen = {}
    moe = model.core[0].ffn
    moe.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    out = model(ids())
    z = F.linear(seen["x"], moe.router.weight)
    chosen = z.softmax(-1).topk(2, dim=-1).indices  # [N, 2]
    real = int((chosen < 4).sum())  # assignments to SwiGLU experts; zero/copy/constant cost nothing
    assert 0 < real < 2 * B * T
    expert = 3 * D * 64  # one SwiGLU expert's weights
    expected = 2 * 4 * D * D * B * T + 4 * D * B * T * (T + 1) / 2  # attention mixer
    expected += 2 * (D * 7) * B * T + 2 * expert * real  # router over 7 experts, experts actually run
    expected += 2 * D * V * B * T
    assert out.stats["flops"] == pytest.approx(expected, rel=1e-6)


def test_mor_kv_sharing_counts_attention_over_the_first_recursions_keys():
    model = tiny(n_prelude=1, n_core=1, n_coda=1, n_recursions=3, sharing="middle_cycle",
                 router="token_choice", kv_sharing=True)
    out = model(ids())
    depth = out.depth
    assert (depth < 3).any() and (depth > 1).any()  # the routing leaves some tokens out
    everyone = torch.ones(B, T, dtype=torch.bool)
    expected = core_cost(everyone, 3)  # prelude, coda, and recursion 0 where every token runs
    pos = torch.arange(T, dtype=torch.float64)
    for r in (1, 2):
        active = depth > r  # queries at r read the keys of all tokens at or before them (recursion 0's)
        expected += 2 * attn_layer_params(D, 64) * float(active.sum())
        expected += 4 * D * float(((pos + 1) * active).sum())
    expected += 2 * D * V * B * T + 2 * D * 3 * B * T
    assert out.stats["flops"] == pytest.approx(expected, rel=1e-6)
