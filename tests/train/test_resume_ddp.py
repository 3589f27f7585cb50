"""Subprocess tests: SIGKILL + --resume is bit-identical; 2-process DDP equals 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.train.tiny import TinyLM

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_tiny(*args: str, launcher: list[str] | None = None) -> subprocess.Popen:
    cmd = (launcher or [sys.executable]) + ["-m", "tests.train.tiny", *args]
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=pipe, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in rows]


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    steps = "30"
    whole = run_tiny(str(tmp_path / "a"), steps)
    killed = run_tiny(str(tmp_path / "b"), steps, "--sleep", "0.03")
    deadline = time.time() + 60
    while not (tmp_path / "b" / "ckpt-000015").exists():
        assert killed.poll() is None, killed.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "ckpt-000030").exists(), "the run finished before it was killed"
    finish(whole)
    out = finish(run_tiny(str(tmp_path / "b"), steps, "--resume"))
    assert "resuming" in out
    a, b = weights(tmp_path / "a" / "ckpt-000030"), weights(tmp_path / "b" / "ckpt-000030")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]


def test_two_process_step_equals_single_process(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = run_tiny(str(tmp_path / "ddp"), "3", launcher=torchrun)
    finish(run_tiny(str(tmp_path / "one"), "3", "--grad-accum", "2"))
    finish(ddp)
    a, b = weights(tmp_path / "ddp" / "ckpt-000003"), weights(tmp_path / "one" / "ckpt-000003")
    torch.manual_seed(0)
    init = TinyLM().state_dict()
    assert a.keys() == b.keys() == init.keys()
    for name in a:
        assert not torch.equal(a[name], init[name]), f"{name} did not train"
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "ddp"), losses(tmp_path / "one")):
        assert s1 == s2 and abs(l1 - l2) < 1e-5
