"""The registry scenario of docs/registry.md, run as a user runs it (examples/registry-scenario.sh on the quick built-in
world): 7 one-round LoRA contributions and one harmful fine-tune; MoE-LoRA and TIES versions; the version
that takes in the harmful contribution is rejected by the forgetting gate, with its numbers; log and diff
show the lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from knowstack.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
GOOD = ["stance", "notes", "summary", "code", "quiz", "simplify", "math"]


@pytest.mark.slow
def test_the_registry_scenario_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scenario"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "KNOWSTACK": str(bin_dir / "knowstack"), "PYTHON": sys.executable}
    run = subprocess.run([str(ROOT / "examples" / "registry-scenario.sh"), str(out), "quick"], env=env,
                         capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout

    with Registry.open(out / "registry") as reg:
        records = {r["name"]: r for r in reg.versions()}
    contributions = [name for name, r in records.items() if r["method"] == "contribution"]
    assert contributions == [*GOOD, "stance-hot"]
    assert records["math"]["task_format"] == "math" and records["stance-hot"]["kind"] == "model"
    versions = ["v1-moe", "v2-ties", "v3-ties-all", "v4-moe-trained"]
    assert [name for name, r in records.items() if r["method"] not in ("base", "contribution")] == versions
    assert records["v1-moe"]["parents"] == GOOD  # a LoRA-MoE leaves the full fine-tune out
    assert records["v3-ties-all"]["parents"] == [*GOOD, "stance-hot"]
    for name in versions:
        gate = records[name]["settings"]["gate"]
        assert records[name]["status"] == ("released" if all(c["passed"] for c in gate["checks"]) else "rejected")
        assert len({c["what"] for c in gate["checks"]}) == 1 + len(GOOD)  # old AVE and every registered task

    # the harmful contribution's version is rejected for the old knowledge it wipes, numbers recorded
    harmful = records["v3-ties-all"]
    [old_vs_base] = [c for c in harmful["settings"]["gate"]["checks"]
                     if c["what"] == "old AVE" and c["reference_version"] == "base"]
    assert harmful["status"] == "rejected" and not old_vs_base["passed"]
    assert old_vs_base["value"] < old_vs_base["floor"] < old_vs_base["reference"]
    assert f"old AVE {old_vs_base['value']:.3f} vs base {old_vs_base['reference']:.3f}" in printed
    assert "v3-ties-all: rejected (merge-ties of 8 contributions, built on base)" in printed

    # log (newest first, with lineage) and diff (what changed, task by task)
    assert printed.index("v4-moe-trained  [") < printed.index("v3-ties-all  [") < printed.index("v1-moe  [")
    assert "built on base with 8 contributions: stance, notes, summary, code, quiz, simplify, math, stance-hot" in printed
    assert "contributions added: stance-hot; left out: none" in printed
    # every version gated against what it was built from (the base), whatever was composed before it
    assert all(c["reference_version"] == "base" for name in versions for c in records[name]["settings"]["gate"]["checks"])
    assert "new Math" in printed and "AVnew" in printed and "AVE" in printed
    info = json.loads((out / "export" / "v1-moe" / "knowstack-export.json").read_text())
    assert info["kind"] == "adapter" and (out / "export" / "v1-moe" / "base" / "config.json").is_file()
    assert "Next version, within a 2% old-knowledge loss (semi-cooperative" in printed
    assert "(4 versions)" in printed and (out / "versions.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "page" / "registry.html").read_text()
    assert page.count('class="gate-check"') == sum(len(records[v]["settings"]["gate"]["checks"]) for v in versions)
