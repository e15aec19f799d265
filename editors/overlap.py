"""Why did an edit transfer: the neurons an edit touches, set against the fact's language-agnostic and
language-specific neurons.

The neurons an edit touches, with their share of the edit's squared norm (:func:`edit_neurons`):

* a weight delta on a layer's down-projection changes neuron ``j``'s value vector (its column of
  ``W_out`` [d_model, d_ff], a row of ``W_out`` in the papers' [d_ff, d_model] writing): weight
  ``||ΔW_out[:, j]||²``. ROME, MEMIT, AlphaEdit, LangEdit, MEMLA (its masks keep the delta on the
  masked neurons), FFN fine-tuning, LoRA on ``down_proj``;
* a delta on the FFN's first matrix (gate / up / ``c_fc``) changes neuron ``j``'s key: weight
  ``||ΔW_in[j, :]||²`` (LoRA on those modules);
* an activation patch (LU-LAFNs' cache ``{S_G: ΔV_{D_G}}``, lu-lafns Eq. 11) adds ``Δ_j`` to neuron
  ``j`` of D_G: weight ``Δ_j²``;
* added neurons (Transformer-Patcher / MPN's patch, mpn Eq. 7-8) are new neurons ``d_ff + j``, weight
  ``||v_j||²``: they are nobody's agnostic or specific neuron, so their share is reported apart;
* in-context edits touch no neuron.

The fact's neurons, from the unedited model, for this fact in these languages
(:func:`fact_neuron_sets`):

* **atlas** (lu-lafns Eq. 4-6): per language, activation counts over the fact's prompt and
  paraphrases (every token), factual neurons ``n_j / max(N^i) > β`` (Eq. 5), the language-agnostic
  ones their intersection over the languages (Eq. 6), a language's specific ones those factual in it
  and in no other language;
* **IG** (memla Eq. 1-4, optional, slower): per language, the knowledge neurons ``N_x^k`` of the fact
  (integrated gradients at the last prompt token, ≥ t × the prompt's largest attribution, in ≥ p of the
  prompts), the language-independent ones ``I_x = ∩_k N_x^k`` (Eq. 3) and the language-specific ones
  ``S_x^k = N_x^k − I_x`` (Eq. 4). The answer attributed is the old target when the request gives one,
  else the unedited model's own greedy answer (the fact as the model holds it before the edit).

:func:`overlap_by_layer` gives, per layer, how many of the edit's top neurons (those carrying
``top_share`` of the layer's weight) are in each set, and the share of the edit's weight that falls on
each set; :func:`overlap_summary` the same over all layers. :func:`overlap_transfer` relates, over many
records, the edit's share on agnostic neurons to how far it carried over to the other languages.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import runs
from analysis.errors import InputError
from analysis.neurons import (
    NeuronCounts,
    check_beta,
    count_batch,
    factual_neurons,
    language_agnostic_neurons,
)
from analysis.neurons import language_specific_neurons as atlas_specific
from analysis.tokens import encode
from editors.edit import Edit
from editors.requests import EditRequest

if TYPE_CHECKING:
    from analysis.model import Workbench

Progress = Callable[[float, str], None]
AGNOSTIC, OTHER, ADDED = "agnostic", "other", "added neurons"
SOURCES = ("atlas", "ig")
OVERLAP_VERSION = 1


def _check_share(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise InputError(f"{name} must be a number in (0, 1]; got {value!r}.")
    return float(value)


# ------------------------------------------------------------------ the neurons an edit touches


def _ffn_parameters(wb: Workbench) -> dict[str, tuple[int, str]]:
    """``{parameter name: (layer, "down" | "in")}`` of every layer's FFN matrices."""
    out = {}
    for layer in range(wb.n_layers):
        out[f"{wb.arch.site_path(layer, 'down_proj')}.weight"] = (layer, "down")
        out[f"{wb.arch.site_path(layer, 'first_proj')}.weight"] = (layer, "in")
        if wb.arch.up_proj is not None:
            out[f"{wb.arch.site_path(layer, 'up_proj')}.weight"] = (layer, "in")
    return out


