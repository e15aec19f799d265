"""Neuron atlas: factual, language-agnostic and language-specific neurons per layer
(papers/lu-lafns.md §3.2, Figure 1), for any model and any set of languages."""
from __future__ import annotations

import numpy as np
import streamlit as st

from analysis import figures
from analysis import neurons as nr
from app.forms import default_languages
from app.state import (corpus_rows, current_corpus_spec, current_model_spec, kept, last_request, run_or_read,
                       submit_request, user_errors, workbench)
from app.widgets import downloads, neuron_drilldown
from data.relations import relation_label

st.title("Neuron atlas")
st.caption("Eq. 4 counts how often each FFN neuron fires (> 0) on each language's facts; Eq. 5 keeps a "
           "language's factual neurons (n / max > β); Eq. 6 intersects them into the language-agnostic "
           "factual neurons (LAFNs). Language-specific neurons are factual in one chosen language only.")

DEFAULT_BETA = 0.8
BETA_HELP = ("A neuron is factual in a language when its count / the layer's largest count > β (Eq. 5). "
             "The default 0.8 keeps the neurons that fire on nearly every fact, which shows the paper's picture "
             "(LAFN peaks in a few layers); at LU-LAFNs' editing threshold 0.1 most neurons of this small model "
             "fire often enough to count, so Figure 1 becomes a wall of bars.")


def count(model_spec: str, corpus_spec: str, request: tuple, progress):
    """Count one request (or read back its run folder): ``(counts, folder, reused)``. Not cached by Streamlit:
    the backend's run folder is the cache, found again by a rerun, a page switch or another session."""
    from data import load_corpus

    languages, relations, positions, text, max_facts = request
    corp = load_corpus(corpus_spec, languages=list(languages), relations=list(relations) or None,
                       max_facts=max_facts).aligned(list(languages))
    return nr.atlas_counts(workbench(model_spec), corp, list(languages), positions=positions, text=text,
                           progress=progress)


