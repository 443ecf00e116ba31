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

The router's input is captured exactly where the MoE's router reads it: the MLP's input (in Llama
the output of post_attention_layernorm, in OLMo-2 the residual stream) for FFT-MoE, the layer's attention
input (what self_attn reads: the output of input_layernorm, OLMo-2's residual stream) for LoRA-MoE, which
routes once per layer for all its modules. A mixed attention
projection's router reads the projection's own input; it starts as its layer's MLP router does: from
prompts with the same rows (as moetify, which inits every module's router of a layer from the layer's
hidden states), data-free with draws of its own (`site` = the projection).

moetify (RhuiDih/moetify, the paper's MoE tool; `router: moetify`):
- FFT-MoE (`mix.py`, positive tokens): expert e's row is the L2-normalised mean of the base's residual stream at
  the layer's input (`output_hidden_states[layer]`, before the layer's input norm) over expert e's prompts (mean
  over each prompt's tokens, each prompt run alone); the router still reads the MLP's input and gates as Mixtral.
- LoRA-MoE (`blend.py`): a router per module, rows drawn from N(0, initializer_range), no bias (the `random` draws
  of a per-module router), gated by the sigmoid of each chosen logit (modeling/lora_moe.py `gating: sigmoid`), every
  expert chosen (its `num_experts_per_tok` default, 0, is the number of experts). With `router_init: moetify` the
  draws are moetify's own (`moetify_lora_routers`), as blend.py makes them on a machine without CUDA.

Per-module routers of a LoRA-MoE (`routing: module`, moetify's non-global routers) each read their
module's own input: random draws of their own (`site` = the module), or from prompts the mean of that
module's input (`mean_module_inputs`), since a down_proj or o_proj reads no hidden-sized vector.

Training-free from the adapters themselves:
- arrow (Ostapenko et al. 2024, PEFT's ArrowConfig): per module, expert e's row is its prototype, the
  top right singular vector of its delta B_e A_e (exact, from an SVD; PEFT approximates it by 15 power
  iterations from a random start); the scores are |row . x| / temperature (modeling/lora_moe.py). An
  expert that does not target the module (and a routed base) gets a zero row: score 0.

- gates (PHATGOOSE, Muqeeth et al. 2024): per module, row e is contributor e's gate vector for the module
  (trained by the contributor on their own data, train/gate_training.py), standardized (mean 0, variance 1
  over its features, as microsoft/mttl's PHATGOOSE router); the scores standardize the input the same way
  and divide by sqrt(d) (modeling/lora_moe.py).

From prompts, as mergekit-moe's gates (mergekit 0.1.5, mergekit/moe/router.py):
- hidden (`gate_mode: hidden`): per layer, the base's hidden state at the layer's input (the residual
  stream, `output_hidden_states[layer]`) at the last token of each prompt (the bos token prepended),
  averaged over the expert's prompts, minus the same average over its negative prompts (in knowstack:
  the other experts' prompts), L2-normalised;
- cheap-embed (`gate_mode: cheap_embed`): the L2-normalised sum of the token embeddings of the
  expert's prompts (bos included), the same row in every layer; with negative prompts that row minus
  theirs, normalised again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.config import MOE_ROUTERS, MoeRouter
from knowstack.data.batches import packed_rows
from knowstack.errors import KnowstackError
from knowstack.modeling.attention import packed_attention
from knowstack.modeling.routing import ROUTER_PROMPT_TOKENS, Router, decoder_layers, on_attention_input

RouterKind = MoeRouter
ROUTER_KINDS: tuple[str, ...] = tuple(MOE_ROUTERS)
PROMPT_ROUTERS = ("prompts", "hidden", "cheap-embed")  # the routers built from prompts (moetify's too, for an FFT-MoE)
Site = Literal["mlp", "attention", "residual"]
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


MOETIFY_SEED = 1399  # moetify blend.py L58: set_seed(1399)


def moetify_lora_routers(modules: dict[str, tuple[int, int]], n_experts: int, rank: int,
                         init_range: float) -> dict[str, Router]:
    """The LoRA-MoE routers moetify's blend.py draws when torch has no CUDA device, bit for bit: `modules` are the
    Linear modules its PEFT injection targets, {name: (out_features, in_features)} in the base's module order.

    The draws between set_seed(1399) (L58) and the router inits (L114-120), all on torch's CPU generator: loading
    the base draws nothing (transformers >= 4.37 skips the init of loaded weights) and neither does its dummy forward
    (eval mode); then, module by module, moetify's MixtureOfLinear builds its router `nn.Linear(in, experts)` first
    (models/lora_model.py L91-95: a kaiming_uniform_ draw) and then, per expert, PEFT's update_layer builds
    `nn.Linear(in, r)` and `nn.Linear(r, out)` (a draw each) and re-draws A (reset_lora_parameters' kaiming_uniform_;
    B is zeroed, no draw); dropout 0 is an Identity. Then blend.py walks the state dict (module order again) and
    draws each router with normal_(0, initializer_range), float32, as the base loads (before transformers 5,
    from_pretrained's default dtype). A draw's values do not depend on the bounds, only its shape and dtype."""
    generator = torch.Generator().manual_seed(MOETIFY_SEED)

    def draw(rows: int, columns: int) -> None:  # what a kaiming_uniform_ of a float32 (rows, columns) consumes
        torch.empty(rows, columns, dtype=torch.float32).uniform_(generator=generator)

    for out_features, in_features in modules.values():
        draw(n_experts, in_features)  # the router's nn.Linear
        for _ in range(n_experts):
            draw(rank, in_features)  # nn.Linear(in, r)
            draw(out_features, rank)  # nn.Linear(r, out)
            draw(rank, in_features)  # A's kaiming_uniform_
    return {name: Router(torch.empty(n_experts, in_features, dtype=torch.float32).normal_(0.0, init_range,
                                                                                          generator=generator))
            for name, (_, in_features) in modules.items()}


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


def uses_prompts(router: str, kind: str) -> bool:
    """Whether the router of an MoE of `kind` (fft, lora) is built from prompts: moetify's is for an FFT-MoE only."""
    return router in PROMPT_ROUTERS or (router == "moetify" and kind == "fft")


def _site_target(layer: nn.Module, site: Site) -> tuple[nn.Module, str]:
    # an FFT-MoE's router reads what the MLP reads (OLMo-2 norms after its MLP, not before); a LoRA-MoE's what the
    # layer's self-attention reads (`on_attention_input`: OLMo-2 has no input_layernorm); moetify's init reads the
    # residual stream the layer itself is given
    if site == "residual":
        return layer, "layer-input"
    return (layer.mlp, "input") if site == "mlp" else (layer, "attention")


def mean_router_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       prompts_per_expert: Sequence[Sequence[str]], layers: Sequence[int], site: Site,
                       max_length: int = ROUTER_PROMPT_TOKENS) -> dict[int, torch.Tensor]:
    """For each layer, one row per expert: the mean over that expert's prompts of the mean over the
    prompt's tokens of the router input at `site` (its norm's output; `residual`: the layer's own input, the
    residual stream), on `model` (the base)."""
    all_layers = decoder_layers(model)
    targets = {}
    for i in layers:
        module, which = _site_target(all_layers[i], site)
        targets[i] = (module, model.config.hidden_size, which)
    return _mean_per_expert(model, tokenizer, prompts_per_expert, targets, max_length)


def mean_module_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       prompts_per_expert: Sequence[Sequence[str]], modules: Sequence[str],
                       max_length: int = ROUTER_PROMPT_TOKENS) -> dict[str, torch.Tensor]:
    """For each named module (a Linear of `model`), one row per expert: the mean over that expert's prompts
    of the mean over the prompt's tokens of the module's input, on `model` (the base)."""
    targets = {name: (model.get_submodule(name), model.get_submodule(name).in_features, "input") for name in modules}
    return _mean_per_expert(model, tokenizer, prompts_per_expert, targets, max_length)


@torch.no_grad()
def _mean_per_expert(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     prompts_per_expert: Sequence[Sequence[str]], targets: dict, max_length: int) -> dict:
    """targets: key -> (module, width, "input" | "output" | "attention" | "layer-input"): for each key, one row per
    expert, the mean over the expert's prompts of the mean over each prompt's tokens of what the module reads or
    writes (or, for a decoder layer, what its self-attention reads, or the residual stream it is given)."""
    if any(not prompts for prompts in prompts_per_expert):
        raise KnowstackError("every expert needs at least one prompt for the router init", field="prompts")
    captured: dict = {}

    def capture(key: object, which: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            captured[key] = (inputs[0] if which == "input" else output).detach()

        return hook

    def layer_input(key: object):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # decoder layers are called with the residual stream first, positionally or as `hidden_states`
            captured[key] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def watch(key: object, module: nn.Module, which: str):
        if which == "attention":
            return on_attention_input(module, lambda states: captured.__setitem__(key, states.detach()))
        if which == "layer-input":
            return module.register_forward_pre_hook(layer_input(key), with_kwargs=True)
        return module.register_forward_hook(capture(key, which))

    hooks = [watch(key, module, which) for key, (module, _, which) in targets.items()]
    device = next(model.parameters()).device
    try:
        rows: dict = {key: [] for key in targets}
        for prompts in prompts_per_expert:
            sums = {key: torch.zeros(width) for key, (_, width, _) in targets.items()}
            encoded = [ids[-max_length:] for ids in tokenizer(list(prompts))["input_ids"]]
            for input_ids, position_ids, bounds in packed_rows(encoded):
                with packed_attention(model):
                    model(input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False)
                for key in targets:
                    states = captured[key][0].float().cpu()
                    for start, end in bounds:
                        sums[key] += states[start:end].mean(dim=0)
            for key in targets:
                rows[key].append(sums[key] / len(prompts))
        return {key: torch.stack(rows[key]) for key in targets}
    finally:
        for hook in hooks:
            hook.remove()


def arrow_prototype(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of B A (unit length, in the module's input space), without forming
    B A: with B = Q R, B A = Q (R A) has R A's right singular vectors. Its sign is arbitrary (Arrow's
    scores are sign-agnostic); fixed here so that its largest component is positive, for reproducibility."""
    a, b = lora_a.float(), lora_b.float()
    _, r = torch.linalg.qr(b)
    vector = torch.linalg.svd(r @ a, full_matrices=False).Vh[0]
    return vector if vector[vector.abs().argmax()] >= 0 else -vector


def arrow_routers(prototypes: dict[str, dict[int, torch.Tensor]], in_features: dict[str, int],
                  n_experts: int) -> dict[str, Router]:
    """Per module, a router whose row e is expert e's prototype (`prototypes[module][e]`), a zero row for
    an expert without one (a routed base, an adapter that does not target the module)."""
    routers = {}
    for module, by_expert in prototypes.items():
        weight = torch.zeros(n_experts, in_features[module])
        for expert, vector in by_expert.items():
            weight[expert] = vector
        routers[module] = Router(weight)
    return routers


def _mergekit_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int) -> list[int]:
    # mergekit prepends the bos token's text and adds no special tokens of its own
    return tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"][-max_length:]


@torch.no_grad()
def last_token_hidden_states(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                             layers: Sequence[int], max_length: int = ROUTER_PROMPT_TOKENS) -> dict[int, torch.Tensor]:
    """Per layer, the mean over `prompts` of the hidden state at the layer's input (the residual stream,
    output_hidden_states[layer]) at each prompt's last token; each prompt runs alone (no padding)."""
    device = next(model.parameters()).device
    sums = {layer: torch.zeros(model.config.hidden_size) for layer in layers}
    for prompt in prompts:
        ids = torch.tensor([_mergekit_ids(tokenizer, prompt, max_length)], device=device)
        states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for layer in layers:
            sums[layer] += states[layer][0, -1].float().cpu()
    return {layer: total / len(prompts) for layer, total in sums.items()}


def _others(prompts_per_expert: Sequence[Sequence[str]], expert: int) -> list[str]:
    """An expert's negative prompts: every other expert's prompts, in expert order."""
    return [p for other, group in enumerate(prompts_per_expert) if other != expert for p in group]


def hidden_routers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   prompts_per_expert: Sequence[Sequence[str]], layers: Sequence[int],
                   base_index: int | None = None) -> dict[int, Router]:
    """mergekit-moe's `hidden` gates: per layer, row e = normalise(mean last-token hidden state over expert
    e's prompts - the same over the other experts' prompts); a routed base gets a zero row."""
    if any(not prompts for prompts in prompts_per_expert):
        raise KnowstackError("every expert needs at least one prompt for the router init", field="prompts")
    positive = [last_token_hidden_states(model, tokenizer, group, layers) for group in prompts_per_expert]
    rows = {layer: [] for layer in layers}
    for expert in range(len(prompts_per_expert)):
        others = _others(prompts_per_expert, expert)
        negative = last_token_hidden_states(model, tokenizer, others, layers) if others else None
        for layer in layers:
            rows[layer].append(positive[expert][layer] - (negative[layer] if negative is not None else 0.0))
    return prompt_routers({layer: torch.stack(r) for layer, r in rows.items()}, base_index)


def _cheap_embedding(embed: torch.Tensor, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     max_length: int) -> torch.Tensor:
    total = torch.zeros(embed.shape[1])
    for prompt in prompts:
        total += embed[_mergekit_ids(tokenizer, prompt, max_length)].float().sum(dim=0)
    return total / total.norm().clamp_min(1e-8)


def cheap_embed_routers(embed: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                        prompts_per_expert: Sequence[Sequence[str]], layers: Sequence[int],
                        base_index: int | None = None, max_length: int = ROUTER_PROMPT_TOKENS) -> dict[int, Router]:
    """mergekit-moe's `cheap_embed` gates from the embedding matrix `embed` (vocab x hidden): row e =
    normalise(cheap(e's prompts) - cheap(the other experts' prompts)), cheap = the normalised sum of the
    prompts' token embeddings; the same rows in every layer."""
    if any(not prompts for prompts in prompts_per_expert):
        raise KnowstackError("every expert needs at least one prompt for the router init", field="prompts")
    rows = []
    for expert, group in enumerate(prompts_per_expert):
        row = _cheap_embedding(embed, tokenizer, group, max_length)
        others = _others(prompts_per_expert, expert)
        rows.append(row - _cheap_embedding(embed, tokenizer, others, max_length) if others else row)
    stacked = torch.stack(rows)
    return prompt_routers({layer: stacked.clone() for layer in layers}, base_index)


def standardized(vector: torch.Tensor) -> torch.Tensor:
    """Mean 0 and variance 1 over the last dimension (a LayerNorm without affine, eps 1e-5, as mttl's)."""
    return torch.nn.functional.layer_norm(vector.float(), (vector.shape[-1],), eps=1e-5)


def gate_routers(gates: Sequence[dict[str, torch.Tensor]], modules: dict[str, list[int]],
                 in_features: dict[str, int], offset: int = 0) -> dict[str, Router]:
    """Per module, row (index + offset) = adapter index's standardized gate vector for the module (`gates`: one
    dict per adapter, by module name); a zero row where an adapter has no gate (or does not target it)."""
    routers = {}
    n_experts = len(gates) + offset
    for module, owners in modules.items():
        weight = torch.zeros(n_experts, in_features[module])
        for index in owners:
            vector = gates[index].get(module)
            if vector is None:
                raise KnowstackError(f"adapter {index + 1}'s gates have no vector for {module}", field="router")
            weight[index + offset] = standardized(vector)
        routers[module] = Router(weight)
    return routers
