"""Prompts in, padded batches out. Every rank tokenizes the same prompts the same way, so every
stage knows each batch's shape (B, T) without being told."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from pipeinfer.config import ConfigError, ExpConfig


def load_prompts(cfg: ExpConfig) -> list[str]:
    prompts = list(cfg.prompts) if cfg.prompts is not None else _read_prompts_file(cfg.prompts_file)
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON admits lone surrogates ("\ud800"); no tokenizer does
            raise ConfigError(f"prompt {i} is not valid Unicode (a lone surrogate {p[e.start]!r} at character "
                              f"{e.start}): fix the text where it was written") from None
    return prompts


def _read_prompts_file(path: str) -> list[str]:
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
    if path.endswith(".jsonl"):
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"prompts_file={path!r} line {n} is not a JSON object with a \"prompt\" field") \
                    from None
            if not isinstance(prompt, str) or not prompt:
                raise ConfigError(f"prompts_file={path!r} line {n}: \"prompt\" must be a non-empty string")
            prompts.append(prompt)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts_file={path!r} holds no prompts: one per line (.txt) or {{\"prompt\": ...}} (.jsonl)")
    return prompts


@dataclass(frozen=True)
class Batch:
    indices: list[int]             # positions of these prompts in the input
    input_ids: torch.Tensor        # (B, T), left-padded
    attention_mask: torch.Tensor   # (B, T), 0 on padding
    prompt_tokens: list[int]


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no usable tokenizer in model_path={model_path!r} ({str(e).splitlines()[0][:120]}): "
                          f"stage tokenizer.json / tokenizer_config.json next to the weights") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_lengths(tokenizer, prompts: list[str], max_positions: int | None, max_new_tokens: int) -> list[int]:
    """Every prompt must tokenize to something and leave room for max_new_tokens. Returns the lengths."""
    lengths = []
    for i, ids in enumerate(tokenizer(prompts)["input_ids"]):
        lengths.append(len(ids))
        if not ids:
            raise ConfigError(f"prompt {i} tokenizes to nothing: give it some text")
        if max_positions is not None and len(ids) + max_new_tokens > max_positions:
            raise ConfigError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                              f"exceeds the model's {max_positions} positions: shorten it or lower max_new_tokens")
    return lengths


def make_batches(tokenizer, prompts: list[str], indices: list[int], batch_size: int) -> list[Batch]:
    """The prompts at `indices`, in order, as left-padded batches of up to batch_size."""
    batches = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True)
        batches.append(Batch(chunk, enc["input_ids"], enc["attention_mask"],
                             enc["attention_mask"].sum(dim=1).tolist()))
    return batches
