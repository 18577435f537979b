"""Prompt log-probabilities on the last stage: log p(token_t | tokens before t) for every prompt
position, from the prefill's hidden states, the lm_head applied a chunk of positions at a time so
that the (T, V) logits of a long prompt never exist at once: at most (B, chunk, V) float32.

This is what loglikelihood-style evaluations need (max_new_tokens=0 with prompt_logprobs=true
only scores); the record's sum, count and perplexity come from these values (record/metrics.py,
prompt_scores). Beside each value goes whether the token is the position's argmax (what greedy
decoding would have chosen: lm-eval's is_greedy), as 1.0 or 0.0 in the same float64 message.
A prompt may also name the token after it (Prompt.score_next): its values come from the last
position's logits, so a sequence is scored whole while its last token never runs (an evaluation
feeds the model at most its positions, as lm-eval's hf backend does).
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def prompt_logprobs(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int,
                    next_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, H) final hidden states and (B, T) ids -> the (B, V) float32 logits of the last
    position (what the stage returns without scoring) and (B, 2, T - 1) float64 rows: [:, 0, t - 1]
    the log-probability of ids[:, t] given ids[:, :t], [:, 1, t - 1] 1.0 where ids[:, t] is that
    position's argmax, else 0.0. Left-padding positions hold meaningless values (prompt_scores
    takes each row's own last n - 1). next_ids: (B,) the token after each row, scored too as
    column T - 1 of (B, 2, T) rows (any id in a row that has none: its column is meaningless)."""
    B, T, _ = hidden.shape
    if next_ids is not None:
        input_ids = torch.cat([input_ids, next_ids[:, None].to(input_ids)], dim=1)  # (B, T + 1)
    n = input_ids.shape[1] - 1
    out = torch.empty(B, 2, n, dtype=torch.float64, device=hidden.device)
    for c in range(0, n, chunk):
        e = min(c + chunk, n)
        logits = head(hidden[:, c:e]).float()  # (B, e - c, V): the largest tensor here
        nxt = input_ids[:, c + 1:e + 1]
        out[:, 1, c:e] = (logits.argmax(-1) == nxt).double()
        out[:, 0, c:e] = torch.log_softmax(logits, dim=-1).gather(-1, nxt[..., None])[..., 0]
        del logits  # else it lives on beside the next chunk's: 8 bytes per logit at the peak, not 10 (plan.py)
    return head(hidden[:, -1, :]).float(), out


def scored_row(scored: torch.Tensor | None, b: int, T: int, has_next: bool, what: int) -> list:
    """Row b of a (B, 2, T - 1 | T) scoring message (scoring.prompt_logprobs): its log-probabilities
    (what=0) or greedy flags (what=1), with the next token's value last when the prompt named one."""
    if scored is None:
        return []
    values = scored[b, what, :T - 1 + has_next]
    return values.bool().tolist() if what else values.tolist()
