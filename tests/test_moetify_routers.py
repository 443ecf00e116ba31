"""moetify's LoRA-MoE routers, exactly: `router_init: moetify` (the draws of moetify's blend.py) and `router_dtype`
(the precision blend.py saves its routers in), against an oracle written here from reading RhuiDih/moetify's
blend.py and models/lora_model.py and PEFT's LoraLayer.update_layer: the same torch calls, in the same order, on the
global generator, on a tiny Llama 3.1 of tests/families.py.

The oracle: set_seed(1399) (blend.py L58); the base loaded in float32 (L62; from_pretrained's default before
transformers 5) and run once on a dummy batch (L56, L64); PEFT's injection walks the base's modules in order and
replaces each targeted Linear by moetify's MixtureOfLinear, which builds its router `nn.Linear(in, E)` (lora_model.py
L91-95) and then, per expert, PEFT's update_layer builds `nn.Linear(in, r)`, `nn.Linear(r, out)` and re-draws A
with kaiming_uniform_ (B zeroed); then blend.py walks the state dict and draws every router with
normal_(0, initializer_range) (L109-120); it saves the model in float16 (L242)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from families import build_family
from safetensors.torch import load_file
from test_moe import make_adapter
from test_moetify import logits, moetify_lora_reference, routers_of
from torch import nn

from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.errors import KnowstackError
from knowstack.modeling.lora_moe import LoraMoeLinear
from knowstack.modelio import load_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 4  # test_moe.make_adapter's


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family("llama3.1", tmp_path_factory.mktemp("moetify-llama") / "base")


@pytest.fixture(scope="module")
def adapters(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("moetify-llama-adapters")
    return [make_adapter(llama, root / f"a{i}", seed=i) for i in range(3)]


def blend_routers(base_dir: Path, n_experts: int, rank: int) -> dict[str, torch.Tensor]:
    """The routers moetify's blend.py draws on a machine without CUDA (the oracle; see the module's docstring)."""
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(1399)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model(torch.ones((1, 8)).int())
    routers: dict[str, nn.Linear] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            routers[name] = nn.Linear(module.in_features, n_experts, bias=False)
            for _ in range(n_experts):
                lora_a = nn.Linear(module.in_features, rank, bias=False)
                lora_b = nn.Linear(rank, module.out_features, bias=False)
                nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                nn.init.zeros_(lora_b.weight)
    for router in routers.values():
        nn.init.normal_(router.weight, mean=0, std=model.config.initializer_range)
    return {name: router.weight.detach() for name, router in routers.items()}


def test_peft_builds_a_lora_pair_with_the_draws_the_oracle_makes() -> None:
    """PEFT's own LoRA layer (the installed PEFT's update_layer) consumes the global generator as the oracle's three
    draws per expert do, and its A is the last of them."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = nn.Linear(24, 40, bias=False)
    torch.manual_seed(5)
    layer = LoraLinear(base, "expert", LoraConfig(r=RANK, lora_alpha=8), r=RANK, lora_alpha=8)
    after = torch.rand(4)
    torch.manual_seed(5)
    lora_a = nn.Linear(24, RANK, bias=False)
    nn.Linear(RANK, 40, bias=False)
    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    assert torch.equal(layer.lora_A["expert"].weight, lora_a.weight) and torch.equal(torch.rand(4), after)


def test_moetify_router_init_draws_blend_pys_routers_bit_for_bit(llama: Path, adapters: list[Path],
                                                                  tmp_path: Path) -> None:
    oracle = blend_routers(llama, len(adapters), RANK)
    out = tmp_path / "moe"
    mix_models(llama, adapters, out, options=MoeOptions(router="moetify", router_init="moetify"))
    routers = routers_of(out)
    assert set(routers) == set(oracle)  # every targeted module of every layer
    for name, weight in routers.items():
        assert weight.dtype == torch.float32 and torch.equal(weight, oracle[name]), name
    # the default draws each router from (seed, module): the same distribution, other values
    mix_models(llama, adapters, tmp_path / "per-module", options=MoeOptions(router="moetify"))
    assert not any(torch.equal(w, oracle[n]) for n, w in routers_of(tmp_path / "per-module").items())


