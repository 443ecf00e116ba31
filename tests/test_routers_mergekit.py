"""mergekit-moe's gates as knowstack routers (router: hidden, cheap-embed): a fast check against the
computation as mergekit 0.1.5 states it (mergekit/moe/router.py: prompts batched, left-padded with the bos
token, bos text prepended), and a slow one against mergekit-moe itself on the same tiny Llama (pytest -m slow;
mergekit in its own venv, benchmarks/merge.py's install_mergekit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_merge_oracle
import torch
import yaml
from checkpoints import perturbed
from safetensors.torch import load_file
from test_moe import FAMILIES, TOKENIZER_AND_CONFIG

from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.errors import KnowstackError
from knowstack.modelio import load_model, load_tokenizer

PROMPTS = [family[:2] for family in FAMILIES]


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("gate-models")
    return [perturbed(tiny_model_dir, root / f"m{i}", seed=i, scale=0.05, copy=TOKENIZER_AND_CONFIG) for i in range(3)]


def negatives(expert: int) -> list[str]:
    return [p for other, group in enumerate(PROMPTS) if other != expert for p in group]


def batched_last_token_states(model: torch.nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """mergekit's get_hidden_states(average=False): the prompts as one left-padded batch (pad = bos), bos text
    prepended; hidden_states[:-1] at the last position, averaged over the prompts: (layers, hidden)."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    batch = tokenizer([tokenizer.bos_token + p for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    with torch.no_grad():
        states = torch.stack(model(**batch, output_hidden_states=True).hidden_states[:-1])
    return states[:, :, -1, :].mean(dim=1)


def gate(mixture: Path, layer: int) -> torch.Tensor:
    tensors = {k: v for f in mixture.glob("*.safetensors") for k, v in load_file(f).items()}
    return tensors[f"model.layers.{layer}.block_sparse_moe.gate.weight"].float()


def test_hidden_gate_is_mergekits_computation(tiny_model_dir: Path, models: list[Path], tmp_path: Path) -> None:
    mix_models(tiny_model_dir, models, tmp_path / "moe", options=MoeOptions(top_k=2, router="hidden"), prompts=PROMPTS)
    model, tokenizer = load_model(tiny_model_dir, dtype="float32"), load_tokenizer(tiny_model_dir)
    rows = []
    for expert, prompts in enumerate(PROMPTS):
        row = batched_last_token_states(model, tokenizer, prompts) - batched_last_token_states(
            model, tokenizer, negatives(expert))
        rows.append(row / row.norm(dim=-1, keepdim=True))
    expected = torch.stack(rows, dim=1)  # layers x experts x hidden
    for layer in range(2):
        torch.testing.assert_close(gate(tmp_path / "moe", layer), expected[layer], atol=1e-5, rtol=1e-5)


def test_cheap_embed_gate_is_mergekits_computation(tiny_model_dir: Path, models: list[Path], tmp_path: Path) -> None:
    mix_models(tiny_model_dir, models, tmp_path / "moe", options=MoeOptions(top_k=2, router="cheap-embed"),
               prompts=PROMPTS)
    embed = load_model(tiny_model_dir, dtype="float32").get_input_embeddings().weight.detach()
    tokenizer = load_tokenizer(tiny_model_dir)

    def cheap(prompts: list[str]) -> torch.Tensor:
        # mergekit's get_cheap_embedding: one-hot @ embeddings, masked, summed over tokens and prompts
        batch = tokenizer([tokenizer.bos_token + p for p in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=embed.shape[0]).float()
        total = ((onehot @ embed) * batch["attention_mask"][..., None]).sum(dim=(0, 1))
        return total / total.norm()

    rows = [cheap(p) - cheap(negatives(e)) for e, p in enumerate(PROMPTS)]
    expected = torch.stack([r / r.norm() for r in rows])
    for layer in range(2):
        torch.testing.assert_close(gate(tmp_path / "moe", layer), expected, atol=1e-6, rtol=1e-6)


def test_prompt_gates_need_prompts(tiny_model_dir: Path, models: list[Path], tmp_path: Path) -> None:
    for router in ("hidden", "cheap-embed"):
        with pytest.raises(KnowstackError, match="prompts"):
            mix_models(tiny_model_dir, models, tmp_path / "x", options=MoeOptions(router=router))


# --- against mergekit-moe itself (slow) ------------------------------------------------------------------
mergekit = test_merge_oracle.mergekit  # the fixture: mergekit 0.1.5 in its own venv
MERGEKIT_TOLERANCE = {"hidden": 1e-2, "cheap_embed": 1e-6}  # hidden: mergekit runs the base in bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_gates_equal_mergekit_moe(mode: str, mergekit: Path, tiny_model_dir: Path, models: list[Path],
                                  tmp_path: Path) -> None:
    import subprocess

    experts = [{"source_model": str(path), "positive_prompts": PROMPTS[e], "negative_prompts": negatives(e)}
               for e, path in enumerate(models)]
    config = {"base_model": str(tiny_model_dir), "gate_mode": mode, "dtype": "float32", "experts_per_token": 2,
              "experts": experts}
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([str(mergekit.parent / "mergekit-moe"), str(tmp_path / "moe.yaml"), str(tmp_path / "theirs"),
                    "--device", "cpu"], check=True, capture_output=True, text=True)
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    mix_models(tiny_model_dir, models, tmp_path / "ours", options=MoeOptions(top_k=2, router=mode.replace("_", "-")),
               prompts=PROMPTS)
    for layer in range(2):
        ours, reference = gate(tmp_path / "ours", layer), theirs[f"model.layers.{layer}.mlp.gate.weight"].float()
        difference = (ours - reference).abs().max().item()
        print(f"\n{mode} gate, layer {layer}: max |knowstack - mergekit-moe| {difference:.2e}")
        assert difference <= MERGEKIT_TOLERANCE[mode]
