"""The report's tables about runs: rows of scores and of gains from base per run, a staged run after each
round (the paper's Tables 1-4), the diagonal of R and BWT (Fig. 5-6), the summary. Figures draw from these."""

from __future__ import annotations

from dataclasses import dataclass, field

from knowstack.report.claims import Verdict
from knowstack.report.coverage import Coverage
from knowstack.report.frontier import TradeOff
from knowstack.report.runs import (
    Run,
    acquisition,
    average_gains,
    average_incremental,
    backward_transfer,
    finetune_name,
    forgetting,
    forward_transfer,
    gains_from_base,
    mean_defined,
    run_averages,
    run_values,
    stages_done,
)
from knowstack.report.tables import AVERAGES, GAIN_SUFFIX, Column, Scores, Table, TableRow, column_label
from knowstack.results import Cost


@dataclass
class Context:
    """Everything a section reads: the scores, their runs (each method at its own setting; sweep points are
    in `points`), and what was computed about them once."""

    scores: Scores
    runs: list[Run]
    rounds: int
    old_metric: str
    penalties: dict[str, dict]
    verdicts: list[Verdict]
    coverage: Coverage
    points: list[TradeOff]  # every run at every setting measured (sweeps included): the fronts and the advice
    matched: dict[str, Verdict] | None = None  # with sweeps: FFT-vs-LoRA claims along the fronts
    costs: list[Cost] = field(default_factory=list)  # what each model cost to make (costs.csv), where measured
    advice_notes: list[str] = field(default_factory=list)  # what the advice leaves out and why
    searches: dict[str, dict] = field(default_factory=dict)  # searched model -> its search's record (study.json)
    baselines: list[Verdict] = field(default_factory=list)  # EWC and LwF against sequential and O-LoRA (BASELINES)

    def of(self, *methods: str) -> list[Run]:
        return [r for m in methods for r in self.runs if r.method == m]

    @property
    def base(self) -> list[Run]:
        return self.of("base")

    def label(self, run: Run) -> str:
        """The run's name, saying so when it is partial (a study still running, or cut short) or combines
        only some tasks' models (the paper's FFT-MoE had 4 of its 7 experts)."""
        partial = stages_done(run, self.rounds)
        combined = run.final.trained_on.split("+") if "+" in run.final.trained_on else []
        if not partial and combined and len(combined) < self.rounds:
            partial = f"{len(combined)} of {self.rounds} tasks: {', '.join(combined)}"
        return f"{run.label} ({partial})" if partial else run.label


def score_row(ctx: Context, run: Run, columns: list[Column], averages: list[str]) -> TableRow:
    values, avg = run_values(ctx.scores, run), run_averages(ctx.scores, run)
    return TableRow(ctx.label(run), [*(values[c] for c in columns), *(avg[a] for a in averages)], "score", run.key)


def gain_row(ctx: Context, run: Run, columns: list[Column], averages: list[str]) -> TableRow:
    gains, avg = gains_from_base(ctx.scores, run_values(ctx.scores, run)), average_gains(ctx.scores, run)
    return TableRow(f"{ctx.label(run)}{GAIN_SUFFIX}", [*(gains[c] for c in columns), *(avg[a] for a in averages)],
                    "percent", run.key)


def runs_table(key: str, caption: str, ctx: Context, runs: list[Run], columns: list[Column],
               averages: list[str], *, scores: bool = True, gains: bool = True) -> Table:
    """Rows of scores (base first) and then of gains from base, one per run; columns, then averages."""
    header = ["model", *(column_label(c, columns) for c in columns), *averages]
    rows = [score_row(ctx, r, columns, averages) for r in (ctx.base + runs if scores else [])]
    rows += [gain_row(ctx, r, columns, averages) for r in (runs if gains else [])]
    return Table(key, caption, header, rows)


def stage_label(run: Run, row_stage: int, trained_on: str) -> str:
    name = finetune_name(run.finetune) if run.method == "sequential" else run.label
    return f"{name} {'1' if row_stage == 1 else f'1-{row_stage}'} ({trained_on})"


