"""OpenAI's response bodies and stream chunks from what the engine hands back: text, finish_reason,
usage and log-probabilities in the shapes the official client and lm-eval read.

The answer's text leaves out what ended it: EOS (as the batch runner's output_text), a stop token,
and a stop string (OpenAI's rule; the batch runner's record keeps a stop string's text). A stream
holds back what a stop string holds or could still claim, and an incomplete UTF-8 character, so
what it has sent is always a prefix of the final text.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

NEG_INF = -9999.0  # JSON has no -inf: what sampling's filters ruled out (vLLM writes the same)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class Done:
    """One finished prompt, as the engine thread hands it over."""
    ids: list[int]
    finish: tuple            # (engine finish_reason, matched stop or None)
    logprobs: list | None    # per new token, the (1 + 2K,) row (generation.logprob_rows)
    prompt_logprobs: list | None  # the prompt's (T - 1,) row, left-padded (scoring.prompt_logprobs)
    prompt_argmax: list | None = None  # beside it: each position's (argmax id, its log-probability)


def answer_text(tok, ids: list[int], finish: tuple) -> str:
    reason, matched = finish
    if reason == "eos" or (reason == "stop" and isinstance(matched, int)):
        ids = ids[:-1]
    text = tok.decode(ids, skip_special_tokens=True)
    if reason == "stop" and isinstance(matched, str) and matched in text:
        text = text[:text.index(matched)]
    return text


@dataclass
class StreamText:
    """A choice's text as its tokens arrive: each delta safe to send now."""
    tok: object
    stops: tuple  # the request's stop strings
    ids: list = field(default_factory=list)
    sent: str = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:  # a stop string the text already holds is never sent (its token ends the answer)
            if s in text:
                text = text[:text.index(s)]
        holdback = max((len(s) for s in self.stops), default=1) - 1  # what a stop string might still claim
        safe = text[:len(text) - holdback] if holdback else text
        if safe.endswith("\ufffd"):  # half a UTF-8 character: the next token completes it
            safe = safe[:-1]
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, final: str) -> str:
        delta = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final
        return delta


def _lp(v: float) -> float:
    v = float(v)
    return v if v != float("-inf") else NEG_INF


def top_pairs(row, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, log-probability) of a (1 + 2K,) row, K >= k."""
    K = (len(row) - 1) // 2
    return [(int(row[1 + j]), _lp(row[1 + K + j])) for j in range(k)]


def completion_logprobs(tok, ids: list[int], rows: list, k: int, offset: int = 0, prompt_ids: list[int] | None = None,
                        prompt_row: list | None = None, prompt_argmax: list | None = None) -> dict:
    """The completions API's logprobs object; with echo, the prompt's tokens first: the first has
    no log-probability (and top_logprobs null); each other its own and, as its top_logprobs, its
    position's most likely token and the token itself (the engine scores only the argmax of a
    prompt position: logprobs above 1 give the generated tokens k alternatives, the prompt's one).
    lm-eval's local-completions model reads is_greedy there: the token's value is the entry's max."""
    tokens, token_lps, tops, offsets = [], [], [], []
    if prompt_ids is not None:
        n = len(prompt_ids)
        values = [_lp(v) for v in prompt_row[len(prompt_row) - (n - 1):]] if n > 1 else []
        best = prompt_argmax[len(prompt_argmax) - (n - 1):] if n > 1 else []
        for j, t in enumerate(prompt_ids):
            text = tok.decode([t])
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            token_lps.append(None if j == 0 else values[j - 1])
            tops.append(None if j == 0 else _prompt_top(tok, text, values[j - 1], *best[j - 1]))
    for t, row in zip(ids, rows):
        text = tok.decode([t])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_lps.append(_lp(row[0]))
        top = {tok.decode([i]): v for i, v in top_pairs(row, k)}
        top.setdefault(text, _lp(row[0]))  # the chosen token always (OpenAI: up to logprobs + 1 entries)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _prompt_top(tok, text: str, value: float, argmax: int, argmax_value: float) -> dict:
    """A prompt token's top_logprobs entry: its position's argmax, then the token itself (OpenAI: up
    to logprobs + 1 entries, the chosen one among them). Two ids with the same text keep the
    argmax's value, so the token counts as greedy only when it is the argmax (or ties its value)."""
    top = {tok.decode([int(argmax)]): _lp(argmax_value)}
    top.setdefault(text, value)
    return top


def chat_logprobs(tok, ids: list[int], rows: list, k: int) -> dict:
    def entry(t: int, v: float) -> dict:
        text = tok.decode([t])
        return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t, _lp(row[0])), "top_logprobs": [entry(i, v) for i, v in top_pairs(row, k)]}
                        for t, row in zip(ids, rows)]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(chat: bool, model: str, chunk: bool, rid: str, created: int) -> dict:
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
    return {"id": rid, "object": kind, "created": created, "model": model}


def new_id(chat: bool) -> tuple[str, int]:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time())
