"""Real text and reference data that ship with Python and with pycountry: the built-in world's raw material.

The sources are a fixed list, recorded with a hash of what each contributes in `sources.lock.json`
(written by `python -m knowstack.builtin.sources` on the reference interpreter): a source missing
on this interpreter (a module that does not import, a file that is absent) is an error, never a
silent change of the corpus, and a source whose text differs from the recorded one (another Python
version's documentation) is named in the world's manifest, whose fingerprint then differs too.
Everything is gathered in a fixed, sorted order.
"""

from __future__ import annotations

import gettext
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import sysconfig
import unicodedata
from collections.abc import Callable
from dataclasses import astuple, dataclass
from functools import lru_cache
from pathlib import Path

import pycountry

from knowstack.errors import KnowstackError

LOCK_FILE = Path(__file__).with_name("sources.lock.json")

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


@lru_cache(maxsize=1)
def recorded() -> dict:
    """The fixed source list and each source's hash, as recorded on the reference interpreter."""
    return json.loads(LOCK_FILE.read_text(encoding="utf-8"))


def _missing(what: str, detail: str) -> KnowstackError:
    reference = recorded()["recorded_on"]["python"]
    return KnowstackError(
        f"the built-in world's corpus needs {what}, {detail} on Python {platform.python_version()}; its sources "
        f"are a fixed list (recorded on Python {reference}), so a missing one is an error rather than a "
        "different world: run knowstack on a Python that has it", path=LOCK_FILE)


@lru_cache(maxsize=1)
def _docs_by_module() -> dict[str, tuple[Doc, ...]]:
    """Each documented module's docstrings, collected by stdlib_docs.py in a clean interpreter."""
    script = Path(__file__).with_name("stdlib_docs.py")
    done = subprocess.run([sys.executable, "-I", str(script), *DOC_MODULES], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise KnowstackError(f"collecting the standard library's docstrings failed: {done.stderr.strip()}",
                             path=script)
    collected = json.loads(done.stdout)
    for name, error in collected["missing"].items():
        raise _missing(f"the standard-library module '{name}'", f"which does not import ({error})")
    return {name: tuple(Doc(*row) for row in rows) for name, rows in collected["docs"].items()}


def module_docs(module_name: str) -> tuple[Doc, ...]:
    """Docstrings of one module's public functions, classes, exceptions and methods (not deduplicated)."""
    return _docs_by_module()[module_name]


@lru_cache(maxsize=1)
def stdlib_docs() -> tuple[Doc, ...]:
    """Docstrings of every documented module, in module order, deduplicated by text."""
    seen: set[str] = set()
    docs: list[Doc] = []
    for module_name in DOC_MODULES:
        for doc in module_docs(module_name):
            if doc.text not in seen:
                seen.add(doc.text)
                docs.append(doc)
    return tuple(docs)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# Modules Python 3.12 and 3.13 removed (PEP 594 and earlier deprecations): never sources, so that the
# same list is present on every supported Python.
REMOVED_MODULES = frozenset({
    "aifc", "asynchat", "asyncore", "cgi", "cgitb", "chunk", "crypt", "imghdr", "imp", "mailcap", "nntplib",
    "pipes", "smtpd", "sndhdr", "sunau", "telnetlib", "uu", "xdrlib",
})


def discover_source_files() -> list[str]:
    """The rule the fixed list was made by: the standard library's own top-level pure-Python modules
    that every supported Python has."""
    return sorted(p.name for p in stdlib_root().glob("*.py") if not p.name.startswith("_")
                  and p.stem not in REMOVED_MODULES and p.stat().st_size < 200_000)


@dataclass(frozen=True)
class StdlibFile:
    """A recorded standard-library source file: `name` as recorded (e.g. 'zipfile.py'), `path` where this
    interpreter has it, the module's own file or, where a later Python made the module a package (zipfile in
    3.12, pathlib and sysconfig in 3.13), the package's __init__.py, whose different text then differs from the
    record and is named in the world's manifest like any other changed source."""

    name: str
    path: Path

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.path.read_text(encoding=encoding, errors=errors)


def stdlib_file(name: str) -> StdlibFile:
    """The recorded source file `name` on this interpreter (module or package), or the error naming it."""
    module, package = stdlib_root() / name, stdlib_root() / Path(name).stem / "__init__.py"
    for path in (module, package):
        if path.is_file():
            return StdlibFile(name, path)
    raise _missing(f"the standard library's source file '{name}'", f"absent from {module.parent} (as a module and as a "
                   "package)")


@lru_cache(maxsize=1)
def stdlib_source_files() -> tuple[StdlibFile, ...]:
    """The recorded standard-library source files (top-level pure-Python modules), sorted by name."""
    names = sorted(name.removeprefix("file:") for name in recorded()["sources"] if name.startswith("file:"))
    return tuple(stdlib_file(name) for name in names)


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


@lru_cache(maxsize=1)
def german_country_names() -> tuple[str, ...]:
    """pycountry's German names of the countries (its iso3166-1 translation), sorted."""
    german = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=["de"])
    names = {german.gettext(c.name) for c in countries()}
    return tuple(sorted(n for n in names if "," not in n and "(" not in n))


