"""Prompts in, padded batches out. Every rank renders and tokenizes the same prompts the same way,
so every stage knows each batch's shape (B, T) without being told. A prompt is a string or a list of
chat messages (chat.py renders those), with the run's stops or, key by key, its own."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipeinfer.run.chat import check_messages, encode, read_template, render
from pipeinfer.config import ConfigError, ExpConfig, check_value, first_line
from pipeinfer.run.stops import Stops


# The keys a prompt may set for itself (a .jsonl line, an engine request), checked as the run's are.
LIMIT_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
SAMPLING_KEYS = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class Limits:
    """A prompt's own generation limits; None: the run's value. With its own seed a prompt's sampled
    tokens depend on that seed alone (not on its place in the input)."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    @classmethod
    def read(cls, row: dict, where: str) -> "Limits":
        """The LIMIT_KEYS of a dict, each checked by the config's own rule (ConfigError naming `where`)."""
        return cls(**{k: check_value(k, row[k], where) for k in LIMIT_KEYS if row.get(k) is not None})


NO_LIMITS = Limits()


# What a .jsonl line may set for its own prompt: its stops, each replacing the run's key of that
# name alone, and its limits. A record depends on these as much as on the rendered text: each prompt
# record stores them ("settings") and resume compares them (results.scan_previous).
LINE_SETTINGS = ("stop", "stop_token_ids", *LIMIT_KEYS)


@dataclass(frozen=True)
class PromptSpec:
    """One prompt as the input gives it: a string, or chat messages, with its own settings if any."""
    given: str | list[dict]
    settings: dict = field(default_factory=dict)  # the line's own stop / stop_token_ids; the run's for the others
    where: str = ""  # where the input gives it ("prompts[2]", "prompts_file='p.jsonl' line 3"), named in errors
    limits: Limits = NO_LIMITS


@dataclass(frozen=True)
class Prompt:
    """One prompt as every rank runs it."""
    given: str | list[dict]  # as written in the input: recorded as is
    text: str                # what was tokenized: the string, or the rendered messages (hashed for resume)
    ids: list[int]           # stage 0's input, with exactly the special tokens intended (chat.encode)
    stops: Stops
    limits: Limits = NO_LIMITS
    settings: dict = field(default_factory=dict)  # its own LINE_SETTINGS: recorded, and compared on resume
    where: str = ""
    score_next: int | None = None  # with prompt_logprobs: the token after ids, scored without running it (scoring.py)

    def max_new_tokens(self, run_default: int) -> int:
        return run_default if self.limits.max_new_tokens is None else self.limits.max_new_tokens


def load_prompts(cfg: ExpConfig) -> list[PromptSpec]:
    """The config's prompts (none when it sets neither prompts nor prompts_file: an engine's caller
    hands it requests instead)."""
    if cfg.prompts is None and cfg.prompts_file is None:
        return []
    if cfg.prompts is not None:
        specs = [PromptSpec(p if isinstance(p, str) else check_messages(f"prompts[{i}]", p), where=f"prompts[{i}]")
                 for i, p in enumerate(cfg.prompts)]
    else:
        specs = _read_prompts_file(cfg.prompts_file, cfg.messages_field)
    for i, spec in enumerate(specs):
        for p in [spec.given] if isinstance(spec.given, str) else [m["content"] for m in spec.given]:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON admits lone surrogates ("\ud800"); no tokenizer does
                raise ConfigError(f"prompt {i} is not valid Unicode (a lone surrogate {p[e.start]!r} at character "
                                  f"{e.start}): fix the text where it was written") from None
    return specs


def prepare(tokenizer, specs: list[PromptSpec], cfg: ExpConfig) -> list[Prompt]:
    """Render and tokenize every prompt, on every rank alike. ConfigError for a template that fails."""
    template = read_template(cfg.chat_template) if cfg.chat_template is not None else None
    vocab = len(tokenizer)
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec.given, str):
            text, ids = spec.given, encode(tokenizer, spec.given, rendered=False)
        else:
            text = render(tokenizer, spec.given, template, cfg.system_prompt, f"prompt {i}")
            ids = encode(tokenizer, text, rendered=True)
        # each key the line sets replaces the run's alone: a run's end-of-turn id survives a line's stop strings
        own = spec.settings
        stops = Stops(tuple(own.get("stop", cfg.stop) or ()),
                      tuple(own.get("stop_token_ids", cfg.stop_token_ids) or ()))
        bad = [t for t in stops.token_ids if t >= vocab]
        if bad:
            raise ConfigError(f"prompt {i}: stop_token_ids {bad} are not among the tokenizer's {vocab} ids: give ids "
                              f"below {vocab}")
        check_limits(spec.limits, cfg, f"prompt {i}")
        own = {**spec.settings, **{k: v for k, v in dataclasses.asdict(spec.limits).items() if v is not None}}
        out.append(Prompt(spec.given, text, ids, stops, spec.limits, own, spec.where))
    return out


