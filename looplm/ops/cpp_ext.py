"""looplm's C++ CPU kernels (``csrc/``): built on first use with torch's extension loader, cached.

Hand-written only where a benchmark showed PyTorch's own CPU ops leave a large factor on the table:

- ``delta_kernel.cpp``: the delta rule's chunk form, each thread on its own groups
  (:mod:`looplm.ops.delta_kernel`);
- ``linear_small.cpp``: ``x W^T`` for the few rows of a decoding step (:mod:`looplm.ops.linear`);
- ``qlinear.cpp`` (+ ``qmatvec.h``): the same with int8 / int4 weights, and quantised embedding rows
  (:mod:`looplm.ops.qlinear`);
- ``layer_step.cpp``: a whole fixed-state layer's decoding step in one call, ``moe_step.cpp`` its
  mixture-of-experts FFN, ``attn_step.cpp`` an attention layer's (:mod:`looplm.layers.layer_step`),
  ``attn_verify.cpp`` a few tokens of one row through every attention layer (speculative decoding's
  verification forward); ``liger_step.cpp`` the recurrence of a linearised (Liger GLA) layer's step;
- ``norm_rope.cpp``: RMSNorm (forward, backward) and the RoPE rotation in one pass per row
  (:mod:`looplm.layers.norms`, :mod:`looplm.ops.attention`);
- ``swiglu.cpp``: the SwiGLU activation, forward and backward (:mod:`looplm.layers.ffn`);
- ``vec.h``: the dot product they share; ``simd.h``: ATen's vector type at this CPU's width;
  ``rows_gemm.h``: float32 ``x W^T`` for the 4-64 rows of a batched decoding step (AVX-512);
  ``decode.h``: what the decoding kernels share (checks, few-row products, norms, SwiGLU FFN).

The build needs a C++ compiler and ``ninja`` (seconds; ``~/.cache/torch_extensions``, one directory
per version of the sources). It compiles for the machine it runs on (``-march=native``) with OpenMP
(ATen's header-only ``at::parallel_for`` is serial without it) and links torch's own ``libgomp``.
The one switch: ``LOOPLM_KERNELS=cpp`` (the default) uses the kernels where they apply;
``LOOPLM_KERNELS=ops`` the C++ ops but every layer's Python step (no whole-layer decoding
kernel); ``LOOPLM_KERNELS=torch`` (``LOOPLM_NO_CPP_EXT=1`` is the same) every PyTorch form.
Inside ``with kernels(setting):`` the setting is overridden inside the statement (tests compare them).
:func:`available` (C++ ops) and :func:`layer_steps` (whole-layer steps) are the answers every
kernel user asks: False where the setting says so, where the kernels cannot be built (one warning
says why) and while ``torch.compile`` traces. Which step each layer of a model runs is decided in
:mod:`looplm.layers.layer_step`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from looplm.errors import ConfigError
from looplm.ops import kernel_tracing

__all__ = ["available", "layer_steps", "kernels", "kernel_setting"]

_CSRC = Path(__file__).parent / "csrc"
SOURCES = [_CSRC / name for name in ("delta_kernel.cpp", "linear_small.cpp", "layer_step.cpp",
                                     "attn_step.cpp", "attn_verify.cpp", "moe_step.cpp", "norm_rope.cpp",
                                     "swiglu.cpp", "qlinear.cpp", "liger_step.cpp")]
HEADERS = [_CSRC / "vec.h", _CSRC / "simd.h", _CSRC / "decode.h", _CSRC / "qmatvec.h", _CSRC / "rows_gemm.h",
           _CSRC / "amx_gemm.h", _CSRC / "liger.h"]
# 512-bit vectors where the CPU has them (GCC prefers 256 on some AVX-512 CPUs): a cold
# [2048, 384] matrix-vector product of linear_small.cpp took 115 instead of 137 us here
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
BUILD_LOCK = "looplm-build.lock"
_loaded: dict[str, Any] = {}  # the setting read from the environment, whether the build worked


def _name(sources: list[Path], cflags: list[str] = _CFLAGS, ldflags: list[str] = _LDFLAGS) -> str:
    """Extension name with a hash of the sources' paths and bytes and the compiler flags: two
    checkouts (or flag sets) on one machine each keep their own build instead of rebuilding each other's."""
    digest = hashlib.sha1()
    for p in [*sources, *HEADERS]:
        digest.update(str(p.resolve()).encode() + b"\0" + p.read_bytes() + b"\0")
    digest.update("\0".join([*cflags, "|", *ldflags]).encode())
    return f"looplm_kernels_{digest.hexdigest()[:10]}"


