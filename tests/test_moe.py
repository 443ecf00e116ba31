"""MoE mixing: FFT-MoE (stock Mixtral or knowstack's own class) and LoRA-MoE against the models they
are made of, routers from prompts, router training, and the checkpoints in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import perturbed, variant
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.config import parse_config
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modelio import load_model, load_tokenizer
from knowstack.train.router_job import RouterRun
from knowstack.train.router_training import RouterTraining, expert_loads

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
IDS = torch.tensor([[3, 17, 42, 8, 99, 5, 61], [12, 7, 7, 250, 31, 2, 140]])
# Three families of text, one per expert, for the router init from prompts.
FAMILIES = [
    [f"def f{i}(a, b):\n    return a + b * {i}" for i in range(4)],
    [f"The official currency of Japan is the yen. France is in Europe {i}." for i in range(4)],
    [f"Question: what is {i} plus 4? Answer: {i + 4}. The answer is: {i + 4}" for i in range(4)],
]


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


TOKENIZER_AND_CONFIG = ("config.json", "tokenizer.json", "tokenizer_config.json")


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A stand-in for a one-round LoRA adapter: random A, and a small random B (a fine-tune's delta is small)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("moe-models")
    return [perturbed(tiny_model_dir, root / f"m{i}", seed=i, scale=0.05, copy=TOKENIZER_AND_CONFIG) for i in range(3)]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("moe-adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(3)]


# --- oracles -------------------------------------------------------------------------------------------
def test_fft_moe_of_identical_experts_is_that_model(tiny_model_dir: Path, models: list[Path], tmp_path: Path) -> None:
    # shared: average of three copies of one model is that model, so every part of the MoE is it
    out = tmp_path / "moe"
    record = mix_models(tiny_model_dir, [models[0]] * 3, out, options=MoeOptions(top_k=2, shared="average"))
    assert record["architecture"] == "MixtralForCausalLM" and json.loads((out / "config.json").read_text())[
        "model_type"] == "mixtral"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.experts.2.w2.weight" in index
    assert "model.layers.0.block_sparse_moe.gate.weight" in index and (out / "tokenizer.json").is_file()
    moe = load_model(out, dtype="float32")
    assert type(moe).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(logits(moe), logits(load_model(models[0], dtype="float32")), atol=1e-5, rtol=1e-5)
    counts = record["parameters"]  # 3 experts, top-2: one expert's MLPs are inactive per token
    assert counts["total"] - counts["active"] == counts["experts"] // 3


def numels(model: torch.nn.Module) -> dict[str, int]:
    """The loaded model's parameters as moe.json counts them (shared tensors once)."""
    named = dict(model.named_parameters())
    experts = sum(p.numel() for name, p in named.items() if ".experts." in name)
    routers = sum(p.numel() for name, p in named.items() if name.endswith((".gate.weight", ".gate.bias")))
    total = sum(p.numel() for p in named.values())
    return {"total": total, "experts": experts, "routers": routers, "shared": total - experts - routers}


def test_fft_moe_with_attention_experts_of_one_model_is_that_model(tiny_model_dir: Path, models: list[Path],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "moe"
    options = MoeOptions(top_k=2, shared="average", attention=ATTENTION)
    record = mix_models(tiny_model_dir, [models[0]] * 3, out, options=options)
    config = json.loads((out / "config.json").read_text())
    assert record["architecture"] == "KnowstackMoeForCausalLM" and config["model_type"] == "knowstack_moe"
    assert config["moe_attention"] == list(ATTENTION) and json.loads((out / "moe.json").read_text())["options"]["attention"] == list(ATTENTION)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"model.layers.1.self_attn.q_proj.experts.2.weight", "model.layers.0.self_attn.o_proj.gate.weight",
            "model.layers.1.mlp.experts.0.up_proj.weight"} <= set(index)
    assert not any(name.startswith("model.layers.0.self_attn.q_proj.weight") for name in index)
    moe = load_model(out, dtype="float32")
    assert type(moe.model.layers[0].self_attn.v_proj).__name__ == "KnowstackMoeLinear"
    torch.testing.assert_close(logits(moe), logits(load_model(models[0], dtype="float32")), atol=1e-5, rtol=1e-5)
    # attention experts are routed experts (2 of 3 active per token); the counts are the loaded model's
    counts = record["parameters"]
    assert {k: counts[k] for k in ("total", "experts", "routers", "shared")} == numels(moe)
    attention_experts = sum(p.numel() for name, p in moe.named_parameters() if ".self_attn." in name and ".experts." in name)
    assert attention_experts > 0 and counts["total"] - counts["active"] == counts["experts"] // 3


