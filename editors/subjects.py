"""Which tokens an activation patch changes: subject token variants and the matcher that finds them.

An :class:`~editors.edit.ActivationPatch` (the LU-LAFNs cache, lu-lafns Eq. 11:
the cache is used only when the query contains a subject of S_G) adds
its delta at the last token of every occurrence of one of its subjects in the
model's input, and nowhere else. Detection works on token ids, not on text:

* Token variants of a subject ``s`` (special tokens dropped, the tokens whose
  character span overlaps ``s``): ``s`` tokenised alone; ``" " + s`` (the
  leading-space token of GPT-2/Llama-3 style tokenizers, "▁" of SentencePiece);
  and ``s`` as tokenised inside each of the patch's ``contexts`` (the request's
  prompts, paraphrases and portability questions: a tokenizer that merges the
  subject with its neighbours, e.g. byte-level BPE on Chinese, is then still
  matched on the edit's own texts). :func:`subject_token_variants`.
* ``match="exact"``: those variants of the subjects as given.
  ``match="normalized"``: also the variants of these forms of the subject (the
  same transform applied to the subject and to each context): Unicode NFKC;
  NFKC with runs of whitespace collapsed to one space and the ends stripped;
  that, lower-cased; upper-cased; title-cased (``str.title``); with its first
  letter upper-cased. It does not match other mixed case or other internal
  spacing in the input (detection is on token ids).
* :class:`SubjectMatcher` finds the last token of every occurrence of the
  variants of many subject sets in a batch of ids at once.
* ``match="fuzzy"`` (lu-lafns §3.3 names fuzzy matching as future work): the
  exact variants, and also every span of the input's *text* that
  :func:`fuzzy_subject_spans` matches with a score of at least the patch's
  ``match_threshold`` (0-100). The ids of each row are decoded (special and
  padding tokens dropped) and re-encoded with offsets, so a matched character
  span maps back to its tokens; the last token overlapping the span is patched
  (:class:`FuzzySubjectMatcher`). Text comparison, :func:`fold_text`: per
  character NFKC, case folding, transliteration to Latin with ``anyascii``
  (which also strips accents: Latin, Cyrillic, Greek, Arabic, CJK as pinyin,
  kana, Thai...), combining marks of a non-zero combining class (accents,
  Arabic and Hebrew vowel points) dropped, letters and digits kept. Scoring
  (:func:`fuzzy_subject_spans`) uses rapidfuzz's ``token_sort_ratio`` on word
  windows, so word order within the name does not count; a proper prefix or
  suffix of the subject's words (a surname, "Einstein" for "Albert Einstein")
  counts too when it holds at least :data:`MIN_PART_CHARS` letters and
  :data:`MIN_PART_SHARE` of the subject's and scores :data:`MIN_PART_SCORE`;
  letters of scripts written without spaces (Chinese, Japanese, Thai...) are
  compared one character at a time, each as a whole; a subject shorter than
  :data:`MIN_PART_CHARS` letters matches only when equal after folding.

How the matches are used during a forward call (the embedding pre-hook, padded
batches, key/value caches, ``inputs_embeds``) is :mod:`editors.apply`.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from numbers import Real
from typing import Any, Callable, Iterable, Sequence

import torch
from anyascii import anyascii
from rapidfuzz import fuzz, process

from analysis.errors import InputError

MATCH_MODES = ("exact", "normalized", "fuzzy")

#: The default ``match_threshold`` of ``match="fuzzy"`` (rapidfuzz score, 0-100), chosen by
#: bench/fuzzy_subjects.py on MzsRE dev records 100-149 (README "Fuzzy subject matching").
DEFAULT_MATCH_THRESHOLD = 65.0
#: A part of a subject (a prefix or suffix of its words) counts only with this many letters...
MIN_PART_CHARS = 4
#: ...and at least this share of the subject's letters (after :func:`fold_text`)...
MIN_PART_SHARE = 0.4
#: ...and only from this score on (or the threshold, if higher): a part of a name must be spelled nearly right.
MIN_PART_SCORE = 90.0


def check_match(match: Any) -> str:
    """``match`` if it is one of :data:`MATCH_MODES`; InputError otherwise."""
    if match not in MATCH_MODES:
        raise InputError(f"Unknown subject match {match!r}; use one of: {', '.join(MATCH_MODES)}.")
    return match


def check_match_threshold(threshold: Any) -> float:
    """``threshold`` as a float if it is a number in [0, 100]; InputError otherwise."""
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 <= float(threshold) <= 100:
        raise InputError(f"The subject match threshold must be a number from 0 to 100 (a rapidfuzz score), "
                         f"got {threshold!r}.")
    return float(threshold)


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _spaced(text: str) -> str:
    return " ".join(_nfkc(text).split())


def _capitalized(text: str) -> str:
    text = _spaced(text)
    return text[:1].upper() + text[1:]


#: The text transforms of ``match="normalized"`` (applied to a subject and to its contexts alike).
NORMALIZED_FORMS: tuple[Callable[[str], str], ...] = (
    lambda t: t, _nfkc, _spaced, lambda t: _spaced(t).lower(), lambda t: _spaced(t).upper(),
    lambda t: _spaced(t).title(), _capitalized,
)


def _span_ids(tokenizer: Any, text: str, start: int, end: int, special: set[int]) -> tuple[int, ...]:
    """Ids of the tokens of ``text`` whose character span overlaps ``[start, end)``, special tokens dropped."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return tuple(int(i) for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
                 if s < end and e > start and int(i) not in special)