def check_limits(limits: Limits, cfg: ExpConfig, where: str) -> None:
    """What a prompt's own limits cannot be beside the run's config (ConfigError)."""
    if not cfg.do_sample:
        given = [k for k in SAMPLING_KEYS if getattr(limits, k) is not None]
        if given:
            raise ConfigError(f"{where} sets {', '.join(given)} but do_sample=false (greedy ignores them): set "
                              f"do_sample=true, or remove them")
    if limits.max_new_tokens == 0 and not cfg.prompt_logprobs:
        raise ConfigError(f"{where}: max_new_tokens=0 generates nothing: set prompt_logprobs=true to score the "
                          f"prompt, or max_new_tokens >= 1")


def text_prompts(tokenizer, texts: list[str]) -> list[Prompt]:
    """Plain strings as Prompts with no stops (the benches' input)."""
    return [Prompt(t, t, encode(tokenizer, t, rendered=False), Stops()) for t in texts]


def _read_prompts_file(path: str, messages_field: str = "messages") -> list[PromptSpec]:
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt
        with open(path, encoding="utf-8-sig") as f:  # universal newlines: \r\n and \r read as \n
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"prompts_file={path!r} not found: give an existing .jsonl or .txt file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompts_file={path!r} is not UTF-8 (byte {e.start}): re-encode it, "
                          f"e.g. iconv -f LATIN1 -t UTF-8") from None
    except OSError as e:
        raise ConfigError(f"prompts_file={path!r} cannot be read ({e.strerror}): give a readable .jsonl or .txt "
                          f"file") from None
    # Lines end at \n, \r\n or \r only: str.splitlines() would also cut at form feeds, U+2028 and the
    # like, which may sit inside a prompt (and raw inside a JSON string).
    lines = text.split("\n")
    suffix = os.path.splitext(path)[1].lower()  # "P.JSONL" is JSON lines too
    if suffix == ".json":
        raise ConfigError(f"prompts_file={path!r} is a .json file: write one JSON object per line "
                          f"({{\"prompt\": ...}} or {{\"{messages_field}\": [...]}}) in a .jsonl file, or give the "
                          f"list as the config's prompts")
    if suffix == ".jsonl":
        prompts = [_jsonl_prompt(path, n, line, messages_field) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        _refuse_json_lines(path, lines, messages_field)
        prompts = [PromptSpec(line, where=f"prompts_file={path!r} line {n}")
                   for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts_file={path!r} holds no prompts: one per line (.txt) or {{\"prompt\": ...}} (.jsonl)")
    return prompts


def _refuse_json_lines(path: str, lines: list[str], messages_field: str) -> None:
    """A text file whose first prompt is a JSON object with a "prompt" or messages field is JSON lines
    under another name (.ndjson, .txt): read as text, each whole line would become a prompt."""
    n, first = next(((n, ln) for n, ln in enumerate(lines, 1) if ln.strip()), (0, ""))
    try:
        row = json.loads(first)
    except ValueError:
        return
    key = next((k for k in ("prompt", messages_field) if isinstance(row, dict) and k in row), None)
    if key is not None:
        raise ConfigError(f"prompts_file={path!r} line {n} is a JSON object with a \"{key}\" field, but only a .jsonl "
                          f"file is read as JSON lines (this one would give each whole line as a prompt): rename it "
                          f"to .jsonl")


def _jsonl_prompt(path: str, n: int, line: str, messages_field: str) -> PromptSpec:
    """One .jsonl line: {"prompt": str} or {messages_field: [...]}, with optional "stop" and
    "stop_token_ids", each replacing the run's key of that name for this prompt (null or []: none),
    and optional LIMIT_KEYS (max_new_tokens, temperature, top_p, top_k, seed) replacing the run's."""
    where = f"prompts_file={path!r} line {n}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict) or ("prompt" in row) == (messages_field in row):
        raise ConfigError(f"{where} is not a JSON object with either a \"prompt\" string or a \"{messages_field}\" "
                          f"list (the config key messages_field names the latter)")
    if "prompt" in row:
        given = row["prompt"]
        if not isinstance(given, str) or not given:
            raise ConfigError(f"{where}: \"prompt\" must be a non-empty string")
    else:
        given = check_messages(f"{where} \"{messages_field}\"", row[messages_field])
    settings = {}
    for key in ("stop", "stop_token_ids"):
        if key in row:
            if row[key] is not None:
                check_value(key, row[key], where)
            settings[key] = list(row[key] or ())
    return PromptSpec(given, settings, where, Limits.read(row, where))


@dataclass(frozen=True)
class Batch:
    indices: list[int]             # positions of these prompts in the input
    input_ids: torch.Tensor        # (B, T), left-padded
    attention_mask: torch.Tensor   # (B, T), 0 on padding
    prompt_tokens: list[int]
    stops: list[Stops] | None = None  # per prompt; None when none of them has any
    limits: list[Limits] | None = None  # per prompt; None when none of them has its own
    score_next: list[int | None] | None = None  # per prompt (Prompt.score_next); None when none has one


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no usable tokenizer in model_path={model_path!r} ({first_line(e, 120)}): "
                          f"stage tokenizer.json / tokenizer_config.json next to the weights") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_lengths(prompts: list[Prompt], max_positions: int | None, run_max_new_tokens: int) -> list[int]:
    """Every prompt must tokenize to something and leave room for its max_new_tokens. Returns the lengths."""
    for i, p in enumerate(prompts):
        max_new_tokens = p.max_new_tokens(run_max_new_tokens)
        if not p.ids:
            raise ConfigError(f"prompt {i} tokenizes to nothing: give it some text")
        if max_positions is not None and len(p.ids) + max_new_tokens > max_positions:
            raise ConfigError(f"prompt {i} has {len(p.ids)} tokens; with max_new_tokens={max_new_tokens} that "
                              f"exceeds the model's {max_positions} positions: shorten it or lower max_new_tokens")
    return [len(p.ids) for p in prompts]


def make_batch(prompts: list[Prompt], indices: list[int], pad_id: int) -> Batch:
    """The prompts at `indices`, in order, as one left-padded batch (as the tokenizer pads with
    padding_side="left")."""
    rows = [prompts[i].ids for i in indices]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)             # (B, T)
    for b, r in enumerate(rows):
        input_ids[b, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r):] = 1
    stops, limits = [prompts[i].stops for i in indices], [prompts[i].limits for i in indices]
    nxt = [prompts[i].score_next for i in indices]
    return Batch(list(indices), input_ids, mask, [len(r) for r in rows],
                 stops if any(st.strings or st.token_ids for st in stops) else None,
                 limits if any(lim != NO_LIMITS for lim in limits) else None, nxt if set(nxt) != {None} else None)


