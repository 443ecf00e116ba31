"""`router: moetify`, the paper's MoEs (RhuiDih/moetify), against references written here from moetify's math:

- LoRA-MoE (moetify `blend.py`, `models/lora_model.py` MixtureOfLinear): every targeted Linear has its own router
  (no bias, rows from N(0, initializer_range)); y = W x + sum over the top-k logits l_e of sigmoid(l_e) s_e B_e A_e x,
  k = every expert (`num_experts_per_tok` 0 becomes the number of experts);
- FFT-MoE (moetify `mix.py` positive tokens, `models/moe/sparsify.py`): expert e's router row is the L2-normalised
  sum over e's prompts (each run alone) of the mean over the prompt's tokens of output_hidden_states[layer], the
  residual stream at the layer's input; the router reads the MLP's input, softmax, top-k, renormalised over the k.

The references read the PEFT adapters' and the one-round models' own files, not knowstack's stacked tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkpoints import peft_factors, perturbed
from safetensors.torch import load_file
from test_moe import FAMILIES, IDS, TOKENIZER_AND_CONFIG, make_adapter

from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.config import parse_config
from knowstack.errors import KnowstackError
from knowstack.modeling.lora_moe import save_routers
from knowstack.modeling.routing import Router
from knowstack.modelio import load_model, load_tokenizer

# one prompt longer than the 512 tokens the other prompt routers keep: moetify reads every token
PROMPTS = [family[:3] for family in FAMILIES[:2]] + [[*FAMILIES[2][:2], " ".join(FAMILIES[2]) * 12]]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("moetify-adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("moetify-models")
    return [perturbed(tiny_model_dir, root / f"m{i}", seed=i, scale=0.05, copy=TOKENIZER_AND_CONFIG) for i in range(3)]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# --- LoRA-MoE ------------------------------------------------------------------------------------------
class SigmoidMixture(torch.nn.Module):
    """moetify's MixtureOfLinear: base + sum over the k largest router logits of sigmoid(logit) * scale * B A x."""

    def __init__(self, base: torch.nn.Linear, router: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor, float]],
                 top_k: int):
        super().__init__()
        self.base, self.router, self.experts, self.top_k = base, router, experts, top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        top, chosen = torch.topk(flat @ self.router.T, self.top_k, dim=-1)
        weights = torch.sigmoid(top)
        delta = torch.zeros(flat.shape[0], self.base.out_features)
        for token in range(flat.shape[0]):
            for slot in range(self.top_k):
                a, b, scale = self.experts[int(chosen[token, slot])]
                delta[token] += weights[token, slot] * scale * (b @ (a @ flat[token]))
        return self.base(x) + delta.reshape(*x.shape[:-1], -1)


