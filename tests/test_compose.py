"""Composing a registry's next version: the built weights are exactly what the method makes from the stored
contributions, every registered task and old knowledge is scored, the gate decides release with its numbers
recorded, data-needing methods are refused without kept data, a killed compose resumes, and log / show /
diff / export / advise read it all back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_registry import make_adapter, make_finetune, make_task, write_mc_task

from knowstack.cli import main
from knowstack.combine.merge import merge_models
from knowstack.combine.merge_methods import MergeOptions
from knowstack.errors import KnowstackError
from knowstack.evaluate import new_knowledge
from knowstack.registry import Registry, init_registry
from knowstack.registry.compose import METHODS, ComposeOptions, check_start, compose
from knowstack.registry.contribute import contribute
from knowstack.registry.gate import Released, gate_checks, gate_record

TINY_TRAINING = ComposeOptions(lr=1e-3, epochs=1, train_batch_size=2, micro_batch_size=2, max_length=64, lora_r=2,
                               lora_alpha=4, prompts_per_expert=2)


def write_math_task(root: Path) -> Path:
    """A task in the math format: MetaMathQA-style train, GSM8K-style eval and test."""
    task = root / "Math"
    task.mkdir(parents=True)
    train = [{"query": f"What is {i} plus {i}?", "response": f"{i} + {i} = {2 * i}. The answer is: {2 * i}"}
             for i in range(3)]
    (task / "train.json").write_text(json.dumps(train))
    for split in ("eval", "test"):
        items = [{"question": f"What is {i} times 3?", "answer": f"{i} * 3 = {3 * i}\n#### {3 * i}"} for i in range(3)]
        (task / f"{split}.json").write_text(json.dumps(items))
    return task


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.fixture()
def registry(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A registry with old knowledge, two LoRA contributions with their data, one fine-tune without, one math task."""
    write_mc_task(tmp_path / "old")
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir, old_tasks=["ks_toy"], include_path=tmp_path / "old")
    for i, name in enumerate(["Stance", "Notes"], start=1):
        contribute(reg, name.lower(), adapter=make_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=i),
                   task=make_task(tmp_path / "tasks", name), keep_data=True)
    contribute(reg, "quiz-ft", model=make_finetune(tiny_model_dir, tmp_path / "ft", seed=3),
               task=make_task(tmp_path / "tasks", "Quiz"))
    contribute(reg, "math", adapter=make_adapter(tiny_model_dir, tmp_path / "a3", seed=4),
               task=write_math_task(tmp_path / "tasks"), metric="math", task_format="math", keep_data=True)
    return reg


def test_a_ties_version_is_the_ties_merge_of_the_stored_contributions(registry: Path, tmp_path: Path,
                                                                      tiny_model_dir: Path) -> None:
    record = compose(registry, "merge-ties", contributions=["stance", "quiz-ft"], options=ComposeOptions(density=0.5))
    assert record["name"] == "v1" and record["kind"] == "model" and record["parents"] == ["stance", "quiz-ft"]
    assert record["settings"]["options"] == {"density": 0.5, "lam": 1.0}
    # the oracle: the same merge run directly on the files the contributors handed in
    direct = merge_models("ties", [tmp_path / "a1", tmp_path / "ft"], tmp_path / "direct", base=tiny_model_dir,
                          options=MergeOptions(density=0.5))
    with Registry.open(registry) as reg, reg.view("v1") as stored:
        mine, theirs = tensors(stored), tensors(direct)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert not (registry / ".compose").exists() or not any((registry / ".compose").iterdir())
        assert reg.verify(["v1"]) == len(record["files"])
        base = reg.base()
    scored = {(s["task"], s["kind"], s["metric"], s["protocol"]) for s in record["scores"]}
    # the study's evaluation rows: every score of each task (math: direct and chain-of-thought), with its protocol
    assert scored == {("Stance", "new", "accuracy", "builtin"), ("Notes", "new", "accuracy", "builtin"),
                      ("Quiz", "new", "accuracy", "builtin"), ("Math", "new", "em_direct", "builtin"),
                      ("Math", "new", "em_cot", "builtin"), ("ks_toy", "old", "acc", "lm-eval")}
    # the base is scored on every registered task: the gate's first reference
    assert {s["task"] for s in base["scores"] if s["kind"] == "new"} == {"Stance", "Notes", "Quiz", "Math"}
    gate = record["settings"]["gate"]
    assert record["status"] == ("released" if gate["passed"] else "rejected")
    assert gate["passed"] == all(check["passed"] for check in gate["checks"])
    assert {c["what"] for c in gate["checks"]} == {"old AVE", "task Stance", "task Notes", "task Quiz", "task Math"}
    # every check carries the paired interval of version - reference, from the per-item scores both kept
    assert set(record["settings"]["item_scores"]) == {"new/Stance", "new/Notes", "new/Quiz", "new/Math", "old/ks_toy"}
    assert set(base["settings"]["item_scores"]) == {"old/ks_toy"}  # from init; its new tasks' are in the cache
    assert all(c["ci_low"] <= c["value"] - c["reference"] <= c["ci_high"] for c in gate["checks"])
    assert all("items" not in s for s in record["scores"])  # the records keep means; the items are apart


