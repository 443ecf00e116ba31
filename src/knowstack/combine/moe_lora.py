"""Building a LoRA-MoE from LoRA adapters of one base: each adapter is an expert on every module it targets,
with a router per mixed decoder layer. The directory it writes, and how it is loaded onto the base and run,
is modeling/lora_moe.py's format (`load_model(base, adapter=DIR)` or `apply_lora_moe`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from knowstack.atomic import atomic_write_json
from knowstack.combine.inputs import FullModel, LoraAdapter
from knowstack.errors import KnowstackError
from knowstack.modeling.lora_moe import CONFIG_FILE, FORMAT, WEIGHTS_FILE, layer_of
from knowstack.modeling.routing import Router
from knowstack.modelio import copy_model_files


def write_lora_moe(out: Path, base: FullModel, adapters: Sequence[LoraAdapter], *, top_k: int,
                   layers: Sequence[int] | None, base_expert: bool, router: str,
                   routers: dict[int, Router] | dict[str, Router] | None, routing: str = "layer",
                   router_score: str = "linear", temperature: float = 1.0, dtype: torch.dtype | None = None,
                   gating: str = "softmax", router_dtype: torch.dtype = torch.float32) -> dict:
    """Writes lora_moe.json + lora_moe.safetensors into the dir `out`, with the base's tokenizer files, chat
    template and generation_config (what a user chats with it by); returns the config written.

    Expert order: the null base expert first when `base_expert`, then the adapters in order.
    routers: by mixed layer (routing "layer") or by module name (routing "module"); router_score
    "arrow" (with its temperature) for Arrow's |W x| / T scores; gating: the chosen experts' weights, a softmax over
    the k or moetify's sigmoid of each (modeling/lora_moe.py). dtype: the experts' A and B (None: each adapter's
    own); router_dtype: the routers' (float32, as they are trained; float16 as moetify saves them), which the
    loader runs in float32 on the stored values whatever it is."""
    offset = 1 if base_expert else 0
    n_experts = len(adapters) + offset
    modules = module_layout(adapters, layers)
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for module, owners in modules.items():
        a_parts, b_parts, ranks = [], [], []
        for index in owners:
            adapter = adapters[index]
            a_name, b_name, scale = adapter.modules[f"{module}.weight"]
            a, b = adapter.reader.read(a_name), adapter.reader.read(b_name)
            a_parts.append(a if dtype is None else a.to(dtype))
            b_parts.append((b.float() * scale).to(b.dtype if dtype is None else dtype))
            ranks.append(a.shape[0])
        tensors[f"{module}.lora_A"] = torch.cat(a_parts, dim=0).contiguous()
        tensors[f"{module}.lora_B"] = torch.cat(b_parts, dim=1).contiguous()
        layout[module] = {"experts": [index + offset for index in owners], "ranks": ranks}
    mixed = sorted({layer_of(module) for module in modules})
    keys = list(modules) if routing == "module" else mixed
    for key in keys if routers is not None else []:
        tensors[f"routers.{key}.weight"] = routers[key].weight.to(router_dtype).contiguous()
        if routers[key].bias is not None:
            tensors[f"routers.{key}.bias"] = routers[key].bias.to(router_dtype).contiguous()
    config = {
        "format": FORMAT, "version": 1, "base_model": str(base.path),
        "experts": (["base"] if base_expert else []) + [str(a.path) for a in adapters],
        "num_experts": n_experts, "top_k": top_k, "router": router, "router_bias": any(
            r.bias is not None for r in (routers or {}).values()),
        "hidden_size": base.config.get("hidden_size"), "layers": mixed, "modules": layout,
    }
    # written only where they differ from the defaults, so a LoRA-MoE made without them is what it was
    if routing != "layer":
        config["routing"] = routing
    if router_score != "linear":
        config["router_score"] = router_score
    if router_score == "arrow":
        config["temperature"] = temperature
    if gating != "softmax":
        config["gating"] = gating
    if router_dtype != torch.float32:
        config["router_dtype"] = str(router_dtype).removeprefix("torch.")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_FILE, config)
    copy_model_files(base.path, out)
    return config


def module_layout(adapters: Sequence[LoraAdapter], layers: Sequence[int] | None) -> dict[str, list[int]]:
    """Module name -> indices of the adapters that target it, for the modules of the mixed layers."""
    owners: dict[str, list[int]] = {}
    for index, adapter in enumerate(adapters):
        if adapter.config.get("fan_in_fan_out"):
            raise KnowstackError("LoRA-MoE needs adapters on Linear layers (fan_in_fan_out is set)",
                                 path=adapter.path)
        for weight in adapter.modules:
            module = weight.removesuffix(".weight")
            layer = layer_of(module)
            if layer is None:
                raise KnowstackError(f"adapter targets '{module}', outside the decoder layers: LoRA-MoE routes "
                                     "per layer", path=adapter.path)
            if layers is None or layer in layers:
                owners.setdefault(module, []).append(index)
    if not owners:
        raise KnowstackError("no adapter targets a module of the layers to mix", field="layers")
    return dict(sorted(owners.items(), key=lambda item: (layer_of(item[0]), item[0])))


def parameter_counts(config: dict, base_parameters: int, tensors: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Total parameters (base + experts + routers) and those active per token (base, routers, and the
    k chosen experts' ranks of each module)."""
    routers = sum(math.prod(shape) for name, shape in tensors.items() if name.startswith("routers."))
    experts = sum(math.prod(shape) for name, shape in tensors.items() if not name.startswith("routers."))
    active_share = 1.0 if config["router"] == "none" else min(1.0, config["top_k"] / config["num_experts"])
    return {"total": base_parameters + experts + routers, "active": base_parameters + routers + round(experts * active_share),
            "experts": experts, "routers": routers, "shared": base_parameters}



