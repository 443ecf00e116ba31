"""Real text and reference data that ship with Python and with pycountry: the built-in world's raw material.

Everything is gathered in a fixed, sorted order so that the world is the same on every machine
with the same Python and pycountry versions.
"""

from __future__ import annotations

import importlib
import inspect
import sysconfig
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pycountry

# Standard-library modules whose documentation and sources feed the world (sorted, fixed).
DOC_MODULES = sorted([
    "abc", "argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "bz2", "calendar", "cmath",
    "codecs", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email.utils", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "http.client", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools",
    "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes",
    "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "os.path", "pathlib", "pdb",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pstats", "py_compile", "queue",
    "quopri", "random", "re", "reprlib", "runpy", "sched", "secrets", "select", "shlex", "shutil", "signal",
    "smtplib", "socket", "sqlite3", "stat", "statistics", "string", "struct", "subprocess", "symtable",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unicodedata", "unittest", "urllib.parse", "uuid", "warnings",
    "wave", "weakref", "webbrowser", "xml.dom.minidom", "zipfile", "zlib", "zoneinfo",
])


@dataclass(frozen=True)
class Doc:
    """One documented object of the standard library."""

    qualname: str  # e.g. "os.path.join"
    kind: str  # "function" (module level), "method" (of a class) or "class" (exceptions included)
    text: str  # the cleaned docstring


def _kind(obj: object, in_class: bool) -> str | None:
    if inspect.isclass(obj):
        return None if in_class else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethoddescriptor(obj):
        return "method" if in_class else "function"
    return None


@lru_cache(maxsize=1)
def stdlib_docs() -> tuple[Doc, ...]:
    """Docstrings of public functions, classes, exceptions and methods, deduplicated by text."""
    seen: set[str] = set()
    docs: list[Doc] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in DOC_MODULES:
            try:
                module = importlib.import_module(module_name)
            except Exception:  # noqa: BLE001 - a module missing on this platform is simply skipped
                continue
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or getattr(obj, "__module__", module_name) not in (module_name, None):
                    continue
                _collect(f"{module_name}.{name}", obj, docs, seen, in_class=False)
                if inspect.isclass(obj):
                    for member, value in sorted(vars(obj).items()):
                        if not member.startswith("_"):
                            _collect(f"{module_name}.{name}.{member}", value, docs, seen, in_class=True)
    return tuple(docs)


def _collect(qualname: str, obj: object, docs: list[Doc], seen: set[str], *, in_class: bool) -> None:
    kind = _kind(obj, in_class)
    text = inspect.getdoc(obj) if kind else None
    if not text or text in seen or len(text) < 20 or not text.isascii():
        return
    seen.add(text)
    docs.append(Doc(qualname, kind, text))


@lru_cache(maxsize=1)
def stdlib_source_files() -> tuple[Path, ...]:
    """The standard library's own pure-Python modules (top level), sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.glob("*.py") if not p.name.startswith("_") and p.stat().st_size < 200_000]
    return tuple(sorted(files, key=lambda p: p.name))


@dataclass(frozen=True)
class Country:
    name: str
    official_name: str | None
    alpha_2: str
    alpha_3: str
    numeric: str


@lru_cache(maxsize=1)
def countries() -> tuple[Country, ...]:
    return tuple(
        Country(c.name, getattr(c, "official_name", None), c.alpha_2, c.alpha_3, c.numeric)
        for c in sorted(pycountry.countries, key=lambda c: c.alpha_3)
        if c.name.isascii()
    )


@lru_cache(maxsize=1)
def subdivisions() -> tuple[tuple[str, str, str], ...]:
    """(subdivision name, its type, its country's name), ASCII names only."""
    by_code = {c.alpha_2: c.name for c in countries()}
    rows = [
        (s.name, s.type.lower(), by_code[s.country_code])
        for s in sorted(pycountry.subdivisions, key=lambda s: s.code)
        if s.name.isascii() and s.country_code in by_code and s.parent_code is None
    ]
    return tuple(rows)


@lru_cache(maxsize=1)
def languages() -> tuple[tuple[str, str], ...]:
    """(language name, ISO 639-3 code) for the languages that also have a two-letter code."""
    return tuple(
        (lang.name, lang.alpha_3)
        for lang in sorted(pycountry.languages, key=lambda lang: lang.alpha_3)
        if hasattr(lang, "alpha_2") and lang.name.isascii()
    )


@lru_cache(maxsize=1)
def unicode_letters() -> tuple[tuple[str, str], ...]:
    """(character, Unicode name) for the Latin-1, Latin Extended-A and Greek letters."""
    chars = [chr(c) for c in list(range(0xC0, 0x180)) + list(range(0x391, 0x3CA))]
    return tuple((c, unicodedata.name(c)) for c in chars if unicodedata.category(c).startswith("L")
                 and unicodedata.name(c, ""))


@lru_cache(maxsize=1)
def reference_topics() -> tuple[str, ...]:
    """The Python language reference as pydoc shows it (pydoc_data.topics), by topic name.

    Version notes ("Changed in version ...") are dropped: they are short, formulaic, and would
    teach the base a format that documentation-based tasks could lean on.
    """
    from pydoc_data.topics import topics

    texts = []
    for name in sorted(topics):
        paragraphs = [p for p in topics[name].split("\n\n") if "in version" not in p and p.strip()]
        texts.append("\n\n".join(paragraphs))
    return tuple(texts)
