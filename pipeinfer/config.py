"""Experiment configuration: exp_config.json, loaded once into a frozen, validated dataclass.

    python -m pipeinfer.config exp_config.json --set pipeline_size=2   # print the resolved config

Every check here runs before any process group or model load, identically on every rank, so a bad
config gives the same one-line ConfigError everywhere and nobody waits on a peer that already quit.
Relative paths are taken relative to the current working directory.

Over 300 lines on purpose: ExpConfig's fields are the documented keys, each with its meaning beside
it, and their checks follow; split, a key's meaning and its check would live in two files.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")
QUANTIZATION = ("none", "int8", "nf4", "fp4")  # bitsandbytes LLM.int8, 4-bit NormalFloat, 4-bit float
# quantization_options: the BitsAndBytesConfig settings a user may change, and what each accepts
QUANT_OPTIONS = {
    "llm_int8_threshold": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
    "bnb_4bit_use_double_quant": (lambda v: isinstance(v, bool), "true or false"),
    "llm_int8_skip_modules": (lambda v: isinstance(v, list) and all(isinstance(m, str) and m for m in v),
                              'a list of module names, e.g. ["mlp.down_proj"]'),
}
MAX_TIMEOUT_S = 1e6  # 11.6 days for one wait: far beyond any step, and within what timedelta and gloo hold
# Below it sampling is greedy in effect (vLLM samples greedily under 1e-5), and float32 logits / temperature
# can overflow to inf (1e-40: multinomial raises, on CUDA a device-side assert): do_sample=false is greedy.
MIN_TEMPERATURE = 1e-5


class ConfigError(ValueError):
    """A bad configuration value. Its message is one line naming the key and what is allowed."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, for quoting inside a one-line error
    (torch.distributed and safetensors messages often go on with a C++ stack); the exception's
    type name when the message is empty."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:limit]


