"""The routers of an MoE built from one-round models: one linear router per mixed layer (and, for an
FFT-MoE with `attention`, one per mixed attention projection of that layer).

Without data:
- random: every row drawn from N(0, initializer_range), as a fresh Mixtral router;
- uniform: all rows zero, so every expert is equally likely (the equal-weight mix when top_k equals
  the number of experts; with a smaller top_k the tie is broken by expert index, so it is only a
  starting point for router training);
- base-biased: random rows plus a logit bias of BASE_BIAS for the base expert, so that (at the
  model's initializer range) the base is every token's first choice and the other k-1 experts add a
  smaller share. A linear router has no other data-free way to prefer one expert (its input, a
  normalised hidden state, has no component of fixed sign), so this needs a router with a bias:
  knowstack's own MoE class for FFT-MoE, any LoRA-MoE.
From a few prompts per expert (moetify's positive-token init): expert e's row is the L2-normalised
mean of the router's input on the base model over expert e's prompts (mean over each prompt's
tokens, then over prompts). A routed base expert, which has no prompts, gets a zero row.

The router's input is captured exactly where the MoE's router reads it: the MLP's input (the
output of post_attention_layernorm) for FFT-MoE, the layer's attention input (the output of
input_layernorm) for LoRA-MoE, which routes once per layer for all its modules. A mixed attention
projection's router reads the projection's own input; it starts as its layer's MLP router does: from
prompts with the same rows (as moetify, which inits every module's router of a layer from the layer's
hidden states), data-free with draws of its own (`site` = the projection).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.errors import KnowstackError
from knowstack.modeling.routing import Router, decoder_layers
from knowstack.train.attention import packed_attention
from knowstack.train.batches import packed_rows

RouterKind = Literal["random", "uniform", "base-biased", "prompts", "none"]
ROUTER_KINDS: tuple[str, ...] = ("random", "uniform", "base-biased", "prompts", "none")
Site = Literal["mlp", "attention"]
BASE_BIAS = 2.0


def _generator(seed: int, layer: int, site: str = "mlp") -> torch.Generator:
    # Seeded per router from (seed, layer, site): the same routers whatever the order they are made in.
    # The MLP router keeps the key it always had, so existing seeds give the same routers.
    key = f"router:{seed}:{layer}" if site == "mlp" else f"router:{seed}:{layer}:{site}"
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def data_free_routers(kind: str, layers: Sequence[int], n_experts: int, hidden: int, *, init_range: float,
                      seed: int, base_index: int | None = None, site: str = "mlp") -> dict[int, Router]:
    """Routers of `kind` random, uniform or base-biased for each layer in `layers`, reading `hidden`
    features; site: which router of the layer (`mlp`, or an attention projection's name)."""
    if kind == "base-biased" and base_index is None:
        raise KnowstackError("the base-biased router needs the base as a routed expert (base_expert: routed)",
                             field="router")
    routers = {}
    for layer in layers:
        if kind == "uniform":
            weight = torch.zeros(n_experts, hidden)
        else:
            weight = torch.randn(n_experts, hidden, generator=_generator(seed, layer, site)) * init_range
        bias = None
        if kind == "base-biased":
            bias = torch.zeros(n_experts)
            bias[base_index] = BASE_BIAS
        routers[layer] = Router(weight, bias)
    return routers


def prompt_routers(means: dict[int, torch.Tensor], base_index: int | None = None) -> dict[int, Router]:
    """Routers whose rows are the normalised mean router inputs `means[layer]` (one row per contributed
    expert, in order); a routed base expert is inserted at `base_index` with a zero row."""
    routers = {}
    for layer, rows in means.items():
        rows = rows.float()
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        if base_index is not None:
            rows = torch.cat([rows[:base_index], torch.zeros(1, rows.shape[1]), rows[base_index:]])
        routers[layer] = Router(rows)
    return routers


def _site_module(layer: nn.Module, site: Site) -> nn.Module:
    return layer.post_attention_layernorm if site == "mlp" else layer.input_layernorm


@torch.no_grad()
def mean_router_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       prompts_per_expert: Sequence[Sequence[str]], layers: Sequence[int], site: Site,
                       max_length: int = 512) -> dict[int, torch.Tensor]:
    """For each layer, one row per expert: the mean over that expert's prompts of the mean over the
    prompt's tokens of the router input at `site`, on `model` (the base)."""
    if any(not prompts for prompts in prompts_per_expert):
        raise KnowstackError("every expert needs at least one prompt for the router init", field="prompts")
    all_layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = [_site_module(all_layers[i], site).register_forward_hook(_capture(captured, i)) for i in layers]
    device = next(model.parameters()).device
    try:
        rows = {i: [] for i in layers}
        for prompts in prompts_per_expert:
            sums = {i: torch.zeros(model.config.hidden_size) for i in layers}
            encoded = [ids[-max_length:] for ids in tokenizer(list(prompts))["input_ids"]]
            for input_ids, position_ids, bounds in packed_rows(encoded):
                with packed_attention(model):
                    model(input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False)
                for i in layers:
                    states = captured[i][0].float().cpu()
                    for start, end in bounds:
                        sums[i] += states[start:end].mean(dim=0)
            for i in layers:
                rows[i].append(sums[i] / len(prompts))
        return {i: torch.stack(rows[i]) for i in layers}
    finally:
        for hook in hooks:
            hook.remove()


def _capture(store: dict[int, torch.Tensor], layer: int):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        store[layer] = output.detach()

    return hook
