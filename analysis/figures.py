"""Plotly figures, one function per figure.

Every function takes plain data (pandas DataFrames, numpy arrays) as produced by
``analysis.neurons`` and returns a ``plotly.graph_objects.Figure``. Inputs are
checked once, at the top of each function; bad input raises ``InputError`` with a
message written for users.

Colours are fixed per language code (``language_colour``) so that "en" has the same
colour in every figure of a session; the language-agnostic factual neurons (LAFNs,
lu-lafns Eq. 6) are always drawn in ``LAFN_COLOUR``.

The figures of single facts (knowledge neurons by integrated gradients, causal
traces, edit results) are in :mod:`analysis.fact_figures`.

``save_figure`` writes a self-contained HTML file (plotly.js embedded, so it opens
offline) and a PNG through kaleido, which drives a headless Chrome/Chromium.
"""
from __future__ import annotations

import html
import os
import textwrap
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.errors import InputError, NeuroglotError

__all__ = [
    "LAFN",
    "LAFN_COLOUR",
    "LANGUAGE_COLOURS",
    "SPECIFIC_PREFIX",
    "TEMPLATE",
    "figure_to_png_bytes",
    "language_colour",
    "lape_distribution",
    "beta_sweep",
    "neuron_drilldown",
    "neurons_per_layer",
    "overlap_by_layer",
    "overlap_heatmap",
    "save_figure",
]

TEMPLATE = "plotly_white"
LAFN = "LAFN"
SPECIFIC_PREFIX = "specific:"
LAFN_COLOUR = "#1a1a2e"  # near-black navy: never used for a language

# Fixed colours for the languages of the corpora we ship loaders for (ParaRel,
# mParaRel, X-FACTR, MzsRE, MLaKE, FLORES). Dark tones are avoided so that LAFN stays distinct.
LANGUAGE_COLOURS: dict[str, str] = {
    "en": "#1f77b4",  # blue
    "zh": "#d62728",  # red
    "de": "#ff7f0e",  # orange
    "fr": "#2ca02c",  # green
    "es": "#9467bd",  # purple
    "ja": "#e377c2",  # pink
    "ru": "#8c564b",  # brown
    "ar": "#17becf",  # cyan
    "ko": "#bcbd22",  # olive
    "pt": "#7f7f7f",  # grey
    "it": "#aec7e8",
    "nl": "#ffbb78",
    "pl": "#98df8a",
    "tr": "#ff9896",
    "vi": "#c5b0d5",
    "th": "#c49c94",
    "hi": "#f7b6d2",
    "id": "#dbdb8d",
    "uk": "#9edae5",
    "sv": "#637939",
    "cs": "#8c6d31",
    "el": "#843c39",
    "he": "#7b4173",
    "fa": "#3182bd",
    "bn": "#e6550d",
    "ca": "#31a354",
    "hu": "#756bb1",
    "fi": "#636363",
    "ro": "#6baed6",
    "da": "#fd8d3c",
    "ms": "#74c476",
    "ta": "#9e9ac8",
    "sw": "#e7ba52",
}
# Languages outside the table get a colour from this list, chosen by a stable hash of
# the code (crc32, not Python's salted hash) so it does not change between runs.
_FALLBACK_COLOURS = (
    "#b5cf6b", "#cedb9c", "#e7969c", "#de9ed6", "#a55194", "#ce6dbd", "#bd9e39",
    "#ad494a", "#5254a3", "#6b6ecf", "#9c9ede", "#8ca252", "#e7cb94", "#d6616b",
)
# Language pairs (overlap_by_layer) are not languages: they cycle through their own palette.
_PAIR_COLOURS = (
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b",
    "#ff9da6", "#9d755d", "#bab0ac",
)
_PROMOTED_COLOUR = "#2e8b57"
_SUPPRESSED_COLOUR = "#c0392b"
_LABEL_CHARS = 60
_IMAGE_FORMATS = ("png", "svg", "pdf", "jpeg", "webp")
_CHROMIUM = "/usr/bin/chromium"


