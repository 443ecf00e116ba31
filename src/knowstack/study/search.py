"""Search of a composition within a forgetting budget: which merge of the contributions learns the most while old
knowledge falls at most `max_old_loss` percent below the base's.

The space (SearchSpace): the merge method (categorical, from the registered merges), lambda, the density (or DARE's
drop rate, 1 - density) where the method reads one, and a weight per merged model where the method reads weights
(for LoRA adapters, LoraHub's per-adapter weights). The optimiser is optuna's TPE sampler, asked and told one trial
at a time: it takes a mixed, conditional space (a density exists only for the methods that read one) as it is,
and at budgets of 10-40 evaluations models the good region from the first few trials on, where CMA-ES' population
of ~8 would have run two or three generations (docs/search.md says more).

Each trial's scores are a pure function of its point (the merge is seeded), so they are cached by the point's key
(`point_key`); a search run again asks the same seeded sampler for the same trials in the same order, is told the
cached scores, and so rebuilds the optimiser's state exactly: a killed search reruns only the trials it lacks.
The objective (new knowledge, the mean score on the tasks' eval splits) and the constraint (old knowledge's
held-out loss) are measured by the caller's `evaluate`; this module never sees a test split.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from knowstack.combine.merges import METHODS
from knowstack.errors import KnowstackError

# Trials drawn at random before TPE models the results: a quarter of the budget, at least 3, at most 10
STARTUP_SHARE, STARTUP_MIN, STARTUP_MAX = 4, 3, 10


@dataclass(frozen=True)
class SearchSpace:
    """methods: the merge methods searched; models: how many models are merged; ranges: [low, high] of lambda, of
    the density (the fraction of each task vector kept; DARE's drop rate is 1 - density) and of each weight."""

    methods: tuple[str, ...]
    models: int
    lam_range: tuple[float, float] = (0.1, 1.5)
    density_range: tuple[float, float] = (0.1, 1.0)
    weight_range: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self) -> None:
        unknown = [name for name in self.methods if name not in METHODS]
        if unknown:
            raise KnowstackError(f"unknown merge method '{unknown[0]}'", field="methods")
        for name in self.methods:
            if METHODS[name].statistics is not None:
                raise KnowstackError(f"'{name}' reads statistics of each model's data: the search takes methods "
                                     "that merge the models alone", field="methods")
            METHODS[name].check_inputs(self.models)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """A point of the space drawn by an optuna trial (define-by-run: the settings of the method drawn only)."""
        method = trial.suggest_categorical("method", list(self.methods))
        encoded: dict[str, Any] = {"method": method}
        reads = METHODS[method].options
        if "lambda" in reads:
            encoded["lambda"] = trial.suggest_float("lambda", *self.lam_range)
        if "density" in reads or "drop_rate" in reads:
            encoded["density"] = trial.suggest_float("density", *self.density_range)
        if METHODS[method].weighted and self.models > 1:
            encoded["weights"] = [trial.suggest_float(f"weight_{i}", *self.weight_range) for i in range(self.models)]
        return encoded

    def decode(self, point: dict[str, Any]) -> tuple[str, dict[str, Any], list[float] | None]:
        """A point as a merge: (method, its step options in config names, per-model weights or None). DARE reads
        the drop rate: 1 - the point's density."""
        method = point["method"]
        reads = METHODS[method].options
        options: dict[str, Any] = {}
        if "lambda" in point:
            options["lambda"] = point["lambda"]
        if "density" in point:
            options["density" if "density" in reads else "drop_rate"] = (
                point["density"] if "density" in reads else round(1 - point["density"], 12))
        return method, options, point.get("weights")


def point_key(point: dict[str, Any]) -> str:
    """A point's cache key: its settings, rounded where floats print differently across runs of the same draw."""
    canonical = json.dumps(point, sort_keys=True, default=float)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class Trial:
    """One evaluation of the search: its point, the mean eval score over the tasks (`new`), the held-out old AVE
    (`old`), its loss against the base's in percent (`old_loss`), and whether that is within the budget."""

    number: int
    point: dict[str, Any]
    new: float
    old: float
    old_loss: float
    within: bool
    scores: dict[str, Any] = field(default_factory=dict)  # per task (eval) and per old task (held-out)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("cached")
        return record


def old_loss_percent(old: float, base_old: float) -> float:
    """How far `old` falls below the base's, in percent of the base's (negative: above it)."""
    return 0.0 if base_old == 0 else (base_old - old) / base_old * 100


def chosen_trial(trials: list[Trial]) -> Trial | None:
    """The trial that learns the most among those within the budget (of equals, the one that keeps more, then the
    earliest); None when none is within it: a trial over budget is never chosen."""
    feasible = [t for t in trials if t.within]
    return max(feasible, key=lambda t: (t.new, t.old, -t.number)) if feasible else None


TrialCache = dict[str, dict[str, Any]]  # point key -> {"new", "old", "scores"}: what evaluate returned


def startup_trials(trials: int) -> int:
    return max(STARTUP_MIN, min(STARTUP_MAX, trials // STARTUP_SHARE))


def search(space: SearchSpace, trials: int, seed: int, max_old_loss: float, base_old: float,
           evaluate: Callable[[dict[str, Any]], dict[str, Any]], cache: TrialCache,
           on_trial: Callable[[Trial], None] | None = None, numbers: Iterable[int] | None = None) -> list[Trial]:
    """`trials` trials of a TPE search (seeded) maximising the eval score, constrained to an old-knowledge loss of
    at most `max_old_loss` percent. evaluate(point) -> {"new": mean eval score, "old": held-out AVE, "scores": ...};
    a point found in `cache` is not evaluated again (evaluated ones are added to it, so the caller can keep each as
    it comes). on_trial: called after each trial (the caller's own record); numbers: range(trials) as the caller
    iterates it (a progress bar)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constrained TPE: told each trial's excess over the budget (set_constraint), it models the feasible region
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(trials))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for method in space.methods[:trials]:
        # every method tried once first (its other settings drawn): from random draws alone a 12-trial search of
        # seed 0 drew TIES three times and TPE, never told of the others, kept to it for all 12
        study.enqueue_trial({"method": method})
    done: list[Trial] = []
    for number in numbers if numbers is not None else range(trials):
        asked = study.ask()
        point = space.suggest(asked)
        key = point_key(point)
        cached = key in cache
        if not cached:
            cache[key] = evaluate(point)
        result = cache[key]
        loss = old_loss_percent(result["old"], base_old)
        trial = Trial(number, point, result["new"], result["old"], loss, loss <= max_old_loss,
                      result.get("scores", {}), cached)
        asked.set_constraint("old_loss_over_budget", loss - max_old_loss)  # <= 0: feasible (optuna's convention)
        study.tell(asked, trial.new)
        done.append(trial)
        if on_trial is not None:
            on_trial(trial)
    return done


def search_record(trials: list[Trial], space: SearchSpace, max_old_loss: float, base_old: float,
                  seed: int) -> dict[str, Any]:
    """What a search leaves (search.json): its settings, every trial and the chosen one (None: none within the
    budget, and the base is kept)."""
    chosen = chosen_trial(trials)
    return {"methods": list(space.methods), "models": space.models, "lam_range": list(space.lam_range),
            "density_range": list(space.density_range), "weight_range": list(space.weight_range),
            "max_old_loss": max_old_loss, "base_old": base_old, "seed": seed, "optimiser": "optuna TPE",
            "trials": [t.to_dict() for t in trials], "chosen": None if chosen is None else chosen.number}
