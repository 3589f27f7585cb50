"""Decoding state of a LoopLM: one mixer state per (layer, recursion) and per-row positions.

Fixed-state mixers keep a constant-size state, so an attention-free model's state does not
grow with generated tokens; attention layers cache only the tokens active at their recursion
(none at all for recursions that share the first recursion's keys/values).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from looplm.layers import kv_cache
from looplm.layers.mixer_states import KVState, LinearizedState, RecurrentState


@dataclass
class ModelState:
    """``positions [B]`` long: tokens each row has seen (the next token's position);
    ``layers``: mixer state per key ``"prelude.i"``, ``"core.j.r"`` (layer j, recursion r),
    ``"coda.i"``. Created by ``LoopLM.forward(..., use_cache=True)``; pass it back unchanged."""

    positions: torch.Tensor
    layers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch_size: int, device: torch.device | str | None = None) -> ModelState:
        return cls(torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def nbytes(self) -> int:
        """Bytes held by all tensors of the state."""
        total = self.positions.numel() * self.positions.element_size()
        return total + sum(s.nbytes() for s in self.layers.values())

    def reserve(self, capacity: int) -> ModelState:
        """This state (its attention caches empty, as ``LoopLM.init_state`` makes them) with room for
        ``capacity`` tokens in every cache: the caches of one type and shape share one allocation
        (:func:`looplm.layers.kv_cache.preallocate`), so a generation of at most ``capacity``
        tokens never copies or reallocates its cache."""
        groups: dict[tuple[Any, ...], list[str]] = {}
        for key, s in self.layers.items():
            if isinstance(s, KVState):
                kind = (type(s), *((getattr(s, n).shape[0], *getattr(s, n).shape[2:], getattr(s, n).dtype)
                                   for n in _slot_fields(s)))
                groups.setdefault(kind, []).append(key)
        layers = dict(self.layers)
        for keys in groups.values():
            layers.update(zip(keys, kv_cache.preallocate([layers[k] for k in keys], capacity)))
        return ModelState(self.positions, layers)


def _pad_front(t: torch.Tensor, length: int, value: float | bool = 0) -> torch.Tensor:
    """``t [1, S, ...]`` with ``length - S`` slots of ``value`` put before its own."""
    if t.shape[1] == length:
        return t
    pad = t.new_full((t.shape[0], length - t.shape[1], *t.shape[2:]), value)
    return torch.cat((pad, t), 1)


def _slot_fields(s: KVState) -> list[str]:
    """The per-slot fields ``[B, S, ...]`` of an attention cache (all but ``seen [B]``)."""
    return [f.name for f in fields(s) if f.name != "seen"]


def cat_layer(parts: list[Any]) -> Any:
    """One mixer state of several rows from states of one or more rows each (same type)."""
    first = parts[0]
    if isinstance(first, RecurrentState):
        return RecurrentState(torch.cat([p.conv for p in parts]), torch.cat([p.ssm for p in parts]))
    if isinstance(first, LinearizedState):
        window = None if first.window is None else cat_layer([p.window for p in parts])
        return LinearizedState(torch.cat([p.ssm for p in parts]), window)
    if isinstance(first, KVState):  # float or quantised: every field but seen is per slot
        S = max(p.k.shape[1] for p in parts)
        slots = {n: torch.cat([_pad_front(getattr(p, n), S, False if n == "key_mask" else 0) for p in parts])
                 for n in _slot_fields(first)}
        return type(first)(seen=torch.cat([p.seen for p in parts]), **slots)
    raise TypeError(f"cannot join decoding states of type {type(first).__name__}")


def select_layer(s: Any, rows: torch.Tensor) -> Any:
    """The mixer state of ``rows [n]`` (long indices) of ``s`` (see :func:`select_rows`)."""
    if isinstance(s, RecurrentState):
        return RecurrentState(s.conv[rows], s.ssm[rows])
    if isinstance(s, LinearizedState):
        return LinearizedState(s.ssm[rows], None if s.window is None else select_layer(s.window, rows))
    if isinstance(s, KVState):
        key_mask = s.key_mask[rows]
        if bool(key_mask.all()):
            return type(s)(seen=s.seen[rows], **{n: getattr(s, n)[rows] for n in _slot_fields(s)})
        # each row's used slots moved to the end in order (a stable sort puts unused ones first),
        # then the columns no row uses dropped
        order = key_mask.to(torch.uint8).sort(dim=1, stable=True).indices
        keep = int(key_mask.sum(1).max())
        index = order[:, order.shape[1] - keep:]
        src = rows[:, None]
        return type(s)(seen=s.seen[rows], **{n: getattr(s, n)[src, index] for n in _slot_fields(s)})
    raise TypeError(f"cannot select rows of a decoding state of type {type(s).__name__}")


def cat_states(states: list[ModelState]) -> ModelState:
    """The rows of several states as one state (in order), for decoding them as one batch.

    Fixed-size states are concatenated; attention caches of different lengths are padded at
    the front with unused slots (``key_mask`` False), which the attention skips, so each row
    decodes as it would alone. Every state must come from the same model.
    """
    if not states:
        raise ValueError("cat_states needs at least one state")
    if len(states) == 1:
        return states[0]
    keys = states[0].layers.keys()
    return ModelState(torch.cat([s.positions for s in states]),
                      {k: cat_layer([s.layers[k] for s in states]) for k in keys})


def select_rows(state: ModelState, rows: list[int]) -> ModelState:
    """The state of ``rows`` (indices into the batch, in that order). Attention caches are
    compacted: each row's used slots (``key_mask`` True) keep their order and move to the end, and
    slots no kept row uses are dropped, so a row selected alone has no unused slot."""
    index = torch.tensor(rows, dtype=torch.long, device=state.positions.device)
    return ModelState(state.positions[index], {k: select_layer(s, index) for k, s in state.layers.items()})
