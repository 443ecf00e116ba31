"""The learn/forget frontier, FFT vs LoRA at matched acquisition, and `knowstack advise`, on known fronts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from knowstack.cli import main
from knowstack.report.advice import advice_text, advise
from knowstack.report.build import build_report, measured_points, write_report
from knowstack.report.claims import evaluate_matched_claims
from knowstack.report.frontier import (
    TradeOff,
    matched_acquisition,
    matched_forgetting,
    old_at_gain,
    pareto_front,
)
from knowstack.report.runs import Run
from knowstack.report.tables import Table
from knowstack.results import Row, write_csv
from tests.report_rows import OLD, TASKS, base_state, rows_of, staged
from tests.report_rows import combined as combined_state


def point(method: str, finetune: str, new: float, old: float, setting: str = "", bwt: float | None = None) -> TradeOff:
    return TradeOff(Run(method, finetune, "", setting), new, old, bwt)


# Two fronts with known vertices (new gain %, old change %); (15, -8) is beaten by (20, -5).
FFT = [point("sequential", "fft", n, o, f"lr={i}") for i, (n, o) in enumerate([(10, -2), (20, -5), (30, -12), (15, -8)])]
LORA = [point("sequential", "lora", n, o, f"lr={i}") for i, (n, o) in enumerate([(5, -1), (12, -2), (18, -4)])]


def test_pareto_front_drops_beaten_points() -> None:
    assert [(p.new_gain, p.old_change) for p in pareto_front(FFT)] == [(10, -2), (20, -5), (30, -12)]
    assert len(pareto_front(LORA)) == 3
    with_bwt = [point("replay", "fft", 10, -1, bwt=-20), point("replay", "fft", 8, -3, bwt=-5)]
    assert len(pareto_front(with_bwt, old="bwt")) == 2 and len(pareto_front(with_bwt)) == 1


def test_fronts_interpolate_from_the_base() -> None:
    front = pareto_front(FFT)
    assert old_at_gain(front, 5) == pytest.approx(-1.0)  # half way from the base (0, 0) to (10, -2)
    assert old_at_gain(front, 25) == pytest.approx(-8.5)
    assert old_at_gain(front, 31) is None  # beyond what was measured: no extrapolation


def test_matched_acquisition_and_forgetting_by_hand() -> None:
    matched = matched_acquisition(pareto_front(FFT), pareto_front(LORA))
    # the largest gain both reach is LoRA's 18; FFT there: -2 + (-5 - -2) * 8/10 = -4.4
    assert (matched.level, matched.left, matched.right) == (18, pytest.approx(-4.4), -4)
    forgetting = matched_forgetting(pareto_front(FFT), pareto_front(LORA))
    # the largest loss both reach is LoRA's -4; FFT's gain there: 20 + (10 - 20) * 1/3
    assert (forgetting.level, forgetting.left, forgetting.right) == (-4, pytest.approx(50 / 3), 18)
    assert matched_acquisition(pareto_front(FFT), [point("sequential", "lora", -3, -1)]) is None


# --- results with known fronts: sequential FFT and LoRA at four learning rates, merges and MoE ---------------
LRS = {"fft": [(1e-5, 0.2, 0.002), (3e-5, 0.5, 0.01), (1e-4, 0.8, 0.03), (3e-4, 0.9, 0.08)],
       "lora": [(1e-4, 0.1, 0.001), (3e-4, 0.3, 0.004), (1e-3, 0.6, 0.02), (3e-3, 0.7, 0.05)]}
EVERYTHING = "+".join(TASKS)


def at_point(rows: list[Row], lr: float, own: bool) -> list[Row]:
    if own:
        return rows
    name = f"lr={lr:g}"
    return [Row(**{**r.__dict__, "model": f"{r.model}@{name}", "point": name, "settings": (("lr", lr),)}) for r in rows]


def swept_study() -> list[Row]:
    rows = rows_of("base", "base", "", None, "", base_state())
    for finetune, settings in LRS.items():
        for i, (lr, learn, forget) in enumerate(settings):
            rows += at_point(staged("sequential", finetune, f"sequential-{finetune}", learn, forget, 0.1), lr, i == 1)
    for name, method, finetune, fraction, loss in (("merge-average-fft", "merge", "fft", 0.5, 0.015),
                                                   ("merge-ties-lora", "merge", "lora", 0.3, 0.005),
                                                   ("moe-lora", "moe", "lora", 0.9, 0.03),
                                                   ("joint-lora", "joint", "lora", 0.95, 0.01)):
        rows += rows_of(name, method, finetune, None, EVERYTHING, combined_state(fraction, loss))
    return rows


def test_matched_claims_from_results() -> None:
    rows = swept_study()
    scores, points = measured_points(rows, TASKS)
    assert len([p for p in points if p.run.method == "sequential"]) == 8
    matched = evaluate_matched_claims(scores, points)
    c3 = matched["C3"]  # sequential FFT loses more old knowledge than LoRA: along the fronts
    outcome = c3.outcomes[0]
    fft = [p for p in points if p.run.family == "sequential/fft"]
    lora = [p for p in points if p.run.family == "sequential/lora"]
    expected = matched_acquisition(pareto_front(fft), pareto_front(lora))
    base_ave = scores.averages("base")["AVE"]
    assert outcome.left == pytest.approx(base_ave * (1 + expected.left / 100))
    assert outcome.right == pytest.approx(base_ave * (1 + expected.right / 100))
    assert c3.verdict == ("holds" if outcome.left < outcome.right else "does not hold")
    assert "C5" not in matched  # not an FFT-vs-LoRA comparison
    assert matched["C1"].verdict == "not measured"  # no one-round runs in this study
    assert matched["C1"].outcomes[0].evidence == "no measured point of both"


def test_report_draws_the_fronts_and_the_matched_claims(tmp_path: Path) -> None:
    write_report(swept_study(), tmp_path, title="sweep", task_order=TASKS)
    assert (tmp_path / "figures" / "frontier_old.png").stat().st_size > 5000
    assert (tmp_path / "figures" / "frontier_recent.png").is_file()
    claims = (tmp_path / "tables" / "claims.md").read_text()
    assert "along the fronts (matched acquisition)" in claims and "at AVnew gain" in claims
    frontier = (tmp_path / "tables" / "frontier.csv").read_text()
    assert "sequential/fft" in frontier and "lr=0.0003" in frontier
    html = (tmp_path / "report.html").read_text()
    assert "The learn/forget frontier" in html and "Which method to use" in html


def test_sweep_points_stay_out_of_the_equal_settings_tables() -> None:
    sections = build_report(swept_study(), title="t", task_order=TASKS)
    tables = {b.key: b for s in sections for b in [s, *s.walk()] if isinstance(b, Table)}
    labels = [r.label for r in tables["summary"].rows]
    assert "sequential FFT" in labels and not any("@" in label for label in labels)
    assert sum(r.label.startswith("sequential FFT") for r in tables["frontier"].rows) == 4


def test_advice_within_limits() -> None:
    scores, points = measured_points(swept_study(), TASKS)
    semi = advise(points, 2.0, "semi")
    old = {p.run.key: p.old_change for p in points}
    assert all(old[p.run.key] >= -2.0 for p in (semi.best, semi.runner_up))
    within = [p for p in points if p.run.method in ("sequential", "merge", "moe") and p.old_change >= -2.0]
    assert semi.best.new_gain == max(p.new_gain for p in within)
    assert semi.runner_up.family != semi.best.family
    full = advise(points, 2.0, "full")
    assert full.best.run.key == "joint/lora"  # 95% of the gains for 1% of old knowledge
    assert advise(points, 10.0, "semi").best.new_gain >= semi.best.new_gain
    none = advise(points, 0.01, "semi")
    assert none.best is None and "no measured point meets the limit" in advice_text(none, scores)
    assert none.least_loss.old_change == max(p.old_change for p in none.candidates)


def study_dir(tmp_path: Path) -> Path:
    out = tmp_path / "study"
    out.mkdir()
    config = {"name": "sweep", "base": {"builtin": "test"}, "tasks": "builtin",
              "training": {"lr_of_pretrain_peak": 0.1},
              "methods": {"sequential": {"finetune": ["fft", "lora"]}, "merge": {}, "moe": {}, "joint": {}}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    write_csv(swept_study(), out / "results.csv")
    return out


def test_cli_advise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = study_dir(tmp_path)
    scores, points = measured_points(swept_study(), TASKS)
    assert main(["advise", str(out), "--max-old-loss", "2%"]) == 0
    printed = capsys.readouterr().out
    best = advise(points, 2.0, "semi").best
    assert "Within a 2% old-knowledge loss (semi-cooperative" in printed
    assert f"use:       {best.run.method_label} ({best.setting})" in printed and f"{best.new_gain:+.1f}%" in printed
    assert main(["advise", str(out), "--max-old-loss", "2", "--setting", "full"]) == 0
    assert "use:       joint LoRA" in capsys.readouterr().out
    assert main(["advise", str(out), "--max-old-loss", "0.001%"]) == 0
    assert "no measured point meets the limit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["advise", str(out), "--max-old-loss", "two"])
    assert main(["advise", str(tmp_path)]) == 2


def test_old_knowledge_fixture_is_what_the_advice_reads() -> None:
    # guards the synthetic study: a combined model's AVE change is exactly its old-knowledge loss
    _, points = measured_points(swept_study(), TASKS)
    merge = next(p for p in points if p.run.key == "merge/fft/average")
    assert merge.old_change == pytest.approx(-1.5, abs=0.05) and len(OLD) == 3


def frontier_text(rows: list[Row]) -> str:
    sections = build_report(rows, title="t", task_order=TASKS)
    frontier = next(s for s in sections if s.id == "frontier")
    return " ".join(b for b in frontier.blocks if isinstance(b, str))


def test_the_frontier_section_says_why_it_is_thin() -> None:
    unswept = [r for r in swept_study() if not r.point]
    assert "No sweeps in this study" in frontier_text(unswept)
    assert "No sweeps" not in frontier_text(swept_study())
    zero_base = [Row(**{**r.__dict__, "value": 0.0}) if r.model == "base" and r.kind == "new" else r
                 for r in unswept]
    assert "undefined where the base's AVnew or AVE is 0" in frontier_text(zero_base)
