"""configs/paper/trace-smoke.yaml end to end on the TRACE-shaped fixtures: every TRACE task and math reads,
trains and is scored under the paper's protocol, through the CLI as a user runs it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from knowstack.cli import main
from knowstack.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "paper" / "trace-smoke.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "trace"
TRACE_TASKS = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]


def smoke_on_fixtures(tmp_path: Path) -> Path:
    """The shipped smoke config, its data paths pointed at the fixtures, and (to keep CI in minutes) one-round
    LoRA with an average merge of its adapters instead of the shipped one-round + sequential LoRA."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["methods"] = {"one-round": {"finetune": ["lora"]}, "merge": {"finetune": ["lora"], "methods": ["average"]}}
    raw["evaluation"]["max_test"] = 2
    for task in raw["tasks"]:
        if task.get("format") == "math":
            task.update(train_file=str(FIXTURES / "math" / "metamathqa_train.json"),
                        test_file=str(FIXTURES / "math" / "gsm8k_test.jsonl"),
                        eval_file=str(FIXTURES / "math" / "gsm8k_train.json"))
        else:
            task["path"] = str(FIXTURES / task["name"])
    path = tmp_path / "trace-smoke.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_smoke_config_names_the_papers_tasks_and_protocol() -> None:
    config = load_config(SMOKE)
    assert [t.name for t in config.tasks] == [*TRACE_TASKS, "math"]
    assert config.evaluation.protocol == "paper" and config.base.builtin == "test"
    assert config.training.max_steps is not None and config.training.max_steps <= 5
    assert all("LLM-CL-Benchmark_500" in str(t.path) for t in config.tasks if t.format == "trace")


@pytest.mark.slow
def test_smoke_config_runs_end_to_end_on_trace_fixtures(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["study", str(smoke_on_fixtures(tmp_path)), "--out", str(out)]) == 0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    new = [r for r in rows if r["kind"] == "new"]
    assert {r["protocol"] for r in new} == {"paper"} and {r["protocol"] for r in rows if r["kind"] == "old"} == {"lm-eval"}
    models = {r["model"] for r in rows}
    assert {"base", "one-round-lora-C-STANCE", "one-round-lora-math", "merge-average-lora"} <= models
    for model in models:
        scored = {(r["task"], r["metric"]) for r in new if r["model"] == model}
        assert {t for t, _ in scored} == {*TRACE_TASKS, "math"}
        assert ("math", "gsm8k") in scored and ("math", "gsm8k_cot") in scored
        assert ("NumGLUE-cm", "exact_match") in scored and ("MeetingBank", "rouge_l") in scored
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    assert "New-knowledge protocol: paper" in (out / "report.md").read_text()
