"""Model cards: the README.md with Hub metadata that every model dir knowstack writes carries.

The Hugging Face Hub's model tree reads `base_model` and `base_model_relation` from a card's YAML front
matter (the relations it knows: adapter, merge, quantized, finetune), and `library_name` to say how
the files load. knowstack writes one card per model dir it makes (a trained model or LoRA adapter, a
merge, an MoE, an exported registry version) with that metadata, the method and its settings, its inputs
by name and content hash, and its scores with 95% intervals where they are known. The front matter is
written by huggingface_hub's ModelCardData, so it is the Hub's own spelling.

A study's models are made before they are evaluated: their cards say where the scores will be (the
study's results); a registry export knows its version's scores and lineage and writes them in.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from knowstack.atomic import atomic_write_text

CARD_FILE = "README.md"
RELATIONS = ("adapter", "merge", "quantized", "finetune")
# Metrics that are a share of items answered right: a binomial (Wilson) interval applies to them.
PROPORTION_METRICS = ("accuracy", "acc", "acc_norm", "em_cot", "math", "exact_match")
_HASHED_SUFFIXES = (".safetensors",)
_HASHED_NAMES = ("config.json", "adapter_config.json", "lora_moe.json")


@dataclass(frozen=True)
class CardInput:
    """One input of a model: a name (a path, a hub id, a registry version) and its content hash if known."""

    name: str
    role: str = "input"
    sha256: str | None = None


@dataclass(frozen=True)
class CardScore:
    task: str
    metric: str
    value: float
    n: int | None = None
    kind: str = "new"  # new: a task's own test set; old: old knowledge (lm-eval)


@dataclass
class ModelCardInfo:
    """What a card says; `relation` is one of the Hub's base_model_relation values."""

    title: str
    base_model: str | list[str]
    relation: str
    library_name: str
    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[CardInput] = ()
    inputs_note: str = ""  # a sentence under the inputs' table (e.g. why it has no sha256)
    scores: Sequence[CardScore] | None = None  # None: not measured when the card was written
    scores_note: str = ""
    lineage: Sequence[str] = ()
    how_to_load: str = ""
    tags: Sequence[str] = ()
    sections: Sequence[str] = ()  # further markdown lines (their own "## " headings), after the settings

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"base_model_relation must be one of {', '.join(RELATIONS)}, not {self.relation!r}")


def hub_name(model: str | Path) -> str:
    """The name a card gives a model: a hub id as given; a local dir that is a Hugging Face cache snapshot
    (`.../models--org--name/snapshots/<rev>`) as `org/name`; any other local dir as its path."""
    text = str(model)
    path = Path(text).expanduser()
    if not path.exists():
        return text
    for part in path.resolve().parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return str(path.resolve())


def dir_sha256(model_dir: str | Path) -> str | None:
    """A model dir's content hash: sha256 over `name<TAB>sha256` lines of its weight and config files, in name
    order (the registry's content-hash scheme); None for what is not a local dir (a hub id)."""
    from knowstack.hashing import content_hash, known_sha256

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and (p.suffix in _HASHED_SUFFIXES or p.name in _HASHED_NAMES))
    return content_hash({p.name: known_sha256(p) for p in files}) if files else None


def model_input(model: str | Path, role: str = "input") -> CardInput:
    return CardInput(hub_name(model), role, dir_sha256(model))


