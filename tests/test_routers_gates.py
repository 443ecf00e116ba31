"""Per-contributor gates (PHATGOOSE): gate training against a direct computation of the gated adapter, the
`gates` router of a LoRA-MoE against the routing as microsoft/mttl's PhatgooseSelector computes it, and
`knowstack gate` + `mix --router gates`."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_moe import FAMILIES, logits, make_adapter

from knowstack.combine.inputs import LoraAdapter
from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modeling.lora_moe import LoraMoeLinear
from knowstack.modeling.routing import GATES_FILE
from knowstack.modelio import load_model
from knowstack.train.gate_training import GateTraining, attach_gates, gate_adapter
from knowstack.train.router_job import RouterRun
from knowstack.train.router_training import RouterTraining

MODULE = "model.layers.0.self_attn.q_proj"


def examples(family: int) -> list[Example]:
    return [Example(prompt, " answer") for prompt in FAMILIES[family]]


@pytest.fixture(scope="module")
def gated(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three adapters, each with gates trained on its own family of prompts."""
    root = tmp_path_factory.mktemp("gated")
    adapters = [make_adapter(tiny_model_dir, root / f"a{i}", seed=20 + i) for i in range(3)]
    for i, adapter in enumerate(adapters):
        gate_adapter(tiny_model_dir, adapter, examples(i), GateTraining(steps=3, lr=0.05, batch_size=2))
    return adapters


