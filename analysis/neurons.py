"""Factual, language-agnostic and language-specific FFN neurons.

papers/lu-lafns.md §3.2:

* lu-lafns Eq. 4 — ``N^i = {n_j^i}``, ``n_j^i`` = number of tokens of the corpus ``C_l``
  for which neuron j of layer i is activated, ``act_fn(h W1)_j > 0``
  (:func:`count_activations`).
* lu-lafns Eq. 5 — factual neurons of language l in layer i:
  ``D_l^i = {j | n_j^i / max(N^i) > β}`` (:func:`factual_neurons`).
* lu-lafns Eq. 6 — language-agnostic factual neurons (LAFNs):
  ``D^i = D_{l1}^i ∩ ... ∩ D_{lL}^i`` (:func:`language_agnostic_neurons`).

Language-specific neurons are a language's factual neurons found in no other
chosen language (:func:`language_specific_neurons`). As a second,
threshold-free measure we compute LAPE, the language activation probability
entropy of Tang et al. (2024) (:func:`lape`, :func:`lape_specific_neurons`).

Tokens counted: every real token of each text (the paper) — padding and the
tokenizer's special tokens (BOS/EOS) never count; or only the subject's
tokens; or only the last token.
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.arch import resolve
from analysis.errors import InputError, NeuroglotError
from analysis import runs
from analysis.runs import Params, versions
from analysis.tokens import encode

if TYPE_CHECKING:
    from analysis.model import Workbench

POSITIONS = ("all", "subject", "last")
TEXTS = ("statement", "prompt")
LAFN = "LAFN"
#: Bumped when count_activations changes what it counts, so older run folders are not reused.
#: 2: position ids follow the attention mask; subjects are found in the prompt part of a statement.
COUNTING_VERSION = 2

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CountParams(Params):
    """What lu-lafns Eq. 4 counts and how; the defaults of ``neuroglot neurons`` and the Atlas page."""

    positions: str = "all"       # tokens counted: all, subject or last (POSITIONS)
    text: str = "statement"      # statement (the full sentence, as the paper) or prompt (TEXTS)
    batch_size: int = 32         # texts per forward


# --------------------------------------------------------------------- counts


@dataclass
class NeuronCounts:
    """lu-lafns Eq. 4 counts for several languages, with the totals needed to normalise them."""

    languages: list[str]
    counts: np.ndarray            # int64 [n_languages, n_layers, n_neurons]
    tokens: np.ndarray            # int64 [n_languages] tokens counted per language
    texts: np.ndarray             # int64 [n_languages] texts traced per language
    positions: str = "all"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        self.texts = np.asarray(self.texts, dtype=np.int64)
        if self.counts.ndim != 3 or self.counts.shape[0] != len(self.languages):
            raise ValueError("counts must be [n_languages, n_layers, n_neurons]")
        if self.tokens.shape != (len(self.languages),) or self.texts.shape != (len(self.languages),):
            raise ValueError("tokens and texts must hold one number per language")

    @property
    def n_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def n_neurons(self) -> int:
        return self.counts.shape[2]

    def summary(self) -> str:
        """What was counted, as the CLI and the Atlas page print it: ``en: 1,234 tokens, zh: 987 tokens``."""
        return ", ".join(f"{lang}: {int(n):,} tokens" for lang, n in zip(self.languages, self.tokens))

    def of(self, language: str) -> np.ndarray:
        """Counts of one language, [n_layers, n_neurons]."""
        return self.counts[self._index(language)]

    def probabilities(self) -> np.ndarray:
        """Activation probability per language: counts / tokens counted, [n_languages, L, F]."""
        return self.counts / np.maximum(self.tokens, 1)[:, None, None]

    def select(self, languages: Sequence[str]) -> "NeuronCounts":
        idx = [self._index(lang) for lang in languages]
        return NeuronCounts(list(languages), self.counts[idx], self.tokens[idx], self.texts[idx],
                            self.positions, dict(self.meta))

    def _index(self, language: str) -> int:
        try:
            return self.languages.index(language)
        except ValueError:
            raise InputError(f"Language {language!r} was not counted; counted: {', '.join(self.languages)}.") from None

    # run folders -----------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``counts.npz`` + ``manifest.json`` atomically into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        runs.write_arrays(folder / "counts.npz", counts=self.counts, tokens=self.tokens, texts=self.texts)
        per_language = lambda values: dict(zip(self.languages, values.tolist()))  # noqa: E731
        runs.write_json(folder / "manifest.json", dict(
            self.meta, languages=self.languages, positions=self.positions, shape=list(self.counts.shape),
            tokens=per_language(self.tokens), texts=per_language(self.texts)))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "NeuronCounts":
        try:
            manifest, arrays = runs.read_manifest(folder, "counts.npz")
            counts, tokens, texts = arrays["counts"], arrays["tokens"], arrays["texts"]
            meta = {k: v for k, v in manifest.items()
                    if k not in ("languages", "positions", "shape", "tokens", "texts")}
            return cls(list(manifest["languages"]), counts, tokens, texts, str(manifest["positions"]), meta)
        except FileNotFoundError as exc:
            raise NeuroglotError(f"{folder} is not a neuron run folder (no manifest.json / counts.npz).") from exc
        except (ValueError, KeyError, TypeError, AttributeError, OSError, EOFError,
                zipfile.BadZipFile, zlib.error) as exc:  # truncated, overwritten or hand-edited files
            raise NeuroglotError(f"{folder} holds a damaged neuron run: {exc}") from exc


def check_languages(languages: Sequence[str], at_least: int = 1) -> list[str]:
    languages = list(dict.fromkeys(languages))  # keep order, drop repeats
    if len(languages) < at_least:
        raise InputError(f"Choose at least {at_least} language{'s' if at_least > 1 else ''}; got {languages or 'none'}.")
    return languages


def corpus_texts(corpus, language: str, text: str = "statement") -> tuple[list[str], list[str]]:
    """The texts of one language (full statements, or prompts cut before the object) and their subjects."""
    texts, subjects, _ = _texts_with_subjects(corpus, language, text)
    return texts, subjects


def _texts_with_subjects(corpus, language: str, text: str) -> tuple[list[str], list[str], list[int | None]]:
    """:func:`corpus_texts` plus, per text, where the search for its subject ends: the end of
    the prompt inside a statement (the object may repeat the subject), else None."""
    if text not in TEXTS:
        raise InputError(f"Unknown text {text!r}: use 'statement' (the paper) or 'prompt'.")
    rows = corpus.rows[corpus.rows["language"] == language]
    prompts = [str(p) for p in rows["prompt"]]
    subjects = [str(s) for s in rows["subject"]]
    if text == "prompt":
        return prompts, subjects, [None] * len(prompts)
    statements = [str(t) for t in corpus.statements(language)]
    ends = [len(p) if t.startswith(p) else None for t, p in zip(statements, prompts)]
    return statements, subjects, ends


def count_activations(wb: Workbench, corpus, languages: Sequence[str], params: CountParams | None = None, *,
                      progress: Progress | None = None, **changes: Any) -> NeuronCounts:
    """lu-lafns Eq. 4: per language, how often each neuron of each layer is activated (> 0).

    ``params`` (:class:`CountParams`, or its fields as keywords: ``positions``,
    ``text``, ``batch_size``) say what is counted. Traces the neuron site
    (``act_fn(h W1)``) of every layer with nnsight, on the decoder stack only (no
    LM head). Texts are sorted by length and batched; counts accumulate as int64
    on the CPU, so a corpus of any size streams through in constant memory.
    ``progress(done, total)`` is called after each batch.
    """
    params = CountParams.of(params, **changes)
    positions, text, batch_size = params.positions, params.text, params.batch_size
    languages = check_languages(languages)
    if positions not in POSITIONS:
        raise InputError(f"Unknown positions {positions!r}: use {', '.join(POSITIONS)}.")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1.")
    missing = [lang for lang in languages if lang not in set(corpus.rows["language"])]
    if missing:
        raise InputError(f"The corpus {corpus.name!r} has no prompts in {', '.join(missing)}; "
                         f"it has {', '.join(corpus.languages)}.")
    per_language = {lang: _texts_with_subjects(corpus, lang, text) for lang in languages}
    total = sum(len(t) for t, _, _ in per_language.values())
    n_layers, n_neurons = wb.n_layers, wb.n_neurons
    counts = np.zeros((len(languages), n_layers, n_neurons), dtype=np.int64)
    tokens = np.zeros(len(languages), dtype=np.int64)
    texts_done = np.zeros(len(languages), dtype=np.int64)
    started, done = time.perf_counter(), 0
    for li, lang in enumerate(languages):
        texts, subjects, ends = per_language[lang]
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch_texts = [texts[i] for i in idx]
            if positions == "subject":
                batch = encode(wb.tokenizer, batch_texts, [subjects[i] for i in idx], [ends[i] for i in idx])
            else:
                batch = encode(wb.tokenizer, batch_texts)
            batch = batch.to(wb.device)
            mask = batch.positions(positions)
            counts[li] += count_batch(wb, batch.input_ids, batch.attention_mask, mask)
            tokens[li] += int(mask.sum())
            texts_done[li] += len(idx)
            done += len(idx)
            if progress is not None:
                progress(done, total)
    meta = {"model": wb.spec, "model_name": wb.name, "corpus": corpus.name, "corpus_source": str(corpus.source),
            "text": text, "seconds": round(time.perf_counter() - started, 2)}
    return NeuronCounts(languages, counts, tokens, texts_done, positions, meta)


def count_batch(wb: Workbench, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """lu-lafns Eq. 4 for one batch: counts [n_layers, n_neurons] of activated neurons at the ``mask`` positions."""
    _, layers = wb.base_model()
    neuron = wb.arch.neuron
    counted = mask.reshape(-1).nonzero().squeeze(1)  # flat (row, token) indices of the counted positions
    per_layer: list[torch.Tensor] = []
    with wb.lock, torch.no_grad():
        nn_model = wb.tracer()
        with nn_model.trace(**wb.forward_inputs(input_ids, attention_mask)):
            for i in range(wb.n_layers):  # layer order, as the forward pass
                act = resolve(nn_model, f"{layers}.{i}.{neuron}").output
                # lu-lafns Eq. 4 on the counted positions only (no full-size mask product); an int32 sum
                # is exact, a batch has far fewer than 2**31 positions
                per_layer.append(act.flatten(0, 1).index_select(0, counted).gt(0).sum(0, dtype=torch.int32).save())
    return torch.stack(per_layer).cpu().numpy().astype(np.int64)


# ---------------------------------------------------------------- neuron sets


def check_beta(beta: float) -> float:
    """β as a float in [0, 1], or an InputError."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(beta) <= 1.0:
        raise InputError(f"β must be a number in [0, 1]; got {beta!r}.")
    return float(beta)


