"""The paper's findings as data, each with the comparison that tests it on this study's numbers.

A verdict is computed from the results every time, from the difference of the two sides and its paired 95%
bootstrap interval (stats.py; items, and seeds where the study has several): "holds" where the interval
supports the claim, "does not hold" where it supports the opposite, "inconclusive" where it covers both,
"no signal" (the runs are there, but the scores compared are all 0, or a BWT or gain is undefined because the
score it is a percent change from is 0), or "not measured" (a method or task the comparison needs is not in the
study). Two claims are equivalence tests, each with its margin (MARGINS below): "similar" (~) holds where the
whole interval of the difference lies within ±margin, fails where it lies outside; "competitive" (≳, "not worse
by more than the margin": being better is competitive too) holds where the interval lies above -margin, fails
where it lies below. Without per-item scores (results from before they were kept) a check compares the point
estimates. Runs are selected by their key `method/finetune/variant` with shell-style wildcards: `olora/*` is
every O-LoRA run, `merge/*/ties` the TIES merges of FFT and LoRA. A check may read some tasks only, named as
the paper names them (PAPER_TASKS: a study's task matches by that name, the TRACE name, or the built-in task that
mirrors it); a task the study lacks leaves that check not measured.

Each claim quotes the sentence of the paper it tests (`quote`, from `source`), and says in `note` why its
comparison reads the paper so where that is not plain. docs/claims.md is generated from this data
(`scripts/docs_numbers.py --claims`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch

from knowstack.builtin.new_tasks import BUILTIN_TASKS
from knowstack.report.frontier import (
    TradeOff,
    best_setting,
    families,
    matched_acquisition,
    matched_forgetting,
    pareto_front,
)
from knowstack.report.runs import Run, acquisition, backward_transfer, run_values
from knowstack.report.tables import (
    AVERAGES,
    Column,
    Scores,
    Table,
    TableRow,
    Values,
    markdown_table,
    percent_change,
)
from knowstack.stats import interval_of, maximum_of, mean_of

HOLDS, FAILS, UNMEASURED, INCONCLUSIVE = "holds", "does not hold", "not measured", "inconclusive"
NO_SIGNAL = "no signal"  # measured, but on scores that are all 0: nothing to compare
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NO_SIGNAL, UNMEASURED)
# The equivalence margins (docs/claims.md says why these). "similar" (~): within 10% of the larger value;
# "competitive" (≳): not below the reference (the right side) by more than 10% of it. The paper calls
# differences of 4% or less "comparable" (sequential AVnew, Tables 3-4: 0.563 vs 0.543) and those of 30% or more
# "sharp" or "dramatic" (science 0.917 vs 0.531, fomc 0.413 vs 0.599): 10% lies between the two.
SIMILAR = 0.10
# C30, the sizes of Tables 1-2: percentage points around the paper's -7% and -1%. They are 6 points apart, so
# a run within ±2 of one is at least 4 points from the other: the check tells the two apart.
SIZE_MARGIN = 2.0
SIMILAR_OPS = ("~", "≳")

# The paper's task names (its config's, configs/paper/llama3-8b-trace.yaml) -> the names its text and TRACE
# give them. A study's task is the paper's task by either name (any case) or as the built-in task that mirrors
# it (builtin/new_tasks.py: quiz mirrors ScienceQA): per-task claims read the built-in world's mirrors.
PAPER_TASKS = {"cstance": "C-STANCE", "fomc": "FOMC", "meeting": "MeetingBank", "py150": "Py150",
               "science": "ScienceQA", "20minuten": "20Minuten", "math": "MetaMathQA / GSM8K",
               "mmlu": "MMLU", "commonsense_qa": "CommonsenseQA"}
TRACE_SIX = ("cstance", "fomc", "meeting", "py150", "science", "20minuten")  # Fig. 1's tasks: TRACE's, not math
PERCENT_STATS = ("BWT", "gain AVE", "gain AVnew", "task-gain AVE")
STAT_TEXT = {"BWT": "mean BWT (%)", "acquisition": "mean acquisition", "gain AVE": "AVE gain from base (%)",
             "gain AVnew": "AVnew gain from base (%)", "task-gain AVE": "mean of per-task old-knowledge gains (%)"}


def study_names(task: str) -> frozenset[str]:
    """The names (lower case) a task of the paper may have in a study."""
    known = PAPER_TASKS.get(task, task)
    return frozenset(n.lower() for n in {task, known, *(t.name for t in BUILTIN_TASKS if t.mirrors == known)})


def is_task(task: str, name: str) -> bool:
    """Whether a study's task `name` is the paper's `task`."""
    return name.lower() in study_names(task)


def tasks_text(tasks: tuple[str, ...], over: str = "mean") -> str:
    if tasks == TRACE_SIX:
        text = "the six TRACE tasks"
    elif all(t.startswith("-") for t in tasks):
        text = "every task but " + ", ".join(t[1:] for t in tasks)
    else:
        text = ", ".join(tasks)
    return f"worst of {text}" if over == "min" else text


@dataclass(frozen=True)
class Side:
    """The runs one side of a comparison reads, and how several of them reduce to one number; which tasks it
    reads where they differ from its check's, how they reduce (their mean or the worst), and at which model."""

    runs: tuple[str, ...]
    reduce: str = "only"  # only | max | min | mean | lowest-lambda | highest-lambda
    tasks: tuple[str, ...] | None = None  # None: the check's tasks
    over: str = "mean"  # mean (the columns' mean, as AVnew) | min (the worst task)
    at: str = ""  # "": the run's final model (one-round: each task's own); "before:T" / "after:T": T's round

    def text(self) -> str:
        names = ", ".join(self.runs)
        text = names if self.reduce == "only" else f"{self.reduce}{{{names}}}"
        where = self.where()
        return f"{text} [{where}]" if where else text

    def where(self) -> str:
        """What the side reads beyond its runs: 'worst of every task but science', 'before math'."""
        parts = [tasks_text(self.tasks, self.over)] if self.tasks is not None else []
        return ", ".join(parts + ([self.at.replace(":", " ")] if self.at else []))


