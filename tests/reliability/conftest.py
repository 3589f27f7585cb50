"""The reliability suite: the real ``looplm`` command run as a subprocess on bad input and crashes.

Every case asserts a nonzero exit, no Python traceback, one short ``error:`` line on stderr naming
the field or file, and that every file the user had is byte-identical afterwards
(:func:`snapshot` before and after). One tiny run is trained per test worker (``trained``) and
copied by the tests that need a run; the C++ kernels are off (``LOOPLM_NO_CPP_EXT``) except in
the kernel-build tests, so nothing here waits on a compiler.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "tiny", "--no-progress", "--set", "steps=4", "eval_interval=2", "sample_tokens=0",
        "threads=1", "eval_iters=1"]


def corpus_text() -> str:
    """About 150 kB of Python source from the standard library (deterministic, no network)."""
    import json.decoder
    import json.encoder
    import textwrap

    files = [Path(m.__file__) for m in (json.decoder, json.encoder, textwrap, shutil)]
    return "\n".join(p.read_text() for p in files)


def env(cache: Path, **extra: str) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "LOOPLM_CACHE": str(cache), "LOOPLM_NO_CPP_EXT": "1",
         "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return {**e, **extra}


def looplm(*args: str, cache: Path, timeout: float = 120, cwd: Path | None = None,
           preexec_fn=None, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``python -m looplm.cli ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "looplm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(cache, **extra_env), cwd=cwd, preexec_fn=preexec_fn)


def looplm_bg(*args: str, cache: Path, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "looplm.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(cache, **extra_env))


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert the process failed with one ``error:`` line holding every needle; return it."""
    err = proc.stderr.strip()
    assert proc.returncode != 0, (proc.returncode, proc.stdout[-500:], err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err[-3000:]
    assert len(err) < 400, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (and the target of every symlink), by path."""
    out: dict[str, str] = {}
    for root in roots:
        paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(corpus_text())
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, cache: Path, data_file: Path) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4), trained once per worker."""
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = looplm("train", *TINY, "--data", str(data_file), "--out", str(out), cache=cache, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run (symlinks kept)."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst, symlinks=True)
    return dst
