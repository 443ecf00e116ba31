"""The model families knowstack knows by name, and what sets each apart: the one declaration of per-family facts
(which linear layers it has and what they are called, what it ties, which stock MoE class fits it).

A family is found from a checkpoint's `model_type` (config.json). knowstack speaks Llama's names for the linear
layers (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: the paper's LoRA targets); a family that
fuses some of them (Phi-3's qkv_proj and gate_up_proj) declares which of its modules holds each.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from knowstack.errors import KnowstackError

# The output layer and the input embedding it is tied to (transformers' `_tied_weights_keys`): the same names in
# every family here. A tied checkpoint stores only the embedding; the output layer reads it.
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDING = "model.embed_tokens.weight"


# Config fields every stock MoE class below takes over from the base as they are (where the base has them).
_MOE_CARRIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                "attention_dropout", "rope_parameters", "dtype")


@dataclass(frozen=True)
class StockMoe:
    """A transformers MoE class that holds an FFT-MoE of a family exactly: the family's attention, norms, embeddings
    and head as they are, each mixed layer's MLP a sparse block of Llama-style experts (gate/up/down, SiLU-gated)
    with a linear router, softmax over the experts and the top-k weights renormalised to sum to 1 (so a mixture
    of identical experts is that expert). Its tensors are named as the class's checkpoints on the Hub name them,
    one tensor per expert (what transformers fuses on load): model.layers.N.<block>.experts.E.<expert name>,
    model.layers.N.<block>.gate.weight."""

    architecture: str
    model_type: str
    block_class: str  # the sparse block's class in transformers (router training finds the routers by it)
    carried: tuple[str, ...]  # config fields taken over from the base's config as they are
    fixed: Mapping[str, Any] = field(default_factory=dict)  # config fields set so that the class is the family
    block: str = "mlp"  # the block's name on disk (Mixtral's: block_sparse_moe; loaded as mlp)
    expert_names: Mapping[str, str] = field(default_factory=dict)  # Llama's MLP name -> the expert's, where they differ
    n_experts_field: str = "num_experts"
    expert_size_field: str | None = None  # an expert's intermediate size, where not `intermediate_size`
    dense_layers_field: str | None = None  # the field listing unmixed (dense MLP) layers, where the class has one
    # The always-on shared expert the class has (Qwen2-MoE's, with its sigmoid gate `<name>_gate`): written one unit
    # wide, all zeros, so that it adds exactly nothing.
    shared_expert: str | None = None
    # Base config fields that must have these values (or be absent) for the class to be the family exactly.
    requires: Mapping[str, Any] = field(default_factory=dict)

    def expert_name(self, llama_name: str) -> str:
        return self.expert_names.get(llama_name, llama_name)

    def misfits(self, base_config: Mapping[str, Any]) -> list[str]:
        """The base config's fields (with their values) that the class cannot express."""
        return [f"{key}={base_config[key]!r}" for key, value in self.requires.items()
                if base_config.get(key) not in (None, value)]


