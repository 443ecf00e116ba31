"""The model families knowstack knows by name, and what sets each apart: the one declaration of per-family facts
(which linear layers it has and what they are called, what it ties, which stock MoE class fits it).

A family is found from a checkpoint's `model_type` (config.json). knowstack speaks Llama's names for the linear
layers (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: the paper's LoRA targets); a family that
fuses some of them (Phi-3's qkv_proj and gate_up_proj) declares which of its modules holds each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from knowstack.errors import KnowstackError

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
# The output layer and the input embedding it is tied to (transformers' `_tied_weights_keys`): the same names in
# every family here. A tied checkpoint stores only the embedding; the output layer reads it.
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Family:
    """One family of decoder-only causal LMs (its checkpoints' `model_type`s)."""

    name: str
    model_types: tuple[str, ...]
    # Llama's linear layer name -> this family's module that holds it, where the two differ (fused projections)
    fused: Mapping[str, str] = field(default_factory=dict)
    note: str = ""  # the family's quirks, in words (docs and errors)

    def module_for(self, llama_name: str) -> str:
        """This family's module name for one of Llama's linear layers (q_proj -> qkv_proj for Phi-3)."""
        return self.fused.get(llama_name, llama_name)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), note="Llama 2/3.x; 3.1+ scale RoPE (llama3), 3.2 1B/3B tie their embeddings"),
    Family("mistral", ("mistral",), note="sliding-window attention"),
    Family("qwen2", ("qwen2",), note="q/k/v biases; the small Qwen2.5 models tie their embeddings"),
    Family("qwen3", ("qwen3",), note="q/k RMS norms; the small Qwen3 models tie their embeddings"),
    Family("gemma2", ("gemma2",), note="GeGLU, attention and logit soft-capping, alternating sliding windows, "
                                       "scaled embeddings, pre- and post-norms, tied embeddings"),
    Family("gemma3", ("gemma3_text",), note="q/k norms, local and global RoPE, sliding pattern, tied embeddings"),
    Family("phi3", ("phi3",), fused={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
           note="fused qkv_proj and gate_up_proj"),
    Family("olmo2", ("olmo2",), note="post-norms after attention and MLP, q/k norms over the whole projection"),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(model_type: str | None) -> Family | None:
    """The family of a checkpoint's `model_type`, or None for one knowstack does not know by name."""
    return _BY_MODEL_TYPE.get(model_type or "")


def known_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def require_family(model_type: str | None, what: str) -> Family:
    """The family, or one clear error naming the families knowstack knows."""
    family = family_of(model_type)
    if family is None:
        raise KnowstackError(f"{what}: model_type {model_type!r} is not a family knowstack knows "
                             f"({', '.join(known_model_types())})", field="model_type")
    return family
