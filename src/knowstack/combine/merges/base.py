"""What a merge method declares, and the registry of them (torch-free: the config, the plan and the CLI read it).

Every method is one module of this package that registers its function with `register`, declaring the
options it reads (only these enter its step's key, so that changing TIES' density does not redo the average),
whether it works on task vectors or full weights, whether it draws at random, whether it reads per-model weights,
how many models it takes, and, for a linear method, the coefficients of its linear combination (which make a merge
of LoRA adapters an exact adapter).

Each option is declared once, with `declare` (name, type, default, range, meaning): the options several methods
read here, a method's own beside it in its module (DELLA's epsilon in della.py). Everything else is derived from
that declaration: config.py's MergeConfig fields (default and range checks), `MergeOptions`, the options of
`knowstack merge` and `compose` (cli/options.py), compose's `ComposeOptions` and the table of docs/methods.md
(scripts/docs_numbers.py). This package sits below config (docs/design.md, "Layers") so that config can read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from knowstack.errors import KnowstackError

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@dataclass(frozen=True)
class Option:
    """One setting of the merge methods, as every place that reads it takes it: `name` as the config, the step's
    params and the command line (--name) spell it, `attribute` as MergeConfig and MergeOptions hold it (lambda:
    lam), its type, default and bounds (gt/ge/lt/le: strict or not), its meaning (the --help and the docs) and
    whether a study may sweep it."""

    name: str
    type: type
    default: float | int
    meaning: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    attribute: str = ""
    sweepable: bool = False

    @property
    def field(self) -> str:
        return self.attribute or self.name

    def range_text(self) -> str:
        """'in (0, 1]', 'positive', 'at least 1', ..."""
        low = f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else None
        high = f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else None
        if low and high:
            return f"in {low}, {high}"
        if self.gt == 0:
            return "positive"
        if low:
            return f"at least {self.ge:g}" if self.ge is not None else f"above {self.gt:g}"
        return f"below {self.lt:g}" if self.lt is not None else f"at most {self.le:g}" if high else "any number"

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` for this option (its range, the one check of it), or None."""
        fails = ((self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge)
                 or (self.lt is not None and not value < self.lt) or (self.le is not None and not value <= self.le))
        if self.type is int and float(value) != int(value):
            return f"{self.name} must be a whole number, got {value}"
        return f"{self.name} must be {self.range_text()}, got {value}" if fails else None


# name -> its one declaration, in the order declared (the shared ones first, then each method's module in order)
OPTIONS: dict[str, Option] = {}


def declare(name: str, type: type, default: float | int, meaning: str, *, attribute: str = "",
            sweepable: bool = False, **bounds: float) -> Option:
    """Declare a merge option once (a second declaration of a name is a mistake: it would be two defaults)."""
    if name in OPTIONS:
        raise KnowstackError(f"merge option '{name}' is declared twice", field=name)
    option = Option(name, type, default, meaning, attribute=attribute, sweepable=sweepable, **bounds)
    if option.problem(default) is not None:
        raise KnowstackError(f"merge option '{name}': its default {default} is out of its own range", field=name)
    OPTIONS[name] = option
    return option


# The options several methods read (each method's own are declared in its module).
declare("density", float, 0.2, "fraction of each task vector kept", gt=0, le=1, sweepable=True)
declare("drop_rate", float, 0.9, "DARE: probability that an entry of a task vector is dropped", ge=0, lt=1,
        sweepable=True)
declare("lambda", float, 1.0, "scale of the merged task vector", attribute="lam", gt=0, sweepable=True)

LORA_SPACES = ("delta", "factors")


class MergeOptions:
    """The knobs of all methods, one attribute per declared option (`lam` for lambda), each its declared default
    unless given and checked against its declared range; each method reads the ones it declares. lora_space: LoRA
    adapters merge their deltas s B A (delta), or their A and B factors apart as PEFT does (factors:
    merge_factors.py, the paper's LoRA TIES / DARE-TIES). Immutable, compared by value."""

    __slots__ = ("_values",)

    def __init__(self, lora_space: str = "delta", **given: Any) -> None:
        by_attribute = {option.field: option for option in OPTIONS.values()}
        unknown = sorted(set(given) - set(by_attribute))
        if unknown:
            raise KnowstackError(f"unknown merge option '{unknown[0]}'", field=unknown[0])
        if lora_space not in LORA_SPACES:
            raise KnowstackError(f"lora_space must be delta or factors, got {lora_space!r}", field="lora_space")
        values: dict[str, Any] = {"lora_space": lora_space}
        for attribute, option in by_attribute.items():
            value = given.get(attribute, option.default)
            problem = option.problem(value)
            if problem is not None:
                raise KnowstackError(problem, field=option.name)
            values[attribute] = option.type(value)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("MergeOptions is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MergeOptions) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return f"MergeOptions({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    @staticmethod
    def attributes() -> tuple[str, ...]:
        """The attributes a MergeOptions has: every declared option's, then lora_space."""
        return (*(option.field for option in OPTIONS.values()), "lora_space")

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> MergeOptions:
        """From a merge step's recorded options (config names: `lambda`, ...); the ones not given keep their
        defaults, and the step's `seed` is not an option of the method but of the merge."""
        given = {(OPTIONS[k].field if k in OPTIONS else k): v for k, v in settings.items() if k != "seed"}
        return cls(**given)

    def value(self, option: str) -> Any:
        """An option by its config name (`lambda` is the attribute `lam`)."""
        return getattr(self, OPTIONS[option].field if option in OPTIONS else option)


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
    options: tuple[str, ...]  # the declared options it reads (config names); "seed" for a random method
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
        names = {option.field: option.name for option in OPTIONS.values()}
        given = {names.get(name, name): value for name, value in given.items()}
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
        if name in METHODS:
            raise KnowstackError(f"merge method '{name}' is registered twice", field="method")
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
