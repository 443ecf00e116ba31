"""`knowstack registry report REG --out DIR`: one self-contained HTML page of a registry's history.

The page holds the lineage graph (every version and what it was made from, as inline SVG), every composed
version on the learn/forget plane with the gate's limit (registry/plot.py, embedded as base64 PNG), each
version's score on every registered task against the base and the task's specialist (its best contribution),
with 95% intervals where a score is a share of items, and each gate check with its numbers. Like the study's
report.html it has no script and fetches nothing. Everything comes from the records: nothing is re-measured.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from knowstack.atomic import atomic_write_text
from knowstack.modelcard import CardScore, score_interval
from knowstack.registry.core import Registry, composed
from knowstack.registry.evaluate import RegisteredTask, registered_tasks
from knowstack.registry.gate import gate_summary, recorded_checks
from knowstack.registry.history import specialist_scores
from knowstack.registry.listing import (
    averages,
    avnew_note,
    built_on,
    change,
    contribution_names,
    contributions_of,
    number,
    status,
)
from knowstack.report.html import STYLE

PAGE_FILE = "registry.html"
STATUS_COLOUR = {"released": "#3b7d3b", "rejected": "#c0392b"}
KIND_FILL = {"base": "#eeeeee", "contribution": "#e3edf7", "composed": "#fff4d6"}
_NODE_W, _NODE_H, _COL_GAP, _ROW_GAP = 170, 46, 80, 14


def write_registry_page(root: str | Path, out: str | Path) -> Path:
    """Write DIR/registry.html for the registry at `root`; returns its path."""
    out = Path(out)
    with Registry.open(root) as reg:
        records = reg.versions()
        plane = _plane_png(reg)
        html = render_page(reg.name, reg.label, records, plane)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PAGE_FILE, html)
    return out / PAGE_FILE


def _plane_png(reg: Registry) -> bytes | None:
    from knowstack.registry.plot import plot_versions

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plane.png"
        points = plot_versions(reg, path)
        return path.read_bytes() if points else None


def render_page(name: str, label: str, records: Sequence[dict[str, Any]], plane_png: bytes | None) -> str:
    tasks = registered_tasks(records)
    base = next(r for r in records if r["kind"] == "base")
    specialists = specialist_scores(records, tasks)
    sections = [
        ("versions", "Versions", _versions_table(records, tasks)),
        ("lineage", "Lineage", _lineage_svg(records)),
        ("plane", "What each version learned and forgot", _plane_html(plane_png, records)),
        *((f"version-{r['name']}", f"{r['name']}: {r['method']} [{status(r)}]",
           _version_html(r, base, tasks, specialists, contribution_names(records)))
          for r in reversed(composed(records))),
    ]
    nav = "".join(f'<a href="#{escape(key)}">{escape(title.split(":")[0])}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{escape(key)}"><h2>{escape(title)}</h2>{html}</section>'
                   for key, title, html in sections)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>knowstack registry: {escape(name)}</title><style>{STYLE}</style></head><body><main>"
            f"<h1>knowstack registry: {escape(name)}</h1><p class=\"note\">{escape(label)}: {len(records)} versions, "
            f"{len(composed(records))} composed, {len(tasks)} registered tasks</p><nav>{nav}</nav>{body}"
            "</main></body></html>\n")


def _change_cell(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return '<td class="num">-</td>'
    delta = value - reference
    css = "neg" if delta < 0 else "pos" if delta > 0 else ""
    return f'<td class="num {css}">{change(value, reference)}</td>'


def _table(header: Sequence[str], rows: Sequence[str], caption: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    caption_html = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return (f'<figure>{caption_html}<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div></figure>")


def _versions_table(records: Sequence[dict[str, Any]], tasks: dict[str, RegisteredTask]) -> str:
    rows = []
    for r in reversed(records):
        what = r["method"] + (f" ({r['task']})" if r.get("task") else "")
        shown = f'<td style="color:{STATUS_COLOUR.get(r["status"], "#000")}">{escape(status(r))}</td>'
        ave, avnew = averages(r, tasks)
        rows.append(f'<tr data-version="{escape(r["name"])}"><td>{escape(r["name"])}</td>{shown}'
                    f"<td>{escape(what)}</td><td>{escape(r['kind'])}</td><td>{escape(', '.join(r['parents']) or '-')}</td>"
                    f'<td class="num">{number(ave)}</td><td class="num">{number(avnew)}</td>'
                    f"<td>{escape(r['created_at'])}</td><td>{escape(r['author'] or '-')}</td>"
                    f"<td><code>{escape(r['content_hash'][:12])}</code></td></tr>")
    note = avnew_note(records, tasks)
    return _table(("version", "status", "method", "kind", "parents", "old AVE", "new AVnew", "created", "author",
                   "sha256"), rows, "Newest first. AVE: mean old-knowledge score; AVnew: mean over the registered "
                                    "tasks (a contribution is scored on its own task only)."
                  + (f" {note}." if note else ""))


# --- the lineage graph ---------------------------------------------------------------------------------
def _node_kind(record: dict[str, Any]) -> str:
    return record["method"] if record["method"] in ("base", "contribution") else "composed"


def lineage_layers(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Each version's column: the base 0, then one more than its furthest parent."""
    by_name = {r["name"]: r for r in records}
    layer: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in layer:
            record = by_name[name]
            sources = [p for p in record["parents"] if p in by_name]
            layer[name] = 1 + max((depth(p) for p in sources), default=-1)
        return layer[name]

    for record in records:
        depth(record["name"])
    return layer


