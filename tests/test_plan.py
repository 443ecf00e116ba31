"""The study plan: steps keyed by what they are made from, shared work done once, dry runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from knowstack.cli import main
from knowstack.config import load_config, parse_config
from knowstack.study.plan import Step, build_plan

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
        make_trace_task(tmp_path / "data" / "TRACE-Benchmark" / "LLM-CL-Benchmark_5000", name)
    (tmp_path / "data" / "MetaMathQA").mkdir(parents=True)
    (tmp_path / "data" / "MetaMathQA" / "MetaMathQA-395K.json").write_text(
        json.dumps([{"query": "1+1?", "response": "1+1=2. The answer is: 2", "type": "x"}]))
    (tmp_path / "data" / "gsm8k").mkdir()
    (tmp_path / "data" / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n")
    (tmp_path / "data" / "gsm8k" / "train.jsonl").write_text(json.dumps({"question": "3+3?", "answer": "3+3=6\n#### 6"}) + "\n")
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
    (tmp_path / "data" / "TRACE-Benchmark" / "LLM-CL-Benchmark_5000" / "FOMC" / "train.json").unlink()
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


def test_olora_joint_replay_steps_and_model_names(tmp_path: Path) -> None:
    raw = user_config(tmp_path, sequential={"finetune": ["fft", "lora"]}, olora={"lambdas": [0.5, [0, 1, 2]]},
                      joint={"finetune": ["fft", "lora"]}, replay={"finetune": ["fft", "lora"], "fraction": 0.5})
    plan = build_plan(parse_config(raw))
    by_name = {e.model: e for e in plan.evaluations}
    for run in ("0.5", "0_1_2"):
        assert [by_name[f"olora-lora-{run}-{s}"].stage for s in (1, 2, 3)] == [1, 2, 3]
    assert {"joint-fft", "joint-lora"} <= by_name.keys()
    assert {f"replay-{f}-{s}" for f in ("fft", "lora") for s in (1, 2, 3)} <= by_name.keys()
    assert by_name["olora-lora-0.5-2"].method == "olora" and by_name["olora-lora-0.5-2"].finetune == "lora"
    assert by_name["joint-lora"].stage is None and by_name["joint-lora"].trained_on == "t1+t2+t3"
    assert by_name["replay-fft-3"].trained_on == "t3"
    # Round 1 has no earlier adapter / task: it is sequential training's round 1, one shared step.
    for name in ("olora-lora-0.5-1", "olora-lora-0_1_2-1", "replay-lora-1"):
        assert by_name[name].step == by_name["sequential-lora-1"].step
    assert by_name["replay-fft-1"].step == by_name["sequential-fft-1"].step
    assert by_name["olora-lora-0.5-2"].step != by_name["sequential-lora-2"].step
    kinds = [s.kind for s in plan.ordered()]
    # sequential 3 + 3; O-LoRA 2 runs x 2 new rounds; joint 2; replay 2 finetunes x 2 new rounds
    assert kinds.count("train") == 6 + 4 + 2 + 4
    assert kinds.count("merge-adapter") == 3 + 4 + 2

    trains = [s for s in plan.ordered() if s.kind == "train"]
    olora3 = next(s for s in trains if s.label == "lora-t3-olora0_1_2")
    assert olora3.params["olora"]["lambda"] == 2.0 and len(olora3.params["olora"]["previous"]) == 2
    assert {ref[1:] for ref in olora3.params["olora"]["previous"]} <= set(olora3.deps)
    replay3 = next(s for s in trains if s.label == "fft-t3-replay")
    assert [t["name"] for t in replay3.params["mixture"]["earlier"]] == ["t1", "t2"]
    assert replay3.params["mixture"]["fraction"] == 0.5
    joint = next(s for s in trains if s.label == "lora-joint-uniform")
    assert [t["name"] for t in joint.params["tasks"]] == ["t1", "t2", "t3"]
    joint_eval = plan.steps[by_name["joint-lora"].step]
    assert joint_eval.params["model"]["adapter"] == f"@{joint.key}"


def test_rounds_are_titled_on_the_console_and_keep_their_keys(tmp_path: Path) -> None:
    """A sequential, replay or O-LoRA round's steps say which round they are ('lora-t2 (sequential round 2/3)');
    the title is not in the key: the keys are those of the steps without it."""
    raw = user_config(tmp_path, sequential={"finetune": ["lora"]}, olora={"lambdas": [0.5]},
                      replay={"finetune": ["fft"], "fraction": 0.5})
    steps = build_plan(parse_config(raw)).ordered()
    shown = {(s.kind, s.shown) for s in steps}
    assert {("train", "lora-t2 (sequential round 2/3)"), ("merge-adapter", "lora-t2 (sequential round 2/3)"),
            ("train", "lora-t3-olora0.5 (O-LoRA round 3/3)"), ("train", "fft-t2-replay (replay round 2/3)")} <= shown
    untitled = [Step(s.kind, s.label, s.params, s.deps) for s in steps]
    assert [s.key for s in untitled] == [s.key for s in steps] and untitled == steps


def test_per_round_lambdas_need_one_per_round(tmp_path: Path) -> None:
    from knowstack.errors import KnowstackError

    raw = user_config(tmp_path, olora={"lambdas": [0.5, [1, 2]]})
    with pytest.raises(KnowstackError) as err:
        build_plan(parse_config(raw))
    assert "methods.olora.lambdas[1]" in str(err.value) and "one lambda per round (3)" in str(err.value)


def test_olora_replay_joint_steps_run_and_record_their_data(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The new train steps end to end on a tiny model: A_prev and the penalty, the replayed sample."""
    from safetensors.torch import load_file

    from knowstack.study.runner import context_for
    from knowstack.study.steps import execute

    raw = user_config(tmp_path, olora={"lambdas": [5]}, replay={"finetune": ["lora"], "fraction": 0.5},
                      joint={"finetune": ["lora"], "sampling": "uniform"})
    raw["base"]["model"] = str(tiny_model_dir)
    raw["training"] |= {"max_steps": 1, "batch_size": 4, "micro_batch_size": 4, "max_length": 32,
                        "lora": {"r": 2, "alpha": 4, "dropout": 0.0}}
    plan = build_plan(parse_config(raw))
    ctx = context_for(plan, tmp_path / "run")
    for step in plan.ordered():
        if step.kind != "eval":
            execute(step, ctx)
    trains = {s.label: ctx.artifact(s.key) for s in plan.ordered() if s.kind == "train"}

    summary = json.loads((trains["lora-t3-olora5"] / "train_summary.json").read_text())
    assert summary["olora"]["lambda"] == 5.0 and len(summary["olora"]["penalty_curve"]) == summary["steps"] == 1
    previous = load_file(str(trains["lora-t3-olora5"] / "olora_previous_A.safetensors"))
    assert previous and all(t.shape[0] == 2 * 2 for t in previous.values())  # rounds 1 and 2, rank 2 each
    assert "olora" not in json.loads((trains["lora-t1"] / "train_summary.json").read_text())

    mixture = json.loads((trains["lora-t3-replay"] / "mixture.json").read_text())
    assert [(s["task"], s["count"]) for s in mixture["sources"]] == [("t3", 4), ("t1", 2), ("t2", 2)]
    assert mixture["examples"] == 8 and mixture["kind"] == "replay"
    assert json.loads((trains["lora-t3-replay"] / "train_summary.json").read_text())["unique_examples"] == 8
    again = json.loads((trains["lora-t2-replay"] / "mixture.json").read_text())
    assert again["seed"] != mixture["seed"]  # each round draws its own sample
    joint = json.loads((trains["lora-joint-uniform"] / "mixture.json").read_text())
    assert [s["count"] for s in joint["sources"]] == [4, 4, 4] and joint["sampling"] == "uniform"


