"""report.html: one self-contained page (figures embedded as base64 PNG, inline CSS, no script, nothing
fetched), rendered from the same section tree as report.md."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from knowstack.report.claims import FAILS, HOLDS, INCONCLUSIVE, NO_SIGNAL, UNMEASURED
from knowstack.report.figures import FigureSpec
from knowstack.report.sections import Section
from knowstack.report.tables import Table, TableRow

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2rem; margin-top: 2.4rem; }
h3 { margin-top: 1.8rem; } nav { font-size: .9rem; margin: .6rem 0 1rem; } nav a { margin-right: .9rem; color: #3b75af; }
.legend-key { display: inline-block; width: .8em; height: .8em; margin: 0 .25em 0 .6em; vertical-align: -.05em; }
ul.highlights { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .7rem 1rem .7rem 2rem; }
.scroll { overflow-x: auto; } figure { margin: 1rem 0 1.4rem; }
figcaption { font-size: .9rem; color: #444; margin: .3rem 0; }
table { border-collapse: collapse; font-size: .82rem; background: #fff; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.neg { color: #b3261e; } td.pos { color: #1b6e2a; } tr.base td { background: #f6f6f6; }
td.holds { background: #dff3e3; font-weight: 600; } td.fails { background: #fbe0de; font-weight: 600; }
td.unmeasured { background: #eee; color: #666; } td.inconclusive { background: #fff4d6; font-weight: 600; }
td.nosignal { background: #e8eef6; color: #445; font-style: italic; }
img { max-width: 100%; height: auto; background: #fff; border: 1px solid #e4e4e4; }
p.note { color: #444; font-size: .9rem; }
"""
VERDICT_CLASS = {HOLDS: "holds", FAILS: "fails", INCONCLUSIVE: "inconclusive", NO_SIGNAL: "nosignal",
                 UNMEASURED: "unmeasured"}


def _cell(text: str, unit: str, value: object) -> str:
    classes = []
    if text in VERDICT_CLASS:
        classes.append(VERDICT_CLASS[text])
    elif unit in ("score", "percent", "delta"):
        classes.append("num")
        if unit == "percent" and isinstance(value, float | int) and value:
            classes.append("neg" if value < 0 else "pos")
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{cls}>{escape(text)}</td>"


def _row(row: TableRow) -> str:
    method = row.key.split("/")[0]
    cls = ' class="base"' if row.key == "base" else ""
    cells = "".join(_cell(t, u, v) for t, u, v in zip(row.formatted(), row.units, row.cells, strict=True))
    return (f'<tr{cls} data-key="{escape(row.key)}" data-method="{escape(method)}"><th scope="row">'
            f"{escape(row.label)}</th>{cells}</tr>")


def table_html(table: Table) -> str:
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in table.header)
    body = "".join(_row(r) for r in table.rows)
    return (f'<figure class="table" id="table-{escape(table.key)}"><figcaption>{escape(table.caption)} '
            f"<small>(tables/{escape(table.key)}.csv)</small></figcaption><div class=\"scroll\"><table>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div></figure>")


def figure_html(spec: FigureSpec) -> str:
    if spec.path is None:
        return ""
    data = base64.b64encode(Path(spec.path).read_bytes()).decode("ascii")
    return (f'<figure class="plot" id="figure-{escape(spec.key)}"><img alt="{escape(spec.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{escape(spec.caption)}</figcaption></figure>')


def block_html(block: object, depth: int) -> str:
    if isinstance(block, Section):
        return section_html(block, depth + 1)
    if isinstance(block, Table):
        return table_html(block)
    if isinstance(block, FigureSpec):
        return figure_html(block)
    if isinstance(block, list):
        return '<ul class="highlights">' + "".join(f"<li>{escape(item)}</li>" for item in block) + "</ul>"
    return f"<p>{escape(str(block))}</p>"


def section_html(section: Section, depth: int = 2) -> str:
    level = min(depth, 6)
    body = "".join(block_html(b, depth) for b in section.blocks)
    return f'<section id="{escape(section.id)}"><h{level}>{escape(section.title)}</h{level}>{body}</section>'


def render_html(sections: list[Section], *, title: str) -> str:
    nav = "".join(f'<a href="#{escape(s.id)}">{escape(s.title.split(":")[0].split(" (")[0])}</a>' for s in sections)
    colours = ('Colours: <span class="legend-key" style="background:#d9544d"></span>FFT'
               '<span class="legend-key" style="background:#3b75af"></span>LoRA'
               '<span class="legend-key" style="background:#9e9e9e"></span>base; lighter shades: one-round models; '
               "hatching tells methods of one finetune apart.")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request: the page fetches nothing
        f"<title>knowstack study: {escape(title)}</title><style>{STYLE}</style></head><body><main>"
        f"<h1>knowstack study: {escape(title)}</h1><nav>{nav}</nav><p class=\"note\">{colours}</p>"
        + "".join(section_html(s) for s in sections)
        + "</main></body></html>\n"
    )
