"""Teacher-forced rows shared by the editors that optimise a vector (LU-LAFNs' ΔV, ROME/MEMIT's δ).

:class:`TeacherForcedRows` collects texts into one batch: for each row the index
of its subject's last token (where the vector is added) and, for rows with an
answer, the positions whose next-token prediction is an answer token, each
weighted ``1 / (contexts · len(answer))``: a per-token mean, then a mean over
``contexts`` rows, as MEMIT's compute_v.
"""
from __future__ import annotations

from typing import Any

import torch

from analysis.tokens import answer_ids, pad_sequences, subject_last_ids


class TeacherForcedRows:
    """Rows of one padded batch on ``device``; ``add`` texts, then ``batch()`` and the index tensors."""

    def __init__(self, tokenizer: Any, device: Any):
        self.tokenizer, self.device = tokenizer, device
        self.seqs: list[list[int]] = []
        self.patch_cols: list[int] = []
        self.target_rows: list[int] = []
        self.target_cols: list[int] = []
        self.target_ids: list[int] = []
        self.target_weights: list[float] = []

    def add(self, text: str, subject: str, answer: str | None = None, contexts: int = 1) -> int:
        """Add ``text`` (+ ``answer``, teacher forced); returns its row."""
        ids, last = subject_last_ids(self.tokenizer, text, subject)
        ans = answer_ids(self.tokenizer, text, answer) if answer is not None else []
        row = len(self.seqs)
        self.seqs.append(ids + ans)
        self.patch_cols.append(last)
        for k, a in enumerate(ans):
            self.target_rows.append(row)
            self.target_cols.append(len(ids) - 1 + k)
            self.target_ids.append(int(a))
            self.target_weights.append(1.0 / (contexts * len(ans)))
        return row

    def last_col(self, row: int) -> int:
        """The last token of ``row`` (a row added without an answer: where its next token is predicted)."""
        return len(self.seqs[row]) - 1

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, right padded with the tokenizer's pad id."""
        return pad_sequences(self.seqs, self.tokenizer.pad_token_id, device=self.device)

    def long(self, values: list[int]) -> torch.Tensor:
        """``values`` (rows, columns, token ids) as a long tensor on the batch's device."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def weights(self) -> torch.Tensor:
        """The answer tokens' weights, float32."""
        return torch.tensor(self.target_weights, dtype=torch.float32, device=self.device)


@torch.no_grad()
def clamp_norm_(vector: torch.Tensor, limit: float) -> None:
    """Scale ``vector`` in place down to norm ``limit`` when it is longer (ROME's clamp_norm_factor); a
    non-positive limit clamps nothing."""
    norm = float(vector.norm())
    if norm > limit > 0:
        vector.mul_(limit / norm)
