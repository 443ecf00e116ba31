"""The search of a composition within a forgetting budget (study/search.py, methods.search): the space's encoding,
the budget as a constraint, the replay of cached trials, an objective that never reads test data, and a tiny study
on the test preset."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from knowstack.cli import main
from knowstack.study.search import SearchSpace, Trial, chosen_trial, point_key, search

SPACE = SearchSpace(("task-arithmetic", "ties", "dare", "average"), 3)


def fake_scores(point: dict) -> dict:
    """A made-up landscape: more lambda learns more and forgets more."""
    lam = point.get("lambda", 0.5)
    return {"new": lam * (1 + 0.1 * len(point["method"])), "old": 1.0 - 0.02 * lam}


def test_the_space_draws_only_what_each_method_reads_and_decodes_it_as_merge_settings() -> None:
    dare = SPACE.suggest(optuna.trial.FixedTrial({"method": "dare", "lambda": 0.7, "density": 0.3,
                                                  "weight_0": 0.2, "weight_1": 0.5, "weight_2": 1.0}))
    assert dare == {"method": "dare", "lambda": 0.7, "density": 0.3, "weights": [0.2, 0.5, 1.0]}
    method, options, weights = SPACE.decode(dare)
    assert (method, options, weights) == ("dare", {"lambda": 0.7, "drop_rate": 0.7}, [0.2, 0.5, 1.0])
    ties = SPACE.decode(SPACE.suggest(optuna.trial.FixedTrial({"method": "ties", "lambda": 1.0, "density": 0.4,
                                                               "weight_0": 1, "weight_1": 1, "weight_2": 1})))
    assert ties[1] == {"lambda": 1.0, "density": 0.4}
    average = SPACE.suggest(optuna.trial.FixedTrial({"method": "average", "weight_0": 0.1, "weight_1": 0.2,
                                                     "weight_2": 0.3}))
    assert average == {"method": "average", "weights": [0.1, 0.2, 0.3]}  # no lambda, no density: average reads neither
    assert point_key(dare) == point_key(dict(reversed(list(dare.items())))) != point_key(average)


def test_the_space_refuses_methods_it_cannot_search() -> None:
    from knowstack.errors import KnowstackError

    with pytest.raises(KnowstackError, match="statistics"):
        SearchSpace(("regmean",), 3)
    with pytest.raises(KnowstackError, match="slerp"):
        SearchSpace(("slerp",), 3)


def test_a_trial_over_budget_is_never_chosen() -> None:
    trials = [Trial(0, {"method": "ties"}, new=0.9, old=0.5, old_loss=10.0, within=False),
              Trial(1, {"method": "dare"}, new=0.4, old=0.98, old_loss=1.5, within=True),
              Trial(2, {"method": "dare"}, new=0.4, old=0.99, old_loss=0.5, within=True)]
    assert chosen_trial(trials).number == 2  # of equal eval scores, the one that keeps more
    assert chosen_trial(trials[:1]) is None
    done = search(SPACE, 12, 0, 2.0, 1.0, fake_scores, {})
    assert any(not t.within for t in done) and any(t.within for t in done)
    best = chosen_trial(done)
    assert best.within and best.new == max(t.new for t in done if t.within)
    assert best.new < max(t.new for t in done)  # the highest eval score was over budget here


def test_the_first_trials_try_every_method_once() -> None:
    space = SearchSpace(("task-arithmetic", "ties", "dare"), 7)
    trials = search(space, 12, 0, 2.0, 1.0, fake_scores, {})
    assert [t.point["method"] for t in trials[:3]] == ["task-arithmetic", "ties", "dare"]
    assert all("lambda" in t.point for t in trials[:3]) and "density" in trials[1].point
    assert [t.point["method"] for t in search(space, 2, 0, 2.0, 1.0, fake_scores, {})] == ["task-arithmetic", "ties"]


def test_a_killed_search_reruns_only_missing_trials_and_replays_the_same_points() -> None:
    whole = search(SPACE, 8, 3, 2.0, 1.0, fake_scores, {})
    cache: dict = {}
    calls: list[dict] = []

    def dies_after_five(point: dict) -> dict:
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(point)
        return fake_scores(point)

    with pytest.raises(KeyboardInterrupt):
        search(SPACE, 8, 3, 2.0, 1.0, dies_after_five, cache)
    assert len(cache) == 5
    calls.clear()
    resumed = search(SPACE, 8, 3, 2.0, 1.0, lambda p: calls.append(p) or fake_scores(p), cache)
    assert len(calls) == 3  # only the trials the killed search lacked
    assert [t.point for t in resumed] == [t.point for t in whole]  # the sampler's state rebuilt by replaying
    assert [t.cached for t in resumed] == [True] * 5 + [False] * 3


def test_trials_of_a_math_task_are_scored_on_its_eval_split(tmp_path: Path) -> None:
    from knowstack.config import EvaluationConfig
    from knowstack.data.tasks import TaskSpec
    from knowstack.study.steps import _scoring_settings

    task = TaskSpec(name="math", format="math", metric="math", train_path=tmp_path / "train.json",
                    test_path=tmp_path / "test.json", eval_path=tmp_path / "eval.json")
    harness = _scoring_settings(EvaluationConfig(), task, "eval")["harness"]
    assert harness.test == tmp_path / "eval.json" and harness.fewshot is None


TASKS = ["stance", "quiz", "code"]


def search_study(tmp_path: Path) -> Path:
    config = {
        "name": "tiny-search", "seed": 0, "base": {"builtin": "test"}, "tasks": {"builtin": TASKS},
        "old_knowledge": {"tasks": "builtin", "limit": 8},
        "training": {"lr_of_pretrain_peak": 0.1, "epochs": 1, "batch_size": 8, "micro_batch_size": 4,
                     "max_length": 128},
        "evaluation": {"batch_size": 16, "max_test": 6},
        "methods": {"merge": {"finetune": ["fft"], "methods": ["ties"]},
                    "search": {"finetune": ["fft"], "trials": 3, "old_items": 8,
                               "methods": ["task-arithmetic", "ties", "dare"]}},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """The tiny study, run with every old-knowledge scoring's documents and every split read recorded."""
    from knowstack.data.tasks import TaskSpec
    from knowstack.evaluate import old_knowledge

    tmp = tmp_path_factory.mktemp("search")
    reads: list[dict] = []
    load, score_old = TaskSpec.load, old_knowledge.evaluate_old_knowledge_items

    def recorded_load(self, split):
        reads.append({"split": split, "task": self.name})
        return load(self, split)

    def recorded_old(*args, **kwargs):
        reads.append({"old": kwargs.get("samples"), "limit": kwargs.get("limit")})
        return score_old(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskSpec, "load", recorded_load)
        patch.setattr(old_knowledge, "evaluate_old_knowledge_items", recorded_old)
        config = search_study(tmp)
        assert main(["study", str(config), "--out", str(tmp / "run")]) == 0
    return tmp / "run", config, reads


