"""Bad input, every kind through every command: one clear message naming the file (and field / item),
exit 2, no traceback, nothing half-written, and an earlier study's results untouched.

The cases are data (CASES below): a maker that writes one bad input, the command that reads it, and
what the one message must name. Each runs in process (`knowstack.cli.main`) with COLUMNS=40, off a
terminal; a few also run as a subprocess to show that no traceback or library warning reaches stderr.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from test_registry import make_adapter, make_task, write_mc_task

from knowstack.cli import main

GOOD = [{"prompt": f"Question {i}:", "answer": " yes"} for i in range(4)]


@dataclass(frozen=True)
class Inputs:
    """The good inputs every case starts from; a case swaps one of them for its bad input."""

    root: Path
    model: Path
    task: Path
    adapter: Path
    old: Path
    study: Path
    registry: Path
    study_config: dict


# --- makers: each writes one bad input under `where` and returns its path -------------------------
def task_with(where: Path, name: str = "train.json", content: bytes | str | None = None, *,
              splits: tuple[str, ...] = ("test",)) -> Path:
    """A task dir with good `splits` and one split file written as `content`."""
    where.mkdir(parents=True)
    for split in splits:
        (where / f"{split}.json").write_text(json.dumps(GOOD))
    if content is not None:
        data = content if isinstance(content, bytes) else content.encode()
        (where / name).write_bytes(data)
    return where


def items(*records: object) -> str:
    return json.dumps(list(records))


def math_task(where: Path, train: list, test: list) -> Path:
    where.mkdir(parents=True)
    (where / "train.json").write_text(json.dumps(train))
    (where / "test.json").write_text(json.dumps(test))
    return where


def model_copy(where: Path, good: Inputs, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(good.model, where)
    for name in drop:
        (where / name).unlink()
    return where


def truncated(path: Path, cut: int = 100) -> None:
    os.truncate(path, path.stat().st_size - cut)


class Marker:
    """Unpickling this creates a file: the proof that a pickled weights file was never unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def pickle_only_model(where: Path, good: Inputs) -> Path:
    model_copy(where, good, drop=("model.safetensors",))
    (where / "pytorch_model.bin").write_bytes(pickle.dumps(Marker(good.root / "UNPICKLED")))
    return where


