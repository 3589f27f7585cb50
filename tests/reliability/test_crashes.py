"""Crashes with real processes and signals: SIGKILL inside a checkpoint write, a full disk
(a file-size limit on the process), and a C++ kernel build killed mid-way."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from looplm.checkpoint import load_model
from looplm.ops import cpp_ext
from tests.reliability.conftest import ROOT, TINY, looplm, looplm_bg, one_line_error, snapshot


def _resume(run: Path, data: Path, *extra: str) -> list[str]:
    return ["train", *TINY, *extra, "--data", str(data), "--out", str(run), "--resume"]


def test_full_disk_keeps_the_previous_checkpoint(run_copy: Path, cache: Path, data_file: Path) -> None:
    kept = snapshot(run_copy / "ckpt-000004")
    limit = (run_copy / "ckpt-000004" / "model.safetensors").stat().st_size // 2

    def small_disk() -> None:  # writes past `limit` bytes fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = looplm(*_resume(run_copy, data_file, "steps=6"), cache=cache, preexec_fn=small_disk)
    one_line_error(proc, "ckpt-000006", "ckpt-000004 is intact")
    assert os.readlink(run_copy / "latest") == "ckpt-000004"
    assert snapshot(run_copy / "ckpt-000004") == kept
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".tmp-") or p.name == "ckpt-000006"]
    proc = looplm(*_resume(run_copy, data_file, "steps=6"), cache=cache)  # space again: it goes on
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.readlink(run_copy / "latest") == "ckpt-000006"


def test_sigkill_inside_checkpoint_writes_leaves_a_loadable_latest(run_copy: Path, cache: Path,
                                                                   data_file: Path) -> None:
    """Kill the run the moment a checkpoint's temporary directory appears, twice over."""
    for steps in (8, 12):
        proc = looplm_bg(*_resume(run_copy, data_file, f"steps={steps}"), cache=cache)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(n.startswith(".tmp-") for n in os.listdir(run_copy)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.kill()
        print("killed inside a checkpoint write" if proc.wait() == -signal.SIGKILL else "finished first")
        load_model(run_copy / "latest")  # complete and verified by its checksums
    proc = looplm(*_resume(run_copy, data_file, "steps=14"), cache=cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.readlink(run_copy / "latest") == "ckpt-000014"
    assert not [p for p in run_copy.iterdir() if p.name.startswith((".tmp-", ".old-"))]


SLOW_SOURCE = textwrap.dedent("""
    // compiles for a second or so: a constant evaluated at compile time
    constexpr unsigned long long spin(unsigned long long n) {
        unsigned long long x = 0;
        for (unsigned long long i = 0; i < n; ++i) x += i * i % 7;
        return x;
    }
    extern "C" unsigned long long looplm_test_value() { constexpr auto v = spin(1000000ULL); return v; }
""")


FLAGS = ["-O1", "-fconstexpr-ops-limit=1000000000", "-fconstexpr-loop-limit=100000000"]


def _builder(src: Path, ext_dir: Path) -> subprocess.Popen:
    code = (f"from pathlib import Path; from looplm.ops import cpp_ext; "
            f"cpp_ext.build('looplm_reliability_test', [Path({str(src)!r})], "
            f"{FLAGS!r}, [], timeout_s=120); print('built')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(ext_dir)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_killed_kernel_build_does_not_hang_the_next(tmp_path: Path) -> None:
    src, ext_dir = tmp_path / "slow.cpp", tmp_path / "ext"
    src.write_text(SLOW_SOURCE)
    first = _builder(src, ext_dir)
    baton = ext_dir / "looplm_reliability_test" / "lock"  # torch's lock file, held during the build
    deadline = time.monotonic() + 120
    while not baton.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)  # mid-build: torch's lock file stays behind
    first.wait()
    assert baton.exists()
    second = _builder(src, ext_dir)
    try:
        out, err = second.communicate(timeout=180)  # before the fix: waits on the stale lock forever
    finally:
        second.kill()
        second.wait()
    assert second.returncode == 0 and "built" in out, err[-2000:]


def test_build_cache_key_has_the_source_path_and_flags(tmp_path: Path) -> None:
    copy = [tmp_path / p.name for p in cpp_ext.SOURCES]
    for p, c in zip(cpp_ext.SOURCES, copy):
        c.write_bytes(p.read_bytes())
    name = cpp_ext._name(cpp_ext.SOURCES)
    assert cpp_ext._name(copy) != name  # same bytes, another checkout
    assert cpp_ext._name(cpp_ext.SOURCES, ["-O2"]) != name
    assert cpp_ext._name(cpp_ext.SOURCES, ldflags=["-lm"]) != name
    assert cpp_ext._name(cpp_ext.SOURCES) == name


def test_build_waits_on_a_live_builder_only_until_the_timeout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lock = tmp_path / "ext" / "looplm_reliability_wait" / cpp_ext.BUILD_LOCK
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("holding", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        try:
            cpp_ext.build("looplm_reliability_wait", [tmp_path / "x.cpp"], [], [], timeout_s=1)
        except TimeoutError as err:
            assert "LOOPLM_BUILD_TIMEOUT" in str(err) and str(lock) in str(err)
        else:
            raise AssertionError("build did not time out")
        assert time.monotonic() - start < 30
    finally:
        holder.kill()
        holder.wait()
