"""Every sentence the report and `advise` generate agrees with the tables beside it, on studies with zero,
missing and complete runs (issue 32: "a report that cannot contradict itself"). `fixtures/zero_study` is a real
study of the built-in `test` world (its config.yaml; 12 runs, 2 tasks, 6 test items each) whose base and trained
models all score 0 on new knowledge, with its per-item scores (intervals) and many ties."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from report_rows import OLD, TASKS, rows_of, synthetic_study

from knowstack.cli import main
from knowstack.report.advice import SETTING_METHODS
from knowstack.report.build import build_report, study_advice
from knowstack.report.claims import NO_SIGNAL
from knowstack.report.html import render_html
from knowstack.report.sections import Section
from knowstack.report.tables import Table, fmt_score
from knowstack.results import PER_EXAMPLE, Row, read_csv, read_items, write_csv

REAL = Path(__file__).parent / "fixtures" / "zero_study"
REAL_TASKS = ["stance", "notes"]  # its config.yaml's

EVERYTHING = "+".join(TASKS)
SEMI_MERGES = (("merge-average-fft", "merge", "fft"), ("merge-average-lora", "merge", "lora"),
               ("merge-ties-fft", "merge", "fft"), ("merge-ties-lora", "merge", "lora"),
               ("moe-fft", "moe", "fft"), ("moe-lora", "moe", "lora"))


def state(new: dict[str, float] | None = None, old_scale: float = 1.0) -> tuple[dict, dict]:
    """New-knowledge scores 0 unless given; old knowledge the fixture's, scaled."""
    return {t: 0.0 for t in TASKS} | (new or {}), {t: v * old_scale for t, v in OLD.items()}


def zero_study() -> list[Row]:
    """The 11-run study a new user met on the built-in `test` world: the base and almost every run score 0 on new
    knowledge; only one-round FFT learns a little (AVnew 0.042 among its models); MoE LoRA keeps old knowledge
    better than the base (+8%)."""
    rows = rows_of("base", "base", "", None, "", state())
    for task in TASKS:
        rows += rows_of(f"one-round-fft-{task}", "one-round", "fft", None, task, state({task: 0.042}, 0.8))
        rows += rows_of(f"one-round-lora-{task}", "one-round", "lora", None, task, state({}, 0.95))
    for ft, scale in (("fft", 0.7), ("lora", 0.9)):
        for stage, task in enumerate(TASKS, start=1):
            rows += rows_of(f"sequential-{ft}-{stage}", "sequential", ft, stage, task, state({}, scale))
    for (name, method, ft), scale in zip(SEMI_MERGES, (0.85, 0.97, 0.8, 0.96, 0.9, 1.08), strict=True):
        rows += rows_of(name, method, ft, None, EVERYTHING, state({}, scale))
    return rows


def missing_study() -> list[Row]:
    """Complete runs beside partial ones: sequential LoRA stopped after round 3, a merge without one new column,
    and a MoE with no results at all."""
    rows = [r for r in synthetic_study(("base", "one-round", "sequential", "merge"))
            if not (r.model.startswith("sequential-lora-") and (r.stage or 0) > 3)]
    return [r for r in rows if not (r.model == "merge-ties-fft" and r.task == "code")]


def real_study() -> list[Row]:
    return read_csv(REAL / "results.csv")


STUDIES = {"zero": zero_study, "missing": missing_study, "complete": synthetic_study, "real-zero": real_study}


def sections_of(rows: list[Row]) -> list[Section]:
    """The report's sections; the real study's with its per-item scores (every number with an interval)."""
    if rows and rows[0].protocol == "builtin":
        return build_report(rows, title="t", task_order=REAL_TASKS, items=read_items(REAL / PER_EXAMPLE))
    return build_report(rows, title="t", task_order=TASKS)


def tables_of(sections: list[Section]) -> dict[str, Table]:
    return {b.key: b for s in sections for b in [s, *s.walk()] if isinstance(b, Table)}


def summary_of(sections: list[Section]) -> tuple[list[str], list[str]]:
    """The summary's paragraphs and its highlight bullets."""
    summary = sections[0]
    return [b for b in summary.blocks if isinstance(b, str)], next(b for b in summary.blocks if isinstance(b, list))


def column(table: Table, name: str) -> dict[str, object]:
    """label -> the cell of `name` in each row."""
    i = table.header.index(name) - 1
    return {r.label: r.cells[i] for r in table.rows}


def shown(value: float) -> str:
    return fmt_score(value).split(" ")[0]


PARTIAL = re.compile(r" \((rounds \d+-\d+ of \d+|\d+ of \d+ tasks)\)$")  # how a partial run's label ends


def ranked_rows(summary: Table, one_round: bool) -> list[str]:
    """The labels of the rows a ranking reads: complete trained runs with both averages (single models only, or
    one-round runs too)."""
    settings, avnew, ave = column(summary, "setting"), column(summary, "AVnew"), column(summary, "AVE (old)")
    return [label for label, s in settings.items() if s != "base" and (one_round or s != "one-round")
            and not PARTIAL.search(label) and avnew[label] is not None and ave[label] is not None]


