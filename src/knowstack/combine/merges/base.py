"""What a merge method declares, and the registry of them (torch-free: the plan and the CLI read it).

Every method is one module of this package that registers its function with `register`, declaring the
options it reads (config.py MergeConfig's names: only these enter its step's key, so that changing TIES'
density does not redo the average), whether it works on task vectors or full weights, whether it draws
at random, whether it reads per-model weights, how many models it takes, and, for a linear method, the
coefficients of its linear combination (which make a merge of LoRA adapters an exact adapter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from knowstack.config import MergeConfig
from knowstack.errors import KnowstackError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

_DECLARED = MergeConfig()


@dataclass(frozen=True)
class MergeOptions:
    """The knobs of all methods; each method reads the ones it declares."""

    # the defaults are config.py MergeConfig's (the one declaration)
    density: float = _DECLARED.density  # TIES, breadcrumbs, DELLA: fraction of each task vector kept, per tensor
    drop_rate: float = _DECLARED.drop_rate  # DARE: probability that an entry of a task vector is dropped
    lam: float = _DECLARED.lam  # scale of the merged task vector (lambda in the TIES and DARE papers)
    t: float = _DECLARED.t  # SLERP: 0 gives the first model, 1 the second
    gamma: float = _DECLARED.gamma  # breadcrumbs: fraction of the largest-magnitude entries dropped
    epsilon: float = _DECLARED.epsilon  # DELLA: keep probabilities spread over density +- epsilon by magnitude rank
    max_iter: int = _DECLARED.max_iter  # Karcher mean: iterations at most
    tol: float = _DECLARED.tol  # Karcher mean: convergence tolerance
    regmean_alpha: float = _DECLARED.regmean_alpha  # RegMean: factor on the Gram matrices' off-diagonal entries
    fisher_floor: float = _DECLARED.fisher_floor  # Fisher merging: added to every Fisher entry
    # LoRA adapters: merge their deltas s B A (delta), or their A and B factors apart as PEFT does (factors:
    # merge_factors.py, the paper's LoRA TIES / DARE-TIES)
    lora_space: str = "delta"

    def __post_init__(self) -> None:
        if self.lora_space not in ("delta", "factors"):
            raise KnowstackError(f"lora_space must be delta or factors, got {self.lora_space!r}", field="lora_space")
        if not 0 < self.density <= 1:
            raise KnowstackError(f"density must be in (0, 1], got {self.density}", field="density")
        if not 0 <= self.drop_rate < 1:
            raise KnowstackError(f"drop rate must be in [0, 1), got {self.drop_rate}", field="drop_rate")
        if not 0 <= self.t <= 1:
            raise KnowstackError(f"t must be in [0, 1], got {self.t}", field="t")
        if not 0 <= self.gamma < 1:
            raise KnowstackError(f"gamma must be in [0, 1), got {self.gamma}", field="gamma")
        if not 0 <= self.epsilon < 0.5:
            raise KnowstackError(f"epsilon must be in [0, 0.5), got {self.epsilon}", field="epsilon")
        if self.max_iter < 1 or self.tol <= 0:
            raise KnowstackError("max_iter must be at least 1 and tol positive", field="max_iter")
        if not 0 <= self.regmean_alpha <= 1:
            raise KnowstackError(f"regmean_alpha must be in [0, 1], got {self.regmean_alpha}", field="regmean_alpha")
        if not self.fisher_floor > 0:
            raise KnowstackError(f"fisher_floor must be positive, got {self.fisher_floor}", field="fisher_floor")

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> MergeOptions:
        """From a merge step's recorded options (config names: `lambda`, ...); the ones not given keep their
        defaults, and the step's `seed` is not an option of the method but of the merge."""
        names = {f.name for f in fields(cls)}
        given = {("lam" if k == "lambda" else k): v for k, v in settings.items() if k != "seed"}
        unknown = sorted(set(given) - names)
        if unknown:
            raise KnowstackError(f"unknown merge option '{unknown[0]}'", field=unknown[0])
        return cls(**given)

    def value(self, option: str) -> Any:
        """An option by its config name (`lambda` is the field `lam`)."""
        return getattr(self, "lam" if option == "lambda" else option)


MergeFn = Callable[[list["Tensor"], "Tensor", MergeOptions, "torch.Generator | None"], "Tensor"]
# A method that reads statistics of each model's data (RegMean: Gram matrices, Fisher: a diagonal Fisher) gets,
# after the generator, one statistics tensor per model for this parameter (combine/statistics.py)
StatisticsMergeFn = Callable[[list["Tensor"], "Tensor", MergeOptions, "torch.Generator | None", list["Tensor"]],
                             "Tensor"]
