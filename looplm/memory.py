"""Will a model fit in memory? Checked from its config before any weight is allocated.

The parameter count comes from building the model on PyTorch's ``meta`` device (shapes only, no
storage), so it is exact for every configuration without a formula to keep in sync. A config that
would not fit (a typo such as ``d_model: 1000000``) is refused with one line instead of the
allocator's error after minutes of swapping.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch

from looplm.errors import ConfigError
from looplm.layers.init import skip_random_init
from looplm.model import LoopConfig, LoopLM

TRAIN_BYTES_PER_PARAM = 16  # float32 weights, gradients and AdamW's two moments
LOAD_BYTES_PER_PARAM = 4  # float32 weights


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Hand the memory the C allocator keeps free back to the OS: glibc's ``malloc_trim(0)`` also
    returns the whole free pages inside its heap, not only past its top. glibc raises its threshold
    for mapping a request on its own up to the largest one freed (32 MB at most; loading a model
    frees tens of MB), so afterwards a prefill's temporaries come from the heap and, once freed,
    stay resident there, next to the next generation's: with SmolLM2-135M int4, a 32-token then two
    1024-token generations peaked 60 MB higher. A no-op where the allocator is not glibc's."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def param_count(config: LoopConfig) -> int:
    """Unique parameters of ``LoopLM(config)`` (tied weights once), without allocating them."""
    with torch.device("meta"), skip_random_init():
        return LoopLM(config).num_params()


def available_bytes() -> int | None:
    """Memory the OS can give this process now (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(config: LoopConfig, bytes_per_param: int, what: str) -> None:
    """ConfigError when ``bytes_per_param`` bytes per parameter exceed the available memory."""
    need = param_count(config) * bytes_per_param
    have = available_bytes()
    if have is not None and need > have:
        raise ConfigError(f"{what} needs about {need / 2**30:.1f} GiB for its {need // bytes_per_param:,} "
                          f"parameters (d_model={config.d_model}) but {have / 2**30:.1f} GiB is available; "
                          "check the model size in the config")