@dataclass(frozen=True)
class Check:
    stat: str  # AVE | AVnew | AVall (run averages), acquisition (mean diagonal of R), BWT (mean, %), gain AVE |
    # gain AVnew (the average's percent change from the base's), task-gain AVE (mean of per-task percent changes)
    left: Side
    op: str  # < | <= | > | >= | ~ (similar) | ≳ (competitive)
    right: Side | float
    tasks: tuple[str, ...] = ()  # the paper's tasks read ("-mmlu": every task but mmlu); (): all of the stat's
    margin: float | None = None  # ~ and ≳: in the stat's units; None: SIMILAR of the values

    def text(self) -> str:
        right = self.right.text() if isinstance(self.right, Side) else constant_text(self)
        return f"{stat_text(self.stat, self.tasks)}: {self.left.text()} {op_text(self)} {right}"


def constant_text(check: Check) -> str:
    """A constant right side as the stat reads: '-7%' for a percent."""
    return f"{check.right:g}" + ("%" if check.stat in PERCENT_STATS else "")


def stat_text(stat: str, tasks: tuple[str, ...]) -> str:
    single = {"AVE": "score", "AVnew": "score", "BWT": "BWT (%)", "acquisition": "acquisition"}
    if stat in single and len(tasks) == 1 and not tasks[0].startswith("-"):
        return f"{tasks[0]} {single[stat]}"
    text = STAT_TEXT.get(stat, stat)
    return f"{text} on {tasks_text(tasks)}" if tasks else text


def op_text(check: Check) -> str:
    if check.op not in SIMILAR_OPS:
        return check.op
    if check.margin is not None:
        unit = " points" if check.stat in PERCENT_STATS else ""
        return f"within ±{check.margin:g}{unit} of"
    if check.op == "~":
        return f"within {SIMILAR:.0%} of"
    return f"competitive with (at most {SIMILAR:.0%} below)"


@dataclass(frozen=True)
class Claim:
    id: str
    setting: str
    statement: str
    source: str
    checks: tuple[Check, ...]
    need: str = "all"  # all: every measured check must hold; most: more than half of them
    quote: str = ""  # the paper's sentence(s) the claim tests, verbatim
    note: str = ""  # why the comparison reads the paper so, where that is not plain


def _s(*runs: str, reduce: str = "only", tasks: tuple[str, ...] | None = None, over: str = "mean",
       at: str = "") -> Side:
    return Side(tuple(runs), reduce, tasks, over, at)


def _fft_lora(stat: str, method: str, better: str, tasks: tuple[str, ...]) -> tuple[Check, ...]:
    """One check per task: `better` (fft or lora) scores higher than the other on it."""
    worse = "lora" if better == "fft" else "fft"
    return tuple(Check(stat, _s(f"{method}/{better}"), ">", _s(f"{method}/{worse}"), tasks=(t,)) for t in tasks)


