"""The paper's findings as claims (report/claims.py, issue 30 item 7): every claim on the paper's own numbers
(Tables 1-6), each claim's comparison on synthetic rows where it must hold, not hold or be inconclusive, the
built-in world's tasks read as the paper's, and docs/claims.md generated from the claims."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from report_rows import TASKS as BUILTIN_ORDER
from report_rows import synthetic_study

from knowstack.report.claims import (
    CLAIMS,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NO_SIGNAL,
    UNMEASURED,
    Check,
    _s,
    check_verdict,
    claims_markdown,
    evaluate_check,
    evaluate_claims,
    is_task,
)
from knowstack.report.runs import acquisition, find_runs, run_averages
from knowstack.report.tables import Scores, percent_change
from knowstack.results import Row
from knowstack.stats import column_estimate

ROOT = Path(__file__).resolve().parents[1]
NEW = ["cstance", "fomc", "meeting", "py150", "science", "20minuten", "math"]  # the paper's order
COLUMNS = [(t, "score") for t in NEW[:-1]] + [("math", "em_direct"), ("math", "em_cot")]
OLD = ["mmlu", "arc_challenge", "commonsense_qa", "hellaswag", "openbookqa", "piqa", "winogrande"]


def table(text: str) -> dict[str, list[float]]:
    """A table of the paper as printed, one row a line: its label, then its numbers."""
    rows = {}
    for line in text.strip().splitlines():
        label, *numbers = line.split()
        rows[label] = [float(n) for n in numbers]
    return rows


# Tables 1-2 (old knowledge, AVE column left out), 3-4 (new knowledge: the 8 columns), 5 and 6, as printed.
TABLE1 = table("""
base 0.6223 0.5350 0.6896 0.7920 0.4500 0.8063 0.7324
1 0.2547 0.3746 0.2031 0.785 0.43 0.7709 0.7561
2 0.255 0.3208 0.1974 0.6292 0.37 0.6828 0.6922
3 0.2594 0.5009 0.2105 0.8097 0.448 0.8069 0.7324
4 0.2796 0.4983 0.2236 0.7945 0.464 0.7982 0.7127
5 0.512 0.4403 0.6716 0.7457 0.43 0.7709 0.7056
6 0.527 0.4667 0.6658 0.7599 0.44 0.7758 0.6953
7 0.5475 0.4343 0.6855 0.7499 0.43 0.778 0.7111
""")
TABLE2 = table("""
1 0.6289 0.5444 0.6929 0.7934 0.448 0.8096 0.7324
2 0.6315 0.5512 0.7002 0.7955 0.454 0.8118 0.7388
3 0.6256 0.558 0.683 0.804 0.454 0.8074 0.7372
4 0.6268 0.5452 0.6839 0.8102 0.456 0.8058 0.7388
5 0.6095 0.494 0.6781 0.8057 0.45 0.8052 0.7435
6 0.6103 0.5119 0.6609 0.8069 0.448 0.8058 0.7482
7 0.5974 0.5154 0.6921 0.781 0.448 0.8101 0.7348
""")
TABLE3 = table("""
1 0.511 0.4839 0.0444 0.3033 0.115 0.3709 0.0008 0.0713
2 0.444 0.7157 0.0073 0.0032 0.1265 0.3701 0 0
3 0.457 0.6109 0.39 0.2256 0.217 0.3608 0.1812 0.2714
4 0.459 0.619 0.3709 0.5238 0.2185 0.3651 0.1099 0.232
5 0.448 0.4657 0.4013 0.5248 0.922 0.3512 0.0857 0.1296
6 0.461 0.4657 0.3927 0.5211 0.9255 0.4078 0.1266 0.1357
7 0.457 0.4133 0.3651 0.4924 0.917 0.3896 0.7293 0.7384
""")
TABLE4 = table("""
1 0.535 0.5081 0.1783 0.0585 0.7545 0.3556 0.5133 0.5656
2 0.5175 0.7036 0.1745 0.063 0.7615 0.3624 0.5171 0.5618
3 0.532 0.6915 0.3771 0.067 0.749 0.3515 0.5034 0.5444
4 0.515 0.6815 0.3463 0.5438 0.7065 0.3641 0.4882 0.5625
5 0.497 0.6613 0.3415 0.5324 0.8975 0.3538 0.3434 0.4018
6 0.5205 0.6331 0.3329 0.5351 0.8895 0.4068 0.4117 0.3973
7 0.508 0.5988 0.348 0.5437 0.531 0.3903 0.7096 0.7104
""")
TABLE5 = table("""
joint-lora 0.6154 0.4633 0.7043 0.7933 0.454 0.7933 0.7435
replay-lora 0.6254 0.4966 0.6806 0.7967 0.464 0.7987 0.7269
joint-fft 0.5706 0.5111 0.6757 0.7521 0.468 0.7835 0.7395
replay-fft 0.5243 0.4121 0.6765 0.748 0.444 0.7622 0.6796
""")
TABLE6 = table("""
base 0.218 0.256 0.167 0.045 0.726 0.351 0.505 0.550
joint-lora 0.519 0.716 0.375 0.545 0.894 0.408 0.608 0.616
replay-lora 0.552 0.724 0.369 0.540 0.909 0.409 0.716 0.684
joint-fft 0.508 0.692 0.398 0.527 0.941 0.411 0.671 0.673
replay-fft 0.528 0.704 0.465 0.535 0.941 0.413 0.726 0.754
""")
BASE_OLD, BASE_NEW = TABLE1["base"], TABLE6["base"]


def model_rows(model: str, method: str, finetune: str, stage: int | None, trained_on: str, new: list[float],
               old: list[float]) -> list[Row]:
    common = {"model": model, "method": method, "finetune": finetune, "stage": stage, "trained_on": trained_on}
    rows = [Row(task=t, kind="new", metric=m, value=v, n=50, **common) for (t, m), v in zip(COLUMNS, new, strict=True)]
    return rows + [Row(task=t, kind="old", metric="acc", value=v, n=None, **common)
                   for t, v in zip(OLD, old, strict=True)]


def paper_rows() -> list[Row]:
    """The paper's Tables 1-6: the base, sequential FFT and LoRA after each round, and the final models of
    replay and joint training."""
    rows = model_rows("base", "base", "", None, "", BASE_NEW, BASE_OLD)
    for ft, old, new in (("fft", TABLE1, TABLE3), ("lora", TABLE2, TABLE4)):
        for stage, task in enumerate(NEW, start=1):
            rows += model_rows(f"sequential-{ft}-{stage}", "sequential", ft, stage, task, new[str(stage)],
                               old[str(stage)])
        rows += model_rows(f"replay-{ft}-7", "replay", ft, 7, "math", TABLE6[f"replay-{ft}"], TABLE5[f"replay-{ft}"])
        rows += model_rows(f"joint-{ft}", "joint", ft, None, "+".join(NEW), TABLE6[f"joint-{ft}"],
                           TABLE5[f"joint-{ft}"])
    return rows


def scaled(values: list[float], factor: float) -> list[float]:
    return [v * factor for v in values]


def own(values: dict[str, float]) -> list[float]:
    """New-knowledge values of a model trained on one task: the given tasks' (math: both columns), the base's
    elsewhere."""
    return [values.get(task, base) for (task, _), base in zip(COLUMNS, BASE_NEW, strict=True)]


ONE_ROUND = {"fft": {"cstance": 0.50, "fomc": 0.70, "meeting": 0.40, "py150": 0.50, "science": 0.92,
                     "20minuten": 0.40, "math": 0.72},
             "lora": {"cstance": 0.54, "fomc": 0.70, "meeting": 0.37, "py150": 0.55, "science": 0.90,
                      "20minuten": 0.40, "math": 0.62}}
# one-round FFT loses 10% of each old test, more on MMLU and CommonsenseQA; LoRA 0.5%
ONE_ROUND_OLD = {"fft": [0.50, *scaled(BASE_OLD[1:2], 0.9), 0.50, *scaled(BASE_OLD[3:], 0.9)],
                 "lora": scaled(BASE_OLD, 0.995)}


def olora_rows(tag: str, lower: float) -> list[Row]:
    """O-LoRA at one lambda: each task `lower` than sequential LoRA right after its own round, and kept there
    (no forgetting); old knowledge as sequential LoRA's."""
    diagonal = [TABLE4[str(NEW.index(task) + 1)][i] for i, (task, _) in enumerate(COLUMNS)]
    rows = []
    for stage, task in enumerate(NEW, start=1):
        new = [d - lower if NEW.index(t) < stage else b for (t, _), d, b in zip(COLUMNS, diagonal, BASE_NEW,
                                                                                    strict=True)]
        rows += model_rows(f"olora-lora-{tag}-{stage}", "olora", "lora", stage, task, new, TABLE2[str(stage)])
    return rows


