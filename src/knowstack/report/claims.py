"""The paper's findings as data, each with the comparison that tests it on this study's numbers.

A verdict is computed from the results every time, from the difference of the two sides and its paired 95%
bootstrap interval (stats.py; items, and seeds where the study has several): "holds" where the interval
supports the claim, "does not hold" where it supports the opposite, "inconclusive" where it covers both,
"no signal" (the runs are there, but the scores compared are all 0, or a BWT is undefined because every task
scored 0 right after its own round), or "not measured" (a method the comparison needs is not in the study).
A "similar" claim is an equivalence test: it holds where the whole interval of the difference lies within the
margin, fails where it lies outside.
Without per-item scores (results from before they were kept) a check compares the point estimates. Runs are selected by their key `method/finetune/variant`
with shell-style wildcards: `olora/*` is every O-LoRA run, `merge/*/ties` the TIES merges of FFT and LoRA.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch

from knowstack.report.frontier import (
    TradeOff,
    best_setting,
    families,
    matched_acquisition,
    matched_forgetting,
    pareto_front,
)
from knowstack.report.runs import Run, acquisition, backward_transfer, mean_defined, run_averages
from knowstack.report.tables import AVERAGES, Scores, Table, TableRow
from knowstack.stats import interval_of

HOLDS, FAILS, UNMEASURED, INCONCLUSIVE = "holds", "does not hold", "not measured", "inconclusive"
NO_SIGNAL = "no signal"  # measured, but on scores that are all 0: nothing to compare
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NO_SIGNAL, UNMEASURED)
SIMILAR = 0.10  # "similar": within 10% of the larger of the two values


@dataclass(frozen=True)
class Side:
    """The runs one side of a comparison reads, and how several of them reduce to one number."""

    runs: tuple[str, ...]
    reduce: str = "only"  # only | max | min | mean | lowest-lambda | highest-lambda

    def text(self) -> str:
        names = ", ".join(self.runs)
        return names if self.reduce == "only" else f"{self.reduce}{{{names}}}"


@dataclass(frozen=True)
class Check:
    stat: str  # AVE | AVnew | AVall (run averages), acquisition (mean diagonal of R), BWT (mean, %)
    left: Side
    op: str  # < | <= | > | >= | ~ (similar)
    right: Side | float

    def text(self) -> str:
        right = self.right.text() if isinstance(self.right, Side) else f"{self.right:g}"
        op = f"within {SIMILAR:.0%} of" if self.op == "~" else self.op
        stat = {"BWT": "mean BWT (%)", "acquisition": "mean acquisition"}.get(self.stat, self.stat)
        return f"{stat}: {self.left.text()} {op} {right}"


@dataclass(frozen=True)
class Claim:
    id: str
    setting: str
    statement: str
    source: str
    checks: tuple[Check, ...]
    need: str = "all"  # all: every measured check must hold; most: more than half of them


def _s(*runs: str, reduce: str = "only") -> Side:
    return Side(tuple(runs), reduce)


CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "one-round", "One-round FFT loses more old knowledge than one-round LoRA", "§4.2, Fig. 2",
          (Check("AVE", _s("one-round/fft"), "<", _s("one-round/lora")),)),
    Claim("C2", "one-round", "One-round FFT and LoRA acquire about as much new knowledge on average",
          "§4.2, Fig. 1", (Check("AVnew", _s("one-round/fft"), "~", _s("one-round/lora")),)),
    Claim("C3", "sequential", "Sequential FFT loses more old knowledge than sequential LoRA",
          "§4.3, Fig. 3, Tables 1-2", (Check("AVE", _s("sequential/fft"), "<", _s("sequential/lora")),)),
    Claim("C4", "sequential", "Sequential FFT and LoRA are comparable on new knowledge on average",
          "§4.3, Fig. 4", (Check("AVnew", _s("sequential/fft"), "~", _s("sequential/lora")),)),
    Claim("C5", "sequential", "One-round training is an upper bound for sequential training on new knowledge",
          "§4.3, Fig. 4", (Check("AVnew", _s("one-round/fft"), ">=", _s("sequential/fft")),
                          Check("AVnew", _s("one-round/lora"), ">=", _s("sequential/lora")))),
    Claim("C6", "sequential", "Sequential training forgets earlier tasks: BWT is negative on average",
          "§4.3, Tables 3-4", (Check("BWT", _s("sequential/fft"), "<", 0.0),
                               Check("BWT", _s("sequential/lora"), "<", 0.0))),
    Claim("C7", "sequential", "LoRA is the better choice for sequential training, old and new knowledge together",
          "§4.3", (Check("AVall", _s("sequential/lora"), ">", _s("sequential/fft")),)),
    Claim("C8", "semi-cooperative", "O-LoRA acquires less than LoRA right after each round", "§4.3, Fig. 5",
          (Check("acquisition", _s("olora/*", reduce="max"), "<", _s("sequential/lora")),)),
    Claim("C9", "semi-cooperative", "O-LoRA with a higher λ acquires less", "§4.3, Fig. 5",
          (Check("acquisition", _s("olora/*", reduce="highest-lambda"), "<",
                 _s("olora/*", reduce="lowest-lambda")),)),
    Claim("C10", "semi-cooperative", "O-LoRA forgets less than LoRA: higher BWT after the last round",
          "§4.3, Fig. 6", (Check("BWT", _s("olora/*", reduce="min"), ">", _s("sequential/lora")),)),
    Claim("C11", "semi-cooperative", "O-LoRA with a small λ beats sequential LoRA overall", "§4.3, §5",
          (Check("AVall", _s("olora/*", reduce="lowest-lambda"), ">", _s("sequential/lora")),)),
    Claim("C12", "semi-cooperative", "MoE mixing is best in the semi-cooperative setting", "§4.3, Fig. 7",
          (Check("AVall", _s("moe/*", reduce="max"), ">", _s("olora/*", "merge/*", reduce="max")),)),
    Claim("C13", "semi-cooperative", "TIES and TIES-DARE are weak on new knowledge", "§4.3, Fig. 7",
          (Check("AVnew", _s("merge/*/ties", "merge/*/ties-dare", reduce="max"), "<",
                 _s("merge/*/average", "merge/*/task-average", "olora/*", "moe/*", reduce="min")),)),
    Claim("C14", "semi-cooperative", "Merging and MoE mixing of one-round models are competitive with "
          "sequential training", "§4.3",
          (Check("AVall", _s("merge/*", "moe/*", reduce="max"), ">=", _s("sequential/*", reduce="max")),)),
    Claim("C15", "fully cooperative", "Replay beats plain sequential training on AVall", "§4.4, Fig. 8, Table 6",
          (Check("AVall", _s("replay/fft"), ">", _s("sequential/fft")),
           Check("AVall", _s("replay/lora"), ">", _s("sequential/lora")))),
    Claim("C16", "fully cooperative", "Sequential training with replay is at least as good as joint training "
          "on AVall", "§4.4, Fig. 8", (Check("AVall", _s("replay/fft"), ">=", _s("joint/fft")),
                                       Check("AVall", _s("replay/lora"), ">=", _s("joint/lora")))),
    Claim("C17", "fully cooperative", "LoRA keeps old knowledge better than FFT in every fully-cooperative "
          "regime", "§4.4, Fig. 8, Table 5",
          (Check("AVE", _s("sequential/lora"), ">", _s("sequential/fft")),
           Check("AVE", _s("replay/lora"), ">", _s("replay/fft")),
           Check("AVE", _s("joint/lora"), ">", _s("joint/fft")))),
    Claim("C18", "fully cooperative", "With all data available, sequential LoRA with replay keeps old knowledge "
          "best among the LoRA methods", "§4.4, Table 5",
          (Check("AVE", _s("replay/lora"), ">=", _s("sequential/lora", "joint/lora", reduce="max")),)),
    Claim("C19", "overall", "LoRA beats FFT in most cases when old and new knowledge both count", "Abstract, §5",
          tuple(Check("AVall", _s(f"{m}/lora"), ">", _s(f"{m}/fft"))
                for m in ("one-round", "sequential", "replay", "joint", "moe")), need="most"),
)

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "~": lambda a, b: abs(a - b) <= SIMILAR * max(abs(a), abs(b)),
}


def check_verdict(op: str, left: float, right: float) -> str:
    """holds / does not hold / inconclusive, from the difference left - right and its interval (the two sides'
    replicates are paired, so the difference's replicates are too); the point comparison where it has none."""
    difference = left - right
    ci = interval_of(difference)
    if ci is None:
        return HOLDS if OPERATORS[op](left, right) else FAILS
    low, high = ci
    if op == "~":
        margin = SIMILAR * max(abs(left), abs(right))
        if -margin <= low and high <= margin:
            return HOLDS
        return FAILS if low > margin or high < -margin else INCONCLUSIVE
    if op in (">", ">="):
        low, high = -high, -low  # "left > right" is "right - left < 0"
    # now the claim is "difference < 0" (or <= 0)
    if high < 0 or (op in ("<=", ">=") and high <= 0):
        return HOLDS
    if low > 0 or (op in ("<", ">") and low >= 0):
        return FAILS
    return INCONCLUSIVE


@dataclass
class Outcome:
    """What one check found: both sides' numbers (None: not measured) and the text behind them."""

    check: Check
    left: float | None
    right: float | None
    evidence: str
    silent: bool = False  # the runs are there, but their numbers carry no signal (all 0, or undefined from 0)

    @property
    def measured(self) -> bool:
        return self.left is not None and self.right is not None

    @property
    def difference(self) -> float | None:
        return self.left - self.right if self.measured else None

    @property
    def verdict(self) -> str:
        if self.silent or (self.measured and all_zero(self.check, self.left, self.right)):
            return NO_SIGNAL
        return check_verdict(self.check.op, self.left, self.right) if self.measured else UNMEASURED

    @property
    def holds(self) -> bool:
        return self.verdict == HOLDS


@dataclass
class Verdict:
    claim: Claim
    outcomes: list[Outcome]

    @property
    def measured(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.measured]

    @property
    def silent(self) -> list[Outcome]:
        """The checks whose runs are there but whose numbers carry no signal."""
        return [o for o in self.outcomes if o.verdict == NO_SIGNAL]

    @property
    def verdict(self) -> str:
        """Over the checks with a signal: all: holds when every one holds, fails when one fails; most: holds when
        more than half hold, fails when more than half cannot; inconclusive otherwise. No signal where every check
        that found its runs found only zeros; not measured where none found its runs."""
        signal = [o for o in self.measured if o.verdict != NO_SIGNAL]
        if not signal:
            return NO_SIGNAL if self.silent else UNMEASURED
        found = [o.verdict for o in signal]
        held, failed = found.count(HOLDS), found.count(FAILS)
        if self.claim.need == "all":
            return HOLDS if held == len(found) else FAILS if failed else INCONCLUSIVE
        return HOLDS if held * 2 > len(found) else FAILS if failed * 2 >= len(found) else INCONCLUSIVE


def all_zero(check: Check, left: float, right: float) -> bool:
    """Whether a check compares two sides that both score 0 (a comparison with a constant, such as BWT < 0, is
    a measurement even at 0)."""
    return isinstance(check.right, Side) and left == 0 and right == 0


def run_stat(scores: Scores, run: Run, stat: str) -> float | None:
    if stat == "acquisition":
        return mean_defined(list(acquisition(scores, run).values()))
    if stat == "BWT":
        return mean_defined(list(backward_transfer(scores, run).values()))
    return run_averages(scores, run)[stat]


def _fmt(stat: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f}%" if stat == "BWT" else f"{value:.3f}"


def undefined_text(scores: Scores, runs: list[Run], stat: str) -> tuple[str, bool]:
    """Why runs that are in the study have no value of `stat`, and whether that is for lack of signal (a BWT
    from scores of 0) rather than a score not measured."""
    labels = ", ".join(r.label for r in runs)
    own = [v for r in runs for v in acquisition(scores, r).values() if v is not None]
    if stat == "BWT" and own and all(v == 0 for v in own):
        return (f"{labels}: BWT undefined, every task scored 0 right after its own round (BWT is a percent change "
                "from that score)", True)
    what = {"acquisition": "an acquisition score", "BWT": "a BWT"}.get(stat, stat)
    return f"{labels}: no {what} (a score it needs is not measured)", False


def _pick(side: Side, runs: list[Run], scores: Scores, stat: str) -> tuple[list[Run], float | None, str, bool]:
    """The runs a side reads (those with a value), its number, a readable account of both, and whether the runs
    are there but without a signal."""
    matched = [r for r in runs if any(fnmatch(r.key, p) for p in side.runs)]
    valued = [(r, v) for r in matched if (v := run_stat(scores, r, stat)) is not None]
    if not valued:
        if matched:
            return [], None, *undefined_text(scores, matched, stat)
        return [], None, f"no {' / '.join(side.runs)} in this study", False
    if side.reduce.endswith("lambda"):
        ordered = sorted((p for p in valued if p[0].lambda_value is not None), key=lambda p: p[0].lambda_value)
        valued = ordered[:1] if side.reduce == "lowest-lambda" else ordered[-1:]
    elif side.reduce in ("max", "min"):
        valued = [(max if side.reduce == "max" else min)(valued, key=lambda p: p[1])]
    if not valued:
        return [], None, f"no {' / '.join(side.runs)} with a lambda", False
    number = sum(v for _, v in valued) / len(valued)
    return [r for r, _ in valued], number, " ".join(f"{r.label} {_fmt(stat, v)}" for r, v in valued), False


def evaluate_check(check: Check, runs: list[Run], scores: Scores) -> Outcome:
    left_runs, left, left_text, left_silent = _pick(check.left, runs, scores, check.stat)
    if isinstance(check.right, Side):
        right_runs, right, right_text, right_silent = _pick(check.right, runs, scores, check.stat)
    else:
        right_runs, right, right_text, right_silent = [], check.right, f"{check.right:g}", False
    if left_runs and left_runs == right_runs:  # e.g. the highest and the lowest lambda of a single run
        return Outcome(check, None, None, f"only one run ({left_runs[0].label}): nothing to compare")
    if left is None or right is None:
        # a side not in the study makes the check unmeasured; sides there without a signal make it silent
        missing = [t for t, v, quiet in ((left_text, left, left_silent), (right_text, right, right_silent))
                   if v is None and not quiet]
        if missing:
            return Outcome(check, None, None, "; ".join(dict.fromkeys(missing)))
        return Outcome(check, None, None, "; ".join(t for t, v in ((left_text, left), (right_text, right))
                                                    if v is None), silent=True)
    op = "≈" if check.op == "~" else check.op
    return Outcome(check, left, right, f"{left_text} {op} {right_text}: {difference_text(check, left, right)}")


MARKS = {HOLDS: "✓", FAILS: "✗", INCONCLUSIVE: "?", NO_SIGNAL: "∅"}


def difference_text(check: Check, left: float, right: float) -> str:
    """'difference +0.021 [-0.010, +0.050] ?': the difference, its 95% interval and what it says; a similar
    claim also names its margin."""
    if all_zero(check, left, right):
        return f"both 0: no signal {MARKS[NO_SIGNAL]}"
    difference = left - right
    ci = interval_of(difference)
    percent = check.stat == "BWT"
    number = (lambda v: f"{v:+.1f}%") if percent else (lambda v: f"{v:+.3f}")
    text = f"difference {number(difference)}" + (f" [{number(ci[0])}, {number(ci[1])}]" if ci else " (no interval)")
    if check.op == "~":
        text += f", margin ±{number(SIMILAR * max(abs(left), abs(right))).lstrip('+')}"
    return f"{text} {MARKS[check_verdict(check.op, left, right)]}"


def evaluate_claims(scores: Scores, runs: list[Run], claims: tuple[Claim, ...] = CLAIMS) -> list[Verdict]:
    return [Verdict(c, [evaluate_check(k, runs, scores) for k in c.checks]) for c in claims]


# --- the same claims along the learn/forget fronts (sweeps) -----------------------------------------
def fft_vs_lora(check: Check) -> bool:
    """Whether a check compares one method's FFT run with its LoRA run on an average."""
    if not isinstance(check.right, Side) or check.stat not in AVERAGES:
        return False
    sides = (check.left, check.right)
    if any(s.reduce != "only" or len(s.runs) != 1 for s in sides):
        return False
    (left_method, _, left_ft), (right_method, _, right_ft) = (s.runs[0].partition("/") for s in sides)
    return left_method == right_method and {left_ft, right_ft} == {"fft", "lora"}


def evaluate_matched(check: Check, scores: Scores, points: list[TradeOff]) -> Outcome:
    """An FFT-vs-LoRA check along the two fronts instead of at equal settings: AVE at the largest new-knowledge
    gain both reach (matched acquisition), AVnew at the largest old-knowledge loss both reach, AVall each at
    its best setting. Values are turned back into scores so that the check's comparison reads as before."""
    assert isinstance(check.right, Side)
    by_family = families(points)
    left, right = (by_family.get(side.runs[0], []) for side in (check.left, check.right))
    if not left or not right:
        return Outcome(check, None, None, "no measured point of both")
    base = scores.averages("base")[check.stat]
    if check.stat == "AVall":
        (lp, lv), (rp, rv) = best_setting(scores, left, "AVall"), best_setting(scores, right, "AVall")
        text = f"each at its best setting: {lp.run.label} {lv:.3f} vs {rp.run.label} {rv:.3f}"
    else:
        fronts = (pareto_front(left), pareto_front(right))
        matched = matched_acquisition(*fronts) if check.stat == "AVE" else matched_forgetting(*fronts)
        if matched is None or base is None:
            what = "gains new knowledge" if check.stat == "AVE" else "loses old knowledge"
            return Outcome(check, None, None, f"not both fronts reach past the base: neither {what} at any setting")
        lv, rv = (base * (1 + change / 100) for change in (matched.left, matched.right))
        level = f"AVnew gain {matched.level:+.1f}%" if check.stat == "AVE" else f"AVE change {matched.level:+.1f}%"
        text = (f"at {level}: {check.stat} {lv:.3f} ({matched.left:+.1f}%) vs {rv:.3f} ({matched.right:+.1f}%), "
                f"fronts of {len(fronts[0])} and {len(fronts[1])} points")
    return Outcome(check, lv, rv, f"{text}: {difference_text(check, lv, rv)}")


def evaluate_matched_claims(scores: Scores, points: list[TradeOff],
                            claims: tuple[Claim, ...] = CLAIMS) -> dict[str, Verdict]:
    """claim id -> its FFT-vs-LoRA checks evaluated along the fronts (claims with such checks only)."""
    return {c.id: Verdict(c, [evaluate_matched(k, scores, points) for k in c.checks if fft_vs_lora(k)])
            for c in claims if any(fft_vs_lora(k) for k in c.checks)}


def claims_table(verdicts: list[Verdict], matched: dict[str, Verdict] | None = None) -> Table:
    """One row per claim; with `matched` (a study with sweeps), also each FFT-vs-LoRA claim along the fronts."""
    header = ["#", "the paper's finding", "source", "comparison", "this study", "measured", "verdict"]
    if matched is not None:
        header += ["along the fronts (matched acquisition)", "verdict (matched)"]
    rows = []
    for v in verdicts:
        cells = [v.claim.statement, v.claim.source, _comparison_text(v.claim),
                 "; ".join(o.evidence for o in v.outcomes), measured_text(v), v.verdict]
        if matched is not None:
            along = matched.get(v.claim.id)
            cells += ["; ".join(o.evidence for o in along.outcomes), along.verdict] if along else ["—", "—"]
        rows.append(TableRow(v.claim.id, cells, unit="text", key=v.claim.id))
    caption = ("Each finding of the paper, the comparison that tests it, and the verdict on this study's numbers: "
               "each check gives the difference of its two sides with its paired 95% bootstrap interval, and holds "
               "(✓) where the interval supports the finding, does not hold (✗) where it supports the opposite, and "
               f"is inconclusive (?) otherwise; 'similar' is an equivalence test within ±{SIMILAR:.0%} of the larger "
               "value. A check with a method missing is not measured; one whose runs are there but score 0 on both "
               "sides (or whose BWT is undefined because every task scored 0 after its own round) has no signal (∅) "
               "and counts for neither side; 'most' claims need more than half of their measured checks with a "
               "signal to hold.")
    if matched is not None:
        caption += (" Along the fronts: each FFT-vs-LoRA check again, over all settings swept: AVE at the largest "
                    "new-knowledge gain both fronts reach, AVnew at the largest old-knowledge loss both reach, "
                    "AVall at each one's best setting.")
    return Table("claims", caption, header, rows)


def measured_text(verdict: Verdict) -> str:
    """'2 of 3', and how many of those had no signal."""
    text = f"{len(verdict.measured) + sum(not o.measured for o in verdict.silent)} of {len(verdict.outcomes)}"
    return f"{text} ({len(verdict.silent)} no signal)" if verdict.silent else text


def _comparison_text(claim: Claim) -> str:
    text = "; ".join(k.text() for k in claim.checks)
    return f"most of: {text}" if claim.need == "most" else text


def verdict_counts(verdicts: list[Verdict]) -> dict[str, int]:
    counts = dict.fromkeys(VERDICTS, 0)
    for v in verdicts:
        counts[v.verdict] += 1
    return counts
