"""The study plan: steps keyed by what they are made from, shared work done once, dry runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from knowstack.cli import main
from knowstack.config import load_config, parse_config
from knowstack.study.plan import build_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_trace_task(root: Path, name: str, n: int = 4) -> Path:
    task = root / name
    task.mkdir(parents=True)
    for split in ("train", "eval", "test"):
        items = [{"prompt": f"{name} {split} {i}?", "answer": f"a{i}"} for i in range(n)]
        (task / f"{split}.json").write_text(json.dumps(items))
    return task


def user_config(tmp_path: Path, **methods: dict) -> dict:
    tasks = [{"name": n, "path": str(make_trace_task(tmp_path, n)), "metric": "accuracy"} for n in ("t1", "t2", "t3")]
    return {"name": "u", "base": {"model": str(tmp_path / "base")}, "tasks": tasks,
            "old_knowledge": {"tasks": ["ks_x"]}, "training": {"lr": 1e-4},
            "methods": methods or {"one-round": {"finetune": ["fft", "lora"]}, "sequential": {"finetune": ["fft", "lora"]}}}


def test_plan_shares_round_one_with_one_round(tmp_path: Path) -> None:
    plan = build_plan(parse_config(user_config(tmp_path)))
    kinds = [s.kind for s in plan.ordered()]
    # one-round: 3 tasks x 2 finetunes; sequential: 3 rounds x 2, of which round 1 is shared
    assert kinds.count("train") == 6 + 4
    assert kinds.count("merge-adapter") == 3  # sequential LoRA merges each round's adapter
    names = [e.model for e in plan.evaluations]
    assert names[0] == "base" and "sequential-lora-3" in names and "one-round-fft-t2" in names
    by_name = {e.model: e for e in plan.evaluations}
    assert by_name["sequential-fft-1"].step == by_name["one-round-fft-t1"].step
    assert by_name["sequential-fft-2"].stage == 2 and by_name["sequential-fft-2"].trained_on == "t2"


def test_keys_depend_on_settings_and_data(tmp_path: Path) -> None:
    raw = user_config(tmp_path)
    keys = {s.key for s in build_plan(parse_config(raw)).ordered()}
    assert keys == {s.key for s in build_plan(parse_config(raw)).ordered()}  # stable
    raw["training"]["lr"] = 2e-4
    changed = {s.key for s in build_plan(parse_config(raw)).ordered()}
    assert len(keys & changed) == 1  # only the base's evaluation is unaffected by the lr
    (tmp_path / "t3" / "train.json").write_text(json.dumps([{"prompt": "new", "answer": "data"}]))
    retrained = {s.key for s in build_plan(parse_config(raw)).ordered()}
    assert changed - retrained  # a change of a task's data changes what is built from it


def test_steps_depend_only_on_earlier_steps(tmp_path: Path) -> None:
    seen: set[str] = set()
    for step in build_plan(parse_config(user_config(tmp_path))).ordered():
        assert set(step.deps) <= seen
        seen.add(step.key)


def paper_config_with_data(tmp_path: Path) -> Path:
    configs = tmp_path / "configs" / "paper"
    configs.mkdir(parents=True)
    shutil.copy(CONFIGS / "paper" / "llama3-8b-trace.yaml", configs)
    for name in ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "20Minuten"):
        make_trace_task(tmp_path / "data" / "TRACE", name)
    (tmp_path / "data" / "MetaMathQA").mkdir(parents=True)
    (tmp_path / "data" / "MetaMathQA" / "MetaMathQA-395K.json").write_text(
        json.dumps([{"query": "1+1?", "response": "1+1=2. The answer is: 2", "type": "x"}]))
    (tmp_path / "data" / "gsm8k").mkdir()
    (tmp_path / "data" / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n")
    return configs / "llama3-8b-trace.yaml"


def test_paper_config_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = paper_config_with_data(tmp_path)
    plan = build_plan(load_config(path))
    assert plan.task_names == ["cstance", "fomc", "meeting", "py150", "science", "20minuten", "math"]
    assert not any(s.kind == "world" for s in plan.ordered())
    assert main(["study", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    printed = capsys.readouterr().err
    assert "steps, 0 done" in printed
    assert not (tmp_path / "run" / "artifacts").exists()  # a dry run writes nothing


def test_missing_task_data_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = paper_config_with_data(tmp_path)
    (tmp_path / "data" / "TRACE" / "FOMC" / "train.json").unlink()
    assert main(["study", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "FOMC" in err and "train.json" in err and "Traceback" not in err


def test_bad_task_file_names_file_and_field(tmp_path: Path) -> None:
    from knowstack.errors import KnowstackError

    raw = user_config(tmp_path)
    bad = tmp_path / "t2" / "train.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    config = parse_config(raw)
    from knowstack.data.tasks import task_from_config

    with pytest.raises(KnowstackError) as err:
        task_from_config(config.tasks[1]).load("train")
    assert str(bad) in str(err.value) and "'answer'" in str(err.value)
    bad.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(KnowstackError, match="JSON list"):
        task_from_config(config.tasks[1]).load("train")