def build(name: str, sources: list[Path], cflags: list[str], ldflags: list[str],
          timeout_s: float | None = None) -> None:
    """Compile (or find cached) and load ``sources`` as the shared library ``name``.

    torch's loader guards a build with a lock *file* that a build killed mid-way leaves behind,
    after which every later load waits on it forever. So each build here first takes
    ``fcntl.flock`` on ``<build dir>/looplm-build.lock``, which the kernel releases when its
    holder dies: whoever holds it knows no other build runs, and removes a leftover torch lock.
    Waiting on a live builder ends after ``timeout_s`` (``$LOOPLM_BUILD_TIMEOUT``, default 600 s)
    with TimeoutError naming the lock.
    """
    from torch.utils.cpp_extension import _get_build_directory, load  # torch's own cache layout

    if timeout_s is None:
        timeout_s = float(os.environ.get("LOOPLM_BUILD_TIMEOUT") or 600)
    build_dir = Path(_get_build_directory(name, verbose=False))
    fd = os.open(build_dir / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has held {build_dir / BUILD_LOCK} for over "
                                       f"{timeout_s:.0f} s (raise LOOPLM_BUILD_TIMEOUT to wait)") from None
                time.sleep(0.2)
        (build_dir / "lock").unlink(missing_ok=True)  # torch's lock file: stale, as we hold the lock
        load(name=name, sources=[str(p) for p in sources], build_directory=str(build_dir),
             is_python_module=False, extra_cflags=cflags, extra_ldflags=ldflags, verbose=False)
    finally:
        os.close(fd)


KERNEL_SETTINGS = ("cpp", "ops", "torch")


def kernel_setting() -> str:
    """``LOOPLM_KERNELS`` (``cpp``, the default, ``ops`` or ``torch``); ``LOOPLM_NO_CPP_EXT=1`` means
    ``torch``. Any other value is a ConfigError naming the choices."""
    value = os.environ.get("LOOPLM_KERNELS", "").strip().lower()
    if value and value not in KERNEL_SETTINGS:
        raise ConfigError(f"LOOPLM_KERNELS={value!r} is not one of {', '.join(KERNEL_SETTINGS)}")
    if os.environ.get("LOOPLM_NO_CPP_EXT", "") not in ("", "0"):
        return "torch"
    return value or "cpp"


_override: list[str] = []  # the settings of the enclosing kernels() statements, innermost last


@contextlib.contextmanager
def kernels(setting: str) -> Iterator[None]:
    """Within this ``with`` statement run ``setting``'s implementations (``cpp``, ``ops`` or ``torch``, as
    ``LOOPLM_KERNELS``), whatever ``LOOPLM_KERNELS`` says."""
    if setting not in KERNEL_SETTINGS:
        raise ConfigError(f"kernels({setting!r}): not one of {', '.join(KERNEL_SETTINGS)}")
    _override.append(setting)
    try:
        yield
    finally:
        _override.pop()


def setting() -> str:
    """The setting in force: the innermost :func:`kernels` statement's, else ``LOOPLM_KERNELS``
    (read once)."""
    if _override:
        return _override[-1]
    if "setting" not in _loaded:
        _loaded["setting"] = kernel_setting()  # a bad LOOPLM_KERNELS raises here, before anything is cached
    return _loaded["setting"]


def available() -> bool:
    """Whether the C++ ops run now: the setting is ``cpp`` or ``ops`` and they are built (on disk,
    loaded once per process). While ``torch.compile`` traces: False (the kernels' users run their
    PyTorch forms, which the compiler fuses and differentiates). While ``torch.export`` traces:
    whether they were loaded before (the ops with fake implementations, :mod:`looplm.ops.kernel_tracing`,
    go into the graph)."""
    if torch.compiler.is_compiling():
        return torch.compiler.is_exporting() and _loaded.get("built", False) and setting() != "torch"
    return setting() != "torch" and _built()


def layer_steps() -> bool:
    """Whether whole-layer decoding steps run now (setting ``cpp``, kernels available)."""
    return setting() == "cpp" and available()


def _built() -> bool:
    """Build (cached on disk) and load the kernels once per process; False if that fails."""
    if "built" not in _loaded:
        _loaded["built"] = False
        try:
            build(_name(SOURCES), SOURCES, _CFLAGS, _LDFLAGS)
            kernel_tracing.register()
            _loaded["built"] = True
        except Exception as err:  # no compiler or ninja, read-only cache: fall back, say so once
            first_line = (str(err).splitlines() or [""])[0][:200]
            warnings.warn(f"looplm: the C++ kernels are unavailable ({type(err).__name__}: {first_line}); "
                          "using the slower PyTorch forms", RuntimeWarning, stacklevel=3)
    return _loaded["built"]
