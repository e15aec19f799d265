"""Plotly figures of single facts, one function per figure: knowledge neurons by integrated
gradients (the Attribution page), causal traces (the Causal-tracing page) and edit results
(the Edit lab).

As :mod:`analysis.figures` (whose colours, checks and layout they share): plain data in,
a ``plotly.graph_objects.Figure`` out, bad input an ``InputError`` written for users.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.errors import InputError
from analysis.figures import (
    LAFN_COLOUR, _bar_series, _check_table, _escape, _layer_axis, _layout, _show_token, _unique_labels,
    language_colour,
)

__all__ = [
    "INDEPENDENT",
    "TRACE_KINDS",
    "attribution_strength",
    "average_effect_heatmaps",
    "causal_trace_heatmaps",
    "compare_summary",
    "editor_colours",
    "edit_overlap_by_layer",
    "edit_probability_bars",
    "overlap_vs_transfer",
    "knowledge_neurons_by_layer",
    "trained_neurons",
]


# --------------------------------------------------------------------------- attribution (IG)

INDEPENDENT = "independent"


def knowledge_neurons_by_layer(per_layer: pd.DataFrame, languages: Sequence[str], title: str | None = None) -> go.Figure:
    """Integrated-gradient knowledge neurons per layer, one panel per language side by side.

    ``per_layer`` is indexed by layer with a column per language (``N^k``),
    ``"independent"`` (memla Eq. 3) and ``"specific <k>"`` (memla Eq. 4), as
    :meth:`analysis.attribution.AttributionRun.per_layer` returns (summed over facts).
    Each panel stacks the language-independent neurons (the same bars in every
    panel) under that language's specific ones.
    """
    if not isinstance(per_layer, pd.DataFrame) or per_layer.empty:
        raise InputError("The knowledge-neuron table is empty: attribute at least one fact first.")
    languages = [str(lang) for lang in languages]
    if not languages:
        raise InputError("Choose at least one language.")
    missing = [lang for lang in languages if lang not in per_layer.columns]
    if missing:
        raise InputError(f"The knowledge-neuron table has no column for {', '.join(missing)}.")
    layers = np.asarray(per_layer.index, dtype=int)
    shared = per_layer[INDEPENDENT].to_numpy() if INDEPENDENT in per_layer.columns else np.zeros(len(layers), int)
    fig = make_subplots(rows=1, cols=len(languages), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[f"{lang}" for lang in languages])
    for col, lang in enumerate(languages, start=1):
        specific_col = f"specific {lang}"
        specific = (per_layer[specific_col].to_numpy() if specific_col in per_layer.columns
                    else per_layer[lang].to_numpy() - shared)
        fig.add_trace(go.Bar(
            x=layers, y=shared, name="language-independent (Eq. 3)", legendgroup=INDEPENDENT,
            showlegend=col == 1, marker=dict(color=LAFN_COLOUR), opacity=0.85,
            hovertemplate="layer %{x}<br>%{y:,d} language-independent<extra></extra>"), row=1, col=col)
        fig.add_trace(go.Bar(
            x=layers, y=specific, name=f"{lang}-specific (Eq. 4)", legendgroup=lang,
            marker=dict(color=language_colour(lang)),
            hovertemplate=f"layer %{{x}}<br>%{{y:,d}} {_escape(lang)}-specific<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="layer", dtick=1 if len(layers) < 25 else None, row=1, col=col)
    default = "Knowledge neurons (integrated gradients) per layer: language-independent and language-specific"
    _layout(fig, title or default, barmode="stack", legend=dict(title="set"), bargap=0.1)
    fig.update_yaxes(title_text="knowledge neurons (summed over facts)", row=1, col=1, rangemode="tozero")
    return fig


def attribution_strength(mean_scores: dict[str, np.ndarray], layers: Sequence[int], title: str | None = None) -> go.Figure:
    """The largest mean attribution in each layer, one line per language (units: probability)."""
    if not mean_scores:
        raise InputError("No attribution scores to draw.")
    layers = [int(x) for x in layers]
    fig = go.Figure()
    for lang, scores in mean_scores.items():
        scores = np.asarray(scores, dtype=float)
        if scores.ndim != 2 or scores.shape[0] != len(layers):
            raise InputError(f"The scores of {lang!r} must be [layers, neurons] with {len(layers)} layers.")
        top = scores.max(axis=1)
        arg = scores.argmax(axis=1)
        fig.add_trace(go.Scatter(
            x=layers, y=top, name=lang, mode="lines+markers", customdata=arg,
            line=dict(color=language_colour(lang), width=2),
            hovertemplate=f"<b>{_escape(lang)}</b><br>layer %{{x}}<br>max attribution %{{y:.4f}}"
                          f"<br>neuron %{{customdata}}<extra></extra>"))
    _layout(fig, title or "Largest attribution per layer",
            xaxis=_layer_axis(pd.Series(layers)), yaxis=dict(title="attribution (Δ probability)"),
            legend=dict(title="language"))
    return fig


# --------------------------------------------------------------------------- causal tracing

TRACE_KINDS = ("hidden", "mlp", "attn")
TRACE_TITLES = {"hidden": "single restored hidden state", "mlp": "restored MLP (window)",
                "attn": "restored attention (window)"}
TRACE_SCALES = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}  # ROME's colours


def _token_labels(tokens: Sequence[str], subject_range: Sequence[int]) -> list[str]:
    start, end = int(subject_range[0]), int(subject_range[1])
    labels = [_show_token(t) + (" *" if start <= i < end else "") for i, t in enumerate(tokens)]
    return _unique_labels(labels)


def causal_trace_heatmaps(tokens: Sequence[str], subject_range: Sequence[int], scores: dict[str, np.ndarray],
                          p_clean: float, p_corrupted: float, answer: str, title: str | None = None) -> go.Figure:
    """ROME's three heatmaps side by side: rows = prompt tokens (subject marked *), columns = layers,
    colour = probability of ``answer`` when that state is restored in the corrupted run."""
    kinds = [k for k in TRACE_KINDS if k in scores]
    if not kinds:
        raise InputError("No causal-tracing scores to draw.")
    tokens = [str(t) for t in tokens]
    if len(subject_range) != 2 or not 0 <= int(subject_range[0]) < int(subject_range[1]) <= len(tokens):
        raise InputError(f"The subject range {tuple(subject_range)} does not fit the {len(tokens)} tokens.")
    labels = _token_labels(tokens, subject_range)
    fig = make_subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[TRACE_TITLES[k] for k in kinds])
    for col, kind in enumerate(kinds, start=1):
        grid = np.asarray(scores[kind], dtype=float)
        if grid.ndim != 2 or grid.shape[0] != len(tokens):
            raise InputError(f"The {kind} scores must be [tokens, layers] with {len(tokens)} token rows.")
        x = np.arange(grid.shape[1])
        fig.add_trace(go.Heatmap(
            z=grid, x=x, y=labels, colorscale=TRACE_SCALES[kind], zmin=min(float(p_corrupted), float(grid.min())),
            zmax=max(float(grid.max()), float(p_corrupted)),
            colorbar=dict(title=dict(text="p", side="top"), x=col / len(kinds) - 0.01, len=0.9, thickness=10),
            hovertemplate=f"token %{{y}}<br>layer %{{x}}<br>p({_escape(_show_token(answer))}) = %{{z:.4f}}"
                          f"<extra>{kind}</extra>"), row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    default = (f"Causal tracing → {_show_token(answer)}: clean p = {p_clean:.3f}, "
               f"corrupted p = {p_corrupted:.3f} (* = subject)")
    # Tall enough that every token label is readable: 34 px a row plus the titles and the layer axis.
    _layout(fig, title or default, height=max(460, 170 + 34 * len(tokens)))
    return fig


def average_effect_heatmaps(effects: dict[str, dict[str, pd.DataFrame]], title: str | None = None) -> go.Figure:
    """Average indirect effects per language (rows of panels) and kind (columns), as papers/langedit.md Fig. 5.

    ``effects[language][kind]`` is a DataFrame: rows = ROME's token categories, columns = layers.
    """
    if not effects:
        raise InputError("No average effects to draw: trace at least one fact.")
    languages = list(effects)
    kinds = [k for k in TRACE_KINDS if any(k in effects[lang] for lang in languages)]
    if not kinds:
        raise InputError("No causal-tracing kind to draw.")
    fig = make_subplots(rows=len(languages), cols=len(kinds), shared_yaxes=True, shared_xaxes=True,
                        horizontal_spacing=0.05, vertical_spacing=0.06,
                        subplot_titles=[f"{lang} · {TRACE_TITLES[k]}" for lang in languages for k in kinds])
    for col, kind in enumerate(kinds, start=1):
        frames = [effects[lang][kind] for lang in languages if kind in effects[lang]]
        hi = max(float(np.nanmax(f.to_numpy(dtype=float))) for f in frames) if frames else 1.0
        lo = min(0.0, min(float(np.nanmin(f.to_numpy(dtype=float))) for f in frames)) if frames else 0.0
        for row, lang in enumerate(languages, start=1):
            if kind not in effects[lang]:
                continue
            frame = effects[lang][kind]
            fig.add_trace(go.Heatmap(
                z=frame.to_numpy(dtype=float), x=[int(c) for c in frame.columns], y=list(frame.index),
                colorscale=TRACE_SCALES[kind], zmin=lo, zmax=hi, showscale=row == 1,
                colorbar=dict(title=dict(text="AIE", side="top"), x=col / len(kinds) - 0.01, len=0.3,
                              y=1.0, yanchor="top", thickness=10),
                hovertemplate=f"{_escape(lang)}<br>%{{y}}<br>layer %{{x}}<br>AIE %{{z:.4f}}<extra>{kind}</extra>"),
                row=row, col=col)
    fig.update_yaxes(autorange="reversed")
    for col in range(1, len(kinds) + 1):
        fig.update_xaxes(title_text="layer", row=len(languages), col=col)
    _layout(fig, title or "Average indirect effect of restoring each state, per language",
            height=max(360, 230 * len(languages)))
    return fig


def edit_probability_bars(table: pd.DataFrame, title: str) -> go.Figure:
    """P(new target) on the edit prompt, before vs after, per language (the Edit lab's comparison table:
    columns language, probe ("edit" rows are drawn), "P(target) before", "P(target) after")."""
    table = _check_table(table, ["language", "probe", "P(target) before", "P(target) after"], "The comparison table",
                         numeric=["P(target) before", "P(target) after"])
    edit_rows = table[table["probe"] == "edit"]
    fig = go.Figure()
    # one colour per series (the languages are on the x axis), so the legend's swatches are the bars' colours
    for column, name, colour in (("P(target) before", "before", "#9e9e9e"), ("P(target) after", "after", "#1f77b4")):
        fig.add_bar(x=edit_rows["language"], y=edit_rows[column], name=name, marker_color=colour,
                    text=[f"{v:.3f}" for v in edit_rows[column]], textposition="outside",
                    hovertemplate="%{x}: P(new target) " + name + " = %{y:.4f}<extra></extra>")
    fig.update_layout(barmode="group", title=title, yaxis_title="P(new target | edit prompt)",
                      xaxis_title="language", yaxis_range=[0, 1.08], height=380, margin=dict(t=60, b=40))
    return fig


def trained_neurons(table: pd.DataFrame, n_layers: int, title: str | None = None) -> go.Figure:
    """The knowledge neurons a MEMLA edit trained, per layer and editor (memla Eq. 5-7): stacked bars of the
    language-independent editor's neurons (LIE) and each language's specific ones (LSE).

    ``table`` has one row per (layer, editor, neuron); ``editor`` is ``"independent"`` or a language code."""
    table = _check_table(table, ["layer", "editor", "neuron"], "The trained-neuron table", numeric=["layer", "neuron"])
    counts = table.groupby(["editor", "layer"]).size()
    layers = np.arange(int(n_layers))
    fig = go.Figure()
    names = [INDEPENDENT] + sorted(n for n in table["editor"].unique() if n != INDEPENDENT)
    for name in names:
        if name not in counts.index.get_level_values(0):
            continue
        y = [int(counts.get((name, int(layer)), 0)) for layer in layers]
        label = "LIE: language-independent (Eq. 3)" if name == INDEPENDENT else f"LSE {name}: {name}-specific (Eq. 4)"
        colour = LAFN_COLOUR if name == INDEPENDENT else language_colour(name)
        fig.add_bar(x=layers, y=y, name=label, marker=dict(color=colour),
                    hovertemplate=f"layer %{{x}}<br>%{{y:,d}} neurons · {_escape(label)}<extra></extra>")
    _layout(fig, title or "Neurons the MEMLA edit trained (masked value vectors), per layer and editor",
            barmode="stack", legend=dict(title="editor"), bargap=0.1)
    fig.update_xaxes(title_text="layer", dtick=1 if n_layers < 25 else None)
    fig.update_yaxes(title_text="knowledge neurons edited", rangemode="tozero")
    return fig


def patch_activations(table: pd.DataFrame, memory_max: float | None = None, title: str | None = None) -> go.Figure:
    """Does a patch neuron fire on the edit question in each language? (mpn Eq. 7: ``a_p = σ(q·k_p + b_p)``.)

    ``table`` has one row per (patch, language) with ``activation (last token)`` (the position that predicts the
    answer's first token) and ``activation (max)`` (over the question's tokens). ``memory_max`` -- the patch's
    largest activation on its memory set, as trained -- is drawn as the line above which it fires."""
    table = _check_table(table, ["patch", "language", "activation (last token)", "activation (max)"],
                         "The patch-activation table", numeric=["activation (last token)", "activation (max)"])
    fig = go.Figure()
    for patch, part in table.groupby("patch", sort=False):
        fig.add_bar(x=part["language"], y=part["activation (last token)"], name=f"{patch}: last token",
                    marker=dict(color=[language_colour(lang) for lang in part["language"]]),
                    text=[f"{v:.2f}" for v in part["activation (last token)"]], textposition="outside",
                    hovertemplate="%{x}: a_p at the last token = %{y:.3f}<extra></extra>")
        fig.add_scatter(x=part["language"], y=part["activation (max)"], mode="markers", name=f"{patch}: max",
                        marker=dict(symbol="diamond", size=10, color="#333333"),
                        hovertemplate="%{x}: largest a_p over the question = %{y:.3f}<extra></extra>")
    if memory_max is not None and np.isfinite(memory_max):
        fig.add_hline(y=float(memory_max), line_dash="dash", line_color="#d62728",
                      annotation_text=f"largest activation on the memory set ({memory_max:.2f})",
                      annotation_position="top left")
    _layout(fig, title or "The patch neuron's activation on the edit question, per language (mpn Eq. 7)",
            barmode="group", legend=dict(title="patch"))
    fig.update_xaxes(title_text="language of the question")
    fig.update_yaxes(title_text="a_p = σ(q·k_p + b_p)")
    return fig


# --------------------------------------------------------------------------- comparison of editors

COMPARE_KINDS = ("reliability", "generality", "locality", "portability")
#: Colours of the editors on the Compare page (the unedited model grey), in order of appearance.
_EDITOR_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                   "#bcbd22", "#7f7f7f")


def editor_colours(methods: Sequence[str]) -> dict[str, str]:
    """A fixed colour per editor in ``methods`` (``unedited`` grey), stable over the figures of one page."""
    out, i = {}, 0
    for m in methods:
        if m == "unedited":
            out[m] = "#b0b0b0"
        else:
            out[m] = _EDITOR_COLOURS[i % len(_EDITOR_COLOURS)]
            i += 1
    return out


def compare_summary(summary: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Mean success per editor and language, one panel per probe kind (reliability, generality, locality,
    portability): bars grouped by language, one colour per editor, the unedited model first.

    ``summary`` has columns ``method``, ``language``, ``kind``, ``success`` (0–100) and ``n`` (the probes
    it averages), as ``editors.compare.summary_table`` returns."""
    summary = _check_table(summary, ["method", "language", "kind", "success"], "The comparison summary",
                           numeric=["success"])
    kinds = [k for k in COMPARE_KINDS if k in set(summary["kind"])] or sorted(set(summary["kind"]))
    methods = list(dict.fromkeys(summary["method"]))
    colours = editor_colours(methods)
    fig = make_subplots(rows=1, cols=max(1, len(kinds)), subplot_titles=kinds, shared_yaxes=True,
                        horizontal_spacing=0.03)
    probes = summary if "n" in summary else summary.assign(n=1)  # without counts, each bar is "1 probe"
    # the value above each bar while it fits: four or more bars to a group overlap their numbers (the hover has them)
    text = "{:.0f}" if len(methods) <= 3 else None
    for col, kind in enumerate(kinds, start=1):
        _bar_series(fig, probes[probes["kind"] == kind], x="language", series="method", value="success",
                    order=methods, colours=colours, text=text, customdata=["n"], row=1, col=col,
                    textposition="outside", cliponaxis=False,
                    hover=lambda method, kind=kind: (f"{_escape(method)} · {kind} · %{{x}}: %{{y:.1f}}"
                                                     " (mean of %{customdata[0]} probe(s))<extra></extra>"))
    fig.update_yaxes(range=[0, 112], title_text="success (token F1 %)", row=1, col=1)
    fig.update_xaxes(title_text="language")
    return _layout(fig, title or "Success per editor, language and probe kind (locality: answer kept)",
                   barmode="group", height=420, legend_title_text="editor", margin=dict(t=80, b=40))


