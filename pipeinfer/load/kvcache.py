"""A KV-cache layer that appends in place.

transformers' DynamicLayer concatenates the new keys and values onto the old at every step, so
each decode step copies the whole cache once more; at batch 32 that copy is 5-10% of a CPU
decode step (measured with bench/throughput.py's model). PreallocatedLayer allocates room for
the whole sequence once (prompt + max_new_tokens, which the schedule knows) and writes each
step's keys and values into it; `keys` and `values` are views of the filled part, so attention
sees the same tensors, value for value, that DynamicLayer would hand it. A sequence that
outgrows the room gets a buffer twice as large (one copy, amortised).

Everything else is DynamicLayer's own code, which replaces `keys`/`values` (crop, reset,
reorder_cache, batch_select_indices, offload...). update() notices a replacement and carries on
from what is there: a shorter prefix of the buffer (crop) keeps the buffer, anything else is
copied into a new one, and an emptied layer starts over.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.row_room = 0  # rows to make room for (run/rows.py: a slot's most rows); 0: the batch's own
        self._k: torch.Tensor | None = None  # (rows, heads, room, head_dim)
        self._v: torch.Tensor | None = None
        self._view: torch.Tensor | None = None  # the `keys` the last update() handed out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is not self._view:
            self._adopt()
        n, t, b = self.get_seq_length(), key_states.shape[-2], key_states.shape[0]
        if self._k is None or n + t > self._k.shape[-2] or b > self._k.shape[0]:
            self._grow(n, n + t, key_states, value_states)
        self._k[:b, :, n:n + t] = key_states
        self._v[:b, :, n:n + t] = value_states
        self.keys, self.values = self._k[:b, :, :n + t], self._v[:b, :, :n + t]
        self._view = self.keys
        # what DynamicLayer.lazy_initialization sets (dtype only in 4.57), kept true after a reset
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        return self.keys, self.values

    def _grow(self, n: int, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A buffer with room for `needed` positions (at least capacity, or twice the old room) and
        for at least row_room rows, holding the first n positions of the current keys/values."""
        room = max(needed, self.capacity, 2 * (0 if self._k is None else self._k.shape[-2]))
        rows = max(key_states.shape[0], self.row_room)
        k = key_states.new_empty(rows, key_states.shape[1], room, key_states.shape[-1])
        v = value_states.new_empty(rows, value_states.shape[1], room, value_states.shape[-1])
        if n:
            b = self.keys.shape[0]
            k[:b, :, :n], v[:b, :, :n] = self.keys[:, :, :n], self.values[:, :, :n]
        self._k, self._v = k, v

    def _adopt(self) -> None:
        """DynamicLayer's code (or a row helper below) replaced keys/values since the last update:
        follow them. A view of the buffer's first rows and positions keeps the buffer."""
        keys = self.keys
        if not self.is_initialized or keys is None or keys.numel() == 0:
            self._k = self._v = None  # reset, or never filled: start over
        elif not (self._k is not None and keys.data_ptr() == self._k.data_ptr() and keys.stride() == self._k.stride()
                  and keys.shape[1] == self._k.shape[1] and keys.shape[0] <= self._k.shape[0]):
            self._k = self._v = None  # not a prefix of the buffer (rows reordered, moved...): copied at _grow
            self._grow(keys.shape[-2], keys.shape[-2], keys, self.values)

    def shift(self, pad: int, drop: int) -> bool:
        """`pad` empty (zero) positions before every row's and the first `drop` gone, in one copy
        into a fresh buffer (room as before, and for the slot's rows); False where nothing is filled."""
        keys, values = self.keys, self.values
        if not self.is_initialized or keys is None or keys.numel() == 0:
            return False
        b, h, L, d = keys.shape
        n = L + pad - drop
        room = max(n + 1, self.capacity, 0 if self._k is None else self._k.shape[-2])
        rows = max(b, self.row_room)
        k, v = keys.new_empty(rows, h, room, d), values.new_empty(rows, h, room, values.shape[-1])
        k[:b, :, :pad], v[:b, :, :pad] = 0, 0
        k[:b, :, pad:n], v[:b, :, pad:n] = keys[:, :, drop:], values[:, :, drop:]
        self._k, self._v = k, v
        self.keys, self.values = k[:b, :, :n], v[:b, :, :n]
        self._view = self.keys
        return True

    def add_rows(self, n: int) -> bool:
        """n more rows, zeroed, in the buffer's spare rows; False where there is no room (or nothing filled)."""
        keys = self.keys
        if not self.is_initialized or keys is None or keys.numel() == 0:
            return False
        b, L = keys.shape[0], keys.shape[2]
        if keys is not self._view:
            self._adopt()  # the buffer now holds keys
        if b + n > self._k.shape[0]:
            return False
        self._k[b:b + n, :, :L] = 0  # masked positions: zeros, never the buffer's uninitialised bytes (NaN * 0)
        self._v[b:b + n, :, :L] = 0
        self.keys, self.values = self._k[:b + n, :, :L], self._v[:b + n, :, :L]
        self._view = self.keys
        return True


