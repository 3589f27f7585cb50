"""Bad settings and flags: one line naming the field, nothing created, no traceback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import TINY, looplm, one_line_error, snapshot


@pytest.mark.parametrize("setting, field", [
    ("grad_clip=-1", "train.grad_clip"),
    ("weight_decay=-0.1", "train.weight_decay"),
    ("max_minutes=-1", "train.max_minutes"),
    ("lr=0", "train.lr"),
    ("lr=-1e-3", "train.lr"),
    ("beta1=1", "train.beta1"),
    ("threads=-1", "train.threads"),
    ("seed=18446744073709551616", "train.seed"),
    ("lr=abc", "train.lr"),
    ("model.n_kv_heads=abc", "model.n_kv_heads"),
    ("model.threshold=[1]", "model.threshold"),
    ("model.capacity=abc", "model.capacity"),
])
def test_bad_setting_names_the_field(setting: str, field: str, tmp_path: Path, cache: Path,
                                     data_file: Path) -> None:
    out = tmp_path / "out"
    proc = looplm("train", *TINY, setting, "--data", str(data_file), "--out", str(out), cache=cache)
    one_line_error(proc, field)
    assert not out.exists()


def test_huge_model_is_refused_before_allocating(tmp_path: Path, cache: Path, data_file: Path) -> None:
    start = time.perf_counter()
    proc = looplm("train", *TINY, "model.d_model=8192", "model.n_core=64", "--data", str(data_file),
                  "--out", str(tmp_path / "out"), cache=cache)
    one_line_error(proc, "GiB", "d_model=8192")
    assert time.perf_counter() - start < 60  # no 50 GB allocation, no swapping


@pytest.mark.parametrize("out, word", [("file", "is a file"), ("/dev/null", "is a file"),
                                       ("/proc/looplm-out", "cannot")])
def test_unusable_out_is_one_line(out: str, word: str, tmp_path: Path, cache: Path, data_file: Path) -> None:
    target = tmp_path / "file" if out == "file" else Path(out)
    if out == "file":
        target.write_text("the user's own file\n")
    before = snapshot(tmp_path)
    proc = looplm("train", *TINY, "--data", str(data_file), "--out", str(target), cache=cache)
    one_line_error(proc, str(target), word)
    assert snapshot(tmp_path) == before


def test_eval_iters_zero_is_refused(trained: Path, cache: Path) -> None:
    before = snapshot(trained)
    one_line_error(looplm("eval", str(trained / "latest"), "--iters", "0", cache=cache), "--iters")
    assert snapshot(trained) == before


@pytest.mark.parametrize("flag", [["--contexts", "0"], ["--contexts", "64", "-4"], ["--tokens", "0"]])
def test_bench_decode_sizes_are_checked(flag: list[str], tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "bench"
    one_line_error(looplm("bench", "decode", *flag, "--quick", "--out", str(out), cache=cache), flag[0])
    assert not out.exists()


def test_missing_text_field_names_a_setting_that_exists(tmp_path: Path, cache: Path, data_file: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    text = data_file.read_text()
    rows.write_text("".join(json.dumps({"body": line}) + "\n" for line in text.splitlines() if line.strip()))
    err = one_line_error(looplm("train", *TINY, "--data", str(rows), "--out", str(tmp_path / "a"),
                                cache=cache), "rows.jsonl", "text_field")
    assert "--text-field" not in err
    # the setting the message names works
    proc = looplm("train", *TINY, "steps=2", "text_field=body", "--data", str(rows), "--out",
                  str(tmp_path / "b"), cache=cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
