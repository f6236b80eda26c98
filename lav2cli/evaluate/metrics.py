"""Benchmark metrics in pure Python (no torch, no numpy): VQA accuracy, COCO BLEU / CIDEr-D, MME.

Everything here follows the benchmarks' own scoring code as stated in
docs/evaluation.md; it was written from those facts, not copied.

VQA
    :func:`normalize_answer` (lower case, punctuation, articles, number words, contractions) and
    :func:`vqa_accuracy` (one reference: exact match after normalisation; several human answers:
    ``min(1, matches / 3)`` averaged over the leave-one-out subsets, as VQAv2 does).

COCO captions
    :func:`ptb_tokenize` (a pure-Python stand-in for the PTB tokenizer, see its docstring for what
    differs), :func:`bleu` (corpus BLEU-1..4 with the "closest" reference length) and
    :func:`cider_d` (CIDEr-D, reported by the COCO tools as "CIDEr"). Both take already tokenised
    captions, so given the same tokens they give the reference implementation's numbers.

MME
    :func:`parse_yes_no` (the official scorer's reading of a response) and :func:`mme_scores`
    (acc, acc+, score per subtask; perception and cognition totals).

Example::

    >>> from lav2cli.evaluate import metrics as m
    >>> m.vqa_accuracy("Two", ["2"])
    1.0
    >>> cands = {1: m.ptb_tokenize("A cat on a mat.")}
    >>> refs = {1: [m.ptb_tokenize("A cat sits on the mat."), m.ptb_tokenize("The cat is on a mat")]}
    >>> [round(b, 4) for b in m.bleu(cands, refs)]
    [0.655, 0.6342, 0.4788, 0.0001]
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping, Sequence

from lav2cli.data.records import MME_COGNITION, MME_PERCEPTION

__all__ = [
    "normalize_answer", "vqa_accuracy", "answer_type",
    "ptb_tokenize", "ngrams", "bleu", "cider_d", "CIDER_SIGMA",
    "parse_yes_no", "MMEResult", "mme_scores", "MME_PERCEPTION", "MME_COGNITION",
]

# -- VQA -------------------------------------------------------------------------------------

_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings the VQA answers often carry, mapped to the written contraction
# (a short list of the common ones; the official table is longer).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "howd": "how'd", "hows": "how's", "im": "i'm", "isnt": "isn't",
    "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's", "mightnt": "mightn't",
    "mustnt": "mustn't", "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've",
    "thats": "that's", "theres": "there's", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# Punctuation the VQA evaluation strips (apostrophes stay for contractions; periods are handled
# apart so that decimal points survive).
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!:*#%&^$~|"
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_STRAY_PERIOD = re.compile(r"\.(?!\d)|(?<!\d)\.")


def normalize_answer(text: str) -> str:
    """A short answer as the VQA evaluation compares it.

    Lower case; new lines and tabs become spaces; commas inside numbers go ("1,000" -> "1000");
    periods go except a decimal point between digits ("3.5" stays); every other punctuation mark
    is dropped where it touches a space or an end ("yes!" -> "yes") and becomes a space inside a
    word ("t-shirt" -> "t shirt"); number words zero..ten become digits; the articles a, an, the
    are dropped; apostrophe-less contractions are fixed ("dont" -> "don't"); white space collapses.

        >>> normalize_answer("The Two dogs!")
        '2 dogs'
    """
    s = text.replace("\n", " ").replace("\t", " ").strip().lower()
    s = _DIGIT_COMMA.sub("", s)
    s = _STRAY_PERIOD.sub("", s)
    out = []
    for i, ch in enumerate(s):
        if ch in _PUNCT:
            before = s[i - 1] if i > 0 else " "
            after = s[i + 1] if i + 1 < len(s) else " "
            if before.isspace() or after.isspace() or before in _PUNCT or after in _PUNCT:
                continue
            out.append(" ")
        else:
            out.append(ch)
    words = []
    for w in "".join(out).split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Accuracy of one answer against its reference answer(s), both normalised.

    One reference (easy-VQA, GQA): 1.0 on an exact match, else 0.0. Several (VQAv2's ten human
    answers): for each reference left out in turn, ``min(1, matches among the others / 3)``; the
    mean of those. With ten answers of which k equal the prediction this is
    ``(k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10``: 3 matches give 0.9, 4 or more give 1.

        >>> vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7)
        0.9
    """
    if not references:
        raise ValueError("no reference answers")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return 1.0 if pred == refs[0] else 0.0
    total = 0.0
    for i in range(len(refs)):
        matches = sum(1 for j, r in enumerate(refs) if j != i and r == pred)
        total += min(1.0, matches / 3.0)
    return total / len(refs)


