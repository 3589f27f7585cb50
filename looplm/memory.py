"""Will a model fit in memory? Checked from its config before any weight is allocated.

The parameter count comes from building the model on PyTorch's ``meta`` device (shapes only, no
storage), so it is exact for every configuration without a formula to keep in sync. A config that
would not fit (a typo such as ``d_model: 1000000``) is refused with one line instead of the
allocator's error after minutes of swapping.
"""

from __future__ import annotations

import torch

from looplm.errors import ConfigError
from looplm.layers.init import skip_random_init
from looplm.model import LoopConfig, LoopLM

TRAIN_BYTES_PER_PARAM = 16  # float32 weights, gradients and AdamW's two moments
LOAD_BYTES_PER_PARAM = 4  # float32 weights


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
