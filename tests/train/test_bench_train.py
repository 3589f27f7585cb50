"""`looplm bench train --quick` runs both contenders (or one configuration at several thread
counts) and writes its result."""

import json
from pathlib import Path

from looplm.cli import main


def test_bench_train_quick(tmp_path: Path) -> None:
    assert main(["bench", "train", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train.json").read_text())
    params = result["params"]
    assert abs(params["looplm"] - params["llama"]) / params["llama"] < 0.02  # same size
    assert result["ratio"] == result["tokens_per_s"]["looplm"] / result["tokens_per_s"]["llama"]


def test_bench_train_thread_counts(tmp_path: Path) -> None:
    args = ["bench", "train", "--quick", "--threads-list", "1,2", "--config", "small", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "train_threads.json").read_text())
    assert set(result["tokens_per_s"]) == {"1", "2"} and result["ratio"]["1"] == 1.0
    assert result["ratio"]["2"] == result["tokens_per_s"]["2"] / result["tokens_per_s"]["1"]
