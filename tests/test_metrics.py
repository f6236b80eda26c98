"""lav2cli.evaluate.metrics against hand-computed cases: every expected number below is worked
out from the protocol (docs/evaluation.md and the COCO tools' arithmetic), not from the code."""

from __future__ import annotations

import math

import pytest

from lav2cli.evaluate import metrics as M

T, S = 1e-15, 1e-9  # the COCO BLEU's epsilons: (matches + 1e-15) / (guesses + 1e-9)
L2 = math.log(2)


def tok(s: str) -> list[str]:
    return s.split()


# -- BLEU ------------------------------------------------------------------------------------


def test_bleu_one_reference_repeated_ngrams_are_clipped():
    # candidate "the cat the cat the cat" (6) vs reference "the cat sat on the mat" (6)
    # 1-grams: the x3 (ref has 2) + cat x3 (ref 1) -> 2 + 1 = 3 of 6
    # 2-grams: "the cat" x3 (ref 1), "cat the" x2 (ref 0) -> 1 of 5
    # 3-grams: "the cat the" x2, "cat the cat" x2 -> 0 of 4;  4-grams: 0 of 3
    # equal lengths, but the epsilons make the ratio (6 + 1e-15) / (6 + 1e-9) a hair below 1
    bp = math.exp(1 - (6 + S) / (6 + T))
    p = [(3 + T) / (6 + S), (1 + T) / (5 + S), T / (4 + S), T / (3 + S)]
    want = [(p[0]) * bp, (p[0] * p[1]) ** (1 / 2) * bp, (p[0] * p[1] * p[2]) ** (1 / 3) * bp,
            (p[0] * p[1] * p[2] * p[3]) ** (1 / 4) * bp]
    got = M.bleu({"img": tok("the cat the cat the cat")}, {"img": [tok("the cat sat on the mat")]})
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(0.5, abs=1e-6) and got[1] == pytest.approx(math.sqrt(0.1), abs=1e-6)


def test_bleu_empty_candidate():
    # alone: no n-grams (precisions 1e-15 / 1e-9 = 1e-6) and a length ratio of ~1e-15 / 2:
    # the brevity penalty exp(1 - 2e15) is 0, so every BLEU is 0
    assert M.bleu({1: []}, {1: [tok("a dog")]}) == [0.0, 0.0, 0.0, 0.0]
    # beside an exact match "a dog runs": lengths 3 vs 3 + 2 (closest to 0 among [2]);
    # guesses 3, 2, 1, 0 all matched; BLEU-4's last factor is (0 + 1e-15) / (0 + 1e-9) = 1e-6
    bp = math.exp(1 - (5 + S) / (3 + T))
    p = [(3 + T) / (3 + S), (2 + T) / (2 + S), (1 + T) / (1 + S), T / S]
    want = [p[0] * bp, (p[0] * p[1]) ** 0.5 * bp, (p[0] * p[1] * p[2]) ** (1 / 3) * bp,
            (p[0] * p[1] * p[2] * p[3]) ** 0.25 * bp]
    got = M.bleu({1: tok("a dog runs"), 2: []}, {1: [tok("a dog runs")], 2: [tok("a cat")]})
    assert got == pytest.approx(want, abs=1e-12)
    assert got[3] == pytest.approx(1e-6 ** 0.25 * math.exp(-2 / 3), abs=1e-9)


def test_bleu_five_references_closest_length_and_max_counts():
    cand = tok("a man rides a horse")  # 5 tokens
    refs = [tok("a man riding horse"),  # 4
            tok("a man rides a brown horse"),  # 6
            tok("a person rides a horse on the beach"),  # 8
            tok("man on a horse"),  # 4
            tok("horse")]  # 1
    # closest reference length: 4 and 6 are both 1 away -> the shorter, 4; ratio 5/4 > 1: no penalty
    # 1-grams: a x2 (max over refs 2), man, rides, horse -> 5 of 5
    # 2-grams: a man, man rides, rides a, a horse -> all in some reference: 4 of 4
    # 3-grams: a man rides (r2), man rides a (r2), rides a horse (r3) -> 3 of 3
    # 4-grams: a man rides a (r2); man rides a horse (none) -> 1 of 2
    p = [(5 + T) / (5 + S), (4 + T) / (4 + S), (3 + T) / (3 + S), (1 + T) / (2 + S)]
    want = [p[0], (p[0] * p[1]) ** 0.5, (p[0] * p[1] * p[2]) ** (1 / 3), (p[0] * p[1] * p[2] * p[3]) ** 0.25]
    got = M.bleu({0: cand}, {0: refs})
    assert got == pytest.approx(want, abs=1e-12)
    assert got[3] == pytest.approx(0.5 ** 0.25, abs=1e-6)
    # had the tie gone to 6, the brevity penalty exp(1 - 6/5) would apply
    assert got[0] > math.exp(1 - 6 / 5)


