"""The running batch's decoding state in the serving engine: rows that requests take and give back.

Each attention cache of the batch (a KVState or QuantKVState per layer and recursion) lives in
storage of ``max_rows`` rows and ``C`` slots per field (``k, v [R, C, Hkv, D]``, ``key_mask, pos
[R, C]``, an int8 cache's scales), allocated once and grown rarely; the batch's ``B`` rows are
its first ``B`` rows. Every row's cache ends at the same slot ``end`` (a decoding step appends
there for every row, in place: :func:`looplm.layers.kv_cache.in_place`); row ``b``'s own slots
are ``[end - len_b, end)`` and the slots before are unused (``key_mask`` False, ``pos`` 0), which
the attention skips (the whole-stack step takes each row's first seen slot), so each row decodes
as it would alone. Storage is allocated uninitialised (its pages become resident only as rows
use them); a row's unused front slots are zeroed when it joins or moves right, so masked
attention never meets a NaN there, and slots past ``end`` are written before they are read.

- A request joins (:meth:`BatchState.add`): its one-row state is copied into row ``B`` ending at
  ``end``; a cache longer than ``end`` first moves every row right (copies the caches; rare: a
  new prompt longer than every running row's).
- A request leaves (:meth:`BatchState.remove`): the last row is copied into its place (one
  row's copy, not the batch's).
- Before a step (:meth:`BatchState.reserve`): where ``end + T`` would pass ``C``, the rows move
  left by the slots no row uses (every row's front run), or into storage twice as long when
  that frees too little; each slot is thus copied O(1) times on average.

Fixed-size states (recurrent, linearised) are joined with :func:`looplm.state.cat_layer` and
split with :func:`looplm.state.select_layer` (small copies of one state per row). A layer whose
next state is not in its storage (a model that reallocated its cache) is copied back in.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from looplm.layers.kv_cache import in_place, slot_fields
from looplm.layers.mixer_states import KVState, QuantKVState
from looplm.state import ModelState, cat_layer, select_layer

_ALIGN = 8  # slots: capacities are multiples of this


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Cache:
    """One layer's attention cache for the batch: storage ``parts`` (per-slot fields ``[R, C, ...]``),
    ``end`` slots in use, ``state`` the KVState of the first ``rows`` rows (views)."""

    def __init__(self, first: KVState, max_rows: int, min_slots: int) -> None:
        self.cls, self.min_slots = type(first), min_slots
        capacity = _round_up(max(2 * (first.k.shape[1] + 1), min_slots))
        self.names = slot_fields(self.cls)
        like = [getattr(first, n) for n in self.names]
        self.parts = [t.new_empty(max_rows, capacity, *t.shape[2:]) for t in like]
        self.end = 0
        self.rows = 0
        self.seen = first.seen[:0]
        self.state: KVState | None = None

    @property
    def capacity(self) -> int:
        return self.parts[0].shape[1]

    def nbytes(self) -> int:
        """Bytes of the rows' slots up to ``end`` and their ``seen`` (what ``state.nbytes()``
        counts), from the shapes: the engine reports it after every iteration."""
        per_slot = sum(math.prod(p.shape[2:]) * p.element_size() for p in self.parts)
        return self.rows * self.end * per_slot + self.seen.numel() * self.seen.element_size()

    def _view(self) -> None:
        """The state of the first ``rows`` rows, after the storage or the rows changed."""
        self.state = in_place([p[:self.rows] for p in self.parts], self.end, self.seen, self.cls) \
            if self.rows else None

    def _fields(self, rows: slice | int, a: int, b: int) -> list[torch.Tensor]:
        return [p[rows, a:b] for p in self.parts]

    def _blank(self, rows: slice | int, a: int, b: int) -> None:
        """Slots ``[a, b)`` of ``rows`` unused: every field zero (key_mask False, pos 0, k and v 0)."""
        for p in self.parts:
            p[rows, a:b] = 0

    def _move(self, shift: int, room: int, grow: bool = False) -> None:
        """Every row's slots moved by ``shift`` (> 0: right, < 0: left), with ``room`` spare slots
        after them: in new storage twice as long as needed when ``grow`` or when they do not fit."""
        end = self.end + shift
        need = end + room
        if grow or need > self.capacity:
            size = _round_up(max(2 * need, self.min_slots))
            bigger = [p.new_empty(p.shape[0], size, *p.shape[2:]) for p in self.parts]
            for dst, src in zip(bigger, self.parts):
                dst[:self.rows, max(shift, 0):max(shift, 0) + min(end, self.end)] = \
                    src[:self.rows, max(-shift, 0):self.end]
            self.parts = bigger
        elif shift:
            for p in self.parts:  # overlapping ranges of one row: through a copy
                p[:self.rows, max(shift, 0):end] = p[:self.rows, max(-shift, 0):self.end].clone()
        if shift > 0:
            self._blank(slice(0, self.rows), 0, shift)
        self.end = end

    def add(self, one: KVState) -> None:
        n = one.k.shape[1]
        if n > self.end:
            self._move(n - self.end, 1)
        b, start = self.rows, self.end - n
        for dst, name in zip(self._fields(b, start, self.end), self.names):
            dst.copy_(getattr(one, name)[0])
        self._blank(b, 0, start)
        self.rows += 1
        self.seen = torch.cat((self.seen, one.seen))
        self._view()

    def remove(self, i: int) -> None:
        last = self.rows - 1
        if i != last:
            for p in self.parts:
                p[i, :self.end] = p[last, :self.end]
            self.seen = self.seen.clone()
            self.seen[i] = self.seen[last]
        self.rows = last
        self.seen = self.seen[:last]
        if not last:
            self.end = 0
        self._view()

    def reserve(self, T: int) -> None:
        """Room for ``T`` more slots: the rows moved left by the slots in front that no row uses,
        into storage twice as long when that frees less than a quarter of it."""
        if self.end + T <= self.capacity:
            return
        used = self.parts[2][:self.rows, :self.end].any(0)
        front = int(used.int().argmax()) if bool(used.any()) else self.end  # the first slot a row uses
        self._move(-front, T, grow=front < self.capacity // 4)
        self._view()

    def update(self, new: KVState) -> None:
        """Take the layer's state after a step: its slots in this storage (appended in place), else
        copied back in."""
        if new is self.state:
            return
        n = new.k.shape[1]
        fields = [getattr(new, name) for name in self.names]
        mine = (type(new) is self.cls and new.k.shape[0] == self.rows and n <= self.capacity
                and all(t.data_ptr() == p.data_ptr() and t.stride() == p.stride()
                        for t, p in zip(fields, self.parts)))
        if not mine:
            if n + 1 > self.capacity:
                size = _round_up(2 * (n + 1))
                self.parts = [p.new_empty(p.shape[0], size, *p.shape[2:]) for p in self.parts]
            for dst, t in zip(self._fields(slice(0, self.rows), 0, n), fields):
                dst.copy_(t)
            self.end, self.seen = n, new.seen
            self._view()
            return
        self.end, self.seen, self.state = n, new.seen, new


class BatchState:
    """The decoding state of up to ``max_rows`` rows, one per running request (row order as
    added; :meth:`remove` moves the last row into the freed one); each cache's storage holds at
    least ``min_slots`` slots per row."""

    def __init__(self, max_rows: int, min_slots: int = 256) -> None:
        if max_rows < 1 or min_slots < 1:
            raise ValueError(f"max_rows and min_slots must be >= 1, got {max_rows} and {min_slots}")
        self.max_rows, self.min_slots = max_rows, min_slots
        self.rows = 0
        self._caches: dict[str, _Cache] = {}
        self._other: dict[str, Any] = {}
        self._positions: torch.Tensor | None = None

    def state(self) -> ModelState:
        """The ModelState of the batch's rows for the next forward (its caches append in place)."""
        if self._positions is None or not self.rows:
            raise RuntimeError("the batch has no rows")
        layers = {k: c.state for k, c in self._caches.items()}
        layers.update(self._other)
        return ModelState(self._positions, layers)

    def add(self, one: ModelState) -> None:
        """Append a one-row state (a prefilled request's) as row ``rows``."""
        if one.batch_size != 1:
            raise ValueError(f"add takes a one-row state, got {one.batch_size} rows")
        if self.rows >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        if self.rows and one.layers.keys() != (self._caches.keys() | self._other.keys()):
            raise ValueError("add takes states of the batch's model (other layer keys)")
        for key, s in one.layers.items():
            if type(s) in (KVState, QuantKVState):
                if key not in self._caches:
                    self._caches[key] = _Cache(s, self.max_rows, self.min_slots)
                self._caches[key].add(s)
            else:
                self._other[key] = s if not self.rows else cat_layer([self._other[key], s])
        self._positions = one.positions if self._positions is None or not self.rows \
            else torch.cat((self._positions, one.positions))
        self.rows += 1

    def remove(self, i: int) -> None:
        """Free row ``i``: the last row moves into it."""
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} is not in the batch of {self.rows}")
        last = self.rows - 1
        keep = torch.arange(last, device=self._positions.device if self._positions is not None else None)
        if i != last:
            keep[i] = last
        for c in self._caches.values():
            c.remove(i)
        for key, s in self._other.items():
            self._other[key] = select_layer(s, keep)
        if self._positions is not None:
            self._positions = self._positions[keep]
        self.rows = last

    def reserve(self, T: int) -> None:
        """Room for ``T`` more slots in every cache (before a step of ``T`` tokens)."""
        for c in self._caches.values():
            c.reserve(T)

    def update(self, new: ModelState) -> None:
        """Take the state a forward of :meth:`state` returned."""
        if new.batch_size != self.rows:
            raise ValueError(f"the new state holds {new.batch_size} rows, the batch {self.rows}")
        for key, s in new.layers.items():
            if key in self._caches:
                self._caches[key].update(s)
            else:
                self._other[key] = s
        self._positions = new.positions

    def nbytes(self) -> int:
        """Bytes of the rows' states (each cache's slots up to its end, not its spare storage): the
        same count as ``state().nbytes()``, without building the state."""
        if not self.rows or self._positions is None:
            return 0
        total = self._positions.numel() * self._positions.element_size()
        total += sum(c.nbytes() for c in self._caches.values())
        return total + sum(s.nbytes() for s in self._other.values())
