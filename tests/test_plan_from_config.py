"""Plan before you download: the memory estimate and `study --dry-run` from a model's config.json alone (a dir
holding just that, or a hub id whose config.json is in the local Hugging Face cache), with parameter counts that
equal the model's, for the real configs of five families and the tiny checkpoints of all nine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_tokenizer, load_script
from families import FAMILIES, build_family
from peft import LoraConfig, get_peft_model
from test_plan import paper_config_with_data
from test_resources import saved_activation_bytes
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from knowstack.cli import main
from knowstack.config import LLAMA_LINEAR, load_config, parse_config
from knowstack.data.batches import collate, tokenize_examples
from knowstack.data.formats import Example
from knowstack.modeling.streaming import read_header, weight_files
from knowstack.study.plan import build_plan
from knowstack.study.resources import architecture_of, estimate_plan, train_estimate

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
# Each model's parameter count as its publisher and the Hub's safetensors metadata state it (tied embeddings once).
PUBLISHED = {"llama-3-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400, "qwen3-8b": 8_190_735_360,
             "mistral-7b": 7_241_732_096, "gemma-2-9b": 9_241_705_984}
TEXT = "The official currency of Japan is the yen. France is in Europe. " * 20
LENGTH, MICRO = 128, 4
STUDY = {"name": "x", "tasks": [{"name": "t", "path": "t", "metric": "accuracy"}],
         "old_knowledge": {"tasks": ["piqa"]}, "training": {"lr": 1e-5}}


def _study(model: str):
    return parse_config({**STUDY, "base": {"model": model}})


def _meta_counts(config_dir: Path, targets: list[str]) -> tuple[int, int]:
    """(parameters, LoRA r=8 parameters on `targets`) of the model its config builds on the meta device,
    counted by torch and PEFT."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
        params = sum(p.numel() for p in model.parameters())
        lora = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
        return params, sum(p.numel() for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_real_config_counts_as_its_model_on_the_meta_device(name: str, tmp_path: Path) -> None:
    config_only = tmp_path / name
    config_only.mkdir()
    shutil.copy(CONFIGS / name / "config.json", config_only)
    arch, source = architecture_of(_study(str(config_only)))
    assert arch is not None and "no weights and no tokenizer" in source
    params, lora = _meta_counts(config_only, arch.modules(LLAMA_LINEAR))
    assert arch.params == params == PUBLISHED[name]
    assert arch.lora_params(8, list(LLAMA_LINEAR)) == lora
    assert list(config_only.iterdir()) == [config_only / "config.json"]  # nothing read but it, nothing written


@pytest.fixture(scope="session", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family(request.param, tmp_path_factory.mktemp(request.param))


def test_a_tiny_checkpoint_counts_as_its_weights_and_peft(family_dir: Path) -> None:
    arch, _ = architecture_of(_study(str(family_dir)))
    stored = sum(torch.Size(entry["shape"]).numel() for file in weight_files(family_dir)
                 for name, entry in read_header(file).items() if name != "__metadata__")
    model = AutoModelForCausalLM.from_pretrained(family_dir)
    assert arch.params == stored == sum(p.numel() for p in model.parameters())
    assert arch.mlp_params == sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    targets = arch.modules(LLAMA_LINEAR)  # Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    assert arch.lora_params(8, list(LLAMA_LINEAR)) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_the_activation_estimate_follows_each_familys_layers(family_dir: Path) -> None:
    """What autograd saves for backward in one packed micro-batch, against the estimate: each family's extra norms
    (Gemma's four, q/k norms) counted, within the tolerance test_resources.py holds the built-in Llama to."""
    tokenizer = AutoTokenizer.from_pretrained(family_dir)
    model = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).requires_grad_(True)
    examples = [Example(f"Q{i}: " + TEXT[:600], " A: " + TEXT[:100]) for i in range(MICRO)]
    batch = collate(tokenize_examples(tokenizer, examples, LENGTH), pack_rows=True,
                    pad_token_id=tokenizer.pad_token_id)
    measured = saved_activation_bytes(model, batch)
    arch, _ = architecture_of(_study(str(family_dir)))
    recipe = parse_config({"name": "m", "base": {"builtin": "test"}, "training": {
        "lr": 1e-4, "batch_size": MICRO, "micro_batch_size": MICRO, "max_length": LENGTH}})
    estimate = train_estimate(arch, recipe, "fft").activations
    assert abs(measured - estimate) <= 0.25 * measured


def _paper_with_base(tmp_path: Path, model: str) -> Path:
    path = paper_config_with_data(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["base"]["model"] = model
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _config_only_llama(tmp_path: Path) -> Path:
    folder = tmp_path / "Meta-Llama-3-8B"
    folder.mkdir()
    shutil.copy(CONFIGS / "llama-3-8b" / "config.json", folder)
    return folder


def _memory_rows(printed: str) -> list[list[str]]:
    """The cells of each row of the dry run's memory table."""
    table = printed[printed.index("estimated memory per step"):]
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in table.splitlines()
            if line.startswith("│")]


def test_paper_dry_run_with_a_config_only_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _config_only_llama(tmp_path)
    path = _paper_with_base(tmp_path, str(base))
    out = tmp_path / "run"
    assert main(["study", str(path), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().err
    steps = build_plan(load_config(path), out).ordered()
    rows = _memory_rows(printed)
    assert [row[1] for row in rows] == [step.label for step in steps]  # every step, in order
    for row in rows:  # params, weights, grads, optimizer, activations, total; GPUs
        assert row[3].endswith("B") and all(float(cell) >= 0 for cell in row[4:9]) and float(row[8]) > 0
        assert row[9] == "CPU" or int(row[9]) >= 1
    assert {row[2] for row in rows} >= {"train FFT", "train LoRA", "eval", "merge", "eval FFT-MoE"}
    said = " ".join(printed.split())
    assert "no weights and no tokenizer" in said and "max_length tokens" in said  # what it assumed
    assert not out.exists() and sorted(p.name for p in base.iterdir()) == ["config.json"]
    # the same numbers as the published architecture gives a machine that has no copy of it at all
    from_config, _ = estimate_plan(build_plan(load_config(path), out))
    from_table, source = estimate_plan(build_plan(load_config(_paper_with_base(tmp_path / "hub", "meta-llama/"
                                                                               "Meta-Llama-3-8B")), out))
    assert "fallback table" in source and [e for _, e in from_table] == [e for _, e in from_config]


def test_a_run_with_a_config_only_base_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _config_only_llama(tmp_path)
    out = tmp_path / "run"
    assert main(["study", str(_paper_with_base(tmp_path, str(base))), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("config-only model") == 1 and "problems" not in err and "Traceback" not in err
    assert str(base) in err and "no weights and no tokenizer" in err and "download the model" in err
    assert not out.exists()
    # with its tokenizer beside the config, what is missing is the weights alone
    build_tiny_tokenizer().save_pretrained(base)
    assert main(["study", str(_paper_with_base(tmp_path / "again", str(base))), "--out", str(out)]) == 2
    assert "config.json but no weights (" in capsys.readouterr().err


def test_a_hub_id_whose_config_is_in_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--llama-like"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    config = json.loads((CONFIGS / "llama-3.2-1b" / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # any request would be refused
    arch, source = architecture_of(_study("someone/llama-like"))
    assert arch is not None and arch.params == PUBLISHED["llama-3.2-1b"] and arch.tied_embeddings
    assert "Hugging Face cache" in source and str(snapshot / "config.json") in source
    arch, source = architecture_of(_study("someone/not-cached"))
    assert arch is None and "not in the Hugging Face cache" in source


def test_the_docs_worked_example_is_what_the_code_gives_now() -> None:
    """docs/cluster.md's memory block is scripts/docs_numbers.py's output for the Llama-3-8B config.json: a change
    to the estimate that moves a figure fails here until `make docs-numbers` rewrites it."""
    script = load_script(Path(__file__).resolve().parents[1] / "scripts" / "docs_numbers.py")
    text = (script.ROOT / "docs" / "cluster.md").read_text()
    new, written, _ = script.rewrite(text, {"memory": CONFIGS / "llama-3-8b"}, script.ROOT / "docs" / "cluster.md")
    assert written == ["memory"] and new == text
    assert "| train FFT | 20 | 8,030,261,248 | 14.96 | 14.96 | 29.92 |" in text
