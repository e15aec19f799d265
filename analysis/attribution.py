"""Knowledge neurons by integrated gradients (memla Eq. 1-4, papers/memla.md §4.1; Dai et al. 2022).

For a prompt ``x`` and its answer ``y*``, memla Eq. 1 is the probability of the answer
when the ``i``-th FFN neuron of layer ``l`` (the activation-function output,
DESIGN Decision 1) at the prompt's last token is set to a value ``ŵ``. memla Eq. 2
attributes each neuron by integrated gradients along the straight path from the
baseline (zero activation) to its clean value ``w̄``::

    Attr(w_i^l) = w̄_i^l ∫_0^1 ∂P_x(α w̄_i^l) / ∂w_i^l dα

The path scales one layer at a time (every neuron of layer ``l`` together, the
other layers computed as the forward pass computes them), as Dai et al. do. The
integral is approximated with captum's quadrature; the default
``riemann_right`` (α = k/m, k = 1..m, m = 20) is Dai et al.'s Riemann sum as
written. ``gausslegendre`` (captum's default) is exact to far higher order for
the same number of steps and is offered as an option.

Sets (memla.md "following Chen et al. (2023)", i.e. Dai et al.'s procedure):

* per prompt: neurons whose attribution is ≥ ``threshold`` × the prompt's
  maximum attribution over all layers (``t = 0.2``);
* per fact and language ``N_x^k``: neurons in at least ``share`` of the fact's
  prompts (its paraphrases; ``p = 0.5`` by default, Dai et al. tune ``p``);
* memla Eq. 3: language-independent ``I_x = ∩_k N_x^k``;
* memla Eq. 4: language-specific ``S_x^k = N_x^k − I_x``.

The answer's probability is that of its first token by default; ``target_tokens
= "mean"`` averages the (teacher-forced) probabilities of all its tokens.

How it is computed fast
-----------------------
Changing a neuron at the last prompt token changes nothing at earlier tokens
(causal attention). So the prompt without its last token runs once, and its
key/value cache is shared by every row of one batched forward that computes only
the last token (plus the answer's tokens when they are averaged). One row per
(layer, step): all steps of all layers of a prompt go through the model in one
forward and one backward (in chunks of ``max_rows`` rows), and the LM head is
applied at the answer positions only. captum's ``IntegratedGradients`` drives the
steps; our forward function returns, per step, the sum over layers of each
layer's row probability, whose gradient with respect to layer ``l``'s scaled
activations is exactly ``∂P_x/∂w^l`` because no other row depends on them.

The activations are replaced with plain PyTorch forward hooks rather than
nnsight: captum needs an ordinary differentiable function of its scaled
inputs, and a hook that returns a copy of the activation with one row-block
overwritten is the most direct form of that.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from analysis import runs
from analysis.errors import InputError, NeuroglotError
from analysis.hooks import Hooks
from analysis.runs import Params
from analysis.tokens import answer_ids

if TYPE_CHECKING:
    from analysis.model import Workbench

Progress = Callable[[float, str], None]

ATTRIBUTION_VERSION = 1
METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")
TARGET_TOKENS = ("first", "mean")
INDEPENDENT = "independent"


@dataclass(frozen=True)
class AttributionParams(Params):
    """Parameters of integrated-gradient attribution and of the knowledge-neuron sets read from it;
    the defaults of ``neuroglot attribute`` and the Attribution page."""

    steps: int = 20                    # integration steps m (memla Eq. 2)
    method: str = "riemann_right"      # captum's quadrature (METHODS); riemann_right is Dai et al.'s sum
    target_tokens: str = "first"       # first or mean (TARGET_TOKENS)
    max_rows: int = 512                # rows (layers × steps) per forward
    threshold: float = 0.2             # t: per prompt, ≥ t × the prompt's maximum attribution
    share: float = 0.5                 # p: per fact, in ≥ p of its prompts
    max_facts: int = 20                # facts of a corpus request (round-robin over relations)


# ---------------------------------------------------------------- one prompt


@dataclass
class PromptAttribution:
    """memla Eq. 2 scores of every neuron of the chosen layers for one prompt and answer."""

    prompt: str
    target: str
    target_ids: list[int]
    layers: list[int]
    scores: np.ndarray            # [len(layers), n_neurons] attributions (units of probability)
    activations: np.ndarray       # [len(layers), n_neurons] clean activations w̄ at the last prompt token
    prob: float                   # P_x(w̄): the answer's probability in the clean run
    baseline_probs: np.ndarray    # [len(layers)] P_x with that layer's neurons at the baseline (zero)
    steps: int = 20
    method: str = "riemann_right"
    target_tokens: str = "first"

    @property
    def completeness_gap(self) -> np.ndarray:
        """Per layer: Σ_i Attr(w_i^l) − (P(w̄) − P(0)). Zero for exact integration (IG's completeness axiom)."""
        return self.scores.sum(axis=1) - (self.prob - self.baseline_probs)


def _check_method(method: str, steps: int, target_tokens: str) -> None:
    if method not in METHODS:
        raise InputError(f"Unknown integration method {method!r}: use one of {', '.join(METHODS)}.")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}.")
    if target_tokens not in TARGET_TOKENS:
        raise InputError(f"target_tokens must be 'first' or 'mean', got {target_tokens!r}.")