def world() -> list[Row]:
    """The paper's tables, and runs it prints no table of (one-round, O-LoRA, merges, MoE) with numbers in
    line with its figures and text: every one of the 30 claims holds here."""
    rows = paper_rows()
    for ft in ("fft", "lora"):
        for task, value in ONE_ROUND[ft].items():
            rows += model_rows(f"one-round-{ft}-{task}", "one-round", ft, None, task, own({task: value}),
                               ONE_ROUND_OLD[ft])
    rows += olora_rows("0.5", 0.02) + olora_rows("5", 0.05)
    merges = {("average", "fft"): 0.45, ("average", "lora"): 0.47, ("ties", "fft"): 0.40, ("ties", "lora"): 0.40}
    for (merge, ft), new in merges.items():
        old = scaled(BASE_OLD, 0.98 if ft == "fft" else 0.99)
        if (merge, ft) == ("average", "fft"):
            old[0] = 0.35  # MMLU's sharp decline (Fig. 10)
        rows += model_rows(f"merge-{merge}-{ft}", "merge", ft, None, "+".join(NEW), [new] * 8, old)
    for ft in ("fft", "lora"):
        rows += model_rows(f"moe-{ft}", "moe", ft, None, "+".join(NEW), [0.62] * 8, scaled(BASE_OLD, 0.995))
    return rows


