"""Attribution: knowledge neurons by integrated gradients per language (papers/memla.md §4.1, Eq. 1-4)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import attribution as at
from analysis import figures
from app.state import (corpus_rows, current_corpus_spec, current_model_spec, folder_stamp, kept, progress_bar,
                       user_errors, workbench)
from app.widgets import downloads, neuron_drilldown

st.title("Attribution")
st.caption("Integrated gradients (Eq. 2) score every FFN neuron of every layer by how much it raises the "
           "probability of the answer at the prompt's last token, from a zero baseline. A prompt's knowledge "
           "neurons score ≥ t × its best neuron; a fact's are in ≥ p of its paraphrases; the language-"
           "independent ones are in every language (Eq. 3), the rest are language-specific (Eq. 4).")

SOURCES = ("One fact from the corpus", "Several facts from the corpus", "Type a fact")


def attribute(request: dict) -> str:
    """Run (or read back) one request's integrated gradients; returns its run folder. Not cached by Streamlit:
    the backend's run folder is the cache, found again by a rerun, a page switch or another session."""
    with progress_bar("Integrating gradients") as progress:
        _, folder, _ = at.attribution_run(workbench(request["model"]), request["prompts"], steps=request["steps"],
                                          method=request["method"], target_tokens=request["target_tokens"],
                                          progress=progress)
    return str(folder)


@st.cache_data(show_spinner=False, max_entries=16)
def run_in(folder: str, stamp: float) -> at.AttributionRun:
    """A run folder's attributions (``stamp``: the manifest's modification time)."""
    return at.AttributionRun.load(folder)


def fact_label(rows: pd.DataFrame, fact_id: str) -> str:
    first = rows[rows["fact_id"] == fact_id].iloc[0]
    return f"{fact_id} · {first['subject']} → {first['object']}"


def typed_fact(languages: list[str]) -> pd.DataFrame:
    """Per language: paraphrases (one per line) and the answer."""
    examples = {"en": ("The Eiffel Tower is located in the city of\nThe Eiffel Tower is in", "Paris"),
                "zh": ("埃菲尔铁塔位于\n埃菲尔铁塔所在的城市是", "巴黎"),
                "de": ("Der Eiffelturm ist ein Wahrzeichen von\nDer Eiffelturm befindet sich in", "Paris")}
    rows = []
    cols = st.columns(max(1, len(languages)))
    for col, lang in zip(cols, languages):
        prompts, answer = examples.get(lang, ("", ""))
        text = kept(col.text_area, f"Prompts ({lang}), one per line", key=f"typed-prompts-{lang}", default=prompts,
                    height=100)
        ans = kept(col.text_input, f"Answer ({lang})", key=f"typed-answer-{lang}", default=answer)
        for j, line in enumerate(p for p in text.splitlines() if p.strip()):
            rows.append(dict(fact_id="typed", relation="typed", language=lang, subject="", object=ans.strip(),
                             prompt=line.strip(), template_id=f"typed.{lang}.{j}"))
    return pd.DataFrame(rows, columns=list(at.PROMPT_COLUMNS))


