"""`looplm bench decode --quick` end to end: attention's state grows with the context, a fixed
state's does not."""

import json

import pytest
import torch
from torch.profiler import profile

from looplm.bench.decode import VARIANTS, VOCAB, rss_mb
from looplm.cli import main
from looplm.generate import decoding_mode
from looplm.model import LoopConfig, LoopLM
from looplm.ops import cpp_ext
from looplm.quant.state import compress_state, decompress_state


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    args = ["bench", "decode", "--quick", "--threads", "1", "--out", str(out), "--models", "attention",
            "gated_deltanet"]
    assert main(args) == 0
    return json.loads((out / "decode.json").read_text()), out


def test_writes_json_and_png(quick):
    data, out = quick
    for r in data["results"].values():
        assert [p["context"] for p in r["points"]] == [16, 48]
        assert all(p["ms_per_token"] > 0 for p in r["points"])
    assert (out / "decode.png").stat().st_size > 1000


def test_state_memory_grows_only_for_attention(quick):
    res = quick[0]["results"]
    att = [p["state_bytes"] for p in res["attention"]["points"]]
    gdn = [p["state_bytes"] for p in res["gated_deltanet"]["points"]]
    assert att[1] > 2 * att[0]
    assert gdn[0] == gdn[1] > 0


def test_rss_is_measured_on_linux():
    value = rss_mb()
    assert value is None or value > 1


def test_int8_state_row_prints_ratios_against_float(tmp_path, capsys):
    args = ["bench", "decode", "--quick", "--threads", "1", "--out", str(tmp_path), "--models", "attention",
            "--state-format", "float", "int8"]
    assert main(args) == 0
    res = json.loads((tmp_path / "decode.json").read_text())["results"]
    for f, q in zip(res["attention"]["points"], res["attention@int8"]["points"]):
        assert q["state_bytes"] < 0.4 * f["state_bytes"] and q["peak_bytes"] >= q["state_bytes"]
        assert q["hold_ms"] > 0 and f["hold_ms"] > 0
    printed = capsys.readouterr().out
    assert "attention@int8 @48: peak memory" in printed and "holding a token" in printed
    assert "attention@int8: a step calls" in printed and "load average" in printed
    if cpp_ext.available():  # either cache format in the one-call step of the whole stack
        assert "attention: a step calls looplm::attn_stack_step" in printed
        assert "attention@int8: a step calls looplm::attn_stack_step" in printed


@pytest.mark.skipif(not cpp_ext.available(), reason="the C++ kernels are not built here")
@pytest.mark.parametrize("fmt", ["float", "int8"])
def test_the_attention_model_decodes_through_the_cpp_steps(fmt):
    """The bench's attention model decodes in the one-call C++ step of the whole stack with either
    cache format (an int8 cache's codes read by the kernel; a Python fallback here is what makes
    its timings several times slower)."""
    cfg = LoopConfig(vocab_size=VOCAB, d_model=32, n_heads=2, max_seq_len=64, **VARIANTS["attention"])
    model = LoopLM(cfg)
    with torch.no_grad(), decoding_mode(model):
        state = model.init_state(1)
        if fmt != "float":
            state = decompress_state(compress_state(state, fmt))
        state = model(torch.randint(0, VOCAB, (1, 20)), state=state).state
        with profile() as prof:
            model(torch.tensor([[3]]), state=state)
    names = {e.name for e in prof.events()}
    assert "looplm::attn_stack_step" in names and "looplm::attn_step_out" not in names
