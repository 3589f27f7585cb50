"""looplm's C++ CPU kernels (``csrc/``): built on first use with torch's extension loader, cached.

Hand-written only where a benchmark showed PyTorch's own CPU ops leave a large factor on the table:

- ``delta_kernel.cpp``: the delta rule's chunk form, each thread on its own groups
  (:mod:`looplm.ops.delta_kernel`);
- ``linear_small.cpp``: ``x W^T`` for the few rows of a decoding step (:mod:`looplm.ops.linear`);
- ``qlinear.cpp`` (+ ``qmatvec.h``): the same with int8 / int4 weights, and quantised embedding rows
  (:mod:`looplm.ops.qlinear`);
- ``block_step.cpp``: a whole fixed-state block's decoding step in one call, ``moe_step.cpp`` its
  mixture-of-experts FFN, ``attn_step.cpp`` an attention block's (:mod:`looplm.layers.block_step`);
- ``norm_rope.cpp``: RMSNorm (forward, backward) and the RoPE rotation in one pass per row
  (:mod:`looplm.layers.norms`, :mod:`looplm.ops.attention`);
- ``swiglu.cpp``: the SwiGLU activation, forward and backward (:mod:`looplm.layers.ffn`);
- ``vec.h``: the dot product they share; ``simd.h``: ATen's vector type at this CPU's width;
  ``decode.h``: what the decoding kernels share (checks, few-row products, norms, SwiGLU FFN).

The build needs a C++ compiler and ``ninja`` (seconds; ``~/.cache/torch_extensions``, one directory
per version of the sources). It compiles for the machine it runs on (``-march=native``) with OpenMP
(ATen's header-only ``at::parallel_for`` is serial without it) and links torch's own ``libgomp``.
Where it cannot be built, or with ``LOOPLM_NO_CPP_EXT=1``, :func:`available` is False and every
caller runs its PyTorch form instead (one warning says why).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

__all__ = ["available"]

_CSRC = Path(__file__).parent / "csrc"
SOURCES = [_CSRC / name for name in ("delta_kernel.cpp", "linear_small.cpp", "block_step.cpp",
                                     "attn_step.cpp", "moe_step.cpp", "norm_rope.cpp", "swiglu.cpp",
                                     "qlinear.cpp")]
HEADERS = [_CSRC / "vec.h", _CSRC / "simd.h", _CSRC / "decode.h", _CSRC / "qmatvec.h"]
# 512-bit vectors where the CPU has them (GCC prefers 256 on some AVX-512 CPUs): a cold
# [2048, 384] matrix-vector product of linear_small.cpp took 115 instead of 137 us here
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
_loaded: dict[str, bool] = {}


def _name(sources: list[Path]) -> str:
    """Extension name with a hash of the sources: checkouts with other sources do not rebuild ours."""
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in [*sources, *HEADERS])).hexdigest()[:10]
    return f"looplm_kernels_{digest}"


def available() -> bool:
    """Build (cached on disk) and load the kernels once per process; False if that fails or is disabled."""
    if "ok" not in _loaded:
        _loaded["ok"] = False
        if os.environ.get("LOOPLM_NO_CPP_EXT", "") not in ("", "0"):
            return False
        try:
            from torch.utils.cpp_extension import load

            load(name=_name(SOURCES), sources=[str(p) for p in SOURCES], is_python_module=False,
                 extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
            _loaded["ok"] = True
        except Exception as err:  # no compiler or ninja, read-only cache: fall back, say so once
            first_line = (str(err).splitlines() or [""])[0][:200]
            warnings.warn(f"looplm: the C++ kernels are unavailable ({type(err).__name__}: {first_line}); "
                          "using the slower PyTorch forms", RuntimeWarning, stacklevel=2)
    return _loaded["ok"]
