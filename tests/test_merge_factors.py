"""LoRA merges in factor space (lora_space: factors) against PEFT's add_weighted_adapter as the oracle."""

from __future__ import annotations

from pathlib import Path

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from knowstack.combine.merge import merge_models
from knowstack.combine.merge_factors import FACTOR_METHODS, merge_lora_factors
from knowstack.combine.merge_methods import MergeOptions
from knowstack.errors import KnowstackError
from knowstack.modelio import load_model

ALPHAS = (8.0, 16.0, 4.0)  # unequal scales, so that PEFT's sqrt(weight * scale) per factor is exercised


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(24, 20, bias=False)


def _randomise(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)  # deltas on the scale of weights


def _peft_with_adapters() -> PeftModel:
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), LoraConfig(r=4, lora_alpha=ALPHAS[0], target_modules=["proj"]),
                           adapter_name="a0")
    for i, alpha in enumerate(ALPHAS[1:], start=1):
        model.add_adapter(f"a{i}", LoraConfig(r=4, lora_alpha=alpha, target_modules=["proj"]))
    _randomise(model, 1)
    return model


def _factors(model: PeftModel) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    layer = model.base_model.model.proj
    return [(layer.lora_A[f"a{i}"].weight.detach().clone(), layer.lora_B[f"a{i}"].weight.detach().clone(),
             layer.scaling[f"a{i}"]) for i in range(len(ALPHAS))]


def _peft_merge(model: PeftModel, combination: str, weights: list[float], density: float | None,
                seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    name = f"m-{combination}-{seed}"
    if seed is None:
        model.add_weighted_adapter([f"a{i}" for i in range(len(ALPHAS))], weights, name,
                                   combination_type=combination, density=density)
    else:
        # add_weighted_adapter first initialises the new adapter (drawing from the global generator); the stream
        # is reseeded where PEFT's own pruning starts, so that its draws are comparable with a seeded generator
        original = getattr(peft_lora_model, combination)
        calls = []

        def reseeded(*args, **kwargs):
            if not calls:
                torch.manual_seed(seed)
            calls.append(1)
            return original(*args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(peft_lora_model, combination, reseeded)
            model.add_weighted_adapter([f"a{i}" for i in range(len(ALPHAS))], weights, name,
                                       combination_type=combination, density=density)
        assert len(calls) == 2  # A, then B
    layer = model.base_model.model.proj
    return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()


@pytest.mark.parametrize("method,combination", [("ties", "ties"), ("average", "linear")])
def test_deterministic_factor_merges_equal_peft(method: str, combination: str) -> None:
    model = _peft_with_adapters()
    weights = [1.0, 0.5, 2.0]
    peft_weights = [w / sum(weights) for w in weights] if method == "average" else weights
    expected_a, expected_b = _peft_merge(model, combination, peft_weights, 0.2)
    merged_a, merged_b = merge_lora_factors(method, _factors(model), weights, MergeOptions(density=0.2))
    torch.testing.assert_close(merged_a, expected_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_b, expected_b, rtol=0, atol=1e-6)
    assert FACTOR_METHODS[method].peft_name == combination


@pytest.mark.parametrize("method,combination", [("ties-dare", "dare_ties"), ("dare", "dare_linear")])
def test_dare_factor_merges_equal_peft_with_the_same_draws(method: str, combination: str) -> None:
    model = _peft_with_adapters()
    expected_a, expected_b = _peft_merge(model, combination, [1.0, 1.0, 1.0], 0.2, seed=7)
    generator = torch.Generator().manual_seed(7)
    merged_a, merged_b = merge_lora_factors(method, _factors(model), [1.0, 1.0, 1.0], MergeOptions(drop_rate=0.8),
                                            generator)
    torch.testing.assert_close(merged_a, expected_a, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_b, expected_b, rtol=0, atol=1e-6)
    # another seed draws other masks: the draws matter and are matched, not ignored
    other = merge_lora_factors(method, _factors(model), [1.0] * 3, MergeOptions(drop_rate=0.8),
                               torch.Generator().manual_seed(8))
    assert not torch.allclose(other[0], expected_a)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("factor-adapters")
    dirs = []
    for i, alpha in enumerate((16.0, 16.0, 8.0)):
        model = get_peft_model(load_model(tiny_model_dir, dtype=torch.float32),
                               LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"]))
        _randomise(model, 10 + i)
        model.save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


def _peft_merged_model(tiny_model_dir: Path, adapters: list[Path], combination: str, weights: list[float]) -> dict:
    model = PeftModel.from_pretrained(load_model(tiny_model_dir, dtype=torch.float32), str(adapters[0]),
                                      adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "merged",
                               combination_type=combination, density=0.2)
    model.set_adapter("merged")
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("method,combination", [("ties", "ties"), ("average", "linear")])
def test_merge_models_in_factor_space_equals_peft(tiny_model_dir: Path, adapters: list[Path], tmp_path: Path,
                                                 method: str, combination: str) -> None:
    """The paper's LoRA TIES (model_merge_seq_ties.py: weights 1.0 each, density 0.2), model for model."""
    weights = [1 / 3] * 3 if method == "average" else [1.0] * 3
    expected = _peft_merged_model(tiny_model_dir, adapters, combination, weights)
    out = merge_models(method, adapters, tmp_path / "merged", base=tiny_model_dir,
                       options=MergeOptions(density=0.2, lora_space="factors"))
    ours = _weights(out)
    assert set(ours) == set(expected) - {"lm_head.weight"} or set(ours) == set(expected)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor.float(), expected[name].float(), rtol=0, atol=1e-6, msg=name)
    # the adapter written beside it is the same merge, loadable by PEFT
    reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir, dtype=torch.float32), str(out / "adapter"))
    for name, tensor in reloaded.merge_and_unload().state_dict().items():
        if name in ours:
            torch.testing.assert_close(tensor, ours[name].float(), rtol=0, atol=1e-5, msg=name)
    # and it is not the delta-space merge, which differs from PEFT's
    delta = _weights(merge_models(method, adapters, tmp_path / "delta", base=tiny_model_dir,
                                  options=MergeOptions(density=0.2)))
    assert any(not torch.allclose(delta[n], ours[n], atol=1e-4) for n in ours if "q_proj" in n)


def test_factor_space_refuses_full_models_and_unknown_spaces(tiny_model_dir: Path, adapters: list[Path],
                                                             tmp_path: Path) -> None:
    with pytest.raises(KnowstackError, match="LoRA adapters only"):
        merge_models("ties", [adapters[0], tiny_model_dir], tmp_path / "x", base=tiny_model_dir,
                     options=MergeOptions(lora_space="factors"))
    with pytest.raises(KnowstackError, match="lora_space"):
        MergeOptions(lora_space="both")
    assert not (tmp_path / "x").exists()


def test_cli_merges_in_factor_space(tiny_model_dir: Path, adapters: list[Path], tmp_path: Path) -> None:
    import json

    from knowstack.cli import main

    out = tmp_path / "cli"
    assert main(["merge", "--method", "ties-dare", "--base", str(tiny_model_dir), "--models", *map(str, adapters),
                 "--drop-rate", "0.8", "--lora-space", "factors", "--out", str(out)]) == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["lora_space"] == "factors" and record["drop_rate"] == 0.8 and record["adapter"] == "adapter"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