def moetify_lora_reference(base_dir: Path, adapters: list[Path], routers: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = load_model(base_dir, dtype="float32")
    experts = [peft_factors(path) for path in adapters]
    for module, router in routers.items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        parts = [(a.float(), b.float(), scale) for a, b, scale in (factors[module] for factors in experts)]
        setattr(parent, child, SigmoidMixture(getattr(parent, child), router, parts, top_k=len(adapters)))
    return model


def routers_of(moe_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(moe_dir / "lora_moe.safetensors")
    return {name.removeprefix("routers.").removesuffix(".weight"): t for name, t in tensors.items()
            if name.startswith("routers.")}


def test_lora_moe_is_moetifys_per_module_sigmoid_mixture(tiny_model_dir: Path, adapters: list[Path],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "moe"
    record = mix_models(tiny_model_dir, adapters, out, options=MoeOptions(top_k=2, router="moetify"))
    config = json.loads((out / "lora_moe.json").read_text())
    # moetify's top-k (every expert), gating and per-module routers, whatever top_k the options carried
    assert config["top_k"] == 3 and config["gating"] == "sigmoid" and config["routing"] == "module"
    assert record["options"]["top_k"] == 3
    routers = routers_of(out)
    assert set(routers) == set(config["modules"]) and not any(name.endswith(".bias") for name in
                                                              load_file(out / "lora_moe.safetensors"))
    init_range = json.loads((tiny_model_dir / "config.json").read_text())["initializer_range"]
    base = load_model(tiny_model_dir, dtype="float32")
    for module, weight in routers.items():  # each reads its own module's input
        assert weight.shape == (3, base.get_submodule(module).in_features) and weight.dtype == torch.float32
    drawn = torch.cat([w.flatten() for w in routers.values()])
    assert abs(drawn.std().item() - init_range) < 0.1 * init_range and abs(drawn.mean().item()) < 0.1 * init_range
    moe = load_model(tiny_model_dir, out, dtype="float32")
    reference = moetify_lora_reference(tiny_model_dir, adapters, routers)
    torch.testing.assert_close(logits(moe), logits(reference), atol=1e-6, rtol=1e-6)
    # routers far from their init (sigmoid weights far from 1/2, differing per token and module): still equal
    gen = torch.Generator().manual_seed(7)
    wide = {module: torch.randn(w.shape, generator=gen) * 0.5 for module, w in routers.items()}
    save_routers(out, {module: Router(weight) for module, weight in wide.items()})
    moe = load_model(tiny_model_dir, out, dtype="float32")
    torch.testing.assert_close(logits(moe), logits(moetify_lora_reference(tiny_model_dir, adapters, wide)),
                               atol=1e-6, rtol=1e-6)
    # a softmax over the same logits is another mixture: the reference can tell them apart
    softmax = {**config, "gating": "softmax"}
    (out / "lora_moe.json").write_text(json.dumps(softmax))
    assert not torch.allclose(logits(load_model(tiny_model_dir, out, dtype="float32")),
                              logits(moetify_lora_reference(tiny_model_dir, adapters, wide)), atol=1e-4)


def test_moetify_lora_moe_refuses_layer_routing(tiny_model_dir: Path, adapters: list[Path], tmp_path: Path) -> None:
    with pytest.raises(KnowstackError, match="router per module") as info:
        mix_models(tiny_model_dir, adapters, tmp_path / "moe", options=MoeOptions(router="moetify", routing="layer"))
    assert info.value.field == "routing" and not (tmp_path / "moe").exists()


# --- FFT-MoE -------------------------------------------------------------------------------------------
def positive_token_rows(base_dir: Path, prompts: list[list[str]]) -> torch.Tensor:
    """moetify mix.py's router rows: per expert, the sum over its prompts (each alone) of the mean over tokens of
    hidden_states[:-1] (each layer's input), L2-normalised; (layers, experts, hidden)."""
    model, tokenizer = load_model(base_dir, dtype="float32"), load_tokenizer(base_dir)
    rows = []
    for group in prompts:
        total = None
        for prompt in group:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            with torch.no_grad():
                states = torch.stack(model(ids, output_hidden_states=True).hidden_states[:-1]).mean(dim=-2)[:, 0]
            total = states if total is None else total + states
        rows.append(total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


class SoftmaxTopK(torch.nn.Module):
    """moetify's MoeForward over MLP experts: softmax over the router logits, top-k, renormalised over the k."""

    def __init__(self, router: torch.Tensor, experts: list[torch.nn.Module], top_k: int):
        super().__init__()
        self.router, self.experts, self.top_k = router, experts, top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(F.softmax(flat @ self.router.T, dim=-1), self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for token in range(flat.shape[0]):
            for slot in range(self.top_k):
                out[token] += weights[token, slot] * self.experts[int(chosen[token, slot])](flat[token])
        return out.reshape(x.shape)


def test_fft_moe_routers_are_moetifys_positive_token_rows(tiny_model_dir: Path, models: list[Path],
                                                          tmp_path: Path) -> None:
    out = tmp_path / "moe"
    record = mix_models(tiny_model_dir, models, out, options=MoeOptions(top_k=2, router="moetify"), prompts=PROMPTS)
    assert record["architecture"] == "MixtralForCausalLM" and record["options"]["top_k"] == 2
    tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    expected = positive_token_rows(tiny_model_dir, PROMPTS)
    for layer in range(2):
        torch.testing.assert_close(tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"].float(), expected[layer],
                                   atol=1e-6, rtol=1e-6)
    # the residual stream, not the MLP's input (the `prompts` router's): another row
    other = tmp_path / "prompts"
    mix_models(tiny_model_dir, models, other, options=MoeOptions(top_k=2, router="prompts"), prompts=PROMPTS)
    prompts_gate = {k: v for f in other.glob("*.safetensors") for k, v in load_file(f).items()}
    assert not torch.allclose(prompts_gate["model.layers.1.block_sparse_moe.gate.weight"].float(), expected[1], atol=1e-3)
    # the whole mixture: the base with each layer's MLP replaced by moetify's top-2 of the models' MLPs
    reference = load_model(tiny_model_dir, dtype="float32")
    experts = [load_model(path, dtype="float32") for path in models]
    for layer in range(2):
        mlps = [expert.model.layers[layer].mlp for expert in experts]
        reference.model.layers[layer].mlp = SoftmaxTopK(expected[layer], mlps, top_k=2)
    torch.testing.assert_close(logits(load_model(out, dtype="float32")), logits(reference), atol=1e-6, rtol=1e-6)


def test_fft_moetify_needs_prompts(tiny_model_dir: Path, models: list[Path], tmp_path: Path) -> None:
    with pytest.raises(KnowstackError, match="prompts") as info:
        mix_models(tiny_model_dir, models, tmp_path / "moe", options=MoeOptions(router="moetify"))
    assert info.value.field == "prompts"


# --- in a study ----------------------------------------------------------------------------------------
def test_study_mixes_lora_with_every_expert_and_fft_with_top_k(tmp_path: Path, tiny_model_dir: Path) -> None:
    from test_moe import study_config

    from knowstack.study.plan import build_plan

    raw = study_config(tmp_path, tiny_model_dir, {"experts": ["fft", "lora"], "top_k": 2, "router": "moetify",
                                                   "prompts_per_expert": 5})
    steps = {s.label: s for s in build_plan(parse_config(raw)).ordered() if s.kind == "moe"}
    n_tasks = len(raw["tasks"])
    assert steps["lora-moetify"].params["options"]["top_k"] == n_tasks
    assert steps["fft-moetify"].params["options"]["top_k"] == 2
    assert steps["fft-moetify"].params["options"]["router"] == "moetify"
    with pytest.raises(KnowstackError, match="router per module"):
        parse_config(study_config(tmp_path, tiny_model_dir, {"experts": ["lora"], "router": "moetify", "routing": "layer"}))


def test_paper_config_mixes_with_moetifys_routing() -> None:
    from test_config import CONFIGS

    from knowstack.config import load_config

    moe = load_config(CONFIGS / "paper/llama3-8b-trace.yaml").methods.moe
    assert moe.router == "moetify" and moe.top_k == 2 and moe.prompts_per_expert == 1000 and moe.routing is None
    # docs/paper-config.md's rows of these settings, as of every other: tests/test_paper_config_table.py


def test_cli_mix_router_moetify(tiny_model_dir: Path, adapters: list[Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.cli import main

    # the command line's top-k (default 2) is the FFT-MoE's: moetify's LoRA-MoE mixes every expert
    assert main(["mix", "--base", str(tiny_model_dir), "--models", *map(str, adapters), "--router", "moetify",
                 "--out", str(tmp_path / "moe"), "--json"]) == 0
    config = json.loads((tmp_path / "moe" / "lora_moe.json").read_text())
    assert (config["top_k"], config["gating"], config["router"]) == (3, "sigmoid", "moetify")
    assert json.loads(capsys.readouterr().out)["options"]["top_k"] == 3
