"""Mixing one-round models (FFT-MoE) or adapters (LoRA-MoE) of one base into a mixture of experts.

    mix_models(base, [m1, m2, m3], out, options=MoeOptions(top_k=2, router="prompts"),
               prompts=[[...], [...], [...]])

Full model dirs give an FFT-MoE (the base family's stock MoE class, e.g. Mixtral, or knowstack_moe; moe_fft.py); PEFT LoRA adapter
dirs give a LoRA-MoE dir loaded onto the base (moe_lora.py). Routers are built without data or from a
few prompts per expert (routers.py). What follows the build is the caller's `router_step`: the MoE method
(study/steps.py) and api.mix pass train/router_job.py's RouterRun, which measures the expert load on the prompts
and, when asked, trains the routers alone (train/router_training.py), here or under `accelerate launch`; combine/
trains nothing itself. The output dir is written under a temporary name and renamed when complete (after the
router step), with moe.json: what was mixed, the options, total and active parameters, and what the router step
adds (the expert load per layer, before and after router training).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, get_args

from knowstack.atomic import atomic_dir, atomic_write_json
from knowstack.combine.compatibility import check_compatible
from knowstack.combine.inputs import FullModel, LoraAdapter, common_tie, open_input
from knowstack.combine.routers import (
    ROUTER_KINDS,
    data_free_routers,
    mean_router_inputs,
    prompt_routers,
    uses_prompts,
)
from knowstack.config import PER_MODULE_ROUTERS, MoeConfig, RouterDtype, RouterInit, moe_problems
from knowstack.errors import KnowstackError
from knowstack.modeling.routing import Router
from knowstack.modelio import DTYPE_CHOICES, dtype_name, output_dtype

if TYPE_CHECKING:
    from knowstack.combine.moe_fft import FftMoeLayout

MOE_FILE = "moe.json"
BASE_EXPERTS = ("none", "routed", "always-on")
SHARED = ("base", "average")
ROUTINGS = ("layer", "module")
MODULE_ROUTERS = (*PER_MODULE_ROUTERS, "moetify")  # a router per module in a LoRA-MoE
ROUTER_DTYPES: tuple[str, ...] = get_args(RouterDtype)
ROUTER_INITS: tuple[str, ...] = get_args(RouterInit)


_DECLARED = MoeConfig()  # the one declaration of the MoE settings' defaults


@dataclass(frozen=True)
class MoeOptions:
    """top_k: experts per token; layers: the layers to mix (None: all); shared: where attention, norms,
    embeddings and unmixed MLPs come from (FFT only); base_expert: the base's MLP (FFT) / a null adapter
    (LoRA) as a routed expert, or always on (FFT only); router: see routers.py; seed: random routers;
    attention: self-attention projections (q_proj, k_proj, v_proj, o_proj) that are experts too in every
    mixed layer, each with its own router (FFT only: a LoRA-MoE mixes every module its adapters target);
    routing (LoRA-MoE): one router per layer, or per module (each reading its module's input; None: per
    module for arrow, per layer otherwise); temperature: Arrow's softmax temperature; dtype: the output's
    floating tensors (modelio.DTYPE_CHOICES; auto: the base's for an FFT-MoE, the adapters' own for a LoRA-MoE,
    whose routers are router_dtype's); router_dtype (LoRA-MoE): the dtype its routers are stored in (run in float32
    on the stored values, as PEFT loads moetify's); router_init (router moetify, LoRA-MoE): per-module draws, or
    moetify's own (routers.py moetify_lora_routers). router moetify (moetify's routing, routers.py): a LoRA-MoE
    routes per module with sigmoid gates to every expert (moetify's default top-k; `top_k` is then the FFT-MoE's
    only)."""

    top_k: int = _DECLARED.top_k
    layers: tuple[int, ...] | None = None
    shared: str = _DECLARED.shared
    base_expert: str = _DECLARED.base_expert
    # A library call without prompts has none to build a router from; `knowstack mix` and api.mix default to the
    # study's (MoeConfig's `prompts`) and ask for the prompts.
    router: str = "random"
    seed: int = 0
    attention: tuple[str, ...] = ()
    routing: str | None = None
    temperature: float = 1.0
    dtype: str = "auto"
    router_dtype: str = _DECLARED.router_dtype
    router_init: str = _DECLARED.router_init

    def effective_routing(self) -> str:
        return self.routing or ("module" if self.router in MODULE_ROUTERS else "layer")


def moetify_top_k(kind: str, options: MoeOptions, n_models: int) -> MoeOptions:
    """moetify's LoRA-MoE chooses every expert (blend.py leaves `num_experts_per_tok` at 0, which MoetifyLoraConfig
    turns into the number of experts); every other mixture keeps its top_k."""
    if kind != "lora" or options.router != "moetify":
        return options
    return replace(options, top_k=n_models + (options.base_expert == "routed"))


class RouterStep(Protocol):
    """What runs on the built MoE, in its temporary output dir, before the dir is complete (train/router_job.py
    RouterRun): returns what it adds to moe.json."""

    @property
    def trains(self) -> bool:
        """Whether it trains the routers (a router that ties its experts is then fine)."""

    def __call__(self, kind: str, moe_dir: Path, base_dir: Path) -> dict[str, Any]: ...


def mix_models(
    base: str | Path,
    models: Sequence[str | Path],
    out: str | Path,
    *,
    options: MoeOptions | None = None,
    prompts: Sequence[Sequence[str]] | None = None,
    tokenizer_path: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    router_step: RouterStep | None = None,
) -> dict[str, Any]:
    """Builds the MoE of `models` (all model dirs, or all adapter dirs) on `base` into `out`.

    prompts: a few prompts per model (in order), for the router init `prompts`; router_step: the caller's work on the
    built routers (the expert load, router training: train/router_job.py RouterRun), run on the MoE's temporary dir
    before it is renamed into place, where the MoE has routers. Returns moe.json.
    """
    options = options or MoeOptions()
    base_model = FullModel(Path(base).expanduser())
    inputs = [open_input(path) for path in models]
    kind = _kind(inputs)
    options = moetify_top_k(kind, options, len(inputs))
    trains = router_step is not None and router_step.trains
    _validate(kind, len(inputs), int(base_model.config["num_hidden_layers"]), options, prompts, trains)
    layout = _fft_layout(base_model, len(inputs), options) if kind == "fft" else None  # refused before any compute
    if kind == "fft":  # a tie broken on purpose: every model presents an output layer (combine/inputs.py)
        common_tie([base_model, *inputs])
    check_compatible(base_model, inputs)  # before any router is built or tensor read
    out = Path(out).expanduser()
    if out.resolve() in {p.resolve() for p in [base_model.path, *(m.path for m in inputs)]}:
        raise KnowstackError("the output dir is one of the inputs (it would be replaced)", path=out)
    tokenizer = None
    if uses_prompts(options.router, kind):  # the router init's; the router job loads its own
        from knowstack.modelio import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path or base_model.path)
    if kind == "lora" and options.effective_routing() == "module":
        from knowstack.combine.moe_lora import module_routers

        routers = module_routers(base_model, inputs, options, prompts, tokenizer)
    else:
        routers = _routers(kind, base_model, options, prompts, tokenizer, len(inputs))
    attention_routers = _attention_routers(base_model, options, routers, len(inputs))
    with atomic_dir(out) as tmp:
        record = _build(kind, tmp, base_model, inputs, options, routers, max_shard_bytes, attention_routers, layout)
        if options.router != "none" and router_step is not None:
            record.update(router_step(kind, tmp, base_model.path))
        atomic_write_json(tmp / MOE_FILE, record)
        from knowstack.modelcard import moe_card, write_model_card

        settings = {k: v for k, v in record.items() if k not in ("base", "models", "loads")}
        write_model_card(tmp, moe_card(kind, base_model.path, [m.path for m in inputs], settings))
    return record


def _kind(inputs: list[FullModel | LoraAdapter]) -> str:
    if not inputs:
        raise KnowstackError("give at least one model or adapter to mix", field="models")
    kinds = {m.kind for m in inputs}
    if len(kinds) > 1:
        raise KnowstackError("mix either full models (FFT-MoE) or LoRA adapters (LoRA-MoE), not both",
                             field="models")
    return kinds.pop()


def _validate(kind: str, n_models: int, n_layers: int, options: MoeOptions, prompts: Sequence[Sequence[str]] | None,
              trains: bool) -> None:
    """One clear error for every combination of options that cannot work (trains: the router step trains the
    routers; router training's own settings are train/router_job.py's to check)."""
    layers = options.layers
    checks = [
        (layers is not None and (not layers or any(not 0 <= i < n_layers for i in layers)), "layers",
         f"layers to mix must be in 0..{n_layers - 1}, at least one"),
        (options.router not in ROUTER_KINDS, "router", f"router must be one of {', '.join(ROUTER_KINDS)}"),
        (options.base_expert not in BASE_EXPERTS, "base_expert", f"base_expert must be one of {', '.join(BASE_EXPERTS)}"),
        (options.shared not in SHARED, "shared", "shared must be 'base' or 'average'"),
        (kind == "lora" and options.shared != "base", "shared",
         "a LoRA-MoE keeps the base's own weights ('shared' is for FFT-MoE)"),
        (options.routing is not None and options.routing not in ROUTINGS, "routing",
         f"routing must be one of {', '.join(ROUTINGS)}"),
        (not options.temperature > 0, "temperature", "temperature must be > 0"),
        (options.dtype not in DTYPE_CHOICES, "dtype", f"dtype must be one of {', '.join(DTYPE_CHOICES)}"),
        (options.router_dtype not in ROUTER_DTYPES, "router_dtype",
         f"router_dtype must be one of {', '.join(ROUTER_DTYPES)}"),
        (options.router_init not in ROUTER_INITS, "router_init", f"router_init must be one of {', '.join(ROUTER_INITS)}"),
    ]
    # the rules a study's config is held to as well (config.py moe_problems, one check each)
    checks += [(True, field, message) for field, message in moe_problems(
        {kind}, router=options.router, base_expert=options.base_expert, attention=bool(options.attention),
        routing=options.routing, trains=trains, temperature=options.temperature != 1.0,
        router_dtype=options.router_dtype, router_init=options.router_init)]
    n_experts = n_models + (options.base_expert == "routed")
    checks += [
        (options.router != "none" and not 1 <= options.top_k <= n_experts, "top_k",
         f"top_k must be between 1 and the number of experts ({n_experts})"),
        (uses_prompts(options.router, kind) and (prompts is None or len(prompts) != n_models), "prompts",
         f"the router init from prompts needs a list of prompts for each of the {n_models} models"),
        (options.router == "uniform" and options.top_k < n_experts and not trains, "router",
         "a uniform router ties every expert, so top-k would always pick the first k: use top_k = the number "
         "of experts, router training, or router: none"),
    ]
    for failed, field, message in checks:
        if failed:
            raise KnowstackError(message, field=field)
    if kind == "fft":
        from knowstack.combine.moe_fft import check_attention

        check_attention(options.attention)


def _routers(kind: str, base: FullModel, options: MoeOptions, prompts: Sequence[Sequence[str]] | None,
             tokenizer: Any, n_models: int) -> dict[int, Router] | None:
    if options.router == "none":
        return None
    n_layers = int(base.config["num_hidden_layers"])
    layers = list(range(n_layers)) if options.layers is None else sorted(set(options.layers))
    base_index = 0 if options.base_expert == "routed" else None
    if options.router == "cheap-embed":
        from knowstack.combine.routers import cheap_embed_routers

        return cheap_embed_routers(base.reader.read("model.embed_tokens.weight"), tokenizer, prompts or [], layers,
                                   base_index)
    if not uses_prompts(options.router, kind):
        return data_free_routers(options.router, layers, n_models + (base_index is not None),
                                 int(base.config["hidden_size"]), init_range=float(base.config.get("initializer_range", 0.02)),
                                 seed=options.seed, base_index=base_index)
    from knowstack.modelio import load_model

    model = load_model(base.path, dtype="float32")
    try:
        if options.router == "hidden":
            from knowstack.combine.routers import hidden_routers

            return hidden_routers(model, tokenizer, prompts or [], layers, base_index)
        if options.router == "moetify":  # moetify runs each positive-token sequence whole, however long
            means = mean_router_inputs(model, tokenizer, prompts or [], layers, "residual", max_length=2**31)
        else:
            means = mean_router_inputs(model, tokenizer, prompts or [], layers, "mlp" if kind == "fft" else "attention")
    finally:
        del model
        gc.collect()
    return prompt_routers(means, base_index)


def _attention_routers(base: FullModel, options: MoeOptions, routers: dict[int, Router] | None,
                       n_models: int) -> dict[tuple[int, str], Router] | None:
    """A router per (mixed layer, attention projection), made as that layer's MLP router is: from
    prompts, the same rows (moetify uses a layer's hidden states for all its modules' routers); random,
    draws of their own, seeded by (seed, layer, projection). Each reads its projection's input."""
    if routers is None or not options.attention:
        return None
    base_index = 0 if options.base_expert == "routed" else None
    init_range = float(base.config.get("initializer_range", 0.02))
    result: dict[tuple[int, str], Router] = {}
    for name in options.attention:
        for layer, router in routers.items():
            in_features = _projection_inputs(base, layer, name)
            if not uses_prompts(options.router, "fft"):
                result[layer, name] = data_free_routers(
                    options.router, [layer], n_models + (base_index is not None), in_features, init_range=init_range,
                    seed=options.seed, base_index=base_index, site=name)[layer]
            elif in_features == router.weight.shape[1]:
                result[layer, name] = router
            else:
                raise KnowstackError(f"{name} reads {in_features} features, not the hidden size, so its router "
                                     "cannot start from hidden-state rows: use another router init", field="attention")
    return result


