"""FFT-MoE: the MLP of each one-round model becomes one expert of a sparse MoE block in every mixed
layer; everything else (attention, norms, embeddings, head, unmixed layers' MLPs) comes from the base
or, as an option, is the plain average of the models.

The checkpoint is written tensor by tensor from the inputs' safetensors, as the merges are: each
output tensor is read (or averaged) from its source when its turn comes and streamed into the shard,
so memory holds one tensor (an average: one accumulator and one tensor), whatever the model count.

With a plain top-k router the output is the base family's own stock MoE class (modeling/families.py
`StockMoe`), which `transformers` loads as it is: Llama and Mistral -> MixtralForCausalLM
(`model.layers.N.block_sparse_moe.experts.E.w1/w2/w3` = an MLP's gate/down/up, `block_sparse_moe.gate` =
the router), Qwen2 -> Qwen2MoeForCausalLM (its shared expert one unit wide and all zeros: it adds nothing),
Qwen3 -> Qwen3MoeForCausalLM, OLMo-2 -> FlexOlmoForCausalLM (`mlp.experts.E.gate_proj/up_proj/down_proj`,
`mlp.gate`). Mixtral and FlexOLMo mix every layer; the Qwen classes can leave layers dense. The options a
stock class cannot express (some layers only, an always-on base expert, router-free, a router bias,
attention projections as experts) give a `knowstack_moe` checkpoint of knowstack's own class
(modeling/moe_model.py) for a Llama base, and are refused for the other families; so is every family
without a stock class that fits (Gemma, Phi-3), before anything is computed.

With `attention` (some of q_proj, k_proj, v_proj, o_proj), each of those projections of a mixed layer
is a mixture too: expert e is model e's weight for it (a routed base is expert 0), with its own router
(`self_attn.<proj>.gate`), written where the base's projection was, one tensor at a time as the MLPs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from knowstack.combine.inputs import FullModel, common_tie
from knowstack.errors import KnowstackError
from knowstack.modeling.families import FAMILIES, StockMoe, family_of, moe_families
from knowstack.modeling.moe_model import ATTENTION_PROJECTIONS
from knowstack.modeling.routing import Router
from knowstack.modeling.streaming import MAX_SHARD_BYTES, ShardedWriter
from knowstack.modelio import copy_model_files, dtype_name

_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_ATTENTION = re.compile(rf"model\.layers\.(\d+)\.self_attn\.({'|'.join(ATTENTION_PROJECTIONS)})\.(weight|bias)")
Fetch = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class FftMoeLayout:
    """Which tensors an FFT-MoE has and what they are called."""

    stock: StockMoe | None  # the family's stock MoE class, or None: knowstack_moe
    layers: tuple[int, ...]  # the mixed layers
    n_routed: int  # experts the router chooses among (a routed base is expert 0)
    base_routed: bool
    always_on: bool
    router_free: bool
    router_bias: bool
    attention: tuple[str, ...] = ()  # the mixed attention projections (knowstack_moe only)

    @property
    def architecture(self) -> str:
        return self.stock.architecture if self.stock else "KnowstackMoeForCausalLM"

    def expert(self, layer: int, expert: int, projection: str, kind: str = "weight") -> str:
        if self.stock:
            block, name = self.stock.block, self.stock.expert_name(projection)
            return f"model.layers.{layer}.{block}.experts.{expert}.{name}.{kind}"
        return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.{kind}"

    def router(self, layer: int, kind: str = "weight") -> str:
        return f"model.layers.{layer}.{self.stock.block if self.stock else 'mlp'}.gate.{kind}"

    def shared_expert(self, layer: int, projection: str | None) -> str:
        """A tensor of the stock class's shared expert (projection None: its gate)."""
        name = self.stock.shared_expert if self.stock else None
        if name is None:
            raise AssertionError("this layout has no shared expert")
        part = f"{name}_gate" if projection is None else f"{name}.{projection}"
        return f"model.layers.{layer}.{self.stock.block}.{part}.weight"

    def always_on_expert(self, layer: int, projection: str, kind: str = "weight") -> str:
        return f"model.layers.{layer}.mlp.base.{projection}.{kind}"

    def attention_part(self, layer: int, projection: str, part: str, kind: str = "weight") -> str:
        """A mixed attention projection's tensor: part is `experts.E`, `gate` or `base` (the module path)."""
        return f"model.layers.{layer}.self_attn.{projection}.{part}.{kind}"


