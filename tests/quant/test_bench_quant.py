"""`looplm bench quant --quick` writes its JSON, markdown and plot with every section filled."""

import json

from looplm.cli import main


def test_bench_quant_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "quant", "--quick", "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "quant.json").read_text())
    rows = data["quality"]["formats"]
    assert {"float32", "int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_mx", "fp4_mx QAT"} <= set(rows)
    assert rows["int8"]["size_pct"] < 50 and rows["fp4_mx"]["size"] < rows["int8"]["size"]
    assert set(data["speed"]["rows"]) >= {"float32", "int8", "int4 g64"}
    assert data["quality"]["state"]["int8"]["bytes_pct"] < 40
    assert (tmp_path / "out" / "quant.png").stat().st_size > 0
    assert "tokens/s vs float32" in (tmp_path / "out" / "quant.md").read_text()
