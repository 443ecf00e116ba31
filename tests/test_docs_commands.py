"""docs/commands.md names every command of the CLI (nested ones too: `registry report`) and every preset of the
built-in world, read from the parser and from builtin/world.py, so the page cannot fall behind them."""

from __future__ import annotations

import re
from pathlib import Path

from knowstack.builtin.world import PRESETS
from knowstack.cli import build_parser, commands

PAGE = Path(__file__).resolve().parent.parent / "docs" / "commands.md"
WORDS = r"[a-z][\w-]*(?:\|[a-z][\w-]*)*"  # `train`, or alternatives `init|list|verify|gc`


def documented_commands(text: str) -> set[str]:
    """The commands the page shows run: `knowstack A|B [C|D] ...` gives A, B, and A C, A D, B C, B D."""
    found = set()
    for first, second in re.findall(rf"knowstack ({WORDS})(?: ({WORDS}))?", text):
        for a in first.split("|"):
            found.add(a)
            found.update(f"{a} {b}" for b in second.split("|") if b)
    return found


def test_every_command_of_the_parser_is_on_the_commands_page() -> None:
    text = PAGE.read_text(encoding="utf-8")
    parsed = set(commands(build_parser()))
    assert {"train", "registry", "registry report", "registry init"} <= parsed  # the walk finds nested commands
    assert sorted(parsed - documented_commands(text)) == []


def test_every_world_preset_is_on_the_commands_page_and_in_the_parser() -> None:
    text = PAGE.read_text(encoding="utf-8")
    shown = re.search(r"knowstack build-world --preset ([\w|]+)", text)
    assert shown and shown.group(1).split("|") == list(PRESETS)
    assert [name for name in PRESETS if f"- `{name}`" not in text] == []  # each described
    option = next(a for a in commands(build_parser())["build-world"]._actions if a.dest == "preset")
    assert list(option.choices) == list(PRESETS)