def _neuron_axis(shape: Sequence[int], d_ff: int, part: str, orientation: str) -> int:
    """The axis of a weight's neurons: the one of length d_ff (ties broken by the layout of the family)."""
    axes = [i for i, n in enumerate(shape) if n == d_ff]
    if not axes:
        raise InputError(f"A weight delta of shape {tuple(shape)} has no axis of the layer's {d_ff} neurons.")
    if len(axes) == 1:
        return axes[0]
    out_in = orientation == "out_in"          # nn.Linear [out, in]; GPT-2's Conv1D is [in, out]
    return (1 if out_in else 0) if part == "down" else (0 if out_in else 1)


def edit_neurons(wb: Workbench, edit: Edit) -> pd.DataFrame:
    """Every neuron the edit touches: columns ``layer``, ``neuron``, ``weight`` (its squared norm, module
    docstring), ``part`` ("value", "key", "activation patch" or "added neurons"). Neurons touched by
    several parts are summed. Weight deltas of other parameters (attention, norms) are left out."""
    sites = _ffn_parameters(wb)
    rows: list[pd.DataFrame] = []
    for name in edit.param_names:
        if name not in sites:
            continue
        layer, part = sites[name]
        delta = edit.delta(name)
        d_ff = wb.arch.d_ff(wb.model, layer)
        axis = _neuron_axis(delta.shape, d_ff, part, wb.arch.down_orientation)
        weight = (delta.double() ** 2).sum(dim=1 - axis).numpy()
        nz = np.flatnonzero(weight > 0)
        rows.append(pd.DataFrame({"layer": layer, "neuron": nz, "weight": weight[nz],
                                  "part": "value" if part == "down" else "key"}))
    for patch in edit.patches:
        delta = patch.delta.double().numpy() ** 2
        rows.append(pd.DataFrame({"layer": patch.layer, "neuron": patch.neurons.numpy(), "weight": delta,
                                  "part": "activation patch"}))
    for added in edit.neurons:
        d_ff = wb.arch.d_ff(wb.model, added.layer)
        weight = (added.values.double() ** 2).sum(1).numpy()
        rows.append(pd.DataFrame({"layer": added.layer, "neuron": d_ff + np.arange(added.n), "weight": weight,
                                  "part": ADDED}))
    if not rows:
        return pd.DataFrame({"layer": pd.Series(dtype=int), "neuron": pd.Series(dtype=int),
                             "weight": pd.Series(dtype=float), "part": pd.Series(dtype=str)})
    frame = pd.concat(rows, ignore_index=True)
    part = frame.groupby(["layer", "neuron"])["part"].agg(lambda p: " + ".join(sorted(set(p))))
    summed = frame.groupby(["layer", "neuron"], as_index=False)["weight"].sum()
    summed["part"] = part.values
    return summed[summed["weight"] > 0].reset_index(drop=True)


def cached_edit_neurons(wb: Workbench, folder: str | Path) -> pd.DataFrame:
    """:func:`edit_neurons` of the edit saved in ``folder / "edit"`` (a Compare cache folder), kept beside it
    in ``neurons-v<N>.csv``: summing the squared columns of a 7-8B model's deltas is done once per edit,
    not on every rerun of the page. A damaged file is computed again."""
    folder = Path(folder)
    path = folder / f"neurons-v{OVERLAP_VERSION}.csv"
    if path.is_file():
        try:
            frame = pd.read_csv(path, dtype={"layer": int, "neuron": int, "weight": float, "part": str})
            if list(frame.columns) == ["layer", "neuron", "weight", "part"]:
                return frame
        except (OSError, ValueError, pd.errors.ParserError):
            pass
    touched = edit_neurons(wb, Edit.load(folder / "edit"))
    partial = path.with_suffix(".partial")
    touched.to_csv(partial, index=False, float_format="%.10g")
    partial.replace(path)
    return touched


