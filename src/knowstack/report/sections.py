"""The report as a tree of sections (one per setting) holding paragraphs, tables and figures; markdown.py
and html.py only render this tree, so report.md and report.html say the same thing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from knowstack.report.advice import advice_table
from knowstack.report.claims import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NO_SIGNAL,
    UNMEASURED,
    baselines_table,
    claims_table,
    verdict_counts,
)
from knowstack.report.figures import FigureSpec
from knowstack.report.frontier import (
    FULLY_COOPERATIVE,
    families,
    frontier_family,
    gained,
    left_out,
    pareto_front,
)
from knowstack.report.run_tables import (
    Context,
    continual_table,
    cost_table,
    diagonal_table,
    penalty_table,
    runs_table,
    stage_table,
    summary_table,
)
from knowstack.report.runs import (
    METHOD_ORDER,
    SETTINGS,
    Run,
    finetune_name,
    stages_done,
)
from knowstack.report.tables import AVERAGES, Scores, Table, TableRow, fmt_percent, fmt_score

NEW_UNIT = "score (0-1, each task's own metric)"
GAIN_UNIT = "gain from base (%)"
AVERAGES_AXIS = "average: AVE (old knowledge), AVnew (new), AVall (both)"
OLD_AXIS = "old-knowledge task; average"
NOTE = (
    "Gain from base is the percent change from the base model; it is n/a where the base scores 0. "
    "BWT is the percent change of a task's score from right after its own round to after the last "
    "round; FWT (forward transfer) is a task's score just before its own round minus the base's, forgetting its best "
    "score after any round before the last minus its score after the last, both in score units. AVE averages the old-knowledge columns, AVnew the new-knowledge columns (math with and "
    "without chain of thought are two columns), AVall all of them together; all are computed from "
    "the per-task values. A one-round run scores each task with the model trained on it and averages "
    "old knowledge over those models (the paper's upper bound). Numbers in brackets are 95% intervals: a seeded "
    "percentile bootstrap over the test items (with several training seeds, seeds are drawn first, then items, so "
    "the interval covers both); two numbers on the same items are resampled together (paired), so a difference, a "
    "gain from base or a BWT has its own interval. A verdict holds only where the interval of its difference supports "
    "it."
)


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)  # of str (a paragraph), list[str] (bullets), Table,
    # FigureSpec or Section (a subsection)

    def walk(self) -> Iterator[object]:
        """Every block, depth first."""
        for block in self.blocks:
            yield block
            if isinstance(block, Section):
                yield from block.walk()


Pick = Callable[..., TableRow]  # max or min, over rows by a key
HIGHLIGHTS = (("AVE", "Keeps the most old knowledge", max), ("AVnew", "Learns the most new knowledge", max),
              ("AVall", "Best on old and new together", max), ("AVE", "Loses the most old knowledge", min))


def highlights(ctx: Context, table: Table) -> list[str]:
    """Which run keeps, learns and balances best, read from the summary table's rows (the numbers shown beside
    it): among single models (one-round runs are a model per task), and among all runs where one-round differs.
    Runs with equal numbers as shown are named together; runs left out of every ranking are named with why."""
    runs = {r.key: r for r in ctx.runs}
    rows = [row for row in table.rows if row.key in runs and runs[row.key].method != "base"]
    reasons = {row.key: left_out(ctx.scores, runs[row.key], ctx.rounds) for row in rows}
    ranked = [row for row in rows if not reasons[row.key]]
    single = [row for row in ranked if not runs[row.key].per_task]
    lines = [] if ranked else ["No complete trained run has results yet."]
    for average, text, pick in HIGHLIGHTS if ranked else ():
        column = table.header.index(average if average != "AVE" else "AVE (old)") - 1
        group = single or ranked
        scope = f"among the {len(single)} single-model runs" if single else "among the one-round runs"
        sentence = f"{text} {scope}: {ranking_text(table, group, column, pick, average)}"
        if single and len(ranked) > len(single):
            sentence += one_round_text(table, group, ranked, column, pick, average)
        lines.append(sentence + ".")
    out = {reason: [runs[row.key].label for row in rows if reasons[row.key] == reason]
           for reason in set(reasons.values()) if reason}
    if out:
        lines.append("Left out of these rankings: " + "; ".join(f"{', '.join(labels)} ({reason})"
                                                               for reason, labels in sorted(out.items())) + ".")
    return lines


def one_round_text(table: Table, single: list[TableRow], ranked: list[TableRow], column: int, pick: Pick,
                   average: str) -> str:
    """What the one-round runs add to a ranking of single models: '' where none reaches the best; the one-round
    runs that tie with it; or the best among all runs where a one-round run does better."""
    best, overall = best_rows(single, column, pick), best_rows(ranked, column, pick)
    added = [r for r in overall if r.key not in {b.key for b in best}]
    if not added:
        return ""
    if shown(overall[0].cells[column]) == shown(best[0].cells[column]):
        return f"; {', '.join(r.label for r in added)} (one-round) score the same"
    return f"; among all {len(ranked)} runs incl. one-round: {ranking_text(table, ranked, column, pick, average)}"


def shown(value: float) -> str:
    """A score as its table cell shows it, without its interval: what 'equal' means to a reader."""
    return fmt_score(value).split(" ")[0]


def best_rows(rows: list[TableRow], column: int, pick: Pick) -> list[TableRow]:
    """The rows whose shown value in `column` is the best (several where they tie as shown)."""
    best = pick(rows, key=lambda r: r.cells[column]).cells[column]
    return [r for r in rows if shown(r.cells[column]) == shown(best)]


def ranking_text(table: Table, rows: list[TableRow], column: int, pick: Pick, average: str) -> str:
    """'sequential LoRA (AVE 0.578 [...], -21% [...] vs base)', 'A and B tie (...)', or 'all 4 score AVE 0.000'."""
    best = best_rows(rows, column, pick)
    value, gain = best[0].cells[column], best[0].cells[column + 1]
    base = table.row("base")
    if gain is not None and len(best) == 1:
        change = f", {fmt_percent(gain)} vs base"
    elif gain is None and base is not None and base.cells[column] == 0:
        change = ", gain from base n/a: the base scores 0"
    else:
        change = ""
    if len(best) == len(rows) and len(rows) > 1:
        return f"none stands out, all {len(rows)} score {average} {shown(value)}{change}"
    names = ", ".join(r.label for r in best)
    if len(best) > 1:
        return f"{names} tie ({average} {shown(value)}{change})"
    return f"{names} ({average} {fmt_score(value)}{change})"


PROTOCOL_TEXT = {"paper": "the paper's scoring: TRACE's and RhuiDih/cl's answer reading and metrics, lm-eval's gsm8k "
                          "and gsm8k_cot", "builtin": "knowstack's built-in scoring"}


def protocol_note(scores: Scores) -> str:
    """Which evaluation protocol produced the new-knowledge scores (results' protocol column)."""
    used = sorted({r.protocol for r in scores.rows if r.kind == "new" and r.protocol})
    if not used:
        return ""
    named = "; ".join(f"{name} ({PROTOCOL_TEXT.get(name, name)})" for name in used)
    return f" New-knowledge scores by protocol: {named}." if len(used) > 1 else f" New-knowledge protocol: {named}."


def summary_section(ctx: Context, title: str) -> Section:
    scores = ctx.scores
    counts = verdict_counts(ctx.verdicts)
    runs = f"{len(ctx.runs)} runs" + (" (the base among them)" if ctx.base else "")
    intro = (f"Study '{title}': {len(scores.models)} models evaluated in {runs}, on "
             f"{len({c[1] for c in scores.new_columns})} new-knowledge tasks ({len(scores.new_columns)} columns) "
             f"and {len(scores.old_columns)} old-knowledge tasks ({ctx.old_metric}).")
    if scores.seeds > 1:
        intro += (f" Each trained model was trained with {scores.seeds} seeds: its numbers are means over them, with "
                  "intervals covering seed and item variance.")
    table = summary_table(ctx)
    blocks: list = [intro + protocol_note(scores), highlights(ctx, table),
                    f"The paper's {len(ctx.verdicts)} findings on this study: {counts[HOLDS]} hold, "
                    f"{counts[FAILS]} do not hold, {counts[INCONCLUSIVE]} inconclusive (the 95% interval "
                    f"of the difference covers both), {counts[NO_SIGNAL]} no signal (the scores compared are all 0), "
                    f"{counts[UNMEASURED]} not measured."]
    if ctx.coverage.unfinished:
        blocks.append("Partial study, still to come: " + "; ".join(ctx.coverage.unfinished) + ".")
    if ctx.coverage.absent:
        blocks.append("Not in this study (not measured): " + ", ".join(ctx.coverage.absent) + ".")
    blocks += [table, FigureSpec("summary_tradeoff", "What each run learns against what it forgets: gain from base "
                                 "of AVnew (new knowledge) against AVE (old knowledge); up and right is better",
                                 "Learn vs forget: every run against the base", table,
                                 "new knowledge: AVnew gain from base (%)", kind="scatter", unit="percent",
                                 columns=["AVE gain", "AVnew gain"],
                                 xlabel="old knowledge: AVE gain from base (%)")]
    continual = continual_table(ctx)
    blocks.append(continual if continual.rows else not_measured("staged (sequential, EWC, LwF, O-LoRA, replay)"))
    blocks.append(cost_table(ctx))
    return Section("summary", "Summary", blocks)


def not_measured(what: str) -> str:
    return f"Not measured: this study has no {what} results."


def one_round_section(ctx: Context) -> Section:
    section = Section("one-round", "One-round training (each model trained from the base on one task)")
    runs, new = ctx.of("one-round"), ctx.scores.new_columns
    if not runs:
        section.blocks.append(not_measured("one-round"))
        return section
    fig1 = runs_table("fig1_one_round_new", "New knowledge: each task scored by the model trained on it (Fig. 1 "
                      "analog).", ctx, runs, new, ["AVnew"])
    fig2 = runs_table("fig2_one_round_old", "Old knowledge averaged over the one-round models (Fig. 2 analog).",
                      ctx, runs, ctx.scores.old_columns, ["AVE"])
    section.blocks += [
        fig1, FigureSpec("fig1_one_round_new", "One-round new knowledge per task, FFT vs LoRA vs base (Fig. 1)",
                         "One-round training: new knowledge per task (Fig. 1)", fig1, NEW_UNIT),
        fig2, FigureSpec("fig2_one_round_old", "Old knowledge averaged over the one-round models (Fig. 2)",
                         "One-round training: old knowledge, mean over the models (Fig. 2)", fig2,
                         f"old-knowledge {ctx.old_metric} (0-1)", xlabel=OLD_AXIS),
    ]
    return section


def heat_map(table: Table, run: Run) -> FigureSpec:
    columns = table.header[1:-1]  # the tasks, not the average
    return FigureSpec(f"r_matrix_{run.key.replace('/', '_')}", f"{run.label}: R[stage][task], each task's score "
                      "after each round", f"{run.label}: R[stage][task]", table, "score (0-1)", kind="heatmap",
                      columns=columns)


def rounds_text(run: Run) -> str:
    return ", ".join(f"{m.stage} {m.trained_on}" for m in run.models)


def sequential_section(ctx: Context) -> Section:
    section = Section("sequential", "Sequential training (each round starts from the previous round's model)")
    runs = ctx.of("sequential")
    if not runs:
        section.blocks.append(not_measured("sequential"))
        return section
    scores = ctx.scores
    fig3 = runs_table("fig3_sequential_old", "Old knowledge after the last round (Fig. 3 analog).", ctx, runs,
                      scores.old_columns, ["AVE"])
    fig4 = runs_table("fig4_sequential_new", "New knowledge after the last round, with the one-round models as "
                      "upper bound (Fig. 4 analog).", ctx, runs + ctx.of("one-round"), scores.new_columns,
                      ["AVnew"], gains=False)
    section.blocks += [
        fig3, FigureSpec("fig3_sequential_old", "Old knowledge after the last sequential round (Fig. 3)",
                         "Sequential training: old knowledge after the last round (Fig. 3)", fig3,
                         f"old-knowledge {ctx.old_metric} (0-1)", xlabel=OLD_AXIS),
        fig4, FigureSpec("fig4_sequential_new", "New knowledge after the last sequential round, one-round as upper "
                         "bound (Fig. 4)", "Sequential training: new knowledge after the last round (Fig. 4)", fig4,
                         NEW_UNIT),
    ]
    for run in runs:
        fft = run.finetune == "fft"
        name = finetune_name(run.finetune)
        old = stage_table(ctx, run, f"table{1 if fft else 2}_sequential_{run.finetune}_old",
                          f"Old knowledge after each stage (Table {1 if fft else 2} analog).", scores.old_columns,
                          "AVE")
        new = stage_table(ctx, run, f"table{3 if fft else 4}_sequential_{run.finetune}_new",
                          f"New knowledge after each stage, R[stage][task], with gain from base and BWT (Table "
                          f"{3 if fft else 4} analog).", scores.new_columns, "AVnew")
        partial = stages_done(run, ctx.rounds)
        section.blocks.append(Section(f"sequential-{run.finetune}", f"Sequential {name} (rounds in order: "
                                      f"{rounds_text(run)}{'; partial: ' + partial if partial else ''})",
                                      [old, new, heat_map(new, run)]))
    return section


def baselines_section(ctx: Context) -> Section:
    """EWC and LwF, the classic continual-learning baselines, against plain sequential training and O-LoRA (a study
    with either only: the paper has neither)."""
    section = Section("baselines", "Continual-learning baselines: EWC and LwF (sequential training regularised "
                      "toward the previous round's model)")
    runs = ctx.of("ewc", "lwf")
    finetunes = {r.finetune for r in runs}
    compared = [r for r in ctx.of("sequential") if r.finetune in finetunes] + runs + (
        ctx.of("olora") if "lora" in finetunes else [])
    acquired = diagonal_table(ctx, compared, "baselines_acquisition", "Acquisition: each task's score right after "
                              "its own round, the diagonal of R.", bwt=False)
    kept = diagonal_table(ctx, compared, "baselines_bwt", "Retention: BWT of each task after the last round.",
                          bwt=True)
    section.blocks += [
        "EWC (Kirkpatrick et al. 2017) holds each round near the previous round's model, weighted by the Fisher of "
        "the earlier rounds' data; LwF (Li & Hoiem 2017) distills the previous round's model on the current task. "
        "Both start at round 2 (round 1 is plain sequential training's, shared). The continual table in the summary "
        "has their mean BWT, FWT, forgetting and average incremental score.",
        baselines_table(ctx.baselines), acquired, kept,
        FigureSpec("baselines_bwt", "BWT after the last round: sequential, EWC, LwF and O-LoRA",
                   "Continual-learning baselines: BWT after the last round", kept, "BWT (%)", unit="percent"),
    ]
    for run in runs:
        table = stage_table(ctx, run, f"r_{run.key.replace('/', '_')}", f"{ctx.label(run)}: new knowledge after "
                            "each stage, R[stage][task].", ctx.scores.new_columns, "AVnew")
        section.blocks += [table, heat_map(table, run)]
    return section


def semi_cooperative_section(ctx: Context) -> Section:
    section = Section("semi-cooperative", "Semi-cooperative: O-LoRA, merging and MoE mixing (models kept, data "
                      "gone)")
    runs = ctx.of(*[name for name in METHOD_ORDER if SETTINGS[name] == "semi-cooperative"])
    if not runs:
        section.blocks.append(not_measured("O-LoRA, merge or MoE"))
        return section
    scores, references = ctx.scores, ctx.of("sequential", "one-round")
    fig7 = runs_table("fig7_semi_cooperative", "Averages and their gain from base; sequential and one-round runs "
                      "as references (Fig. 7 analog).", ctx, runs + references, [], list(AVERAGES))
    fig9 = runs_table("fig9_semi_cooperative_new", "Gain from base per new-knowledge task (Fig. 9 analog).", ctx,
                      runs + references, scores.new_columns, ["AVnew"], scores=False)
    fig10 = runs_table("fig10_semi_cooperative_old", "Gain from base per old-knowledge task (Fig. 10 analog).", ctx,
                       runs + references, scores.old_columns, ["AVE"], scores=False)
    section.blocks += [
        fig7, FigureSpec("fig7_semi_cooperative", "Semi-cooperative summary: gain from base, new, old and all "
                         "(Fig. 7)", "Semi-cooperative: gain from base (Fig. 7)", fig7, GAIN_UNIT, unit="percent",
                         xlabel=AVERAGES_AXIS),
        fig9, FigureSpec("fig9_semi_cooperative_new", "Semi-cooperative: gain from base per new task (Fig. 9)",
                         "Semi-cooperative: new knowledge, gain from base per task (Fig. 9)", fig9, GAIN_UNIT,
                         unit="percent"),
        fig10, FigureSpec("fig10_semi_cooperative_old", "Semi-cooperative: gain from base per old task (Fig. 10)",
                          "Semi-cooperative: old knowledge, gain from base per task (Fig. 10)", fig10, GAIN_UNIT,
                          unit="percent", xlabel=OLD_AXIS),
    ]
    if ctx.of("olora"):
        section.blocks.append(olora_section(ctx))
    return section


def olora_section(ctx: Context) -> Section:
    runs = ctx.of("sequential")
    compared = [r for r in runs if r.finetune == "lora"] + ctx.of("olora")
    fig5 = diagonal_table(ctx, compared, "fig5_olora_acquisition", "Acquisition: each task's score right after its "
                          "own round, the diagonal of R (Fig. 5 analog).", bwt=False)
    fig6 = diagonal_table(ctx, compared, "fig6_olora_bwt", "Retention: BWT of each task after the last round "
                          "(Fig. 6 analog).", bwt=True)
    blocks: list = [
        fig5, FigureSpec("fig5_olora_acquisition", "Acquisition right after each round, LoRA vs O-LoRA (Fig. 5)",
                         "LoRA vs O-LoRA: acquisition right after each round (Fig. 5)", fig5,
                         "score right after own round (0-1)"),
        fig6, FigureSpec("fig6_olora_bwt", "BWT after the last round, LoRA vs O-LoRA (Fig. 6)",
                         "LoRA vs O-LoRA: BWT after the last round (Fig. 6)", fig6, "BWT (%)", unit="percent"),
    ]
    penalty = penalty_table(ctx, ctx.of("olora"))
    if penalty:
        blocks.append(penalty)
    for run in ctx.of("olora"):
        table = stage_table(ctx, run, f"r_{run.key.replace('/', '_')}", f"{ctx.label(run)}: new knowledge after "
                            "each stage, R[stage][task].", ctx.scores.new_columns, "AVnew")
        blocks += [table, heat_map(table, run)]
    return Section("olora", "O-LoRA vs LoRA", blocks)


def fully_cooperative_section(ctx: Context) -> Section:
    section = Section("fully-cooperative", "Fully cooperative: sequential, replay, joint (all data kept)")
    if not ctx.of("replay", "joint"):
        section.blocks.append(not_measured("replay or joint"))
        return section
    scores = ctx.scores
    runs = [r for f in ("fft", "lora") for r in ctx.of("sequential", "replay", "joint") if r.finetune == f]
    fig8 = runs_table("fig8_fully_cooperative", "Final models: averages and their gain from base (Fig. 8 analog).",
                      ctx, runs, [], list(AVERAGES))
    table5 = runs_table("table5_fully_cooperative_old", "Old knowledge of the final models (Table 5 analog).", ctx,
                        runs, scores.old_columns, ["AVE"])
    table6 = runs_table("table6_fully_cooperative_new", "New knowledge of the final models, AVall over old and new "
                        "columns together (Table 6 analog, computed from per-task values).", ctx, runs,
                        scores.new_columns, ["AVnew", "AVall"], gains=False)
    section.blocks += [fig8, FigureSpec("fig8_fully_cooperative", "Fully cooperative summary: gain from base "
                                        "(Fig. 8)", "Fully cooperative: gain from base (Fig. 8)", fig8, GAIN_UNIT,
                                        unit="percent", xlabel=AVERAGES_AXIS), table5, table6]
    for run in ctx.of("replay"):
        table = stage_table(ctx, run, f"r_{run.key.replace('/', '_')}", f"{ctx.label(run)}: new knowledge after "
                            "each stage, R[stage][task].", scores.new_columns, "AVnew")
        section.blocks += [table, heat_map(table, run)]
    return section


FRONT_MARK = "✓"


def frontier_table(ctx: Context) -> Table:
    """Every run at every setting measured, with whether it is on its method's front (old and recent)."""
    rows = []
    for family, points in families(gained(ctx.points)).items():
        on_old = {id(p) for p in pareto_front(points)}
        on_recent = {id(p) for p in pareto_front(points, old="bwt")}
        for p in sorted(points, key=lambda p: p.new_gain):
            recent = "" if p.bwt is None else FRONT_MARK if id(p) in on_recent else ""
            rows.append(TableRow(p.run.label, [family, p.setting, p.new_gain, p.old_change, p.bwt,
                                               FRONT_MARK if id(p) in on_old else "", recent],
                                 ["text", "text", "percent", "percent", "percent", "text", "text"], family))
    caption = ("Each method at each setting measured: new knowledge (AVnew) and old knowledge (AVE) as percent "
               "change from the base, and recent knowledge as mean BWT (staged methods); ✓ marks the points on the "
               "method's Pareto front (no other setting of it learns more and loses less).")
    return Table("frontier", caption, ["run", "method", "setting", "AVnew gain", "AVE change", "mean BWT",
                                       "front (old)", "front (recent)"], rows)


def frontier_section(ctx: Context) -> Section:
    section = Section("frontier", "The learn/forget frontier: each method across its settings")
    swept = {frontier_family(p.run) for p in ctx.points if p.run.point or p.run.method == "olora"}
    if not gained(ctx.points):
        section.blocks.append("Not measured: no complete trained run with both averages' gains defined (gains are "
                              "percent of the base's scores, undefined where the base's AVnew or AVE is 0).")
        return section
    if not swept:
        section.blocks.append("No sweeps in this study: each method was measured at one setting, so its front is one "
                              "point (the summary's trade-off plot). Give a method a `sweep:` (e.g. of `lr`) to draw "
                              "its front and compare FFT and LoRA at matched acquisition.")
    table = frontier_table(ctx)
    section.blocks += [
        "Whether a method 'forgets less' depends on its setting: at a higher learning rate every method learns "
        "more and forgets more. Each line joins a method's Pareto front, starting at the base (0, 0): up and "
        "right is better. Compare methods along their fronts, at the same new-knowledge gain.",
        table,
        FigureSpec("frontier_old", "Learn vs forget across settings: AVnew gain against AVE change, each method's "
                   "Pareto front drawn", "The learn/forget frontier: new vs old knowledge", table,
                   "new knowledge: AVnew gain from base (%)", kind="frontier", unit="percent",
                   columns=["AVE change", "AVnew gain", "front (old)"],
                   xlabel="old knowledge: AVE change from base (%)"),
        FigureSpec("frontier_recent", "Learn vs forget recent knowledge: AVnew gain against mean BWT, sequential "
                   "methods", "The learn/forget frontier: new vs recent knowledge (BWT)", table,
                   "new knowledge: AVnew gain from base (%)", kind="frontier", unit="percent",
                   columns=["mean BWT", "AVnew gain", "front (recent)"],
                   xlabel="recent knowledge: mean BWT after the last round (%)"),
    ]
    return section


def advice_section(ctx: Context) -> Section:
    open_points = [p for p in ctx.points if p.run.method in FULLY_COOPERATIVE]
    intro = ("For a limit on how much old knowledge may be lost, the measured setting that learns the most, among the "
             f"complete single-model runs of the methods open to the contributors ({len(open_points)} points of them). Only "
             "measured points are advised; more settings (sweeps) give finer advice.")
    return Section("advice", "Which method to use", [" ".join([intro, *ctx.advice_notes]), advice_table(ctx.points)])


def search_section(ctx: Context) -> Section | None:
    """The search within a forgetting budget (report/search.py), where the study ran one."""
    from knowstack.report.search import search_sections

    if not ctx.searches:
        return None
    return Section("search", "Search: the composition that learns the most within the forgetting budget",
                   search_sections(ctx.scores, ctx.runs, ctx.searches))


def build_sections(ctx: Context, title: str) -> list[Section]:
    base = Section("base", "Base model", [runs_table("base", "The base model on every column.", ctx, [],
                                                     ctx.scores.columns, list(AVERAGES), gains=False)]
                   if ctx.base else [not_measured("base model")])
    claims = Section("claims", "The paper's findings, tested on this study", [claims_table(ctx.verdicts,
                                                                                           ctx.matched)])
    coverage = Section("coverage", "What this study has and lacks", [ctx.coverage.table])
    return [summary_section(ctx, title), advice_section(ctx), claims, frontier_section(ctx), base,
            one_round_section(ctx), sequential_section(ctx), *([baselines_section(ctx)] if ctx.of("ewc", "lwf") else []),
            semi_cooperative_section(ctx), *filter(None, [search_section(ctx)]), fully_cooperative_section(ctx),
            coverage, Section("notes", "Definitions", [NOTE])]
