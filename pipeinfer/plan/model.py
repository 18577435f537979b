"""The model as planning sees it, from its config.json alone: the module and parameter names and
shapes of its skeleton on the meta device, the sizes that set KV-cache and activation bytes, the
dtype it was saved in."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pipeinfer.config import ConfigError, first_line
from pipeinfer.models.families import Family, family_for
from pipeinfer.plan.quantization import linear_weights


def saved_dtype(model_config) -> str | None:
    """The dtype the checkpoint was saved in, per its config.json (`dtype`, or `torch_dtype` before 4.56)."""
    saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return str(saved).removeprefix("torch.") if saved is not None else None


def read_model_config(model_path: str, trust_remote_code: bool = False):
    """The checkpoint's config.json, with a one-line ConfigError when the directory is not a model, or
    when it needs its own Python code (auto_map) and trust_remote_code is not set."""
    from transformers import AutoConfig

    if not os.path.isdir(model_path):
        raise ConfigError(f"model_path={model_path!r} is not a directory: stage the model there first "
                          f"(weights are never downloaded) or fix the path")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ConfigError(f"model_path={model_path!r} has no config.json: copy the whole checkpoint directory")
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            auto_map = json.load(f).get("auto_map")
        if auto_map and not trust_remote_code:
            raise ConfigError(f"model_path={model_path!r} needs its own Python code (config.json has auto_map: "
                              f"{', '.join(auto_map)}): set trust_remote_code=true only if you trust that code")
        return AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ConfigError:
        raise
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"model_path={model_path!r}: config.json cannot be read "
                          f"({first_line(e, 160)})") from None


@dataclass(frozen=True)
class ModelShape:
    """What planning needs from the model, computed once from its config on the meta device."""
    family: Family
    num_layers: int
    top: list[str]
    base_children: list[str]
    params: dict[str, tuple[int, ...]]  # unique parameters (a tied head appears once, as the embedding)
    buffers: list[str]
    linears: dict[str, int]            # nn.Linear / Conv1D weights but the head (what bnb quantizes): out features
    tied: bool
    hidden: int
    intermediate: int
    vocab: int
    kv_width: int                      # num_key_value_heads x head_dim
    plain_cache: bool = True           # plain_rows(): the row schedule runs (else micro_batches)


def model_shape(model_config, trust_remote_code: bool = False) -> ModelShape:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    family = family_for(model_config.model_type)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    base = skeleton.get_submodule(family.base)
    c = model_config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or \
        getattr(c, "n_inner", None) or 4 * c.hidden_size
    tied = bool(getattr(c, "tie_word_embeddings", False))
    heads = {f"{h}.weight" for h in family.heads}  # tied: the embedding itself (some releases tie only at load)
    return ModelShape(family, c.num_hidden_layers, [n for n, _ in skeleton.named_children()],
                  [n for n, _ in base.named_children()],
                  {n: tuple(p.shape) for n, p in skeleton.named_parameters() if not (tied and n in heads)},
                  [n for n, _ in skeleton.named_buffers()], linear_weights(skeleton, family.heads), tied,
                  c.hidden_size, inter, c.vocab_size, kv_heads * head_dim, plain_rows(model_config))


def plain_rows(model_config) -> bool:
    """Whether every layer of the model's cache (as generate() types it) is a plain append-only
    layer, whose rows the row schedule may edit (run/rows.py; sliding-window and other special
    layers keep their own bookkeeping). The same answer on every rank: it reads the whole model's config."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model_config).layers)


def layer_of(name: str, m: ModelShape) -> int | None:
    prefix = f"{m.family.base}.{m.family.layers}."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".")[0])
    return None