def test_router_dtype_float16_stores_blend_pys_rounding_and_runs_it_in_float32(llama: Path, adapters: list[Path],
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "moe"
    record = mix_models(llama, adapters, out, options=MoeOptions(router="moetify", router_init="moetify",
                                                                 router_dtype="float16"))
    assert record["options"]["router_dtype"] == "float16" and record["options"]["router_init"] == "moetify"
    assert json.loads((out / "lora_moe.json").read_text())["router_dtype"] == "float16"
    stored = routers_of(out)
    oracle = blend_routers(llama, len(adapters), RANK)
    for name, weight in stored.items():  # moe_model.to(torch.float16) of the float32 draws
        assert weight.dtype == torch.float16 and torch.equal(weight, oracle[name].to(torch.float16)), name
    # loaded, each router holds the float16 values in float32 (as PEFT >= 0.12 loads moetify's file): its logits and
    # sigmoid gates are the float32 ones of the rounded weights, not those of the unrounded draws
    moe = load_model(llama, out, dtype="float32")
    gen = torch.Generator().manual_seed(3)
    for name, module in moe.named_modules():
        if isinstance(module, LoraMoeLinear):
            x = torch.randn(5, module.base_layer.in_features, generator=gen)
            router = module.own_routing.router
            assert router.weight.dtype == torch.float32 and torch.equal(router.weight, stored[name].float())
            by_hand = F.linear(x, stored[name].float())
            assert torch.equal(router(x), by_hand) and not torch.equal(by_hand, F.linear(x, oracle[name]))
            top, chosen = torch.topk(by_hand, 3, dim=-1)
            module.own_routing.route(x)
            gates = module.own_routing.slot_gates("all", torch.arange(3))
            assert torch.equal(gates, torch.zeros(5, 3).scatter(-1, chosen, torch.sigmoid(top)))
    # the whole mixture: moetify's MixtureOfLinear with the stored (rounded) routers
    reference = moetify_lora_reference(llama, adapters, {n: w.float() for n, w in stored.items()})
    torch.testing.assert_close(logits(moe), logits(reference), atol=1e-6, rtol=1e-6)
    # a bfloat16 base keeps float32 routers
    on_bf16 = load_model(llama, out, dtype="bfloat16")
    assert {m.own_routing.router.weight.dtype for m in on_bf16.modules() if isinstance(m, LoraMoeLinear)} == {
        torch.float32}
    assert not any(name.endswith(".bias") for name in load_file(out / "lora_moe.safetensors"))


def test_moetify_router_init_needs_one_rank_and_moetifys_router(llama: Path, adapters: list[Path],
                                                               tmp_path: Path) -> None:
    with pytest.raises(KnowstackError, match="router: moetify") as info:
        mix_models(llama, adapters, tmp_path / "a", options=MoeOptions(router="random", routing="module",
                                                                       router_init="moetify"))
    assert info.value.field == "router_init"
    with pytest.raises(KnowstackError, match="router_dtype must be one of") as info:
        mix_models(llama, adapters, tmp_path / "b", options=MoeOptions(router="moetify", router_dtype="float64"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # moetify mixes adapters of one --lora_rank
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(llama), LoraConfig(r=2, target_modules=list(TARGETS))).save_pretrained(
        tmp_path / "r2")
    with pytest.raises(KnowstackError, match=r"one rank .* ranks \[2, 4\]") as info:
        mix_models(llama, [*adapters[:2], tmp_path / "r2"], tmp_path / "c",
                   options=MoeOptions(router="moetify", router_init="moetify"))
    assert info.value.field == "router_init" and not (tmp_path / "c").exists()


def test_the_settings_key_the_lora_moe_only_where_set(tmp_path: Path, tiny_model_dir: Path) -> None:
    from test_moe import study_config

    from knowstack.config import parse_config
    from knowstack.study.plan import build_plan

    def moe_steps(moe: dict) -> dict:
        raw = study_config(tmp_path, tiny_model_dir, {"experts": ["fft", "lora"], "router": "moetify", **moe})
        return {s.label: s for s in build_plan(parse_config(raw)).ordered() if s.kind == "moe"}

    default = moe_steps({})
    assert {"router_dtype", "router_init"}.isdisjoint(default["lora-moetify"].params["options"])
    # the defaults given explicitly are the same steps: a study that never named them keeps its keys
    explicit = moe_steps({"router_dtype": "float32", "router_init": "per-module"})
    assert {label: s.key for label, s in explicit.items()} == {label: s.key for label, s in default.items()}
    paper = moe_steps({"router_dtype": "float16", "router_init": "moetify"})
    options = paper["lora-moetify"].params["options"]
    assert (options["router_dtype"], options["router_init"]) == ("float16", "moetify")
    assert paper["lora-moetify"].key != default["lora-moetify"].key
    assert paper["fft-moetify"].key == default["fft-moetify"].key  # LoRA-MoE settings: the FFT-MoE is as it was
    for moe, field in [({"experts": ["fft"], "router_dtype": "float16"}, "router_dtype"),
                       ({"experts": ["lora"], "router": "random", "router_init": "moetify"}, "router_init"),
                       ({"experts": ["lora"], "router_init": "moetify", "base_expert": "routed"}, "base_expert")]:
        with pytest.raises(KnowstackError, match=field):
            parse_config(study_config(tmp_path, tiny_model_dir, {"router": "moetify", **moe}))


def test_paper_config_draws_and_stores_its_lora_moe_routers_as_moetify() -> None:
    from test_config import CONFIGS

    from knowstack.config import load_config

    moe = load_config(CONFIGS / "paper/llama3-8b-trace.yaml").methods.moe
    assert (moe.router, moe.router_init, moe.router_dtype) == ("moetify", "moetify", "float16")


def test_cli_mix_router_init_and_dtype(llama: Path, adapters: list[Path], tmp_path: Path) -> None:
    from knowstack.cli import main

    assert main(["mix", "--base", str(llama), "--models", *map(str, adapters), "--router", "moetify",
                 "--router-init", "moetify", "--router-dtype", "float16", "--out", str(tmp_path / "moe")]) == 0
    oracle = blend_routers(llama, len(adapters), RANK)
    assert all(torch.equal(w, oracle[n].half()) for n, w in routers_of(tmp_path / "moe").items())
