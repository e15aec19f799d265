"""Figures of a multilingual sequential editing run (plain tables in, plotly figures out).

The tables are those of :mod:`editors.sequential_run` (``curve_rows``,
``interference_matrix``, ``nullspace_rows``) as DataFrames or lists; nothing here
knows about models or editors.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

METRIC_TITLES = {"efficacy": "Efficacy", "generality": "Generality", "specificity": "Specificity"}
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def curves_figure(curves: pd.DataFrame, metric: str = "efficacy", methods: Sequence[str] | None = None,
                  show_unedited: bool = True) -> go.Figure:
    """One panel per method: ``metric`` over the edits so far (each asked in its own language) against the
    number of edits, one line per edit language and a thick black line for all of them; the unedited model's
    value of the same edits dotted."""
    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {', '.join(METRIC_TITLES)}, got {metric!r}")
    methods = list(methods) if methods is not None else list(dict.fromkeys(curves["method"])) if len(curves) else []
    fig = make_subplots(rows=1, cols=max(len(methods), 1), shared_yaxes=True,
                        subplot_titles=methods or ["no step measured yet"], horizontal_spacing=0.04)
    languages = [x for x in dict.fromkeys(curves["language"]) if x != "all"] if len(curves) else []
    colors = {lang: _PALETTE[i % len(_PALETTE)] for i, lang in enumerate(languages)}
    for col, method in enumerate(methods, start=1):
        mine = curves[curves["method"] == method].sort_values("edits")
        for lang in languages + ["all"]:
            part = mine[mine["language"] == lang]
            if part.empty:
                continue
            style = dict(color="black", width=3) if lang == "all" else dict(color=colors[lang], width=1.5)
            fig.add_trace(go.Scatter(
                x=part["edits"].tolist(), y=part[metric].tolist(), mode="lines+markers", name="all languages" if lang == "all" else lang,
                legendgroup=lang, showlegend=col == 1, line=style,
                hovertemplate=f"{method} · {lang}<br>%{{x}} edits<br>{METRIC_TITLES[metric]} %{{y:.1f}}<extra></extra>"),
                row=1, col=col)
            if show_unedited and lang == "all" and f"{metric}_unedited" in part:
                fig.add_trace(go.Scatter(
                    x=part["edits"].tolist(), y=part[f"{metric}_unedited"].tolist(), mode="lines", name="unedited (same edits)",
                    legendgroup="unedited", showlegend=col == 1, line=dict(color="grey", dash="dot", width=2),
                    hovertemplate="unedited model<br>%{x} edits<br>%{y:.1f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="edits so far", row=1, col=col)
    fig.update_yaxes(title_text=f"{METRIC_TITLES[metric]} (%)", range=[-2, 102], row=1, col=1)
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="edit language")
    return fig


def interference_figure(labels: Sequence[str], languages: Sequence[str], matrix: Sequence[Sequence[float | None]],
                        title: str, diverging: bool = False) -> go.Figure:
    """Batch (row) × probe language (column) heatmap with the values written in the cells."""
    text = [["–" if v is None else f"{v:.0f}" for v in row] for row in matrix]
    kwargs = dict(colorscale="RdBu", zmid=0) if diverging else dict(colorscale="Viridis", zmin=0, zmax=100)
    fig = go.Figure(go.Heatmap(z=[[None if v is None else v for v in row] for row in matrix], x=list(languages),
                               y=list(labels), text=text, texttemplate="%{text}", hoverongaps=False,
                               hovertemplate="batch %{y}<br>asked in %{x}: %{z:.1f}<extra></extra>", **kwargs))
    fig.update_yaxes(autorange="reversed", title_text="edited batch")
    fig.update_xaxes(title_text="asked in", side="top")
    fig.update_layout(title=title, height=max(260, 48 * len(labels) + 120), margin=dict(l=10, r=10, t=80, b=10))
    return fig


def nullspace_figure(rows: pd.DataFrame) -> go.Figure:
    """The rank of the kept null space per step, one line per layer, one panel per method that projects."""
    rows = rows.dropna(subset=["nullspace_dim"]) if len(rows) else rows
    methods = list(dict.fromkeys(rows["method"])) if len(rows) else []
    fig = make_subplots(rows=1, cols=max(len(methods), 1), shared_yaxes=True,
                        subplot_titles=methods or ["no method projects (MEMIT keeps no null space)"])
    layers = sorted(set(rows["layer"])) if len(rows) else []
    shown: set[int] = set()
    for col, method in enumerate(methods, start=1):
        mine = rows[rows["method"] == method]
        for i, layer in enumerate(layers):
            part = mine[mine["layer"] == layer].sort_values("step")
            if part.empty:
                continue
            first = layer not in shown
            shown.add(layer)
            fig.add_trace(go.Scatter(x=part["step"].tolist(), y=part["nullspace_dim"].tolist(), mode="lines+markers",
                                     name=f"layer {layer}", legendgroup=str(layer), showlegend=first,
                                     line=dict(color=_PALETTE[i % len(_PALETTE)]),
                                     hovertemplate=f"{method} · layer {layer}<br>step %{{x}}: rank %{{y}}<extra></extra>"),
                          row=1, col=col)
        fig.update_xaxes(title_text="step", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="null-space rank kept", row=1, col=1)
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10))
    return fig
