"""`looplm bench prefill --quick` end to end: a row per chunk size, the default rule's marked, the
one forward as the reference (ratio 1), bad flags one clear error."""

import pytest
import torch

from looplm.bench.prefill import measure
from looplm.checkpoint import load_model, save_model
from looplm.cli import main
from looplm.model import LoopConfig, LoopLM
from looplm.ops.qlinear import bf16_rows


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefill")
    torch.manual_seed(0)
    save_model(LoopLM(LoopConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_core=2)), path)
    return path


def test_rows_per_chunk_against_one_forward(ckpt, capsys):
    assert main(["bench", "prefill", str(ckpt), "--quick", "--chunks", "16,40"]) == 0
    out = capsys.readouterr().out
    assert "prefill of 96 prompt tokens" in out
    rows = [line for line in out.splitlines() if line.startswith(f"| {ckpt}")]
    assert [r.split("|")[2].strip() for r in rows] == ["16", "40", "one forward (default)"]
    assert [c.strip() for c in rows[-1].split("|")[-3:-1]] == ["1.000", "1.000"]


def test_measure_orders_sizes_and_caps_them_at_the_prompt(ckpt):
    rows = measure(load_model(ckpt), 20, [8, 50], 1)
    assert [r["chunk"] for r in rows] == [8, 20]
    assert rows[-1]["vs_one_forward"] == rows[-1]["cpu_vs_one_forward"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_bad_chunks_give_one_clear_error(ckpt, capsys):
    assert main(["bench", "prefill", str(ckpt), "--chunks", "a,0"]) != 0
    assert "--chunks must be comma-separated positive integers" in capsys.readouterr().err


def test_groups_rows_and_bad_groups(ckpt, capsys):
    assert main(["bench", "prefill", str(ckpt), "--quick", "--groups", "1x16,3x8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(f"| {ckpt}") and " x " in line]
    assert [r[2].strip() for r in rows] == ["1 x 16", "3 x 8"] and all(float(r[3]) > 0 for r in rows)
    assert all((float(r[5]) > 0) if bf16_rows() else r[5].strip() == "-" for r in rows)  # bf16 products
    assert main(["bench", "prefill", str(ckpt), "--groups", "4x"]) != 0
    assert "--groups '4x': each group must be BxT" in capsys.readouterr().err