def contains_answer(prediction: str, reference: str) -> bool:
    """True when the normalised reference occurs in the normalised prediction as whole words:
    "The capital of Spain is Madrid." contains "madrid". For short factual answers given in a
    sentence; lenient (an answer that names the reference and more also counts).

        >>> contains_answer("Seven plus three is ten.", "10")
        True
    """
    ref = normalize_answer(reference).split()
    words = normalize_answer(prediction).split()
    return bool(ref) and any(words[i:i + len(ref)] == ref for i in range(len(words) - len(ref) + 1))


def answer_type(reference: str) -> str:
    """VQAv2's answer types for a reference answer: "yes/no", "number" or "other"."""
    a = normalize_answer(reference)
    if a in ("yes", "no"):
        return "yes/no"
    if re.fullmatch(r"\d+(\.\d+)?", a):
        return "number"
    return "other"


# -- caption tokenisation ----------------------------------------------------------------------

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_CLITICS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})
# a word: word characters, joined by a hyphen, apostrophe, period, comma or slash between two of them
_WORD = re.compile(r"\w+(?:[-'.,/]\w+)*")


def ptb_tokenize(text: str) -> list[str]:
    """Caption -> tokens, a pure-Python approximation of the COCO tools' tokenisation.

    The reference tool runs Stanford's PTBTokenizer (lower-cased) and then drops the punctuation
    tokens ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``. This stand-in: lower case;
    clitics split off as PTB does ("don't" -> "do n't", "dog's" -> "dog 's"); a hyphen,
    apostrophe, period, comma or slash between two word characters stays inside its token
    ("black-and-white", "3.5", "1,000", "1/2"); every other non-word character separates tokens
    and is dropped.

    What differs from the PTB tokenizer: it has many more rules (abbreviations such as "e.g."
    and "u.s." keep their final period there, "cannot" -> "can not", URLs, emoticons and symbols
    such as ``&``, ``%``, ``$`` and ``#`` are kept as tokens, some non-ASCII punctuation is
    normalised). Captions are mostly plain words, so the tokens usually agree; where they do
    not, BLEU moves a little and CIDEr can move by a few points. Report numbers from this
    tokenisation as approximate.

        >>> ptb_tokenize("A black-and-white dog's ball, isn't it?")
        ['a', 'black-and-white', 'dog', "'s", 'ball', 'is', "n't", 'it']
    """
    s = _CLITIC.sub(r" \1", text.lower().replace("\u2019", "'"))
    tokens: list[str] = []
    for chunk in s.split():
        if chunk in _CLITICS:
            tokens.append(chunk)
        else:
            tokens.extend(_WORD.findall(chunk))
    return tokens


# -- n-grams, BLEU ---------------------------------------------------------------------------


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of every n-gram of length 1..n (tuples of tokens)."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i:i + k])] += 1
    return counts


# The COCO BLEU keeps every factor of the geometric mean finite and positive: each modified
# precision is (matches + 1e-15) / (candidate n-grams + 1e-9), and the length ratio is
# (candidate length + 1e-15) / (reference length + 1e-9). So a corpus without any 4-gram match
# gives a BLEU-4 of about 1e-6 ** (1/4) * ... rather than a division error, and an all-empty
# candidate set gives 0 through the brevity penalty.
_TINY = 1e-15
_SMALL = 1e-9


def _closest_length(cand_len: int, ref_lens: Iterable[int]) -> int:
    """The reference length nearest the candidate's; on a tie, the shorter one."""
    return min(ref_lens, key=lambda r: (abs(r - cand_len), r))