def factual_neurons(counts: NeuronCounts, beta: float) -> dict[str, np.ndarray]:
    """lu-lafns Eq. 5 per language and layer: ``n_j / max(N^i) > β`` → bool [n_layers, n_neurons].

    β = 0 keeps every neuron activated at least once; β = 1 keeps none
    (no ratio exceeds 1). A layer where no neuron fired has no factual neuron.
    """
    beta = check_beta(beta)
    out = {}
    for li, lang in enumerate(counts.languages):
        c = counts.counts[li].astype(np.float64)
        peak = c.max(axis=1, keepdims=True)
        ratio = np.divide(c, peak, out=np.zeros_like(c), where=peak > 0)
        out[lang] = ratio > beta
    return out


def _chosen(factual: dict[str, np.ndarray], languages: Sequence[str] | None, at_least: int) -> list[str]:
    languages = check_languages(languages if languages is not None else list(factual), at_least)
    unknown = [lang for lang in languages if lang not in factual]
    if unknown:
        raise InputError(f"No factual neurons for {', '.join(unknown)}; have {', '.join(factual)}.")
    return languages


def language_agnostic_neurons(factual: dict[str, np.ndarray], languages: Sequence[str] | None = None) -> np.ndarray:
    """lu-lafns Eq. 6: the LAFNs, the intersection of the chosen (≥ 2) languages' factual neurons."""
    languages = _chosen(factual, languages, 2)
    return np.logical_and.reduce([factual[lang] for lang in languages])


