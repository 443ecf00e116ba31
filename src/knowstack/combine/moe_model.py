"""knowstack's own MoE model class, for the FFT-MoE options that stock Mixtral cannot express.

A plain FFT-MoE (every layer mixed, a linear router, top-k) is written as a stock
MixtralForCausalLM checkpoint. These options have no stock architecture, so such a checkpoint is a
`knowstack_moe` model instead, a LlamaForCausalLM whose MLPs are replaced by `KnowstackMoeBlock`:

- `moe_layers`: only these layers are mixed; the others keep one dense MLP;
- `always_on_base`: the base's MLP is active on every token as one more expert, weighted like an
  average active expert: 1/(A+1), the A active experts sharing the other A/(A+1) by their weights;
- `router_free`: no router; all experts are active with equal weight;
- `router_bias`: the router has a bias (a per-expert offset of its logits; the base-biased init).

The class is registered with AutoConfig / AutoModelForCausalLM when knowstack is imported (see
`knowstack/__init__.py`), so `AutoModelForCausalLM.from_pretrained` loads such a checkpoint with no
remote code. Weight names are the module paths, e.g. `model.layers.3.mlp.experts.2.up_proj.weight`,
`model.layers.3.mlp.gate.weight`, `model.layers.3.mlp.base.down_proj.weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

MODEL_TYPE = "knowstack_moe"


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

    def mixed_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers)) if self.moe_layers is None else list(self.moe_layers)


class KnowstackMoeBlock(nn.Module):
    """An MLP replaced by experts: top-k routed (softmax, renormalised over the k, as Mixtral), or all
    with equal weight without a router; optionally the base's MLP always active beside them."""

    def __init__(self, config: KnowstackMoeConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.experts = nn.ModuleList([LlamaMLP(config) for _ in range(self.num_experts)])
        self.gate = None if config.router_free else nn.Linear(config.hidden_size, self.num_experts,
                                                              bias=config.router_bias)
        self.base = LlamaMLP(config) if config.always_on_base else None

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
            mixed = (self.base(flat) + active * mixed) / (active + 1)
        return mixed.reshape(shape)

    def _routed(self, flat: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(flat.dtype)
        out = torch.zeros_like(flat)
        # Each expert runs only on the tokens that chose it, as in Mixtral.
        for expert_index in chosen.unique().tolist():
            token, slot = torch.where(chosen == expert_index)
            contribution = self.experts[expert_index](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, contribution)
        return out


class KnowstackMoeForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with KnowstackMoeBlock as the MLP of every mixed layer."""

    config_class = KnowstackMoeConfig

    def __init__(self, config: KnowstackMoeConfig):
        super().__init__(config)
        for index in config.mixed_layers():
            self.model.layers[index].mlp = KnowstackMoeBlock(config)
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