def test_gated_module_is_base_plus_sigmoid_gate_times_the_delta(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    model = load_model(tiny_model_dir, adapter, dtype="float32", merge_adapter=False)
    gates, handles = attach_gates(model)
    assert len(gates) == 14 and all(torch.count_nonzero(g) == 0 for g in gates.values())
    with torch.no_grad():
        gates[MODULE].normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    lora = LoraAdapter(adapter)
    a_name, b_name, scale = lora.modules[f"{MODULE}.weight"]
    a, b = lora.reader.read(a_name).float(), lora.reader.read(b_name).float()
    module = model.get_submodule(f"base_model.model.{MODULE}")
    x = torch.randn(4, module.base_layer.in_features, generator=torch.Generator().manual_seed(1))
    expected = module.base_layer(x) + torch.sigmoid(x @ gates[MODULE])[:, None] * scale * (x @ a.T @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)
    for handle in handles:
        handle.remove()


def test_gate_training_trains_the_gates_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    before = (adapter / "adapter_model.safetensors").read_bytes()
    summary = gate_adapter(tiny_model_dir, adapter, examples(0), GateTraining(steps=4, lr=0.05, batch_size=2))
    assert summary["steps"] == 4 and summary["modules"] == 14 and summary["last"] < summary["first"]
    assert (adapter / "adapter_model.safetensors").read_bytes() == before  # the adapter itself is untouched
    from safetensors.torch import load_file

    gates = load_file(adapter / GATES_FILE)
    assert set(gates) == {name.removesuffix(".weight") for name in LoraAdapter(adapter).modules}
    assert all(torch.count_nonzero(vector) > 0 for vector in gates.values())


def test_gates_router_is_phatgooses_routing(tiny_model_dir: Path, gated: list[Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    mix_models(tiny_model_dir, gated, tmp_path / "moe", options=MoeOptions(top_k=2, router="gates"))
    config = json.loads((tmp_path / "moe" / "lora_moe.json").read_text())
    assert config["router_score"] == "phatgoose" and config["routing"] == "module" and "temperature" not in config
    model = load_model(tiny_model_dir, tmp_path / "moe", dtype="float32")
    linear = model.get_submodule(MODULE)
    assert isinstance(linear, LoraMoeLinear)
    x = torch.randn(6, linear.base_layer.in_features, generator=torch.Generator().manual_seed(2)) * 3 + 1
    # mttl's PhatgooseSelector: LayerNorm (no affine) of the gates and of the token, dot product, top-k, softmax
    # of the k scores over sqrt(d)
    standardize = torch.nn.LayerNorm(x.shape[-1], elementwise_affine=False)
    vectors = torch.stack([load_file(path / GATES_FILE)[MODULE] for path in gated])
    scores = standardize(x) @ standardize(vectors).T
    top, chosen = scores.topk(2, dim=-1)
    weights = torch.zeros_like(scores).scatter(-1, chosen, torch.softmax(top / x.shape[-1] ** 0.5, dim=-1))
    parts = [LoraAdapter(path).modules[f"{MODULE}.weight"] for path in gated]
    deltas = torch.stack([scale * x @ (LoraAdapter(path).reader.read(b).float() @ LoraAdapter(path).reader.read(a).float()).T
                          for path, (a, b, scale) in zip(gated, parts, strict=True)], dim=1)
    expected = linear.base_layer(x) + (weights[..., None] * deltas).sum(dim=1)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits(model)).all()


def test_gates_router_needs_every_adapters_gates(tiny_model_dir: Path, gated: list[Path], tmp_path: Path) -> None:
    bare = shutil.copytree(gated[0], tmp_path / "bare")
    (bare / GATES_FILE).unlink()
    with pytest.raises(KnowstackError, match=GATES_FILE):
        mix_models(tiny_model_dir, [gated[1], bare], tmp_path / "moe", options=MoeOptions(top_k=1, router="gates"))
    assert not (tmp_path / "moe").exists()
    with pytest.raises(KnowstackError, match="router training|training-free"):
        mix_models(tiny_model_dir, gated, tmp_path / "moe", options=MoeOptions(top_k=1, router="gates"),
                   router_step=RouterRun(None, examples(0), RouterTraining(steps=1)))


def test_cli_gate_then_mix(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.cli import main

    adapters = [make_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=30 + i) for i in range(2)]
    for i, adapter in enumerate(adapters):
        data = tmp_path / f"train{i}.json"
        data.write_text(json.dumps([{"prompt": p, "answer": " a"} for p in FAMILIES[i]]))
        assert main(["gate", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--train-data", str(data),
                     "--steps", "2", "--batch-size", "2"]) == 0
        assert "gates of 14 modules" in capsys.readouterr().out
    assert main(["mix", "--base", str(tiny_model_dir), "--models", *map(str, adapters), "--router", "gates",
                 "--top-k", "1", "--out", str(tmp_path / "moe")]) == 0
    assert json.loads((tmp_path / "moe" / "lora_moe.json").read_text())["router"] == "gates"
    assert main(["gate", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"), "--train-data",
                 str(tmp_path / "train0.json")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_study_trains_each_adapters_gates_then_mixes(tmp_path: Path, tiny_model_dir: Path) -> None:
    from test_moe import study_config

    from knowstack.config import parse_config
    from knowstack.study.plan import build_plan
    from knowstack.study.steps import StudyContext, execute

    moe = {"experts": ["lora"], "router": "gates", "top_k": 2, "prompts_per_expert": 2,
           "gate_training": {"steps": 2, "batch_size": 2, "lr": 0.05}}
    config = parse_config(study_config(tmp_path, tiny_model_dir, moe))
    plan = build_plan(config)
    gates = [s for s in plan.ordered() if s.kind == "gate"]
    assert [s.params["task"]["name"] for s in gates] == ["t1", "t2", "t3"]
    moe_step = next(s for s in plan.ordered() if s.kind == "moe")
    assert {s.key for s in gates} <= set(moe_step.deps) and "gate_training" not in moe_step.params["options"]
    ctx = StudyContext(out=tmp_path / "study", config=config)
    for step in (s for s in plan.ordered() if s.kind == "train" and s.params["finetune"] == "lora"):
        index = ["t1", "t2", "t3"].index(step.params["task"]["name"])  # stand-ins for the one-round adapters
        make_adapter(tiny_model_dir, ctx.artifact(step.key), seed=40 + index)
    for step in gates:
        artifact = execute(step, ctx)
        assert (artifact / GATES_FILE).is_file() and (artifact / "adapter_model.safetensors").is_file()
    record = json.loads((execute(moe_step, ctx) / "moe.json").read_text())
    assert record["options"]["router"] == "gates" and len(record["loads"]["before_training"]) == 14
    from knowstack.study.resources import estimate_plan, step_resources

    estimates = [(step, estimate) for step, estimate in estimate_plan(plan)[0] if step.kind == "gate"]
    assert len(estimates) == 3 and all(estimate.params > 0 for _, estimate in estimates)
    assert all(step_resources(step, config, estimate).gpus == 1 for step, estimate in estimates)
    # without router gates the plan has no gate step (and the moe keys of other configs stay as they were)
    plain = build_plan(parse_config(study_config(tmp_path, tiny_model_dir, {"experts": ["lora"]})))
    assert not [s for s in plain.ordered() if s.kind == "gate"]


def test_registry_stores_the_gates_with_the_adapter_and_composes_with_them(tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    from test_compose import TINY_TRAINING
    from test_registry import make_task, write_mc_task

    from knowstack.registry import Registry, init_registry
    from knowstack.registry.compose import compose
    from knowstack.registry.contribute import contribute

    write_mc_task(tmp_path / "old")
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir, old_tasks=["ks_toy"], include_path=tmp_path / "old")
    for i, name in enumerate(["Stance", "Notes"]):
        adapter = make_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=50 + i)
        gate_adapter(tiny_model_dir, adapter, examples(i), GateTraining(steps=2, batch_size=2, lr=0.05))
        contribute(reg, name.lower(), adapter=adapter, task=make_task(tmp_path / "tasks", name))
    bare = make_adapter(tiny_model_dir, tmp_path / "bare", seed=60)
    contribute(reg, "bare", adapter=bare, task=make_task(tmp_path / "tasks", "Quiz"))
    with Registry.open(reg) as opened:
        assert GATES_FILE in opened.version("stance")["files"] and GATES_FILE not in opened.version("bare")["files"]
    record = compose(reg, "moe-lora", contributions=["stance", "notes"],
                     options=dataclasses.replace(TINY_TRAINING, router="gates"))
    with Registry.open(reg) as opened, opened.view(record["name"]) as stored:
        assert json.loads((stored / "lora_moe.json").read_text())["router"] == "gates"
    with pytest.raises(KnowstackError, match="bare were contributed without"):
        compose(reg, "moe-lora", contributions=["stance", "bare"], options=dataclasses.replace(TINY_TRAINING,
                                                                                               router="gates"))