# --------------------------------------------------------------------------- why an edit transferred

_SET_COLOURS = {"agnostic": LAFN_COLOUR, "other": "#c7c7c7", "added neurons": "#7f7f7f"}


def edit_overlap_by_layer(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Per layer the edit touches, its share of the edit's weight on the fact's language-agnostic neurons, on
    each language's specific ones, on neither ("other") and on added neurons, as stacked bars; the hover gives
    the overlap (how many of the layer's top neurons are in the set) and the set's size. One panel per source
    of the neuron sets (atlas, IG) when ``table`` has a ``source`` column.

    ``table``: columns ``layer``, ``set``, ``weight share`` (0-1), ``overlap``, ``top`` and ``set size``, as
    ``editors.overlap.overlap_by_layer`` returns."""
    table = _check_table(table, ["layer", "set", "weight share", "overlap", "top"], "The overlap table",
                         numeric=["weight share", "overlap", "top"])
    if "source" not in table:
        table = table.assign(source="atlas")
    sources = list(dict.fromkeys(table["source"]))
    names = {"atlas": "atlas sets (lu-lafns Eq. 4-6)", "ig": "IG knowledge neurons (memla Eq. 3-4)"}
    fig = make_subplots(rows=1, cols=len(sources), shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[names.get(s, s) for s in sources])
    sets = list(dict.fromkeys(table["set"]))
    labels = {name: name if name in _SET_COLOURS else f"{name}-specific" for name in sets}
    colours = {name: _SET_COLOURS.get(name) or language_colour(name) for name in sets}
    # the hover shows -1 for a set without a size (no "set size" column, or none for "other")
    bars = table.assign(**{"weight %": 100.0 * table["weight share"],
                           "set size": table["set size"].fillna(-1) if "set size" in table else -1})
    for col, source in enumerate(sources, start=1):
        part = bars[bars["source"] == source]
        _bar_series(fig, part, x="layer", series="set", value="weight %", order=sets, names=labels,
                    colours=colours, customdata=["overlap", "top", "set size"], row=1, col=col,
                    hover=lambda label: (f"layer %{{x}} · {_escape(label)}: %{{y:.1f}} % of the edit's weight<br>"
                                         "%{customdata[0]} of the layer's %{customdata[1]} top neurons are in this "
                                         "set (set size %{customdata[2]})<extra></extra>"))
        fig.update_xaxes(_layer_axis(part["layer"]), row=1, col=col)
    fig.update_yaxes(title_text="share of the edit's weight (%)", row=1, col=1)
    return _layout(fig, title or "Where the edit's weight falls: the fact's agnostic and specific neurons per layer",
                   barmode="stack", height=420, legend_title_text="neurons", margin=dict(t=80, b=40))


def overlap_vs_transfer(points: pd.DataFrame, correlations: pd.DataFrame | None = None, x: str = "agnostic share",
                        y: str = "transfer", title: str | None = None) -> go.Figure:
    """One point per (record, method): the edit's share of weight on the fact's agnostic neurons (x, %) against
    its transfer to the other languages (y), one colour per method; the legend gives each method's Spearman
    correlation when ``correlations`` (``editors.overlap.rank_correlations``) is given."""
    points = _check_table(points, ["method", "record", x, y], "The overlap points", numeric=[x, y])
    rho = {} if correlations is None else dict(zip(correlations["method"], correlations["spearman"]))
    colours = editor_colours(list(dict.fromkeys(points["method"])))
    fig = go.Figure()
    for method, part in points.groupby("method", sort=False):
        part = part.dropna(subset=[x, y])
        if part.empty:
            continue
        r = rho.get(method)
        label = method if r is None or pd.isna(r) else f"{method} (ρ = {r:+.2f})"
        fig.add_scatter(x=100.0 * part[x], y=part[y], mode="markers", name=label, marker=dict(
            color=colours[method], size=9, opacity=0.75), customdata=part[["record"]],
            hovertemplate=(f"{_escape(method)} · %{{customdata[0]}}<br>{x}: %{{x:.1f}} %<br>{y}: %{{y:.1f}}"
                           "<extra></extra>"))
    fig.update_xaxes(title_text="edit's weight on the fact's agnostic neurons (%)")
    fig.update_yaxes(title_text=f"{y}: top-1 gain in the other languages (points)")
    return _layout(fig, title or "Overlap with agnostic neurons vs cross-lingual transfer (one point per record)",
                   height=460, legend_title_text="editor (Spearman ρ)")
