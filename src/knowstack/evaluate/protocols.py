"""Evaluation protocols as data: how each kind of task is scored, declared like an lm-eval task.

A task's metric (accuracy, rouge_l, edit_similarity, sari, exact_match, math) names what is measured;
the protocol says how. For each, a `Scoring` declares the generation (budget, stop strings, a suffix
added to the prompt), how the answer is read from the generation and from the reference, and which
per-example implementation (evaluate/metrics.py) scores it; math under the paper's protocol is two
lm-eval tasks (`gsm8k`, `gsm8k_cot`) run through the harness with their own prompts and extraction.

- `paper`: the paper's scoring, from RhuiDih/cl's print_traceeval.py (accuracy = first character of the
  stripped output vs first character of the reference; ROUGE-L = rouge==1.0.1; edit similarity =
  fuzzywuzzy on the raw generation; SARI = HF evaluate's) and TRACE's evaluations/ for what the paper
  did not use (NumGLUE: exact match). Budget: TRACE's inference scripts' `--max_ans_len 512`
  (RhuiDih/cl does not publish its inference script).
- `builtin`: what knowstack's built-in world has always used (whole stripped answer for accuracy,
  rouge-score's ROUGE-L, the first line for code), with its per-metric budgets as floors that grow to
  the longest reference in tokens, so no real answer is cut by the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from knowstack.config import METRICS, PROTOCOLS
from knowstack.data.formats import DIRECT_ANSWER_PRIMER, final_number, first_number
from knowstack.errors import KnowstackError

PROTOCOL_NAMES = PROTOCOLS  # config.py declares them
TASK_METRICS = METRICS  # config.py declares them


@dataclass(frozen=True)
class Scoring:
    """One score of a task: one generation of every test prompt, read and scored one way."""

    metric: str  # the results' metric name
    implementation: str  # a PER_EXAMPLE metric in evaluate/metrics.py, or "lm-eval" (harness_task)
    reader: str = "strip"  # how the answer is read from a generation (READERS)
    reference_reader: str = "strip"  # how the reference is read (READERS)
    max_new_tokens: int = 512
    fit_to_references: bool = False  # grow the budget to the longest reference, in tokens
    takes_budget_override: bool = True  # evaluation.max_new_tokens applies to it
    prompt_suffix: str = ""
    stop: tuple[str, ...] = ()
    harness_task: str | None = None  # an lm-eval task whose prompts, few-shot and extraction are used
    source: str = ""


def _first_line(text: str) -> str:
    # Code completion predicts one line; everything after the first newline is not part of it.
    return text.strip("\n").split("\n", 1)[0].strip() if text.strip() else ""


def _first_char(text: str) -> str:
    # RhuiDih/cl print_traceeval.py: the stripped output's first character (an output of one character
    # or none is kept whole).
    text = text.strip()
    return text[0] if len(text) > 1 else text


READERS: dict[str, Callable[[str], str]] = {
    "raw": lambda text: text,
    "strip": str.strip,
    "exact": str.strip,
    "first-line": _first_line,
    "first-char": _first_char,
    "reference-first-char": lambda text: text[:1],  # the paper reads the reference's first character unstripped
    "final-number": lambda text: final_number(text) or "",
    "first-number": lambda text: first_number(text) or "",
}

_TRACE = "TRACE inference scripts (--max_ans_len 512); RhuiDih/cl print_traceeval.py"
PROTOCOLS: dict[str, dict[str, tuple[Scoring, ...]]] = {
    "builtin": {
        "accuracy": (Scoring("accuracy", "accuracy", max_new_tokens=6, fit_to_references=True,
                             source="knowstack: the whole stripped answer"),),
        "exact_match": (Scoring("exact_match", "exact_match", reader="exact", reference_reader="exact",
                                max_new_tokens=6, fit_to_references=True, source="TRACE eval_NumGLUE"),),
        "rouge_l": (Scoring("rouge_l", "rouge_l", max_new_tokens=40, fit_to_references=True,
                            source="knowstack: rouge-score's sentence-level ROUGE-L F"),),
        "edit_similarity": (Scoring("edit_similarity", "edit_similarity", reader="first-line", max_new_tokens=32,
                                    fit_to_references=True, source="knowstack: the first generated line"),),
        "sari": (Scoring("sari", "sari", max_new_tokens=40, fit_to_references=True, source="HF evaluate sari"),),
        "math": (
            Scoring("em_direct", "number_em", reader="first-number", reference_reader="raw", max_new_tokens=12,
                    takes_budget_override=False, prompt_suffix=DIRECT_ANSWER_PRIMER, source="knowstack: the first number after the answer phrase"),
            Scoring("em_cot", "number_em", reader="final-number", reference_reader="raw", max_new_tokens=96,
                    source="knowstack: the final number of a chain of thought"),
        ),
    },
    "paper": {
        "accuracy": (Scoring("accuracy", "equal", reader="first-char", reference_reader="reference-first-char",
                             source=_TRACE),),
        "exact_match": (Scoring("exact_match", "exact_match", reader="exact", reference_reader="exact",
                                source="TRACE evaluations/eval_NumGLUE_*.py (caculate_accuracy)"),),
        "rouge_l": (Scoring("rouge_l", "rouge_l_trace", reader="raw", reference_reader="raw", source=_TRACE),),
        "edit_similarity": (Scoring("edit_similarity", "edit_similarity_trace", reader="raw", reference_reader="raw",
                                    source=_TRACE),),
        "sari": (Scoring("sari", "sari", reader="raw", reference_reader="raw", source=_TRACE),),
        "math": (
            Scoring("gsm8k", "lm-eval", harness_task="gsm8k", source="paper: lm-eval gsm8k, 5-shot, flexible-extract"),
            Scoring("gsm8k_cot", "lm-eval", harness_task="gsm8k_cot",
                    source="paper: lm-eval gsm8k_cot, 8-shot, flexible-extract"),
        ),
    },
}


def scorings(protocol: str, metric: str) -> tuple[Scoring, ...]:
    """The declared scorings of a task with `metric` under `protocol`; an unknown name is one clear error."""
    if protocol not in PROTOCOLS:
        raise KnowstackError(f"unknown protocol '{protocol}' (known: {', '.join(PROTOCOL_NAMES)})", field="protocol")
    if metric not in PROTOCOLS[protocol]:
        raise KnowstackError(f"unknown metric '{metric}' (known: {', '.join(TASK_METRICS)})", field="metric")
    return PROTOCOLS[protocol][metric]


def summary_metric(protocol: str, metric: str) -> str:
    """The one score a task is summed up by where one number per task is wanted (a registry's gate and AVnew): its
    metric's last declared scoring (math: the chain-of-thought one under either protocol; every other metric has
    one)."""
    return scorings(protocol, metric)[-1].metric


def read_all(reader: str, texts: Sequence[str]) -> list[str]:
    return [READERS[reader](text) for text in texts]


def budget_for(scoring: Scoring, reference_tokens: Sequence[int], override: int | None = None) -> int:
    """The generation budget: an override as given; else the declared one, grown (when the scoring fits its
    budget to the references) to the longest reference plus a margin for how tokens merge in context."""
    if override is not None:
        return override
    longest = max(reference_tokens, default=0)
    if scoring.fit_to_references and longest > scoring.max_new_tokens:
        return longest + 4
    return scoring.max_new_tokens

