"""The forward's FLOP count on a dozen configurations, recorded (commit 04ba357) so that moving or
rewriting the accounting cannot change what is reported.

Per configuration: a training forward, the same with a padded row (mask), a prefill with a cache
and one decoding step after it. The numbers themselves are checked against hand counts in
tests/model/test_flops.py; here they only must not move.
"""

import pytest
import torch

from looplm.model import LoopConfig, LoopLM

B, T, V, D = 2, 24, 64, 32

CASES = {
    "attention": {},
    "gated_deltanet": dict(mixer="gated_deltanet"),
    "hybrid": dict(mixer="gated_deltanet", attn_every=2, n_core=4),
    "mor_expert": dict(n_recursions=3, router="expert_choice", capacity=[1.0, 0.5, 0.25]),
    "mor_token": dict(n_recursions=3, router="token_choice"),
    "mor_kv_sharing": dict(n_recursions=2, router="expert_choice", capacity=[1.0, 0.5], kv_sharing=True),
    "halting": dict(n_recursions=3, router="halting"),
    "moe_pp": dict(ffn="moe", n_experts=4, top_k=2, zero_experts=3),
    "moe_recurrent": dict(ffn="moe", n_experts=4, top_k=2, moe_router="recurrent"),
    "mod": dict(n_core=4, layer_router="mod"),
    "mom": dict(mixer="mom", memories=3, memory_top_k=2),
    "prelude_coda": dict(n_prelude=1, n_coda=1, n_recursions=2),
}

# forward FLOPs: training, training with row 1's first 5 tokens masked, prefill of T-1, one step
RECORDED = {
    "attention": [2316288.0, 2062848.0, 2213888.0, 102400.0],
    "gated_deltanet": [2457600.0, 2201600.0, 2355200.0, 102400.0],
    "hybrid": [4577280.0, 4088320.0, 4380672.0, 196608.0],
    "mor_expert": [3850752.0, 3466048.0, 3747968.0, 276864.0],
    "mor_token": [4913152.0, 4481344.0, 4721792.0, 191360.0],
    "mor_kv_sharing": [3378688.0, 3033216.0, 3276032.0, 196864.0],
    "halting": [6561792.0, 5841792.0, 6270720.0, 291072.0],
    "moe_pp": [2629631.9375, 2334847.9375, 2537728.0, 91904.0],
    "moe_recurrent": [4921344.0, 4396544.0, 4710400.0, 210944.0],
    "mod": [2571264.0, 2317184.0, 2468608.0, 186624.0],
    "mom": [4638720.0, 4155520.0, 4445440.0, 193280.0],
    "prelude_coda": [6555648.0, 5836288.0, 6264832.0, 290816.0],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reported_flops_are_the_recorded_ones(name: str) -> None:
    torch.manual_seed(0)
    base = dict(vocab_size=V, d_model=D, n_heads=2, n_core=2, max_seq_len=2 * T, d_ffn=64)
    model = LoopLM(LoopConfig(**{**base, **CASES[name]}))
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :5] = False
    got = [model(ids).stats["flops"], model(ids, mask=mask).stats["flops"]]
    model.eval()
    with torch.no_grad():
        prefill = model(ids[:, :-1], use_cache=True)
        got += [prefill.stats["flops"], model(ids[:, -1:], state=prefill.state).stats["flops"]]
    assert got == pytest.approx(RECORDED[name], rel=1e-6)