def stage_table(ctx: Context, run: Run, key: str, caption: str, columns: list[Column], average: str) -> Table:
    """A staged run after each round (R[stage][task] for new knowledge), with gain-from-base and BWT rows."""
    scores = ctx.scores
    rows = [score_row(ctx, b, columns, [average]) for b in ctx.base]
    for m in run.models:
        values, avg = scores.values(m.model), scores.averages(m.model)
        rows.append(TableRow(stage_label(run, m.stage or 0, m.trained_on),
                             [*(values[c] for c in columns), avg[average]], "score", run.key))
    final = scores.values(run.final.model)
    gains, avg_gain = gains_from_base(scores, final), average_gains(ctx.scores, run)
    rows.append(TableRow("gain from base", [*(gains[c] for c in columns), avg_gain[average]], "percent", run.key))
    if columns == scores.new_columns:
        transfer = backward_transfer(scores, run)
        rows.append(TableRow("BWT", [*(transfer[c] for c in columns), ""], "percent", run.key))
        ahead, forgot = forward_transfer(scores, run), forgetting(scores, run)
        rows.append(TableRow("FWT", [*(ahead[c] for c in columns), ""], "delta", run.key))
        rows.append(TableRow("forgetting", [*(forgot[c] for c in columns), ""], "delta", run.key))
    return Table(key, caption, ["stage", *(column_label(c, columns) for c in columns), average], rows)


def diagonal_table(ctx: Context, runs: list[Run], key: str, caption: str, bwt: bool) -> Table:
    """Per task: the score right after its own round (Fig. 5) or its BWT after the last round (Fig. 6)."""
    columns = ctx.scores.new_columns
    rows = []
    for run in runs:
        got = backward_transfer(ctx.scores, run) if bwt else acquisition(ctx.scores, run)
        cells = [got[c] for c in columns]
        rows.append(TableRow(ctx.label(run), [*cells, mean_defined(cells)], "percent" if bwt else "score", run.key))
    return Table(key, caption, ["model", *(column_label(c, columns) for c in columns), "mean"], rows)


def continual_table(ctx: Context) -> Table:
    """Every staged run's continual-learning numbers, each a mean over the new-knowledge columns where defined."""
    header = ["run", "key", "mean BWT", "mean FWT", "mean forgetting", "average incremental score"]
    units = ["text", "percent", "delta", "delta", "score"]
    rows = []
    for run in (r for r in ctx.runs if r.staged):
        cells = [run.key, mean_defined(list(backward_transfer(ctx.scores, run).values())),
                 mean_defined(list(forward_transfer(ctx.scores, run).values())),
                 mean_defined(list(forgetting(ctx.scores, run).values())), average_incremental(ctx.scores, run)]
        rows.append(TableRow(ctx.label(run), cells, units, run.key))
    caption = ("Continual learning, per staged run (sequential, EWC, LwF, O-LoRA, replay, continual merging), over the new-knowledge columns: "
               "mean BWT (% change from right after each task's round to after the last); mean FWT (GEM: each "
               "task's score just before its own round minus the base's, tasks 2..T); mean forgetting (Chaudhry et "
               "al.: each task's best score after rounds 1..T-1 minus its score after the last, tasks 1..T-1); "
               "average incremental score (after each round, the mean over the tasks trained so far; then the mean "
               "over rounds). FWT and forgetting are in score units (0-1), BWT in percent.")
    return Table("continual", caption, header, rows)


def penalty_table(ctx: Context, runs: list[Run]) -> Table | None:
    stages = sorted({m.stage for r in runs for m in r.models if m.model in ctx.penalties})
    if not stages:
        return None
    rows = []
    for stage in stages:
        cells: list = []
        for run in runs:
            got = next((ctx.penalties[m.model] for m in run.models if m.stage == stage and m.model in ctx.penalties),
                       None)
            cells.append(f"{got['first']:.4g} → {got['last']:.4g}" if got else "—")
        rows.append(TableRow(str(stage), cells, "text"))
    caption = ("Orthogonality penalty sum |A_t A_prev^T| at the first → last step of each round (unweighted; "
               "round 1 has no earlier adapter).")
    return Table("olora_penalty", caption, ["round", *(r.label for r in runs)], rows)


def summary_table(ctx: Context) -> Table:
    header = ["run", "setting", "key", "AVE (old)", "AVE gain", "AVnew", "AVnew gain", "AVall", "AVall gain",
              "status"]
    units = ["text", "text", "score", "percent", "score", "percent", "score", "percent", "text"]
    status = {row.key: row.cells[-1] for row in ctx.coverage.table.rows}
    rows = []
    for run in ctx.runs:
        avg, gain = run_averages(ctx.scores, run), average_gains(ctx.scores, run)
        cells = [run.setting, run.key, *(x for a in AVERAGES for x in (avg[a], gain[a])), status.get(run.key, "")]
        rows.append(TableRow(ctx.label(run), cells, units, run.key))
    caption = ("Every run in the results: its averages and their gain from the base. Sequential runs are scored "
               "after their last round; one-round runs are a model per task.")
    return Table("summary", caption, header, rows)