def _projection_inputs(base: FullModel, layer: int, projection: str) -> int:
    """The input size of the base's attention projection (o_proj's is heads x head_dim)."""
    name = f"model.layers.{layer}.self_attn.{projection}.weight"
    if name not in base.reader.specs:
        raise KnowstackError(f"the base has no {name} to mix", path=base.path, field="attention")
    return base.reader.specs[name].shape[1]


def _fft_layout(base: FullModel, n_models: int, options: MoeOptions) -> FftMoeLayout:
    """The FFT-MoE's class and tensors, from the base's config and the options (or the error why none fits)."""
    from knowstack.combine.moe_fft import choose_layout

    return choose_layout(base.config, n_models, layers=options.layers, base_expert=options.base_expert,
                         router_free=options.router == "none", router_bias=options.router == "base-biased",
                         attention=options.attention)


def _build(kind: str, tmp: Path, base: FullModel, inputs: list, options: MoeOptions,
           routers: dict[int, Router] | None, max_shard_bytes: int,
           attention_routers: dict[tuple[int, str], Router] | None = None,
           layout: FftMoeLayout | None = None) -> dict[str, Any]:
    common = {"kind": kind, "base": str(base.path), "models": [str(m.path) for m in inputs],
              "options": _recorded_options(options)}
    cast = output_dtype(options.dtype)
    if kind == "fft":
        from knowstack.combine.moe_fft import write_fft_moe

        layout = layout or _fft_layout(base, len(inputs), options)
        counts = write_fft_moe(tmp, base, inputs, layout, top_k=options.top_k, shared=options.shared, routers=routers,
                               attention_routers=attention_routers, max_shard_bytes=max_shard_bytes, dtype=cast)
        return {**common, "architecture": layout.architecture, "experts": layout.n_routed,
                "layers": list(layout.layers), "parameters": counts, "dtype": dtype_name(cast or base.weights_dtype())}
    from knowstack.combine.moe_lora import write_lora_moe

    config = write_lora_moe(tmp, base, inputs, top_k=options.top_k, layers=options.layers,
                            base_expert=options.base_expert == "routed", router=options.router, routers=routers,
                            routing=options.effective_routing(),
                            router_score={"arrow": "arrow", "gates": "phatgoose"}.get(options.router, "linear"),
                            temperature=options.temperature, dtype=cast,
                            gating="sigmoid" if options.router == "moetify" else "softmax",
                            router_dtype=output_dtype(options.router_dtype))
    return {**common, "architecture": "lora-moe", "experts": config["num_experts"], "layers": config["layers"],
            "parameters": _lora_parameters(tmp, base, config), **({"dtype": options.dtype} if cast else {})}


def _recorded_options(options: MoeOptions) -> dict[str, Any]:
    """The options moe.json records; routing, temperature, dtype, router_dtype and router_init (added later) only
    where they are set, so that a mixture made without them records what it always did."""
    recorded = asdict(options)
    for later in ("router_dtype", "router_init"):
        if recorded[later] == getattr(_DECLARED, later):
            del recorded[later]
    if recorded["routing"] is None:
        del recorded["routing"]
    if recorded["dtype"] == "auto":
        del recorded["dtype"]
    if options.router != "arrow":
        del recorded["temperature"]
    return recorded


def _lora_parameters(tmp: Path, base: FullModel, config: dict) -> dict[str, int]:
    from knowstack.combine.moe_lora import parameter_counts
    from knowstack.modeling.lora_moe import WEIGHTS_FILE
    from knowstack.modeling.streaming import SafetensorsReader

    shapes = {name: spec.shape for name, spec in SafetensorsReader([tmp / WEIGHTS_FILE]).specs.items()}
    base_parameters = sum(math.prod(spec.shape) for spec in base.specs.values())
    return parameter_counts(config, base_parameters, shapes)
