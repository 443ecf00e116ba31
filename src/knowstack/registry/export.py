"""`knowstack export`: one version as plain files a user loads without the registry.

A full model (base, FFT contribution, merge, FFT-MoE, sequential...) becomes an ordinary HF model dir;
an adapter (LoRA contribution, LoRA-MoE, joint LoRA) becomes its PEFT / LoRA-MoE dir, with the base
model beside it in `base/` when asked (--with-base), since an adapter means nothing without its base.
Every file is verified against its hash on the way out; the export is written under a temporary name
and renamed, with `knowstack-export.json` saying what it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from knowstack.atomic import atomic_dir, atomic_write_json
from knowstack.registry.core import BASE_NAME, Registry, is_url
from knowstack.registry.store import safe_relative
from knowstack.validate import check_out_dir, raise_problems

EXPORT_FILE = "knowstack-export.json"
BASE_SUBDIR = "base"


def _copy_files(reg: Registry, files: dict[str, str], into: Path) -> None:
    for name, sha in sorted(files.items()):
        target = into / safe_relative(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reg.store.verified_path(sha), target)  # a copy: the export outlives the registry


def export_version(root: str | Path, name: str, out: str | Path, *, with_base: bool = False,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write version `name` to `out`, a new or empty dir (or, with `overwrite`, any dir but the registry's own);
    returns the export record."""
    out = Path(out).expanduser()
    raise_problems(check_out_dir(out, overwrite=overwrite, inputs=[] if is_url(root) else [root]))
    with Registry.open(root) as reg:
        record = reg.version(name)
        base = reg.base()
        with atomic_dir(out) as tmp:
            _copy_files(reg, record["files"], tmp)
            needs_base = record["kind"] == "adapter"
            if needs_base and with_base:
                _copy_files(reg, base["files"], tmp / BASE_SUBDIR)
            info = {"version": record["name"], "status": record["status"], "kind": record["kind"],
                    "method": record["method"], "content_hash": record["content_hash"],
                    "parents": record["parents"], "base_content_hash": base["content_hash"],
                    "base": f"./{BASE_SUBDIR}" if needs_base and with_base else None,
                    "load": _how_to_load(record, with_base),
                    "scores": [{k: s[k] for k in ("task", "kind", "metric", "value", "n", "protocol")} for s in record["scores"]]}
            atomic_write_json(tmp / EXPORT_FILE, info)
            from knowstack.modelcard import registry_card, write_model_card

            write_model_card(tmp, registry_card(record, base, reg.versions(), reg.label, info["load"]))
        return info


def _how_to_load(record: dict[str, Any], with_base: bool) -> str:
    if record["kind"] != "adapter":
        return "AutoModelForCausalLM.from_pretrained(DIR)"
    base = "DIR/base" if with_base else f"the registry's base (export '{BASE_NAME}')"
    if "lora_moe.json" in record["files"]:
        return f"knowstack.modelio.load_model({base}, DIR): a LoRA-MoE applied to the base"
    return f"peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), DIR)"
