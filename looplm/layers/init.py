"""``skip_random_init()``: build modules whose weights are about to be replaced, without writing them.

Loading a checkpoint or counting parameters builds the model first; initialising ~10^8 random
weights that are thrown away costs seconds, and written pages stay resident (a float copy beside
the stored weights). Inside this context ``torch.nn.init``'s functions and the tensor methods they
use return their tensor unwritten: on the CPU an untouched allocation holds no resident page, and
on the ``meta`` device the random ops' Python shape functions (which import ``torch._dynamo``, about
120 MB resident) never run. Every other op runs as usual.
"""

from __future__ import annotations

from typing import Any

from torch.overrides import TorchFunctionMode

__all__ = ["skip_random_init"]

_RANDOM_INIT = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                          "xavier_uniform_", "xavier_normal_", "orthogonal_"})


class skip_random_init(TorchFunctionMode):  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Within this context random initialisation leaves its tensor as it is (uninitialised)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _RANDOM_INIT:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)
