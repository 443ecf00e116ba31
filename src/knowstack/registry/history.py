"""Reading a registry's history: `knowstack log` (lineage, newest first), `show` (one version in full) and
`diff` (two versions task by task), all from the records alone: nothing is loaded or re-measured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from knowstack.registry.core import Registry, ancestor_contributions, registry_protocol
from knowstack.registry.evaluate import RegisteredTask, new_scores, old_scores, own_score, registered_tasks
from knowstack.registry.gate import HOLDS, gate_summary, recorded_checks
from knowstack.registry.listing import (
    averages,
    avnew_note,
    built_on,
    change,
    contribution_names,
    contributions_of,
    number,
    status,
    text_table,
)


def _summary_line(record: dict[str, Any], base: dict[str, Any], tasks: dict[str, RegisteredTask]) -> str:
    ave, avnew = averages(record, tasks)
    base_ave, base_avnew = averages(base, tasks)
    return (f"old AVE {number(ave)} (vs base {change(ave, base_ave)})   "
            f"new AVnew {number(avnew)} (vs base {change(avnew, base_avnew)})")


def gate_lines(record: dict[str, Any], indent: str = "    ") -> list[str]:
    """The gate as `log` prints it: its summary, then each check that did not hold (failed or inconclusive)."""
    gate = record["settings"].get("gate")
    lines = [f"{indent}gate: {gate_summary(gate, record['settings'])}"]
    if gate:
        lines += [f"{indent}  {check.describe()}" for check in recorded_checks(gate) if check.verdict != HOLDS]
        if gate.get("note"):
            lines.append(f"{indent}  {gate['note']}")
    return lines


def format_log(reg: Registry) -> str:
    """Every version, newest first, like `git log --graph` without the graph: what it came from and how it scores."""
    records = reg.versions()
    tasks = registered_tasks(records)
    protocol = registry_protocol(records)
    names = contribution_names(records)
    base = reg.base()
    lines = []
    for record in reversed(records):
        method = record["method"]
        head = f"{record['name']}  [{status(record)}]  {method}  {record['kind']}  {record['created_at']}"
        if record["author"]:
            head += f"  by {record['author']}"
        lines.append(head)
        if method == "contribution":
            own = own_score(record, protocol)
            lines.append(f"    task {record['task']} ({record['metric']}): {number(own['value'] if own else None)}"
                         f"   data kept: {'yes' if record['keep_data'] else 'no'}   {record['content_hash'][:12]}")
        elif method == "base":
            ave, avnew = averages(record, tasks)
            lines.append(f"    {record['content_hash'][:12]}   old AVE {number(ave)}   new AVnew {number(avnew)}")
        else:
            used = contributions_of(record, names)
            lines.append(f"    built on {built_on(record, names)} with {len(used)} "
                         f"contribution{'s' if len(used) != 1 else ''}: {', '.join(used)}")
            lines.append(f"    {_summary_line(record, base, tasks)}")
            lines += gate_lines(record)
        lines.append("")
    note = avnew_note(records, tasks)
    return "\n".join(lines).rstrip() + (f"\n\n{note}" if note else "")


def _score_rows(record: dict[str, Any], base: dict[str, Any], tasks: dict[str, RegisteredTask],
                specialists: dict[str, float]) -> list[tuple[str, ...]]:
    mine, theirs = new_scores(record["scores"], tasks), new_scores(base["scores"], tasks)
    rows = []
    for name, task in tasks.items():
        value, specialist = mine.get(name), specialists.get(name)
        kept = "-" if value is None or not specialist else (
            f"{100 * value / specialist:.0f}%" if value <= 10 * specialist else ">10x")
        rows.append((f"new {name}", task.score_metric, number(value), number(theirs.get(name)),
                     change(value, theirs.get(name)), number(specialist), kept))
    base_old = old_scores(base["scores"])
    for (task, metric), value in old_scores(record["scores"]).items():
        reference = base_old.get((task, metric))
        rows.append((f"old {task}", metric, number(value), number(reference), change(value, reference), "", ""))
    return rows


def specialist_scores(records: Sequence[dict[str, Any]], tasks: dict[str, RegisteredTask]) -> dict[str, float]:
    """Each task's best contribution score on its own task: what one specialist model reaches."""
    best: dict[str, float] = {}
    for record in records:
        if record["method"] == "contribution":
            for task, value in new_scores(record["scores"], tasks).items():
                best[task] = max(value, best.get(task, value))
    return best


