"""Every setting of a study config is in the key of exactly the steps that compute with it.

A step is cached by its key and computes only from its params (and its inputs' artifacts), so a setting that
changes what a step computes but is not in its key silently reuses a stale artifact (as `base.tokenizer` did),
and a setting in the key of a step that does not read it redoes work for nothing. The walk changes each field
of a config that enables every method, one at a time, and finds the steps that read it: those whose own params
change (not only the keys of their inputs). They must be of the kinds declared below.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from knowstack.config import parse_config
from knowstack.errors import KnowstackError
from knowstack.study.plan import build_plan

TRAINED = {"train"}  # a training setting: the steps that train; every model made from them changes with them
ROUTERS = {"moe"}

# field (a [] matches any index) -> the kinds of step that compute with it; empty: decides how or where the steps
# run, never what they compute.
READERS: dict[str, set[str]] = {
    "name": set(),
    "seed": {"train", "merge", "moe", "gate", "search"},  # training, DARE's draws, routers, gates, the search's sampler
    "seeds": {"train", "merge", "moe", "gate", "search"},  # the models of the seeds added
    "base.model": {"train", "eval", "merge", "moe", "gate", "statistics", "merge-adapter", "search"},
    "base.tokenizer": {"train", "eval", "statistics", "moe", "gate", "search"},
    "base.trust_remote_code": set(),  # whether a model's own code may run, not what it computes
    "tasks[].name": {"train", "eval", "moe", "gate", "statistics", "search"},
    "tasks[].train_file": {"train", "eval", "moe", "gate", "statistics", "search"},  # in the task's fingerprint
    "tasks[].format": {"train", "eval", "moe", "gate", "statistics", "search"},
    "tasks[].metric": {"train", "eval", "moe", "gate", "statistics", "search"},  # in the task's fingerprint
    "tasks[].max_train": {"train", "eval", "moe", "gate", "statistics", "search"},
    "tasks[].max_test": {"train", "eval", "moe", "gate", "statistics", "search"},
    "tasks[].epochs": TRAINED,
    "tasks[].max_steps": TRAINED,
    "tasks[].micro_batch_size": TRAINED,
    "tasks[].protocol": {"eval", "search"},
    "old_knowledge.": {"eval", "search"},  # the search scores its trials as an evaluation does
    "evaluation.": {"eval", "search"},
    "training.report_to": set(),  # where training is reported to
    # the base every model is built from (a pad-base step); the base's own evaluation stays as it is
    "training.add_pad_token": {"train", "merge", "moe", "gate", "statistics", "search", "pad-base", "eval"},
    "training.max_length": {"train", "moe", "gate", "statistics"},  # routers and statistics read as much
    "training.": TRAINED,
    "methods.one-round.finetune": set(),  # which one-round models are evaluated: the ones left stay as they are
    "methods.sequential.finetune": set(),
    "methods.olora.lambdas": TRAINED,
    "methods.ewc.finetune": set(),
    "methods.ewc.lambdas": TRAINED,
    "methods.ewc.fisher_examples": {"statistics"},
    "methods.ewc.fisher_decay": TRAINED,
    "methods.lwf.finetune": set(),
    "methods.lwf.": TRAINED,
    "methods.joint.finetune": set(),
    "methods.joint.sampling": TRAINED,
    "methods.replay.finetune": set(),
    "methods.replay.fraction": TRAINED,
    "methods.merge.finetune": set(),
    "methods.merge.methods": set(),
    "methods.merge.statistics_examples": {"statistics"},
    "methods.merge.t": set(),  # SLERP's, which merges two models: this study has three (continual merging reads it)
    "methods.merge.": {"merge"},
    "methods.continual-merge.finetune": set(),
    "methods.continual-merge.methods": set(),
    # merge settings continual merging does not read: it merges no statistics, and LoRA deltas only
    "methods.continual-merge.regmean_alpha": set(), "methods.continual-merge.fisher_floor": set(),
    "methods.continual-merge.statistics_examples": set(), "methods.continual-merge.lora_space": set(),
    "methods.continual-merge.": {"merge"},
    "methods.search.finetune": set(),
    "methods.search.": {"search"},
    "methods.moe[].name": set(),  # the results' name of the mixture
    "methods.moe[].experts": set(),
    "methods.moe[].gate_training.": {"gate"},
    "methods.moe[].seed": {"moe", "gate"},
    "methods.moe[].": ROUTERS,
    # where training is launched as processes: the launch's, else its accelerate config file's (ddp.yaml: bf16)
    "launch.mixed_precision": TRAINED | ROUTERS,
    "launch.lora": TRAINED | ROUTERS,  # its mixed_precision, for the LoRA steps and LoRA-MoE routers
    "launch.": set(),  # how many processes, on which devices: the same global batch, the same weights
    "executor.": set(),
}


def _readers(field: str) -> set[str]:
    pattern = re.sub(r"\[\d+\]", "[]", field)
    for prefix, kinds in READERS.items():
        if pattern == prefix or (prefix.endswith(".") and pattern.startswith(prefix)):
            return kinds
    return {"not in READERS: say which kinds of step compute with it"}


def _write_task(root: Path, name: str) -> Path:
    task = root / name
    task.mkdir()
    for split in ("train", "eval", "test"):
        items = [{"prompt": f"{name} {split} question {i}:", "answer": " yes"} for i in range(3)]
        (task / f"{split}.json").write_text(json.dumps(items))
    return task


MERGES = ["average", "ties", "dare", "ties-dare", "breadcrumbs", "della", "karcher", "regmean", "fisher"]


def _every_method(root: Path) -> dict[str, Any]:
    return {
        "name": "walk", "seed": 0, "base": {"model": str(root / "base")},
        "tasks": [{"name": "Stance", "path": str(_write_task(root, "Stance")), "metric": "accuracy"},
                  {"name": "Notes", "path": str(_write_task(root, "Notes")), "metric": "rouge_l"},
                  {"name": "Code", "path": str(_write_task(root, "Code")), "metric": "edit_similarity"}],
        "old_knowledge": {"tasks": ["arc_easy"], "limit": 8},  # the search scores the items after the first 8
        "training": {"weight_decay": 0.1},
        "launch": {"num_processes": 2, "cpu": True},
        "methods": {
            "one-round": {"finetune": ["fft", "lora"]}, "sequential": {"finetune": ["fft", "lora"]},
            "olora": {}, "ewc": {"lambdas": [1.0, 10.0]}, "lwf": {}, "joint": {"finetune": ["fft", "lora"]}, "replay": {"finetune": ["fft", "lora"]},
            "merge": {"finetune": ["fft", "lora"], "methods": MERGES},
            "continual-merge": {"finetune": ["fft", "lora"], "methods": [*MERGES[:-2], "slerp"]},
            "moe": [{"experts": ["fft"], "router_training": {"steps": 5}, "attention": ["o_proj"]},
                    {"experts": ["lora"], "routing": "module", "router_training": {"steps": 5}, "name": "per-module"},
                    {"experts": ["lora"], "router": "arrow", "temperature": 2.0},
                    {"experts": ["lora"], "router": "gates", "gate_training": {"steps": 3}},
                    {"experts": ["lora"], "router": "moetify"}],
            "search": {"finetune": ["fft", "lora"], "methods": ["ties", "dare"]},
        },
    }


# A changed value for each field the generic rule below cannot make up.
CHANGED = {
    "base.tokenizer": "{root}/tokenizer", "old_knowledge.tasks": ["arc_easy", "hellaswag"],
    "old_knowledge.include_path": "{root}", "old_knowledge.add_bos_token": False, "evaluation.add_bos_token": False, "old_knowledge.limit": 5, "old_knowledge.num_fewshot": 2,
    "training.lr": 1e-4, "training.lr_of_pretrain_peak": 0.3, "training.max_steps": 7, "training.report_to": ["mlflow"],
    "training.micro_batch_size": 8,  # a part of the batch of 16 (one larger is refused)
    "evaluation.max_test": 5, "evaluation.max_new_tokens": {"Stance": 7}, "launch.accelerate_config": "ddp",
    "launch.mixed_precision": "no", "launch.lora": {"num_processes": 2, "mixed_precision": "no"},
    "tasks[].protocol": "paper", "methods.olora.lambdas": [0.5, 2.0], "methods.ewc.lambdas": [1.0, 20.0], "methods.lwf.lambdas": [2.0], "tasks[].train_file": "{root}/Stance/eval.json", "tasks[].max_train": 2,
    "tasks[].max_test": 2, "tasks[].epochs": 2.0, "tasks[].max_steps": 3, "tasks[].micro_batch_size": 4, "seeds": [0, 1],
    "methods.moe[].attention": ["o_proj", "v_proj"], "methods.moe[].routing": "layer",
    "methods.moe[].tasks": ["Notes", "Stance"], "methods.moe[].layers": [0], "methods.moe[].name": "renamed",
    "methods.moe[].router_training": {"steps": 2}, "methods.moe[].gate_training": {"steps": 2},
    "methods.moe[].router_dtype": "float16", "methods.moe[].router_init": "moetify",
    "methods.continual-merge.methods": ["ties"], "methods.merge.seed": 3, "methods.continual-merge.seed": 3,
    "base.model": "{root}/other-base",
    "methods.search.lam_range": [0.2, 1.0], "methods.search.density_range": [0.3, 0.9],
    "methods.search.weight_range": [0.5, 1.0],
}
UNCHANGEABLE = {  # fields no valid config of this shape can change alone
    "training.lr_of_pretrain_peak",  # a built-in world's: test_the_world_keys_what_is_made_from_it
    "tasks[].eval_file", "tasks[].test_file",  # set by `path` here (changing them: like train_file)
    "base.builtin",  # another base: test_a_built_in_world_keys_what_is_made_from_it
    "tasks[].path",  # the task's files are its fingerprint: covered by train_file
    "methods.moe[].experts",  # which mixtures are made; each is a step of its own
    "methods.moe[].router_training", "methods.moe[].gate_training",  # unset here; where set, their fields are walked
}
SWEEPS = re.compile(r"\.(sweep|points)$")  # a sweep adds models, it changes none: tested by the sweep tests


def _changed_values(field: str, value: Any, root: Path) -> list[Any]:
    pattern = re.sub(r"\[\d+\]", "[]", field)
    if pattern in CHANGED:
        changed = CHANGED[pattern]
        return [changed.format(root=root) if isinstance(changed, str) else changed]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [value * 0.5, value * 1.5]
    if isinstance(value, str):  # another choice of a Literal: the validation refuses the rest
        return ["linear", "cosine", "proportional", "equal", "factors", "average", "paper", "hidden", "routed",
                "exact_match", "acc_norm", "math", "all", "auto", "bf16", "micro_batch"]
    if isinstance(value, list) and len(value) > 1:
        return [value[:-1]]
    return [3, 0.5] if value is None else []  # an unset number


def _leaves(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        path = f"{prefix}{info.alias or name}"
        if isinstance(value, BaseModel):
            yield from _leaves(value, path + ".")
        elif isinstance(value, list) and value and all(isinstance(item, BaseModel) for item in value):
            for i, item in enumerate(value):
                yield from _leaves(item, f"{path}[{i}].")
        else:
            yield path, value


def _set(raw: dict[str, Any], field: str, value: Any) -> None:
    *parents, last = re.findall(r"[^.\[\]]+", field)
    node: Any = raw
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[last] = value


def _steps(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    return dict(build_plan(parse_config(copy.deepcopy(raw), root=root)).steps)


def _signature(step: Any) -> str:
    """A step's kind and params with every reference to another step's output made anonymous: equal for a step
    that computes the same from inputs that changed. (Its label names what it is made from, so it changes with
    them.)"""
    return re.sub(r'"@[^/"]+', '"@', json.dumps([step.kind, step.params], sort_keys=True, default=str))


def _readers_found(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """The kinds of the steps whose own params changed (not only their inputs' keys)."""
    known = {_signature(step) for step in before.values()}
    return {step.kind for step in after.values() if _signature(step) not in known}


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    root = tmp_path_factory.mktemp("walk")
    raw = _every_method(root)
    before = _steps(raw, root)
    found: dict[str, set[str]] = {}
    unchanged: set[str] = set()  # fields (as patterns) left as they were: an entry of a list may not take them
    for field, value in _leaves(parse_config(copy.deepcopy(raw), root=root)):
        pattern = re.sub(r"\[\d+\]", "[]", field)
        if SWEEPS.search(field) or pattern in UNCHANGEABLE:
            continue
        unchanged.add(pattern)
        for candidate in _changed_values(field, value, root):
            changed = copy.deepcopy(raw)
            try:
                _set(changed, field, candidate)
                after = _steps(changed, root)
            except (KnowstackError, ValidationError):
                continue
            found[field] = _readers_found(before, after)
            break
    unchanged -= {re.sub(r"\[\d+\]", "[]", field) for field in found}
    assert not unchanged, f"no valid change of {sorted(unchanged)}: add one to CHANGED or a method that reads it"
    return found


def test_every_setting_keys_exactly_the_steps_that_compute_with_it(walk: dict[str, set[str]]) -> None:
    found: dict[str, set[str]] = {}  # a field of the entries of a list: what any entry's change keys
    for field, kinds in walk.items():
        found.setdefault(re.sub(r"\[\d+\]", "[]", field), set()).update(kinds)
    wrong = {field: (sorted(kinds), sorted(_readers(field))) for field, kinds in found.items()
             if kinds != _readers(field)}
    assert not wrong, "field: (kinds of step it keys, kinds that compute with it): " + json.dumps(wrong, indent=1)


def test_the_walk_covers_the_settings_that_were_missing_from_keys(walk: dict[str, set[str]]) -> None:
    assert walk["base.tokenizer"] == READERS["base.tokenizer"]
    assert walk["launch.mixed_precision"] == {"train", "moe"}


def test_a_launch_keys_the_mixed_precision_of_its_accelerate_config(tmp_path: Path) -> None:
    """The shipped accelerate configs say bf16: a launch that does not say otherwise trains under bf16 autocast,
    and its train steps say so in their params (a run in one process has no autocast)."""
    raw = _every_method(tmp_path)
    launched = [step for step in _steps(raw, tmp_path).values() if step.kind == "train"]
    assert {step.params.get("mixed_precision") for step in launched} == {"bf16"}
    raw["launch"] = {"num_processes": 1}
    alone = [step for step in _steps(raw, tmp_path).values() if step.kind == "train"]
    assert {step.params.get("mixed_precision") for step in alone} == {None}


def test_a_built_in_world_keys_what_is_made_from_it(tmp_path: Path) -> None:
    raw = {"name": "world", "base": {"builtin": "test"}, "training": {"lr_of_pretrain_peak": 0.3},
           "methods": {"one-round": {"finetune": ["lora"]}}}
    before = _steps(raw, tmp_path)
    changed = copy.deepcopy(raw)
    _set(changed, "training.lr_of_pretrain_peak", 0.5)
    assert _readers_found(before, _steps(changed, tmp_path)) == TRAINED
    _set(changed, "base.builtin", "quick")
    after = _steps(changed, tmp_path)
    assert _readers_found(before, after) == {"world", "train", "eval"}
    assert not set(before) & set(after)  # every step is made from the world


# What a step may read of the study's config at run time, besides its params: how it runs, never what it computes.
HOW = ("ctx.config.base.trust_remote_code", "ctx.config.launch", "ctx.config.training.report_to")


def test_steps_compute_from_their_params() -> None:
    """The step functions read the config only for how a step runs (the walk above checks that what they compute
    is in their params); the whole config goes only to the trackers."""
    import ast

    import knowstack.study.steps as steps

    tree = ast.parse(Path(steps.__file__).read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = set()
    for node in ast.walk(tree):
        chain = ast.unparse(node) if isinstance(node, ast.Attribute) else ""
        if not chain.startswith("ctx.config") or isinstance(parents[node], ast.Attribute):
            continue  # not a read of the config, or a part of a longer one
        parent = parents[node]
        tracked = isinstance(parent, ast.Call) and ast.unparse(parent.func) == "step_tracking"
        reads.add("<trackers>" if chain == "ctx.config" and tracked else chain)
    assert "<trackers>" in reads and "ctx.config.base.trust_remote_code" in reads  # the walk sees them
    assert not {read for read in reads - {"<trackers>"} if not read.startswith(HOW)}, reads
