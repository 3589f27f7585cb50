"""``looplm bench ops``: the quick run writes its results; helpers compute what they claim."""

from __future__ import annotations

import argparse
import json

import pytest

from looplm.bench import common, ops
from looplm.cli import main
from looplm.errors import ConfigError


def test_quick_run_writes_json_and_png(tmp_path, capsys):
    assert main(["bench", "ops", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "crossover" in out and "targets:" in out and "max relative output error" in out
    data = json.loads((tmp_path / "ops.json").read_text())
    assert (tmp_path / "ops.png").stat().st_size > 0
    mixers = {r["mixer"] for r in data["records"]}
    assert mixers == set(ops.MIXERS)
    assert all(r["tokens_per_s"] > 0 for r in data["records"])
    assert max(data["peer_max_rel_error"].values()) < 1e-4  # same op as transformers' fallback
    assert set(data["step_seconds_per_token"]) == set(ops.FIXED_STATE)


def test_crossover():
    lens = [1, 2, 4, 8]
    attn = {1: 10.0, 2: 10.0, 4: 10.0, 8: 10.0}
    assert ops.crossover(lens, {1: 1, 2: 11, 4: 12, 8: 13}, attn) == "2"
    assert ops.crossover(lens, {1: 11, 2: 11, 4: 12, 8: 13}, attn) == "<=1"
    assert ops.crossover(lens, {1: 11, 2: 11, 4: 12, 8: 9}, attn) == ">8"
    assert ops.crossover(lens, {1: 1, 2: 11, 4: 9, 8: 13}, attn) == "8"


def test_flop_counts_match_the_algorithms():
    b, t, h, d, c = 2, 200, 3, 16, ops.DELTA_CHUNK
    assert c == 32
    x = ops.Inputs.make(b, t, h, d, d)
    n = -(-t // c)
    # WY/UT chunk: Q K^T and K K^T 4C^2 d, A^{-1} [V | K] 4C^2 d, P delta 2C^2 d; W S, K'^T delta,
    # Q' S 6C d^2; the tiled inverse of A: 2 matmuls of s^3 for each of C/2s tiles, s = 2 .. C/2
    inverse = sum(2 * c * s * s for s in (2, 4, 8, 16))
    delta = b * h * n * (10 * c * c * d + 6 * c * d * d + inverse)
    assert ops.forward_flops("gated_deltanet", x) == ops.forward_flops("deltanet", x) == delta
    assert ops.forward_flops("attention", x) == b * h * t * t * 2 * d


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--seq-lens", "12,x"], "--seq-lens"),
        (["--mixers", "mamba"], "--mixers"),
        (["--heads", "0"], "--heads"),
    ],
)
def test_bad_flags_name_the_flag(flags, name):
    parser = argparse.ArgumentParser()
    ops.add_arguments(parser)
    with pytest.raises(ValueError, match=name):
        ops.run(parser.parse_args(flags))


def test_common_helpers(tmp_path):
    calls = []
    secs = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b"] * 4 and set(secs) == {"a", "b"}
    table = common.markdown_table(["x", "y"], [[1234, 0.12345], ["s", None]])
    assert table.splitlines() == ["| x | y |", "|---|---|", "| 1,234 | 0.123 |", "| s | - |"]
    path = common.write_json(tmp_path / "d", "r", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.name == "r.json"
    assert common.parse_int_list("3, 5", "--n") == [3, 5]
    with pytest.raises(ConfigError, match="--n"):  # a ValueError too; the CLI prints one line
        common.parse_int_list("0", "--n")
    assert common.pass_fail(None) == "n/a" and common.pass_fail(True) == "PASS"
    assert common.machine_info()["cpu_count"] >= 1


def test_bench_list_flags_and_threads_are_one_error_line(capsys):
    """A bad list flag is ``error: ...`` with status 2 and a thread count below 1 is argparse's usage
    error, neither a traceback."""
    assert main(["bench", "serve", "ckpt", "--concurrency", "0", "--engine-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --concurrency must be comma-separated positive integers, got '0'"
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "prefill", "ckpt", "--threads", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --threads: must be a positive integer" in err
