"""Old knowledge through the real lm-evaluation-harness, on the in-memory model (no hub, no reload).

Local tasks come in the harness's own YAML format from an include path; stock task names
(mmlu, arc_challenge, ...) pass through unchanged for users whose machines can fetch their data.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.errors import KnowstackError


@lru_cache(maxsize=8)
def _task_manager(include_path: str | None):
    # Indexing the harness's thousands of task YAMLs takes seconds; a study evaluates dozens of models.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _quiet_harness() -> None:
    for name in ("lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.api", "lm_eval.models"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _strip(metrics: dict) -> dict[str, float]:
    """{'acc,none': x, 'acc_stderr,none': s, 'alias': ...} -> {'acc': x}."""
    kept = {}
    for key, value in metrics.items():
        name, _, _filter = key.partition(",")
        if name.endswith("_stderr") or name in ("alias", "sample_len") or not isinstance(value, (int, float)):
            continue
        kept[name] = float(value)
    return kept


def evaluate_old_knowledge(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {'acc': x, 'acc_norm': y}} for each lm-eval task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_harness()
    manager = _task_manager(str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise KnowstackError(f"unknown lm-eval task(s): {', '.join(unknown)}", path=include_path, field="old_knowledge.tasks")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    results = output["results"]
    return {task: _strip(results[task]) for task in tasks if task in results}
