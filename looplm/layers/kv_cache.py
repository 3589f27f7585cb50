"""Appending to an attention cache without copying it every step.

``torch.cat((cache, new), 1)`` per decoding step copies the whole cache: at 8192 cached tokens
that was about half of a decoding step of bench model's 6-layer attention model (transformers'
``DynamicCache`` does the same). :func:`append` writes the new keys and values into spare room of
a buffer behind the cache instead, and grows the buffer by a quarter (at least 256 slots) when it
is full, so each cached token is copied O(1) times on average. :func:`preallocate` gives empty
caches room for a whole generation (prompt + new tokens) up front, one allocation for all layers.

States stay immutable: a :class:`~looplm.layers.mixer_states.KVState`'s tensors are views of the first S
slots of its buffer, and new tokens go only into slots past every existing view. The buffer
remembers how many slots its newest state owns; appending to an older state of the same buffer
(two continuations of one prefix) copies it into a buffer of its own first. ``nbytes()`` of a
state counts its S cached tokens, not the reserve (at most a quarter of S plus 256 slots more).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields

import torch

from looplm.layers.mixer_states import KVState, QuantKVState
from looplm.ops.kv_quant import quantize_rows
from looplm.ops.nodes import tracked

__all__ = ["append", "append_rows", "grown", "in_place", "preallocate", "reserve", "slot_fields", "truncate"]

_MIN_RESERVE = 256
_ALIGN = 64  # bytes: each field of a preallocated block starts on a cache line


class _Buffer:
    """Storage for a cache's per-slot tensors (``k, v [B, C, Hkv, D]``, ``key_mask, pos [B, C]``, and
    a quantised cache's scales); ``length`` slots are in use."""

    def __init__(self, parts: list[torch.Tensor], length: int) -> None:
        self.parts, self.length = parts, length

    @classmethod
    def holding(cls, parts: list[torch.Tensor], capacity: int) -> _Buffer:
        """A new buffer of ``capacity`` slots holding a copy of ``parts`` in its first slots."""
        bufs = [p.new_empty(p.shape[0], capacity, *p.shape[2:]) for p in parts]
        length = parts[0].shape[1]
        for buf, p in zip(bufs, parts):
            buf[:, :length] = p
        return cls(bufs, length)

    @property
    def capacity(self) -> int:
        return self.parts[0].shape[1]

    def owns(self, parts: list[torch.Tensor]) -> bool:
        """Whether ``parts`` are this buffer's first ``length`` slots (the newest state's views)."""
        # an empty view's data_ptr() is 0: no slot is in use then, nothing to compare
        return all(p.shape[1] == self.length and p.dtype == b.dtype
                   and (self.length == 0 or p.data_ptr() == b.data_ptr()) for p, b in zip(parts, self.parts))


def append(state: KVState, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor,
           seen: torch.Tensor, **more: torch.Tensor) -> KVState:
    """``state`` (a KVState) with ``k, v [B, T, Hkv, D]``, ``key_mask, pos [B, T]`` appended and
    ``seen``; ``more``: the slots of a subclass's own per-slot fields (a QuantKVState's
    ``k_scale, v_scale [B, T, Hkv, 1]``). ``state`` itself is not modified."""
    names = _slots(type(state))
    given = dict(k=k, v=v, key_mask=key_mask, pos=pos, **more)
    if set(given) != set(names):
        raise ValueError(f"append to a {type(state).__name__} needs {names}, got {sorted(given)}")
    old = [getattr(state, n) for n in names]
    new = [given[n] for n in names]
    if tracked(*old, *new):  # autograd records: the copy it can differentiate
        return type(state)(seen=seen, **{n: torch.cat((a, b), 1) for n, a, b in zip(names, old, new)})
    S, T = state.k.shape[1], k.shape[1]
    buf = reserve(state, T)
    for dst, src in zip(buf.parts, new):
        dst[:, S:S + T] = src
    buf.length = S + T
    out = type(state)(seen=seen, **{n: b[:, :S + T] for n, b in zip(names, buf.parts)})
    vars(out)["_buffer"] = buf  # kept beside the dataclass fields
    return out


_SLOTS: dict[type, tuple[str, ...]] = {}


def _slots(cls: type[KVState]) -> tuple[str, ...]:
    """The per-slot fields of a cache type, in order (every field but ``seen``; looked up once)."""
    names = _SLOTS.get(cls)
    if names is None:
        names = _SLOTS[cls] = tuple(f.name for f in fields(cls) if f.name != "seen")
    return names


def slot_fields(cls: type[KVState]) -> tuple[str, ...]:
    """The per-slot fields ``[B, S, ...]`` of a cache type in their order: ``k, v, key_mask, pos``
    (and a QuantKVState's ``k_scale, v_scale``); every field but ``seen``."""
    return _slots(cls)


