"""``kernel_and_python_steps``: a model's decoding steps with the C++ layer steps beside the same
steps with every layer's Python step, for tests comparing the two."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from looplm.model import LoopLM, LoopOutput
from looplm.ops import cpp_ext
from looplm.state import ModelState


def kernel_and_python_steps(model: LoopLM, ids: torch.Tensor, prompt: int,
                            state: ModelState | None = None) -> Iterator[tuple[int, LoopOutput, LoopOutput]]:
    """Reads ``ids [B,T]``'s first ``prompt`` tokens (from ``state``, e.g. one held in int8; None: a
    new one), then steps one token at a time; yields ``(t, kernel step's output, Python step's
    output)`` for t = prompt .. T-1 (no grad)."""
    with torch.no_grad():
        s_fused = s_py = model(ids[:, :prompt], state=state, use_cache=True).state
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t:t + 1], state=s_fused)
            with cpp_ext.kernels("ops"):
                ref = model(ids[:, t:t + 1], state=s_py)
            s_fused, s_py = out.state, ref.state
            yield t, out, ref
