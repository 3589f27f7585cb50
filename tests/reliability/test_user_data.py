"""Nothing the user had is lost or mixed: foreign --out directories, concurrent runs (and the ranks
of one DDP job when rank 0 cannot lock), a read-only mount, quantize
--out, corrupted run files, flipped weight bytes, NaN weights, a finished run, recorded data."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.reliability.conftest import TINY, env, looplm, looplm_bg, one_line_error, snapshot


def _resume(run: Path, data: Path, *extra: str) -> list[str]:
    return ["train", *TINY, *extra, "--data", str(data), "--out", str(run), "--resume"]


def test_out_holding_other_files_is_refused(tmp_path: Path, cache: Path, data_file: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"my": "own metrics"}\n')
    (out / "notes.txt").write_text("notes\n")
    before = snapshot(out)
    one_line_error(looplm("train", *TINY, "--data", str(data_file), "--out", str(out), cache=cache),
                   str(out), "not a looplm run")
    assert snapshot(out) == before


def _wait_locked(lock: Path, proc, timeout: float = 120) -> None:
    """Until another process holds ``lock`` (probed with a non-blocking flock of our own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        if lock.exists():
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                return
            finally:
                os.close(fd)
        time.sleep(0.05)
    raise AssertionError("the first run never took the lock")


def test_second_run_of_a_directory_fails_at_once(run_copy: Path, cache: Path, data_file: Path) -> None:
    first = looplm_bg(*_resume(run_copy, data_file, "steps=100000", "eval_interval=100000"), cache=cache)
    try:
        _wait_locked(run_copy / "looplm.lock", first)
        first.send_signal(signal.SIGSTOP)  # frozen while holding the lock: its files stay still
        before = snapshot(run_copy)
        start = time.monotonic()
        second = looplm(*_resume(run_copy, data_file, "steps=8"), cache=cache)
        one_line_error(second, "another looplm process", str(run_copy))
        assert time.monotonic() - start < 60
        assert snapshot(run_copy) == before
    finally:
        first.kill()
        first.wait()


def test_quantize_out_never_overwrites(trained: Path, tmp_path: Path, cache: Path) -> None:
    other = tmp_path / "other-checkpoint"
    other.mkdir()
    (other / "config.json").write_text("{}\n")
    (other / "model.safetensors").write_bytes(b"precious")
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    link = tmp_path / "link"
    link.symlink_to(other)
    before = snapshot(tmp_path, trained)
    for out, word in [(other, "not empty"), (afile, "is a file"), (link, "symbolic link")]:
        proc = looplm("quantize", str(trained / "latest"), "--format", "int8", "--out", str(out), cache=cache)
        one_line_error(proc, str(out), word)
    assert snapshot(tmp_path, trained) == before


def test_partial_metrics_line_is_dropped_on_resume(run_copy: Path, cache: Path, data_file: Path) -> None:
    metrics = run_copy / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 5, "loss": 4.1, "lr"')  # killed mid-write
    proc = looplm(*_resume(run_copy, data_file, "steps=6"), cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "partial last line" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert metrics.read_text().startswith(whole) and rows[-1]["step"] == 6


@pytest.mark.parametrize("broken", ["state.json", "run.json", "checksums.json"])
def test_corrupted_run_file_is_one_line(broken: str, run_copy: Path, cache: Path, data_file: Path) -> None:
    ckpt = run_copy / "ckpt-000004"
    path = ckpt / ("train_state/state.json" if broken == "state.json" else broken)
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    before = snapshot(run_copy)
    if broken == "run.json":
        proc = looplm("eval", str(ckpt), "--iters", "1", cache=cache)
        one_line_error(proc, "run.json", "corrupted")
    else:
        needles = ["state.json", "corrupted"] if broken == "state.json" else ["checksums.json", "corrupted"]
        one_line_error(looplm(*_resume(run_copy, data_file, "steps=6"), cache=cache), "ckpt-000004", *needles)
        if broken == "state.json":
            one_line_error(looplm("info", str(ckpt), cache=cache), "state.json", "corrupted")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("command", ["generate", "eval", "resume", "quantize"])
def test_flipped_weight_byte_is_refused(command: str, run_copy: Path, tmp_path: Path, cache: Path,
                                        data_file: Path) -> None:
    ckpt = run_copy / "ckpt-000004"
    weights = ckpt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x01  # one bit of a float in the last tensor
    weights.write_bytes(bytes(raw))
    before = snapshot(run_copy)
    argv = {"generate": ["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "4"],
            "eval": ["eval", str(ckpt), "--iters", "1", "--data", str(data_file)],
            "resume": _resume(run_copy, data_file, "steps=6"),
            "quantize": ["quantize", str(ckpt), "--format", "int8", "--out", str(tmp_path / "q")]}[command]
    one_line_error(looplm(*argv, cache=cache), "model.safetensors", "corrupted")
    assert snapshot(run_copy) == before
    assert not (tmp_path / "q").exists()


def test_checkpoint_without_checksums_still_loads(run_copy: Path, cache: Path) -> None:
    ckpt = run_copy / "ckpt-000004"
    (ckpt / "checksums.json").unlink(missing_ok=True)  # as written before checksums existed
    proc = looplm("generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "4", cache=cache)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_nan_weights_while_sampling_is_one_line(temperature: str, run_copy: Path, cache: Path) -> None:
    ckpt = run_copy / "ckpt-000004"
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(ckpt / "model.safetensors"))
    from looplm.checkpoint import write_checksums  # here: the module collects where it is missing

    write_checksums(ckpt, ["model.safetensors"])  # intact bytes, broken numbers
    proc = looplm("generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "4", "--temperature",
                  temperature, "--seed", "1", cache=cache)
    one_line_error(proc, "NaN")


def test_resuming_a_finished_run_says_so(run_copy: Path, cache: Path, data_file: Path) -> None:
    before = snapshot(run_copy)
    proc = looplm(*_resume(run_copy, data_file), cache=cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already finished (step 4 of 4)" in proc.stdout and "None" not in proc.stdout + proc.stderr
    assert snapshot(run_copy) == before


def test_eval_does_not_follow_recorded_data_outside_the_run(trained: Path, cache: Path,
                                                            data_file: Path) -> None:
    recorded = json.loads((trained / "latest" / "run.json").read_text())["train"]["data"]
    assert recorded == str(data_file)  # outside the run and the cache
    before = snapshot(trained, data_file)
    one_line_error(looplm("eval", str(trained / "latest"), "--iters", "1", cache=cache), "--data", "run.json")
    assert snapshot(trained, data_file) == before
    proc = looplm("eval", str(trained / "latest"), "--data", str(data_file), "--max-tokens", "200",
                  "--seq-len", "64", cache=cache)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_rank_stops_when_rank0_cannot_lock(run_copy: Path, cache: Path, data_file: Path) -> None:
    """Two real processes of one torchrun-style job (gloo): rank 0 fails to lock a run directory
    another process holds; rank 1 must exit with its own line, not wait for gloo's timeout."""
    fd = os.open(run_copy / "looplm.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this test process is the run that holds the directory
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = snapshot(run_copy)
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "looplm.cli", *_resume(run_copy, data_file)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env(cache, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                 for r in (0, 1)]
        done = []
        for p in procs:
            out, err = p.communicate(timeout=120)  # before the fix: rank 1 waited 30 min in gloo
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        os.close(fd)
    one_line_error(done[0], "another looplm process", str(run_copy))
    one_line_error(done[1], "rank 0 could not lock", str(run_copy))
    assert snapshot(run_copy) == before


_READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def _read_only_mount_works(directory: Path) -> bool:
    """Whether ``unshare`` (a private mount namespace, as root or a mapped user) can bind-mount
    ``directory`` read-only here."""
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", _READ_ONLY, "sh", str(directory), "sh", "-c",
                                f"! touch {str(directory / 'probe')!r}"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and not (directory / "probe").exists()


def test_run_directory_on_a_read_only_mount_is_one_line(run_copy: Path, tmp_path: Path, cache: Path,
                                                        data_file: Path) -> None:
    """A real read-only file system (a bind mount in a private mount namespace; as root, a chmod'ed
    directory would still be writable): resuming a run there and a new run under it both fail with
    one line naming the directory, and nothing there changes."""
    if not _read_only_mount_works(run_copy):
        pytest.skip("no private read-only bind mount here (unshare -rm needs user namespaces or root)")
    before = snapshot(run_copy)
    for out, word in [(run_copy, "not writable"), (run_copy / "new", "cannot be created")]:
        args = ["train", *TINY, "--data", str(data_file), "--out", str(out), "--resume"]
        command = ["unshare", "-rm", "sh", "-c", _READ_ONLY, "sh", str(run_copy),
                   sys.executable, "-m", "looplm.cli"]
        proc = subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=env(cache))
        one_line_error(proc, str(out), word)
    assert snapshot(run_copy) == before
