"""Causal tracing (ROME, Meng et al. 2022, §2.1; papers/langedit.md Appendix A.1 and Fig. 5).

Three runs of the model on one prompt:

* **clean run** -- the prompt as it is; every hidden state (layer output), FFN
  output (site "mlp") and attention output (site "attn") of every layer at every
  token is recorded; ``p_clean`` = P(answer) at the last position.
* **corrupted run** -- Gaussian noise ``N(0, σ²)`` is added to the output of the
  token-embedding module at the subject's tokens; ``p_corrupted`` = P(answer),
  averaged over ``samples`` noise draws.
* **corrupted-with-restoration run** -- the corrupted run, with one state of the
  clean run put back: the hidden state of layer l at token t ("hidden"), or the
  FFN / attention outputs at token t of the ``window`` layers around l ("mlp",
  "attn"; ROME's window ``[l - window//2, l - (-window//2))`` clipped to the
  model). The score of cell (t, l) is P(answer) averaged over the samples; its
  indirect effect is ``score - p_corrupted``.

Every cell sees the same ``samples`` noise tensors (ROME re-seeds its generator
for every cell); both :func:`causal_trace` and the reference
:func:`causal_trace_per_cell` draw them with :func:`subject_noise`.

How the batched :func:`causal_trace` saves work (all exact up to float rounding;
``tests/test_causal_trace.py`` checks it against the reference to 1e-5):

* Rows = (restoration, sample) pairs, up to ``max_rows`` per forward; the clean
  states are written by (row, position) index into the module outputs.
* A restoration at token t changes nothing at tokens before t (causal attention),
  and the corrupted run's states there are the same for every restoration. So all
  restorations at token t are run as one group on the tokens ``t..T-1`` only, on
  top of a key/value cache of the corrupted prefix ``0..t-1`` (one short forward
  of ``samples`` rows per group, copied to every row). Averaged over the tokens
  that is about half of the token positions of a full forward.
* Tokens before the subject's first token are not touched by the noise: their
  cells are exactly ``p_corrupted`` and are not run. Restoring a hidden state of
  the last layer at a token other than the last cannot reach the last position:
  those cells are ``p_corrupted`` too. Restorations with the same layer set (the
  window at both ends of a shallow model) are run once.
* Only the decoder stack runs (``wb.base_model()``, final norm included) and the
  LM head is applied at the last position only (``wb.logits``): the reference
  computes full logits at every position of every row, as ROME does, which for
  the embedded model's 262k-row head costs more than all its layers.

Interventions are plain PyTorch forward hooks (registered for one call and
removed in a ``finally`` block), not nnsight. Why: one set of hooks serves every
forward of a trace (the clean/corrupted run that records, the prefix runs, the
restored chunks) and reads from a small mutable plan which rows to restore at
which layer, so a chunk costs no graph building; the restored runs hand a
``past_key_values`` cache to the base model and read nothing back but the last
hidden state, where nnsight would add a traced call per forward for no gain;
and the reference :func:`causal_trace_per_cell` uses hooks too, as ROME's
``nethook.TraceDict`` does, so both paths patch the same module outputs the
same way. Outputs that are tuples are patched in place through
:func:`analysis.arch.first_tensor`.

σ deviates from ROME: ROME uses 3 × the standard deviation of the embeddings of
the subjects of its fact set; we use ``noise`` (3 by default) × the standard
deviation of the embedding module's output over the whole vocabulary
(:func:`embedding_noise_std`), which needs no fact set and is the same for every
prompt and language. ``sigma=`` sets an absolute σ instead.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import weakref
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.arch import first_tensor
from analysis import runs
from analysis.errors import InputError, NeuroglotError
from analysis.neurons import atomic_write, check_languages, forward_inputs, versions
from analysis.tokens import answer_ids, encode

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
#: ROME's token categories for average indirect effects (Fig. 1/2 of ROME; langedit Fig. 5).
CATEGORIES: tuple[str, ...] = (
    "First subject token", "Middle subject tokens", "Last subject token",
    "First subsequent token", "Further tokens", "Last token",
)
ANSWERS = ("object", "model")
#: Bumped when what a trace computes changes, so older run folders are not reused.
CAUSAL_TRACE_VERSION = 1

Progress = Callable[[float, str], None]


# --------------------------------------------------------------------- result


@dataclass
class TraceResult:
    """Causal-tracing scores of one prompt: P(answer) with each state restored."""

    tokens: list[str]                 # decoded, one per input token (BOS included)
    subject_range: tuple[int, int]    # [start, end) token indices of the subject
    answer: str                       # decoded answer token
    answer_id: int
    p_clean: float
    p_corrupted: float
    scores: dict[str, np.ndarray]     # kind -> [T, L] P(answer) with the state restored
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.subject_range = (int(self.subject_range[0]), int(self.subject_range[1]))
        self.scores = {k: np.asarray(v, dtype=np.float64) for k, v in self.scores.items()}

    @property
    def kinds(self) -> list[str]:
        return list(self.scores)

    @property
    def n_layers(self) -> int:
        return next(iter(self.scores.values())).shape[1]

    def indirect_effect(self, kind: str) -> np.ndarray:
        """[T, L] ``score - p_corrupted`` (ROME's indirect effect of each state)."""
        if kind not in self.scores:
            raise InputError(f"This trace has no {kind!r} scores; it has: {', '.join(self.scores)}.")
        return self.scores[kind] - self.p_corrupted

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data (floats are exact under ``json`` round trips)."""
        return {"tokens": list(self.tokens), "subject_range": list(self.subject_range), "answer": self.answer,
                "answer_id": int(self.answer_id), "p_clean": float(self.p_clean),
                "p_corrupted": float(self.p_corrupted),
                "scores": {k: v.tolist() for k, v in self.scores.items()}, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TraceResult":
        return cls(tokens=list(data["tokens"]), subject_range=tuple(data["subject_range"]),
                   answer=str(data["answer"]), answer_id=int(data["answer_id"]), p_clean=float(data["p_clean"]),
                   p_corrupted=float(data["p_corrupted"]),
                   scores={k: np.asarray(v, dtype=np.float64) for k, v in data["scores"].items()},
                   meta=dict(data.get("meta", {})))


# ---------------------------------------------------------------------- noise

_STD_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, float]]" = weakref.WeakKeyDictionary()


def embedding_noise_std(wb, chunk: int = 16384) -> float:
    """Standard deviation of the token-embedding module's output over the whole vocabulary.

    The module output is what the noise is added to (for gemma it includes the
    sqrt(d_model) scale). Computed in chunks of ``chunk`` ids in float64 and
    cached per embedding module until its weight changes. ROME instead takes the
    std of the embeddings of its facts' subjects (see the module docstring).
    """
    module = wb.arch.embedding(wb.model)
    weight = module.weight
    stamp = (weight.data_ptr(), weight._version, tuple(weight.shape), str(weight.dtype))
    cached = _STD_CACHE.get(module)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    n_vocab = int(weight.shape[0])
    total = total_sq = 0.0
    count = 0
    with wb.lock, torch.no_grad():
        for start in range(0, n_vocab, chunk):
            ids = torch.arange(start, min(start + chunk, n_vocab), device=weight.device).unsqueeze(0)
            x = first_tensor(module(ids)).double()
            total += float(x.sum())
            total_sq += float((x * x).sum())
            count += x.numel()
    mean = total / count
    std = math.sqrt(max(total_sq - count * mean * mean, 0.0) / max(count - 1, 1))
    _STD_CACHE[module] = (stamp, std)
    return std


def noise_sigma(wb, noise: float = 3.0, sigma: float | None = None) -> float:
    """σ of the subject noise: ``sigma`` when given, else ``noise ×`` :func:`embedding_noise_std`."""
    if sigma is not None:
        if not _is_number(sigma) or not float(sigma) >= 0 or not math.isfinite(float(sigma)):
            raise InputError(f"sigma must be a finite number >= 0; got {sigma!r}.")
        return float(sigma)
    if not _is_number(noise) or not float(noise) >= 0 or not math.isfinite(float(noise)):
        raise InputError(f"noise must be a finite number >= 0 (a multiple of the embedding std); got {noise!r}.")
    return float(noise) * embedding_noise_std(wb)


def subject_noise(samples: int, n_tokens: int, d_model: int, sigma: float, seed: int) -> torch.Tensor:
    """``samples`` noise tensors [n_tokens, d_model] ~ N(0, 1) × σ from one generator seeded with ``seed``.

    Returned stacked, [samples, n_tokens, d_model], float32 on the CPU.
    """
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randn((n_tokens, d_model), generator=gen) for _ in range(samples)]) * sigma


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


# --------------------------------------------------------------- preparation


@dataclass
class _Prepared:
    input_ids: torch.Tensor       # [1, T] on the model's device
    tokens: list[str]
    subject: tuple[int, int]      # [start, end)
    answer_id: int | None         # None: the model's own prediction
    sigma: float
    noise: torch.Tensor           # [samples, end - start, d_model], model dtype and device
    kinds: tuple[str, ...]
    meta: dict[str, Any]


def check_parameters(kinds: Sequence[str], samples: int, window: int, max_rows: int, seed: int,
                     noise: float | None = None) -> tuple[str, ...]:
    """Refuse bad tracing parameters (before a model is loaded, and before any fact is traced)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise InputError(f"Unknown kind(s) {', '.join(map(repr, unknown)) or '(none given)'}: "
                         f"choose from {', '.join(KINDS)}.")
    for name, value, least in (("samples", samples, 1), ("window", window, 1), ("max_rows", max_rows, 1)):
        if not _is_number(value) or int(value) != value or int(value) < least:
            raise InputError(f"{name} must be a whole number >= {least}; got {value!r}.")
    if not _is_number(seed) or int(seed) != seed:
        raise InputError(f"seed must be a whole number; got {seed!r}.")
    if noise is not None and (not _is_number(noise) or not float(noise) >= 0 or not math.isfinite(float(noise))):
        raise InputError(f"noise must be a finite number >= 0 (a multiple of the embedding std); got {noise!r}.")
    return kinds


def _prepare(wb, prompt: str, subject: str, answer: str | None, kinds: Sequence[str], samples: int,
             noise: float, sigma: float | None, window: int, seed: int, max_rows: int,
             language: str | None) -> _Prepared:
    """Validate the parameters, tokenise, locate the subject, draw the noise."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty.")
    if not isinstance(subject, str) or not subject.strip():
        raise InputError("The subject is empty.")
    kinds = check_parameters(kinds, samples, window, max_rows, seed)
    ids, (start, end) = locate_subject(wb.tokenizer, prompt, subject)
    tokens = [wb.tokenizer.decode([int(i)]) for i in ids[0]]
    answer_id = None
    if answer is not None:
        answer_id = int(answer_ids(wb.tokenizer, prompt, answer)[0])
    s = noise_sigma(wb, noise, sigma)
    drawn = subject_noise(int(samples), end - start, wb.d_model, s, int(seed))
    meta = {"prompt": prompt, "subject": subject, "language": language, "samples": int(samples),
            "noise": float(noise), "sigma": s, "sigma_given": sigma is not None, "window": int(window),
            "seed": int(seed), "model": wb.name, "model_spec": wb.spec}
    return _Prepared(ids.to(wb.device), tokens, (start, end), answer_id, s,
                     drawn.to(device=wb.device, dtype=wb.dtype), kinds, meta)


def locate_subject(tokenizer, prompt: str, subject: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Input ids [1, T] of ``prompt`` and the subject's token range ``[start, end)``.

    The subject's tokens are those whose characters overlap its last occurrence
    in the prompt (:func:`analysis.tokens.encode`: leading-space tokens and
    scripts without spaces alike); a range with gaps is taken from its first to
    its last token. A subject not in the prompt raises :class:`InputError`.
    """
    batch = encode(tokenizer, [prompt], subjects=[subject])
    where = batch.subject[0].nonzero().squeeze(1)
    return batch.input_ids, (int(where.min()), int(where.max()) + 1)


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window of layers around ``layer``: ``[max(0, l - w//2), min(L, l - (-w//2)))``."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The layers whose ``kind`` state cell (t, ``layer``) restores: the layer itself for
    "hidden", the window around it for "mlp" and "attn"."""
    return (layer,) if kind == "hidden" else tuple(window_layers(layer, window, n_layers))


def kind_module(wb, kind: str, layer: int) -> torch.nn.Module:
    """The module whose output is the ``kind`` state of ``layer``."""
    if kind == "hidden":
        return wb.arch.layer_module(wb.model, layer)
    if kind == "mlp":
        return wb.arch.ffn_output_module(wb.model, layer)
    return wb.arch.site(wb.model, layer, "attn")


def _probability(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) per row from last-position logits [rows, vocab], in float32:
    ``exp(z_answer - logsumexp(z))``, the softmax entry without writing the whole softmax."""
    z = logits.float()
    return torch.exp(z[:, answer_id] - torch.logsumexp(z, dim=-1))


# ------------------------------------------------------- batched (the project)


@dataclass
class _Plan:
    """What the hooks do in the forward that is running now (mutated between forwards)."""

    noise: tuple[int, int, torch.Tensor] | None = None  # (first position, end position, [rows, n, d])
    noise_from_row: int = 0
    restore: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    record: dict[tuple[str, int], torch.Tensor] | None = None  # row 0 of every state, when set


@contextmanager
def _hooks(wb, kinds: Sequence[str], plan: _Plan) -> Iterator[None]:
    """Forward hooks on the embedding and on every ``kind`` module of every layer, driven by ``plan``."""

    def add_noise(module, args, output):
        if plan.noise is None:
            return None
        a, b, values = plan.noise
        first_tensor(output)[plan.noise_from_row:, a:b] += values
        return None

    def state_hook(kind: str, layer: int):
        key = (kind, layer)

        def hook(module, args, output):
            h = first_tensor(output)
            if plan.record is not None:
                plan.record[key] = h[0].detach().clone()
            todo = plan.restore.get(key)
            if todo is not None:
                rows, value = todo
                h[rows, 0] = value  # every restoration of a group sits at the group's first position
            return None

        return hook

    handles = [wb.arch.embedding(wb.model).register_forward_hook(add_noise)]
    try:
        for layer in range(wb.n_layers):
            for kind in kinds:
                handles.append(kind_module(wb, kind, layer).register_forward_hook(state_hook(kind, layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _last_logits(wb, inputs: dict[str, Any]) -> torch.Tensor:
    """Base model forward, then the LM head at the last position only: [rows, vocab]."""
    base, _ = wb.base_model()
    return wb.logits(first_tensor(base(**inputs))[:, -1])


def causal_trace(wb, prompt: str, subject: str, answer: str | None = None, kinds: Sequence[str] = KINDS,
                 samples: int = 10, noise: float = 3.0, sigma: float | None = None, window: int = 10,
                 seed: int = 0, max_rows: int = 256, progress: Progress | None = None,
                 language: str | None = None) -> TraceResult:
    """Causal trace of ``prompt`` with noise on ``subject``'s tokens (batched; see the module docstring).

    ``answer=None`` traces the model's own greedy next token (as ROME does);
    else the first token of ``answer`` as written after the prompt. ``kinds``:
    any of "hidden", "mlp", "attn". Every cell's score is P(answer) averaged
    over ``samples`` corrupted runs, all cells seeing the same noise (σ =
    ``sigma``, or ``noise`` × :func:`embedding_noise_std`). At most ``max_rows``
    rows go through one forward. ``progress(frac, message)`` is called after
    each forward.
    """
    started = time.perf_counter()
    prep = _prepare(wb, prompt, subject, answer, kinds, samples, noise, sigma, window, seed, max_rows, language)
    ids, (s0, s1), S = prep.input_ids, prep.subject, int(samples)
    T, L, device = ids.shape[1], wb.n_layers, wb.device
    report = progress or (lambda frac, message: None)
    plan = _Plan()
    scores: dict[str, np.ndarray] = {}
    with wb.lock, torch.no_grad(), _hooks(wb, prep.kinds, plan):
        # clean (row 0, recorded) and corrupted (rows 1..S) runs in one forward
        rows = ids.expand(1 + S, T)
        plan.record, plan.noise, plan.noise_from_row = {}, (s0, s1, prep.noise), 1
        logits = _last_logits(wb, forward_inputs(wb, rows, torch.ones_like(rows)))
        clean, plan.record, plan.noise_from_row = plan.record, None, 0
        answer_id = prep.answer_id if prep.answer_id is not None else int(logits[0].argmax())
        p = _probability(logits, answer_id)
        p_clean, p_corrupted = float(p[0]), float(p[1:].mean())
        for kind in prep.kinds:
            scores[kind] = np.full((T, L), p_corrupted, dtype=np.float64)

        groups = [(t, specs) for t in range(s0, T) if (specs := _group_specs(prep.kinds, t, T, L, int(window)))]
        total_rows = sum(len(specs) for _, specs in groups) * S
        done_rows = 0
        report(0.0, f"Clean and corrupted runs done; {total_rows} restored runs to go")
        for t, specs in groups:
            prefix = _corrupted_prefix(wb, ids, t, prep.noise, (s0, s1), plan)
            sums = np.zeros(len(specs), dtype=np.float64)
            n_rows = len(specs) * S
            n_chunks = -(-n_rows // int(max_rows))
            size = -(-n_rows // n_chunks)
            for lo in range(0, n_rows, size):
                hi = min(lo + size, n_rows)
                row_spec = torch.arange(lo, hi) // S
                row_sample = torch.arange(lo, hi) % S
                plan.restore = _restorations(specs, row_spec, clean, t, device)
                a = max(s0, t)
                plan.noise = (a - t, s1 - t, prep.noise[row_sample.to(device)][:, a - s0:]) if a < s1 else None
                p = _probability(_group_logits(wb, ids, t, hi - lo, prefix, row_sample), answer_id)
                np.add.at(sums, row_spec.numpy(), p.double().cpu().numpy())
                done_rows += hi - lo
                report(done_rows / max(total_rows, 1), f"Token {t + 1}/{T}: {done_rows}/{total_rows} restored runs")
            plan.restore, plan.noise = {}, None
            for ((kind, _), cells), total in zip(specs, sums):
                for layer in cells:
                    scores[kind][t, layer] = total / S
    meta = dict(prep.meta, seconds=round(time.perf_counter() - started, 3), method="batched")
    return TraceResult(prep.tokens, prep.subject, wb.tokenizer.decode([answer_id]), answer_id, p_clean,
                       p_corrupted, scores, meta)


def _group_specs(kinds: Sequence[str], t: int, T: int, L: int, window: int) -> list:
    """The distinct restorations at token ``t``: ``[((kind, layers), [cell layers...]), ...]``.

    Cells that are exactly ``p_corrupted`` are left out: the hidden state of the
    last layer at a token other than the last one never reaches the last position.
    """
    specs: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for kind in kinds:
        for layer in range(L):
            if kind == "hidden" and layer == L - 1 and t != T - 1:
                continue
            specs.setdefault((kind, restored_layers(kind, layer, window, L)), []).append(layer)
    return list(specs.items())


def _restorations(specs: list, row_spec: torch.Tensor, clean: dict, t: int,
                  device: torch.device) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """(kind, layer) -> (rows of this chunk to restore, clean state at token ``t``)."""
    rows_of: dict[tuple[str, int], list[int]] = {}
    for row, spec in enumerate(row_spec.tolist()):
        (kind, layers), _ = specs[spec]
        for layer in layers:
            rows_of.setdefault((kind, layer), []).append(row)
    return {key: (torch.tensor(rows, device=device), clean[key][t]) for key, rows in rows_of.items()}


def _corrupted_prefix(wb, ids: torch.Tensor, t: int, noise: torch.Tensor, subject: tuple[int, int], plan: _Plan):
    """Key/value cache of the corrupted run over tokens ``0..t-1``, one row per sample (None for t = 0)."""
    if t == 0:
        return None
    s0, s1 = subject
    S = noise.shape[0]
    rows = ids[:, :t].expand(S, t)
    b = min(s1, t)
    plan.restore, plan.noise = {}, ((s0, b, noise[:, : b - s0]) if s0 < b else None)
    inputs = forward_inputs(wb, rows, torch.ones_like(rows))
    inputs["use_cache"] = True
    base, _ = wb.base_model()
    cache = base(**inputs).past_key_values
    plan.noise = None
    if cache is None:  # pragma: no cover - every supported family returns a cache
        raise NeuroglotError(f"{wb.name} returned no key/value cache; causal_trace needs one.")
    return cache


def _group_logits(wb, ids: torch.Tensor, t: int, n_rows: int, prefix, row_sample: torch.Tensor) -> torch.Tensor:
    """Last-position logits of ``n_rows`` rows run on tokens ``t..T-1`` after the corrupted prefix."""
    T = ids.shape[1]
    rows = ids[:, t:].expand(n_rows, T - t)
    inputs = forward_inputs(wb, rows, torch.ones((n_rows, T), dtype=ids.dtype, device=ids.device))
    inputs["input_ids"] = rows
    if "position_ids" in inputs:
        inputs["position_ids"] = torch.arange(t, T, device=ids.device).expand(n_rows, T - t)
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_select_indices(row_sample.to(ids.device))
        inputs["past_key_values"] = cache
        inputs["use_cache"] = True
    else:
        inputs["attention_mask"] = inputs["attention_mask"][:, t:]
    return _last_logits(wb, inputs)


# ------------------------------------------------------- reference (per cell)


def causal_trace_per_cell(wb, prompt: str, subject: str, answer: str | None = None, kinds: Sequence[str] = KINDS,
                          samples: int = 10, noise: float = 3.0, sigma: float | None = None, window: int = 10,
                          seed: int = 0, max_rows: int = 256, progress: Progress | None = None,
                          language: str | None = None) -> TraceResult:
    """Reference causal trace written as ROME's ``trace_with_patch`` loop.

    For every cell one forward of the full ``wb.model`` (logits at every
    position) on ``1 + samples`` rows: row 0 clean, rows 1.. with the same
    noise as :func:`causal_trace` on the subject's embeddings, the cell's states
    of rows 1.. overwritten with row 0's inside that forward. The clean run is
    recomputed in every forward and no cell is skipped. ``max_rows`` is
    accepted for a common signature and unused.
    """
    started = time.perf_counter()
    prep = _prepare(wb, prompt, subject, answer, kinds, samples, noise, sigma, window, seed, max_rows, language)
    ids = prep.input_ids
    T, L = ids.shape[1], wb.n_layers
    report = progress or (lambda frac, message: None)
    with wb.lock, torch.no_grad():
        logits = _trace_with_patch(wb, ids, prep.subject, prep.noise, [])
        answer_id = prep.answer_id if prep.answer_id is not None else int(logits[0, -1].argmax())
        probs = torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]
        p_clean, p_corrupted = float(probs[0]), float(probs[1:].mean())
        scores = {}
        n_cells, done = len(prep.kinds) * T * L, 0
        for kind in prep.kinds:
            table = np.zeros((T, L), dtype=np.float64)
            for t in range(T):
                for layer in range(L):
                    states = [(t, kind, other) for other in restored_layers(kind, layer, int(window), L)]
                    logits = _trace_with_patch(wb, ids, prep.subject, prep.noise, states)
                    # ROME: softmax(logits[1:, -1, :]).mean(dim=0)[answer]
                    table[t, layer] = float(torch.softmax(logits[1:, -1].float(), dim=1).mean(dim=0)[answer_id])
                    done += 1
                    report(done / n_cells, f"{kind}: cell {done}/{n_cells}")
            scores[kind] = table
    meta = dict(prep.meta, seconds=round(time.perf_counter() - started, 3), method="per-cell")
    return TraceResult(prep.tokens, prep.subject, wb.tokenizer.decode([answer_id]), answer_id, p_clean,
                       p_corrupted, scores, meta)


def _trace_with_patch(wb, ids: torch.Tensor, subject: tuple[int, int], noise: torch.Tensor,
                      states: list[tuple[int, str, int]]) -> torch.Tensor:
    """ROME's ``trace_with_patch``: full logits [1 + samples, T, vocab]; noise on rows 1..'s
    subject embeddings; each (token, kind, layer) state of rows 1.. restored from row 0."""
    s0, s1 = subject
    rows = ids.expand(1 + noise.shape[0], ids.shape[1])

    def corrupt(module, args, output):
        first_tensor(output)[1:, s0:s1] += noise
        return None

    def restore(tokens: list[int]):
        def hook(module, args, output):
            h = first_tensor(output)
            for t in tokens:
                h[1:, t] = h[0, t]
            return None
        return hook

    patch_spec: dict[tuple[str, int], list[int]] = {}
    for t, kind, layer in states:
        patch_spec.setdefault((kind, layer), []).append(t)
    handles = [wb.arch.embedding(wb.model).register_forward_hook(corrupt)]
    try:
        for (kind, layer), tokens in patch_spec.items():
            handles.append(kind_module(wb, kind, layer).register_forward_hook(restore(tokens)))
        return wb.model(input_ids=rows, attention_mask=torch.ones_like(rows), use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- averages


def token_categories(result: TraceResult) -> dict[str, list[int]]:
    """Token indices of ROME's categories in one trace (a category may be empty).

    First / middle / last subject token; the first token after the subject and
    the further ones before the last token; the last token. The last token is
    also in the subject or first-subsequent category when it is one of those;
    a one-token subject is both its first and its last token.
    """
    s0, s1 = result.subject_range
    last = len(result.tokens) - 1
    return {
        "First subject token": [s0],
        "Middle subject tokens": list(range(s0 + 1, s1 - 1)),
        "Last subject token": [s1 - 1],
        "First subsequent token": [s1] if s1 <= last else [],
        "Further tokens": list(range(s1 + 1, last)),
        "Last token": [last],
    }


def _average(results: Sequence[TraceResult], kind: str, effect: bool) -> pd.DataFrame:
    if not results:
        raise InputError("No traces to average.")
    layers = {r.n_layers for r in results if kind in r.scores}
    missing = [i for i, r in enumerate(results) if kind not in r.scores]
    if missing:
        raise InputError(f"Trace {missing[0]} has no {kind!r} scores.")
    if len(layers) != 1:
        raise InputError(f"The traces come from models with different layer counts: {sorted(layers)}.")
    n_layers = layers.pop()
    sums = {c: np.zeros(n_layers) for c in CATEGORIES}
    facts = dict.fromkeys(CATEGORIES, 0)
    for r in results:
        values = r.indirect_effect(kind) if effect else r.scores[kind]
        for category, tokens in token_categories(r).items():
            if tokens:
                sums[category] += values[tokens].mean(axis=0)
                facts[category] += 1
    table = np.array([sums[c] / facts[c] if facts[c] else np.full(n_layers, np.nan) for c in CATEGORIES])
    frame = pd.DataFrame(table, index=pd.Index(CATEGORIES, name="token"),
                         columns=pd.RangeIndex(n_layers, name="layer"))
    frame.attrs["facts"] = facts
    frame.attrs["kind"] = kind
    return frame


def average_effects(results: Sequence[TraceResult], kind: str) -> pd.DataFrame:
    """Average indirect effect (ROME's AIE; langedit Fig. 5): rows = :data:`CATEGORIES`, columns = layers.

    Per fact the effects (``score - p_corrupted``) of a category's tokens are
    averaged first, then the facts; a category a fact lacks is skipped for that
    fact (a row no fact has is NaN). ``frame.attrs["facts"]`` holds the number of
    facts behind each row (also :func:`category_facts`).
    """
    return _average(results, kind, effect=True)


def average_scores(results: Sequence[TraceResult], kind: str) -> pd.DataFrame:
    """As :func:`average_effects`, with the restored probability itself instead of the effect."""
    return _average(results, kind, effect=False)


def category_facts(results: Sequence[TraceResult]) -> pd.Series:
    """How many of ``results`` have at least one token in each of ROME's categories."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for r in results:
        for category, tokens in token_categories(r).items():
            counts[category] += bool(tokens)
    return pd.Series(counts, name="facts")


# ------------------------------------------------------------------ corpora


class FactTraces(dict):
    """``{language: [TraceResult, ...]}`` (the same facts, in the same order, in every language),
    with ``skipped`` (facts left out, and why) and ``meta`` (the request, from a run folder)."""

    def __init__(self, *args, skipped: list[dict] | None = None, meta: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: list[dict] = list(skipped or [])
        self.meta: dict[str, Any] = dict(meta or {})


def _fact_prompts(rows: pd.DataFrame) -> dict[str, tuple[str, str, str, str]] | str:
    """For one fact: language -> (prompt, subject, object, template_id) of the first template whose
    prompt contains the subject; or the reason the fact cannot be traced."""
    out = {}
    for language, group in rows.groupby("language", sort=False):
        usable = [(str(r.prompt), str(r.subject), str(r.object), str(r.template_id))
                  for r in group.itertuples(index=False) if str(r.subject) in str(r.prompt)]
        if not usable:
            return f"no {language} prompt contains the subject {str(group['subject'].iloc[0])!r}"
        out[str(language)] = usable[0]
    return out


def fact_prompt(rows: pd.DataFrame, fact_id: str, languages: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    """One corpus fact in each language: (prompt, subject, object) of its first prompt that contains the subject."""
    mine = rows[(rows["fact_id"] == fact_id) & rows["language"].isin(list(languages))]
    if mine.empty:
        raise InputError(f"Fact {fact_id!r} is not in the corpus in {', '.join(languages)}.")
    found = _fact_prompts(mine)
    if isinstance(found, str):
        raise InputError(f"Fact {fact_id!r} cannot be traced: {found}.")
    absent = [lang for lang in languages if lang not in found]
    if absent:
        raise InputError(f"Fact {fact_id!r} has no prompt in {', '.join(absent)}.")
    return {lang: found[lang][:3] for lang in languages}


def trace_facts(wb, corpus, languages: Sequence[str], max_facts: int = 20, kinds: Sequence[str] = KINDS,
                samples: int = 10, noise: float = 3.0, window: int = 10, seed: int = 0, answer: str = "object",
                progress: Progress | None = None, sigma: float | None = None,
                max_rows: int = 256) -> FactTraces:
    """Causal traces of up to ``max_facts`` facts present in every one of ``languages``.

    Facts (``(relation, fact_id)`` of ``corpus.aligned(languages)``) are taken in a
    fixed order, a permutation of the sorted ids drawn from ``seed``, until
    ``max_facts`` are traced. Per fact and language one prompt is traced: the
    first template row whose prompt contains the subject. A fact with no such
    row in some language, or whose subject no token covers, is skipped in all
    languages and listed in ``result.skipped``. ``answer="object"`` traces the
    first token of the corpus object, ``"model"`` the model's own prediction.
    """
    languages = check_languages(languages)
    if answer not in ANSWERS:
        raise InputError(f"Unknown answer {answer!r}: use 'object' (the corpus object) or 'model' (the prediction).")
    if not _is_number(max_facts) or int(max_facts) < 1:
        raise InputError(f"max_facts must be a whole number >= 1; got {max_facts!r}.")
    check_parameters(kinds, samples, window, max_rows, seed)  # not per fact: a bad value is no skipped fact
    aligned = corpus.aligned(languages)
    sigma_given = sigma is not None
    sigma = noise_sigma(wb, noise, sigma)  # once for all facts
    rows = aligned.rows
    keys = sorted(rows[["relation", "fact_id"]].drop_duplicates().itertuples(index=False, name=None))
    order = np.random.default_rng(int(seed)).permutation(len(keys))
    by_fact = {key: group for key, group in rows.groupby(["relation", "fact_id"], sort=False)}
    out = FactTraces({lang: [] for lang in languages})
    report = progress or (lambda frac, message: None)
    wanted = int(max_facts)
    done = 0
    for index in order:
        if done >= wanted:
            break
        relation, fact_id = keys[index]
        prompts = _fact_prompts(by_fact[(relation, fact_id)])
        if isinstance(prompts, str):
            out.skipped.append({"relation": relation, "fact_id": fact_id, "reason": prompts})
            log.info("causal tracing skips fact %s: %s", fact_id, prompts)
            continue
        traced: dict[str, TraceResult] = {}
        try:
            for li, lang in enumerate(languages):
                prompt, subject, obj, template_id = prompts[lang]

                def step(frac: float, message: str, _li: int = li) -> None:
                    report((done + (_li + frac) / len(languages)) / wanted,
                           f"Fact {done + 1}/{wanted} ({fact_id}, {lang}): {message}")

                result = causal_trace(wb, prompt, subject, answer=obj if answer == "object" else None, kinds=kinds,
                                      samples=samples, sigma=sigma, window=window, seed=seed, max_rows=max_rows,
                                      progress=step, language=lang)
                result.meta.update(noise=float(noise), sigma_given=sigma_given, relation=relation, fact_id=fact_id, object=obj,
                                   template_id=template_id)
                traced[lang] = result
        except InputError as exc:
            out.skipped.append({"relation": relation, "fact_id": fact_id, "reason": str(exc)})
            log.info("causal tracing skips fact %s: %s", fact_id, exc)
            continue
        for lang in languages:
            out[lang].append(traced[lang])
        done += 1
    report(1.0, f"Traced {done} fact(s) in {len(languages)} language(s); skipped {len(out.skipped)}")
    return out


# -------------------------------------------------------------- run folders


def save_traces(folder: str | Path, traces: dict[str, list[TraceResult]], meta: dict[str, Any] | None = None) -> Path:
    """Write ``scores.npz`` (every score table) and ``manifest.json`` (everything else) into ``folder``.

    Both files are written atomically, the manifest last, so a folder with a
    manifest is complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, list[dict]] = {}
    for li, (lang, results) in enumerate(traces.items()):
        entries[lang] = []
        for i, r in enumerate(results):
            record = r.to_dict()
            record["scores"] = {}
            for kind, table in r.scores.items():
                name = f"l{li}_{i}_{kind}"
                arrays[name] = np.asarray(table, dtype=np.float64)
                record["scores"][kind] = name
            entries[lang].append(record)
    atomic_write(folder / "scores.npz", lambda f: np.savez_compressed(f, **arrays))
    manifest = dict(_manifest_head(traces, meta), traces=entries)
    atomic_write(folder / "manifest.json",
                  lambda f: f.write(json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")))
    return folder


def _manifest_head(traces: dict[str, list[TraceResult]], meta: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of a run folder without the traces (what ``load_traces(...).meta`` returns)."""
    return dict(meta or {}, version=CAUSAL_TRACE_VERSION, languages=list(traces),
                facts={lang: len(results) for lang, results in traces.items()},
                skipped=list(getattr(traces, "skipped", [])))


def load_traces(folder: str | Path) -> FactTraces:
    """Read a folder written by :func:`save_traces`; ``.meta`` is its manifest without the traces."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        with np.load(folder / "scores.npz") as z:
            out = FactTraces()
            for lang in manifest["languages"]:
                results = []
                for record in manifest["traces"][lang]:
                    record = dict(record, scores={kind: z[name] for kind, name in record["scores"].items()})
                    results.append(TraceResult.from_dict(record))
                out[lang] = results
        out.skipped = list(manifest.get("skipped", []))
        out.meta = {k: v for k, v in manifest.items() if k != "traces"}
        return out
    except FileNotFoundError as exc:
        raise NeuroglotError(f"{folder} is not a causal-tracing run folder (no manifest.json / scores.npz).") from exc
    except (ValueError, KeyError, TypeError, AttributeError, OSError, EOFError,
            zipfile.BadZipFile, zlib.error) as exc:  # truncated, overwritten or hand-edited files
        raise NeuroglotError(f"{folder} holds a damaged causal-tracing run: {exc}") from exc


def trace_request(wb, corpus, languages: Sequence[str], max_facts: int, kinds: Sequence[str], samples: int,
                  noise: float, sigma: float | None, window: int, seed: int, answer: str) -> dict[str, Any]:
    """Everything that determines a :func:`trace_facts` result, as plain data (with its hash as ``key``)."""
    rows = corpus.rows[corpus.rows["language"].isin(languages)]
    corpus_hash = hashlib.sha1(pd.util.hash_pandas_object(
        rows[["relation", "fact_id", "language", "subject", "object", "prompt", "template_id"]], index=False
    ).values.tobytes()).hexdigest()
    request = {"model": wb.spec, "model_name": wb.name, "parameters": wb.n_params, "dtype": str(wb.dtype),
               "corpus": corpus.name, "corpus_hash": corpus_hash, "languages": list(languages),
               "max_facts": int(max_facts), "kinds": list(kinds if not isinstance(kinds, str) else [kinds]),
               "samples": int(samples), "noise": float(noise), "sigma": None if sigma is None else float(sigma),
               "window": int(window), "seed": int(seed), "answer": answer, "version": CAUSAL_TRACE_VERSION}
    request["key"] = hashlib.sha1(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    return request


def trace_run(wb, corpus, languages: Sequence[str], max_facts: int = 20, kinds: Sequence[str] = KINDS,
              samples: int = 10, noise: float = 3.0, sigma: float | None = None, window: int = 10, seed: int = 0,
              answer: str = "object", folder: str | Path | None = None, max_rows: int = 256,
              progress: Progress | None = None, overwrite: bool = False) -> tuple[FactTraces, Path, bool]:
    """:func:`trace_facts` through a run folder: reused when its manifest matches the request.

    ``folder`` defaults to ``<cache>/runs/trace-<key>``. A folder holding another
    request or another command's results is refused before any work unless
    ``overwrite``; damaged files of the same request are recomputed. Returns
    ``(traces, folder, reused)``.
    """
    from analysis.model import cache_root

    languages = check_languages(languages)
    request = trace_request(wb, corpus, languages, max_facts, kinds, samples, noise, sigma, window, seed, answer)
    folder = Path(folder) if folder is not None else cache_root() / "runs" / f"trace-{request['key']}"
    info = runs.claim(folder, "trace", request["key"], request, overwrite)
    if info.state == "run" and info.key == request["key"]:
        try:
            saved = load_traces(folder)
            if saved.meta.get("request", {}).get("key") == request["key"]:
                return saved, folder, True
        except NeuroglotError:
            pass  # damaged folder: recompute and replace
    started = time.perf_counter()
    traces = trace_facts(wb, corpus, languages, max_facts=max_facts, kinds=kinds, samples=samples, noise=noise,
                         window=window, seed=seed, answer=answer, progress=progress, sigma=sigma, max_rows=max_rows)
    meta = {"request": request, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
            "seconds": round(time.perf_counter() - started, 2)}
    runs.write_run(folder, "trace", request["key"], request, lambda tmp: save_traces(tmp, traces, meta))
    traces.meta = _manifest_head(traces, meta)
    return traces, folder, False


def prompt_trace_run(wb, prompt: str, subject: str, answer: str | None = None, kinds: Sequence[str] = KINDS,
                     samples: int = 10, noise: float = 3.0, window: int = 10, seed: int = 0,
                     language: str | None = None, folder: str | Path | None = None, max_rows: int = 256,
                     progress: Progress | None = None) -> tuple[TraceResult, Path, bool]:
    """:func:`causal_trace` of one prompt through a run folder, reused when the same request comes again (the
    app's page reads it back on every rerun, page switch and in other sessions). ``folder`` defaults to
    ``<cache>/runs/trace1-<key>``. Returns ``(result, folder, reused)``."""
    from analysis.model import cache_root

    request = {"model": wb.spec, "model_name": wb.name, "parameters": wb.n_params, "dtype": str(wb.dtype),
               "prompt": prompt, "subject": subject, "answer": answer, "language": language,
               "kinds": list(kinds), "samples": int(samples), "noise": float(noise), "window": int(window),
               "seed": int(seed), "version": CAUSAL_TRACE_VERSION}
    key = runs.request_key(request)
    folder = Path(folder) if folder is not None else cache_root() / "runs" / f"trace1-{key}"
    info = runs.claim(folder, "trace", key, request)
    if info.state == "run" and info.key == key:
        try:
            return load_traces(folder)[language or "?"][0], folder, True
        except (NeuroglotError, KeyError, IndexError):
            pass  # damaged folder: recompute and replace
    result = causal_trace(wb, prompt, subject, answer, kinds=kinds, samples=samples, noise=noise, window=window,
                          seed=seed, max_rows=max_rows, progress=progress, language=language)
    traces = FactTraces()
    traces[language or "?"] = [result]
    runs.write_run(folder, "trace", key, request,
                   lambda tmp: save_traces(tmp, traces, {"request": dict(request, key=key)}))
    return result, folder, False
