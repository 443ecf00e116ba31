"""`training.add_pad_token`: the paper's `[PAD]` (RhuiDih/cl do_finetuning.py, smart_tokenizer_and_embedding_resize):
a base whose tokenizer has no pad token gets one, and its embeddings (and an untied output layer) one more row, the
mean of the rows before it; a study builds every model from that grown base. Tested on tiny checkpoints of an untied
(llama3.1) and a tied (llama3.2) family, their tokenizers stripped of their pad token as Llama-3's has none."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from families import build_family
from safetensors import safe_open
from test_registry import make_task, write_mc_task
from transformers import AutoTokenizer

from knowstack.config import load_config, parse_config
from knowstack.errors import KnowstackError
from knowstack.modelio import PAD_TOKEN, load_model, load_tokenizer, write_padded_base
from knowstack.study.plan import build_plan
from knowstack.study.runner import run_study

UNTIED, TIED = "llama3.1", "llama3.2"


def without_pad(family: str, out: Path) -> Path:
    """A tiny checkpoint of `family` whose tokenizer has no pad token, as Llama-3-8B's."""
    base = build_family(family, out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    return base


def saved_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            names |= set(handle.keys())
    return names


@pytest.mark.parametrize("family", [UNTIED, TIED])
def test_the_pad_row_is_the_mean_of_the_rows_before_it(family: str, tmp_path: Path) -> None:
    base = without_pad(family, tmp_path / "base")
    before = load_model(base, dtype="auto")
    rows = before.get_input_embeddings().weight.shape[0]
    record = write_padded_base(base, tmp_path / "padded")
    assert record == {"pad_token": PAD_TOKEN, "pad_token_id": rows, "added": True, "rows_before": rows,
                      "rows": rows + 1}
    padded = load_model(tmp_path / "padded", dtype="auto")
    tokenizer = load_tokenizer(tmp_path / "padded", pad_from_eos=False)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == rows == len(tokenizer) - 1
    assert padded.config.vocab_size == rows + 1
    for layer in ("get_input_embeddings", "get_output_embeddings"):
        old, new = getattr(before, layer)().weight, getattr(padded, layer)().weight
        assert new.dtype == old.dtype == torch.bfloat16 and new.shape == (rows + 1, old.shape[1])
        assert torch.equal(new[:rows], old)
        # the paper's mean: of the bf16 rows, as torch takes it in the model's dtype
        torch.testing.assert_close(new[rows], old.mean(dim=0), rtol=2**-8, atol=0)
    tied = padded.get_output_embeddings().weight is padded.get_input_embeddings().weight
    assert tied == (family == TIED)
    assert ("lm_head.weight" in saved_names(tmp_path / "padded")) == (family == UNTIED)
    # every other token's logit is the base's: the pad row only adds one term to each softmax
    ids = torch.tensor([tokenizer("France is in Europe.")["input_ids"]])
    with torch.no_grad():
        base32, padded32 = load_model(base, dtype=torch.float32), load_model(tmp_path / "padded", dtype=torch.float32)
        torch.testing.assert_close(padded32(ids).logits[..., :rows], base32(ids).logits)


def test_a_tokenizer_with_a_pad_token_leaves_the_base_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's pad-base step of a base that has a pad token: its weights hard-linked (no 16 GB copy at 8B, not even
    loaded), the base's files' modes untouched, and a model trains from it; across file systems, a copy."""
    from knowstack import modelio
    from knowstack.data.formats import Example
    from knowstack.modeling.streaming import weight_files
    from knowstack.study.steps import StudyContext, execute
    from knowstack.train import TrainSettings, train

    base = build_family(UNTIED, tmp_path / "base")
    shards = weight_files(base)
    assert len(shards) > 1  # sharded, with an index, as users' bases are
    shards[0].chmod(0o640)  # not what the umask gives: a link's mode is the base's, which the step must not change
    before = {shard.name: shard.read_bytes() for shard in shards}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base's weights were loaded")

    monkeypatch.setattr(modelio, "load_model", refuse)
    plan = build_plan(parse_config(study_config(tmp_path, base), root=tmp_path))
    [step] = [step for step in plan.steps.values() if step.kind == "pad-base"]
    padded = execute(step, StudyContext(tmp_path / "run", parse_config(study_config(tmp_path, base), root=tmp_path)))
    monkeypatch.undo()
    record = json.loads((padded / "pad_base.json").read_text())
    assert not record["added"] and record["rows"] == record["rows_before"] == len(AutoTokenizer.from_pretrained(base))
    assert load_tokenizer(padded).pad_token == "<|pad|>"
    assert [shard.name for shard in weight_files(padded)] == [shard.name for shard in shards]
    for shard in shards:
        assert (padded / shard.name).stat().st_ino == shard.stat().st_ino, shard.name  # the same file, not a copy
    assert shards[0].stat().st_mode & 0o777 == 0o640
    settings = TrainSettings(finetune="fft", lr=1e-3, max_steps=1, batch_size=2, micro_batch_size=2, max_length=32)
    train(padded, [Example("question:", " yes")] * 2, tmp_path / "trained", settings)
    assert load_model(tmp_path / "trained", dtype="auto").config.vocab_size == record["rows"]
    assert {shard.name: shard.read_bytes() for shard in shards} == before  # training wrote nothing into the base

    def other_file_system(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", other_file_system)
    copied = tmp_path / "copied"
    assert write_padded_base(base, copied) == record
    for shard in shards:
        assert (copied / shard.name).stat().st_ino != shard.stat().st_ino
        assert (copied / shard.name).read_bytes() == before[shard.name]


def test_a_tokenizer_shorter_than_the_embeddings_is_refused(tmp_path: Path) -> None:
    base = without_pad(UNTIED, tmp_path / "base")
    model = load_model(base, dtype="auto")
    model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    model.save_pretrained(base)
    with pytest.raises(KnowstackError, match="would cut rows"):
        write_padded_base(base, tmp_path / "padded")
    assert not (tmp_path / "padded").exists()


def test_a_study_whose_base_the_pad_token_would_cut_is_refused_before_any_step(tmp_path: Path) -> None:
    from knowstack.cli import main

    small = without_pad(UNTIED, tmp_path / "small")
    model = load_model(small, dtype="auto")
    model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    base = tmp_path / "base"
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(small).save_pretrained(base)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_config(tmp_path, base)))
    assert main(["study", str(path), "--out", str(tmp_path / "run")]) != 0
    assert not (tmp_path / "run").exists()
    assert main(["study", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 2  # the dry run says it too
    path.write_text(yaml.safe_dump(study_config(tmp_path, base, add_pad_token=False)))
    assert main(["study", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 0  # the base itself is good


def test_with_a_separate_tokenizer_models_of_the_grown_base_read_the_grown_tokenizer(tmp_path: Path) -> None:
    base, tokenizer = tmp_path / "base", tmp_path / "tokenizer"  # planning reads neither
    config = study_config(tmp_path, base)
    config["base"]["tokenizer"] = str(tokenizer)
    plan = build_plan(parse_config(config, root=tmp_path))
    of_base = [step for step in plan.steps.values() if step.params.get("model", {}).get("model") == str(base)]
    assert {step.kind for step in of_base} == {"pad-base", "eval"}
    assert all(step.params["tokenizer"] == str(tokenizer) for step in of_base)
    others = [step for step in plan.steps.values() if step not in of_base]
    assert others and not any("tokenizer" in step.params for step in others)  # the one beside the grown base


def study_config(tmp_path: Path, base: Path, add_pad_token: bool = True) -> dict:
    if not (tmp_path / "old").exists():
        write_mc_task(tmp_path / "old")
    tasks = [{"name": name, "path": str(tmp_path / "tasks" / name if (tmp_path / "tasks" / name).exists()
                                        else make_task(tmp_path / "tasks", name, n=4)), "metric": "accuracy"}
             for name in ("Stance", "Notes")]
    return {
        "name": "pad", "base": {"model": str(base)}, "tasks": tasks,
        "old_knowledge": {"tasks": ["ks_toy"], "include_path": str(tmp_path / "old")},
        "training": {"lr": 1e-3, "batch_size": 2, "micro_batch_size": 2, "max_length": 32, "lora": {"r": 2, "alpha": 4},
                     "add_pad_token": add_pad_token},
        "evaluation": {"batch_size": 4, "max_new_tokens": {"accuracy": 4}},
        "methods": {"one-round": {"finetune": ["fft", "lora"]}, "sequential": {"finetune": ["fft", "lora"]},
                    "merge": {"finetune": ["fft", "lora"], "methods": ["average", "ties"]},
                    "moe": {"experts": ["fft", "lora"], "prompts_per_expert": 2}},
    }


def test_the_plan_builds_every_model_from_the_grown_base_and_scores_the_base_as_it_is(tmp_path: Path) -> None:
    base = tmp_path / "base"  # planning reads no weights
    plain = build_plan(parse_config(study_config(tmp_path, base, add_pad_token=False), root=tmp_path))
    plan = build_plan(parse_config(study_config(tmp_path, base), root=tmp_path))
    assert not any("add_pad_token" in json.dumps(step.params) for step in plain.steps.values())
    [pad] = [step for step in plan.steps.values() if step.kind == "pad-base"]
    assert pad.params == {"model": {"model": str(base), "adapter": None}}
    base_evals = [plan.steps[ev.step] for ev in plan.evaluations if ev.method == "base"]
    assert base_evals and all(step.params["model"]["model"] == str(base) for step in base_evals)
    trained = [step for step in plan.steps.values() if step.kind == "train"]
    assert not any(step.params["init"]["model"] == str(base) for step in trained)  # none from the base as it is
    from_pad = [step for step in trained if step.params["init"]["model"] == f"@{pad.key}"]
    assert from_pad and all(pad.key in step.deps and step.params["training"]["add_pad_token"] for step in from_pad)
    built_on_base = [step for step in plan.steps.values() if step.kind in ("merge", "moe")]
    assert built_on_base and all(step.params["base"]["model"] == f"@{pad.key}" for step in built_on_base)


@pytest.mark.slow
@pytest.mark.parametrize("family", [UNTIED, TIED])
def test_a_study_with_the_pad_token_trains_merges_mixes_and_scores(family: str, tmp_path: Path) -> None:
    base = without_pad(family, tmp_path / "base")
    rows = load_model(base, dtype="auto").get_input_embeddings().weight.shape[0]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_config(tmp_path, base)))
    run_study(load_config(path), tmp_path / "run", console=None)
    with (tmp_path / "run" / "results.csv").open() as handle:
        runs = {(row["method"], row["finetune"], row["task"]) for row in csv.DictReader(handle)}
    for method in ("one-round", "sequential", "merge", "moe"):
        for finetune in ("fft", "lora"):
            assert {(method, finetune, task) for task in ("Stance", "Notes", "ks_toy")} <= runs, (method, finetune)
    assert {("base", "", task) for task in ("Stance", "Notes", "ks_toy")} <= runs
    artifacts = tmp_path / "run" / "artifacts"
    steps = [json.loads(p.read_text()) for p in artifacts.glob("*/step.json")]
    made = [artifacts / s["key"] for s in steps if s["kind"] in ("train", "merge", "merge-adapter", "moe")]
    full = [folder for folder in made if (folder / "config.json").is_file()]
    assert len(full) >= 6  # FFT models, sequential LoRA's merged bases, merges, the FFT-MoE
    for folder in full:
        config = json.loads((folder / "config.json").read_text())
        assert config.get("vocab_size", config.get("text_config", {}).get("vocab_size")) == rows + 1, folder
    [padded] = [artifacts / s["key"] for s in steps if s["kind"] == "pad-base"]
    grown = load_model(padded, dtype="auto")

    def pad_rows(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        model = load_model(folder, dtype="auto")
        return model.get_input_embeddings().weight[rows], model.get_output_embeddings().weight[rows]

    mean_in, mean_out = pad_rows(padded)
    assert torch.equal(mean_in, grown.get_input_embeddings().weight[:rows].float().mean(0).to(torch.bfloat16))
    # LoRA leaves the pad rows at the mean: a LoRA model merged into the grown base keeps them
    merged_lora = [artifacts / s["key"] for s in steps if s["kind"] == "merge-adapter"]
    assert merged_lora and all(torch.equal(pad_rows(folder)[0], mean_in) and torch.equal(pad_rows(folder)[1], mean_out)
                               for folder in merged_lora)
    # FFT trains the pad row's output weights; untied, its embedding row gets no gradient and stays the mean
    fft = [artifacts / s["key"] for s in steps if s["kind"] == "train" and s["params"]["finetune"] == "fft"]
    for folder in fft:
        pad_in, pad_out = pad_rows(folder)
        assert not torch.equal(pad_out, mean_out), folder
        assert torch.equal(pad_in, mean_in) == (family == UNTIED), folder


def test_one_training_run_alone_refuses_the_study_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    from knowstack import api
    from knowstack.config import TrainingConfig

    with pytest.raises(KnowstackError, match="study's setting"):
        api.train(tiny_model_dir, [("Q:", " a")], tmp_path / "out", training=TrainingConfig(add_pad_token=True))
    assert not (tmp_path / "out").exists()