def bleu(candidates: Mapping[Hashable, Sequence[str]], references: Mapping[Hashable, Sequence[Sequence[str]]],
         n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised candidates (one per key) against their reference token lists.

    As the COCO caption evaluation computes it: for each image, the candidate's k-gram count
    ``max(0, len - k + 1)`` and its clipped matches (each k-gram counts at most as often as in
    the reference where it is most frequent) are summed over the corpus; the reference length
    is the one **closest** to the candidate's (ties: the shorter), summed over the corpus.
    BLEU-k = (prod_{j<=k} (matches_j + 1e-15) / (count_j + 1e-9)) ** (1/k) x BP, with
    BP = exp(1 - 1/ratio) when ratio = (cand_len + 1e-15) / (ref_len + 1e-9) < 1, else 1.
    """
    keys = _checked_keys(candidates, references)
    cand_len = ref_len = 0
    guesses = [0] * n
    matches = [0] * n
    for key in keys:
        cand = list(candidates[key])
        refs = [list(r) for r in references[key]]
        max_ref: dict[tuple, int] = {}
        for r in refs:
            for g, c in ngrams(r, n).items():
                if c > max_ref.get(g, 0):
                    max_ref[g] = c
        cand_len += len(cand)
        ref_len += _closest_length(len(cand), (len(r) for r in refs))
        for g, c in ngrams(cand, n).items():
            matches[len(g) - 1] += min(c, max_ref.get(g, 0))
        for k in range(n):
            guesses[k] += max(0, len(cand) - k)
    scores = []
    product = 1.0
    for k in range(n):
        product *= (matches[k] + _TINY) / (guesses[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (cand_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


# -- CIDEr-D ---------------------------------------------------------------------------------

CIDER_SIGMA = 6.0


def _tfidf(counts: Counter, df: Mapping[tuple, int], log_n: float, n: int) -> tuple[list[dict], list[float], int]:
    """Per n-gram length: weights count x idf, the vector norm; and the caption length.

    The COCO code measures length as the caption's number of bigrams (tokens - 1); only length
    differences enter the penalty, and they equal token-length differences except against an
    empty caption, whose vector is zero anyway, so tokens - 1 and tokens give the same score.
    """
    vecs: list[dict] = [{} for _ in range(n)]
    norms = [0.0] * n
    for g, c in counts.items():
        w = c * (log_n - math.log(max(1.0, df.get(g, 0))))
        vecs[len(g) - 1][g] = w
        norms[len(g) - 1] += w * w
    length = sum(c for g, c in counts.items() if len(g) == 2)
    return vecs, [math.sqrt(x) for x in norms], length


def cider_d(candidates: Mapping[Hashable, Sequence[str]], references: Mapping[Hashable, Sequence[Sequence[str]]],
            n: int = 4, sigma: float = CIDER_SIGMA) -> tuple[float, dict]:
    """CIDEr-D of tokenised candidates against their references: (corpus score, {key: score}).

    As the COCO caption evaluation computes it: n-gram counts for n = 1..4; the document
    frequency of an n-gram is the number of evaluated images whose reference set contains it;
    idf = log(number of images) - log(max(1, df)); a weight is count x idf. For each reference,
    per n: sum over the candidate's n-grams of min(w_cand, w_ref) x w_ref, divided by the two
    norms (left as is when a norm is 0), times exp(-(len_cand - len_ref)^2 / (2 sigma^2));
    averaged over n, then over the references, times 10. The corpus score is the mean over
    images (papers print it x100). With a single image every reference n-gram has idf 0, so the
    score is 0: CIDEr needs a corpus.
    """
    keys = _checked_keys(candidates, references)
    ref_counts = {k: [ngrams(list(r), n) for r in references[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        seen = set()
        for c in ref_counts[k]:
            seen.update(c)
        df.update(seen)
    log_n = math.log(float(len(keys))) if keys else 0.0
    per: dict = {}
    for k in keys:
        vc, nc, lc = _tfidf(ngrams(list(candidates[k]), n), df, log_n, n)
        total = 0.0
        for rc in ref_counts[k]:
            vr, nr, lr = _tfidf(rc, df, log_n, n)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            for j in range(n):
                val = sum(min(w, vr[j].get(g, 0.0)) * vr[j].get(g, 0.0) for g, w in vc[j].items())
                if nc[j] != 0 and nr[j] != 0:
                    val /= nc[j] * nr[j]
                total += val * penalty / n
        per[k] = total / len(ref_counts[k]) * 10.0
    score = sum(per.values()) / len(per) if per else 0.0
    return score, per


def _checked_keys(candidates: Mapping, references: Mapping) -> list:
    keys = list(candidates)
    for k in keys:
        if k not in references or not references[k]:
            raise ValueError(f"candidate {k!r} has no references")
    return keys


# -- MME -------------------------------------------------------------------------------------

def parse_yes_no(response: str) -> str:
    """"yes", "no" or "other", as the official MME scorer reads a response.

    Lower case; exactly "yes" or "no" is taken as is; otherwise only the first four characters
    count: "yes" if they contain "yes", else "no" if they contain "no", else "other" (wrong).

        >>> parse_yes_no("Yes, it is."), parse_yes_no("Not sure"), parse_yes_no("The answer is yes")
        ('yes', 'no', 'other')
    """
    s = response.lower()
    if s in ("yes", "no"):
        return s
    head = s[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass
class MMEResult:
    """One answered MME question: which image (``pair``) of which subtask, the truth, the answer."""

    subtask: str
    pair: str
    truth: str  # "yes" / "no" (case-insensitive)
    response: str
    category: str | None = None  # perception / cognition; None: from the subtask name
    parsed: str = field(init=False)

    def __post_init__(self) -> None:
        self.parsed = parse_yes_no(self.response)

    @property
    def correct(self) -> bool:
        return self.parsed == self.truth.strip().lower()


def mme_scores(results: Iterable[MMEResult]) -> dict:
    """Per subtask acc, acc+ and score = 100 acc + 100 acc+; perception and cognition totals.

    acc is the share of questions answered right; acc+ the share of images (pairs) with both
    questions right. Images that do not have exactly two questions break the protocol: they are
    left out of every number and counted under ``"skipped_images"`` (``"skipped_questions"``).
    Totals sum the subtasks present (perception at most 2000 over 10 subtasks, cognition at most
    800 over 4); ``"subtasks_present"`` says how many of each there were.
    """
    by_pair: dict[tuple[str, str], list[MMEResult]] = {}
    for r in results:
        by_pair.setdefault((r.subtask, r.pair), []).append(r)
    subtasks: dict[str, dict] = {}
    skipped_images = skipped_questions = 0
    for (subtask, _), rows in by_pair.items():
        if len(rows) != 2:
            skipped_images += 1
            skipped_questions += len(rows)
            continue
        s = subtasks.setdefault(subtask, {"category": _category(rows[0]), "questions": 0, "right": 0,
                                          "images": 0, "both_right": 0})
        s["questions"] += 2
        s["right"] += sum(r.correct for r in rows)
        s["images"] += 1
        s["both_right"] += int(all(r.correct for r in rows))
        s["other"] = s.get("other", 0) + sum(r.parsed == "other" for r in rows)
    table = {}
    totals = {"perception": 0.0, "cognition": 0.0}
    present = {"perception": 0, "cognition": 0}
    for name in sorted(subtasks, key=_subtask_order):
        s = subtasks[name]
        acc = s["right"] / s["questions"]
        acc_plus = s["both_right"] / s["images"]
        score = 100.0 * acc + 100.0 * acc_plus
        table[name] = {"category": s["category"], "questions": s["questions"], "images": s["images"],
                       "acc": acc, "acc_plus": acc_plus, "score": score, "unparsed": s.get("other", 0)}
        totals[s["category"]] += score
        present[s["category"]] += 1
    return {"perception": totals["perception"], "cognition": totals["cognition"],
            "subtasks_present": present, "subtasks": table,
            "skipped_images": skipped_images, "skipped_questions": skipped_questions}


def _category(r: MMEResult) -> str:
    if r.category in ("perception", "cognition"):
        return r.category
    return "cognition" if r.subtask in MME_COGNITION else "perception"


def _subtask_order(name: str) -> tuple[int, str]:
    order = MME_PERCEPTION + MME_COGNITION
    return (order.index(name), "") if name in order else (len(order), name)