def test_gate_checks_old_knowledge_and_tasks_against_what_the_version_was_built_from() -> None:
    base = Released("base", 0.90, {"a": 0.10, "b": 0.0})
    v2 = Released("v2", 0.80, {"a": 0.40, "b": 0.35})  # released with a looser gate, say; the version is built on it
    checks = gate_checks(0.882, {"a": 0.36, "b": 0.20}, v2, base, old_limit=2.0, task_limit=10.0)
    by_what = {(c.what, c.reference_version): c for c in checks}
    assert set(by_what) == {("old AVE", "v2"), ("old AVE", "base"), ("task a", "v2"), ("task b", "v2")}
    assert by_what[("old AVE", "base")].passed  # 0.882 is exactly 2% below 0.90
    assert by_what[("old AVE", "v2")].passed
    assert by_what[("task a", "v2")].passed  # 0.36 is exactly 10% below v2's 0.40
    failed = by_what[("task b", "v2")]  # 0.20 is 43% below v2's 0.35
    assert not failed.passed and failed.floor == pytest.approx(0.315) and failed.verdict == "fails"
    record = gate_record(checks, 2.0, 10.0, built_from="v2")
    assert not record["passed"] and record["failed"] == [failed.describe()] and record["against"] == "v2"
    assert failed.describe() == ("task b 0.200 vs v2 0.350: -0.150 (-42.9%), no interval (per-item scores not kept); "
                                 "floor 0.315 at -10%: fails")
    below = gate_checks(0.8819, {}, base, base, old_limit=2.0, task_limit=10.0)
    assert [c.passed for c in below] == [False]
    # a task whose reference scores 0 cannot fall below it
    assert gate_checks(None, {"b": 0.0}, base, base, 2.0, 10.0)[0].passed


def test_an_absolute_slack_lets_a_near_zero_task_move_by_one_example() -> None:
    base = Released("base", None, {"math": 0.006, "stance": 0.50})
    strict = gate_checks(None, {"math": 0.0, "stance": 0.44}, base, base, 2.0, 10.0)
    assert [c.passed for c in strict] == [False, False]  # 0.006 -> 0 is -100%; 0.44 is 12% below 0.50
    loose = gate_checks(None, {"math": 0.0, "stance": 0.44}, base, base, 2.0, 10.0, task_slack=0.02)
    math, stance = loose
    assert math.passed and math.floor == pytest.approx(-0.014)  # the points allowance is the larger here
    assert not stance.passed and stance.floor == pytest.approx(0.45)  # and the relative one here (0.45 < 0.48)
    assert stance.describe() == ("task stance 0.440 vs base 0.500: -0.060 (-12.0%), no interval (per-item scores not "
                                 "kept); floor 0.450 at -10% or -0.02 points: fails")
    assert gate_record(loose, 2.0, 10.0, 0.02)["task_slack"] == 0.02


def test_methods_that_need_data_are_refused_for_contributions_without_it(registry: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KnowstackError, match=r"'sequential' trains on the contributions' data, and quiz-ft were "
                                             r"registered without it \(--keep-data\)"):
        compose(registry, "sequential")
    assert main(["compose", str(registry), "--method", "replay", "--contributions", "stance", "quiz-ft"]) == 2
    err = capsys.readouterr().err
    assert "quiz-ft" in err and "--keep-data" in err and "Traceback" not in err
    with pytest.raises(KnowstackError, match=r"'moe-lora' combines adapter contributions, not quiz-ft \(model\)"):
        compose(registry, "moe-lora", contributions=["stance", "quiz-ft"])
    with pytest.raises(KnowstackError, match="router training trains on the contributions' data"):
        compose(registry, "moe-fft", contributions=["quiz-ft"], options=ComposeOptions(router_steps=2))
    with pytest.raises(KnowstackError, match="O-LoRA trains LoRA adapters"):
        compose(registry, "olora", contributions=["stance"], options=ComposeOptions(finetune="fft"))
    with pytest.raises(KnowstackError, match="'nope' is not in this registry"):
        compose(registry, "merge-average", contributions=["nope"])
    with pytest.raises(KnowstackError, match="invalid name"):
        compose(registry, "merge-average", name="../evil")
    with Registry.open(registry) as reg:
        assert [r["name"] for r in reg.versions() if r["method"] not in ("base", "contribution")] == []


