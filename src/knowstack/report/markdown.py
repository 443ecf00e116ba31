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


def _by_stage(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: r.stage or 0)


def _diagonal_row(scores: Scores, label: str, stages: list[Row], columns: list[Column]) -> list[str]:
    """A task's score right after its own round: the diagonal of R[stage][task]."""
    own = {r.trained_on: r.model for r in stages}
    return [label, *(fmt_score(scores.value(own[c[1]], c)) if c[1] in own else "—" for c in columns)]


def olora_section(scores: Scores, penalties: dict[str, dict] | None = None) -> str:
    """O-LoRA at each lambda beside sequential LoRA: acquisition, BWT, and the penalty per round."""
    runs: dict[str, list[Row]] = {}
    for row in scores.models_where("olora", "lora"):
        runs.setdefault(row.model.removeprefix("olora-lora-").rsplit("-", 1)[0], []).append(row)
    if not runs:
        return ""
    lora = _by_stage(scores.models_where("sequential", "lora"))
    series = ([("LoRA", lora)] if lora else []) + [(f"O-LoRA λ={tag}", _by_stage(r)) for tag, r in runs.items()]
    new = scores.new_columns
    header = ["model", *(column_label(c, new) for c in new)]
    acquisition = [_diagonal_row(scores, label, stages, new) for label, stages in series]
    retention = [[label, *_bwt_row(scores, stages, new)[1:-1]] for label, stages in series]
    parts = [
        "## O-LoRA vs LoRA",
        "Acquisition: each task's score right after its own round, the diagonal of R (Fig. 5 analog).\n\n"
        + markdown_table(header, acquisition),
        "Retention: BWT of each task after the last round (Fig. 6 analog).\n\n" + markdown_table(header, retention),
    ]
    penalty = _penalty_table(runs, penalties or {})
    if penalty:
        parts.append("Orthogonality penalty `sum |A_t A_prev^T|` at the first → last step of each round "
                     "(unweighted; round 1 has no earlier adapter).\n\n" + penalty)
    return "\n\n".join(parts)


def _penalty_table(runs: dict[str, list[Row]], penalties: dict[str, dict]) -> str:
    stages = sorted({r.stage for rows in runs.values() for r in rows if r.model in penalties})
    if not stages:
        return ""
    lines = []
    for stage in stages:
        cells = [str(stage)]
        for rows in runs.values():
            got = next((penalties[r.model] for r in rows if r.stage == stage and r.model in penalties), None)
            cells.append(f"{got['first']:.4g} → {got['last']:.4g}" if got else "—")
        lines.append(cells)
    return markdown_table(["round", *(f"O-LoRA λ={tag}" for tag in runs)], lines)


def fully_cooperative_section(scores: Scores) -> str:
    """The final model of sequential, replay and joint training, FFT and LoRA (Fig. 8, Tables 5-6)."""
    if not (scores.models_where("replay", "fft") or scores.models_where("replay", "lora")
            or scores.models_where("joint", "fft") or scores.models_where("joint", "lora")):
        return ""
    finals = [("base", "base")]
    for method in ("sequential", "replay", "joint"):
        for finetune in ("fft", "lora"):
            stages = _by_stage(scores.models_where(method, finetune))
            if stages:
                finals.append((f"{method} {'FFT' if finetune == 'fft' else 'LoRA'}", stages[-1].model))
    old, new = scores.old_columns, scores.new_columns
    base_ave = scores.averages("base")["AVE"]
    old_rows = [[*_score_row(scores, model, label, old, ["AVE"]),
                 fmt_percent(percent_change(base_ave, scores.averages(model)["AVE"]))] for label, model in finals]
    new_rows = [_score_row(scores, model, label, new, ["AVnew", "AVall"]) for label, model in finals]
    return "\n\n".join([
        "## Fully cooperative: sequential, replay, joint (final models)",
        "Old knowledge, and the change of its average from the base (Table 5, Fig. 8 analog).\n\n"
        + markdown_table(["model", *(column_label(c, old) for c in old), "AVE", "AVE change"], old_rows),
        "New knowledge, with AVall over old and new columns together (Table 6, Fig. 8 analog).\n\n"
        + markdown_table(["model", *(column_label(c, new) for c in new), "AVnew", "AVall"], new_rows),
    ])