with user_errors():
    model_spec, corpus_spec = current_model_spec(), current_corpus_spec()
    _, rows = corpus_rows(corpus_spec)
    all_languages = sorted(rows["language"].unique())
    all_relations = sorted(rows["relation"].unique())

    with st.form("atlas-request"):
        c1, c2 = st.columns([2, 3])
        languages = kept(c1.multiselect, "Languages (at least two)", all_languages, key="atlas-languages",
                         default=default_languages(all_languages))
        relations = kept(c2.multiselect, "Relations (empty = all)", all_relations, key="atlas-relations", default=[],
                         format_func=relation_label)
        c3, c4, c5 = st.columns(3)
        positions = kept(c3.radio, "Tokens counted", nr.POSITIONS, key="atlas-positions", default=nr.CountParams.positions,
                         horizontal=True,
                         help="all: every token (the paper); subject: the subject's tokens; last: the last token.")
        text = kept(c4.radio, "Text", nr.TEXTS, key="atlas-text", default=nr.CountParams.text, horizontal=True,
                    help="statement: the full fact sentence (the paper); prompt: cut before the object.")
        max_facts = kept(c5.number_input, "Facts per relation", key="atlas-facts", default=10, min_value=1,
                         max_value=100_000, help="Facts sampled per relation (seed 0), aligned across the languages.")
        submitted = st.form_submit_button("Run", type="primary")
    if submitted:
        if len(languages) < 2:
            st.error("Choose at least two languages.", icon=":material/error:")
            st.stop()
        submit_request("atlas_request", (tuple(languages), tuple(relations), positions, text, int(max_facts)))

    request = last_request("atlas_request", "Choose languages and press **Run**. Counting 10 facts per relation "
                           "in two languages takes about a minute on a laptop CPU with the embedded model; a "
                           "request that ran before (in any session) is read back at once.")
    counts, folder = run_or_read("atlas_request", "counts", "counts", "Tracing neuron activations (texts)",
                                 lambda progress: count(model_spec, corpus_spec, request, progress), again=submitted)
    languages, relations, positions, text, max_facts = request
    st.caption(f"Counted {counts.summary()} · "
               f"{counts.n_layers} layers × {counts.n_neurons:,} neurons · {max_facts} facts per relation · "
               f"relations: {', '.join(relations) or 'all'} · run folder `{folder}`")

    beta = kept(st.slider, "β (Eq. 5 threshold)", key="atlas-beta", default=DEFAULT_BETA, min_value=0.0,
                max_value=1.0, step=0.05, help=BETA_HELP)
    table = nr.neuron_set_table(counts, beta)
    factual = nr.factual_neurons(counts, beta)
    wide = table.pivot(index="layer", columns="set", values="count")
    peak = wide[nr.LAFN].idxmax()
    st.markdown(f"**LAFNs at β = {beta:g}:** {int(wide[nr.LAFN].sum()):,} neurons in all; the most in layer "
                f"**{peak}** ({int(wide[nr.LAFN].max()):,} of {counts.n_neurons:,}).")

    tabs = st.tabs(["Neurons per layer", "Overlap", "β sweep", "LAPE", "Neuron drill-down"], key="atlas-tabs",
                   on_change="rerun")  # keyed: the open tab stays open when a row selection reruns the page
    with tabs[0]:
        fig = figures.neurons_per_layer(table, counts.n_neurons)
        st.plotly_chart(fig, width="stretch", key="per-layer")
        downloads(fig, f"neurons_per_layer_beta{beta:g}", table)
    with tabs[1]:
        layer_pick = st.selectbox("Layer", ["all layers"] + list(range(counts.n_layers)), key="atlas-overlap-layer")
        jac = nr.jaccard_overlap(factual, None if layer_pick == "all layers" else int(layer_pick))
        fig = figures.overlap_heatmap(jac)
        st.plotly_chart(fig, width="stretch", key="overlap")
        downloads(fig, "overlap", jac.reset_index(names="language"))
        by_layer = nr.overlap_by_layer(factual)
        fig = figures.overlap_by_layer(by_layer)
        st.plotly_chart(fig, width="stretch", key="overlap-layer")
        downloads(fig, "overlap_by_layer", by_layer)
    with tabs[2]:
        sweep = nr.beta_sweep(counts)
        fig = figures.beta_sweep(sweep, counts.n_neurons)
        st.plotly_chart(fig, width="stretch", key="sweep")
        downloads(fig, "beta_sweep", sweep)
    with tabs[3]:
        specific = nr.lape_specific_neurons(counts)
        fig = figures.lape_distribution(nr.lape(counts), np.logical_or.reduce(list(specific.values())))
        st.plotly_chart(fig, width="stretch", key="lape")
        st.caption("LAPE (Tang et al., 2024): entropy of a neuron's activation probabilities across the chosen "
                   "languages; low = language-specific. " +
                   " · ".join(f"{lang}: {int(m.sum()):,} LAPE-specific" for lang, m in specific.items()))
        downloads(fig, "lape")
    with tabs[4]:
        neuron_table = nr.neuron_list(counts, beta)
        c1, c2 = st.columns(2)
        set_pick = c1.selectbox("Neuron set", [nr.LAFN] + list(languages) + [f"specific:{l}" for l in languages],
                                key="atlas-set")
        layer_filter = c2.selectbox("Layer ", ["all"] + list(range(counts.n_layers)), index=1 + int(peak),
                                    key=f"atlas-layer-filter-{peak}")
        shown = neuron_table[neuron_table["set"] == set_pick]
        if layer_filter != "all":
            shown = shown[shown["layer"] == int(layer_filter)]
        count_cols = [f"n_{l}" for l in languages]
        shown = shown.assign(total=shown[count_cols].sum(axis=1)).sort_values("total", ascending=False).head(500)
        shown = shown.reset_index(drop=True)
        st.caption(f"{len(shown):,} neurons shown (most active first). Select a row to open its drill-down.")
        event = st.dataframe(shown, hide_index=True, width="stretch", on_select="rerun",
                             selection_mode="single-row", key=f"neuron-table-{set_pick}-{layer_filter}-{beta:g}")
        st.download_button("CSV of this set", shown.to_csv(index=False).encode(), f"{set_pick}.csv", "text/csv",
                           on_click="ignore", icon=":material/download:", key="atlas-set-csv")
        picked = [i for i in (event.selection.rows if event is not None else []) if i < len(shown)]
        if picked:
            row = shown.iloc[picked[0]]
            neuron_drilldown(model_spec, corpus_spec, languages, int(row["layer"]), int(row["neuron"]), text)
