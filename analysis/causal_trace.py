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
:func:`analysis.reference.causal_trace_per_cell` draw them with :func:`analysis.trace_setup.subject_noise`.

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

Interventions are plain PyTorch forward hooks (:class:`analysis.hooks.Hooks`,
removed whatever happens), not nnsight. Why: one set of hooks serves every
forward of a trace (the clean/corrupted run that records, the prefix runs, the
restored chunks) and reads from a small mutable plan which rows to restore at
which layer, so a chunk costs no graph building; the restored runs hand a
key/value cache to the base model and read nothing back but the last
hidden state, where nnsight would add a traced call per forward for no gain;
and the reference :func:`analysis.reference.causal_trace_per_cell` uses hooks too,
as ROME's ``nethook.TraceDict`` does, so both paths patch the same module outputs
the same way. Outputs that are tuples are patched in place through
:func:`analysis.arch.first_tensor`.

σ deviates from ROME: ROME uses 3 × the standard deviation of the embeddings of
the subjects of its fact set; we use ``noise`` (3 by default) × the standard
deviation of the embedding module's output over the whole vocabulary
(:func:`analysis.trace_setup.embedding_noise_std`), which needs no fact set and is the same for every
prompt and language. ``sigma=`` sets an absolute σ instead.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.arch import first_tensor
from analysis import runs
from analysis.errors import InputError, NeuroglotError
from analysis.hooks import Hooks
from analysis.neurons import check_languages
from analysis.runs import Params
from analysis.trace_setup import KINDS, check_parameters, is_number, kind_module, noise_sigma, prepare, restored_layers

if TYPE_CHECKING:
    from analysis.model import Workbench

log = logging.getLogger(__name__)

#: ROME's token categories for average indirect effects (Fig. 1/2 of ROME; langedit Fig. 5).
CATEGORIES: tuple[str, ...] = (
    "First subject token", "Middle subject tokens", "Last subject token",
    "First subsequent token", "Further tokens", "Last token",
)
ANSWERS = ("object", "model")
#: Bumped when what a trace computes changes, so older run folders are not reused.
CAUSAL_TRACE_VERSION = 1

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class TraceParams(Params):
    """Parameters of a causal trace; the defaults of ``neuroglot trace`` and the Causal-tracing page."""

    kinds: tuple[str, ...] | str = KINDS   # states restored: any of hidden, mlp, attn
    samples: int = 10                       # noise draws per cell
    noise: float = 3.0                      # σ = noise × the std of the token embeddings
    sigma: float | None = None              # an absolute σ instead
    window: int = 10                        # layers restored together for mlp and attn (ROME's window)
    seed: int = 0                           # of the noise (and of the facts' order)
    max_rows: int = 256                     # rows per forward
    max_facts: int = 20                     # facts of a corpus request


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

    def strongest(self, kind: str) -> tuple[int, int]:
        """(token index, layer) of the state of ``kind`` whose restoration brings the answer back most."""
        t, layer = np.unravel_index(np.argmax(self.indirect_effect(kind)), self.scores[kind].shape)
        return int(t), int(layer)

    def summary(self) -> str:
        """The trace in one line, as the CLI and the Causal-tracing page print it: the answer's probability
        clean and corrupted, and per kind the state that restores it most."""
        best = {k: self.strongest(k) for k in self.scores}
        return (f"clean p = {self.p_clean:.4f}, corrupted p = {self.p_corrupted:.4f}; strongest restoration " +
                ", ".join(f"{k} at token {self.tokens[t]!r} layer {layer} (p = {self.scores[k][t, layer]:.4f})"
                          for k, (t, layer) in best.items()))

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
def _hooks(wb: Workbench, kinds: Sequence[str], plan: _Plan) -> Iterator[None]:
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

    with Hooks() as hooks:
        hooks.forward(wb.arch.embedding(wb.model), add_noise)
        for layer in range(wb.n_layers):
            for kind in kinds:
                hooks.forward(kind_module(wb, kind, layer), state_hook(kind, layer))
        yield