def verdicts_of(rows: list[Row], items: dict | None = None, order: list[str] = NEW) -> dict[str, str]:
    scores = Scores.from_rows(rows, order, items=items)
    return {v.claim.id: v.verdict for v in evaluate_claims(scores, find_runs(scores))}


# --- the paper's own numbers -----------------------------------------------------------------------------------
PAPER_MEASURES = ["C3", "C30", "C4", "C22", "C7", "C6", "C23", "C24", "C28", "C15", "C16", "C27", "C17", "C18", "C19"]


def test_the_paper_s_own_tables_support_every_claim_they_measure() -> None:
    verdicts = verdicts_of(paper_rows())
    assert [c for c, v in verdicts.items() if v == HOLDS] == PAPER_MEASURES
    assert all(v == UNMEASURED for c, v in verdicts.items() if c not in PAPER_MEASURES)
    assert len(verdicts) == 30


def test_the_notes_numbers_are_the_tables() -> None:
    """The numbers the claims' notes quote, computed from the tables (C7, C16, C19, C28, C30)."""
    scores = Scores.from_rows(paper_rows(), NEW)
    runs = {r.key: r for r in find_runs(scores)}
    avg = {key: run_averages(scores, run) for key, run in runs.items()}
    # C7: FFT ahead on new knowledge after 7 rounds and right after each round; LoRA ahead on AVall
    assert (avg["sequential/fft"]["AVnew"], avg["sequential/lora"]["AVnew"]) == pytest.approx((0.563, 0.543), abs=1e-3)
    diagonal = {ft: np.mean(list(acquisition(scores, runs[f"sequential/{ft}"]).values())) for ft in ("fft", "lora")}
    assert (round(diagonal["fft"], 3), round(diagonal["lora"], 3)) == (0.617, 0.610)
    assert (round(avg["sequential/lora"]["AVall"], 3), round(avg["sequential/fft"]["AVall"], 3)) == (0.595, 0.589)
    # C16: on AVall joint FFT is level with (ahead of) FFT with replay; on AVnew replay leads
    assert round(avg["joint/fft"]["AVall"], 4) == 0.6214 and round(avg["replay/fft"]["AVall"], 4) == 0.6208
    assert [round(avg[k]["AVnew"], 3) for k in ("replay/fft", "joint/fft", "replay/lora", "joint/lora")] == [
        0.633, 0.603, 0.613, 0.585]
    # C15: replay against plain sequential training on AVall
    assert [round(avg[k]["AVall"], 3) for k in ("replay/fft", "sequential/fft", "replay/lora", "sequential/lora")] == [
        0.621, 0.589, 0.633, 0.595]
    # C19: joint FFT ahead of joint LoRA on AVall
    assert (round(avg["joint/fft"]["AVall"], 3), round(avg["joint/lora"]["AVall"], 3)) == (0.621, 0.617)
    # C30: Tables 1-2's -7% and -1% are the mean of per-task gains, not the gain of the mean
    for ft, table_row, mean_gain, gain_of_mean in (("fft", TABLE1["7"], -6.8, -6.3), ("lora", TABLE2["7"], -1.2, -1.1)):
        gains = [percent_change(b, v) for b, v in zip(BASE_OLD, table_row, strict=True)]
        assert round(float(np.mean(gains)), 1) == mean_gain
        assert round(percent_change(np.mean(BASE_OLD), avg[f"sequential/{ft}"]["AVE"]), 1) == gain_of_mean
    # C28: fomc's BWT against the other tasks' mean
    bwt = {ft: [percent_change(t[str(i + 1)][i], t["7"][i]) for i in range(6)] for ft, t in (("fft", TABLE3),
                                                                                               ("lora", TABLE4))}
    assert [round(bwt["fft"][1]), round(np.mean(bwt["fft"][:1] + bwt["fft"][2:]))] == [-42, -6]
    assert [round(bwt["lora"][1]), round(np.mean(bwt["lora"][:1] + bwt["lora"][2:]))] == [-15, -12]