def _lineage_svg(records: Sequence[dict[str, Any]]) -> str:
    layers = lineage_layers(records)
    columns: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        columns.setdefault(layers[record["name"]], []).append(record)
    rows = max(len(c) for c in columns.values())
    width = len(columns) * (_NODE_W + _COL_GAP) - _COL_GAP + 20
    height = rows * (_NODE_H + _ROW_GAP) + 20
    where: dict[str, tuple[float, float]] = {}
    for col, members in columns.items():
        offset = (height - len(members) * (_NODE_H + _ROW_GAP)) / 2
        for row, record in enumerate(members):
            where[record["name"]] = (10 + col * (_NODE_W + _COL_GAP), offset + row * (_NODE_H + _ROW_GAP))
    edges, nodes = [], []
    for record in records:
        x, y = where[record["name"]]
        for source in (p for p in record["parents"] if p in where):
            sx, sy = where[source]
            edges.append(f'<line x1="{sx + _NODE_W:.0f}" y1="{sy + _NODE_H / 2:.0f}" x2="{x:.0f}" '
                         f'y2="{y + _NODE_H / 2:.0f}" stroke="#888" stroke-width="1.2" marker-end="url(#arrow)"/>')
        colour = STATUS_COLOUR.get(record["status"], "#333")
        detail = record["method"] + (f" · {record['task']}" if record.get("task") else "")
        nodes.append(f'<g class="node" data-version="{escape(record["name"])}"><title>{escape(record["name"])}: '
                     f'{escape(detail)} [{escape(record["status"])}]</title>'
                     f'<rect x="{x:.0f}" y="{y:.0f}" width="{_NODE_W}" height="{_NODE_H}" rx="6" '
                     f'fill="{KIND_FILL[_node_kind(record)]}" stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{x + 8:.0f}" y="{y + 19:.0f}" font-size="13" font-weight="600">{escape(record["name"])}'
                     f'</text><text x="{x + 8:.0f}" y="{y + 36:.0f}" font-size="11" fill="#444">'
                     f"{escape(detail[:26])}</text></g>")
    marker = ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
              'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#888"/></marker></defs>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" id="lineage-graph" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">{marker}{"".join(edges)}'
           f'{"".join(nodes)}</svg>')
    note = ("Left to right: the base, the contributions (each a child of the base), then each composed version, "
            "with an arrow from everything it was made from (its contributions, and the release it was built on with "
            "--from). "
            "Border: green released, red rejected.")
    return f'<figure><div class="scroll">{svg}</div><figcaption>{escape(note)}</figcaption></figure>'


def _plane_html(png: bytes | None, records: Sequence[dict[str, Any]]) -> str:
    if png is None:
        return '<p class="note">No composed version has both old-knowledge and new-task scores yet.</p>'
    gates = [r["settings"]["gate"] for r in composed(records) if r["settings"].get("gate")]
    limits = sorted({g["old_limit_pct"] for g in gates})
    caption = ("Each composed version's AVnew gain against its AVE change, both relative to the base; the shaded "
               f"band is below the latest gate's old-knowledge limit (limits used: "
               f"{', '.join(f'-{v:g}%' for v in limits) or 'none'}).")
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure class="plot"><img alt="learn/forget plane" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


# --- one version ---------------------------------------------------------------------------------------
def _score_of(record: dict[str, Any], task: str, metric: str) -> dict[str, Any] | None:
    return next((s for s in record["scores"] if s["task"] == task and s["metric"] == metric), None)


def _interval(score: dict[str, Any] | None) -> str:
    if score is None:
        return "-"
    interval = score_interval(CardScore(score["task"], score["metric"], float(score["value"]), score.get("n")))
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "-"