NOT_MEASURED = "not measured"
MIB = 1024 * 1024
ADDED = ("steps", "train_seconds", "seconds", "examples", "disk_bytes")  # summed over a one-round run's models
PEAKS = ("peak_host_bytes", "peak_gpu_bytes")  # the largest


def _over_seeds(costs: list[Cost]) -> dict[str, float | None] | None:
    """One model's cost: the mean over its seeds of each sum, the largest peak; None where it has none."""
    if not costs:
        return None
    out: dict[str, float | None] = {}
    for name in ADDED + PEAKS:
        values = [getattr(c, name) for c in costs]
        present = [v for v in values if v is not None]
        out[name] = None if len(present) < len(values) else max(present) if name in PEAKS else sum(present) / len(
            present)
    out["process_scope"] = float(any(c.peak_host_scope == "process" for c in costs))
    return out


def run_cost(ctx: Context, run: Run) -> dict[str, float | None] | None:
    """A run's cost: its last model's (a staged run's last stage counts every round and merge before it), or, for
    one-round runs, the sum over its models (peaks: the largest). None where any of its models has no record."""
    by_model: dict[str, list[Cost]] = {}
    for cost in ctx.costs:
        by_model.setdefault(cost.model, []).append(cost)
    models = [m.model for m in run.models] if run.per_task else [run.final.model]
    each = [_over_seeds(by_model.get(m, [])) for m in models]
    if any(c is None for c in each):
        return None
    total: dict[str, float | None] = {}
    for name in ADDED + PEAKS + ("process_scope",):
        values = [c[name] for c in each]  # type: ignore[index]
        present = [v for v in values if v is not None]
        total[name] = None if len(present) < len(values) or not present else (
            sum(present) if name in ADDED else max(present))
    return total


def _cost_cells(cost: dict[str, float | None] | None) -> list[str | float | None]:
    if cost is None:
        return [NOT_MEASURED] * 7

    def shown(name: str, scale: float = 1.0, digits: int = 1) -> str | float:
        value = cost.get(name)
        return NOT_MEASURED if value is None else round(value / scale, digits)

    host = shown("peak_host_bytes", MIB)
    gpu = shown("peak_gpu_bytes", MIB) if cost.get("peak_gpu_bytes") is not None else (
        "no GPU" if cost.get("peak_host_bytes") is not None else NOT_MEASURED)
    if isinstance(host, float) and cost.get("process_scope"):
        host = f"≤ {host}"
    steps, examples = cost.get("steps"), cost.get("examples")
    return [NOT_MEASURED if steps is None else round(steps), shown("train_seconds"), shown("seconds"),
            NOT_MEASURED if examples is None else round(examples), host, gpu, shown("disk_bytes", MIB)]


def cost_table(ctx: Context) -> Table:
    """What each run cost to make, from the base."""
    header = ["run", "key", "steps", "train seconds", "wall seconds", "examples seen", "peak host memory (MiB)",
              "peak GPU memory (MiB)", "disk (MiB)"]
    rows = [TableRow(ctx.label(run), [run.key, *_cost_cells(run_cost(ctx, run))], "text", run.key)
            for run in ctx.runs if run.method != "base"]
    caption = ("What each run cost to make from the base (costs.csv per model): its model-making steps (train, "
               "merge of an adapter, merge, MoE), the seconds of their training loops and their wall seconds, the "
               "training examples drawn, the largest peak host memory (RSS) and GPU memory (torch's peak allocation) "
               "of those steps, and the disk of the artifact evaluated. A staged run counts every round and merge up "
               "to its last stage; a merge or MoE counts the training of the models it combines; a one-round run sums "
               "its models (a shared step, such as round 1 of O-LoRA and replay, counts for each run that uses it). "
               "With seeds, sums are means over seeds. \"≤\" marks a peak that could not be reset between the steps "
               "of one process (an upper bound); \"not measured\": artifacts made before knowstack recorded costs.")
    return Table("cost", caption, header, rows)