def make_batches(prompts: list[Prompt], indices: list[int], batch_size: int, pad_id: int) -> list[Batch]:
    """The prompts at `indices`, in order, as left-padded batches of up to batch_size."""
    return [make_batch(prompts, indices[i:i + batch_size], pad_id) for i in range(0, len(indices), batch_size)]


@dataclass
class MicroBatches:
    """The prompts still to run, handed out in order as micro-batches: slot k takes the next
    sizes[k] prompts (fewer at the end), so the prompts in flight never exceed sum(sizes). Every rank builds the same one and takes from it in the same order (the schedule's visit
    order), so every stage knows each micro-batch's shape without being told. `make` turns
    prompt indices into a Batch (make_batch with the run's prompts)."""
    todo: deque
    sizes: list[int]
    make: Callable[[list[int]], Batch]
    in_flight: int = 0       # prompts taken and not yet done
    max_in_flight: int = 0   # the most there ever were
    rows_computed: int = 0   # positions run through the stage (B * T per prefill, B per decode step)

    def take(self, slot: int, most: int | None = None) -> Batch | None:
        """The next micro-batch for `slot` (at most `most` prompts), or None when all were taken."""
        if not self.todo:
            return None
        n = min(self.sizes[slot], len(self.todo), len(self.todo) if most is None else most)
        batch = self.make([self.todo.popleft() for _ in range(n)])
        self.in_flight += len(batch.indices)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return batch

    def done(self, batch: Batch) -> None:
        self.in_flight -= len(batch.indices)


def micro_batches(prompts: list[Prompt], indices: list[int], sizes: list[int], pad_id: int) -> MicroBatches:
    """MicroBatches over `prompts[indices]` in slots of `sizes` (config.micro_batching)."""
    return MicroBatches(deque(indices), list(sizes), lambda chunk: make_batch(prompts, chunk, pad_id))