AttentionRouters = dict[tuple[int, str], Router]  # (layer, projection) -> its router


def choose_layout(base_config: dict, n_models: int, *, layers: Sequence[int] | None, base_expert: str,
                  router_free: bool, router_bias: bool, attention: Sequence[str] = ()) -> FftMoeLayout:
    """The family's stock MoE class where it can express the base and the options, knowstack_moe where it cannot
    and the family has it (Llama); otherwise one error saying why and which families work."""
    n_layers = int(base_config["num_hidden_layers"])
    mixed = tuple(range(n_layers)) if layers is None else tuple(sorted(set(layers)))
    if any(not 0 <= layer < n_layers for layer in mixed):
        raise KnowstackError(f"layers to mix must be in 0..{n_layers - 1}, got {list(mixed)}", field="layers")
    if not mixed:
        raise KnowstackError("name at least one layer to mix", field="layers")
    check_attention(attention)
    stock = fft_moe_class(base_config, some_layers=len(mixed) < n_layers, base_expert=base_expert,
                          router_free=router_free, router_bias=router_bias, attention=attention)
    return FftMoeLayout(stock=stock, layers=mixed, n_routed=n_models + (base_expert == "routed"),
                        base_routed=base_expert == "routed", always_on=base_expert == "always-on",
                        router_free=router_free, router_bias=router_bias,
                        attention=tuple(p for p in ATTENTION_PROJECTIONS if p in attention))


def fft_moe_class(base_config: dict, *, some_layers: bool = False, base_expert: str = "none",
                  router_free: bool = False, router_bias: bool = False, attention: Sequence[str] = ()) -> StockMoe | None:
    """The stock MoE class an FFT-MoE of this base with these options is written as; None: knowstack_moe. Reads
    the base's config only, so that a command or a study refuses a base it cannot mix before any compute. An error
    names the first option the class cannot express as its field; none where the base itself does not fit."""
    model_type = base_config.get("model_type")
    family = family_of(model_type)
    works = ", ".join(moe_families())
    if family is None or family.stock_moe is None:
        why = family.no_moe if family is not None else "not a family knowstack knows"
        raise KnowstackError(f"FFT-MoE of a '{model_type}' base: no transformers MoE class fits it ({why}); an FFT-MoE "
                             f"can be made of {works} bases")
    stock = family.stock_moe
    given = [(setting, shown) for setting, shown, set_so in (
        ("layers", "layers", some_layers and stock.dense_layers_field is None),
        ("base_expert", "base_expert: always-on", base_expert == "always-on"),
        ("router", "router: none", router_free), ("router", "router: base-biased", router_bias),
        ("attention", "attention", bool(attention))) if set_so]
    options = [shown for _, shown in given]
    misfits = stock.misfits(base_config)
    if not options and not misfits:
        return stock
    if family.own_moe:
        return None
    what = f"the options {', '.join(options)}" if options else f"a base with {', '.join(misfits)}"
    own = [f.name for f in FAMILIES if f.own_moe]
    raise KnowstackError(f"FFT-MoE of a '{model_type}' base: {stock.architecture} cannot express {what}, and "
                         f"knowstack's own MoE class is for {', '.join(own)} bases only",
                         field=given[0][0] if given else None)


