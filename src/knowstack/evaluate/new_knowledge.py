"""Scoring a model on one new-knowledge task: generate answers to the test prompts, apply the metric."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.data.formats import DIRECT_ANSWER_PRIMER, Example, final_number, first_number
from knowstack.errors import KnowstackError
from knowstack.evaluate.generate import generate
from knowstack.evaluate.metrics import METRICS, number_em

# Generation budgets per metric, sized to the answers each kind of task expects.
DEFAULT_MAX_NEW_TOKENS = {"accuracy": 6, "rouge_l": 40, "edit_similarity": 32, "sari": 40, "math": 96}
DIRECT_MAX_NEW_TOKENS = 12


@dataclass
class TaskScore:
    scores: dict[str, float]
    predictions: list[dict] = field(default_factory=list)
    per_example: dict[str, list[float]] = field(default_factory=dict)  # metric -> one score per test item


def _per_item(metric, predictions: list[str], references: list[str], sources: list[str]) -> list[float]:
    # Every metric is a mean over examples, so the metric of one example is that example's score.
    return [metric([p], [r], [s]) for p, r, s in zip(predictions, references, sources, strict=True)]


def _with_scores(rows: list[dict], per_example: dict[str, list[float]]) -> list[dict]:
    return [{**row, "scores": {m: v[i] for m, v in per_example.items()}} for i, row in enumerate(rows)]


def _first_line(text: str) -> str:
    # Code completion predicts one line; everything after the first newline is not part of it.
    return text.strip("\n").split("\n", 1)[0] if text.strip() else ""


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    metric: str,
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> TaskScore:
    """{'accuracy'|'rouge_l'|'edit_similarity'|'sari': x}, or for math {'em_direct': x, 'em_cot': y}."""
    if metric not in DEFAULT_MAX_NEW_TOKENS:
        raise KnowstackError(f"unknown metric '{metric}' (known: {', '.join(DEFAULT_MAX_NEW_TOKENS)})", field="metric")
    budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[metric]
    prompts = [e.prompt for e in examples]
    references = [e.answer for e in examples]
    if metric == "math":
        return _evaluate_math(model, tokenizer, prompts, references, batch_size=batch_size, budget=budget)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    if metric == "edit_similarity":
        outputs = [_first_line(o) for o in outputs]
    predictions = [o.strip() for o in outputs]
    value = METRICS[metric](predictions, references, prompts)
    rows = [{"prompt": p, "reference": r, "prediction": o} for p, r, o in zip(prompts, references, predictions, strict=True)]
    per_example = {metric: _per_item(METRICS[metric], predictions, references, prompts)}
    return TaskScore({metric: value}, _with_scores(rows, per_example), per_example)


def _evaluate_math(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    references: list[str],
    *,
    batch_size: int,
    budget: int,
) -> TaskScore:
    # With chain of thought the model writes its solution and the final number counts; without, the
    # prompt ends on the answer phrase and the first number generated is the answer.
    cot = generate(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch_size)
    direct_prompts = [p + DIRECT_ANSWER_PRIMER for p in prompts]
    direct = generate(model, tokenizer, direct_prompts, max_new_tokens=DIRECT_MAX_NEW_TOKENS, batch_size=batch_size)
    cot_answers = [final_number(o) or "" for o in cot]
    direct_answers = [first_number(o) or "" for o in direct]
    scores = {"em_direct": number_em(direct_answers, references), "em_cot": number_em(cot_answers, references)}
    rows = [
        {"prompt": p, "reference": r, "prediction": c, "answer_cot": ca, "prediction_direct": d, "answer_direct": da}
        for p, r, c, ca, d, da in zip(prompts, references, cot, cot_answers, direct, direct_answers, strict=True)
    ]
    per_example = {"em_direct": _per_item(number_em, direct_answers, references, prompts),
                   "em_cot": _per_item(number_em, cot_answers, references, prompts)}
    return TaskScore(scores, _with_scores(rows, per_example), per_example)