SEMI = ("olora/*", "merge/*")
CLAIMS: tuple[Claim, ...] = (
    # --- one-round (§4.2) ---------------------------------------------------------------------------------
    Claim("C1", "one-round", "One-round FFT loses more old knowledge than one-round LoRA", "§4.2, Fig. 2",
          (Check("AVE", _s("one-round/fft"), "<", _s("one-round/lora")),),
          quote="Average old-knowledge retention after one-round training across models, using full fine-tuning "
                "(FFT) suffers considerably more degradation then with LoRA training."),
    Claim("C2", "one-round", "One-round FFT and LoRA acquire about as much new knowledge, on average over the six "
          "TRACE tasks", "§4.2, Fig. 1",
          (Check("AVnew", _s("one-round/fft"), "~", _s("one-round/lora"), tasks=TRACE_SIX),),
          quote="One-round training, starting from the base model, and fine-tuning the model on 6 different "
                "dataset-tasks. New knowledge acquisition on average is similar with LoRA and FFT.",
          note="Fig. 1 shows the six TRACE tasks, not math: the average is theirs (those of them the study has)."),
    Claim("C20", "one-round", "One round of FFT does better than LoRA on science and meeting; LoRA does better on "
          "cstance and py150", "§4.2, Fig. 1",
          _fft_lora("AVnew", "one-round", "fft", ("science", "meeting"))
          + _fft_lora("AVnew", "one-round", "lora", ("cstance", "py150")),
          quote="Observe that science question-answer and meeting summarization perform better when the model is "
                "fully fine-tuned. On the other hand, on cstance, the Chinese task, and python code completion the "
                "LoRA training performed better.",
          note="One check per task; on the built-in world each reads the task that mirrors it (quiz, summary, "
               "stance, code)."),
    Claim("C21", "one-round", "MMLU and CommonsenseQA lose more after one round of FFT than after LoRA",
          "§4.2, Fig. 2",
          _fft_lora("AVE", "one-round", "lora", ("mmlu", "commonsense_qa")),
          quote="We see old knowledge degradation notably on the tasks MMLU and CommonsenseQA which degrade more "
                "after FFT than after LoRA training.",
          note="Each one-round run's old knowledge is the mean over its models, per test, as Fig. 2 averages it. "
               "Not measured on a study without those lm-eval tasks (the built-in world has its own)."),
    # --- sequential (§4.3, Tables 1-4) ----------------------------------------------------------------------
    Claim("C3", "sequential", "Sequential FFT loses more old knowledge than sequential LoRA",
          "§4.3, Fig. 3, Tables 1-2", (Check("AVE", _s("sequential/fft"), "<", _s("sequential/lora")),),
          quote="As we saw in one-round training, FFT, after successive training, experiences clearly more "
                "degradation of old knowledge than LoRA training."),
    Claim("C30", "sequential", "Sequential training changes old knowledge by about -7% with FFT and -1% with LoRA",
          "§4.3, Tables 1-2",
          (Check("task-gain AVE", _s("sequential/fft"), "~", -7.0, margin=SIZE_MARGIN),
           Check("task-gain AVE", _s("sequential/lora"), "~", -1.0, margin=SIZE_MARGIN)),
          quote="Observe that overall the degradation from LoRA training is lower, at -1% as compared to -7% with "
                "FFT.",
          note="Tables 1-2's -7% and -1% are the mean of the per-task gains from the base (-6.8%, -1.2%), not the "
               "gain of the mean AVE (-6.3%, -1.1%): the check computes the mean of per-task gains. Margin ±2 "
               "points: the two sizes are 6 points apart, so a run within ±2 of one is not within ±2 of the other."),
    Claim("C4", "sequential", "Sequential FFT and LoRA are comparable on new knowledge on average", "§4.3, Fig. 4",
          (Check("AVnew", _s("sequential/fft"), "~", _s("sequential/lora")),),
          quote="Looking at Figure 4, we see that performance on average for recent knowledge acquisition and "
                "retention is comparable for LoRA and FFT, as shown in the last set of bars.",
          note="Fig. 4 shows all 7 tasks after the 7 rounds: AVnew, math's two columns included as in Tables 3-4."),
    Claim("C5", "sequential", "Premise, not a finding: one-round training is an upper bound for sequential "
          "training on new knowledge, as far as the tasks have little synergy", "§4.3, Fig. 4",
          (Check("AVnew", _s("one-round/fft"), ">=", _s("sequential/fft")),
           Check("AVnew", _s("one-round/lora"), ">=", _s("sequential/lora"))),
          quote="As such the one-round results can be seen as an upper bound, to the extent that there is little "
                "synergy across the tasks in the TRACE datasets.",
          note="The paper assumes this and measures nothing against it; it is tested here because the upper bound "
               "reads the other claims: where it does not hold, the study's tasks help one another."),
    Claim("C29", "sequential", "Sequential training remains largely competitive with one-round training on new "
          "knowledge", "§4.3, Fig. 4",
          (Check("AVnew", _s("sequential/fft"), "≳", _s("one-round/fft")),
           Check("AVnew", _s("sequential/lora"), "≳", _s("one-round/lora"))),
          quote="Sequential training remains largely competitive with one-round training, and has the advantage of "
                "providing a single model than than an ever-larger growing number of separate models or adapters.",
          note=f"Competitive: sequential at most {SIMILAR:.0%} below one-round (being above is competitive too)."),
    Claim("C22", "sequential", "After 7 sequential rounds FFT is far better on science; LoRA is better on cstance, "
          "fomc and py150", "§4.3, Fig. 4, Tables 3-4",
          _fft_lora("AVnew", "sequential", "fft", ("science",))
          + _fft_lora("AVnew", "sequential", "lora", ("cstance", "fomc", "py150")),
          quote="Sharp differences, however, can be seen on specific task performance, such as science, where "
                "sequential FFT performs dramatically better than LoRA, and Chinese, fomc classification and python "
                "code completion, where the reverse is true and LoRA provides better results."),
    Claim("C7", "sequential", "LoRA is a better choice than FFT for sequential training, old and new knowledge "
          "together", "§4.3, Tables 1-4",
          (Check("AVall", _s("sequential/lora"), ">", _s("sequential/fft")),),
          quote="Overall, however, LoRA appears to be a better choice for sequential training than full-fine tuning "
                "for its better average knowledge acquisition and old knowledge retention.",
          note="The sentence's 'better average knowledge acquisition' is not what Tables 3-4 show: after 7 rounds "
               "FFT's AVnew is 0.563, LoRA's 0.543 (right after each round 0.617 and 0.610). LoRA's lead is in old "
               "knowledge (C3), and old and new together favour it (AVall 0.595 vs 0.589): the check is that."),
    Claim("C6", "sequential", "Sequential training forgets earlier tasks: BWT is negative on average",
          "§4.3, Fig. 6, Tables 3-4",
          (Check("BWT", _s("sequential/fft"), "<", 0.0), Check("BWT", _s("sequential/lora"), "<", 0.0)),
          quote="The BWT is generally negative, as model performance on a past task tends to decrease when the "
                "model is subsequently trained on new tasks."),
    Claim("C23", "sequential", "Sequential LoRA's math round makes science drop sharply (Table 4: 0.89 -> 0.53)",
          "§4.3, Table 4",
          (Check("AVnew", _s("sequential/lora", at="after:math"), "<", _s("sequential/lora", at="before:math"),
                 tasks=("science",)),),
          quote="Specifically, the LoRA training on the math dataset caused a sharp decline in science performance "
                "of the final model.",
          note="Science right after the math round against right before it (the paper's math round is the last)."),
    Claim("C24", "sequential", "Under sequential LoRA, science's BWT is the worst of all tasks", "§4.3, Fig. 6, "
          "Table 4",
          (Check("BWT", _s("sequential/lora"), "<", _s("sequential/lora", tasks=("-science",), over="min"),
                 tasks=("science",)),),
          quote="Most striking is how large the negative BWT is on the science task using LoRA, and given that the "
                "science training is disrupted by only two other tasks after it (20minuten and math), the sharp "
                "degradation using LoRA is significant.",
          note="Fig. 6's caption: 'science near the end of the sequence suffers most'. Table 4: -41% against -15% "
               "(fomc) next."),
    Claim("C28", "sequential", "Training on later tasks makes fomc decline sharply: its BWT is below the other "
          "tasks' mean", "§4.3, Tables 3-4",
          tuple(Check("BWT", _s(f"sequential/{ft}"), "<", _s(f"sequential/{ft}", tasks=("-fomc",)), tasks=("fomc",))
                for ft in ("fft", "lora")),
          quote="Similarly, training on subsequent tasks causes a sharp decline in performance on the fomc "
                "classification task.",
          note="'Sharp' read as worse than the other tasks on average (Tables 3-4: FFT -42% against a mean of -6%, "
               "LoRA -15% against -12%). A finding the issue's list of missing ones left out."),
    # --- semi-cooperative (§4.3: O-LoRA, merging, MoE) ------------------------------------------------------
    Claim("C8", "semi-cooperative", "O-LoRA acquires less than LoRA right after each round", "§4.3, Fig. 5",
          (Check("acquisition", _s("olora/*", reduce="max"), "<", _s("sequential/lora")),),
          quote="On most tasks, the unconstrained LoRA achieves higher task scores, as is expected given that LoRA "
                "optimization is unconstrained by orthogonality requirements."),
    Claim("C9", "semi-cooperative", "O-LoRA with a higher λ acquires less", "§4.3, Fig. 5, §5",
          (Check("acquisition", _s("olora/*", reduce="highest-lambda"), "<",
                 _s("olora/*", reduce="lowest-lambda")),),
          quote="It is preferable to use a small weight on the orthogonality term in the loss function to mitigate "
                "the reduction in CE loss optimization that comes from the presence of that term."),
    Claim("C10", "semi-cooperative", "O-LoRA forgets less than LoRA: higher BWT after the last round",
          "§4.3, Fig. 6", (Check("BWT", _s("olora/*", reduce="min"), ">", _s("sequential/lora")),),
          quote="On the other hand, the orthogonality of the o-lora-trained parameters indeed exhibit less "
                "interference with the previous adapter parameters, as can be seen in Figure 6."),
    Claim("C11", "semi-cooperative", "O-LoRA with a small λ beats sequential LoRA, old and new knowledge together",
          "§4.3, §5",
          (Check("AVall", _s("olora/*", reduce="lowest-lambda"), ">", _s("sequential/lora")),),
          quote="The net conclusion on the comparison between standard and orthogonal LoRA is that a small "
                "orthogonality weight can be advantageous in successive learning"),
    Claim("C12", "semi-cooperative", "MoE mixing gains the most from the base in the semi-cooperative setting, "
          "both the FFT MoE and the LoRA MoE, on new and on old knowledge", "§4.3, Figs. 7, 9, 10",
          tuple(Check(stat, _s(f"moe/{ft}"), ">", _s(*SEMI, reduce="max"))
                for stat in ("gain AVnew", "gain AVE") for ft in ("fft", "lora")),
          quote="We see that overall, MOE model mixing performs best, both FFT and LoRA MOE Mixing, with the "
                "orthogonal subspace o-lora variants performing well also.",
          note="Fig. 7 plots the gain from the base (Figs. 9 and 10: new and old knowledge), not AVall; 'both' is "
               "each MoE, not the better of the two. The paper's FFT MoE mixes 4 of the 7 experts, so its "
               "new-knowledge gain is 'not fully comparable' (§4.3)."),
    Claim("C25", "semi-cooperative", "On new knowledge O-LoRA comes second, after MoE mixing and ahead of every "
          "merge", "Appendix, Fig. 9",
          (Check("gain AVnew", _s("olora/*", reduce="max"), ">", _s("merge/*", reduce="max")),
           Check("gain AVnew", _s("olora/*", reduce="max"), "<", _s("moe/*", reduce="max"))),
          quote="While the results are dominated by performance on the python coding task, we do see that MOE "
                "model mixing overall provides the most benefit with o-lora in second place, as shown also in the "
                "summary in Figure 7."),
    Claim("C13", "semi-cooperative", "TIES and TIES-DARE are weak on new knowledge", "§4.3, Fig. 7",
          (Check("AVnew", _s("merge/*/ties", "merge/*/ties-dare", reduce="max"), "<",
                 _s("merge/*/average", "merge/*/task-average", "olora/*", "moe/*", reduce="min")),),
          quote="The TIES and TIES-DARE heuristics do not perform well on new knowledge retention as compared to "
                "the other methods."),
    Claim("C26", "semi-cooperative", "Averaging FFT models keeps old knowledge well, except MMLU, which declines "
          "sharply", "§4.3, Fig. 10",
          (Check("AVE", _s("merge/fft/average"), "<", _s("base"), tasks=("mmlu",)),
           Check("AVE", _s("merge/fft/average"), "≳", _s("base"), tasks=("-mmlu",))),
          quote="Full fine-tuning merging via straight averaging performs quite well on old knowledge except for a "
                "sharp decline in mmlu which impacts its overall performance.",
          note=f"'Quite well' read as competitive with the base: at most {SIMILAR:.0%} below it on the other "
               "old-knowledge tasks. Not measured on a study without MMLU."),
    Claim("C14", "semi-cooperative", "Merging and MoE mixing of one-round models are each a competitive "
          "alternative to sequential training", "§4.3",
          (Check("AVall", _s("merge/*", reduce="max"), "≳", _s("sequential/*", reduce="max")),
           Check("AVall", _s("moe/*", reduce="max"), "≳", _s("sequential/*", reduce="max"))),
          quote="In summary, in the semi-cooperative case, MOE model mixing and model merging of one-round models "
                "remain a very competitive alternative to sequential training.",
          note=f"Competitive: at most {SIMILAR:.0%} below the best sequential run (being above is competitive too), "
               "for merging and for MoE mixing each."),
    # --- fully cooperative (§4.4, Tables 5-6) ----------------------------------------------------------------
    Claim("C15", "fully cooperative", "Replay beats plain sequential training, old and new knowledge together",
          "§4.4, Fig. 8, Table 6",
          (Check("AVall", _s("replay/fft"), ">", _s("sequential/fft")),
           Check("AVall", _s("replay/lora"), ">", _s("sequential/lora"))),
          quote="Sequential LoRA training with replay perform best on new knowledge acquisition and old knowledge "
                "retention.",
          note="Fig. 8's caption; the text calls replay 'effective' without a sentence on FFT with replay against "
               "sequential FFT. Tables 5-6: AVall 0.621 vs 0.589 (FFT), 0.633 vs 0.595 (LoRA)."),
    Claim("C16", "fully cooperative", "Sequential training with replay does better than joint training on new "
          "knowledge", "§4.4, Fig. 8, Table 6",
          (Check("AVnew", _s("replay/fft"), ">", _s("joint/fft")),
           Check("AVnew", _s("replay/lora"), ">", _s("joint/lora"))),
          quote="While one might expect joint training to outperform all other methods, sequential training with "
                "replay actually performs better than joint training. [...] sequential LoRA with replay and FFT with "
                "replay both perform very well, with joint training slightly inferior.",
          note="The text's comparison is new knowledge (its second sentence; Table 6: AVnew 0.633 vs 0.603 FFT, "
               "0.613 vs 0.585 LoRA). On AVall joint FFT is level with FFT with replay (0.6214 vs 0.6208) and on old "
               "knowledge ahead (Table 5: 0.643 vs 0.607), so AVall was not what the text describes."),
    Claim("C27", "fully cooperative", "With replay, FFT beats LoRA on math and science", "§4.4, Table 6",
          _fft_lora("AVnew", "replay", "fft", ("math", "science")),
          quote="A look at the detailed results, however, in Table 6 in the Appendix, shows that FFT with replay "
                "strongly outperforms LoRA with replay on the math and science tests.",
          note="Math is its two columns' mean (GSM8K with and without chain of thought)."),
    Claim("C17", "fully cooperative", "LoRA keeps old knowledge better than FFT in every fully-cooperative regime",
          "§4.4, Fig. 8, Table 5",
          tuple(Check("AVE", _s(f"{m}/lora"), ">", _s(f"{m}/fft")) for m in ("sequential", "replay", "joint")),
          quote="LoRA performs better overall in retaining old knowledge in this fully-cooperative setting."),
    Claim("C18", "fully cooperative", "With all data available, sequential LoRA with replay keeps old knowledge "
          "best among the LoRA methods", "§4.4, Table 5",
          (Check("AVE", _s("replay/lora"), ">=", _s("sequential/lora", "joint/lora", reduce="max")),),
          quote="Amongst the LoRA techniques in the fully-cooperative setting, sequential LoRA with replay offers the "
                "best performance in retaining old knowledge."),
    # --- overall ------------------------------------------------------------------------------------------
    Claim("C19", "overall", "LoRA does better than FFT in most cases, old and new knowledge together",
          "Abstract, §5",
          tuple(Check("AVall", _s(f"{m}/lora"), ">", _s(f"{m}/fft"))
                for m in ("one-round", "sequential", "replay", "joint")), need="most",
          quote="Overall, LoRA performs better in most cases than full-fine tuning of all parameters when both new "
                "knowledge acquisition and retention of old, including recent, knowledge are taken into account.",
          note="'Most cases', not every: Table 6's joint rows go the other way (AVall 0.621 FFT, 0.617 LoRA), "
               "sequential and replay favour LoRA. §5 adds the FFT MoE's memory, which no score measures: the MoEs "
               "are not a case here (both 'perform very well', C12)."),
)

