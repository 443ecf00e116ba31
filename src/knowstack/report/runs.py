"""Which results rows belong to which run of a method, and each run's numbers.

A run is what the report compares: the base, one-round FFT (a model per task), sequential LoRA (a model
per stage), O-LoRA at one lambda, one merge, one MoE, joint FFT... Every table, figure and claim reads
its numbers from here, so each is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from knowstack.report.tables import Column, Scores, Values, bwt, mean_or_none, percent_change
from knowstack.results import Row
from knowstack.stats import maximum_of
from knowstack.study.methods import CATALOG

# The paper's two settings, plus the reference points; sequential training is semi-cooperative in the
# paper, but the report gives it its own section as the paper does (Section 4.3, Tables 1-4).
# Each method's section is the catalog's (study/methods/).
SETTINGS = {"base": "base", **{name: method.section for name, method in CATALOG.items()}}
SETTING_ORDER = ["base", "one-round", "sequential", "semi-cooperative", "fully cooperative", "other"]
METHOD_ORDER = ["base", *sorted(CATALOG, key=lambda name: SETTING_ORDER.index(SETTINGS[name]))]
# the sequential methods with a regulariser, one run per lambda (the run's variant), as the report names them
REGULARISED = {"ewc": "EWC", "lwf": "LwF"}
MERGE_NAMES = {"average": "average", "task-average": "task-average", "ties": "TIES", "dare": "DARE",
               "ties-dare": "TIES-DARE"}


def finetune_name(finetune: str) -> str:
    return {"fft": "FFT", "lora": "LoRA"}.get(finetune, finetune)


@dataclass
class Run:
    """The models of one run of one method, in stage order (one model unless staged or one-round)."""

    method: str
    finetune: str
    variant: str  # O-LoRA: the lambda tag; merge: the merge method; moe: what follows moe-<finetune>
    point: str = ""  # a sweep point ('lr=0.001'); '' for the method's own setting
    models: list[Row] = field(default_factory=list)

    @property
    def family(self) -> str:
        """`method/finetune[/variant]`: the run at any of its settings."""
        return "/".join(p for p in (self.method, self.finetune, self.variant) if p) or self.method

    @property
    def key(self) -> str:
        """`method/finetune[/variant][@point]`: what claims and tests select runs by."""
        return f"{self.family}@{self.point}" if self.point else self.family

    @property
    def staged(self) -> bool:
        return any(r.stage is not None for r in self.models)

    @property
    def per_task(self) -> bool:
        return self.method == "one-round"

    @property
    def setting(self) -> str:
        return SETTINGS.get(self.method, "other")

    @property
    def label(self) -> str:
        if self.method == "base":
            return "base"
        return f"{self.method_label} @ {self.point}" if self.point else self.method_label

    @property
    def method_label(self) -> str:
        """The label without the sweep point: 'sequential FFT', 'O-LoRA λ=0.5'."""
        ft = finetune_name(self.finetune)
        if self.method == "olora":
            return f"O-LoRA λ={self.variant.replace('_', ',')}"
        if self.method in REGULARISED:
            return f"{REGULARISED[self.method]} {ft} λ={self.variant}"
        if self.method == "merge":
            return f"merge {MERGE_NAMES.get(self.variant, self.variant)} {ft}"
        if self.method == "moe":
            return f"MoE {ft}" + (f" {self.variant}" if self.variant else "")
        return f"{self.method} {ft}".strip() + (f" {self.variant}" if self.variant else "")

    @property
    def final(self) -> Row:
        return self.models[-1]

    @property
    def lambda_value(self) -> float | None:
        """O-LoRA, EWC, LwF: the mean of its per-round lambdas, to order runs from weak to strong regularisation."""
        try:
            values = [float(v) for v in self.variant.split("_")]
        except ValueError:
            return None
        return sum(values) / len(values) if values else None


def find_runs(scores: Scores) -> list[Run]:
    """Every run in the results, in the report's method order, then in order of appearance."""
    runs: dict[tuple[str, str, str, str], Run] = {}
    for row in _first_rows(scores.rows):
        key = (row.method, row.finetune, _variant(row), row.point)
        runs.setdefault(key, Run(*key)).models.append(row)
    for run in runs.values():
        run.models.sort(key=lambda r: r.stage or 0)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(runs.values(), key=lambda r: (rank.get(r.method, len(rank)), r.finetune != "fft"))


def _first_rows(rows: list[Row]) -> list[Row]:
    seen: dict[str, Row] = {}
    for row in rows:
        seen.setdefault(row.model, row)
    return list(seen.values())


def _variant(row: Row) -> str:
    """What tells runs of one method and finetune apart, from the model name the plan gives (before the
    sweep point's '@...')."""
    name = row.model.partition("@")[0]
    if row.stage is not None:
        name = name.removesuffix(f"-{row.stage}")
    prefix = f"{row.method}-{row.finetune}"
    if row.method == "one-round" or row.method == "base":
        return ""
    if row.method == "merge":
        return name.removeprefix("merge-").removesuffix(f"-{row.finetune}")
    if name.startswith(prefix):
        return name.removeprefix(prefix).lstrip("-")
    return name if row.stage is None and row.method not in METHOD_ORDER else ""


