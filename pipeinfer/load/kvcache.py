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
