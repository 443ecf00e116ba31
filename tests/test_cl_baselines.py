"""EWC and LwF (train/regularizers.py): each term's value and gradient against a hand computation, zero at the
anchor, lambda 0 training exactly as plain training, and the study's plan of both methods."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from test_plan import user_config

from knowstack.config import parse_config
from knowstack.data.batches import collate, tokenize_examples
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modeling.loss import answer_logits, distillation_kl_sum
from knowstack.modelio import load_model, load_tokenizer
from knowstack.study.plan import build_plan
from knowstack.train import TrainSettings, train
from knowstack.train.regularizers import EwcPenalty, LwfDistillation, lora_modules, online_fisher

TARGETS = ["q_proj", "down_proj"]
EXAMPLES = [Example(f"What is {i} plus {i}? Answer:", f" {2 * i}") for i in range(16)]


def peft_model(model_dir: Path, seed: int = 0):
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(load_model(model_dir, dtype=torch.float32), config)


def batch(model_dir: Path, n: int = 4) -> dict[str, torch.Tensor]:
    tokenized = tokenize_examples(load_tokenizer(model_dir), EXAMPLES[:n], 32)
    return collate(tokenized, pack_rows=False, pad_token_id=0)


# --- EWC -----------------------------------------------------------------------------------------------------
def test_ewc_value_and_gradient_against_the_closed_form(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype=torch.float32).requires_grad_(True)
    name = "model.norm.weight"
    fisher = torch.linspace(0.5, 2.0, model.get_parameter(name).numel())
    penalty = EwcPenalty({name: fisher}, lam=3.0)
    at_anchor = penalty(model)  # the first call takes the anchor: the weights the round starts from
    assert float(at_anchor.detach()) == 0.0
    at_anchor.backward()
    assert torch.count_nonzero(model.get_parameter(name).grad) == 0

    model.zero_grad(set_to_none=True)
    anchor = model.get_parameter(name).detach().clone()
    step = torch.randn(anchor.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.get_parameter(name).add_(step)
    value = penalty(model)
    # lambda / 2 * sum_i F_i (theta_i - theta*_i)^2, one entry at a time
    by_hand = 3.0 / 2 * sum(float(f) * float(d) ** 2 for f, d in zip(fisher, step, strict=True))
    assert float(value.detach()) == pytest.approx(by_hand, rel=1e-5)
    assert penalty.values[-1] == pytest.approx(by_hand / 1.5, rel=1e-5)  # recorded unweighted
    value.backward()
    # d/dtheta_i = lambda F_i (theta_i - theta*_i); weights without a Fisher get nothing
    torch.testing.assert_close(model.get_parameter(name).grad, 3.0 * fisher * step, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if n != name)


def test_ewc_on_lora_penalises_the_adapted_delta_toward_zero(tiny_model_dir: Path) -> None:
    model = peft_model(tiny_model_dir)
    modules = lora_modules(model)
    assert sorted(modules)[:2] == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    name = "model.layers.0.self_attn.q_proj.weight"
    module, adapter = modules[name]
    weight = module.get_base_layer().weight
    fisher = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1))
    penalty = EwcPenalty({name: fisher}, lam=2.0)
    assert float(penalty(model)) == 0.0  # a fresh adapter (B = 0) is the previous round's model

    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(2)))
    scale = module.scaling[adapter]
    delta = scale * b.detach() @ a.detach()
    value = penalty(model)
    assert float(value) == pytest.approx(float((fisher * delta ** 2).sum()), rel=1e-5)  # lambda / 2 = 1
    value.backward()
    # P = lambda/2 sum F (s B A)^2: dP/dB = lambda s (F o delta) A^T, dP/dA = lambda s B^T (F o delta)
    weighted = 2.0 * scale * fisher * delta
    torch.testing.assert_close(b.grad, weighted @ a.detach().T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad, b.detach().T @ weighted, rtol=1e-4, atol=1e-6)
    assert weight.grad is None


def test_online_fisher_decays_the_older_rounds(tmp_path: Path) -> None:
    first, second = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 0.0]), "v": torch.tensor([1.0])}
    save_file(first, str(tmp_path / "1.safetensors"))
    save_file(second, str(tmp_path / "2.safetensors"))
    files = [tmp_path / "1.safetensors", tmp_path / "2.safetensors"]
    summed, decayed = online_fisher(files), online_fisher(files, decay=0.5)
    assert summed["w"].tolist() == [5.0, 2.0] and summed["v"].tolist() == [1.0]
    assert decayed["w"].tolist() == [4.5, 1.0]  # F~ = 0.5 F_1 + F_2


def test_ewc_refuses_what_it_cannot_use(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype=torch.float32).requires_grad_(True)
    with pytest.raises(KnowstackError, match="no trainable weight"):
        EwcPenalty({"elsewhere.weight": torch.ones(3)}, lam=1.0)(model)
    with pytest.raises(KnowstackError, match=r"\[3\]"):
        EwcPenalty({"model.norm.weight": torch.ones(3)}, lam=1.0)(model)
    with pytest.raises(KnowstackError, match="negative"):
        EwcPenalty({"w": torch.ones(1)}, lam=-1.0)


# --- LwF -----------------------------------------------------------------------------------------------------
def test_distillation_kl_and_its_gradient_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 1.0]])
    t = 2.0

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    by_hand, grads = 0.0, []
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p, q = softmax(t_row), softmax(s_row)
        by_hand += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        grads.append([(qi - pi) / t for pi, qi in zip(p, q, strict=True)])  # d KL / d student logit
    value = distillation_kl_sum(student, teacher, t)
    assert float(value) == pytest.approx(by_hand, rel=1e-6)
    value.backward()
    torch.testing.assert_close(student.grad, torch.tensor(grads), rtol=1e-5, atol=1e-7)
    assert float(distillation_kl_sum(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("finetune", ["fft", "lora"])
def test_lwf_teacher_is_the_round_start_and_the_term_is_zero_there(tiny_model_dir: Path, finetune: str) -> None:
    model = peft_model(tiny_model_dir) if finetune == "lora" else load_model(tiny_model_dir, dtype=torch.float32)
    inputs = batch(tiny_model_dir)
    lwf = LwfDistillation(lam=0.7, temperature=2.0)
    logits, _ = answer_logits(model, inputs)
    assert float(lwf(model, inputs, logits)) == 0.0  # the model starts as its teacher
    base_logits, _ = answer_logits(load_model(tiny_model_dir, dtype=torch.float32), inputs)
    torch.testing.assert_close(lwf.teacher_logits(model, inputs), base_logits.detach())
    with torch.no_grad():  # the student moves on, the teacher stays
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or finetune == "fft"):
                param.add_(0.05 * torch.randn_like(param))
    logits, _ = answer_logits(model, inputs)
    teacher = lwf.teacher_logits(model, inputs)
    torch.testing.assert_close(teacher, base_logits.detach())
    term = lwf(model, inputs, logits)
    assert float(term) == pytest.approx(0.7 * float(distillation_kl_sum(logits, base_logits, 2.0)), rel=1e-5)
    assert float(term) > 0 and model.training == (finetune == "lora")  # the LoRA teacher pass leaves train mode


# --- lambda 0 is plain training, bit for bit --------------------------------------------------------------------
@pytest.mark.parametrize("finetune", ["fft", "lora"])
def test_lambda_zero_trains_exactly_as_plain_training(tiny_model_dir: Path, tmp_path: Path, finetune: str) -> None:
    from safetensors.torch import load_file

    settings = TrainSettings(finetune=finetune, lr=1e-3, max_steps=3, batch_size=8, micro_batch_size=4,
                             max_length=32, lora_r=2, lora_dropout=0.1, target_modules=tuple(TARGETS))
    model = load_model(tiny_model_dir, dtype=torch.float32)
    names = [n for n, _ in model.named_parameters()] if finetune == "fft" else [
        n for n in lora_modules(peft_model(tiny_model_dir))]
    fisher = {n: torch.ones_like(model.get_parameter(n)) for n in names}
    runs = {"plain": {}, "ewc": {"extra_loss": EwcPenalty(fisher, 0.0)},
            "lwf": {"micro_loss": LwfDistillation(0.0, 2.0)}}
    weights = {}
    for run, terms in runs.items():
        summary = train(tiny_model_dir, EXAMPLES, tmp_path / run, settings, **terms)
        file = "model.safetensors" if finetune == "fft" else "adapter_model.safetensors"
        weights[run] = (summary["loss_curve"], load_file(str(tmp_path / run / file)))
    plain_curve, plain = weights["plain"]
    for run in ("ewc", "lwf"):
        curve, trained = weights[run]
        assert curve == plain_curve, run
        assert trained.keys() == plain.keys() and all(torch.equal(trained[k], plain[k]) for k in plain), run
    assert len(runs["ewc"]["extra_loss"].values) == 3 and runs["lwf"]["micro_loss"].record()["micro_batches"] == 6


# --- the study's plan ------------------------------------------------------------------------------------------
def test_the_plan_regularises_rounds_two_on_and_takes_each_rounds_fisher(tmp_path: Path) -> None:
    raw = user_config(tmp_path, sequential={"finetune": ["fft", "lora"]}, ewc={"lambdas": [1, 100]},
                      lwf={"finetune": ["lora"], "lambdas": 0.5})
    plan = build_plan(parse_config(raw))
    by_name = {e.model: e for e in plan.evaluations}
    for run in ("ewc-fft-1", "ewc-fft-100", "ewc-lora-1", "lwf-lora-0.5"):
        finetune = run.split("-")[1]
        assert by_name[f"{run}-1"].step == by_name[f"sequential-{finetune}-1"].step  # round 1 shared
        assert by_name[f"{run}-2"].step != by_name[f"sequential-{finetune}-2"].step
        assert by_name[f"{run}-3"].settings == (("lambda", float(run.rsplit("-", 1)[1])),)
    trains = {s.label: s for s in plan.ordered() if s.kind == "train"}
    third = trains["fft-t3-ewc100"].params["ewc"]
    assert third["lambda"] == 100.0 and third["decay"] == 1.0 and len(third["fisher"]) == 2
    fisher = [plan.steps[ref[1:]] for ref in third["fisher"]]
    assert [(s.params["kind"], s.params["task"]["name"], s.params["examples"]) for s in fisher] == [
        ("fisher", "t1", 256), ("fisher", "t2", 256)]
    assert {ref[1:] for ref in third["fisher"]} <= set(trains["fft-t3-ewc100"].deps)
    # LoRA: the Fisher of round 2's adapter on the model round 2 started from (round 1's, merged)
    lora2 = plan.steps[trains["lora-t3-ewc1"].params["ewc"]["fisher"][1][1:]]
    assert lora2.params["model"] == f"@{trains['lora-t2-ewc1'].key}"
    assert lora2.params["base"]["model"] == trains["lora-t2-ewc1"].params["init"]["model"]
    assert trains["lora-t2-lwf0.5"].params["lwf"] == {"lambda": 0.5, "temperature": 2.0}
    assert not any("ewc" in s.params or "lwf" in s.params for s in plan.ordered() if s.label.endswith("-t1"))


# --- the report --------------------------------------------------------------------------------------------
def test_the_report_shows_ewc_and_lwf_in_the_continual_table_and_compares_them() -> None:
    from report_rows import TASKS, staged, synthetic_study

    from knowstack.report.build import build_report
    from knowstack.report.claims import HOLDS, UNMEASURED
    from knowstack.report.tables import Table

    # EWC FFT forgets earlier tasks less than sequential FFT (forget_new 0.02 against 0.12); LwF LoRA more
    rows = synthetic_study(("base", "sequential", "olora"))
    rows += staged("ewc", "fft", "ewc-fft-100", 0.6, 0.02, 0.02) + staged("lwf", "lora", "lwf-lora-1", 0.7, 0.01, 0.2)
    sections = build_report(rows, title="t", task_order=TASKS)
    tables = {b.key: b for s in sections for b in [s, *s.walk()] if isinstance(b, Table)}
    continual = {row.key: row for row in tables["continual"].rows}
    assert continual["ewc/fft/100"].label == "EWC FFT λ=100" and continual["lwf/lora/1"].label == "LwF LoRA λ=1"
    assert continual["ewc/fft/100"].cells[1] > continual["sequential/fft"].cells[1]  # mean BWT
    verdicts = {row.key: row.cells[-1] for row in tables["baselines"].rows}
    assert verdicts["B1"] == HOLDS  # EWC FFT's BWT above sequential FFT's; no EWC LoRA: that check not measured
    assert verdicts["B4"] != UNMEASURED  # O-LoRA against LwF LoRA
    assert {"baselines_bwt", "r_ewc_fft_100", "r_lwf_lora_1"} <= set(tables)
    without = build_report(synthetic_study(("base", "sequential")), title="t", task_order=TASKS)
    assert "baselines" not in {s.id for s in without}  # a study without them has no such section


@pytest.mark.slow
def test_a_tiny_study_with_ewc_and_lwf_end_to_end(tmp_path: Path) -> None:
    """The built-in test world, two tasks: EWC and LwF rows in results.csv and in the report's continual table."""
    import csv

    import yaml
    from test_study import tiny_study

    from knowstack.cli import main

    config = yaml.safe_load(tiny_study(tmp_path, {
        "sequential": {"finetune": ["fft", "lora"]},
        "ewc": {"finetune": ["fft", "lora"], "lambdas": [100.0], "fisher_examples": 8},
        "lwf": {"finetune": ["lora"], "lambdas": [1.0]},
    }).read_text())
    config["tasks"] = {"builtin": ["code", "simplify"]}
    path = tmp_path / "cl.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "run"
    assert main(["study", str(path), "--out", str(out)]) == 0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    models = {(r["model"], r["method"], r["lambda"]) for r in rows}
    assert {("ewc-fft-100-2", "ewc", "100"), ("ewc-lora-100-2", "ewc", "100"), ("lwf-lora-1-2", "lwf", "1")} <= models
    with (out / "tables" / "continual.csv").open() as handle:
        keys = {r["key"] for r in csv.DictReader(handle)}
    assert {"ewc/fft/100", "ewc/lora/100", "lwf/lora/1"} <= keys
    summaries = [json.loads(p.read_text()) for p in (out / "artifacts").glob("train-*-ewc100-*/train_summary.json")]
    assert len(summaries) == 2 and all(s["ewc"]["penalty_first"] == 0.0 for s in summaries)


