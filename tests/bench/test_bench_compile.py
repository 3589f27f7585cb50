"""`looplm bench compile --quick` end to end: the three configurations train eager and compiled
(fullgraph), with 0 graph breaks and positive tokens/s, and the ratio is the one printed."""

import json

from looplm.cli import main


def test_quick_run_reports_each_configuration(tmp_path, capsys):
    args = ["bench", "compile", "--quick", "--backend", "eager", "--threads", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "compile.json").read_text())["results"]
    assert set(data) == {"transformer", "gdn", "hybrid"}
    printed = capsys.readouterr().out
    for r in data.values():
        assert r["graph_breaks"] == 0 and min(r["tokens_per_s"].values()) > 0
        assert abs(r["ratio"] - r["tokens_per_s"]["compiled"] / r["tokens_per_s"]["eager"]) < 1e-9
        assert f"ratio {r['ratio']:.3f}" in printed


def test_bad_size_is_one_clear_error(tmp_path, capsys):
    assert main(["bench", "compile", "--seq-len", "0", "--out", str(tmp_path)]) != 0
    assert "--seq-len must be positive" in capsys.readouterr().err
