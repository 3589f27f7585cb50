"""Low-precision storage of the decoding state: fixed-size mixer states and attention KV caches.

Every floating tensor of a layer state (``ssm [B,H,dk,dv]``, ``conv [B,K-1,C]``, ``k, v
[B,S,Hkv,D]``) is stored per row of its last dimension (one head's value vector, one cached
key) as int8 with ``s = max|row|/127`` (``|x - x̂| ≤ s/2``) or as FP8 E4M3 with ``s = max|row|
/448`` (relative error ≤ 2^-4), plus a float32 scale per row: ~1 + 4/D bytes per element instead
of 4. Between decoding steps the state is held compressed (``compress_state``) and expanded
for the next forward (``decompress_state``); a cached KV row re-quantises to the same codes, so
only the recurrent state accumulates rounding (``stepwise_loss`` measures the effect).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from looplm.quant.formats import FP8_MAX, cast_fp8
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
    top = 127.0 if fmt == "int8" else FP8_MAX[fmt]
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / top).clamp(min=torch.finfo(torch.float32).tiny)
    if fmt == "int8":
        q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
    else:
        q = cast_fp8(xf / scale, fmt)
    return QTensor(q, scale, x.dtype)


def dequantize_rows(t: QTensor) -> Tensor:
    return (t.q.float() * t.scale).to(t.dtype)


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


def compress_state(state: ModelState, fmt: str = "int8") -> QuantizedState:
    """Store every floating tensor (≥ 2-D) of ``state``'s layer states in ``fmt``."""
    layers = {k: _map_floats(s, lambda t: quantize_rows(t, fmt)) for k, s in state.layers.items()}
    return QuantizedState(state.positions, layers, fmt)


def decompress_state(qstate: QuantizedState) -> ModelState:
    """The float ModelState for the next forward."""
    layers = {k: _map_floats(s, dequantize_rows) for k, s in qstate.layers.items()}
    return ModelState(qstate.positions, layers)


@torch.no_grad()
def stepwise_loss(model: torch.nn.Module, ids: Tensor, state_format: str | None = None) -> tuple[float, int]:
    """Teacher-forced next-token loss of ``ids [B, T]`` decoded one token per forward, the
    state stored in ``state_format`` between steps (None: float). Returns (mean loss in nats,
    largest stored state in bytes). A loop over time: this *is* decoding."""
    state, losses, peak = None, [], 0
    for t in range(ids.shape[1] - 1):
        live = None if state is None else (decompress_state(state) if state_format else state)
        out = model(ids[:, t:t + 1], state=live, use_cache=True)
        losses.append(F.cross_entropy(out.logits[:, 0].float(), ids[:, t + 1]))
        state = compress_state(out.state, state_format) if state_format else out.state
        peak = max(peak, state.nbytes())
    return torch.stack(losses).mean().item(), peak