# --------------------------------------------------------------------------- the fact's neurons


def fact_prompts(request: EditRequest) -> dict[str, list[str]]:
    """Per language, the fact's prompt and paraphrases (the C_l of lu-lafns Eq. 4 for this fact)."""
    return {lang: list(dict.fromkeys([f.prompt, *f.paraphrases])) for lang, f in request.facts.items()}


def atlas_sets(wb: Workbench, request: EditRequest, beta: float = 0.5) -> dict[str, np.ndarray]:
    """lu-lafns Eq. 4-6 for this fact: ``{"agnostic": ..., "<lang>": specific, ...}``, bool [n_layers, d_ff].
    One language: its factual neurons are reported as agnostic (there is nothing to share them with)."""
    beta = check_beta(beta)
    texts = fact_prompts(request)
    languages = list(texts)
    counts = np.zeros((len(languages), wb.n_layers, wb.n_neurons), dtype=np.int64)
    tokens = np.zeros(len(languages), dtype=np.int64)
    with wb.lock:
        for li, lang in enumerate(languages):
            batch = encode(wb.tokenizer, texts[lang]).to(wb.device)
            counts[li] = count_batch(wb, batch.input_ids, batch.attention_mask, batch.real)   # lu-lafns Eq. 4
            tokens[li] = int(batch.real.sum())
    n_texts = np.array([len(texts[lang]) for lang in languages])
    factual = factual_neurons(NeuronCounts(languages, counts, tokens, n_texts, "all", {}), beta)  # Eq. 5
    if len(languages) == 1:
        return {AGNOSTIC: factual[languages[0]]}
    return {AGNOSTIC: language_agnostic_neurons(factual, languages),                           # Eq. 6
            **atlas_specific(factual, languages)}


def ig_sets(wb: Workbench, request: EditRequest, answers: Mapping[str, str], steps: int = 8,
            threshold: float = 0.2, share: float = 0.5) -> dict[str, np.ndarray]:
    """memla Eq. 1-4 for this fact: ``{"agnostic": I_x, "<lang>": S_x^k}``, bool [n_layers, d_ff];
    ``answers[lang]`` is the answer attributed in that language."""
    from analysis.attribution import (
        fact_knowledge_neurons,
        language_independent_neurons,
        neuron_attributions,
        prompt_knowledge_neurons,
    )
    from analysis.attribution import language_specific_neurons as ig_specific

    fact_sets = {}
    for lang, prompts in fact_prompts(request).items():
        per_prompt = [prompt_knowledge_neurons(neuron_attributions(wb, p, answers[lang], steps=steps).scores,
                                               threshold) for p in prompts]                   # memla Eq. 2
        fact_sets[lang] = fact_knowledge_neurons(per_prompt, share)
    return {AGNOSTIC: language_independent_neurons(fact_sets), **ig_specific(fact_sets)}      # memla Eq. 3-4


def attributed_answers(wb: Workbench, request: EditRequest) -> dict[str, str]:
    """The answer IG attributes per language: the old target, else the unedited model's greedy answer."""
    from editors.evaluate import Probe, unedited_answers

    missing = [lang for lang, f in request.facts.items() if not f.target_old]
    found = {}
    if missing:
        items = [Probe(lang, "reliability", request.facts[lang].prompt, request.facts[lang].target_new)
                 for lang in missing]
        with wb.lock:
            found = {p.language: text for p, (text, _) in zip(items, unedited_answers(wb, items))}
    out = {lang: (f.target_old or found.get(lang, "")).strip() for lang, f in request.facts.items()}
    empty = [lang for lang, a in out.items() if not a]
    if empty:
        raise InputError(f"No answer to attribute in {', '.join(empty)}: give the old target.")
    return out


