"""A registry scores through the study's evaluation step, under the protocol it was made with (registry init
--protocol): a composed version's score rows and per-item scores are exactly a study's on the same model and task
files with the same `evaluation.protocol`; a registry made before scores named their protocol reads as the default."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from test_registry import make_finetune, make_task, write_mc_task

from knowstack import api
from knowstack.config import StudyConfig
from knowstack.errors import KnowstackError
from knowstack.registry import Registry, init_registry
from knowstack.registry.compose import compose
from knowstack.registry.contribute import contribute
from knowstack.registry.listing import format_listing
from knowstack.study.builder import PlanBuilder
from knowstack.study.results import collect_items, collect_rows
from knowstack.study.steps import StudyContext, execute


def study_scores(model: Path, tokenizer: Path, tasks: dict[str, tuple[Path, str]], old: Path, protocol: str,
                 out: Path, **harness: object) -> tuple[dict[tuple, tuple], dict[tuple, list[float]]]:
    """The base evaluation of a study with `evaluation.protocol: protocol` on `model`: {(task, kind, metric,
    protocol): (value, n)} and {(kind, task, metric): per-item scores}. harness: old_knowledge's num_fewshot and
    add_bos_token (add_bos_token the evaluation's too)."""
    bos = {"add_bos_token": harness["add_bos_token"]} if "add_bos_token" in harness else {}
    config = StudyConfig.model_validate({
        "name": f"study-{protocol}", "base": {"model": str(model), "tokenizer": str(tokenizer)},
        "tasks": [{"name": name, "path": str(path), "metric": metric} for name, (path, metric) in tasks.items()],
        "old_knowledge": {"tasks": ["ks_toy"], "include_path": str(old), **harness},
        "evaluation": {"protocol": protocol, **bos},
    })
    builder = PlanBuilder(config, out)
    builder.add_base()
    for step in builder.plan.ordered():
        execute(step, StudyContext(out, config))
    rows = collect_rows(builder.plan, out / "artifacts")
    items = {key[1:]: by_seed[None] for key, by_seed in collect_items(builder.plan, out / "artifacts").items()}
    return {(r.task, r.kind, r.metric, r.protocol): (r.value, r.n) for r in rows}, items


def test_a_registry_compose_scores_as_a_study_with_its_protocol(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_mc_task(tmp_path / "old")
    # edit similarity reads the first generated line under builtin and the whole generation (a longer budget) under
    # paper: on any model the two protocols give different numbers, so a registry scoring its own way would show
    tasks = {"Code": (make_task(tmp_path / "tasks", "Code", metric="edit_similarity"), "edit_similarity"),
             "Stance": (make_task(tmp_path / "tasks", "Stance"), "accuracy")}
    finetunes = [make_finetune(tiny_model_dir, tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    studies = {}
    for protocol in ("paper", "builtin"):
        reg = tmp_path / f"reg-{protocol}"
        api.init_registry(reg, tiny_model_dir, old_tasks=["ks_toy"], include_path=tmp_path / "old", protocol=protocol)
        for (name, (path, _)), model in zip(tasks.items(), finetunes, strict=True):
            contribute(reg, name.lower(), model=model, task=path)
        version = compose(reg, "merge-average", gate_old=100.0, gate_task=100.0)
        api.export(reg, version["name"], tmp_path / f"v-{protocol}")
        studies[protocol] = study_scores(tmp_path / f"v-{protocol}", tiny_model_dir, tasks, tmp_path / "old", protocol,
                                         tmp_path / f"study-{protocol}")
        rows, items = studies[protocol]
        mine = {(s["task"], s["kind"], s["metric"], s["protocol"]): (s["value"], s["n"]) for s in version["scores"]}
        assert mine == rows  # the same rows: fields, metric names, values, protocol
        assert {key[3] for key in mine} == {protocol, "lm-eval"}
        kept = version["settings"]["item_scores"]  # the per-item scores the gate compares: the study's
        assert kept == {"new/Code": items[("new", "Code", "edit_similarity")],
                        "new/Stance": items[("new", "Stance", "accuracy")], "old/ks_toy": items[("old", "ks_toy", "acc")]}
        with Registry.open(reg) as registry:
            assert registry.protocol == protocol
            assert format_listing(registry).startswith(f"registry: {reg}  protocol {protocol}\n")  # list says so
            base = registry.base()
        assert base["settings"]["protocol"] == protocol
        assert {(s["task"], s["protocol"]) for s in base["scores"]} == {("ks_toy", "lm-eval"), ("Code", protocol),
                                                                         ("Stance", protocol)}
    paper, builtin = (studies[p][0][("Code", "new", "edit_similarity", p)][0] for p in ("paper", "builtin"))
    assert paper != builtin  # the protocols do score differently here: the equalities above could fail


def test_a_registry_made_before_protocols_reads_as_the_default_and_records_them_from_then_on(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir)
    contribute(reg, "stance", model=make_finetune(tiny_model_dir, tmp_path / "ft", seed=1),
               task=make_task(tmp_path / "tasks", "Stance"))
    # as a registry of an older knowstack holds it: no protocol column, no protocol in the base's settings
    conn = sqlite3.connect(reg / "registry.sqlite")
    conn.execute("ALTER TABLE scores DROP COLUMN protocol")
    settings = json.loads(conn.execute("SELECT settings FROM versions WHERE kind = 'base'").fetchone()[0])
    del settings["protocol"]
    conn.execute("UPDATE versions SET settings = ? WHERE kind = 'base'", (json.dumps(settings),))
    conn.commit()
    conn.close()
    with Registry.open(reg) as registry:
        assert registry.protocol == "builtin"
        [score] = registry.version("stance")["scores"]
        assert (score["metric"], score["protocol"]) == ("accuracy", "builtin")
    contribute(reg, "notes", model=make_finetune(tiny_model_dir, tmp_path / "ft2", seed=2),
               task=make_task(tmp_path / "tasks", "Notes"))
    with Registry.open(reg) as registry:  # the first write since adds the column; old rows keep reading as before
        assert [s["protocol"] for name in ("stance", "notes") for s in registry.version(name)["scores"]] == \
            ["builtin", "builtin"]
    conn = sqlite3.connect(reg / "registry.sqlite")
    assert conn.execute("SELECT protocol FROM scores ORDER BY version_id").fetchall() == [(None,), ("builtin",)]
    conn.close()
    with pytest.raises(KnowstackError, match="unknown protocol 'trace'"):
        init_registry(tmp_path / "other", tiny_model_dir, protocol="trace")
    assert not (tmp_path / "other").exists()


def test_a_task_named_with_a_space_is_contributed_scored_and_composed(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A registry's task is named by its dir; a study's task name allows no space, so the registry's scoring study
    renames it ('Quiz Two' -> 'Quiz_Two', and 'Quiz_Two_' beside a task named 'Quiz_Two') and its rows keep the
    registry's names (contribute failed with pydantic's traceback)."""
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir)
    spaced = make_task(tmp_path / "tasks", "Quiz Two")
    plain = make_task(tmp_path / "tasks", "Quiz_Two", n=2)
    [own] = contribute(reg, "spaced", model=make_finetune(tiny_model_dir, tmp_path / "ft1", seed=1),
                       task=spaced)["scores"]
    assert (own["task"], own["n"]) == ("Quiz Two", 3)
    contribute(reg, "plain", model=make_finetune(tiny_model_dir, tmp_path / "ft2", seed=2), task=plain)
    version = compose(reg, "merge-average", gate_old=100.0, gate_task=100.0)
    assert {(s["task"], s["n"]) for s in version["scores"] if s["kind"] == "new"} == {("Quiz Two", 3), ("Quiz_Two", 2)}
    assert version["status"] == "released"
    assert "(registry init --old-tasks)" in version["settings"]["gate"]["note"]  # the option, not its old alias



def test_a_registry_scores_old_knowledge_with_the_lm_eval_settings_it_was_made_with(tmp_path: Path,
                                                                                   tiny_model_dir: Path) -> None:
    """registry init --num-fewshot / --add-bos-token: recorded with the base, and every score made with them, as a
    study's old_knowledge.num_fewshot and add_bos_token (registries had neither, so a paper study's BOS setting could
    not be matched)."""
    from knowstack.cli import main
    from knowstack.registry.evaluate import stored_old_knowledge

    write_mc_task(tmp_path / "old")
    reg = tmp_path / "reg"
    assert main(["registry", "init", str(reg), "--base", str(tiny_model_dir), "--old-tasks", "ks_toy",
                 "--include-path", str(tmp_path / "old"), "--num-fewshot", "1", "--no-add-bos-token"]) == 0
    with Registry.open(reg) as registry:
        base = registry.base()
        assert base["settings"]["harness"] == {"num_fewshot": 1, "add_bos_token": False}
        old = stored_old_knowledge(registry, tmp_path / "laid", 8)
        assert (old.num_fewshot, old.add_bos_token) == (1, False)  # what every later score reads
    rows, _ = study_scores(tiny_model_dir, tiny_model_dir, {}, tmp_path / "old", "builtin", tmp_path / "study",
                           num_fewshot=1, add_bos_token=False)
    assert {(s["task"], s["kind"], s["metric"], s["protocol"]): (s["value"], s["n"]) for s in base["scores"]} == rows
    plain = init_registry(tmp_path / "plain", tiny_model_dir, old_tasks=["ks_toy"], include_path=tmp_path / "old")
    assert "harness" not in plain["settings"]  # nothing given: the records as before