def in_place(parts: Sequence[torch.Tensor], length: int, seen: torch.Tensor,
             cls: type[KVState] = KVState) -> KVState:
    """The state (a ``cls``) of the first ``length`` slots of ``parts`` (its per-slot fields'
    storage ``[B, C, ...]``, in :func:`slot_fields` order, contiguous rows), whose appends go into
    ``parts``' spare slots while ``length + T <= C`` (the caller's storage, never copied)."""
    return grown(_Buffer(list(parts), length), length, seen, cls)


def reserve(state: KVState, T: int) -> _Buffer:
    """The buffer behind ``state`` (float or quantised: its parts are the per-slot fields in their
    order, k, v, key_mask, pos and a QuantKVState's k_scale, v_scale; their first S slots are
    ``state``) with room for ``T`` more slots: ``state``'s own, or a new one holding a copy of it."""
    old = [getattr(state, n) for n in _slots(type(state))]
    S = state.k.shape[1]
    buf = getattr(state, "_buffer", None)
    if buf is None or not buf.owns(old) or S + T > buf.capacity:
        buf = _Buffer.holding(old, S + T + max(_MIN_RESERVE, (S + T) // 4))
    return buf


def preallocate(states: Sequence[KVState], capacity: int) -> list[KVState]:
    """``states`` (empty caches, float or quantised, all of one type and shape) with room for
    ``capacity`` slots each, every per-slot field of all of them carved out of one allocation, so
    appending up to ``capacity`` tokens never copies a cache. A large allocation is memory the
    kernel maps for it alone (glibc's malloc maps every request above 32 MB itself, whatever its
    threshold has grown to): its pages become resident only as slots are written, and the cache
    never sits between short-lived tensors in the allocator's heap, where the memory those free
    stays resident."""
    if not states:
        return []
    first = states[0]
    names = _slots(type(first))
    fields_of = [getattr(first, n) for n in names]
    shapes = [(len(states), t.shape[0], capacity, *t.shape[2:]) for t in fields_of]
    for s in states:
        if type(s) is not type(first) or s.k.shape[1] or any(getattr(s, n).shape != t.shape
                                                             or getattr(s, n).dtype != t.dtype
                                                             for n, t in zip(names, fields_of)):
            raise ValueError("preallocate takes empty caches of one type, shape and dtype")
    sizes = [math.prod(shape) * t.element_size() for shape, t in zip(shapes, fields_of)]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // _ALIGN) * _ALIGN)
    block = torch.empty(starts[-1], dtype=torch.uint8, device=first.k.device)
    blocks = [block[a:a + size].view(t.dtype).view(shape)
              for a, size, shape, t in zip(starts, sizes, shapes, fields_of)]
    return [grown(_Buffer([b[i] for b in blocks], 0), 0, s.seen, type(s)) for i, s in enumerate(states)]


def grown(buf: _Buffer, length: int, seen: torch.Tensor, cls: type[KVState] = KVState) -> KVState:
    """The state (a ``cls``: KVState or QuantKVState) of ``buf``'s first ``length`` slots (written by
    the caller), now its newest."""
    buf.length = length
    out = cls(seen=seen, **{n: b[:, :length] for n, b in zip(_slots(cls), buf.parts)})
    vars(out)["_buffer"] = buf  # kept beside the dataclass fields
    return out


def truncate(state: KVState, length: int) -> KVState:
    """``state`` keeping only its first ``length`` cached slots (a rollback: speculative decoding
    drops the keys of rejected draft tokens); ``seen`` goes back by the slots dropped. When
    ``state`` is its buffer's newest, the buffer is shortened too, so the next append writes in
    place instead of copying the cache. The caller must not use ``state`` afterwards."""
    if type(state) is not KVState:
        raise TypeError(f"truncate takes a float KVState, got {type(state).__name__}")
    S = state.k.shape[1]
    if not 0 <= length <= S:
        raise ValueError(f"cannot truncate a cache of {S} slots to {length}")
    parts = [state.k, state.v, state.key_mask, state.pos]
    out = KVState(state.k[:, :length], state.v[:, :length], state.key_mask[:, :length], state.pos[:, :length],
                  state.seen - (S - length))
    buf = getattr(state, "_buffer", None)
    if buf is not None and buf.owns(parts):
        buf.length = length
        vars(out)["_buffer"] = buf  # kept beside the dataclass fields
    return out


def append_rows(state: KVState, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor,
                seen: torch.Tensor) -> KVState:
    """:func:`append` of float ``k, v [B, T, Hkv, D]`` in ``state``'s own format: a quantised cache
    (QuantKVState) gets the new rows' codes and scales (only the T new rows are quantised; the
    stored ones are never touched), a float one the rows as they are."""
    if isinstance(state, QuantKVState):
        (kq, k_scale), (vq, v_scale) = quantize_rows(k, state.k.dtype), quantize_rows(v, state.v.dtype)
        return append(state, kq, vq, key_mask, pos, seen, k_scale=k_scale, v_scale=v_scale)
    return append(state, k, v, key_mask, pos, seen)
