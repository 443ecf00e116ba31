"""Bad input through the CLI: one clear error naming the file and field, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowstack.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_task_dir_without_train_json(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "Task"
    task.mkdir()
    code, err = run(["train", "--model", str(tiny_model_dir), "--task", str(task), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no train.json" in err and str(task) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_json_that_is_not_prompt_answer_objects(tmp_path: Path, tiny_model_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "Task"
    task.mkdir()
    (task / "train.json").write_text(json.dumps([{"prompt": "p", "answer": 3}]))
    (task / "test.json").write_text("[]")
    code, err = run(["train", "--model", str(tiny_model_dir), "--task", str(task), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "train.json" in err and "field 'answer'" in err
    assert not (tmp_path / "o").exists()


def test_model_path_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "Task"
    task.mkdir()
    for split in ("train", "test"):
        (task / f"{split}.json").write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    missing = tmp_path / "no-such-model"
    code, err = run(["train", "--model", str(missing), "--task", str(task), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "model not found" in err and str(missing) in err
    assert not (tmp_path / "o").exists()


def test_unknown_method_in_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("name: x\nbase: {builtin: test}\ntraining: {lr: 0.001}\nmethods: {bagging: {}}\n")
    code, err = run(["study", str(config), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "field 'methods.bagging'" in err and "unknown field" in err
    assert not (tmp_path / "run").exists()


def test_train_and_eval_commands(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "Task"
    task.mkdir()
    items = [{"prompt": f"Question {i}:", "answer": " yes"} for i in range(8)]
    for split in ("train", "test"):
        (task / f"{split}.json").write_text(json.dumps(items))
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_model_dir), "--task", str(task), "--finetune", "lora",
                 "--lr", "1e-3", "--batch-size", "4", "--micro-batch-size", "4", "--out", str(adapter)]) == 0
    assert (adapter / "adapter_config.json").is_file()
    scores = tmp_path / "scores.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--task", str(task),
                 "--metric", "accuracy", "--out", str(scores)]) == 0
    assert 0.0 <= json.loads(scores.read_text())["Task"]["accuracy"] <= 1.0
