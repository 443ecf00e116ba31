"""The search's section: its trace (every trial's eval score and held-out old-knowledge loss against the budget),
the chosen point, and whether the searched composition beats the study's best merge within the budget, read from
the intervals of the test scores (paired: both models on the same test items, stats.py), never set by hand."""

from __future__ import annotations

from typing import Any

from knowstack.report.claims import FAILS, HOLDS, INCONCLUSIVE
from knowstack.report.figures import FigureSpec
from knowstack.report.runs import Run, finetune_name, run_averages
from knowstack.report.tables import Scores, Table, TableRow, fmt_percent, fmt_score
from knowstack.stats import interval_of


def point_text(point: dict[str, Any]) -> str:
    """'ties, lambda 0.86, density 0.48, weights 0.68/0.49/0.90'."""
    parts = [point["method"]]
    parts += [f"{name} {point[name]:.3g}" for name in ("lambda", "density") if name in point]
    if point.get("weights"):
        parts.append("weights " + "/".join(f"{w:.2f}" for w in point["weights"]))
    return ", ".join(parts)


def trace_table(model: str, record: dict[str, Any]) -> Table:
    """One row per trial: its eval score, held-out old AVE and loss (%), within the budget or not, its point."""
    table = Table(f"search-trace-{model}", f"{model}: every trial of the search, in order (eval splits and old "
                  f"knowledge's held-out slice only; budget: old-knowledge loss at most {record['max_old_loss']:g}% "
                  f"of the base's held-out AVE {record['base_old']:.3f}).",
                  ["trial", "eval score", "old held-out loss (%)", "within budget", "point"])
    for trial in record["trials"]:
        mark = " (chosen)" if trial["number"] == record["chosen"] else ""
        # the label is the trial's number, counted from 1: the figure's x too (figures.search_trace)
        table.rows.append(TableRow(f"{trial['number'] + 1}{mark}", [trial["new"], trial["old_loss"],
                                                                     "yes" if trial["within"] else "no",
                                                                     point_text(trial["point"])],
                                   unit=["score", "percent", "text", "text"], key=model))
    return table


def best_merge(scores: Scores, runs: list[Run], finetune: str) -> Run | None:
    """The study's merge of this finetune with the highest new-knowledge average (AVnew) on test: the strongest
    of the paper's methods the search is held against (picked on test, which favours it, not the search)."""
    merges = [r for r in runs if r.method == "merge" and r.finetune == finetune]
    measured = [(run_averages(scores, r).get("AVnew"), r) for r in merges]
    measured = [(value, r) for value, r in measured if value is not None]
    return max(measured, key=lambda pair: float(pair[0]))[1] if measured else None


def verdict(gain: Any, old_loss: Any, budget: float) -> str:
    """holds: the whole interval of the AVnew difference is above 0 and of the old loss within the budget; does not
    hold: the difference's is below 0 or the loss's beyond the budget; inconclusive otherwise (or without
    intervals: the point values cannot tell)."""
    gain_ci, loss_ci = interval_of(gain), interval_of(old_loss)
    if gain_ci is None or loss_ci is None:
        return INCONCLUSIVE
    if gain_ci[1] < 0 or loss_ci[0] > budget:
        return FAILS
    if gain_ci[0] > 0 and loss_ci[1] <= budget:
        return HOLDS
    return INCONCLUSIVE


def comparison(scores: Scores, runs: list[Run], model: str, record: dict[str, Any]) -> tuple[Table, str]:
    """The chosen point on test against the study's best merge and the base: AVnew, AVE, the old loss (% of the
    base's AVE) with their intervals, and the verdict."""
    searched = next((r for r in runs if r.final.model == model), None)
    table = Table(f"search-test-{model}", f"{model} on test (never seen by the search) against the study's best merge "
                  "and the base; 95% intervals, paired on the same items.",
                  ["model", "AVnew", "AVE", "old loss vs base (%)"])
    base = scores.averages("base")
    if searched is None or base.get("AVE") is None:
        return table, f"{model} is not evaluated on test yet."

    def row(label: str, run: Run) -> tuple[Any, Any]:
        averages = run_averages(scores, run)
        loss = (base["AVE"] - averages["AVE"]) / base["AVE"] * 100 if averages.get("AVE") is not None else None
        table.rows.append(TableRow(label, [averages.get("AVnew"), averages.get("AVE"), loss],
                                   unit=["score", "score", "percent"], key=run.key))
        return averages.get("AVnew"), loss

    new, loss = row(model, searched)
    rival = best_merge(scores, runs, searched.finetune)
    if rival is None:
        return table, f"No merge of {finetune_name(searched.finetune)} models in this study to compare with."
    rival_new, _ = row(rival.label, rival)
    table.rows.append(TableRow("base", [base.get("AVnew"), base.get("AVE"), 0.0], unit=["score", "score", "percent"],
                               key="base"))
    gain = new - rival_new if new is not None and rival_new is not None else None
    said = verdict(gain, loss, record["max_old_loss"])
    text = (f"Does the searched composition beat the study's best merge ({rival.label}) within the "
            f"{record['max_old_loss']:g}% old-knowledge budget on test? **{said}**: AVnew difference "
            f"{fmt_score(gain)}, old loss {fmt_percent(loss)} of the base's AVE.")
    return table, text


def search_sections(scores: Scores, runs: list[Run], searches: dict[str, dict]) -> list[Any]:
    """Per searched model: the chosen point, the trace (table and figure with the budget line), the test
    comparison and its verdict."""
    blocks: list[Any] = []
    for model, record in searches.items():
        chosen = next((t for t in record["trials"] if t["number"] == record["chosen"]), None)
        within = sum(t["within"] for t in record["trials"])
        head = (f"{model}: {len(record['trials'])} trials ({record['optimiser']}, seed {record['seed']}) over "
                f"{', '.join(record['methods'])}; {within} within the budget. ")
        head += (f"Chosen: trial {chosen['number'] + 1}, {point_text(chosen['point'])} (eval score "
                 f"{chosen['new']:.3f}, held-out old loss {chosen['old_loss']:.1f}%)." if chosen else
                 "No trial was within the budget: the base is kept.")
        trace = trace_table(model, record)
        figure = FigureSpec(f"search-{model}", f"{model}: each trial's held-out old-knowledge loss (the dashed line is "
                            "the budget) and eval score.", f"Search trace: {model}", trace, "eval score",
                            kind="search", columns=["trial", "eval score", "old held-out loss (%)"],
                            xlabel="trial", budget=record["max_old_loss"])
        table, text = comparison(scores, runs, model, record)
        blocks += [head, trace, figure, text, table]
    return blocks
