"""Answer-matching metrics: SQuAD-style normalisation, exact match and token F1, in every script.

Normalisation (:func:`normalize_answer`), as SQuAD's evaluation script with two
multilingual changes:

* Unicode NFKC first (full-width "２００６" is "2006"), then lower case;
* punctuation is every Unicode punctuation character (category P*), so Chinese
  "，。？《》" goes as ASCII punctuation does; symbols (S*) stay;
* the English articles a/an/the are dropped only for English;
* whitespace runs become one space.

Tokens for F1 (:func:`answer_tokens`): the normalised text split at whitespace,
and every character of a script written without spaces (CJK ideographs, kana,
Thai, Lao, Khmer, Myanmar, Tibetan) is a token of its own, so "沟胫天牛亚科"
has six tokens and "2006年" has "2006" and "年". Hangul is written with spaces
and is split at them. Exact match compares the token sequences, so spacing
differences inside Chinese text do not count.

Several accepted answers (a reference and its aliases, as MLaKE gives them):
:func:`best_token_f1` and :func:`best_exact_match` score a prediction against each
and keep the highest, so an alias said exactly is an exact match.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _unspaced(ch: str) -> bool:
    code = ord(ch)
    return (0x2E80 <= code <= 0x2FDF or 0x3040 <= code <= 0x30FF or 0x3100 <= code <= 0x31BF
            or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF
            or 0x20000 <= code <= 0x2FA1F or 0x0E00 <= code <= 0x0EFF or 0x1000 <= code <= 0x109F
            or 0x1780 <= code <= 0x17FF or 0x0F00 <= code <= 0x0FFF or 0x31F0 <= code <= 0x31FF
            or 0xFF66 <= code <= 0xFF9F)


def normalize_answer(text: str, language: str = "en") -> str:
    """NFKC, lower case, no punctuation, no English articles (English only), single spaces."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    if language == "en":
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str, language: str = "en") -> list[str]:
    """Tokens of the normalised answer: words, and single characters of scripts without spaces."""
    tokens: list[str] = []
    for word in normalize_answer(text, language).split():
        run = ""
        for ch in word:
            if _unspaced(ch):
                if run:
                    tokens.append(run)
                    run = ""
                tokens.append(ch)
            else:
                run += ch
        if run:
            tokens.append(run)
    return tokens


def exact_match(prediction: str, reference: str, language: str = "en") -> float:
    """1.0 when the normalised token sequences are equal, else 0.0."""
    return float(answer_tokens(prediction, language) == answer_tokens(reference, language))


def token_f1(prediction: str, reference: str, language: str = "en") -> float:
    """SQuAD's bag-of-tokens F1 of the normalised answers (both empty: 1.0; one empty: 0.0)."""
    pred, ref = answer_tokens(prediction, language), answer_tokens(reference, language)
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_exact_match(prediction: str, references: Sequence[str], language: str = "en") -> float:
    """The highest :func:`exact_match` over ``references`` (an answer and its aliases: any one counts)."""
    return max((exact_match(prediction, r, language) for r in references if r is not None), default=0.0)


def best_token_f1(prediction: str, references: Sequence[str], language: str = "en") -> float:
    """The highest :func:`token_f1` over ``references`` (an answer and its aliases, as MLaKE accepts either)."""
    return max((token_f1(prediction, r, language) for r in references if r is not None), default=0.0)