with user_errors():
    model_spec, corpus_spec = current_model_spec(), current_corpus_spec()
    corpus_name, rows = corpus_rows(corpus_spec)
    all_languages = sorted(rows["language"].unique())

    source = kept(st.radio, "Facts", SOURCES, key="ig-source", default=SOURCES[0], horizontal=True)
    default_langs = [lang for lang in ("en", "zh") if lang in all_languages] or all_languages[:2]
    languages = kept(st.multiselect, "Languages", all_languages, key="ig-languages", default=default_langs)
    with st.form("ig-request"):
        if source == SOURCES[0]:
            from data.corpus import Corpus

            aligned = Corpus(rows, name=corpus_name).aligned(languages).rows if languages else rows.iloc[:0]
            facts = list(pd.unique(aligned["fact_id"]))
            en_rows = aligned[aligned["language"] == (languages[0] if languages else "en")]
            fact = kept(st.selectbox, f"Fact ({len(facts):,} in all chosen languages)", facts, key="ig-fact",
                        default=facts[0] if facts else None, format_func=lambda f: fact_label(en_rows, f))
            request_facts = {"fact_ids": [fact] if fact else []}
        elif source == SOURCES[1]:
            n_facts = kept(st.number_input, "Facts (taken round-robin over the relations)", key="ig-n-facts", default=5,
                           min_value=1, max_value=500)
            request_facts = {"max_facts": int(n_facts)}
        else:
            typed = typed_fact(languages)
        c1, c2, c3 = st.columns(3)
        steps = kept(c1.number_input, "Steps m", key="ig-steps", default=20, min_value=1, max_value=200,
                     help="Integration steps (Riemann sum, α = k/m).")
        target_tokens = kept(c2.radio, "Answer probability", at.TARGET_TOKENS, key="ig-target", default=at.TARGET_TOKENS[0],
                             horizontal=True, help="first: the first answer token (Dai et al.); mean: all its tokens.")
        method = kept(c3.selectbox, "Quadrature", at.METHODS, key="ig-method", default=at.METHODS[0],
                      help="riemann_right is Dai et al.'s sum as written; gausslegendre is more accurate for the "
                           "same steps.")
        submitted = st.form_submit_button("Compute", type="primary")
    if submitted:
        if not languages:
            st.error("Choose at least one language.")
            st.stop()
        if source == SOURCES[2]:
            prompts = typed
            if prompts.empty:
                st.error("Type at least one prompt.")
                st.stop()
            missing = sorted(set(languages) - set(prompts["language"]))
            if missing:
                st.error(f"Type a prompt for {', '.join(missing)} too, or drop the language.")
                st.stop()
        else:
            from data import load_corpus

            corp = load_corpus(corpus_spec, languages=languages)
            prompts = at.fact_prompts(corp, languages, **request_facts)
        st.session_state["ig_request"] = dict(model=model_spec, corpus=corpus_spec, prompts=prompts, steps=int(steps),
                                              method=method, target_tokens=target_tokens)
        st.session_state.pop("ig_folder", None)

    request = st.session_state.get("ig_request")
    if request is not None and (request["model"], request["corpus"]) != (model_spec, corpus_spec):
        request = None  # the model or corpus changed on Home since: the old result no longer applies
    if request is None:
        st.info("Choose a fact and press **Compute**. One prompt takes a few seconds on a laptop CPU with the "
                "embedded model (all layers, 20 steps); a request that ran before (in any session) is read back "
                "at once.")
        st.stop()
    folder = st.session_state.get("ig_folder")
    if submitted or folder_stamp(folder) == 0.0:
        # A new request, the same one again (read back from its run folder), or one cut short by leaving the page.
        folder = st.session_state["ig_folder"] = attribute(request)
    run = run_in(folder, folder_stamp(folder))
    st.caption(f"Attributed {len(run.prompts)} prompts of {len(run.fact_ids)} fact(s) in {', '.join(run.languages)} · "
               f"{len(run.layers)} layers × {run.n_neurons:,} neurons · {run.meta.get('steps', request['steps'])} "
               f"steps · run folder `{folder}`")

    c1, c2 = st.columns(2)  # thresholds apply to the stored scores: moving them recomputes nothing
    threshold = kept(c1.slider, "t (per prompt)", key="ig-t", default=0.2, min_value=0.05, max_value=1.0, step=0.05,
                     help="Knowledge neurons of a prompt: attribution ≥ t × the prompt's maximum (memla Eq. 3).")
    share = kept(c2.slider, "p (per fact)", key="ig-p", default=0.5, min_value=0.1, max_value=1.0, step=0.1,
                 help="Knowledge neurons of a fact: in at least this share of its paraphrases.")
    counts = run.set_counts(threshold, share)
    per_layer = run.per_layer(threshold, share)
    shown_langs = run.languages
    total = {c: int(counts[c].sum()) for c in counts.columns if c.startswith(("N_", "S_")) or c == at.INDEPENDENT}
    st.markdown(f"**{total.get(at.INDEPENDENT, 0):,} language-independent** knowledge neurons · " + " · ".join(
        f"{lang}: {total.get(f'N_{lang}', 0):,} in all, {total.get(f'S_{lang}', 0):,} specific" for lang in shown_langs)
        + f" (t = {threshold:g}, p = {share:g}, over {len(counts)} fact(s))")
    gap = float(run.prompts["completeness_gap"].max())
    low = run.prompts.groupby("language")["prob"].mean()
    st.caption("Mean answer probability: " + ", ".join(f"{k} {v:.3f}" for k, v in low.items()) +
               f" · largest completeness gap |Σ attributions − (P(w̄) − P(0))| = {gap:.3g}")

    tabs = st.tabs(["Knowledge neurons per layer", "Per fact", "Top neurons"], key="ig-tabs",
                   on_change="rerun")  # keyed: the open tab stays open when a row selection reruns the page
    with tabs[0]:
        fig = figures.knowledge_neurons_by_layer(per_layer, shown_langs)
        st.plotly_chart(fig, width="stretch", key="kn-layer")
        downloads(fig, f"knowledge_neurons_t{threshold:g}_p{share:g}", per_layer.reset_index())
        fig = figures.attribution_strength(run.mean_scores(), run.layers)
        st.plotly_chart(fig, width="stretch", key="kn-strength")
        downloads(fig, "attribution_strength")
    with tabs[1]:
        st.dataframe(counts, hide_index=True, width="stretch")
        st.download_button("CSV", counts.to_csv(index=False).encode(), "knowledge_neurons.csv", "text/csv",
                           on_click="ignore", icon=":material/download:", key="ig-per-fact-csv")
    with tabs[2]:
        fact = st.selectbox("Fact", run.fact_ids, format_func=lambda f: fact_label(run.prompts, f),
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
