"""An OpenAI request as the engine's prompts: the model name, max_tokens, sampling, stops and
log-probabilities mapped onto what the server's config allows, or an ApiError naming the field.

Sampling is run-wide in the engine (do_sample). With do_sample=false the server is greedy:
temperature 0 (or none) and top_p 1 (or none) are what it does; anything else is refused. With
do_sample=true a request's temperature, top_p and seed are its own (prompts.Limits), and
temperature 0 is greedy as OpenAI means it: top_k=1 keeps only the most likely token.
Log-probabilities are computed for the config's `logprobs` alternatives on every row and cut to
each request's own number, so a request may ask for up to that many.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeinfer.config import ConfigError
from pipeinfer.run.prompts import Limits, Prompt, PromptSpec, check_lengths
from pipeinfer.serve.protocol import ApiError, ChatRequest, CompletionRequest, message_text


@dataclass(frozen=True)
class Job:
    """What one HTTP request runs: a prompt per choice, and how its answer is written."""
    prompts: list[Prompt]
    chat: bool
    logprobs: int | None   # alternatives per token (0: the chosen token's only); None: no log-probabilities
    echo: bool
    stops: tuple[str, ...]  # cut from the text (not part of the answer, as OpenAI's)
    stream: bool
    include_usage: bool


def served_names(cfg, name: str | None) -> list[str]:
    """The model names requests may give; the first is the one /v1/models lists."""
    return [name] if name else [cfg.model_path.rstrip("/").rsplit("/", 1)[-1], cfg.model_path]


def build(req: CompletionRequest | ChatRequest, engine, names: list[str]) -> Job:
    """ApiError (nothing queued) for anything the server cannot honour."""
    cfg, chat = engine.inputs.cfg, isinstance(req, ChatRequest)
    if req.model not in names:
        raise ApiError(400, f"model={req.model!r} is not served here: this server serves {names[0]!r} "
                            f"(GET /v1/models)", "model", "model_not_found")
    max_new = _max_tokens(req, cfg.max_new_tokens, engine.max_new_tokens, chat)
    stops = _stops(req.stop)
    logprobs = _logprobs(req, cfg, chat)
    echo = not chat and req.echo
    if max_new == 0 and not (echo and logprobs is not None):
        raise ApiError(400, "max_tokens=0 generates nothing: give max_tokens >= 1, or echo=true with logprobs to "
                            "score the prompt", "max_tokens")
    if echo and logprobs is not None and not cfg.prompt_logprobs:
        raise ApiError(400, "echo with logprobs returns the prompt's log-probabilities, which this server does not "
                            "compute: restart it with prompt_logprobs=true in its config", "echo")
    limits = Limits(max_new_tokens=max_new, **_sampling(req, cfg, logprobs))
    settings = {"stop": list(stops)} if req.stop is not None else {}
    where = "messages" if chat else "prompt"
    if chat:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m)}
                    for m in req.messages]
        prompts = [_prepare(engine, PromptSpec(messages, settings, where, limits), where)]
    else:
        prompts = [_prepare(engine, PromptSpec(p, settings, where, limits), where) if isinstance(p, str)
                   else _ids_prompt(engine, p, settings, limits) for p in _prompt_list(req.prompt)]
    limit = engine.max_prompt_tokens
    for p in prompts:
        if len(p.ids) > limit:
            raise ApiError(400, f"the {where} has {len(p.ids)} tokens, more than the {limit} this server's plan holds "
                                f"(max_prompt_tokens): shorten it, or restart the server with a larger "
                                f"max_prompt_tokens", where, "context_length_exceeded")
    stream_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
    return Job(prompts, chat, logprobs, echo, stops, req.stream, stream_usage)


def _max_tokens(req, default: int, most: int, chat: bool) -> int:
    """default: the config's max_new_tokens; most: what the plan makes room for."""
    name, n = "max_tokens", req.max_tokens
    if chat and req.max_completion_tokens is not None:
        name, n = "max_completion_tokens", req.max_completion_tokens
    if n is None:
        return default
    if n < 0 or n > most:
        raise ApiError(400, f"{name}={n}: give 0 <= {name} <= {most}, what the server's plan makes room for "
                            f"(its config's max_new_tokens)", name)
    return n


def _stops(stop) -> tuple[str, ...]:
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if any(s == "" for s in stops):
        raise ApiError(400, "stop holds an empty string, which would stop before the first token: remove it", "stop")
    return stops


def _logprobs(req, cfg, chat: bool) -> int | None:
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        k, name = (req.top_logprobs or 0, "top_logprobs") if req.logprobs else (None, "logprobs")
    else:
        k, name = req.logprobs, "logprobs"
    if k is not None and max(k, 1) > cfg.logprobs:
        raise ApiError(400, f"{name}={k} needs the server's config logprobs >= {max(k, 1)} (it is {cfg.logprobs}): "
                            f"ask for fewer, or restart the server with logprobs=20", name)
    return k


def _sampling(req, cfg, logprobs: int | None) -> dict:
    t, p = req.temperature, req.top_p
    if not cfg.do_sample:  # greedy: a seed changes nothing, so it is honoured as it is
        for name, value, neutral in (("temperature", t, 0), ("top_p", p, 1)):
            if value is not None and value != neutral:
                raise ApiError(400, f"{name}={value}: this server decodes greedily (do_sample=false in its config): "
                                    f"send {name}={neutral} or leave it out, or restart it with do_sample=true", name)
        return {}
    out = {} if req.seed is None else {"seed": req.seed}
    if t == 0:
        if logprobs is not None:  # top_k=1 would make every alternative -inf
            raise ApiError(400, "temperature=0 with logprobs on a sampling server (do_sample=true): the greedy "
                                "filter leaves no alternatives to report; send temperature > 0, or run a "
                                "do_sample=false server", "temperature")
        out["top_k"] = 1
    elif t is not None:
        out["temperature"] = t
    if p is not None:
        out["top_p"] = p
    return out


def _prompt_list(prompt) -> list:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list: give a string, a list of token ids, or a list of them", "prompt")
    return list(prompt)


def _prepare(engine, spec: PromptSpec, where: str) -> Prompt:
    try:
        prompt = engine.prepare(spec)
    except ConfigError as e:
        raise ApiError(400, f"{where}: {e}", where) from None
    if not prompt.ids:
        raise ApiError(400, f"the {where} tokenizes to nothing: give it some text", where)
    return prompt


def _ids_prompt(engine, ids: list[int], settings: dict, limits: Limits) -> Prompt:
    """Token ids as given (lm-eval's tokenized requests): the stops and limits checked as for text."""
    tok = engine.inputs.tokenizer
    vocab = len(tok)
    if not ids:
        raise ApiError(400, "prompt holds an empty list of token ids", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"prompt token ids {bad[:5]} are not among the tokenizer's {vocab} ids", "prompt")
    base = _prepare(engine, PromptSpec("x", settings, "prompt", limits), "prompt")
    prompt = dataclasses.replace(base, given=list(ids), text=tok.decode(ids), ids=list(ids))
    try:
        check_lengths([prompt], getattr(engine.inputs.model_config, "max_position_embeddings", None),
                      engine.inputs.cfg.max_new_tokens)  # the rest of the plan's checks: Engine.submit
    except ConfigError as e:
        raise ApiError(400, f"prompt: {e}", "prompt") from None
    return prompt
