"""Quantized stages: bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4, FP4) weights, quantized by each
rank as it loads its own layers, or read already quantized from a checkpoint saved that way.

    q = resolve("nf4", {}, model_config, "cpu", "float32")   # None: not quantized; ConfigError: cannot run

What is quantized is what transformers' BitsAndBytesConfig quantizes: every nn.Linear (GPT-2's
Conv1D) except the lm_head and the modules named in llm_int8_skip_modules; embeddings, norms and
the head stay in the run's dtype. Each weight goes through bitsandbytes' own Int8Params /
Params4bit, exactly as from_pretrained(quantization_config=...) builds them, so a stage computes
what the whole model quantized by transformers computes (tests/test_quantization.py compares the
tokens with its generate()). The 4-bit compute dtype is the run's dtype.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeinfer.config import ConfigError

MIN_BITSANDBYTES = (0, 50)  # the release the tests run; older ones ran LLM.int8 on CUDA only
BLOCKSIZE = 64               # bitsandbytes' 4-bit block (Params4bit's default)
_INSTALL = "pip install 'bitsandbytes>=0.50'"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quantization:
    method: str                  # "int8", "nf4" or "fp4"
    source: str                  # "load": quantized as the rank loads; "checkpoint": stored quantized
    threshold: float = 6.0       # LLM.int8 outlier threshold (llm_int8_threshold)
    double_quant: bool = False   # 4-bit: quantize the block scales too (bnb_4bit_use_double_quant)
    skip: tuple[str, ...] = ()   # modules left unquantized besides the head (llm_int8_skip_modules)
    compute_dtype: str = "float32"

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def bnb_config(self):
        """The transformers BitsAndBytesConfig that quantizes the whole model the same way."""
        from transformers import BitsAndBytesConfig

        # transformers keeps the head unquantized unless skip modules are given, which then replace that rule
        skip = [*self.skip, "lm_head"] if self.skip else None
        if self.method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.threshold, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.method,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype), llm_int8_skip_modules=skip)

    def weight_bytes(self, shape: tuple[int, ...], out_features: int) -> int:
        """Bytes one quantized weight holds once loaded, scales included."""
        n = math.prod(shape)
        if self.method == "int8":
            return n + out_features * 4  # int8 values + one float32 scale per output row (SCB)
        blocks = -(-n // BLOCKSIZE)
        if self.double_quant:  # 8-bit block scales, their own float32 scales per 256, a 256-entry code
            scales = blocks + -(-blocks // 256) * 4 + 256 * 4 + 4
        else:
            scales = blocks * 4
        return -(-n // 2) + scales + 16 * 4  # two 4-bit values per byte + scales + the 16-entry code

    def record(self) -> dict:
        return asdict(self) | {"skip": list(self.skip), "library": "bitsandbytes " + _bnb_version_text()}


def _bnb_version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return "not installed"


def resolve(method: str, options: dict, model_config, device_type: str, dtype: str) -> Quantization | None:
    """The run's quantization from the config's `quantization` and `quantization_options` and the
    checkpoint's own quantization_config; ConfigError (one line, with the fix) when it cannot run."""
    stored = getattr(model_config, "quantization_config", None)
    if stored is not None:
        q = _from_checkpoint(stored if isinstance(stored, dict) else stored.to_dict(), method, dtype)
    elif method == "none":
        return None
    else:
        q = Quantization(method, "load", threshold=float(options.get("llm_int8_threshold", 6.0)),
                         double_quant=bool(options.get("bnb_4bit_use_double_quant", False)),
                         skip=tuple(options.get("llm_int8_skip_modules", ())), compute_dtype=dtype)
    _check_skip(q, "the checkpoint's quantization_config" if stored is not None else "quantization_options")
    _check_runs(q, device_type)
    return q


def _check_skip(q: Quantization, where: str) -> None:
    """Each skip entry is a regular expression (select() matches it as transformers does): one that
    does not compile is bad input here, on every rank, not a re.error in the plan."""
    for k in q.skip:
        try:
            re.compile(k)  # alone first: the error's position is then one in the entry as written
            re.compile(_skip_pattern(k))
        except re.error as e:
            raise ConfigError(f"{where}: llm_int8_skip_modules entry {k!r} is not a valid regular expression ({e}): "
                              f"entries are matched as regular expressions, as transformers matches them: give "
                              f"module names such as \"mlp.down_proj\", with a backslash before a literal ( ) [ ] * + ?"
                              ) from None


