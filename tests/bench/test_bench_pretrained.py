"""`looplm bench pretrained --quick` on a tiny synthetic GGUF: every row runs in its own process
on the same tokens; looplm float32 and transformers agree (greedy tokens, perplexity)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looplm.bench.pretrained import ROWS, prefill_flops
from looplm.cli import main
from looplm.model import LoopConfig, LoopLM
from tests.pretrained import synthetic as S


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model, tok = S.hf_model(tied=True)
    S.save_gguf(tmp / "tiny.gguf", model, tok)
    (tmp / "prose.txt").write_text("The quick brown fox jumps over the lazy dog, said the licence. " * 40)
    (tmp / "code.py").write_text("def f(x):\n    return x * 2  # twice\n" * 60)
    argv = ["bench", "pretrained", "--gguf", str(tmp / "tiny.gguf"), "--quick", "--threads", "1",
            "--prose", str(tmp / "prose.txt"), "--code", str(tmp / "code.py"), "--out", str(tmp / "out")]
    assert main(argv) == 0
    return json.loads((tmp / "out" / "pretrained.json").read_text()), tmp / "out"


def test_every_row_reports_speed_quality_and_memory(result):
    data, out = result
    rows = data["results"]
    assert list(rows) == list(ROWS)
    assert rows["llama.cpp"]["status"] == "ok" or rows["llama.cpp"]["status"].startswith("not installed")
    for name, r in rows.items():
        if r["status"] != "ok":
            continue
        assert [p["prompt"] for p in r["points"]] == [8, 24], name
        for p in r["points"]:
            assert p["decode_tokens_per_s"] > 0 and p["prefill_tokens_per_s"] > 0 and len(p["tokens"]) == 4
            assert p["bytes_per_token"] > r["weight_bytes"] > 0
        assert r["peak_rss_mb"] >= r["start_rss_mb"] > 0
        assert all(p["prefill_gflop_per_s"] > 0 for p in r["points"])
        assert r["rss_growth_mb"] == pytest.approx(r["peak_rss_mb"] - r["start_rss_mb"])
        cache = r["kv_bytes_per_token"] * (24 + 4)  # the longest prompt and its new tokens
        assert r["rss_budget_mb"] == pytest.approx((1.5 * r["weight_bytes"] + cache) / 2**20)
        for text, q in r["quality"].items():
            info = data["texts"][text]
            assert q["tokens"] == info["tokens"] == 95 and q["bytes"] == info["bytes"] > 0
            nats = math.log(q["perplexity"]) * q["tokens"]
            assert q["bits_per_byte"] == pytest.approx(nats / math.log(2) / q["bytes"], rel=1e-9)
    assert (out / "pretrained.png").stat().st_size > 0


def test_looplm_float32_matches_transformers_on_the_same_weights(result):
    rows = result[0]["results"]
    ours, ref = rows["looplm-float32"], rows["transformers-float32"]
    assert [p["tokens"] for p in ours["points"]] == [p["tokens"] for p in ref["points"]]
    for text in ("prose", "code"):
        want = ref["quality"][text]["perplexity"]
        assert ours["quality"][text]["perplexity"] == pytest.approx(want, rel=1e-4)
    assert ours["weight_bytes"] == ref["weight_bytes"]  # the same float32 matrices, tied head once
    assert ours["points"][0]["decode_vs_transformers"] == pytest.approx(
        ours["points"][0]["decode_tokens_per_s"] / ref["points"][0]["decode_tokens_per_s"])


def test_low_precision_rows_read_fewer_bytes_and_stay_close(result):
    rows = result[0]["results"]
    f32 = rows["looplm-float32"]
    assert rows["looplm-bfloat16"]["weight_bytes"] < 0.6 * f32["weight_bytes"]
    assert rows["looplm-int8"]["weight_bytes"] < 0.4 * f32["weight_bytes"]
    assert rows["looplm-int4"]["weight_bytes"] < 0.4 * f32["weight_bytes"]  # (at these widths its group
    # scales and float leftovers weigh about as much as int8's per-row scales)
    for text in ("prose", "code"):
        assert abs(rows["looplm-int8"]["quality"][text]["perplexity_vs_looplm_float32"]) < 0.05
    if rows["llama.cpp"]["status"] == "ok":  # an F32 GGUF: llama.cpp computes the same model
        for text in ("prose", "code"):
            assert abs(rows["llama.cpp"]["quality"][text]["perplexity_vs_looplm_float32"]) < 0.02


def test_int8_cache_rows_read_a_quarter_of_the_cache_and_stay_close(result):
    rows = result[0]["results"]
    for fmt in ("int8", "int4"):
        base, kv8 = rows[f"looplm-{fmt}"], rows[f"looplm-{fmt}-kv8"]
        assert kv8["weight_bytes"] == base["weight_bytes"]
        assert 0.25 < kv8["kv_bytes_per_token"] / base["kv_bytes_per_token"] < 0.4  # codes, a scale per row
        for text in ("prose", "code"):
            ppl = kv8["quality"][text]["perplexity"]
            assert ppl != base["quality"][text]["perplexity"]  # scored through the int8 cache
            assert ppl == pytest.approx(base["quality"][text]["perplexity"], rel=0.05)


@settings(max_examples=10, deadline=None)
@given(tokens=st.integers(1, 40), kv_heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([None, 8]),
       layout=st.sampled_from([(0, 2, 1, 0), (1, 1, 2, 1)]))
def test_prefill_flops_equal_what_the_model_counts(tokens, kv_heads, head_dim, layout):
    prelude, core, recursions, coda = layout
    cfg = LoopConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=kv_heads, head_dim=head_dim, d_ffn=64,
                     n_prelude=prelude, n_core=core, n_recursions=recursions, n_coda=coda)
    m = LoopLM(cfg).eval()
    last = torch.zeros(1, tokens, dtype=torch.bool)
    last[0, -1] = True  # the head at the last token only, as a prefill runs it
    with torch.no_grad():
        out = m(torch.randint(0, 64, (1, tokens)), logits_at=last)
    assert prefill_flops(m.config, tokens) == out.stats["flops"]


def test_missing_model_file_is_one_line(tmp_path: Path, capsys):
    assert main(["bench", "pretrained", "--gguf", str(tmp_path / "none.gguf"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
