"""One declaration of every setting: a default cannot differ between a study, `knowstack train`, a registry compose
and the library calls, because each is read from config.py's models (issue: one settings object per concern)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from knowstack.cli import build_parser, main
from knowstack.combine.merge_methods import MergeOptions
from knowstack.combine.moe import MoeOptions
from knowstack.config import (
    PAPER_LR,
    JointConfig,
    MergeConfig,
    MoeConfig,
    OLoraConfig,
    ReplayConfig,
    RouterTrainingConfig,
    TrainingConfig,
)
from knowstack.errors import KnowstackError
from knowstack.registry.compose import ComposeOptions
from knowstack.train.router_training import RouterTraining
from knowstack.train.settings import TrainSettings


def parsed_train(*options: str):
    return build_parser().parse_args(["train", "--model", "m", "--task", "t", "--out", "o", *options])


def test_a_run_with_no_settings_is_the_declared_recipe() -> None:
    from knowstack.cli.options import training_from_args

    recipe = TrainingConfig()
    assert TrainSettings() == TrainSettings.from_config(recipe, finetune="fft", seed=0)
    assert training_from_args(parsed_train()) == recipe  # `knowstack train` without options: the study's defaults
    assert TrainSettings().lr == recipe.learning_rate() == PAPER_LR
    assert TrainSettings().max_length == recipe.max_length and TrainSettings().lora_alpha == recipe.lora.alpha


def test_cli_training_options_are_checked_by_the_declaration() -> None:
    from knowstack.cli.options import training_from_args

    given = training_from_args(parsed_train("--lr", "1e-3", "--max-length", "64", "--lora-alpha", "8", "--no-pack"))
    assert (given.lr, given.max_length, given.lora.alpha, given.pack) == (1e-3, 64, 8.0, False)
    paper = training_from_args(parsed_train("--precision", "bf16", "--loss-reduction", "micro_batch", "--overlong",
                                            "paper"))
    assert (paper.precision, paper.loss_reduction, paper.overlong) == ("bf16", "micro_batch", "paper")
    with pytest.raises(KnowstackError) as err:
        training_from_args(parsed_train("--max-length", "4"))
    assert err.value.field == "--max-length"
    with pytest.raises(KnowstackError) as err:
        training_from_args(parsed_train("--lora-dropout", "1.5"))
    assert err.value.field == "--lora-dropout"


def test_merge_moe_and_compose_defaults_are_the_study_configs() -> None:
    merge, moe, routers = MergeConfig(), MoeConfig(), RouterTrainingConfig()
    assert (MergeOptions().density, MergeOptions().drop_rate, MergeOptions().lam) == (merge.density, merge.drop_rate,
                                                                                      merge.lam)
    assert (MoeOptions().top_k, MoeOptions().shared, MoeOptions().base_expert) == (moe.top_k, moe.shared,
                                                                                   moe.base_expert)
    assert build_parser().parse_args(["mix", "--base", "b", "--models", "m", "--out", "o"]).router is None  # -> moe's
    trained = RouterTraining(steps=1)
    assert (trained.lr, trained.batch_size, trained.aux_loss_coef) == (routers.lr, routers.batch_size,
                                                                       routers.aux_loss_coef)
    assert trained.max_length == TrainingConfig().max_length
    compose = ComposeOptions()
    recipe = TrainingConfig()
    assert (compose.lr, compose.epochs, compose.train_batch_size, compose.micro_batch_size, compose.max_length,
            compose.lora_r, compose.lora_alpha) == (PAPER_LR, recipe.epochs, recipe.batch_size,
                                                    recipe.micro_batch_size, recipe.max_length, recipe.lora.r,
                                                    recipe.lora.alpha)
    assert (compose.density, compose.drop_rate, compose.lam, compose.top_k, compose.router,
            compose.prompts_per_expert, compose.router_lr, compose.router_examples_per_task) == (
        merge.density, merge.drop_rate, merge.lam, moe.top_k, moe.router, moe.prompts_per_expert, routers.lr,
        routers.examples_per_task)
    assert compose.olora_lambda == OLoraConfig().lambdas[0] and compose.replay_fraction == ReplayConfig().fraction
    assert compose.joint_sampling == JointConfig().sampling
    assert (compose.router_dtype, compose.router_init) == (moe.router_dtype, moe.router_init)


def test_training_uses_the_tokenizer_it_is_given(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A study's base.tokenizer (and `knowstack train --tokenizer`) reaches training, as it reaches evaluation."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(item, tokenizer / item.name)
    marked = json.loads((tokenizer / "tokenizer_config.json").read_text())
    marked["model_max_length"] = 4321
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(marked))
    task = tmp_path / "Task"
    task.mkdir()
    items = [{"prompt": f"Question {i}:", "answer": " yes"} for i in range(4)]
    for split in ("train", "test"):
        (task / f"{split}.json").write_text(json.dumps(items))
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_model_dir), "--tokenizer", str(tokenizer), "--task", str(task),
                 "--lr", "1e-3", "--batch-size", "4", "--max-steps", "1", "--out", str(out)]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 4321


def test_mix_takes_router_training_by_compose_s_names_too() -> None:
    args = build_parser().parse_args(["mix", "--base", "b", "--models", "m", "--out", "o", "--router-steps", "3",
                                      "--router-lr", "0.01"])
    assert (args.router_steps, args.router_lr) == (3, 0.01)
    assert build_parser().parse_args(["mix", "--base", "b", "--models", "m", "--out", "o"]).router_lr == \
        RouterTrainingConfig().lr