def language_colour(code: str) -> str:
    """The fixed colour of a language code (``"en"``, ``"zh"``, ``"eng_Latn"``), or of ``"LAFN"``."""
    if code == LAFN:
        return LAFN_COLOUR
    if code.startswith(SPECIFIC_PREFIX):
        code = code[len(SPECIFIC_PREFIX):]
    key = code.strip().lower()
    if key in LANGUAGE_COLOURS:
        return LANGUAGE_COLOURS[key]
    base = key.replace("-", "_").split("_")[0]  # "zh-CN", "en_US" -> "zh", "en"
    if base in LANGUAGE_COLOURS:
        return LANGUAGE_COLOURS[base]
    return _FALLBACK_COLOURS[zlib.crc32(key.encode("utf-8")) % len(_FALLBACK_COLOURS)]


# --------------------------------------------------------------------------- input checks


def _check_table(table: object, columns: Iterable[str], what: str, *, numeric: Iterable[str] = ()) -> pd.DataFrame:
    """A non-empty DataFrame with ``columns`` whose ``numeric`` columns hold finite numbers."""
    columns = list(columns)
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{what} must be a pandas DataFrame with columns {columns}, got {type(table).__name__}.")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(
            f"{what} is missing column(s) {missing}; expected {columns}, got {list(map(str, table.columns))}."
        )
    if table.empty:
        raise InputError(f"{what} is empty: there is nothing to plot.")
    for c in numeric:
        values = pd.to_numeric(table[c], errors="coerce")
        if values.isna().any() or not np.isfinite(values.to_numpy(dtype=float)).all():
            raise InputError(f"{what}: column {c!r} must hold finite numbers only.")
    return table


def _check_integer_column(table: pd.DataFrame, column: str, what: str, *, minimum: int = 0) -> None:
    values = pd.to_numeric(table[column]).to_numpy(dtype=float)
    if (values != np.round(values)).any() or (values < minimum).any():
        raise InputError(f"{what}: column {column!r} must hold whole numbers >= {minimum}.")


def _check_unique(table: pd.DataFrame, keys: list[str], what: str) -> None:
    duplicated = table.duplicated(subset=keys, keep=False)
    if duplicated.any():
        example = table.loc[duplicated, keys].iloc[0].to_dict()
        raise InputError(f"{what} has more than one row for {example}; expected one row per {tuple(keys)}.")


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{name} must be a positive whole number, got {value!r}.")
    return int(value)


def _check_index(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name} must be a whole number >= 0, got {value!r}.")
    return int(value)


# --------------------------------------------------------------------------- text helpers


def _escape(text: str) -> str:
    """Plotly renders a subset of HTML in labels: show ``<`` and ``&`` literally."""
    return html.escape(str(text), quote=False)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _truncate(text: str, limit: int = _LABEL_CHARS) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hover_paragraph(text: str, width: int = 80) -> str:
    """Full text for a hover box, wrapped so that it stays readable."""
    return "<br>".join(_escape(line) for line in textwrap.wrap(_one_line(text), width) or [""])


def _show_token(token: str) -> str:
    """A token as a label: quoted so leading spaces show; control characters (newline, tab)
    escaped, CJK/Arabic and other printable text kept as is."""
    shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(token))
    return f"“{shown}”"