def test_moe_lora_by_default_mixes_every_adapter_and_says_what_it_left_out(registry: Path) -> None:
    said: list[str] = []
    record = compose(registry, "moe-lora", options=TINY_TRAINING, say=said.append)
    assert record["kind"] == "adapter" and record["parents"] == ["stance", "notes", "math"]
    assert "left out (not adapter): quiz-ft" in said
    assert {"lora_moe.json", "lora_moe.safetensors", "moe.json"} <= set(record["files"])
    # composing the very same thing again records nothing new
    again = compose(registry, "moe-lora", options=TINY_TRAINING, say=said.append)
    assert again["name"] == record["name"] and "already composed" in said[-1]


def test_training_methods_train_on_the_kept_data(registry: Path) -> None:
    said: list[str] = []
    sequential = compose(registry, "sequential", contributions=["stance", "math"], options=TINY_TRAINING,
                         say=said.append)
    assert sequential["kind"] == "model" and sequential["parents"] == ["stance", "math"]
    # the study's own steps, in order: train on stance, fold the adapter in, train on math from that model, fold in
    assert [m for m in said if m.startswith("step")] == [
        "step 1/4 train: lora-stance (sequential round 1/2)", "step 2/4 merge-adapter: lora-stance (sequential round 1/2)",
        "step 3/4 train: lora-math (sequential round 2/2)", "step 4/4 merge-adapter: lora-math (sequential round 2/2)"]
    joint = compose(registry, "joint", contributions=["stance", "notes"], options=TINY_TRAINING)
    assert joint["kind"] == "adapter" and "adapter_model.safetensors" in joint["files"]
    with Registry.open(registry) as reg, reg.view(joint["name"]) as folder:
        mixture = json.loads((folder / "mixture.json").read_text())
    # each source is a contribution's data, named by the contribution
    assert mixture["kind"] == "joint" and [s["task"] for s in mixture["sources"]] == ["stance", "notes"]
    olora = compose(registry, "olora", contributions=["stance", "notes"], options=TINY_TRAINING)
    assert olora["settings"]["options"]["olora_lambda"] == 0.5 and olora["kind"] == "model"


