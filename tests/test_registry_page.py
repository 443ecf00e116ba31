"""`knowstack registry report`: the registry's page, on a registry of several versions built from the tiny model,
opened in a real headless Chromium: it loads without console errors, has no script and fetches nothing, draws the
lineage of every version and the learn/forget plane, and shows every gate check and registered task with the
recorded numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_compose import registry  # noqa: F401  (the fixture: a registry with four contributions)
from test_report_html import browser  # noqa: F401  (the fixture: headless Chromium)

from knowstack.cli import main
from knowstack.registry import Registry
from knowstack.registry.compose import ComposeOptions, compose
from knowstack.registry.evaluate import registered_tasks
from knowstack.registry.page import lineage_layers, write_registry_page


@pytest.fixture()
def history(registry: Path) -> Path:  # noqa: F811
    """Four composed versions: a TIES merge and an average built on it, both under a gate that lets anything
    through (the tiny model's random adapters fail any real one), and two held to a gate they cannot pass, the
    second released anyway (--force-release)."""
    loose = {"gate_old": 100.0, "gate_task": 100.0}
    compose(registry, "merge-ties", contributions=["stance", "quiz-ft"], options=ComposeOptions(density=0.5), **loose)
    compose(registry, "merge-average", contributions=["notes"], start="v1", **loose)
    compose(registry, "merge-ties-dare", contributions=["stance", "notes", "math"], gate_task=0.0, gate_old=0.0,
            options=ComposeOptions(drop_rate=0.9))
    # the same held to the same gate, and released anyway
    compose(registry, "merge-ties-dare", contributions=["stance", "notes", "math"], gate_task=0.0, gate_old=0.0,
            options=ComposeOptions(drop_rate=0.9, seed=1), force_release=True)
    return registry


def test_layers_put_each_version_right_of_what_it_was_made_from() -> None:
    def rec(name: str, parents: list[str], previous: str | None = None) -> dict:
        return {"name": name, "parents": parents, "settings": {"previous": previous} if previous else {}}

    # v2 was built on v1 (a parent); v3 is only gated against v2 (its previous release), not made from it
    records = [rec("base", []), rec("a", ["base"]), rec("b", ["base"]), rec("v1", ["a"]), rec("v2", ["v1", "b"]),
               rec("v3", ["b"], "v2")]
    assert lineage_layers(records) == {"base": 0, "a": 1, "b": 1, "v1": 2, "v2": 3, "v3": 2}


def test_the_registry_page_opens_cleanly_in_chromium(history: Path, tmp_path: Path, browser: object) -> None:  # noqa: F811
    assert main(["registry", "report", str(history), "--out", str(tmp_path / "page")]) == 0
    page = tmp_path / "page" / "registry.html"
    assert page == write_registry_page(history, tmp_path / "page")  # the CLI and the function write the same page
    with Registry.open(history) as reg:
        records = reg.versions()
    tasks = registered_tasks(records)
    browser.get(page.as_uri())
    found = browser.execute_script("""
        return {
          state: document.readyState,
          scripts: document.scripts.length,
          fetched: performance.getEntriesByType('resource').map(e => e.name),
          images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth})),
          nodes: Array.from(document.querySelectorAll('#lineage-graph g.node')).map(g => g.dataset.version),
          edges: document.querySelectorAll('#lineage-graph line').length,
          graphWidth: document.querySelector('#lineage-graph').getBoundingClientRect().width,
          versions: Array.from(document.querySelectorAll('#versions tr[data-version]')).map(r => r.dataset.version),
          checks: Array.from(document.querySelectorAll('tr.gate-check')).map(r => r.dataset.passed),
          sections: Array.from(document.querySelectorAll('section[id^=version-]')).map(s => s.id),
          tasks: Array.from(document.querySelectorAll('#version-v1 tr[data-task]')).map(r => r.dataset.task),
          v1: document.querySelector('#version-v1').innerText,
          v2: document.querySelector('#version-v2').innerText,
          v4: document.querySelector('#version-v4').innerText,
          verdicts: Array.from(document.querySelectorAll('tr.gate-check')).map(r => r.dataset.verdict),
        };""")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    browser.save_screenshot(str(tmp_path / "registry-page.png"))
    assert found["state"] == "complete" and errors == []
    assert found["scripts"] == 0 and found["fetched"] == []
    assert len(found["images"]) == 1 and found["images"][0]["complete"] and found["images"][0]["width"] > 0
    assert sorted(found["nodes"]) == sorted(r["name"] for r in records) and found["graphWidth"] > 0
    # one arrow per parent (v2's include v1, which it was built on)
    assert found["edges"] == sum(len(r["parents"]) for r in records)
    assert found["versions"] == [r["name"] for r in reversed(records)]
    composed = [r for r in records if r["method"].startswith("merge-")]
    assert found["sections"] == [f"version-{r['name']}" for r in reversed(composed)]
    gate_checks = [c for r in reversed(composed) for c in r["settings"]["gate"]["checks"]]
    assert found["checks"] == [str(c["passed"]).lower() for c in gate_checks]
    # v3's zero-tolerance gate has checks below their floor: each is shown as the record decided it (failed, or
    # passed because the paired interval does not support a loss beyond the limit)
    v3 = next(r for r in records if r["name"] == "v3")
    assert any(c["value"] < c["floor"] for c in v3["settings"]["gate"]["checks"])
    assert found["tasks"] == list(tasks)
    v1 = next(r for r in records if r["name"] == "v1")
    for check in v1["settings"]["gate"]["checks"]:
        assert f"{check['value']:.3f}" in found["v1"] and f"{check['floor']:.3f}" in found["v1"]
        # each row with the paired interval of the change and its n
        assert f"[{check['ci_low']:+.3f}, {check['ci_high']:+.3f}]\t{check['n']}" in found["v1"]
    assert found["verdicts"] == [c["verdict"] for r in reversed(composed) for c in r["settings"]["gate"]["checks"]]
    assert "against base (what it was built from)" in found["v1"] and "against v1 (what it was built from; base for old knowledge)" in found["v2"]
    v4 = next(r for r in records if r["name"] == "v4")
    assert v3["status"] == "rejected" and v4["status"] == "released" and v4["settings"]["gate"]["forced"]
    assert "Released by --force-release although the gate failed" in found["v4"]
