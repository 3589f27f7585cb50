"""``looplm serve`` as a process: it prints its address, serves a checkpoint, binds loopback.

Bounded but patient: a loaded machine can take minutes to import torch and FastAPI, so each
wait has a deadline of ``PATIENCE`` seconds, and the child uses PyTorch's kernels (no C++ build
on first use; the kernels are tested elsewhere)."""

import os
import queue
import re
import subprocess
import sys
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from looplm.checkpoint import save_model  # noqa: E402
from tests.serve.util import tiny_model, tokenizer  # noqa: E402

PATIENCE = 600
ENV = {**os.environ, "LOOPLM_KERNELS": "torch", "OMP_NUM_THREADS": "1"}


def first_line(proc: subprocess.Popen) -> str:
    """The process's first stdout line, or "" if none comes within PATIENCE seconds."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=PATIENCE)
    except queue.Empty:
        return ""


def test_serve_command(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model("gated_deltanet"), ckpt)
    tokenizer().save(ckpt)
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "looplm.cli", "serve", str(ckpt), "--port", "0",
                                 "--threads", "1", "--draft", "ngram:3"],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV)
    try:
        line = first_line(proc)
        m = re.search(r"http://(127\.0\.0\.1):(\d+)", line)
        assert m, f"no address printed: {line!r}\n{err.read_text()}"
        url = f"http://127.0.0.1:{m.group(2)}"
        r = httpx.post(url + "/v1/completions", json={"model": "ckpt", "prompt": "hi", "max_tokens": 4},
                       timeout=PATIENCE)
        assert r.status_code == 200 and r.json()["model"] == "ckpt"
        r = httpx.post(url + "/v1/completions", json={"model": "ckpt", "prompt": "abcabcabc", "max_tokens": 8,
                                                      "temperature": 0}, timeout=PATIENCE)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1  # greedy: speculative
        assert httpx.get(url + "/v1/models", timeout=PATIENCE).json()["data"][0]["id"] == "ckpt"
    finally:
        proc.kill()
        proc.wait(60)


def test_serve_command_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "looplm.cli", "serve", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=PATIENCE, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: checkpoint directory")


def test_serve_command_bad_draft(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model(), ckpt)
    tokenizer().save(ckpt)
    r = subprocess.run([sys.executable, "-m", "looplm.cli", "serve", str(ckpt), "--draft", "layers:9"],
                       capture_output=True, text=True, timeout=PATIENCE, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --draft layers:9")


def test_serve_command_bf16_prefill_without_kernels_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model(), ckpt)
    tokenizer().save(ckpt)
    r = subprocess.run([sys.executable, "-m", "looplm.cli", "serve", str(ckpt), "--bf16-prefill"],
                       capture_output=True, text=True, timeout=PATIENCE, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: bf16 prefill needs a CPU with AMX")


@pytest.mark.parametrize("flag,value,says", [("--port", "99999", "port number 0-65535"),
                                             ("--threads", "-1", "positive integer")])
def test_serve_command_bad_numbers_are_one_usage_error(tmp_path, flag, value, says):
    """A port out of range or a thread count below 1 is argparse's one error line (status 2), before
    any model is loaded."""
    r = subprocess.run([sys.executable, "-m", "looplm.cli", "serve", str(tmp_path / "nope"), flag, value],
                       capture_output=True, text=True, timeout=PATIENCE, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"looplm serve: error: argument {flag}: must be a {says}, " \
        f"got '{value}'"
