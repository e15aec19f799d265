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

How the matches are used during a forward call (the embedding pre-hook, padded
batches, key/value caches, ``inputs_embeds``) is :mod:`editors.apply`.
"""
from __future__ import annotations

import unicodedata
from typing import Any, Callable, Iterable, Sequence

import torch

from analysis.errors import InputError

MATCH_MODES = ("exact", "normalized")


def check_match(match: Any) -> str:
    """``match`` if it is one of :data:`MATCH_MODES`; InputError otherwise."""
    if match not in MATCH_MODES:
        raise InputError(f"Unknown subject match {match!r}; use one of: {', '.join(MATCH_MODES)}.")
    return match


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
