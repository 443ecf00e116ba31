"""Reading a registry's history: `knowstack log` (lineage, newest first), `show` (one version in full) and
`diff` (two versions task by task), all from the records alone: nothing is loaded or re-measured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from knowstack.registry.core import Registry
from knowstack.registry.evaluate import (
    RegisteredTask,
    new_average,
    new_scores,
    old_average,
    old_scores,
    registered_tasks,
)
from knowstack.registry.listing import text_table


def _number(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _change(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return "-"
    relative = f" ({100 * (value - reference) / reference:+.1f}%)" if reference else ""
    return f"{value - reference:+.3f}{relative}"


def _check_interval(check: dict[str, Any]) -> str:
    """A gate check's difference (version - reference) and its paired 95% interval, as recorded."""
    difference = check["value"] - check["reference"]
    if check.get("ci_low") is None or check.get("ci_high") is None:
        return f"difference {difference:+.3f}, no interval"
    return f"difference {difference:+.3f} [{check['ci_low']:+.3f}, {check['ci_high']:+.3f}]"


def _averages(record: dict[str, Any], tasks: dict[str, RegisteredTask]) -> tuple[float | None, float | None]:
    return old_average(record["scores"]), new_average(record["scores"], tasks)


def _summary_line(record: dict[str, Any], base: dict[str, Any], tasks: dict[str, RegisteredTask]) -> str:
    ave, avnew = _averages(record, tasks)
    base_ave, base_avnew = _averages(base, tasks)
    return (f"old AVE {_number(ave)} (vs base {_change(ave, base_ave)})   "
            f"new AVnew {_number(avnew)} (vs base {_change(avnew, base_avnew)})")


def format_log(reg: Registry) -> str:
    """Every version, newest first, like `git log --graph` without the graph: what it came from and how it scores."""
    records = reg.versions()
    tasks = registered_tasks(records)
    base = reg.base()
    lines = []
    for record in reversed(records):
        method = record["method"]
        head = f"{record['name']}  [{record['status']}]  {method}  {record['kind']}  {record['created_at']}"
        if record["author"]:
            head += f"  by {record['author']}"
        lines.append(head)
        if method == "contribution":
            own = next((s for s in record["scores"] if s["task"] == record["task"]), None)
            lines.append(f"    task {record['task']} ({record['metric']}): {_number(own['value'] if own else None)}"
                         f"   data kept: {'yes' if record['keep_data'] else 'no'}   {record['content_hash'][:12]}")
        elif method == "base":
            ave, avnew = _averages(record, tasks)
            lines.append(f"    {record['content_hash'][:12]}   old AVE {_number(ave)}   new AVnew {_number(avnew)}")
        else:
            parents = record["parents"]
            previous = record["settings"].get("previous")
            lines.append(f"    from {len(parents)}: {', '.join(parents)}"
                         + (f"   previous release: {previous}" if previous else ""))
            lines.append(f"    {_summary_line(record, base, tasks)}")
            gate = record["settings"].get("gate") or {}
            for failure in gate.get("failed", []):
                lines.append(f"    gate: {failure}")
            for noise in gate.get("within_noise", []):
                lines.append(f"    gate: {noise}")
            intervals = [c for c in gate.get("checks", []) if c.get("ci_low") is not None]
            if intervals and not gate.get("failed") and not gate.get("within_noise"):
                widest = max(intervals, key=lambda c: c["ci_high"] - c["ci_low"])
                lines.append(f"    gate: passed; {len(intervals)} of {len(gate['checks'])} checks with a paired 95% "
                             f"interval, the widest {_check_interval(widest)} ({widest['what']})")
        lines.append("")
    return "\n".join(lines).rstrip()


