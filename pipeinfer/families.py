"""How each model family is split into pipeline stages: the one place that knows module names.

A stage runs the family's own base-model forward (so masks, rotary embeddings and the KV cache are
built exactly as transformers builds them for generate()), with its layer list cut down to the
stage's layers. Modules that only the first stage needs (token embeddings) or only the last stage
needs (final norm) are swapped for placeholders on the other stages:

  "unused"   -- never called when the stage is fed hidden states; raises if it is
  "identity" -- passes hidden states through (final norm on a non-last stage)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeinfer.config import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    base: str = "model"            # attribute of the *ForCausalLM holding the base model
    layers: str = "layers"         # attribute of the base model holding the decoder layers
    first: dict[str, str] = field(default_factory=lambda: {"embed_tokens": "unused"})
    last: dict[str, str] = field(default_factory=lambda: {"norm": "identity"})
    head: str = "lm_head"          # attribute of the *ForCausalLM
    embeddings: str = "embed_tokens"  # input embeddings, which a tied lm_head shares


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3")),
)


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise ConfigError(f"model_type={model_type!r} is not supported; supported model types: {supported}")
