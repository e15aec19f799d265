"""Attribution: knowledge neurons by integrated gradients per language (papers/memla.md §4.1, Eq. 1-4)."""
from __future__ import annotations

import streamlit as st

from analysis import attribution as at
from analysis import fact_figures
from app import forms
from app.state import (corpus_rows, current_corpus_spec, current_model_spec, kept, last_request, run_or_read,
                       submit_request, user_errors, workbench)
from app.widgets import downloads, fact_form, neuron_drilldown

st.title("Attribution")
st.caption("Integrated gradients (Eq. 2) score every FFN neuron of every layer by how much it raises the "
           "probability of the answer at the prompt's last token, from a zero baseline. A prompt's knowledge "
           "neurons score ≥ t × its best neuron; a fact's are in ≥ p of its paraphrases; the language-"
           "independent ones are in every language (Eq. 3), the rest are language-specific (Eq. 4).")

SOURCES = {"one": "One fact from the corpus", "many": "Several facts from the corpus", "typed": "Type a fact"}


with user_errors():
    model_spec, corpus_spec = current_model_spec(), current_corpus_spec()
    corpus_name, rows = corpus_rows(corpus_spec)
    all_languages = sorted(rows["language"].unique())

    with fact_form("ig", rows, corpus_name, SOURCES, many=("Facts (taken round-robin over the relations)", 5),
                   paraphrases=True) as choice:
        c1, c2, c3 = st.columns(3)
        steps = kept(c1.number_input, "Steps m", key="ig-steps", default=at.AttributionParams.steps, min_value=1, max_value=200,
                     help="Integration steps (Riemann sum, α = k/m).")
        target_tokens = kept(c2.radio, "Answer probability", at.TARGET_TOKENS, key="ig-target", default=at.AttributionParams.target_tokens,
                             horizontal=True, help="first: the first answer token (Dai et al.); mean: all its tokens.")
        method = kept(c3.selectbox, "Quadrature", at.METHODS, key="ig-method", default=at.AttributionParams.method,
                      help="riemann_right is Dai et al.'s sum as written; gausslegendre is more accurate for the "
                           "same steps.")
        submitted = st.form_submit_button("Compute", type="primary")
    if submitted:
        languages = choice.languages
        if not languages:
            st.error("Choose at least one language.")
            st.stop()
        if choice.source == "typed":
            forms.check_typed_prompts(choice.typed, languages)
            prompts = forms.typed_prompt_table(choice.typed)
        else:
            from data import load_corpus

            corp = load_corpus(corpus_spec, languages=languages)
            prompts = at.fact_prompts(corp, languages, **({"fact_ids": [choice.fact_id] if choice.fact_id else []}
                                                          if choice.source == "one" else {"max_facts": choice.n_facts}))
        submit_request("ig_request", dict(prompts=prompts, steps=int(steps), method=method,
                                          target_tokens=target_tokens))

    request = last_request("ig_request", "Choose a fact and press **Compute**. One prompt takes a few seconds on a "
                           "laptop CPU with the embedded model (all layers, 20 steps); a request that ran before (in "
                           "any session) is read back at once.")
    # Not cached by Streamlit: the backend's run folder is the cache, found again by a rerun, a page switch or
    # another session.
    run, folder = run_or_read("ig_request", "run", "attribution", "Integrating gradients", lambda progress: (
        at.attribution_run(workbench(model_spec), request["prompts"], steps=request["steps"], method=request["method"],
                           target_tokens=request["target_tokens"], progress=progress)), again=submitted)
    st.caption(f"Attributed {run.summary()} · "
               f"{len(run.layers)} layers × {run.n_neurons:,} neurons · {run.meta.get('steps', request['steps'])} "
               f"steps · run folder `{folder}`")

    c1, c2 = st.columns(2)  # thresholds apply to the stored scores: moving them recomputes nothing
    threshold = kept(c1.slider, "t (per prompt)", key="ig-t", default=at.AttributionParams.threshold, min_value=0.05, max_value=1.0, step=0.05,
                     help="Knowledge neurons of a prompt: attribution ≥ t × the prompt's maximum (memla Eq. 3).")
    share = kept(c2.slider, "p (per fact)", key="ig-p", default=at.AttributionParams.share, min_value=0.1, max_value=1.0, step=0.1,
                 help="Knowledge neurons of a fact: in at least this share of its paraphrases.")
    counts = run.set_counts(threshold, share)
    per_layer = run.per_layer(threshold, share)
    shown_langs = run.languages
    st.markdown(run.neuron_summary(threshold, share, counts))
    low = run.prompts.groupby("language")["prob"].mean()
    st.caption("Mean answer probability: " + ", ".join(f"{k} {v:.3f}" for k, v in low.items()) +
               f" · {run.completeness_summary()}")

    tabs = st.tabs(["Knowledge neurons per layer", "Per fact", "Top neurons"], key="ig-tabs",
                   on_change="rerun")  # keyed: the open tab stays open when a row selection reruns the page
    with tabs[0]:
        fig = fact_figures.knowledge_neurons_by_layer(per_layer, shown_langs)
        st.plotly_chart(fig, width="stretch", key="kn-layer")
        downloads(fig, f"knowledge_neurons_t{threshold:g}_p{share:g}", per_layer.reset_index())
        fig = fact_figures.attribution_strength(run.mean_scores(), run.layers)
        st.plotly_chart(fig, width="stretch", key="kn-strength")
        downloads(fig, "attribution_strength")
    with tabs[1]:
        st.dataframe(counts, hide_index=True, width="stretch")
        st.download_button("CSV", counts.to_csv(index=False).encode(), "knowledge_neurons.csv", "text/csv",
                           on_click="ignore", icon=":material/download:", key="ig-per-fact-csv")
    with tabs[2]:
        fact = st.selectbox("Fact", run.fact_ids, format_func=lambda f: forms.fact_label(run.prompts, f),
                            key="ig-top-fact")
        top = run.top_neurons(fact, threshold, share, k=100)
        st.caption(f"{len(top):,} knowledge neurons of this fact (strongest first). Select a row to open the "
                   "neuron's drill-down (the atlas's view: the texts that excite it most, the tokens it promotes).")
        event = st.dataframe(top, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row",
                             key=f"ig-top-table-{fact}-{threshold:g}-{share:g}")  # a new table forgets old rows
        picked = [i for i in (event.selection.rows if event is not None else []) if i < len(top)]
        if picked:
            row = top.iloc[picked[0]]
            drill_langs = [lang for lang in shown_langs if lang in all_languages] or all_languages[:1]
            neuron_drilldown(model_spec, corpus_spec, drill_langs, int(row["layer"]), int(row["neuron"]),
                             key="ig-drill")