# Beyond the paper: the classic continual-learning baselines every CL paper compares against, EWC and LwF, against
# plain sequential training and O-LoRA. They quote no sentence: each is a measured difference with its interval, the
# same verdicts as the claims', shown in the report's baselines section (not counted among the paper's findings).
# A method with several lambdas enters at its best by the stat compared (reduce max), on either side alike.
BASELINE_SOURCE = "EWC: Kirkpatrick et al. 2017; LwF: Li & Hoiem 2017; O-LoRA: Wang et al. 2023"
BASELINES: tuple[Claim, ...] = (
    Claim("B1", "baselines", "EWC forgets less than plain sequential training: higher mean BWT (EWC at its best λ)",
          BASELINE_SOURCE, tuple(Check("BWT", _s(f"ewc/{ft}/*", reduce="max"), ">", _s(f"sequential/{ft}"))
                                 for ft in ("fft", "lora"))),
    Claim("B2", "baselines", "LwF forgets less than plain sequential training: higher mean BWT (LwF at its best λ)",
          BASELINE_SOURCE, tuple(Check("BWT", _s(f"lwf/{ft}/*", reduce="max"), ">", _s(f"sequential/{ft}"))
                                 for ft in ("fft", "lora"))),
    Claim("B3", "baselines", "EWC and LwF keep more old knowledge than plain sequential training (AVE, each at its "
          "best λ)", BASELINE_SOURCE,
          tuple(Check("AVE", _s(f"{m}/{ft}/*", reduce="max"), ">", _s(f"sequential/{ft}"))
                for m in ("ewc", "lwf") for ft in ("fft", "lora"))),
    Claim("B4", "baselines", "O-LoRA forgets less than EWC and than LwF with LoRA: higher mean BWT (each at its best "
          "λ)", BASELINE_SOURCE,
          tuple(Check("BWT", _s("olora/*", reduce="max"), ">", _s(f"{m}/lora/*", reduce="max")) for m in ("ewc", "lwf"))),
    Claim("B5", "baselines", "O-LoRA beats EWC and LwF with LoRA on old and new knowledge together (AVall, each at its "
          "best λ)", BASELINE_SOURCE,
          tuple(Check("AVall", _s("olora/*", reduce="max"), ">", _s(f"{m}/lora/*", reduce="max"))
                for m in ("ewc", "lwf"))),
    Claim("B6", "baselines", "EWC and LwF learn less right after each round than plain sequential training (the price "
          "of holding on; acquisition, each at its best λ)", BASELINE_SOURCE,
          tuple(Check("acquisition", _s(f"{m}/{ft}/*", reduce="max"), "<", _s(f"sequential/{ft}"))
                for m in ("ewc", "lwf") for ft in ("fft", "lora"))),
)

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def margin_of(op: str, left: float, right: float, margin: float | None = None) -> float:
    """An equivalence check's margin: the one given, else SIMILAR of the larger value (~) or of the reference,
    the right side (≳)."""
    if margin is not None:
        return margin
    return SIMILAR * (max(abs(left), abs(right)) if op == "~" else abs(right))


