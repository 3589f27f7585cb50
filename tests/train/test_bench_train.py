"""`looplm bench train --quick` runs both contenders and writes its result."""

import json
from pathlib import Path

from looplm.cli import main


def test_bench_train_quick(tmp_path: Path) -> None:
    assert main(["bench", "train", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train.json").read_text())
    params = result["params"]
    assert abs(params["looplm"] - params["llama"]) / params["llama"] < 0.02  # same size
    assert result["ratio"] == result["tokens_per_s"]["looplm"] / result["tokens_per_s"]["llama"]
