"""``looplm bench serve --quick``: a server process loaded through the openai client."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from looplm.bench.serve import steady_rate  # noqa: E402
from looplm.checkpoint import save_model  # noqa: E402
from looplm.cli import main  # noqa: E402
from looplm.errors import LoopLMError  # noqa: E402
from looplm.ops.qlinear import bf16_rows  # noqa: E402
from tests.serve.util import tiny_model, tokenizer  # noqa: E402


@pytest.mark.slow
def test_bench_serve_quick(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model("gated_deltanet"), ckpt)
    tokenizer().save(ckpt)
    out = tmp_path / "out"
    servers = "looplm,looplm-bf16p,looplm-int4,llama.cpp"
    assert main(["bench", "serve", str(ckpt), "--quick", "--servers", servers,
                 "--concurrency", "1,3", "--threads", "1", "--engine-rows", "3", "--out", str(out)]) == 0
    data = json.loads((out / "serve.json").read_text())
    rows = data["results"]
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the load figure
    served = ("looplm", "looplm-bf16p", "looplm-int4") if bf16_rows() else ("looplm", "looplm-int4")
    assert [(r["server"], r["concurrency"]) for r in rows] == [(name, c) for name in served for c in (1, 3)]
    assert bf16_rows() or "AMX" in data["skipped"]["looplm-bf16p"]
    for r in rows:
        assert r["errors"] == 0 and r["cut"] == 0 and r["requests"] == r["concurrency"]
        assert r["generated_tokens"] == 4 * r["requests"]  # ignore_eos: every request runs to max_tokens
        assert 0 < r["ttft_p50"] <= r["ttft_p99"] and r["itl_p50"] > 0
        assert r["steady_tokens_per_s"] is None or r["steady_tokens_per_s"] > 0
    # 3 requests, each prompt length once: the longest prompt's TTFT is at most the largest of the
    # three, and the interpolated p99 of three values is at least 0.98 times their largest
    assert all(0 < r["ttft_longest_p99"] <= r["ttft_p99"] / 0.98 for r in rows[1::2])
    assert "llama.cpp" in data["skipped"]
    memory = {m["model"]: m for m in data["state_memory"]}
    assert memory["attention"]["vs_attention"] == 1
    assert 0 < memory["gated_deltanet"]["bytes"] < memory["hybrid"]["bytes"] < memory["attention"]["bytes"]
    # the engine table: float32, int4 and int4 with int8 caches on a gated DeltaNet (no transformers twin)
    assert [(e["model"], e["rows"]) for e in data["engine"]] == [("looplm_float32", 3), ("looplm_int4", 3),
                                                                 ("looplm_int4_kv8", 3)]
    assert all(e["decode_tok_s"] > 0 for e in data["engine"])
    printed = capsys.readouterr().out
    assert all(f"| {name} | 3 |" in printed for name in ("looplm", "looplm_int4", "looplm-int4"))
    assert "concurrency 3: looplm-int4 / looplm tokens/s" in printed


def test_steady_rate_counts_chunks_between_the_opening_burst_and_the_drain():
    # two workers: requests a and b open the level, c follows a; b's first chunk (t = 2) ends the
    # opening burst, the first worker to find nothing left to start (t = 8) begins the drain
    a = {"initial": True, "stamps": [0, 1, 2, 3, 4]}
    b = {"initial": True, "stamps": [2, 3, 4, 5, 6, 7]}
    c = {"initial": False, "stamps": [5, 6, 7, 8]}
    assert steady_rate([a, b, c], [9, 8]) == pytest.approx((2 + 5 + 4) / 6)
    assert steady_rate([a, b, c], []) is None  # no worker drained (all cut)
    assert steady_rate([a, b, c], [2]) is None  # drained before the burst ended: no window
    assert steady_rate([c], [9]) is None  # no opening request finished


def test_bench_serve_engine_only(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model("attention"), ckpt)
    tokenizer().save(ckpt)
    out = tmp_path / "out"
    assert main(["bench", "serve", str(ckpt), "--quick", "--engine-only", "--engine-rows", "2",
                 "--threads", "1", "--out", str(out)]) == 0
    data = json.loads((out / "serve.json").read_text())
    assert "results" not in data and "state_memory" not in data  # no server was started
    assert {e["model"] for e in data["engine"]} >= {"looplm_float32", "looplm_int4", "looplm_int4_kv8"}
    assert all(e["rows"] == 2 and e["decode_tok_s"] > 0 for e in data["engine"])
    assert "| looplm_int4 | 2 |" in capsys.readouterr().out
    assert main(["bench", "serve", str(ckpt), "--engine-only", "--engine-rows", "", "--out", str(out)]) == 2
    assert "--engine-only needs --engine-rows" in capsys.readouterr().err


def test_bench_serve_bf16_prefill_reaches_every_looplm_server(tmp_path, monkeypatch):
    """``--bf16-prefill`` starts every looplm server with it (looplm-bf16p always has it); where the
    CPU has no AMX tiles the servers are skipped with the reason."""
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model("attention"), ckpt)
    tokenizer().save(ckpt)
    started: dict[str, list[str]] = {}

    def fake_server(name, cmd, port, extra, timeout=300):
        started[name] = cmd
        raise LoopLMError("not started in this test")

    monkeypatch.setattr("looplm.bench.serve.Server", fake_server)
    monkeypatch.setattr("looplm.bench.serve.bf16_rows", lambda: 9)
    args = ["bench", "serve", str(ckpt), "--quick", "--servers", "looplm,looplm-int4,looplm-bf16p",
            "--engine-rows", "", "--state-streams", "0", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert ["--bf16-prefill" in cmd for cmd in started.values()] == [False, False, True]
    started.clear()
    assert main([*args, "--bf16-prefill"]) == 0
    assert set(started) == {"looplm", "looplm-int4", "looplm-bf16p"}
    assert all("--bf16-prefill" in cmd for cmd in started.values())
    monkeypatch.setattr("looplm.bench.serve.bf16_rows", lambda: 0)
    started.clear()
    assert main([*args, "--bf16-prefill"]) == 0
    assert not started
    skipped = json.loads((tmp_path / "out" / "serve.json").read_text())["skipped"]
    assert all("AMX" in skipped[name] for name in ("looplm", "looplm-int4", "looplm-bf16p"))
