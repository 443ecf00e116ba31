"""benchmarks/train_throughput.py's own parts: the per-round ratio and its spread, the rotated order, the check that
the flattening peer keeps packed examples apart, and the JSON it writes (on a tiny model, not the benchmark's)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import build_tiny_model, load_script
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

from knowstack.data.batches import tokenize_examples
from knowstack.data.formats import Example
from knowstack.modelio import load_model, load_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT)


def _row(round_: int, name: str, micro: int, tps: float) -> dict:
    return {"round": round_, "finetune": "fft", "name": name, "micro": micro, "tokens_per_second": tps}


def test_ratio_is_taken_per_round_against_the_faster_peer(bench: ModuleType) -> None:
    rows = [
        _row(0, "knowstack", 16, 120.0), _row(0, "Trainer padded", 4, 50.0), _row(0, "Trainer padded", 16, 80.0),
        _row(0, "Trainer flattening", 16, 100.0),
        _row(1, "knowstack", 16, 60.0), _row(1, "Trainer padded", 4, 40.0), _row(1, "Trainer padded", 16, 30.0),
        _row(1, "Trainer flattening", 16, 30.0),  # a disturbed round: padded is the stronger one here
        _row(2, "knowstack", 16, 150.0), _row(2, "Trainer padded", 16, 90.0), _row(2, "Trainer flattening", 16, 100.0),
    ]
    result = bench.summarize("fft", rows, 3)
    ratio = result["ratio_vs_stronger_peer"]
    assert ratio["per_round"] == pytest.approx([1.2, 1.5, 1.5])
    assert (ratio["median"], ratio["min"], ratio["max"]) == pytest.approx((1.5, 1.2, 1.5))
    assert result["peers"]["padded"]["micro_per_round"] == [16, 4, 16]
    assert result["peers"]["padded"]["tokens_per_second"]["per_round"] == [80.0, 40.0, 90.0]
    assert result["stronger_peer"] == "flattening"  # median 100 against padded's 80
    assert result["knowstack_tokens_per_second"]["median"] == 120.0


def test_rounds_rotate_the_order(bench: ModuleType) -> None:
    runs = ["a", "b", "c"]
    orders = [bench.rotated(runs, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {order[0] for order in orders} == set(runs)


def test_flattening_check_passes_under_trainer_and_catches_a_cache(bench: ModuleType, tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [Example(f"Question: what is {i} plus {i}? Answer:", f" {2 * i}.") for i in range(4)]
    features = [{"input_ids": list(ex.input_ids), "labels": list(ex.labels)}
                for ex in tokenize_examples(tokenizer, examples, 64)]
    model = load_model(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = True  # as saved; Trainer turns it off for training
    with pytest.raises(RuntimeError, match="attend to each other"):
        bench.check_flattening_isolates(model, features)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=DataCollatorWithFlattening())
    bench.check_flattening_isolates(trainer.model, features)


def test_json_report_of_a_tiny_run(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "build_model", build_tiny_model)  # the recipe, on a model that trains in a blink
    out = tmp_path / "throughput.json"
    bench.main(["--examples", "16", "--repeats", "2", "--trainer-micro", "16", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["repeats"] == 2 and report["data"]["steps"] == 1
    assert len(report["load_average"]["before"]) == 3 and report["date"]
    assert [r["finetune"] for r in report["results"]] == ["fft", "lora"]
    assert len(report["runs"]) == 2 * 2 * 3  # rounds x finetunes x (knowstack + two peers)
    for result in report["results"]:
        ratio = result["ratio_vs_stronger_peer"]
        assert len(ratio["per_round"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
        assert set(result["peers"]) == {"padded", "flattening"}
        ours = result["knowstack_tokens_per_second"]["per_round"]
        stronger = [max(result["peers"][k]["tokens_per_second"]["per_round"][r] for k in result["peers"])
                    for r in range(2)]
        assert ratio["per_round"] == pytest.approx([o / s for o, s in zip(ours, stronger, strict=True)])
