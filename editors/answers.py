"""How the workbench produces and scores answers: greedy decoding and teacher-forced answer scores.

Every metric of :mod:`editors.evaluate` and every before/after comparison of the
Edit lab reads the model through these two functions, so they are the one place
that fixes *how answers are produced*:

Prompt format
    The question (or cloze prompt) itself, tokenised with the tokenizer's
    special tokens (BOS for Gemma/Llama), with no template around it; the answer
    follows it as :func:`analysis.tokens.join_answer` writes a statement (a space
    after the prompt, none in scripts written without spaces). This is how
    ROME/MEMIT evaluate zsRE on base models, and it is the format the editors
    train (``prompt`` + target, teacher forced).

Greedy decoding
    :func:`greedy_answers` picks the arg-max token ``n`` times (no sampling, no
    repetition penalty, no stop token: a fixed number of new tokens). The
    metrics decode exactly as many tokens as the reference answer has after
    that prompt (:func:`analysis.tokens.answer_ids`), so a right answer
    followed by more text is not counted wrong for its continuation; generation
    stops early only at the end-of-sequence token. Base models often start
    their answer on a new line after a question ("?\n\nThe IAAF ..."): up to
    :data:`LEADING_BLANKS` leading tokens that are only whitespace are not
    counted in the length, and the answer is the first line of the text after
    them (``stop_at_newline``).

Teacher-forced scores
    :func:`answer_scores` runs ``prompt + answer`` once and returns, per answer
    token, its log-probability, whether it was the arg-max and the arg-max token
    itself: the sequence probability ``P(answer | prompt)`` is the product
    (memla's ES/PS), the share of arg-max tokens is LangEdit's top-1 accuracy,
    and the arg-max tokens show what the model predicted at each position given
    the answer's earlier tokens (no extra forward pass; not a greedy answer).

Batches are padded on the left for decoding and on the right for scoring, with
position ids counted over real tokens (:meth:`analysis.model.Workbench.forward_inputs`),
so a padded row computes what its text computes alone; activation patches of an
applied edit see the ``input_ids`` of every call and so apply as in a single run.
In-context edits (IKE, ReMaKE) applied to the model rewrite each prompt first
(:func:`editors.apply.in_context_prompts`): the answer follows the prompt the model
really reads. Decoding keeps the base model's key/value cache: the prompt runs once and each
step runs only the new tokens (an activation patch on a subject in the prompt is
applied in that first run, and the cached keys and values carry it on).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from analysis.errors import InputError
from analysis.tokens import answer_ids, pad_sequences
from editors.apply import in_context_prompts

if TYPE_CHECKING:
    from analysis.model import Workbench

#: Upper bound on decoded tokens per call (a guard against a huge ``n``).
MAX_NEW_TOKENS = 64
#: Leading whitespace-only tokens (newlines after a question) not counted in an answer's length.
LEADING_BLANKS = 2


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise InputError("No prompt to answer.")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise InputError("A prompt is empty.")
    return prompts


@torch.no_grad()
def greedy_answers(wb: Workbench, prompts: Sequence[str], n_tokens: int | Sequence[int] = 8,
                   stop_at_newline: bool = True, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts``: ``n_tokens`` new tokens each (one number or one per prompt).

    Returns the decoded new text, stripped, cut at the first newline when
    ``stop_at_newline``. Deterministic; see the module docstring for the format.
    """
    return [text for text, _ in greedy_decode(wb, prompts, n_tokens, stop_at_newline, batch_size)]


