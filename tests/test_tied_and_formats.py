"""Tied embeddings and checkpoints as users have them, on the tied families of tests/families.py (bf16, sharded,
tokenizer, chat template, generation_config): a fine-tune of a tied base saves what the base saves (no output
layer); merges and mixtures of such fine-tunes read and write them tied; a redundant output layer equal to the
embedding reads as tied; a tie broken on purpose merges into an untied model against the base's embedding; bf16
stays bf16 unless --dtype says otherwise, with config.json's dtype matching the tensors; every output dir holds
the index (where sharded), generation_config, tokenizer files and chat template."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import perturbed
from families import TIED, build_family
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from knowstack import api
from knowstack.cli import main
from knowstack.combine.inputs import FullModel
from knowstack.combine.merge import merge_models
from knowstack.errors import KnowstackError
from knowstack.modeling.families import INPUT_EMBEDDING, OUTPUT_EMBEDDING
from knowstack.modeling.streaming import INDEX_FILE, SafetensorsReader, weight_files
from knowstack.modelio import TOKENIZER_FILES, load_model, save_model, set_config_dtype
from knowstack.train.loop import merge_adapter

PAIRS = [("Question: what is 3 plus 4? Answer:", " 7"), ("The official currency of Japan is the", " yen")] * 2
TOKENS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])
# what every output dir carries from a tests/families.py base (the chat template is chat_template.jinja there)
TRAIN = Path(__file__).parent / "fixtures" / "trace" / "FOMC" / "train.json"
CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory):
    """family -> its tiny checkpoint, built once per session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, tmp_path_factory.mktemp(family.replace(".", "-")))
        return built[family]

    return get


def stand_in(base_dir: Path, out: Path, seed: int) -> Path:
    """A fine-tune of the base where training is not the point: its tensors perturbed, its files kept."""
    return perturbed(base_dir, out, seed=seed, scale=0.02, copy=("config.json", *TOKENIZER_FILES))


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {name: value for file in weight_files(model_dir) for name, value in load_file(file).items()}


def config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(TOKENS).logits


def assert_as_users_have_it(model_dir: Path, dtype: torch.dtype, *, tied: bool) -> None:
    """dtype of every floating tensor and of config.json, the tie, the files carried, the index's metadata."""
    written = tensors(model_dir)
    assert {value.dtype for value in written.values() if value.is_floating_point()} == {dtype}
    assert config(model_dir)["dtype"] == str(dtype).removeprefix("torch.")
    assert (OUTPUT_EMBEDDING not in written) == tied and config(model_dir)["tie_word_embeddings"] is tied
    assert all((model_dir / name).is_file() for name in CARRIED), sorted(p.name for p in model_dir.iterdir())
    if (model_dir / INDEX_FILE).is_file():
        index = json.loads((model_dir / INDEX_FILE).read_text())
        assert set(index["weight_map"]) == set(written)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in written.values())


def add_output_layer(model_dir: Path, head: torch.Tensor, *, tie: bool | None = None) -> None:
    """An output layer written beside the embedding (in the embedding's shard), and the config's tie set."""
    index = json.loads((model_dir / INDEX_FILE).read_text())
    shard = model_dir / index["weight_map"][INPUT_EMBEDDING]
    stored = load_file(shard)
    save_file({**stored, OUTPUT_EMBEDDING: head.to(stored[INPUT_EMBEDDING].dtype).contiguous()}, shard,
              metadata={"format": "pt"})
    index["weight_map"][OUTPUT_EMBEDDING] = shard.name
    (model_dir / INDEX_FILE).write_text(json.dumps(index))
    if tie is not None:
        (model_dir / "config.json").write_text(json.dumps({**config(model_dir), "tie_word_embeddings": tie}))


