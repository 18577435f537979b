"""The in-place KV-cache layer holds what transformers' DynamicLayer holds, step for step.

    pytest tests/test_kvcache.py

The end-to-end proof is elsewhere (every equivalence test runs generation through it against
generate(), which uses DynamicLayer); these tests pin down the layer itself: growth past its
room, crop, and which layers Stage.new_cache() replaces.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, MistralConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from pipeinfer.load.kvcache import PreallocatedLayer, add_rows, drop_left, grow_left, keep_rows, reserve_rows, take_rows
from pipeinfer.plan.partition import StagePlan
from pipeinfer.load.stage import Stage


def _kv(g: torch.Generator, t: int, batch: int = 2, heads: int = 3, dim: int = 4):
    return torch.randn(batch, heads, t, dim, generator=g), torch.randn(batch, heads, t, dim, generator=g)


def test_appends_match_dynamic_layer_through_growth_and_crop():
    g = torch.Generator().manual_seed(0)
    ours, ref = PreallocatedLayer(capacity=8), DynamicLayer()
    length = 0
    for step, t in enumerate([5] + [1] * 20):  # prefill, then decode: past the room for 8 positions
        k, v = _kv(g, t)
        got, want = ours.update(k, v), ref.update(k, v)
        length += t
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == ref.get_seq_length() == length
        if step == 8:  # drop the last 3 positions, as generate() undoes rejected speculative tokens
            ours.crop(-3)
            ref.crop(-3)
            length -= 3
            assert ours.get_seq_length() == ref.get_seq_length() == length
    assert length == 22 and ours._k.shape[-2] == 32  # room 8 -> 16 -> 32
    assert ours.keys.data_ptr() == ours._k.data_ptr()  # a view of the buffer, not a copy


def test_a_full_room_is_allocated_once():
    layer = PreallocatedLayer(capacity=10)
    g = torch.Generator().manual_seed(1)
    layer.update(*_kv(g, 4))
    buffer = layer._k.data_ptr()
    for _ in range(6):
        layer.update(*_kv(g, 1))
    assert layer._k.data_ptr() == buffer and layer.get_seq_length() == 10


def _same(ours, ref) -> bool:
    return (ours.get_seq_length() == ref.get_seq_length() and torch.equal(ours.keys, ref.keys)
            and torch.equal(ours.values, ref.values))


# DynamicLayer's own methods that replace keys/values; the next update must carry on from them.
EDITS = {
    "reorder_cache": lambda layer: layer.reorder_cache(torch.tensor([2, 0, 1])),
    "batch_select_indices": lambda layer: layer.batch_select_indices(torch.tensor([0, 2])),
    "batch_repeat_interleave": lambda layer: layer.batch_repeat_interleave(2),
    "reset": lambda layer: layer.reset(),
    "crop": lambda layer: layer.crop(-2),
    "offload+prefetch": lambda layer: (layer.offload(), layer.prefetch()),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_updates_after_dynamic_layer_methods(edit):
    g = torch.Generator().manual_seed(2)
    ours, ref = PreallocatedLayer(capacity=6), DynamicLayer()
    for t in (4, 1):
        k, v = _kv(g, t, batch=3)
        ours.update(k, v)
        ref.update(k, v)
    EDITS[edit](ours)
    EDITS[edit](ref)
    batch = ref.keys.shape[0] if ref.get_seq_length() else 3
    for t in (1, 1, 3):  # the last step outgrows the room
        k, v = _kv(g, t, batch=batch)
        ours.update(k, v)
        ref.update(k, v)
        assert _same(ours, ref), edit


def _filled(rows: int, room: int, g: torch.Generator):
    """A one-layer cache of `rows` rows (room for `room`) after a 4-position prefill and a decode step."""
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(capacity=16)]
    reserve_rows(cache, room)
    for t in (4, 1):
        cache.layers[0].update(*_kv(g, t, batch=rows))
    return cache, cache.layers[0]


def test_row_edits_keep_the_rows_and_the_buffer():
    """The row schedule's edits (run/rows.py): rows dropped with the free ones filled from the end
    move within the buffer; other orders copy; added rows are zeros in the spare rows; a moved
    row's last positions land in an empty cache; and the next update appends to every row."""
    g = torch.Generator().manual_seed(3)
    cache, layer = _filled(4, 6, g)
    assert layer._k.shape[0] == 6
    buffer, before = layer._k.data_ptr(), layer.keys.clone()
    keep_rows(cache, [0, 3, 2])  # row 1 ended: row 3 takes its place
    k, v = _kv(g, 1, batch=3)
    layer.update(k, v)
    assert layer._k.data_ptr() == buffer and torch.equal(layer.keys[:, :, :5], before[[0, 3, 2]])
    assert torch.equal(layer.keys[:, :, 5:], k)
    add_rows(cache, 2)
    assert layer._k.data_ptr() == buffer and layer.keys.shape[0] == 5 and not layer.keys[3:].any()
    before = layer.keys.clone()
    keep_rows(cache, [2, 0])  # any other order: a copy of the kept rows
    assert torch.equal(layer.keys, before[[2, 0]])
    dst = DynamicCache()
    dst.layers = [PreallocatedLayer(capacity=16)]
    take_rows(dst, cache, [1], 3)
    assert torch.equal(dst.layers[0].keys, before[[0], :, 3:]) and torch.equal(dst.layers[0].values,
                                                                              cache.layers[0].values[[1], :, 3:])
    k, v = _kv(g, 1, batch=1)
    dst.layers[0].update(k, v)
    assert torch.equal(dst.layers[0].keys, torch.cat([before[[0], :, 3:], k], dim=2))


