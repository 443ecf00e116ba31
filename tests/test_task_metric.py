"""A task knows its metric: one resolver (data/tasks.py task_metric) reads it from what defines the task (--metric,
the dir's knowstack-task.json, the built-in world's world.json, the math format, TRACE's task names), and eval,
score, contribute and the API all use it; where nothing defines it, the command asks for it (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_registry import make_adapter, make_task

import knowstack.api as ks
from knowstack.builtin.new_tasks import BUILTIN_TASKS
from knowstack.cli import main
from knowstack.config import METRICS, TaskConfig
from knowstack.data.tasks import TASK_METADATA, TRACE_TASK_METRICS, task_from_config, task_metric
from knowstack.errors import KnowstackError
from knowstack.registry import init_registry

SUMMARIES = [{"prompt": f"Summarize: the council met on day {i} and adopted the plan.", "answer": "adopted the plan"}
             for i in range(3)]


def trace_dir(path: Path, items: list[dict] = SUMMARIES) -> Path:
    """A TRACE-layout task dir (train, eval, test), nothing else in it."""
    path.mkdir(parents=True)
    for split in ("train", "eval", "test"):
        (path / f"{split}.json").write_text(json.dumps(items))
    return path


def world_with_tasks(root: Path) -> Path:
    """A built-in world's layout with the manifest's task list as build_world writes it (world.json "tasks")."""
    (root / "tasks").mkdir(parents=True)
    (root / "world.json").write_text(json.dumps({"preset": "test", "tasks": [t.as_dict() for t in BUILTIN_TASKS]}))
    for task in BUILTIN_TASKS:
        trace_dir(root / "tasks" / task.dir)
    return root


def test_the_built_in_world_says_each_task_s_metric(tmp_path: Path) -> None:
    world = world_with_tasks(tmp_path / "world")
    assert {t.dir: task_metric(world / "tasks" / t.dir).metric for t in BUILTIN_TASKS if t.format == "trace"} == {
        "Stance": "accuracy", "Notes": "accuracy", "Summary": "rouge_l", "Code": "edit_similarity", "Quiz": "accuracy",
        "Simplify": "sari"}
    chosen = task_metric(world / "tasks" / "Summary" / "test.json")  # a split file: its dir's metric
    assert chosen.metric == "rouge_l" and str(world / "world.json") in chosen.source
    # a dir of the same name outside a world is not the world's
    with pytest.raises(KnowstackError, match="nothing defines the metric of task 'Summary'"):
        task_metric(trace_dir(tmp_path / "mine" / "Summary"))


@pytest.mark.parametrize("name", list(TRACE_TASK_METRICS))
def test_trace_s_task_names_say_their_metric(tmp_path: Path, name: str) -> None:
    chosen = task_metric(trace_dir(tmp_path / name))
    assert chosen.metric == TRACE_TASK_METRICS[name] and name in chosen.source


def test_a_metadata_file_beside_the_data_says_it_and_wins_over_the_name(tmp_path: Path) -> None:
    task = trace_dir(tmp_path / "MeetingBank")  # TRACE would say rouge_l
    (task / TASK_METADATA).write_text(json.dumps({"metric": "sari"}))
    chosen = task_metric(task)
    assert chosen.metric == "sari" and chosen.source == str(task / TASK_METADATA)
    assert task_metric(task, given="accuracy").metric == "accuracy"  # --metric overrides everything
    assert task_metric(task, given="accuracy").source == "--metric"


@pytest.mark.parametrize("content, field, said", [
    ({"metric": "bleu"}, "metric", 'unknown metric "bleu"'),
    ({}, "metric", "missing"),
    ({"metric": "sari", "metrics": ["x"]}, "metrics", "unknown field (known: metric)"),
    (["sari"], None, "expected a JSON object"),
    ("{not json", None, "not readable as JSON"),
])
def test_a_bad_metadata_file_is_one_error_naming_file_and_field(tmp_path: Path, content: object, field: str | None,
                                                               said: str) -> None:
    task = trace_dir(tmp_path / "my-task")
    (task / TASK_METADATA).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(KnowstackError) as raised:
        task_metric(task, task_format="math")  # the file is read before any default
    message = str(raised.value)
    assert message.startswith(str(task / TASK_METADATA)) and said in message
    assert (f"field '{field}'" in message) == (field is not None)
    if field == "metric":
        assert ", ".join(METRICS) in message


def test_the_math_format_is_the_math_metric_and_an_unknown_given_metric_is_refused(tmp_path: Path) -> None:
    assert task_metric(trace_dir(tmp_path / "gsm"), task_format="math").metric == "math"
    with pytest.raises(KnowstackError, match="field 'metric': unknown metric 'bleu' .known: accuracy"):
        task_metric(tmp_path / "gsm", given="bleu", option="metric")


def test_a_study_config_keeps_its_own_metric(tmp_path: Path) -> None:
    """In a study the config names each task's metric; that is what the task is scored by."""
    task = trace_dir(tmp_path / "MeetingBank")
    (task / TASK_METADATA).write_text(json.dumps({"metric": "sari"}))
    assert task_from_config(TaskConfig(name="meeting", path=task, metric="accuracy")).metric == "accuracy"