def test_a_compose_that_dies_midway_leaves_no_version_and_resumes(registry: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_score = new_knowledge.evaluate_task  # what the study's evaluation step scores a task with
    calls = {"n": 0}

    def dies_on_the_third_task(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 + 4:  # 4 base scores first, then the candidate's: die on its third task
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    monkeypatch.setattr(new_knowledge, "evaluate_task", dies_on_the_third_task)
    with pytest.raises(KeyboardInterrupt):
        compose(registry, "merge-average", contributions=["stance", "notes"])
    with Registry.open(registry) as reg:
        assert not [r for r in reg.versions() if r["method"] == "merge-average"]
    [work] = [p for p in (registry / ".compose").iterdir() if p.is_dir()]
    assert not list((registry / ".compose").glob("*.lock"))  # the lock goes with the compose that held it
    assert tensors(work / "model")
    # the evaluation step keeps each finished task, as a study's does
    kept = sorted(p.name for p in (work / "eval" / "artifacts" / ".partial").glob("*/new-*.json"))
    assert kept == ["new-Notes.json", "new-Stance.json"]

    def must_not_rebuild(build) -> None:
        raise AssertionError("the finished build was redone")

    monkeypatch.setitem(METHODS, "merge-average", dataclasses.replace(METHODS["merge-average"], build=must_not_rebuild))
    calls["n"] = -100
    said: list[str] = []
    record = compose(registry, "merge-average", contributions=["stance", "notes"], say=said.append)
    assert any("built before, kept" in m for m in said)
    assert sum(m.startswith("scored on") for m in said) == 4  # kept scores are reported, not re-measured
    assert calls["n"] == -100 + 2  # only the two tasks not scored before
    assert record["name"] == "v1" and not work.exists()


def test_log_show_diff_export_and_advise_read_the_history(registry: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compose", str(registry), "--method", "merge-average", "--contributions", "stance", "notes"]) == 0
    assert main(["compose", str(registry), "--method", "merge-ties", "--name", "ties-all", "--gate-old", "100%",
                 "--gate-task", "100%", "--gate-task-points", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "v1: " in printed and "ties-all: released (merge-ties of 4 contributions, built on base)" in printed
    assert main(["log", str(registry), "--plot", str(tmp_path / "versions.png")]) == 0
    log = capsys.readouterr().out
    assert "(2 versions)" in log and (tmp_path / "versions.png").read_bytes().startswith(b"\x89PNG")
    assert log.index("ties-all") < log.index("v1  [") < log.index("stance  [") < log.index("base  [")
    assert "built on base with 4 contributions: stance, notes, quiz-ft, math" in log
    assert main(["show", str(registry), "ties-all"]) == 0
    shown = capsys.readouterr().out
    assert ("gate:     passed; against base (what it was built from); old knowledge -100% AVE, tasks -100% or -0.05 "
            "points") in shown and "new Math" in shown and "old ks_toy" in shown
    assert "gate: passed; against base" in log.split("ties-all", 1)[1].split("\n\n")[0]
    ave_line = next(line for line in shown.splitlines() if line.strip().startswith("old AVE "))
    assert "95% [" in ave_line and ", n " in ave_line  # each check with its interval and n
    assert main(["diff", str(registry), "v1", "ties-all"]) == 0
    diff = capsys.readouterr().out
    assert "contributions added: quiz-ft, math; left out: none" in diff and "AVE" in diff and "new Quiz" in diff

    assert main(["export", str(registry), "ties-all", "--out", str(tmp_path / "exported")]) == 0
    info = json.loads((tmp_path / "exported" / "knowstack-export.json").read_text())
    assert info["kind"] == "model" and info["parents"] == ["stance", "notes", "quiz-ft", "math"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    with Registry.open(registry) as reg, reg.view("ties-all") as stored:
        assert torch.equal(tensors(stored)["lm_head.weight"], model.lm_head.weight)
    assert main(["export", str(registry), "stance", "--out", str(tmp_path / "adapter"), "--with-base"]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert tensors(tmp_path / "adapter" / "base").keys() == tensors(tmp_path / "exported").keys()
    assert main(["export", str(registry), "stance", "--out", str(tmp_path / "adapter")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

    assert main(["advise", str(registry), "--max-old-loss", "100%"]) == 0
    advice = capsys.readouterr().out
    assert "fully cooperative" not in advice  # quiz-ft kept no data: replay and joint are not open
    assert "use:" in advice and "not yet measured here:" in advice and "moe-lora" in advice
    [versus] = [line for line in advice.splitlines() if "first choice vs runner-up" in line]
    assert " [" in versus and "distinguishable" in versus  # the paired interval of the two versions' AVnew gains


def test_gc_removes_only_what_no_record_points_to(registry: Path, tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.registry import contribute as contribute_module

    def scoring_fails(*args, **kwargs):
        raise KnowstackError("the evaluation died")

    before = {p.name for p in (registry / "objects").rglob("*") if p.is_file()}
    monkeypatch.setattr(contribute_module, "_score", scoring_fails)
    with pytest.raises(KnowstackError, match="the evaluation died"):
        contribute(registry, "late", adapter=make_adapter(tiny_model_dir, tmp_path / "late", seed=9),
                   task=make_task(tmp_path / "tasks", "Late"))
    orphans = {p.name for p in (registry / "objects").rglob("*") if p.is_file()} - before
    assert orphans  # the adapter's weights and the task's splits were stored before scoring failed
    assert main(["registry", "gc", str(registry)]) == 0  # all younger than the grace period: kept
    assert "0 unreferenced files" in capsys.readouterr().out
    assert main(["registry", "gc", str(registry), "--grace-hours", "0", "--dry-run"]) == 0
    assert f"{len(orphans)} unreferenced files" in capsys.readouterr().out
    with Registry.open(registry) as reg:
        removed = reg.collect_garbage(grace_seconds=0)
        assert {p.name for p in removed} == orphans
        assert reg.verify() == len(before)  # every record's objects are still there and intact


def test_building_on_a_release_equals_composing_it_all_at_once(registry: Path) -> None:
    """Round after round: v1 = sequential on stance; v2 = v1 --from, trained on notes. The same training as one
    sequential compose of stance then notes, so the same weights."""
    no_gate = {"gate_old": 100.0, "gate_task": 100.0}
    at_once = compose(registry, "sequential", contributions=["stance", "notes"], options=TINY_TRAINING, **no_gate)
    first = compose(registry, "sequential", contributions=["stance"], options=TINY_TRAINING, **no_gate)
    second = compose(registry, "sequential", contributions=["notes"], start=first["name"], options=TINY_TRAINING,
                     **no_gate)
    assert second["parents"] == [first["name"], "notes"]
    # each is gated against what it was built from: first against the base (not at_once, the release before it),
    # second against first for everything, and against the base too for old knowledge
    assert first["settings"]["gate"]["against"] == "base"
    assert {c["reference_version"] for c in first["settings"]["gate"]["checks"]} == {"base"}
    second_checks = second["settings"]["gate"]["checks"]
    assert second["settings"]["gate"]["against"] == first["name"]
    assert sorted(c["reference_version"] for c in second_checks if c["what"] == "old AVE") == ["base", first["name"]]
    assert {c["reference_version"] for c in second_checks if c["what"] != "old AVE"} == {first["name"]}
    assert all(c["n"] for c in second_checks)  # both kept per-item scores: each check has its n
    with Registry.open(registry) as reg, reg.view(at_once["name"]) as a, reg.view(second["name"]) as b:
        mine, theirs = tensors(b), tensors(a)
        assert mine.keys() == theirs.keys()
        assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) < 1e-6
        with reg.view(first["name"]) as one_round:
            after_one = tensors(one_round)  # each round did train: the two rounds' weights differ
            assert max((mine[k] - after_one[k]).abs().max().item() for k in mine) > 1e-4
    merged = compose(registry, "merge-average", contributions=["math"], start=second["name"], **no_gate)
    assert merged["parents"] == [second["name"], "math"]
    with pytest.raises(KnowstackError, match="an MoE is built from contributions on the base"):
        compose(registry, "moe-lora", start=first["name"])
    with pytest.raises(KnowstackError, match="no version named 'v9'"):
        compose(registry, "sequential", contributions=["notes"], start="v9", options=TINY_TRAINING)
    rejected = {"name": "r1", "kind": "model", "status": "rejected", "files": {}}
    with pytest.raises(KnowstackError, match="'r1' was rejected by the gate: build on a released version"):
        check_start([rejected], "r1", METHODS["sequential"])
    lora_moe = {"name": "m1", "kind": "adapter", "status": "released", "files": {"lora_moe.json": "0" * 64}}
    with pytest.raises(KnowstackError, match="'m1' is a LoRA-MoE"):
        check_start([lora_moe], "m1", METHODS["merge-ties"])


@pytest.mark.slow
def test_kill_minus_nine_midway_then_the_same_command_resumes(registry: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "knowstack.cli", "compose", str(registry), "--method", "merge-average",
               "--contributions", "stance", "notes"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    built = []
    while time.monotonic() < deadline and process.poll() is None and not built:
        built = list((registry / ".compose").glob("*/model/config.json")) if (registry / ".compose").exists() else []
        time.sleep(0.01)
    assert process.poll() is None, "the compose finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)  # the model is built; scoring is under way
    process.wait()
    with Registry.open(registry) as reg:
        assert not [r for r in reg.versions() if r["method"] == "merge-average"]  # no half version
    said: list[str] = []
    record = compose(registry, "merge-average", contributions=["stance", "notes"], say=said.append)
    assert any("built before, kept" in m for m in said)
    with Registry.open(registry) as reg:
        assert [r["name"] for r in reg.versions() if r["method"] == "merge-average"] == [record["name"]]
        assert reg.verify([record["name"]]) == len(record["files"])
    assert not any(p.is_dir() for p in (registry / ".compose").iterdir())


def test_compose_training_launched_on_two_processes_gives_the_in_process_version(tmp_path: Path,
                                                                                 registry: Path) -> None:
    """Training launched as 2 gloo processes (the same global batch): the same weights, and the same version key,
    so a launched re-run of an in-process compose finds it done."""
    options = dataclasses.replace(TINY_TRAINING, finetune="fft", train_batch_size=2, micro_batch_size=1)
    here = compose(registry, "sequential", contributions=["stance"], options=options, gate_old=100.0,
                   gate_task=100.0)
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(registry, copy)
    assert main(["compose", str(copy), "--method", "sequential", "--contributions", "stance", "--finetune", "fft",
                 "--lr", str(options.lr), "--epochs", "1", "--batch-size", "2", "--micro-batch-size", "1",
                 "--max-length", "64", "--lora-r", "2", "--lora-alpha", "4"]) == 0
    # the copy already holds that version: nothing is trained again, launched or not
    with Registry.open(copy) as reg:
        assert [r["name"] for r in reg.versions() if r["method"] == "sequential"] == [here["name"]]
    launched_reg = tmp_path / "launched"
    shutil.copytree(registry, launched_reg)
    with Registry.open(launched_reg) as reg:  # forget the version: compose it again, launched
        reg.records.conn.execute("DELETE FROM scores WHERE version_id IN (SELECT id FROM versions WHERE method='sequential')")
        reg.records.conn.execute("DELETE FROM parents WHERE version_id IN (SELECT id FROM versions WHERE method='sequential')")
        reg.records.conn.execute("DELETE FROM versions WHERE method = 'sequential'")
    from knowstack.train.launch import LaunchSpec

    launched = compose(launched_reg, "sequential", contributions=["stance"], options=options, gate_old=100.0,
                       gate_task=100.0, launch=LaunchSpec(2, cpu=True, mixed_precision="no"))
    with Registry.open(registry) as a, Registry.open(launched_reg) as b, a.view(here["name"]) as one, \
            b.view(launched["name"]) as two:
        mine, theirs = tensors(two), tensors(one)
        assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) < 1e-5
    assert launched["settings"]["compose_key"] == here["settings"]["compose_key"]


def test_compose_moe_lora_takes_mix_router_dtype_and_router_init(registry: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`compose --method moe-lora --router moetify` takes --router-dtype and --router-init as `mix` does (the same
    choices, help and defaults), builds with them, keys a version by them only when given (a version composed before
    they existed keeps its key), refuses them where a mixture cannot take them before the work dir, and moe-fft does
    not read them."""
    from knowstack.cli import build_parser
    from knowstack.cli.vocabulary import commands, options
    from knowstack.registry.compose import options_from

    parsers = dict(commands(build_parser()))
    for flag in ("--router-dtype", "--router-init"):
        mix, comp = (next(a for a in options(parsers[name]) if a.option_strings == [flag]) for name in ("mix", "compose"))
        assert (comp.choices, comp.help, comp.default) == (mix.choices, mix.help, mix.default) and comp.choices
    args = build_parser().parse_args(["compose", str(registry), "--method", "moe-lora", "--router", "moetify",
                                      "--router-dtype", "float16", "--router-init", "moetify"])
    given = options_from(vars(args), "moe-lora")
    assert (given.router_dtype, given.router_init) == ("float16", "moetify")
    spec = METHODS["moe-lora"]
    assert set(spec.settings(ComposeOptions())) == {"top_k", "router", "prompts_per_expert", "router_steps",
                                                    "router_lr", "router_examples_per_task", "max_length", "seed"}
    assert spec.settings(given)["router_dtype"] == "float16" and spec.settings(given)["router_init"] == "moetify"
    with pytest.raises(KnowstackError, match="'moe-fft' does not read --router-dtype") as error:
        options_from({"router_dtype": "float16"}, "moe-fft")
    assert error.value.field == "router_dtype"  # the CLI words it as its flag: "option --router-dtype"
    # moetify's draws are moetify's router's: refused before the compose makes its work dir
    assert main(["compose", str(registry), "--method", "moe-lora", "--router-init", "moetify"]) == 2
    err = capsys.readouterr().err
    assert "option --router-init: 'router_init: moetify'" in err and "Traceback" not in err and not (registry / ".compose").exists()
    options = dataclasses.replace(TINY_TRAINING, router="moetify", router_dtype="float16", router_init="moetify")
    record = compose(registry, "moe-lora", contributions=["stance", "notes"], options=options)
    with Registry.open(registry) as reg, reg.store.view(record["files"]) as built:
        assert json.loads((built / "lora_moe.json").read_text())["router_dtype"] == "float16"
        routers = {k: v for k, v in load_file(built / "lora_moe.safetensors").items() if k.startswith("routers.")}
        moe = json.loads((built / "moe.json").read_text())
    assert routers and all(t.dtype == torch.float16 for t in routers.values())
    assert moe["options"]["router_init"] == "moetify"