def _occurrence_ids(tokenizer: Any, text: str, subject: str, special: set[int]) -> list[tuple[int, ...]]:
    out, start = [], text.find(subject)
    while start >= 0 and subject:
        out.append(_span_ids(tokenizer, text, start, start + len(subject), special))
        start = text.find(subject, start + 1)
    return out


def subject_token_variants(tokenizer: Any, subjects: Iterable[str], contexts: Iterable[str] = (),
                           match: str = "exact") -> list[tuple[int, ...]]:
    """Every token-id sequence that counts as an occurrence of one of ``subjects`` (module docstring).

    Sorted by length then ids; empty sequences dropped. Slow (Python)
    tokenizers give only the ids of ``s`` and ``" " + s`` (no offsets).
    """
    check_match(match)
    forms = NORMALIZED_FORMS if match == "normalized" else NORMALIZED_FORMS[:1]
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    subjects, contexts = list(subjects), list(contexts)
    fast = bool(getattr(tokenizer, "is_fast", False))
    variants: set[tuple[int, ...]] = set()
    for subject in subjects:
        for form in forms:
            s = form(subject)
            if not s.strip():
                continue
            for text in (s, " " + s):
                if fast:
                    variants.update(_occurrence_ids(tokenizer, text, s, special))
                else:
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                    variants.add(tuple(int(i) for i in ids if int(i) not in special))
            if fast:
                for context in contexts:
                    variants.update(_occurrence_ids(tokenizer, form(context), s, special))
    return sorted((v for v in variants if v), key=lambda v: (len(v), v))


