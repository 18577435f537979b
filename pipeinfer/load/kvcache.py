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
        self._k: torch.Tensor | None = None  # (B, heads, room, head_dim)
        self._v: torch.Tensor | None = None
        self._view: torch.Tensor | None = None  # the `keys` the last update() handed out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is not self._view:
            self._adopt()
        n, t = self.get_seq_length(), key_states.shape[-2]
        if self._k is None or n + t > self._k.shape[-2]:
            self._grow(n, n + t, key_states, value_states)
        self._k[:, :, n:n + t] = key_states
        self._v[:, :, n:n + t] = value_states
        self.keys, self.values = self._k[:, :, :n + t], self._v[:, :, :n + t]
        self._view = self.keys
        # what DynamicLayer.lazy_initialization sets (dtype only in 4.57), kept true after a reset
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        return self.keys, self.values

    def _grow(self, n: int, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A buffer with room for `needed` positions (at least capacity, or twice the old room),
        holding the first n positions of the current keys/values."""
        room = max(needed, self.capacity, 2 * (0 if self._k is None else self._k.shape[-2]))
        k = key_states.new_empty(*key_states.shape[:2], room, key_states.shape[-1])
        v = value_states.new_empty(*value_states.shape[:2], room, value_states.shape[-1])
        if n:
            k[:, :, :n], v[:, :, :n] = self.keys[:, :, :n], self.values[:, :, :n]
        self._k, self._v = k, v

    def _adopt(self) -> None:
        """DynamicLayer's code replaced keys/values since the last update: follow them."""
        keys = self.keys
        if not self.is_initialized or keys is None or keys.numel() == 0:
            self._k = self._v = None  # reset, or never filled: start over
        elif not (self._k is not None and keys.data_ptr() == self._k.data_ptr() and keys.stride() == self._k.stride()
                  and keys.shape[:2] == self._k.shape[:2]):
            self._k = self._v = None  # not a prefix of the buffer (rows reordered, moved...): copied at _grow
            self._grow(keys.shape[-2], keys.shape[-2], keys, self.values)


# -- row-level refill (run/rows.py): a slot's cache has a fixed number of rows, each its own prompt --

def plain_rows(model_config) -> bool:
    """Whether every layer of the model's cache (as generate() types it) is a plain append-only
    layer, whose rows the row schedule may edit (sliding-window and other special layers keep
    their own bookkeeping). The same answer on every rank: it reads the whole model's config."""
    from transformers import DynamicCache

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model_config).layers)


def _set(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Hand a layer new keys/values (PreallocatedLayer copies them into room at its next update)."""
    layer.keys, layer.values = keys, values
    layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True


def grow_left(cache, rows: int, n: int, like) -> None:
    """n empty (masked) positions before every row's; `like`: a filled cache whose layers give
    heads, head_dim, dtype and device where this one is still empty."""
    for layer, src in zip(cache.layers, like.layers):
        k = layer.keys if layer.is_initialized and layer.keys is not None and layer.keys.numel() else \
            src.keys.new_zeros(rows, src.keys.shape[1], 0, src.keys.shape[-1])
        v = layer.values if k is layer.keys else src.values.new_zeros(rows, src.values.shape[1], 0,
                                                                      src.values.shape[-1])
        _set(layer, torch.cat([k.new_zeros(*k.shape[:2], n, k.shape[-1]), k], dim=2),
             torch.cat([v.new_zeros(*v.shape[:2], n, v.shape[-1]), v], dim=2))


def drop_left(cache, n: int) -> None:
    """Drop the first n positions of every row (positions no live row attends to)."""
    for layer in cache.layers:
        _set(layer, layer.keys[:, :, n:].contiguous(), layer.values[:, :, n:].contiguous())


def splice_rows(cache, src, rows: list[int], lengths: list[int]) -> None:
    """Row rows[j] of `cache` takes the last lengths[j] positions of `src`'s row j (a left-padded
    prefill), placed at the end of the cache's positions (which must be at least as many)."""
    for layer, s in zip(cache.layers, src.layers):
        L, T = layer.keys.shape[2], s.keys.shape[2]
        for j, (r, n) in enumerate(zip(rows, lengths)):
            layer.keys[r, :, L - n:] = s.keys[j, :, T - n:]
            layer.values[r, :, L - n:] = s.values[j, :, T - n:]