def causal_trace(wb: Workbench, prompt: str, subject: str, answer: str | None = None,
                 params: TraceParams | None = None, *, progress: Progress | None = None,
                 language: str | None = None, **changes: Any) -> TraceResult:
    """Causal trace of ``prompt`` with noise on ``subject``'s tokens (batched; see the module docstring).

    ``answer=None`` traces the model's own greedy next token (as ROME does);
    else the first token of ``answer`` as written after the prompt. ``params``:
    :class:`TraceParams`, or its fields as keywords. ``kinds``: any of "hidden",
    "mlp", "attn". Every cell's score is P(answer) averaged over ``samples``
    corrupted runs, all cells seeing the same noise (σ = ``sigma``, or ``noise`` ×
    :func:`analysis.trace_setup.embedding_noise_std`). At most ``max_rows`` rows go through one
    forward. ``progress(frac, message)`` is called after each forward.
    """
    started = time.perf_counter()
    params = TraceParams.of(params, **changes)
    window, max_rows = params.window, params.max_rows
    prep = prepare(wb, prompt, subject, answer, params, language)
    ids, (s0, s1), S = prep.input_ids, prep.subject, int(params.samples)
    T, L, device = ids.shape[1], wb.n_layers, wb.device
    report = progress or (lambda frac, message: None)
    plan = _Plan()
    scores: dict[str, np.ndarray] = {}
    with wb.lock, torch.no_grad(), _hooks(wb, prep.kinds, plan):
        # clean (row 0, recorded) and corrupted (rows 1..S) runs in one forward
        rows = ids.expand(1 + S, T)
        plan.record, plan.noise, plan.noise_from_row = {}, (s0, s1, prep.noise), 1
        logits = wb.logits_at(wb.forward_inputs(rows, torch.ones_like(rows)))
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


def _corrupted_prefix(wb: Workbench, ids: torch.Tensor, t: int, noise: torch.Tensor, subject: tuple[int, int],
                      plan: _Plan):
    """Key/value cache of the corrupted run over tokens ``0..t-1``, one row per sample (None for t = 0)."""
    if t == 0:
        return None
    s0, s1 = subject
    S = noise.shape[0]
    rows = ids[:, :t].expand(S, t)
    b = min(s1, t)
    plan.restore, plan.noise = {}, ((s0, b, noise[:, : b - s0]) if s0 < b else None)
    inputs = wb.forward_inputs(rows, torch.ones_like(rows))
    inputs["use_cache"] = True
    base, _ = wb.base_model()
    cache = wb.returned_cache(base(**inputs))
    plan.noise = None
    if cache is None:  # pragma: no cover - every supported family returns a cache
        raise NeuroglotError(f"{wb.name} returned no key/value cache; causal_trace needs one.")
    return cache


def _group_logits(wb: Workbench, ids: torch.Tensor, t: int, n_rows: int, prefix,
                  row_sample: torch.Tensor) -> torch.Tensor:
    """Last-position logits of ``n_rows`` rows run on tokens ``t..T-1`` after the corrupted prefix."""
    T = ids.shape[1]
    rows = ids[:, t:].expand(n_rows, T - t)
    inputs = wb.forward_inputs(rows, torch.ones((n_rows, T), dtype=ids.dtype, device=ids.device))
    inputs["input_ids"] = rows
    if "position_ids" in inputs:
        inputs["position_ids"] = torch.arange(t, T, device=ids.device).expand(n_rows, T - t)
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_select_indices(row_sample.to(ids.device))
        wb.with_cache(inputs, cache)
    else:
        inputs["attention_mask"] = inputs["attention_mask"][:, t:]
    return wb.logits_at(inputs)


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

    def summary(self) -> str:
        """What was traced, as the CLI and the Causal-tracing page print it: ``en: 10 facts, zh: 10 facts``."""
        return ", ".join(f"{lang}: {len(results)} facts" for lang, results in self.items())


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


def trace_facts(wb: Workbench, corpus, languages: Sequence[str], params: TraceParams | None = None, *,
                answer: str = "object", progress: Progress | None = None, **changes: Any) -> FactTraces:
    """Causal traces of up to ``max_facts`` facts present in every one of ``languages``
    (``params``: :class:`TraceParams`, or its fields as keywords).

    Facts (``(relation, fact_id)`` of ``corpus.aligned(languages)``) are taken in a
    fixed order, a permutation of the sorted ids drawn from ``seed``, until
    ``max_facts`` are traced. Per fact and language one prompt is traced: the
    first template row whose prompt contains the subject. A fact with no such
    row in some language, or whose subject no token covers, is skipped in all
    languages and listed in ``result.skipped``. ``answer="object"`` traces the
    first token of the corpus object, ``"model"`` the model's own prediction.
    """
    params = TraceParams.of(params, **changes)
    max_facts, noise, seed = params.max_facts, params.noise, params.seed
    languages = check_languages(languages)
    if answer not in ANSWERS:
        raise InputError(f"Unknown answer {answer!r}: use 'object' (the corpus object) or 'model' (the prediction).")
    if not is_number(max_facts) or int(max_facts) < 1:
        raise InputError(f"max_facts must be a whole number >= 1; got {max_facts!r}.")
    check_parameters(params.kinds, params.samples, params.window, params.max_rows, seed)  # not per fact
    aligned = corpus.aligned(languages)
    sigma_given = params.sigma is not None
    per_fact = dataclasses.replace(params, sigma=noise_sigma(wb, noise, params.sigma))  # σ once for all facts
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

                result = causal_trace(wb, prompt, subject, answer=obj if answer == "object" else None,
                                      params=per_fact, progress=step, language=lang)
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
    runs.write_arrays(folder / "scores.npz", **arrays)
    runs.write_json(folder / "manifest.json", dict(_manifest_head(traces, meta), traces=entries))
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
        manifest, z = runs.read_manifest(folder, "scores.npz")
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


