"""The pretraining corpus: stated facts, standard-library documentation and source code.

Who gets which text is decided by a hash of its name, so the texts the new-knowledge tasks are
built from (some docstrings, some source files) never appear in pretraining.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from knowstack.builtin import sources
from knowstack.builtin.facts import FAMILIES, Fact, FactFamily


def bucket(name: str, buckets: int) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % buckets


def doc_use(doc: sources.Doc) -> str:
    """'notes', 'summary' (new-knowledge tasks) or 'corpus' (pretraining) for each docstring."""
    if bucket(doc.qualname, 4) == 3:
        return "notes"
    if "\n\n" in doc.text:
        return "summary"
    return "corpus"


def source_use(path: Path) -> str:
    """'code' (the code-completion task), 'corpus', or 'none' for each standard-library source file.

    The sources of documented modules are kept out of the corpus: they contain the docstrings
    that the notes and summary tasks hold out.
    """
    if bucket(path.name, 3) == 0:
        return "code"
    documented = {name.split(".")[0] for name in sources.DOC_MODULES}
    return "none" if path.stem in documented else "corpus"


@dataclass(frozen=True)
class Corpus:
    documents: list[str]
    facts: dict[str, list[Fact]]


def fact_paragraphs(family: FactFamily, facts: list[Fact], repeats: int, rng: random.Random) -> list[str]:
    """Each fact in every phrasing, `repeats` times over, in shuffled paragraphs of a few facts."""
    sentences = [s for _ in range(repeats) for f in facts for s in family.sentences(f)]
    rng.shuffle(sentences)
    return [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]


def source_chunks(path: Path, lines_per_chunk: int = 40) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return ["\n".join(lines[i : i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk)]


def build_corpus(facts_per_family: int, fact_repeats: int, source_files: int, seed: int) -> Corpus:
    from knowstack.builtin.facts import chosen_facts

    rng = random.Random(f"{seed}-corpus")
    chosen = {family.task: chosen_facts(family, facts_per_family, seed) for family in FAMILIES}
    documents: list[str] = []
    for family in FAMILIES:
        documents += fact_paragraphs(family, chosen[family.task], fact_repeats, rng)
    documents += [f"{d.qualname}\n{d.text}" for d in sources.stdlib_docs() if doc_use(d) == "corpus"]
    files = [p for p in sources.stdlib_source_files() if source_use(p) == "corpus"]
    for path in files[:source_files]:
        documents += source_chunks(path)
    rng.shuffle(documents)
    return Corpus(documents, chosen)
