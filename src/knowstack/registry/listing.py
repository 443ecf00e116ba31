"""`knowstack registry list`: the base, the contributions and the composed versions, from the records alone; and
the one way every registry view (list, log, show, diff, the page) writes a score, a change and an average, so
that the same field reads the same wherever it is shown."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from knowstack.registry.core import Registry, composed, registry_protocol
from knowstack.registry.evaluate import (
    RegisteredTask,
    new_average,
    new_scores,
    old_average,
    own_score,
    registered_tasks,
)

COLUMNS = ("name", "kind", "task", "metric", "score", "keep-data", "author", "hash")
VERSION_COLUMNS = ("name", "status", "method", "kind", "built on", "contributions", "AVE", "AVnew")


def number(value: float | None) -> str:
    """A score or an average: three decimals; '-' where there is none (see `unscored` for why an AVnew has none)."""
    return f"{value:.3f}" if value is not None else "-"


def change(value: float | None, reference: float | None) -> str:
    """value - reference, and the change in percent of the reference where it is not 0."""
    if value is None or reference is None:
        return "-"
    relative = f" ({100 * (value - reference) / reference:+.1f}%)" if reference else ""
    return f"{value - reference:+.3f}{relative}"


def status(record: dict[str, Any]) -> str:
    """released / rejected, and "released (forced)" for a version released by --force-release over its gate."""
    return record["status"] + (" (forced)" if (record["settings"].get("gate") or {}).get("forced") else "")


def averages(record: dict[str, Any], tasks: dict[str, RegisteredTask]) -> tuple[float | None, float | None]:
    """(AVE, AVnew) of a record: AVnew only where it was scored on every registered task."""
    return old_average(record["scores"]), new_average(record["scores"], tasks)


def unscored(record: dict[str, Any], tasks: dict[str, RegisteredTask]) -> list[str]:
    """The registered tasks a record has no score on (contributed after it was made): why its AVnew is '-'."""
    scored = new_scores(record["scores"], tasks)
    return [name for name in tasks if name not in scored]


def avnew_note(records: Sequence[dict[str, Any]], tasks: dict[str, RegisteredTask]) -> str | None:
    """The line under a table that shows '-' for some version's AVnew, saying which tasks it lacks."""
    lacking = {r["name"]: unscored(r, tasks) for r in records if r["method"] != "contribution"}
    lacking = {name: missing for name, missing in lacking.items() if missing}
    if not lacking:
        return None
    return ("AVnew '-': not scored on every registered task (tasks contributed after it was made): "
            + "; ".join(f"{name} lacks {', '.join(missing)}" for name, missing in lacking.items()))


def built_on(record: dict[str, Any], contributions: Collection[str] = ()) -> str:
    """What a version was built on: the release named by --from, else the base (the base: '-'). Its gate records it;
    in older records, it is the parent that is not one of `contributions`."""
    if record["method"] == "base":
        return "-"
    if record["method"] == "contribution":
        return "base"
    against = (record["settings"].get("gate") or {}).get("against")
    return against or next((p for p in record["parents"] if p not in contributions), "base")


def contributions_of(record: dict[str, Any], contributions: Collection[str] = ()) -> list[str]:
    """The contributions a version was composed from (a contribution: itself)."""
    if record["method"] == "contribution":
        return [record["name"]]
    start = built_on(record, contributions)
    return [p for p in record["parents"] if p != start]


def contribution_names(records: Sequence[dict[str, Any]]) -> set[str]:
    return {r["name"] for r in records if r["method"] == "contribution"}


def _base_lines(base: dict[str, Any], tasks: dict[str, RegisteredTask]) -> list[str]:
    arch = base["settings"].get("architecture", {})
    shape = ", ".join(f"{key} {arch[key]}" for key in ("num_hidden_layers", "hidden_size") if key in arch)
    kinds = "/".join(arch.get("architectures") or [arch.get("model_type", "?")])
    lines = [f"base: {base['content_hash'][:12]}  {kinds} ({shape}, {arch.get('parameters', 0) / 1e6:.2f}M "
             f"parameters)  from {base['settings'].get('source', '?')}"]
    old = [s for s in base["scores"] if s["kind"] == "old"]
    if old:
        lines.append("  old knowledge: " + ", ".join(f"{s['task']} {s['metric']}={number(s['value'])}" for s in old))
    ave, avnew = averages(base, tasks)
    lines.append(f"  old AVE {number(ave)}   new AVnew {number(avnew)}")
    return lines


def contribution_row(record: dict[str, Any], protocol: str) -> tuple[str, ...]:
    score = own_score(record, protocol)
    return (record["name"], record["kind"], record["task"] or "-", record["metric"] or "-",
            number(score["value"] if score else None), "yes" if record["keep_data"] else "no",
            record["author"] or "-", record["content_hash"][:12])


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, each line indented by two."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def version_row(record: dict[str, Any], tasks: dict[str, RegisteredTask], contributions: set[str]
                ) -> tuple[str, ...]:
    ave, avnew = averages(record, tasks)
    return (record["name"], status(record), record["method"], record["kind"],
            built_on(record, contributions), ", ".join(contributions_of(record, contributions)) or "-",
            number(ave), number(avnew))


def format_listing(reg: Registry) -> str:
    records = reg.versions()
    tasks = registered_tasks(records)
    protocol = registry_protocol(records)
    rows = [contribution_row(r, protocol) for r in records if r["method"] == "contribution"]
    # its protocol, as init printed it: every score below is made so (docs/registry.md)
    lines = [f"registry: {reg.label}  protocol {protocol}", *_base_lines(reg.base(), tasks),
             f"contributions: {len(rows)}"]
    if rows:
        lines += text_table(COLUMNS, rows)
    names = contribution_names(records)
    versions = composed(records)
    if versions:
        lines += [f"composed versions: {len(versions)}",
                  *text_table(VERSION_COLUMNS, [version_row(r, tasks, names) for r in versions])]
        note = avnew_note(versions, tasks)
        if note:
            lines.append(f"  {note}")
    return "\n".join(lines)