def trace_request(wb: Workbench, corpus, languages: Sequence[str], params: TraceParams,
                  answer: str) -> dict[str, Any]:
    """Everything that determines a :func:`trace_facts` result, as plain data (with its hash as ``key``)."""
    kinds, sigma = params.kinds, params.sigma
    rows = corpus.rows[corpus.rows["language"].isin(languages)]
    corpus_hash = hashlib.sha1(pd.util.hash_pandas_object(
        rows[["relation", "fact_id", "language", "subject", "object", "prompt", "template_id"]], index=False
    ).values.tobytes()).hexdigest()
    request = {"model": wb.spec, "model_name": wb.name, "parameters": wb.n_params, "dtype": str(wb.dtype),
               "corpus": corpus.name, "corpus_hash": corpus_hash, "languages": list(languages),
               "max_facts": int(params.max_facts), "kinds": list(kinds if not isinstance(kinds, str) else [kinds]),
               "samples": int(params.samples), "noise": float(params.noise),
               "sigma": None if sigma is None else float(sigma), "window": int(params.window),
               "seed": int(params.seed), "answer": answer, "version": CAUSAL_TRACE_VERSION}
    request["key"] = hashlib.sha1(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    return request


def trace_run(wb: Workbench, corpus, languages: Sequence[str], params: TraceParams | None = None, *,
              answer: str = "object", folder: str | Path | None = None, progress: Progress | None = None,
              overwrite: bool = False, **changes: Any) -> tuple[FactTraces, Path, bool]:
    """:func:`trace_facts` (``params``: :class:`TraceParams`, or its fields as keywords) through a run
    folder: reused when its manifest matches the request.

    ``folder`` defaults to ``<cache>/runs/trace-<key>``. A folder holding another
    request or another command's results is refused before any work unless
    ``overwrite``; damaged files of the same request are recomputed. Returns
    ``(traces, folder, reused)``.
    """
    from analysis.model import cache_root

    params = TraceParams.of(params, **changes)
    languages = check_languages(languages)
    request = trace_request(wb, corpus, languages, params, answer)
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
    traces = trace_facts(wb, corpus, languages, params, answer=answer, progress=progress)
    meta = {"request": request, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": runs.versions(),
            "seconds": round(time.perf_counter() - started, 2)}
    runs.write_run(folder, "trace", request["key"], request, lambda tmp: save_traces(tmp, traces, meta))
    traces.meta = _manifest_head(traces, meta)
    return traces, folder, False


def prompt_trace_run(wb: Workbench, prompt: str, subject: str, answer: str | None = None,
                     params: TraceParams | None = None, *, language: str | None = None,
                     folder: str | Path | None = None, progress: Progress | None = None,
                     **changes: Any) -> tuple[TraceResult, Path, bool]:
    """:func:`causal_trace` of one prompt through a run folder, reused when the same request comes again (the
    app's page reads it back on every rerun, page switch and in other sessions). ``folder`` defaults to
    ``<cache>/runs/trace1-<key>``. Returns ``(result, folder, reused)``."""
    from analysis.model import cache_root

    params = TraceParams.of(params, **changes)
    kinds, samples, noise, window, seed = params.kinds, params.samples, params.noise, params.window, params.seed
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
    result = causal_trace(wb, prompt, subject, answer, params, progress=progress, language=language)
    traces = FactTraces()
    traces[language or "?"] = [result]
    runs.write_run(folder, "trace", key, request,
                   lambda tmp: save_traces(tmp, traces, {"request": dict(request, key=key)}))
    return result, folder, False
