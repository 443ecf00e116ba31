"""Batched generation and the lm-eval bridge, checked against one-at-a-time and direct oracles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.evaluate.generate import generate
from knowstack.evaluate.new_knowledge import evaluate_task
from knowstack.evaluate.old_knowledge import evaluate_old_knowledge
from knowstack.modelio import load_model, load_tokenizer

PROMPTS = ["def add(a, b):", "The official currency of Japan is", "Question: what is 3 plus 4? Answer:",
           "France", "Below is an instruction that describes a task. ### Instruction: add ### Response:"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    return load_model(tiny_model_dir, dtype="float32"), load_tokenizer(tiny_model_dir)


def one_at_a_time(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_batched_generation_equals_one_at_a_time(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert batched == [one_at_a_time(model, tokenizer, p, 12) for p in PROMPTS]


def test_evaluate_task_scores_and_predictions(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    outputs = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=8)
    # References equal to the model's own outputs score 1; others 0.
    examples = [Example(p, o.strip() if i < 2 else "zzz") for i, (p, o) in enumerate(zip(PROMPTS[:3], outputs, strict=True))]
    score = evaluate_task(model, tokenizer, examples, "accuracy", max_new_tokens=8)
    assert score.scores == {"accuracy": pytest.approx(2 / 3)}
    assert [row["prediction"] for row in score.predictions] == [o.strip() for o in outputs]
    math = evaluate_task(model, tokenizer, [Example(PROMPTS[4], "7")], "math", max_new_tokens=8)
    assert set(math.scores) == {"em_direct", "em_cot"}


def write_mc_task(root: Path) -> list[dict]:
    docs = [{"question": f"Item {i} goes with", "choices": ["add", "Japan", "France", "answer"], "answer": i % 4}
            for i in range(10)]
    (root / "ks_toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "ks_toy.yaml").write_text(
        "task: ks_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'ks_toy.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return docs


@torch.inference_mode()
def direct_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """The oracle: argmax over choices of the summed log-likelihood of ' ' + choice after the question."""
    correct = 0
    for doc in docs:
        context = tokenizer(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
            logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logits[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(docs)


def test_lm_eval_bridge_matches_direct_loglikelihood(model_and_tokenizer, tmp_path: Path) -> None:
    model, tokenizer = model_and_tokenizer
    docs = write_mc_task(tmp_path)
    result = evaluate_old_knowledge(model, tokenizer, ["ks_toy"], include_path=tmp_path, batch_size=4)
    assert set(result["ks_toy"]) == {"acc", "acc_norm"}
    assert result["ks_toy"]["acc"] == pytest.approx(direct_accuracy(model, tokenizer, docs))
    with pytest.raises(KnowstackError, match="unknown lm-eval task"):
        evaluate_old_knowledge(model, tokenizer, ["ks_nope"], include_path=tmp_path)


def test_relative_data_files_resolve_against_the_yaml(model_and_tokenizer, tmp_path: Path) -> None:
    model, tokenizer = model_and_tokenizer
    write_mc_task(tmp_path)
    yaml_path = tmp_path / "ks_toy.yaml"
    yaml_path.write_text(yaml_path.read_text().replace(str(tmp_path / "ks_toy.jsonl"), "ks_toy.jsonl"))
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("ks_toy.yaml", "ks_toy.jsonl"):
        (tmp_path / name).rename(moved / name)
    result = evaluate_old_knowledge(model, tokenizer, ["ks_toy"], include_path=moved, batch_size=4)
    assert 0.0 <= result["ks_toy"]["acc"] <= 1.0