def test_the_old_readings_fail_on_the_paper_s_own_numbers() -> None:
    """What issue 30 found: replay >= joint on AVall (old C16) fails on the FFT rows; C12 and C19 are otherwise."""
    scores = Scores.from_rows(paper_rows(), NEW)
    runs = find_runs(scores)
    old_c16 = evaluate_check(Check("AVall", _s("replay/fft"), ">=", _s("joint/fft")), runs, scores)
    assert old_c16.verdict == FAILS


# --- each claim: holds, does not hold, inconclusive --------------------------------------------------------
Change = Callable[[Row], float | None]  # a row's new value, or None to keep it


def changed(rows: list[Row], model: str, change: Change) -> list[Row]:
    """The rows with those of the models matching `model` (a wildcard) changed."""
    out = []
    for row in rows:
        value = change(row) if fnmatch(row.model, model) else None
        out.append(row if value is None else Row(**{**row.__dict__, "value": value}))
    return out


def old_to(factor: float, task: str | None = None) -> Change:
    """Old knowledge (or one old test) at `factor` of the base's."""
    return lambda r: BASE_OLD[OLD.index(r.task)] * factor if r.kind == "old" and task in (None, r.task) else None


def new_to(value: float | Callable[[Row], float], task: str | None = None) -> Change:
    return lambda r: (value(r) if callable(value) else value) if r.kind == "new" and task in (None, r.task) else None


def own_round(ft: str) -> Callable[[Row], float]:
    """A task's score right after its own round of sequential training (no forgetting afterwards)."""
    table_of = {"fft": TABLE3, "lora": TABLE4}[ft]
    return lambda r: table_of[str(NEW.index(r.task) + 1)][COLUMNS.index((r.task, r.metric))]