def module_routers(base: FullModel, adapters: Sequence[LoraAdapter], options, prompts: Sequence[Sequence[str]] | None,
                   tokenizer) -> dict[str, Router] | None:
    """Per-module routers (routing "module"), by module name, each reading its module's input: Arrow's
    prototypes, random / uniform / base-biased draws of their own (seeded by the module's name; moetify's are random),
    or from prompts the normalised mean of the module's input (options: combine/moe.py's MoeOptions)."""
    from knowstack.combine.routers import arrow_prototype, arrow_routers, data_free_routers, prompt_routers

    if options.router == "none":
        return None
    modules = module_layout(adapters, options.layers)
    in_features = {module: adapters[owners[0]].reader.specs[adapters[owners[0]].modules[f"{module}.weight"][0]].shape[1]
                   for module, owners in modules.items()}
    base_index = 0 if options.base_expert == "routed" else None
    offset = 1 if base_index is not None else 0
    n_experts = len(adapters) + offset
    if options.router == "arrow":
        prototypes = {}
        for module, owners in modules.items():
            prototypes[module] = {}
            for index in owners:
                a_name, b_name, _ = adapters[index].modules[f"{module}.weight"]
                prototypes[module][index + offset] = arrow_prototype(adapters[index].reader.read(a_name),
                                                                     adapters[index].reader.read(b_name))
        return arrow_routers(prototypes, in_features, n_experts)
    if options.router == "gates":
        from knowstack.combine.routers import gate_routers

        return gate_routers([_contributed_gates(adapter) for adapter in adapters], modules, in_features, offset)
    if options.router == "prompts":
        from knowstack.combine.routers import mean_module_inputs
        from knowstack.modelio import load_model

        model = load_model(base.path, dtype="float32")
        try:
            means = mean_module_inputs(model, tokenizer, prompts or [], list(modules))
        finally:
            del model
        return {module: router for module, router in prompt_routers(means, base_index).items()}
    init_range = float(base.config.get("initializer_range", 0.02))
    if options.router_init == "moetify":
        return _moetify_draws(base, adapters, modules, n_experts, init_range)
    # moetify's LoRA-MoE draws every module's router from N(0, initializer_range) (blend.py), as `random` does
    kind = "random" if options.router == "moetify" else options.router
    return {module: data_free_routers(kind, [layer_of(module)], n_experts, in_features[module],
                                      init_range=init_range, seed=options.seed, base_index=base_index,
                                      site=module)[layer_of(module)]
            for module in modules}


def _moetify_draws(base: FullModel, adapters: Sequence[LoraAdapter], modules: dict[str, list[int]], n_experts: int,
                   init_range: float) -> dict[str, Router]:
    """The routers of the mixed modules as moetify's blend.py draws them (routers.py moetify_lora_routers): its PEFT
    injection targets every Linear of the base named as a mixed module is (`--modules`, in every layer), in the
    base's module order, each with one LoRA pair per adapter of moetify's one `--lora_rank`."""
    from knowstack.combine.routers import moetify_lora_routers
    from knowstack.modelio import linear_modules

    ranks = {a.reader.specs[a.modules[f"{module}.weight"][0]].shape[0] for module, owners in modules.items()
             for a in (adapters[i] for i in owners)}
    if len(ranks) > 1 or any(len(owners) != len(adapters) for owners in modules.values()):
        raise KnowstackError("router_init: moetify needs adapters of one rank on the same modules (moetify's blend.py "
                             f"mixes them with one --lora_rank); these have ranks {sorted(ranks)}", field="router_init")
    names = {module.rpartition(".")[2] for module in modules}
    targeted = {name: shape for name, shape in linear_modules(base.path).items() if name.rpartition(".")[2] in names}
    drawn = moetify_lora_routers(targeted, n_experts, ranks.pop(), init_range)
    return {module: drawn[module] for module in modules}


def _contributed_gates(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The gate vectors a contributor trained for their adapter (train/gate_training.py), by module."""
    from knowstack.modeling.routing import GATES_FILE

    path = adapter.path / GATES_FILE
    if not path.is_file():
        raise KnowstackError(f"the gates router needs each adapter's {GATES_FILE}: train it with `knowstack gate`",
                             path=adapter.path, field="router")
    from safetensors.torch import load_file

    return load_file(str(path))
