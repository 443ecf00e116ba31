"""Every output honours the umask, as a file written with open() does: 644 files and 755 dirs under umask 022,
600 / 700 under 077, atomic writes (a private temporary file or dir, renamed) included."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from knowstack.atomic import atomic_dir, atomic_write_json, atomic_write_text, current_umask
from knowstack.registry.store import OBJECTS_DIR


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def wrong_modes(root: Path, mask: int) -> list[str]:
    """Each path under `root` (and root itself) whose mode is not what open()/mkdir() give under `mask`: 666 / 777
    less the mask; a registry object is read-only (444 less the mask)."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            expected = 0o777 & ~mask
        elif OBJECTS_DIR in path.relative_to(root.parent).parts:
            expected = 0o444 & ~mask
        else:
            expected = 0o666 & ~mask
        if mode != expected:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode)}, not {oct(expected)}")
    return wrong


def test_the_umask_is_read_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_writes_honour_the_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "out"
    with atomic_dir(out / "artifact") as tmp:
        (tmp / "plain.txt").write_text("written directly")
        atomic_write_json(tmp / "step.json", {"done": True})
        (tmp / "sub").mkdir()
        atomic_write_text(tmp / "sub" / "report.html", "<html></html>")
    atomic_write_text(out / "results.csv", "a,b\n")
    assert wrong_modes(out, umask) == []


def test_results_tables_and_figures_honour_the_umask(tmp_path: Path, umask: int) -> None:
    from knowstack.report.figures import save_figure
    from knowstack.results import write_csv, write_sqlite

    out = tmp_path / "study"
    out.mkdir()
    write_csv([], out / "results.csv")
    write_sqlite([], out / "results.sqlite")
    fig, _ = plt.subplots()
    save_figure(fig, out / "figures" / "fig1.png")
    assert wrong_modes(out, umask) == []


def test_model_outputs_and_registry_files_honour_the_umask(tmp_path: Path, tiny_model_dir: Path,
                                                           umask: int) -> None:
    """A LoRA adapter and a full fine-tune (with model cards and train summaries), a merge of them, a registry,
    its page and an export: every file and dir of each."""
    from knowstack import api
    from knowstack.registry.page import write_registry_page

    pairs = [(f"Question {i}:", " yes") for i in range(4)]
    recipe = {"lr": 1e-3, "max_steps": 1, "batch_size": 4, "micro_batch_size": 4}
    outputs = [tmp_path / name for name in ("adapter", "fft", "merged", "reg", "page", "export")]
    api.train(tiny_model_dir, pairs, outputs[0], finetune="lora", **recipe)
    api.train(tiny_model_dir, pairs, outputs[1], finetune="fft", **recipe)
    api.merge("average", [outputs[1], outputs[0]], outputs[2], base=tiny_model_dir)
    api.init_registry(outputs[3], tiny_model_dir)
    write_registry_page(outputs[3], outputs[4])
    api.export(outputs[3], "base", outputs[5])
    assert (outputs[4] / "registry.html").is_file()
    assert json.loads((outputs[5] / "knowstack-export.json").read_text())["version"] == "base"
    assert [wrong for out in outputs for wrong in wrong_modes(out, umask)] == []
