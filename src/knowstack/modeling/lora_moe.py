"""LoRA-MoE: each contributed LoRA adapter is an expert on every module it targets; a router per
decoder layer picks the top-k adapters per token, and each targeted module adds their weighted deltas:

    y = W x + sum_{e in top-k(x)} w_e(x) * scale_e * B_e A_e x

The base stays as it is. By default (`routing: layer`) the routing is decided once per layer from the
layer's attention input (what self_attn reads: input_layernorm's output, or OLMo-2's un-normed residual
stream) and used by all its targeted modules; with
`routing: module` (moetify's per-module routers, and Arrow's) every targeted module has a router of its
own that reads the module's own input. Softmax, top-k and renormalisation over the k are Mixtral's, so
with one adapter and k=1 this is exactly base + adapter. A routed base expert is a "null" adapter (no
delta): a token that routes to it keeps more of the base.

With `gating: sigmoid` (moetify's LoRA-MoE, RhuiDih/moetify `models/lora_model.py` `MixtureOfLinear`) each chosen
expert's weight is the sigmoid of its own logit, with no normalisation over the k: the weights need not sum to
one, and an expert with logit 0 adds half its delta.

A router's scores are `weight @ x (+ bias)` (a linear router), or with `router_score: arrow` (Arrow,
Ostapenko et al. 2024, PEFT's ArrowConfig) |weight @ x| / temperature, each row an expert's prototype:
the softmax over the k largest scores is then PEFT's Arrow coefficients; or with `router_score:
phatgoose` (PHATGOOSE) standardize(x) @ weight / sqrt(d), each row a contributor's standardized gate.

Saved as a directory knowstack loads onto the base (`load_model(base, adapter=DIR)` or
`apply_lora_moe`):
    lora_moe.json           what was mixed and how (format, experts, top_k, layers, per-module layout)
    lora_moe.safetensors    per module: `<module>.lora_A` (sum of ranks x in, the experts' A stacked)
                            and `<module>.lora_B` (out x sum of ranks, each expert's scale folded in);
                            per mixed layer: `routers.<layer>.weight` (+ `.bias`); with per-module
                            routing, per module: `routers.<module>.weight` (+ `.bias`); float32, or the
                            config's `router_dtype` (moetify's float16), run in float32 on the stored values

Compute is dense over the stacked ranks (one x @ A^T and one @ B^T per module, the gates zero for
experts a token did not choose), which is exact and, with LoRA ranks of a few dozen in total, cheaper
than gathering tokens per expert.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from knowstack.atomic import honour_umask
from knowstack.errors import KnowstackError
from knowstack.modeling.routing import Router, decoder_layers, on_attention_input

CONFIG_FILE = "lora_moe.json"
WEIGHTS_FILE = "lora_moe.safetensors"
FORMAT = "knowstack-lora-moe"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_lora_moe_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / CONFIG_FILE).is_file()


def layer_of(module: str) -> int | None:
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


class ArrowScores(nn.Module):
    """Arrow's routing scores: |prototypes @ x| / temperature (sign-agnostic: a singular vector's sign
    is arbitrary). Its output is what top-k and the softmax read, so the expert loads see Arrow's choice."""

    def __init__(self, in_features: int, n_experts: int, temperature: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, in_features))
        self.bias = None
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight).abs() / self.temperature


class PhatgooseScores(nn.Module):
    """PHATGOOSE's routing scores (as microsoft/mttl's PhatgooseSelector): standardize(x) . row / sqrt(d), the
    rows the contributors' standardized gate vectors, standardize = subtract the mean over the d features and
    divide by their standard deviation (a LayerNorm without affine, eps 1e-5)."""

    def __init__(self, in_features: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, in_features))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        standardized = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5)
        return (F.linear(standardized, self.weight.float()) / x.shape[-1] ** 0.5).to(x.dtype)


ROUTER_SCORES = ("linear", "arrow", "phatgoose")
GATINGS = ("softmax", "sigmoid")  # the weights of the top-k experts: Mixtral's softmax over the k, or moetify's sigmoid


def router_module(in_features: int, n_experts: int, *, bias: bool, score: str = "linear",
                  temperature: float = 1.0) -> nn.Module:
    """The module that turns a router's input into its scores: a Linear, Arrow's |W x| / T, or PHATGOOSE's."""
    if score not in ROUTER_SCORES:
        raise KnowstackError(f"unknown router_score {score!r} (knowstack knows {', '.join(ROUTER_SCORES)})",
                             field="router_score")
    if score == "arrow":
        return ArrowScores(in_features, n_experts, temperature)
    if score == "phatgoose":
        return PhatgooseScores(in_features, n_experts)
    return nn.Linear(in_features, n_experts, bias=bias)