def examples_sha256(pairs: Iterable[tuple[str, str]]) -> str:
    """One hash for a list of (prompt, answer) examples, in order."""
    digest = hashlib.sha256()
    for prompt, answer in pairs:
        digest.update(json.dumps([prompt, answer], ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def wilson_interval(value: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion `value` measured on n items."""
    centre = (value + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(value * (1 - value) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_interval(score: CardScore) -> tuple[float, float] | None:
    """A 95% interval where one is known: a proportion metric scored on n items."""
    if score.n and score.metric in PROPORTION_METRICS and 0.0 <= score.value <= 1.0:
        return wilson_interval(score.value, score.n)
    return None


def render(info: ModelCardInfo) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=info.base_model, base_model_relation=info.relation,
                         library_name=info.library_name, tags=["knowstack", *info.tags])
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {info.title}", "",
             f"Made by knowstack with the method **{info.method}** ({_relation_phrase(info)})."]
    if info.how_to_load:
        lines += ["", f"Load: `{info.how_to_load}`"]
    if info.lineage:
        lines += ["", "## Lineage", "", *info.lineage]
    if info.inputs:
        lines += ["", "## Inputs", "", "| role | name | sha256 |", "|---|---|---|"]
        lines += [f"| {i.role} | `{i.name}` | {f'`{i.sha256}`' if i.sha256 else '-'} |" for i in info.inputs]
        if info.inputs_note:
            lines += ["", info.inputs_note]
    if info.settings:
        lines += ["", "## Settings", "", "```json", json.dumps(info.settings, indent=2, sort_keys=True, default=str),
                  "```"]
    if info.sections:
        lines += ["", *info.sections]
    lines += ["", "## Scores", ""]
    if info.scores:
        lines += ["| task | kind | metric | value | 95% interval | n |", "|---|---|---|---|---|---|"]
        for score in info.scores:
            interval = score_interval(score)
            shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "-"
            lines.append(f"| {score.task} | {score.kind} | {score.metric} | {score.value:.4f} | {shown} | "
                         f"{score.n if score.n is not None else '-'} |")
    if info.scores_note or not info.scores:
        lines.append(info.scores_note or "Not measured when this card was written.")
    return "\n".join(lines).rstrip() + "\n"


def _names(base_model: str | list[str]) -> str:
    # each name in its own backticks, as the title writes them (`a`, `b`; not `a, b`)
    return ", ".join(f"`{name}`" for name in ([base_model] if isinstance(base_model, str) else base_model))


def _relation_phrase(info: ModelCardInfo) -> str:
    # a merge onto one shared base is not a merge *of* that base (a new user read it so): say which it is on
    if info.relation == "merge" and isinstance(info.base_model, str):
        return f"merge on the base `{info.base_model}`"
    return f"{info.relation} of {_names(info.base_model)}"


def write_model_card(model_dir: str | Path, info: ModelCardInfo) -> Path:
    """Write README.md into `model_dir` (atomically); returns its path."""
    path = Path(model_dir) / CARD_FILE
    atomic_write_text(path, render(info))
    return path


def read_card_metadata(model_dir: str | Path) -> dict[str, Any]:
    """The YAML front matter of a dir's README.md, as the Hub reads it (huggingface_hub's parser)."""
    from huggingface_hub import ModelCard

    return ModelCard.load(Path(model_dir) / CARD_FILE).data.to_dict()


NO_INPUT_HASHES_NOTE = "The inputs' sha256 were not computed (`--no-input-hashes`)."
STUDY_SCORES_NOTE = ("Not measured when this card was written: the model is made before it is evaluated. "
                     "A study's scores are in its results.csv and report; a registry export's card carries them.")


def training_card(settings: Mapping[str, Any], model_path: str | Path, adapter_init: str | Path | None,
                  summary: Mapping[str, Any], data_sha256: str, method: str | None = None) -> ModelCardInfo:
    """The card of a trained model (FFT: a full model, a finetune of its base) or LoRA adapter."""
    lora = settings.get("finetune") == "lora"
    inputs = [model_input(model_path, "base model")]
    if adapter_init is not None:
        inputs.append(model_input(adapter_init, "adapter trained further" if lora else "adapter merged in first"))
    inputs.append(CardInput(f"{summary.get('unique_examples')} training examples, {summary.get('steps')} steps",
                            "training data", data_sha256))
    return ModelCardInfo(
        title=f"{'LoRA adapter' if lora else 'Fine-tuned model'} of {hub_name(model_path)}",
        base_model=hub_name(model_path), relation="adapter" if lora else "finetune",
        library_name="peft" if lora else "transformers", method=method or f"{settings.get('finetune')} training",
        settings=dict(settings), inputs=inputs, scores_note=STUDY_SCORES_NOTE,
        how_to_load="peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)" if lora
        else "AutoModelForCausalLM.from_pretrained(DIR)",
        tags=["lora"] if lora else [])


def merge_card(method: str, base: str | Path | None, models: Sequence[str | Path], settings: Mapping[str, Any],
               input_hashes: bool = True) -> ModelCardInfo:
    """A merge's card: base_model the shared base (or, for a plain average without one, the models merged); its
    title names the method, every model merged and the base. input_hashes False: the inputs without their content
    hashes (the settings say so, `input_hashes`, and a sentence under the inputs)."""
    def entry(model: str | Path, role: str) -> CardInput:
        return model_input(model, role) if input_hashes else CardInput(hub_name(model), role)

    inputs = ([entry(base, "base model")] if base is not None else []) + [entry(m, "merged") for m in models]
    parents: str | list[str] = hub_name(base) if base is not None else [hub_name(m) for m in models]
    title = f"{method} merge of {', '.join(f'`{hub_name(m)}`' for m in models)}"
    if base is not None:
        title += f" on `{hub_name(base)}`"
    return ModelCardInfo(title=title, base_model=parents, relation="merge",
                         library_name="transformers", method=f"merge ({method})", settings=dict(settings),
                         inputs=inputs, inputs_note="" if input_hashes else NO_INPUT_HASHES_NOTE,
                         scores_note=STUDY_SCORES_NOTE, tags=["merge"],
                         how_to_load="AutoModelForCausalLM.from_pretrained(DIR)")


def moe_card(kind: str, base: str | Path, models: Sequence[str | Path], settings: Mapping[str, Any]) -> ModelCardInfo:
    """An MoE's card. FFT-MoE: a full model (transformers); LoRA-MoE: knowstack's own adapter format, applied
    to the base by knowstack.modelio.load_model (no PEFT format holds routed LoRA experts)."""
    lora = kind == "lora"
    inputs = [model_input(base, "base model")] + [model_input(m, "expert") for m in models]
    return ModelCardInfo(
        title=f"{'LoRA' if lora else 'FFT'}-MoE of {len(models)} experts on {hub_name(base)}",
        base_model=hub_name(base), relation="adapter" if lora else "merge",
        library_name="knowstack" if lora else "transformers", method=f"{'LoRA' if lora else 'FFT'}-MoE",
        settings=dict(settings), inputs=inputs, scores_note=STUDY_SCORES_NOTE, tags=["moe"],
        how_to_load="knowstack.modelio.load_model(BASE, DIR)" if lora
        else "AutoModelForCausalLM.from_pretrained(DIR)")


def registry_card(record: Mapping[str, Any], base: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                  registry: str, how_to_load: str) -> ModelCardInfo:
    """An exported registry version's card: its lineage back to the base, its parents by content hash, and every
    score the registry recorded for it."""
    by_name = {r["name"]: r for r in records}
    base_name = hub_name(base["settings"].get("source") or base["name"])
    kind, method = record["kind"], record["method"]
    if kind == "base":
        relation, library = "finetune", "transformers"  # the Hub has no "is" relation; the card names its source
    elif kind == "adapter":
        relation, library = "adapter", "knowstack" if "lora_moe.json" in record["files"] else "peft"
    else:
        relation = "finetune" if method in ("contribution", "sequential", "replay", "joint", "olora") else "merge"
        library = "transformers"
    inputs = [CardInput(base_name, "registry base", base["content_hash"])]
    inputs += [CardInput(p, "parent", by_name[p]["content_hash"] if p in by_name else None) for p in record["parents"]]
    settings = {k: v for k, v in (record.get("settings") or {}).items() if k in ("options", "gate", "previous")}
    if record.get("task"):
        settings["task"] = {"name": record["task"], "metric": record.get("metric"), "format": record.get("task_format")}
    scores = [CardScore(s["task"], s["metric"], float(s["value"]), s.get("n"), s["kind"]) for s in record["scores"]]
    return ModelCardInfo(
        title=f"{record['name']} of the knowstack registry {registry}", base_model=base_name, relation=relation,
        library_name=library, method=method, settings=settings, inputs=inputs, scores=scores,
        scores_note="" if scores else "The registry recorded no scores for this version.",
        lineage=lineage_lines(record["name"], by_name), how_to_load=how_to_load,
        tags=[f"knowstack-{record['status']}"])


def lineage_lines(name: str, by_name: Mapping[str, Mapping[str, Any]], depth: int = 0) -> list[str]:
    """A markdown list: `name` and, nested under it, what it was made from, back to the base (a contribution's parent is the base)."""
    record = by_name.get(name)
    if record is None:
        return [f"{'  ' * depth}- {name} (not in this registry)"]
    what = record["method"] + (f", task {record['task']}" if record.get("task") else "")
    line = f"{'  ' * depth}- {name} [{record['status']}] ({what}; sha256 `{record['content_hash'][:16]}`)"
    return [line, *(sub for parent in record["parents"] for sub in lineage_lines(parent, by_name, depth + 1))]
