"""`knowstack registry list`: the base and the contributions, read back from the records alone."""

from __future__ import annotations

from typing import Any

from knowstack.registry.core import Registry

COLUMNS = ("name", "kind", "task", "metric", "score", "keep-data", "author", "hash")


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


def format_listing(reg: Registry) -> str:
    records = reg.versions()
    base = reg.base()
    rows = [contribution_row(r) for r in records if r["method"] == "contribution"]
    lines = [f"registry: {reg.root}", *_base_lines(base), f"contributions: {len(rows)}"]
    if rows:
        widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
        for row in [COLUMNS, *rows]:
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