# -- row-level refill (run/rows.py): a slot's cache has a fixed number of rows, each its own prompt --

def _set(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Hand a layer new keys/values (PreallocatedLayer copies them into room at its next update)."""
    layer.keys, layer.values = keys, values
    layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True


def grow_left(cache, rows: int, n: int, like) -> None:
    """n empty (masked) positions before every row's; `like`: a filled cache whose layers give
    heads, head_dim, dtype and device where this one is still empty."""
    for layer, src in zip(cache.layers, like.layers):
        if isinstance(layer, PreallocatedLayer) and layer.shift(n, 0):
            continue
        k = layer.keys if layer.is_initialized and layer.keys is not None and layer.keys.numel() else \
            src.keys.new_zeros(rows, src.keys.shape[1], 0, src.keys.shape[-1])
        v = layer.values if k is layer.keys else src.values.new_zeros(rows, src.values.shape[1], 0,
                                                                      src.values.shape[-1])
        _set(layer, torch.cat([k.new_zeros(*k.shape[:2], n, k.shape[-1]), k], dim=2),
             torch.cat([v.new_zeros(*v.shape[:2], n, v.shape[-1]), v], dim=2))


def drop_left(cache, n: int) -> None:
    """Drop the first n positions of every row (positions no live row attends to)."""
    for layer in cache.layers:
        if not (isinstance(layer, PreallocatedLayer) and layer.shift(0, n)):
            _set(layer, layer.keys[:, :, n:].contiguous(), layer.values[:, :, n:].contiguous())


def splice_rows(cache, src, rows: list[int], lengths: list[int]) -> None:
    """Row rows[j] of `cache` takes the last lengths[j] positions of `src`'s row j (a left-padded
    prefill), placed at the end of the cache's positions (which must be at least as many)."""
    for layer, s in zip(cache.layers, src.layers):
        L, T = layer.keys.shape[2], s.keys.shape[2]
        for j, (r, n) in enumerate(zip(rows, lengths)):
            layer.keys[r, :, L - n:] = s.keys[j, :, T - n:]
            layer.values[r, :, L - n:] = s.values[j, :, T - n:]


def reserve_rows(cache, rows: int) -> None:
    """Room for `rows` rows in every layer's buffer (a slot's most rows), so that joining rows
    widen a view (add_rows) instead of copying the cache."""
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.row_room = rows


def add_rows(cache, n: int) -> None:
    """n empty (zero, to be masked) rows after a filled cache's rows, at its current length."""
    for layer in cache.layers:
        if not (isinstance(layer, PreallocatedLayer) and layer.add_rows(n)):
            k, v = layer.keys, layer.values
            _set(layer, torch.cat([k, k.new_zeros(n, *k.shape[1:])]), torch.cat([v, v.new_zeros(n, *v.shape[1:])]))


def keep_rows(cache, keep: list[int]) -> None:
    """Row i becomes row keep[i]; the rows past len(keep) go. Where every row that changes place
    comes from past len(keep) (free rows filled from the end), the rows move within the buffer,
    one row each; any other order is a copy of the kept rows."""
    m = len(keep)
    in_place = all(r == i or r >= m for i, r in enumerate(keep))
    idx = None if in_place else torch.tensor(keep, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if not in_place:
            _set(layer, k[idx], v[idx])
            continue
        for i, r in enumerate(keep):
            if r != i:
                k[i], v[i] = k[r], v[r]
        layer.keys, layer.values = k[:m], v[:m]  # PreallocatedLayer: a view of its buffer's first rows, kept


def take_rows(dst, src, rows: list[int], n: int) -> None:
    """An empty cache `dst` takes `src`'s rows `rows`, their last n positions (a row moved between slots)."""
    idx = torch.tensor(rows, device=src.layers[0].keys.device)
    for layer, s in zip(dst.layers, src.layers):
        L = s.keys.shape[2]
        _set(layer, s.keys[idx, :, L - n:], s.values[idx, :, L - n:])


def copy_rows(dst, src, rows: list[int], into, lengths: list[int]) -> None:
    """dst's row into[j] takes the last lengths[j] positions of src's row rows[j], placed at the
    end of dst's positions (a row moved into a slot that keeps its own rows)."""
    for layer, s in zip(dst.layers, src.layers):
        L, Ls = layer.keys.shape[2], s.keys.shape[2]
        for r, d, n in zip(rows, into, lengths):
            layer.keys[d, :, L - n:] = s.keys[r, :, Ls - n:]
            layer.values[d, :, L - n:] = s.values[r, :, Ls - n:]
