"""The merge methods beyond the paper's five, each against its definition on hand-made tensors (task arithmetic,
breadcrumbs, DELLA, SLERP, Multi-SLERP, the Karcher mean, Model Stock); their nonlinear LoRA path; and how the
study plans them (their options enter only their own step keys). mergekit itself: tests/test_merge_oracle.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_merge import merged_tensors, study_config
from transformers import AutoModelForCausalLM

from knowstack.combine.merge import merge_models
from knowstack.combine.merges import METHODS, MergeOptions, get_method
from knowstack.combine.merges.blocks import (
    GRAM_CHUNK,
    della_keep_probabilities,
    dot,
    gram,
    keep_magnitude_band,
    norm,
)
from knowstack.combine.merges.model_stock import interpolation_ratio
from knowstack.config import parse_config
from knowstack.errors import KnowstackError
from knowstack.study.plan import build_plan

E1, E2, E3 = torch.eye(3)


def run(name: str, tensors: list[torch.Tensor], weights: list[float] | None = None, seed: int | None = None,
        **options: float) -> torch.Tensor:
    """A method on copies (methods work in place on what they are given)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    w = torch.tensor(weights or [1.0] * len(tensors), dtype=torch.float64)
    return get_method(name).fn([t.clone() for t in tensors], w, MergeOptions(**options), generator)


def test_task_arithmetic_sums_the_weighted_task_vectors() -> None:
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    torch.testing.assert_close(run("task-arithmetic", [a, b], [2.0, 1.0], lam=0.5), 0.5 * (2 * a + b))


def test_slerp_of_orthogonal_vectors() -> None:
    torch.testing.assert_close(run("slerp", [E1, E2], t=0.5), (E1 + E2) / math.sqrt(2))  # the arc's midpoint
    torch.testing.assert_close(run("slerp", [E1, E2], t=0.0), E1)
    torch.testing.assert_close(run("slerp", [E1, E2], t=1.0), E2)
    third = run("slerp", [2 * E1, 2 * E2], t=1 / 3)  # 30 degrees along the arc, at the norms' scale
    torch.testing.assert_close(third, 2 * (math.cos(math.pi / 6) * E1 + math.sin(math.pi / 6) * E2))
    # nearly colinear: the plain linear interpolation
    near = E1 + 1e-3 * E2
    torch.testing.assert_close(run("slerp", [E1, near], t=0.25), 0.75 * E1 + 0.25 * near)


def test_multislerp_is_the_normalised_mean_direction_at_the_mean_norm() -> None:
    torch.testing.assert_close(run("multislerp", [E1, E2]), (E1 + E2) / math.sqrt(2))
    merged = run("multislerp", [E1, 3 * E2], [1.0, 1.0])
    torch.testing.assert_close(merged, 2 * (E1 + E2) / math.sqrt(2))  # direction of the unit mean, norm (1+3)/2
    with pytest.raises(KnowstackError, match="cancel out"):
        third = torch.tensor([-0.5, math.sqrt(3) / 2, 0.0])
        run("multislerp", [E1, third, torch.tensor([-0.5, -math.sqrt(3) / 2, 0.0])])  # 120 degrees apart
    torch.testing.assert_close(run("multislerp", [E1, -E1]), torch.zeros(3))  # two that cancel: the linear mean


def test_karcher_mean_of_points_on_the_sphere() -> None:
    torch.testing.assert_close(run("karcher", [E1, E2]), (E1 + E2) / math.sqrt(2))
    torch.testing.assert_close(run("karcher", [E1, E2, E3]), torch.ones(3) / math.sqrt(3))
    # weights move the mean along the arc: weights 2:1 put it at a third of the 90 degrees from E1
    merged = run("karcher", [E1, E2], [2.0, 1.0], max_iter=100, tol=1e-9)
    torch.testing.assert_close(merged, math.cos(math.pi / 6) * E1 + math.sin(math.pi / 6) * E2, atol=1e-6, rtol=0)
    torch.testing.assert_close(run("karcher", [2 * E1, 4 * E2]).norm(), torch.tensor(3.0))  # the mean norm