class LayerRouting(nn.Module):
    """One router's routing: the gates of every expert for every token of the current forward pass,
    set by a hook on the layer's attention input and read by the layer's LoraMoeLinear modules (layer
    routing), or set by its own LoraMoeLinear from the module's input (module routing)."""

    ATTRIBUTE = "lora_moe_routing"

    def __init__(self, hidden: int, n_experts: int, top_k: int, *, routed: bool, bias: bool, score: str = "linear",
                 temperature: float = 1.0, gating: str = "softmax"):
        super().__init__()
        if gating not in GATINGS:
            raise KnowstackError(f"unknown gating {gating!r} (knowstack knows {', '.join(GATINGS)})", field="gating")
        self.n_experts, self.top_k, self.gating = n_experts, top_k, gating
        self.router = router_module(hidden, n_experts, bias=bias, score=score, temperature=temperature) if routed else None
        self._gates: torch.Tensor | None = None
        self._by_layout: dict[str, torch.Tensor] = {}

    def route(self, normed: torch.Tensor) -> None:
        if self.router is None:
            gates = torch.full((*normed.shape[:-1], self.n_experts), 1.0 / self.n_experts, dtype=normed.dtype,
                               device=normed.device)
        else:
            # The softmax over the k largest logits is the full softmax renormalised over those k (Mixtral's
            # weights), in fewer operations: this runs once per layer and generated token.
            # The router keeps its own dtype (float32, as trained) on a bfloat16/float16 base; one stored in float16
            # (router_dtype, moetify's file) runs in float32 on the stored values, as PEFT >= 0.12 loads moetify's.
            top, chosen = torch.topk(self.router(normed.to(self.router.weight.dtype)), self.top_k, dim=-1)
            weights = (torch.sigmoid(top.float()) if self.gating == "sigmoid" else F.softmax(top.float(), dim=-1))
            weights = weights.to(normed.dtype)
            gates = torch.zeros(*normed.shape[:-1], self.n_experts, dtype=normed.dtype, device=normed.device)
            gates = gates.scatter(-1, chosen, weights)
        self._gates, self._by_layout = gates, {}

    def slot_gates(self, layout: str, slot_experts: torch.Tensor) -> torch.Tensor:
        """The gates per rank slot (tokens x sum of ranks), computed once per layout and forward pass."""
        if self._gates is None:
            raise RuntimeError("LoRA-MoE module called before its layer's routing was computed")
        if layout not in self._by_layout:
            self._by_layout[layout] = self._gates.index_select(-1, slot_experts)
        return self._by_layout[layout]


