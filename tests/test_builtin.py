"""The built-in world: deterministic, in the real formats, and its new tasks held out of pretraining."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from knowstack.builtin import sources
from knowstack.builtin.corpus import build_corpus, doc_use, source_use
from knowstack.builtin.world import BUILTIN_TASKS, build_world
from knowstack.data.formats import load_gsm8k, load_metamath, load_trace_split
from knowstack.errors import KnowstackError


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("worlds")
    return build_world(root / "a", "test", seed=0), build_world(root / "b", "test", seed=0)


def test_world_is_deterministic(worlds: tuple[Path, Path]) -> None:
    a, b = worlds
    assert tree_digest(a) == tree_digest(b)  # model weights, tokenizer, tasks and tests, byte for byte
    manifest_a, manifest_b = (json.loads((w / "world.json").read_text()) for w in worlds)
    manifest_a.pop("build_seconds"), manifest_b.pop("build_seconds")
    assert manifest_a == manifest_b


def test_world_layout_and_formats(worlds: tuple[Path, Path]) -> None:
    world = worlds[0]
    manifest = json.loads((world / "world.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["stance", "notes", "summary", "code", "quiz", "simplify", "math"]
    assert manifest["pretrain"]["peak_lr"] > 0 and len(manifest["old_tasks"]) >= 4
    for task in BUILTIN_TASKS:
        task_dir = world / "tasks" / task.dir
        if task.format == "math":
            train, test = load_metamath(task_dir / "train.json"), load_gsm8k(task_dir / "test.json")
            assert train and test and all(e.answer.lstrip("-").isdigit() for e in test)
        else:
            splits = {s: load_trace_split(task_dir / f"{s}.json") for s in ("train", "eval", "test")}
            assert all(splits.values())
            assert not {e.prompt for e in splits["test"]} & {e.prompt for e in splits["train"]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(world / "model", use_safetensors=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(world / "model").pad_token != AutoTokenizer.from_pretrained(world / "model").eos_token


def test_old_tasks_are_lm_eval_tasks(worlds: tuple[Path, Path]) -> None:
    from lm_eval.tasks import TaskManager

    world = worlds[0]
    manifest = json.loads((world / "world.json").read_text())
    manager = TaskManager(include_path=str(world / manifest["old_include_path"]))
    assert set(manifest["old_tasks"]) <= set(manager.all_tasks)


def test_new_task_texts_are_not_in_the_corpus() -> None:
    corpus = "\n".join(build_corpus(24, 1, 200, seed=0).documents)
    # Short signature-like lines may recur elsewhere by chance; whole documentation texts must not.
    held_out_docs = [d for d in sources.stdlib_docs() if doc_use(d) != "corpus" and len(d.text) >= 120]
    assert held_out_docs and not any(d.text in corpus for d in held_out_docs[:200])
    code_files = [p for p in sources.stdlib_source_files() if source_use(p) == "code"]
    assert code_files
    for path in code_files[:10]:
        chunk = "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[:40])
        assert chunk not in corpus


def test_unknown_preset() -> None:
    with pytest.raises(KnowstackError, match="unknown preset"):
        build_world(Path("/nonexistent/never"), "huge")
