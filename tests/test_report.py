"""The report's arithmetic: gain from base, BWT and AVE/AVnew/AVall from per-task values."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowstack.report.markdown import render_report
from knowstack.report.tables import Scores, bwt, percent_change
from knowstack.study.results import Row, read_csv, write_csv, write_sqlite

TASKS = ["a", "math"]


def rows_for(model: str, method: str, finetune: str, stage: int | None, trained_on: str,
             a: float, direct: float, cot: float, old: float) -> list[Row]:
    common = {"model": model, "method": method, "finetune": finetune, "stage": stage, "trained_on": trained_on}
    return [
        Row(task="a", kind="new", metric="accuracy", value=a, n=10, **common),
        Row(task="math", kind="new", metric="em_direct", value=direct, n=10, **common),
        Row(task="math", kind="new", metric="em_cot", value=cot, n=10, **common),
        Row(task="ks_x", kind="old", metric="acc", value=old, n=None, **common),
        Row(task="ks_x", kind="old", metric="acc_norm", value=old / 2, n=None, **common),
    ]


@pytest.fixture
def study_rows() -> list[Row]:
    return (
        rows_for("base", "base", "", None, "", 0.2, 0.1, 0.0, 0.8)
        + rows_for("sequential-fft-1", "sequential", "fft", 1, "a", 0.6, 0.1, 0.05, 0.7)
        + rows_for("sequential-fft-2", "sequential", "fft", 2, "math", 0.45, 0.3, 0.4, 0.6)
    )


def test_averages_count_math_as_two_columns(study_rows: list[Row]) -> None:
    scores = Scores.from_rows(study_rows, TASKS)
    assert [c[1:] for c in scores.new_columns] == [("a", "accuracy"), ("math", "em_direct"), ("math", "em_cot")]
    avg = scores.averages("sequential-fft-2")
    assert avg["AVE"] == pytest.approx(0.6)
    assert avg["AVnew"] == pytest.approx((0.45 + 0.3 + 0.4) / 3)
    assert avg["AVall"] == pytest.approx((0.45 + 0.3 + 0.4 + 0.6) / 4)


def test_percent_change_and_bwt() -> None:
    assert percent_change(0.2, 0.45) == pytest.approx(125.0)
    assert percent_change(0.0, 0.5) is None
    assert bwt(0.6, 0.45) == pytest.approx(-25.0)


def test_report_tables(study_rows: list[Row]) -> None:
    text = render_report(study_rows, title="t", task_order=TASKS)
    assert "## Sequential FFT" in text
    bwt_line = next(line for line in text.splitlines() if line.startswith("| BWT"))
    assert "-25%" in bwt_line  # task a: 0.6 right after round 1, 0.45 after round 2
    gain_lines = [line for line in text.splitlines() if line.startswith("| gain from base")]
    assert any("+125%" in line for line in gain_lines)  # task a: 0.2 -> 0.45
    assert any("-25%" in line for line in gain_lines)  # old ks_x: 0.8 -> 0.6


def test_results_round_trip(tmp_path: Path, study_rows: list[Row]) -> None:
    write_csv(study_rows, tmp_path / "results.csv")
    assert read_csv(tmp_path / "results.csv") == study_rows
    write_sqlite(study_rows, tmp_path / "results.sqlite")
    import sqlite3

    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        (count,) = db.execute("SELECT COUNT(*) FROM results WHERE kind = 'new'").fetchone()
    assert count == 9
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.startswith("model,method,finetune,stage,task,kind,metric,value")


def test_write_report_with_figures(tmp_path: Path, study_rows: list[Row]) -> None:
    from knowstack.report.markdown import write_report

    path = write_report(study_rows, tmp_path, title="t", task_order=TASKS)
    text = path.read_text()
    assert "figures/fig3_sequential_old.png" in text and "figures/r_matrix_fft.png" in text
    for name in ("fig3_sequential_old.png", "fig4_sequential_new.png", "r_matrix_fft.png"):
        assert (tmp_path / "figures" / name).read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "figures" / "fig1_one_round_new.png").exists()  # no one-round rows given


def test_olora_and_fully_cooperative_sections(study_rows: list[Row]) -> None:
    rows = study_rows + (
        rows_for("sequential-lora-1", "sequential", "lora", 1, "a", 0.5, 0.1, 0.0, 0.8)
        + rows_for("sequential-lora-2", "sequential", "lora", 2, "math", 0.25, 0.2, 0.2, 0.8)
        + rows_for("olora-lora-0.5-1", "olora", "lora", 1, "a", 0.5, 0.1, 0.0, 0.8)
        + rows_for("olora-lora-0.5-2", "olora", "lora", 2, "math", 0.4, 0.15, 0.1, 0.8)
        + rows_for("replay-fft-1", "replay", "fft", 1, "a", 0.6, 0.1, 0.05, 0.7)
        + rows_for("replay-fft-2", "replay", "fft", 2, "math", 0.55, 0.3, 0.4, 0.64)
        + rows_for("joint-lora", "joint", "lora", None, "a+math", 0.5, 0.2, 0.3, 0.76)
    )
    penalties = {"olora-lora-0.5-2": {"stage": 2, "lambda": 0.5, "first": 3.25, "last": 1.5, "steps": 4}}
    text = render_report(rows, title="t", task_order=TASKS, penalties=penalties)
    lines = text.splitlines()
    section = text.split("## O-LoRA vs LoRA")[1].split("## ")[0]
    acquisition = [line for line in section.splitlines() if line.startswith("| O-LoRA λ=0.5")]
    assert acquisition[0].startswith("| O-LoRA λ=0.5 | 0.5000 | 0.1500 | 0.1000")  # the diagonal of R
    assert acquisition[1] == "| O-LoRA λ=0.5 | -20% | — | — |"  # BWT of task a: 0.5 -> 0.4
    assert "| LoRA | -50% | — | — |" in section
    assert "| 2 | 3.25 → 1.5 |" in section
    coop = text.split("## Fully cooperative")[1]
    replay = next(line for line in coop.splitlines() if line.startswith("| replay FFT") and "-20%" in line)
    assert replay.endswith("| 0.6400 | -20% |")  # AVE 0.64, down 20% from the base's 0.8
    joint = next(line for line in lines if line.startswith("| joint LoRA") and "0.3333" in line)
    assert joint.endswith(f"| {(0.5 + 0.2 + 0.3) / 3:.4f} | {(0.5 + 0.2 + 0.3 + 0.76) / 4:.4f} |")


def test_sections_absent_without_their_methods(study_rows: list[Row]) -> None:
    text = render_report(study_rows, title="t", task_order=TASKS)
    assert "O-LoRA" not in text and "Fully cooperative" not in text