def language_specific_neurons(factual: dict[str, np.ndarray],
                              languages: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A language's factual neurons that are factual in no other chosen language."""
    languages = _chosen(factual, languages, 2)
    out = {}
    for lang in languages:
        others = np.logical_or.reduce([factual[o] for o in languages if o != lang])
        out[lang] = factual[lang] & ~others
    return out


def lape(counts: NeuronCounts) -> np.ndarray:
    """Language activation probability entropy (Tang et al., 2024), [n_layers, n_neurons].

    p_l = activation probability in language l (counts / tokens); the p_l are
    normalised over languages and LAPE = -Σ_l p'_l log p'_l. Low LAPE = the
    neuron fires in few languages. Neurons that never fire get the maximum, log L.
    """
    check_languages(counts.languages, 2)
    p = counts.probabilities()
    total = p.sum(axis=0)
    q = np.divide(p, total, out=np.full_like(p, 1.0 / len(counts.languages)), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, -q * np.log(q), 0.0)
    return terms.sum(axis=0)


def lape_specific_neurons(counts: NeuronCounts, entropy_quantile: float = 0.01,
                          probability_quantile: float = 0.95) -> dict[str, np.ndarray]:
    """Language-specific neurons by LAPE, following Tang et al. (2024).

    Candidates: neurons whose activation probability in some language is
    above the ``probability_quantile`` of all probabilities; among them the
    ``entropy_quantile`` with the lowest LAPE. A selected neuron belongs to
    every language where its probability passes that same threshold.
    """
    for name, q in (("entropy_quantile", entropy_quantile), ("probability_quantile", probability_quantile)):
        if not 0.0 < q < 1.0:
            raise InputError(f"{name} must be in (0, 1); got {q}.")
    p = counts.probabilities()
    entropy = lape(counts)
    p_threshold = np.quantile(p, probability_quantile)
    candidate = (p > p_threshold).any(axis=0)
    if not candidate.any():
        return {lang: np.zeros_like(candidate) for lang in counts.languages}
    e_threshold = np.quantile(entropy[candidate], entropy_quantile)
    chosen = candidate & (entropy <= e_threshold)
    return {lang: chosen & (p[li] > p_threshold) for li, lang in enumerate(counts.languages)}


# --------------------------------------------------------------- tables


def neuron_set_table(counts: NeuronCounts, beta: float, languages: Sequence[str] | None = None,
                     specific: bool = True) -> pd.DataFrame:
    """Neurons per layer for each language (lu-lafns Eq. 5), the LAFNs (lu-lafns Eq. 6) and, optionally,
    each language's specific neurons: columns ``layer``, ``set``, ``count``."""
    factual = factual_neurons(counts, beta)
    languages = _chosen(factual, languages, 2)
    sets: dict[str, np.ndarray] = {lang: factual[lang] for lang in languages}
    sets[LAFN] = language_agnostic_neurons(factual, languages)
    if specific:
        sets.update({f"specific:{k}": v for k, v in language_specific_neurons(factual, languages).items()})
    rows = [(layer, name, int(mask[layer].sum())) for name, mask in sets.items() for layer in range(counts.n_layers)]
    return pd.DataFrame(rows, columns=["layer", "set", "count"])


def neuron_list(counts: NeuronCounts, beta: float, languages: Sequence[str] | None = None) -> pd.DataFrame:
    """Every neuron of every set as a row: ``set``, ``layer``, ``neuron``, plus its counts per language."""
    factual = factual_neurons(counts, beta)
    languages = _chosen(factual, languages, 2)
    sets = {lang: factual[lang] for lang in languages}
    sets[LAFN] = language_agnostic_neurons(factual, languages)
    sets.update({f"specific:{k}": v for k, v in language_specific_neurons(factual, languages).items()})
    frames = []
    for name, mask in sets.items():
        layer, neuron = np.nonzero(mask)
        frame = pd.DataFrame({"set": name, "layer": layer, "neuron": neuron})
        for lang in languages:
            frame[f"n_{lang}"] = counts.of(lang)[layer, neuron]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def jaccard_overlap(factual: dict[str, np.ndarray], layer: int | None = None) -> pd.DataFrame:
    """Language × language Jaccard overlap of factual neurons, in one layer or across all layers."""
    languages = list(factual)
    pick = (lambda m: m[layer]) if layer is not None else (lambda m: m)
    matrix = [[_jaccard(pick(factual[a]), pick(factual[b])) for b in languages] for a in languages]
    return pd.DataFrame(matrix, index=languages, columns=languages)


def overlap_by_layer(factual: dict[str, np.ndarray]) -> pd.DataFrame:
    """Jaccard overlap of every language pair in every layer: columns ``layer``, ``pair``, ``jaccard``."""
    languages = list(factual)
    n_layers = next(iter(factual.values())).shape[0]
    rows = [(layer, f"{a}–{b}", _jaccard(factual[a][layer], factual[b][layer]))
            for i, a in enumerate(languages) for b in languages[i + 1:] for layer in range(n_layers)]
    return pd.DataFrame(rows, columns=["layer", "pair", "jaccard"])


def beta_sweep(counts: NeuronCounts, betas: Iterable[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
               languages: Sequence[str] | None = None) -> pd.DataFrame:
    """LAFNs per layer against β (as papers/lu-lafns.md Table 5): columns ``beta``, ``layer``, ``count``."""
    rows = []
    for beta in betas:
        lafn = language_agnostic_neurons(factual_neurons(counts, beta), languages)
        rows += [(float(beta), layer, int(lafn[layer].sum())) for layer in range(counts.n_layers)]
    return pd.DataFrame(rows, columns=["beta", "layer", "count"])


# ---------------------------------------------------------------- run folders


def request_key(wb: Workbench, corpus, languages: Sequence[str], positions: str, text: str) -> str:
    """A stable hash of everything that determines the counts."""
    rows = corpus.rows[corpus.rows["language"].isin(languages)]
    corpus_hash = hashlib.sha1(pd.util.hash_pandas_object(
        rows[["fact_id", "language", "subject", "object", "prompt", "template"]], index=False).values.tobytes()
    ).hexdigest()  # the object is part of every statement
    payload = json.dumps({"model": wb.spec, "name": wb.name, "params": wb.n_params, "dtype": str(wb.dtype),
                          "corpus": corpus_hash, "languages": list(languages), "positions": positions,
                          "text": text, "counting": COUNTING_VERSION}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def atlas_request(model: str, corpus, languages: Sequence[str], positions: str, text: str) -> dict[str, Any]:
    """The request of an atlas run in readable form (its ``run.json``; compared before a model is loaded)."""
    return {"model": str(model).strip(), "corpus": corpus.name, "languages": list(languages),
            "positions": positions, "text": text}


def atlas_counts(wb: Workbench, corpus, languages: Sequence[str], params: CountParams | None = None, *,
                 folder: str | Path | None = None, progress: Progress | None = None, overwrite: bool = False,
                 **changes: Any) -> tuple[NeuronCounts, Path, bool]:
    """Counts for a request (:class:`CountParams`, or its fields as keywords), read from its run folder
    when the same request ran before.

    ``folder`` defaults to ``<cache>/runs/neurons-<key>``. Returns
    ``(counts, folder, reused)``. A folder holding another request's counts or
    another command's results is refused (:class:`~analysis.runs.RunFolderError`)
    before anything is computed, unless ``overwrite``; damaged files of the same
    request are recomputed. The folder is replaced as a whole, atomically.
    """
    from analysis.model import cache_root

    params = CountParams.of(params, **changes)
    positions, text = params.positions, params.text
    languages = check_languages(languages)
    key = request_key(wb, corpus, languages, positions, text)
    folder = Path(folder) if folder is not None else cache_root() / "runs" / f"neurons-{key}"
    request = atlas_request(wb.spec, corpus, languages, positions, text)
    info = runs.claim(folder, "neurons", key, request, overwrite)
    if info.state == "run" and info.key == key:
        try:
            return NeuronCounts.load(folder), folder, True
        except NeuroglotError:
            pass  # damaged folder: recompute and replace
    counts = count_activations(wb, corpus, languages, params, progress=progress)
    counts.meta.update(key=key, created=time.strftime("%Y-%m-%dT%H:%M:%S"), versions=versions(),
                       relations=list(corpus.relations), facts=int(corpus.rows["fact_id"].nunique()))
    runs.write_run(folder, "neurons", key, request, counts.save)
    return counts, folder, False


# ---------------------------------------------------------------- drill-down


def neuron_top_tokens(wb: Workbench, layer: int, neuron: int, k: int = 15) -> pd.DataFrame:
    """The neuron's value vector (its column of the down-projection) read through the
    unembedding, LM-Debugger style: the k most promoted and k most suppressed tokens."""
    _check_neuron(wb, layer, neuron)
    with torch.no_grad():
        value = wb.arch.value_vectors(wb.model, layer)[neuron].float()
        unembed = wb.arch.lm_head_module(wb.model).weight.float()
        logits = unembed @ value.to(unembed.device)
    top = torch.topk(logits, k)
    bottom = torch.topk(-logits, k)
    rows = [(wb.tokenizer.decode([int(t)]), float(v), "promoted") for v, t in zip(top.values, top.indices)]
    rows += [(wb.tokenizer.decode([int(t)]), -float(v), "suppressed") for v, t in zip(bottom.values, bottom.indices)]
    return pd.DataFrame(rows, columns=["token", "logit", "direction"])


def top_activating_texts(wb: Workbench, corpus, layer: int, neuron: int, languages: Sequence[str], k: int = 5,
                         text: str = "statement", max_texts: int = 400, batch_size: int = 32,
                         seed: int = 0) -> pd.DataFrame:
    """The texts of each language on which the neuron's activation peaks highest.

    Columns ``language``, ``text``, ``activation`` (the max over the text's real
    tokens) and ``token`` (where the max is). At most ``max_texts`` texts per
    language are traced (a reproducible sample).
    """
    _check_neuron(wb, layer, neuron)
    languages = check_languages(languages)
    _, layers = wb.base_model()
    path = f"{layers}.{layer}.{wb.arch.neuron}"
    rng = np.random.default_rng(seed)
    rows = []
    for lang in languages:
        texts, _ = corpus_texts(corpus, lang, text)
        texts = list(dict.fromkeys(texts))
        if len(texts) > max_texts:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), max_texts, replace=False))]
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = encode(wb.tokenizer, chunk).to(wb.device)
            with wb.lock, torch.no_grad():
                nn_model = wb.tracer()
                with nn_model.trace(**wb.forward_inputs(batch.input_ids, batch.attention_mask)) as tracer:
                    act = resolve(nn_model, path).output[..., neuron].save()
                    tracer.stop()  # later layers are not needed
            act = act.float().masked_fill(~batch.real, float("-inf")).cpu()
            best, where = act.max(dim=1)
            for row, t in enumerate(chunk):
                token = wb.tokenizer.decode([int(batch.input_ids[row, where[row]])])
                rows.append((lang, t, float(best[row]), token))
    frame = pd.DataFrame(rows, columns=["language", "text", "activation", "token"])
    return (frame.sort_values("activation", ascending=False).groupby("language", sort=False).head(k)
            .sort_values(["language", "activation"], ascending=[True, False]).reset_index(drop=True))