@dataclass(frozen=True)
class ExpConfig:
    model_path: str
    pipeline_size: int = 1
    prompts: list[str | list[dict]] | None = None
    prompts_file: str | None = None
    messages_field: str = "messages"
    chat_template: str | None = None
    system_prompt: str | None = None
    max_new_tokens: int = 32
    # the longest prompt a request may have (the engine's callers: a server, an evaluation);
    # None: the longest given prompt, or with none the model's positions less max_new_tokens
    max_prompt_tokens: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int = 0
    prompt_logprobs: bool = False
    prompt_logprobs_chunk: int = 512
    ignore_eos: bool = False
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    micro_batch_size: int | str = "auto"
    schedule: str = "rows"  # or "micro_batches": a slot refills when its whole micro-batch ends (generation.py)
    # rows schedule: a prompt longer than this prefills this many positions per visit, beside the
    # other rows' decode steps (0: whole prompts)
    prefill_chunk_size: int = 512
    # rows schedule: a visit's prefills run in the same forward as its rows' decode (load/packed.py)
    packed_prefill: bool = True
    # rows schedule, several micro-batches, packed: a visit runs no more prompt positions than the one
    # before it, the rest of a joiner's prefill in the next visits (run/rows.py)
    spread_prefill: bool = True
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    output_path: str = "results/run.jsonl"
    offload_folder: str = "offload"
    timeout_s: float = 300.0
    master_port: int = 29500
    comm_backend: str = "auto"
    resume: bool = True
    nvtx: bool | str = "auto"
    profile_steps: int = 0
    compile: bool | str = "auto"
    progress: bool = True
    layer_split: str | list[int] = "even"
    max_memory: list[int | str] | int | str | None = None
    max_cpu_memory: list[int | str] | int | str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    quantization: str = "none"
    quantization_options: dict | None = None
    replicas: int = 1
    replica: int = 0
    max_queued_requests: int = 256  # the server (pipeinfer.serve): requests waiting for a row; more get a 429

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Per key: the accepted Python types and a check on the value with the text of what is allowed.
_INT, _FLOAT, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
_RULES: dict[str, tuple[tuple[type, ...], object, str]] = {
    "model_path": (_STR, lambda v: v != "", "a local model directory"),
    "pipeline_size": (_INT, lambda v: v >= 1, "an integer >= 1"),
    "prompts": ((list,), lambda v: len(v) > 0 and all(isinstance(p, (str, list)) and p for p in v),
                "a non-empty list of non-empty strings or lists of chat messages"),
    "prompts_file": (_STR, lambda v: v != "",
                     "a path to a .jsonl (a \"prompt\" string or \"messages\" list per line) or .txt file"),
    "messages_field": (_STR, lambda v: v != "", "the .jsonl field that holds a prompt's chat messages"),
    "chat_template": (_STR, lambda v: v != "", "a path to a Jinja chat template file (default: the tokenizer's own)"),
    "system_prompt": (_STR, None, "a string: a system message put before every chat-messages prompt"),
    "max_new_tokens": (_INT, lambda v: v >= 0, "an integer >= 0 (0 only scores the prompts: prompt_logprobs=true)"),
    "max_prompt_tokens": (_INT, lambda v: v >= 1, "an integer >= 1: the longest prompt, in tokens, the plan makes "
                                                   "room for (requests longer than it are refused)"),
    "stop": ((list,), lambda v: all(isinstance(s, str) and s for s in v),
             'a list of non-empty strings, e.g. ["\\n\\n", "User:"]'),
    "stop_token_ids": ((list,), lambda v: all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v),
                       "a list of token ids >= 0"),
    "logprobs": (_INT, lambda v: v >= 0, "an integer >= 0: alternatives recorded per generated token (0 = off)"),
    "prompt_logprobs": (_BOOL, None, "true or false (record each prompt token's log-probability)"),
    "prompt_logprobs_chunk": (_INT, lambda v: v >= 1, "an integer >= 1: prompt positions scored at once"),
    "ignore_eos": (_BOOL, None, "true or false"),
    "dtype": (_STR, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "device": (_STR, lambda v: v in DEVICES, f"one of {', '.join(DEVICES)}"),
    "batch_size": (_INT, lambda v: v >= 1, "an integer >= 1"),
    "schedule": (_STR, lambda v: v in ("micro_batches", "rows"),
                 '"micro_batches" (a slot refills when its whole micro-batch ends) or "rows" (a row refills as its '
                 'prompt ends)'),
    "prefill_chunk_size": (_INT, lambda v: v >= 0, "an integer >= 0: prompt positions a joining prompt's prefill "
                           "runs per visit (0: whole prompts)"),
    "packed_prefill": (_BOOL, None, "true or false (a visit's prefills in the same forward as its rows' decode)"),
    "spread_prefill": (_BOOL, None, "true or false (a joining prompt's prefill spread over the micro-batches' "
                       "visits)"),
    "micro_batch_size": ((int, str), lambda v: v == "auto" or (isinstance(v, int) and v >= 1),
                         '"auto" or an integer >= 1 (prompts per micro-batch)'),
    "do_sample": (_BOOL, None, "true or false"),
    "temperature": (_FLOAT, lambda v: math.isfinite(v) and v >= MIN_TEMPERATURE,
                    f"a number >= {MIN_TEMPERATURE:g} (for greedy decoding set do_sample=false)"),
    "top_k": (_INT, lambda v: v >= 0, "an integer >= 0 (0 disables top-k)"),
    "top_p": (_FLOAT, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "seed": (_INT, lambda v: v >= 0, "an integer >= 0"),
    "output_path": (_STR, lambda v: v != "", "a path for the JSONL results"),
    "offload_folder": (_STR, lambda v: v != "", "a directory for disk offload"),
    "timeout_s": (_FLOAT, lambda v: 0 < v <= MAX_TIMEOUT_S, f"a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}"),
    "master_port": (_INT, lambda v: 1 <= v <= 65535, "a TCP port in 1..65535"),
    "comm_backend": (_STR, lambda v: v in BACKENDS,
                     f"one of {', '.join(BACKENDS)} (auto: NCCL between GPUs of their own, else gloo)"),
    "resume": (_BOOL, None, "true (skip prompts already in output_path) or false (start over)"),
    "nvtx": ((bool, str), lambda v: v in (True, False, "auto"),
             '"auto" (on when Nsight Systems runs the job), true or false'),
    "profile_steps": (_INT, lambda v: v >= 0, "an integer >= 0: steps to trace with torch.profiler (0 = off)"),
    "compile": ((bool, str), lambda v: v in (True, False, "auto", "cudagraphs"),
                '"auto" (on CUDA only), true (compile the decode step\'s norms and MLPs with torch.compile), '
                '"cudagraphs" (the same, each compiled part replayed as a CUDA graph) or false'),
    "progress": (_BOOL, None, "true or false (a progress bar on rank 0 when stderr is a terminal)"),
    "layer_split": ((str, list), lambda v: v in ("even", "auto") if isinstance(v, str) else
                    len(v) > 0 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v),
                    '"even", "auto" or a list of layer counts per stage, each >= 1'),
    "max_memory": ((list, int, str), lambda v: all(_is_bytes(b) for b in v) and len(v) > 0 if isinstance(v, list)
                   else _is_bytes(v), 'a device budget for every rank ("12GiB", "500MB" or bytes), or a list '
                   'with one per rank'),
    "max_cpu_memory": ((list, int, str), lambda v: all(_is_bytes(b, 0) for b in v) and len(v) > 0
                       if isinstance(v, list) else _is_bytes(v, 0),
                       'host memory for offloaded layers, per rank ("8GiB"; "0": the overflow goes to disk), or a '
                       'list with one per rank; setting it lets the plan offload what max_memory cannot hold'),
    "allow_pickle": (_BOOL, None, "true or false (true loads pickle .bin checkpoints, which can run code)"),
    "trust_remote_code": (_BOOL, None, "true or false (true runs the checkpoint's own Python code: auto_map)"),
    "quantization": (_STR, lambda v: v in QUANTIZATION,
                     f"one of {', '.join(QUANTIZATION)} (bitsandbytes, each rank quantizing its own layers)"),
    "quantization_options": ((dict,), lambda v: all(k in QUANT_OPTIONS and QUANT_OPTIONS[k][0](x) for k, x in v.items()),
                             "an object with " + ", ".join(f"{k} ({t})" for k, (_, t) in QUANT_OPTIONS.items())),
    "max_queued_requests": (_INT, lambda v: v >= 1, "an integer >= 1: requests the server holds waiting for a row "
                                                     "(one more is answered 429)"),
    "replicas": (_INT, lambda v: v >= 1, "an integer >= 1: independent pipelines, each on its own share of the prompts"),
    "replica": (_INT, lambda v: v >= 0, "an integer >= 0: which share this pipeline runs (submit.sbatch sets it from "
                                        "SLURM_ARRAY_TASK_ID)"),
}
assert set(_RULES) == {f.name for f in dataclasses.fields(ExpConfig)}