def test_the_search_runs_in_a_study_and_its_trials_are_rows(searched: tuple[Path, Path, list[dict]]) -> None:
    out, _, _ = searched
    with (out / "search.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    assert [t["trial"] for t in trials] == ["0", "1", "2"] and {t["model"] for t in trials} == {"search-fft"}
    assert all(t["method"] in ("task-arithmetic", "ties", "dare") and t["weights"] for t in trials)
    assert sum(t["chosen"] == "True" for t in trials) <= 1
    assert all(t["within_budget"] == "True" for t in trials if t["chosen"] == "True")
    with (out / "results.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["model"] == "search-fft"]
    assert {r["task"] for r in rows if r["kind"] == "new"} == set(TASKS)
    record = json.loads((out / "study.json").read_text())["searches"]["search-fft"]
    assert len(record["trials"]) == 3 and record["max_old_loss"] == 2.0
    report = (out / "report.md").read_text()
    section = report.split("## Search")[1].split("\n## ")[0]
    assert "trial" in section and "search-search-fft.png" in section
    assert any(f"**{word}**" in section for word in ("holds", "does not hold", "inconclusive"))


def test_the_search_never_reads_test_data(searched: tuple[Path, Path, list[dict]]) -> None:
    """The study's test reads are its evaluations' (one per model: base, ties, search, each task once); the search
    itself reads eval splits, and old knowledge only after the first `limit` documents."""
    _, _, reads = searched
    test_reads = [r for r in reads if r.get("split") == "test"]
    assert len(test_reads) == 3 * len(TASKS)  # base, merge-ties-fft and search-fft on test, nothing more
    assert {r["task"] for r in reads if r.get("split") == "eval"} == set(TASKS)
    held_out = [r["old"] for r in reads if "old" in r and r["old"] is not None]
    assert held_out and all(min(docs) >= 8 for slices in held_out for docs in slices.values())
    assert all(r["limit"] == 8 for r in reads if "old" in r and r["old"] is None)


@pytest.mark.slow  # a second study run (~1 min); the replay itself is tested fast above
def test_a_killed_search_step_resumes_from_its_cached_trials(searched: tuple[Path, Path, list[dict]],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from knowstack.study import steps

    out, config, _ = searched
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    search_dir = next(p for p in (copy / "artifacts").iterdir() if p.name.startswith("search-search-fft"))
    record = json.loads((search_dir / "search.json").read_text())
    eval_of_search = [p for p in (copy / "artifacts").iterdir()
                      if (p / "step.json").is_file() and search_dir.name in (p / "step.json").read_text()
                      and p != search_dir]
    # as a kill in the third trial leaves it: two trials and the base scored, the step unfinished
    partial = copy / "artifacts" / ".partial" / search_dir.name
    partial.mkdir(parents=True)
    cache = {point_key(t["point"]): {"new": t["new"], "old": t["old"], "scores": t["scores"]}
             for t in record["trials"][:2]}
    (partial / "trials.json").write_text(json.dumps(cache))
    (partial / "base.json").write_text(json.dumps(record["base_scores"]))
    for path in [search_dir, *eval_of_search]:
        shutil.rmtree(path)
    scored: list[str] = []
    real = steps.held_out_scores
    monkeypatch.setattr(steps, "held_out_scores", lambda ctx, params, model: scored.append(model)
                        or real(ctx, params, model))
    # without the shared step cache, which holds the first run's finished search step and would link it whole
    assert main(["study", str(config), "--out", str(copy), "--no-shared-cache"]) == 0
    assert len(scored) == 1  # the third trial only
    again = json.loads((search_dir / "search.json").read_text())
    assert [t["point"] for t in again["trials"]] == [t["point"] for t in record["trials"]]
    assert again["chosen"] == record["chosen"]


@pytest.mark.slow  # three trials' merges and scorings on a registry (~1-3 min on 2 loaded cores)
def test_compose_search_records_the_search_in_the_version_lineage(tmp_path: Path, tiny_model_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from test_registry import make_adapter, make_task, write_mc_task

    from knowstack.registry import Registry, init_registry
    from knowstack.registry.contribute import contribute

    write_mc_task(tmp_path / "old")  # 4 items: the gate reads the first 2, the search the other 2
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir, old_tasks=["ks_toy"], include_path=tmp_path / "old", limit=2)
    for seed, name in enumerate(["Stance", "Notes", "Quiz"], start=1):
        contribute(reg, name.lower(), adapter=make_adapter(tiny_model_dir, tmp_path / f"a{seed}", seed=seed),
                   task=make_task(tmp_path / "tasks", name))
    assert main(["compose", str(reg), "--search", "--trials", "3", "--max-old-loss", "5%", "--seed", "1"]) == 0
    with Registry.open(reg) as opened:
        version = opened.version("v1")
    record = version["settings"]["search"]
    assert version["method"] == "search" and version["parents"] == ["stance", "notes", "quiz"]
    assert len(record["trials"]) == 3 and record["max_old_loss"] == 5.0 and record["models"] == 3
    assert all({"method", "weights"} <= set(t["point"]) for t in record["trials"])
    chosen = [t for t in record["trials"] if t["number"] == record["chosen"]]
    assert (chosen[0]["within"] if chosen else record["chosen"] is None)
    assert version["settings"]["options"] == {"trials": 3, "max_old_loss": 5.0, "seed": 1}
    assert "gate" in version["settings"]  # gated as any compose
    assert main(["show", str(reg), "v1"]) == 0
    from knowstack.registry.history import search_text

    assert f"  search:   {search_text(record)}" in capsys.readouterr().out


def test_show_says_what_a_search_chose() -> None:
    """`show` of a searched version: its chosen point and scores, or that no trial kept within the budget."""
    from knowstack.registry.history import search_text

    trial = {"number": 1, "new": 0.25, "old_loss": 1.5, "within": True,
             "point": {"method": "ties", "lambda": 0.8, "density": 0.5, "weights": [0.9, 0.4]}}
    record = {"trials": [{**trial, "number": 0, "within": False}, trial], "max_old_loss": 2.0, "chosen": 1}
    assert search_text(record) == ("trial 2 of 2 chosen: ties, lambda 0.8, density 0.5, weights 0.90/0.40; eval score "
                                   "0.250, held-out old loss 1.5% (budget 2%)")
    assert search_text({**record, "chosen": None}) == "none of 2 trials within the 2% budget: the base kept"
    from knowstack.report.search import trace_table

    table = trace_table("search-fft", {**record, "base_old": 0.7}).to_markdown()
    assert "| 2 (chosen) | 0.2500 |" in table and "| 1 | 0.2500 |" in table  # the number: not 2.0000


def test_the_trace_shows_each_trial_number_once_and_the_figure_plots_against_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace table's trial column is the only one with the trial's number (a second, the figure's x, printed it
    again); the figure's x is still each trial's number."""
    from knowstack.report import figures
    from knowstack.report.figures import FigureSpec, draw
    from knowstack.report.search import search_sections
    from knowstack.report.tables import Scores

    trials = [{"number": n, "new": 0.1 * n, "old_loss": 3.0 - n, "within": n >= 1, "point": {"method": "ties"}}
              for n in range(3)]
    record = {"trials": trials, "chosen": 2, "max_old_loss": 2.0, "base_old": 0.7, "optimiser": "optuna TPE",
              "seed": 0, "methods": ["ties"]}
    blocks = search_sections(Scores.from_rows([], []), [], {"search-fft": record})
    [figure] = [block for block in blocks if isinstance(block, FigureSpec)]
    table = figure.table.to_markdown()
    assert table.splitlines()[0] == "| trial | eval score | old held-out loss (%) | within budget | point |"
    assert "| 3 (chosen) | 0.2000 | +1% | yes | ties |" in table
    drawn = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.setdefault("axes", fig.axes) and path)
    assert draw(figure, tmp_path) is not None
    top, bottom = drawn["axes"]
    assert [list(line.get_xdata()) for line in top.get_lines() if line.get_linestyle() == "-"] == [[1.0, 2.0, 3.0]]
    assert bottom.collections[0].get_offsets().tolist() == [[1.0, 0.0], [2.0, 0.1], [3.0, 0.2]]
    assert bottom.get_xlabel() == "trial"



def test_compose_search_on_a_registry_it_cannot_search_is_refused_before_its_work_dir(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without old-knowledge tasks, with old knowledge but no --limit, or with a --limit that takes every item, a
    search has no held-out slice: exit 2 naming the option (the registry's, not a study's old_knowledge.limit),
    before the compose makes its work dir (it was made, then the error came from the search step)."""
    from test_registry import make_adapter, make_task, write_mc_task

    from knowstack.registry import init_registry
    from knowstack.registry.contribute import contribute

    write_mc_task(tmp_path / "old")  # 4 items
    old_tasks = {"old_tasks": ["ks_toy"], "include_path": tmp_path / "old"}
    cases = ((tmp_path / "none", {}, "registry init --old-tasks"),
             (tmp_path / "all", old_tasks, "registry init without --limit"),
             (tmp_path / "limit", {**old_tasks, "limit": 4},
              "old-knowledge task 'ks_toy' has 4 items, none after the first 4 (registry init --limit 4)"))
    for reg, old, said in cases:
        init_registry(reg, tiny_model_dir, **old)
        contribute(reg, "stance", adapter=make_adapter(tiny_model_dir, reg.parent / f"a-{reg.name}", seed=1),
                   task=make_task(reg.parent / f"tasks-{reg.name}", "Stance"))
        capsys.readouterr()
        assert main(["compose", str(reg), "--search", "--trials", "2"]) == 2
        err = capsys.readouterr().err
        assert said in err and "old_knowledge.limit" not in err
        assert "Traceback" not in err and not (reg / ".compose").exists()

def test_a_search_without_a_held_out_slice_or_with_a_method_it_cannot_search_is_refused_before_any_step(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.config import parse_config
    from knowstack.errors import KnowstackError
    from knowstack.study.plan import build_plan

    raw = {"name": "x", "base": {"builtin": "test"}, "training": {"lr": 1e-3},
           "methods": {"search": {"finetune": ["fft"]}}}
    with pytest.raises(KnowstackError, match="old_knowledge.limit") as error:
        build_plan(parse_config(raw, source="x.yaml"))
    assert error.value.field == "old_knowledge.limit"
    # the test world has 24 items per old-knowledge task: a limit of 24 leaves the search none (the search step
    # found that out after every training), 23 leaves it one
    raw["old_knowledge"] = {"tasks": "builtin", "limit": 24}
    with pytest.raises(KnowstackError, match="'test' has 24 items per old-knowledge task, none after the first 24"):
        build_plan(parse_config(raw, source="x.yaml"))
    raw["old_knowledge"]["limit"] = 23
    assert build_plan(parse_config(raw, source="x.yaml")).steps
    # the command names the config file with the setting
    from knowstack.cli import main

    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw | {"old_knowledge": {"tasks": "builtin", "limit": 24}}))
    assert main(["study", str(tmp_path / "x.yaml"), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    assert f"error: {tmp_path / 'x.yaml'}: field 'old_knowledge.limit': the built-in world" in capsys.readouterr().err
    raw["methods"]["search"]["methods"] = ["regmean"]
    with pytest.raises(KnowstackError, match="methods.search.methods"):
        parse_config(raw, source="x.yaml")


def test_the_verdict_is_read_from_the_intervals() -> None:
    import numpy as np

    from knowstack.report.search import verdict
    from knowstack.stats import Estimate

    def around(value: float, spread: float) -> Estimate:
        return Estimate(value, value + np.linspace(-spread, spread, 1000))

    assert verdict(around(0.05, 0.01), around(0.5, 0.5), 2.0) == "holds"
    assert verdict(around(0.05, 0.1), around(0.5, 0.5), 2.0) == "inconclusive"  # the gain's interval reaches 0
    assert verdict(around(0.05, 0.01), around(1.5, 1.0), 2.0) == "inconclusive"  # the loss's reaches the budget
    assert verdict(around(-0.05, 0.01), around(0.5, 0.5), 2.0) == "does not hold"
    assert verdict(around(0.05, 0.01), around(5.0, 1.0), 2.0) == "does not hold"  # beyond the budget throughout
    assert verdict(0.05, 0.5, 2.0) == "inconclusive"  # no intervals: the points alone cannot tell