def test_attention_experts_with_biases(tiny_model_dir: Path, tmp_path: Path) -> None:
    # a base with attention_bias: each expert carries its projection's bias too
    base = variant(tiny_model_dir, tmp_path / "base", seed=5, copy=("tokenizer.json", "tokenizer_config.json"),
                   attention_bias=True)
    tuned = perturbed(base, tmp_path / "tuned", seed=6, scale=0.05, copy=TOKENIZER_AND_CONFIG)
    mix_models(base, [tuned] * 2, tmp_path / "moe", options=MoeOptions(top_k=1, shared="average", attention=ATTENTION))
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.k_proj.experts.1.bias" in index
    torch.testing.assert_close(logits(load_model(tmp_path / "moe", dtype="float32")),
                               logits(load_model(tuned, dtype="float32")), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["prompts", "random"])
def test_attention_routers_start_as_the_layer_router(router: str, tiny_model_dir: Path, models: list[Path],
                                                      tmp_path: Path) -> None:
    options = MoeOptions(top_k=1, router=router, attention=("q_proj", "o_proj"))
    mix_models(tiny_model_dir, models, tmp_path / "moe", options=options, prompts=FAMILIES)
    tensors = load_file(tmp_path / "moe" / "model-00001-of-00001.safetensors")
    for layer in (0, 1):
        mlp = tensors[f"model.layers.{layer}.mlp.gate.weight"]
        q, o = (tensors[f"model.layers.{layer}.self_attn.{p}.gate.weight"] for p in ("q_proj", "o_proj"))
        if router == "prompts":  # the layer's hidden-state rows, as moetify
            assert torch.equal(q, mlp) and torch.equal(o, mlp)
        else:  # draws of their own
            assert not torch.equal(q, mlp) and not torch.equal(q, o)


def test_prompt_routers_need_hidden_sized_inputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    # heads x head_dim != hidden: o_proj reads fewer features than the hidden-state rows have
    base = variant(tiny_model_dir, tmp_path / "base", seed=5, copy=("tokenizer.json", "tokenizer_config.json"),
                   head_dim=8)
    tuned = [perturbed(base, tmp_path / f"t{i}", seed=i, scale=0.05, copy=TOKENIZER_AND_CONFIG) for i in range(3)]
    with pytest.raises(KnowstackError, match="o_proj reads 32 features"):
        mix_models(base, tuned, tmp_path / "moe", options=MoeOptions(router="prompts", attention=("o_proj",)),
                   prompts=FAMILIES)
    mix_models(base, tuned, tmp_path / "moe", options=MoeOptions(attention=("o_proj",)))  # random: its own size
    logits(load_model(tmp_path / "moe", dtype="float32"))


