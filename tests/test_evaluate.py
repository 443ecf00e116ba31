"""Batched generation and the lm-eval bridge, checked against one-at-a-time and direct oracles."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from knowstack.data.formats import DIRECT_ANSWER_PRIMER, Example
from knowstack.errors import KnowstackError
from knowstack.evaluate import new_knowledge, old_knowledge
from knowstack.evaluate.generate import cut_at_stop, generate
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


def test_stop_strings_cut_and_stop_early(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    free = [one_at_a_time(model, tokenizer, p, 16) for p in PROMPTS]
    longest = max(free, key=len)
    stop = longest[4:6]  # a string the greedy output is known to contain
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=2, stop_strings=[stop, "\x00never"])
    # Greedy decoding stopped early is a prefix of decoding to the end: the oracle cuts the free run.
    assert batched == [cut_at_stop(text, [stop]) for text in free]
    assert stop not in "".join(batched)
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        generate(model, tokenizer, [PROMPTS[free.index(longest)]], max_new_tokens=16, stop_strings=[stop])
    finally:
        hook.remove()
    assert len(calls) < 16


def test_overlong_prompts_lose_their_middle_and_are_counted(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    long_prompt = " ".join(PROMPTS) * 20
    ids = tokenizer(long_prompt)["input_ids"]
    room = model.config.max_position_embeddings - 8
    assert len(ids) > room
    kept = torch.tensor([ids[: room // 2] + ids[len(ids) - (room - room // 2):]])  # training's cut (batches.py)
    out = model.generate(input_ids=kept, attention_mask=torch.ones_like(kept), max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, kept.shape[1]:], skip_special_tokens=True)
    stats: dict = {}
    assert generate(model, tokenizer, [long_prompt, PROMPTS[0]], max_new_tokens=8, stats=stats)[0] == expected
    assert stats["prompts_truncated"] == 1
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=2, stats=stats)
    assert stats["prompts_truncated"] == 0


class CountingTokenizer:
    """Counts characters as tokens: enough for the budget rules, which only measure references."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [list(text) for text in texts]}


def test_math_scores_with_and_without_chain_of_thought(monkeypatch) -> None:
    seen: list[list[str]] = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, stop_strings=None, stats=None):
        seen.append(list(prompts))
        direct = prompts[0].endswith(DIRECT_ANSWER_PRIMER)
        return ["7 apples", "12"] if direct else ["3 + 4 = 7. The answer is: 7", "so 1,2 #### 13"]

    monkeypatch.setattr(new_knowledge, "generate", fake_generate)
    score = evaluate_task(None, CountingTokenizer(), [Example("Q1", "7"), Example("Q2", "12")], "math")
    assert score.scores == {"em_direct": 1.0, "em_cot": 0.5}
    assert score.per_example == {"em_direct": [1.0, 1.0], "em_cot": [1.0, 0.0]}
    assert seen == [["Q1" + DIRECT_ANSWER_PRIMER, "Q2" + DIRECT_ANSWER_PRIMER], ["Q1", "Q2"]]
    assert score.predictions[1]["answer_em_cot"] == "13" and score.predictions[1]["answer"] == "12"
    assert score.predictions[1]["scores"] == {"em_direct": 1.0, "em_cot": 0.0}
    assert score.max_new_tokens == {"em_direct": 12, "em_cot": 96}
    with pytest.raises(KnowstackError, match="unknown metric"):
        evaluate_task(None, None, [Example("Q", "A")], "bleu")


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


def test_lm_eval_bridge_is_lean_and_leaves_global_state_alone(model_and_tokenizer, tmp_path: Path) -> None:
    model, tokenizer = model_and_tokenizer
    write_mc_task(tmp_path)
    torch.manual_seed(123)
    random.seed(123)
    expected = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    model.train()
    evaluate_old_knowledge(model, tokenizer, ["ks_toy"], include_path=tmp_path, batch_size=4, limit=4)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert model.training
    model.eval()
    # Local tasks only: the stock task index (thousands of YAMLs, ~10 s to build) is never built.
    include = str(old_knowledge.resolve_relative_data_files(tmp_path))
    assert old_knowledge._manager_for(["ks_toy"], include).all_tasks == ["ks_toy"]
    import lm_eval.evaluator

    assert lm_eval.evaluator.add_env_info.__module__ == "lm_eval.loggers.utils"  # restored after the call


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


def test_templates_compiled_once_render_as_the_harness_does(model_and_tokenizer, tmp_path: Path,
                                                           monkeypatch) -> None:
    """lean_harness compiles each Jinja template once: the same documents, requests and scores as the harness's own
    apply_template (which compiles per document), and the harness's function is back afterwards."""
    import lm_eval.utils

    model, tokenizer = model_and_tokenizer
    write_mc_task(tmp_path)
    doc = {"question": "Q? ", "choices": ["a", "b"], "n": 3}
    for template in ("{{question}}", "{{choices}}", "{{question ~ n}}\n", "{{question | regex_replace('Q', 'R')}}"):
        assert old_knowledge._apply_compiled_template(template, doc) == lm_eval.utils.apply_template(template, doc)
    fast = old_knowledge.evaluate_old_knowledge_items(model, tokenizer, ["ks_toy"], include_path=tmp_path,
                                                      batch_size=4)
    assert lm_eval.utils.apply_template.__name__ == "apply_template"  # restored after the call
    monkeypatch.setattr(old_knowledge, "_apply_compiled_template", lm_eval.utils.apply_template)
    harness = old_knowledge.evaluate_old_knowledge_items(model, tokenizer, ["ks_toy"], include_path=tmp_path,
                                                         batch_size=4)
    assert fast == harness


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_lm_eval_gets_bos_as_set_whatever_its_own_default(add_bos_token: bool, model_and_tokenizer,
                                                           tmp_path: Path) -> None:
    """old_knowledge.add_bos_token reaches the harness: its prompts start with BOS exactly when set (lm-eval's own
    default changed between versions), and the scores are the oracle's on prompts tokenized so."""
    import copy

    from tokenizers import processors

    from knowstack.evaluate.old_knowledge import harness_bos, quiet_hflm

    model, tokenizer = model_and_tokenizer
    tokenizer = copy.deepcopy(tokenizer)  # one that adds BOS by default, as Llama-3's does
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    encoded = quiet_hflm(model, tokenizer, 4, add_bos_token).tok_encode("a question")
    assert (encoded[:1] == [tokenizer.bos_token_id]) is add_bos_token
    assert harness_bos(tokenizer, None) is True
    docs = write_mc_task(tmp_path)

    class Tokenized:  # the oracle's tokenizer, with BOS as set
        def __call__(self, text: str) -> dict:
            return tokenizer(text, add_special_tokens=add_bos_token)

    result = evaluate_old_knowledge(model, tokenizer, ["ks_toy"], include_path=tmp_path, batch_size=4,
                                    add_bos_token=add_bos_token)
    assert result["ks_toy"]["acc"] == pytest.approx(direct_accuracy(model, Tokenized(), docs))
