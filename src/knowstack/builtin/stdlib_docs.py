"""Collects the standard library's docstrings in a clean interpreter: run as a script, never imported.

What a module's objects document depends on what else the process has imported (transformers adds
methods to logging.Logger, other packages wrap inspect.getfile), so sources.py runs this file with
`python -I` (no site customisation, no environment, nothing but the standard library imported) and
reads its JSON from stdout: {"docs": {module: [[qualname, kind, text], ...]}, "missing": {module: error}}.
"""

import sys

# Python < 3.11 puts this script's folder first on the path even under -I: no module of it may shadow one.
if sys.path and sys.path[0] == __file__.rpartition("/")[0]:
    del sys.path[0]

import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402


def _kind(obj, in_class):
    if inspect.isclass(obj):
        return None if in_class else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethoddescriptor(obj):
        return "method" if in_class else "function"
    return None


def _collect(qualname, obj, docs, in_class):
    kind = _kind(obj, in_class)
    text = inspect.getdoc(obj) if kind else None
    if text and len(text) >= 20 and text.isascii():
        docs.append([qualname, kind, text])


def module_docs(module_name):
    """Public functions, classes, exceptions and methods of one module, in sorted order (not deduplicated)."""
    module = importlib.import_module(module_name)
    docs = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", module_name) not in (module_name, None):
            continue
        _collect(f"{module_name}.{name}", obj, docs, in_class=False)
        if inspect.isclass(obj):
            for member, value in sorted(vars(obj).items()):
                if not member.startswith("_"):
                    _collect(f"{module_name}.{name}.{member}", value, docs, in_class=True)
    return docs


def main(module_names):
    found, missing = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in module_names:
            try:
                found[name] = module_docs(name)
            except Exception as error:  # noqa: BLE001 - reported to the caller, which names it
                missing[name] = f"{type(error).__name__}: {error}"
    json.dump({"docs": found, "missing": missing}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
