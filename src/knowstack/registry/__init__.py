"""The collaborative registry: one shared base model, many contributors' adapters and fine-tunes, every
one stored by content hash, checked against the base, scored on its own task and recorded: in SQLite in a
local dir, or in an append-only log at a URL fsspec reaches (`s3://bucket/reg`; see records.py).

    init_registry("reg", "base-model-dir", old_tasks=["ks_country_code"], include_path="world/old_knowledge")
    from knowstack.registry.contribute import contribute
    contribute("reg", "stance-ann", adapter="out/adapter", task="data/Stance", metric="accuracy")
    Registry.open("reg").versions()

Names are imported on first use: reading a registry (`registry list`) does not pay for torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# `contribute` is not re-exported: the submodule of the same name would shadow it once imported.
_EXPORTS = {"init_registry": "base", "Registry": "core", "check_name": "core", "format_listing": "listing"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'knowstack.registry' has no attribute {name!r}")
    return getattr(import_module(f"knowstack.registry.{_EXPORTS[name]}"), name)