def check_verdict(op: str, left: float, right: float, margin: float | None = None) -> str:
    """holds / does not hold / inconclusive, from the difference left - right and its interval (the two sides'
    replicates are paired, so the difference's replicates are too); the point comparison where it has none."""
    difference = left - right
    ci = interval_of(difference)
    if op in SIMILAR_OPS:
        limit = margin_of(op, left, right, margin)
        low, high = ci if ci is not None else (difference, difference)
        if op == "~":
            if -limit <= low and high <= limit:
                return HOLDS
            return FAILS if low > limit or high < -limit else INCONCLUSIVE
        return HOLDS if low >= -limit else FAILS if high < -limit else INCONCLUSIVE
    if ci is None:
        return HOLDS if OPERATORS[op](left, right) else FAILS
    low, high = ci
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
        if not self.measured:
            return UNMEASURED
        return check_verdict(self.check.op, self.left, self.right, self.check.margin)

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


# --- what a side reads: its tasks' columns, at its model, reduced to the stat ------------------------------
def stat_kinds(stat: str) -> tuple[str, ...]:
    """Which columns a stat reads: old knowledge (AVE and its gains), new knowledge, or both (AVall)."""
    return ("new", "old") if stat == "AVall" else ("old",) if stat.endswith("AVE") else ("new",)


