"""A whole study on the built-in world (the `test` preset), through the CLI, as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from knowstack.cli import main
from knowstack.report.build import read_study_results, write_study_report
from knowstack.results import COSTS_CSV, PER_EXAMPLE, read_costs_csv, read_items

TASKS = ["stance", "notes", "summary", "code", "quiz", "simplify", "math"]


def tiny_study(tmp_path: Path, methods: dict | None = None, tasks: list[str] | None = None) -> Path:
    """tasks: built-in task names (default: all of them)."""
    config = {
        "name": "tiny",
        "seed": 0,
        "base": {"builtin": "test"},
        "tasks": {"builtin": tasks} if tasks else "builtin",
        "old_knowledge": {"tasks": "builtin", "limit": 8},
        "training": {"lr_of_pretrain_peak": 0.1, "epochs": 1, "batch_size": 8, "micro_batch_size": 4,
                     "max_length": 128, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "evaluation": {"batch_size": 16, "max_test": 6, "max_new_tokens": {"math": 24, "rouge_l": 16, "sari": 16}},
        "methods": methods or {"one-round": {"finetune": ["lora"]}, "sequential": {"finetune": ["fft", "lora"]}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "run"
    assert main(["study", str(tiny_study(tmp)), "--out", str(out)]) == 0
    return out


def test_results_have_every_model_task_and_metric(finished_study: Path) -> None:
    rows = read_rows(finished_study / "results.csv")
    models = {r["model"] for r in rows}
    expected = {"base"} | {f"one-round-lora-{t}" for t in TASKS}
    expected |= {f"sequential-{f}-{s}" for f in ("fft", "lora") for s in range(1, 8)}
    assert models == expected
    for model in expected:
        new = {(r["task"], r["metric"]) for r in rows if r["model"] == model and r["kind"] == "new"}
        assert {t for t, _ in new} == set(TASKS)
        assert ("math", "em_direct") in new and ("math", "em_cot") in new
        old = {r["task"] for r in rows if r["model"] == model and r["kind"] == "old"}
        assert len(old) >= 4 and all(t.startswith("ks_") for t in old)
    seq = [r for r in rows if r["model"] == "sequential-lora-3"]
    assert {r["stage"] for r in seq} == {"3"} and {r["trained_on"] for r in seq} == {"summary"}
    assert {r["finetune"] for r in rows if r["model"] == "base"} == {""}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)
    # every row with its items' 95% interval, from the per-item scores kept beside the results
    assert all(float(r["ci_low"]) <= float(r["value"]) + 1e-9 and float(r["value"]) <= float(r["ci_high"]) + 1e-9
               for r in rows)
    assert {r["seed"] for r in rows} == {""}  # no `seeds` in the config: no seed column values


def test_report_and_artifacts(finished_study: Path, tmp_path: Path) -> None:
    report = (finished_study / "report.md").read_text()
    # the report reads results only: the same report again from the results files alone (study.json: the plan's part)
    rows, info = read_study_results(finished_study)
    assert info.task_order == TASKS and info.planned and info.title
    write_study_report(tmp_path, rows, info, items=read_items(finished_study / PER_EXAMPLE),
                       costs=read_costs_csv(finished_study / COSTS_CSV))
    assert (tmp_path / "report.md").read_text() == report
    for heading in ("## Base model", "## One-round training", "## Sequential FFT", "## Sequential LoRA"):
        assert heading in report
    assert report.count("| BWT") == 2
    assert (finished_study / "per_example.jsonl").is_file() and " [" in report.split("## Base model", 1)[1]
    assert (finished_study / "results.sqlite").is_file()
    artifacts = finished_study / "artifacts"
    adapters = [p for p in artifacts.iterdir() if p.name.startswith("train-lora-")]
    assert adapters and all((p / "adapter_config.json").is_file() for p in adapters)
    assert not list(artifacts.glob(".*tmp*"))  # nothing half-written left behind
    # how lm-eval ran beside each evaluation's old-knowledge scores: its version and the BOS it used
    settings = [json.loads(p.read_text()) for p in artifacts.glob("eval-*/old-settings.json")]
    assert settings and all(set(s) == {"lm_eval", "add_bos_token", "add_bos_token_setting"} for s in settings)


def test_costs_of_every_model_along_its_lineage(finished_study: Path) -> None:
    """costs.csv: one row per model, each stage of a sequential run counting its rounds and merges so far, and the
    report's cost table reading it."""
    costs = {r["model"]: r for r in read_rows(finished_study / "costs.csv")}
    results = {r["model"] for r in read_rows(finished_study / "results.csv")}
    assert set(costs) == results
    assert costs["base"]["steps"] == "0" and costs["base"]["disk_bytes"] == ""
    one_round = costs["one-round-lora-stance"]
    assert one_round["steps"] == "1" and float(one_round["seconds"]) > 0 and int(one_round["disk_bytes"]) > 0
    assert one_round["peak_gpu_bytes"] == ""  # CPU only: no GPU was used
    assert int(one_round["peak_host_bytes"]) > 10 * 2**20 and one_round["peak_host_scope"] == "step"
    for finetune in ("fft", "lora"):
        stages = [costs[f"sequential-{finetune}-{s}"] for s in range(1, 8)]
        # LoRA: a train and a merge of its adapter per round; FFT: a train per round
        per_round = 2 if finetune == "lora" else 1
        assert [int(c["steps"]) for c in stages] == [per_round * s for s in range(1, 8)]
        examples = [int(c["examples"]) for c in stages]
        seconds = [float(c["seconds"]) for c in stages]
        assert all(b > a for a, b in zip(examples, examples[1:], strict=False))
        assert all(b > a for a, b in zip(seconds, seconds[1:], strict=False))
    # round 1 of sequential LoRA is the one-round LoRA model of the first task: the same training
    assert costs["sequential-lora-1"]["examples"] == one_round["examples"]
    table = {r["run"]: r for r in read_rows(finished_study / "tables" / "cost.csv")}
    assert set(table) == {"one-round LoRA", "sequential FFT", "sequential LoRA"}
    last = costs["sequential-lora-7"]
    assert float(table["sequential LoRA"]["steps"]) == 14
    assert float(table["sequential LoRA"]["examples seen"]) == int(last["examples"])
    assert float(table["sequential LoRA"]["wall seconds"]) == pytest.approx(float(last["seconds"]), abs=0.06)
    assert table["sequential LoRA"]["peak GPU memory (MiB)"] == "no GPU"
    assert "not measured" not in table["sequential LoRA"].values()
    # the same costs in results.sqlite (joinable with the scores) and from the API
    with sqlite3.connect(finished_study / "results.sqlite") as db:
        joined = db.execute("SELECT c.examples, c.seconds FROM costs c JOIN results r ON r.model = c.model "
                            "WHERE c.model = 'sequential-lora-7' AND r.kind = 'new' LIMIT 1").fetchone()
    assert joined == (int(last["examples"]), pytest.approx(float(last["seconds"])))
    from knowstack import api

    by_model = {c.model: c for c in api.study_results(finished_study).costs}
    assert set(by_model) == results and by_model["sequential-lora-7"].examples == int(last["examples"])
    continual = {r["run"]: r for r in read_rows(finished_study / "tables" / "continual.csv")}
    assert set(continual) == {"sequential FFT", "sequential LoRA"} and continual["sequential LoRA"]["mean FWT"]


