"""Evaluations of several adapters of one base on the base loaded once (study/executors.py run_group): the same
bytes as one model at a time, and a cut-off group resumes."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_local_jobs import _made_files
from test_study import tiny_study

from knowstack.cli import main
from knowstack.config import load_config
from knowstack.study import steps as study_steps
from knowstack.study.executors import one_base_groups
from knowstack.study.plan import build_plan
from knowstack.study.runner import context_for, write_results


def _config(tmp: Path) -> Path:
    return tiny_study(tmp, {"one-round": {"finetune": ["lora"]}}, tasks=["stance", "math"])


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
    # without the shared cache, which holds the reference's evaluations: this study must compute them
    assert main(["study", str(config_path), "--out", str(out), "--jobs", "1", "--no-shared-cache"]) != 0  # the CLI reports the interrupt
    assert [p.name for p in (out / "artifacts").glob("eval-*")] == [calls[0]]
    monkeypatch.setattr(study_steps, "evaluate_model", evaluated)
    assert main(["study", str(config_path), "--out", str(out), "--jobs", "1", "--no-shared-cache"]) == 0
    assert not list((out / "artifacts").glob(".*tmp*"))
    for name in ("results.csv", "per_example.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()


def test_a_group_the_shared_cache_supplies_loads_no_model(grouped: tuple[Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config_path, reference = grouped
    out = tmp_path / "from-cache"
    _without_evaluations(reference, out)

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a model was loaded for evaluations the shared cache holds")

    import knowstack.modelio

    monkeypatch.setattr(knowstack.modelio, "load_model", no_load)
    assert main(["study", str(config_path), "--out", str(out), "--jobs", "1"]) == 0  # the reference filled the cache
    for name in ("results.csv", "per_example.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()
