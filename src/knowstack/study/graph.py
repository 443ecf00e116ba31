"""The plan's parts: steps (a kind, its parameters, the keys of the steps it reads, keyed by a hash of all
three), the models they make (ModelRef), a method's sweep points, and the evaluations that become results rows.

Each step is data, so the plan can be printed, hashed and executed by any executor. A step's key is a hash of
what it is made from: the same training on the same model and data is one step however many methods need it
(round 1 of a sequential run *is* the one-round model of the first task), and a finished step is never redone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from knowstack.config import SWEEP_COLUMNS, StudyConfig

# Bump when what a kind of step writes changes, so stale artifacts are not reused. train and moe 2: an
# overlong example loses the middle of its prompt, not the end of its answer (data/truncation.py); eval 3:
# that, and every evaluation keeps its per-item scores.
STEP_VERSIONS = {"world": 1, "train": 2, "merge-adapter": 1, "eval": 3, "merge": 1, "moe": 2, "gate": 1}
STEP_VERSIONS["statistics"] = 1  # a one-round model's statistics of its task's data (RegMean, Fisher merging)
STEP_VERSIONS["search"] = 1  # a search of the composition within a forgetting budget (study/search.py)
STEP_VERSIONS["pad-base"] = 1  # the base with the paper's [PAD] row (training.add_pad_token, modelio.add_pad_token)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Step:
    """A unit of work. Its label is derived from content too (never from which method asked for
    it), so that adding a method to a config never renames, and so never redoes, existing work."""

    kind: str
    label: str
    params: dict[str, Any]
    deps: tuple[str, ...] = ()
    # Which round of which method, for the console ("sequential round 2/7"): shown, never part of the key.
    title: str = field(default="", compare=False)
    key: str = field(init=False)

    @property
    def shown(self) -> str:
        """The label, with the round it is where it has one: 'lora-Notes (sequential round 2/7)'."""
        return f"{self.label} ({self.title})" if self.title else self.label

    def __post_init__(self) -> None:
        version = STEP_VERSIONS[self.kind]
        digest = _digest({"kind": self.kind, "v": version, "params": self.params, "deps": self.deps})
        object.__setattr__(self, "key", f"{self.kind}-{self.label}-{digest}")


@dataclass(frozen=True)
class ModelRef:
    """A model to load: a full model (a step's output or a path/hub id) and optionally an adapter.
    world: the built-in world's fingerprint when the model is its base, so that it is in the key of
    every step made from the world (a step made from another's output has that step's key in its own)."""

    model: str
    adapter: str | None = None
    world: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        ref = {"model": self.model, "adapter": self.adapter}
        return ref | {"world": self.world} if self.world else ref


@dataclass(frozen=True)
class Point:
    """One setting of a method in a sweep: the values it changes from the method's own setting (none: the
    method's own run, the one compared 'at equal settings')."""

    values: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, settings: dict[str, float]) -> Point:
        order = {name: i for i, name in enumerate(SWEEP_COLUMNS)}
        return cls(tuple(sorted(((k, float(v)) for k, v in settings.items()), key=lambda kv: order[kv[0]])))

    @property
    def name(self) -> str:
        """'lr=0.001,rank=16'; '' for the method's own setting."""
        return ",".join(f"{name}={value:g}" for name, value in self.values)

    def named(self, model: str) -> str:
        """A model's name at this point: 'one-round-fft-stance@lr=0.001'."""
        return f"{model}@{self.name}" if self.values else model

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.values).get(name, default)


@dataclass(frozen=True)
class Evaluation:
    """One named model of the study and the eval step that scores it: the rows of results.csv.
    point: the sweep point's name ('' for the method's own setting); settings: the values it sets, and
    O-LoRA's lambda (the results' setting columns)."""

    model: str
    method: str
    finetune: str
    stage: int | None
    step: str
    trained_on: str = ""
    point: str = ""
    settings: tuple[tuple[str, float], ...] = ()
    seed: int | None = None  # the training seed, where the config repeats its models over `seeds`


@dataclass
class Plan:
    config: StudyConfig
    steps: dict[str, Step] = field(default_factory=dict)
    evaluations: list[Evaluation] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)
    # The built-in world's fingerprint (world.json), once it is built; until then every later step's key
    # is provisional (`world_pending`), and the runner builds the world and plans again.
    world_fingerprint: str | None = None
    world_pending: bool = False

    def add(self, step: Step) -> Step:
        for dep in step.deps:
            if dep not in self.steps:
                raise AssertionError(f"step {step.key} depends on unknown step {dep}")
        self.steps.setdefault(step.key, step)
        return self.steps[step.key]

    def ordered(self) -> list[Step]:
        return list(self.steps.values())  # insertion order is a topological order by construction


def step_ref(step: Step, sub: str = "") -> str:
    """A reference to a step's output dir, resolved by the runner: '@<key>' or '@<key>/<sub>'."""
    return f"@{step.key}/{sub}" if sub else f"@{step.key}"


def ref_deps(ref: ModelRef) -> tuple[str, ...]:
    keys = []
    for value in (ref.model, ref.adapter):
        if value and value.startswith("@"):
            keys.append(value[1:].split("/", 1)[0])
    return tuple(keys)


def lambda_tag(lambdas: float | list[float]) -> str:
    """How an O-LoRA run is named: '0.5', or '0_0.5_5' for one lambda per round."""
    values = lambdas if isinstance(lambdas, list) else [lambdas]
    return "_".join(f"{float(v):g}" for v in values)
