"""Low-precision storage of the decoding state: fixed-size mixer states and attention KV caches.

Rows are quantised by :mod:`looplm.ops.kv_quant` (one scale per row of the last dimension: one
head's value vector, one cached key; int8 with ``s = max|row|/127`` or FP8 E4M3, ~1 + 4/D bytes
per element instead of 4).

- Attention caches become :class:`~looplm.layers.mixer_states.QuantKVState` once and stay so:
  the attention mixer appends each new token's quantised rows and reads the codes chunk by
  chunk, so a step never re-quantises or expands the context already stored (its cost and
  memory do not grow with it beyond reading the codes).
- Fixed-size recurrent states (``ssm [B,H,dk,dv]``, ``conv [B,K-1,C]``) change entirely every
  step: they are held as :class:`QTensor` between steps (``compress_state``) and expanded for the
  next forward (``decompress_state``); a cost per step independent of the context. Only they
  accumulate rounding (``stepwise_loss`` measures the effect).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from looplm.layers.mixer_states import KVState, QuantKVState
from looplm.ops import kv_quant
from looplm.state import ModelState

STATE_FORMATS = ("int8", "fp8_e4m3")


@dataclass
class QTensor:
    """A tensor stored per last-dim row: ``q [..., D]`` (int8 or float8) and ``scale [..., 1]``."""

    q: Tensor
    scale: Tensor
    dtype: torch.dtype

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


def quantize_rows(x: Tensor, fmt: str = "int8") -> QTensor:
    """Quantise ``x [..., D]`` per row of its last dimension in ``fmt`` (int8 | fp8_e4m3)."""
    if fmt not in STATE_FORMATS:
        raise ValueError(f"state format {fmt!r} is not one of {', '.join(STATE_FORMATS)}")
    q, scale = kv_quant.quantize_rows(x, kv_quant.code_dtype(fmt))
    return QTensor(q, scale, x.dtype)


def dequantize_rows(t: QTensor) -> Tensor:
    return kv_quant.dequantize_rows(t.q, t.scale, t.dtype)


@dataclass
class QuantizedState:
    """A ModelState whose layer states hold ``QTensor``s in place of their float tensors."""

    positions: Tensor
    layers: dict[str, Any]
    fmt: str

    def nbytes(self) -> int:
        total = self.positions.numel() * self.positions.element_size()
        for s in self.layers.values():
            for f in dataclasses.fields(s):
                v = getattr(s, f.name)
                total += v.nbytes() if isinstance(v, QTensor) else v.numel() * v.element_size()
        return total


def _map_floats(layer_state: Any, fn) -> Any:
    changes = {f.name: fn(v) for f in dataclasses.fields(layer_state)
               if isinstance(v := getattr(layer_state, f.name), (Tensor, QTensor))
               and (isinstance(v, QTensor) or (v.is_floating_point() and v.dim() >= 2))}
    return dataclasses.replace(layer_state, **changes)


def quantize_cache(kv: KVState, fmt: str = "int8") -> QuantKVState:
    """``kv`` as a quantised cache (a QuantKVState in ``fmt`` is returned as it is)."""
    if isinstance(kv, QuantKVState):
        if kv.k.dtype != kv_quant.code_dtype(fmt):
            raise ValueError(f"the cache is held as {kv.k.dtype}, not in state format {fmt!r}")
        return kv
    dtype = kv_quant.code_dtype(fmt)
    (k, k_scale), (v, v_scale) = kv_quant.quantize_rows(kv.k, dtype), kv_quant.quantize_rows(kv.v, dtype)
    return QuantKVState(k, v, kv.key_mask, kv.pos, kv.seen, k_scale, v_scale)


def quantize_caches(state: ModelState, fmt: str = "int8") -> ModelState:
    """``state`` with its attention caches quantised (:func:`quantize_cache`), its other layer
    states as they are: e.g. an empty state from which decoding keeps int8 caches."""
    return ModelState(state.positions, {k: quantize_cache(s, fmt) if isinstance(s, KVState) else s
                                        for k, s in state.layers.items()})


def compress_state(state: ModelState, fmt: str = "int8") -> QuantizedState:
    """``state`` held in ``fmt``: attention caches as QuantKVState (already quantised ones as they
    are: O(1)), every floating tensor (≥ 2-D) of the other layer states as a QTensor."""
    if fmt not in STATE_FORMATS:
        raise ValueError(f"state format {fmt!r} is not one of {', '.join(STATE_FORMATS)}")
    layers = {k: quantize_cache(s, fmt) if isinstance(s, KVState)
              else _map_floats(s, lambda t: quantize_rows(t, fmt)) for k, s in state.layers.items()}
    return QuantizedState(state.positions, layers, fmt)


def decompress_state(qstate: QuantizedState) -> ModelState:
    """The ModelState for the next forward: recurrent states expanded, caches left quantised."""
    layers = {k: s if isinstance(s, KVState) else _map_floats(s, dequantize_rows)
              for k, s in qstate.layers.items()}
    return ModelState(qstate.positions, layers)


@torch.no_grad()
def stepwise_loss(model: torch.nn.Module, ids: Tensor, state_format: str | None = None) -> tuple[float, int]:
    """Teacher-forced next-token loss of ``ids [B, T]`` decoded one token per forward, the
    state stored in ``state_format`` between steps (None: float). Returns (mean loss in nats,
    largest stored state in bytes). A loop over time: this *is* decoding."""
    state: ModelState | QuantizedState | None = None  # what is stored between steps
    losses: list[Tensor] = []
    peak = 0
    for t in range(ids.shape[1] - 1):
        live = decompress_state(state) if isinstance(state, QuantizedState) else state
        out = model(ids[:, t:t + 1], state=live, use_cache=True)
        losses.append(F.cross_entropy(out.logits[:, 0].float(), ids[:, t + 1]))
        state = compress_state(out.state, state_format) if state_format else out.state
        peak = max(peak, state.nbytes())
    return torch.stack(losses).mean().item(), peak
