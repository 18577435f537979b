"""One forward over several sequences' new positions, each attending only to its own KV cache.

A visit of the row schedule (run/rows.py) decodes its slot's rows and may prefill joining prompts
beside them (whole, or a chunk of a long one). Run apart, each is a forward of its own, and at the
batch sizes these stages run a forward costs mostly one pass over the stage's weights (on the CPU
of bench/continuous.py, 6.5 ms of a 9.5 ms decode step of 4 rows): a joiner's prefill almost
doubled its visit, and the other stages idled meanwhile. Here they go through the family's own
forward as one packed sequence of N positions, each token at its own position (rotary and learned
position embeddings read position_ids), so every projection and MLP reads the weights once.

Only attention has to keep them apart. For this forward only, the stage's attention modules are
switched to a registered attention function (PACKED) and given a cache (_Router) whose update()
writes each segment's new keys and values into the segment's own cache; the function then runs the
family's configured attention (sdpa; other implementations are not packed) segment by segment, as a
forward of that segment alone would run it: a slot's rows as a batch of one position each under
their (R, L) mask, and a prompt causally over its own cache. Nothing is recomputed or copied: the
slot's and the chunked prompts' caches are the ones the visit would have used (each whole joiner
gets one of its own, where the visit apart left-pads them into one), and attention runs as it runs
for each segment alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache

PACKED = "pipeinfer_packed"
_state = threading.local()  # the packed forward under way on this thread: its router


@dataclass
class Segment:
    """Positions of the packed sequence with one cache: `rows` rows of one position each (a slot's
    decode, with `mask` (rows, L) 1 on each row's own positions, the new one included), or one
    sequence of n positions (rows 0), causal over what its cache holds before them."""
    cache: object   # a DynamicCache of this stage's layers (Stage.new_cache)
    n: int
    rows: int = 0
    mask: torch.Tensor | None = None


class _Router(DynamicCache):
    """The cache the packed forward hands the family's code: each layer's update() goes to the
    segments' own caches, and what they return waits for the attention function (_attention)."""

    def __init__(self, segments: list[Segment], inner: str, device: torch.device):
        super().__init__()
        self.segments, self.inner, self.kv = segments, inner, {}  # inner: the configured attention (sdpa)
        self.masks = [_mask(seg, device) for seg in segments]  # the same in every layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out, off = [], 0
        for seg in self.segments:
            k, v = key_states[:, :, off:off + seg.n], value_states[:, :, off:off + seg.n]  # (1, heads, n, d)
            if seg.rows:  # one position per row: (1, heads, R, d) -> (R, heads, 1, d)
                k, v = k[0].transpose(0, 1)[:, :, None], v[0].transpose(0, 1)[:, :, None]
            out.append(seg.cache.update(k, v, layer_idx))
            off += seg.n
        self.kv[layer_idx] = out
        return key_states, value_states  # unused: _attention reads self.kv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # position_ids and a 4-D mask are always given: nothing reads it


def _mask(seg: Segment, device: torch.device) -> torch.Tensor | None:
    """What a forward of the segment alone would hand sdpa: the rows' (R, 1, 1, L) mask (None when
    every row sees every position), or, for a sequence, causal over its cache and itself (None
    when its cache is empty: sdpa's is_causal)."""
    if seg.rows:
        return None if seg.mask is None else seg.mask.bool()[:, None, None, :]
    past = seg.cache.get_seq_length()
    if not past:
        return None
    return torch.ones(seg.n, past + seg.n, dtype=torch.bool, device=device).tril(past)[None, None]


def _attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the configured one (sdpa), segment by segment."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    router = _state.router
    inner = ALL_ATTENTION_FUNCTIONS[router.inner]
    # GPT-2 passes is_causal from the packed forward's mask; each segment's is its own (from its mask, as alone)
    kwargs.pop("is_causal", None)
    outs, off = [], 0
    for seg, mask, (k, v) in zip(router.segments, router.masks, router.kv.pop(module.layer_idx)):
        q = query[:, :, off:off + seg.n]  # (1, heads, n, d)
        if seg.rows:
            q = q[0].transpose(0, 1)[:, :, None]  # (R, heads, 1, d)
        o, _ = inner(module, q, k, v, mask, **kwargs)  # (B, n, heads, d)
        outs.append(o.reshape(1, -1, *o.shape[2:]))
        off += seg.n
    return torch.cat(outs, 1), None


def _attention_configs(stage) -> list:
    """The distinct configs the stage's attention modules read their implementation from."""
    found = stage.__dict__.get("_attention_configs")
    if found is None:
        found = list({id(m.config): m.config for m in stage.modules()
                      if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")}.values())
        stage.__dict__["_attention_configs"] = found
    return found


def packable(stage) -> bool:
    """Whether this stage can run packed forwards: its attention is sdpa (the implementation packed
    forwards run segment by segment) and it is not compiled (compiled parts trace one shape)."""
    configs = _attention_configs(stage)
    return bool(configs) and stage.compiled is None and all(c._attn_implementation == "sdpa" for c in configs)


def packed_forward(stage, x: torch.Tensor, position_ids: torch.Tensor, segments: list[Segment],
                   at: list[int] | None = None) -> torch.Tensor:
    """x: (1, N) token ids on the first stage, else (1, N, H) hidden states, the segments' positions
    one after another; position_ids (1, N). Returns (1, N, H) hidden states, or on the last stage
    the (len(at), V) float32 logits of positions `at`. Each segment's cache gains its positions."""
    configs = _attention_configs(stage)
    router = _Router(segments, configs[0]._attn_implementation, x.device)
    n = x.shape[1]
    # a 4-D mask is passed on as it is (the mask builders skip it) and never read (_attention has its
    # own per segment): a view of one element, not N x N bytes
    mask = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=x.device).expand(1, 1, n, n)
    _state.router = router
    try:
        for c in configs:
            c._attn_implementation_internal = PACKED
        hidden = stage(x, mask, position_ids, router, all_positions=True)
    finally:
        for c in configs:
            c._attn_implementation_internal = router.inner
        _state.router = None
    if stage.head is None:
        return hidden
    return stage.head(hidden[0, at]).float()


AttentionInterface.register(PACKED, _attention)