def test_a_study_made_before_costs_were_recorded_reports_them_not_measured(finished_study: Path,
                                                                        tmp_path: Path) -> None:
    """Artifacts of an older knowstack have no cost in step.json and no peaks in train_summary.json: the report says
    'not measured' for what is missing and still shows what is there (training seconds, examples)."""
    old = tmp_path / "old"
    shutil.copytree(finished_study, old)
    for path in (old / "artifacts").rglob("step.json"):
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "cost"}))
    for path in (old / "artifacts").rglob("train_summary.json"):
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in summary.items() if not k.startswith("peak_")}))
    (old / "costs.csv").unlink()
    assert main(["report", str(old)]) == 0
    row = next(r for r in read_rows(old / "tables" / "cost.csv") if r["run"] == "sequential LoRA")
    assert float(row["steps"]) == 14 and float(row["train seconds"]) > 0 and float(row["examples seen"]) > 0
    assert row["wall seconds"] == row["peak host memory (MiB)"] == row["peak GPU memory (MiB)"] == "not measured"
    assert float(row["disk (MiB)"]) > 0
    assert "| not measured |" in (old / "report.md").read_text()


def test_rerun_skips_everything(finished_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (finished_study / "results.csv").read_text()
    assert main(["study", str(finished_study / "config.yaml"), "--out", str(finished_study)]) == 0
    assert "0 steps run" in capsys.readouterr().err
    assert (finished_study / "results.csv").read_text() == before
    assert main(["study", str(finished_study / "config.yaml"), "--out", str(finished_study), "--dry-run"]) == 0
    assert "to do" not in capsys.readouterr().err


@pytest.mark.slow
def test_kill_minus_nine_then_resume_gives_the_same_results(tmp_path: Path) -> None:
    methods = {"sequential": {"finetune": ["fft", "lora"]}}
    config = tiny_study(tmp_path, methods)
    reference = tmp_path / "reference"
    assert main(["study", str(config), "--out", str(reference)]) == 0

    out = tmp_path / "killed"
    # without the shared cache, which holds the reference's steps: linked, they would finish before the kill
    command = [sys.executable, "-m", "knowstack.cli", "study", str(config), "--out", str(out), "--no-shared-cache"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    # Kill it once a few steps are done and the next one is under way.
    while time.monotonic() < deadline and process.poll() is None:
        done = [p for p in (out / "artifacts").glob("*") if not p.name.startswith(".")] if out.exists() else []
        if len(done) >= 4:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the study finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "results.csv").exists()
    assert main(["study", str(config), "--out", str(out), "--no-shared-cache"]) == 0
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()


def test_a_sweep_study_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A learning-rate sweep on two of the built-in tasks: sweep points as rows, the frontier drawn, advice given."""
    config = yaml.safe_load(tiny_study(tmp_path, {
        "sequential": {"finetune": ["fft", "lora"], "sweep": {"lr_of_pretrain_peak": [0.1, 0.4]}},
        "replay": {"finetune": ["lora"], "sweep": {"fraction": [0.5]}},
    }).read_text())
    config["tasks"] = {"builtin": ["code", "simplify"]}  # the base scores above 0 on both: gains are defined
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "run"
    assert main(["study", str(path), "--out", str(out)]) == 0
    rows = read_rows(out / "results.csv")
    assert {r["task"] for r in rows if r["kind"] == "new"} == {"code", "simplify"}
    points = {(r["method"], r["finetune"], r["point"], r["lr_of_pretrain_peak"], r["fraction"]) for r in rows
              if r["method"] != "base"}
    assert points == {("sequential", "fft", "", "", ""), ("sequential", "fft", "lr_of_pretrain_peak=0.4", "0.4", ""),
                      ("sequential", "lora", "", "", ""), ("sequential", "lora", "lr_of_pretrain_peak=0.4", "0.4", ""),
                      ("replay", "lora", "", "", ""), ("replay", "lora", "fraction=0.5", "", "0.5")}
    assert (out / "figures" / "frontier_old.png").is_file()
    frontier = read_rows(out / "tables" / "frontier.csv")
    assert len(frontier) == 6 and {r["method"] for r in frontier} == {"sequential/fft", "sequential/lora",
                                                                       "replay/lora"}
    capsys.readouterr()
    assert main(["advise", str(out), "--max-old-loss", "100%", "--setting", "full"]) == 0
    printed = capsys.readouterr().out
    assert "Within a 100% old-knowledge loss (fully cooperative" in printed and "use:" in printed
