"""Why a prompt's generation ends: EOS, a stop token id, a stop string, or max_new_tokens.

The last stage decides, right after sampling, with the tokenizer every rank has: a stop string is
matched by transformers' own StopStringCriteria on the prompt's new ids so far, so a string spanning
tokens or ending inside one stops exactly where generate(stop_strings=..., tokenizer=...) stops.
The prompt is not searched, as vLLM and OpenAI match stops in the generated text only (the records
use their names): generate() also matches a stop that begins in the prompt ("Hello world" with
stop "dy" ends at a first token "y"); this does not. The decision travels to the first stage as
one code per row beside the token (comm.send_tokens): 0 running, 1 EOS, 2 + j the j-th of the
prompt's stop token ids then strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeinfer.config import ConfigError, first_line

RUNNING, EOS, STOP = 0, 1, 2


@dataclass(frozen=True)
class Stops:
    """A prompt's stop strings and stop token ids (the run's, or its own from the prompts file)."""
    strings: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()

    def matched(self, code: int) -> str | int:
        j = code - STOP
        return self.token_ids[j] if j < len(self.token_ids) else self.strings[j - len(self.token_ids)]


def finish(code: int, stops: Stops | None) -> tuple[str, str | int | None]:
    """(finish_reason, what matched) for a row's last code; a row still running ran out of tokens."""
    if code == RUNNING:
        return "length", None
    if code == EOS:
        return "eos", None
    return "stop", stops.matched(code)


MAX_MATCHERS = 256  # stop strings whose matchers (vocabulary-sized tables each) are kept


class Stopper:
    """On the last stage: each row's code for the token just sampled."""

    def __init__(self, tokenizer, eos_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids  # empty under ignore_eos
        self._eos: torch.Tensor | None = None
        self._criteria: dict[str, object] = {}  # one per string, so that the match is known

    def prepare(self, strings) -> "Stopper":
        """Build each stop string's matcher now, on every rank before any waits on another: a
        tokenizer StopStringCriteria cannot read fails here as bad input, not mid-run."""
        from transformers import StopStringCriteria

        for s in sorted(set(strings)):
            if s in self._criteria:
                continue
            if len(self._criteria) >= MAX_MATCHERS:  # a server's clients choose them: the oldest goes
                self._criteria.pop(next(iter(self._criteria)))  # (rebuilt if asked again, _matches)
            try:
                self._criteria[s] = StopStringCriteria(self.tokenizer, [s])
            except Exception as e:  # whatever the tokenizer's vocabulary makes it raise
                said = first_line(e, 120)
                raise ConfigError(f"stop string {s!r} cannot be matched with this tokenizer ({type(e).__name__}: "
                                  f"{said}): give stop_token_ids instead") from None
        return self

    def _matches(self, s: str, generated: torch.Tensor) -> bool:
        if s not in self._criteria:  # a caller that did not prepare() (tests, benches)
            self.prepare([s])
        return bool(self._criteria[s](generated[None], None)[0])

    def codes(self, tokens: torch.Tensor, finished: torch.Tensor, stops: list[Stops] | None,
              generated: list[torch.Tensor] | None) -> torch.Tensor:
        """(B,) codes for (B,) new tokens; rows already finished get RUNNING (their token is padding).
        generated: per row, the new ids so far, this token last, without the prompt (needed for stop
        strings only)."""
        if self._eos is None:
            self._eos = torch.tensor(self.eos_ids, dtype=tokens.dtype, device=tokens.device)
        codes = torch.isin(tokens, self._eos).long() * EOS  # (B,)
        for b, st in enumerate(stops or ()):
            if finished[b] or codes[b] or not (st.token_ids or st.strings):
                continue
            t = int(tokens[b])
            if t in st.token_ids:
                codes[b] = STOP + st.token_ids.index(t)
                continue
            j = next((j for j, s in enumerate(st.strings) if self._matches(s, generated[b])), None)
            if j is not None:
                codes[b] = STOP + len(st.token_ids) + j
        return codes.masked_fill(finished, RUNNING)