HIGHLIGHT = re.compile(r"^(?P<what>Keeps the most old knowledge|Learns the most new knowledge|Best on old and new "
                       r"together|Loses the most old knowledge) among the (?P<n>\d+) single-model runs: (?P<rest>.*)\.$")
STATS = {"Keeps the most old knowledge": ("AVE (old)", max), "Learns the most new knowledge": ("AVnew", max),
         "Best on old and new together": ("AVall", max), "Loses the most old knowledge": ("AVE (old)", min)}


def check_ranking(text: str, summary: Table, labels: list[str], stat: str, pick: Callable) -> None:
    """The runs a ranking names have the best number (as shown) among `labels` in the summary table."""
    values = column(summary, stat)
    best = shown(pick(values[label] for label in labels))
    short = "AVE" if stat == "AVE (old)" else stat
    assert f"{short} {best}" in text, (text, best)
    if text.startswith("none stands out"):
        assert all(shown(values[label]) == best for label in labels) and f"all {len(labels)} score" in text
        return
    named = [label for label in labels if re.search(rf"(^|, ){re.escape(label)}( \(| tie|,)", text)]
    assert named, text
    assert all(shown(values[label]) == best for label in named), (text, {n: values[n] for n in named})
    tied = [label for label in labels if shown(values[label]) == best]
    assert sorted(named) == sorted(tied), (text, tied)


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_every_summary_sentence_agrees_with_the_summary_table(study: str) -> None:
    rows = STUDIES[study]()
    sections = sections_of(rows)
    summary = tables_of(sections)["summary"]
    paragraphs, bullets = summary_of(sections)
    intro = paragraphs[0]
    assert f"{len({r.model for r in rows})} models evaluated in {len(summary.rows)} runs" in intro
    single, every = ranked_rows(summary, False), ranked_rows(summary, True)
    ranked = [b for b in bullets if not b.startswith("Left out")]
    assert len(ranked) == 4
    for bullet in ranked:
        found = HIGHLIGHT.match(bullet)
        assert found, bullet
        stat, pick = STATS[found["what"]]
        assert int(found["n"]) == len(single)
        mine, _, overall = found["rest"].partition(f"; among all {len(every)} runs incl. one-round: ")
        mine, _, same = mine.partition("; ")
        check_ranking(mine, summary, single, stat, pick)
        values = column(summary, stat)
        if overall:
            check_ranking(overall, summary, every, stat, pick)
            continue
        # no separate sentence: the best among all runs is a single model's, the one-round runs named tie with it
        best = shown(pick(values[label] for label in single))
        assert shown(pick(values[label] for label in every)) == best
        tied = [label for label in every if label not in single and shown(values[label]) == best]
        assert same == (f"{', '.join(tied)} (one-round) score the same" if tied else ""), (same, tied)
    left = [b for b in bullets if b.startswith("Left out")]
    trained = [r.label for r in summary.rows if r.key != "base"]
    for label in set(trained) - set(every):
        assert left and label.split(" (")[0] in left[0], (label, left)


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_the_findings_count_is_the_claims_table(study: str) -> None:
    sections = sections_of(STUDIES[study]())
    claims = tables_of(sections)["claims"]
    counts = Counter(column(claims, "verdict").values())
    sentence = next(p for p in summary_of(sections)[0] if p.startswith("The paper's"))
    assert f"{len(claims.rows)} findings" in sentence
    for verdict, words in (("holds", "hold"), ("does not hold", "do not hold"), ("inconclusive", "inconclusive"),
                           (NO_SIGNAL, "no signal"), ("not measured", "not measured")):
        assert f"{counts[verdict]} {words}" in sentence, (verdict, sentence)


def within(change: object, limit: float) -> bool:
    return change is None or change >= -limit  # type: ignore[operator]


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_each_advice_row_names_the_best_run_of_the_summary_table(study: str) -> None:
    tables = tables_of(sections_of(STUDIES[study]()))
    summary, advice = tables["summary"], tables["advice"]
    keys, avnew, change = column(summary, "key"), column(summary, "AVnew"), column(summary, "AVE gain")
    every = ranked_rows(summary, True)
    for row in advice.rows:
        setting, limit = row.cells[0], float(row.cells[1].rstrip("%"))
        open_runs = [label for label in every if keys[label].split("/")[0] in SETTING_METHODS[setting]]
        allowed = [label for label in open_runs if within(change[label], limit)]
        use = row.cells[2]
        if not allowed:
            assert use == ("none meets the limit" if open_runs else "no complete run of these methods")
            continue
        label = use.removesuffix(" (own setting)")
        assert label in allowed, (row.label, use, allowed)
        assert row.cells[3] == avnew[label]  # the advice's AVnew is the summary's
        assert shown(avnew[label]) == shown(max(avnew[a] for a in allowed))