def format_show(reg: Registry, name: str) -> str:
    records = reg.versions()
    record, base, tasks = reg.version(name), reg.base(), registered_tasks(records)
    lines = [f"version {record['name']}  [{status(record)}]", f"  kind:     {record['kind']}",
             f"  method:   {record['method']}", f"  created:  {record['created_at']}",
             f"  author:   {record['author'] or '-'}", f"  hash:     {record['content_hash']}",
             f"  parents:  {', '.join(record['parents']) or '-'}"]
    settings = record["settings"]
    if settings.get("options"):
        lines.append("  settings: " + ", ".join(f"{k}={v}" for k, v in settings["options"].items()))
    if record["method"] == "contribution":
        splits = ", ".join(f"{split} {entry['n']}" for split, entry in record["task_files"].items())
        source = settings.get("metric_source")  # what defined the metric; older records do not say
        metric = f"{record['metric']} from {source}" if source else record["metric"]
        lines.append(f"  task:     {record['task']} ({record['task_format']}, {metric}; {splits})")
        if settings.get("extracted_lora"):
            lines.append(f"  as LoRA:  {extraction_text(settings)}")
    if record["method"] not in ("base", "contribution"):
        names = contribution_names(records)
        lines.append(f"  built on: {built_on(record, names)}, with {', '.join(contributions_of(record, names))}")
        if settings.get("search"):
            lines.append(f"  search:   {search_text(settings['search'])}")
        gate = settings.get("gate")
        lines.append(f"  gate:     {gate_summary(gate, settings)}")
        lines += [f"    {check.describe()}" for check in recorded_checks(gate or {})]
        if gate and gate.get("note"):
            lines.append(f"    {gate['note']}")
    ave, avnew = averages(record, tasks)
    lines.append(f"  scores:   AVE {number(ave)}, AVnew {number(avnew)}")
    note = avnew_note([record], tasks)
    if note:
        lines.append(f"            {note}")
    rows = _score_rows(record, base, tasks, specialist_scores(records, tasks))
    if rows:
        lines += text_table(("score", "metric", "value", "base", "vs base", "specialist", "kept"), rows)
    lines.append(f"  files:    {len(record['files'])} ({', '.join(sorted(record['files'])[:6])}"
                 f"{', ...' if len(record['files']) > 6 else ''})")
    return "\n".join(lines)


def extraction_text(settings: dict[str, Any]) -> str:
    """What `contribute --as-lora` kept of the full fine-tune, from a contribution's settings: 'rank 8, extracted
    from FT: 96.6% of its targets' delta, 39.4% of the whole delta kept'."""
    extracted = settings["extracted_lora"]
    return (f"rank {extracted['rank']}, extracted from {settings.get('source', '-')}: {extracted['explained']:.1%} "
            f"of its targets' delta, {extracted['explained_of_whole_delta']:.1%} of the whole delta kept")


def search_text(search: dict[str, Any]) -> str:
    """A searched version's chosen point and its scores (trials counted from 1, as the report's search section
    counts them), or that no trial kept within the budget (the base kept)."""
    from knowstack.report.search import point_text

    trials, budget = search["trials"], search["max_old_loss"]
    chosen = next((t for t in trials if t["number"] == search["chosen"]), None)
    if chosen is None:
        return f"none of {len(trials)} trials within the {budget:g}% budget: the base kept"
    return (f"trial {chosen['number'] + 1} of {len(trials)} chosen: {point_text(chosen['point'])}; eval score "
            f"{chosen['new']:.3f}, held-out old loss {chosen['old_loss']:.1f}% (budget {budget:g}%)")


def diff_rows(a: dict[str, Any], b: dict[str, Any], tasks: dict[str, RegisteredTask]) -> list[tuple[str, ...]]:
    """(score, metric, A, B, B - A) for every new task, AVnew, every old-knowledge score and AVE."""
    new_a, new_b = new_scores(a["scores"], tasks), new_scores(b["scores"], tasks)
    rows = [(f"new {name}", task.score_metric, number(new_a.get(name)), number(new_b.get(name)),
             change(new_b.get(name), new_a.get(name))) for name, task in tasks.items()]
    (ave_a, avnew_a), (ave_b, avnew_b) = averages(a, tasks), averages(b, tasks)
    rows.append(("AVnew", "", number(avnew_a), number(avnew_b), change(avnew_b, avnew_a)))
    old_a, old_b = old_scores(a["scores"]), old_scores(b["scores"])
    for task, metric in sorted(set(old_a) | set(old_b)):
        va, vb = old_a.get((task, metric)), old_b.get((task, metric))
        rows.append((f"old {task}", metric, number(va), number(vb), change(vb, va)))
    rows.append(("AVE", "", number(ave_a), number(ave_b), change(ave_b, ave_a)))
    return rows


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


def lineage_changes(records: Sequence[dict[str, Any]], a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs in what two versions were made from, in words: what each was built on, and which contributions
    (its own and those of the releases it was built on) the second adds and leaves out."""
    contributions = contribution_names(records)
    lines = []
    on_a, on_b = built_on(a, contributions), built_on(b, contributions)
    if on_a != on_b:
        lines.append(f"  built on: {on_a} -> {on_b}")
    used_a, used_b = ([r["name"] for r in ancestor_contributions(records, v["name"])] for v in (a, b))
    added = [name for name in used_b if name not in used_a]
    removed = [name for name in used_a if name not in used_b]
    if added or removed:
        lines.append(f"  contributions added: {_listed(added)}; left out: {_listed(removed)}")
    else:
        lines.append(f"  contributions: the same ({_listed(used_a)})")
    return lines


def format_diff(reg: Registry, first: str, second: str) -> str:
    records = reg.versions()
    a, b, tasks = reg.version(first), reg.version(second), registered_tasks(records)
    lines = [f"{first} [{status(a)}, {a['method']}]  ->  {second} [{status(b)}, {b['method']}]",
             *lineage_changes(records, a, b)]
    options_a, options_b = a["settings"].get("options") or {}, b["settings"].get("options") or {}
    changed = [f"{k}: {options_a.get(k, '-')} -> {options_b.get(k, '-')}" for k in sorted(set(options_a) | set(options_b))
               if options_a.get(k) != options_b.get(k)]
    if changed and a["method"] == b["method"]:
        lines.append("  settings: " + "; ".join(changed))
    lines += text_table(("score", "metric", first, second, f"{second} - {first}"), diff_rows(a, b, tasks))
    note = avnew_note([a, b], tasks)
    return "\n".join(lines + ([f"  {note}"] if note else []))
