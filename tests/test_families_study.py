"""A whole study on each family users bring (slow): one-round, sequential, merge and MoE, each model scored on
every task and on old knowledge through lm-eval, on tiny random checkpoints saved as the Hub saves them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from families import FAMILIES, build_family
from test_registry import make_task, write_mc_task
from transformers import AutoConfig

from knowstack.config import load_config
from knowstack.modeling.families import family_of
from knowstack.study.runner import run_study

pytestmark = pytest.mark.slow


def study_config(tmp_path: Path, base: Path, fft_moe: bool) -> Path:
    write_mc_task(tmp_path / "old")
    tasks = [{"name": name, "path": str(make_task(tmp_path / "tasks", name, n=4)), "metric": "accuracy"}
             for name in ("Stance", "Notes")]
    config = {
        "name": f"family-{base.name}", "base": {"model": str(base)}, "tasks": tasks,
        "old_knowledge": {"tasks": ["ks_toy"], "include_path": str(tmp_path / "old")},
        "training": {"lr": 1e-3, "batch_size": 2, "micro_batch_size": 2, "max_length": 32, "lora": {"r": 2, "alpha": 4}},
        "evaluation": {"batch_size": 4, "max_new_tokens": {"accuracy": 4}},
        "methods": {"one-round": {"finetune": ["fft", "lora"]}, "sequential": {"finetune": ["fft", "lora"]},
                    "merge": {"finetune": ["fft", "lora"], "methods": ["average", "ties"]},
                    "moe": {"experts": ["fft", "lora"] if fft_moe else ["lora"], "prompts_per_expert": 2}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_a_study_runs_on_every_family(family: str, tmp_path: Path) -> None:
    base = build_family(family, tmp_path / family)
    model_type = AutoConfig.from_pretrained(base).model_type
    known = family_of(model_type)
    fft_moe = known is not None and known.stock_moe is not None
    run_study(load_config(study_config(tmp_path, base, fft_moe)), tmp_path / "run", console=None)
    with (tmp_path / "run" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    runs = {(row["method"], row["finetune"]) for row in rows}
    expected = {(method, finetune) for method in ("one-round", "sequential", "merge", "moe")
                for finetune in ("fft", "lora") if method != "moe" or finetune == "lora" or fft_moe}
    assert expected <= runs, f"runs missing from results: {sorted(expected - runs)}"
    scored = {(row["method"], row["finetune"], row["task"]) for row in rows}
    for method, finetune in expected:
        assert {(method, finetune, task) for task in ("Stance", "Notes", "ks_toy")} <= scored, (method, finetune)