def neuron_contributions(wb: Workbench, text: str, layer: int, position: int, k: int = 20) -> pd.DataFrame:
    """The neurons of ``layer`` that write the most into the FFN output at token ``position`` of ``text``.

    A neuron's contribution is its key (the down-projection input, DESIGN
    Decision 1) times its value vector: its size is ``|key_i| · ‖v_i‖``. Columns
    ``layer``, ``neuron``, ``activation`` (the neuron, act_fn(h W1)), ``key``,
    ``contribution`` (the size), strongest first. Used where causal tracing finds
    the FFN state that matters, to name the neurons behind it.
    """
    _check_neuron(wb, layer, 0)
    if int(k) < 1:
        raise InputError(f"k must be at least 1, got {k}.")
    batch = encode(wb.tokenizer, [text]).to(wb.device)
    n_tokens = int(batch.input_ids.shape[1])
    if not -n_tokens <= int(position) < n_tokens:
        raise InputError(f"Token {position} is out of range: the text has {n_tokens} tokens.")
    _, layers = wb.base_model()
    neuron_path = f"{layers}.{layer}.{wb.arch.neuron}"
    key_path = f"{layers}.{layer}.{wb.arch.down_proj}"
    with wb.lock, torch.no_grad():
        nn_model = wb.tracer()
        with nn_model.trace(**wb.forward_inputs(batch.input_ids, batch.attention_mask)) as tracer:
            act = resolve(nn_model, neuron_path).output[0, int(position)].save()
            key = resolve(nn_model, key_path).inputs[0][0][0, int(position)].save()
            tracer.stop()
    norms = wb.arch.value_vectors(wb.model, layer).detach().float().norm(dim=1).cpu()
    key = key.float().cpu()
    size = key.abs() * norms
    top = torch.topk(size, min(int(k), size.numel()))
    idx = top.indices
    return pd.DataFrame({"layer": int(layer), "neuron": idx.numpy(), "activation": act.float().cpu()[idx].numpy(),
                         "key": key[idx].numpy(), "contribution": top.values.numpy()})


def _check_neuron(wb: Workbench, layer: int, neuron: int) -> None:
    wb.check_layer(layer)
    if not 0 <= int(neuron) < wb.n_neurons:
        raise InputError(f"Neuron {neuron} is out of range: layers have neurons 0–{wb.n_neurons - 1}.")
