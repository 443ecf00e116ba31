"""The paper config and what it needs: per-task budgets, old-knowledge metrics per task, MoE and factor-space
merges, seen in its dry run; budgets change a step's key only where they change its training."""

from __future__ import annotations

import pytest
from test_plan import paper_config_with_data, user_config

from knowstack.cli import main
from knowstack.config import describe_old_metric, load_config, parse_config
from knowstack.errors import KnowstackError
from knowstack.report.tables import Scores
from knowstack.results import Row
from knowstack.study.plan import build_plan


def test_paper_dry_run_shows_moe_budgets_and_acc_norm(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = paper_config_with_data(tmp_path)
    config = load_config(path)
    assert {t.name: t.epochs for t in config.tasks} == {**{n: 20 for n in ("cstance", "fomc", "meeting", "py150",
                                                                          "science", "20minuten")}, "math": 6}
    assert config.methods.merge.drop_rate == 0.8 and config.methods.merge.density == 0.2
    assert main(["study", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    printed = capsys.readouterr().err
    lines = printed.splitlines()
    train = [line for line in lines if "train-" in line]
    assert any("train-fft-math-" in line and "epochs 6, batch 128" in line for line in train)
    assert any("train-lora-meeting-" in line and "epochs 20, batch 128" in line for line in train)
    assert any("joint" in line and "epochs 1, batch 128" in line for line in train)  # joint keeps the recipe's
    assert any("moe-fft-" in line and "4 fft experts, top-2" in line for line in lines)
    assert any("moe-lora-" in line and "7 lora experts, top-7" in line for line in lines)  # moetify: every expert
    assert any("merge-ties-dare-lora-factors" in line and "drop_rate 0.8" in line for line in lines)
    assert not any("merge-ties-fft" in line for line in lines)  # the paper merged FFT models by averaging only
    assert sum("pad-base-base-" in line for line in lines) == 1  # the base grown by [PAD], as the paper's scripts
    # settings added later, shown where set (the paper's): how a train step cuts an overlong example, and how the
    # LoRA-MoE's routers are drawn and stored (the FFT-MoE's are its model's)
    assert all("overlong paper" in line for line in train)
    assert any("moe-lora-" in line and "router_dtype float16," in line for line in lines)
    assert not any("moe-fft-" in line and "router_" in line for line in lines)
    old = next(line for line in lines if line.startswith("old knowledge:"))
    assert "arc_challenge (acc_norm)" in old and "hellaswag (acc_norm)" in old and "openbookqa (acc_norm)" in old
    assert "piqa (acc_norm)" in old and "mmlu (acc)" in old and "winogrande (acc)" in old


def _train_keys(raw: dict) -> dict[str, str]:
    return {s.label: s.key for s in build_plan(parse_config(raw)).ordered() if s.kind == "train"}


def test_a_task_budget_changes_only_that_tasks_steps(tmp_path) -> None:
    methods = {"one-round": {"finetune": ["fft", "lora"]}, "sequential": {"finetune": ["lora"]},
               "replay": {"finetune": ["fft"]}, "olora": {"lambdas": [0.5]}, "joint": {"finetune": ["fft"]}}
    raw = user_config(tmp_path, **methods)
    before = _train_keys(raw)
    raw["tasks"][1]["max_steps"] = 7
    after = _train_keys(raw)
    changed = {label for label in before if before[label] != after.get(label)}
    # t2's own rounds change, and so does everything trained on top of them (sequential t3 starts from t2's model)
    assert {"fft-t2", "lora-t2", "fft-t2-replay", "lora-t2-olora0.5"} <= changed
    assert not {"fft-t1", "lora-t1", "fft-joint-uniform"} & changed  # joint keeps the recipe's budget
    assert after["fft-t3"] == before["fft-t3"]  # one-round on another task: same key as before budgets existed
    plan = build_plan(parse_config(raw))
    steps = {s.label: s for s in plan.ordered() if s.kind == "train"}
    assert steps["fft-t2"].params["training"]["max_steps"] == 7
    assert steps["fft-t2-replay"].params["training"]["max_steps"] == 7
    assert steps["fft-t1"].params["training"]["max_steps"] is None


def test_epochs_budget_replaces_the_recipes_max_steps_and_a_sweep_overrides_it(tmp_path) -> None:
    raw = user_config(tmp_path, **{"one-round": {"finetune": ["fft"], "sweep": {"epochs": [3]}}})
    raw["training"]["max_steps"] = 5
    raw["tasks"][0]["epochs"] = 2
    steps = [s for s in build_plan(parse_config(raw)).ordered() if s.kind == "train" and s.label == "fft-t1"]
    trainings = sorted((s.params["training"]["epochs"], s.params["training"]["max_steps"]) for s in steps)
    assert trainings == [(2, None), (3, 5)]  # the task's budget; the sweep point's own epochs (recipe's max_steps)


def test_budget_and_metric_mapping_errors(tmp_path) -> None:
    raw = user_config(tmp_path)
    raw["tasks"][0].update(epochs=2, max_steps=3)
    with pytest.raises(KnowstackError, match="not both") as err:
        parse_config(raw)
    assert err.value.field == "tasks[0]"
    raw = user_config(tmp_path / "other")
    raw["old_knowledge"]["metric"] = {"arc_easy": "acc_norm"}
    with pytest.raises(KnowstackError, match="'arc_easy'"):
        parse_config(raw)


def test_old_metric_per_task_picks_the_columns() -> None:
    rows = [Row(model="base", method="base", finetune="", stage=None, task=task, kind="old", metric=metric, value=v,
                n=10, trained_on="") for task in ("arc", "mmlu") for metric, v in (("acc", 0.1), ("acc_norm", 0.2))]
    assert Scores.from_rows(rows, [], "acc").old_columns == [("old", "arc", "acc"), ("old", "mmlu", "acc")]
    mapped = Scores.from_rows(rows, [], {"arc": "acc_norm"})
    assert mapped.old_columns == [("old", "arc", "acc_norm"), ("old", "mmlu", "acc")]
    assert describe_old_metric({"arc": "acc_norm"}) == "acc_norm for arc; acc elsewhere"
    assert describe_old_metric("acc") == "acc"


def test_lora_space_and_moe_tasks_per_kind(tmp_path) -> None:
    raw = user_config(tmp_path, merge={"finetune": ["fft", "lora"], "methods": {"fft": ["average"],
                                                                               "lora": ["average", "ties"]},
                                       "lora_space": {"ties": "factors"}},
                      moe={"experts": ["fft", "lora"], "tasks": {"fft": ["t1", "t3"]}, "router": "random"})
    plan = build_plan(parse_config(raw))
    merges = {s.label: s.params["options"] for s in plan.ordered() if s.kind == "merge"}
    assert merges == {"average-fft": {}, "average-lora": {}, "ties-lora-factors": {"density": 0.2, "lambda": 1.0,
                                                                                   "lora_space": "factors"}}
    moes = {s.label: [t["name"] for t in s.params["tasks"]] for s in plan.ordered() if s.kind == "moe"}
    assert moes == {"fft-random": ["t1", "t3"], "lora-random": ["t1", "t2", "t3"]}
    # a delta-space merge keeps the key it had before lora_space existed
    plain = user_config(tmp_path / "again", merge={"finetune": ["lora"], "methods": ["ties"]})
    keys = [s.key for s in build_plan(parse_config(plain)).ordered() if s.kind == "merge"]
    plain["methods"]["merge"]["lora_space"] = "delta"
    assert keys and keys == [s.key for s in build_plan(parse_config(plain)).ordered() if s.kind == "merge"]
    plain["methods"]["merge"]["lora_space"] = "factors"
    assert not set(keys) & {s.key for s in build_plan(parse_config(plain)).ordered() if s.kind == "merge"}


def test_metamath_prompts_are_the_papers() -> None:
    """RhuiDih/cl do_finetuning.py: PROMPT_DICT, with a query's first line as the instruction, the rest as input."""
    from knowstack.data.formats import alpaca_prompt

    head = "Below is an instruction that describes a task"
    tail = " Write a response that appropriately completes the request.\n\n### Instruction:\n"
    assert alpaca_prompt("What is 2+2?") == f"{head}.{tail}What is 2+2?\n\n### Response:"
    assert alpaca_prompt("Solve for x.\nx+1=2\nx?") == (
        f"{head}, paired with an input that provides further context.{tail}Solve for x.\n\n### Input:\nx+1=2\nx?"
        "\n\n### Response:")
    assert alpaca_prompt("Trailing newline\n") == f"{head}.{tail}Trailing newline\n\n### Response:"


def test_the_dry_runs_settings_show_later_settings_only_where_not_their_default(tmp_path) -> None:
    """training.overlong and a LoRA-MoE's router_dtype / router_init: in the dry run's settings column where set to
    other than their default, so that a default study's table is as it was."""
    from knowstack.study.runner import step_settings

    def settings(raw: dict) -> dict[str, str]:  # of each step that makes a model (its evaluation has the same label)
        return {s.label: step_settings(s) for s in build_plan(parse_config(raw)).ordered() if s.kind != "eval"}

    moe = {"experts": ["fft", "lora"], "router": "moetify"}
    raw = user_config(tmp_path, **{"one-round": {"finetune": ["fft"]}, "moe": moe})
    default = settings(raw)
    assert default["fft-t1"] == "epochs 1, batch 16"
    assert default["lora-moetify"] == "3 lora experts, top-3, router moetify"
    raw["training"]["overlong"] = "keep-answer"
    raw["methods"]["moe"] = {**moe, "router_dtype": "float32", "router_init": "per-module"}  # the defaults, named
    assert settings(raw) == default
    raw["training"]["overlong"] = "paper"
    raw["methods"]["moe"] = {**moe, "router_dtype": "bfloat16", "router_init": "moetify"}
    changed = settings(raw)
    assert changed["fft-t1"] == "epochs 1, batch 16, overlong paper"
    assert changed["lora-moetify"] == "3 lora experts, top-3, router moetify, router_dtype bfloat16, router_init moetify"
    assert changed["fft-moetify"] == default["fft-moetify"]  # an FFT-MoE has no such settings