class SubjectMatcher:
    """Finds the last token of every occurrence of token-id sequences in a batch of ids, for many groups at once.

    ``groups[g]`` is the list of token variants of one subject set (one per
    distinct set of patched subjects). One pass per variant length: the
    positions whose token ends some variant are found with ``torch.isin``, and
    only those windows are compared exactly, so the cost stays small with
    thousands of variants (many composed edits).
    """

    _CHUNK = 1 << 22  # compared values per block of candidate windows

    def __init__(self, groups: Sequence[Sequence[tuple[int, ...]]]):
        owners: dict[tuple[int, ...], set[int]] = {}
        for g, variants in enumerate(groups):
            for v in variants:
                if v:
                    owners.setdefault(tuple(int(i) for i in v), set()).add(g)
        self.n_groups = len(groups)
        # per length k: variants [n, k], and their groups as a flat list with each variant's start and count
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for k in sorted({len(v) for v in owners}):
            variants = sorted(v for v in owners if len(v) == k)
            lists = [sorted(owners[v]) for v in variants]
            counts = torch.tensor([len(gs) for gs in lists], dtype=torch.long)
            flat = torch.tensor([g for gs in lists for g in gs], dtype=torch.long)
            self._tables[k] = (torch.tensor(variants, dtype=torch.long), flat, counts.cumsum(0) - counts, counts)

    def positions(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{group: (rows, cols)}`` of the last tokens of its occurrences in ``input_ids`` [B, T] (sorted,
        each position once); groups without an occurrence are absent."""
        ids = input_ids if input_ids.ndim == 2 else input_ids.reshape(1, -1)
        B, T = ids.shape
        keys = []  # (group * B + row) * T + col of every hit
        for k, tables in self._tables.items():
            if k > T:
                continue
            table, flat, first, count = (t.to(ids.device) for t in tables)
            ends = torch.isin(ids[:, k - 1:], table[:, -1])       # windows [j, j+k) whose last token may match
            if not bool(ends.any()):
                continue
            rows, starts = ends.nonzero(as_tuple=True)
            windows = ids.unfold(1, k, 1)[rows, starts]           # [P, k] candidate windows
            step = max(1, self._CHUNK // max(1, table.numel()))
            for a in range(0, rows.numel(), step):
                hit, variant = (windows[a:a + step, None, :] == table[None]).all(-1).nonzero(as_tuple=True)
                n = count[variant]                                # each matching variant -> its groups
                hit = hit.repeat_interleave(n) + a
                offset = torch.arange(int(n.sum()), device=ids.device) - (n.cumsum(0) - n).repeat_interleave(n)
                group = flat[first[variant].repeat_interleave(n) + offset]
                keys.append((group * B + rows[hit]) * T + starts[hit] + (k - 1))
        if not keys:
            return {}
        keys = torch.cat(keys).unique()  # sorted: by group, then row, then column
        groups, rest = keys // (B * T), keys % (B * T)
        values, counts = torch.unique_consecutive(groups, return_counts=True)
        return {int(g): (part // T, part % T) for g, part in zip(values.tolist(), rest.split(counts.tolist()))}

    def last_token_mask(self, input_ids: torch.Tensor, group: int = 0) -> torch.Tensor:
        """Bool ``[B, T]``: True at the last token of each occurrence of ``group``'s variants."""
        ids = input_ids if input_ids.ndim == 2 else input_ids.reshape(1, -1)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        hits = self.positions(ids).get(group)
        if hits is not None:
            mask[hits] = True
        return mask


# ================================================================== fuzzy matching (match="fuzzy")

#: Unicode name prefixes of scripts written without spaces between words: each of their letters is one unit.
_UNSPACED_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "BOPOMOFO", "IDEOGRAPHIC", "THAI", "LAO", "KHMER", "MYANMAR",
                     "TIBETAN")


@lru_cache(maxsize=1 << 16)
def _fold_char(char: str) -> tuple[str, str]:
    """``(folded, kind)`` of one character (:func:`fold_text`).

    ``kind``: ``"word"`` (letter or digit of a script written with spaces), ``"unit"`` (letter of a
    script written without spaces: one unit on its own), ``"mark"`` (joins the unit before it), or
    ``"gap"`` (space, punctuation, symbol: ends a word).
    """
    nfkc = unicodedata.normalize("NFKC", char)
    category = unicodedata.category(nfkc[:1] or char)
    if category.startswith("M"):
        if unicodedata.combining(char):  # accents, Arabic and Hebrew vowel points, tone marks: optional, dropped
            return "", "mark"
        kind = "mark"  # a vowel sign of Thai or an Indic script: part of the word's spelling
    elif category[0] in "LN":
        kind = "unit" if unicodedata.name(nfkc[0], "").startswith(_UNSPACED_SCRIPTS) else "word"
    else:
        return "", "gap"
    # anyascii drops accents itself ("é" -> "e", a lone U+0301 -> ""); decomposing first (NFKD) would also
    # drop the voicing marks of kana ("パ" would read "ha")
    return "".join(c for c in anyascii(nfkc.casefold()).lower() if c.isalnum()), kind


def fold_text(text: str) -> str:
    """``text`` as :func:`fuzzy_subject_spans` compares it: per character NFKC, case-folded,
    transliterated to Latin without accents (anyascii), letters and digits only; words joined by one space
    (letters of scripts written without spaces, e.g. Chinese, run together)."""
    return _joined(_units(text))


@dataclass
class _Unit:
    """A word (or one letter of a script written without spaces) of a text: folded, and its span in the text."""

    folded: str
    start: int
    end: int
    unspaced: bool


def _units(text: str) -> list[_Unit]:
    units: list[_Unit] = []
    current: _Unit | None = None
    for i, char in enumerate(text):
        folded, kind = _fold_char(char)
        if kind == "mark":
            if current is not None:
                current.folded, current.end = current.folded + folded, i + 1
            continue
        if kind == "word" and current is not None and not current.unspaced:
            current.folded, current.end = current.folded + folded, i + 1
            continue
        current = None
        if kind in ("word", "unit"):
            current = _Unit(folded, i, i + 1, kind == "unit")
            units.append(current)
    return [u for u in units if u.folded]