check_method = _check_method  # public: the CLI checks before it loads a model


def _prompt_ids(wb: Workbench, prompt: str) -> torch.Tensor:
    if not prompt or not prompt.strip():
        raise InputError("The prompt is empty.")
    ids = wb.tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise InputError(f"The prompt {prompt!r} has no tokens.")
    return ids.to(wb.device)


class _LastTokenRunner:
    """Runs the model on the last prompt token (and teacher-forced answer tokens) for many rows.

    The prompt's other tokens run once (:meth:`__init__`); each call copies
    their key/value cache for its rows. ``replace`` maps a layer to
    ``(row_slice, values [rows, n_neurons])``: those rows' neuron activations at
    the last prompt token are replaced by ``values`` (differentiably).
    """

    def __init__(self, wb: Workbench, prompt_ids: torch.Tensor, target: list[int], target_tokens: str):
        self.wb = wb
        self.base, _ = wb.base_model()
        self.target = torch.tensor(target if target_tokens == "mean" else target[:1], device=wb.device)
        n = prompt_ids.shape[1]
        # new tokens: the last prompt token, then (teacher forcing) all answer tokens but the last
        self.new = torch.cat([prompt_ids[0, -1:], self.target[:-1]])
        self.n_prefix = n - 1
        self.takes_positions = wb.accepts("position_ids")
        self.cache = None
        if self.n_prefix:
            with torch.no_grad():
                kwargs: dict[str, Any] = {"input_ids": prompt_ids[:, :-1], "use_cache": True}
                if wb.accepts("attention_mask"):
                    kwargs["attention_mask"] = torch.ones_like(prompt_ids[:, :-1])
                self.cache = wb.returned_cache(self.base(**kwargs))
            if self.cache is None:  # pragma: no cover - every supported family returns a cache
                raise NeuroglotError("This model returned no key/value cache; attribution needs one.")

    def probabilities(self, rows: int, replace: dict[int, tuple[slice, torch.Tensor]] | None = None,
                      record: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """[rows] probability of the answer (first token, or mean over its tokens)."""
        wb = self.wb
        t = self.new.shape[0]
        kwargs: dict[str, Any] = {"input_ids": self.new.expand(rows, t),
                                  "attention_mask": torch.ones(rows, self.n_prefix + t, dtype=torch.long,
                                                               device=wb.device)}
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            if rows > 1:
                cache.batch_repeat_interleave(rows)
            wb.with_cache(kwargs, cache)
        else:
            kwargs["use_cache"] = False
        if self.takes_positions:
            kwargs["position_ids"] = torch.arange(self.n_prefix, self.n_prefix + t,
                                                  device=wb.device).expand(rows, t)
        with Hooks() as hooks:
            for layer, module in _neuron_modules(wb).items():
                if (replace and layer in replace) or (record is not None):
                    hooks.forward(module, _neuron_hook(layer, replace, record))
            logits = wb.logits_at(kwargs, slice(None))            # [rows, t, vocab]: these t positions only
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, self.target.expand(rows, -1).unsqueeze(-1)).squeeze(-1).exp()  # [rows, t]
        return picked.mean(dim=1)


def _neuron_hook(layer: int, replace, record):
    def hook(module, args, output):
        if record is not None:
            record[layer] = output[:, 0].detach()
        if replace and layer in replace:
            rows, values = replace[layer]
            output = output.clone()
            output[rows, 0] = values.to(output.dtype)
        return output
    return hook


