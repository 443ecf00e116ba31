"""`knowstack registry list`: the base, the contributions and the composed versions, from the records alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from knowstack.registry.core import Registry, composed

COLUMNS = ("name", "kind", "task", "metric", "score", "keep-data", "author", "hash")
VERSION_COLUMNS = ("name", "status", "method", "kind", "from", "AVE", "AVnew")


def _base_lines(base: dict[str, Any]) -> list[str]:
    arch = base["settings"].get("architecture", {})
    shape = ", ".join(f"{key} {arch[key]}" for key in ("num_hidden_layers", "hidden_size") if key in arch)
    kinds = "/".join(arch.get("architectures") or [arch.get("model_type", "?")])
    lines = [f"base: {base['content_hash'][:12]}  {kinds} ({shape}, {arch.get('parameters', 0) / 1e6:.2f}M "
             f"parameters)  from {base['settings'].get('source', '?')}"]
    old = [s for s in base["scores"] if s["kind"] == "old"]
    if old:
        lines.append("  old knowledge: " + ", ".join(f"{s['task']} {s['metric']}={s['value']:.3f}" for s in old))
    return lines


def contribution_row(record: dict[str, Any]) -> tuple[str, ...]:
    score = next((s for s in record["scores"] if s["kind"] == "new" and s["task"] == record["task"]), None)
    return (record["name"], record["kind"], record["task"] or "-", record["metric"] or "-",
            f"{score['value']:.3f}" if score else "-", "yes" if record["keep_data"] else "no",
            record["author"] or "-", record["content_hash"][:12])


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart, each line indented by two."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def version_row(record: dict[str, Any], tasks: dict) -> tuple[str, ...]:
    from knowstack.registry.evaluate import new_average, old_average

    ave, avnew = old_average(record["scores"]), new_average(record["scores"], tasks)
    return (record["name"], record["status"], record["method"], record["kind"], str(len(record["parents"])),
            f"{ave:.3f}" if ave is not None else "-", f"{avnew:.3f}" if avnew is not None else "-")


def format_listing(reg: Registry) -> str:
    from knowstack.registry.evaluate import registered_tasks

    records = reg.versions()
    base = reg.base()
    rows = [contribution_row(r) for r in records if r["method"] == "contribution"]
    lines = [f"registry: {reg.label}", *_base_lines(base), f"contributions: {len(rows)}"]
    if rows:
        lines += text_table(COLUMNS, rows)
    tasks = registered_tasks(records)
    versions = [version_row(r, tasks) for r in composed(records)]
    if versions:
        lines += [f"composed versions: {len(versions)}", *text_table(VERSION_COLUMNS, versions)]
    return "\n".join(lines)