def _joined(units: Sequence[_Unit], compared: bool = False) -> str:
    """The units as one string: words apart, letters of unspaced scripts together. ``compared``: each
    unspaced letter as one symbol (:func:`_symbol`), the string that is scored."""
    out = []
    for k, unit in enumerate(units):
        if k and not (unit.unspaced and units[k - 1].unspaced):
            out.append(" ")
        out.append(_symbol(unit.folded) if compared and unit.unspaced else unit.folded)
    return "".join(out)


_SYMBOLS: dict[str, str] = {}


def _symbol(folded: str) -> str:
    """One private-use character per transliterated letter of an unspaced script (pinyin syllable, Thai letter).

    Scores then compare such letters as wholes: "巴黎" (ba li) and "哪里" (na li) differ in one of two
    letters (50), not in one of four Latin letters (75); a traditional and a simplified character with the
    same reading are still the same symbol.
    """
    symbol = _SYMBOLS.get(folded)
    if symbol is None:
        symbol = _SYMBOLS.setdefault(folded, chr(0xF0000 + len(_SYMBOLS) % 0xFFFE))
    return symbol


@lru_cache(maxsize=1 << 12)
def _subject_forms(subject: str) -> tuple[tuple[str, int, bool, tuple[int, ...]], ...]:
    """``(compared form, letters, whole subject?, window sizes in units)`` of the forms of ``subject`` that count.

    The whole subject, compared with windows of one unit fewer to one more (a dropped or inserted word);
    and each proper prefix and suffix of its units (a first name, a surname, the head of a name) with at
    least :data:`MIN_PART_CHARS` letters and :data:`MIN_PART_SHARE` of the subject's, compared with
    windows of its own size. Letters are those of the compared string (a Chinese character is one).
    """
    units = _units(subject)
    if not units:
        return ()
    n = len(units)

    def letters(part: Sequence[_Unit]) -> int:
        return sum(1 if u.unspaced else len(u.folded) for u in part)

    total = letters(units)
    forms = [(_joined(units, True), total, True, tuple(k for k in (n - 1, n, n + 1) if k >= 1))]
    for k in range(1, n):
        for part in (units[:k], units[n - k:]):
            if letters(part) >= MIN_PART_CHARS and letters(part) >= MIN_PART_SHARE * total:
                forms.append((_joined(part, True), letters(part), False, (k,)))
    return tuple(dict.fromkeys(forms))


def fuzzy_subject_spans(text: str, subjects: Iterable[str],
                        threshold: float = DEFAULT_MATCH_THRESHOLD) -> list[tuple[int, int, float]]:
    """The spans of ``text`` that match one of ``subjects`` fuzzily: ``[(start, end, score)]``, sorted, disjoint.

    Both sides are folded (:func:`fold_text`: case, accents, script) and cut into units (words; single
    letters for scripts written without spaces, each compared as one symbol: :func:`_symbol`). Each form
    of each subject (the whole subject, and a prefix or suffix of its words long enough to name it:
    :func:`_subject_forms`) is scored against every window of consecutive units of ``text`` with
    ``rapidfuzz.fuzz.token_sort_ratio`` (0-100; the words are sorted first, so word order within the
    name does not count; letters of unspaced scripts stay in order, so "黎巴" is not "巴黎"), through
    ``rapidfuzz.process.extract``. The whole subject counts from ``threshold`` on; a part (a surname
    alone) from ``max(threshold, MIN_PART_SCORE)``, so it must be spelled (nearly) right: "Bert" is not
    "Albert", "Francesco" not "France". A form with fewer than :data:`MIN_PART_CHARS` letters counts only
    at 100 (equal after folding), so "a" or "UN" never match by similarity. Overlapping hits keep the best one: the
    higher score (so "Eiffel" alone, 100, beats "the Eiffel" as the whole "Eiffel Tower", whose last word
    would be misplaced), then the whole subject over a part, then the longer part, then the shorter
    window; adjacent hits of one subject are one span ("Amas des" + "Papillons" for "Amas de papillons").
    ``start``/``end`` are character offsets into ``text``; the score of a merged span is its best.
    """
    threshold = check_match_threshold(threshold)
    units = _units(text)
    if not units:
        return []
    windows: dict[int, list[str]] = {}
    hits: list[tuple[bool, float, int, int, int, int]] = []  # whole?, score, letters, size, first unit, subject
    for number, subject in enumerate(dict.fromkeys(subjects)):
        if not isinstance(subject, str):
            continue
        for form, letters, whole, sizes in _subject_forms(subject):
            cutoff = 100.0 if letters < MIN_PART_CHARS else threshold if whole else max(threshold, MIN_PART_SCORE)
            for size in sizes:
                if size > len(units):
                    continue
                if size not in windows:
                    windows[size] = [_joined(units[i:i + size], True) for i in range(len(units) - size + 1)]
                for _, score, i in process.extract(form, windows[size], scorer=fuzz.token_sort_ratio,
                                                   score_cutoff=cutoff, limit=None):
                    hits.append((whole, float(score), letters, size, i, number))
    taken = [False] * len(units)
    kept: list[list] = []  # [first unit, last unit, score, subject]
    for _, score, _, size, i, number in sorted(hits, key=lambda h: (-h[1], not h[0], -h[2], h[3], h[4])):
        if any(taken[i:i + size]):
            continue
        taken[i:i + size] = [True] * size
        kept.append([i, i + size - 1, score, number])
    merged: list[list] = []
    for hit in sorted(kept):
        if merged and merged[-1][3] == hit[3] and merged[-1][1] + 1 == hit[0]:
            merged[-1][1], merged[-1][2] = hit[1], max(merged[-1][2], hit[2])
        else:
            merged.append(hit)
    return [(units[a].start, units[b].end, round(score, 2)) for a, b, score, _ in merged]


