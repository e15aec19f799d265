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


def subject_char_span(text: str, subject: str) -> tuple[int, int]:
    """Character span of the last occurrence of ``subject`` in ``text``.

    The last occurrence is the one closest to the prediction (ROME uses the
    last subject token). A subject that is not in the text is a user error.
    """
    start = text.rfind(subject)
    if start < 0 or not subject:
        raise InputError(f"The subject {subject!r} does not occur in the prompt {text!r}.")
    return start, start + len(subject)


def encode(tokenizer, texts: list[str], subjects: list[str] | None = None) -> Batch:
    """Tokenise ``texts`` into one padded batch (the tokenizer's padding side)."""
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
        if len(subjects) != len(texts):
            raise InputError("Give one subject per prompt.")
        offsets = enc["offset_mapping"]
        subject_mask = torch.zeros_like(real)
        for row, (text, subject) in enumerate(zip(texts, subjects)):
            s, e = subject_char_span(text, subject)
            starts, ends = offsets[row, :, 0], offsets[row, :, 1]
            hit = real[row] & (starts < e) & (ends > s)
            if not hit.any():
                raise InputError(f"No token of {text!r} covers the subject {subject!r}.")
            subject_mask[row] = hit
    return Batch(enc["input_ids"], attention, real, last, subject_mask)
