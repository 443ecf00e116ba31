"""Old knowledge through the real lm-evaluation-harness, on the in-memory model (no hub, no reload).

Local tasks come in the harness's own YAML format from an include path; stock task names
(mmlu, arc_challenge, ...) pass through unchanged for users whose machines can fetch their data.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.atomic import honour_umask
from knowstack.config import EVAL_BATCH_SIZE
from knowstack.errors import KnowstackError
from knowstack.logs import library_bars_off

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
    honour_umask(staging)  # a cache in the shared temp dir: mkdtemp's would leave it unreadable to the next user
    try:
        staging.rename(target)
    except OSError:  # another process made it first; theirs is identical
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


@lru_cache(maxsize=8)
def task_manager(include_path: str | None, include_defaults: bool = True) -> Any:  # lm_eval's TaskManager
    """The harness's task index for an include path (and its stock tasks unless told not to), cached:
    indexing the harness's thousands of stock task YAMLs takes ~10 s; a study evaluates dozens of models."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _manager_for(tasks: list[str], include_path: str | None):
    """A task manager that knows every task asked for, indexing the stock tasks only when needed.

    The built-in default asks only for local tasks: indexing just the include path takes
    milliseconds instead of the ~10 s the stock index costs each new process.
    """
    if include_path is not None:
        local = task_manager(include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return task_manager(include_path)


def quiet_harness() -> None:
    """The harness's own loggers down to errors: knowstack reports what matters."""
    for name in ("lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.api", "lm_eval.models"):
        logging.getLogger(name).setLevel(logging.ERROR)


@lru_cache(maxsize=256)
def _compiled_template(template: str) -> Any:  # a jinja2 Template
    import lm_eval.utils

    return lm_eval.utils.env.from_string(template)


def _apply_compiled_template(template: str, doc: dict) -> str:
    """lm_eval.utils.apply_template, with the template compiled once."""
    return _compiled_template(template).render(**doc)


@contextmanager
def lean_harness() -> Iterator[None]:
    """simple_evaluate without its per-call extras that knowstack never reads.

    After scoring, simple_evaluate collects environment info (torch's collect_env runs pip and
    other subprocesses: ~0.4 s a call) and the git hash; each task also draws a progress bar
    per call (and datasets one per split it reads). These module attributes are swapped for no-ops for the call and put back after.
    And the harness compiles a task's Jinja templates (doc_to_text, doc_to_choice, ...) anew for every
    document, a quarter of the time of scoring the built-in tasks (profiled): each template is compiled once
    here, in the harness's own Jinja environment, so every document renders to the same text.
    """
    from functools import partial

    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator_module
    import lm_eval.utils as utils_module

    swaps = [
        (evaluator_module, "add_env_info", lambda storage: None),
        (evaluator_module, "get_git_commit_hash", lambda: None),
        (task_module, "tqdm", partial(task_module.tqdm, disable=True)),
        (utils_module, "apply_template", _apply_compiled_template),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, value in swaps:
            setattr(module, name, value)
        with library_bars_off():  # datasets' "Generating test split" bars, now that the harness imported it
            yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """simple_evaluate reseeds Python's, NumPy's and torch's global generators; the caller's state
    comes back afterwards, so whether an evaluation ran (or was a cache hit) never changes what follows."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def harness_bos(tokenizer: PreTrainedTokenizerBase, add_bos_token: bool | None) -> bool:
    """Whether lm-eval's prompts start with BOS: as set, else as the tokenizer encodes text by default."""
    if add_bos_token is not None:
        return add_bos_token
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def quiet_hflm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int,
               add_bos_token: bool | None = None) -> Any:
    """The harness's HFLM on the in-memory model, without its request progress bars, with BOS set explicitly
    (harness_bos): lm-eval's own default changed between versions."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        # The harness's request progress bars would interleave with knowstack's own progress output.
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                     add_bos_token=harness_bos(tokenizer, add_bos_token))


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
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
    num_fewshot: int | None = None,
    add_bos_token: bool | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {'acc': x, 'acc_norm': y}} for each lm-eval task, scored on the in-memory model.

    Metric names lose the harness's ',none' filter suffix; standard errors are dropped.
    """
    return evaluate_old_knowledge_items(model, tokenizer, tasks, include_path=include_path, batch_size=batch_size,
                                        limit=limit, num_fewshot=num_fewshot, add_bos_token=add_bos_token)[0]


def per_doc_scores(samples: list[dict], metrics: dict[str, float]) -> dict[str, list[float]]:
    """{metric: [score of each document, in doc_id order]} from the harness's logged samples, for the metrics
    the task reports (a document's acc is 0 or 1; their mean is the task's acc)."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return {metric: [float(sample[metric]) for sample in ordered] for metric in metrics
            if ordered and all(isinstance(sample.get(metric), int | float) for sample in ordered)}


def evaluate_old_knowledge_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int | None = None,
    num_fewshot: int | None = None,
    add_bos_token: bool | None = None,
    samples: dict[str, list[int]] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """The scores of `evaluate_old_knowledge`, and each task's per-document scores {task: {metric: [...]}} from
    the harness's logged samples (a group such as mmlu has none of its own: its subtasks have them). samples: the
    documents scored, by index, per task, instead of the first `limit` (the search's held-out slice)."""
    import lm_eval

    quiet_harness()
    include = str(resolve_relative_data_files(include_path)) if include_path else None
    manager = _manager_for(list(tasks), include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise KnowstackError(f"unknown lm-eval task(s): {', '.join(unknown)}", path=include_path, field="old_knowledge.tasks")
    was_training = model.training  # the harness switches the model to eval mode
    lm = quiet_hflm(model, tokenizer, batch_size, add_bos_token)
    with lean_harness(), preserved_rng():
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            samples=samples,
            task_manager=manager,
            log_samples=True,
        )
    model.train(was_training)
    # A group (mmlu) may be reported among the groups rather than the results, depending on its config.
    results = {**output.get("groups", {}), **output["results"]}
    scores = {task: _strip(results[task]) for task in tasks if task in results}
    samples = output.get("samples") or {}
    items = {task: per_doc_scores(samples[task], scores[task]) for task in scores if samples.get(task)}
    return scores, items
