"""Widgets more than one page uses: figure downloads, the neuron drill-down and the fact picker."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import pandas as pd
import streamlit as st

from analysis import figures
from analysis import neurons as nr
from app import forms
from app.state import kept, workbench


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


# ------------------------------------------------------------------------------------ the fact picker


def corpus_fact(rows: pd.DataFrame, corpus_name: str, languages: Sequence[str], key: str,
                name_corpus: bool = False) -> str | None:
    """A select box of the corpus facts present in every chosen language (shown by their subject and
    object in the first one); None when there is none."""
    from data.corpus import Corpus

    aligned = Corpus(rows, name=corpus_name).aligned(list(languages)).rows if languages else rows.iloc[:0]
    facts = list(pd.unique(aligned["fact_id"]))
    first = aligned[aligned["language"] == (languages[0] if languages else "en")]
    where = f" of {corpus_name}" if name_corpus else ""
    return kept(st.selectbox, f"Fact ({len(facts):,} in all chosen languages{where})", facts, key=key,
                default=facts[0] if facts else None, format_func=lambda f: forms.fact_label(first, f))


def typed_fact(prefix: str, languages: Sequence[str], paraphrases: bool, subjects: bool,
               answer_optional: bool) -> dict[str, forms.TypedFact]:
    """One column of boxes per language: the prompt (or prompts, one per line), the subject, the answer."""
    out = {}
    for col, lang in zip(st.columns(max(1, len(languages))), languages):
        subject, answer, prompts = forms.EXAMPLE_FACTS.get(lang, ("", "", [""]))
        if paraphrases:
            typed = forms.lines(kept(col.text_area, f"Prompts ({lang}), one per line", key=f"{prefix}-prompts-{lang}",
                                     default="\n".join(prompts), height=100))
        else:
            typed = [kept(col.text_input, f"Prompt ({lang})", key=f"{prefix}-prompt-{lang}", default=prompts[0])]
        subj = kept(col.text_input, f"Subject ({lang})", key=f"{prefix}-subject-{lang}", default=subject) \
            if subjects else ""
        label = f"Answer ({lang}, empty = the model's prediction)" if answer_optional else f"Answer ({lang})"
        out[lang] = forms.TypedFact(typed, subj, kept(col.text_input, label, key=f"{prefix}-answer-{lang}",
                                                      default=answer))
    return out


@contextmanager
def fact_form(prefix: str, rows: pd.DataFrame, corpus_name: str, sources: Mapping[str, str], *,
              preferred: Sequence[str] = ("en", "zh"), many: tuple[str, int] = ("Facts", 5),
              paraphrases: bool = False, subjects: bool = False, model_answer: bool = False) -> Iterator[forms.Choice]:
    """The Attribution and Causal-tracing pages' fact picker: the source and the languages (they redraw the
    page), then a form (``{prefix}-request``) with the fact: a corpus fact, a number of corpus facts, or a
    fact typed per language. The page adds its parameters and its submit button inside the ``with`` block.

    ``sources`` maps "one", "many" and "typed" to their labels, in the order shown; ``many`` is the label and
    default of the number of facts; ``paraphrases``: several prompts per language (one per line);
    ``subjects``: a subject box per language; ``model_answer``: the answer may be the model's own prediction.
    """
    labels = list(sources.values())
    label = kept(st.radio, "Facts", labels, key=f"{prefix}-source", default=labels[0], horizontal=True)
    source = next(k for k, v in sources.items() if v == label)
    all_languages = sorted(rows["language"].unique())
    languages = kept(st.multiselect, "Languages", all_languages, key=f"{prefix}-languages",
                     default=forms.default_languages(all_languages, preferred))
    choice = forms.Choice(source, list(languages))
    with st.form(f"{prefix}-request"):
        if source == "one":
            choice.fact_id = corpus_fact(rows, corpus_name, languages, key=f"{prefix}-fact")
        elif source == "many":
            choice.n_facts = int(kept(st.number_input, many[0], key=f"{prefix}-n-facts", default=many[1], min_value=1,
                                      max_value=500))
        else:
            choice.typed = typed_fact(prefix, languages, paraphrases, subjects, answer_optional=model_answer)
        if model_answer and source != "typed":
            choice.model_answer = kept(st.checkbox, "Trace the model's own prediction instead of the corpus answer",
                                       key=f"{prefix}-use-model{'' if source == 'one' else '-many'}", default=False)
        yield choice
