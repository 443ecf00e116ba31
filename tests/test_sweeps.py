"""Sweeps in the study config: points expanded into steps, shared work built once, swept values as columns."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pytest

from knowstack.config import parse_config
from knowstack.errors import KnowstackError
from knowstack.results import COLUMNS, Row, read_csv, write_csv, write_sqlite
from knowstack.study.plan import build_plan
from tests.test_plan import user_config


def plan_of(tmp_path: Path, training: dict | None = None, **methods: dict):
    raw = user_config(tmp_path, **methods)
    raw["training"].update(training or {})
    return build_plan(parse_config(raw))


def models(plan) -> list[str]:
    return [e.model for e in plan.evaluations]


def train_steps(plan) -> list:
    return [s for s in plan.ordered() if s.kind == "train"]


def test_a_learning_rate_sweep_is_the_own_setting_plus_each_other_value(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, **{"one-round": {"finetune": ["fft"], "sweep": {"lr": [1e-4, 3e-4, 1e-3]}}})
    # the config's own lr (1e-4) is listed too: it is the method's own run, not a second copy
    assert models(plan)[1:] == ["one-round-fft-t1", "one-round-fft-t2", "one-round-fft-t3",
                                "one-round-fft-t1@lr=0.0003", "one-round-fft-t2@lr=0.0003", "one-round-fft-t3@lr=0.0003",
                                "one-round-fft-t1@lr=0.001", "one-round-fft-t2@lr=0.001", "one-round-fft-t3@lr=0.001"]
    lrs = sorted({s.params["training"]["lr"] for s in train_steps(plan)})
    assert lrs == [1e-4, 3e-4, 1e-3] and len(train_steps(plan)) == 9
    by_name = {e.model: e for e in plan.evaluations}
    assert by_name["one-round-fft-t2@lr=0.001"].point == "lr=0.001"
    assert by_name["one-round-fft-t2@lr=0.001"].settings == (("lr", 0.001),)
    assert by_name["one-round-fft-t2"].point == "" and by_name["one-round-fft-t2"].settings == ()


def test_sweeps_per_finetune_and_lora_only_settings(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, **{"one-round": {"finetune": ["fft", "lora"], "sweep": {
        "lr": {"fft": [1e-5], "lora": [1e-3, 3e-3]}, "rank": [8, 16]}}})
    names = models(plan)
    # FFT has no rank: its points are its own and lr=1e-5 only
    assert {n.partition("@")[2] for n in names if n.startswith("one-round-fft")} == {"", "lr=1e-05"}
    assert {n.partition("@")[2] for n in names if n.startswith("one-round-lora")} == {
        "", "lr=0.001", "lr=0.003", "lr=0.001,rank=16", "lr=0.003,rank=16"}
    ranks = {s.params["training"]["lora"]["r"] for s in train_steps(plan) if s.params["finetune"] == "lora"}
    assert ranks == {8, 16}


def test_user_points_and_the_product(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, **{"sequential": {"finetune": ["fft"], "sweep": {"lr": [2e-4], "epochs": [1, 2]},
                                               "points": [{"lr": 5e-4, "max_steps": 7}, {"epochs": 2, "lr": 2e-4}]}})
    points = list(dict.fromkeys(e.point for e in plan.evaluations if e.method == "sequential"))
    # epochs=1 is the config's own value, so (lr=2e-4, epochs=1) is the point lr=2e-4; the second user point
    # repeats a product point and is not run twice
    assert points == ["", "lr=0.0002", "lr=0.0002,epochs=2", "lr=0.0005,max_steps=7"]
    steps = {s.params["training"]["max_steps"] for s in train_steps(plan)}
    assert steps == {None, 7}


def test_sequential_points_share_round_one_with_one_round_at_the_same_point(tmp_path: Path) -> None:
    sweep = {"lr": [1e-4, 1e-3]}
    plan = plan_of(tmp_path, **{"one-round": {"finetune": ["fft"], "sweep": sweep},
                                "sequential": {"finetune": ["fft"], "sweep": sweep}})
    by_name = {e.model: e for e in plan.evaluations}
    assert by_name["sequential-fft-1@lr=0.001"].step == by_name["one-round-fft-t1@lr=0.001"].step
    assert by_name["sequential-fft-1@lr=0.001"].step != by_name["sequential-fft-1"].step
    assert len(train_steps(plan)) == 2 * (3 + 2)


def test_merge_points_reuse_the_one_round_models_and_skip_what_a_method_does_not_read(tmp_path: Path) -> None:
    merge = {"finetune": ["fft"], "methods": ["average", "ties"], "sweep": {"density": [0.2, 0.5, 0.8]}}
    plan = plan_of(tmp_path, **{"one-round": {"finetune": ["fft"]}, "merge": merge})
    names = [n for n in models(plan) if n.startswith("merge")]
    assert names == ["merge-average-fft", "merge-ties-fft", "merge-ties-fft@density=0.5", "merge-ties-fft@density=0.8"]
    assert len(train_steps(plan)) == 3  # the one-round models, once
    densities = sorted(s.params["options"]["density"] for s in plan.ordered() if s.kind == "merge"
                       and s.params["method"] == "ties")
    assert densities == [0.2, 0.5, 0.8]


def test_the_merges_own_settings_t_gamma_epsilon_are_swept_and_columns(tmp_path: Path) -> None:
    merge = {"finetune": ["fft"], "methods": ["breadcrumbs", "della"],
             "sweep": {"gamma": [0.01, 0.05], "epsilon": [0.15, 0.05]}}
    plan = plan_of(tmp_path, **{"one-round": {"finetune": ["fft"]}, "merge": merge})
    names = [n for n in models(plan) if n.startswith("merge")]
    assert names == ["merge-breadcrumbs-fft", "merge-breadcrumbs-fft@gamma=0.05", "merge-della-fft",
                     "merge-della-fft@epsilon=0.05"]
    options = {(s.params["method"], s.params["options"].get("gamma"), s.params["options"].get("epsilon"))
               for s in plan.ordered() if s.kind == "merge"}
    assert options == {("breadcrumbs", 0.01, None), ("breadcrumbs", 0.05, None), ("della", None, 0.15),
                       ("della", None, 0.05)}
    by_name = {e.model: e for e in plan.evaluations}
    assert dict(by_name["merge-della-fft@epsilon=0.05"].settings)["epsilon"] == 0.05
    assert {"t", "gamma", "epsilon"} <= set(COLUMNS)
    with pytest.raises(KnowstackError, match=r"epsilon must be in \[0, 0.5\), got 0.6"):
        plan_of(tmp_path / "bad", **{"one-round": {"finetune": ["fft"]},
                                     "merge": {**merge, "sweep": {"epsilon": [0.6]}}})


def test_replay_fraction_moe_top_k_and_olora_points(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, **{
        "replay": {"finetune": ["lora"], "sweep": {"fraction": [0.1, 0.5]}},
        "moe": {"experts": ["lora"], "router": "random", "sweep": {"top_k": [1, 3]}},
        "olora": {"lambdas": [0.5], "sweep": {"lr": [3e-4]}},
    })
    fractions = {s.params["mixture"]["fraction"] for s in train_steps(plan) if "mixture" in s.params}
    assert fractions == {0.1, 0.5}
    assert {e.model for e in plan.evaluations if e.method == "moe"} == {"moe-lora", "moe-lora@top_k=1",
                                                                           "moe-lora@top_k=3"}
    olora = {e.model: e for e in plan.evaluations if e.method == "olora"}
    assert set(olora) == {f"olora-lora-0.5-{i}{p}" for i in (1, 2, 3) for p in ("", "@lr=0.0003")}
    assert olora["olora-lora-0.5-2@lr=0.0003"].settings == (("lr", 0.0003), ("lambda", 0.5))


@pytest.mark.parametrize(("methods", "field", "message"), [
    ({"one-round": {"sweep": {"density": [0.5]}}}, "methods.one-round.sweep", "'density' cannot be swept here"),
    ({"merge": {"sweep": {"lr": [0.1]}}}, "methods.merge.sweep", "'lr' cannot be swept here"),
    ({"sequential": {"sweep": {"lr": []}}}, "methods.sequential.sweep", "give each value once"),
    ({"sequential": {"sweep": {"lr": [1e-3, 1e-3]}}}, "methods.sequential.sweep", "give each value once"),
    ({"sequential": {"sweep": {"rank": [4.5]}}}, "methods.sequential.sweep", "whole numbers"),
    ({"replay": {"points": [{"fraction": 2}]}}, "methods.replay.points", "at most 1"),
    ({"moe": {"points": [{}]}}, "methods.moe.points", "names at least one setting"),
])
def test_bad_sweeps_name_their_field(tmp_path: Path, methods: dict, field: str, message: str) -> None:
    with pytest.raises(KnowstackError) as err:
        parse_config(user_config(tmp_path, **methods), source="study.yaml")
    assert f"field '{field}'" in str(err.value) and message in str(err.value)


def test_a_point_setting_both_learning_rates_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KnowstackError, match="not both") as err:
        plan_of(tmp_path, **{"sequential": {"points": [{"lr": 1e-3, "lr_of_pretrain_peak": 0.5}]}})
    assert "methods.sequential" in str(err.value)


def test_builtin_task_subset(tmp_path: Path) -> None:
    raw = {"name": "s", "base": {"builtin": "test"}, "tasks": {"builtin": ["quiz", "stance"]},
           "training": {"lr_of_pretrain_peak": 0.3}, "methods": {"sequential": {"finetune": ["fft"]}}}
    plan = build_plan(parse_config(raw))
    assert plan.task_names == ["quiz", "stance"]
    assert [e.trained_on for e in plan.evaluations if e.method == "sequential"] == ["quiz", "stance"]
    raw["tasks"] = {"builtin": ["quiz", "poetry"]}
    with pytest.raises(KnowstackError, match="unknown built-in task 'poetry'") as err:
        build_plan(parse_config(raw))
    assert "tasks.builtin" in str(err.value)


def test_swept_values_are_results_columns(tmp_path: Path) -> None:
    rows = [Row(model="one-round-lora-a@lr=0.001,rank=16", method="one-round", finetune="lora", stage=None, task="a",
                kind="new", metric="accuracy", value=0.5, n=4, trained_on="a", point="lr=0.001,rank=16",
                settings=(("lr", 0.001), ("rank", 16.0))),
            Row(model="base", method="base", finetune="", stage=None, task="a", kind="new", metric="accuracy",
                value=0.1, n=4, trained_on="")]
    write_csv(rows, tmp_path / "results.csv")
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == COLUMNS and {"point", "lr", "rank", "lambda", "top_k"} <= set(header)
    assert read_csv(tmp_path / "results.csv") == rows
    with (tmp_path / "results.csv").open() as handle:
        first = next(csv.DictReader(handle))
    assert (first["point"], first["lr"], first["rank"], first["alpha"]) == ("lr=0.001,rank=16", "0.001", "16", "")
    write_sqlite(rows, tmp_path / "results.sqlite")
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT point, lr, rank, alpha FROM results WHERE method='one-round'").fetchone() == (
            "lr=0.001,rank=16", 0.001, 16.0, None)
