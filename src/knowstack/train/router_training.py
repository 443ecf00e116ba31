"""Routers of a built MoE at work: expert load per router, and training of the routers alone.

Works on all three kinds of MoE the same way, through the router modules of each mixed layer
(a stock MoE class's `mlp.gate`: Mixtral's, Qwen2-MoE's, Qwen3-MoE's, FlexOlmo's; knowstack's
`KnowstackMoeBlock.gate` and the `gate` of each mixed attention
projection, `KnowstackMoeLinear`; a LoRA-MoE's per-layer router): a forward hook reads the router
logits, and top-k is recomputed from them exactly as the model does. Each router is a site keyed
`"<layer>"` (the MLP's or the LoRA-MoE's router) or `"<layer>.self_attn.<projection>"`, and so are the
expert loads.

Router training updates the router weights (and biases) and nothing else, on a small mixed set,
with the answer-only LM loss plus `aux_loss_coef` x the load-balancing loss of Switch/Mixtral,
averaged over all routers (a mixed attention projection's weighing as much as an MLP's):
E * sum_e f_e * P_e,  f_e the share of the k routing slots given to expert e, P_e the mean router
probability of e, over the batch's tokens.

Training runs unchanged in one process or under `accelerate launch` (train/router_job.py starts it):
every process takes a strided share of each batch, as train/loop.py does, and both losses are split
into per-process parts that add up to the whole batch's: the LM loss over the batch's answer-token
count, and the balancing loss with f_e and the token count summed over the processes (f_e carries no
gradient, so E * sum_e f_e * P_e is linear in each process's router probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.config import RouterTrainingConfig, TrainingConfig
from knowstack.data.batches import batch_order, pack, packed_rows, shard, tokenize_examples
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modeling.attention import packed_attention
from knowstack.modeling.families import stock_moe_blocks
from knowstack.modeling.lora_moe import LayerRouting, LoraMoeLinear
from knowstack.modeling.moe_model import ATTENTION_PROJECTIONS, KnowstackMoeBlock, KnowstackMoeLinear
from knowstack.modeling.routing import ROUTER_PROMPT_TOKENS, decoder_layers


@dataclass(frozen=True)
class RouterSite:
    layer: int
    module: nn.Module  # its forward returns the logits (or a tuple whose first item they are)
    top_k: int
    key: str  # "<layer>" for a layer's MLP (or LoRA-MoE) router, "<layer>.self_attn.<projection>", or a
    # per-module LoRA-MoE router's "<layer>.<module path in the layer>" (e.g. "0.mlp.down_proj")


_DECLARED = RouterTrainingConfig(steps=1)


@dataclass(frozen=True)
class RouterTraining:
    # the defaults are config.py RouterTrainingConfig's and the training recipe's max_length (one declaration)
    steps: int
    lr: float = _DECLARED.lr
    batch_size: int = _DECLARED.batch_size
    aux_loss_coef: float = _DECLARED.aux_loss_coef
    max_length: int = TrainingConfig().max_length
    seed: int = 0


def router_sites(model: nn.Module) -> list[RouterSite]:
    """Every router of an FFT-MoE (a stock MoE class or knowstack_moe, mixed attention projections included) or a
    LoRA-MoE model (one per layer, or one per module), layer by layer."""
    sites = []
    stock_blocks = stock_moe_blocks()
    for index, layer in enumerate(decoder_layers(model)):
        routing = getattr(layer, LayerRouting.ATTRIBUTE, None)
        block = getattr(layer, "mlp", None)
        if isinstance(routing, LayerRouting) and routing.router is not None:
            sites.append(RouterSite(index, routing.router, routing.top_k, str(index)))
        elif isinstance(block, KnowstackMoeBlock) and block.gate is not None:
            sites.append(RouterSite(index, block.gate, block.top_k, str(index)))
        elif type(block).__name__ in stock_blocks:  # the router holds top_k (the Qwen blocks do not)
            sites.append(RouterSite(index, block.gate, block.gate.top_k, str(index)))
        attention = getattr(layer, "self_attn", None)
        for name in ATTENTION_PROJECTIONS:
            linear = getattr(attention, name, None)
            if isinstance(linear, KnowstackMoeLinear) and linear.gate is not None:
                sites.append(RouterSite(index, linear.gate, linear.top_k, f"{index}.self_attn.{name}"))
        for name, module in layer.named_modules():
            own = module.own_routing if isinstance(module, LoraMoeLinear) else None
            if own is not None and own.router is not None:
                sites.append(RouterSite(index, own.router, own.top_k, f"{index}.{name}"))
    return sites


@contextmanager
def recording(sites: Sequence[RouterSite]) -> Iterator[dict[str, torch.Tensor]]:
    """Yields a dict that holds, after each forward pass, every router's logits (tokens x experts) by
    its site's key."""
    logits: dict[str, torch.Tensor] = {}

    def hook_for(key: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            value = output[0] if isinstance(output, tuple) else output
            logits[key] = value.reshape(-1, value.shape[-1])

        return hook

    handles = [site.module.register_forward_hook(hook_for(site.key)) for site in sites]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()


def slot_shares(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of the top-k slots each expert got, mean router probability of each expert)."""
    probs = F.softmax(logits.float(), dim=-1)
    return _slot_counts(probs, top_k) / (probs.shape[0] * top_k), probs.mean(dim=0)


def load_balancing_loss(logits: dict[str, torch.Tensor], sites: Sequence[RouterSite], *,
                        total: Callable[[torch.Tensor], torch.Tensor] | None = None, weight: float = 1.0) -> torch.Tensor:
    """Switch/Mixtral's auxiliary loss, E * sum_e f_e * P_e, averaged over the routers (1 when
    balanced). f_e carries no gradient (it comes from top-k); P_e does.

    When a batch's tokens are spread over processes, `total` sums a tensor over them, and this returns
    this process's part: f_e and the token count are the whole batch's, P_e's sum only this process's
    tokens, so the parts of all processes add up to the whole batch's loss. weight 0: a process without
    a share of the batch (its tokens count for nothing)."""
    if not sites:
        raise KnowstackError("this MoE has no router to train (router-free)", field="router_training")
    probs = {site.key: F.softmax(logits[site.key].float(), dim=-1) for site in sites}
    counts = [_slot_counts(probs[site.key], site.top_k) * weight for site in sites]
    tokens = torch.full((1,), probs[sites[0].key].shape[0] * weight, device=counts[0].device)
    # one reduction for every router's counts: each sees every token of the row
    summed = torch.cat([*counts, tokens])
    summed = total(summed) if total is not None else summed
    n_tokens = summed[-1].clamp_min(1.0)
    losses, start = [], 0
    for site, count in zip(sites, counts, strict=True):
        shares = summed[start:start + count.numel()] / (n_tokens * site.top_k)
        start += count.numel()
        prob_sums = probs[site.key].sum(dim=0) * weight
        losses.append(count.numel() * (shares.detach() * prob_sums).sum() / n_tokens)
    return torch.stack(losses).mean()


def _slot_counts(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    chosen = torch.topk(probs, top_k, dim=-1).indices
    return torch.zeros(probs.shape[-1], device=probs.device).index_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device))


def _rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int):
    return packed_rows([ids[-max_length:] for ids in tokenizer(list(texts))["input_ids"]])


@torch.no_grad()
def expert_loads(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 max_length: int = ROUTER_PROMPT_TOKENS) -> dict[str, list[float]]:
    """Per router (its site's key: the layer, or layer.self_attn.projection), the share of routing slots
    each expert receives on `texts` (sums to 1)."""
    sites = router_sites(model)
    if not sites or not texts:
        return {}
    device = next(model.parameters()).device
    totals = {site.key: None for site in sites}
    counts = {site.key: 0 for site in sites}
    with recording(sites) as logits, packed_attention(model):
        for input_ids, position_ids, _ in _rows(tokenizer, texts, max_length):
            model(input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False)
            for site in sites:
                shares, _ = slot_shares(logits[site.key], site.top_k)
                tokens = logits[site.key].shape[0]
                previous = totals[site.key]
                totals[site.key] = shares * tokens if previous is None else previous + shares * tokens
                counts[site.key] += tokens
    return {key: [round(v, 4) for v in (totals[key] / counts[key]).tolist()] for key in totals}


def prepare_router_training(model: PreTrainedModel, settings: RouterTraining,
                            accelerator: Accelerator) -> tuple[nn.Module, torch.optim.Optimizer, list[RouterSite]]:
    """Freezes everything but the routers and prepares model and optimizer with `accelerator` (DDP under
    a launch); returns them and the router sites (modules of the unwrapped model)."""
    sites = router_sites(model)
    if not sites:
        raise KnowstackError("this MoE has no router to train (router-free)", field="router_training")
    router_params = [p for site in sites for p in site.module.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    for param in router_params:
        param.requires_grad_(True)
    # made before prepare: accelerate swaps its parameters where it shards them (FSDP)
    optimizer = torch.optim.AdamW(router_params, lr=settings.lr, weight_decay=0.0)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return prepared, optimizer, sites


def train_routers(model: nn.Module, optimizer: torch.optim.Optimizer, sites: Sequence[RouterSite],
                  tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], settings: RouterTraining,
                  accelerator: Accelerator) -> dict:
    """Trains the routers only for settings.steps steps of settings.batch_size examples (the whole batch,
    over all processes); model and optimizer as prepare_router_training returns them. Returns the loss
    curve (the same in every process)."""
    if not examples:
        raise KnowstackError("router training needs examples", field="router_training")
    tokenized = tokenize_examples(tokenizer, examples, settings.max_length)
    order = batch_order(len(tokenized), settings.batch_size, 1.0, settings.steps, settings.seed)
    unwrapped = accelerator.unwrap_model(model)
    device = next(unwrapped.parameters()).device
    curve = []
    with recording(sites) as logits, packed_attention(unwrapped):
        for indices in order:
            curve.append(_router_step(accelerator, model, optimizer, sites, logits, tokenized, indices,
                                      settings.aux_loss_coef, device))
    for site in sites:
        site.module.requires_grad_(False)
    return {"steps": len(order), "first": curve[0], "last": curve[-1], "curve": curve}


def _router_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                 sites: Sequence[RouterSite], logits: dict[str, torch.Tensor], tokenized: list,
                 indices: list[int], aux_loss_coef: float, device: torch.device) -> dict[str, float]:
    """One optimizer step on this process's share of the batch `indices`; returns the batch's losses."""
    from knowstack.modeling.loss import answer_loss_sum

    world = accelerator.num_processes
    batch_tokens = max(sum(tokenized[i].answer_tokens for i in indices), 1)
    mine = shard(indices, accelerator.process_index, world)
    # As train/loop.py: a process with no share of a small last batch runs a zero-weighted pass, so
    # that every process joins the gradient all-reduce (and the count reductions).
    weight = 1.0 if mine else 0.0
    inputs = {k: v.to(device) for k, v in pack([tokenized[i] for i in mine or indices[:1]]).items()}
    ce_sum = answer_loss_sum(model, inputs) * weight
    aux = load_balancing_loss(logits, sites, total=lambda t: accelerator.reduce(t, reduction="sum"), weight=weight)
    # Each process's part of the whole batch's loss; DDP averages gradients, hence x world for their sum.
    accelerator.backward((ce_sum / batch_tokens + aux_loss_coef * aux) * world)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lm_sum, aux_value = accelerator.reduce(torch.stack([ce_sum.detach(), aux.detach()]), reduction="sum").tolist()
    return {"lm_loss": round(lm_sum / batch_tokens, 4), "aux_loss": round(aux_value, 4)}