def _neuron_modules(wb: Workbench) -> dict[int, torch.nn.Module]:
    return {layer: wb.arch.site(wb.model, layer, "neuron") for layer in range(wb.n_layers)}


def neuron_attributions(wb: Workbench, prompt: str, target: str, layers: Sequence[int] | None = None,
                        params: AttributionParams | None = None, *, target_ids: Sequence[int] | None = None,
                        **changes: Any) -> PromptAttribution:
    """memla Eq. 2 for every neuron of ``layers`` (default: all) at the last token of ``prompt``.

    ``params``: :class:`AttributionParams`, or its fields as keywords (``steps``,
    ``method``, ``target_tokens``, ``max_rows``). ``target`` is the answer's text;
    its tokens are those the model would write after the prompt
    (:func:`analysis.tokens.answer_ids`) unless ``target_ids`` gives them.
    ``max_rows`` bounds one forward's rows (layers × steps): lower it when memory
    is short, raise it on a large GPU.
    """
    from captum.attr import IntegratedGradients

    params = AttributionParams.of(params, **changes)
    steps, method, target_tokens, max_rows = params.steps, params.method, params.target_tokens, params.max_rows
    _check_method(method, steps, target_tokens)
    chosen = wb.check_layers(layers)
    ids = _prompt_ids(wb, prompt)
    tgt = list(target_ids) if target_ids is not None else answer_ids(wb.tokenizer, prompt, target)
    if not tgt:
        raise InputError(f"The answer {target!r} has no tokens.")
    per_chunk = max(1, int(max_rows) // steps)
    with wb.lock:
        runner = _LastTokenRunner(wb, ids, tgt, target_tokens)
        record: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            prob = float(runner.probabilities(1, record=record)[0])
        acts = torch.stack([record[layer][0] for layer in chosen])            # [n_layers, d_ff] = w̄
        scores, zero_probs = [], []
        for start in range(0, len(chosen), per_chunk):
            chunk = chosen[start:start + per_chunk]

            def summed_probability(x: torch.Tensor, chunk=chunk) -> torch.Tensor:
                # x: [s, len(chunk), d_ff], the scaled activations α·w̄ of each layer (memla Eq. 1's ŵ).
                # Row (i, k) scales layer chunk[i] at step k; the sum over i keeps every layer's
                # gradient its own, since no row depends on another layer's inputs.
                s = x.shape[0]
                replace = {layer: (slice(i * s, (i + 1) * s), x[:, i]) for i, layer in enumerate(chunk)}
                return runner.probabilities(len(chunk) * s, replace).view(len(chunk), s).sum(0)

            inputs = acts[start:start + len(chunk)].unsqueeze(0)
            attr = IntegratedGradients(summed_probability).attribute(
                inputs, baselines=torch.zeros_like(inputs), n_steps=steps, method=method,
                internal_batch_size=steps)
            scores.append(attr[0].detach().float())
            with torch.no_grad():  # P_x(0) per layer, for the completeness check
                zeros = torch.zeros_like(inputs[0])
                replace = {layer: (slice(i, i + 1), zeros[i:i + 1]) for i, layer in enumerate(chunk)}
                zero_probs.append(runner.probabilities(len(chunk), replace).float())
    return PromptAttribution(
        prompt=prompt, target=target, target_ids=[int(i) for i in tgt], layers=chosen,
        scores=torch.cat(scores).cpu().numpy(), activations=acts.float().cpu().numpy(), prob=prob,
        baseline_probs=torch.cat(zero_probs).cpu().numpy(), steps=int(steps), method=method,
        target_tokens=target_tokens)


# ---------------------------------------------------------------- neuron sets


def check_fraction(value: float, name: str) -> float:
    """``value`` as a float in (0, 1], or an InputError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number between 0 and 1, got {value!r}.") from None
    if not 0.0 < value <= 1.0:
        raise InputError(f"{name} must be in (0, 1], got {value}.")
    return value


def prompt_knowledge_neurons(scores: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Neurons whose attribution is ≥ ``threshold`` × the prompt's maximum (all layers); bool like ``scores``.

    A prompt whose largest attribution is not positive has no knowledge neuron.
    """
    threshold = check_fraction(threshold, "The attribution threshold t")
    top = float(np.max(scores)) if scores.size else 0.0
    if top <= 0.0:
        return np.zeros(scores.shape, dtype=bool)
    return scores >= threshold * top


def fact_knowledge_neurons(prompt_sets: Sequence[np.ndarray], share: float = 0.5) -> np.ndarray:
    """``N_x^k``: neurons in at least ``share`` of the fact's prompts (paraphrases) in one language."""
    share = check_fraction(share, "The prompt share p")
    if len(prompt_sets) == 0:
        raise InputError("A fact needs at least one prompt.")
    stacked = np.stack([np.asarray(s, dtype=bool) for s in prompt_sets])
    # count ≥ p·n, written with integers so that p = 0.5 of 2 prompts means 1 prompt exactly
    return stacked.sum(0) >= np.ceil(share * len(prompt_sets) - 1e-9)


def language_independent_neurons(fact_sets: dict[str, np.ndarray]) -> np.ndarray:
    """memla Eq. 3: ``I_x = ∩_k N_x^k`` over the languages of ``fact_sets``."""
    if not fact_sets:
        raise InputError("Language-independent neurons need the knowledge neurons of at least one language.")
    sets = list(fact_sets.values())
    out = np.asarray(sets[0], dtype=bool).copy()
    for s in sets[1:]:
        out &= np.asarray(s, dtype=bool)
    return out


def language_specific_neurons(fact_sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """memla Eq. 4: ``S_x^k = N_x^k − I_x`` for every language ``k``."""
    shared = language_independent_neurons(fact_sets)
    return {lang: np.asarray(s, dtype=bool) & ~shared for lang, s in fact_sets.items()}


# ---------------------------------------------------------------- many facts


PROMPT_COLUMNS = ("fact_id", "relation", "language", "subject", "object", "prompt", "template_id")


@dataclass
class AttributionRun:
    """memla Eq. 2 scores of many prompts: the facts × languages × paraphrases of a request."""

    prompts: pd.DataFrame   # one row per prompt: PROMPT_COLUMNS + prob, baseline_min, completeness_gap
    scores: np.ndarray      # [n_prompts, n_layers, d_ff] float32
    layers: list[int]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompts = self.prompts.reset_index(drop=True)
        if self.scores.ndim != 3 or self.scores.shape[0] != len(self.prompts):
            raise NeuroglotError("An attribution run needs one [layers, neurons] score table per prompt.")

    @property
    def languages(self) -> list[str]:
        return list(self.meta.get("languages") or sorted(self.prompts["language"].unique()))

    @property
    def fact_ids(self) -> list[str]:
        return list(pd.unique(self.prompts["fact_id"]))

    @property
    def n_neurons(self) -> int:
        return int(self.scores.shape[2])

    def summary(self) -> str:
        """What was attributed, as the CLI and the Attribution page print it: ``4 prompts, 2 facts, en, zh``."""
        return f"{len(self.prompts)} prompts, {len(self.fact_ids)} facts, {', '.join(self.languages)}"

    def neuron_summary(self, threshold: float = 0.2, share: float = 0.5, counts: pd.DataFrame | None = None) -> str:
        """The knowledge neurons over all facts (memla Eq. 3-4) in one line; ``counts``: :meth:`set_counts`'s."""
        counts = self.set_counts(threshold, share) if counts is None else counts
        total = {c: int(counts[c].sum()) for c in counts.columns if c.startswith(("N_", "S_")) or c == INDEPENDENT}
        return (f"{total.get(INDEPENDENT, 0):,} language-independent knowledge neurons · " + " · ".join(
            f"{lang}: {total.get(f'N_{lang}', 0):,} in all, {total.get(f'S_{lang}', 0):,} specific"
            for lang in self.languages) + f" (t = {threshold:g}, p = {share:g}, over {len(counts)} fact(s))")

    def completeness_summary(self) -> str:
        """How far the integrated gradients are from completeness (Σ attributions = P(w̄) − P(0))."""
        gap = float(self.prompts["completeness_gap"].max())
        return f"largest completeness gap |Σ attributions − (P(w̄) − P(0))| over layers and prompts = {gap:.3g}"

    def fact_sets(self, fact_id: str, threshold: float = 0.2, share: float = 0.5) -> dict[str, np.ndarray]:
        """``N_x^k`` of one fact for each language it has prompts in: bool [n_layers, d_ff]."""
        rows = self.prompts[self.prompts["fact_id"] == fact_id]
        if rows.empty:
            raise InputError(f"No prompt of fact {fact_id!r} in this run.")
        out = {}
        for lang in self.languages:
            idx = rows.index[rows["language"] == lang].to_numpy()
            if len(idx):
                out[lang] = fact_knowledge_neurons([prompt_knowledge_neurons(self.scores[i], threshold)
                                                    for i in idx], share)
        return out

    def set_parts(self, fact_id: str, threshold: float = 0.2, share: float = 0.5) -> dict[str, np.ndarray]:
        """One fact's sets, bool [n_layers, d_ff] each: ``N^k`` under the language code, ``"independent"``
        (memla Eq. 3) and ``"specific <k>"`` (memla Eq. 4). A fact without prompts in every language of the run shares
        nothing: its independent set is empty and each language's specific set is its whole ``N^k``."""
        sets = self.fact_sets(fact_id, threshold, share)
        if len(sets) == len(self.languages):
            shared = language_independent_neurons(sets)
        else:
            shared = np.zeros_like(next(iter(sets.values())))
        parts = dict(sets)
        parts[INDEPENDENT] = shared
        parts.update({f"specific {lang}": s & ~shared for lang, s in sets.items()})
        return parts

    def set_counts(self, threshold: float = 0.2, share: float = 0.5) -> pd.DataFrame:
        """One row per fact: |N^k| per language, |I| (memla Eq. 3) and |S^k| per language (memla Eq. 4)."""
        records = []
        for fact_id in self.fact_ids:
            parts = self.set_parts(fact_id, threshold, share)
            first = self.prompts[self.prompts["fact_id"] == fact_id].iloc[0]
            rec: dict[str, Any] = {"fact_id": fact_id, "relation": first["relation"], "subject": first["subject"],
                                   "object": first["object"]}
            langs = [lang for lang in self.languages if lang in parts]
            rec.update({f"N_{lang}": int(parts[lang].sum()) for lang in langs})
            rec[INDEPENDENT] = int(parts[INDEPENDENT].sum())
            rec.update({f"S_{lang}": int(parts[f"specific {lang}"].sum()) for lang in langs})
            records.append(rec)
        return pd.DataFrame.from_records(records)

    def per_layer(self, threshold: float = 0.2, share: float = 0.5) -> pd.DataFrame:
        """Knowledge neurons per layer summed over facts: columns = languages (N^k), 'independent', 'specific <k>'."""
        totals: dict[str, np.ndarray] = {}
        for fact_id in self.fact_ids:
            for name, s in self.set_parts(fact_id, threshold, share).items():
                totals[name] = totals.get(name, 0) + s.sum(axis=1)
        return pd.DataFrame({name: np.asarray(v, dtype=np.int64) for name, v in totals.items()},
                            index=pd.Index(self.layers, name="layer"))

    def mean_scores(self, fact_id: str | None = None) -> dict[str, np.ndarray]:
        """Mean attribution [n_layers, d_ff] per language (over one fact's prompts, or over all)."""
        rows = self.prompts if fact_id is None else self.prompts[self.prompts["fact_id"] == fact_id]
        return {lang: self.scores[rows.index[rows["language"] == lang].to_numpy()].mean(0)
                for lang in self.languages if (rows["language"] == lang).any()}

    def top_neurons(self, fact_id: str, threshold: float = 0.2, share: float = 0.5, k: int = 20) -> pd.DataFrame:
        """The fact's knowledge neurons, strongest first: layer, neuron, set, mean attribution per language."""
        parts = self.set_parts(fact_id, threshold, share)
        sets = {lang: parts[lang] for lang in self.languages if lang in parts}
        shared = parts[INDEPENDENT]
        means = self.mean_scores(fact_id)
        union = np.logical_or.reduce(list(sets.values()))
        layer_idx, neuron_idx = np.nonzero(union)
        records = []
        for li, n in zip(layer_idx, neuron_idx):
            in_langs = [lang for lang, s in sets.items() if s[li, n]]
            rec: dict[str, Any] = {"layer": self.layers[li], "neuron": int(n),
                                   "set": INDEPENDENT if shared[li, n] else "specific " + ",".join(in_langs)}
            for lang, m in means.items():
                rec[f"attr_{lang}"] = float(m[li, n])
            rec["attr_max"] = max(rec[f"attr_{lang}"] for lang in means)
            records.append(rec)
        frame = pd.DataFrame.from_records(records, columns=["layer", "neuron", "set",
                                                            *[f"attr_{lang}" for lang in means], "attr_max"])
        return frame.sort_values("attr_max", ascending=False).head(int(k)).reset_index(drop=True)

    # ---- run folder ---------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        runs.write_arrays(folder / "scores.npz", scores=self.scores.astype(np.float32), layers=np.asarray(self.layers))
        runs.atomic_write(folder / "prompts.parquet", lambda f: self.prompts.to_parquet(f, index=False))
        runs.write_json(folder / "manifest.json", self.meta)  # last: a folder without it is never read back
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AttributionRun":
        try:
            meta, arrays = runs.read_manifest(folder, "scores.npz")
            scores, layers = arrays["scores"], [int(x) for x in arrays["layers"]]
            prompts = pd.read_parquet(Path(folder) / "prompts.parquet")
        except Exception as exc:  # noqa: BLE001 - numpy, zipfile and pyarrow each raise their own errors
            raise NeuroglotError(f"{folder} is not a readable attribution run folder: {exc}") from None
        if not isinstance(meta, dict):
            raise NeuroglotError(f"{folder}/manifest.json is not an attribution manifest.")
        return cls(prompts=prompts, scores=scores, layers=layers, meta=meta)


def attribute_prompts(wb: Workbench, prompts: pd.DataFrame, layers: Sequence[int] | None = None,
                      params: AttributionParams | None = None, *, progress: Progress | None = None,
                      **changes: Any) -> AttributionRun:
    """memla Eq. 2 for every row of ``prompts`` (columns PROMPT_COLUMNS; ``object`` is the answer);
    ``params``: :class:`AttributionParams`, or its fields as keywords."""
    params = AttributionParams.of(params, **changes)
    steps, method, target_tokens = params.steps, params.method, params.target_tokens
    missing = [c for c in ("fact_id", "language", "prompt", "object") if c not in prompts.columns]
    if missing:
        raise InputError(f"The prompts table lacks the column(s) {', '.join(missing)}.")
    if prompts.empty:
        raise InputError("There is no prompt to attribute.")
    _check_method(method, steps, target_tokens)
    chosen = wb.check_layers(layers)
    table = prompts.reset_index(drop=True).copy()
    for col in PROMPT_COLUMNS:
        if col not in table.columns:
            table[col] = ""
    started = time.perf_counter()
    scores, probs, gaps, zero_min = [], [], [], []
    for i, row in enumerate(table.itertuples(index=False)):
        if progress:
            progress(i / len(table), f"prompt {i + 1}/{len(table)} ({row.language}): {row.prompt}")
        res = neuron_attributions(wb, row.prompt, row.object, layers=chosen, params=params)
        scores.append(res.scores.astype(np.float32))
        probs.append(res.prob)
        gaps.append(float(np.abs(res.completeness_gap).max()))
        zero_min.append(float(res.baseline_probs.min()))
    if progress:
        progress(1.0, f"{len(table)} prompts attributed")
    table = table[list(PROMPT_COLUMNS)].copy()
    table["prob"] = probs
    table["baseline_min"] = zero_min
    table["completeness_gap"] = gaps
    meta = {"model": wb.spec, "name": wb.name, "layers": chosen, "steps": int(steps), "method": method,
            "target_tokens": target_tokens, "languages": sorted(table["language"].unique()),
            "seconds": round(time.perf_counter() - started, 2), "version": ATTRIBUTION_VERSION}
    return AttributionRun(prompts=table, scores=np.stack(scores), layers=chosen, meta=meta)


def fact_prompts(corpus, languages: Sequence[str], max_facts: int = AttributionParams.max_facts,
                 prompts_per_fact: int | None = None,
                 fact_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """The prompts of facts present in every language: ``fact_ids`` or ``max_facts`` facts.

    Facts are taken round-robin over the relations (sorted), each relation's
    facts in sorted order, so a small request still spans the relations and the
    same request always picks the same facts. ``prompts_per_fact`` keeps each
    fact's first templates per language (default: all its paraphrases).
    """
    if not languages:
        raise InputError("Choose at least one language.")
    rows = corpus.aligned(languages).rows
    if fact_ids is not None:
        absent = sorted(set(fact_ids) - set(rows["fact_id"]))
        if absent:
            raise InputError(f"Fact(s) {', '.join(absent)} are not in the corpus in all of {', '.join(languages)}.")
        chosen = list(dict.fromkeys(fact_ids))
    else:
        if int(max_facts) < 1:
            raise InputError(f"max_facts must be at least 1, got {max_facts}.")
        per_relation = [sorted(pd.unique(g["fact_id"]), key=_natural) for _, g in rows.groupby("relation", sort=True)]
        chosen = []
        for depth in range(max(len(ids) for ids in per_relation)):
            for ids in per_relation:
                if depth < len(ids) and len(chosen) < int(max_facts):
                    chosen.append(ids[depth])
    sub = rows[rows["fact_id"].isin(chosen)].copy()
    sub["_order"] = sub["fact_id"].map({f: i for i, f in enumerate(chosen)})
    sub = sub.sort_values(["_order", "language", "template_id"], kind="stable").drop(columns="_order")
    if prompts_per_fact is not None:
        if int(prompts_per_fact) < 1:
            raise InputError(f"prompts_per_fact must be at least 1, got {prompts_per_fact}.")
        sub = sub.groupby(["fact_id", "language"], sort=False).head(int(prompts_per_fact))
    return sub[list(PROMPT_COLUMNS)].reset_index(drop=True)


def _natural(fact_id: str) -> tuple:
    head, _, tail = str(fact_id).rpartition(":")
    return (head, int(tail)) if tail.isdigit() else (str(fact_id), -1)


def request_key(wb: Workbench, prompts: pd.DataFrame, layers: list[int], steps: int, method: str,
                target_tokens: str) -> str:
    """Identifies an attribution request: model, the exact prompts and answers, and the parameters."""
    payload = json.dumps({"model": wb.spec, "name": wb.name, "params": wb.n_params, "dtype": str(wb.dtype),
                          "prompts": prompts[list(PROMPT_COLUMNS)].astype(str).values.tolist(),
                          "layers": layers, "steps": steps, "method": method, "target_tokens": target_tokens,
                          "version": ATTRIBUTION_VERSION}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def attribution_request(model: str, prompts: pd.DataFrame, steps: int, method: str,
                        target_tokens: str) -> dict[str, Any]:
    """The request of an attribution run in readable form (its ``run.json``; compared before a model loads)."""
    return {"model": str(model).strip(), "facts": sorted(map(str, pd.unique(prompts["fact_id"]))),
            "languages": sorted(map(str, pd.unique(prompts["language"]))), "prompts": int(len(prompts)),
            "steps": int(steps), "method": method, "target_tokens": target_tokens}


def attribution_run(wb: Workbench, prompts: pd.DataFrame, layers: Sequence[int] | None = None,
                    params: AttributionParams | None = None, *, folder: str | Path | None = None,
                    progress: Progress | None = None, extra_meta: dict | None = None, overwrite: bool = False,
                    **changes: Any) -> tuple[AttributionRun, Path, bool]:
    """:func:`attribute_prompts` (``params``: :class:`AttributionParams`, or its fields as keywords), read
    back from its run folder when the same request ran before.

    ``folder`` defaults to ``<cache>/runs/attribution-<key>``. Returns ``(run, folder, reused)``.
    A folder holding another request's or another command's results is refused before any
    work unless ``overwrite``; damaged files of the same request are recomputed.
    """
    from analysis.model import cache_root

    params = AttributionParams.of(params, **changes)
    steps, method, target_tokens = params.steps, params.method, params.target_tokens
    _check_method(method, steps, target_tokens)
    chosen = wb.check_layers(layers)
    key = request_key(wb, prompts, chosen, int(steps), method, target_tokens)
    folder = Path(folder) if folder is not None else cache_root() / "runs" / f"attribution-{key}"
    request = dict(attribution_request(wb.spec, prompts, steps, method, target_tokens), layers=chosen)
    info = runs.claim(folder, "attribute", key, request, overwrite)
    if info.state == "run" and info.key == key:
        try:
            run = AttributionRun.load(folder)
            if run.meta.get("key") == key:
                return run, folder, True
        except (NeuroglotError, ValueError, OSError):
            pass  # damaged folder: recompute and replace
    run = attribute_prompts(wb, prompts, layers=chosen, params=params, progress=progress)
    run.meta.update(key=key, created=time.strftime("%Y-%m-%dT%H:%M:%S"), versions=runs.versions(),
                    **(extra_meta or {}))
    runs.write_run(folder, "attribute", key, request, run.save)
    return run, folder, False