@torch.no_grad()
def greedy_decode(wb: Workbench, prompts: Sequence[str], n_tokens: int | Sequence[int] = 8,
                  stop_at_newline: bool = True, batch_size: int = 16) -> list[tuple[str, list[int]]]:
    """:func:`greedy_answers` with the generated token ids (leading blanks included) of each answer."""
    prompts = [r.text for r in in_context_prompts(wb, _check_prompts(prompts))]
    lengths = [int(n_tokens)] * len(prompts) if isinstance(n_tokens, int) else [int(n) for n in n_tokens]
    if len(lengths) != len(prompts):
        raise InputError("Give one answer length per prompt.")
    if any(n < 1 or n > MAX_NEW_TOKENS for n in lengths):
        raise InputError(f"Answer lengths must be 1-{MAX_NEW_TOKENS} tokens, got {lengths}.")
    out: list[tuple[str, list[int]]] = [("", [])] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        decoded = _decode_batch(wb, [prompts[i] for i in rows], [lengths[i] for i in rows])
        for i, ids in zip(rows, decoded):
            text = wb.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            out[i] = ((text.split("\n", 1)[0] if stop_at_newline else text).strip(), ids)
    return out


class _Greedy:
    """Book-keeping of one batch's greedy answers: which rows still decode, leading blanks, the new ids."""

    def __init__(self, tok: Any, lengths: list[int]):
        self.tok, self.lengths, self.eos = tok, lengths, tok.eos_token_id
        self.new: list[list[int]] = [[] for _ in lengths]
        self.blanks = [0] * len(lengths)      # leading whitespace-only tokens, not counted in the length
        self.done = [False] * len(lengths)

    def active(self, r: int) -> bool:
        return not self.done[r] and len(self.new[r]) - self.blanks[r] < self.lengths[r]

    def take(self, tokens: list[int]) -> list[bool]:
        """Record each row's arg-max token; True for the rows that took it (it becomes part of their text)."""
        took = []
        for r, t in enumerate(tokens):
            if not self.active(r):
                took.append(False)
                continue
            if self.eos is not None and t == self.eos:
                self.done[r] = True
                took.append(False)
                continue
            if len(self.new[r]) == self.blanks[r] and self.blanks[r] < LEADING_BLANKS \
                    and not self.tok.decode([t]).strip():
                self.blanks[r] += 1
            self.new[r].append(int(t))
            took.append(True)
        return took

    def finished(self) -> bool:
        return not any(self.active(r) for r in range(len(self.lengths)))


def _decode_batch(wb: Workbench, prompts: list[str], lengths: list[int]) -> list[list[int]]:
    """Greedy ids of one left-padded batch, with the base model's key/value cache.

    The prompts run once (prefill); each later step runs only the tokens just
    chosen, with the attention mask and position ids of the whole row. A row that
    has finished is fed its own last token again (its results are ignored; no
    other row attends to it). Architectures whose base model returns no cache
    decode by recomputing every step (:func:`_decode_batch_recompute`), with the
    same result.
    """
    tok = wb.tokenizer
    base, _ = wb.base_model()
    seqs = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    ids, mask = pad_sequences(seqs, tok.pad_token_id, side="left", device=wb.device)
    inputs = wb.forward_inputs(ids, mask)
    if "use_cache" not in inputs:
        return _decode_batch_recompute(wb, seqs, lengths)
    inputs["use_cache"] = True
    out = base(**inputs)
    past = wb.returned_cache(out)
    if past is None:
        return _decode_batch_recompute(wb, seqs, lengths)
    state = _Greedy(tok, lengths)
    hidden = out[0][:, -1]
    last = ids[:, -1].tolist()
    has_positions = "position_ids" in inputs
    positions = inputs["position_ids"][:, -1] if has_positions else None
    for step in range(max(lengths) + LEADING_BLANKS):
        nxt = wb.logits(hidden).float().argmax(-1).tolist()
        took = state.take(nxt)
        if state.finished() or step == max(lengths) + LEADING_BLANKS - 1:
            break
        last = [t if k else old for t, k, old in zip(nxt, took, last)]
        step_ids = torch.tensor(last, dtype=ids.dtype, device=wb.device)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_inputs = wb.with_cache({"input_ids": step_ids, "attention_mask": mask}, past)
        if has_positions:
            positions = positions + 1
            step_inputs["position_ids"] = positions[:, None]
        out = base(**step_inputs)
        past = wb.returned_cache(out)
        hidden = out[0][:, -1]
    return state.new