def test_the_dry_run_counts_what_ewc_and_lwf_hold_beside_the_model() -> None:
    from knowstack.study.resources import FLOAT32, architecture_of, estimate_step

    raw = {"name": "dry", "base": {"builtin": "test"}, "tasks": {"builtin": ["code", "simplify"]},
           "training": {"lr_of_pretrain_peak": 0.1},
           "methods": {"sequential": {"finetune": ["fft", "lora"]}, "ewc": {}, "lwf": {}}}
    config = parse_config(raw)
    plan, arch = build_plan(config), architecture_of(config)[0]
    trains = {s.label: estimate_step(s, plan, arch) for s in plan.ordered() if s.kind == "train"}
    fft, lora = trains["fft-simplify"].weights, trains["lora-simplify"].weights
    assert trains["fft-simplify-ewc100"].weights == fft + 2 * FLOAT32 * arch.params  # the anchor and the Fisher
    assert trains["fft-simplify-lwf1"].weights == fft + FLOAT32 * arch.params  # the teacher, float32 here
    adapted = arch.layers * arch.projection_params(config.training.lora.target_modules)
    assert 0 < adapted < arch.params and trains["lora-simplify-ewc100"].weights == lora + FLOAT32 * adapted
    assert trains["lora-simplify-lwf1"].weights == lora  # the teacher is the model, adapter off