MIXTRAL = StockMoe(
    "MixtralForCausalLM", "mixtral", "MixtralSparseMoeBlock", (*_MOE_CARRIED, "sliding_window"),
    block="block_sparse_moe", expert_names={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    n_experts_field="num_local_experts", requires={"attention_bias": False, "mlp_bias": False})
QWEN2_MOE = StockMoe(
    "Qwen2MoeForCausalLM", "qwen2_moe", "Qwen2MoeSparseMoeBlock", _MOE_CARRIED,
    fixed={"qkv_bias": True, "norm_topk_prob": True, "decoder_sparse_step": 1, "shared_expert_intermediate_size": 1},
    expert_size_field="moe_intermediate_size", dense_layers_field="mlp_only_layers", shared_expert="shared_expert",
    # Qwen2-MoE's attention leaves the sliding window to the mask (flash attention would not apply it)
    requires={"use_sliding_window": False})
QWEN3_MOE = StockMoe(
    "Qwen3MoeForCausalLM", "qwen3_moe", "Qwen3MoeSparseMoeBlock", (*_MOE_CARRIED, "attention_bias"),
    fixed={"norm_topk_prob": True, "decoder_sparse_step": 1}, expert_size_field="moe_intermediate_size",
    dense_layers_field="mlp_only_layers",
    # Qwen3 slides its window in the layers from max_window_layers on, Qwen3-MoE in all of them
    requires={"use_sliding_window": False})
FLEX_OLMO = StockMoe(
    "FlexOlmoForCausalLM", "flex_olmo", "FlexOlmoSparseMoeBlock", (*_MOE_CARRIED, "attention_bias"),
    fixed={"norm_topk_prob": True})


@dataclass(frozen=True)
class Family:
    """One family of decoder-only causal LMs (its checkpoints' `model_type`s)."""

    name: str
    model_types: tuple[str, ...]
    # Llama's linear layer name -> this family's module that holds it, where the two differ (fused projections)
    fused: Mapping[str, str] = field(default_factory=dict)
    note: str = ""  # the family's quirks, in words (docs and errors)
    stock_moe: StockMoe | None = None  # the transformers MoE class an FFT-MoE of it is written as
    own_moe: bool = False  # knowstack's own MoE class (a Llama) holds the FFT-MoE options the stock one cannot
    no_moe: str = ""  # why no transformers MoE class fits it (where none does)

    def module_for(self, llama_name: str) -> str:
        """This family's module name for one of Llama's linear layers (q_proj -> qkv_proj for Phi-3)."""
        return self.fused.get(llama_name, llama_name)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), note="Llama 2/3.x; 3.1+ scale RoPE (llama3), 3.2 1B/3B tie their embeddings",
           stock_moe=MIXTRAL, own_moe=True),
    Family("mistral", ("mistral",), note="sliding-window attention", stock_moe=MIXTRAL),
    Family("qwen2", ("qwen2",), note="q/k/v biases; the small Qwen2.5 models tie their embeddings",
           stock_moe=QWEN2_MOE),
    Family("qwen3", ("qwen3",), note="q/k RMS norms; the small Qwen3 models tie their embeddings",
           stock_moe=QWEN3_MOE),
    Family("gemma2", ("gemma2",), note="GeGLU, attention and logit soft-capping, alternating sliding windows, "
                                       "scaled embeddings, pre- and post-norms, tied embeddings",
           no_moe="transformers has no Gemma MoE class"),
    Family("gemma3", ("gemma3_text",), note="q/k norms, local and global RoPE, sliding pattern, tied embeddings",
           no_moe="transformers has no Gemma MoE class"),
    Family("phi3", ("phi3",), fused={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
           note="fused qkv_proj and gate_up_proj",
           no_moe="PhiMoE, the Phi MoE class, normalises with LayerNorm where Phi-3 uses RMSNorm"),
    Family("olmo2", ("olmo2",), note="post-norms after attention and MLP, q/k norms over the whole projection",
           stock_moe=FLEX_OLMO),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(model_type: str | None) -> Family | None:
    """The family of a checkpoint's `model_type`, or None for one knowstack does not know by name."""
    return _BY_MODEL_TYPE.get(model_type or "")


def stock_moe_of(moe_model_type: str | None) -> StockMoe | None:
    """The stock MoE class of an FFT-MoE checkpoint's `model_type` (mixtral, qwen2_moe, ...), or None."""
    return next((f.stock_moe for f in FAMILIES if f.stock_moe and f.stock_moe.model_type == moe_model_type), None)


def stock_moe_blocks() -> set[str]:
    """The class names of the stock MoE classes' sparse blocks (where their routers are)."""
    return {family.stock_moe.block_class for family in FAMILIES if family.stock_moe is not None}


def moe_families() -> list[str]:
    """The families an FFT-MoE can be made of."""
    return [family.name for family in FAMILIES if family.stock_moe is not None]


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
                         layer_names: Sequence[str] = (), path: object | None = None,
                         field: str = "training.lora.target_modules") -> list[str]:
    """`lora_targets`, with one clear error where any of them names no module of the model (PEFT itself refuses
    only when none matches, and silently adapts the rest); layer_names: what the message offers instead; field: the
    setting the names came from."""
    targets = lora_targets(model_type, names)
    missing = unmatched_targets(module_names, targets)
    if missing:
        have = f"; its layers with a weight matrix: {', '.join(dict.fromkeys(layer_names))}" if layer_names else ""
        raise KnowstackError(f"LoRA target module(s) {', '.join(missing)} name no module of the model (model_type "
                             f"{model_type!r}{have})", path=path, field=field)
    return targets
