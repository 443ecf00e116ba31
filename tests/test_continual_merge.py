"""Continual merging: the running model merges each task's one-round model in turn, evaluated after every round."""

from __future__ import annotations

from pathlib import Path

from checkpoints import perturbed
from test_compose import tensors
from test_plan import user_config

from knowstack.combine.merge import merge_models
from knowstack.config import parse_config
from knowstack.study.plan import build_plan


def test_the_plan_merges_round_by_round_and_shares_round_one(tmp_path: Path) -> None:
    config = user_config(tmp_path, **{"one-round": {"finetune": ["lora"]},
                                      "continual-merge": {"finetune": ["lora"], "methods": ["average", "ties"]}})
    plan = build_plan(parse_config(config))
    by_name = {e.model: e for e in plan.evaluations}
    # round 1 is the first task's one-round adapter itself: the same evaluation, run once
    assert by_name["continual-merge-lora-average-1"].step == by_name["one-round-lora-t1"].step
    assert [by_name[f"continual-merge-lora-average-{s}"].stage for s in (1, 2, 3)] == [1, 2, 3]
    assert by_name["continual-merge-lora-ties-3"].trained_on == "t3"
    merges = [s for s in plan.ordered() if s.kind == "merge" and s.label.startswith("continual-merge-average")]
    assert [s.params["weights"] for s in merges] == [[1.0, 1.0], [2.0, 1.0]]
    # round 3 merges round 2's model with t3's adapter, and is made from it
    assert merges[1].params["models"][0] == f"@{merges[0].key}" and merges[0].key in merges[1].deps
    ties = [s for s in plan.ordered() if s.kind == "merge" and s.label.startswith("continual-merge-ties")]
    assert ties[0].params["options"] == {"density": 0.2, "lambda": 1.0}
    assert not any(s.kind == "train" and "continual" in s.label for s in plan.ordered())  # no training of its own


def test_equal_weighting_leaves_weights_out(tmp_path: Path) -> None:
    config = user_config(tmp_path, **{"continual-merge": {"finetune": ["fft"], "methods": ["average"],
                                                          "weighting": "equal"}})
    merges = [s for s in build_plan(parse_config(config)).ordered() if s.kind == "merge"]
    assert len(merges) == 2 and all("weights" not in s.params for s in merges)


def test_running_weights_make_a_linear_merge_the_average_of_all_rounds(tmp_path: Path, tiny_model_dir: Path) -> None:
    """What the running weighting promises: after round t, an average merge is the plain average of the t models."""
    models = [perturbed(tiny_model_dir, tmp_path / f"m{i}", seed=i, scale=0.01) for i in range(3)]
    round2 = merge_models("average", models[:2], tmp_path / "round2", base=tiny_model_dir, weights=[1.0, 1.0])
    round3 = merge_models("average", [round2, models[2]], tmp_path / "round3", base=tiny_model_dir,
                          weights=[2.0, 1.0])
    at_once = merge_models("average", models, tmp_path / "all", base=tiny_model_dir)
    running, expected = tensors(round3), tensors(at_once)
    assert running.keys() == expected.keys()
    assert max(float((running[k] - expected[k]).abs().max()) for k in expected) < 1e-6
    # and equal weights would not be: the first models fade
    equal = merge_models("average", [round2, models[2]], tmp_path / "equal", base=tiny_model_dir)
    faded = tensors(equal)
    assert max(float((faded[k] - expected[k]).abs().max()) for k in expected) > 1e-4
