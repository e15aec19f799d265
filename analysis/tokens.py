"""Tokenising prompts into padded batches and finding subjects in them.

Subjects are located by character offsets (fast tokenizers), so leading
spaces (GPT-2/Llama style "Ġ"/"▁" tokens) and scripts without spaces (Chinese,
Japanese) are handled the same way: a token belongs to the subject when its
character span overlaps the subject's span in the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.errors import InputError


@dataclass
class Batch:
    """A padded batch with the masks every tracer needs."""

    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T] 1 = token, 0 = padding
    real: torch.Tensor             # [B, T] bool: text tokens (no padding, no BOS/EOS/special tokens)
    last: torch.Tensor             # [B] index of the last real token of each row
    subject: torch.Tensor | None   # [B, T] bool: tokens overlapping the subject, if subjects were given

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.real.to(device),
                     self.last.to(device), None if self.subject is None else self.subject.to(device))

    @property
    def position_ids(self) -> torch.Tensor:
        """[B, T] position of each token counted over its row's non-padding tokens; see :func:`position_ids`."""
        return position_ids(self.attention_mask)

    def positions(self, which: str) -> torch.Tensor:
        """Bool mask [B, T] of the positions to count: 'all', 'subject' or 'last'."""
        if which == "all":
            return self.real
        if which == "last":
            mask = torch.zeros_like(self.real)
            mask[torch.arange(mask.shape[0], device=mask.device), self.last] = True
            return mask
        if which == "subject":
            if self.subject is None:
                raise InputError("positions='subject' needs the subject of every prompt.")
            return self.subject
        raise InputError(f"Unknown positions {which!r}: use 'all', 'subject' or 'last'.")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] that count only non-padding tokens (padding gets 0 or the last position).

    Models called with ``input_ids`` alone number the columns 0..T-1, so left
    padding would shift every real token's position: learned or sinusoidal
    absolute positions (gpt2, xglm) then see other inputs than in an
    unpadded run, and rotary positions differ in rounding. Passing these ids
    makes a padded batch compute what each text computes alone.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def subject_char_span(text: str, subject: str, end: int | None = None) -> tuple[int, int]:
    """Character span of the last occurrence of ``subject`` in ``text`` (in ``text[:end]`` if given).

    The last occurrence is the one closest to the prediction (ROME uses the
    last subject token). ``end`` keeps the search inside the prompt part of a
    full statement, where an object that repeats the subject ("Hartford,
    Connecticut") must not be taken for it. A subject that is not in the
    text is a user error.
    """
    start = text.rfind(subject, 0, len(text) if end is None else end)
    if start < 0 or not subject:
        raise InputError(f"The subject {subject!r} does not occur in the prompt {text[:end]!r}.")
    return start, start + len(subject)


def encode(tokenizer, texts: list[str], subjects: list[str] | None = None,
           subject_ends: list[int | None] | None = None) -> Batch:
    """Tokenise ``texts`` into one padded batch (the tokenizer's padding side).

    ``subject_ends[i]`` (optional) limits the search for ``subjects[i]`` to
    ``texts[i][:subject_ends[i]]``; see :func:`subject_char_span`.
    """
    if not texts:
        raise InputError("Nothing to tokenise: the list of prompts is empty.")
    enc = tokenizer(list(texts), padding=True, return_tensors="pt", return_special_tokens_mask=True,
                    return_offsets_mapping=subjects is not None)
    attention = enc["attention_mask"]
    real = attention.bool() & ~enc["special_tokens_mask"].bool()
    # a text made only of special tokens would have no real token: count its last token then
    empty = ~real.any(dim=1)
    real[empty] = attention.bool()[empty]
    idx = torch.arange(real.shape[1]).expand_as(real)
    last = torch.where(real, idx, torch.full_like(idx, -1)).max(dim=1).values
    subject_mask = None
    if subjects is not None:
        if len(subjects) != len(texts) or (subject_ends is not None and len(subject_ends) != len(texts)):
            raise InputError("Give one subject per prompt.")
        search_ends = subject_ends if subject_ends is not None else [None] * len(texts)
        offsets = enc["offset_mapping"]
        subject_mask = torch.zeros_like(real)
        for row, (text, subject, end) in enumerate(zip(texts, subjects, search_ends)):
            s, e = subject_char_span(text, subject, end)
            starts, ends = offsets[row, :, 0], offsets[row, :, 1]
            hit = real[row] & (starts < e) & (ends > s)
            if not hit.any():
                raise InputError(f"No token of {text!r} covers the subject {subject!r}.")
            subject_mask[row] = hit
    return Batch(enc["input_ids"], attention, real, last, subject_mask)


def pad_sequences(seqs: list[list[int]], pad_id: int | None, side: str = "right",
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one padded batch ``(input_ids, attention_mask)``, padded on ``side``."""
    pad = int(pad_id) if pad_id is not None else 0
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def subject_last_ids(tokenizer, text: str, subject: str) -> tuple[list[int], int]:
    """Ids of ``text`` (with special tokens, no padding) and the index of its subject's last token."""
    batch = encode(tokenizer, [text], [subject])
    keep = batch.attention_mask[0].bool()
    cols = batch.subject[0][keep].nonzero().flatten()
    return batch.input_ids[0][keep].tolist(), int(cols[-1])


def join_answer(prompt: str, answer: str) -> str:
    """``prompt`` followed by ``answer`` as a statement writes it.

    A space separates them unless the prompt already ends in whitespace, the
    answer starts with one, or either side of the seam is a character of a
    script written without spaces (CJK, kana, Thai), so "巴黎的首都是" + "巴黎"
    stays "巴黎的首都是巴黎" and "The capital of France is" + "Paris" gets its space.
    """
    if not prompt or not answer or prompt[-1].isspace() or answer[0].isspace():
        return prompt + answer
    if _unspaced(prompt[-1]) or _unspaced(answer[0]):
        return prompt + answer
    return prompt + " " + answer


def _unspaced(ch: str) -> bool:
    code = ord(ch)
    return (0x2E80 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF
            or 0xFF00 <= code <= 0xFFEF or 0x0E00 <= code <= 0x0E7F or 0x3000 <= code <= 0x303F)


def answer_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """Token ids of ``answer`` as the model would write it after ``prompt``.

    The statement ``join_answer(prompt, answer)`` is tokenised and the ids
    after the prompt's own ids are the answer's, so a leading-space token
    ("ĠParis", "▁Paris") is chosen exactly where the model would produce it.
    When the tokenizer merges across the seam (the prompt's ids are not a
    prefix of the statement's) the answer is tokenised alone, with the same
    separator, without special tokens. An empty answer is a user error.
    """
    if not answer or not answer.strip():
        raise InputError("The answer (target) is empty.")
    statement = join_answer(prompt, answer)
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    s_ids = tokenizer(statement, add_special_tokens=True)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and s_ids and s_ids[-1] == eos and (not p_ids or p_ids[-1] == eos):
        p_ids, s_ids = p_ids[:-1], s_ids[:-1]  # tokenizers that append EOS (none of ours by default)
    if s_ids[:len(p_ids)] == p_ids and len(s_ids) > len(p_ids):
        return list(s_ids[len(p_ids):])
    seam = statement[len(prompt):]
    ids = tokenizer(seam, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"The answer {answer!r} has no tokens.")
    return list(ids)
