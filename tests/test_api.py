"""The Python API: docs/api.md's worked example runs as written and gives what the CLI gives (the same merged
weights, the same scores); a study runs from a config and its rows come back as dataclasses, dicts and a
DataFrame; a registry is built and read through it; `import knowstack` stays cheap."""

from __future__ import annotations

import json
import re
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


# knowstack's own lines on stderr: its training and pretraining bars, its messages
OWN_LINES = re.compile(r"(train |pretrain base|knowstack)")


def stderr_lines(text: str) -> list[str]:
    """What reached stderr, one entry per line or progress-bar redraw."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def test_the_worked_example_runs_from_an_empty_dir_and_gives_what_the_cli_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """The page's block makes its own inputs (a `test` world, three quick adapters), prints scores that are not all
    zero, writes none of the libraries' chatter to stderr, and gives what the same merge and evaluation through
    the CLI give."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(worked_example(), str(DOC), "exec"), namespace)
    printed, errors = capfd.readouterr()
    lines = [line for line in printed.splitlines() if ": accuracy" in line]
    assert [line.split(":")[0] for line in lines] == TASKS
    alone = [float(re.search(r"accuracy ([0-9.]+) with its own adapter", line).group(1)) for line in lines]
    assert all(score > 0 for score in alone), printed  # each quick adapter learned its task
    assert sum(namespace["scores"].values()) > 0, printed  # and the merge kept some of it
    assert [line for line in stderr_lines(errors) if not OWN_LINES.match(line)] == []

    # the oracle: the same merge and the same evaluation through the CLI
    adapters = [f"adapters/{task.lower()}" for task in TASKS]
    assert main(["merge", "--method", "ties", "--base", "world/model", "--models", *adapters, "--density", "0.5",
                 "--out", "cli-merged"]) == 0
    mine, theirs = tensors(tmp_path / "out" / "merged"), tensors(tmp_path / "cli-merged")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for task in TASKS:
        assert main(["eval", "--model", "out/merged", "--task", f"world/tasks/{task}", "--metric", "accuracy",
                     "--out", f"{task}.json"]) == 0
        assert json.loads(Path(f"{task}.json").read_text())[task]["accuracy"] == namespace["scores"][task]
    both = ks.evaluate("out/merged", tasks={task: f"world/tasks/{task}" for task in TASKS}, metric="accuracy")
    assert {task: s["accuracy"] for task, s in both.items()} == namespace["scores"]


QUIET_SCRIPT = """
import sys
import knowstack.api as ks
model, task, include, out = sys.argv[1:5]
ks.train(model, task, out, finetune="lora", max_steps=1)
tasks = {"Stance": task}
ks.evaluate(model, adapter=out, tasks=tasks, old_tasks=["ks_toy"], include_path=include, limit=4)
print("--- the same evaluation, not quieted", file=sys.stderr, flush=True)
ks.evaluate.__wrapped__(model, adapter=out, tasks=tasks, old_tasks=["ks_toy"], include_path=include, limit=4)
"""


def test_api_calls_write_only_knowstacks_own_lines_to_stderr(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A program that configured no logging: train and evaluate (new and old knowledge) through the API leave
    stderr to knowstack's own lines, as the CLI does; the same evaluation without the quieting shows the
    libraries' chatter (the control: what the quieting removes)."""
    from test_evaluate import write_mc_task

    (tmp_path / "old").mkdir()
    write_mc_task(tmp_path / "old")
    args = [str(tiny_model_dir), str(make_task(tmp_path / "tasks", "Stance")), str(tmp_path / "old"),
            str(tmp_path / "adapter")]
    done = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    quiet, _, loud = done.stderr.partition("--- the same evaluation, not quieted")
    assert [line for line in stderr_lines(quiet) if not OWN_LINES.match(line)] == []
    assert any(line.startswith("train ") for line in stderr_lines(quiet))  # knowstack's own bar stays
    assert "Loading weights" in loud


def test_library_chatter_goes_to_the_programs_logging_or_nowhere(caplog: pytest.LogCaptureFixture,
                                                                 capfd: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside an API call a library's warning and log record reach the program's logging where it is configured
    (here pytest's handler on the root logger), are dropped where it is not, and never reach stderr; the
    libraries' loggers are as they were afterwards."""
    import logging
    import warnings

    from knowstack.logs import quiet_libraries

    def chatter() -> None:
        warnings.warn_explicit("old name", FutureWarning, "/venv/site-packages/transformers/utils.py", 1)
        logging.getLogger("transformers.modeling_utils").warning("a library's warning")

    library = logging.getLogger("transformers")
    # transformers' own default level (the CLI, run in this process by other tests, sets it to ERROR)
    monkeypatch.setattr(library, "level", logging.WARNING)
    before = (library.handlers[:], library.propagate, library.level)
    with caplog.at_level(logging.WARNING), quiet_libraries():
        chatter()
    assert {record.name for record in caplog.records} == {"py.warnings", "transformers.modeling_utils"}
    assert capfd.readouterr().err == ""
    caplog.clear()
    root = logging.getLogger()
    configured = root.handlers
    root.handlers = []  # a program that configured no logging
    try:
        with quiet_libraries():
            chatter()
    finally:
        root.handlers = configured
    assert capfd.readouterr().err == "" and caplog.records == []
    assert (library.handlers, library.propagate, library.level) == before


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
    (["registry", "init", "{out}", "--base", "{model}"], "init_registry", {"old_tasks": (), "protocol": "builtin"}),
    (["registry", "init", "{out}", "--base", "{model}", "--protocol", "paper"], "init_registry", {"protocol": "paper"}),
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
