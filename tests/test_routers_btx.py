"""BTX (Branch-Train-MiX, Sukhbaatar et al. 2024) as a mixture preset: the balancing loss of router training
against transformers' Mixtral load_balancing_loss_func (the peer's), and `preset: btx` / `mix --preset btx`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import perturbed
from safetensors.torch import load_file
from test_moe import FAMILIES, TOKENIZER_AND_CONFIG, study_config

from knowstack.errors import KnowstackError
from knowstack.train.router_training import RouterSite, load_balancing_loss


@pytest.mark.parametrize(("top_k", "experts"), [(1, 4), (2, 4), (2, 3), (3, 5)])
def test_balancing_loss_is_mixtrals_over_the_k_slots(top_k: int, experts: int) -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(37, experts, generator=torch.Generator().manual_seed(top_k * 10 + experts))
    site = RouterSite(0, torch.nn.Identity(), top_k, "0")
    ours = load_balancing_loss({"0": logits}, [site])
    theirs = load_balancing_loss_func((logits,), num_experts=experts, top_k=top_k)
    # transformers counts every one of a token's k choices as a whole token (a balanced router scores k);
    # knowstack, as Switch for k = 1 and Megablocks for any k, counts shares of the k slots (balanced: 1)
    torch.testing.assert_close(ours * top_k, theirs, atol=1e-6, rtol=1e-6)


def test_btx_preset_is_its_settings_written_out(tmp_path: Path, tiny_model_dir: Path) -> None:
    from knowstack.config import MOE_PRESETS, parse_config
    from knowstack.study.plan import build_plan

    def moe_keys(moe: dict) -> list[str]:
        plan = build_plan(parse_config(study_config(tmp_path, tiny_model_dir, moe)))
        return sorted(step.key for step in plan.ordered() if step.kind == "moe")

    written = moe_keys(MOE_PRESETS["btx"])
    assert moe_keys({"preset": "btx"}) == written and len(written) == 1
    step_options = next(s for s in build_plan(parse_config(study_config(tmp_path, tiny_model_dir, {"preset": "btx"})))
                        .ordered() if s.kind == "moe").params["options"]
    assert (step_options["shared"], step_options["top_k"], step_options["router"]) == ("average", 2, "random")
    assert step_options["router_training"]["aux_loss_coef"] == 0.01
    # the section's own settings win over the preset's
    assert moe_keys({"preset": "btx", "top_k": 1}) != written
    with pytest.raises(KnowstackError, match="unknown preset"):
        parse_config(study_config(tmp_path, tiny_model_dir, {"preset": "btm"}))


def test_cli_mix_preset_btx(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.cli import main

    models = [perturbed(tiny_model_dir, tmp_path / f"m{i}", seed=i, scale=0.05, copy=TOKENIZER_AND_CONFIG)
              for i in range(2)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"prompt": p, "answer": " a"} for family in FAMILIES for p in family]))
    out = tmp_path / "btx"
    base_args = ["mix", "--base", str(tiny_model_dir), "--models", *map(str, models), "--preset", "btx"]
    assert main([*base_args, "--out", str(out)]) == 2
    assert "option --train-data" in capsys.readouterr().err and not out.exists()
    assert main([*base_args, "--train-data", str(data), "--router-steps", "2", "--router-batch-size", "4",
                 "--out", str(out)]) == 0
    record = json.loads((out / "moe.json").read_text())
    assert record["options"]["shared"] == "average" and record["options"]["router"] == "random"
    assert record["router_training"]["steps"] == 2 and record["options"]["top_k"] == 2
    ours = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    inputs = [load_file(m / "model.safetensors") for m in models]
    name = "model.layers.0.self_attn.q_proj.weight"  # a shared weight: the models' average
    torch.testing.assert_close(ours[name], (inputs[0][name] + inputs[1][name]) / 2, atol=1e-6, rtol=1e-6)
    expert = "model.layers.1.block_sparse_moe.experts.1.w2.weight"  # an expert: model 1's MLP as it is
    torch.testing.assert_close(ours[expert], inputs[1]["model.layers.1.mlp.down_proj.weight"])