def check_attention(attention: Sequence[str]) -> None:
    """The attention projections to mix: known names, each once."""
    unknown = [name for name in attention if name not in ATTENTION_PROJECTIONS]
    if unknown or len(set(attention)) != len(attention):
        raise KnowstackError(f"attention names projections to mix, each once, of {', '.join(ATTENTION_PROJECTIONS)}"
                             + (f" (unknown: {', '.join(map(str, unknown))})" if unknown else ""), field="attention")


def write_fft_moe(tmp: Path, base: FullModel, models: Sequence[FullModel], layout: FftMoeLayout, *,
                  top_k: int, shared: str, routers: dict[int, Router] | None,
                  attention_routers: AttentionRouters | None = None,
                  max_shard_bytes: int = MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Streams the FFT-MoE checkpoint into `tmp` (weights, config, tokenizer, chat template, generation_config);
    returns parameter counts. attention_routers: one per (mixed layer, projection in layout.attention), unless
    router-free. dtype: the floating tensors' (None: each as the base's). Tied where the base and the models are
    (combine/inputs.py common_tie). The models are checked against the base before (mix_models:
    combine/compatibility.py)."""
    tied = common_tie([base, *models])
    if not layout.router_free and (routers is None or set(routers) != set(layout.layers)):
        raise AssertionError("a router per mixed layer is needed")
    wanted = {(layer, name) for layer in layout.layers for name in layout.attention}
    if not layout.router_free and set(attention_routers or {}) != wanted:
        raise AssertionError("a router per mixed layer and attention projection is needed")
    plan = _tensor_plan(base, models, layout, shared, routers or {}, attention_routers or {})
    if dtype is not None:
        plan = [(name, dtype if kind.is_floating_point else kind, shape, fetch) for name, kind, shape, fetch in plan]
    writer = ShardedWriter(tmp, [(name, kind, shape) for name, kind, shape, _ in plan], max_shard_bytes)
    for name, kind, _, fetch in plan:
        tensor = fetch()
        writer.write(name, tensor.to(kind))
        del tensor  # not alive while the next one is read
    writer.close()
    _write_config(tmp, base, layout, top_k, tied=tied, dtype=dtype or base.weights_dtype())
    copy_model_files(base.path, tmp)
    return _parameter_counts(plan, layout, top_k)


PlanItem = tuple[str, torch.dtype, tuple[int, ...], Fetch]


def _tensor_plan(base: FullModel, models: Sequence[FullModel], layout: FftMoeLayout, shared: str,
                 routers: dict[int, Router], attention_routers: AttentionRouters | None = None) -> list[PlanItem]:
    """Every output tensor in write order (the base's on-disk order, a mixed layer's MoE block where its
    MLP was, a mixed attention projection's experts where it was), with the function that reads it;
    nothing is read yet."""
    specs = base.specs
    plan: list[PlanItem] = []
    done_blocks: set[int] = set()
    done_attention: set[tuple[int, str]] = set()
    for name in base.order():
        match = _MLP.fullmatch(name)
        layer = int(match.group(1)) if match else None
        if layer is not None and layer in layout.layers:
            if layer not in done_blocks:
                plan += _block_plan(base, models, layout, layer, routers.get(layer))
                done_blocks.add(layer)
            continue
        site = _mixed_attention(name, layout)
        if site is not None:
            if site not in done_attention:  # at its weight or bias, whichever comes first on disk
                plan += _attention_plan(base, models, layout, *site, (attention_routers or {}).get(site))
                done_attention.add(site)
            continue
        plan.append((name, specs[name].torch_dtype, specs[name].shape, _shared_fetch(base, models, name, shared)))
    missing = set(layout.layers) - done_blocks
    if missing:
        raise KnowstackError(f"the base has no Llama MLP (mlp.gate_proj/up_proj/down_proj) in layers {sorted(missing)}",
                             path=base.path)
    missing_attention = {(layer, p) for layer in layout.layers for p in layout.attention} - done_attention
    if missing_attention:
        raise KnowstackError(f"the base has no self_attn projection for (layer, projection) "
                             f"{sorted(missing_attention)}", path=base.path, field="attention")
    return plan


def _mixed_attention(name: str, layout: FftMoeLayout) -> tuple[int, str] | None:
    """(layer, projection) when `name` is a tensor of an attention projection that is mixed."""
    match = _ATTENTION.fullmatch(name)
    if match is None or int(match.group(1)) not in layout.layers or match.group(2) not in layout.attention:
        return None
    return int(match.group(1)), match.group(2)


def _block_plan(base: FullModel, models: Sequence[FullModel], layout: FftMoeLayout, layer: int,
                router: Router | None) -> list[PlanItem]:
    specs = base.specs
    kinds = [k for k in ("weight", "bias") if f"model.layers.{layer}.mlp.gate_proj.{k}" in specs]
    dtype = specs[f"model.layers.{layer}.mlp.gate_proj.weight"].torch_dtype
    plan: list[PlanItem] = []
    if router is not None:
        plan.append((layout.router(layer), dtype, tuple(router.weight.shape), lambda r=router: r.weight))
        if layout.router_bias:
            bias = router.bias if router.bias is not None else torch.zeros(router.weight.shape[0])
            plan.append((layout.router(layer, "bias"), dtype, tuple(bias.shape), lambda b=bias: b))
    sources = ([base] if layout.base_routed else []) + list(models)
    for expert, source in enumerate(sources):
        for projection in _PROJECTIONS:
            for kind in kinds:
                original = f"model.layers.{layer}.mlp.{projection}.{kind}"
                plan.append((layout.expert(layer, expert, projection, kind), dtype, specs[original].shape,
                             lambda s=source, n=original: s.read(n)))
    if layout.always_on:
        for projection in _PROJECTIONS:
            for kind in kinds:
                original = f"model.layers.{layer}.mlp.{projection}.{kind}"
                plan.append((layout.always_on_expert(layer, projection, kind), dtype, specs[original].shape,
                             lambda n=original: base.read(n)))
    if layout.stock is not None and layout.stock.shared_expert is not None:
        plan += _zero_shared_expert(layout, layer, dtype, specs[f"model.layers.{layer}.mlp.down_proj.weight"].shape[0])
    return plan


def _zero_shared_expert(layout: FftMoeLayout, layer: int, dtype: torch.dtype, hidden: int) -> list[PlanItem]:
    """The stock class's shared expert, one unit wide and all zeros, and its gate: it adds exactly nothing (its
    down projection is zero), at 4 x hidden parameters a layer."""
    shapes = {"gate_proj": (1, hidden), "up_proj": (1, hidden), "down_proj": (hidden, 1), None: (1, hidden)}
    return [(layout.shared_expert(layer, projection), dtype, shape, lambda shape=shape: torch.zeros(shape))
            for projection, shape in shapes.items()]


def _attention_plan(base: FullModel, models: Sequence[FullModel], layout: FftMoeLayout, layer: int,
                    projection: str, router: Router | None) -> list[PlanItem]:
    """One attention projection as a mixture: its router, one linear expert per source, the base."""
    specs = base.specs
    original = f"model.layers.{layer}.self_attn.{projection}"
    kinds = [k for k in ("weight", "bias") if f"{original}.{k}" in specs]
    dtype = specs[f"{original}.weight"].torch_dtype
    plan: list[PlanItem] = []
    if router is not None:
        plan.append((layout.attention_part(layer, projection, "gate"), dtype, tuple(router.weight.shape),
                     lambda r=router: r.weight))
        if layout.router_bias:
            bias = router.bias if router.bias is not None else torch.zeros(router.weight.shape[0])
            plan.append((layout.attention_part(layer, projection, "gate", "bias"), dtype, tuple(bias.shape),
                         lambda b=bias: b))
    sources = ([base] if layout.base_routed else []) + list(models)
    for expert, source in enumerate(sources):
        for kind in kinds:
            plan.append((layout.attention_part(layer, projection, f"experts.{expert}", kind), dtype,
                         specs[f"{original}.{kind}"].shape, lambda s=source, n=f"{original}.{kind}": s.read(n)))
    if layout.always_on:
        for kind in kinds:
            plan.append((layout.attention_part(layer, projection, "base", kind), dtype, specs[f"{original}.{kind}"].shape,
                         lambda n=f"{original}.{kind}": base.read(n)))
    return plan


def _shared_fetch(base: FullModel, models: Sequence[FullModel], name: str, shared: str) -> Fetch:
    if shared == "base":
        return lambda: base.read(name)

    def average() -> torch.Tensor:
        first = models[0].read(name)
        if not first.is_floating_point():
            return base.read(name)  # integer buffers are not averaged (the merge checks they agree)
        total = first.float()
        for model in models[1:]:
            total += model.read(name).float()
        return total / len(models)

    return average


def _write_config(tmp: Path, base: FullModel, layout: FftMoeLayout, top_k: int, *, tied: bool,
                  dtype: torch.dtype) -> None:
    from transformers import AutoConfig

    from knowstack.modeling.moe_model import KnowstackMoeConfig

    # the base's fields, with the tie and the dtype of what was written
    fields = {**AutoConfig.from_pretrained(str(base.path)).to_dict(), "tie_word_embeddings": tied,
              "dtype": dtype_name(dtype)}
    if layout.stock:
        config = AutoConfig.for_model(layout.stock.model_type, **_stock_config_fields(fields, layout, top_k))
        config.architectures = [layout.stock.architecture]
    else:
        for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
            fields.pop(key, None)
        config = KnowstackMoeConfig(
            **fields, num_local_experts=layout.n_routed, num_experts_per_tok=top_k,
            moe_layers=None if len(layout.layers) == fields["num_hidden_layers"] else list(layout.layers),
            always_on_base=layout.always_on, router_free=layout.router_free, router_bias=layout.router_bias,
            moe_attention=list(layout.attention) or None)
        config.architectures = ["KnowstackMoeForCausalLM"]
    config.save_pretrained(str(tmp))


def _stock_config_fields(fields: dict, layout: FftMoeLayout, top_k: int) -> dict:
    """The stock class's config: the base's fields it shares, its expert count and top-k, the settings that make
    it the family (modeling/families.py), an expert's width and the layers left dense where it has such fields."""
    stock = layout.stock
    assert stock is not None
    result = {key: fields[key] for key in stock.carried if key in fields}
    result.update(stock.fixed)
    result[stock.n_experts_field] = layout.n_routed
    result["num_experts_per_tok"] = top_k
    if stock.expert_size_field is not None:
        result[stock.expert_size_field] = fields["intermediate_size"]
    if stock.dense_layers_field is not None:
        result[stock.dense_layers_field] = [i for i in range(fields["num_hidden_layers"]) if i not in layout.layers]
    return result


def _parameter_counts(plan: list[PlanItem], layout: FftMoeLayout, top_k: int) -> dict[str, int]:
    """Total parameters, and those active per token: all but the routed experts, plus k of them
    (all of them without a router). Mixed attention projections' experts (`self_attn.P.experts.E`) are
    routed experts too, chosen k of n per token like the MLPs; their routers count as routers."""
    routed = sum(math.prod(shape) for name, _, shape, _ in plan if ".experts." in name)
    routers = sum(math.prod(shape) for name, _, shape, _ in plan if name.endswith((".gate.weight", ".gate.bias")))
    total = sum(math.prod(shape) for _, _, shape, _ in plan)
    share = 1.0 if layout.router_free else min(1.0, top_k / layout.n_routed)
    return {"total": total, "active": total - routed + round(routed * share), "experts": routed,
            "routers": routers, "shared": total - routed - routers}