# -- CIDEr-D ---------------------------------------------------------------------------------


def test_cider_d_identical_short_captions():
    # 2 images, refs "a cat" / "a dog": idf(a) = log 2 - log 2 = 0, everything else log 2.
    # 1-grams and 2-grams match exactly (cosine 1), 3- and 4-grams are empty (0):
    # per image 10 * (1 + 1 + 0 + 0) / 4 = 5
    score, per = M.cider_d({1: tok("a cat"), 2: tok("a dog")}, {1: [tok("a cat")], 2: [tok("a dog")]})
    assert per == pytest.approx({1: 5.0, 2: 5.0}, abs=1e-9) and score == pytest.approx(5.0, abs=1e-9)


def test_cider_d_clipping_penalty_and_two_references():
    # image 1: candidate "a cat a cat", references "a cat" and "the cat sat"; image 2 as above.
    # df over the images' reference sets: "a" in both (idf 0), all other n-grams in one (idf L = log 2)
    # candidate weights: cat 2L; "a cat" 2L, "cat a" L; "a cat a" L, "cat a cat" L; "a cat a cat" L
    #   norms: 1-gram 2L, 2-gram sqrt(5) L, 3-gram sqrt(2) L, 4-gram L; length 3 bigrams (4 tokens)
    # vs "a cat" (cat L, "a cat" L; 1 bigram): clipped 1-gram min(2L, L) * L / (2L * L) = 1/2,
    #   2-gram min(2L, L) * L / (sqrt(5) L * L) = 1/sqrt(5), no 3/4-grams; penalty exp(-(3-1)^2 / 72)
    # vs "the cat sat" (the, cat, sat L each; "the cat", "cat sat" L; "the cat sat" L; 2 bigrams):
    #   1-gram L^2 / (2L * sqrt(3) L) = 1 / (2 sqrt 3); nothing else shared; penalty exp(-1/72)
    r1 = (0.5 + 1 / math.sqrt(5)) * math.exp(-4 / 72)
    r2 = 1 / (2 * math.sqrt(3)) * math.exp(-1 / 72)
    img1 = 10 * (r1 / 4 + r2 / 4) / 2
    score, per = M.cider_d({1: tok("a cat a cat"), 2: tok("a dog")},
                           {1: [tok("a cat"), tok("the cat sat")], 2: [tok("a dog")]})
    assert per[1] == pytest.approx(img1, abs=1e-9)
    assert per[2] == pytest.approx(5.0, abs=1e-9)
    assert score == pytest.approx((img1 + 5.0) / 2, abs=1e-9)


def test_cider_d_five_references():
    # image 1: candidate "a cat"; references "a cat", "the cat", "cat", "a cat", "a big cat".
    # candidate: cat L, "a cat" L (norms L, L), 1 bigram.
    #   "a cat": cosine 1 + 1                                 -> 2
    #   "the cat": 1-gram L^2 / (L * sqrt(2) L), 1 bigram     -> 1/sqrt(2)
    #   "cat": 1-gram 1, no bigram, length 0 -> exp(-1/72)    -> exp(-1/72)
    #   "a big cat": 1-gram 1/sqrt(2), 2 bigrams              -> exp(-1/72)/sqrt(2)
    # image 1 = 10 * (sum / 4) / 5; image 2 ("a dog" vs "a dog") = 5
    e = math.exp(-1 / 72)
    img1 = 10 * ((2 + 1 / math.sqrt(2) + e + 2 + e / math.sqrt(2)) / 4) / 5
    refs1 = [tok(s) for s in ("a cat", "the cat", "cat", "a cat", "a big cat")]
    score, per = M.cider_d({1: tok("a cat"), 2: tok("a dog")}, {1: refs1, 2: [tok("a dog")]})
    assert per[1] == pytest.approx(img1, abs=1e-9)
    assert score == pytest.approx((img1 + 5) / 2, abs=1e-9)


def test_cider_d_empty_candidate_and_single_image():
    score, per = M.cider_d({1: [], 2: tok("a dog")}, {1: [tok("a cat")], 2: [tok("a dog")]})
    assert per[1] == 0.0 and per[2] == pytest.approx(5.0) and score == pytest.approx(2.5)
    # one image: idf of every reference n-gram is log 1 - log 1 = 0, so CIDEr is 0
    assert M.cider_d({1: tok("a cat")}, {1: [tok("a cat")]})[0] == 0.0


def test_caption_metrics_need_references():
    with pytest.raises(ValueError, match="no references"):
        M.bleu({1: tok("a")}, {1: []})