def select_columns(scores: Scores, stat: str, tasks: tuple[str, ...]) -> tuple[list[Column], str]:
    """The study's columns of the paper's `tasks` (every column of the stat's kind with no tasks; '-t': every one
    but t's), or none and why. Of several tasks those the study has are read; a task to leave out must be there."""
    columns = [c for c in scores.columns if c[0] in stat_kinds(stat)]
    if not tasks:
        return columns, ""
    kept = [t for t in tasks if not t.startswith("-")]
    dropped = [t[1:] for t in tasks if t.startswith("-")]
    absent = [t for t in [*kept, *dropped] if not any(is_task(t, c[1]) for c in columns)]
    if any(t in absent for t in dropped) or (kept and all(t in absent for t in kept)):
        return [], f"no {' / '.join(t for t in [*kept, *dropped] if t in absent)} in this study"
    chosen = [c for c in columns
              if (not kept or any(is_task(t, c[1]) for t in kept)) and not any(is_task(t, c[1]) for t in dropped)]
    return chosen, ""


def side_tasks(check: Check, side: Side) -> tuple[str, ...]:
    return check.tasks if side.tasks is None else side.tasks


def round_of(run: Run, task: str) -> int | None:
    """The index in run.models of the round that trained the paper's `task`."""
    return next((i for i, r in enumerate(run.models) if is_task(task, r.trained_on)), None)


def values_at(scores: Scores, run: Run, at: str) -> Values | None:
    """The run's values per column: its own (run_values), or the model's right before or after a task's round
    (before the first round: the base's); None where the run does not train that task."""
    if not at:
        return run_values(scores, run)
    where, _, task = at.partition(":")
    i = round_of(run, task)
    if i is None:
        return None
    model = run.models[i].model if where == "after" else run.models[i - 1].model if i else "base"
    return scores.values(model)


def reduce_columns(values: list[tuple[Column, float | str | None]], over: str, every: bool) -> float | None:
    """The columns' mean, or (over='min') the worst task's (a task's columns averaged first); `every`: None when a
    value is missing (averages), else over the numbers there are (BWT, acquisition: undefined for some tasks)."""
    numbers = [(c, v) for c, v in values if isinstance(v, float | int)]
    if not numbers or (every and len(numbers) != len(values)):
        return None
    if over == "mean":
        return mean_of([v for _, v in numbers])
    by_task: dict[str, list[float]] = {}
    for column, value in numbers:
        by_task.setdefault(column[1], []).append(value)
    return -maximum_of([-mean_of(v) for v in by_task.values()])  # the minimum, keeping replicates


