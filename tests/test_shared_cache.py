"""The shared step cache (study/shared_cache.py): a second study links what a first one computed (hard links, the
same inodes), `--no-shared-cache` computes, a broken entry is recomputed, two processes that need one step at once
compute it once, and a process killed inside a step leaves no entry behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
from pathlib import Path

import pytest
import yaml
from test_study import tiny_study

from knowstack.atomic import atomic_dir
from knowstack.cli import main
from knowstack.config import load_config
from knowstack.results import COSTS_CSV, read_costs_csv
from knowstack.study.plan import Plan, Step, build_plan
from knowstack.study.shared_cache import (
    ENTRY_FILE,
    SharedCache,
    collect_garbage,
    computed_once,
    entries,
    reused_keys,
    shareable_keys,
)


def _config(tmp: Path, name: str = "tiny") -> Path:
    path = tiny_study(tmp, {"one-round": {"finetune": ["lora"]}})
    config = yaml.safe_load(path.read_text())
    config["name"], config["tasks"] = name, {"builtin": ["stance"]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def first_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A study computed into a cache of its own (the module's): (its dir, the cache)."""
    tmp = tmp_path_factory.mktemp("first")
    cache = tmp / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KNOWSTACK_CACHE", str(cache))
        assert main(["study", str(_config(tmp)), "--out", str(tmp / "run")]) == 0
    return tmp / "run", cache


def _inode(path: Path) -> int:
    return path.stat().st_ino


