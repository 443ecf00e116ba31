"""Training, statistics, LoRA-MoE and evaluation on every family of tests/families.py (Llama 3.1/3.2, Mistral,
Qwen2/3, Gemma 2/3, Phi-3, OLMo-2), each against an oracle that does not go through the code under test: PEFT's
own adapted modules, the examples run one at a time without packing, a forward hook, the base plus a PEFT adapter,
generation one prompt at a time, the log-likelihoods of the choices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from families import FAMILIES, build_family
from safetensors.torch import load_file
from test_evaluate import direct_accuracy, write_mc_task

from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.combine.routers import mean_router_inputs, prompt_routers
from knowstack.combine.statistics import compute_statistics
from knowstack.config import LLAMA_LINEAR
from knowstack.data.batches import collate, tokenize_examples
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.evaluate.generate import generate
from knowstack.evaluate.old_knowledge import evaluate_old_knowledge
from knowstack.modeling import attention
from knowstack.modeling.families import family_of
from knowstack.modeling.loss import answer_loss_sum
from knowstack.modeling.moe_model import ATTENTION_PROJECTIONS
from knowstack.modelio import load_model, load_tokenizer
from knowstack.train import TrainSettings, train
from knowstack.train.olora import OLoraPenalty, stack_previous
from knowstack.train.router_job import RouterRun
from knowstack.train.router_training import RouterTraining
from knowstack.validate import check_lora_targets

# Examples of ~20 to 70 tokens (64 kept): longer than the families' sliding window (16 tokens, tests/families.py).
EXAMPLES = [Example(f"Question: what is {i} plus 4? " * (1 + i % 3) + "Answer:", f" {i + 4}. The answer is: {i + 4}")
            for i in range(6)] + [Example("The official currency of Japan is", " the yen.")]
PROMPTS = [["The official currency of Japan is", "France is in Europe."], ["Question: what is 3 plus 4?", "def add(a, b):"]]
SETTINGS = TrainSettings(finetune="lora", lr=1e-3, max_steps=2, batch_size=4, micro_batch_size=4, max_length=64)


def adapted_modules(adapter: Path) -> set[str]:
    """The modules an adapter holds LoRA weights for (what PEFT really adapted, whatever its config says)."""
    names = load_file(str(adapter / "adapter_model.safetensors"))
    return {name.split(".lora_A.")[0].removeprefix("base_model.model.") for name in names if ".lora_A." in name}


@pytest.fixture(scope="session", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(name, checkpoint dir) of one family, built once per session."""
    return request.param, build_family(request.param, tmp_path_factory.mktemp(f"family-{request.param}"))