Coefficients = Callable[[list[float], MergeOptions], list[float]]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    options: tuple[str, ...]  # the MergeConfig settings it reads (config names); "seed" for a random method
    summary: str  # one line: what it does (the compose variant's help)
    uses_base: bool  # True: works on task vectors relative to a base model; False: on the full weights
    random: bool  # True: draws from the generator (DARE, DELLA)
    weighted: bool  # False: reads no per-model weights (equal weights only)
    min_models: int
    max_models: int | None
    coefficients: Coefficients | None  # linear methods: merged = sum_i c_i x_i (an exact LoRA adapter)
    check: Callable[[MergeOptions], None] | None  # options this method cannot run with, beyond each one's range
    # the statistics of each model's data it reads (combine/statistics.py: "gram" or "fisher"); None: no data
    statistics: str | None = None
    # mergekit's name for the same method (accepted as an alias where it differs; docs/methods.md has both)
    mergekit: str | None = None
    # True: it changes no tensor given to it in place but the first (the others may be read-only maps of the
    # input files); False: any of them (each is a copy of its own)
    changes_first_only: bool = False

    def check_inputs(self, n: int, weights: Sequence[float] | None = None) -> None:
        """One clear error for a number of models or weights this method does not take."""
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            wanted = (f"exactly {self.min_models}" if self.max_models == self.min_models
                      else f"at least {self.min_models}" if self.max_models is None
                      else f"{self.min_models} to {self.max_models}")
            raise KnowstackError(f"'{self.name}' merges {wanted} models, got {n}", field="models")
        if not self.weighted and weights is not None and len(set(weights)) > 1:
            raise KnowstackError(f"'{self.name}' reads no per-model weights; give equal weights or none",
                                 field="weights")

    def check_options(self, options: MergeOptions) -> None:
        if self.check is not None:
            self.check(options)

    @property
    def takes_density_for_drop_rate(self) -> bool:
        """DARE's: it reads drop_rate and takes mergekit's density (the fraction kept) for it."""
        return "drop_rate" in self.options and "density" not in self.options

    def options_from(self, given: dict[str, Any]) -> MergeOptions:
        """The options a user gave (config names, `lam` or `lambda`; `seed` too), each one this method reads, or one
        error naming the ones it reads: an option no method step would read is a mistake, not a no-op. `density`
        given to a method that reads `drop_rate` (DARE) is mergekit's and PEFT's density, the fraction kept:
        drop_rate = 1 - density (both given, they must agree)."""
        given = {("lambda" if name == "lam" else name): value for name, value in given.items()}
        if "density" in given and self.takes_density_for_drop_rate:
            drop_rate = round(1 - given.pop("density"), 12)
            if "drop_rate" in given and abs(given["drop_rate"] - drop_rate) > 1e-9:
                raise KnowstackError(f"'{self.name}' keeps a fraction density = 1 - drop_rate of each task vector: "
                                     f"density {1 - drop_rate:g} and drop_rate {given['drop_rate']:g} contradict "
                                     "each other; give one of them", field="density")
            given["drop_rate"] = drop_rate
        # lora_space is how LoRA inputs are merged, not a knob of the method (merge_models checks it)
        unread = [name for name in given if name not in self.options and name != "lora_space"]
        if unread:
            reads = ", ".join([option_flag(name) for name in self.options]
                              + (["--density (the fraction kept)"] if self.takes_density_for_drop_rate else [])) \
                or "no options"
            raise KnowstackError(f"'{self.name}' does not read {', '.join(map(option_flag, unread))}: it reads "
                                 f"{reads}", field=unread[0])
        given.pop("seed", None)
        return MergeOptions.from_settings(given)


METHODS: dict[str, MergeMethod] = {}


def option_flag(name: str) -> str:
    """An option as `knowstack merge` spells it (config name `drop_rate`: --drop-rate)."""
    return "--" + name.replace("_", "-")


def register(name: str, *, options: tuple[str, ...], summary: str, uses_base: bool = True, weighted: bool = True,
             models: tuple[int, int | None] = (1, None), coefficients: Coefficients | None = None,
             check: Callable[[MergeOptions], None] | None = None,
             statistics: str | None = None, mergekit: str | None = None,
             changes_first_only: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register a merge function under `name` with what it declares (random: it reads the seed; statistics: the
    kind of statistics of each model's data it reads, passed as its fifth argument; mergekit: mergekit's name for
    it, accepted as an alias; changes_first_only: it changes no tensor given to it in place but the first)."""
    def wrap(fn: MergeFn) -> MergeFn:
        METHODS[name] = MergeMethod(name, fn, options, summary, uses_base, "seed" in options, weighted, models[0],
                                    models[1], coefficients, check, statistics, mergekit, changes_first_only)
        return fn

    return wrap


def mergekit_aliases() -> dict[str, str]:
    """mergekit's method names that differ from knowstack's, each to the knowstack method (`linear`: `average`)."""
    return {m.mergekit: m.name for m in METHODS.values() if m.mergekit is not None and m.mergekit != m.name}


def get_method(name: str) -> MergeMethod:
    """A method by its name or its mergekit name."""
    name = mergekit_aliases().get(name, name)
    if name not in METHODS:
        raise KnowstackError(f"unknown merge method '{name}'; choose from {', '.join(METHODS)} (or mergekit's "
                             f"{', '.join(mergekit_aliases())})", field="method")
    return METHODS[name]