def merge_section(scores: Scores) -> str:
    """Merged one-round models beside one-round training itself: gain from base (Fig. 7, 9-10 analog)."""
    series = [(r.model.removeprefix("merge-"), _model_values(scores, r.model))
              for f in ("fft", "lora") for r in scores.models_where("merge", f)]
    if not series:
        return ""
    for finetune in ("fft", "lora"):
        reference = _one_round_values(scores, finetune)
        if reference:
            series.append((f"one-round {finetune} (own model per task)", reference))
    new, old = scores.new_columns, scores.old_columns
    base = _model_values(scores, "base")
    summary = []
    for label, values in [("base", base), *series]:
        cells = [label]
        for columns in (new, old, new + old):
            before, after = _mean_of(base, columns), _mean_of(values, columns)
            cells += [fmt_score(after), fmt_percent(percent_change(before, after))]
        summary.append(cells)
    gains = [[label, *(fmt_percent(percent_change(base[c], values[c])) for c in new + old)] for label, values in series]
    return "\n\n".join([
        "## Merging the one-round models (semi-cooperative, no data)",
        "Averages and their gain from base (Fig. 7 analog). The one-round rows score each task with the model "
        "trained on it (the upper bound a merge tries to keep) and average old knowledge over those models.\n\n"
        + markdown_table(["model", "AVnew", "gain", "AVE", "gain", "AVall", "gain"], summary),
        "Gain from base per task, new knowledge then old (Fig. 9-10 analog).\n\n"
        + markdown_table(["model", *(column_label(c, new) for c in new), *(column_label(c, old) for c in old)], gains),
    ])


def _model_values(scores: Scores, model: str) -> dict[Column, float | None]:
    return {c: scores.value(model, c) for c in scores.new_columns + scores.old_columns}


def _one_round_values(scores: Scores, finetune: str) -> dict[Column, float | None]:
    own = {r.trained_on: r.model for r in scores.models_where("one-round", finetune)}
    if not own:
        return {}
    values: dict[Column, float | None] = {c: scores.value(own[c[1]], c) if c[1] in own else None
                                          for c in scores.new_columns}
    for column in scores.old_columns:
        values[column] = _mean_of({m: scores.value(m, column) for m in own.values()}, list(own.values()))
    return values


def _mean_of(values: dict, keys: list) -> float | None:
    picked = [values.get(k) for k in keys]
    return None if not picked or None in picked else sum(picked) / len(picked)


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


def render_report(rows: list[Row], *, title: str, task_order: list[str], old_metric: str = "acc",
                  penalties: dict[str, dict] | None = None) -> str:
    scores = Scores.from_rows(rows, task_order, old_metric)
    sections = [f"# knowstack study: {title}", NOTE, summary_section(scores), base_section(scores),
                one_round_section(scores), sequential_section(scores, "fft"), sequential_section(scores, "lora")]
    sections += [olora_section(scores, penalties), fully_cooperative_section(scores)]
    sections.append(merge_section(scores))
    return "\n\n".join(s for s in sections if s) + "\n"


def figures_section(scores: Scores, out: Path) -> str:
    from knowstack.report.figures import write_figures

    figures = write_figures(scores, out)
    if not figures:
        return ""
    links = [f"### {caption}\n\n![{caption}]({path.relative_to(out).as_posix()})" for caption, path in figures.items()]
    return "## Figures\n\n" + "\n\n".join(links)


def write_report(rows: list[Row], out: Path, *, title: str, task_order: list[str], old_metric: str = "acc",
                 penalties: dict[str, dict] | None = None) -> Path:
    path = Path(out) / "report.md"
    text = render_report(rows, title=title, task_order=task_order, old_metric=old_metric, penalties=penalties)
    figures = figures_section(Scores.from_rows(rows, task_order, old_metric), Path(out))
    atomic_write_text(path, text + ("\n" + figures + "\n" if figures else ""))
    return path