def test_a_second_study_links_the_world_and_every_step_of_the_first(first_study: tuple[Path, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    first, cache = first_study
    monkeypatch.setenv("KNOWSTACK_CACHE", str(cache))
    capsys.readouterr()
    second = tmp_path / "second"
    assert main(["study", str(_config(tmp_path, "other")), "--out", str(second)]) == 0
    err = capsys.readouterr().err
    keys = [s.key for s in build_plan(load_config(second / "config.yaml"), second).ordered()]
    assert {k.split("-")[0] for k in keys} == {"world", "train", "eval"} and len(keys) == 4
    assert f"0 steps run, 0 already done, 4 reused from the shared cache {cache}" in err
    assert "reused from the shared cache" in err and "world test" in err and "eval base" in err
    assert reused_keys(second / "artifacts") == set(keys)
    for key in keys:  # links, not copies: the first study's files, the cache's, the second's are one inode
        for path in (first / "artifacts" / key).rglob("*"):
            if path.is_file():
                other = second / "artifacts" / key / path.relative_to(first / "artifacts" / key)
                assert _inode(other) == _inode(path) == _inode(cache / key / path.relative_to(first / "artifacts" / key))
    assert (second / "results.csv").read_text() == (first / "results.csv").read_text()
    # the costs keep the first run's seconds and say the model was reused; the first computed its own
    costs = {c.model: c for c in read_costs_csv(second / COSTS_CSV)}
    assert costs["one-round-lora-stance"].reused_steps == 2 and costs["base"].reused_steps == 1
    assert {c.reused_steps for c in read_costs_csv(first / COSTS_CSV)} == {0}
    assert costs["one-round-lora-stance"].seconds == {c.model: c for c in read_costs_csv(first / COSTS_CSV)}[
        "one-round-lora-stance"].seconds
    # the cache command sees every entry linked; gc removes none
    assert len(entries(cache)) == 4 and all(e.linked for e in entries(cache))
    assert collect_garbage(cache) == []



def test_the_dry_run_says_which_steps_the_shared_cache_will_supply(first_study: tuple[Path, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before a study dir has its world, the dry run plans with the cache's built world (the keys the run will have)
    and marks each step the run would link (it said 'to do' for all, with provisional keys); --no-shared-cache: none."""
    from knowstack import api

    first, cache = first_study
    monkeypatch.setenv("KNOWSTACK_CACHE", str(cache))
    config, out = _config(tmp_path, "planned"), tmp_path / "planned"
    planned = api.dry_run(config, out)
    assert [s.key for s in planned] == [s.key for s in build_plan(load_config(first / "config.yaml"), first).ordered()]
    assert all(s.in_shared_cache and not s.done for s in planned)
    capsys.readouterr()
    assert main(["study", str(config), "--out", str(out), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"4 steps, 0 done, 4 in the shared cache {cache} (linked, not run)" in err and "provisional" not in err
    assert main(["study", str(config), "--out", str(out), "--dry-run", "--no-shared-cache"]) == 0
    err = capsys.readouterr().err
    assert "in the shared cache" not in err and "provisional" in err
    assert not any(s.in_shared_cache for s in api.dry_run(config, out, shared_cache=False))

def test_no_shared_cache_computes_every_step(first_study: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, cache = first_study
    monkeypatch.setenv("KNOWSTACK_CACHE", str(cache))
    before = {e.key for e in entries(cache)}
    out = tmp_path / "own"
    assert main(["study", str(_config(tmp_path, "own")), "--out", str(out), "--no-shared-cache"]) == 0
    err = capsys.readouterr().err
    assert "4 steps run, 0 already done" in err and "reused" not in err
    assert reused_keys(out / "artifacts") == set()
    world = next((out / "artifacts").glob("world-*"))
    assert _inode(world / "world.json") != _inode(cache / world.name / "world.json")
    assert {e.key for e in entries(cache)} == before


def test_a_broken_entry_is_ignored_and_computed_again(tmp_path: Path) -> None:
    cache = SharedCache(tmp_path / "cache", frozenset({"step-a"}))
    (cache.root / ".locks").mkdir(parents=True)
    runs = []

    def step(study: Path) -> Path:
        final = study / "artifacts" / "step-a"
        with computed_once(cache, "step-a", final, study / "artifacts") as reused:
            if not reused:
                runs.append(study.name)
                with atomic_dir(final) as tmp:
                    (tmp / "weights.bin").write_bytes(b"0123456789")
                    (tmp / "step.json").write_text("{}")
        return final

    step(tmp_path / "one")
    assert runs == ["one"] and (cache.entry("step-a") / ENTRY_FILE).is_file()
    (cache.entry("step-a") / "weights.bin").unlink()  # partly removed
    (cache.entry("step-a") / "weights.bin").write_bytes(b"01234")  # and cut short
    step(tmp_path / "two")
    assert runs == ["one", "two"] and (tmp_path / "two" / "artifacts" / "step-a" / "weights.bin").read_bytes() == \
        b"0123456789"
    (cache.entry("step-a") / ENTRY_FILE).write_text("{not json")  # an unreadable list
    step(tmp_path / "three")
    assert runs == ["one", "two", "three"]
    step(tmp_path / "four")  # the entry the third published is whole
    assert runs == ["one", "two", "three"] and reused_keys(tmp_path / "four" / "artifacts") == {"step-a"}


def _race(root: str, study: str, ready: multiprocessing.synchronize.Barrier, kill: bool = False) -> None:
    """A process that needs step-a: computes it (slowly, so that the other waits) or links it."""
    cache = SharedCache(Path(root), frozenset({"step-a"}))
    artifacts = Path(study) / "artifacts"
    ready.wait()
    with computed_once(cache, "step-a", artifacts / "step-a", artifacts) as reused:
        if reused:
            return
        with atomic_dir(artifacts / "step-a") as tmp:
            (tmp / "weights.bin").write_bytes(os.urandom(1 << 16))
            with (Path(root) / "computed.txt").open("a") as log:
                log.write(f"{study}\n")
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)


def test_two_processes_that_need_one_step_compute_it_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / ".locks").mkdir(parents=True)
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Barrier(2)
    studies = [tmp_path / "a", tmp_path / "b"]
    procs = [spawn.Process(target=_race, args=(str(root), str(study), ready)) for study in studies]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert len((root / "computed.txt").read_text().splitlines()) == 1
    inodes = {_inode(study / "artifacts" / "step-a" / "weights.bin") for study in studies}
    assert inodes == {_inode(root / "step-a" / "weights.bin")}
    assert len([s for s in studies if reused_keys(s / "artifacts")]) == 1


def test_a_process_killed_in_a_step_leaves_no_entry_and_the_step_resumes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / ".locks").mkdir(parents=True)
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Barrier(1)
    killed = spawn.Process(target=_race, args=(str(root), str(tmp_path / "a"), ready, True))
    killed.start()
    killed.join(60)
    assert killed.exitcode == -signal.SIGKILL
    assert not (root / "step-a").exists() and not (tmp_path / "a" / "artifacts" / "step-a").exists()
    # the lock died with it: the step runs again, here, and is published
    _race(str(root), str(tmp_path / "a"), spawn.Barrier(1))
    assert (root / "step-a" / ENTRY_FILE).is_file()
    assert len((root / "computed.txt").read_text().splitlines()) == 2


def test_cache_files_honour_the_umask(tmp_path: Path) -> None:
    cache = SharedCache(tmp_path / "cache", frozenset({"step-a"}))
    (cache.root / ".locks").mkdir(parents=True)
    old = os.umask(0o077)
    try:
        final = tmp_path / "study" / "artifacts" / "step-a"
        with computed_once(cache, "step-a", final, final.parent) as reused:
            assert not reused
            with atomic_dir(final) as tmp:
                (tmp / "sub").mkdir()
                (tmp / "sub" / "x.json").write_text("{}")
    finally:
        os.umask(old)
    entry = cache.entry("step-a")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700 and stat.S_IMODE((entry / "sub").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in entry.rglob("*") if p.is_file()} == {0o600}


def test_only_steps_made_from_their_key_alone_are_shared(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path))
    plan = build_plan(config, tmp_path / "run")
    # before the world is built, the keys after it are provisional: only the world may be shared
    assert plan.world_pending and shareable_keys(plan) == {s.key for s in plan.ordered() if s.kind == "world"}
    world = Step("world", "test", {"preset": "test", "seed": 0, "version": 1})
    builtin_old = {"tasks": "builtin", "limit": 8}
    made = Step("train", "lora-t", {"init": {"model": f"@{world.key}/model", "adapter": None}}, (world.key,))
    by_path = Step("train", "lora-p", {"init": {"model": "/models/base", "adapter": None}})
    steps = {
        "from the world": Step("eval", "a", {"model": {"model": f"@{world.key}/model", "adapter": f"@{made.key}"},
                                             "old": builtin_old}, (world.key, made.key)),
        # a base by path or hub id: its name is in the key, its weights are not
        "by path": Step("eval", "b", {"model": {"model": "/models/base", "adapter": None}, "old": builtin_old}),
        "made from one by path": Step("eval", "c", {"model": {"model": f"@{by_path.key}", "adapter": None},
                                                    "old": builtin_old}, (by_path.key,)),
        "lm-eval's tasks": Step("eval", "d", {"model": {"model": f"@{world.key}/model", "adapter": None},
                                              "old": {"tasks": ["arc_easy"]}}, (world.key,)),
        "a tokenizer by path": Step("train", "e", {"init": {"model": f"@{world.key}/model", "adapter": None},
                                                   "tokenizer": "/tok"}, (world.key,)),
        "a merge of steps": Step("merge", "f", {"models": [f"@{made.key}"], "base": {"model": f"@{world.key}/model"}},
                                 (world.key, made.key)),
    }
    whole = Plan(config)
    for step in (world, made, by_path, *steps.values()):
        whole.add(step)
    shared = shareable_keys(whole)
    assert {name for name, step in steps.items() if step.key in shared} == {"from the world", "a merge of steps"}
    assert {world.key, made.key} <= shared and by_path.key not in shared


def test_cache_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    monkeypatch.setenv("KNOWSTACK_CACHE", str(root))
    cache = SharedCache(root, frozenset({"step-a"}))
    (root / ".locks").mkdir(parents=True)
    final = tmp_path / "study" / "artifacts" / "step-a"
    with computed_once(cache, "step-a", final, final.parent), atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"x" * 2048)
    (root / ".step-b.tmp-dead").mkdir()  # what a killed publisher left
    assert main(["cache", "where"]) == 0 and capsys.readouterr().out.strip() == str(root)
    assert main(["cache", "size"]) == 0 and "1 steps" in capsys.readouterr().out
    assert main(["cache", "gc"]) == 0 and "removed 0 steps" in capsys.readouterr().out
    assert cache.entry("step-a").is_dir() and not (root / ".step-b.tmp-dead").exists()
    (final / "w.bin").unlink()  # the study dir is gone: the entry is linked by none
    assert main(["cache", "gc"]) == 0 and "removed 1 steps" in capsys.readouterr().out
    assert not cache.entry("step-a").exists()



def test_cache_gc_leaves_the_registries_cache_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """With KNOWSTACK_CACHE set, a URL registry's cache (objects, a compose's resumable work dir) is
    $KNOWSTACK_CACHE/registries/<hash>: not a step's entry, so `cache size` does not count it nor `cache gc` remove
    it (gc removed it, every file of it having one link)."""
    from knowstack.registry.core import cache_dir

    root = tmp_path / "cache"
    monkeypatch.setenv("KNOWSTACK_CACHE", str(root))
    kept = cache_dir("file:///shared/registry") / "objects" / "ab12"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"an object")
    assert kept.is_relative_to(root)
    assert main(["cache", "size"]) == 0 and "0 steps" in capsys.readouterr().out
    assert main(["cache", "gc"]) == 0 and "removed 0 steps" in capsys.readouterr().out
    assert kept.read_bytes() == b"an object"

def test_the_default_cache_is_under_the_users_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from knowstack.study.shared_cache import default_root

    monkeypatch.delenv("KNOWSTACK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_root() == tmp_path / "knowstack" / "steps"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "knowstack" / "steps"
