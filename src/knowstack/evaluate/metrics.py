"""New-knowledge metrics, one small registered function each, all on a 0..1 scale.

TRACE's metrics: accuracy for classification and multiple choice, ROUGE-L for summarization,
edit similarity for code completion, SARI for simplification; exact match of the final number
for math. Every metric is registered per example, `(predictions, references, sources) -> list[float]`
(PER_EXAMPLE), and as the mean over examples (METRICS); `sources` (the prompts) only matter to SARI.
The paper's own implementations (TRACE's and RhuiDih/cl's scoring: first character, rouge==1.0.1,
fuzzywuzzy's rounded ratio) are registered beside knowstack's; evaluate/protocols.py says which a
task uses.

Scales: papers quote ROUGE-L, edit similarity and SARI on 0..100; knowstack keeps every score
on 0..1 (multiply by 100 to compare with TRACE's or EASSE's figures).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Sequence

from rapidfuzz import fuzz

from knowstack.data.formats import final_number, normalize_number

Metric = Callable[[Sequence[str], Sequence[str], Sequence[str]], float]
PerExample = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]
METRICS: dict[str, Metric] = {}
PER_EXAMPLE: dict[str, PerExample] = {}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def register(name: str) -> Callable[[PerExample], PerExample]:
    """Registers a per-example metric under `name`, and its mean over examples in METRICS."""
    def decorate(fn: PerExample) -> PerExample:
        PER_EXAMPLE[name] = fn
        METRICS[name] = lambda predictions, references, sources=(): _mean(fn(predictions, references, sources))
        return fn

    return decorate


@register("accuracy")
def accuracy_each(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> list[float]:
    return [float(p.strip() == r.strip()) for p, r in zip(predictions, references, strict=True)]


@register("equal")
def equal_each(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> list[float]:
    """1 where the (already read) prediction equals the (already read) reference: the paper's first-character
    accuracy once both are cut to their first character (RhuiDih/cl print_traceeval.py)."""
    return [float(p == r) for p, r in zip(predictions, references, strict=True)]


@register("exact_match")
def exact_match_each(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> list[float]:
    """TRACE's caculate_accuracy (NumGLUE): equal strings, an empty prediction or reference counting 0."""
    return [float(bool(p) and bool(r) and p == r) for p, r in zip(predictions, references, strict=True)]


