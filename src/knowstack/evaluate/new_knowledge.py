"""Scoring a model on one new-knowledge task: generate answers to the test prompts, read them, apply the metric,
each step as the task's protocol declares it (evaluate/protocols.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.config import DEFAULT_PROTOCOL, EVAL_BATCH_SIZE
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.evaluate.generate import generate
from knowstack.evaluate.metrics import PER_EXAMPLE
from knowstack.evaluate.protocols import Scoring, budget_for, read_all, scorings


@dataclass
class TaskScore:
    """A task's scores: the mean of each metric, and per metric the score of each test item (in test order)."""

    scores: dict[str, float]
    predictions: list[dict] = field(default_factory=list)  # one row per test item, with its "scores"
    per_example: dict[str, list[float]] = field(default_factory=dict)
    protocol: str = DEFAULT_PROTOCOL
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # the generation budget of each metric
    references_over_budget: dict[str, int] = field(default_factory=dict)  # references longer than the budget
    prompts_truncated: int | None = None  # prompts cut to fit the context (when generation reports it)
    # per generated metric: decoding steps x rows computed ("row_tokens"), and those not computed because their row
    # had finished and left the batch ("row_tokens_saved")
    row_tokens: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self) -> dict:
        """What a study keeps of the score beside the predictions (new-<task>.json)."""
        return {"n": len(self.predictions), "scores": self.scores, "protocol": self.protocol,
                "max_new_tokens": self.max_new_tokens, "references_over_budget": self.references_over_budget,
                "prompts_truncated": self.prompts_truncated, "row_tokens": self.row_tokens}


@dataclass(frozen=True)
class HarnessData:
    """The files lm-eval reads for a harness-scored task (GSM8K): the test file, and a file to draw few-shot
    examples from (None: the test file itself, each item never its own example)."""

    test: Path
    fewshot: Path | None = None
    limit: int | None = None
    add_bos_token: bool | None = None  # lm-eval's BOS (old_knowledge.harness_bos); None: the tokenizer's default


def score_predictions(
    scoring: Scoring, predictions: Sequence[str], references: Sequence[str], sources: Sequence[str]
) -> tuple[list[str], list[float]]:
    """Generations read as the scoring declares, and each one's score against its reference."""
    answers = read_all(scoring.reader, predictions)
    refs = read_all(scoring.reference_reader, references)
    return answers, PER_EXAMPLE[scoring.implementation](answers, refs, sources)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    metric: str,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    max_new_tokens: int | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    harness: HarnessData | None = None,
) -> TaskScore:
    """Each of the task's scores under `protocol`, e.g. {'accuracy': x}, or for math {'em_direct', 'em_cot'}
    (builtin) / {'gsm8k', 'gsm8k_cot'} (paper). `max_new_tokens` overrides the budget of every scoring that
    takes an override (all but builtin math's direct answer, whose budget is part of its definition)."""
    declared = scorings(protocol, metric)
    prompts = [e.prompt for e in examples]
    references = [e.answer for e in examples]
    result = TaskScore({}, [{"prompt": p, "reference": r, "scores": {}} for p, r in zip(prompts, references,
                                                                                           strict=True)],
                       protocol=protocol)
    truncated: list[int] = []
    for scoring in declared:
        override = max_new_tokens if scoring.takes_budget_override else None
        if scoring.harness_task is not None:
            _score_with_harness(result, scoring, model, tokenizer, harness, batch_size, override)
        else:
            _score_generations(result, scoring, model, tokenizer, prompts, references, batch_size, override, truncated)
    result.prompts_truncated = max(truncated) if truncated else None
    return result


