"""``looplm serve`` as a process: it prints its address, serves a checkpoint, binds loopback."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from looplm.checkpoint import save_model  # noqa: E402
from tests.serve.util import tiny_model, tokenizer  # noqa: E402


def test_serve_command(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model("gated_deltanet"), ckpt)
    tokenizer().save(ckpt)
    proc = subprocess.Popen([sys.executable, "-m", "looplm.cli", "serve", str(ckpt), "--port", "0",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://(127\.0\.0\.1):(\d+)", line)
        assert m, line + proc.stderr.read()
        url = f"http://127.0.0.1:{m.group(2)}"
        r = httpx.post(url + "/v1/completions", json={"model": "ckpt", "prompt": "hi", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "ckpt"
        assert httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"] == "ckpt"
    finally:
        proc.kill()
        proc.wait(30)


def test_serve_command_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "looplm.cli", "serve", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: checkpoint directory")
