"""The C++ kernels' ops as ``torch.export`` sees them: fake (meta) implementations.

The ops are defined in ``csrc/`` (``TORCH_LIBRARY`` schemas, CPU implementations); a fake
implementation returns empty tensors of the shapes and dtypes the kernel returns, so tracing
records the op without running it (``torch.library.register_fake``). Registered once, by
:func:`looplm.ops.cpp_ext.available` after the kernels load.

The delta rule's chunk forward returns its own inputs among the tensors it saves for the
backward (outputs aliasing inputs, which a traced op may not have): :func:`delta_chunk` is a
custom op (``torch.library.custom_op``) around it that returns only the output and the final
state, for inference; its backward's fake gives the gradients the shapes of the saved inputs.
The decoding-step ops (a whole layer's step for one token per row) have fakes too, so a traced
or exported decoding step keeps them as single nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FAKE_OPS", "delta_chunk", "register"]


@torch.library.custom_op("looplm_traced::delta_chunk", mutates_args=())
def delta_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
                s0: torch.Tensor, n: int, scale: float, tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [G*N, C, dv], final state [G, dk, dv])`` of the C++ chunk kernel (inputs as
    :class:`~looplm.ops.delta_chunkwise.DeltaChunkFn` takes them); no autograd."""
    out = torch.ops.looplm.delta_chunk_forward(q, k, v, beta, g, s0, n, scale, tile_rows)
    return out[0], out[1]


@delta_chunk.register_fake
def _delta_chunk_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                      g: torch.Tensor | None, s0: torch.Tensor, n: int, scale: float,
                      tile_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    dv = v.shape[2]
    return q.new_empty(q.shape[0], q.shape[1], dv), q.new_empty(q.shape[0] // n, q.shape[2], dv)


def _linear_small(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _qlinear(x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], w[0].shape[0])


def _qembedding(ids: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    dim = w[0].shape[1] if len(w) == 2 else 2 * w[0].shape[1]  # int8 rows, or int4 packed two per byte
    return w[1].new_empty(ids.shape[0], dim)


def _rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    return x.new_empty(x.shape)


def _rms_norm_forward(x: torch.Tensor, w: torch.Tensor, gate: torch.Tensor | None,
                      eps: float) -> list[torch.Tensor]:
    return [x.new_empty(x.shape), x.new_empty(x.shape[0], 1)]


def _rms_norm_backward(gy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, w: torch.Tensor,
                       gate: torch.Tensor | None, need_w: bool) -> list[torch.Tensor]:
    return [x.new_empty(x.shape), x.new_empty(w.numel() if need_w else 0),
            x.new_empty(x.shape if gate is not None else (0,))]


def _swiglu_forward(h: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return h.new_empty(h.shape[0], h.shape[1] // 2)


def _swiglu_backward(gy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor | None,
                     need_w: bool) -> list[torch.Tensor]:
    return [h.new_empty(h.shape), h.new_empty(h.shape[0] if need_w else 0)]


def _delta_chunk_backward(d_o: torch.Tensor, d_final: torch.Tensor, saved: list[torch.Tensor], n: int,
                          scale: float, gated: bool, tile_rows: int) -> list[torch.Tensor]:
    q, k, v, beta = saved[:4]  # q, k [G*N, C, dk], v [G*N, C, dv], beta [G*N, C]
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), beta.new_empty(beta.shape),
            beta.new_empty(beta.shape if gated else (0,)),
            q.new_empty(q.shape[0] // n, q.shape[2], v.shape[2])]


def _layer_step(h: torch.Tensor, conv_state: torch.Tensor, ssm: torch.Tensor,
                *rest: Any) -> list[torch.Tensor]:
    """A fixed-state layer's step: (h' [B, d], conv state', ssm') shaped as their inputs."""
    return [h.new_empty(h.shape), conv_state.new_empty(conv_state.shape), ssm.new_empty(ssm.shape)]


def _attn_step_in(h: torch.Tensor, norm_w: torch.Tensor, eps: float, qkv_w: list[torch.Tensor],
                  inv_freq: torch.Tensor, positions: torch.Tensor, n_heads: int,
                  n_kv_heads: int) -> torch.Tensor:
    return h.new_empty(h.shape[0], n_heads + 2 * n_kv_heads, 2 * inv_freq.shape[0])


def _attn_step_out(h: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
    return h.new_empty(h.shape)


def _attn_stack_step(h: torch.Tensor, *rest: Any) -> torch.Tensor:
    """The stack's output ``[B, d]`` (or ``[T, d]``); the caches (and linearised layers' states) it
    writes in place are its arguments."""
    return h.new_empty(h.shape)


def _liger_gla_step(qkv: torch.Tensor, ssm: torch.Tensor, n_heads: int, n_kv_heads: int,
                    *rest: Any) -> list[torch.Tensor]:
    """(o [B, H, D], ssm' shaped as ssm, roped q and k [B, H + Hkv, D])."""
    B, _, D = qkv.shape
    return [qkv.new_empty(B, n_heads, D), ssm.new_empty(ssm.shape), qkv.new_empty(B, n_heads + n_kv_heads, D)]


def _moe_step(h: torch.Tensor, norm_w: torch.Tensor, eps: float, router_w: torch.Tensor,
              *rest: Any) -> list[torch.Tensor]:
    """(y [B, d], load [E], balance loss [], z loss [])."""
    return [h.new_empty(h.shape), h.new_empty(router_w.shape[0]), h.new_empty(()), h.new_empty(())]


FAKE_OPS: dict[str, Callable[..., Any]] = {
    "linear_small": _linear_small, "qlinear": _qlinear, "qembedding": _qembedding,
    "rope_rotate": _rope_rotate, "rms_norm_forward": _rms_norm_forward,
    "rms_norm_backward": _rms_norm_backward,
    "swiglu_forward": _swiglu_forward, "swiglu_backward": _swiglu_backward,
    "delta_chunk_backward": _delta_chunk_backward, "delta_layer_step": _layer_step,
    "decay_layer_step": _layer_step, "attn_step_in": _attn_step_in, "attn_step_out": _attn_step_out,
    "attn_stack_step": _attn_stack_step, "attn_stack_verify": _attn_stack_step, "moe_step": _moe_step,
    "liger_gla_step": _liger_gla_step}
_registered: list[str] = []


def register() -> None:
    """Register every fake of :data:`FAKE_OPS` on ``torch.ops.looplm`` (once per process)."""
    for name, fn in FAKE_OPS.items():
        if name not in _registered:
            torch.library.register_fake(f"looplm::{name}", fn)
            _registered.append(name)