FAILING: dict[str, list[tuple[str, Change]]] = {
    "C1": [("one-round-fft-*", old_to(1.0))],
    "C2": [("one-round-fft-science", new_to(0.3, "science"))],
    "C20": [("one-round-fft-science", new_to(0.85, "science"))],
    "C21": [("one-round-fft-*", old_to(0.63 / 0.6223, "mmlu"))],
    "C3": [("sequential-fft-7", old_to(1.0))],
    "C30": [("sequential-fft-7", old_to(0.99))],
    "C4": [("sequential-fft-7", lambda r: r.value * 0.7 if r.kind == "new" else None)],
    "C5": [("sequential-fft-7", lambda r: r.value * 1.2 if r.kind == "new" else None)],
    "C29": [("sequential-lora-7", lambda r: r.value * 0.8 if r.kind == "new" else None)],
    "C22": [("sequential-lora-7", new_to(0.95, "science"))],
    "C7": [("sequential-fft-7", old_to(1.0))],
    "C6": [("sequential-fft-7", new_to(lambda r: own_round("fft")(r) * 1.1))],
    "C23": [("sequential-lora-7", new_to(0.95, "science"))],
    "C24": [("sequential-lora-7", new_to(0.88, "science"))],
    "C28": [("sequential-*-7", lambda r: own_round(r.finetune)(r) if r.task == "fomc" else None)],
    "C8": [("olora-lora-*", lambda r: r.value + 0.06 if r.kind == "new" and r.value != BASE_NEW[
        COLUMNS.index((r.task, r.metric))] else None)],
    "C9": [("olora-lora-5-*", lambda r: r.value + 0.06 if r.kind == "new" and r.value != BASE_NEW[
        COLUMNS.index((r.task, r.metric))] else None)],
    "C10": [("olora-lora-*-7", new_to(lambda r: r.value * 0.5 if r.task != "math" else r.value))],
    "C11": [("olora-lora-0.5-7", new_to(0.3))],
    "C12": [("moe-fft", old_to(0.95))],
    "C25": [("merge-average-lora", new_to(0.61))],
    "C13": [("merge-ties-fft", new_to(0.65))],
    "C26": [("merge-average-fft", old_to(1.0, "mmlu"))],
    "C14": [("merge-*", new_to(0.2))],
    "C15": [("replay-fft-7", old_to(0.6))],
    "C16": [("joint-fft", lambda r: r.value * 1.2 if r.kind == "new" else None)],
    "C27": [("replay-lora-7", new_to(0.95, "science"))],
    "C17": [("joint-fft", old_to(1.0))],
    "C18": [("joint-lora", old_to(1.0))],
    "C19": [("sequential-fft-7", old_to(1.0)), ("one-round-fft-*", old_to(1.0))],
}


def test_every_claim_holds_in_a_world_in_line_with_the_paper() -> None:
    verdicts = verdicts_of(world())
    assert verdicts == dict.fromkeys(verdicts, HOLDS) and len(verdicts) == 30


@pytest.mark.parametrize("claim", sorted(FAILING, key=lambda c: int(c[1:])))
def test_each_claim_does_not_hold_where_its_numbers_go_the_other_way(claim: str) -> None:
    rows = world()
    for model, change in FAILING[claim]:
        rows = changed(rows, model, change)
    assert verdicts_of(rows)[claim] == FAILS


def noisy_items(rows: list[Row], noise: float) -> dict:
    """Per-item scores whose mean is each row's value: `noise` of each model's own on every item, so that a
    difference between two runs has a spread."""
    items: dict = {}
    for row in rows:
        n = 40
        pattern = np.random.default_rng(zlib.crc32(f"{row.model}/{row.task}/{row.metric}".encode())).normal(size=n)
        items[(row.model, row.kind, row.task, row.metric)] = {None: list(row.value + noise * (pattern - pattern.mean()))}
    return items


def test_each_claim_is_inconclusive_where_the_noise_covers_its_differences() -> None:
    rows = world()
    quiet = verdicts_of(rows, noisy_items(rows, 0.001))
    noisy = verdicts_of(rows, noisy_items(rows, 3.0))
    assert quiet == dict.fromkeys(quiet, HOLDS)
    assert noisy == dict.fromkeys(noisy, INCONCLUSIVE), {c: v for c, v in noisy.items() if v != INCONCLUSIVE}


