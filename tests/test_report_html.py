"""report.html in a real headless Chromium: it loads without console errors, fetches nothing, every figure
renders, and the summary lists every method in the results. Screenshots are kept in the test's tmp dir."""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from report_rows import TASKS, synthetic_study

from knowstack.report.build import write_report
from knowstack.results import Row

INSTALL = "install it with `apt-get install -y chromium chromium-driver` (`make test` does so where apt-get works)"


def browser_paths() -> tuple[str, str]:
    binary = next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip(f"no headless browser: {'chromium' if binary is None else 'chromedriver'} not found; {INSTALL}")
    return binary, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium missing: pip install -e '.[dev]'")
    binary, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver path is given, so selenium never runs its manager (which would try the network).
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: object, page: Path, shots: Path) -> dict:
    """Loads the page, takes a screenshot of the top and of the whole page, and returns what it found."""
    driver.get(page.as_uri())
    # Large data-URI images may still be decoding when get() returns on a loaded machine: wait (bounded)
    # for them, so the checks below judge the page and not the machine's load.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not driver.execute_script(
            "return document.readyState === 'complete' && "
            "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0);"):
        time.sleep(0.1)
    found = driver.execute_script("""
        return {
          state: document.readyState,
          images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth,
                                                          src: i.src.slice(0, 22), alt: i.alt})),
          methods: Array.from(document.querySelectorAll('#summary tr[data-method]')).map(r => r.dataset.method),
          fetched: performance.getEntriesByType('resource').map(e => e.name),
          scripts: document.scripts.length,
          summary: document.querySelector('#summary').innerText,
          height: document.documentElement.scrollHeight,
        };""")
    found["errors"] = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    driver.save_screenshot(str(shots / f"{page.parent.name}-top.png"))
    full = driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": 1280, "height": min(found["height"], 16000), "scale": 0.5}})
    (shots / f"{page.parent.name}-full.png").write_bytes(base64.b64decode(full["data"]))
    return found


def check_page(found: dict, rows: list[Row], figures: int) -> None:
    assert found["state"] == "complete"
    assert found["errors"] == [], found["errors"]
    assert found["scripts"] == 0 and found["fetched"] == []  # self-contained: nothing loaded from anywhere
    assert len(found["images"]) == figures > 0
    for image in found["images"]:
        assert image["complete"] and image["width"] > 0, image["alt"]
        assert image["src"].startswith("data:image/png;base64")
    assert set(found["methods"]) == {r.method for r in rows}


def test_full_study_page_in_chromium(tmp_path: Path, browser: object) -> None:
    rows = synthetic_study()
    page = write_report(rows, tmp_path / "full", title="synthetic", task_order=TASKS)
    found = open_page(browser, page, tmp_path)
    check_page(found, rows, figures=len(list((tmp_path / "full" / "figures").glob("*.png"))))
    assert "hold" in found["summary"] and "Not in this study" not in found["summary"]
    assert (tmp_path / "full-top.png").read_bytes().startswith(b"\x89PNG")


def test_partial_study_page_in_chromium(tmp_path: Path, browser: object) -> None:
    rows = [r for r in synthetic_study(("base", "sequential", "merge"))
            if not (r.method == "sequential" and r.finetune == "lora" and (r.stage or 0) > 3)]
    page = write_report(rows, tmp_path / "partial", title="partial", task_order=TASKS)
    found = open_page(browser, page, tmp_path)
    check_page(found, rows, figures=len(list((tmp_path / "partial" / "figures").glob("*.png"))))
    assert "rounds 1-3 of 7" in found["summary"]
    assert "Not in this study (not measured)" in found["summary"] and "LoRA-MoE" in found["summary"]