@pytest.fixture(scope="session")
def olora(family: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two LoRA adapters trained by knowstack with the default targets, two steps each: a first round, and a second
    O-LoRA round against it (its penalty's record and the round's summary beside)."""
    name, base = family
    root = tmp_path_factory.mktemp(f"adapters-{name}")
    train(base, EXAMPLES, root / "a0", SETTINGS)
    penalty = OLoraPenalty(stack_previous([root / "a0"]), 0.5)
    summary = train(base, EXAMPLES, root / "a1", TrainSettings(**{**SETTINGS.to_dict(), "seed": 1}), extra_loss=penalty)
    return {"adapters": [root / "a0", root / "a1"], "record": penalty.record(), "summary": summary}


@pytest.fixture(scope="session")
def adapters(olora: dict) -> list[Path]:
    return olora["adapters"]


def test_default_lora_targets_are_every_linear_layer_of_the_family(family: tuple[str, Path],
                                                                   adapters: list[Path]) -> None:
    name, base = family
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    expected = {f"model.layers.{layer}.{part}.{family_of(model_type).module_for(llama)}"
                for layer in range(2) for llama in LLAMA_LINEAR
                for part in ["self_attn" if llama in ATTENTION_PROJECTIONS else "mlp"]}
    assert adapted_modules(adapters[0]) == expected
    linear = {f"model.layers.{layer}.{module}" for layer in range(2) for module, child in
              load_model(base).model.layers[layer].named_modules() if isinstance(child, torch.nn.Linear)}
    assert expected == linear  # every linear layer of attention and MLP, fused ones included (Phi-3)
    if name == "phi3":
        assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= expected
    assert check_lora_targets(base, SETTINGS.target_modules) == []


def test_a_target_that_names_no_module_is_one_error_before_training(tmp_path: Path) -> None:
    base = build_family("phi3", tmp_path / "phi3")
    settings = TrainSettings(**{**SETTINGS.to_dict(), "target_modules": ("q_proj", "o_proj", "c_attn")})
    with pytest.raises(KnowstackError, match=r"c_attn name no module.*'phi3'.*qkv_proj"):
        train(base, EXAMPLES, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()
    [problem] = check_lora_targets(base, settings.target_modules)
    assert "c_attn" in problem.message and "training.lora.target_modules" in problem.message
    # Llama's names alone are the family's fused modules (a fused projection is adapted whole)
    settings = TrainSettings(**{**SETTINGS.to_dict(), "target_modules": ("q_proj", "up_proj"), "max_steps": 1})
    train(base, EXAMPLES, tmp_path / "fused", settings)
    assert {module.rsplit(".", 1)[1] for module in adapted_modules(tmp_path / "fused")} == {"qkv_proj", "gate_up_proj"}


def loss_and_grads(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = answer_loss_sum(model, inputs)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_packed_row_is_its_examples_one_at_a_time(family: tuple[str, Path]) -> None:
    """The training loop's packed row (segment attention) against each example alone with the family's stock
    attention: the same summed answer loss and gradients of every weight, in float32. The examples are longer than
    the sliding window, so Mistral's and Gemma's windows and Gemma-2's soft-capping act."""
    name, base = family
    model = load_model(base, dtype=torch.float32).train()
    tokenizer = load_tokenizer(base)
    tokenized = tokenize_examples(tokenizer, [*EXAMPLES[:3], Example("Japan", " yen")], 64)
    assert max(len(ex) for ex in tokenized) > 2 * 16 and min(len(ex) for ex in tokenized) < 16
    loss_one, grads_one = 0.0, {}
    for example in tokenized:
        loss, grads = loss_and_grads(model, collate([example], pack_rows=False, pad_token_id=tokenizer.pad_token_id))
        loss_one += loss
        for key, grad in grads.items():
            grads_one[key] = grads_one.get(key, 0) + grad
    with attention.packed_attention(model):
        loss_packed, grads_packed = loss_and_grads(model, collate(tokenized, pack_rows=True,
                                                                  pad_token_id=tokenizer.pad_token_id))
    # float32 sums of the same terms in another order (one row vs. four): measured at most 9e-8 relative on the loss
    # and 7e-7 relative to each gradient's largest entry, over the nine families; with the window and the soft cap
    # ignored (before they were honoured) Mistral's loss was 3e-3 off, Gemma-2's 2e-2, their gradients ~100% off.
    assert loss_packed == pytest.approx(loss_one, rel=1e-5)
    assert grads_packed.keys() == grads_one.keys()
    for key, grad in grads_packed.items():
        scale = grads_one[key].abs().max().clamp_min(1e-12)
        assert float((grad - grads_one[key]).abs().max() / scale) < 1e-4, (name, key)


def test_olora_second_round_penalises_every_adapted_module(olora: dict) -> None:
    first, second = olora["adapters"]
    record = olora["record"]
    assert record["modules"] == len(adapted_modules(first)) == len(adapted_modules(second))
    assert record["previous_rows"] == SETTINGS.lora_r
    assert len(olora["summary"]["extra_loss_curve"]) == 2 and all(value > 0 for value in record["penalty_curve"])


def test_statistics_cover_every_adapted_weight(family: tuple[str, Path], adapters: list[Path], tmp_path: Path) -> None:
    name, base = family
    out = compute_statistics(adapters[0], EXAMPLES, tmp_path / "stats", base=base, max_examples=3, max_length=64)
    gram, fisher = load_file(str(out / "gram.safetensors")), load_file(str(out / "fisher.safetensors"))
    weights = {f"{module}.weight" for module in adapted_modules(adapters[0])}
    assert set(gram) == set(fisher) == weights
    merged = load_model(base, adapters[0], dtype=torch.float32, merge_adapter=True)
    for weight in weights:
        shape = merged.get_parameter(weight).shape
        assert gram[weight].shape == (shape[1], shape[1]) and fisher[weight].shape == shape
        assert fisher[weight].abs().sum() > 0
    # the oracle for the first layer's first module: X^T X of its inputs, each example run alone
    first = sorted(weights)[0].removesuffix(".weight")
    tokenized = tokenize_examples(load_tokenizer(base), EXAMPLES[:3], 64)
    seen: list[torch.Tensor] = []
    handle = merged.get_submodule(first).register_forward_hook(lambda m, args, out: seen.append(args[0][0].double()))
    with torch.no_grad():
        for example in tokenized:
            merged(input_ids=torch.tensor([example.input_ids]), use_cache=False)
    handle.remove()
    expected = sum(x.T @ x for x in seen)
    torch.testing.assert_close(gram[f"{first}.weight"].double(), expected, rtol=1e-4, atol=1e-3)


def test_lora_moe_of_one_adapter_is_base_plus_adapter(family: tuple[str, Path], adapters: list[Path],
                                                      tmp_path: Path) -> None:
    name, base = family
    mix_models(base, [adapters[0]], tmp_path / "one", options=MoeOptions(top_k=1, router="random"))
    ids = torch.tensor([load_tokenizer(base)("Question: what is 3 plus 4? Answer: 7. " * 4)["input_ids"]])
    with torch.no_grad():
        expected = load_model(base, adapters[0], dtype=torch.float32, merge_adapter=False)(ids).logits
        got = load_model(base, tmp_path / "one", dtype=torch.float32)(ids).logits
        plain = load_model(base, dtype=torch.float32)(ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_lora_moe_routers_from_prompts_and_arrow_and_router_training(family: tuple[str, Path], adapters: list[Path],
                                                                     tmp_path: Path) -> None:
    """A LoRA-MoE router reads what the layer's attention reads: the input norm's output, or in OLMo-2 (no norm
    before attention) the residual stream. Oracle: hidden_states[layer] through the layer's input_layernorm."""
    name, base = family
    model, tokenizer = load_model(base, dtype=torch.float32), load_tokenizer(base)
    means = mean_router_inputs(model, tokenizer, PROMPTS, [0, 1], "attention")
    for layer in (0, 1):
        norm = getattr(model.model.layers[layer], "input_layernorm", None)
        assert (norm is None) == (name == "olmo2")
        rows = []
        for prompts in PROMPTS:
            total = 0
            for prompt in prompts:
                with torch.no_grad():
                    states = model(torch.tensor([tokenizer(prompt)["input_ids"]]), output_hidden_states=True,
                                   use_cache=False).hidden_states[layer][0]
                total = total + (norm(states) if norm is not None else states).mean(dim=0)
            rows.append(total / len(prompts))
        torch.testing.assert_close(means[layer], torch.stack(rows), atol=1e-5, rtol=1e-4)
    # routers from those rows, then trained: two steps move them
    record = mix_models(base, adapters, tmp_path / "prompts", options=MoeOptions(top_k=1, router="prompts"),
                        prompts=PROMPTS,
                        router_step=RouterRun(PROMPTS, EXAMPLES, RouterTraining(steps=2, batch_size=4, lr=0.05)))
    assert record["router_training"]["steps"] == 2 and set(record["loads"]["after_training"]) == {"0", "1"}
    trained = load_file(str(tmp_path / "prompts" / "lora_moe.safetensors"))
    for layer, initial in prompt_routers(means).items():
        assert trained[f"routers.{layer}.weight"].shape == initial.weight.shape
        assert not torch.allclose(trained[f"routers.{layer}.weight"], initial.weight, atol=1e-4)
    # Arrow: a router per module, each reading its module's input
    mix_models(base, adapters, tmp_path / "arrow", options=MoeOptions(top_k=1, router="arrow"))
    arrow = load_file(str(tmp_path / "arrow" / "lora_moe.safetensors"))
    assert {key for key in arrow if key.startswith("routers.")} == {
        f"routers.{module}.weight" for module in adapted_modules(adapters[0])}
    with torch.no_grad():
        logits = load_model(base, tmp_path / "arrow", dtype=torch.float32)(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()


def test_generation_batched_is_one_prompt_at_a_time(family: tuple[str, Path]) -> None:
    name, base = family
    model, tokenizer = load_model(base, dtype=torch.float32), load_tokenizer(base)
    prompts = [PROMPTS[0][0], "Question: what is 3 plus 4? " * 3 + "Answer:", PROMPTS[1][1]]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text in zip(prompts, batched, strict=True):
        assert generate(model, tokenizer, [prompt], max_new_tokens=6) == [text]


def test_generation_dropping_finished_rows_is_the_whole_batch(family: tuple[str, Path]) -> None:
    """Rows that end early leave the batch, continued from the family's own cache (sliding windows included):
    every output as the whole batch makes it."""
    name, base = family
    model, tokenizer = load_model(base, dtype=torch.float32), load_tokenizer(base)
    prompts = [("Question: what is 3 plus 4? " * (1 + i % 4))[: 6 + 9 * i] for i in range(20)]
    free = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=20, drop_finished=False)
    # the character in the most continuations (then at the most different places): the rows without it run on
    stop = max(sorted({c for text in free for c in text if not c.isspace()}),
               key=lambda c: (sum(c in text for text in free), len({text.find(c) for text in free})))
    whole, dropped = {}, {}
    expected = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=20, stop_strings=[stop],
                        stats=whole, drop_finished=False)
    assert generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=20, stop_strings=[stop],
                    stats=dropped) == expected
    assert dropped["row_tokens_saved"] > 0, f"{name}: no row left the batch"
    # rows kept only to fill a size are not generated on: the batch ends when the whole batch would
    assert dropped["row_tokens"] + dropped["row_tokens_saved"] == whole["row_tokens"]


