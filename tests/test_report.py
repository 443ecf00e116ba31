"""The report's arithmetic (gain from base, BWT, AVE/AVnew/AVall from per-task values), its tables and
claims, partial studies, and the files `knowstack report` writes. Fixtures are synthetic results rows."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pytest
import yaml
from report_rows import METHODS, synthetic_study
from report_rows import TASKS as STUDY_TASKS

from knowstack.cli import main
from knowstack.report.build import build_report, render_report, write_report
from knowstack.report.claims import CLAIMS, FAILS, HOLDS, UNMEASURED, evaluate_claims
from knowstack.report.html import render_html
from knowstack.report.runs import find_runs
from knowstack.report.sections import Section
from knowstack.report.tables import Scores, Table, bwt, percent_change
from knowstack.results import Row, planned_rows, read_csv, write_csv, write_sqlite
from knowstack.study.plan import Evaluation

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


def tables_of(sections: list[Section]) -> dict[str, Table]:
    return {b.key: b for s in sections for b in [s, *s.walk()] if isinstance(b, Table)}


def verdicts_of(rows: list[Row]) -> dict[str, str]:
    scores = Scores.from_rows(rows, STUDY_TASKS)
    return {v.claim.id: v.verdict for v in evaluate_claims(scores, find_runs(scores))}


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
    assert "### Sequential FFT" in text and "Table 1 analog" in text and "Table 3 analog" in text
    bwt_line = next(line for line in text.splitlines() if line.startswith("| BWT"))
    assert "-25%" in bwt_line  # task a: 0.6 right after round 1, 0.45 after round 2
    gain_lines = [line for line in text.splitlines() if line.startswith("| gain from base")]
    assert any("+125%" in line for line in gain_lines)  # task a: 0.2 -> 0.45
    assert any("-25%" in line for line in gain_lines)  # old ks_x: 0.8 -> 0.6


def test_results_round_trip(tmp_path: Path, study_rows: list[Row]) -> None:
    write_csv(study_rows, tmp_path / "results.csv")
    assert read_csv(tmp_path / "results.csv") == study_rows
    write_sqlite(study_rows, tmp_path / "results.sqlite")
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        (count,) = db.execute("SELECT COUNT(*) FROM results WHERE kind = 'new'").fetchone()
    assert count == 9
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.startswith("model,method,finetune,stage,task,kind,metric,value")


def test_write_report_with_figures(tmp_path: Path, study_rows: list[Row]) -> None:
    page = write_report(study_rows, tmp_path, title="t", task_order=TASKS)
    assert page == tmp_path / "report.html"
    text = (tmp_path / "report.md").read_text()
    assert "figures/fig3_sequential_old.png" in text and "figures/r_matrix_sequential_fft.png" in text
    for name in ("fig3_sequential_old", "fig4_sequential_new", "r_matrix_sequential_fft", "summary_tradeoff"):
        assert (tmp_path / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "figures" / "fig1_one_round_new.png").exists()  # no one-round rows given
    html = page.read_text()
    assert html.count("data:image/png;base64,") == len(list((tmp_path / "figures").glob("*.png")))
    assert "http://" not in html and "https://" not in html and "<script" not in html


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
    section = text.split("### O-LoRA vs LoRA")[1].split("\n## ")[0]
    acquisition = [line for line in section.splitlines() if line.startswith("| O-LoRA λ=0.5 |")]
    assert acquisition[0].startswith("| O-LoRA λ=0.5 | 0.5000 | 0.1500 | 0.1000")  # the diagonal of R
    assert acquisition[1] == "| O-LoRA λ=0.5 | -20% | — | — | -20% |"  # BWT of task a: 0.5 -> 0.4
    assert "| sequential LoRA | -50% | — | — | -50% |" in section
    assert "| 2 | 3.25 → 1.5 |" in section
    coop = text.split("## Fully cooperative")[1]
    assert "| replay FFT | 0.6400 | 0.6400 |" in coop  # Table 5: ks_x and AVE
    assert "| replay FFT: gain from base | -20% | -20% |" in coop  # AVE down 20% from the base's 0.8
    joint = next(line for line in coop.splitlines() if line.startswith("| joint LoRA | 0.5000"))
    assert joint.endswith(f"| {(0.5 + 0.2 + 0.3) / 3:.4f} | {(0.5 + 0.2 + 0.3 + 0.76) / 4:.4f} |")


def test_sections_say_not_measured_without_their_methods(study_rows: list[Row]) -> None:
    text = render_report(study_rows, title="t", task_order=TASKS)
    assert "Not measured: this study has no O-LoRA, merge or MoE results." in text
    assert "Not measured: this study has no replay or joint results." in text
    assert "### O-LoRA vs LoRA" not in text and "Table 5 analog" not in text


def test_table6_averages_are_computed_not_copied() -> None:
    """The paper's Table 6 prints AVnew and AVall swapped for LoRA, FFT and FFT-Rep: the per-task values
    (its Tables 5-6) give LoRA AVnew 0.5425, AVall 0.5946, not the printed 0.595 / 0.543."""
    old = {"mmlu": 0.5974, "arc_c": 0.5154, "comqa": 0.6921, "hella": 0.781, "opnbk": 0.448, "piqa": 0.8101,
           "wino": 0.7348}
    new = {"cstan": 0.508, "fomc": 0.599, "meet": 0.348, "py150": 0.544, "sci": 0.531, "20min": 0.390}
    math = {"em_direct": 0.710, "em_cot": 0.710}

    def paper_rows(model: str, method: str) -> list[Row]:
        common = {"model": model, "method": method, "finetune": "lora" if method != "base" else "", "n": None,
                  "stage": 7 if method != "base" else None, "trained_on": "math" if method != "base" else ""}
        rows = [Row(task=t, kind="old", metric="acc", value=v, **common) for t, v in old.items()]
        rows += [Row(task=t, kind="new", metric="score", value=v, **common) for t, v in new.items()]
        return rows + [Row(task="math", kind="new", metric=m, value=v, **common) for m, v in math.items()]

    rows = paper_rows("base", "base") + paper_rows("sequential-lora-7", "sequential") + paper_rows(
        "replay-lora-7", "replay")
    order = [*new, "math"]
    table6 = tables_of(build_report(rows, title="paper", task_order=order))["table6_fully_cooperative_new"]
    lora = table6.row("sequential LoRA (rounds 7-7 of 7)")
    assert table6.header[-2:] == ["AVnew", "AVall"]
    assert lora.cells[-2] == pytest.approx(sum([*new.values(), *math.values()]) / 8)  # 0.5425
    assert lora.cells[-1] == pytest.approx(sum([*old.values(), *new.values(), *math.values()]) / 15)  # 0.5946
    assert lora.cells[-2] == pytest.approx(0.543, abs=1e-3) and lora.cells[-1] == pytest.approx(0.595, abs=1e-3)


def test_claims_cover_the_papers_findings() -> None:
    statements = " | ".join(c.statement for c in CLAIMS)
    for finding in ("One-round FFT loses more old knowledge than one-round LoRA", "higher λ acquires less",
                    "Replay beats plain sequential training", "MoE mixing gains the most from the base",
                    "TIES and TIES-DARE are weak on new knowledge",
                    "LoRA keeps old knowledge better than FFT in every fully-cooperative regime",
                    "replay does better than joint training on new knowledge", "Premise, not a finding",
                    "about -7% with FFT and -1% with LoRA", "O-LoRA comes second"):
        assert finding in statements
    assert sorted(c.id for c in CLAIMS) == sorted(f"C{i}" for i in range(1, 31))
    assert all(c.checks and c.quote and c.source for c in CLAIMS)


def test_verdicts_follow_the_numbers() -> None:
    rows = synthetic_study()
    verdicts = verdicts_of(rows)
    assert verdicts["C1"] == HOLDS and verdicts["C25"] == HOLDS
    # the synthetic world's old knowledge has no MMLU: the claims about it are the only ones not measured
    assert [c for c, v in verdicts.items() if v == UNMEASURED] == ["C21", "C26"]
    # C12 needs each MoE ahead of every merge and O-LoRA run on old knowledge too, and the FFT MoE loses 4% of it,
    # the LoRA MoE 1%, as much as the LoRA merges; with both MoEs losing 0.5%, it holds
    assert verdicts["C12"] == FAILS

    def kept(row: Row) -> Row:
        if row.method == "moe" and row.kind == "old":
            lost = 0.96 if row.finetune == "fft" else 0.99
            return Row(**{**row.__dict__, "value": round(row.value / lost * 0.995, 4)})
        return row

    assert verdicts_of([kept(r) for r in rows])["C12"] == HOLDS

    # The same claims on other numbers: one-round FFT now keeps old knowledge better than LoRA, and
    # LoRA-MoE loses most of what it mixed.
    def changed(row: Row) -> Row:
        if row.model.startswith("one-round-fft") and row.kind == "old":
            return Row(**{**row.__dict__, "value": 0.99})
        if row.model == "moe-lora" and row.kind == "new":
            return Row(**{**row.__dict__, "value": 0.0})
        return row

    flipped = verdicts_of([kept(changed(r)) for r in rows])
    assert flipped["C1"] == FAILS and flipped["C12"] == FAILS  # both MoEs must be best, not the better one
    without_moe = verdicts_of([r for r in rows if r.method != "moe"])
    assert without_moe["C12"] == UNMEASURED and without_moe["C1"] == HOLDS
    one_lambda = verdicts_of([r for r in rows if not r.model.startswith("olora-lora-5-")])
    assert one_lambda["C9"] == UNMEASURED and one_lambda["C8"] == HOLDS


@pytest.mark.parametrize("missing", METHODS)
def test_report_builds_with_any_method_missing(missing: str) -> None:
    rows = [r for r in synthetic_study() if r.method != missing]
    sections = build_report(rows, title="t", task_order=STUDY_TASKS)
    html = render_html(sections, title="t")
    summary = html[html.index('<section id="summary">'):html.index('<section id="claims">')]
    assert {m for m in METHODS if m != missing} == {m for m in METHODS if f'data-method="{m}"' in summary}
    assert f'data-method="{missing}"' not in summary


def test_partial_study_says_what_is_missing() -> None:
    everything = synthetic_study(("base", "sequential"))
    plan = [Evaluation(r.model, r.method, r.finetune, r.stage, "step", r.trained_on)
            for r in {r.model: r for r in everything}.values()]
    plan.append(Evaluation("moe-lora", "moe", "lora", None, "step", "+".join(STUDY_TASKS)))
    rows = [r for r in everything if not (r.finetune == "lora" and (r.stage or 0) > 3)]
    text = render_report(rows, title="t", task_order=STUDY_TASKS).replace("\n", " ")
    assert "Sequential LoRA (rounds in order: 1 stance, 2 notes, 3 summary; partial: rounds 1-3 of 7)" in text
    sections = build_report(rows, title="t", task_order=STUDY_TASKS, planned=planned_rows(plan))
    summary = " ".join(b for b in sections[0].blocks if isinstance(b, str))
    assert "Partial study, still to come: sequential LoRA (4 of 7 models to go); MoE LoRA (1 of 1 models to go)." \
        in summary
    coverage = tables_of(sections)["coverage"]
    assert coverage.row("MoE LoRA").cells[-1] == "planned, no results yet"
    assert coverage.row("sequential LoRA").cells[-1].startswith(
        "partial: no results for sequential-lora-4")
    assert "FFT-MoE" in summary and "LoRA-MoE" not in summary  # not planned vs planned


def test_tables_written_as_csv_and_markdown(tmp_path: Path) -> None:
    write_report(synthetic_study(("base", "sequential", "replay", "joint")), tmp_path, title="t",
                 task_order=STUDY_TASKS)
    for key in ("table1_sequential_fft_old", "table2_sequential_lora_old", "table3_sequential_fft_new",
                "table4_sequential_lora_new", "table5_fully_cooperative_old", "table6_fully_cooperative_new",
                "claims", "summary"):
        assert (tmp_path / "tables" / f"{key}.md").is_file()
    with (tmp_path / "tables" / "table6_fully_cooperative_new.csv").open() as handle:
        table6 = list(csv.DictReader(handle))
    assert [r["model"] for r in table6][:2] == ["base", "sequential FFT"]
    assert float(table6[0]["AVall"]) == pytest.approx(Scores.from_rows(synthetic_study(("base",)), STUDY_TASKS)
                                                      .averages("base")["AVall"])


def study_dir(tmp_path: Path, methods: dict) -> Path:
    config = {"name": "cli-report", "base": {"builtin": "test"}, "tasks": "builtin",
              "training": {"lr_of_pretrain_peak": 0.1}, "methods": methods}
    out = tmp_path / "study"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return out


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = study_dir(tmp_path, {"sequential": {"finetune": ["fft", "lora"]}, "joint": {"finetune": ["lora"]}})
    write_csv(synthetic_study(("base", "sequential")), out / "results.csv")
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report:   {(out / 'report.html').resolve()}"
    html = (out / "report.html").read_text()
    assert "joint LoRA (1 of 1 models to go)" in html  # planned in config.yaml, no results yet
    assert (out / "tables" / "table3_sequential_fft_new.csv").is_file()


def test_cli_report_outside_a_study_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "not a study dir" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    out = study_dir(tmp_path, {"sequential": {"finetune": ["fft"]}})
    assert main(["report", str(out)]) == 2
    assert "no results yet" in " ".join(capsys.readouterr().err.split()) and not (out / "report.html").exists()


def test_a_mixture_of_some_tasks_says_which() -> None:
    experts = "summary+code+quiz+math"
    rows = [Row(**{**r.__dict__, "trained_on": experts}) if r.model == "moe-fft" else r
            for r in synthetic_study(("base", "moe"))]
    summary = tables_of(build_report(rows, title="t", task_order=STUDY_TASKS))["summary"]
    assert [r.label for r in summary.rows] == ["base", "MoE FFT (4 of 7 tasks: summary, code, quiz, math)",
                                              "MoE LoRA"]
