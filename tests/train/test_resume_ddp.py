"""Subprocess tests: SIGKILL + --resume is bit-identical; a 2-process DDP run of a MoR + MoE++
model trains and equals 1 process."""

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


def train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "val_loss" not in r}


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


# A MoR (expert-choice router) + MoE++ (zero, copy and constant experts, a shared expert) model,
# small enough that some expert kind gets no token in many steps: DDP then needs every parameter
# to take part anyway (MoE._idle_zero).
MOR_MOE = ["--config", "tiny", "--no-progress", "--set", "d_model=32", "n_core=1", "n_recursions=2",
           "router=expert_choice", "ffn=moe", "n_experts=2", "zero_experts=6", "top_k=2", "d_ffn=32",
           "shared_expert=true", "seq_len=32", "max_seq_len=32", "batch_size=8", "steps=50", "warmup_steps=2",
           "min_lr_ratio=1.0", "log_interval=1", "eval_interval=50", "eval_iters=1", "sample_tokens=0",
           "max_files=20", "threads=1"]


def test_two_process_mor_moe_matches_single_process(tmp_path: Path) -> None:
    # PyTorch forms: DDP is under test, not the kernels (whose first build would dominate the time)
    env = {**ENV, "LOOPLM_CACHE": str(tmp_path / "cache"), "LOOPLM_NO_CPP_EXT": "1",
           "TMPDIR": str(tmp_path)}  # torchrun's rendezvous directories land here, not in /tmp
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def train(launcher: list[str], out: str, *extra: str) -> subprocess.Popen:
        cmd = [*launcher, "-m", "looplm", "train", *MOR_MOE, *extra, "--out", str(tmp_path / out)]
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    # the corpus first (both runs read the cache), then both runs side by side
    finish(train([sys.executable], "warm", "max_tokens=256"))
    ddp = train(torchrun, "ddp")
    # one process, the same global batch as two micro-batches of one rank's share each (the MoE
    # balance / z and router losses are per micro-batch, as they are per process under DDP), the
    # learning rates (constant after the warmup: a token budget shortens the schedule), stopped
    # after 5 steps by the token budget
    finish(train([sys.executable], "one", "grad_accum=2", f"max_tokens={5 * 8 * 32}"))
    out = finish(ddp)
    assert "Expected to have finished reduction" not in out
    two, one = (train_losses(tmp_path / run) for run in ("ddp", "one"))
    assert max(two) == 50 and (tmp_path / "ddp" / "ckpt-000050" / "model.safetensors").is_file()
    for step in range(1, 6):
        assert abs(two[step] - one[step]) < 1e-4, (step, two[step], one[step])


def test_fsdp_two_processes_match_one_and_resume(tmp_path: Path) -> None:
    """FSDP2 (weights, gradients and optimizer state sharded over 2 gloo processes) trains the MoR +
    MoE++ model as one process does; its checkpoints are whole (one process reads them) and a run
    stopped and resumed under FSDP ends with the uninterrupted run's weights."""
    env = {**ENV, "LOOPLM_CACHE": str(tmp_path / "cache"), "LOOPLM_NO_CPP_EXT": "1",
           "TMPDIR": str(tmp_path)}  # torchrun's rendezvous directories land here, not in /tmp
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # the learning rate is constant after the 2 warmup steps, so 5 steps then 5 resumed are 10 steps
    short = [*MOR_MOE, "steps=10", "eval_interval=5", "log_interval=1"]

    def train(launcher: list[str], out: str, *extra: str) -> subprocess.Popen:
        cmd = [*launcher, "-m", "looplm", "train", *short, *extra, "--out", str(tmp_path / out)]
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    finish(train([sys.executable], "warm", "max_tokens=256"))
    out = finish(train(torchrun, "fsdp", "fsdp=true"))
    assert "FSDP2: weights, gradients and optimizer state sharded over 2 processes" in out
    finish(train([sys.executable], "one", "grad_accum=2"))
    finish(train(torchrun, "part", "fsdp=true", "steps=5"))
    out = finish(train(torchrun, "part", "fsdp=true", "--resume"))
    assert "resuming" in out
    two, one, resumed = (train_losses(tmp_path / run) for run in ("fsdp", "one", "part"))
    for step in range(1, 11):
        assert abs(two[step] - one[step]) < 1e-4, (step, two[step], one[step])
        assert abs(resumed[step] - two[step]) < 1e-6, (step, resumed[step], two[step])
    sharded, single, again = (weights(tmp_path / run / "ckpt-000010") for run in ("fsdp", "one", "part"))
    assert sharded.keys() == single.keys() == again.keys()
    for name in sharded:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again[name], sharded[name], rtol=0, atol=1e-6)
