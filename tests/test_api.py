"""The Python API: docs/api.md's worked example runs as written and gives what the CLI gives (the same merged
weights, the same scores); a study runs from a config and its rows come back as dataclasses, dicts and a
DataFrame; a registry is built and read through it; `import knowstack` stays cheap."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_compose import tensors
from test_registry import make_adapter, make_task
from test_tracking import tiny_study

import knowstack.api as ks
from knowstack.cli import main
from knowstack.errors import KnowstackError

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
TASKS = ["Stance", "Notes", "Quiz"]


def worked_example() -> str:
    """The python block after the marker comment in docs/api.md."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(r"<!-- tests/test_api.py runs the next block -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found, "docs/api.md lost its worked example"
    return found.group(1)


def test_the_worked_example_runs_and_gives_what_the_cli_gives(tmp_path: Path, tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "base-model")
    for seed, task in enumerate(TASKS, start=1):
        make_adapter(tiny_model_dir, tmp_path / "adapters" / task.lower(), seed=seed)
        make_task(tmp_path / "tasks", task, n=4)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(worked_example(), str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    assert all(f"{task}: accuracy" in printed for task in TASKS)

    # the oracle: the same merge and the same evaluation through the CLI
    adapters = [f"adapters/{task.lower()}" for task in TASKS]
    assert main(["merge", "--method", "ties", "--base", "base-model", "--models", *adapters, "--density", "0.5",
                 "--out", "cli-merged"]) == 0
    mine, theirs = tensors(tmp_path / "out" / "merged"), tensors(tmp_path / "cli-merged")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for task in TASKS:
        assert main(["eval", "--model", "out/merged", "--task", f"tasks/{task}", "--out", f"{task}.json"]) == 0
        assert json.loads(Path(f"{task}.json").read_text())[task]["accuracy"] == namespace["scores"][task]
    both = ks.evaluate("out/merged", tasks={task: f"tasks/{task}" for task in TASKS})
    assert {task: s["accuracy"] for task, s in both.items()} == namespace["scores"]


def test_a_study_runs_and_its_rows_come_back(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tiny_study(tmp_path, tiny_model_dir, [])
    planned = ks.dry_run(path, tmp_path / "run")
    assert {"train", "eval"} <= {s.kind for s in planned} and not any(s.done for s in planned)
    assert all(s.estimate is not None and s.estimate.params > 0 for s in planned)
    study = ks.run_study(path, tmp_path / "run", console=None)
    assert all(s.done for s in ks.dry_run(path, tmp_path / "run"))
    assert study.results_csv.is_file() and study.report.is_file()
    assert {(row.model, row.method) for row in study.rows if row.model == "base"} == {("base", "base")}
    assert {row.method for row in study.rows} == {"base", "sequential"}
    records = study.records()
    assert records == ks.study_results(tmp_path / "run").records()  # read back from the dir alone
    frame = study.dataframe()
    assert len(frame) == len(records) and set(frame.columns) >= {"model", "method", "task", "metric", "value", "n"}
    new = frame[(frame.kind == "new") & (frame.metric == "accuracy")]
    assert sorted(new.model) == sorted(r["model"] for r in records if r["kind"] == "new")
    # the same config as a dict (paths resolved against the current dir) validates the same
    assert ks.load_study(yaml.safe_load(path.read_text())) == ks.load_study(path)
    with pytest.raises(KnowstackError, match="config file not found"):
        ks.load_study(tmp_path / "missing.yaml")


def test_a_registry_through_the_api(tmp_path: Path, tiny_model_dir: Path) -> None:
    reg = tmp_path / "reg"
    ks.init_registry(reg, tiny_model_dir)
    for seed, task in enumerate(TASKS[:2], start=1):
        ks.contribute(reg, task.lower(), adapter=make_adapter(tiny_model_dir, tmp_path / f"a{seed}", seed),
                      task=make_task(tmp_path / "tasks", task), keep_data=True)
    version = ks.compose(reg, "merge-ties", options={"density": 0.5})
    assert version["parents"] == ["stance", "notes"] and version["settings"]["options"]["density"] == 0.5
    assert [r["name"] for r in ks.history(reg)] == ["v1", "notes", "stance", "base"]
    with ks.open_registry(reg) as opened:
        assert opened.version("v1")["content_hash"] == version["content_hash"]


def test_import_knowstack_stays_cheap_and_re_exports_lazily() -> None:
    code = ("import sys, knowstack; assert 'torch' not in sys.modules and 'knowstack.api' not in sys.modules; "
            "assert knowstack.merge is __import__('knowstack.api').api.merge; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"


class ApiReached(Exception):
    """Raised by a stand-in for an API function: the command got past its checks and called the API."""


@pytest.mark.parametrize("command, function, expected", [
    (["train", "--model", "{model}", "--task", "{task}", "--replay", "{other}", "--replay-fraction", "0.5",
      "--lr", "1e-3", "--out", "{out}"], "train", {"replay": ["{other}"], "replay_fraction": 0.5, "seed": 0}),
    (["eval", "--model", "{model}", "--task", "{task}", "--protocol", "paper"], "evaluate", {"protocol": "paper"}),
    (["score", "{trace}/ScienceQA", "--predictions", "{predictions}"], "score_predictions", {"protocol": "builtin"}),
    (["merge", "--method", "ties", "--base", "{model}", "--models", "{adapter}", "{adapter}", "--lora-space",
      "factors", "--max-shard-gb", "1", "--out", "{out}"], "merge", {"lora_space": "factors", "max_shard_gb": 1.0}),
    (["mix", "--base", "{model}", "--models", "{adapter}", "{adapter}", "--train-data", "{task}/train.json",
      "--router-steps", "2", "--router", "random", "--out", "{out}"], "mix",
     {"router_steps": 2, "train_data": ["{task}/train.json"], "router": "random"}),
    (["study", "{config}", "--out", "{out}", "--dry-run", "--gpu-memory", "40"], "dry_run", {"gpu_memory_gib": 40.0}),
    (["study", "{config}", "--out", "{out}"], "run_study", {"executor": "local"}),
    (["registry", "init", "{out}", "--base", "{model}"], "init_registry", {"old_tasks": ()}),
    (["contribute", "{out}", "--name", "a", "--adapter", "{adapter}", "--task", "{task}"], "contribute",
     {"keep_data": False}),
    (["export", "{out}", "v1", "--out", "{out}-export"], "export", {"with_base": False, "overwrite": False}),
])
def test_each_command_is_built_on_the_api(command: list[str], function: str, expected: dict, tmp_path: Path,
                                          tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command checks its arguments, then calls the API function with them (no second implementation)."""
    from test_protocols import FIXTURES, write_predictions

    adapter = tmp_path / "adapter"
    if "{adapter}" in command:
        make_adapter(tiny_model_dir, adapter, seed=1)
    names = {"model": tiny_model_dir, "task": make_task(tmp_path, "Stance"), "other": make_task(tmp_path, "Notes"),
             "adapter": adapter, "out": tmp_path / "out", "trace": FIXTURES,
             "predictions": write_predictions(tmp_path / "p.json", ["A"] * 4, jsonl=False),
             "config": tiny_study(tmp_path, tiny_model_dir, [])}
    fill = {f"{{{name}}}": str(value) for name, value in names.items()}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    calls = []

    def stand_in(*args, **kwargs):
        calls.append((args, kwargs))
        raise ApiReached

    monkeypatch.setattr(ks, function, stand_in)
    with pytest.raises(ApiReached):
        main([filled(part) for part in command])
    (args, kwargs), = calls
    for name, value in expected.items():
        given = kwargs[name]
        assert (list(map(str, given)) if isinstance(value, list) else given) == \
            ([filled(v) for v in value] if isinstance(value, list) else value), name


def test_predictions_made_elsewhere_are_scored_as_the_cli_scores_them(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from test_protocols import FIXTURES, write_predictions

    task = FIXTURES / "ScienceQA"
    references = [r["answer"] for r in json.loads((task / "test.json").read_text())]
    predictions = [references[0][0], "Z", references[2], references[3][:1] + " and more"]
    given = ks.score_predictions(task, predictions, protocol="paper")
    assert (given.task, given.n, given.scores) == ("ScienceQA", 4, {"accuracy": 0.75})
    assert ks.score_predictions(task, write_predictions(tmp_path / "p.jsonl", predictions), protocol="paper") == given
    assert main(["score", str(task), "--predictions", str(tmp_path / "p.jsonl"), "--protocol", "paper",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == given.scores
    with pytest.raises(KnowstackError, match="3 predictions for 4 test items"):
        ks.score_predictions(task, predictions[:3])