class LoraMoeLinear(nn.Module):
    """A base Linear plus the gated deltas of its experts' LoRA pairs, stacked along the rank."""

    def __init__(self, base_layer: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 slot_experts: torch.Tensor, routing: LayerRouting, *, own_routing: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(lora_a, requires_grad=False)
        self.lora_B = nn.Parameter(lora_b, requires_grad=False)
        self.register_buffer("slot_experts", slot_experts, persistent=False)
        self.layout = ",".join(map(str, slot_experts.tolist()))
        # A layer's routing is registered on the layer (a list here, so it is not registered twice); a
        # module's own routing (per-module routing) is this module's submodule.
        self.own_routing = routing if own_routing else None
        self._routing = [routing]

    @property
    def weight(self) -> torch.Tensor:  # callers that inspect a Linear's weight see the base's
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_routing is not None:
            self.own_routing.route(x)
        gates = self._routing[0].slot_gates(self.layout, self.slot_experts)
        hidden = F.linear(x, self.lora_A)
        if torch.is_grad_enabled():  # router training: out of place, autograd needs the operands
            return self.base_layer(x) + F.linear(hidden * gates, self.lora_B)
        # Inference (generation): in place, so each module adds no more tensor allocations than needed.
        out = self.base_layer(x)
        hidden.mul_(gates)
        return out.view(-1, out.shape[-1]).addmm_(hidden.view(-1, hidden.shape[-1]), self.lora_B.T).view(out.shape)


def apply_lora_moe(model: nn.Module, path: str | Path) -> nn.Module:
    """Installs the LoRA-MoE in `path` onto `model` (its base), in place; returns the model."""
    path = Path(path)
    config = _read_config(path)
    layers = decoder_layers(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    routed = config["router"] != "none"
    per_module = config.get("routing", "layer") == "module"

    def new_routing(in_features: int) -> LayerRouting:
        return LayerRouting(in_features, config["num_experts"], config["top_k"], routed=routed,
                            bias=config.get("router_bias", False), score=config.get("router_score", "linear"),
                            temperature=config.get("temperature", 1.0),
                            gating=config.get("gating", "softmax")).to(device)

    routings: dict[int, LayerRouting] = {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as weights:
        for layer in [] if per_module else config["layers"]:
            routing = new_routing(config["hidden_size"])
            if routed:
                _load_router(routing, weights, layer, path)
            layers[layer].add_module(LayerRouting.ATTRIBUTE, routing)
            on_attention_input(layers[layer], routing.route)
            routings[layer] = routing
        for module, layout in config["modules"].items():
            slots = torch.tensor([e for e, r in zip(layout["experts"], layout["ranks"], strict=True)
                                  for _ in range(r)], device=device)
            lora_a = weights.get_tensor(f"{module}.lora_A").to(device=device, dtype=dtype)
            lora_b = weights.get_tensor(f"{module}.lora_B").to(device=device, dtype=dtype)
            parent, child, linear = _linear(model, module)
            if per_module:
                routing = new_routing(linear.in_features)
                if routed:
                    _load_router(routing, weights, module, path)
            else:
                routing = routings[layer_of(module)]
            setattr(parent, child, LoraMoeLinear(linear, lora_a, lora_b, slots, routing, own_routing=per_module))
    return model


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise KnowstackError(f"cannot read the LoRA-MoE config: {err}", path=path / CONFIG_FILE) from None
    if config.get("format") != FORMAT:
        raise KnowstackError(f"not a {FORMAT} config", path=path / CONFIG_FILE)
    return config


def _load_router(routing: LayerRouting, weights, key: int | str, path: Path) -> None:
    """The router of a layer (key: its index) or of a module (key: its name)."""
    assert routing.router is not None
    with torch.no_grad():
        routing.router.weight.copy_(weights.get_tensor(f"routers.{key}.weight"))
        if routing.router.bias is not None:
            routing.router.bias.copy_(weights.get_tensor(f"routers.{key}.bias"))


def _linear(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Linear]:
    """The parent module, attribute name and Linear layer of the base's module `name`."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise KnowstackError(f"the base has no module '{name}': it is not the base of this LoRA-MoE") from None
    current = getattr(parent, child, None)
    if not isinstance(current, nn.Linear):
        raise KnowstackError(f"'{name}' of the base is a {type(current).__name__}, not a Linear layer")
    return parent, child, current


def lora_moe_routers(model: nn.Module) -> dict[int | str, Router]:
    """The current routers of a model with a LoRA-MoE applied (e.g. after router training): by layer
    index (layer routing) or by module name (module routing)."""
    routings: dict[int | str, LayerRouting] = {}
    for index, layer in enumerate(decoder_layers(model)):
        routing = getattr(layer, LayerRouting.ATTRIBUTE, None)
        if routing is not None:
            routings[index] = routing
    for name, module in model.named_modules():
        if isinstance(module, LoraMoeLinear) and module.own_routing is not None:
            routings[name] = module.own_routing
    routers: dict[int | str, Router] = {}
    for key, routing in routings.items():
        if routing.router is not None:
            bias = routing.router.bias
            routers[key] = Router(routing.router.weight.detach().float().cpu(),
                                  None if bias is None else bias.detach().float().cpu())
    return routers


def save_routers(path: Path, routers: dict[int | str, Router]) -> None:
    """Replaces the router tensors of the LoRA-MoE dir `path` (the file is small: rewritten whole)."""
    weights = path / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    for layer, router in routers.items():  # in the dtype the mixture stores its routers in (router_dtype)
        for part, tensor in (("weight", router.weight), ("bias", router.bias)):
            name = f"routers.{layer}.{part}"
            if tensor is not None:
                tensors[name] = tensor.to(tensors[name].dtype if name in tensors else torch.float32).contiguous()
    tmp = weights.with_name(f".{WEIGHTS_FILE}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    honour_umask(tmp)
    tmp.replace(weights)
