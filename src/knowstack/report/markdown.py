"""report.md: the same section tree as report.html, as markdown with the figures linked as files."""

from __future__ import annotations

from pathlib import Path

from knowstack.report.figures import FigureSpec
from knowstack.report.sections import Section
from knowstack.report.tables import Table


def block_markdown(block: object, depth: int, out: Path) -> str:
    if isinstance(block, Section):
        return section_markdown(block, depth + 1, out)
    if isinstance(block, Table):
        return f"{block.caption}\n\n{block.to_markdown()}"
    if isinstance(block, FigureSpec):
        if block.path is None:
            return ""
        return f"![{block.caption}]({Path(block.path).relative_to(out).as_posix()})"
    if isinstance(block, list):
        return "\n".join(f"- {item}" for item in block)
    return str(block)


def section_markdown(section: Section, depth: int, out: Path) -> str:
    parts = [f"{'#' * depth} {section.title}"] + [block_markdown(b, depth, out) for b in section.blocks]
    return "\n\n".join(p for p in parts if p)


def render_markdown(sections: list[Section], *, title: str, out: Path) -> str:
    body = "\n\n".join(section_markdown(s, 2, Path(out)) for s in sections)
    return f"# knowstack study: {title}\n\n{body}\n"
