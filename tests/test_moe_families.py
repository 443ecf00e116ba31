"""FFT-MoE of every family as that family's own stock transformers MoE class (Llama and Mistral -> Mixtral, Qwen2 ->
Qwen2-MoE, Qwen3 -> Qwen3-MoE, OLMo-2 -> FlexOlmo), made of tiny checkpoints as users have them (tests/families.py:
bf16, sharded, tied where the family ties), and the refusal, before any compute, of the families no class fits.

The experts are stand-in fine-tunes: the base's tensors plus small seeded noise (training is not the point).
Logits are compared in float32 at 1e-5: the weights are bf16, exact in float32, so a mixture of identical experts
differs from its expert only by float32 rounding (k weighted copies summed, gate and up in one matmul), measured at
about 1e-6 on logits of size 3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from families import build_family
from safetensors.torch import load_file, save_file

from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modeling.streaming import INDEX_FILE, weight_files
from knowstack.modelio import load_model, load_tokenizer
from knowstack.train.router_job import RouterRun
from knowstack.train.router_training import RouterTraining

# family -> (model_type, architecture, an expert's down projection and a router as the class's checkpoints name them)
STOCK = {
    "llama3.1": ("mixtral", "MixtralForCausalLM", "block_sparse_moe.experts.2.w2", "block_sparse_moe.gate"),
    "llama3.2": ("mixtral", "MixtralForCausalLM", "block_sparse_moe.experts.2.w2", "block_sparse_moe.gate"),
    "mistral": ("mixtral", "MixtralForCausalLM", "block_sparse_moe.experts.2.w2", "block_sparse_moe.gate"),
    "qwen2": ("qwen2_moe", "Qwen2MoeForCausalLM", "mlp.experts.2.down_proj", "mlp.gate"),
    "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM", "mlp.experts.2.down_proj", "mlp.gate"),
    "olmo2": ("flex_olmo", "FlexOlmoForCausalLM", "mlp.experts.2.down_proj", "mlp.gate"),
}
REFUSED = ("phi3", "gemma2", "gemma3")
# 24 tokens: longer than the Mistral family's sliding window (16), so that the window acts
IDS = torch.tensor([[1, 17, 42, 8, 99, 5, 61, 12, 7, 7, 250, 31, 2, 140, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
# 12 tokens each: within the Mistral family's window (16), since knowstack's packed attention, which the router init
# runs the base with, does not apply a sliding window (left to the owner of modeling/attention.py)
PROMPTS = [[f"def f{i}(a, b):" for i in range(3)], [f"Japan: the yen {i}." for i in range(3)]]


def stand_in(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A one-round fine-tune's stand-in: the base's tensors (all shards) plus seeded noise, in the base's dtype, with
    every other file of the base (config, tokenizer, chat template, generation config) copied."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for file in weight_files(base):
        for name, tensor in load_file(file).items():
            tensors[name] = (tensor.float() + scale * torch.randn(tensor.shape, generator=gen)).to(tensor.dtype)
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for file in base.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != INDEX_FILE:
            shutil.copy2(file, out / file.name)
    return out


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, list[Path]]]:
    """family -> (its base, two stand-in fine-tunes of it), each built once per session."""
    built: dict[str, tuple[Path, list[Path]]] = {}

    def get(family: str) -> tuple[Path, list[Path]]:
        if family not in built:
            root = tmp_path_factory.mktemp(f"moe-{family}")
            base = build_family(family, root / "base")
            built[family] = base, [stand_in(base, root / f"m{i}", seed=i + 1) for i in range(2)]
        return built[family]

    return get


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path, dtype="float32")(IDS).logits


@pytest.fixture(scope="session")
def identical_mixtures(family_models: Callable, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> the FFT-MoE `knowstack mix` makes of three copies of one stand-in (top-2 of a random router, shared
    weights their average: every part of it is that model), made once per session."""
    from knowstack.cli import main

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            base, models = family_models(family)
            out = tmp_path_factory.mktemp(f"mix-{family}") / "moe"
            assert main(["mix", "--base", str(base), "--models", *[str(models[0])] * 3, "--top-k", "2",
                         "--shared", "average", "--router", "random", "--out", str(out)]) == 0
            built[family] = out
        return built[family]

    return get


