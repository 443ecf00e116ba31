"""The house has layers and no circles (docs/design.md, "Layers").

Every module under src/knowstack is parsed with `ast`: its imports at module level and inside functions
(the code imports lazily, to keep start-up cheap) and under `if TYPE_CHECKING:`. The test fails naming the
importing file, its line and the imported module for
(a) an import of a higher layer, or of a sibling in the same layer, type-only ones included: a low module
    does not even name a higher one's types;
(b) a cycle of imports between modules, lazy ones and type-only ones included: a module that names the types
    of a module importing it cannot be read or changed apart from it (the plan builder's class lives in
    study/builder.py, below both the methods that plan with it and study/plan.py that runs them; a compose's
    inputs in registry/compose_inputs.py, below both compose.py and compose_plan.py);
(c) another module's private name (`_x`), imported (`from knowstack.m import _x`) or read (`m._x`);
(d) an import the layers allow but the design forbids (FORBIDDEN): combine/ builds from models and trains
    nothing (router training is its caller's: the MoE method, api.mix), and the report reads results (results.py:
    rows, per-item scores, costs, study.json), never a study's plan or artifacts.

Importing `knowstack.p.m` runs the package `knowstack/p/__init__.py` first, so it counts as importing that
package too (but for the root package, whose own code imports nothing of knowstack at import time).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "knowstack"

# Bottom to top. A name is a top-level module or subpackage of knowstack ("" is the package itself, the
# lazy facade of api.py), or a subpackage placed apart from its package (combine.merges: the merge methods'
# declarations, which config reads to make its merge settings; their package's __init__ is empty). A module may import its own unit and the units of lower layers; units in one
# layer are siblings and import none of each other. docs/design.md lists the same layers, in this order.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "atomic", "hashing", "kernels", "logs", "progress", "stats", "usage", "version"),
    ("combine.merges",),
    ("config",),
    ("data",),
    ("modeling", "modelcard"),
    ("modelio",),
    ("train", "evaluate"),
    ("combine",),
    ("builtin",),
    ("validate",),
    ("results",),
    ("study",),
    ("report",),
    ("registry",),
    ("api",),
    ("cli", ""),
)

# (importing unit, imported unit or module) -> why not, for imports that go down the layers but must not be made.
FORBIDDEN: dict[tuple[str, str], str] = {
    ("combine", "train"): "combine/ builds mixtures and merges from models; training (routers too) is its "
                          "caller's: the MoE method (study/steps.py) and api.mix",
    ("report", "study"): "the report reads results (results.py: rows, per_example.jsonl, costs.csv, study.json), "
                         "which the study writes; never the study's plan or artifacts",
}
# Left to do (issue 31 item 6): the report still reads the method catalog's sections and cooperative settings from
# study/methods/ (report/runs.py, report/frontier.py) rather than from study.json.
STILL_ALLOWED = {("report", "knowstack.study.methods")}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. knowstack.train.launch
    file: str  # its file, as the package's path: knowstack/train/launch.py
    line: int
    target: str  # the imported module
    names: tuple[str, ...] = ()  # the names a from-import takes from the target (not submodules)
    implied: bool = False  # the package whose __init__ an import of its submodule runs
    typing_only: bool = False  # under `if TYPE_CHECKING:`: never run

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def find_modules(src: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package under `src`."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _shown(module: str, path: Path) -> str:
    return "/".join([*module.split("."), *(["__init__"] if path.name == "__init__.py" else [])]) + ".py"


def imports_of(module: str, path: Path, known: dict[str, Path], package: str = PACKAGE) -> list[Import]:
    """Every import of a module of `package` by `module`, wherever in the file it is."""
    found: list[Import] = []
    file = _shown(module, path)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for statement in node.body for inner in ast.walk(statement)}

    def add(node: ast.stmt, target: str, names: tuple[str, ...] = ()) -> None:
        hidden = id(node) in typing_only
        found.append(Import(module, file, node.lineno, target, names, typing_only=hidden))
        parent = target.rpartition(".")[0]
        while parent and parent != package and not (module + ".").startswith(parent + "."):
            found.append(Import(module, file, node.lineno, parent, implied=True, typing_only=hidden))
            parent = parent.rpartition(".")[0]

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target != package and not target.startswith(package + "."):
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in known:  # a submodule: an import of that module
                    add(node, f"{target}.{alias.name}", (alias.name,) if _private(alias.name) else ())
                else:
                    names.append(alias.name)
            if names:
                add(node, target, tuple(names))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reads(module: str, path: Path, known: dict[str, Path], package: str = PACKAGE) -> list[str]:
    """`m._x` where m names another knowstack module (bound by `import ... as m` or `from p import m`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name.startswith(package + "."):
                    bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
    return [f"{_shown(module, path)}:{node.lineno} reads {bound[node.value.id]}.{node.attr}, a private name of another module"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
            and bound[node.value.id] != module and _private(node.attr)]


def unit_of(module: str, package: str = PACKAGE) -> str:
    """The unit a module belongs to: its top-level name, or a subpackage LAYERS lists on its own (combine.merges)."""
    name = module.removeprefix(package).lstrip(".")
    apart = [unit for layer in LAYERS for unit in layer if "." in unit and (name + ".").startswith(unit + ".")]
    return apart[0] if apart else name.split(".")[0]


def layer_violations(imports: Sequence[Import], layers: Sequence[Sequence[str]], package: str = PACKAGE) -> list[str]:
    rank = {unit: index for index, layer in enumerate(layers) for unit in layer}
    problems = []
    for imp in imports:
        source, target = unit_of(imp.source, package), unit_of(imp.target, package)
        if source == target or imp.implied:
            continue
        if source not in rank or target not in rank:
            missing = source if source not in rank else target
            problems.append(f"{imp.where()}: '{missing or package}' is in no layer: add it to LAYERS and docs/design.md")
        elif rank[target] >= rank[source]:
            how = "a sibling of the same layer" if rank[target] == rank[source] else "a higher layer"
            problems.append(f"{imp.where()} imports {imp.target}: {target or package} is {how} than "
                            f"{source or package} (layer {rank[source] + 1} may import layers 1..{rank[source]} only)")
    return problems


def private_imports(imports: Sequence[Import]) -> list[str]:
    return [f"{imp.where()} imports {name} from {imp.target}, a private name of another module"
            for imp in imports if imp.target != imp.source for name in imp.names if _private(name)]


def forbidden_imports(imports: Sequence[Import], forbidden: dict[tuple[str, str], str],
                      allowed: set[tuple[str, str]] = frozenset(), package: str = PACKAGE) -> list[str]:
    """Imports (lazy and type-only ones too) of a unit that `forbidden` keeps from its importer, but those `allowed`
    names (importing unit, imported module or one of its packages)."""
    problems = []
    for imp in imports:
        source, target = unit_of(imp.source, package), unit_of(imp.target, package)
        why = forbidden.get((source, target))
        if why is None or imp.implied or any((source, module) in allowed for module in _packages_of(imp.target)):
            continue
        problems.append(f"{imp.where()} imports {imp.target}: {source} may not import {target} ({why})")
    return problems


def _packages_of(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def cycles(imports: Sequence[Import]) -> list[str]:
    """The shortest circle through each module that is on one (as its imports, file:line each), each circle once;
    type-only imports (under TYPE_CHECKING) close circles too."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target != imp.source:
            edges.setdefault(imp.source, {}).setdefault(imp.target, imp)
    found: dict[frozenset[str], str] = {}
    for group in _strongly_connected(edges):
        for start in sorted(group) if len(group) > 1 else ():
            path = _path_back(start, group, edges)
            text = (" -> ".join([start, *(imp.target for imp in path)]) + "\n    "
                    + "\n    ".join(f"{imp.where()} imports {imp.target}" + " (runs its __init__)" * imp.implied
                                   for imp in path))
            found.setdefault(frozenset(imp.source for imp in path), text)
    return list(found.values())


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> Iterator[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    nodes = sorted({*edges, *(t for targets in edges.values() for t in targets)})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                yield group


def _path_back(start: str, group: set[str], edges: dict[str, dict[str, Import]]) -> list[Import]:
    """The shortest circle from `start` back to itself within its group (breadth first)."""
    came_by: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target, imp in sorted(edges.get(node, {}).items()):
                if target not in group or target in came_by:
                    continue
                came_by[target] = imp
                if target == start:
                    path = [imp]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected group without a circle back to it")


def all_imports(src: Path, package: str = PACKAGE) -> tuple[dict[str, Path], list[Import]]:
    known = find_modules(src, package)
    return known, [imp for module, path in known.items() for imp in imports_of(module, path, known, package)]


def _fail_with(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n" + "\n".join(problems), pytrace=False)


def test_imports_only_go_down_the_layers() -> None:
    _, imports = all_imports(ROOT / "src")
    _fail_with(layer_violations(imports, LAYERS), "imports that do not go down the layers (docs/design.md, Layers)")


def test_no_circle_of_imports() -> None:
    _, imports = all_imports(ROOT / "src")
    _fail_with(cycles(imports), "circles of imports (lazy and type-only imports count)")


def test_no_forbidden_import() -> None:
    _, imports = all_imports(ROOT / "src")
    _fail_with(forbidden_imports(imports, FORBIDDEN, STILL_ALLOWED), "imports the design forbids (FORBIDDEN)")


def test_no_private_name_crosses_modules() -> None:
    known, imports = all_imports(ROOT / "src")
    reads = [problem for module, path in known.items() for problem in private_reads(module, path, known)]
    _fail_with(private_imports(imports) + reads, "private names used outside their module")


def test_every_unit_has_a_layer_and_the_design_lists_them_in_order() -> None:
    known = find_modules(ROOT / "src")
    listed = {unit for layer in LAYERS for unit in layer}
    assert {unit_of(m) for m in known} <= listed, "modules in no layer: add them to LAYERS and docs/design.md"
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    documented = [tuple(re.findall(r"`([a-z_.]*)`", line)) for line in section.splitlines() if re.match(r"\d+\. ", line)]
    assert documented == [tuple(unit or PACKAGE for unit in layer) for layer in LAYERS]


# --- the checker itself fails where it should ----------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for folder in [tmp_path / "pkg", *(p for p in (tmp_path / "pkg").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return tmp_path


def test_the_checker_finds_an_upward_import_a_lazy_circle_and_a_private_name(tmp_path: Path) -> None:
    src = _package(tmp_path, {
        "low.py": "def f():\n    from pkg.high import g\n",
        "high.py": "from pkg import low\nfrom pkg.low import _secret\n\ndef g():\n    return low._hidden\n",
        "sub/a.py": "from . import b\n",
        "sub/b.py": "def h():\n    from pkg.sub.a import x\n",
    })
    known, imports = all_imports(src, "pkg")
    layers = (("low",), ("sub",), ("high",))
    assert layer_violations(imports, layers, "pkg") == [
        "pkg/low.py:2 imports pkg.high: high is a higher layer than low (layer 1 may import layers 1..0 only)"]
    found = cycles(imports)
    assert len(found) == 2 and found[0].startswith("pkg.high -> pkg.low -> pkg.high")
    assert "pkg/sub/b.py:2 imports pkg.sub.a" in found[1]
    assert private_imports(imports) == ["pkg/high.py:2 imports _secret from pkg.low, a private name of another module"]
    reads = private_reads("pkg.high", src / "pkg" / "high.py", known, "pkg")
    assert reads == ["pkg/high.py:5 reads pkg.low._hidden, a private name of another module"]


def test_a_type_only_import_closes_a_circle_and_keeps_to_the_layers(tmp_path: Path) -> None:
    src = _package(tmp_path, {
        "low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import Caller\n",
        "high.py": "from pkg.low import f\n",
    })
    _, imports = all_imports(src, "pkg")
    found = cycles(imports)
    assert len(found) == 1 and "pkg/low.py:3 imports pkg.high" in found[0]
    assert layer_violations(imports, (("low",), ("high",)), "pkg") == [
        "pkg/low.py:3 imports pkg.high: high is a higher layer than low (layer 1 may import layers 1..0 only)"]


def test_importing_a_submodule_runs_its_package(tmp_path: Path) -> None:
    src = _package(tmp_path, {"p/__init__.py": "from pkg.p.inner import x\n", "p/inner.py": "from pkg import q\n",
                              "q.py": "from pkg.p.other import y\n", "p/other.py": ""})
    _, imports = all_imports(src, "pkg")
    assert any(c.startswith("pkg.p -> pkg.p.inner -> pkg.q -> pkg.p\n") for c in cycles(imports))


def test_a_forbidden_import_is_found_lazy_or_type_only_and_an_allowed_one_is_not(tmp_path: Path) -> None:
    src = _package(tmp_path, {
        "low/train.py": "",
        "low/other.py": "",
        "high/mix.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.low.train import T\n"
                       "def f():\n    from pkg.low import other\n",
    })
    _, imports = all_imports(src, "pkg")
    forbidden = {("high", "low"): "why"}
    assert forbidden_imports(imports, forbidden, package="pkg") == [
        "pkg/high/mix.py:3 imports pkg.low.train: high may not import low (why)",
        "pkg/high/mix.py:5 imports pkg.low.other: high may not import low (why)"]
    assert forbidden_imports(imports, forbidden, {("high", "pkg.low.other")}, "pkg") == [
        "pkg/high/mix.py:3 imports pkg.low.train: high may not import low (why)"]
