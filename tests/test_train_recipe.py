"""`knowstack train` on a built-in world's model runs the world's recipe (its study config's `training:`, the rate a
fraction of the world's own pretraining peak), not the paper's 2e-5 for an 8B model, which teaches a tiny model
nothing; --lr-of-pretrain-peak sets that fraction; a run whose loss did not fall says so on stderr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_registry import make_task

from knowstack.builtin.world import PRESETS, RECIPE_CONFIGS, world_of_model, world_recipe
from knowstack.cli import main
from knowstack.config import CONFIG_DIR
from knowstack.train.loop import loss_fell

PEAK = 0.003


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A built-in world's layout (WORLD/model beside WORLD/world.json) around the tiny model: only the manifest's
    preset and pretraining peak are read."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_model_dir, root / "model")
    (root / "world.json").write_text(json.dumps({"preset": "test", "pretrain": {"peak_lr": PEAK}}))
    make_task(root / "tasks", "Stance", n=8)
    return root


def quick_recipe() -> dict:
    return yaml.safe_load((CONFIG_DIR / "builtin-quick.yaml").read_text())["training"]


def trained(world: Path, out: Path, *options: str) -> dict:
    assert main(["train", "--model", str(world / "model"), "--task", str(world / "tasks" / "Stance"),
                 "--max-steps", "1", *options, "--out", str(out)]) == 0
    return json.loads((out / "train_summary.json").read_text())["settings"]


def test_every_preset_has_a_recipe_from_its_own_study_config() -> None:
    assert set(RECIPE_CONFIGS) == set(PRESETS)
    for preset, name in RECIPE_CONFIGS.items():
        config = yaml.safe_load((CONFIG_DIR / name).read_text())
        assert config["base"]["builtin"] == ("quick" if preset == "test" else preset)
        assert config["training"]["lr_of_pretrain_peak"] > 0  # a rate that scales with the world


def test_a_worlds_model_is_known_by_its_manifest(world: Path, tiny_model_dir: Path) -> None:
    assert world_of_model(world / "model")["pretrain"]["peak_lr"] == PEAK
    assert world_of_model(tiny_model_dir) is None and world_of_model(world) is None
    assert world_recipe(world_of_model(world / "model")) == ("builtin-quick.yaml", quick_recipe())


def test_train_on_a_worlds_model_runs_the_worlds_recipe(world: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    recipe = quick_recipe()
    settings = trained(world, tmp_path / "default", "--micro-batch-size", "4")
    assert settings["lr"] == pytest.approx(recipe["lr_of_pretrain_peak"] * PEAK)
    assert (settings["batch_size"], settings["max_length"], settings["lora_r"]) == (
        recipe["batch_size"], recipe["max_length"], recipe["lora"]["r"])
    assert settings["micro_batch_size"] == 4  # an option given wins over the recipe
    err = capsys.readouterr().err
    assert "its recipe (configs/builtin-quick.yaml" in err and f"x the pretraining peak {PEAK:g}" in err
    assert trained(world, tmp_path / "fraction", "--lr-of-pretrain-peak", "1")["lr"] == pytest.approx(PEAK)
    assert trained(world, tmp_path / "lr", "--lr", "1e-4")["lr"] == pytest.approx(1e-4)


def test_a_fraction_of_the_peak_needs_a_worlds_model(tiny_model_dir: Path, world: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_model_dir), "--task", str(world / "tasks" / "Stance"),
                 "--lr-of-pretrain-peak", "0.3", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--lr-of-pretrain-peak" in err and "give --lr" in err
    assert not (tmp_path / "out").exists()


def test_loss_fell_compares_the_first_and_last_quarters() -> None:
    assert loss_fell([6.5546, 6.5646]) is False
    assert loss_fell([6.5, 6.4]) is True
    assert loss_fell([5.0]) is None and loss_fell([]) is None
    assert loss_fell([6.0, 6.2, 5.0, 5.1, 4.0, 4.2, 4.1, 4.3]) is True  # noisy steps, a falling run
    assert loss_fell([6.0, 6.1, 6.3, 6.2, 6.1, 6.0, 6.2, 6.1]) is False


def test_train_warns_when_the_loss_did_not_fall(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack import api

    curves = {"flat": [6.5546, 6.5646], "falling": [6.5, 5.0]}
    for name, curve in curves.items():
        monkeypatch.setattr(api, "train", lambda *a, curve=curve, **k: {
            "steps": len(curve), "examples": 16, "loss_curve": curve, "settings": {"lr": 2e-5}})
        capsys.readouterr()
        assert main(["train", "--model", str(world / "model"), "--task", str(world / "tasks" / "Stance"),
                     "--lr", "2e-5", "--out", str(tmp_path / name)]) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert warnings == ([] if name == "falling" else [
            "warning: the training loss did not fall (6.5546 -> 6.5646 in 2 steps at lr 2e-05): the model learned "
            "little; try another --lr (or --lr-of-pretrain-peak on a built-in world's model)"])