def _from_checkpoint(stored: dict, method: str, dtype: str) -> Quantization:
    kind = stored.get("quant_method", "?")
    kind = getattr(kind, "value", kind)
    if kind != "bitsandbytes":
        raise ConfigError(f"the checkpoint is quantized with {kind!r}, which this runner does not load (it loads "
                          f"bitsandbytes-quantized checkpoints): use the unquantized checkpoint, with "
                          f'quantization="int8" or "nf4" if it must be smaller')
    if stored.get("load_in_8bit"):
        found = "int8"
    elif stored.get("load_in_4bit"):
        found = stored.get("bnb_4bit_quant_type", "fp4")
    else:
        raise ConfigError("the checkpoint's quantization_config sets neither load_in_8bit nor load_in_4bit: "
                          "save it again with transformers' BitsAndBytesConfig")
    if method not in ("none", found):
        raise ConfigError(f"quantization={method!r} but the checkpoint is already quantized as {found!r}: set "
                          f'quantization="none" (or {found!r}), or start from the unquantized checkpoint')
    compute = stored.get("bnb_4bit_compute_dtype") or dtype
    return Quantization(found, "checkpoint", threshold=float(stored.get("llm_int8_threshold", 6.0)),
                        double_quant=bool(stored.get("bnb_4bit_use_double_quant", False)),
                        skip=tuple(stored.get("llm_int8_skip_modules") or ()),
                        compute_dtype=str(compute).removeprefix("torch."))


def _check_runs(q: Quantization, device_type: str) -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"quantization={q.method!r} needs the bitsandbytes package, which is not installed: "
                          f"{_INSTALL} (in the container or venv the ranks run in)")
    have = _bnb_version_text()
    if tuple(int(p) for p in have.split(".")[:2] if p.isdigit()) < MIN_BITSANDBYTES:
        raise ConfigError(f"quantization={q.method!r} needs bitsandbytes >= "
                          f"{'.'.join(map(str, MIN_BITSANDBYTES))} (installed: {have}): {_INSTALL}")
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(f"quantization={q.method!r} runs on cpu or cuda, not {device_type}: set device")


# --- which weights ------------------------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def linear_weights(model: nn.Module, heads: tuple[str, ...]) -> dict[str, int]:
    """{weight name: output features} of the nn.Linear / Conv1D modules of `model` (a meta skeleton
    will do), head excluded."""
    return {f"{name}.weight": out_in(module)[0] for name, module in model.named_modules()
            if is_linear(module) and name.split(".")[0] not in heads}


def select(linears, q: Quantization | None) -> set[str]:
    """The weights `q` quantizes: every linear one but the modules it skips (matched as transformers
    matches llm_int8_skip_modules: a dotted prefix, a regex up to a module boundary, or a suffix)."""
    if q is None:
        return set()

    def skipped(module: str) -> bool:
        return any(re.match(_skip_pattern(k), module) or module.endswith(k) for k in q.skip)
    return {w for w in linears if not skipped(w.removesuffix(".weight"))}


def _skip_pattern(k: str) -> str:
    """An llm_int8_skip_modules entry as the regular expression select() matches: up to a module boundary."""
    return rf"(?:{k})(?:(?<=\.)|(?=\.|$))"


def out_in(module: nn.Module) -> tuple[int, int]:
    if type(module) is nn.Linear:
        return module.out_features, module.in_features
    rows, cols = module.weight.shape  # Conv1D stores (in, out)
    return cols, rows


def stats_keys(keys) -> dict[str, list[str]]:
    """{stored quantized weight's key: the keys of its statistics}, in one pass over the checkpoint's
    keys: int8's "<module>.SCB", 4-bit's "<module>.weight.absmax", ".quant_map", ".quant_state...")."""
    out: dict[str, list[str]] = {}
    for k in keys:
        if k.endswith(".SCB"):
            out.setdefault(k[:-len("SCB")] + "weight", []).append(k)
        elif ".weight." in k:
            out.setdefault(k[:k.index(".weight.")] + ".weight", []).append(k)
    return out
