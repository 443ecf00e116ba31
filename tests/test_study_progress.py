"""The study's own progress line: step N of M and the time left, estimated from the steps finished (seconds per
parameter, per kind of step) and the dry run's per-step sizes; the running step's training bar is a row under it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from knowstack import progress as bars
from knowstack.study import progress as study_progress
from knowstack.study.plan import Step
from knowstack.study.progress import StudyProgress, TimeLeft, format_seconds


def steps() -> list[Step]:
    return [Step("eval", "base", {"n": 0}), Step("train", "a", {"n": 1}), Step("train", "b", {"n": 2}),
            Step("eval", "a", {"n": 3}), Step("merge", "ab", {"n": 4})]


def test_time_left_scales_each_kinds_measured_rate_by_step_size() -> None:
    s = steps()
    left = TimeLeft({s[1].key: 100.0, s[2].key: 300.0, s[3].key: 100.0, s[4].key: 50.0})
    assert left.left(s[2:]) is None  # nothing measured yet: no estimate
    left.record(s[1], 20.0)  # train: 0.2 s per parameter
    assert left.left([s[2]]) == pytest.approx(60.0)
    # eval and merge are not measured yet: they take the mean rate of what is
    assert left.left(s[2:]) == pytest.approx(0.2 * (300 + 100 + 50))
    left.record(s[3], 5.0)  # eval: 0.05 s per parameter; the mean over all runs is now 25 s / 200
    assert left.left([s[3]]) == pytest.approx(5.0) and left.left([s[4]]) == pytest.approx(50 * 25 / 200)
    assert format_seconds(3725.4) == "1:02:05"


def test_the_study_line_counts_steps_and_hosts_the_steps_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 40.0])
    monkeypatch.setattr(study_progress.time, "monotonic", lambda: next(clock))
    s = steps()
    sizes = {step.key: 10.0 for step in s}
    console = Console(file=io.StringIO(), width=120)
    with StudyProgress(s, console, sizes) as shown:
        study = shown.progress.tasks[0]
        shown.skip(s[0])
        assert study.completed == 1 and study.description == "study: step 2 of 5"
        shown.start(s[1], 2)
        bar = bars.step_bar(range(3), "train a")  # what the training loop asks for while a study runs
        rows = [t.description.strip() for t in shown.progress.tasks]
        assert rows == ["study: step 2 of 5", "train a", "train a"] and shown.progress.tasks[2].total == 3
        assert list(bar) == [0, 1, 2]
        shown.finish(s[1])
        assert study.completed == 2 and study.fields["left"] == f"left: ~{format_seconds(3 * 40.0)}"
        assert [t.description for t in shown.progress.tasks] == ["study: step 3 of 5"]
    assert bars._sink is None  # a training run after the study gets tqdm again
    text = console.file.getvalue()
    assert "step 2/5 train: a" in text and "done in 40.0 s" in text


def test_steps_run_apart_count_among_the_studys_steps() -> None:
    """The built-in world is built before the rest (its fingerprint keys them): it is step 1 of the study's steps,
    not of its own run, and the rest go on from 2."""
    s = steps()
    console = Console(file=io.StringIO(), width=120)
    with StudyProgress(s[:1], console, total=len(s)) as shown:
        shown.start(s[0], 1)
        assert shown.progress.tasks[0].description == "study: step 1 of 5"
        shown.finish(s[0])
    with StudyProgress(s, console) as shown:
        shown.skip(s[0])
        shown.start(s[1], 2)
    text = console.file.getvalue()
    assert "step 1/5 eval: base" in text and "step 2/5 train: a" in text and "/1 " not in text


def test_steps_side_by_side_each_have_a_row_and_share_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two steps running at once (the local executor's jobs): a row each, each 'done' line names its step, and the
    time left is the remaining steps' sum over the 2 jobs."""
    clock = iter([0.0, 1.0, 30.0, 41.0])
    monkeypatch.setattr(study_progress.time, "monotonic", lambda: next(clock))
    s = steps()
    console = Console(file=io.StringIO(), width=120)
    with StudyProgress(s, console, {step.key: 10.0 for step in s}, jobs=2) as shown:
        study = shown.progress.tasks[0]
        shown.start(s[1], 2)
        shown.start(s[2], 3)
        assert [t.description.strip() for t in shown.progress.tasks][1:] == ["train a", "train b"]
        shown.finish(s[1])  # 30 s: 3 s per parameter; left: the 4 other steps at that rate, over 2 jobs
        assert study.fields["left"] == f"left: ~{format_seconds(4 * 30.0 / 2)}"
        assert [t.description.strip() for t in shown.progress.tasks][1:] == ["train b"]
        shown.finish(s[2])
    text = console.file.getvalue()
    assert "done train: a in 30.0 s" in text and "done train: b in 40.0 s" in text


def test_the_world_built_first_is_counted_among_the_studys_steps(tmp_path) -> None:
    """The runner builds the world alone first (its fingerprint keys the rest), then runs the whole plan: both runs
    count the study's steps, so the console says 'step 1/N world', then 'step 2/N'."""
    import json

    from knowstack.config import parse_config
    from knowstack.study.executors import Progress
    from knowstack.study.runner import run_study

    calls = []

    class Recording:  # the world "built" (its world.json), nothing else run
        def run(self, steps, ctx, console, total=None):
            calls.append((len(steps), total))
            for step in steps:
                if step.kind == "world":
                    (ctx.artifact(step.key)).mkdir(parents=True, exist_ok=True)
                    (ctx.artifact(step.key) / "world.json").write_text(json.dumps({"fingerprint": "f00d"}))
            return Progress(ran=1 if total else 0)

    config = parse_config({"name": "w", "base": {"builtin": "test"}, "tasks": "builtin",
                           "old_knowledge": {"tasks": "builtin"}, "training": {"lr": 1e-3},
                           "methods": {"sequential": {"finetune": ["lora"]}}})
    run_study(config, tmp_path / "study", console=Console(file=io.StringIO()), executor=Recording(),
              shared_cache=False)  # a world another test built would be linked, not run
    (world, total), (whole, none) = calls
    assert world == 1 and total == whole > 10 and none is None
