"""How each model family is split into pipeline stages: the one place that knows module names.

A stage runs the family's own base-model forward (so masks, rotary embeddings and the KV cache are
built exactly as transformers builds them for generate()), with its layer list cut down to the
stage's layers. Modules that only the first stage needs (token embeddings) or only the last stage
needs (final norm) are swapped for placeholders on the other stages:

  "unused"   -- never called when the stage is fed hidden states; raises if it is
  "identity" -- passes hidden states through (final norm on a non-last stage, OPT's projections)
  "zeros"    -- a 0-dim zero, for learned position embeddings the base forward adds to its input
                (`inputs_embeds + pos`): on a non-first stage the sum is the received hidden states

A module the family names but the checkpoint's config leaves out (OPT without project_in, or
without a final layer norm) is simply absent and gets no placeholder.

Tied embeddings: the lm_head shares `embeddings`' weight, so the last stage keeps that module too.
`input_scale`: the base forward multiplies inputs_embeds by sqrt(hidden_size) itself (Gemma under
transformers < 5; later releases scale inside the embedding module). The first stage needs that,
but the hidden states a later stage receives are already past it, so such a stage's base model
reads a copy of the config whose hidden_size is 1: the factor becomes exactly 1.0, and nothing
else in the base forward reads hidden_size (the layers keep the real config).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeinfer.config import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    base: str = "model"            # dotted path in the *ForCausalLM to the base model ("model.decoder")
    layers: str = "layers"         # attribute of the base model holding the decoder layers
    first: dict[str, str] = field(default_factory=lambda: {"embed_tokens": "unused"})
    last: dict[str, str] = field(default_factory=lambda: {"norm": "identity"})
    heads: tuple[str, ...] = ("lm_head",)  # attribute of the *ForCausalLM; older releases' names after the first
    embeddings: str = "embed_tokens"  # input embeddings, which a tied lm_head shares
    input_scale: bool = False      # base forward scales inputs_embeds by sqrt(hidden_size) (see above)

    @property
    def root(self) -> str:
        """The *ForCausalLM child that holds the base model; checkpoints saved from the base model omit it."""
        return self.base.split(".")[0]


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "phi3")),
    Family("gemma", ("gemma",), input_scale=True),
    Family("gpt2", ("gpt2",), base="transformer", layers="h", embeddings="wte",
           first={"wte": "unused", "wpe": "zeros"}, last={"ln_f": "identity"}),
    Family("opt", ("opt",), base="model.decoder",
           first={"embed_tokens": "unused", "embed_positions": "zeros", "project_in": "identity"},
           last={"final_layer_norm": "identity", "project_out": "identity"}),
    # transformers < 5 names the GPT-NeoX head embed_out, later releases lm_head.
    Family("gpt_neox", ("gpt_neox",), base="gpt_neox", embeddings="embed_in", heads=("lm_head", "embed_out"),
           first={"embed_in": "unused"}, last={"final_layer_norm": "identity"}),
)


def family_for(model_type: str) -> Family:
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise ConfigError(f"model_type={model_type!r} is not supported; supported model types: {supported}")
