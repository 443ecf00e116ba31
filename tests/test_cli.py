"""Bad input through the CLI: one clear error naming the file and field, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowstack.cli import main


@pytest.fixture(autouse=True)
def narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages never depend on the terminal's width: these run as in a 40-column one, and off a terminal
    (capsys); test_bad_inputs.py runs the CLI with COLUMNS unset too, in process and as a subprocess."""
    monkeypatch.setenv("COLUMNS", "40")


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


def test_train_command_replays_and_penalises_like_a_study_round(tmp_path: Path, tiny_model_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.train.olora import PREVIOUS_A_FILE

    tasks = {}
    for name, word in (("First", " yes"), ("Second", " no")):
        tasks[name] = tmp_path / name
        tasks[name].mkdir()
        items = [{"prompt": f"{name} question {i}:", "answer": word} for i in range(8)]
        for split in ("train", "test"):
            (tasks[name] / f"{split}.json").write_text(json.dumps(items))
    common = ["--model", str(tiny_model_dir), "--finetune", "lora", "--lr", "1e-3", "--batch-size", "4",
              "--micro-batch-size", "4"]
    first = tmp_path / "round1"
    assert main(["train", *common, "--task", str(tasks["First"]), "--out", str(first)]) == 0
    second = tmp_path / "round2"
    assert main(["train", *common, "--task", str(tasks["Second"]), "--replay", str(tasks["First"]),
                 "--replay-fraction", "0.5", "--olora-previous", str(first), "--olora-lambda", "2",
                 "--out", str(second)]) == 0
    mixture = json.loads((second / "mixture.json").read_text())
    assert mixture["examples"] == 8 + 4 and [s["count"] for s in mixture["sources"]] == [8, 4]
    assert [s["task"] for s in mixture["sources"]] == ["Second", "First"]
    summary = json.loads((second / "train_summary.json").read_text())
    assert summary["olora"]["lambda"] == 2 and summary["olora"]["penalty_curve"]
    assert (second / PREVIOUS_A_FILE).is_file()
    code, err = run(["train", *common[:2], "--finetune", "fft", "--task", str(tasks["Second"]), "--olora-previous",
                     str(first), "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "needs --finetune lora" in err and not (tmp_path / "bad").exists()


def test_a_field_from_the_command_line_is_named_as_its_option_and_one_from_a_file_as_its_field() -> None:
    """The same check (combine/moe.py's, the API's and the study config's) names `router_training`; `mix` words it
    as the options that set it, a file's problem keeps its file and field, and `study` (a config) keeps fields."""
    from knowstack.cli import build_parser, commands, worded_for_command
    from knowstack.errors import InputProblems, KnowstackError, Problem

    mix = commands(build_parser())["mix"]
    err = KnowstackError("router training needs examples", field="router_training")
    assert worded_for_command(err, mix, "mix") == "option --train-data/--router-steps: router training needs examples"
    assert worded_for_command(err, commands(build_parser())["study"], "study") == str(err)
    in_file = KnowstackError("not a number", path="p.json", field="top_k")
    assert worded_for_command(in_file, mix, "mix") == "p.json: field 'top_k': not a number"
    both = InputProblems([Problem(None, "too many", "top_k"), Problem("a.json", "bad", "prompt", 2)])
    assert worded_for_command(both, mix, "mix").splitlines()[1:] == [
        "  - option --top-k: too many", "  - a.json: item 2: field 'prompt': bad"]
