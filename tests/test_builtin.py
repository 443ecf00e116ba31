"""The built-in world: deterministic, in the real formats, and its new tasks held out of pretraining."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from knowstack.builtin import sources
from knowstack.builtin.corpus import build_corpus, doc_use, source_use
from knowstack.builtin.world import BUILTIN_TASKS, PRESETS, build_world
from knowstack.config import parse_config
from knowstack.data.formats import load_gsm8k, load_metamath, load_trace_split
from knowstack.errors import KnowstackError
from knowstack.kernels import kernel_path, sums_independent_of_threads


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


@pytest.fixture(scope="session")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("worlds")
    return build_world(root / "a", "test", seed=0), build_world(root / "b", "test", seed=0)


def test_world_is_deterministic(worlds: tuple[Path, Path]) -> None:
    a, b = worlds
    digest = tree_digest(a)
    assert "model/model.safetensors" in digest
    assert digest == tree_digest(b)  # model weights, tokenizer, tasks and tests, byte for byte
    manifest_a, manifest_b = (json.loads((w / "world.json").read_text()) for w in worlds)
    manifest_a.pop("build_seconds"), manifest_b.pop("build_seconds")
    assert manifest_a == manifest_b


def test_world_layout_and_formats(worlds: tuple[Path, Path]) -> None:
    world = worlds[0]
    manifest = json.loads((world / "world.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["stance", "notes", "summary", "code", "quiz", "simplify", "math"]
    assert [t["dir"] for t in manifest["tasks"]] == [t.dir for t in BUILTIN_TASKS]
    assert {"steps", "peak_lr", "tokens", "params"} <= set(manifest["pretrain"])
    assert manifest["pretrain"]["peak_lr"] > 0 and len(manifest["old_tasks"]) >= 4
    for task in BUILTIN_TASKS:
        task_dir = world / "tasks" / task.dir
        if task.format == "math":
            train, test = load_metamath(task_dir / "train.json"), load_gsm8k(task_dir / "test.json")
            assert train and test and all(e.answer.isdigit() for e in test)
            assert all(e.answer.rstrip().split("The answer is: ")[-1].isdigit() for e in train)
        else:
            splits = {s: load_trace_split(task_dir / f"{s}.json") for s in ("train", "eval", "test")}
            assert all(splits.values())
            assert not {e.prompt for e in splits["test"]} & {e.prompt for e in splits["train"]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(world / "model", use_safetensors=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(world / "model")
    assert tokenizer.pad_token != tokenizer.eos_token and tokenizer.bos_token


def test_old_tasks_are_lm_eval_tasks(worlds: tuple[Path, Path]) -> None:
    from lm_eval.tasks import TaskManager

    world = worlds[0]
    manifest = json.loads((world / "world.json").read_text())
    include = world / manifest["old_include_path"]
    manager = TaskManager(include_path=str(include))
    assert set(manifest["old_tasks"]) <= set(manager.all_tasks)
    for name in manifest["old_tasks"]:
        items = [json.loads(line) for line in (include / f"{name}.jsonl").read_text().splitlines()]
        assert items and all(len(i["choices"]) == 4 and 0 <= i["label"] < 4 for i in items)


def test_new_task_answers_are_not_in_the_corpus(worlds: tuple[Path, Path]) -> None:
    world = worlds[0]
    preset = PRESETS["test"]
    corpus = "\n".join(build_corpus(preset.facts_per_family, preset.fact_repeats, preset.arithmetic_repeats,
                                    preset.text_chars, seed=0).documents)
    corpus_lines = {line.strip() for line in corpus.splitlines()}
    for split in ("train", "test"):
        code = load_trace_split(world / "tasks" / "Code" / f"{split}.json")
        assert not [e.answer for e in code if e.answer.strip() in corpus_lines]
        summary = load_trace_split(world / "tasks" / "Summary" / f"{split}.json")
        assert not [e.answer for e in summary if e.answer.strip() in corpus]


def test_held_out_texts_are_never_in_any_corpus() -> None:
    # The largest corpus any preset builds: every text the pool may contribute.
    corpus = "\n".join(build_corpus(24, 1, 1, 10**9, seed=0).documents)
    held_out_docs = [d for d in sources.stdlib_docs() if doc_use(d) != "corpus" and len(d.text) >= 120]
    assert held_out_docs and not any(d.text in corpus for d in held_out_docs[:200])
    code_files = [p for p in sources.stdlib_source_files() if source_use(p) == "code"]
    assert code_files
    for path in code_files[:10]:
        chunk = "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[:30])
        assert chunk not in corpus


def test_unknown_preset() -> None:
    with pytest.raises(KnowstackError, match="unknown preset"):
        build_world(Path("/nonexistent/never"), "huge")


def test_fresh_processes_build_the_same_world(tmp_path: Path, worlds: tuple[Path, Path]) -> None:
    """Two `build-world` processes started from nothing, on 1 and 2 threads, and this process (transformers, torch
    and pytest imported), give one world: the same corpus, tokenizer, weights and tasks, where MKL's strict mode
    makes sums independent of the thread count (knowstack's default; docs/builtin-world.md)."""
    command = [sys.executable, "-m", "knowstack.cli", "build-world", "--preset", "test", "--out"]
    runs = [subprocess.Popen([*command, str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
            for name, threads in (("a", "1"), ("b", "2"))]
    for run in runs:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err
    manifests = [json.loads((tmp_path / name / "world.json").read_text()) for name in ("a", "b")]
    assert [m["environment"]["torch_threads"] for m in manifests] == [1, 2]
    manifests.append(json.loads((worlds[0] / "world.json").read_text()))
    assert set(manifests[0]["hashes"]) == {"corpus", "tokenizer", "weights", "tasks"}
    environment = manifests[0]["environment"]
    assert environment["python"] and environment["torch_cpu_capability"] and environment["onednn_max_cpu_isa"]
    assert environment["mkl_cbwr"] == kernel_path()["mkl_cbwr"]
    if not sums_independent_of_threads():  # another MKL mode: only the same process on the same threads is promised
        return
    for manifest in manifests[1:]:
        assert manifest["hashes"] == manifests[0]["hashes"]
        assert manifest["fingerprint"] == manifests[0]["fingerprint"]
    assert tree_digest(tmp_path / "a") == tree_digest(worlds[0])


def test_sources_are_the_recorded_ones() -> None:
    check = sources.source_check()
    assert check["sources"] == len(sources.recorded()["sources"]) > 250
    if check["here"]["python"] != check["recorded_on"]["python"]:
        pytest.skip(f"the sources were recorded on Python {check['recorded_on']['python']}; on "
                    f"{check['here']['python']} some may differ (then named in world.json)")
    assert check["differ"] == []


def test_a_missing_source_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "DOC_MODULES", [*sources.DOC_MODULES, "no_such_module_anywhere"])
    with pytest.raises(KnowstackError, match="'no_such_module_anywhere', which does not import"):
        sources._docs_by_module.__wrapped__()
    lock = sources.recorded()
    monkeypatch.setattr(sources, "recorded", lambda: lock | {"sources": {**lock["sources"], "file:gone.py": "0"}})
    with pytest.raises(KnowstackError, match="source file 'gone.py', absent from"):
        sources.stdlib_source_files.__wrapped__()


def test_a_source_file_that_became_a_package_is_read_from_the_package(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Python 3.12 made zipfile a package, 3.13 pathlib and sysconfig: the recorded file is then the package's
    # __init__.py (its text differs, so the world's manifest names it), not a missing source.
    (tmp_path / "plain.py").write_text("x = 1\n")
    (tmp_path / "grown").mkdir()
    (tmp_path / "grown" / "__init__.py").write_text("y = 2\n")
    monkeypatch.setattr(sources, "stdlib_root", lambda: tmp_path)
    monkeypatch.setattr(sources, "recorded", lambda: {"recorded_on": {"python": "3.11.7"},
                                                     "sources": {"file:plain.py": "0", "file:grown.py": "0"}})
    files = sources.stdlib_source_files.__wrapped__()
    assert [(f.name, f.stem, f.path) for f in files] == [("grown.py", "grown", tmp_path / "grown" / "__init__.py"),
                                                         ("plain.py", "plain", tmp_path / "plain.py")]
    assert files[0].read_text() == "y = 2\n"
    with pytest.raises(KnowstackError, match=r"source file 'gone.py', absent from .* \(as a module and as a package\)"):
        sources.stdlib_file("gone.py")


def test_the_world_fingerprint_is_in_every_later_key(tmp_path: Path) -> None:
    from knowstack.study.plan import build_plan

    config = parse_config({"name": "w", "base": {"builtin": "test"}, "tasks": "builtin",
                           "old_knowledge": {"tasks": "builtin"}, "training": {"lr": 1e-3},
                           "methods": {"one-round": {"finetune": ["fft", "lora"]}, "sequential": {"finetune": ["lora"]}}})
    pending = build_plan(config, tmp_path)
    assert pending.world_pending and pending.world_fingerprint is None
    world = next(step for step in pending.ordered() if step.kind == "world")
    keys = {}
    for fingerprint in ("aaaa", "bbbb"):
        (tmp_path / "artifacts" / world.key).mkdir(parents=True, exist_ok=True)
        (tmp_path / "artifacts" / world.key / "world.json").write_text(json.dumps({"fingerprint": fingerprint}))
        plan = build_plan(config, tmp_path)
        assert not plan.world_pending and plan.world_fingerprint == fingerprint
        keys[fingerprint] = [step.key for step in plan.ordered()]
    assert keys["aaaa"][0] == keys["bbbb"][0] == world.key  # the world itself: same preset, seed, version
    assert len(keys["aaaa"]) > 10 and not set(keys["aaaa"][1:]) & set(keys["bbbb"][1:])