@pytest.mark.parametrize(("op", "left", "right", "margin", "expected"), [
    ("≳", 0.44, 0.50, None, FAILS), ("≳", 0.46, 0.50, None, HOLDS), ("≳", 0.90, 0.50, None, HOLDS),
    ("~", -6.0, -7.0, 2.0, HOLDS), ("~", -1.0, -7.0, 2.0, FAILS), ("~", 0.90, 0.50, None, FAILS),
])
def test_equivalence_margins_without_intervals(op, left, right, margin, expected) -> None:
    """Competitive (≳) is 'at most 10% below the right side': better is competitive too; a given margin is in
    the stat's own units."""
    assert check_verdict(op, left, right, margin) == expected


def test_competitive_reads_the_interval_of_the_difference() -> None:
    def estimate(value: float, spread: float, seed: int) -> float:
        pattern = np.random.default_rng(seed).normal(size=200)
        return column_estimate([value + spread * (pattern - pattern.mean())], "new/x")

    assert check_verdict("≳", estimate(0.48, 0.02, 1), estimate(0.50, 0.02, 2)) == HOLDS  # 4% below: within 10%
    assert check_verdict("≳", estimate(0.40, 0.02, 1), estimate(0.50, 0.02, 2)) == FAILS
    assert check_verdict("≳", estimate(0.45, 1.0, 1), estimate(0.50, 1.0, 2)) == INCONCLUSIVE


# --- paper tasks in a study ------------------------------------------------------------------------------------
def test_the_built_in_world_is_read_by_the_tasks_its_tasks_mirror() -> None:
    assert is_task("science", "quiz") and is_task("science", "ScienceQA") and is_task("cstance", "stance")
    assert is_task("math", "math") and not is_task("science", "stance") and not is_task("mmlu", "ks_country_code")
    rows = synthetic_study()
    scores = Scores.from_rows(rows, BUILTIN_ORDER)
    runs = find_runs(scores)
    outcome = evaluate_check(Check("AVnew", _s("one-round/fft"), ">", _s("one-round/lora"), tasks=("science",)),
                             runs, scores)
    assert outcome.measured and outcome.evidence.startswith("science is quiz here; one-round FFT 0.920")
    # a study without the task: that check is not measured, and says why
    without = [r for r in rows if r.task != "quiz"]
    scores = Scores.from_rows(without, BUILTIN_ORDER)
    outcome = evaluate_check(Check("AVnew", _s("one-round/fft"), ">", _s("one-round/lora"), tasks=("science",)),
                             find_runs(scores), scores)
    assert outcome.verdict == UNMEASURED and outcome.evidence == "no science in this study"
    verdicts = verdicts_of(without, order=BUILTIN_ORDER)
    assert verdicts["C23"] == verdicts["C24"] == UNMEASURED and verdicts["C21"] == verdicts["C26"] == UNMEASURED
    assert verdicts["C20"] in (HOLDS, FAILS)  # meeting, cstance and py150 are still there


def test_a_gain_from_a_base_of_zero_is_no_signal() -> None:
    rows = changed(world(), "base", lambda r: 0.0 if r.kind == "new" else None)
    scores = Scores.from_rows(rows, NEW)
    outcome = evaluate_check(Check("gain AVnew", _s("moe/fft"), ">", _s("merge/*", reduce="max")), find_runs(scores),
                             scores)
    assert outcome.verdict == NO_SIGNAL and "the base scores 0" in outcome.evidence


# --- docs/claims.md -------------------------------------------------------------------------------------------
BLOCK = re.compile(r"<!-- numbers:claims -->\n(.*?)<!-- /numbers -->", re.S)


def test_the_claims_page_is_the_claims() -> None:
    match = BLOCK.search((ROOT / "docs" / "claims.md").read_text(encoding="utf-8"))
    assert match, "docs/claims.md has no claims block"
    assert match[1].rstrip("\n") == claims_markdown(), \
        "docs/claims.md is stale: run python scripts/docs_numbers.py --claims"
    assert "(claims.md)" in (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for claim in CLAIMS:
        assert f"| {claim.id} |" in match[1]