# --- the stock class, and its logits ---------------------------------------------------------------------
@pytest.mark.parametrize("family", list(STOCK))
def test_cli_mix_writes_the_stock_class_of_identical_experts_as_that_model(
        family: str, family_models: Callable, identical_mixtures: Callable) -> None:
    base, models = family_models(family)
    out = identical_mixtures(family)
    model_type, architecture, expert, router = STOCK[family]
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [architecture]
    assert json.loads((out / "moe.json").read_text())["architecture"] == architecture
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert f"model.layers.1.{expert}.weight" in index and f"model.layers.0.{router}.weight" in index
    assert not any(".gate_up_proj" in name for name in index)  # one tensor per expert, as the Hub has them
    assert ("lm_head.weight" in index) is not base_config["tie_word_embeddings"]
    assert config["tie_word_embeddings"] == base_config["tie_word_embeddings"]
    assert config["rope_parameters"] == base_config["rope_parameters"]  # Llama 3.1's llama3 scaling kept
    assert config["num_experts_per_tok"] == 2 and config.get("norm_topk_prob", True) is True
    # a random router's top-2 weights sum to 1 over three copies of one MLP: the mixture is that model
    torch.testing.assert_close(logits(out), logits(models[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "olmo2"])
def test_zero_router_over_identical_experts_is_that_model(family: str, family_models: Callable,
                                                          tmp_path: Path) -> None:
    base, models = family_models(family)
    record = mix_models(base, [models[1]] * 3, tmp_path / "moe",
                        options=MoeOptions(top_k=3, router="uniform", shared="average"))
    assert record["architecture"] == STOCK[family][1]
    torch.testing.assert_close(logits(tmp_path / "moe"), logits(models[1]), atol=1e-5, rtol=1e-5)


def test_qwen2_moe_shared_expert_is_zero_and_costs_four_hidden_per_layer(identical_mixtures: Callable) -> None:
    out = identical_mixtures("qwen2")
    config = json.loads((out / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 1 and config["qkv_bias"] is True
    shared = {name: tensor for file in weight_files(out) for name, tensor in load_file(file).items()
              if ".shared_expert" in name}
    assert len(shared) == 4 * config["num_hidden_layers"] and all(not t.any() for t in shared.values())
    assert sum(t.numel() for t in shared.values()) == 4 * config["hidden_size"] * config["num_hidden_layers"]
    counts = json.loads((out / "moe.json").read_text())["parameters"]
    model = load_model(out, dtype="float32")
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_classes_leave_unmixed_layers_dense(family: str, family_models: Callable, tmp_path: Path) -> None:
    base, models = family_models(family)
    record = mix_models(base, [models[0]] * 2, tmp_path / "moe",
                        options=MoeOptions(top_k=1, layers=(1,), shared="average"))
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert record["architecture"] == STOCK[family][1] and config["mlp_only_layers"] == [0]
    model = load_model(tmp_path / "moe", dtype="float32")
    assert type(model.model.layers[0].mlp).__name__.endswith("MLP")
    torch.testing.assert_close(logits(tmp_path / "moe"), logits(models[0]), atol=1e-5, rtol=1e-5)


# --- in a process that never imports knowstack -----------------------------------------------------------------
FRESH = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
ids = torch.tensor({ids})
result = {{}}
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        last = model(ids).logits[0, -1].tolist()
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    result[path] = [type(model).__name__, last, generated]
assert "knowstack" not in sys.modules
print(json.dumps(result))
"""


@pytest.fixture(scope="session")
def fresh_process(identical_mixtures: Callable) -> dict[str, list]:
    """Every family's mixture loaded with AutoModelForCausalLM and run in one fresh process (a clean environment: no
    PYTHONPATH, offline) that never imports knowstack: its class, last-token logits and greedy continuation."""
    paths = [str(identical_mixtures(family)) for family in STOCK]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", FRESH.format(ids=IDS.tolist()), *paths], capture_output=True,
                            text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", list(STOCK))
def test_loads_and_generates_in_a_process_without_knowstack(family: str, family_models: Callable,
                                                            identical_mixtures: Callable, fresh_process: dict) -> None:
    name, last, generated = fresh_process[str(identical_mixtures(family))]
    assert name == STOCK[family][1] and len(generated) == 4
    expected = logits(family_models(family)[1][0])[0, -1]
    torch.testing.assert_close(torch.tensor(last), expected, atol=1e-5, rtol=1e-5)


# --- routers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(STOCK))
def test_router_training_runs_on_the_stock_class(family: str, family_models: Callable, tmp_path: Path) -> None:
    base, models = family_models(family)
    examples = [Example(p[:12], p[12:]) for group in PROMPTS for p in group]
    options = MoeOptions(top_k=1, shared="average", router="random", seed=3)  # BTX's recipe, top-1
    record = mix_models(base, models, tmp_path / "moe", options=options,
                        router_step=RouterRun(None, examples, RouterTraining(steps=2, batch_size=2, lr=0.05)))
    assert record["architecture"] == STOCK[family][1] and record["router_training"]["steps"] == 2
    assert set(record["loads"]["after_training"]) == {"0", "1"}
    # the trained routers were written where the class's checkpoint has them, and nothing else changed
    untrained = mix_models(base, models, tmp_path / "untrained", options=options)
    assert untrained["architecture"] == record["architecture"]
    before = {k: v for f in weight_files(tmp_path / "untrained") for k, v in load_file(f).items()}
    after = {k: v for f in weight_files(tmp_path / "moe") for k, v in load_file(f).items()}
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"model.layers.{i}.{STOCK[family][3]}.weight" for i in (0, 1)}


@pytest.mark.parametrize("family", list(STOCK))
def test_prompt_routers_read_the_classes_router_input(family: str, family_models: Callable, tmp_path: Path) -> None:
    # layer 0's router rows are the normalised mean of what the built MoE's router reads on each expert's prompts
    # (OLMo-2's MLP reads the residual stream, not a norm's output)
    base, models = family_models(family)
    record = mix_models(base, models, tmp_path / "moe", options=MoeOptions(top_k=1, router="prompts"), prompts=PROMPTS)
    assert record["architecture"] == STOCK[family][1]
    model, tokenizer = load_model(tmp_path / "moe", dtype="float32"), load_tokenizer(base)
    gate = model.model.layers[0].mlp.gate
    captured = []
    hook = gate.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    rows = []
    with torch.no_grad():
        for prompts in PROMPTS:
            captured.clear()
            for prompt in prompts:
                model(torch.tensor([tokenizer(prompt)["input_ids"]]))
            mean = torch.stack([states.reshape(-1, states.shape[-1]).mean(dim=0) for states in captured]).mean(dim=0)
            rows.append(mean / mean.norm())
    hook.remove()
    # rows in bf16: within 2e-3 (their values are below 0.5); reading the wrong site is off by 1e-2 (OLMo-2)
    torch.testing.assert_close(gate.weight.float(), torch.stack(rows), atol=2e-3, rtol=0)


@pytest.mark.parametrize(("family", "router"), [("qwen3", "hidden"), ("olmo2", "cheap-embed")])
def test_mergekit_routers_on_the_stock_class(family: str, router: str, family_models: Callable,
                                             tmp_path: Path) -> None:
    base, models = family_models(family)
    record = mix_models(base, models, tmp_path / "moe", options=MoeOptions(top_k=1, router=router), prompts=PROMPTS,
                        router_step=RouterRun(PROMPTS))
    assert record["architecture"] == STOCK[family][1] and set(record["loads"]["before_training"]) == {"0", "1"}


# --- what no stock class can hold: refused before any compute --------------------------------------------------
@pytest.mark.parametrize("family", REFUSED)
def test_cli_refuses_families_no_class_fits_before_any_compute(family: str, family_models: Callable, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from knowstack.cli import main

    def computed(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("knowstack.modelio.load_model", computed)
    base, models = family_models(family)
    prompts = []
    for i, group in enumerate(PROMPTS):
        prompts.append(tmp_path / f"p{i}.json")
        prompts[-1].write_text(json.dumps([{"prompt": p, "answer": ""} for p in group]))
    code = main(["mix", "--base", str(base), "--models", *map(str, models), "--prompts", *map(str, prompts),
                 "--out", str(tmp_path / "moe")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "moe").exists()
    message = " ".join(err.split())
    assert f"FFT-MoE of a '{json.loads((base / 'config.json').read_text())['model_type']}' base" in message
    assert "llama, mistral, qwen2, qwen3, olmo2" in message


def test_options_a_stock_class_cannot_express_are_refused_but_for_llama(family_models: Callable,
                                                                        tmp_path: Path) -> None:
    for family, options, message, field in [
        ("qwen3", MoeOptions(base_expert="routed", router="base-biased"), "cannot express the options router: base-biased",
         "router"),
        ("mistral", MoeOptions(layers=(1,)), "cannot express the options layers", "layers"),
        ("olmo2", MoeOptions(attention=("q_proj",)), "cannot express the options attention", "attention"),
        ("qwen2", MoeOptions(base_expert="always-on"), "always-on", "base_expert"),
    ]:
        base, models = family_models(family)
        with pytest.raises(KnowstackError, match=message) as error:
            mix_models(base, models, tmp_path / "out", options=options)
        assert error.value.field == field  # the option it cannot express (mix: option --base-expert, ...)
        assert not (tmp_path / "out").exists()
    base, models = family_models("llama3.2")  # a Llama has knowstack's own class for them
    record = mix_models(base, models, tmp_path / "own", options=MoeOptions(layers=(1,), base_expert="always-on"))
    assert record["architecture"] == "KnowstackMoeForCausalLM"


def test_study_validation_refuses_an_fft_mixture_of_a_family_no_class_fits(family_models: Callable, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.config import parse_config
    from knowstack.validate import check_study

    def raw(family: str, moe: object) -> dict:
        (tmp_path / "t1").mkdir(exist_ok=True)
        for split in ("train", "test"):
            (tmp_path / "t1" / f"{split}.json").write_text(json.dumps([{"prompt": "a", "answer": " b"}]))
        return {"name": "s", "base": {"model": str(family_models(family)[0])},
                "tasks": [{"name": "t1", "path": str(tmp_path / "t1"), "metric": "accuracy"}],
                "old_knowledge": {"tasks": ["ks_x"]}, "methods": {"one-round": {}, "moe": moe}}

    def study(family: str, moe: object) -> object:
        return parse_config(raw(family, moe))

    def moe_problems(config: object) -> list:
        return [p for p in check_study(config) if (p.field or "").startswith("methods.moe")]

    # each names the setting that does not fit (the experts, where no class fits the family at all)
    problems = moe_problems(study("gemma2", [{"experts": ["lora"]}, {"experts": ["fft"], "router": "random"}]))
    assert len(problems) == 1 and problems[0].field == "methods.moe[1].experts"
    assert "no transformers MoE class fits it" in problems[0].message
    assert [p.field for p in moe_problems(study("qwen3", {"experts": ["fft"], "router": "none"}))] == [
        "methods.moe.router"]
    assert moe_problems(study("qwen3", {"experts": ["fft", "lora"]})) == []
    assert moe_problems(study("gemma3", {"experts": ["lora"]})) == []
    # the study command names the config file the setting is in
    import yaml

    from knowstack.cli import main

    config = tmp_path / "moe.yaml"
    config.write_text(yaml.safe_dump(raw("qwen3", {"experts": ["fft"], "router": "none"})))
    assert main(["study", str(config), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: field 'methods.moe.router': FFT-MoE of a 'qwen3' base" in err and "Traceback" not in err