def _score_generations(
    result: TaskScore, scoring: Scoring, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    prompts: list[str], references: list[str], batch_size: int, override: int | None, truncated: list[int],
) -> None:
    reference_tokens = [len(ids) for ids in tokenizer(references, add_special_tokens=False)["input_ids"]]
    budget = _within_context(model, budget_for(scoring, reference_tokens, override))
    stats: dict = {}
    outputs = generate(model, tokenizer, [p + scoring.prompt_suffix for p in prompts], max_new_tokens=budget,
                       batch_size=batch_size, stop_strings=scoring.stop or None, stats=stats)
    if "prompts_truncated" in stats:
        truncated.append(int(stats["prompts_truncated"]))
    answers, each = score_predictions(scoring, outputs, references, prompts)
    _record(result, scoring, outputs, answers, each)
    result.max_new_tokens[scoring.metric] = budget
    if "row_tokens" in stats:
        result.row_tokens[scoring.metric] = {key: int(stats[key]) for key in ("row_tokens", "row_tokens_saved")}
    result.references_over_budget[scoring.metric] = sum(n > budget for n in reference_tokens)


def _within_context(model: PreTrainedModel | None, budget: int) -> int:
    """A budget the model's context can hold beside a prompt: at most half of it (the paper's 512 tokens on a
    small model would leave no room for the question). The budget used is recorded with the scores."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(budget, context // 2) if isinstance(context, int) and context > 1 else budget


def _record(result: TaskScore, scoring: Scoring, outputs: Sequence[str], answers: Sequence[str],
            each: list[float]) -> None:
    # The first scoring's generation is the row's "prediction"; a further one's is "prediction_<metric>".
    suffix = f"_{scoring.metric}" if result.scores else ""
    for row, output, answer, value in zip(result.predictions, outputs, answers, each, strict=True):
        row[f"prediction{suffix}"] = output
        row[f"answer{suffix}"] = answer
        row["scores"][scoring.metric] = value
    result.per_example[scoring.metric] = list(each)
    result.scores[scoring.metric] = _mean(each)


def _score_with_harness(
    result: TaskScore, scoring: Scoring, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    harness: HarnessData | None, batch_size: int, override: int | None,
) -> None:
    from knowstack.evaluate.gsm8k import evaluate_gsm8k

    if harness is None:
        raise KnowstackError(f"the '{scoring.metric}' score runs lm-eval's {scoring.harness_task} task on a GSM8K-format "
                             "test file; this task has none (give the math task's test_file)", field="test_file")
    run = evaluate_gsm8k(model, tokenizer, scoring.harness_task, harness.test, fewshot=harness.fewshot,
                         limit=harness.limit, batch_size=batch_size, max_gen_toks=override,
                         add_bos_token=harness.add_bos_token)
    if len(run.generations) != len(result.predictions):
        raise KnowstackError(f"lm-eval scored {len(run.generations)} items of {harness.test}, expected "
                             f"{len(result.predictions)}", path=harness.test)
    _record(result, scoring, run.generations, run.answers, run.scores)
    result.max_new_tokens[scoring.metric] = run.max_gen_toks
    result.references_over_budget[scoring.metric] = 0


def score_given_predictions(examples: Sequence[Example], predictions: Sequence[str], metric: str,
                            protocol: str = DEFAULT_PROTOCOL) -> TaskScore:
    """Scores of generations made elsewhere (one per test item, in order), read and scored as `protocol`
    declares for `metric`. A scoring that needs a generation of its own (builtin math's direct answer, primed
    by its own prompt suffix) cannot be computed from them and is left out; a harness task's reading and
    exact match are applied offline, from its installed YAML."""
    from knowstack.evaluate.gsm8k import score_offline

    prompts = [e.prompt for e in examples]
    references = [e.answer for e in examples]
    result = TaskScore({}, [{"prompt": p, "reference": r, "scores": {}} for p, r in zip(prompts, references,
                                                                                           strict=True)],
                       protocol=protocol)
    for scoring in scorings(protocol, metric):
        if scoring.prompt_suffix:
            continue
        if scoring.harness_task is not None:
            answers, each = score_offline(scoring.harness_task, list(predictions), references)
        else:
            answers, each = score_predictions(scoring, predictions, references, prompts)
        _record(result, scoring, predictions, answers, each)
    return result
