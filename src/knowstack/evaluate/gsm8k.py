"""The paper's two GSM8K scores through the real lm-evaluation-harness, on a local GSM8K-format file.

The paper reports lm-eval's `gsm8k` (5-shot) and `gsm8k_cot` (8-shot), flexible-extract. Each is run
here as the installed harness defines it: a task YAML that `include`s the stock one (its prompt, few-shot
settings, stop strings, extraction regexes and exact-match rules, unchanged) and only points its data at
the user's files, so the prompts and the extraction are the harness's own, not a copy of them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.config import EVAL_BATCH_SIZE
from knowstack.errors import KnowstackError

STOCK_YAML = {"gsm8k": "gsm8k.yaml", "gsm8k_cot": "gsm8k-cot.yaml"}
FILTER = "flexible-extract"
HARNESS_MAX_GEN_TOKS = 256  # lm-eval's HFLM default budget, which the paper's runs used


@dataclass
class HarnessRun:
    generations: list[str]  # the raw generation of each test item, in file order
    answers: list[str]  # what flexible-extract read from it
    scores: list[float]  # exact_match of each item
    max_gen_toks: int


def stock_yaml(task: str) -> Path:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / STOCK_YAML[task]
    if not path.is_file():
        raise KnowstackError(f"the installed lm-eval has no {STOCK_YAML[task]}", path=path)
    return path


def _task_dir(task: str, test: Path, fewshot: Path | None) -> tuple[Path, str]:
    """A dir holding one task YAML: the stock task, with its data read from `test` (and `fewshot`)."""
    files = {"test": str(Path(test).resolve())}
    # Without a few-shot file, the harness draws examples from the test split, never an item's own.
    splits = {"test_split": "test", "training_split": None, "fewshot_split": "test"}
    if fewshot is not None:
        files["train"] = str(Path(fewshot).resolve())
        splits = {"test_split": "test", "training_split": "train", "fewshot_split": "train"}
    config = {"include": str(stock_yaml(task)), "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": files}, **splits}
    if task == "gsm8k_cot":  # its few-shot examples are fixed in the YAML; it reads no training split
        config.pop("training_split")
        config.pop("fewshot_split")
    text = json.dumps(config, sort_keys=True)
    digest = hashlib.sha256((text + "".join(_mtime(Path(f)) for f in files.values())).encode()).hexdigest()[:16]
    name = f"ks_{task}_{digest}"
    root = Path(tempfile.gettempdir()) / f"knowstack-gsm8k-{digest}"
    root.mkdir(parents=True, exist_ok=True)
    # JSON is YAML: the file is written whole each time (same content for the same inputs).
    (root / f"{name}.yaml").write_text(json.dumps({**config, "task": name}), encoding="utf-8")
    return root, name


def _mtime(path: Path) -> str:
    stat = path.stat()
    return f"|{stat.st_mtime_ns}|{stat.st_size}"


def evaluate_gsm8k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    test: Path,
    *,
    fewshot: Path | None = None,
    limit: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_gen_toks: int | None = None,
    add_bos_token: bool | None = None,
) -> HarnessRun:
    """lm-eval's `task` (gsm8k or gsm8k_cot) on the GSM8K-format `test` file (its first `limit` items)."""
    import lm_eval

    from knowstack.evaluate.old_knowledge import (
        lean_harness,
        preserved_rng,
        quiet_harness,
        quiet_hflm,
        task_manager,
    )

    if task not in STOCK_YAML:
        raise KnowstackError(f"unknown harness task '{task}' (known: {', '.join(STOCK_YAML)})")
    quiet_harness()
    root, name = _task_dir(task, Path(test), Path(fewshot) if fewshot else None)
    manager = task_manager(str(root), include_defaults=False)
    was_training = model.training
    lm = quiet_hflm(model, tokenizer, batch_size, add_bos_token)
    # A model whose context cannot hold the harness's budget gets half its context (recorded as the budget).
    budget = max_gen_toks or min(HARNESS_MAX_GEN_TOKS, lm.max_length // 2)
    with lean_harness(), preserved_rng():
        output = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                         log_samples=True, gen_kwargs={"max_gen_toks": budget})
    model.train(was_training)
    samples = sorted((s for s in output["samples"][name] if s["filter"] == FILTER), key=lambda s: s["doc_id"])
    return HarnessRun(
        generations=[s["resps"][0][0] for s in samples],
        answers=[str(s["filtered_resps"][0]) for s in samples],
        scores=[float(s["exact_match"]) for s in samples],
        max_gen_toks=budget,
    )


def score_offline(task: str, generations: list[str], references: list[str]) -> tuple[list[str], list[float]]:
    """The harness's reading and scoring of generations made elsewhere, from the installed task YAML: each
    generation cut at the task's stop strings, flexible-extract's regex, then exact_match with the task's
    ignore rules. Returns the extracted answers and each item's score."""
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from knowstack.evaluate.generate import cut_at_stop

    config = yaml.safe_load(stock_yaml(task).read_text(encoding="utf-8"))
    until = config["generation_kwargs"]["until"]
    steps = next(f["filter"] for f in config["filter_list"] if f["name"] == FILTER)
    regex = next(step for step in steps if step["function"] == "regex")
    extract = RegexFilter(regex_pattern=regex["regex_pattern"], group_select=regex.get("group_select", 0))
    rule = next(m for m in config["metric_list"] if m["metric"] == "exact_match")
    answers, scores = [], []
    for generation, reference in zip(generations, references, strict=True):
        answer = list(extract.apply([[cut_at_stop(generation, until)]], [{}]))[0][0]
        match = exact_match_hf_evaluate([answer], [reference], regexes_to_ignore=rule.get("regexes_to_ignore"),
                                        ignore_case=rule.get("ignore_case", False),
                                        ignore_punctuation=rule.get("ignore_punctuation", False))
        answers.append(answer)
        scores.append(float(match["exact_match"]))
    return answers, scores
