"""Old knowledge: the facts the base learns in pretraining, and the lm-eval tasks that test them.

Each fact family is written into the corpus in several phrasings (that is what makes it
knowledge the base *has*, as MMLU facts are for a real LLM) and tested by a 4-choice task in
lm-evaluation-harness' own YAML format, exactly as the stock tasks are at full scale.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from knowstack.builtin import sources


@dataclass(frozen=True)
class Fact:
    subject: str
    answer: str
    relation: str = ""  # extra words some families need (a subdivision's type)


@dataclass(frozen=True)
class FactFamily:
    """A kind of fact: how the corpus states it, how the test asks it, where its facts come from."""

    task: str
    phrasings: tuple[str, ...]  # str.format templates with {subject}, {answer}, {relation}
    question: str  # the test's context; the answer follows after a space
    description: str

    def facts(self) -> list[Fact]:
        return FACT_SOURCES[self.task]()

    def sentences(self, fact: Fact) -> list[str]:
        return [p.format(subject=fact.subject, answer=fact.answer, relation=fact.relation) for p in self.phrasings]

    def context(self, fact: Fact) -> str:
        return self.question.format(subject=fact.subject, relation=fact.relation)


FACT_SOURCES = {
    "ks_country_code": lambda: [Fact(c.name, c.alpha_3) for c in sources.countries()],
    "ks_subdivision": lambda: [Fact(name, country, kind) for name, kind, country in sources.subdivisions()],
    "ks_language_code": lambda: [Fact(name, code) for name, code in sources.languages()],
    "ks_unicode_name": lambda: [Fact(char, name) for char, name in sources.unicode_letters()],
}

FAMILIES = (
    FactFamily(
        "ks_country_code",
        ("The ISO 3166 alpha-3 code of {subject} is {answer}.",
         "{subject} has the three-letter country code {answer}.",
         "Country: {subject}. Alpha-3 code: {answer}."),
        "The ISO 3166 alpha-3 code of {subject} is",
        "ISO 3166-1 alpha-3 code of a country",
    ),
    FactFamily(
        "ks_subdivision",
        ("{subject} is a {relation} of {answer}.",
         "The {relation} of {subject} lies in {answer}.",
         "{answer} has a {relation} called {subject}."),
        "{subject} is a {relation} of",
        "the country an ISO 3166-2 subdivision belongs to",
    ),
    FactFamily(
        "ks_language_code",
        ("The ISO 639-3 code of the {subject} language is {answer}.",
         "{subject} has the language code {answer}.",
         "Language: {subject}. ISO 639-3: {answer}."),
        "The ISO 639-3 code of the {subject} language is",
        "ISO 639-3 code of a language",
    ),
    FactFamily(
        "ks_unicode_name",
        ("The character {subject} is named {answer}.",
         "In Unicode, {subject} is {answer}.",
         "Character {subject}: {answer}."),
        "The character {subject} is named",
        "Unicode name of a letter",
    ),
)


def chosen_facts(family: FactFamily, count: int, seed: int) -> list[Fact]:
    """The facts of a family that the world teaches and tests (a seeded sample, unique subjects)."""
    facts = family.facts()
    unique = list({f.subject: f for f in facts}.values())
    rng = random.Random(f"{seed}-{family.task}")
    return rng.sample(unique, min(count, len(unique)))


def multiple_choice_items(family: FactFamily, facts: list[Fact], seed: int) -> list[dict]:
    """Each fact as a 4-choice item; distractors are other answers of the same family."""
    rng = random.Random(f"{seed}-{family.task}-choices")
    answers = sorted({f.answer for f in family.facts()})
    items = []
    for fact in facts:
        distractors = rng.sample([a for a in answers if a != fact.answer], 3)
        choices = [*distractors, fact.answer]
        rng.shuffle(choices)
        items.append({"context": family.context(fact), "choices": choices, "label": choices.index(fact.answer)})
    return items


def write_lm_eval_task(family: FactFamily, items: list[dict], out_dir: Path) -> None:
    """A task in lm-evaluation-harness' YAML format with its JSONL data beside it.

    The data path is relative to the YAML, so the world can move; knowstack's lm-eval bridge
    makes it absolute when it hands the task to the harness.
    """
    data = out_dir / f"{family.task}.jsonl"
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    yaml_text = "\n".join([
        f"# knowstack built-in old-knowledge task: {family.description}",
        f"task: {family.task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data.name}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"',
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ])
    (out_dir / f"{family.task}.yaml").write_text(yaml_text, encoding="utf-8")
