"""Old knowledge through the real lm-evaluation-harness, on the in-memory model (no hub, no reload).

Local tasks come in the harness's own YAML format from an include path; stock task names
(mmlu, arc_challenge, ...) pass through unchanged for users whose machines can fetch their data.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.errors import KnowstackError

_DATA_FILE_LINE = re.compile(r"^(\s+(?:test|train|validation|data_files)\s*:\s*)([^\s#'\"{}\[\]]+)\s*$", re.M)


def resolve_relative_data_files(include_path: Path) -> Path:
    """A copy of a dir of task YAMLs whose relative `data_files` paths are made absolute.

    The harness resolves relative data paths against the working directory; knowstack resolves
    them against the YAML's own directory, so a task dir (the built-in world's included) can move.
    """
    include_path = Path(include_path).resolve()
    if not include_path.is_dir():
        raise KnowstackError("lm-eval include path not found", path=include_path, field="old_knowledge.include_path")
    yamls = sorted(include_path.rglob("*.yaml"))
    digest = hashlib.sha256(str(include_path).encode())
    for path in yamls:
        digest.update(path.read_bytes())
    target = Path(tempfile.gettempdir()) / f"knowstack-lm-eval-{digest.hexdigest()[:16]}"
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".knowstack-lm-eval-", dir=tempfile.gettempdir()))
    for path in yamls:
        def absolute(match: re.Match, here: Path = path.parent) -> str:
            value = match.group(2)
            candidate = here / value
            return match.group(1) + (str(candidate) if not Path(value).is_absolute() and candidate.exists() else value)

        out = staging / path.relative_to(include_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_DATA_FILE_LINE.sub(absolute, path.read_text(encoding="utf-8")), encoding="utf-8")
    try:
        staging.rename(target)
    except OSError:  # another process made it first; theirs is identical
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    manager = _task_manager(str(resolve_relative_data_files(include_path)) if include_path else None)
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
