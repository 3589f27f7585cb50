"""`looplm bench decode --quick` end to end: attention's state grows with the context, a fixed
state's does not."""

import json

import pytest

from looplm.bench.decode import rss_mb
from looplm.cli import main


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
    assert "attention: layers decode with" in printed and "load average" in printed