def test_lm_eval_scores_the_choices_log_likelihoods(family: tuple[str, Path], tmp_path: Path) -> None:
    name, base = family
    model, tokenizer = load_model(base, dtype=torch.float32), load_tokenizer(base)
    docs = write_mc_task(tmp_path)
    result = evaluate_old_knowledge(model, tokenizer, ["ks_toy"], include_path=tmp_path, batch_size=4, limit=5)
    assert result["ks_toy"]["acc"] == pytest.approx(direct_accuracy(model, tokenizer, docs[:5]))


# Every LoRA-MoE router, per layer and per module, with a step of router training where it trains: (router,
# routing, base_expert, top_k).
ROUTER_MATRIX = [("random", "layer", "none", 1), ("uniform", "layer", "none", 2), ("base-biased", "layer", "routed", 2),
                 ("prompts", "layer", "none", 1), ("hidden", "layer", "none", 1), ("cheap-embed", "layer", "none", 1),
                 ("none", "layer", "none", 2), ("random", "module", "none", 1), ("prompts", "module", "routed", 2),
                 ("base-biased", "module", "routed", 1), ("arrow", "module", "none", 1), ("gates", "module", "none", 1)]


@pytest.mark.slow
def test_every_lora_moe_router_on_every_family(family: tuple[str, Path], adapters: list[Path], tmp_path: Path) -> None:
    from knowstack.train.gate_training import GateTraining, gate_adapter

    name, base = family
    gated = []
    for index, adapter in enumerate(adapters):  # PHATGOOSE's gates, trained by each contributor into a copy
        gated.append(tmp_path / f"gated{index}")
        shutil.copytree(adapter, gated[-1])
        gate_adapter(base, gated[-1], EXAMPLES, GateTraining(steps=2, batch_size=4, max_length=64))
    ids = torch.tensor([load_tokenizer(base)("Question: what is 3 plus 4? Answer: 7")["input_ids"]])
    for router, routing, base_expert, top_k in ROUTER_MATRIX:
        trains = router not in ("arrow", "gates", "none")
        out = tmp_path / f"{router}-{routing}"
        options = MoeOptions(top_k=top_k, router=router, routing=routing, base_expert=base_expert)
        record = mix_models(base, gated, out, options=options, prompts=PROMPTS, router_step=RouterRun(
            PROMPTS, EXAMPLES, RouterTraining(steps=1, batch_size=4, lr=0.05) if trains else None))
        assert ("router_training" in record) == trains, (router, routing)
        with torch.no_grad():
            logits = load_model(base, out, dtype=torch.float32)(ids).logits
        assert torch.isfinite(logits).all(), (name, router, routing)
