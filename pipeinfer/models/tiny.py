"""Tiny random models and a byte-level tokenizer, made locally and deterministically: the tests'
and benchmarks' model factory (the demo's trained checkpoint comes from pretrained.py).

    python -m pipeinfer.models.tiny --out models/tiny-llama        # a 6-layer random model to try the runner on

Random weights from a fixed seed, saved with save_pretrained as safetensors: the same bytes on every
machine, and nothing downloaded. The tests build their models with make_model() too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

SPECIALS = ("<s>", "</s>", "<pad>")  # ids 256, 257, 258 after the 256 byte tokens

DEMO = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def make_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="left", model_input_names=["input_ids", "attention_mask"])


def make_model(out: str, seed: int = 0, dtype: str = "float32", model_type: str = "llama", device: str = "cpu",
               **overrides) -> str:
    """Write a random-weight model and tokenizer to `out` (atomically: a temp dir, then rename).

    device: where the weights are made and initialised ("cuda" for a billion parameters: on CPU that
    alone takes minutes); the same seed draws other numbers there than on CPU."""
    import torch
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer()
    defaults = CONFIG_MAPPING[model_type]()  # DEMO's sizes only where this family has such a key (GPT-2: no GQA)
    kwargs = {k: v for k, v in DEMO.items() if hasattr(defaults, k)}
    kwargs.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    # Random init gives near-uniform logits; a wider spread makes greedy choices decisive and the
    # demo's text less monotone, while staying a random model.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_demo_model(out: str) -> str:
    """Create the demo model at `out` unless a complete one is already there."""
    if not os.path.exists(os.path.join(out, "config.json")):
        make_model(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/tiny-llama")
    ap.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = ap.parse_args()
    if args.force and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    print(ensure_demo_model(args.out))
