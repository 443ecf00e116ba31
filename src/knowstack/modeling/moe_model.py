"""knowstack's own MoE model class, for the FFT-MoE options that stock Mixtral cannot express.

A plain FFT-MoE (every layer mixed, a linear router, top-k) is written as a stock
MixtralForCausalLM checkpoint. These options have no stock architecture, so such a checkpoint is a
`knowstack_moe` model instead, a LlamaForCausalLM whose MLPs are replaced by `KnowstackMoeBlock`:

- `moe_layers`: only these layers are mixed; the others keep one dense MLP;
- `always_on_base`: the base's MLP is active on every token as one more expert, weighted like an
  average active expert: 1/(A+1), the A active experts sharing the other A/(A+1) by their weights;
- `router_free`: no router; all experts are active with equal weight;
- `router_bias`: the router has a bias (a per-expert offset of its logits; the base-biased init);
- `moe_attention`: these projections of each mixed layer's self-attention (any of q_proj, k_proj,
  v_proj, o_proj) are mixtures too, `KnowstackMoeLinear`: one linear expert per model with its own
  router reading the projection's input, and the same top-k / router-free / always-on rules as the MLP.
  The projections are linear, so mixing them before the attention op is well defined.

The class is registered with AutoConfig / AutoModelForCausalLM when knowstack is imported (see
`knowstack/__init__.py`), so `AutoModelForCausalLM.from_pretrained` loads such a checkpoint with no
remote code. Weight names are the module paths, e.g. `model.layers.3.mlp.experts.2.up_proj.weight`,
`model.layers.3.mlp.gate.weight`, `model.layers.3.mlp.base.down_proj.weight`,
`model.layers.3.self_attn.q_proj.experts.2.weight`, `model.layers.3.self_attn.q_proj.gate.weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

MODEL_TYPE = "knowstack_moe"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@strict
class KnowstackMoeConfig(LlamaConfig):
    """A Llama config plus the mixing options (see the module's docstring)."""

    model_type = MODEL_TYPE
    num_local_experts: int = 2
    num_experts_per_tok: int = 2
    moe_layers: list[int] | None = None  # None: every layer
    always_on_base: bool = False
    router_free: bool = False
    router_bias: bool = False
    moe_attention: list[str] | None = None  # None: attention is not mixed

    def mixed_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers)) if self.moe_layers is None else list(self.moe_layers)


class _Mixture(nn.Module):
    """Experts that map `in_features` to `out_features`: top-k routed (softmax, renormalised over the k,
    as Mixtral), or all with equal weight without a router; optionally a base module always active
    beside them. Shared by the MLP block and the mixed attention projections, so both follow one rule."""

    def __init__(self, config: KnowstackMoeConfig, experts: list[nn.Module], base: nn.Module | None,
                 in_features: int, out_features: int):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.out_features = out_features
        self.experts = nn.ModuleList(experts)
        self.gate = None if config.router_free else nn.Linear(in_features, self.num_experts, bias=config.router_bias)
        self.base = base

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        if self.gate is None:
            mixed = sum(expert(flat) for expert in self.experts) / self.num_experts
            active = self.num_experts
        else:
            mixed = self._routed(flat)
            active = self.top_k
        if self.base is not None:
            # The base weighs as much as an average active expert: 1/(A+1), the A experts share the rest.
            mixed = (self.base(flat) + active * mixed) / (active + 1)
        return mixed.reshape(*shape[:-1], self.out_features)

    def _routed(self, flat: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(flat.dtype)
        out = flat.new_zeros(flat.shape[0], self.out_features)
        # Each expert runs only on the tokens that chose it, as in Mixtral.
        for expert_index in chosen.unique().tolist():
            token, slot = torch.where(chosen == expert_index)
            contribution = self.experts[expert_index](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, contribution.to(out.dtype))
        return out


class KnowstackMoeBlock(_Mixture):
    """An MLP replaced by experts (LlamaMLPs), optionally with the base's MLP always active."""

    def __init__(self, config: KnowstackMoeConfig):
        experts = [LlamaMLP(config) for _ in range(config.num_local_experts)]
        base = LlamaMLP(config) if config.always_on_base else None
        super().__init__(config, experts, base, config.hidden_size, config.hidden_size)


class KnowstackMoeLinear(_Mixture):
    """An attention projection replaced by linear experts (expert e: model e's weight for it), with
    its own router reading the projection's input; optionally the base's projection always active."""

    def __init__(self, config: KnowstackMoeConfig, in_features: int, out_features: int, bias: bool):
        experts = [nn.Linear(in_features, out_features, bias=bias) for _ in range(config.num_local_experts)]
        base = nn.Linear(in_features, out_features, bias=bias) if config.always_on_base else None
        super().__init__(config, experts, base, in_features, out_features)


class KnowstackMoeForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with KnowstackMoeBlock as the MLP of every mixed layer, and KnowstackMoeLinear
    as the attention projections named in `moe_attention` there."""

    config_class = KnowstackMoeConfig

    def __init__(self, config: KnowstackMoeConfig):
        super().__init__(config)
        for index in config.mixed_layers():
            layer = self.model.layers[index]
            layer.mlp = KnowstackMoeBlock(config)
            for name in config.moe_attention or []:
                linear = getattr(layer.self_attn, name)
                setattr(layer.self_attn, name, KnowstackMoeLinear(config, linear.in_features, linear.out_features,
                                                                  bias=linear.bias is not None))
        self.post_init()


_registered = False


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know `knowstack_moe` (idempotent)."""
    global _registered
    if _registered:
        return
    AutoConfig.register(MODEL_TYPE, KnowstackMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(KnowstackMoeConfig, KnowstackMoeForCausalLM, exist_ok=True)
    _registered = True