def test_seeds_repeat_every_trained_model_and_keep_the_keys_of_one_seed(tmp_path: Path) -> None:
    raw = user_config(tmp_path, **{"one-round": {"finetune": ["lora"]}, "sequential": {"finetune": ["fft"]},
                                   "merge": {"finetune": ["lora"], "methods": ["ties"]}})
    single = build_plan(parse_config(raw))
    seeded = build_plan(parse_config({**raw, "seeds": [0, 1, 2]}))
    assert {s.key for s in single.ordered()} <= {s.key for s in seeded.ordered()}  # seed 0 is the one-seed run
    trained = [s for s in seeded.ordered() if s.kind in ("train", "merge")]
    assert {s.params["seed"] for s in trained if s.kind == "train"} == {0, 1, 2}
    assert len(trained) == 3 * len([s for s in single.ordered() if s.kind in ("train", "merge")])
    names = [(e.model, e.seed) for e in seeded.evaluations]
    assert names.count(("base", None)) == 1 and ("sequential-fft-3", 2) in names
    assert len(names) == 1 + 3 * (len(single.evaluations) - 1)
    assert {e.seed for e in single.evaluations} == {None}  # no seed column without `seeds`
    with pytest.raises(Exception, match="seeds"):
        parse_config({**raw, "seeds": [1, 1]})


def test_a_list_of_mixtures_is_one_run_each_and_the_first_keeps_its_keys(tmp_path: Path) -> None:
    from knowstack.errors import KnowstackError

    config = user_config(tmp_path)

    def plan_of(moe: dict | list) -> object:
        return build_plan(parse_config({**config, "methods": {"one-round": {"finetune": ["lora", "fft"]}, "moe": moe}}))

    single = {"experts": ["lora"], "router": "prompts"}
    listed = [single, {"experts": ["lora", "fft"], "router": "hidden"},
              {"experts": ["lora"], "router": "random", "name": "random-trained", "router_training": {"steps": 5}}]
    one, many = plan_of(single), plan_of(listed)
    moe_models = sorted(e.model for e in many.evaluations if e.method == "moe")
    assert moe_models == ["moe-fft-hidden", "moe-lora-hidden", "moe-lora-prompts", "moe-lora-random-trained"]
    # the same mixture, in a list or alone, is the same step (its name is not in what it is made from)
    keys_of = {s.key for s in one.ordered() if s.kind == "moe"}
    assert len(keys_of) == 1 and keys_of <= {s.key for s in many.ordered() if s.kind == "moe"}
    with pytest.raises(KnowstackError, match="two mixtures are named 'prompts'") as error:
        plan_of([single, {"experts": ["lora"], "router": "prompts", "top_k": 1}])
    assert error.value.field == "methods.moe[1].name"