def test_zero_study_has_advice_and_no_signal_instead_of_verdicts() -> None:
    rows = zero_study()
    sections = sections_of(rows)
    tables = tables_of(sections)
    claims = tables["claims"]
    verdict, evidence = column(claims, "verdict"), column(claims, "this study")
    assert verdict["C13"] == NO_SIGNAL and "both 0: no signal" in evidence["C13"]
    assert verdict["C6"] == NO_SIGNAL and "in this study" not in evidence["C6"]
    assert "sequential FFT: BWT undefined, every task scored 0 right after its own round" in evidence["C6"]
    assert verdict["C1"] == "holds"  # one-round FFT's AVE 0.8 of the base's vs LoRA's 0.95: a real difference
    advice = tables["advice"]
    assert all(r.cells[2] == "MoE LoRA (own setting)" for r in advice.rows)  # AVE +8%: within every limit
    paragraph = next(b for s in sections if s.id == "advice" for b in s.blocks if isinstance(b, str))
    assert "The base's AVnew is 0, so gains in new knowledge are undefined (n/a): runs are ranked on AVnew" in paragraph
    assert "one-round FFT, one-round LoRA (a model per task" in paragraph
    bullets = summary_of(sections)[1]
    assert bullets[1].startswith("Learns the most new knowledge among the 8 single-model runs: none stands out, all 8 "
                                 "score AVnew 0.0000, gain from base n/a: the base scores 0; among all 10 runs incl. "
                                 "one-round: one-round FFT (AVnew 0.0415, gain from base n/a")
    html = render_html(sections, title="t")
    assert '<td class="nosignal">no signal</td>' in html


def test_missing_runs_are_named_where_left_out() -> None:
    sections = sections_of(missing_study())
    left = [b for b in summary_of(sections)[1] if b.startswith("Left out")]
    assert left == ["Left out of these rankings: merge TIES FFT (no AVnew: a column is not measured); sequential "
                    "LoRA (partial: rounds 1-3 of 7)."]
    paragraph = next(b for s in sections if s.id == "advice" for b in s.blocks if isinstance(b, str))
    assert "sequential LoRA (partial: rounds 1-3 of 7)" in paragraph and "merge TIES FFT (no AVnew" in paragraph


def test_real_zero_study_ties_said_as_ties() -> None:
    sections = sections_of(real_study())
    bullets = summary_of(sections)[1]
    assert bullets[1] == ("Learns the most new knowledge among the 10 single-model runs: none stands out, all 10 score "
                          "AVnew 0.000, gain from base n/a: the base scores 0; one-round FFT, one-round LoRA (one-round) "
                          "score the same.")
    verdicts = column(tables_of(sections)["claims"], "verdict")
    assert [c for c, v in verdicts.items() if v == NO_SIGNAL] == ["C2", "C20", "C4", "C5", "C29", "C22", "C6", "C28",
                                                                  "C13"]


def test_cli_advise_and_report_on_the_real_zero_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "zero"
    shutil.copytree(REAL, out)
    assert main(["advise", str(out), "--max-old-loss", "2%"]) == 0
    printed = capsys.readouterr().out
    assert "no complete run" not in printed and "use:       sequential FFT (own setting): new knowledge n/a" in printed
    assert "(the two score the same on new and old knowledge: either is as good a choice)" in printed
    assert "(10 points of semi-cooperative methods compared)" in printed
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert html.count('<td class="nosignal">no signal</td>') == 9


def test_cli_advise_on_the_zero_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    out.mkdir()
    config = {"name": "zero", "base": {"builtin": "test"}, "tasks": "builtin",
              "training": {"lr_of_pretrain_peak": 0.1}, "methods": {"sequential": {}, "merge": {}, "moe": {}}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    write_csv(zero_study(), out / "results.csv")
    assert main(["advise", str(out), "--max-old-loss", "2%"]) == 0
    printed = capsys.readouterr().out
    assert printed == study_advice(zero_study(), TASKS, 2.0, "semi") + "\n"
    assert "no measured run" not in printed and "use:       MoE LoRA (own setting): new knowledge n/a" in printed
    assert "old knowledge +8.0%" in printed and "runs are ranked on AVnew itself" in printed
    assert "(8 points of semi-cooperative methods compared)" in printed
    assert "one-round FFT, one-round LoRA (a model per task: the upper bound, not one model)" in printed


def test_a_study_with_only_partial_runs_ranks_nothing_and_says_why() -> None:
    rows = [r for r in synthetic_study(("base", "sequential")) if (r.stage or 0) <= 2]
    bullets = summary_of(sections_of(rows))[1]
    assert bullets == ["No complete trained run has results yet.",
                       "Left out of these rankings: sequential FFT, sequential LoRA (partial: rounds 1-2 of 7)."]