def side_stat(scores: Scores, run: Run, stat: str, side: Side, columns: list[Column]) -> float | None:
    """The side's number for one run: `stat` over `columns`, at the side's model."""
    if stat == "acquisition":
        found = acquisition(scores, run)
        return reduce_columns([(c, found.get(c)) for c in columns], side.over, every=False)
    if stat == "BWT":
        found = backward_transfer(scores, run)
        return reduce_columns([(c, found.get(c)) for c in columns], side.over, every=False)
    values = values_at(scores, run, side.at)
    if values is None:
        return None
    if stat == "task-gain AVE":
        base = scores.values("base")
        return reduce_columns([(c, percent_change(base.get(c), values.get(c))) for c in columns], side.over, True)
    value = reduce_columns([(c, values.get(c)) for c in columns], side.over, every=True)
    if stat.startswith("gain "):
        base = reduce_columns([(c, scores.value("base", c)) for c in columns], side.over, every=True)
        return percent_change(base, value)
    return value


def _fmt(stat: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f}%" if stat in PERCENT_STATS else f"{value:.3f}"


def undefined_text(scores: Scores, runs: list[Run], stat: str, side: Side,
                   columns: list[Column]) -> tuple[str, bool]:
    """Why runs that are in the study have no value of `stat`, and whether that is for lack of signal (a BWT or
    gain from a score of 0) rather than a score not measured."""
    labels = ", ".join(r.label for r in runs)
    own = [v for r in runs for c, v in acquisition(scores, r).items() if c in columns and v is not None]
    if stat == "BWT" and own and all(v == 0 for v in own):
        return (f"{labels}: BWT undefined, every task scored 0 right after its own round (BWT is a percent change "
                "from that score)", True)
    if "gain" in stat:
        base = [scores.value("base", c) for c in columns]
        if None in base:
            return f"{labels}: no gain from base (the base's scores are not all measured)", False
        if 0 in base:
            return f"{labels}: gain from base undefined, the base scores 0 (a gain is a percent change from it)", True
    if side.at:
        task = side.at.partition(":")[2]
        if all(round_of(r, task) is None for r in runs):
            return f"{labels}: no round trains {task}", False
    what = {"acquisition": "acquisition score", "BWT": "BWT"}.get(stat, stat)  # "no BWT (a score it needs ...)"
    return f"{labels}: no {what} (a score it needs is not measured)", False


def _pick(side: Side, runs: list[Run], scores: Scores, stat: str,
          columns: list[Column]) -> tuple[list[Run], float | None, str, bool]:
    """The runs a side reads (those with a value), its number, a readable account of both, and whether the runs
    are there but without a signal."""
    matched = [r for r in runs if any(fnmatch(r.key, p) for p in side.runs)]
    valued = [(r, v) for r in matched if (v := side_stat(scores, r, stat, side, columns)) is not None]
    if not valued:
        if matched:
            return [], None, *undefined_text(scores, matched, stat, side, columns)
        return [], None, f"no {' / '.join(side.runs)} in this study", False
    if side.reduce.endswith("lambda"):
        ordered = sorted((p for p in valued if p[0].lambda_value is not None), key=lambda p: p[0].lambda_value)
        valued = ordered[:1] if side.reduce == "lowest-lambda" else ordered[-1:]
    elif side.reduce in ("max", "min"):
        valued = [(max if side.reduce == "max" else min)(valued, key=lambda p: p[1])]
    if not valued:
        return [], None, f"no {' / '.join(side.runs)} with a lambda", False
    number = sum(v for _, v in valued) / len(valued)
    where = f" ({side.where()})" if side.where() else ""
    return [r for r, _ in valued], number, " ".join(f"{r.label}{where} {_fmt(stat, v)}" for r, v in valued), False


def aliases_text(columns: list[Column], tasks: tuple[str, ...]) -> str:
    """'science is quiz here; ': the paper's tasks a study reads under another name (the built-in world's)."""
    named = [(t, c[1]) for t in tasks if not t.startswith("-") for c in columns if is_task(t, c[1]) and c[1] != t]
    return "".join(f"{t} is {name} here; " for t, name in dict.fromkeys(named))


def evaluate_check(check: Check, runs: list[Run], scores: Scores) -> Outcome:
    sides = [s for s in (check.left, check.right) if isinstance(s, Side)]
    selected = [select_columns(scores, check.stat, side_tasks(check, s)) for s in sides]
    missing = [why for _, why in selected if why]
    if missing:
        return Outcome(check, None, None, "; ".join(dict.fromkeys(missing)))
    left_runs, left, left_text, left_silent = _pick(check.left, runs, scores, check.stat, selected[0][0])
    if isinstance(check.right, Side):
        right_runs, right, right_text, right_silent = _pick(check.right, runs, scores, check.stat, selected[1][0])
    else:
        right_runs, right, right_text, right_silent = [], check.right, constant_text(check), False
    same_side = isinstance(check.right, Side) and (check.left.tasks, check.left.at) == (check.right.tasks,
                                                                                       check.right.at)
    if left_runs and left_runs == right_runs and same_side:  # e.g. the highest and the lowest lambda of one run
        return Outcome(check, None, None, f"only one run ({left_runs[0].label}): nothing to compare")
    if left is None or right is None:
        # a side not in the study makes the check unmeasured; sides there without a signal make it silent
        missing = [t for t, v, quiet in ((left_text, left, left_silent), (right_text, right, right_silent))
                   if v is None and not quiet]
        if missing:
            return Outcome(check, None, None, "; ".join(dict.fromkeys(missing)))
        quiet = dict.fromkeys(t for t, v in ((left_text, left), (right_text, right)) if v is None)
        return Outcome(check, None, None, "; ".join(quiet), silent=True)
    op = "≈" if check.op == "~" else check.op
    prefix = aliases_text(selected[0][0], side_tasks(check, check.left))
    return Outcome(check, left, right, f"{prefix}{left_text} {op} {right_text}: {difference_text(check, left, right)}")


