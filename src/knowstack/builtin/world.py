"""The built-in world: a tiny pretrained Llama, its tokenizer, its old-knowledge tests and 7 new tasks.

`build_world` is deterministic in (preset, seed), given the recorded sources (sources.py), the
package versions and the number of threads torch uses (CPU kernels split their sums by it), and
writes, atomically:
    model/                 the base (LlamaForCausalLM, safetensors) and its tokenizer
    tasks/<Dir>/           TRACE layout (train.json, eval.json, test.json); Math in MetaMathQA/GSM8K fields
    old_knowledge/         lm-evaluation-harness task YAMLs + JSONL data (ks_*)
    world.json             the manifest the study reads, with the world's `fingerprint`: a hash of
                           the hashes of its corpus, tokenizer, weights and tasks (`hashes`), which
                           the study puts in the key of every step made from the world
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from knowstack.atomic import atomic_dir
from knowstack.builtin import sources
from knowstack.builtin.corpus import build_corpus
from knowstack.builtin.new_tasks import BUILTIN_TASKS, TRACE_BUILDERS, math_test_records, math_train_records
from knowstack.builtin.old_tasks import FAMILIES, multiple_choice_items, write_lm_eval_task
from knowstack.builtin.pretrain import ModelShape, PretrainSettings, make_model, pretrain, token_stream
from knowstack.builtin.tokenizer import train_tokenizer
from knowstack.errors import KnowstackError
from knowstack.version import __version__

# Bump when anything the world contains changes: the study hashes it into every cache key.
WORLD_VERSION = 5
__all__ = ["BUILTIN_TASKS", "PRESETS", "WORLD_VERSION", "WorldPreset", "build_world"]


@dataclass(frozen=True)
class WorldPreset:
    facts_per_family: int  # old-knowledge facts taught, and tested, per family
    fact_repeats: int  # how often each phrasing of a fact appears in the corpus
    arithmetic_repeats: int  # how often the arithmetic tables appear in the corpus
    text_chars: int  # real text (docs, language reference, sources) in the corpus
    pretrain_steps: int  # of 16 windows of 128 tokens
    train: int  # examples per new task
    eval: int
    test: int
    math_train: int  # MetaMath is much larger than a TRACE task in the paper (79x); here ~3.5x
    vocab_size: int = 4096
    shape: ModelShape = ModelShape()


PRESETS = {
    "test": WorldPreset(facts_per_family=24, fact_repeats=2, arithmetic_repeats=1, text_chars=20_000,
                        pretrain_steps=6, train=32, eval=16, test=16, math_train=64, vocab_size=1024,
                        shape=ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)),
    # Sized so that `make demo` (world, 26 fine-tunes, 29 evaluations) fits in 10 minutes on 2 cores.
    # Math is no larger than the other tasks here: its long solutions would cost the demo a minute.
    "quick": WorldPreset(facts_per_family=100, fact_repeats=16, arithmetic_repeats=3, text_chars=600_000,
                         pretrain_steps=240, train=160, eval=20, test=50, math_train=160),
    # Sized so that configs/builtin.yaml (every method: ~50 fine-tunes, 2 joint runs, ~70 evaluations)
    # runs in about an hour on 2 cores.
    "full": WorldPreset(facts_per_family=150, fact_repeats=16, arithmetic_repeats=4, text_chars=2_500_000,
                        pretrain_steps=1000, train=400, eval=50, test=100, math_train=800),
}


# The shipped study config whose `training:` section is the recipe for a preset's model (one constant rate, a
# fraction of the world's own pretraining peak: the config says why), which `knowstack train` and api.train use on
# WORLD/model when no recipe is given.
RECIPE_CONFIGS = {"test": "builtin-quick.yaml", "quick": "builtin-quick.yaml", "full": "builtin.yaml"}


def world_of_model(model: str | Path) -> dict | None:
    """The world.json manifest of the built-in world whose base `model` is (WORLD/model beside WORLD/world.json),
    or None for any other model."""
    path = Path(str(model)).expanduser()
    manifest = path.parent / "world.json"
    if path.name != "model" or not path.is_dir() or not manifest.is_file():
        return None
    try:
        found = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and "peak_lr" in found.get("pretrain", {}) else None


def world_recipe(manifest: dict) -> tuple[str, dict]:
    """The recipe for a world's model: (the config file it comes from, its `training:` section)."""
    from knowstack.config import CONFIG_DIR

    name = RECIPE_CONFIGS.get(manifest.get("preset", ""), RECIPE_CONFIGS["quick"])
    config = yaml.safe_load((CONFIG_DIR / name).read_text(encoding="utf-8"))
    return name, dict(config["training"])


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _split(items: list, preset: WorldPreset) -> dict[str, list]:
    train, evaluation = preset.train, preset.eval
    return {"test": items[:preset.test], "eval": items[preset.test:preset.test + evaluation],
            "train": items[preset.test + evaluation:preset.test + evaluation + train]}


