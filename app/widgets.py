"""Widgets more than one page uses: figure downloads and the neuron drill-down."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import figures
from analysis import neurons as nr
from app.state import workbench


def downloads(fig, stem: str, table: pd.DataFrame | None = None, key: str | None = None) -> None:
    """One row of downloads: the figure's data as CSV, the figure as HTML, and as PNG in one click.

    The PNG is rendered (kaleido) only when its button is clicked, on Streamlit's download thread, so
    drawing the page costs nothing and the click starts the download itself. ``key`` (default: the
    file stem) tells apart two rows of the same file on one page."""
    key = key or stem
    cols = st.columns([1, 1, 1, 5])
    if table is not None:
        cols[0].download_button("CSV", table.to_csv(index=False).encode(), f"{stem}.csv", "text/csv",
                                key=f"csv-{key}", on_click="ignore", icon=":material/download:")
    cols[1].download_button("HTML", fig.to_html(include_plotlyjs=True).encode(), f"{stem}.html", "text/html",
                            key=f"html-{key}", on_click="ignore", icon=":material/download:")
    cols[2].download_button("PNG", lambda: figures.figure_to_png_bytes(fig), f"{stem}.png", "image/png",
                            key=f"png-{key}", on_click="ignore", icon=":material/download:",
                            help="Rendered when you click (a few seconds).")


@st.cache_data(show_spinner=False, max_entries=64)
def drilldown(model_spec: str, corpus_spec: str, languages: tuple[str, ...], text: str, layer: int,
              neuron: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The atlas drill-down's data: the corpus texts that excite the neuron most, and its value vector's tokens.
    Pure (no ``st.*`` call), so a cache hit replays nothing."""
    from data import load_corpus

    wb = workbench(model_spec)
    corp = load_corpus(corpus_spec, languages=list(languages))
    return (nr.top_activating_texts(wb, corp, layer, neuron, languages, k=5, text=text, max_texts=200),
            nr.neuron_top_tokens(wb, layer, neuron, k=12))


def neuron_drilldown(model_spec: str, corpus_spec: str, languages, layer: int, neuron: int,
                     text: str = "statement", key: str = "drill") -> None:
    """The atlas's drill-down of neuron ``layer``.``neuron``: figure and downloads."""
    with st.spinner(f"Reading neuron L{layer}.{neuron}..."):
        top_prompts, top_tokens = drilldown(model_spec, corpus_spec, tuple(languages), text, int(layer), int(neuron))
    fig = figures.neuron_drilldown(top_prompts, top_tokens, int(layer), int(neuron))
    st.plotly_chart(fig, width="stretch", key=key)
    downloads(fig, f"neuron_L{layer}_{neuron}", top_prompts, key=f"{key}-L{layer}-{neuron}")