MARKS = {HOLDS: "✓", FAILS: "✗", INCONCLUSIVE: "?", NO_SIGNAL: "∅"}


def difference_text(check: Check, left: float, right: float) -> str:
    """'difference +0.021 [-0.010, +0.050] ?': the difference, its 95% interval and what it says; an equivalence
    check also names its margin."""
    if all_zero(check, left, right):
        return f"both 0: no signal {MARKS[NO_SIGNAL]}"
    difference = left - right
    ci = interval_of(difference)
    percent = check.stat in PERCENT_STATS
    number = (lambda v: f"{v:+.1f}%") if percent else (lambda v: f"{v:+.3f}")
    text = f"difference {number(difference)}" + (f" [{number(ci[0])}, {number(ci[1])}]" if ci else " (no interval)")
    if check.op in SIMILAR_OPS:
        text += f", margin ±{number(margin_of(check.op, left, right, check.margin)).lstrip('+')}"
    return f"{text} {MARKS[check_verdict(check.op, left, right, check.margin)]}"


def evaluate_claims(scores: Scores, runs: list[Run], claims: tuple[Claim, ...] = CLAIMS) -> list[Verdict]:
    return [Verdict(c, [evaluate_check(k, runs, scores) for k in c.checks]) for c in claims]


# --- the same claims along the learn/forget fronts (sweeps) -----------------------------------------
def fft_vs_lora(check: Check) -> bool:
    """Whether a check compares one method's FFT run with its LoRA run on an average (every task, final models)."""
    if not isinstance(check.right, Side) or check.stat not in AVERAGES or check.tasks:
        return False
    sides = (check.left, check.right)
    if any(s.reduce != "only" or len(s.runs) != 1 or s.where() for s in sides):
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
    rows = verdict_rows(verdicts, matched)
    if matched is not None:
        header += ["along the fronts (matched acquisition)", "verdict (matched)"]
    caption = ("Each finding of the paper, the comparison that tests it, and the verdict on this study's numbers: "
               "each check gives the difference of its two sides with its paired 95% bootstrap interval, and holds "
               "(✓) where the interval supports the finding, does not hold (✗) where it supports the opposite, and "
               f"is inconclusive (?) otherwise; 'similar' (≈) is an equivalence test within ±{SIMILAR:.0%} of the larger "
               f"value, 'competitive' (≳) one that a run is at most {SIMILAR:.0%} below the other (or above it); a "
               "check of one task reads the paper's task by its name, TRACE's, or the built-in task that mirrors it. "
               "A check with a method or task missing is not measured; one whose runs are there but score 0 on both "
               "sides (or whose BWT or gain is undefined, a percent change from 0) has no signal (∅) "
               "and counts for neither side; 'most' claims need more than half of their measured checks with a "
               "signal to hold.")
    if matched is not None:
        caption += (" Along the fronts: each FFT-vs-LoRA check again, over all settings swept: AVE at the largest "
                    "new-knowledge gain both fronts reach, AVnew at the largest old-knowledge loss both reach, "
                    "AVall at each one's best setting.")
    return Table("claims", caption, header, rows)


def verdict_rows(verdicts: list[Verdict], matched: dict[str, Verdict] | None = None) -> list[TableRow]:
    """One row per claim or comparison: what it says, its checks, what this study measured and the verdict."""
    rows = []
    for v in verdicts:
        cells = [v.claim.statement, v.claim.source, _comparison_text(v.claim),
                 "; ".join(dict.fromkeys(o.evidence for o in v.outcomes)), measured_text(v), v.verdict]
        if matched is not None:
            along = matched.get(v.claim.id)
            cells += ["; ".join(o.evidence for o in along.outcomes), along.verdict] if along else ["—", "—"]
        rows.append(TableRow(v.claim.id, cells, unit="text", key=v.claim.id))
    return rows


def baselines_table(verdicts: list[Verdict]) -> Table:
    """The continual-learning baselines' comparisons (BASELINES), as the claims table shows claims."""
    header = ["#", "comparison", "methods", "checks", "this study", "measured", "verdict"]
    caption = ("EWC and LwF against plain sequential training and O-LoRA, on this study's numbers: each check is the "
               "difference of its two sides with its paired 95% bootstrap interval, and holds (✓) where the interval "
               "supports the statement, does not hold (✗) where it supports the opposite, and is inconclusive (?) "
               "otherwise; a method with several λ enters at its best by the stat compared. Not the paper's findings: "
               "it has no EWC or LwF runs.")
    return Table("baselines", caption, header, verdict_rows(verdicts))


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


# --- docs/claims.md: each claim, the paper's sentence, the comparison ----------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def claims_markdown(claims: tuple[Claim, ...] = CLAIMS) -> str:
    """docs/claims.md's table (scripts/docs_numbers.py --claims): one row per claim, in the report's order."""
    header = ["#", "setting", "the paper's finding", "the paper says", "comparison", "why so"]
    rows = [[c.id, c.setting, _cell(c.statement), _cell(f"{c.source}: “{c.quote}”"), _cell(_comparison_text(c)),
             _cell(c.note or "—")] for c in claims]
    margins = (f"{len(claims)} claims. Margins: similar (~) within ±{SIMILAR:.0%} of the larger value; competitive "
               f"(≳) at most {SIMILAR:.0%} below the right side; C30 within ±{SIZE_MARGIN:g} percentage points.")
    return f"{markdown_table(header, rows)}\n\n{margins}"