def _decode_batch_recompute(wb: Workbench, seqs: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Greedy ids of one batch of prompt ids without a cache: every step runs each row's whole text again."""
    tok = wb.tokenizer
    seqs = [list(s) for s in seqs]
    state = _Greedy(tok, lengths)
    for _ in range(max(lengths) + LEADING_BLANKS):
        # left padding: the last column is every row's last token
        ids, mask = pad_sequences(seqs, tok.pad_token_id, side="left", device=wb.device)
        nxt = wb.logits_at(wb.forward_inputs(ids, mask)).float().argmax(-1).tolist()
        for r, (t, took) in enumerate(zip(nxt, state.take(nxt))):
            if took:
                seqs[r] = seqs[r] + [int(t)]
        if state.finished():
            break
    return state.new


@dataclass
class AnswerScore:
    """Teacher-forced score of one answer after one prompt."""

    token_ids: list[int]
    logprobs: list[float]      # log P(token_k | prompt, tokens_<k)
    top1: list[bool]           # token_k was the arg-max
    #: the arg-max token at each answer position given the prompt and the answer's earlier tokens (teacher
    #: forced: not a greedy answer, which would continue from its own choices); empty when not computed
    predicted: list[int] = field(default_factory=list)

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def probability(self) -> float:
        """P(answer | prompt): the product of the token probabilities."""
        return float(torch.tensor(self.logprob).exp())

    @property
    def first_token_probability(self) -> float:
        return float(torch.tensor(self.logprobs[0]).exp())

    @property
    def top1_accuracy(self) -> float:
        """Share of answer tokens that were the arg-max (LangEdit / MEMIT zsRE top-1 accuracy)."""
        return sum(self.top1) / len(self.top1)


@torch.no_grad()
def answer_scores(wb: Workbench, prompts: Sequence[str], answers: Sequence[str | Sequence[int]],
                  batch_size: int = 16) -> list[AnswerScore]:
    """Teacher-forced :class:`AnswerScore` of ``answers[i]`` after ``prompts[i]`` (one forward per batch).

    An answer is a text (tokenised as :func:`analysis.tokens.answer_ids` writes it
    after the prompt) or a list of token ids (e.g. a greedy answer's own ids).
    """
    prompts = [r.text for r in in_context_prompts(wb, _check_prompts(prompts))]
    answers = list(answers)
    if len(answers) != len(prompts):
        raise InputError("Give one answer per prompt.")
    tok = wb.tokenizer
    out: list[AnswerScore] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(zip(prompts[start:start + batch_size], answers[start:start + batch_size]))
        seqs, spans = [], []
        for p, a in chunk:
            p_ids = list(tok(p, add_special_tokens=True)["input_ids"])
            a_ids = answer_ids(tok, p, a) if isinstance(a, str) else [int(t) for t in a]
            if not a_ids:
                raise InputError("An answer to score is empty.")
            seqs.append(p_ids + a_ids)
            spans.append((len(p_ids), a_ids))
        ids, mask = pad_sequences(seqs, tok.pad_token_id, device=wb.device)
        rows = [r for r, (n, a) in enumerate(spans) for _ in a]
        cols = [n - 1 + k for n, a in spans for k in range(len(a))]
        targets = torch.tensor([t for _, a in spans for t in a], device=wb.device)
        logp = torch.log_softmax(wb.logits_at(wb.forward_inputs(ids, mask), (rows, cols)).float(), dim=-1)
        picked = logp.gather(1, targets[:, None]).squeeze(1).tolist()
        argmax = logp.argmax(-1)
        best = (argmax == targets).tolist()
        argmax = argmax.tolist()
        k = 0
        for _, a in spans:
            out.append(AnswerScore(list(a), picked[k:k + len(a)], best[k:k + len(a)], argmax[k:k + len(a)]))
            k += len(a)
    return out


def answer_length(wb: Workbench, prompt: str, answer: str) -> int:
    """Tokens of ``answer`` after ``prompt`` (capped at :data:`MAX_NEW_TOKENS`): the decoding length of the metrics."""
    return min(len(answer_ids(wb.tokenizer, prompt, answer)), MAX_NEW_TOKENS)
