"""New-knowledge metrics, one small registered function each, all on a 0..1 scale.

TRACE's metrics: accuracy for classification and multiple choice, ROUGE-L for summarization,
edit similarity for code completion, SARI for simplification; exact match of the final number
for math. Every metric is `(predictions, references, sources) -> float`, the mean over examples;
`sources` (the prompts) only matter to SARI.

Scales: papers quote ROUGE-L, edit similarity and SARI on 0..100; knowstack keeps every score
on 0..1 (multiply by 100 to compare with TRACE's or EASSE's figures).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

from rapidfuzz import fuzz

from knowstack.data.formats import final_number, normalize_number

Metric = Callable[[Sequence[str], Sequence[str], Sequence[str]], float]
METRICS: dict[str, Metric] = {}


def register(name: str) -> Callable[[Metric], Metric]:
    def decorate(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn

    return decorate


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@register("accuracy")
def accuracy(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
    return _mean([float(p.strip() == r.strip()) for p, r in zip(predictions, references, strict=True)])


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
def rouge_l(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
    return _mean([rouge_l_f1(p, r) for p, r in zip(predictions, references, strict=True)])


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
def edit_similarity(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
    """TRACE's Py150 metric: the Levenshtein ratio of prediction and reference (fuzz.ratio / 100)."""
    return _mean([edit_similarity_one(p, r) for p, r in zip(predictions, references, strict=True)])


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
def sari(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
    """Sentence SARI averaged over examples (HF evaluate's `sari`, which TRACE calls), one reference each.

    The source is what the caller passes: TRACE passes the whole prompt, and so does knowstack.
    """
    return _mean([sari_sentence(s, p, [r]) for p, r, s in zip(predictions, references, sources, strict=True)])


@register("number_em")
def number_em(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
    """Exact match of extracted final numbers (predictions are already extracted, '' for none)."""
    return _mean([float(bool(p) and p == normalize_number(r)) for p, r in zip(predictions, references, strict=True)])


@register("math")
def math_final_number(predictions: Sequence[str], references: Sequence[str], sources: Sequence[str] = ()) -> float:
    """Exact match of the final number of a raw generation ('The answer is', '####', else the last number)."""
    extracted = [final_number(p) or "" for p in predictions]
    return number_em(extracted, references)
