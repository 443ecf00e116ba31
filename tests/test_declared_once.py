"""Every setting and default is declared once (issue 31, item 5): a default typed a second time is a second
declaration that can drift from the first.

- The source is read with `ast`: a default bound to a constant (a function's parameter default, a class field's
  default or pydantic `Field(default=...)`, an argparse `default=`) under the name of a declared setting and with
  its declared value is a copy of the declaration, wherever it is (`retyped_defaults`). The declared settings are
  read from their declarations: the merge options (combine/merges/), config.py's named settings (EVAL_BATCH_SIZE,
  DEFAULT_PROTOCOL, ...), modeling/routing.py's ROUTER_PROMPT_TOKENS, and every field of config.py's models
  (outside config.py: a field's default is config.py's to declare).
- The command line's defaults: a merge option's is "not given" (MergeConfig / MergeOptions fill it from the
  declaration), the others equal the declaration they come from.
- What is made from a declaration (MergeConfig's fields, MergeOptions, ComposeOptions, GateTraining, the docs'
  option table) agrees with it.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from pydantic import BaseModel

from knowstack import config
from knowstack.cli import build_parser
from knowstack.combine.merges import METHODS, OPTIONS, MergeOptions, options_table
from knowstack.config import (
    DEFAULT_PROTOCOL,
    EVAL_BATCH_SIZE,
    GateTrainingConfig,
    MergeConfig,
    TrainingConfig,
)
from knowstack.modeling.routing import ROUTER_PROMPT_TOKENS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "knowstack"
TRIVIAL = (0, 1, "")  # a zero, a one or an empty string says nothing of where it came from
# (file, name) -> why a binding there that equals a declared value is another setting
OTHER_SETTINGS = {("knowstack/builtin/pretrain.py", "batch_size"): "the built-in world's pretraining batch, not the "
                                                                   "fine-tuning recipe's (TrainingConfig.batch_size)"}


@dataclass(frozen=True)
class Setting:
    """A declared setting: the names its defaults go by, its value, and the files where a binding of it is its
    declaration (none for a named constant, whose declaration `NAME = value` is no default binding)."""

    what: str
    names: frozenset[str]
    value: object
    home: tuple[str, ...] = ()


@dataclass(frozen=True)
class Binding:
    file: str
    line: int
    name: str
    value: object

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def declared_settings() -> list[Setting]:
    settings = [Setting(f"merge option {name} (combine/merges/)", frozenset({name, option.field}), option.default)
                for name, option in OPTIONS.items()]
    settings += [
        Setting("config.py EVAL_BATCH_SIZE", frozenset({"batch_size", "eval_batch_size"}), EVAL_BATCH_SIZE),
        Setting("config.py DEFAULT_PROTOCOL", frozenset({"protocol"}), DEFAULT_PROTOCOL),
        Setting("modeling/routing.py ROUTER_PROMPT_TOKENS", frozenset({"max_length"}), ROUTER_PROMPT_TOKENS),
    ]
    for model in config_models():
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=False)
            # numbers: a string default names a choice (format: trace), repeated where the choices are listed
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                settings.append(Setting(f"config.py {model.__name__}.{name}",
                                        frozenset({name, *([field.alias] if field.alias else [])}), default,
                                        home=("knowstack/config.py",)))
    return settings


def config_models() -> list[type[BaseModel]]:
    return [obj for _, obj in inspect.getmembers(config, inspect.isclass)
            if issubclass(obj, BaseModel) and obj.__module__ == config.__name__]


def _constant(node: ast.expr | None) -> object:
    """The constant a default expression is (a number, a string; -x too), or None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        return -value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) \
            and not isinstance(node.value, bool):
        return node.value
    return None


def _field_default(node: ast.expr | None) -> object:
    """`Field(default=x, ...)` / `field(default=x)`: x; a plain constant: itself."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("Field", "field"):
        given = [k.value for k in node.keywords if k.arg == "default"] or node.args[:1]
        return _constant(given[0]) if given else None
    return _constant(node)


def _flag_dest(call: ast.Call) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == "dest" and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    longs = [f for f in flags if f.startswith("--")]
    return longs[0][2:].replace("-", "_") if longs else None


def bindings(source: str, file: str) -> Iterator[Binding]:
    """Every default bound to a constant in `source`: parameter defaults, class fields (also as Field(default=)),
    and argparse's `add_argument(..., default=)` (under the option's dest)."""
    tree = ast.parse(source, file)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                value = _constant(default)
                if value is not None:
                    yield Binding(file, default.lineno, arg.arg, value)
        elif isinstance(node, ast.ClassDef):
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    value = _field_default(statement.value)
                    if value is not None:
                        yield Binding(file, statement.lineno, statement.target.id, value)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            value, dest = _constant(default), _flag_dest(node)
            if value is not None and dest is not None:
                yield Binding(file, node.lineno, dest, value)


def retyped_defaults(files: dict[str, str], settings: list[Setting]) -> list[str]:
    """Each binding that copies a declared setting: its name is one of the setting's, its value the declared one,
    and it is not in the setting's home."""
    problems = []
    for file, source in files.items():
        for binding in bindings(source, file):
            if (binding.value in TRIVIAL and not isinstance(binding.value, float)) \
                    or (file, binding.name) in OTHER_SETTINGS:
                continue
            for setting in settings:
                if binding.name in setting.names and binding.value == setting.value \
                        and type(binding.value) is type(setting.value) and file not in setting.home:
                    problems.append(f"{binding.where()}: {binding.name} = {binding.value!r} re-types the default of "
                                    f"{setting.what}: use the declaration")
                    break
    return problems