def _scores_table(record: dict[str, Any], base: dict[str, Any], tasks: dict[str, RegisteredTask],
                  specialists: dict[str, float]) -> str:
    rows = []
    for name, task in tasks.items():
        mine, theirs = _score_of(record, name, task.score_metric), _score_of(base, name, task.score_metric)
        value = mine["value"] if mine else None
        reference = theirs["value"] if theirs else None
        rows.append(f'<tr data-task="{escape(name)}"><td>new {escape(name)}</td><td>{escape(task.score_metric)}</td>'
                    f'<td class="num">{number(value)}</td><td class="num">{_interval(mine)}</td>'
                    f'<td class="num">{(mine or {}).get("n") or "-"}</td><td class="num">{number(reference)}</td>'
                    f"{_change_cell(value, reference)}<td class=\"num\">{number(specialists.get(name))}</td>"
                    f"{_change_cell(value, specialists.get(name))}</tr>")
    for score in (s for s in record["scores"] if s["kind"] == "old"):
        theirs = _score_of(base, score["task"], score["metric"])
        reference = theirs["value"] if theirs else None
        rows.append(f'<tr><td>old {escape(score["task"])}</td><td>{escape(score["metric"])}</td>'
                    f'<td class="num">{number(score["value"])}</td><td class="num">{_interval(score)}</td>'
                    f'<td class="num">{score.get("n") or "-"}</td><td class="num">{number(reference)}</td>'
                    f'{_change_cell(score["value"], reference)}<td class="num">-</td><td class="num">-</td></tr>')
    return _table(("score", "metric", "value", "95% interval", "n", "base", "vs base", "specialist",
                   "vs specialist"), rows,
                  "Specialist: the task's best contribution on its own task. Intervals: Wilson, for scores that are "
                  "a share of items answered right.")


def _gate_html(record: dict[str, Any]) -> str:
    """The gate: what the version was gated against, how it came out (a forced release said first), and each check
    with its difference, the paired 95% interval and n, the allowance and the verdict the interval supports."""
    settings = record["settings"]
    gate = settings.get("gate")
    if not gate:
        return '<p class="note">No gate recorded.</p>'
    rows = []
    for c in recorded_checks(gate):
        interval = f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]" if c.has_interval else "no interval"
        rows.append(f'<tr class="gate-check" data-passed="{str(c.passed).lower()}" data-verdict="{c.verdict}">'
                    f'<td>{escape(c.what)}</td><td class="num">{number(c.value)}</td>'
                    f'<td>{escape(c.reference_version)}</td><td class="num">{number(c.reference)}</td>'
                    f'{_change_cell(c.value, c.reference)}<td class="num">{interval}</td>'
                    f'<td class="num">{c.n or "-"}</td><td class="num">{escape(c.allowed_text())}</td>'
                    f'<td class="num">{number(c.floor)}</td>'
                    f'<td class="{c.verdict}">{escape(c.verdict_text())}</td>'
                    f'<td class="{"holds" if c.passed else "fails"}">{"within" if c.passed else "BEYOND"}</td></tr>')
    forced = ('<p class="forced" style="background:#fbe0de;padding:0.4em"><strong>Released by --force-release although the gate failed:</strong> '
              f"{escape('; '.join(gate['failed']))}</p>" if gate.get("forced") else "")
    note = f'<p class="note">{escape(gate["note"])}</p>' if gate.get("note") else ""
    return (forced + f"<p>Gate {escape(gate_summary(gate, settings))}.</p>" + note
            + _table(("check", "value", "against", "reference", "change", "95% interval of the change", "n",
                      "allowed", "floor", "verdict", "point vs limit"), rows,
                     "The rule: a version whose point score is beyond a limit is not released (unless forced). "
                     "Verdict: what the paired 95% interval of the change (the same stored test items scored for "
                     "both; n items) supports: holds (all of it within the allowance), fails (all of it beyond), "
                     "inconclusive (both sides: these items cannot tell)."))


def _version_html(record: dict[str, Any], base: dict[str, Any], tasks: dict[str, RegisteredTask],
                  specialists: dict[str, float], contributions: set[str]) -> str:
    settings = record["settings"]
    options = ", ".join(f"{k}={v}" for k, v in (settings.get("options") or {}).items()) or "defaults"
    head = (f"<p>Built on {escape(built_on(record, contributions))} with "
            f"{escape(', '.join(contributions_of(record, contributions)))}; settings: {escape(options)}; "
            f"by {escape(record['author'] or '-')} at {escape(record['created_at'])}.</p>")
    return (head + "<h3>Gate</h3>" + _gate_html(record) + "<h3>Scores</h3>"
            + _scores_table(record, base, tasks, specialists))
