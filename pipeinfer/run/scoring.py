"""Prompt log-probabilities on the last stage: log p(token_t | tokens before t) for every prompt
position, from the prefill's hidden states, the lm_head applied a chunk of positions at a time so
that the (T, V) logits of a long prompt never exist at once: at most (B, chunk, V) float32.

This is what loglikelihood-style evaluations need (max_new_tokens=0 with prompt_logprobs=true
only scores); the record's sum, count and perplexity come from these values (record/metrics.py,
prompt_scores). Beside each value go the position's argmax id (what greedy decoding would have
chosen) and its log-probability, in the same float64 message (ids below 2**53 are exact there):
lm-eval's is_greedy is argmax == the token (greedy_row), and the server's echo answers the argmax
as each prompt token's top_logprobs entry, which lm-eval's local-completions model compares with the
token's own value.
A prompt may also name the token after it (Prompt.score_next): its values come from the last
position's logits, so a sequence is scored whole while its last token never runs (an evaluation
feeds the model at most its positions, as lm-eval's hf backend does).
"""

from __future__ import annotations

import torch

FIELDS = 3  # rows of the scoring message per prompt: log-probability, argmax id, argmax log-probability


@torch.inference_mode()
def prompt_logprobs(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int,
                    next_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, H) final hidden states and (B, T) ids -> the (B, V) float32 logits of the last
    position (what the stage returns without scoring) and (B, FIELDS, T - 1) float64 rows: [:, 0, t - 1]
    the log-probability of ids[:, t] given ids[:, :t], [:, 1, t - 1] the id of that position's most
    likely token and [:, 2, t - 1] its log-probability (the largest of the log-softmax, as lm-eval's
    hf backend takes the argmax). Left-padding positions hold meaningless values (prompt_scores
    takes each row's own last n - 1). next_ids: (B,) the token after each row, scored too as
    column T - 1 of (B, FIELDS, T) rows (any id in a row that has none: its column is meaningless)."""
    B, T, _ = hidden.shape
    if next_ids is not None:
        input_ids = torch.cat([input_ids, next_ids[:, None].to(input_ids)], dim=1)  # (B, T + 1)
    n = input_ids.shape[1] - 1
    out = torch.empty(B, FIELDS, n, dtype=torch.float64, device=hidden.device)
    for c in range(0, n, chunk):
        e = min(c + chunk, n)
        logits = head(hidden[:, c:e]).float()  # (B, e - c, V): the largest tensor here
        nxt = input_ids[:, c + 1:e + 1]
        logits = torch.log_softmax(logits, dim=-1)  # rebound: the float32 logits go as it is made
        top = logits.max(-1)
        out[:, 0, c:e] = logits.gather(-1, nxt[..., None])[..., 0]
        out[:, 1, c:e] = top.indices.double()
        out[:, 2, c:e] = top.values
        del logits, top  # else it lives on beside the next chunk's: 8 bytes per logit at the peak, not 10 (plan.py)
    return head(hidden[:, -1, :]).float(), out


def scored_row(scored: torch.Tensor | None, b: int, T: int, has_next: bool, what: int) -> list:
    """Row b of a (B, FIELDS, T - 1 | T) scoring message (scoring.prompt_logprobs): its
    log-probabilities (what=0), argmax ids (what=1, ints) or the argmax's log-probabilities (what=2),
    with the next token's value last when the prompt named one."""
    if scored is None:
        return []
    values = scored[b, what, :T - 1 + has_next]
    return values.long().tolist() if what == 1 else values.tolist()


def greedy_row(argmax: list[int], ids: list[int], next_id: int | None) -> list[bool]:
    """A row's greedy flags (lm-eval's is_greedy, per position): whether each scored token is its
    position's argmax. argmax: scored_row(..., 1); ids: the row's prompt, padded or its own (the
    flags of positions before its own, padding's, are False and meaningless)."""
    targets = list(ids[1:]) + ([next_id] if next_id is not None else [])
    pad = len(argmax) - len(targets)
    return [False] * pad + [a == t for a, t in zip(argmax[pad:], targets)]


def scored_fields(scored: torch.Tensor | None, b: int, T: int, ids: list[int], next_id: int | None) -> tuple:
    """Row b of a scoring message as BatchResult holds it: its log-probabilities, greedy flags and
    (argmax id, log-probability) pairs. ids: the row's prompt (greedy_row); next_id: Prompt.score_next."""
    has_next = next_id is not None
    argmax = scored_row(scored, b, T, has_next, 1)
    return (scored_row(scored, b, T, has_next, 0), greedy_row(argmax, ids, next_id),
            list(zip(argmax, scored_row(scored, b, T, has_next, 2))))