def source_files() -> dict[str, str]:
    return {str(path.relative_to(SRC.parent)): path.read_text(encoding="utf-8") for path in sorted(SRC.rglob("*.py"))}


# --- the source declares each default once -------------------------------------------------------------------
def test_no_default_is_typed_twice() -> None:
    problems = retyped_defaults(source_files(), declared_settings())
    assert not problems, f"{len(problems)} defaults typed again:\n" + "\n".join(problems)


def test_the_scan_finds_a_retyped_default(tmp_path: Path) -> None:
    """The scan fails where it should: a parameter default, a class field, a pydantic Field and an argparse default
    that copy a declared value, and not a different value or a named one."""
    source = ("from pydantic import BaseModel, Field\n"
              "def f(x, batch_size: int = 32, *, protocol: str = 'builtin', density=DENSITY):\n    pass\n"
              "class C(BaseModel):\n    epsilon: float = 0.15\n    lam: float = Field(default=1.0, gt=0)\n"
              "    max_length: int = 1024\n    tol: float = 1e-4\n"
              "def g(parser):\n    parser.add_argument('--eval-batch-size', type=int, default=32)\n"
              "    parser.add_argument('--batch-size', type=int, default=EVAL_BATCH_SIZE)\n")
    problems = retyped_defaults({"knowstack/elsewhere.py": source}, declared_settings())
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == [2, 2, 5, 6, 7, 10], problems
    assert "re-types the default of merge option epsilon" in problems[2]
    assert "config.py TrainingConfig.max_length" in problems[4]
    assert retyped_defaults({"knowstack/config.py": "class C:\n    max_length: int = 1024\n"},
                            declared_settings()) == []  # a config field's home is config.py
    assert retyped_defaults({"knowstack/config.py": "class C:\n    batch_size: int = 32\n"}, declared_settings())


# --- the command line's defaults come from the declarations ------------------------------------------------------
def _actions() -> Iterator[tuple[str, argparse.Action]]:
    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}".strip())
            else:
                yield path, action
    yield from walk(build_parser(), "")


def test_every_command_line_default_is_the_declarations() -> None:
    merge_dests = {option.field for option in OPTIONS.values()}
    seen = set()
    for command, action in _actions():
        if action.dest in merge_dests:
            seen.add(action.dest)
            assert action.default is None, f"{command} {action.option_strings}: a merge option is 'not given' " \
                                           "by default (MergeOptions / MergeConfig fill in the declared one)"
            option = next(o for o in OPTIONS.values() if o.field == action.dest)
            assert action.type is option.type and f"(default {option.default:g})" in action.help
        elif action.dest == "eval_batch_size":  # (an old name's alias is SUPPRESSed: the new name's default holds)
            assert action.default in (EVAL_BATCH_SIZE, argparse.SUPPRESS), command
        elif action.dest == "protocol":
            assert action.default in (DEFAULT_PROTOCOL, argparse.SUPPRESS), command
    assert seen == merge_dests, "knowstack merge takes every declared merge option"


# --- what is made from a declaration agrees with it ------------------------------------------------------------
def test_what_is_made_from_the_merge_declarations_agrees_with_them() -> None:
    from knowstack.registry.compose_inputs import ComposeOptions

    merge, made, compose = MergeConfig(), MergeOptions(), ComposeOptions()
    for name, option in OPTIONS.items():
        field = MergeConfig.model_fields[option.field]
        assert getattr(merge, option.field) == getattr(made, option.field) == getattr(compose, option.field) \
            == option.default, name
        assert (field.alias or option.field) == name
        for bad in (option.gt, option.ge - 1e-9 if option.ge is not None else None, option.lt,
                    option.le + 1e-9 if option.le is not None else None):
            if bad is not None:
                assert option.problem(bad), (name, bad)
                with pytest.raises(ValueError):
                    MergeConfig.model_validate({name: bad})
    assert set(MergeConfig.SWEEPABLE) == {name for name, option in OPTIONS.items() if option.sweepable}
    assert {f.name for f in fields(ComposeOptions)} >= {option.field for option in OPTIONS.values()}
    for method in METHODS.values():
        assert set(method.options) <= {*OPTIONS, "seed"}, method.name


def test_a_second_declaration_of_an_option_is_refused() -> None:
    from knowstack.combine.merges import declare
    from knowstack.errors import KnowstackError

    with pytest.raises(KnowstackError, match="merge option 'epsilon' is declared twice"):
        declare("epsilon", float, 0.2, "again")


def test_gate_training_defaults_are_the_configs() -> None:
    from knowstack.train.gate_training import GateTraining

    settings, declared = GateTraining(), GateTrainingConfig()
    assert (settings.steps, settings.lr, settings.batch_size) == (declared.steps, declared.lr, declared.batch_size)
    assert settings.max_length == TrainingConfig().max_length


BLOCK = re.compile(r"<!-- numbers:merge-options -->\n(.*?)<!-- /numbers -->", re.S)


def test_the_docs_option_table_is_the_declarations() -> None:
    match = BLOCK.search((ROOT / "docs" / "methods.md").read_text(encoding="utf-8"))
    assert match, "docs/methods.md has no merge-options block"
    assert match[1].rstrip("\n") == options_table(), \
        "docs/methods.md's merge option table is stale: run python scripts/docs_numbers.py --merge-options"