def _digest_of(value: object) -> str:
    data = value if isinstance(value, bytes) else json.dumps(value, ensure_ascii=False, default=astuple).encode()
    return hashlib.sha256(data).hexdigest()


# The sources that are not standard-library modules or files: what each contributes, by name.
DATA_SOURCES: dict[str, Callable[[], object]] = {
    "python:reference_topics": lambda: reference_topics(),
    "python:unicode_letters": lambda: unicode_letters(),
    "pycountry:countries": lambda: countries(),
    "pycountry:subdivisions": lambda: subdivisions(),
    "pycountry:languages": lambda: languages(),
    "pycountry:german_country_names": lambda: german_country_names(),
}


def source_hashes(file_names: list[str] | None = None) -> dict[str, str]:
    """sha256 of what each source contributes on this interpreter: 'doc:<module>' (its docstrings),
    'file:<name>' (the file's bytes), and the data sources. file_names: the files to hash (default:
    the recorded list)."""
    hashes = {f"doc:{name}": _digest_of([[d.qualname, d.kind, d.text] for d in module_docs(name)])
              for name in DOC_MODULES}
    files = [stdlib_file(n) for n in file_names] if file_names is not None else stdlib_source_files()
    hashes |= {f"file:{file.name}": _digest_of(file.read_bytes()) for file in files}
    hashes |= {name: _digest_of(make()) for name, make in DATA_SOURCES.items()}
    return dict(sorted(hashes.items()))


def environment() -> dict[str, str]:
    """The interpreter and the versions of the packages the sources come from."""
    return {"python": platform.python_version(), "pycountry": importlib.metadata.version("pycountry")}


@lru_cache(maxsize=1)
def source_check() -> dict:
    """This interpreter's sources against the recorded ones: the sources whose text differs (every
    recorded source is present, or an error has been raised), and where the record was made."""
    lock = recorded()
    here = source_hashes()
    differ = sorted(name for name, digest in lock["sources"].items() if here.get(name) != digest)
    return {"recorded_on": lock["recorded_on"], "here": environment(), "sources": len(lock["sources"]),
            "differ": differ}


def write_lock(path: Path = LOCK_FILE) -> None:
    """Record the source list and hashes on this interpreter (when the list changes on purpose: then
    also bump world.WORLD_VERSION)."""
    lock = {"recorded_on": environment(), "sources": source_hashes(discover_source_files())}
    path.write_text(json.dumps(lock, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_lock()
    print(f"wrote {LOCK_FILE} ({len(recorded.__wrapped__()['sources'])} sources, Python {platform.python_version()})",
          file=sys.stderr)