def sharded_missing(where: Path, good: Inputs) -> Path:
    model_copy(where, good)
    (where / "model.safetensors").rename(where / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (where / "model.safetensors.index.json").write_text(json.dumps(index))
    return where


def adapter_copy(where: Path, good: Inputs) -> Path:
    shutil.copytree(good.adapter, where)
    return where


def adapter_pickle_only(where: Path, good: Inputs) -> Path:
    adapter_copy(where, good)
    (where / "adapter_model.safetensors").unlink()
    (where / "adapter_model.bin").write_bytes(pickle.dumps(Marker(good.root / "UNPICKLED")))
    return where


def edited_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def swap_merges(tokenizer: dict) -> None:
    merges = tokenizer["model"]["merges"]
    merges[3], merges[4] = merges[4], merges[3]


def adapter_extra_token(where: Path, good: Inputs) -> Path:
    """An adapter saved with its tokenizer, which has one token more than the base's."""
    from transformers import AutoTokenizer

    adapter_copy(where, good)
    tokenizer = AutoTokenizer.from_pretrained(str(good.model))
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(where)
    return where


def write(where: Path, text: str) -> Path:
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(text)
    return where


def gram_only_statistics(where: Path, good: Inputs) -> Path:
    """A contributor's statistics with RegMean's Gram matrices but no Fisher."""
    from knowstack.api import statistics

    return statistics(good.model, good.task / "train.json", where, kinds=["gram"], max_length=32)


def include_missing_data(where: Path, good: Inputs) -> Path:
    shutil.copytree(good.old, where)
    (where / "ks_toy.jsonl").unlink()
    return where


MAKERS: dict[str, Callable[[Path, Inputs], Path]] = {
    # task files
    "not-utf8": lambda w, g: task_with(w, content=b'[{"prompt": "caf\xe9", "answer": "b"}]'),
    "not-json": lambda w, g: task_with(w, content="prompt: a\nanswer: b\n"),
    "jsonl-named-json": lambda w, g: task_with(w, content='{"prompt": "a", "answer": "b"}\n' * 2),
    "not-a-list": lambda w, g: task_with(w, content='{"prompt": "a", "answer": "b"}'),
    "empty-list": lambda w, g: task_with(w, content="[]"),
    "empty-file": lambda w, g: task_with(w, content=""),
    "item-not-object": lambda w, g: task_with(w, content=items(GOOD[0], "just text")),
    "missing-field": lambda w, g: task_with(w, content=items(GOOD[0], GOOD[1], {"prompt": "p"})),
    "wrong-type": lambda w, g: task_with(w, content=items(GOOD[0], {"prompt": "p", "answer": 3})),
    "bad-jsonl-line": lambda w, g: task_with(w, "train.jsonl", "".join(json.dumps(r) + "\n" for r in GOOD[:2])
                                             + '{"prompt": "p", "answer": \n'),
    "many-bad-items": lambda w, g: task_with(w, content=items(*[{"prompt": "p"}] * 20)),
    "no-train-split": lambda w, g: task_with(w),
    "no-task-dir": lambda w, g: w,
    "brackets-in-path": lambda w, g: task_with(w.parent / "data[v2]"),  # not rich markup: printed as is
    "bad-test-split": lambda w, g: task_with(w, "test.json", items({"prompt": 1, "answer": "a"}), splits=("train",)),
    # a task's metric (data/tasks.py task_metric): none defines it, or its knowstack-task.json names none known
    "metric-undefined": lambda w, g: task_with(w, splits=("train", "test")),
    "metadata-unknown-metric": lambda w, g: task_with(w, "knowstack-task.json", '{"metric": "bleu"}',
                                                      splits=("train", "test")),
    "gsm8k-no-final": lambda w, g: math_task(w, [{"query": "q", "response": "r"}],
                                             [{"question": "q", "answer": "4 + 4 = 8"}]),
    "metamath-no-response": lambda w, g: math_task(w, [{"query": "q", "answer": "r"}],
                                                   [{"question": "q", "answer": "so\n#### 8"}]),
    # model dirs
    "no-model": lambda w, g: w,
    "model-is-file": lambda w, g: write(w, "not a dir"),
    "no-config": lambda w, g: model_copy(w, g, drop=("config.json",)),
    "config-not-json": lambda w, g: (model_copy(w, g), write(w / "config.json", "{model_type: llama"))[0],
    "pickle-only": pickle_only_model,
    "truncated-model": lambda w, g: (model_copy(w, g), truncated(w / "model.safetensors"))[0],
    "garbage-safetensors": lambda w, g: (model_copy(w, g), write(w / "model.safetensors", "garbage"))[0],
    "no-tokenizer": lambda w, g: model_copy(w, g, drop=("tokenizer.json", "tokenizer_config.json")),
    "missing-shard": sharded_missing,
    "config-misfit": lambda w, g: (model_copy(w, g), edited_json(w / "config.json",
                                                                 lambda c: c.update(intermediate_size=256)))[0],
    # a model or adapter of another base (combine/compatibility.py)
    "other-vocab": lambda w, g: (model_copy(w, g), edited_json(w / "config.json", lambda c: c.update(vocab_size=320)))[0],
    "changed-merge-rule": lambda w, g: (model_copy(w, g), edited_json(w / "tokenizer.json", swap_merges))[0],
    "chat-template": lambda w, g: (model_copy(w, g), write(w / "chat_template.jinja", "{{ messages }}"))[0],
    "adapter-extra-token": adapter_extra_token,
    # adapters
    "adapter": lambda w, g: adapter_copy(w, g),
    "lora-moe": lambda w, g: (adapter_copy(w, g), write(w / "lora_moe.json", "{}"))[0],
    "adapter-no-config": lambda w, g: (adapter_copy(w, g), (w / "adapter_config.json").unlink())[0],
    "adapter-pickle-only": adapter_pickle_only,
    "adapter-truncated": lambda w, g: (adapter_copy(w, g), truncated(w / "adapter_model.safetensors", 10))[0],
    "adapter-config-not-json": lambda w, g: (adapter_copy(w, g), write(w / "adapter_config.json", "r: 4"))[0],
    # lm-eval, accelerate, other files
    "include-missing": lambda w, g: w,
    "include-missing-data": include_missing_data,
    "accelerate-missing": lambda w, g: w.with_suffix(".yaml"),
    "accelerate-not-mapping": lambda w, g: write(w.with_suffix(".yaml"), "- a\n- b\n"),
    "accelerate-unknown-type": lambda w, g: write(w.with_suffix(".yaml"), "distributed_type: TELEPATHY\n"),
    "prompts-not-strings": lambda w, g: write(w.with_suffix(".json"), "[1, 2]"),
    "missing-file": lambda w, g: w.with_suffix(".yaml"),
    "nothing": lambda w, g: w,  # the case's command is bad on its own (e.g. FSDP on CPU)
    # statistics of a contributor's data (regmean, fisher)
    "gram-only-statistics": gram_only_statistics,
}


@dataclass(frozen=True)
class Case:
    id: str
    make: str  # a MAKERS key
    argv: str  # {bad} {model} {task} {adapter} {old} {out} {study} {registry} {config}
    expect: tuple[str, ...]  # all on one line of the message: the file, field, item, what is wrong
    config: dict = field(default_factory=dict)  # study: changes to the earlier study's config ({bad} filled in)
    problems: int = 1


TRAIN = "train --model {model} --task {bad} --lr 1e-3 --batch-size 2 --micro-batch-size 2 --max-steps 1 --out {out}"
TRAIN_MODEL = "train --model {bad} --task {task} --max-steps 1 --out {out}"
EVAL = "eval --model {model} --task {bad} --out {out}"
EVAL_MODEL = "eval --model {bad} --task {task} --out {out}"
STUDY = "study {config} --out {study}"
DRY = "study {config} --out {study} --dry-run"
SECOND_TASK = {"tasks+": {"name": "second", "path": "{bad}", "metric": "accuracy"}}

CASES = [
    # task files, through train (and --replay)
    Case("train-not-utf8", "not-utf8", TRAIN, ("train.json", "not UTF-8", "byte 16")),
    Case("train-not-json", "not-json", TRAIN, ("train.json", "not valid JSON", "line 1")),
    Case("train-jsonl-named-json", "jsonl-named-json", TRAIN, ("train.json", "name the file .jsonl")),
    Case("train-not-a-list", "not-a-list", TRAIN, ("train.json", "expected a JSON list of objects, found an object")),
    Case("train-empty-list", "empty-list", TRAIN, ("train.json", "no items")),
    Case("train-empty-file", "empty-file", TRAIN, ("train.json", "empty file")),
    Case("train-item-not-object", "item-not-object", TRAIN, ("train.json", "item 1", "found a string")),
    Case("train-wrong-type", "wrong-type", TRAIN, ("train.json", "item 1", "field 'answer'", "found a number")),
    Case("train-bad-jsonl-line", "bad-jsonl-line", TRAIN, ("train.jsonl", "line 3", "not valid JSON")),
    Case("train-many-bad-items", "many-bad-items", TRAIN, ("train.json", "and 15 more problems"), problems=6),
    Case("train-no-train-split", "no-train-split", TRAIN, ("no train.json",)),
    Case("train-no-task-dir", "no-task-dir", TRAIN, ("task directory not found",)),
    Case("train-brackets-in-path", "brackets-in-path", TRAIN, ("data[v2]", "no train.json")),
    Case("train-replay-missing-field", "missing-field", TRAIN.replace("{bad}", "{task}") + " --replay {bad}",
         ("train.json", "item 2", "field 'answer'", "missing")),
    Case("train-no-task", "nothing", "train --model {model} --max-steps 1 --out {out}",
         ("field '--task'", "nothing to train on")),
    Case("train-micro-over-batch", "nothing", TRAIN.replace("{bad}", "{task}").replace("--micro-batch-size 2",
                                                                                       "--micro-batch-size 4"),
         ("field '--micro-batch-size'", "4 is larger than the batch size, 2")),
    # model dirs and adapters, through train
    Case("train-no-model", "no-model", TRAIN_MODEL, ("model not found",)),
    Case("train-model-is-file", "model-is-file", TRAIN_MODEL, ("not a model dir",)),
    Case("train-no-config", "no-config", TRAIN_MODEL, ("no config.json",)),
    Case("train-config-not-json", "config-not-json", TRAIN_MODEL, ("config.json", "not a model config")),
    Case("train-pickle-only", "pickle-only", TRAIN_MODEL, ("pytorch_model.bin", "never unpickles")),
    Case("train-truncated-model", "truncated-model", TRAIN_MODEL, ("model.safetensors", "truncated")),
    Case("train-garbage-safetensors", "garbage-safetensors", TRAIN_MODEL,
         ("model.safetensors", "not a readable safetensors file")),
    Case("train-no-tokenizer", "no-tokenizer", TRAIN_MODEL, ("no tokenizer",)),
    Case("train-missing-shard", "missing-shard", TRAIN_MODEL, ("model-00002-of-00002.safetensors", "missing")),
    Case("train-olora-adapter-pickle-only", "adapter-pickle-only",
         TRAIN_MODEL.replace("{bad}", "{model}").replace("{task}", "{task} --olora-previous {bad}"),
         ("adapter_model.bin", "never unpickled")),
    Case("train-lora-target-missing", "nothing", TRAIN_MODEL.replace("{bad}", "{model}") + " --finetune lora "
         "--lora-target-modules q_proj c_attn", ("c_attn name no module", "field 'training.lora.target_modules'")),
    # eval
    Case("eval-bad-test-split", "bad-test-split", EVAL, ("test.json", "item 0", "field 'prompt'", "found a number")),
    Case("eval-gsm8k-no-final", "gsm8k-no-final", EVAL + " --format math --metric math",
         ("test.json", "item 0", "field 'answer'", "####")),
    Case("eval-metric-undefined", "metric-undefined", EVAL,
         ("bad: nothing defines the metric of task 'bad': give --metric", "bad/knowstack-task.json")),
    Case("eval-metadata-unknown-metric", "metadata-unknown-metric", EVAL,
         ("bad/knowstack-task.json", "field 'metric'", 'unknown metric "bleu"', "rouge_l, edit_similarity")),
    Case("score-metric-undefined", "metric-undefined", "score {bad} --predictions {out}",
         ("nothing defines the metric of task 'bad': give --metric",)),
    Case("eval-pickle-only", "pickle-only", EVAL_MODEL, ("pytorch_model.bin", "never unpickles")),
    Case("eval-config-misfit", "config-misfit", EVAL_MODEL, ("bad: config.json does not fit the weights",
                                                             "mlp.down_proj.weight is [64, 128] in the weights",
                                                             "[64, 256] by config.json")),
    Case("eval-truncated-model", "truncated-model", EVAL_MODEL, ("model.safetensors", "truncated")),
    Case("eval-model-is-an-adapter", "adapter", EVAL_MODEL, ("not a model dir but a PEFT LoRA adapter",
                                                            "give --model BASE --adapter")),
    Case("eval-model-is-a-lora-moe", "lora-moe", EVAL_MODEL, ("not a model dir but a LoRA-MoE (lora_moe.json)",
                                                              "give --model BASE --adapter")),
    Case("eval-adapter-no-config", "adapter-no-config", EVAL.replace("{bad}", "{task}") + " --adapter {bad}",
         ("no adapter_config.json",)),
    Case("eval-adapter-truncated", "adapter-truncated", EVAL.replace("{bad}", "{task}") + " --adapter {bad}",
         ("adapter_model.safetensors", "truncated")),
    Case("eval-adapter-config-not-json", "adapter-config-not-json",
         EVAL.replace("{bad}", "{task}") + " --adapter {bad}", ("adapter_config.json", "not a readable JSON file")),
    Case("eval-include-missing-data", "include-missing-data",
         "eval --model {model} --old-tasks ks_toy --include-path {bad} --out {out}",
         ("ks_toy.yaml", "field 'data_files'", "ks_toy.jsonl")),
    Case("eval-unknown-old-task", "nothing", "eval --model {model} --old-tasks ks_no_such_task --out {out}",
         ("unknown lm-eval task 'ks_no_such_task'", "field '--old-tasks'")),
    # merge and mix
    Case("merge-pickle-only", "pickle-only", "merge --method average --models {model} {bad} --out {out}",
         ("pytorch_model.bin", "never unpickles")),
    Case("merge-truncated", "truncated-model", "merge --method ties --base {model} --models {adapter} {bad} "
         "--out {out}", ("model.safetensors", "truncated")),
    Case("merge-adapter-pickle-only", "adapter-pickle-only", "merge --method ties --base {model} --models {bad} "
         "{adapter} --out {out}", ("adapter_model.bin", "never unpickled")),
    Case("merge-no-model", "no-model", "merge --method average --models {model} {bad} --out {out}",
         ("model or adapter dir not found",)),
    Case("merge-regmean-no-statistics", "nothing", "merge --method regmean --models {model} {model} --out {out}",
         ("needs the gram statistics of every model", "got 0 for 2 models", "option --statistics")),
    Case("merge-fisher-missing-kind", "gram-only-statistics", "merge --method fisher --models {model} {model} "
         "--statistics {bad} {bad} --out {out}", ("bad", "has no 'fisher' statistics (it has: gram)")),
    Case("merge-statistics-not-a-dir-of-them", "no-model", "merge --method regmean --models {model} {model} "
         "--statistics {bad} {bad} --out {out}", ("bad", "not a statistics dir")),
    Case("merge-other-vocab", "other-vocab", "merge --method average --base {model} --models {model} {bad} "
         "--out {out}", ("bad/config.json", "field 'vocab_size'", "320 here, 300 in the base", "another vocabulary")),
    Case("merge-changed-merge-rule", "changed-merge-rule", "merge --method ties --base {model} --models {adapter} {bad} "
         "--out {out}", ("bad/tokenizer.json", "field 'model.merges[3]'", "in the base", "another tokenizer")),
    Case("statistics-missing-field", "missing-field", "statistics {model} --data {bad}/train.json --out {out}",
         ("train.json", "item 2", "field 'answer'")),
    Case("statistics-adapter-without-base", "nothing", "statistics {adapter} --data {task}/train.json --out {out}",
         ("adapter", "need its base model", "field 'base'")),
    Case("mix-truncated-base", "truncated-model", "mix --base {bad} --models {adapter} {adapter} --out {out}",
         ("model.safetensors", "truncated")),
    Case("mix-adapter-truncated", "adapter-truncated", "mix --base {model} --models {adapter} {bad} --out {out}",
         ("adapter_model.safetensors", "truncated")),
    Case("mix-adapter-extra-token", "adapter-extra-token", "mix --base {model} --models {adapter} {bad} "
         "--router random --out {out}",
         ("bad/tokenizer.json", "field 'added_tokens[3]'", "'<|tool|>'", "nothing in the base", "another tokenizer")),
    Case("mix-default-router-no-prompts", "nothing", "mix --base {model} --models {adapter} {adapter} --out {out}",
         ("the default router, prompts", "give --prompts", "--router")),
    Case("mix-router-init-moetify-without-its-router", "nothing", "mix --base {model} --models {adapter} {adapter} "
         "--router-init moetify --out {out}", ("name a --router (e.g. moetify, which --router-init moetify draws)",)),
    # --out: a dir written whole (validate.py check_out_dir; every command: test_out_dirs.py)
    Case("merge-out-not-empty", "no-train-split", "merge --method average --models {model} {model} --out {bad}",
         ("bad", "field '--out'", "not empty", "--overwrite")),
    Case("train-out-is-the-model", "nothing", "train --model {model} --task {task} --out {model} --overwrite",
         ("field '--out'", "is the input", "--overwrite never replaces an input")),
    Case("mix-prompts-not-strings", "prompts-not-strings", "mix --base {model} --models {adapter} {adapter} "
         "--prompts {bad} {bad} --out {out}", ("item 0", "expected an object, found a number"), problems=2),
    Case("mix-train-data-missing-field", "missing-field", "mix --base {model} --models {adapter} {adapter} "
         "--train-data {bad}/train.json --train-steps 1 --out {out}", ("train.json", "item 2", "field 'answer'")),
    # a problem of the command line is named by its option, not by the API's or a config's field (router_training)
    Case("mix-router-training-of-a-training-free-router", "nothing", "mix --base {model} --models {adapter} {adapter} "
         "--router arrow --train-data {task}/train.json --train-steps 1 --out {out}",
         ("option --train-data/--router-steps", "training-free")),
    Case("mix-top-k-above-the-experts", "nothing", "mix --base {model} --models {adapter} {adapter} --top-k 5 --router random "
         "--out {out}", ("option --top-k", "between 1 and the number of experts (2)")),
    Case("gate-train-data-missing-field", "missing-field", "gate --base {model} --adapter {adapter} "
         "--train-data {bad}/train.json", ("train.json", "item 2", "field 'answer'")),
    Case("gate-adapter-truncated", "adapter-truncated", "gate --base {model} --adapter {bad} "
         "--train-data {task}/train.json", ("adapter_model.safetensors", "truncated")),
    # extract-lora
    Case("extract-lora-other-vocab", "other-vocab", "extract-lora --base {model} --model {bad} --rank 2 --out {out}",
         ("bad/config.json", "field 'vocab_size'", "320 here, 300 in the base", "another vocabulary")),
    Case("extract-lora-model-is-an-adapter", "adapter", "extract-lora --base {model} --model {bad} --rank 2 "
         "--out {out}", ("not a model dir but a PEFT LoRA adapter", "needs no extracting")),
    Case("extract-lora-rank-zero", "nothing", "extract-lora --base {model} --model {model} --rank 0 --out {out}",
         ("option --rank", "at least 1, not 0")),
    Case("extract-lora-unknown-target", "nothing", "extract-lora --base {model} --model {model} --rank 2 "
         "--target-modules qkv --out {out}", ("option --target-modules", "qkv name no module", "q_proj")),
    Case("extract-lora-embeddings", "nothing", "extract-lora --base {model} --model {model} --rank 2 "
         "--target-modules embed_tokens --out {out}", ("option --target-modules", "embeddings are not extracted")),
    Case("contribute-as-lora-of-an-adapter", "nothing", "contribute {registry} --name c --adapter {adapter} "
         "--task {task} --as-lora 4", ("option --as-lora", "give --model, not --adapter")),
    # contribute, compose, registry init
    Case("contribute-task-not-utf8", "not-utf8", "contribute {registry} --name c --adapter {adapter} --task {bad} "
         "--keep-data", ("train.json", "not UTF-8")),
    Case("contribute-metamath-no-response", "metamath-no-response", "contribute {registry} --name c "
         "--adapter {adapter} --task {bad} --format math --metric math --keep-data",
         ("train.json", "item 0", "field 'response'", "missing")),
    Case("contribute-metric-undefined", "metric-undefined", "contribute {registry} --name c --adapter {adapter} "
         "--task {bad}", ("nothing defines the metric of task 'bad': give --metric", "bad/knowstack-task.json")),
    Case("contribute-metadata-unknown-metric", "metadata-unknown-metric", "contribute {registry} --name c "
         "--adapter {adapter} --task {bad}", ("bad/knowstack-task.json", "field 'metric'", 'unknown metric "bleu"')),
    Case("contribute-adapter-pickle-only", "adapter-pickle-only", "contribute {registry} --name c --adapter {bad} "
         "--task {task}", ("adapter_model.bin", "never unpickled")),
    Case("contribute-model-truncated", "truncated-model", "contribute {registry} --name c --model {bad} "
         "--task {task}", ("model.safetensors", "truncated")),
    Case("contribute-model-is-an-adapter", "adapter", "contribute {registry} --name c --model {bad} --task {task}",
         ("not a model dir but a PEFT LoRA adapter", "give it as --adapter")),
    Case("contribute-chat-template", "chat-template", "contribute {registry} --name c --model {bad} --task {task}",
         ("bad/chat_template.jinja", "a chat template here, none in the registry's base", "another chat template")),
    Case("contribute-training-config-missing", "missing-file", "contribute {registry} --name c --adapter {adapter} "
         "--task {task} --training-config {bad}", ("training config not found",)),
    Case("compose-accelerate-missing", "accelerate-missing", "compose {registry} --method sequential "
         "--num-processes 2 --cpu --accelerate-config {bad}", ("accelerate config not found",)),
    Case("compose-accelerate-not-mapping", "accelerate-not-mapping", "compose {registry} --method sequential "
         "--num-processes 2 --cpu --accelerate-config {bad}", ("expected a YAML mapping",)),
    Case("registry-init-pickle-only", "pickle-only", "registry init {out} --base {bad}",
         ("pytorch_model.bin", "never unpickles")),
    Case("registry-init-include-missing", "include-missing", "registry init {out} --base {model} "
         "--old-knowledge ks_toy --include-path {bad}", ("lm-eval include path not found", "field '--include-path'")),
    Case("registry-init-negative-fewshot", "nothing", "registry init {out} --base {model} --num-fewshot -1",
         ("option --num-fewshot", "at least 0, not -1")),
    # a study over the earlier study's dir: found before the first step, the earlier results untouched
    Case("study-task-not-utf8", "not-utf8", STUDY, ("train.json", "not UTF-8"), SECOND_TASK),
    Case("study-task-missing-field", "missing-field", STUDY, ("train.json", "item 2", "field 'answer'"), SECOND_TASK),
    Case("study-task-bad-jsonl-line", "bad-jsonl-line", STUDY, ("train.jsonl", "line 3"), SECOND_TASK),
    Case("study-task-no-dir", "no-task-dir", STUDY, ("task directory not found",), SECOND_TASK),
    Case("study-pickle-only", "pickle-only", STUDY, ("pytorch_model.bin", "never unpickles"),
         {"base": {"model": "{bad}"}}),
    Case("study-truncated-model", "truncated-model", STUDY, ("model.safetensors", "truncated"),
         {"base": {"model": "{bad}"}}),
    Case("study-no-tokenizer", "no-tokenizer", STUDY, ("no tokenizer",), {"base": {"model": "{bad}"}}),
    Case("study-include-missing", "include-missing", STUDY, ("lm-eval include path not found",
                                                             "field 'old_knowledge.include_path'"),
         {"old_knowledge": {"tasks": ["ks_toy"], "include_path": "{bad}"}}),
    Case("study-include-missing-data", "include-missing-data", STUDY, ("ks_toy.yaml", "ks_toy.jsonl"),
         {"old_knowledge": {"tasks": ["ks_toy"], "include_path": "{bad}"}}),
    Case("study-unknown-old-task", "nothing", STUDY, ("unknown lm-eval task 'ks_no_such_task'",
                                                      "field 'old_knowledge.tasks'"),
         {"old_knowledge": {"tasks": ["ks_toy", "ks_no_such_task"], "include_path": "{old}"}}),
    Case("study-no-old-tasks", "nothing", STUDY, ("name at least one lm-eval task", "field 'old_knowledge.tasks'"),
         {"old_knowledge": {"tasks": [], "include_path": "{old}"}}),
    Case("study-accelerate-missing", "accelerate-missing", STUDY, ("accelerate config not found",),
         {"launch": {"num_processes": 2, "cpu": True, "accelerate_config": "{bad}"}}),
    Case("study-fsdp-on-cpu", "nothing", STUDY, ("only on GPUs", "field 'launch.accelerate_config'"),
         {"launch": {"num_processes": 2, "cpu": True, "accelerate_config": "fsdp"}}),
    Case("study-lora-target-missing", "nothing", STUDY, ("c_attn name no module", "model_type 'llama'",
                                                        "field 'training.lora.target_modules'"),
         {"training": {"lr": 1e-3, "max_steps": 1, "lora": {"target_modules": ["q_proj", "c_attn"]}}}),
    Case("study-micro-over-batch", "nothing", STUDY, ("field 'training.micro_batch_size'",
                                                     "32 is larger than the batch size, 16"),
         {"training": {"lr": 1e-3, "max_steps": 1, "batch_size": 16, "micro_batch_size": 32}}),
    Case("study-two-problems", "truncated-model", STUDY, ("model.safetensors", "truncated"),
         {"base": {"model": "{bad}"}, "tasks+": {"name": "second", "path": "{task}/../absent", "metric": "accuracy"}},
         problems=2),
    Case("dry-run-not-json", "not-json", DRY, ("train.json", "not valid JSON"), SECOND_TASK),
    Case("dry-run-pickle-only", "pickle-only", DRY, ("pytorch_model.bin",), {"base": {"model": "{bad}"}}),
    Case("dry-run-accelerate-unknown-type", "accelerate-unknown-type", DRY,
         ("field 'distributed_type'", "TELEPATHY"), {"launch": {"num_processes": 2, "accelerate_config": "{bad}"}}),
]


def earlier_config(root: Path, model: Path, task: Path, old: Path) -> dict:
    return {"name": "earlier", "base": {"model": str(model)},
            "tasks": [{"name": "first", "path": str(task), "metric": "accuracy"}],
            "old_knowledge": {"tasks": ["ks_toy"], "include_path": str(old), "limit": 4},
            "training": {"lr": 1e-3, "max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "max_length": 32,
                         "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
            "evaluation": {"batch_size": 4, "max_new_tokens": {"accuracy": 4}},
            "methods": {"one-round": {"finetune": ["lora"]}}}


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    """The CLI as a user runs it in a script: no terminal, COLUMNS unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([sys.executable, "-m", "knowstack.cli", *argv], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=600)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Inputs:
    """The good inputs, and an earlier study run on them (as a user runs it: a subprocess, off a terminal)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    task = make_task(root / "tasks", "First", n=4)
    write_mc_task(root / "old")
    adapter = make_adapter(tiny_model_dir, root / "adapter", seed=1)
    config = earlier_config(root, tiny_model_dir, task, root / "old")
    (root / "earlier.yaml").write_text(yaml.safe_dump(config))
    done = run_cli(["study", str(root / "earlier.yaml"), "--out", str(root / "study")])
    assert done.returncode == 0, done.stderr
    # The console shows knowstack's own progress; the libraries' warnings went to the steps' logs.
    assert "Warning" not in done.stderr and "warn(" not in done.stderr, done.stderr
    assert (root / "study" / "results.csv").is_file() and any((root / "study" / "logs").glob("*.log"))
    registry = root / "registry"
    assert main(["registry", "init", str(registry), "--base", str(tiny_model_dir)]) == 0
    return Inputs(root, tiny_model_dir, task, adapter, root / "old", root / "study", registry, config)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def study_config(case: Case, good: Inputs, bad: Path, where: Path) -> Path:
    config = json.loads(json.dumps(good.study_config))
    for key, value in case.config.items():
        if key == "tasks+":
            config["tasks"].append(value)
        else:
            config[key] = value
    text = json.dumps(config).replace("{bad}", str(bad)).replace("{old}", str(good.old))
    text = text.replace("{task}", str(good.task))
    path = where / "study.yaml"
    path.write_text(yaml.safe_dump(json.loads(text)))
    return path


def prepare(case: Case, good: Inputs, where: Path) -> tuple[list[str], Path]:
    where.mkdir(parents=True)
    bad = MAKERS[case.make](where / "bad", good)
    out = where / "out"
    values = {"bad": bad, "model": good.model, "task": good.task, "adapter": good.adapter, "old": good.old,
              "out": out, "study": good.study, "registry": good.registry}
    if "{config}" in case.argv:
        values["config"] = study_config(case, good, bad, where)
    return case.argv.format(**{k: str(v) for k, v in values.items()}).split(), out


def check_message(err: str, case: Case) -> None:
    assert "Traceback" not in err, err
    assert err.count("error:") == 1, err
    lines = err.splitlines()
    assert any(all(part in line for part in case.expect) for line in lines), err
    if case.problems > 1:
        assert f"{case.problems} problems" in err, err


def test_cases_cover_every_command_and_input_kind() -> None:
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)
    commands = {case.argv.split()[0] for case in CASES}
    assert commands >= {"study", "train", "eval", "merge", "mix", "contribute", "compose", "registry", "statistics"}
    assert any("--dry-run" in case.argv for case in CASES)
    assert {case.make for case in CASES} >= set(MAKERS) - {"nothing"}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, good: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal: messages are still one line each
    argv, out = prepare(case, good, tmp_path / "case")
    study, registry = snapshot(good.study), snapshot(good.registry)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    check_message(err, case)
    assert not out.exists()  # nothing half-written
    assert snapshot(good.study) == study and snapshot(good.registry) == registry  # earlier results untouched
    assert not (good.root / "UNPICKLED").exists()  # pickled weights were named, never opened


SUBPROCESS_CASES = ["eval-pickle-only", "study-truncated-model"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_off_a_terminal_prints_no_traceback(case_id: str, good: Inputs, tmp_path: Path) -> None:
    case = next(case for case in CASES if case.id == case_id)
    argv, out = prepare(case, good, tmp_path / "case")
    study = snapshot(good.study)
    done = run_cli(argv)
    assert done.returncode == 2, done.stderr
    check_message(done.stderr, case)
    assert "Warning" not in done.stderr and done.stdout == ""
    assert not out.exists() and snapshot(good.study) == study and not (good.root / "UNPICKLED").exists()


def test_a_config_error_is_one_line_at_any_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "study-config"
    deep.mkdir(parents=True)
    config = deep / "c.yaml"
    config.write_text("name: x\nbase: {builtin: test}\ntraining: {lr: 0.001}\nmethods: {bagging: {}}\n")
    for columns in ("40", None):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        assert main(["study", str(config), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {config}: field 'methods.bagging': unknown field\n"
    assert not (tmp_path / "run").exists()


def test_library_warnings_go_to_the_step_log_not_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import logging
    import warnings

    from knowstack.study import steps
    from knowstack.study.plan import Step

    def noisy(step: Step, ctx: steps.StudyContext, out: Path) -> None:
        warnings.warn_explicit("`old_api` is deprecated", FutureWarning, "/venv/site-packages/transformers/x.py", 7)
        logging.getLogger("transformers.modeling_utils").warning("some weights were not initialized")
        out.mkdir()

    monkeypatch.setitem(steps.EXECUTORS, "world", noisy)
    step = Step(kind="world", label="world", params={"preset": "test", "seed": 0})
    ctx = steps.StudyContext(out=tmp_path / "study", config=None)  # type: ignore[arg-type]
    library = logging.getLogger("transformers")
    before = (list(library.handlers), library.propagate, library.level)
    steps.execute(step, ctx)
    captured = capsys.readouterr()
    assert "deprecated" not in captured.err + captured.out and "initialized" not in captured.err + captured.out
    log = steps.step_log(ctx, step).read_text()
    assert "FutureWarning: `old_api` is deprecated" in log and "some weights were not initialized" in log
    assert ctx.artifact(step.key).is_dir()
    assert (list(library.handlers), library.propagate, library.level) == before  # as it was outside the step
