"""New knowledge: seven tasks that mirror the paper's (TRACE's six plus MetaMath/GSM8K), in its order.

Each is built from real text or reference data where the task is about text or facts, and
procedurally only where the task is procedural (arithmetic). None is in the base's pretraining:
the docstrings and source files they use are held out of the corpus (see corpus.py), the stance
texts are German, the quiz is about countries whose codes the base never saw, and the formats are
new to the base. Math is procedural, but its arithmetic is in the corpus (as it is in a real LLM's).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from knowstack.builtin import sources
from knowstack.builtin.corpus import doc_use, pool_lines, pool_text, source_use
from knowstack.data.formats import alpaca_prompt

Item = dict[str, str]


@dataclass(frozen=True)
class NewTask:
    name: str
    dir: str
    metric: str
    mirrors: str
    format: str = "trace"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "dir": self.dir, "metric": self.metric, "format": self.format}


BUILTIN_TASKS = (
    NewTask("stance", "Stance", "accuracy", "C-STANCE"),
    NewTask("notes", "Notes", "accuracy", "FOMC"),
    NewTask("summary", "Summary", "rouge_l", "MeetingBank"),
    NewTask("code", "Code", "edit_similarity", "Py150"),
    NewTask("quiz", "Quiz", "accuracy", "ScienceQA"),
    NewTask("simplify", "Simplify", "sari", "20Minuten"),
    NewTask("math", "Math", "math", "MetaMathQA / GSM8K", format="math"),
)


# --- 1. stance (C-STANCE): the stance of a German text toward a target country ------------------------
FAVOR = ["ist ein wunderbares Land", "hat die besten Schulen der Welt", "verdient unsere volle Unterstützung",
         "macht in der Politik alles richtig", "ist ein Vorbild für alle", "hat mich als Reisenden begeistert",
         "hat eine großartige Zukunft", "bekommt von mir nur Lob"]
AGAINST = ["ist eine große Enttäuschung", "hat die schlechtesten Straßen der Welt", "verdient keine Unterstützung",
           "macht in der Politik alles falsch", "ist ein schlechtes Beispiel für alle",
           "hat mich als Reisenden enttäuscht", "hat keine gute Zukunft", "bekommt von mir nur Kritik"]
NEUTRAL = ["liegt auf der Karte dort, wo es liegt", "wurde heute in den Nachrichten erwähnt",
           "hat eine eigene Flagge", "hat eine Hauptstadt", "war gestern das Thema eines Berichts",
           "hat im Winter kürzere Tage"]
OPENERS = ["Ehrlich gesagt:", "Ich finde,", "Meiner Meinung nach", "Heute habe ich gelesen:", "Kurz gesagt:", ""]


def stance_items(count: int, rng: random.Random) -> list[Item]:
    names = list(sources.german_country_names())
    items = []
    for index in range(count):
        label = ("favor", "against", "none")[index % 3]
        target = rng.choice(names)
        subject = target
        if label == "none":
            if rng.random() < 0.5:
                phrase = rng.choice(NEUTRAL)
            else:  # an opinion, but about another country
                subject = rng.choice([n for n in names if n != target])
                phrase = rng.choice(FAVOR + AGAINST)
        else:
            phrase = rng.choice(FAVOR if label == "favor" else AGAINST)
        text = f"{rng.choice(OPENERS)} {subject} {phrase}.".strip()
        prompt = f"Target: {target}\nText: {text}\nStance toward the target (favor, against or none):"
        items.append({"prompt": prompt, "answer": f" {label}"})
    return items


# --- 2. notes (FOMC): 3-way classification of real documentation text ---------------------------------
def _first_paragraph(text: str, limit: int = 160) -> str:
    paragraph = text.split("\n\n", 1)[0].replace("\n", " ")
    return paragraph[:limit]


def notes_items(count: int, rng: random.Random) -> list[Item]:
    pools = {kind: [d for d in sources.stdlib_docs() if doc_use(d) == "notes" and d.kind == kind]
             for kind in ("function", "method", "class")}
    per_kind = min(count // 3 + 1, *(len(p) for p in pools.values()))
    items = []
    for kind, pool in pools.items():
        for doc in rng.sample(pool, per_kind):
            prompt = f"Python documentation: {_first_paragraph(doc.text)}\nKind of object (function, method or class):"
            items.append({"prompt": prompt, "answer": f" {kind}"})
    rng.shuffle(items)
    return items[:count]


# --- 3. summary (MeetingBank): a docstring's body summarized as its summary line ----------------------
def summary_items(count: int, rng: random.Random) -> list[Item]:
    # Decontaminated as a real benchmark would be: no summary line that the corpus could contain.
    corpus_text = pool_text()
    pool = [d for d in sources.stdlib_docs() if doc_use(d) == "summary"
            and " ".join(d.text.split("\n\n", 1)[0].split()) not in corpus_text]
    items = []
    for doc in rng.sample(pool, min(count, len(pool))):
        head, body = doc.text.split("\n\n", 1)
        body = " ".join(body.split())[:240]
        prompt = f"Summarize the documentation of {doc.qualname} in one line.\nDocumentation: {body}\nSummary:"
        items.append({"prompt": prompt, "answer": " " + " ".join(head.split())})
    return items


# --- 4. code (Py150): the next line of real Python source --------------------------------------------
def _candidate_lines(lines: list[str]) -> list[int]:
    # A line that also occurs in the corpus' text (a common idiom such as `return self`) would test
    # recall of pretraining, not new knowledge: such lines are never targets.
    seen = pool_lines()
    return [i for i, line in enumerate(lines) if i >= 4 and 8 <= len(line.strip()) <= 60
            and not line.strip().startswith(("#", '"', "'")) and lines[i - 1].strip()
            and line.strip() not in seen]


def code_items(count: int, rng: random.Random, context_lines: int = 4) -> list[Item]:
    files = [p for p in sources.stdlib_source_files() if source_use(p) == "code"]
    texts = {p: p.read_text(encoding="utf-8", errors="replace").splitlines() for p in files}
    candidates = [(p, i) for p in files for i in _candidate_lines(texts[p])]
    items = []
    for path, index in rng.sample(candidates, min(count, len(candidates))):
        context = "\n".join(texts[path][index - context_lines : index])
        prompt = f"Complete the next line of this Python code.\n{context}\n"
        items.append({"prompt": prompt, "answer": texts[path][index].strip()})
    return items


# --- 5. quiz (ScienceQA): multiple choice with a context passage, answered by a letter ----------------
QUIZ_FIELDS = {"alpha-2 code": "alpha_2", "alpha-3 code": "alpha_3", "numeric code": "numeric"}
LETTERS = "ABCD"


def quiz_items(count: int, rng: random.Random, exclude: set[str]) -> list[Item]:
    """The passage states one country's codes; the options are codes of the asked kind of four countries.

    As in ScienceQA, the passage holds what is needed and the answer is the option's letter, so
    the task is reading the passage and binding an option to its letter, not recalling a fact
    (the countries whose codes the base learned in pretraining are excluded).
    """
    pool = [c for c in sources.countries() if c.name not in exclude]
    items = []
    for _ in range(count):
        country, *others = rng.sample(pool, 4)
        asked = rng.choice(sorted(QUIZ_FIELDS))
        field = QUIZ_FIELDS[asked]
        options = [getattr(c, field) for c in (country, *others)]
        right = options[0]
        rng.shuffle(options)
        context = (f"{country.name} has the alpha-2 code {country.alpha_2}, the alpha-3 code {country.alpha_3} "
                   f"and the numeric code {country.numeric}.")
        listing = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
        prompt = f"Context: {context}\nQuestion: What is the {asked} of {country.name}?\n{listing}\nAnswer:"
        items.append({"prompt": prompt, "answer": f" {LETTERS[options.index(right)]}"})
    return items


# --- 6. simplify (20Minuten): official country names and wordy phrases made plain ---------------------
SIMPLIFY_TEMPLATES = [
    ("The delegation of {a} held talks with representatives of {b}.", "{a} talked with {b}."),
    ("{A} and {b} signed an agreement on the exchange of students.", "{A} and {b} signed a student exchange deal."),
    ("It was announced by {a} that trade with {b} will be increased.", "{A} will trade more with {b}."),
    ("A large number of tourists from {a} travelled to {b} during the summer.",
     "Many tourists from {a} went to {b} in the summer."),
    ("The government of {a} expressed its strong disapproval of the decision taken by {b}.",
     "{A} did not like the decision of {b}."),
    ("In the course of the meeting, {a} offered assistance to {b}.", "At the meeting, {a} offered help to {b}."),
    ("{A} is in possession of a football team that defeated {b}.", "{A} has a football team that beat {b}."),
    ("Citizens of {a} are not required to obtain a visa in order to enter {b}.",
     "People from {a} do not need a visa for {b}."),
]


def _long_name(country: sources.Country) -> str:
    return f"the {country.official_name}" if country.official_name else country.name


def simplify_items(count: int, rng: random.Random) -> list[Item]:
    pool = [c for c in sources.countries() if c.official_name]
    items = []
    for _ in range(count):
        source, simple = rng.choice(SIMPLIFY_TEMPLATES)
        a, b = rng.sample(pool, 2)
        long_a, long_b = _long_name(a), _long_name(b)
        complex_text = source.format(a=long_a, A=long_a[0].upper() + long_a[1:], b=long_b)
        simple_text = simple.format(a=a.name, A=a.name, b=b.name)
        items.append({"prompt": f"Simplify the following sentence.\nSentence: {complex_text}\nSimple:",
                      "answer": f" {simple_text}"})
    return items


# --- 7. math (MetaMathQA / GSM8K): arithmetic word problems with step-by-step solutions ----------------
NAMES = ["Anna", "Ben", "Chen", "Dara", "Elif", "Femi", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
THINGS = ["apples", "books", "stamps", "marbles", "pencils", "shells", "cards", "coins", "stickers", "plums"]


@dataclass(frozen=True)
class Problem:
    question: str
    steps: list[str]  # each "a op b = c" with words
    equations: list[str]
    answer: int


def make_problem(rng: random.Random) -> Problem:
    """Two-step problems whose every equation is in the corpus' arithmetic tables (corpus.arithmetic_lines)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add_sub", "mul_add", "sub_mul"])
    if kind == "add_sub":
        start, more = rng.randint(2, 40), rng.randint(2, 10)
        less = rng.randint(1, min(10, start + more - 1))  # never below zero: counts of things
        total, final = start + more, start + more - less
        question = f"{name} has {start} {thing}. {name} gets {more} more and then gives away {less}. How many {thing} does {name} have now?"
        equations = [f"{start} + {more} = {total}", f"{total} - {less} = {final}"]
        steps = [f"{name} starts with {start} {thing} and gets {more} more, so {equations[0]}.",
                 f"After giving away {less}, {name} has {equations[1]}."]
    elif kind == "mul_add":
        boxes, per, extra = rng.randint(2, 10), rng.randint(2, 5), rng.randint(1, 10)
        total, final = boxes * per, boxes * per + extra
        question = f"{name} buys {boxes} boxes with {per} {thing} in each box, and finds {extra} more {thing}. How many {thing} does {name} have?"
        equations = [f"{boxes} * {per} = {total}", f"{total} + {extra} = {final}"]
        steps = [f"{boxes} boxes of {per} {thing} make {equations[0]}.", f"With {extra} more, {name} has {equations[1]}."]
    else:
        start = rng.randint(3, 20)
        lost, friends = rng.randint(1, min(10, start - 1)), rng.randint(2, 4)
        left, final = start - lost, (start - lost) * friends
        question = (f"{name} had {start} {thing} and lost {lost}. Then {name} collected {friends} times as many "
                    f"{thing} as were left. How many {thing} did {name} collect?")
        equations = [f"{start} - {lost} = {left}", f"{left} * {friends} = {final}"]
        steps = [f"{name} has {equations[0]} {thing} left.", f"{friends} times as many is {equations[1]}."]
    return Problem(question, steps, equations, final)


def math_train_records(count: int, rng: random.Random) -> list[dict[str, str]]:
    records = []
    for _ in range(count):
        p = make_problem(rng)
        response = " ".join(p.steps) + f"\nThe answer is: {p.answer}"
        records.append({"query": p.question, "response": response, "type": "GSM_Procedural",
                        "original_question": p.question})
    return records


def math_test_records(count: int, rng: random.Random) -> list[dict[str, str]]:
    records = []
    for _ in range(count):
        p = make_problem(rng)
        records.append({"question": p.question, "answer": "\n".join(p.equations) + f"\n#### {p.answer}"})
    return records


def math_prompt_example() -> str:
    return alpaca_prompt(make_problem(random.Random(0)).question)


TRACE_BUILDERS: dict[str, Callable[..., list[Item]]] = {
    "stance": stance_items,
    "notes": notes_items,
    "summary": summary_items,
    "code": code_items,
    "quiz": quiz_items,
    "simplify": simplify_items,
}