def test_ptb_like_tokenisation():
    assert M.ptb_tokenize("A man, riding a horse.") == ["a", "man", "riding", "a", "horse"]
    assert M.ptb_tokenize("Two dogs' toys -- don't touch!") == ["two", "dogs", "toys", "do", "n't", "touch"]
    assert M.ptb_tokenize("A 3.5 m black-and-white (old) bus") == ["a", "3.5", "m", "black-and-white", "old", "bus"]
    assert M.ptb_tokenize("") == []


# -- VQA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, norm", [
    ("Yes", "yes"), ("yes.", "yes"), ("  The  Dog ", "dog"), ("an apple", "apple"), ("Two", "2"),
    ("ten", "10"), ("3.5", "3.5"), ("1,000", "1000"), ("t-shirt", "t shirt"), ("red!", "red"),
    ("dont know", "don't know"), ("Isnt", "isn't"), ("a\tcat\n", "cat"), ("(left)", "left"),
])
def test_vqa_normalisation(raw, norm):
    assert M.normalize_answer(raw) == norm


def test_vqa_accuracy_single_and_ten_answers():
    assert M.vqa_accuracy("The Circle.", ["circle"]) == 1.0
    assert M.vqa_accuracy("square", ["circle"]) == 0.0
    # ten answers, k of them equal to the prediction:
    # leave-one-out mean = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        refs = ["two"] * k + ["3"] * (10 - k)
        assert M.vqa_accuracy("2", refs) == pytest.approx(want), k
    assert M.answer_type("Two") == "number" and M.answer_type("No") == "yes/no" and M.answer_type("red") == "other"


# -- MME -------------------------------------------------------------------------------------


@pytest.mark.parametrize("response, parsed", [
    ("Yes", "yes"), ("no", "no"), ("YES.", "yes"), ("No, it is not.", "no"), ("Not sure", "no"),
    ("The answer is yes", "other"), ("yesterday", "yes"), ("", "other"), ("Nope", "no"), (" yes", "yes"),
    ("I think no", "other"),
])
def test_mme_parsing(response, parsed):
    assert M.parse_yes_no(response) == parsed


def test_mme_scores_on_a_constructed_set():
    R = M.MMEResult
    results = [
        # existence: 3 images; img1 both right, img2 one right, img3 both right -> acc 5/6, acc+ 2/3
        R("existence", "e1", "Yes", "Yes"), R("existence", "e1", "No", "no"),
        R("existence", "e2", "Yes", "No"), R("existence", "e2", "No", "No"),
        R("existence", "e3", "Yes", "yes, there is"), R("existence", "e3", "No", "Not at all"),
        # OCR: 2 images; "The answer is yes" parses as other (wrong) -> acc 3/4, acc+ 1/2
        R("OCR", "o1", "Yes", "The answer is yes"), R("OCR", "o1", "No", "no"),
        R("OCR", "o2", "Yes", "Yes"), R("OCR", "o2", "No", "No"),
        # code_reasoning (cognition): 1 image, both wrong -> 0, 0
        R("code_reasoning", "c1", "Yes", "no"), R("code_reasoning", "c1", "No", "yes"),
        # an image with three questions breaks the protocol: left out and counted
        R("color", "x", "Yes", "yes"), R("color", "x", "No", "no"), R("color", "x", "No", "no"),
    ]
    out = M.mme_scores(results)
    ex, ocr, code = out["subtasks"]["existence"], out["subtasks"]["OCR"], out["subtasks"]["code_reasoning"]
    assert ex["acc"] == pytest.approx(5 / 6) and ex["acc_plus"] == pytest.approx(2 / 3)
    assert ex["score"] == pytest.approx(100 * 5 / 6 + 100 * 2 / 3)
    assert ocr["acc"] == 0.75 and ocr["acc_plus"] == 0.5 and ocr["score"] == pytest.approx(125.0)
    assert ocr["unparsed"] == 1
    assert code["category"] == "cognition" and code["score"] == 0.0
    assert out["perception"] == pytest.approx(ex["score"] + ocr["score"])
    assert out["cognition"] == 0.0
    assert out["subtasks_present"] == {"perception": 2, "cognition": 1}
    assert out["skipped_images"] == 1 and out["skipped_questions"] == 3 and "color" not in out["subtasks"]
    assert list(out["subtasks"]) == ["existence", "OCR", "code_reasoning"]  # the paper's order


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The capital of Spain is Madrid.", "Madrid", True),
    ("Madrid", "madrid", True),
    ("Seven plus three is ten.", "10", True),  # number words normalised as in VQA
    ("It is 42.", "4", False),  # whole words only
    ("The opposite of up is down", "down", True),
    ("New York City", "York City", True),  # a multi-word answer inside a longer one
    ("I do not know", "Madrid", False),
    ("", "blue", False),
])
def test_contains_answer(prediction, reference, expected):
    assert M.contains_answer(prediction, reference) is expected
