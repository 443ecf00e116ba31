"""Synthetic results rows for a whole study (every method of the paper), for the report's tests.

Each method is a small simulation: a round raises its task toward 1 by `learn`, and every round takes
`forget_old` of the old knowledge and `forget_new` of earlier tasks' gains; rows are all the report reads.
"""

from __future__ import annotations

from knowstack.results import Row

TASKS = ["stance", "notes", "summary", "code", "quiz", "simplify", "math"]
METRICS = {"stance": ["accuracy"], "notes": ["accuracy"], "summary": ["rouge_l"], "code": ["edit_similarity"],
           "quiz": ["accuracy"], "simplify": ["sari"], "math": ["em_direct", "em_cot"]}
OLD = {"ks_country": 0.82, "ks_capital": 0.74, "ks_python": 0.66}
BASE_NEW = {"stance": 0.2, "notes": 0.25, "summary": 0.15, "code": 0.05, "quiz": 0.6, "simplify": 0.35, "math": 0.1}
# learn, forget_old (per round), forget_new (per later round)
SKILL = {"fft": (0.8, 0.04, 0.12), "lora": (0.7, 0.01, 0.08)}
METHODS = ("base", "one-round", "sequential", "olora", "merge", "moe", "replay", "joint")

State = tuple[dict[str, float], dict[str, float]]  # new task -> score, old task -> score


def base_state() -> State:
    return dict(BASE_NEW), dict(OLD)


def train_round(state: State, task: str, learn: float, forget_old: float, forget_new: float) -> State:
    new, old = dict(state[0]), dict(state[1])
    for name, value in new.items():
        new[name] = value + learn * (1 - value) if name == task else BASE_NEW[name] + (value - BASE_NEW[name]) * (
            1 - forget_new)
    return new, {name: value * (1 - forget_old) for name, value in old.items()}


def rows_of(model: str, method: str, finetune: str, stage: int | None, trained_on: str, state: State) -> list[Row]:
    common = {"model": model, "method": method, "finetune": finetune, "stage": stage, "trained_on": trained_on}
    rows = [Row(task=t, kind="new", metric=m, value=round(state[0][t] * (0.9 if m == "em_direct" else 1), 4), n=50,
                **common) for t in TASKS for m in METRICS[t]]
    rows += [Row(task=t, kind="old", metric="acc", value=round(v, 4), n=None, **common) for t, v in state[1].items()]
    rows += [Row(task=t, kind="old", metric="acc_norm", value=round(v / 2, 4), n=None, **common)
             for t, v in state[1].items()]
    return rows


def staged(method: str, finetune: str, name: str, learn: float, forget_old: float, forget_new: float,
           rounds: int = len(TASKS)) -> list[Row]:
    state, rows = base_state(), []
    for stage, task in enumerate(TASKS[:rounds], start=1):
        state = train_round(state, task, learn, forget_old, forget_new)
        rows += rows_of(f"{name}-{stage}", method, finetune, stage, task, state)
    return rows


def combined(fraction: float, old_loss: float) -> State:
    """A model combining the one-round models without data: keeps `fraction` of each task's one-round gain."""
    new = {t: BASE_NEW[t] + fraction * SKILL["lora"][0] * (1 - BASE_NEW[t]) for t in TASKS}
    return new, {t: v * (1 - old_loss) for t, v in OLD.items()}


def synthetic_study(methods: tuple[str, ...] = METHODS) -> list[Row]:
    rows: list[Row] = []
    everything = "+".join(TASKS)
    if "base" in methods:
        rows += rows_of("base", "base", "", None, "", base_state())
    for ft, (learn, forget_old, forget_new) in SKILL.items():
        if "one-round" in methods:
            for task in TASKS:
                rows += rows_of(f"one-round-{ft}-{task}", "one-round", ft, None, task,
                                train_round(base_state(), task, learn, forget_old * 2, 0))
        if "sequential" in methods:
            rows += staged("sequential", ft, f"sequential-{ft}", learn, forget_old, forget_new)
        if "replay" in methods:
            rows += staged("replay", ft, f"replay-{ft}", learn, forget_old / 2, forget_new / 4)
        if "joint" in methods:
            rows += rows_of(f"joint-{ft}", "joint", ft, None, everything, combined(0.85, forget_old * 2))
        if "merge" in methods:
            for merge, fraction in (("average", 0.5), ("ties", 0.35), ("ties-dare", 0.3)):
                rows += rows_of(f"merge-{merge}-{ft}", "merge", ft, None, everything,
                                combined(fraction, forget_old * (3 if ft == "fft" else 1)))
        if "moe" in methods:
            rows += rows_of(f"moe-{ft}", "moe", ft, None, everything, combined(0.9, forget_old))
    if "olora" in methods:
        for tag, learn in (("0.5", 0.65), ("5", 0.5)):
            rows += staged("olora", "lora", f"olora-lora-{tag}", learn, 0.01, 0.03 if tag == "0.5" else 0.02)
    return rows