def _unique_labels(labels: Sequence[str]) -> list[str]:
    """Categorical axes merge equal labels: number repeats so every bar keeps its own row."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        n = seen.get(label, 0) + 1
        seen[label] = n
        out.append(label if n == 1 else f"{label} ({n})")
    return out


def _layer_axis(layers: pd.Series) -> dict:
    """A layer x axis: every layer ticked (up to 40), no empty layer -1 or n at the ends."""
    low, high = int(layers.min()), int(layers.max())
    return dict(title="layer (0-based)", dtick=1 if high - low < 40 else None, range=[low - 0.6, high + 0.6])


def _layout(fig: go.Figure, title: str, **kwargs) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, x=0.01, xanchor="left"),
        hoverlabel=dict(namelength=-1),
        **kwargs,
    )
    return fig


def _bar_series(
    fig: go.Figure,
    table: pd.DataFrame,
    *,
    x: str,
    series: str,
    value: str,
    hover: Callable[[str], str],
    order: Iterable[object] | None = None,
    categories: Sequence[object] | None = None,
    names: Mapping[object, str] | None = None,
    colours: Mapping[object, str] | None = None,
    text: str | None = None,
    customdata: Sequence[str] = (),
    row: int | None = None,
    col: int | None = None,
    **bar: object,
) -> None:
    """Add one bar trace per series of a long table (one row per bar) to ``fig``.

    ``series`` names the column whose values make the traces, in ``order`` (default: order of
    appearance); a series without rows draws no trace. ``x`` and ``value`` are the columns of the
    bars' positions and heights. With ``categories`` every trace gets exactly those x values,
    its values aligned to them (a missing or NaN value draws no bar; for repeated x the last row
    counts); without, a trace has its own rows' x in table order.

    ``names`` maps a series to its trace name (default: the series value as is), ``colours`` a
    series to its marker colour (default: plotly's colour cycle). ``hover(name)`` gives a
    trace's hover template, ``text`` a format for the value written on each bar (``"{:.0f}"``),
    ``customdata`` the columns ``%{customdata[i]}`` reads. ``bar`` goes to ``go.Bar`` as is.

    In a panel of a subplot grid (``row``/``col``), a series is one legend group across the
    panels and appears in the legend from the first panel only.
    """
    keys = list(dict.fromkeys(table[series])) if order is None else list(order)
    for key in keys:
        rows = table[table[series] == key]
        if rows.empty:
            continue
        name = names[key] if names is not None else key
        if categories is None:
            xs, values, cells = rows[x], rows[value], rows
        else:
            cells = rows.drop_duplicates(x, keep="last").set_index(x).reindex(categories)
            xs = categories
            values = [float(v) if pd.notna(v) else None for v in cells[value]]
        trace = dict(x=xs, y=values, name=name, hovertemplate=hover(name), **bar)
        if colours is not None:
            trace["marker_color"] = colours[key]
        if text is not None:
            trace["text"] = ["" if v is None or pd.isna(v) else text.format(v) for v in values]
        if customdata:
            trace["customdata"] = np.stack([np.asarray(cells[c]) for c in customdata], axis=1)
        if row is not None or col is not None:
            trace.update(legendgroup=name, showlegend=(row or 1) == 1 and (col or 1) == 1)
        fig.add_trace(go.Bar(**trace), row=row, col=col)


# --------------------------------------------------------------------------- figures


def _check_neuron_counts(table: pd.DataFrame, keys: list[str], n_neurons: int, what: str) -> int:
    """Integer ``layer``/``count`` columns, one row per ``keys``, no count above ``n_neurons``."""
    n_neurons = _check_positive_int(n_neurons, "n_neurons")
    _check_integer_column(table, "layer", what)
    _check_integer_column(table, "count", what)
    _check_unique(table, keys, what)
    if (pd.to_numeric(table["count"]) > n_neurons).any():
        raise InputError(f"{what}: a count exceeds n_neurons={n_neurons}, the number of neurons in a layer.")
    return n_neurons


def neurons_per_layer(table: pd.DataFrame, n_neurons: int, title: str | None = None) -> go.Figure:
    """Figure 1 of papers/lu-lafns.md: factual neurons per layer for each language (lu-lafns Eq. 5),
    the language-agnostic factual neurons (LAFNs, lu-lafns Eq. 6) as bars, language-specific sets dashed.

    ``table`` has columns ``layer`` (0-based int), ``set`` (a language code, ``"LAFN"`` or
    ``"specific:<code>"``) and ``count``; ``n_neurons`` is the number of FFN neurons per layer.
    Trace names are the ``set`` values.
    """
    what = "The neurons-per-layer table"
    table = _check_table(table, ["layer", "set", "count"], what, numeric=["layer", "count"])
    n_neurons = _check_neuron_counts(table, ["layer", "set"], n_neurons, what)

    data = table.assign(
        layer=pd.to_numeric(table["layer"]).astype(int),
        count=pd.to_numeric(table["count"]).astype(int),
        set=table["set"].astype(str),
    ).sort_values("layer", kind="stable")
    sets = list(pd.unique(data["set"]))
    # LAFN bars first so that the language lines are drawn on top of them.
    ordered = [s for s in sets if s == LAFN] + [s for s in sets if s != LAFN and not s.startswith(SPECIFIC_PREFIX)]
    ordered += [s for s in sets if s.startswith(SPECIFIC_PREFIX)]

    fig = go.Figure()
    for name in ordered:
        rows = data[data["set"] == name]
        x = rows["layer"].to_numpy()
        y = rows["count"].to_numpy()
        share = 100.0 * y / n_neurons
        hover = (
            f"<b>{_escape(name)}</b><br>layer %{{x}}<br>%{{y:,d}} neurons"
            f"<br>%{{customdata:.2f}}% of {n_neurons:,d}<extra></extra>"
        )
        colour = language_colour(name)
        if name == LAFN:
            fig.add_trace(go.Bar(
                x=x, y=y, name=name, customdata=share, hovertemplate=hover,
                marker=dict(color=colour), opacity=0.85,
            ))
        else:
            dash = "dash" if name.startswith(SPECIFIC_PREFIX) else "solid"
            fig.add_trace(go.Scatter(
                x=x, y=y, name=name, mode="lines+markers", customdata=share, hovertemplate=hover,
                line=dict(color=colour, width=2, dash=dash), marker=dict(color=colour, size=6),
            ))

    lafn = data[data["set"] == LAFN]
    if not lafn.empty and lafn["count"].max() > 0:
        peak = lafn.loc[lafn["count"].idxmax()]
        # Above the plot area, over the peak column, so that it never sits on a line.
        fig.add_annotation(
            x=int(peak["layer"]), y=1.0, yref="paper", yanchor="bottom", showarrow=False,
            text=f"▼ LAFN peak: layer {int(peak['layer'])} ({int(peak['count']):,d})",
            font=dict(color=LAFN_COLOUR, size=12),
        )

    n_languages = sum(1 for s in sets if s != LAFN and not s.startswith(SPECIFIC_PREFIX))
    default = f"Factual neurons per layer ({n_languages} languages) and their intersection (LAFN)"
    _layout(
        fig, title or default,
        xaxis=_layer_axis(data["layer"]),
        yaxis=dict(title=f"neurons (of {n_neurons:,d} per layer)", rangemode="tozero"),
        legend=dict(title="set"),
        hovermode="closest",
        bargap=0.15,
    )
    return fig


def overlap_heatmap(jaccard: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Language × language Jaccard overlap of factual-neuron sets, annotated, colour scale 0..1.

    ``jaccard`` is square, with the same language codes as index and columns; columns are
    put in the index's order.
    """
    what = "The Jaccard overlap matrix"
    if not isinstance(jaccard, pd.DataFrame):
        raise InputError(f"{what} must be a pandas DataFrame (language × language), got {type(jaccard).__name__}.")
    if jaccard.empty:
        raise InputError(f"{what} is empty: there is nothing to plot.")
    rows, cols = [str(i) for i in jaccard.index], [str(c) for c in jaccard.columns]
    if len(set(rows)) != len(rows) or sorted(rows) != sorted(cols):
        raise InputError(
            f"{what} must be square with the same languages as rows and columns; got rows {rows} and columns {cols}."
        )
    matrix = jaccard.set_axis(rows, axis=0).set_axis(cols, axis=1).loc[rows, rows]
    try:
        z = matrix.to_numpy(dtype=float)
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must hold numbers: {err}") from None
    if not np.isfinite(z).all() or (z < 0).any() or (z > 1).any():
        raise InputError(f"{what} must hold Jaccard overlaps, finite numbers between 0 and 1.")

    fig = go.Figure(go.Heatmap(
        z=z, x=rows, y=rows, zmin=0.0, zmax=1.0, colorscale="Blues",
        texttemplate="%{z:.2f}", colorbar=dict(title="Jaccard"),
        hovertemplate="%{y} ∩ %{x}<br>Jaccard %{z:.4f}<extra></extra>",
    ))
    side = max(380, 60 * len(rows) + 160)
    return _layout(
        fig, title or "Overlap of factual neurons between languages (Jaccard)",
        xaxis=dict(title="language", type="category", showgrid=False),
        yaxis=dict(title="language", type="category", autorange="reversed", showgrid=False),
        height=side, width=max(560, side + 200),  # a width only for export; the app stretches it
    )


def overlap_by_layer(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Jaccard overlap of two languages' factual neurons per layer, one line per pair.

    ``table`` has columns ``layer`` (0-based int), ``pair`` (e.g. ``"en–zh"``) and ``jaccard``.
    """
    what = "The overlap-by-layer table"
    table = _check_table(table, ["layer", "pair", "jaccard"], what, numeric=["layer", "jaccard"])
    _check_integer_column(table, "layer", what)
    _check_unique(table, ["layer", "pair"], what)
    values = pd.to_numeric(table["jaccard"])
    if (values < 0).any() or (values > 1).any():
        raise InputError(f"{what}: column 'jaccard' must hold numbers between 0 and 1.")

    data = table.assign(
        layer=pd.to_numeric(table["layer"]).astype(int), jaccard=values.astype(float), pair=table["pair"].astype(str)
    ).sort_values("layer", kind="stable")
    fig = go.Figure()
    for i, pair in enumerate(pd.unique(data["pair"])):
        rows = data[data["pair"] == pair]
        colour = _PAIR_COLOURS[i % len(_PAIR_COLOURS)]
        fig.add_trace(go.Scatter(
            x=rows["layer"].to_numpy(), y=rows["jaccard"].to_numpy(), name=pair, mode="lines+markers",
            line=dict(color=colour, width=2), marker=dict(color=colour, size=6),
            hovertemplate=f"<b>{_escape(pair)}</b><br>layer %{{x}}<br>Jaccard %{{y:.4f}}<extra></extra>",
        ))
    return _layout(
        fig, title or "Overlap of factual neurons per layer (Jaccard, per language pair)",
        xaxis=_layer_axis(data["layer"]),
        yaxis=dict(title="Jaccard overlap", range=[0, 1.02]),
        legend=dict(title="language pair"),
    )


def beta_sweep(table: pd.DataFrame, n_neurons: int, title: str | None = None) -> go.Figure:
    """LAFNs per layer for each threshold β of lu-lafns Eq. 5 (Table 5), as an
    annotated heatmap: rows β (ascending downwards, as in Table 5), columns layers.

    ``table`` has columns ``beta``, ``layer`` (0-based int) and ``count``. Layer/β cells
    missing from the table stay empty.
    """
    what = "The β-sweep table"
    table = _check_table(table, ["beta", "layer", "count"], what, numeric=["beta", "layer", "count"])
    n_neurons = _check_neuron_counts(table, ["beta", "layer"], n_neurons, what)

    data = table.assign(
        beta=pd.to_numeric(table["beta"]).astype(float),
        layer=pd.to_numeric(table["layer"]).astype(int),
        count=pd.to_numeric(table["count"]).astype(float),
    )
    grid = data.pivot(index="beta", columns="layer", values="count").sort_index().sort_index(axis=1)
    z = grid.to_numpy(dtype=float)
    betas = [f"{b:g}" for b in grid.index]
    layers = [int(layer) for layer in grid.columns]
    share = 100.0 * z / n_neurons
    few = len(layers) <= 8
    text = [
        ["" if np.isnan(c) else (f"{int(c):,d}<br>({p:.1f}%)" if few else f"{int(c):,d}") for c, p in zip(row, prow)]
        for row, prow in zip(z, share)
    ]
    fig = go.Figure(go.Heatmap(
        z=z, x=layers, y=betas, text=text, texttemplate="%{text}", customdata=share,
        colorscale="Viridis", colorbar=dict(title="LAFNs"), hoverongaps=False,
        hovertemplate=(
            "β = %{y}<br>layer %{x}<br>%{z:,d} LAFNs<br>%{customdata:.2f}% of "
            f"{n_neurons:,d}<extra></extra>"
        ),
    ))
    return _layout(
        fig, title or "Language-agnostic factual neurons per layer for each threshold β (lu-lafns Eq. 5)",
        xaxis=dict(title="layer (0-based)", type="category", showgrid=False),
        yaxis=dict(title="β", type="category", autorange="reversed", showgrid=False),
        height=max(360, 34 * len(betas) + 180),
    )


def lape_distribution(
    lape: np.ndarray, specific_mask: np.ndarray | None = None, title: str | None = None
) -> go.Figure:
    """Per-layer distribution of LAPE (language activation probability entropy) as box plots,
    with the number of low-entropy (language-specific) neurons per layer as bars.

    ``lape`` has shape [n_layers, n_neurons]; NaN marks neurons without a value (never
    activated) and is left out. ``specific_mask`` is a boolean array of the same shape or None.
    The boxes are computed here (quartiles, Tukey whiskers at 1.5 IQR) rather than drawn
    from every neuron, so the figure stays small for 7–8B models.
    """
    values = np.asarray(lape, dtype=float) if lape is not None else None
    if values is None or values.ndim != 2 or values.size == 0:
        shape = None if values is None else values.shape
        raise InputError(f"LAPE must be a non-empty 2-D array [n_layers, n_neurons], got shape {shape}.")
    if np.isinf(values).any() or not np.isfinite(values).any():
        raise InputError("LAPE must hold finite numbers (NaN for neurons without a value), and at least one.")
    mask = None
    if specific_mask is not None:
        mask = np.asarray(specific_mask)
        if mask.shape != values.shape or mask.dtype != bool:
            raise InputError(
                f"specific_mask must be a boolean array of the LAPE's shape {values.shape}, "
                f"got {mask.dtype} {mask.shape}."
            )

    stats = []  # (layer, q1, median, q3, lower whisker, upper whisker, mean); all-NaN layers are skipped
    for layer, row in enumerate(values):
        row = row[np.isfinite(row)]
        if row.size == 0:
            continue
        q1, median, q3 = np.percentile(row, [25, 50, 75])
        iqr = q3 - q1
        low, high = row[row >= q1 - 1.5 * iqr].min(), row[row <= q3 + 1.5 * iqr].max()
        stats.append((layer, q1, median, q3, low, high, row.mean()))
    layers, q1s, medians, q3s, lows, highs, means = (list(column) for column in zip(*stats))

    layer_axis = _layer_axis(pd.Series(np.arange(values.shape[0])))
    rows = 2 if mask is not None else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        row_heights=[0.7, 0.3] if rows == 2 else None)
    fig.add_trace(go.Box(
        x=layers, q1=q1s, median=medians, q3=q3s, lowerfence=lows, upperfence=highs, mean=means,
        name="LAPE", marker=dict(color="#4c78a8"), line=dict(color="#4c78a8"), fillcolor="rgba(76,120,168,0.35)",
        boxpoints=False,
    ), row=1, col=1)
    fig.update_yaxes(title_text="LAPE (low = language-specific)", rangemode="tozero", row=1, col=1)
    if mask is not None:
        specific = mask.sum(axis=1)
        fig.add_trace(go.Bar(
            x=np.arange(values.shape[0]), y=specific, name="language-specific neurons",
            marker=dict(color="#e07a2f"), text=[f"{n:,d}" for n in specific], textposition="outside",
            cliponaxis=False,
            hovertemplate="layer %{x}<br>%{y:,d} language-specific (low-LAPE) neurons<extra></extra>",
        ), row=2, col=1)
        fig.update_yaxes(title_text="specific neurons", rangemode="tozero", tickformat=",d", row=2, col=1)
    fig.update_xaxes(dtick=layer_axis["dtick"], range=layer_axis["range"])
    fig.update_xaxes(title_text="layer (0-based)", row=rows, col=1)
    return _layout(
        fig, title or "Language activation probability entropy (LAPE) per layer",
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
        height=560 if rows == 2 else 440,
    )


def neuron_drilldown(
    top_prompts: pd.DataFrame, top_tokens: pd.DataFrame, layer: int, neuron: int, title: str | None = None
) -> go.Figure:
    """One neuron up close: left, the prompts that activate it most (one colour per language,
    labels cut to ~60 characters, full text in the hover); right, the tokens its value vector
    promotes and suppresses when read through the unembedding (LM-Debugger style).

    ``top_prompts`` has columns ``language``, ``text``, ``activation``, ``token``;
    ``top_tokens`` has columns ``token``, ``logit``, ``direction`` ("promoted"/"suppressed").
    Left-panel traces are named by language (axis ``x``), right-panel traces "promoted" and
    "suppressed" (axis ``x2``).
    """
    prompts = _check_table(top_prompts, ["language", "text", "activation", "token"], "The top-prompts table",
                           numeric=["activation"])
    tokens = _check_table(top_tokens, ["token", "logit", "direction"], "The top-tokens table", numeric=["logit"])
    layer = _check_index(layer, "layer")
    neuron = _check_index(neuron, "neuron")
    directions = set(tokens["direction"].astype(str))
    if not directions <= {"promoted", "suppressed"}:
        raise InputError(
            f"The top-tokens table: column 'direction' must be 'promoted' or 'suppressed', "
            f"got {sorted(directions - {'promoted', 'suppressed'})}."
        )

    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.16, column_widths=[0.6, 0.4],
        subplot_titles=("Top prompts (max activation over tokens)", "Value vector read through the unembedding"),
    )

    # Left: prompts grouped by language (in order of appearance), strongest first within a language.
    prompts = prompts.assign(
        language=prompts["language"].astype(str), activation=pd.to_numeric(prompts["activation"]).astype(float)
    )
    languages = list(pd.unique(prompts["language"]))
    prompts = prompts.assign(_order=prompts["language"].map({lang: i for i, lang in enumerate(languages)}))
    prompts = prompts.sort_values(["_order", "activation"], ascending=[True, False], kind="stable")
    labels = _unique_labels(
        [f"[{lang}] {_escape(_truncate(text))}" for lang, text in zip(prompts["language"], prompts["text"])]
    )
    prompts = prompts.assign(_label=labels)
    for lang in languages:
        rows = prompts[prompts["language"] == lang]
        custom = np.column_stack([
            [_hover_paragraph(t) for t in rows["text"]],
            [_escape(_show_token(t)) for t in rows["token"]],
        ])
        fig.add_trace(go.Bar(
            x=rows["activation"].to_numpy(), y=rows["_label"].tolist(), orientation="h", name=lang,
            marker=dict(color=language_colour(lang)), customdata=custom, legendgroup="prompts",
            legendgrouptitle_text="prompt language",
            text=[f"{a:.3g}" for a in rows["activation"]], textposition="auto",
            hovertemplate=(
                f"<b>{_escape(lang)}</b><br>%{{customdata[0]}}<br>max activation %{{x:.4f}}"
                "<br>at token %{customdata[1]}<extra></extra>"
            ),
        ), row=1, col=1)
    # A categorical y axis starts at the bottom: reverse so that the first prompt is on top.
    fig.update_yaxes(categoryorder="array", categoryarray=labels[::-1], row=1, col=1, automargin=True)
    fig.update_xaxes(title_text="activation", row=1, col=1)

    # Right: promoted (largest logit on top), then suppressed (most negative at the bottom).
    tokens = tokens.assign(
        logit=pd.to_numeric(tokens["logit"]).astype(float), direction=tokens["direction"].astype(str)
    )
    promoted = tokens[tokens["direction"] == "promoted"].sort_values("logit", ascending=False, kind="stable")
    suppressed = tokens[tokens["direction"] == "suppressed"].sort_values("logit", ascending=False, kind="stable")
    token_labels = _unique_labels([_escape(_show_token(t)) for t in pd.concat([promoted, suppressed])["token"]])
    split = len(promoted)
    for name, rows, ticks, colour in (
        ("promoted", promoted, token_labels[:split], _PROMOTED_COLOUR),
        ("suppressed", suppressed, token_labels[split:], _SUPPRESSED_COLOUR),
    ):
        if rows.empty:
            continue
        fig.add_trace(go.Bar(
            x=rows["logit"].to_numpy(), y=ticks, orientation="h", name=name, marker=dict(color=colour),
            legendgroup="tokens", legendgrouptitle_text="value vector",
            text=[f"{v:.3g}" for v in rows["logit"]], textposition="auto",
            hovertemplate=f"<b>{name}</b><br>token %{{y}}<br>logit %{{x:.4f}}<extra></extra>",
        ), row=1, col=2)
    fig.update_yaxes(categoryorder="array", categoryarray=token_labels[::-1], row=1, col=2, automargin=True)
    fig.update_xaxes(title_text="logit contribution", zeroline=True, zerolinecolor="#888", row=1, col=2)

    n_rows = max(len(labels), len(token_labels))
    return _layout(
        fig, title or f"Layer {layer}, neuron {neuron}: what activates it and what it writes",
        height=max(420, 26 * n_rows + 180), bargap=0.2, legend=dict(groupclick="toggleitem"),
    )


# --------------------------------------------------------------------------- export


def _use_system_chromium() -> None:
    """kaleido 1.x drives a Chrome; point it at the system Chromium when the user did not choose one."""
    if "BROWSER_PATH" not in os.environ and Path(_CHROMIUM).exists():
        os.environ["BROWSER_PATH"] = _CHROMIUM


def _export_size(fig: go.Figure, width: int | None, height: int | None) -> tuple[int, int]:
    return (width or fig.layout.width or 1100, height or fig.layout.height or 550)


def _image_bytes(fig: go.Figure, fmt: str, width: int | None, height: int | None, scale: float) -> bytes:
    _use_system_chromium()
    w, h = _export_size(fig, width, height)
    return fig.to_image(format=fmt, width=w, height=h, scale=scale)


def figure_to_png_bytes(fig: go.Figure, *, width: int | None = None, height: int | None = None,
                        scale: float = 2.0) -> bytes:
    """The figure as PNG bytes (for a download button). Raises NeuroglotError when no
    Chrome/Chromium is available to kaleido."""
    try:
        return _image_bytes(fig, "png", width, height, scale)
    except Exception as err:  # kaleido raises RuntimeError/ValueError/ChromeNotFoundError...
        raise NeuroglotError(
            f"PNG export failed ({type(err).__name__}: {_one_line(err)[:300]}). Kaleido needs Chrome or Chromium: "
            "install one (`plotly_get_chrome`, or your system's chromium package) and set BROWSER_PATH to its "
            "executable, or download the interactive HTML and use its camera button to save a PNG."
        ) from err


def save_figure(fig: go.Figure, path_without_suffix: str | os.PathLike, formats: Sequence[str] = ("html", "png"),
                *, width: int | None = None, height: int | None = None, scale: float = 2.0) -> list[Path]:
    """Write ``fig`` as ``<path>.html`` (self-contained, opens offline) and/or images
    (``png``, ``svg``, ``pdf``, ``jpeg``, ``webp``) next to it; returns the written paths.

    HTML is written first, so a failing image export (no Chrome/Chromium for kaleido)
    still leaves the HTML; the failure raises NeuroglotError saying so.
    """
    formats = [str(f).lower().lstrip(".") for f in formats]
    unknown = [f for f in formats if f != "html" and f not in _IMAGE_FORMATS]
    if not formats or unknown:
        raise InputError(
            f"Unknown figure format(s) {unknown or formats}; choose from html, {', '.join(_IMAGE_FORMATS)}."
        )
    # Append the suffix rather than Path.with_suffix: "beta_0.1" must not become "beta_0.html".
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "html" in formats:
        target = Path(f"{base}.html")
        fig.write_html(target, include_plotlyjs=True, full_html=True)
        written.append(target)
    for fmt in dict.fromkeys(f for f in formats if f != "html"):
        target = Path(f"{base}.{fmt}")
        try:
            data = _image_bytes(fig, fmt, width, height, scale)
        except Exception as err:
            kept = f"The HTML was written to {written[0]}." if written else "No file was written."
            raise NeuroglotError(
                f"{fmt.upper()} export of {base.name} failed ({type(err).__name__}: {_one_line(err)[:300]}). {kept} "
                "To get images, install Chrome or Chromium (`plotly_get_chrome`, or your system's chromium "
                "package) and set BROWSER_PATH to its executable; or open the HTML in a browser and use its "
                "camera button to save a PNG."
            ) from err
        target.write_bytes(data)
        written.append(target)
    return written
