"""The model families knowstack knows by name, and what sets each apart: the one declaration of per-family facts
(which linear layers it has and what they are called, what it ties, which stock MoE class fits it).

A family is found from a checkpoint's `model_type` (config.json). knowstack speaks Llama's names for the linear
layers (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: the paper's LoRA targets); a family that
fuses some of them (Phi-3's qkv_proj and gate_up_proj) declares which of its modules holds each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from knowstack.errors import KnowstackError

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


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


def lora_targets(model_type: str | None, names: Sequence[str]) -> list[str]:
    """LoRA target module names for a checkpoint of `model_type`: Llama's names (the default, every linear layer
    of attention and MLP) become the family's modules that hold them (q_proj, k_proj, v_proj -> qkv_proj on
    Phi-3: a fused projection is adapted whole, so any of its parts asks for all of it); other names, and every
    name for a model_type knowstack does not know, stay as given. Order kept, duplicates dropped."""
    family = family_of(model_type)
    return list(dict.fromkeys(family.module_for(name) if family else name for name in names))


def unmatched_targets(module_names: Iterable[str], targets: Sequence[str]) -> list[str]:
    """The targets that name no module, by PEFT's rule for a list of names: a module matches a target that is
    its whole name or its last dotted parts (so 'q_proj' matches 'model.layers.0.self_attn.q_proj')."""
    suffixes = set()
    for name in module_names:
        parts = name.split(".")
        suffixes.update(".".join(parts[i:]) for i in range(len(parts)))
    return [target for target in targets if target not in suffixes]


def checked_lora_targets(model_type: str | None, names: Sequence[str], module_names: Iterable[str],
                         layer_names: Sequence[str] = (), path: object | None = None) -> list[str]:
    """`lora_targets`, with one clear error where any of them names no module of the model (PEFT itself refuses
    only when none matches, and silently adapts the rest); layer_names: what the message offers instead."""
    targets = lora_targets(model_type, names)
    missing = unmatched_targets(module_names, targets)
    if missing:
        have = f"; its layers with a weight matrix: {', '.join(dict.fromkeys(layer_names))}" if layer_names else ""
        raise KnowstackError(f"LoRA target module(s) {', '.join(missing)} name no module of the model (model_type "
                             f"{model_type!r}{have})", path=path, field="training.lora.target_modules")
    return targets