@pytest.mark.parametrize("router", ["none", "uniform"])
def test_attention_expert_of_equal_weights_is_the_mean_of_the_experts(router: str, tiny_model_dir: Path,
                                                                     models: list[Path], tmp_path: Path) -> None:
    # router-free, or a uniform router with top_k = all experts: every expert at weight 1/n
    mix_models(tiny_model_dir, models, tmp_path / "moe", options=MoeOptions(top_k=3, router=router,
                                                                           attention=("q_proj",)))
    moe = load_model(tmp_path / "moe", dtype="float32")
    seen = {}
    hook = moe.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda module, inputs, output: seen.update(x=inputs[0], y=output))
    logits(moe)
    hook.remove()
    weights = [load_file(m / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"] for m in models]
    expected = sum(torch.nn.functional.linear(seen["x"], w) for w in weights) / len(weights)
    torch.testing.assert_close(seen["y"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen["y"], torch.nn.functional.linear(seen["x"], weights[0]), atol=1e-4)


@pytest.mark.parametrize("options", [
    MoeOptions(base_expert="always-on", router="none", layers=(1,)),
    MoeOptions(base_expert="routed", router="base-biased", top_k=2),
    MoeOptions(base_expert="routed", router="random", top_k=1, layers=(0,)),
    MoeOptions(base_expert="always-on", router="random", top_k=1, layers=(0,), attention=ATTENTION),
    MoeOptions(base_expert="routed", router="base-biased", top_k=2, attention=("v_proj", "o_proj")),
], ids=["always-on-router-free-layer1", "routed-base-biased", "routed-top1-layer0", "always-on-attention-layer0",
        "routed-base-biased-attention"])
def test_own_class_options_with_base_experts_are_the_base(options: MoeOptions, tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    record = mix_models(tiny_model_dir, [tiny_model_dir] * 2, tmp_path / "moe", options=options)
    moe = load_model(tmp_path / "moe", dtype="float32")
    stock = options.router == "random" and not options.attention  # a routed base, plain router: still Mixtral
    assert type(moe).__name__ == ("MixtralForCausalLM" if stock and options.layers is None else "KnowstackMoeForCausalLM")
    assert record["experts"] == 2 + (options.base_expert == "routed")
    torch.testing.assert_close(logits(moe), logits(load_model(tiny_model_dir, dtype="float32")), atol=1e-5, rtol=1e-5)


def test_lora_moe_of_one_adapter_top1_is_base_plus_adapter(tiny_model_dir: Path, adapters: list[Path],
                                                           tmp_path: Path) -> None:
    out = tmp_path / "lora-moe"
    record = mix_models(tiny_model_dir, [adapters[0]], out, options=MoeOptions(top_k=1))
    assert record["architecture"] == "lora-moe" and (out / "lora_moe.json").is_file()
    peft = load_model(tiny_model_dir, adapters[0], dtype="float32", merge_adapter=False)
    expected = logits(peft)
    assert not torch.allclose(expected, logits(load_model(tiny_model_dir, dtype="float32")), atol=1e-3)
    torch.testing.assert_close(logits(load_model(tiny_model_dir, out, dtype="float32")), expected,
                               atol=1e-5, rtol=1e-5)
    # three copies of it, top-2: the same delta whatever the routing
    mix_models(tiny_model_dir, [adapters[0]] * 3, tmp_path / "three", options=MoeOptions(top_k=2))
    torch.testing.assert_close(logits(load_model(tiny_model_dir, tmp_path / "three", dtype="float32")), expected,
                               atol=1e-5, rtol=1e-5)


FRESH = """
import sys, json, torch
ids = torch.tensor({ids})
if sys.argv[1] == "stock":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2])  # no knowstack, no remote code
else:
    import knowstack  # registers knowstack_moe when transformers is imported
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=False)
with torch.no_grad():
    print(json.dumps([type(model).__name__, model(ids).logits[0, -1, :5].tolist(),
                      sum(p.numel() for p in model.parameters())]))
"""
FRESH_OPTIONS = {"stock": MoeOptions(top_k=2), "own": MoeOptions(top_k=2, layers=(1,), base_expert="always-on"),
                 "own-attention": MoeOptions(top_k=2, attention=("q_proj", "o_proj"))}


@pytest.mark.parametrize("kind", ["stock", "own", "own-attention"])
def test_checkpoint_reloads_in_a_fresh_process(kind: str, tiny_model_dir: Path, models: list[Path],
                                               tmp_path: Path) -> None:
    record = mix_models(tiny_model_dir, models, tmp_path / "moe", options=FRESH_OPTIONS[kind])
    result = subprocess.run([sys.executable, "-c", FRESH.format(ids=IDS.tolist()), kind, str(tmp_path / "moe")],
                            capture_output=True, text=True, check=True)
    name, values, numel = json.loads(result.stdout.strip().splitlines()[-1])
    assert name == ("MixtralForCausalLM" if kind == "stock" else "KnowstackMoeForCausalLM")
    assert numel == record["parameters"]["total"]
    here = logits(load_model(tmp_path / "moe", dtype="float32"))[0, -1, :5]
    torch.testing.assert_close(torch.tensor(values), here, atol=1e-5, rtol=1e-5)


# --- routers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fft", "lora"])
def test_routing_picks_the_expert_whose_prompts_built_its_row(kind: str, tiny_model_dir: Path, models: list[Path],
                                                              adapters: list[Path], tmp_path: Path) -> None:
    inputs = models if kind == "fft" else adapters
    record = mix_models(tiny_model_dir, inputs, tmp_path / "moe", options=MoeOptions(top_k=1, router="prompts"),
                        prompts=FAMILIES, router_step=RouterRun(FAMILIES))
    assert set(record["loads"]["before_training"]) == {"0", "1"}
    model = load_model(tiny_model_dir, tmp_path / "moe") if kind == "lora" else load_model(tmp_path / "moe")
    tokenizer = load_tokenizer(tiny_model_dir)
    for expert, prompts in enumerate(FAMILIES):
        loads = expert_loads(model, tokenizer, prompts)
        for layer, shares in loads.items():
            assert max(range(3), key=shares.__getitem__) == expert, (layer, expert, shares)


def test_router_rows_read_each_prompt_alone(tiny_model_dir: Path) -> None:
    # prompts are packed into one row; no prompt may see another, so the mean over two prompts packed
    # together is the mean of each prompt's mean read on its own
    from knowstack.combine.routers import mean_router_inputs

    model, tokenizer = load_model(tiny_model_dir, dtype="float32"), load_tokenizer(tiny_model_dir)
    together = mean_router_inputs(model, tokenizer, [FAMILIES[0][:2]], [0, 1], "mlp")
    alone = [mean_router_inputs(model, tokenizer, [[p]], [0, 1], "mlp") for p in FAMILIES[0][:2]]
    for layer in (0, 1):
        torch.testing.assert_close(together[layer], (alone[0][layer] + alone[1][layer]) / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fft", "fft-own-class", "fft-attention", "lora"])
def test_router_training_changes_the_routers_only(kind: str, tiny_model_dir: Path, models: list[Path],
                                                  adapters: list[Path], tmp_path: Path) -> None:
    inputs = adapters if kind == "lora" else models
    options = MoeOptions(top_k=2, seed=3)
    if kind == "fft-own-class":  # the base-biased router has a bias, trained too
        options = MoeOptions(top_k=2, seed=3, base_expert="routed", router="base-biased")
    if kind == "fft-attention":  # every attention projection's router is trained too
        options = MoeOptions(top_k=2, seed=3, attention=ATTENTION)
    examples = [Example(p[:12], p[12:]) for family in FAMILIES for p in family]
    untrained = tmp_path / "untrained"
    mix_models(tiny_model_dir, inputs, untrained, options=options)
    record = mix_models(tiny_model_dir, inputs, tmp_path / "trained", options=options,
                        router_step=RouterRun(None, examples, RouterTraining(steps=3, batch_size=4, lr=0.05)))
    training = record["router_training"]
    assert training["steps"] == 3 and training["last"]["aux_loss"] > 0
    assert record["loads"]["before_training"] != record["loads"]["after_training"]
    weights = "lora_moe.safetensors" if kind == "lora" else "model-00001-of-00001.safetensors"
    before, after = load_file(untrained / weights), load_file(tmp_path / "trained" / weights)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".gate." in name or name.startswith("routers.") for name in changed)
    if kind == "fft-own-class":
        assert any(name.endswith(".gate.bias") for name in changed)
    if kind == "fft-attention":
        gates = {f"model.layers.{i}.self_attn.{p}.gate.weight" for i in (0, 1) for p in ATTENTION}
        assert gates <= changed and "model.layers.0.mlp.gate.weight" in changed
        assert {"0", "1", "1.self_attn.o_proj"} <= set(record["loads"]["after_training"])
    # the trained routers were written where a fresh load finds them
    model = load_model(tiny_model_dir, tmp_path / "trained") if kind == "lora" else load_model(tmp_path / "trained")
    texts = [ex.prompt + ex.answer for ex in examples]
    assert expert_loads(model, load_tokenizer(tiny_model_dir), texts) == record["loads"]["after_training"]


def test_clear_errors(tiny_model_dir: Path, models: list[Path], adapters: list[Path], tmp_path: Path) -> None:
    cases = [
        ([models[0], adapters[0]], MoeOptions(), "not both"),
        (models, MoeOptions(top_k=4), "top_k"),
        (models, MoeOptions(router="base-biased"), "base_expert: routed"),
        (models, MoeOptions(router="uniform", top_k=2), "uniform router"),
        (models, MoeOptions(router="prompts"), "prompts"),
        (adapters, MoeOptions(base_expert="always-on"), "always keeps the base"),
        (models, MoeOptions(layers=(5,)), "layers"),
        (adapters, MoeOptions(attention=("q_proj",)), "LoRA-MoE already mixes every module"),
        (models, MoeOptions(attention=("q_proj", "w_proj")), r"unknown: w_proj"),
        (models, MoeOptions(attention=("q_proj", "q_proj")), "each once"),
    ]
    for inputs, options, message in cases:
        with pytest.raises(KnowstackError, match=message):
            mix_models(tiny_model_dir, inputs, tmp_path / "out", options=options)
        assert not (tmp_path / "out").exists()
    # uniform with top_k = all experts is the equal-weight mix: allowed
    mix_models(tiny_model_dir, models, tmp_path / "uniform", options=MoeOptions(router="uniform", top_k=3))


# --- the CLI and the study -------------------------------------------------------------------------------
def test_cli_mix(tiny_model_dir: Path, adapters: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.cli import main

    files = []
    for i, family in enumerate(FAMILIES):
        files.append(tmp_path / f"p{i}.json")
        files[-1].write_text(json.dumps([{"prompt": p, "answer": ""} for p in family]))
    out = tmp_path / "cli"
    args = ["mix", "--base", str(tiny_model_dir), "--models", *map(str, adapters), "--prompts", *map(str, files),
            "--prompts-per-expert", "2", "--top-k", "2", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "moe.json").read_text())
    assert record["options"]["router"] == "prompts" and record["architecture"] == "lora-moe"
    assert "expert load per layer before training" in capsys.readouterr().out
    assert main(["mix", "--base", str(tiny_model_dir), "--models", str(adapters[0]), "--base-expert", "always-on",
                 "--router", "random", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "option --base-expert" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    # --attention reaches mix_models (which refuses it for adapters)
    assert main(["mix", "--base", str(tiny_model_dir), "--models", str(adapters[0]), "--attention", "q_proj",
                 "v_proj", "--router", "random", "--out", str(tmp_path / "bad")]) == 2
    assert "option --attention" in capsys.readouterr().err


def test_mix_defaults_to_the_studys_router_and_asks_for_its_prompts(tiny_model_dir: Path, adapters: list[Path],
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """No silent random router: without --prompts (or --router) mix stops before any compute, naming both."""
    from knowstack import api
    from knowstack.cli import main
    from knowstack.config import MoeConfig

    capsys.readouterr()
    assert main(["mix", "--base", str(tiny_model_dir), "--models", *map(str, adapters[:2]),
                 "--out", str(tmp_path / "moe")]) == 2
    err = capsys.readouterr().err
    assert f"default router, {MoeConfig().router}" in err and "--prompts" in err and "--router" in err
    assert err.count("error:") == 1 and not (tmp_path / "moe").exists()
    with pytest.raises(KnowstackError, match="prompts"):
        api.mix(tiny_model_dir, adapters[:2], tmp_path / "api")
    assert not (tmp_path / "api").exists()


def study_config(tmp_path: Path, base: Path, moe: dict) -> dict:
    tasks = []
    for i, name in enumerate(("t1", "t2", "t3")):
        (tmp_path / name).mkdir(exist_ok=True)
        items = [{"prompt": p, "answer": " a"} for p in FAMILIES[i]]
        for split in ("train", "test"):
            (tmp_path / name / f"{split}.json").write_text(json.dumps(items))
        tasks.append({"name": name, "path": str(tmp_path / name), "metric": "accuracy"})
    return {"name": "m", "base": {"model": str(base)}, "tasks": tasks, "old_knowledge": {"tasks": ["ks_x"]},
            "training": {"lr": 1e-4}, "methods": {"one-round": {"finetune": ["fft", "lora"]}, "moe": moe}}


def test_moe_config_is_validated(tmp_path: Path, tiny_model_dir: Path) -> None:
    from knowstack.config import parse_config
    from knowstack.study.plan import build_plan

    bad = [({"router": "learned"}, r"methods\.moe\.router"), ({"router": "base-biased"}, "base_expert: routed"),
           ({"base_expert": "always-on"}, "always keeps the base"), ({"experts": ["fft", "fft"]}, "once"),
           ({"top_k": 0}, r"methods\.moe\.top_k"), ({"router": "none", "router_training": {}}, "no router to train"),
           ({"attention": ["q_proj"]}, "'attention' is for FFT-MoE"),
           ({"experts": ["fft"], "attention": ["w_proj"]}, r"methods\.moe\.attention"),
           ({"experts": ["fft"], "attention": []}, "attention projection")]
    for moe, message in bad:
        with pytest.raises(KnowstackError, match=message):
            parse_config(study_config(tmp_path, tiny_model_dir, moe))
    for moe, message in [({"tasks": ["t1", "t9"]}, "unknown task 't9'"), ({"top_k": 4}, "top_k is 4"),
                         ({"router": "uniform"}, "uniform router")]:
        with pytest.raises(KnowstackError, match=message):
            build_plan(parse_config(study_config(tmp_path, tiny_model_dir, moe)))


def test_a_moe_rule_error_names_the_setting_that_breaks_it_and_the_config_file(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rule between MoE settings (config.py moe_problems, and the section's own 'tasks') names the setting that
    breaks it, not the section (methods.moe.router_init, not methods.moe), in a list of mixtures too; the study
    command names the config file (an FFT-MoE its base's family cannot take: tests/test_moe_families.py)."""
    import yaml

    from knowstack.cli import main
    from knowstack.config import parse_config

    cases = [({"router": "none", "router_training": {}}, "router_training"),
             ({"experts": ["lora"], "router": "random", "router_init": "moetify"}, "router_init"),
             ({"experts": ["lora"], "router": "moetify", "router_init": "moetify", "base_expert": "routed"},
              "base_expert"),
             ({"experts": ["fft"], "router_dtype": "float16"}, "router_dtype"),
             ({"base_expert": "always-on"}, "base_expert"), ({"router": "base-biased"}, "router"),
             ({"tasks": ["t1", "t1"]}, "tasks")]
    for moe, setting in cases:
        with pytest.raises(KnowstackError) as error:
            parse_config(study_config(tmp_path, tiny_model_dir, moe))
        assert error.value.field == f"methods.moe.{setting}", moe
        with pytest.raises(KnowstackError) as error:
            parse_config(study_config(tmp_path, tiny_model_dir, [{"experts": ["lora"]}, {**moe, "name": "b"}]))
        assert error.value.field == f"methods.moe[1].{setting}", moe
    config = tmp_path / "moe.yaml"
    config.write_text(yaml.safe_dump(study_config(tmp_path, tiny_model_dir, {"experts": ["lora"], "router": "random",
                                                                             "router_init": "moetify"})))
    assert main(["study", str(config), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"error: {config}: field 'methods.moe.router_init': 'router_init: moetify'" in err and "Traceback" not in err


def test_plan_moe_shares_the_one_round_train_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    from knowstack.config import parse_config
    from knowstack.study.plan import build_plan

    plan = build_plan(parse_config(study_config(tmp_path, tiny_model_dir, {"top_k": 2})))
    kinds = [s.kind for s in plan.ordered()]
    assert kinds.count("train") == 6 and kinds.count("moe") == 2  # 3 tasks x 2 finetunes, trained once
    by_name = {e.model: e for e in plan.evaluations}
    assert (by_name["moe-fft"].method, by_name["moe-fft"].finetune) == ("moe", "fft")
    assert by_name["moe-lora"].finetune == "lora" and by_name["moe-lora"].trained_on == "t1+t2+t3"
    moe_step = plan.steps[plan.steps[by_name["moe-lora"].step].deps[-1]]
    one_round = {plan.steps[by_name[f"one-round-lora-{t}"].step].deps[-1] for t in ("t1", "t2", "t3")}
    assert moe_step.kind == "moe" and one_round <= set(moe_step.deps)
    assert moe_step.params["options"]["shared"] == "base" and moe_step.params["options"]["router"] == "prompts"
    subset = build_plan(parse_config(study_config(tmp_path, tiny_model_dir, {"experts": ["fft"], "tasks": ["t3", "t1"]})))
    moe = next(s for s in subset.ordered() if s.kind == "moe")
    assert [t["name"] for t in moe.params["tasks"]] == ["t3", "t1"] and len(moe.params["models"]) == 2


def test_moe_step_runs_on_one_round_artifacts(tmp_path: Path, tiny_model_dir: Path, models: list[Path],
                                              adapters: list[Path]) -> None:
    import shutil

    from knowstack.config import parse_config
    from knowstack.study.plan import build_plan
    from knowstack.study.steps import StudyContext, execute

    moe = {"top_k": 2, "prompts_per_expert": 2, "router_training": {"steps": 2, "examples_per_task": 2, "batch_size": 2}}
    config = parse_config(study_config(tmp_path, tiny_model_dir, moe))
    plan = build_plan(config)
    ctx = StudyContext(out=tmp_path / "study", config=config)
    for step in (s for s in plan.ordered() if s.kind == "train"):  # stand-ins for the one-round models
        index = ["t1", "t2", "t3"].index(step.params["task"]["name"])
        shutil.copytree(models[index] if step.params["finetune"] == "fft" else adapters[index], ctx.artifact(step.key))
    for evaluation in (e for e in plan.evaluations if e.method == "moe"):
        eval_step = plan.steps[evaluation.step]
        execute(plan.steps[eval_step.deps[-1]], ctx)
        record = json.loads((ctx.artifact(eval_step.deps[-1]) / "moe.json").read_text())
        assert record["router_training"]["steps"] == 2 and "after_training" in record["loads"]
        ref = eval_step.params["model"]  # what run_eval loads
        model = load_model(ctx.resolve(ref["model"]), ctx.resolve(ref["adapter"]), dtype="float32")
        assert torch.isfinite(logits(model)).all()


def test_moe_step_passes_attention_through(tmp_path: Path, tiny_model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import knowstack.combine.moe as moe_module
    from knowstack.config import parse_config
    from knowstack.study.plan import build_plan
    from knowstack.study.steps import StudyContext, run_moe

    def moe_step(moe: dict):
        config = parse_config(study_config(tmp_path, tiny_model_dir, {"experts": ["fft"], **moe}))
        return config, next(s for s in build_plan(config).ordered() if s.kind == "moe")

    # unset, the option is not among the step's params: the keys of earlier studies' moe steps stay
    assert "attention" not in moe_step({})[1].params["options"]
    config, step = moe_step({"attention": ["v_proj", "q_proj"]})
    seen = {}
    monkeypatch.setattr(moe_module, "mix_models", lambda *args, **kwargs: seen.update(kwargs))
    run_moe(step, StudyContext(out=tmp_path / "study", config=config), tmp_path / "out")
    assert seen["options"].attention == ("v_proj", "q_proj")


def test_moe_step_launches_router_training_as_its_experts_training(tmp_path: Path, tiny_model_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import knowstack.combine.moe as moe_module
    from knowstack.config import parse_config
    from knowstack.study.plan import build_plan
    from knowstack.study.steps import StudyContext, run_moe
    from knowstack.train.launch import LaunchSpec

    raw = study_config(tmp_path, tiny_model_dir, {"experts": ["fft", "lora"], "router_training": {"steps": 2}})
    seen: dict[str, LaunchSpec | None] = {}
    monkeypatch.setattr(moe_module, "mix_models", lambda base, models, out, **kwargs: seen.update({out.name: kwargs["router_step"].launch}))
    keys = []
    for launch in (None, {"num_processes": 4, "cpu": True, "lora": {"num_processes": 2, "mixed_precision": "no"}}):
        config = parse_config({**raw, "launch": launch} if launch else raw)
        steps = [s for s in build_plan(config).ordered() if s.kind == "moe"]
        keys.append({s.params["experts"]: s.key for s in steps})
        for step in steps:
            run_moe(step, StudyContext(out=tmp_path / "study", config=config), tmp_path / step.params["experts"])
        if launch is None:
            assert seen == {"fft": None, "lora": None}
    # the mixed precision each launch runs with, explicitly: FFT's from the shipped ddp config (bf16), LoRA's its own
    assert seen == {"fft": LaunchSpec(4, cpu=True, mixed_precision="bf16"),
                    "lora": LaunchSpec(2, cpu=True, mixed_precision="no")}
    # how many processes run it is not part of what it makes; the mixed precision it runs under is
    assert keys[0]["lora"] == keys[1]["lora"] and keys[0]["fft"] != keys[1]["fft"]


@pytest.mark.parametrize("attention", [(), ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")])
def test_dry_run_parameter_estimate_is_the_built_mixture(attention: tuple[str, ...], tiny_model_dir: Path,
                                                         models: list[Path], tmp_path: Path) -> None:
    from transformers import AutoConfig

    from knowstack.study.plan import Step
    from knowstack.study.resources import _from_hf_config, moe_params

    record = mix_models(tiny_model_dir, models, tmp_path / "moe", options=MoeOptions(top_k=2, attention=attention))
    arch = _from_hf_config(AutoConfig.from_pretrained(tiny_model_dir))
    options = {"top_k": 2, "router": "random", "base_expert": "none", "layers": None}
    if attention:
        options["attention"] = list(attention)
    step = Step("moe", "fft-random", {"experts": "fft", "models": [str(m) for m in models], "options": options})
    config = parse_config({"name": "x", "base": {"model": str(tiny_model_dir)}, "tasks": [],
                           "old_knowledge": {"tasks": ["ks_x"]}, "training": {"lr": 1e-4}})
    total, active = moe_params(arch, step, config)
    assert total == record["parameters"]["total"] and active == 2
