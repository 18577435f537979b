"""lm-eval's --model_args for the pipeinfer model -> the engine's config and overrides, and the
backend's own settings (those lm-eval's hf backend has: max_length, max_gen_toks, add_bos_token,
prefix_token_id). Read identically on every rank before any rank waits on another.

    --model_args config=exp_config.json,pipeline_size=2,dtype=float32,max_length=2048

Every key that is not the backend's is a config key (KEY=VALUE, as the runner's --set takes it),
checked by the config's own rules when the engine starts. Some keys are the evaluation's own:
prompt_logprobs is always on (loglikelihood requests are scored prompts), do_sample is off
(lm-eval's hf backend decodes greedily unless a task asks otherwise), the config's prompts are
not read (the harness sends the requests), and max_new_tokens is 0: the plan then makes room
for rows of the model's positions (max_prompt_tokens, unless given), which a scored sequence of
max_length tokens fills, and a generation request takes max_length - max_gen_toks of them for
its context and the rest for its new tokens, as lm-eval's hf backend budgets it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeinfer.config import ConfigError

# What lm-eval passes every model besides --model_args (from its own --batch_size, --device): the
# engine's batch comes from the config (batch_size, micro_batch_size), its device from the config too.
HARNESS_KEYS = ("batch_size", "max_batch_size", "device")


@dataclass(frozen=True)
class EvalSettings:
    config: str = "exp_config.json"
    overrides: list[str] = field(default_factory=list)
    max_length: int | None = None       # None: the model's, as lm-eval's hf backend resolves it
    max_gen_toks: int = 256             # lm-eval's hf default
    add_bos_token: bool | None = None
    prefix_token_id: int | None = None

    @classmethod
    def read(cls, args: dict | None) -> "EvalSettings":
        """ConfigError (one line, with the fix) for a value of the wrong kind."""
        args = dict(args or {})
        for key in HARNESS_KEYS:
            args.pop(key, None)
        config = args.pop("config", "exp_config.json")
        if not isinstance(config, str) or not config:
            raise ConfigError(f"--model_args config={config!r}: give the path of an exp_config.json")
        own = {}
        for key, kind in (("max_length", int), ("max_gen_toks", int), ("prefix_token_id", int),
                          ("add_bos_token", bool)):
            if args.get(key) is not None:
                value = args.pop(key)
                if type(value) is not kind or (kind is int and value < (0 if key == "prefix_token_id" else 1)):
                    want = "true or false" if kind is bool else "an integer >= 1" if key != "prefix_token_id" \
                        else "a token id"
                    raise ConfigError(f"--model_args {key}={value!r}: give {want}")
                own[key] = value
            else:
                args.pop(key, None)
        overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items()]
        overrides += ["prompt_logprobs=true", "do_sample=false", "max_new_tokens=0", "prompts=null",
                      "prompts_file=null"]
        return cls(config, overrides, **own)
