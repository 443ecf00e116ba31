"""Readers for the task formats of the paper's data: TRACE task dirs, MetaMathQA and GSM8K.

Every reader returns `Example`s (a prompt and the answer the model should produce); the prompt
templates live here too, so that training and evaluation format a task the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from knowstack.errors import KnowstackError

# The paper's MetaMath prompts, as its code has them (RhuiDih/cl, do_finetuning.py, PROMPT_DICT and
# SupervisedDataset): a query's first line is the instruction and any further lines the input; the response
# follows "### Response:" directly (no newline: the answer is tokenized apart and appended).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
# Without chain of thought the response is primed with the answer phrase MetaMath ends on,
# so the model's first generated number is its answer.
DIRECT_ANSWER_PRIMER = "The answer is: "
TRACE_SPLITS = ("train", "eval", "test")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def read_records(path: Path) -> list[dict]:
    """A JSON list of objects, or JSON Lines (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise KnowstackError("file not found", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KnowstackError(f"not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8", path=path) from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise KnowstackError(f"not valid JSON ({err.msg} at line {err.lineno})", path=path) from None
    if not isinstance(records, list):
        raise KnowstackError("expected a JSON list of objects", path=path)
    return records


def _fields(records: list[dict], path: Path, names: tuple[str, ...]) -> list[tuple[str, ...]]:
    rows = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise KnowstackError(f"item {index} is not an object", path=path)
        for name in names:
            if not isinstance(record.get(name), str):
                raise KnowstackError(f"item {index} has no string value", path=path, field=name)
        rows.append(tuple(record[name] for name in names))
    return rows


def load_trace_split(path: Path) -> list[Example]:
    """One split of a TRACE task dir: a JSON list of {"prompt", "answer"}."""
    return [Example(p, a) for p, a in _fields(read_records(path), Path(path), ("prompt", "answer"))]


def trace_split_path(task_dir: Path, split: str) -> Path:
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise KnowstackError("task directory not found", path=task_dir)
    for suffix in (".json", ".jsonl"):
        candidate = task_dir / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    raise KnowstackError(f"task directory has no {split}.json", path=task_dir)


def alpaca_prompt(query: str) -> str:
    instruction, _, rest = query.partition("\n")
    if rest:
        return ALPACA_INPUT_TEMPLATE.format(instruction=instruction, input=rest)
    return ALPACA_TEMPLATE.format(instruction=instruction)


def load_metamath(path: Path) -> list[Example]:
    """MetaMathQA records ({"query", "response"}) in the Alpaca template, as the paper trains them."""
    rows = _fields(read_records(path), Path(path), ("query", "response"))
    return [Example(alpaca_prompt(q), r) for q, r in rows]


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_final_answer(answer: str) -> str:
    match = _GSM8K_FINAL.search(answer)
    if not match:
        raise ValueError("no '#### <number>' at the end of the answer")
    return normalize_number(match.group(1))


def load_gsm8k(path: Path) -> list[Example]:
    """GSM8K records ({"question", "answer" ending in '#### N'}); the answer kept is the final number."""
    path = Path(path)
    examples = []
    for index, (question, answer) in enumerate(_fields(read_records(path), path, ("question", "answer"))):
        try:
            final = gsm8k_final_answer(answer)
        except ValueError as err:
            raise KnowstackError(f"item {index}: {err}", path=path, field="answer") from None
        examples.append(Example(alpaca_prompt(question), final))
    return examples


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5'; anything that is not a number is returned stripped."""
    cleaned = text.strip().replace(",", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    return str(int(value)) if value == int(value) else repr(value)


def final_number(generation: str) -> str | None:
    """The answer a math generation commits to: after 'The answer is' or '####', else the last number."""
    for marker in ("The answer is", "####"):
        if marker in generation:
            tail = generation.split(marker)[-1]
            match = _NUMBER.search(tail)
            if match:
                return normalize_number(match.group(0))
    numbers = _NUMBER.findall(generation)
    return normalize_number(numbers[-1]) if numbers else None


def first_number(generation: str) -> str | None:
    match = _NUMBER.search(generation)
    return normalize_number(match.group(0)) if match else None