def test_positions_added_and_dropped_on_the_left_in_one_copy():
    """grow_left (a joiner longer than the slot) and drop_left (positions no row attends to): the
    keys and values are the old ones shifted, zeros before them, in a buffer with the slot's row
    room that the next update appends to without another copy."""
    g = torch.Generator().manual_seed(4)
    cache, layer = _filled(4, 6, g)
    before_k, before_v = layer.keys.clone(), layer.values.clone()
    grow_left(cache, 4, 3, cache)
    assert torch.equal(layer.keys[:, :, 3:], before_k) and not layer.keys[:, :, :3].any()
    assert torch.equal(layer.values[:, :, 3:], before_v) and not layer.values[:, :, :3].any()
    assert layer._k.shape[0] == 6
    buffer = layer._k.data_ptr()
    k, v = _kv(g, 1, batch=4)
    layer.update(k, v)
    assert layer._k.data_ptr() == buffer and torch.equal(layer.keys, torch.cat([torch.zeros_like(before_k[:, :, :3]),
                                                                                 before_k, k], dim=2))
    shown = layer.keys.clone()
    drop_left(cache, 5)
    assert torch.equal(layer.keys, shown[:, :, 5:]) and layer._k.shape[0] == 6
    buffer = layer._k.data_ptr()
    layer.update(k, v)
    assert layer._k.data_ptr() == buffer and torch.equal(layer.keys, torch.cat([shown[:, :, 5:], k], dim=2))


def _stage(config, layers: range) -> Stage:
    return Stage(torch.nn.Module(), None, StagePlan(0, 1, layers), config)


def test_new_cache_replaces_full_attention_layers_only():
    cache = _stage(LlamaConfig(num_hidden_layers=4), range(1, 3)).new_cache(capacity=16)
    assert isinstance(cache, DynamicCache) and len(cache.layers) == 2
    assert all(type(layer) is PreallocatedLayer and layer.capacity == 16 for layer in cache.layers)
    sliding = _stage(MistralConfig(num_hidden_layers=2, sliding_window=8), range(0, 2)).new_cache(capacity=16)
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in sliding.layers)