def test_model_stock_ratio_from_the_angle() -> None:
    assert interpolation_ratio(0.5, 2) == pytest.approx(2 / 3)  # 2 cos / (1 + cos) at 60 degrees
    assert interpolation_ratio(1.0, 5) == pytest.approx(1.0)  # identical task vectors: their average
    assert interpolation_ratio(0.0, 3) == 0.0  # orthogonal: the base
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.5, math.sqrt(3) / 2])  # 60 degrees from a
    torch.testing.assert_close(run("model-stock", [a, b]), (2 / 3) * (a + b) / 2)


def test_breadcrumbs_band() -> None:
    tau = torch.arange(1.0, 101.0) * torch.tensor([1.0, -1.0]).repeat(50)  # magnitudes 1..100, signs alternating
    kept = keep_magnitude_band(tau.clone(), density=0.5, gamma=0.1)
    # the 10 largest (91..100) dropped, then the smallest 40 (1..40): 41..90 remain
    assert torch.equal(kept.abs().nonzero().flatten() + 1, torch.arange(41, 91))
    assert torch.equal(kept[kept != 0], tau[40:90])
    # density + gamma > 1: fewer outliers dropped, so that the density is kept (the 5 largest go)
    assert torch.equal(keep_magnitude_band(tau.clone(), 0.95, 0.1).abs().nonzero().flatten() + 1, torch.arange(1, 96))
    assert torch.equal(keep_magnitude_band(tau.clone(), 1.0, 0.1), tau)  # density 1: nothing dropped
    two = run("breadcrumbs", [tau, 2 * tau], [1.0, 0.5], density=0.5, gamma=0.1, lam=2.0)
    torch.testing.assert_close(two, 2 * (kept + kept))  # the weighted sum, not the mean


def test_breadcrumbs_ties_sums_the_agreeing_entries() -> None:
    a, b = torch.tensor([3.0, -1.0, 2.0]), torch.tensor([1.0, 4.0, -1.0])
    merged = run("breadcrumbs-ties", [a, b], density=1.0)
    assert torch.equal(merged, torch.tensor([4.0, 4.0, 2.0]))  # signs by mass (+, +, +); agreeing entries summed


def test_della_keep_probabilities_follow_the_magnitude_rank() -> None:
    probs = della_keep_probabilities(torch.tensor([[3.0, -1.0, 2.0], [0.1, 0.3, -0.2]]), density=0.5, epsilon=0.1)
    torch.testing.assert_close(probs, torch.tensor([[0.6, 0.4, 0.5], [0.4, 0.6, 0.5]]))


def test_della_keeps_large_entries_more_often_and_the_l1_norm() -> None:
    tau = torch.linspace(0.01, 1.0, 10_000) * torch.tensor([1.0, -1.0]).repeat(5_000)
    dropped = run("della", [tau], density=0.4, epsilon=0.3, seed=0)
    torch.testing.assert_close(dropped.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)  # rescaled to the L1 norm
    kept = dropped != 0
    # keep rates by magnitude: 0.1 + 0.6 x rank share (binomial, 1000 entries a bin: +- 0.05 is > 3 sd)
    for i in range(10):
        expected = 0.1 + 0.6 * (i * 1000 + 499.5) / 9999
        assert abs(float(kept[i * 1000:(i + 1) * 1000].float().mean()) - expected) < 0.05
    with pytest.raises(KnowstackError, match=r"density \+- epsilon"):
        get_method("della").check_options(MergeOptions(density=0.2, epsilon=0.25))


def test_declarations_are_consistent() -> None:
    for name, method in METHODS.items():
        assert method.random == (name in ("dare", "ties-dare", "della", "della-linear"))
        assert set(method.options) <= {"density", "drop_rate", "lambda", "seed", "t", "gamma", "epsilon", "max_iter",
                                        "tol", "regmean_alpha", "fisher_floor"}
        assert method.statistics == {"regmean": "gram", "fisher": "fisher"}.get(name)
        assert method.summary
    assert [m for m, method in METHODS.items() if method.coefficients] == ["average", "task-average",
                                                                           "task-arithmetic"]


