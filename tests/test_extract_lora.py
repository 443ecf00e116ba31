"""extract-lora against a hand computation with torch.linalg.svd: at full rank the adapter's B @ A is the fine-tune's
delta, at rank r it is the Eckart-Young optimum (the truncated SVD, its residual energy the tail of the squared
singular values), the explained share is top-r energy / total; PEFT loads it and its merged model is base + delta_r.
Families: a fused projection (Phi-3) is extracted whole, biases, norms and tied embeddings that differ are reported
as not extracted with their share. The CLI, and a full fine-tune contributed to a registry as a LoRA (--as-lora)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import perturbed
from families import build_family
from peft import PeftModel
from safetensors.torch import load_file
from test_registry import make_task
from transformers import AutoModelForCausalLM

from knowstack.cli import main
from knowstack.combine.extract_lora import EXTRACT_FILE, extract_lora
from knowstack.combine.inputs import LoraAdapter
from knowstack.modeling.streaming import SafetensorsReader
from knowstack.modelio import TOKENIZER_FILES

# float32 SVD: its reconstruction U S V^T is exact to a few float32 ulps of the largest entries (~1e-7 relative);
# 1e-5 (the issue's bound at full rank) leaves room for the products' sums of 64-128 terms
RELATIVE = 1e-5
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def finetune_of(base: Path, out: Path, seed: int = 7, scale: float = 0.02) -> Path:
    """A stand-in full fine-tune: the base plus seeded changes everywhere, with the base's config and tokenizer."""
    return perturbed(base, out, seed=seed, scale=scale, copy=("config.json", *TOKENIZER_FILES))


def deltas(base: Path, model: Path) -> dict[str, torch.Tensor]:
    a, b = SafetensorsReader.from_dir(base), SafetensorsReader.from_dir(model)
    return {name: b.read(name).float() - a.read(name).float() for name in a.names()}


