"""Evaluations of several adapters of one base on the base loaded once (study/executors.py run_group), and
generation that drops finished rows (evaluate/generate.py): the same bytes as one model at a time, whole batches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model, build_tiny_tokenizer
from test_local_jobs import _made_files
from test_study import tiny_study

from knowstack.cli import main
from knowstack.config import load_config
from knowstack.evaluate.generate import generate, rows_kept_identical
from knowstack.study import steps as study_steps
from knowstack.study.executors import one_base_groups
from knowstack.study.plan import build_plan
from knowstack.study.runner import context_for, write_results


def _config(tmp: Path) -> Path:
    path = tiny_study(tmp, {"one-round": {"finetune": ["lora"]}})
    config = yaml.safe_load(path.read_text())
    config["tasks"] = {"builtin": ["stance", "math"]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("grouped")
    config = _config(tmp)
    assert main(["study", str(config), "--out", str(tmp / "run"), "--jobs", "1"]) == 0
    return config, tmp / "run"


def _without_evaluations(source: Path, out: Path) -> None:
    shutil.copytree(source, out)
    for made in (out / "artifacts").glob("eval-*"):
        shutil.rmtree(made)


def test_one_base_group_writes_what_each_evaluation_alone_writes(grouped: tuple[Path, Path], tmp_path: Path) -> None:
    config_path, reference = grouped
    plan = build_plan(load_config(config_path), reference)
    groups = {tuple(s.key for s in group) for group in one_base_groups(plan.ordered(), context_for(plan, tmp_path))
              .values()}
    assert len(groups) == 1 and len(next(iter(groups))) == 3  # the base and its two adapters
    out = tmp_path / "alone"
    _without_evaluations(reference, out)
    plan = build_plan(load_config(config_path), out)
    ctx = context_for(plan, out)
    for step in plan.ordered():
        if step.kind == "eval":
            study_steps.execute(step, ctx)  # loaded alone, as before groups
    write_results(plan, out)
    # the evaluations' files (the copied steps name the reference's dir in their cards)
    made = {k: v for k, v in _made_files(out).items() if k.startswith("artifacts/eval-")}
    expected = {k: v for k, v in _made_files(reference).items() if k.startswith("artifacts/eval-")}
    assert made.keys() == expected.keys() and any(k.startswith("artifacts/eval-lora") for k in made)
    assert [k for k in made if made[k] != expected[k]] == []
    for name in ("results.csv", "per_example.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()


def test_a_group_cut_off_keeps_its_finished_steps_and_resumes(grouped: tuple[Path, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config_path, reference = grouped
    out = tmp_path / "cut"
    _without_evaluations(reference, out)
    evaluated = study_steps.evaluate_model
    calls = []

    def killed_on_the_second(step, ctx, where, model, tokenizer):  # noqa: ANN001, ANN202
        calls.append(step.key)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: nothing of the step is left but its temporary dir
        evaluated(step, ctx, where, model, tokenizer)

    monkeypatch.setattr(study_steps, "evaluate_model", killed_on_the_second)
    assert main(["study", str(config_path), "--out", str(out), "--jobs", "1"]) != 0  # the CLI reports the interrupt
    assert [p.name for p in (out / "artifacts").glob("eval-*")] == [calls[0]]
    monkeypatch.setattr(study_steps, "evaluate_model", evaluated)
    assert main(["study", str(config_path), "--out", str(out), "--jobs", "1"]) == 0
    assert not list((out / "artifacts").glob(".*tmp*"))
    for name in ("results.csv", "per_example.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer).eval(), tokenizer


def test_dropping_finished_rows_leaves_every_output_as_the_whole_batch_makes_it(tiny) -> None:  # noqa: ANN001
    """Left padding (prompts of different lengths), rows ending at different steps on a stop string, one at once."""
    model, tokenizer = tiny
    prompts = [("def add(a, b): " * (1 + i % 5))[: 5 + 7 * i] for i in range(20)]
    assert len(rows_kept_identical(model, 20)) > 0  # on this machine's kernels the batch may shrink
    for stops in (["a"], ["e", "("], None):
        whole, dropped = {}, {}
        expected = generate(model, tokenizer, prompts, max_new_tokens=30, batch_size=20, stop_strings=stops,
                            stats=whole, drop_finished=False)
        made = generate(model, tokenizer, prompts, max_new_tokens=30, batch_size=20, stop_strings=stops,
                        stats=dropped, drop_finished=True)
        assert made == expected
        assert whole["row_tokens_saved"] == 0 and dropped["row_tokens"] + dropped["row_tokens_saved"] == \
            whole["row_tokens"]
        if stops == ["a"]:
            assert dropped["row_tokens_saved"] > 0 and len({len(text) for text in made}) > 2


def test_a_batch_shrinks_only_to_sizes_that_compute_alike() -> None:
    """A kernel that sums fewer rows another way: no size below the batch is allowed then."""
    class Odd(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(Odd(8, 8))
    assert rows_kept_identical(model, 64) == [8, 16, 24, 32, 40, 48, 56] or rows_kept_identical(model, 64) == []
    original = torch.nn.functional.linear
    try:
        torch.nn.functional.linear = lambda x, w, b=None: original(x, w, b) + (x.shape[0] < 64) * 1e-7
        assert rows_kept_identical(torch.nn.Sequential(torch.nn.Linear(8, 9)), 64) == []
    finally:
        torch.nn.functional.linear = original