# rouge-score's default tokenizer: lowercase, non-alphanumerics become spaces, split on spaces.
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = _lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@register("rouge_l")
def rouge_l_each(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> list[float]:
    return [rouge_l_f1(p, r) for p, r in zip(predictions, references, strict=True)]


def rouge_l_trace_one(prediction: str, reference: str) -> float:
    """TRACE's ROUGE-L (metrics.py, and RhuiDih/cl's print_traceeval.py): the pinned `rouge==1.0.1` package's
    summary-level ROUGE-L F (sentences split on '.', union LCS over sets of words, case kept), called as they
    call it, `get_scores(reference, prediction)`; an empty text scores 0, and so does a pair the package cannot
    score (RhuiDih/cl catches its errors: deep recursion on very long sentences, no sentence at all).

    The package itself computes it: the paper's number is defined by that code, quirks included.
    """
    from rouge import Rouge

    if prediction == "" or reference == "":
        return 0.0
    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores(reference, prediction, avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):
        return 0.0


@register("rouge_l_trace")
def rouge_l_trace_each(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> list[float]:
    return [rouge_l_trace_one(p, r) for p, r in zip(predictions, references, strict=True)]


# Py150's literal placeholders, which TRACE's scorer replaces (in both texts) before comparing.
_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def restore_literals(code: str) -> str:
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda m: m.group(2), code)


def edit_similarity_one(prediction: str, reference: str) -> float:
    prediction, reference = restore_literals(prediction.strip()), restore_literals(reference.strip())
    # TRACE counts an empty prediction as 0 (rapidfuzz alone would give two empty strings 1.0).
    return fuzz.ratio(prediction, reference) / 100 if prediction else 0.0


@register("edit_similarity")
def edit_similarity_each(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> list[float]:
    """knowstack's Py150 metric: the Levenshtein ratio of the stripped prediction and reference (rapidfuzz)."""
    return [edit_similarity_one(p, r) for p, r in zip(predictions, references, strict=True)]


def edit_similarity_trace_one(prediction: str, reference: str) -> float:
    """TRACE's / RhuiDih/cl's Py150 score of one pair: literals restored in both texts, nothing stripped, an
    empty text 0, else fuzzywuzzy's fuzz.ratio / 100. TRACE installs fuzzywuzzy without python-Levenshtein,
    so that ratio is difflib's SequenceMatcher ratio, rounded to a whole percent (equal strings: 100)."""
    prediction, reference = restore_literals(prediction), restore_literals(reference)
    if prediction == "" or reference == "":
        return 0.0
    if prediction == reference:
        return 1.0
    return int(round(100 * difflib.SequenceMatcher(None, prediction, reference).ratio())) / 100


@register("edit_similarity_trace")
def edit_similarity_trace_each(predictions: Sequence[str], references: Sequence[str],
                               sources: Sequence[str] = ()) -> list[float]:
    return [edit_similarity_trace_one(p, r) for p, r in zip(predictions, references, strict=True)]


# --- SARI (Xu et al. 2016), as in EASSE / TRACE / HF evaluate ----------------------------------------
def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _sari_ngram(source: Counter, output: Counter, refs: list[Counter], n_refs: int) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for one n-gram order (Xu et al.'s SARIngram)."""
    ref_all: Counter = Counter()
    for ref in refs:
        ref_all.update(ref)
    # Source and output n-gram counts are multiplied by the number of references, as in the original.
    src_rep = Counter({k: v * n_refs for k, v in source.items()})
    out_rep = Counter({k: v * n_refs for k, v in output.items()})

    keep_sys = src_rep & out_rep
    keep_good = keep_sys & ref_all
    keep_all = src_rep & ref_all
    keep_p = sum(keep_good[g] / keep_sys[g] for g in keep_sys) / len(keep_sys) if keep_sys else 1.0
    # Keep recall over n-gram counts, not per-type ratios: the corrected form used by EASSE/evaluate.
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1.0
    keep_f = 2 * keep_p * keep_r / (keep_p + keep_r) if keep_p + keep_r > 0 else 0.0

    del_sys = src_rep - out_rep
    del_good = del_sys - ref_all
    del_p = sum(del_good[g] / del_sys[g] for g in del_sys) / len(del_sys) if del_sys else 1.0

    add_sys = set(output) - set(source)
    add_good = add_sys & set(ref_all)
    add_all = set(ref_all) - set(source)
    add_p = len(add_good) / len(add_sys) if add_sys else 1.0
    add_r = len(add_good) / len(add_all) if add_all else 1.0
    add_f = 2 * add_p * add_r / (add_p + add_r) if add_p + add_r > 0 else 0.0
    return keep_f, del_p, add_f


# The 13a tokenization (mteval-v13a, as sacrebleu implements it) that HF evaluate's SARI applies
# after lowercasing: punctuation split off, except '.' and ',' inside numbers and '-' and "'".
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(text: str) -> list[str]:
    line = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _ENTITIES:
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def sari_tokens(text: str) -> list[str]:
    return tokenize_13a(text.lower())


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI of one output on a 0..1 scale (multiply by 100 for the usual 0..100 figures)."""
    src, out = sari_tokens(source), sari_tokens(prediction)
    refs = [sari_tokens(r) for r in references]
    keep, delete, add = [], [], []
    for n in range(1, 5):
        k, d, a = _sari_ngram(_ngrams(src, n), _ngrams(out, n), [_ngrams(r, n) for r in refs], len(refs))
        keep.append(k)
        delete.append(d)
        add.append(a)
    return (_mean(keep) + _mean(delete) + _mean(add)) / 3


@register("sari")
def sari_each(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> list[float]:
    """Sentence SARI of each example (HF evaluate's `sari`, which TRACE calls, is their mean), one reference each.

    The source is what the caller passes: TRACE passes the whole prompt, and so does knowstack.
    """
    return [sari_sentence(s, p, [r]) for p, r, s in zip(predictions, references, sources, strict=True)]


@register("number_em")
def number_em_each(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> list[float]:
    """Exact match of extracted final numbers (predictions are already extracted, '' for none)."""
    return [float(bool(p) and p == normalize_number(r)) for p, r in zip(predictions, references, strict=True)]


@register("math")
def math_final_number_each(predictions: Sequence[str], references: Sequence[str],
                           sources: Sequence[str] = ()) -> list[float]:
    """Exact match of the final number of a raw generation ('The answer is', '####', else the last number)."""
    return number_em_each([final_number(p) or "" for p in predictions], references)