def write_tasks(root: Path, preset: WorldPreset, seed: int, old_subjects: set[str]) -> None:
    for task in BUILTIN_TASKS:
        rng = random.Random(f"{seed}-{task.name}")
        if task.format == "math":
            _write_json(root / task.dir / "train.json", math_train_records(preset.math_train, rng))
            _write_json(root / task.dir / "test.json", math_test_records(preset.test, rng))
            continue
        needed = preset.train + preset.eval + preset.test
        extra = {"exclude": old_subjects} if task.name == "quiz" else {}
        items = TRACE_BUILDERS[task.name](needed, rng, **extra)
        for split, rows in _split(items, preset).items():
            _write_json(root / task.dir / f"{split}.json", rows)


def tree_digest(root: Path, parts: tuple[str, ...]) -> str:
    """sha256 over the relative path and sha256 of every file under root/part, in sorted order."""
    files = [path for part in parts
             for path in ([root / part] if (root / part).is_file() else sorted((root / part).rglob("*")))]
    lines = [f"{path.relative_to(root).as_posix()}\t{hashlib.sha256(path.read_bytes()).hexdigest()}"
             for path in files if path.is_file()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def world_hashes(root: Path, corpus_digest: str) -> dict[str, str]:
    """The hashes a world's fingerprint is made of."""
    model = root / "model"
    weights = [p.name for p in sorted(model.glob("*.safetensors"))] + ["config.json"]
    tokenizer = [p.name for p in sorted(model.iterdir()) if p.name.startswith(("tokenizer", "special_tokens"))]
    return {
        "corpus": corpus_digest,
        "tokenizer": tree_digest(model, tuple(tokenizer)),
        "weights": tree_digest(model, tuple(weights)),
        "tasks": tree_digest(root, ("tasks", "old_knowledge")),
    }


def fingerprint_of(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def build_environment() -> dict[str, object]:
    """What a world's numbers depend on besides its preset and seed (recorded, not part of the key)."""
    packages = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "tokenizers", "pycountry")}
    return {"knowstack": __version__, "python": sys.version.split()[0], **packages,
            "torch_threads": torch.get_num_threads(), "deterministic_algorithms": True}


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """torch's deterministic algorithms while the world is built (an op without one is an error, not
    noise), restored afterwards: a study runs its other steps in the same process."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _warn_if_sources_differ(check: dict) -> None:
    if check["differ"]:
        shown = ", ".join(check["differ"][:8]) + (", ..." if len(check["differ"]) > 8 else "")
        print(f"knowstack: {len(check['differ'])} of the built-in world's {check['sources']} sources differ from "
              f"those recorded on Python {check['recorded_on']['python']} ({shown}): this world differs from the "
              "reference one, and its fingerprint says so", file=sys.stderr)


def build_world(out_dir: Path, preset: str = "quick", seed: int = 0) -> Path:
    """Build the world into `out_dir` (replacing nothing until it is complete); returns `out_dir`."""
    if preset not in PRESETS:
        raise KnowstackError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})", field="base.builtin")
    settings = PRESETS[preset]
    out_dir = Path(out_dir)
    started = time.monotonic()
    check = sources.source_check()  # before anything is built: a missing source is an error
    _warn_if_sources_differ(check)
    torch.manual_seed(seed)
    with atomic_dir(out_dir) as tmp, deterministic_torch():
        corpus = build_corpus(settings.facts_per_family, settings.fact_repeats, settings.arithmetic_repeats,
                              settings.text_chars, seed)
        tokenizer = train_tokenizer(corpus.documents, settings.vocab_size)
        model = make_model(tokenizer, settings.shape, seed)
        steps = settings.pretrain_steps
        pretraining = PretrainSettings(steps=steps, warmup_steps=min(20, max(1, steps // 10)))
        stream = token_stream(tokenizer, corpus.documents)
        stats = pretrain(model, stream, pretraining, seed)
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")

        old_dir = tmp / "old_knowledge"
        old_dir.mkdir()
        for family in FAMILIES:
            items = multiple_choice_items(family, corpus.facts[family.task], seed)
            write_lm_eval_task(family, items, old_dir)
        old_subjects = {f.subject for f in corpus.facts["ks_country_code"]}
        write_tasks(tmp / "tasks", settings, seed, old_subjects)

        hashes = world_hashes(tmp, corpus.digest())
        manifest = {
            "preset": preset,
            "seed": seed,
            "version": WORLD_VERSION,
            "settings": asdict(settings),
            "pretrain": {"steps": pretraining.steps, "peak_lr": pretraining.peak_lr, "tokens": stats["tokens"],
                         "params": sum(p.numel() for p in model.parameters()),
                         "final_loss": stats["loss_curve"][-1], "corpus_documents": len(corpus.documents),
                         "corpus_tokens": int(stream.numel())},
            "tasks": [task.as_dict() for task in BUILTIN_TASKS],
            "old_tasks": [family.task for family in FAMILIES],
            "old_include_path": "old_knowledge",
            "fingerprint": fingerprint_of(hashes),
            "hashes": hashes,
            "environment": build_environment(),
            "sources": check,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        _write_json(tmp / "world.json", manifest)
    return out_dir