def fact_neuron_sets(wb: Workbench, request: EditRequest, beta: float = 0.5, ig: bool = False,
                     ig_steps: int = 8, model: Mapping[str, Any] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``{"atlas": sets, "ig": sets}`` (IG only when ``ig``) for the fact, cached on disk per model, fact and
    parameters (``cache_root()/compare/facts``)."""
    from editors.compare import compare_root, model_identity

    model = dict(model or model_identity(wb))
    facts = {lang: {"prompt": f.prompt, "paraphrases": list(f.paraphrases), "old": f.target_old}
             for lang, f in request.facts.items()}
    out: dict[str, dict[str, np.ndarray]] = {}
    for source in ("atlas", "ig") if ig else ("atlas",):
        params = {"beta": float(beta)} if source == "atlas" else {"steps": int(ig_steps), "threshold": 0.2,
                                                                  "share": 0.5}
        key = runs.request_key({"model": model, "facts": facts, "source": source, "params": params,
                                "version": OVERLAP_VERSION})
        path = compare_root() / "facts" / f"{source}-{key}.npz"
        if path.is_file():
            try:
                saved = runs.read_arrays(path)
                out[source] = {name: np.asarray(v, dtype=bool) for name, v in saved.items()}
                continue
            except Exception:  # noqa: BLE001 - a damaged cache file is computed again
                pass
        sets = atlas_sets(wb, request, beta) if source == "atlas" else \
            ig_sets(wb, request, attributed_answers(wb, request), steps=ig_steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        runs.write_arrays(path, **sets)
        out[source] = sets
    return out


# ------------------------------------------------------------------------------ the overlap


def top_neurons(touched: pd.DataFrame, top_share: float) -> pd.DataFrame:
    """Per layer, the fewest neurons that carry ``top_share`` of the layer's weight (largest first)."""
    top_share = _check_share(top_share, "top_share")
    keep = []
    for _, part in touched.groupby("layer"):
        part = part.sort_values("weight", ascending=False)
        cumulative = part["weight"].cumsum() / part["weight"].sum()
        n = int(np.searchsorted(cumulative.to_numpy(), top_share - 1e-12) + 1)
        keep.append(part.iloc[:n])
    return pd.concat(keep) if keep else touched.iloc[:0]


def overlap_by_layer(touched: pd.DataFrame, sets: Mapping[str, np.ndarray], top_share: float = 0.9) -> pd.DataFrame:
    """One row per (layer, set) over the layers the edit touches: ``set`` (agnostic, a language's specific
    set, "other" = in no set, or "added neurons"), ``set size`` (neurons of the layer in it), ``top`` (the
    layer's top neurons, :func:`top_neurons`), ``overlap`` (top neurons in the set), ``weight share`` (share
    of the edit's whole weight on the layer's neurons of that set) and ``layer share`` (of the layer's)."""
    if touched.empty:
        return pd.DataFrame(columns=["layer", "set", "set size", "top", "overlap", "weight share", "layer share"])
    total = float(touched["weight"].sum())
    top = top_neurons(touched, top_share)
    names = list(sets)
    rows = []
    for layer, part in touched.groupby("layer"):
        layer = int(layer)
        layer_weight = float(part["weight"].sum())
        top_here = set(top.loc[top["layer"] == layer, "neuron"].astype(int))
        existing = part[part["part"] != ADDED]
        d_ff = next(iter(sets.values())).shape[1] if sets else 0
        in_any = np.zeros(len(existing), dtype=bool)
        for name in names:
            member = sets[name][layer][existing["neuron"].to_numpy()] if d_ff else np.zeros(len(existing), bool)
            in_any |= member
            w = float(existing.loc[member, "weight"].sum())
            rows.append({"layer": layer, "set": name, "set size": int(sets[name][layer].sum()),
                         "top": len(top_here), "overlap": len(top_here & set(existing.loc[member, "neuron"])),
                         "weight share": w / total, "layer share": w / layer_weight})
        others = existing.loc[~in_any]
        rows.append({"layer": layer, "set": OTHER, "set size": None, "top": len(top_here),
                     "overlap": len(top_here & set(others["neuron"])), "weight share": float(others["weight"].sum())
                     / total, "layer share": float(others["weight"].sum()) / layer_weight})
        added = part[part["part"] == ADDED]
        if not added.empty:
            rows.append({"layer": layer, "set": ADDED, "set size": len(added), "top": len(top_here),
                         "overlap": len(top_here & set(added["neuron"])),
                         "weight share": float(added["weight"].sum()) / total,
                         "layer share": float(added["weight"].sum()) / layer_weight})
    return pd.DataFrame(rows)


def overlap_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Over all layers, per set: the overlap (top neurons in it) and its share of the edit's weight."""
    if table.empty:
        return pd.DataFrame(columns=["set", "overlap", "top", "weight share"])
    tops = table.drop_duplicates("layer")["top"].sum()
    out = table.groupby("set", sort=False).agg(overlap=("overlap", "sum"), share=("weight share", "sum"))
    out = out.rename(columns={"share": "weight share"}).reset_index()
    out["top"] = int(tops)
    return out[["set", "overlap", "top", "weight share"]]


def edit_overlap(wb: Workbench, edit: Edit | pd.DataFrame, request: EditRequest, beta: float = 0.5,
                 ig: bool = False, top_share: float = 0.9, ig_steps: int = 8,
                 model: Mapping[str, Any] | None = None) -> dict[str, pd.DataFrame]:
    """``{source: overlap_by_layer table}`` of ``edit`` (or its :func:`edit_neurons` table) against the fact's
    neuron sets (atlas; IG when ``ig``), the fact being ``request`` (the languages whose neurons are compared:
    usually all the test languages)."""
    touched = edit if isinstance(edit, pd.DataFrame) else edit_neurons(wb, edit)
    sets = fact_neuron_sets(wb, request, beta=beta, ig=ig, ig_steps=ig_steps, model=model)
    return {source: overlap_by_layer(touched, s, top_share).assign(source=source) for source, s in sets.items()}


# --------------------------------------------------------------------- overlap and transfer


def transfer_score(rows: Sequence[Mapping[str, Any]], before: Sequence[Mapping[str, Any]],
                   edit_languages: Sequence[str], metric: str = "top1") -> float:
    """How far an edit carried over: the mean gain of ``metric`` (edited − unedited) on the reliability probes
    in the languages it was not made in (the cross-lingual columns of memla's transferability), ×100."""
    gains = [float(a.get(metric) or 0.0) - float(b.get(metric) or 0.0) for a, b in zip(rows, before)
             if a["kind"] == "reliability" and a["language"] not in edit_languages]
    return 100.0 * float(np.mean(gains)) if gains else math.nan


def overlap_transfer(wb: Workbench, records: Sequence[Any], methods: Mapping[str, Mapping[str, Any] | None],
                     edit_language: str, test_languages: Sequence[str], beta: float = 0.5, top_share: float = 0.9,
                     progress: Progress | None = None) -> pd.DataFrame:
    """One row per (record, method): the edit (made in ``edit_language`` alone — MPN and MPN-all, whose source
    is ``edit_language``, also get the other languages as their parallel training pool — computed or read back
    from the Compare cache) scored in ``test_languages``; its share of weight on the fact's agnostic neurons (atlas,
    over the test languages), on the edit language's specific ones and on the other languages' specific ones;
    its overlap count; and its transfer (:func:`transfer_score`). Editors that cannot edit a record leave
    a row with its error."""
    from editors.compare import model_identity, run_editor, test_request, unedited_rows
    from editors.evaluate import probes, resolve_hparams

    model = model_identity(wb)
    report = progress or (lambda f, m: None)
    # MPN-style editors edit their source language and train the patch with the request's other languages
    # (their parallel pool, mpn Eq. 9): they get the whole fact, the others the edit language alone
    pooled_methods = set()
    for method, hparams in methods.items():
        hp = resolve_hparams(wb, method, hparams)
        if getattr(hp, "parallel", "none") != "none" and getattr(hp, "source", None) == edit_language:
            pooled_methods.add(method)
    rows = []
    total = max(1, len(records) * len(methods))
    step = 0
    for record in records:
        full = EditRequest.from_record(record, test_languages).validate(wb, need_subject=False)
        items = probes(test_request(full))
        answers, before = unedited_rows(wb, items, model)
        sets = fact_neuron_sets(wb, full, beta=beta, model=model)["atlas"]
        alone = EditRequest({edit_language: full.facts[edit_language]}, case_id=full.case_id)
        for method, hparams in methods.items():
            pooled = method in pooled_methods
            edit_request = full if pooled else alone
            report(step / total, f"{full.case_id}: {method}")
            step += 1
            row: dict[str, Any] = {"record": full.case_id, "method": method}
            started = time.perf_counter()
            try:
                run = run_editor(wb, method, hparams, edit_request, items, answers, model)
            except InputError as exc:
                rows.append({**row, "error": str(exc)})
                continue
            touched = cached_edit_neurons(wb, run.folder)
            table = overlap_by_layer(touched, sets, top_share)
            share = table.groupby("set")["weight share"].sum() if not table.empty else pd.Series(dtype=float)
            others = [lang for lang in test_languages if lang != edit_language]
            top = table.drop_duplicates("layer")["top"].sum() if not table.empty else 0
            row.update({
                "agnostic share": float(share.get(AGNOSTIC, 0.0)) if not touched.empty else math.nan,
                "edit-language share": float(share.get(edit_language, 0.0)) if not touched.empty else math.nan,
                "other-language share": float(sum(share.get(lang, 0.0) for lang in others))
                if not touched.empty else math.nan,
                "added share": float(share.get(ADDED, 0.0)) if not touched.empty else math.nan,
                "agnostic overlap": int(table.loc[table["set"] == AGNOSTIC, "overlap"].sum()) if not table.empty else 0,
                "top neurons": int(top),
                "transfer": transfer_score(run.rows, before, [edit_language]),
                "reliability": transfer_score(run.rows, before, others),  # gain in the edit language itself
                "cached": run.cached, "seconds": time.perf_counter() - started, "error": "",
            })
            row["pooled"] = pooled
            rows.append(row)
    report(1.0, "done")
    return pd.DataFrame(rows)


def rank_correlations(points: pd.DataFrame, x: str = "agnostic share", y: str = "transfer",
                      permutations: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per method: Spearman's rank correlation of ``x`` and ``y`` over its records (ties get mean ranks;
    NaN where either is constant or fewer than 3 records have both), with the number of records and a
    two-sided permutation p value (the share of ``permutations`` shuffles of ``y``, seeded, whose |ρ| is at
    least the observed one; no normal approximation, which would be poor for a few dozen records)."""
    rng = np.random.default_rng(seed)
    out = []
    for method, part in points.groupby("method", sort=False):
        part = part[[x, y]].dropna()
        rho = p_value = math.nan
        if len(part) >= 3 and part[x].nunique() > 1 and part[y].nunique() > 1:
            rx, ry = part[x].rank().to_numpy(), part[y].rank().to_numpy()
            rho = float(np.corrcoef(rx, ry)[0, 1])
            if permutations > 0:
                shuffled = np.stack([rng.permutation(ry) for _ in range(permutations)])
                rx_c = rx - rx.mean()
                sy = shuffled - shuffled.mean(axis=1, keepdims=True)
                perm = (sy @ rx_c) / (np.linalg.norm(sy, axis=1) * np.linalg.norm(rx_c))
                p_value = float((np.abs(perm) >= abs(rho) - 1e-12).mean())
        out.append({"method": method, "records": len(part), "spearman": rho, "p (permutation)": p_value,
                    f"mean {x}": float(part[x].mean()) if len(part) else math.nan,
                    f"mean {y}": float(part[y].mean()) if len(part) else math.nan})
    return pd.DataFrame(out)
