"""The built wheel works on its own: configs ship as package data, ``python -m looplm``, ``--version``.

Builds a wheel from a copy of the source tree, installs it (``--no-deps``) into a fresh venv that
sees this environment's packages (torch is not reinstalled) and runs the CLI from a directory
outside the checkout, with no ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import looplm

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "looplm", src / "looplm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "dist"), "-q"], cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("looplm-*.whl")
    venv_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv_dir)], cwd=tmp, env=env)
    py = venv_dir / "bin" / "python"
    # The new venv's base is the interpreter's, not this environment's: let it see this
    # environment's site-packages (torch & co.) after its own, by a plain path entry, so that
    # this environment's editable looplm (an import hook) stays out.
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        cwd=tmp, env=env).stdout.strip())
    ours = [sysconfig.get_path("purelib"), *site.getsitepackages()]
    (purelib / "looplm_test_parent.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp, env=env)
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["LOOPLM_CACHE"] = str(tmp / "cache")
    env["LOOPLM_NO_CPP_EXT"] = "1"  # the kernels' build is tested elsewhere; keep this test short
    return venv_dir, env


def test_installed_package_is_the_wheel(venv: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    venv_dir, env = venv
    out = _run([str(venv_dir / "bin" / "python"), "-c", "import looplm; print(looplm.__file__)"],
               cwd=tmp_path, env=env).stdout.strip()
    assert Path(out).is_relative_to(venv_dir) and not Path(out).is_relative_to(ROOT)


def test_version_flag_and_module_entry(venv: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    venv_dir, env = venv
    bin_ = venv_dir / "bin"
    a = _run([str(bin_ / "looplm"), "--version"], cwd=tmp_path, env=env).stdout.strip()
    b = _run([str(bin_ / "python"), "-m", "looplm", "--version"], cwd=tmp_path, env=env).stdout.strip()
    assert a == b == f"looplm {looplm.__version__}"


def test_wheel_trains_a_builtin_config_outside_the_checkout(venv: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    venv_dir, env = venv
    _run([str(venv_dir / "bin" / "looplm"), "train", "--config", "tiny", "--no-progress", "--set", "steps=2",
          "max_files=20", "eval_interval=2", "sample_tokens=2", "--out", str(tmp_path / "run")],
         cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "ckpt-000002" / "model.safetensors").is_file()
    # every built-in config ships: an unknown name lists them all
    res = subprocess.run([str(venv_dir / "bin" / "looplm"), "train", "--config", "nope"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    for name in ("tiny", "small", "gdn", "hybrid", "moe"):
        assert name in res.stderr