_OPTIONAL = ("prompts", "prompts_file", "max_prompt_tokens", "chat_template", "system_prompt", "stop", "stop_token_ids", "max_memory",
             "max_cpu_memory", "quantization_options")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str) -> int:
    """A byte count: an int, or a string with a unit as accelerate's max_memory takes it ("12GiB", "500MB")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value.strip().rstrip("bBiIkKmMgGtT ")
    unit = value.strip()[len(number):].strip().upper()
    if unit not in _UNITS:
        raise ValueError(f"unknown unit in {value!r}")
    amount = float(number) * _UNITS[unit]
    if not math.isfinite(amount):
        raise ValueError(f"{value!r} is not a finite number of bytes")
    return int(amount)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n}B"


def per_rank(value: list[int | str] | int | str | None, size: int) -> list[int] | None:
    """A budget key (max_memory, max_cpu_memory) as bytes per rank: one value for all, or a list."""
    if value is None:
        return None
    return [parse_bytes(v) for v in value] if isinstance(value, list) else [parse_bytes(value)] * size


def _is_bytes(value: object, least: int = 1) -> bool:
    try:
        return isinstance(value, (int, str)) and not isinstance(value, bool) and parse_bytes(value) >= least
    except ValueError:
        return False


def _check_key(key: str, value: object) -> object:
    if key not in _RULES:
        close = difflib.get_close_matches(key, _RULES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}; allowed keys: {', '.join(_RULES)}")
    types, ok, allowed = _RULES[key]
    if value is None and key in _OPTIONAL:
        return None
    # bool is a subclass of int: true/false is never a number here.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"{key}={json.dumps(value)} has the wrong type: expected {allowed}")
    if ok is not None and not ok(value):
        raise ConfigError(f"{key}={json.dumps(value)} is out of range: expected {allowed}")
    return float(value) if types is _FLOAT else value


def check_value(key: str, value: object, where: str) -> object:
    """A config key's rule applied to a value given elsewhere (a prompts file's per-prompt override)."""
    try:
        return _check_key(key, value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_override(item: str) -> tuple[str, object]:
    """`KEY=VALUE` from --set: VALUE is JSON when it parses as JSON, else the plain string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE: write e.g. --set pipeline_size=2")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def load_config(path: str, overrides: list[str] = ()) -> ExpConfig:
    """Read, override and validate. Raises ConfigError with a one-line message."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found: pass --config PATH to an exp_config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path!r} is not valid JSON ({e}): fix the syntax") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise ConfigError(f"config file {path!r} cannot be read ({e.strerror}): pass --config PATH to a readable "
                          f"exp_config.json") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a JSON object of key: value pairs")
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    return build_config(raw)


def build_config(raw: dict) -> ExpConfig:
    values = {key: _check_key(key, value) for key, value in raw.items()}
    if "model_path" not in values:
        raise ConfigError("model_path is missing: set it to a local model directory (weights are never downloaded)")
    if values.get("prompts") is not None and values.get("prompts_file") is not None:
        raise ConfigError("set exactly one of prompts (a list of strings) or prompts_file (a .jsonl or .txt path)")
    size = values.get("pipeline_size", 1)
    for key in ("layer_split", "max_memory", "max_cpu_memory"):
        if isinstance(values.get(key), list) and len(values[key]) != size:
            raise ConfigError(f"{key}={json.dumps(values[key])} has {len(values[key])} entries but pipeline_size={size}: "
                              f"give one per stage")
    cfg = ExpConfig(**values)
    if cfg.max_new_tokens == 0 and not cfg.prompt_logprobs:
        raise ConfigError("max_new_tokens=0 generates nothing: set prompt_logprobs=true to score the prompts, or "
                          "max_new_tokens >= 1")
    if cfg.replica >= cfg.replicas:
        raise ConfigError(f"replica={cfg.replica} but replicas={cfg.replicas}: replicas are numbered 0..{cfg.replicas - 1}")
    if cfg.max_cpu_memory is not None and cfg.max_memory is None:  # here, so the dry run decides as the run does
        raise ConfigError("max_cpu_memory offloads the layers that max_memory cannot hold, but max_memory is not "
                          "set: set max_memory (the device budget per rank) too")
    if isinstance(cfg.micro_batch_size, int) and cfg.micro_batch_size > cfg.batch_size:
        raise ConfigError(f"micro_batch_size={cfg.micro_batch_size} > batch_size={cfg.batch_size}: a micro-batch is "
                          f"part of the batch in flight; lower it or raise batch_size")
    return cfg


def micro_batching(cfg: ExpConfig) -> list[int]:
    """The micro-batch slots: how many prompts each of the micro-batches in flight holds at most.

    The slots add up to batch_size, so batch_size prompts are in flight, never more (the memory
    plan counts exactly those), and differ in size by at most one, the larger first. "auto" makes
    one slot per stage (fewer when the batch is smaller), so that every stage has work once the
    pipe is full; with one stage there is nothing to overlap and the batch stays whole, which
    computes it most efficiently. An integer micro_batch_size is the largest slot: the batch is
    cut into ceil(batch_size / micro_batch_size) slots. E.g. batch_size 3 at pipeline_size 2 ->
    [2, 1]; 5 at 4 -> [2, 1, 1, 1]; 4 with micro_batch_size 3 -> [2, 2].
    """
    size = cfg.micro_batch_size
    slots = min(cfg.pipeline_size, cfg.batch_size) if size == "auto" else -(-cfg.batch_size // size)
    base, extra = divmod(cfg.batch_size, slots)
    return [base + 1] * extra + [base] * (slots - extra)


def results_path(cfg: ExpConfig) -> str:
    """Where this pipeline writes: output_path itself, or with replicas > 1 the replica's own file
    beside it (results/run.jsonl -> results/run.replica1.jsonl), which the merge reads back
    (python -m pipeinfer.record.replicas)."""
    return replica_path(cfg.output_path, cfg.replica) if cfg.replicas > 1 else cfg.output_path


def replica_path(output_path: str, replica: int) -> str:
    root, ext = os.path.splitext(output_path)
    return f"{root}.replica{replica}{ext or '.jsonl'}"


def check_world(cfg: ExpConfig, world_size: int) -> None:
    if cfg.pipeline_size != world_size:
        how = ("run without torchrun, or with --nproc-per-node=1" if cfg.pipeline_size == 1
               else f"launch with torchrun --nproc-per-node={cfg.pipeline_size} (or srun -n {cfg.pipeline_size})")
        raise ConfigError(f"pipeline_size={cfg.pipeline_size} but WORLD_SIZE={world_size}: {how}, "
                          f"or --set pipeline_size={world_size}")


def check_model(cfg: ExpConfig, num_layers: int) -> None:
    if cfg.pipeline_size > num_layers:
        raise ConfigError(f"pipeline_size={cfg.pipeline_size} > num_hidden_layers={num_layers} of {cfg.model_path}: "
                          f"use pipeline_size <= {num_layers}")
    if isinstance(cfg.layer_split, list) and sum(cfg.layer_split) != num_layers:
        raise ConfigError(f"layer_split={json.dumps(cfg.layer_split)} sums to {sum(cfg.layer_split)} but "
                          f"{cfg.model_path} has num_hidden_layers={num_layers}: the counts must add up to it")


def check_vocab(cfg: ExpConfig, vocab_size: int | None) -> None:
    if vocab_size is not None and cfg.logprobs > vocab_size:
        raise ConfigError(f"logprobs={cfg.logprobs} > the vocabulary's {vocab_size} tokens of {cfg.model_path}: "
                          f"use logprobs <= {vocab_size} (5 or 20 is usual)")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun or run.sh (from SLURM_*) set them; 0, 1, 0 when absent."""
    def env_int(name: str, default: int) -> int:
        raw = os.environ.get(name, str(default))
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None
    rank, world_size, local_rank = env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} with WORLD_SIZE={world_size}: ranks run 0..WORLD_SIZE-1; launch with torchrun "
                          f"or srun, which set both, or set them by hand consistently")
    if local_rank < 0:
        raise ConfigError(f"LOCAL_RANK={local_rank} is negative: leave it to torchrun or run.sh")
    return rank, world_size, local_rank


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="Validate an exp_config.json and print it resolved.")
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--fields", nargs="+", metavar="KEY",
                    help="print only these keys, one per line (paths made absolute), for shell scripts")
    args = ap.parse_args()
    try:
        resolved = load_config(args.config, args.set).to_dict()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.fields:
        print(json.dumps(resolved, indent=2))
    for key in args.fields or ():
        if key == "results_path":  # derived: the file this replica writes
            print(os.path.abspath(results_path(load_config(args.config, args.set))))
            continue
        if key not in resolved:
            print(f"error: --fields {key}: not a config key", file=sys.stderr)
            sys.exit(2)
        value = resolved[key]
        if value is None:
            print("")  # an unset path: an empty line, which shell scripts test with [[ -n ... ]]
        else:
            print(os.path.abspath(value) if key.endswith(("_path", "_folder", "_file")) and value else value)