def test_commands_ask_for_a_metric_nothing_defines(tmp_path: Path, tiny_model_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    task = trace_dir(tmp_path / "my-task")
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps(["a"] * len(SUMMARIES)))
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    for command in (["eval", "--model", str(tiny_model_dir), "--task", str(task)],
                    ["eval", "--model", str(tiny_model_dir), "--test-file", str(task / "test.json")],
                    ["score", str(task), "--predictions", str(predictions)],
                    ["contribute", str(reg), "--name", "x", "--adapter", str(adapter), "--task", str(task)]):
        assert main(command) == 2, command
        err = " ".join(capsys.readouterr().err.split())
        assert "nothing defines the metric of task 'my-task': give --metric" in err, command
        assert str(task / TASK_METADATA) in err and "Traceback" not in err
    with ks.open_registry(reg) as opened:
        assert [r["name"] for r in opened.versions()] == ["base"]  # nothing was recorded
    with pytest.raises(KnowstackError, match="give metric"):
        ks.score_predictions(task, ["a"] * len(SUMMARIES))
    with pytest.raises(KnowstackError, match="give metric"):
        ks.evaluate(tiny_model_dir, tasks={"mine": task})


def test_eval_and_score_read_the_same_metric_and_agree(tmp_path: Path, tiny_model_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    world = world_with_tasks(tmp_path / "world")
    for task in (world / "tasks" / "Summary", trace_dir(tmp_path / "MeetingBank")):
        evaluated = ks.score(tiny_model_dir, task, eval_batch_size=3)
        assert set(evaluated.scores) == {"rouge_l"} and evaluated.metric_source == task_metric(task).source
        file = tmp_path / f"{task.name}.jsonl"
        file.write_text("".join(json.dumps({"prediction": row["prediction"]}) + "\n"
                                for row in evaluated.predictions))
        assert ks.score_predictions(task, file).scores == evaluated.scores
        assert main(["score", str(task), "--predictions", str(file), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == evaluated.scores
        out = tmp_path / f"{task.name}.json"
        assert main(["eval", "--model", str(tiny_model_dir), "--task", str(task), "--batch-size", "3",
                     "--out", str(out)]) == 0
        assert json.loads(out.read_text()) == {task.name: evaluated.scores}
        assert f"{task.name}: metric rouge_l (from {task_metric(task).source})" in capsys.readouterr().err
    both = ks.evaluate(tiny_model_dir, tasks={"Code": world / "tasks" / "Code", "Stance": world / "tasks" / "Stance"},
                       eval_batch_size=3)
    assert {name: set(scores) for name, scores in both.items()} == {"Code": {"edit_similarity"}, "Stance": {"accuracy"}}


def test_contribute_records_the_task_s_metric_and_where_it_came_from(tmp_path: Path, tiny_model_dir: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    world = world_with_tasks(tmp_path / "world")
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    assert main(["contribute", str(reg), "--name", "summary", "--adapter", str(adapter), "--task",
                 str(world / "tasks" / "Summary"), "--batch-size", "3"]) == 0
    assert "Summary rouge_l = " in capsys.readouterr().out
    mine = make_task(tmp_path / "tasks", "Mine", metric="sari")
    ks.contribute(reg, "mine", adapter=adapter, task=mine, eval_batch_size=3)
    ks.contribute(reg, "forced", adapter=adapter, task=make_task(tmp_path / "tasks", "Forced", metric=None),
                  metric="exact_match", eval_batch_size=3)
    with ks.open_registry(reg) as opened:
        records = {name: opened.version(name) for name in ("summary", "mine", "forced")}
    expected = {"summary": ("rouge_l", f"the built-in world's {world / 'world.json'}"),
                "mine": ("sari", str(mine / TASK_METADATA)), "forced": ("exact_match", "its contributor (--metric)")}
    for name, (metric, source) in expected.items():
        record = records[name]
        assert record["metric"] == metric and record["settings"]["metric_source"] == source
        assert [s["metric"] for s in record["scores"] if s["kind"] == "new"] == [metric]
    assert main(["show", str(reg), "summary"]) == 0
    assert f"rouge_l from the built-in world's {world / 'world.json'}" in " ".join(capsys.readouterr().out.split())
    assert main(["show", str(reg), "forced"]) == 0
    assert "exact_match from its contributor (--metric)" in " ".join(capsys.readouterr().out.split())