@pytest.mark.parametrize("family", TIED)
def test_fft_of_a_tied_base_saves_it_tied_and_merges(family: str, base, tmp_path: Path) -> None:
    """FFT train -> no output layer, bf16 as the base; its average with another fine-tune loads and gives the
    logits of the by-hand average, written tied, bf16, with the base's files."""
    base_dir = base(family)
    fft = tmp_path / "fft"
    api.train(base_dir, PAIRS, fft, finetune="fft", max_steps=1, batch_size=2, lr=1e-3)
    assert_as_users_have_it(fft, torch.bfloat16, tied=True)
    other = stand_in(base_dir, tmp_path / "other", seed=1)
    merged = merge_models("average", [fft, other], tmp_path / "avg", base=base_dir)
    assert_as_users_have_it(merged, torch.bfloat16, tied=True)
    assert json.loads((merged / "merge.json").read_text())["dtype"] == "bfloat16"

    by_hand = tmp_path / "by-hand"
    shutil.copytree(other, by_hand)
    a, b = tensors(fft), tensors(other)
    for file in weight_files(by_hand):
        save_file({name: ((a[name].float() + b[name].float()) / 2).to(torch.bfloat16)
                   for name in load_file(file)}, file, metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # loaded tied
    torch.testing.assert_close(logits(merged), logits(by_hand), rtol=0, atol=1e-4)


def test_a_redundant_output_layer_reads_as_tied(base, tmp_path: Path) -> None:
    """A tied model saved with a copy of its embedding as lm_head (knowstack's FFT before, other tools), with its
    config saying tied or not, merges with the base and a tied fine-tune into a tied model."""
    base_dir = base("llama3.2")
    copies = []
    for seed, tie in ((1, True), (2, False)):
        model = stand_in(base_dir, tmp_path / f"copy-{tie}", seed=seed)
        add_output_layer(model, tensors(model)[INPUT_EMBEDDING], tie=tie)
        assert FullModel(model).tied and OUTPUT_EMBEDDING not in FullModel(model).names()
        copies.append(model)
    tied = stand_in(base_dir, tmp_path / "tied", seed=3)
    merged = merge_models("ties", [*copies, tied], tmp_path / "ties", base=base_dir)
    assert_as_users_have_it(merged, torch.bfloat16, tied=True)
    # statistics are taken of the model as transformers loads it (tied): they cover what the merge reads
    grams = [api.statistics(m, TRAIN, tmp_path / f"gram-{i}", kinds=["gram"], examples=2)
             for i, m in enumerate([*copies, tied])]
    regmean = merge_models("regmean", [*copies, tied], tmp_path / "regmean", statistics=grams)
    assert_as_users_have_it(regmean, torch.bfloat16, tied=True)
    mixed = api.mix(base_dir, [*copies, tied], tmp_path / "moe", router="uniform", top_k=3)
    assert mixed["architecture"] == "MixtralForCausalLM" and config(tmp_path / "moe")["tie_word_embeddings"] is True


def test_a_tie_broken_on_purpose_merges_untied_against_the_base_embedding(base, tmp_path: Path) -> None:
    """An input whose lm_head differs from its embedding (config untied) merged with a tied one against a tied
    base: the output is untied, its lm_head the merge of the inputs' lm_heads (the tied one's is its embedding)
    with the base's embedding as the reference of the task vectors."""
    base_dir = base("qwen3")
    broken = stand_in(base_dir, tmp_path / "broken", seed=1)
    gen = torch.Generator().manual_seed(5)
    embedding = tensors(broken)[INPUT_EMBEDDING]
    add_output_layer(broken, embedding.float() + 0.05 * torch.randn(embedding.shape, generator=gen), tie=False)
    assert not FullModel(broken).tied
    tied = stand_in(base_dir, tmp_path / "tied", seed=2)
    merged = merge_models("task-average", [broken, tied], tmp_path / "merged", base=base_dir,
                          options=api_merge_options(lam=0.7))
    assert_as_users_have_it(merged, torch.bfloat16, tied=False)
    start, a, b, out = (tensors(d) for d in (base_dir, broken, tied, merged))
    reference = start[INPUT_EMBEDDING].float()
    for name, theirs in ((OUTPUT_EMBEDDING, b[INPUT_EMBEDDING]), (INPUT_EMBEDDING, b[INPUT_EMBEDDING])):
        expected = reference + 0.7 * ((a[name].float() - reference) + (theirs.float() - reference)) / 2
        torch.testing.assert_close(out[name].float(), expected.to(torch.bfloat16).float(), rtol=0, atol=2e-3)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(model.lm_head.weight, out[OUTPUT_EMBEDDING].float())
    # mixed, the same inputs give an untied FFT-MoE whose lm_head is the base's (shared: base), the tied base's
    # embedding, as docs/commands.md says
    api.mix(base_dir, [broken, tied], tmp_path / "moe", router="uniform")
    assert config(tmp_path / "moe")["tie_word_embeddings"] is False
    mixed = tensors(tmp_path / "moe")
    assert torch.equal(mixed[OUTPUT_EMBEDDING], start[INPUT_EMBEDDING])


def api_merge_options(**given: float):
    from knowstack.combine.merges import MergeOptions

    return MergeOptions(**given)


def test_dtype_auto_keeps_bf16_and_float32_is_asked_for(base, tmp_path: Path) -> None:
    """merge and mix (FFT-MoE, LoRA-MoE) keep bf16 unless --dtype says otherwise; config.json says what was
    written; merge.json / moe.json record it."""
    base_dir = base("llama3.2")
    models = [stand_in(base_dir, tmp_path / f"m{i}", seed=i) for i in range(2)]
    main(["merge", "--method", "average", "--base", str(base_dir), "--models", *map(str, models), "--dtype",
          "float32", "--out", str(tmp_path / "f32")])
    assert_as_users_have_it(tmp_path / "f32", torch.float32, tied=True)
    assert json.loads((tmp_path / "f32" / "merge.json").read_text())["dtype"] == "float32"

    record = api.mix(base_dir, models, tmp_path / "moe", router="uniform", top_k=2)
    assert record["dtype"] == "bfloat16" and "dtype" not in record["options"]
    assert_as_users_have_it(tmp_path / "moe", torch.bfloat16, tied=True)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.dtype == torch.bfloat16
    assert moe.lm_head.weight is moe.get_input_embeddings().weight
    main(["mix", "--base", str(base_dir), "--models", *map(str, models), "--router", "uniform", "--top-k", "2",
          "--dtype", "float32", "--out", str(tmp_path / "moe32")])
    assert_as_users_have_it(tmp_path / "moe32", torch.float32, tied=True)
    assert json.loads((tmp_path / "moe32" / "moe.json").read_text())["options"]["dtype"] == "float32"


def test_lora_outputs_merge_adapter_and_lora_moe_carry_the_base_files(base, tmp_path: Path) -> None:
    """A LoRA run's adapter dir, the adapter merged into the base (sequential LoRA's next base) and a LoRA-MoE of
    adapters hold generation_config, tokenizer and chat template; the merged model is tied and bf16 like its base;
    --dtype bfloat16 writes a LoRA-MoE's experts in bf16 (its routers stay float32)."""
    base_dir = base("gemma2")
    adapters = []
    for i, data in enumerate((PAIRS, PAIRS[::-1])):
        adapters.append(tmp_path / f"lora{i}")
        api.train(base_dir, data, adapters[-1], finetune="lora", max_steps=1, batch_size=2, lr=1e-2, seed=i)
        assert all((adapters[-1] / name).is_file() for name in CARRIED)
    folded = merge_adapter(base_dir, adapters[0], tmp_path / "folded")
    assert_as_users_have_it(folded, torch.bfloat16, tied=True)
    torch.testing.assert_close(logits(folded), _logits_of(load_model(base_dir, adapters[0], dtype="auto")),
                               rtol=0, atol=1e-4)
    api.mix(base_dir, adapters, tmp_path / "lora-moe", router="uniform", top_k=2, dtype="bfloat16")
    assert all((tmp_path / "lora-moe" / name).is_file() for name in CARRIED)
    experts = load_file(tmp_path / "lora-moe" / "lora_moe.safetensors")
    assert {v.dtype for k, v in experts.items() if not k.startswith("routers.")} == {torch.bfloat16}
    assert {v.dtype for k, v in experts.items() if k.startswith("routers.")} == {torch.float32}


def _logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.float()(TOKENS).logits


def test_sharded_outputs_have_the_hubs_index(base, tmp_path: Path) -> None:
    """Above the shard size, save_pretrained (train, merge-adapter) and the streamed writer (merge, MoE) both write
    shards and model.safetensors.index.json with metadata.total_size (and total_parameters) and a full
    weight_map."""
    base_dir = base("qwen2")
    saved = save_model(load_model(base_dir, dtype="auto"), None, tmp_path / "saved", max_shard_bytes=40_000)
    models = [stand_in(base_dir, tmp_path / f"m{i}", seed=i) for i in range(2)]
    merged = merge_models("average", models, tmp_path / "merged", max_shard_bytes=40_000)
    for out in (saved, merged):
        index = json.loads((out / INDEX_FILE).read_text())
        specs = SafetensorsReader.from_dir(out).specs
        assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(specs)
        assert index["metadata"]["total_size"] == sum(spec.nbytes for spec in specs.values())
        assert index["metadata"]["total_parameters"] == sum(math.prod(spec.shape) for spec in specs.values())
        assert OUTPUT_EMBEDDING not in specs


def test_config_dtype_fields_follow_the_tensors(tmp_path: Path) -> None:
    """torch_dtype (older transformers read only that) is rewritten beside dtype where a config has it."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    set_config_dtype(tmp_path, torch.bfloat16)
    assert config(tmp_path) == {"model_type": "llama", "torch_dtype": "bfloat16", "dtype": "bfloat16"}


def test_an_unknown_dtype_is_refused_before_anything_is_written(base, tmp_path: Path) -> None:
    base_dir = base("llama3.2")
    with pytest.raises(KnowstackError, match="dtype must be one of auto, float32, bfloat16, float16"):
        merge_models("average", [base_dir, base_dir], tmp_path / "merged", dtype="fp8")
    with pytest.raises(KnowstackError, match="dtype must be one of"):
        api.mix(base_dir, [base_dir, base_dir], tmp_path / "moe", router="uniform", top_k=2, dtype="int8")
    assert not any(tmp_path.iterdir())


def test_every_file_that_shows_a_tokenizer_is_carried_beside_an_output(tmp_path: Path) -> None:
    """One declaration of the tokenizer's files (modelio): each file that tells validate a dir has a tokenizer is one
    copied beside every output, so an output has a tokenizer wherever its base has one (spiece.model was told apart
    but not carried: a base whose tokenizer it was gave merges and mixtures no tokenizer)."""
    from knowstack import validate
    from knowstack.modelio import TOKENIZER_LOAD_FILES, copy_model_files

    assert not hasattr(validate, "TOKENIZER_FILES")  # its own list, which drifted from the copied one, is gone
    assert set(TOKENIZER_LOAD_FILES) < set(TOKENIZER_FILES)
    for name in TOKENIZER_LOAD_FILES:
        source, out = tmp_path / name / "base", tmp_path / name / "out"
        source.mkdir(parents=True)
        out.mkdir()
        (source / name).write_text("{}", encoding="utf-8")
        assert validate.has_tokenizer_files(source)
        copy_model_files(source, out)
        assert validate.has_tokenizer_files(out), name
    # what shows no tokenizer by itself: carried, but not taken for one
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in sorted(set(TOKENIZER_FILES) - set(TOKENIZER_LOAD_FILES)):
        (alone / name).write_text("{}", encoding="utf-8")
    assert not validate.has_tokenizer_files(alone)
    assert validate.check_tokenizer(alone)[0].message.startswith("no tokenizer (tokenizer.json or tokenizer_config.json)")