def token_char_spans(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` and each token's ``(start, end)`` in it.

    Decoded once and re-encoded with offsets (a fast tokenizer that gives the same ids back); otherwise
    each token ends where the decoded prefix ending with it ends (quadratic, for the rare ids a tokenizer
    would not produce itself, and for slow tokenizers).
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if [int(i) for i in enc["input_ids"]] == ids:
            return text, [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    spans, previous = [], 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[:k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        spans.append((min(previous, end), end))
        previous = max(previous, end)
    return text, spans


class FuzzySubjectMatcher:
    """Finds the last token of every fuzzy subject span (:func:`fuzzy_subject_spans`) in a batch of ids.

    ``groups`` maps a group number to ``(subjects, threshold)`` (the numbers of :class:`SubjectMatcher`'s
    groups, so that the two matchers' positions can be merged). Each row's ids, special and padding tokens
    dropped, become text (:func:`token_char_spans`); the last token overlapping a matched character span is
    the position. Rows seen before (the same ids) are answered from a bounded cache: evaluation and
    generation read the same prompts many times.
    """

    _CACHE_ROWS = 4096

    def __init__(self, tokenizer: Any, groups: dict[int, tuple[Sequence[str], float]]):
        self.tokenizer = tokenizer
        self.groups = {int(g): (tuple(subjects), check_match_threshold(threshold))
                       for g, (subjects, threshold) in groups.items()}
        self._special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        self._cache: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def positions(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{group: (rows, cols)}`` of the last tokens of its fuzzy spans in ``input_ids`` [B, T] (sorted,
        each position once), on the ids' device; groups without a span are absent."""
        ids = input_ids if input_ids.ndim == 2 else input_ids.reshape(1, -1)
        found: dict[int, set[tuple[int, int]]] = {}
        for row, row_ids in enumerate(ids.tolist()):
            for group, col in self.row_positions(tuple(row_ids)):
                found.setdefault(group, set()).add((row, col))
        out = {}
        for group in sorted(found):
            rows, cols = zip(*sorted(found[group]))
            out[group] = (torch.tensor(rows, dtype=torch.long, device=ids.device),
                          torch.tensor(cols, dtype=torch.long, device=ids.device))
        return out

    def row_positions(self, row_ids: tuple[int, ...]) -> list[tuple[int, int]]:
        """``[(group, column)]`` of one row of ids."""
        cached = self._cache.get(row_ids)
        if cached is not None:
            return cached
        kept = [(col, i) for col, i in enumerate(row_ids) if i not in self._special]
        out: list[tuple[int, int]] = []
        if kept:
            text, spans = token_char_spans(self.tokenizer, [i for _, i in kept])
            for group, (subjects, threshold) in self.groups.items():
                for start, end, _ in fuzzy_subject_spans(text, subjects, threshold):
                    last = [k for k, (s, e) in enumerate(spans) if s < end and e > start]
                    if last:
                        out.append((group, kept[last[-1]][0]))
        if len(self._cache) >= self._CACHE_ROWS:
            self._cache.clear()
        self._cache[row_ids] = out
        return out