def _score_rows(record: dict[str, Any], base: dict[str, Any], tasks: dict[str, RegisteredTask],
                specialists: dict[str, float]) -> list[tuple[str, ...]]:
    mine, theirs = new_scores(record["scores"], tasks), new_scores(base["scores"], tasks)
    rows = []
    for name, task in tasks.items():
        value, specialist = mine.get(name), specialists.get(name)
        kept = "-" if value is None or not specialist else (
            f"{100 * value / specialist:.0f}%" if value <= 10 * specialist else ">10x")
        rows.append((f"new {name}", task.score_metric, _number(value), _number(theirs.get(name)),
                     _change(value, theirs.get(name)), _number(specialist), kept))
    base_old = old_scores(base["scores"])
    for (task, metric), value in old_scores(record["scores"]).items():
        reference = base_old.get((task, metric))
        rows.append((f"old {task}", metric, _number(value), _number(reference), _change(value, reference), "", ""))
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
    lines = [f"version {record['name']}  [{record['status']}]", f"  kind:     {record['kind']}",
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
    gate = settings.get("gate")
    if gate:
        verdict = "passed" if gate["passed"] else "FAILED"
        slack = f" or -{gate['task_slack']:g} points" if gate.get("task_slack") else ""
        lines.append(f"  gate:     {verdict} (old -{gate['old_limit_pct']:g}%, tasks -{gate['task_limit_pct']:g}%{slack})")
        lines += [f"    {'ok   ' if c['passed'] else 'FAIL '}{c['what']}: {c['value']:.3f} vs {c['reference_version']} "
                  f"{c['reference']:.3f} (floor {c['floor']:.3f}; {_check_interval(c)})"
                  + (" below the floor within the noise" if c["passed"] and c["value"] < c["floor"] - 1e-9 else "")
                  for c in gate["checks"]]
        if gate.get("note"):
            lines.append(f"    {gate['note']}")
    ave, avnew = _averages(record, tasks)
    lines.append(f"  scores:   AVE {_number(ave)}, AVnew {_number(avnew)}")
    rows = _score_rows(record, base, tasks, specialist_scores(records, tasks))
    if rows:
        lines += text_table(("score", "metric", "value", "base", "vs base", "specialist", "kept"), rows)
    lines.append(f"  files:    {len(record['files'])} ({', '.join(sorted(record['files'])[:6])}"
                 f"{', ...' if len(record['files']) > 6 else ''})")
    return "\n".join(lines)


def diff_rows(a: dict[str, Any], b: dict[str, Any], tasks: dict[str, RegisteredTask]) -> list[tuple[str, ...]]:
    """(score, metric, A, B, B - A) for every new task, AVnew, every old-knowledge score and AVE."""
    new_a, new_b = new_scores(a["scores"], tasks), new_scores(b["scores"], tasks)
    rows = [(f"new {name}", task.score_metric, _number(new_a.get(name)), _number(new_b.get(name)),
             _change(new_b.get(name), new_a.get(name))) for name, task in tasks.items()]
    (ave_a, avnew_a), (ave_b, avnew_b) = _averages(a, tasks), _averages(b, tasks)
    rows.append(("AVnew", "", _number(avnew_a), _number(avnew_b), _change(avnew_b, avnew_a)))
    old_a, old_b = old_scores(a["scores"]), old_scores(b["scores"])
    for task, metric in sorted(set(old_a) | set(old_b)):
        va, vb = old_a.get((task, metric)), old_b.get((task, metric))
        rows.append((f"old {task}", metric, _number(va), _number(vb), _change(vb, va)))
    rows.append(("AVE", "", _number(ave_a), _number(ave_b), _change(ave_b, ave_a)))
    return rows


def format_diff(reg: Registry, first: str, second: str) -> str:
    records = reg.versions()
    a, b, tasks = reg.version(first), reg.version(second), registered_tasks(records)
    lines = [f"{first} [{a['status']}, {a['method']}]  ->  {second} [{b['status']}, {b['method']}]"]
    added = [p for p in b["parents"] if p not in a["parents"]]
    removed = [p for p in a["parents"] if p not in b["parents"]]
    if added or removed:
        lines.append(f"  contributions: +{', +'.join(added) if added else ' none'}; "
                     f"-{', -'.join(removed) if removed else ' none'}")
    options_a, options_b = a["settings"].get("options") or {}, b["settings"].get("options") or {}
    changed = [f"{k}: {options_a.get(k, '-')} -> {options_b.get(k, '-')}" for k in sorted(set(options_a) | set(options_b))
               if options_a.get(k) != options_b.get(k)]
    if changed and a["method"] == b["method"]:
        lines.append("  settings: " + "; ".join(changed))
    lines += text_table(("score", "metric", first, second, f"{second} - {first}"), diff_rows(a, b, tasks))
    return "\n".join(lines)