# --- the nonlinear methods of full weights on LoRA adapters: the base's weight plus each delta -------------
def _adapter(base: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    model.merge_and_unload().save_pretrained(out.with_name(out.name + "-full"))
    return out


@pytest.mark.parametrize("method", ["slerp", "karcher", "task-arithmetic"])
def test_lora_adapters_merge_as_their_full_models(method: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    adapters = [_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=i) for i in range(2)]
    fulls = [a.with_name(a.name + "-full") for a in adapters]
    options = MergeOptions(t=0.3, lam=0.7)
    via_adapters = merged_tensors(merge_models(method, adapters, tmp_path / "ours", base=tiny_model_dir,
                                               options=options))
    via_full = merged_tensors(merge_models(method, fulls, tmp_path / "full", base=tiny_model_dir, options=options))
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in via_adapters.items():
        torch.testing.assert_close(tensor, via_full[name], rtol=0, atol=1e-6)
        if "q_proj" not in name and "down_proj" not in name:
            assert torch.equal(tensor, base[name])  # no adapter touches it: the base's own weight
    record = json.loads((tmp_path / "ours" / "merge.json").read_text())
    assert ("t" in record) == (method == "slerp") and ("max_iter" in record) == (method == "karcher")
    assert (record["adapter"] == "adapter") == (method == "task-arithmetic")  # the linear one is an exact adapter


# --- the study plan ---------------------------------------------------------------------------------------
def _merge_keys(raw: dict) -> dict[str, str]:
    plan = build_plan(parse_config(raw))
    return {step.label: key for key, step in plan.steps.items() if step.kind == "merge"}


def test_new_options_enter_only_their_methods_keys(tmp_path: Path, tiny_model_dir: Path) -> None:
    raw = study_config(tmp_path, tiny_model_dir, {"finetune": ["fft"], "methods": ["ties", "slerp", "breadcrumbs",
                                                                                  "della", "karcher"]})
    before = _merge_keys(raw)
    raw["methods"]["merge"].update({"t": 0.25, "gamma": 0.05})
    after = _merge_keys(raw)
    changed = {label for label in before if before[label] != after[label]}
    assert changed == {"slerp-fft", "breadcrumbs-fft"}
    step = next(s for s in build_plan(parse_config(raw)).steps.values() if s.label == "slerp-fft")
    assert step.params["options"] == {"t": 0.25}


def test_plan_names_the_field_of_a_merge_the_study_cannot_make(tmp_path: Path, tiny_model_dir: Path) -> None:
    raw = study_config(tmp_path, tiny_model_dir, {"methods": ["della"], "density": 0.1})
    with pytest.raises(KnowstackError, match=r"field 'methods\.merge\.epsilon'.*density \+- epsilon"):
        build_plan(parse_config(raw))
    raw["methods"]["merge"] = {"methods": ["model-stock"], "finetune": ["fft"]}
    raw["tasks"] = raw["tasks"][:1]
    with pytest.raises(KnowstackError, match=r"field 'methods\.merge\.methods'.*at least 2 models"):
        build_plan(parse_config(raw))


def test_density_sweeps_reach_the_new_methods_that_read_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    raw = study_config(tmp_path, tiny_model_dir, {"finetune": ["fft"], "methods": ["breadcrumbs", "slerp"],
                                                  "sweep": {"density": [0.5, 0.8]}})
    labels = [step.label for step in build_plan(parse_config(raw)).steps.values() if step.kind == "merge"]
    assert labels.count("breadcrumbs-fft") == 3  # its own setting and the two points
    assert labels.count("slerp-fft") == 1  # density is not SLERP's: one model



def test_gram_is_the_pairwise_dots_and_norms_in_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    # slices of GRAM_CHUNK entries and a short last one
    tensors = [torch.randn(3 * GRAM_CHUNK + 1000, generator=generator).reshape(-1, 8) * scale for scale in (1e-3, 1, 50)]
    products = gram(tensors)
    assert products.dtype == torch.float64 and torch.equal(products, products.T)
    for i, a in enumerate(tensors):
        assert math.isclose(float(products[i, i]) ** 0.5, norm(a), rel_tol=1e-12)
        for j, b in enumerate(tensors[i:], start=i):
            exact = float((a.double() * b.double()).sum())
            assert math.isclose(float(products[i, j]), exact, rel_tol=1e-12, abs_tol=1e-12 * norm(a) * norm(b))
    assert dot(tensors[0], tensors[1]) == float(products[0, 1])  # one implementation: dot is gram's
    assert gram([torch.zeros(0), torch.zeros(0)]).tolist() == [[0.0, 0.0], [0.0, 0.0]]