def run_values(scores: Scores, run: Run) -> Values:
    """The run's score per column: its final model's; one-round: each task by the model trained on it,
    old knowledge averaged over the one-round models (the paper's Fig. 2 and upper bound in Fig. 4)."""
    if not run.per_task:
        return scores.values(run.final.model)
    own = {r.trained_on: r.model for r in run.models}
    values: Values = {c: scores.value(own[c[1]], c) if c[1] in own else None for c in scores.new_columns}
    for column in scores.old_columns:
        values[column] = mean_or_none([scores.value(r.model, column) for r in run.models])
    return values


def run_averages(scores: Scores, run: Run) -> dict[str, float | None]:
    return scores.averages_of(run_values(scores, run))


def gains_from_base(scores: Scores, values: Values) -> Values:
    base = scores.values("base")
    return {c: percent_change(base.get(c), v) for c, v in values.items()}


def average_gains(scores: Scores, run: Run) -> dict[str, float | None]:
    base = scores.averages("base")
    return {k: percent_change(base[k], v) for k, v in run_averages(scores, run).items()}


def own_round_models(run: Run) -> dict[str, str]:
    """task -> the model right after the round that trained on it."""
    return {r.trained_on: r.model for r in run.models}


def acquisition(scores: Scores, run: Run) -> Values:
    """Each task's score right after its own round: the diagonal of R[stage][task] (Fig. 5)."""
    own = own_round_models(run)
    return {c: scores.value(own[c[1]], c) if c[1] in own else None for c in scores.new_columns}


def backward_transfer(scores: Scores, run: Run) -> dict[Column, float | str | None]:
    """BWT per new column; "—" where the task was trained in the last round (or not at all)."""
    own, final = own_round_models(run), run.final.model
    out: dict[Column, float | str | None] = {}
    for column in scores.new_columns:
        model = own.get(column[1])
        out[column] = "—" if model is None or model == final else bwt(scores.value(model, column),
                                                                        scores.value(final, column))
    return out


def _trained_at(run: Run) -> dict[str, int]:
    """task -> the 0-based index in run.models of the round that trained on it (the i of R[i][task])."""
    return {r.trained_on: i for i, r in enumerate(run.models)}


def forward_transfer(scores: Scores, run: Run) -> dict[Column, float | str | None]:
    """FWT per new column (Lopez-Paz & Ranzato 2017, GEM): the task's score just before its own round (after the
    round before it) minus the base's score on it, in score units. "—" for the first round's task (its model
    before is the base: 0 by definition, GEM's sum starts at the second task) and for tasks not trained."""
    at, base = _trained_at(run), scores.values("base")
    out: dict[Column, float | str | None] = {}
    for column in scores.new_columns:
        i = at.get(column[1])
        if i is None or i == 0:
            out[column] = "—"
            continue
        before, reference = scores.value(run.models[i - 1].model, column), base.get(column)
        out[column] = None if before is None or reference is None else before - reference
    return out


def forgetting(scores: Scores, run: Run) -> dict[Column, float | str | None]:
    """Forgetting per new column (Chaudhry et al. 2018): the task's best score after any round before the last
    minus its score after the last, in score units (negative where the last round scores it higher than any
    earlier). Unlike BWT it starts from the best earlier score, not the score right after the task's own round.
    "—" for the last round's task and tasks not trained."""
    at, final = _trained_at(run), run.final.model
    out: dict[Column, float | str | None] = {}
    for column in scores.new_columns:
        i = at.get(column[1])
        if i is None or i == len(run.models) - 1:
            out[column] = "—"
            continue
        earlier = [scores.value(m.model, column) for m in run.models[:-1]]
        last = scores.value(final, column)
        out[column] = None if last is None or any(v is None for v in earlier) else maximum_of(earlier) - last
    return out


def average_incremental(scores: Scores, run: Run) -> float | None:
    """Average incremental score (Rebuffi et al. 2017's average incremental accuracy, on each task's own
    metric): after each round t, the mean over the columns of the tasks trained in rounds 1..t; then the mean
    over rounds. Missing when any of those scores is."""
    at = _trained_at(run)
    per_round = []
    for t, model in enumerate(run.models):
        columns = [c for c in scores.new_columns if at.get(c[1], len(run.models)) <= t]
        per_round.append(mean_or_none([scores.value(model.model, c) for c in columns]) if columns else None)
    return mean_or_none(per_round) if per_round else None


def mean_defined(values: list[float | str | None]) -> float | None:
    """The mean of the numbers among `values` (BWT is undefined for the last round's task)."""
    numbers = [v for v in values if isinstance(v, float | int)]
    return sum(numbers) / len(numbers) if numbers else None


def stages_done(run: Run, rounds: int) -> str:
    """'' for a complete run, else what it has: 'rounds 1-3 of 7' or, one-round, '3 of 7 tasks'."""
    if len(run.models) >= rounds or not (run.staged or run.per_task):
        return ""
    if run.per_task:
        return f"{len(run.models)} of {rounds} tasks"
    return f"rounds {run.models[0].stage}-{run.final.stage} of {rounds}"
