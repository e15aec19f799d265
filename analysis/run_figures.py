"""Figures of a finished evaluation run (plain tables in, plotly figures out), one function per figure.

The tables come from :mod:`editors.tables` (``transfer_matrix``) or are small summaries of
the probe rows (``editors.evaluate.rows_frame``) that the caller computes; nothing here knows
about models, editors or run folders. Scores are percentages, so every colour scale and
every value axis is fixed to 0–100: two heatmaps or two bar charts side by side compare
by colour and height alone. Bad input raises ``InputError`` with a message for users.
"""
from __future__ import annotations

import math
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.errors import InputError
from analysis.figures import _bar_series, _layout, language_colour

#: The label column of ``editors.tables.transfer_matrix`` and its cross-language mean column.
EDIT_COLUMN = "edit"
CROSS_AVERAGE_COLUMN = "x-avg"


def _matrix_cells(matrix: pd.DataFrame) -> tuple[list[str], list[str], np.ndarray]:
    """Row labels, column labels and the float values of an edit × test-language matrix.

    Accepts the layout of ``transfer_matrix`` (an ``edit`` column of edit-language sets) or a
    matrix whose index already holds the edit sets.
    """
    what = "The transfer matrix"
    if not isinstance(matrix, pd.DataFrame):
        raise InputError(f"{what} must be a pandas DataFrame (edit languages × test languages), "
                         f"got {type(matrix).__name__}.")
    if EDIT_COLUMN in matrix.columns:
        matrix = matrix.set_index(EDIT_COLUMN)
    if matrix.empty or not len(matrix.columns):
        raise InputError(f"{what} is empty: the run has no probe rows for this method yet.")
    try:
        values = matrix.apply(pd.to_numeric, errors="raise").to_numpy(dtype=float)
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must hold numbers (percentages): {err}") from None
    finite = values[np.isfinite(values)]
    if ((finite < 0) | (finite > 100)).any():
        raise InputError(f"{what} must hold percentages between 0 and 100.")
    return [str(i) for i in matrix.index], [str(c) for c in matrix.columns], values


def transfer_heatmap(matrix: pd.DataFrame, title: str, metric: str) -> go.Figure:
    """Edit-language sets (rows) × test languages (columns) of one method, the score written in each cell.

    ``matrix`` is ``editors.tables.transfer_matrix``'s table (or the same with the edit sets as
    index); its "x-avg" column (memla's transferability: the mean over test languages outside the
    edit set) stays as the last column. ``metric`` names the value (e.g. "Reliability EM") for
    the colour bar and the hover. The colour scale is fixed to 0–100 so heatmaps of different
    methods compare by colour; a cell without a value shows "–".
    """
    rows, cols, values = _matrix_cells(matrix)
    z = [[None if not math.isfinite(v) else float(v) for v in row] for row in values]
    text = [["–" if v is None else f"{v:.1f}" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=rows, text=text, texttemplate="%{text}", zmin=0, zmax=100, colorscale="Viridis",
        hoverongaps=False, colorbar=dict(title=f"{metric} (%)"),
        hovertemplate=f"edited in %{{y}}<br>asked in %{{x}}<br>{metric} %{{z:.1f}}%<extra></extra>"))
    height = max(260, 56 * len(rows) + 150)
    return _layout(
        fig, title,
        xaxis=dict(title="test language (x-avg: those outside the edit)", type="category", showgrid=False),
        yaxis=dict(title="edit languages", type="category", autorange="reversed", showgrid=False),
        height=height, width=max(520, 80 * len(cols) + 260),  # a width only for export; the app stretches it
        margin=dict(l=10, r=10, t=60, b=10),
    )


def method_scores_bars(scores: pd.DataFrame, title: str, metric: str) -> go.Figure:
    """Grouped bars: one group per metric kind (reliability, generality, ...), one bar per method.

    ``scores`` has columns ``method``, ``kind`` and ``value`` (a percentage; NaN draws no bar),
    one row per (method, kind) — the run's mean over test languages and edit sets.
    """
    what = "The method scores"
    missing = [c for c in ("method", "kind", "value") if not isinstance(scores, pd.DataFrame) or c not in scores]
    if missing:
        raise InputError(f"{what} need the columns method, kind and value; missing {', '.join(missing)}.")
    if scores.empty:
        raise InputError(f"{what} are empty: the run has no probe rows yet.")
    scores = scores.assign(method=scores["method"].astype(str), kind=scores["kind"].astype(str))
    fig = go.Figure()
    _bar_series(fig, scores, x="kind", series="method", value="value", categories=list(dict.fromkeys(scores["kind"])),
                hover=lambda method: f"{method}<br>%{{x}}: %{{y:.1f}}%<extra></extra>")
    return _layout(
        fig, title, barmode="group",
        yaxis=dict(title=f"{metric} (%)", range=[0, 102]),
        xaxis=dict(title="metric"), legend=dict(title="method"), height=400,
    )


def language_scores_bars(scores: pd.DataFrame, title: str, metric: str) -> go.Figure:
    """Bars per method, one per test language (fixed language colours): where an edit transfers.

    ``scores`` has columns ``method``, ``language`` and ``value`` (a percentage).
    """
    what = "The language scores"
    missing = [c for c in ("method", "language", "value") if not isinstance(scores, pd.DataFrame) or c not in scores]
    if missing:
        raise InputError(f"{what} need the columns method, language and value; missing {', '.join(missing)}.")
    if scores.empty:
        raise InputError(f"{what} are empty: the run has no probe rows yet.")
    scores = scores.assign(method=scores["method"].astype(str), language=scores["language"].astype(str))
    languages = list(dict.fromkeys(scores["language"]))
    fig = go.Figure()
    _bar_series(fig, scores, x="method", series="language", value="value",
                categories=list(dict.fromkeys(scores["method"])),
                colours={language: language_colour(language) for language in languages},
                hover=lambda language: f"%{{x}} · asked in {language}<br>{metric} %{{y:.1f}}%<extra></extra>")
    return _layout(
        fig, title, barmode="group",
        yaxis=dict(title=f"{metric} (%)", range=[0, 102]),
        xaxis=dict(title="method"), legend=dict(title="test language"), height=400,
    )

