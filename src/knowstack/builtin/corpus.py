"""The pretraining corpus: stated facts, arithmetic, standard-library documentation and source code.

Who gets which text is decided by a hash of its name, so the texts the new-knowledge tasks are
built from (some docstrings, some source files) never appear in pretraining.

The corpus is sized to the pretraining budget: the facts take a fixed share of it (repeated in
several phrasings, as a real LLM sees a well-known fact many times), and real text fills the rest
up to a character budget, so a short run still sees every fact often enough to learn it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

from knowstack.builtin import sources
from knowstack.builtin.old_tasks import FAMILIES, Fact, FactFamily, chosen_facts


def bucket(name: str, buckets: int) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % buckets


def doc_use(doc: sources.Doc) -> str:
    """'notes', 'summary' (new-knowledge tasks) or 'corpus' (pretraining) for each docstring."""
    # 3 of 8 buckets: enough docs of the rarest kind (classes) for a balanced 3-way task.
    if bucket(doc.qualname, 8) >= 5:
        return "notes"
    if "\n\n" in doc.text:
        return "summary"
    return "corpus"


def source_use(path: sources.StdlibFile) -> str:
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

    def digest(self) -> str:
        """sha256 of the documents, in order, each length-prefixed (no two corpora share it)."""
        sha = hashlib.sha256()
        for document in self.documents:
            data = document.encode("utf-8")
            sha.update(len(data).to_bytes(8, "little") + data)
        return sha.hexdigest()


def fact_paragraphs(family: FactFamily, facts: list[Fact], repeats: int, rng: random.Random) -> list[str]:
    """Each fact in every phrasing, `repeats` times over, in shuffled paragraphs of a few facts."""
    sentences = [s for _ in range(repeats) for f in facts for s in family.sentences(f)]
    rng.shuffle(sentences)
    return [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)]


def arithmetic_lines() -> list[str]:
    """Addition, subtraction and multiplication tables: the arithmetic a real LLM knows before math tuning.

    They cover every operation the math task's problems need (see new_tasks.make_problem), so the
    task teaches word problems and step-by-step answers, not the tables themselves.
    """
    lines = []
    for a in range(51):
        for b in range(11):
            lines += [f"{a} + {b} = {a + b}", f"{a + b} - {b} = {a}"]
    for a in range(1, 21):
        for b in range(1, 11):
            lines.append(f"{a} * {b} = {a * b}")
    return lines


def arithmetic_paragraphs(repeats: int, rng: random.Random) -> list[str]:
    lines = arithmetic_lines() * repeats
    rng.shuffle(lines)
    return [". ".join(lines[i : i + 12]) + "." for i in range(0, len(lines), 12)]


def source_chunks(text: str, lines_per_chunk: int = 30) -> list[str]:
    lines = text.splitlines()
    return ["\n".join(lines[i : i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk)]


@lru_cache(maxsize=1)
def text_pool() -> tuple[str, ...]:
    """All real text the corpus may use, in a fixed order: docstrings, language reference, sources."""
    pool = [f"{d.qualname}\n{d.text}" for d in sources.stdlib_docs() if doc_use(d) == "corpus"]
    pool += [chunk for topic in sources.reference_topics() for chunk in topic.split("\n\n") if len(chunk) > 40]
    for path in sources.stdlib_source_files():
        if source_use(path) == "corpus":
            pool += source_chunks(path.read_text(encoding="utf-8", errors="replace"))
    return tuple(pool)


@lru_cache(maxsize=1)
def pool_lines() -> frozenset[str]:
    """Every stripped line of the real text the corpus may use: what a task's answer must not be."""
    return frozenset(line.strip() for text in text_pool() for line in text.splitlines())


@lru_cache(maxsize=1)
def pool_text() -> str:
    return "\n".join(text_pool())


def build_corpus(facts_per_family: int, fact_repeats: int, arithmetic_repeats: int, text_chars: int,
                 seed: int) -> Corpus:
    rng = random.Random(f"{seed}-corpus")
    chosen = {family.task: chosen_facts(family, facts_per_family, seed) for family in FAMILIES}
    documents: list[str] = []
    for family in FAMILIES:
        documents += fact_paragraphs(family, chosen[family.task], fact_repeats, rng)
    documents += arithmetic_paragraphs(arithmetic_repeats, rng)
    pool = list(text_pool())
    rng.shuffle(pool)
    used = 0
    for text in pool:
        if used >= text_chars:
            break
        documents.append(text)
        used += len(text)
    rng.shuffle(documents)
    return Corpus(documents, chosen)
