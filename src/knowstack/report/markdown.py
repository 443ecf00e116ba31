"""report.md: the base, one-round and sequential results as the paper's tables show them."""

from __future__ import annotations

from pathlib import Path

from knowstack.atomic import atomic_write_text
from knowstack.report.tables import (
    Column,
    Scores,
    bwt,
    column_label,
    fmt_percent,
    fmt_score,
    markdown_table,
    percent_change,
)
from knowstack.study.results import Row

NOTE = (
    "Gain from base is the percent change from the base model; it is n/a where the base scores 0. "
    "BWT is the percent change of a task's score from right after its own round to after the last "
    "round. AVE averages the old-knowledge columns, AVnew the new-knowledge columns (math with and "
    "without chain of thought are two columns), AVall all of them together; all are computed from "
    "the per-task values above."
)


def _score_row(scores: Scores, model: str, label: str, columns: list[Column], averages: list[str]) -> list[str]:
    avg = scores.averages(model)
    return [label, *(fmt_score(scores.value(model, c)) for c in columns), *(fmt_score(avg[a]) for a in averages)]


def _gain_row(scores: Scores, base: str, model: str, columns: list[Column], averages: list[str]) -> list[str]:
    base_avg, avg = scores.averages(base), scores.averages(model)
    cells = [fmt_percent(percent_change(scores.value(base, c), scores.value(model, c))) for c in columns]
    return ["gain from base", *cells, *(fmt_percent(percent_change(base_avg[a], avg[a])) for a in averages)]


def base_section(scores: Scores) -> str:
    cols = scores.new_columns + scores.old_columns
    header = ["model", *(column_label(c, cols) for c in cols), "AVE", "AVnew", "AVall"]
    return "## Base model\n\n" + markdown_table(header, [_score_row(scores, "base", "base", cols, ["AVE", "AVnew", "AVall"])])


def one_round_section(scores: Scores) -> str:
    parts = ["## One-round training (each model trained from the base on one task)"]
    by_task = {}
    for finetune in ("fft", "lora"):
        for row in scores.models_where("one-round", finetune):
            by_task.setdefault(row.trained_on, {})[finetune] = row.model
    if not by_task:
        return ""
    header = ["task", "metric", "base", "FFT", "LoRA", "FFT gain", "LoRA gain"]
    lines = []
    for column in scores.new_columns:
        models = by_task.get(column[1], {})
        base = scores.value("base", column)
        fft, lora = (scores.value(models[f], column) if f in models else None for f in ("fft", "lora"))
        lines.append([column[1], column[2], fmt_score(base), fmt_score(fft), fmt_score(lora),
                      fmt_percent(percent_change(base, fft)), fmt_percent(percent_change(base, lora))])
    parts.append("New knowledge: each task's score after one round of training on it (Fig. 1 analog).\n\n"
                 + markdown_table(header, lines))
    old_lines = []
    for column in scores.old_columns:
        base = scores.value("base", column)
        cells = [column[1], fmt_score(base)]
        for finetune in ("fft", "lora"):
            values = [scores.value(m[finetune], column) for m in by_task.values() if finetune in m]
            avg = sum(values) / len(values) if values and None not in values else None
            cells += [fmt_score(avg), fmt_percent(percent_change(base, avg))]
        old_lines.append(cells)
    parts.append("Old knowledge averaged over the one-round models (Fig. 2 analog).\n\n"
                 + markdown_table(["old task", "base", "FFT mean", "FFT change", "LoRA mean", "LoRA change"], old_lines))
    return "\n\n".join(parts)


def sequential_section(scores: Scores, finetune: str) -> str:
    stages = sorted(scores.models_where("sequential", finetune), key=lambda r: r.stage or 0)
    if not stages:
        return ""
    name = finetune.upper() if finetune == "fft" else "LoRA"
    order = ", ".join(f"{r.stage} {r.trained_on}" for r in stages)
    old, new = scores.old_columns, scores.new_columns
    old_rows = [_score_row(scores, "base", "base", old, ["AVE"])]
    old_rows += [_score_row(scores, r.model, f"{name} 1-{r.stage}", old, ["AVE"]) for r in stages]
    old_rows.append(_gain_row(scores, "base", stages[-1].model, old, ["AVE"]))
    new_rows = [_score_row(scores, "base", "base", new, ["AVnew"])]
    new_rows += [_score_row(scores, r.model, f"{name} 1-{r.stage}", new, ["AVnew"]) for r in stages]
    new_rows.append(_gain_row(scores, "base", stages[-1].model, new, ["AVnew"]))
    new_rows.append(_bwt_row(scores, stages, new))
    return "\n\n".join([
        f"## Sequential {name} (rounds in order: {order})",
        f"Old knowledge after each stage (Table {1 if finetune == 'fft' else 2} analog).\n\n"
        + markdown_table(["stage", *(column_label(c, old) for c in old), "AVE"], old_rows),
        f"New knowledge after each stage, R[stage][task] (Table {3 if finetune == 'fft' else 4} analog).\n\n"
        + markdown_table(["stage", *(column_label(c, new) for c in new), "AVnew"], new_rows),
    ])


def _bwt_row(scores: Scores, stages: list[Row], columns: list[Column]) -> list[str]:
    final = stages[-1]
    own_stage = {r.trained_on: r.model for r in stages}
    cells = []
    for column in columns:
        own = own_stage.get(column[1])
        if own is None or own == final.model:
            cells.append("—")
        else:
            cells.append(fmt_percent(bwt(scores.value(own, column), scores.value(final.model, column))))
    return ["BWT", *cells, ""]


def summary_section(scores: Scores) -> str:
    header = ["model", "method", "finetune", "AVE (old)", "AVnew", "AVall"]
    lines = []
    final_stage: dict[str, str] = {}
    for finetune in ("fft", "lora"):
        stages = scores.models_where("sequential", finetune)
        if stages:
            final_stage[finetune] = max(stages, key=lambda r: r.stage or 0).model
    for model in ["base", *final_stage.values()]:
        avg = scores.averages(model)
        row = next(r for r in scores.rows if r.model == model)
        lines.append([model, row.method, row.finetune or "—", *(fmt_score(avg[k]) for k in ("AVE", "AVnew", "AVall"))])
    return "## Summary\n\n" + markdown_table(header, lines)


def render_report(rows: list[Row], *, title: str, task_order: list[str], old_metric: str = "acc") -> str:
    scores = Scores.from_rows(rows, task_order, old_metric)
    sections = [f"# knowstack study: {title}", NOTE, summary_section(scores), base_section(scores),
                one_round_section(scores), sequential_section(scores, "fft"), sequential_section(scores, "lora")]
    return "\n\n".join(s for s in sections if s) + "\n"


def figures_section(scores: Scores, out: Path) -> str:
    from knowstack.report.figures import write_figures

    figures = write_figures(scores, out)
    if not figures:
        return ""
    links = [f"### {caption}\n\n![{caption}]({path.relative_to(out).as_posix()})" for caption, path in figures.items()]
    return "## Figures\n\n" + "\n\n".join(links)


def write_report(rows: list[Row], out: Path, *, title: str, task_order: list[str], old_metric: str = "acc") -> Path:
    path = Path(out) / "report.md"
    text = render_report(rows, title=title, task_order=task_order, old_metric=old_metric)
    figures = figures_section(Scores.from_rows(rows, task_order, old_metric), Path(out))
    atomic_write_text(path, text + ("\n" + figures + "\n" if figures else ""))
    return path