def products(adapter: Path) -> dict[str, torch.Tensor]:
    """Each module's delta as PEFT applies it: scale * B @ A (LoraAdapter, which merges and mixtures read)."""
    lora = LoraAdapter(adapter)
    return {name: lora.delta(name, torch.empty(lora.reader.specs[b].shape[0], lora.reader.specs[a].shape[1]))
            for name, (a, b, _) in lora.modules.items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extract")
    return {"base": tiny_model_dir, "model": finetune_of(tiny_model_dir, root / "ft"), "root": root}


def test_full_rank_reproduces_the_delta_exactly(tiny: dict[str, Path]) -> None:
    record = extract_lora(tiny["base"], tiny["model"], tiny["root"] / "full", rank=128)
    found, expected = products(tiny["root"] / "full"), deltas(tiny["base"], tiny["model"])
    assert {name.rsplit(".", 2)[-2] for name in found} == set(LLAMA_TARGETS)  # the family's LoRA targets
    for name, product in found.items():
        assert relative(product, expected[name]) < RELATIVE, name
    assert all(m["rank"] == min(expected[f"{name}.weight"].shape) for name, m in record["modules"].items())
    assert record["explained"] == pytest.approx(1.0, abs=1e-6)
    # what is not extracted: the embedding, the output layer and the norms, each with its share
    whole = sum(float(d.double().square().sum()) for d in expected.values())
    assert set(record["not_extracted_tensors"]) == {n for n in expected if n not in found}
    for name, entry in record["not_extracted_tensors"].items():
        assert entry["share"] == pytest.approx(float(expected[name].double().square().sum()) / whole, rel=1e-9)
    assert record["explained_of_whole_delta"] == pytest.approx(1 - sum(record["not_extracted"].values()), abs=1e-9)


@pytest.mark.parametrize("rank", [1, 4])
def test_rank_r_is_the_eckart_young_optimum_and_its_explained_share(tiny: dict[str, Path], rank: int) -> None:
    record = extract_lora(tiny["base"], tiny["model"], tiny["root"] / f"r{rank}", rank=rank)
    found, expected = products(tiny["root"] / f"r{rank}"), deltas(tiny["base"], tiny["model"])
    kept_total = energy_total = 0.0
    for name, product in found.items():
        delta = expected[name].double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        optimum = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert relative(product.double(), optimum) < RELATIVE, name  # the products, not the factors (signs)
        residual = float((delta - product.double()).square().sum())
        assert residual == pytest.approx(float(s[rank:].square().sum()), rel=1e-4)  # Eckart-Young
        share = float(s[:rank].square().sum() / s.square().sum())
        module = record["modules"][name.removesuffix(".weight")]
        assert module["rank"] == rank and module["explained"] == pytest.approx(share, rel=1e-5)
        kept_total += share * float(s.square().sum())
        energy_total += float(s.square().sum())
    assert record["explained"] == pytest.approx(kept_total / energy_total, rel=1e-5)
    assert 0 < record["explained"] < 1


def test_the_adapter_loads_in_peft_and_merges_to_base_plus_the_truncated_delta(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "peft"
    extract_lora(tiny["base"], tiny["model"], out, rank=3)
    expected = products(out)
    base = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload().state_dict()
    assert set(merged) == set(before)
    for name, tensor in merged.items():
        want = before[name] + expected[name] if name in expected else before[name]
        assert torch.allclose(tensor, want, atol=1e-6), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["base_model_name_or_path"] == str(tiny["base"])
    card = (out / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "| module | rank | explained |" in card
    assert json.loads((out / EXTRACT_FILE).read_text())["rank"] == 3


def test_all_linear_layers_and_the_cli(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tiny["root"] / "cli"
    argv = ["extract-lora", "--base", str(tiny["base"]), "--model", str(tiny["model"]), "--rank", "2",
            "--target-modules", "all", "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    # every linear layer, the (untied) output layer too; the embedding alone is left out
    assert len(record["modules"]) == 2 * len(LLAMA_TARGETS) + 1 and "lm_head" in record["modules"]
    assert record["out"] == str(out) and set(record["not_extracted"]) == {"embedding", "norm"}
    assert main(argv) == 2  # --out is not empty
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj" in text and "explained:" in text and "embedding " in text


# --- families ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["phi3", "qwen2"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(f"extract-{request.param}")
    base = build_family(request.param, root / "base")
    return request.param, base, finetune_of(base, root / "ft", scale=0.01)


def test_families_fused_projections_biases_and_tied_embeddings(family: tuple[str, Path, Path], tmp_path: Path) -> None:
    name, base, model = family
    record = extract_lora(base, model, tmp_path / "out", rank=4)
    expected = deltas(base, model)
    found = products(tmp_path / "out")
    layers = {module.rsplit(".", 1)[-1] for module in record["modules"]}
    if name == "phi3":  # fused projections, extracted whole, as training adapts them
        assert layers == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
        assert set(record["not_extracted"]) == {"embedding", "output layer", "norm"}
    else:  # qwen2: q/k/v biases and a tied embedding differ: reported, not extracted
        assert layers == set(LLAMA_TARGETS)
        assert set(record["not_extracted"]) == {"embedding (and the tied output layer)", "norm", "bias"}
        biases = [n for n, e in record["not_extracted_tensors"].items() if e["kind"] == "bias"]
        assert biases and all(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in biases)
    for module, product in found.items():  # the truncated SVD of the bf16 weights' exact (float32) delta
        u, s, vh = torch.linalg.svd(expected[module].double(), full_matrices=False)
        assert relative(product.double(), (u[:, :4] * s[:4]) @ vh[:4]) < RELATIVE, module
    assert set(load_file(tmp_path / "out" / "adapter_model.safetensors")) == {
        f"base_model.model.{m}.lora_{side}.weight" for m in record["modules"] for side in "AB"}


# --- a registry: a full fine-tune contributed as a LoRA ------------------------------------------------------------
def test_contribute_a_full_fine_tune_as_a_lora(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.registry import Registry, init_registry

    reg, task = tiny["root"] / "reg", make_task(tiny["root"] / "tasks")
    init_registry(reg, tiny["base"])
    assert main(["contribute", str(reg), "--name", "ft-as-lora", "--model", str(tiny["model"]), "--task", str(task),
                 "--as-lora", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "adapter" and record["settings"]["source"] == str(tiny["model"].resolve())
    extracted = record["settings"]["extracted_lora"]
    assert extracted["rank"] == 4 and 0 < extracted["explained"] < 1
    with Registry.open(reg) as opened, opened.view("ft-as-lora") as stored:
        config = json.loads((Path(stored) / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny["base"].resolve())
        ours = products(Path(stored))
    extract_lora(tiny["base"], tiny["model"], tiny["root"] / "as-lora", rank=4)
    for name, product in products(tiny["root"] / "as-lora").items():  # what extract-lora writes at rank 4
        assert torch.allclose(ours[name], product)
    # the text output and `show` say it is an extraction, of what, and how much of the delta it keeps
    said = f"as LoRA: rank 4, extracted from {tiny['model'].resolve()}: {extracted['explained']:.1%} of its targets'"
    assert main(["contribute", str(reg), "--name", "again", "--model", str(tiny["model"]), "--task", str(task),
                 "--as-lora", "4"]) == 0
    assert said in capsys.readouterr().out
    assert main(["show", str(reg), "ft-as-lora"]) == 0
    assert said.replace("as LoRA: ", "as LoRA:  ") in capsys.readouterr().out
