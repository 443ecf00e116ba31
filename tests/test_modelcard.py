"""Every model dir knowstack writes carries a README.md whose front matter the Hub reads (base_model,
base_model_relation, library_name, tags): trained models and adapters, adapters merged in, merges (and the
exact adapter beside a linear merge of adapters), both MoEs, and exported registry versions, whose card
also holds the lineage and the recorded scores with their intervals."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_registry import make_adapter, make_finetune, make_task

from knowstack.combine.merge import merge_models
from knowstack.combine.moe import MoeOptions, mix_models
from knowstack.data.formats import Example
from knowstack.modelcard import (
    CardScore,
    dir_sha256,
    examples_sha256,
    read_card_metadata,
    score_interval,
    wilson_interval,
)
from knowstack.registry import init_registry
from knowstack.registry.contribute import contribute
from knowstack.registry.export import export_version
from knowstack.train import TrainSettings
from knowstack.train.loop import merge_adapter, train

EXAMPLES = [Example(f"question {i}:", " yes") for i in range(4)]


def card(model_dir: Path) -> tuple[dict, str]:
    return read_card_metadata(model_dir), (model_dir / "README.md").read_text(encoding="utf-8")


def check(model_dir: Path, relation: str, library: str, base: str) -> str:
    meta, text = card(model_dir)
    assert meta["base_model"] == base, meta
    assert meta["base_model_relation"] == relation and meta["library_name"] == library
    assert "knowstack" in meta["tags"]
    return text


def test_trained_merged_and_mixed_models_have_cards_naming_their_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    base = str(tiny_model_dir.resolve())
    settings = dict(lr=1e-3, max_steps=1, batch_size=2, micro_batch_size=2, max_length=32, lora_r=2, lora_alpha=4)
    train(tiny_model_dir, EXAMPLES, tmp_path / "lora", TrainSettings(finetune="lora", **settings))
    train(tiny_model_dir, EXAMPLES, tmp_path / "fft", TrainSettings(finetune="fft", **settings))
    text = check(tmp_path / "lora", "adapter", "peft", base)
    # the card names its inputs by content hash: the base's and the training data's
    assert dir_sha256(tiny_model_dir) in text
    assert examples_sha256((ex.prompt, ex.answer) for ex in EXAMPLES) in text
    assert '"lora_r": 2' in text and "Not measured when this card was written" in text
    check(tmp_path / "fft", "finetune", "transformers", base)

    merge_adapter(tiny_model_dir, tmp_path / "lora", tmp_path / "folded")
    check(tmp_path / "folded", "finetune", "transformers", base)

    a1, a2 = make_adapter(tiny_model_dir, tmp_path / "a1", 1), make_adapter(tiny_model_dir, tmp_path / "a2", 2)
    merge_models("task-average", [a1, a2], tmp_path / "linear", base=tiny_model_dir)
    text = check(tmp_path / "linear", "merge", "transformers", base)
    assert dir_sha256(a1) in text and dir_sha256(a2) in text
    # the title names the method, every model merged and the base; the line under it says the base is what it is on
    assert f"\n# task-average merge of `{a1.resolve()}`, `{a2.resolve()}` on `{base}`\n" in text
    assert f"(merge on the base `{base}`)" in text and f"(merge of `{base}`)" not in text
    check(tmp_path / "linear" / "adapter", "adapter", "peft", base)  # the exact PEFT form of the same merge
    ft = make_finetune(tiny_model_dir, tmp_path / "ft", 3)
    merge_models("average", [ft, tmp_path / "fft"], tmp_path / "average")  # no base: the models merged are its parents
    assert card(tmp_path / "average")[0]["base_model"] == [str(ft.resolve()), str((tmp_path / "fft").resolve())]
    assert f"(merge of `{ft.resolve()}`, `{(tmp_path / 'fft').resolve()}`)" in card(tmp_path / "average")[1]

    mix_models(tiny_model_dir, [ft, tmp_path / "fft"], tmp_path / "fft-moe", options=MoeOptions(router="random"))
    check(tmp_path / "fft-moe", "merge", "transformers", base)
    mix_models(tiny_model_dir, [a1, a2], tmp_path / "lora-moe", options=MoeOptions(router="random"))
    check(tmp_path / "lora-moe", "adapter", "knowstack", base)


def test_an_exported_version_carries_its_lineage_and_scores(tmp_path: Path, tiny_model_dir: Path) -> None:
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir)
    record = contribute(reg, "stance", adapter=make_adapter(tiny_model_dir, tmp_path / "a1", 1),
                        task=make_task(tmp_path / "tasks", "Stance"))
    export_version(reg, "stance", tmp_path / "out")
    text = check(tmp_path / "out", "adapter", "peft", str(tiny_model_dir.resolve()))
    assert "## Lineage" in text and "- stance [released] (contribution, task Stance" in text
    assert "\n  - base [released] (base" in text  # the contribution's parent, indented under it
    assert record["content_hash"][:16] in text
    score = next(s for s in record["scores"] if s["kind"] == "new")
    low, high = wilson_interval(score["value"], score["n"])
    assert f"| Stance | new | accuracy | {score['value']:.4f} | [{low:.3f}, {high:.3f}] | {score['n']} |" in text
    export_version(reg, "base", tmp_path / "base-out")
    assert card(tmp_path / "base-out")[0]["base_model"] == str(tiny_model_dir.resolve())


def test_intervals_only_where_a_score_is_a_share_of_items() -> None:
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)  # textbook values
    assert score_interval(CardScore("t", "rouge_l", 0.4, 50)) is None
    assert score_interval(CardScore("t", "accuracy", 0.4, None)) is None
    assert score_interval(CardScore("t", "accuracy", 1.0, 10))[1] == 1.0


def test_a_merge_without_input_hashes_says_so_and_hashes_nothing(tmp_path: Path, tiny_model_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-input-hashes: the card lists the inputs without sha256 and records the choice, as merge.json does;
    by default the inputs' hashes are taken as the merge reads them and merge.json says nothing of it."""
    import json

    from knowstack import hashing

    ft = make_finetune(tiny_model_dir, tmp_path / "ft", 3)
    merge_models("task-arithmetic", [ft], tmp_path / "hashed", base=tiny_model_dir)
    text = card(tmp_path / "hashed")[1]
    assert dir_sha256(ft) in text and dir_sha256(tiny_model_dir) in text
    assert "not computed" not in text
    assert "input_hashes" not in json.loads((tmp_path / "hashed" / "merge.json").read_text())

    def refuse(path: Path) -> str:
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(hashing, "file_sha256", refuse)
    monkeypatch.setattr(hashing, "_SEEN", {})
    merge_models("task-arithmetic", [ft], tmp_path / "unhashed", base=tiny_model_dir, input_hashes=False)
    text = card(tmp_path / "unhashed")[1]
    assert f"| merged | `{ft.resolve()}` | - |" in text and '"input_hashes": false' in text
    assert "\n\nThe inputs' sha256 were not computed (`--no-input-hashes`).\n" in text  # said in words, under the table
    assert json.loads((tmp_path / "unhashed" / "merge.json").read_text())["input_hashes"] is False
