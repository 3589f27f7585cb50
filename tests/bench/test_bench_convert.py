"""bench convert's measuring parts: the synthetic decoding state has the size of a real one at that
context (growing for attention, fixed for a linearised model), and truncation keeps the first
layers exactly; the table's int4 columns."""

from __future__ import annotations

from argparse import Namespace

import torch

from looplm.bench.convert import decode_figures, synthetic_state, table, truncate
from looplm.convert.linearize import linearize
from tests.model.util import model, tokens


def test_synthetic_state_is_the_size_of_decoding_that_context():
    src = model(n_heads=4, n_kv_heads=2)
    x = tokens(batch=1, length=20)
    real = src(x, use_cache=True).state
    assert synthetic_state(src, 20).nbytes() == real.nbytes()
    lin = linearize(src, "gla", window=8)
    real = lin(x, use_cache=True).state
    assert synthetic_state(lin, 20).nbytes() == real.nbytes() == synthetic_state(lin, 500).nbytes()
    fig = decode_figures(lin, 500, 2)
    assert fig["decode_tok_s"] > 0 and fig["state_bytes"] == real.nbytes()
    # the normalised read-out's z column (a decayed sum of softmax weights) is positive, so the
    # decoding steps timed from it stay finite, as a real state's
    state = synthetic_state(lin, 500)
    assert lin.config.liger_norm and all(bool((s.ssm[..., -1] > 0).all()) for s in state.layers.values())
    with torch.no_grad():
        assert torch.isfinite(lin(tokens(batch=1, length=1), state=state).logits).all()


def test_truncation_is_the_first_layers():
    src = model(n_prelude=1, n_core=4, n_coda=1)
    cut = truncate(src, 2).eval()
    x = tokens()
    h = src.embed(x)
    for layer in (src.prelude[0], src.core[0]):
        h, _, _ = layer(h)
    ref = torch.nn.functional.linear(src.norm(h), src.embed.weight)
    torch.testing.assert_close(cut(x).logits, ref, atol=1e-5, rtol=1e-5)


def test_table_gives_int4_ratios_where_measured():
    """Rows carry an int4 decode figure (recursive rows and older rows do not: a dash)."""
    base = {"ppl_prose": 20.0, "ppl_code": 8.0, "state_bytes": 2**20, "decode_tok_s": 10.0,
            "flops_per_token": 3e8, "minutes": 0}
    rows = {"original": {**base, "decode_int4_tok_s": 12.0},
            "linear": {**base, "ppl_prose": 40.0, "decode_tok_s": 30.0, "decode_int4_tok_s": 60.0},
            "recursive": {**base, "decode_tok_s": 5.0}}
    lines = table(rows, Namespace(context=16384)).splitlines()
    assert "int4 ratio" in lines[0]
    assert "| 30 | 3 | 60 | 5 |" in lines[3]  # decode, its ratio, int4 decode, its ratio
    assert "| 5 | 0.5 | - | - |" in lines[4]
