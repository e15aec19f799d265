"""Causal tracing (ROME): which hidden states, MLPs and attention layers carry a fact, per language."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis import causal_trace as ct
from analysis import figures
from analysis import neurons as nr
from analysis.errors import NeuroglotError
from app.state import (corpus_rows, current_corpus_spec, current_model_spec, folder_stamp, kept, progress_bar,
                       user_errors, workbench)
from app.widgets import downloads, neuron_drilldown

st.title("Causal tracing")
st.caption("The subject's token embeddings are corrupted with Gaussian noise (σ = 3 × the embeddings' standard "
           "deviation); then one state at a time is restored to its clean value. Colour = the probability of the "
           "answer with that state restored: the states that bring the answer back carry the fact (ROME). "
           "MLP and attention are restored over a window of layers.")

SOURCES = ("One fact from the corpus", "Type a fact", "Average over many facts")


def trace_one(model_spec: str, lang: str, prompt: str, subject: str, answer: str | None, params: tuple) -> str:
    """Trace (or read back) one language's prompt; returns its run folder. Not cached by Streamlit: the
    backend's run folder is the cache, found again by a rerun, a page switch or another session."""
    kinds, samples, noise, window, seed = params
    with progress_bar(f"Tracing {lang}") as progress:
        _, folder, _ = ct.prompt_trace_run(workbench(model_spec), prompt, subject, answer, kinds=kinds, samples=samples,
                                           noise=noise, window=window, seed=seed, language=lang, progress=progress)
    return str(folder)


def trace_many(model_spec: str, corpus_spec: str, languages: tuple[str, ...], max_facts: int, answer: str,
               params: tuple) -> str:
    """Trace (or read back) many corpus facts per language for the average effects; returns the run folder."""
    from data import load_corpus

    kinds, samples, noise, window, seed = params
    corp = load_corpus(corpus_spec, languages=list(languages))
    with progress_bar(f"Tracing {max_facts} facts in {', '.join(languages)}") as progress:
        _, folder, _ = ct.trace_run(workbench(model_spec), corp, list(languages), max_facts=max_facts, kinds=kinds,
                                    samples=samples, noise=noise, window=window, seed=seed, answer=answer,
                                    progress=progress)
    return str(folder)


@st.cache_data(show_spinner=False, max_entries=64)
def traces_in(folder: str, stamp: float) -> ct.FactTraces:
    """A run folder's traces (``stamp``: the manifest's modification time)."""
    return ct.load_traces(folder)


@st.cache_data(show_spinner=False, max_entries=64)
def contributions(model_spec: str, prompt: str, layer: int, position: int) -> pd.DataFrame:
    return nr.neuron_contributions(workbench(model_spec), prompt, layer, position, k=25)


def typed_fact(languages: list[str]) -> dict[str, tuple[str, str, str]]:
    examples = {"en": ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Paris"),
                "zh": ("埃菲尔铁塔位于", "埃菲尔铁塔", "巴黎"),
                "de": ("Der Eiffelturm ist ein Wahrzeichen von", "Eiffelturm", "Paris")}
    out = {}
    cols = st.columns(max(1, len(languages)))
    for col, lang in zip(cols, languages):
        prompt, subject, answer = examples.get(lang, ("", "", ""))
        p = kept(col.text_input, f"Prompt ({lang})", key=f"tr-prompt-{lang}", default=prompt)
        s = kept(col.text_input, f"Subject ({lang})", key=f"tr-subject-{lang}", default=subject)
        a = kept(col.text_input, f"Answer ({lang}, empty = the model's prediction)", key=f"tr-answer-{lang}",
                 default=answer)
        out[lang] = (p, s, a)
    return out


def show_trace(lang: str, result: ct.TraceResult, model_spec: str, corpus_spec: str, all_languages: list[str]) -> None:
    prompt = result.meta.get("prompt", "")
    c1, c2, c3 = st.columns(3)
    c1.metric("p(answer), clean run", f"{result.p_clean:.4f}", help="The answer's probability on the prompt as is.")
    c2.metric("p(answer), subject corrupted", f"{result.p_corrupted:.4f}",
              help="The same with noise on the subject's token embeddings (averaged over the noise samples): "
                   "the floor every restored state starts from.")
    c3.metric("Answer traced", repr(result.answer.strip()), help="Its first token is the one whose probability "
              "is shown (the model's own prediction when no answer was given).")
    st.caption("Tokens marked **\\*** are the subject's: the tokens whose embeddings are corrupted. A bright cell is a "
               "state (token × layer) that, restored to its clean value, brings the answer's probability back.")
    fig = figures.causal_trace_heatmaps(result.tokens, result.subject_range, result.scores, result.p_clean,
                                        result.p_corrupted, result.answer,
                                        title=f"[{lang}] {prompt} → {result.answer.strip()}")
    st.plotly_chart(fig, width="stretch", key=f"trace-{lang}")
    table = pd.concat([pd.DataFrame(v, index=result.tokens).reset_index(names="token").assign(kind=k)
                       for k, v in result.scores.items()], ignore_index=True)
    downloads(fig, f"trace_{lang}", table)
    if "mlp" not in result.scores:
        return
    effect = result.indirect_effect("mlp")
    t, layer = np.unravel_index(np.argmax(effect), effect.shape)
    st.markdown(f"Strongest MLP effect: token **{result.tokens[t]!r}**, layer **{layer}** "
                f"(indirect effect {effect[t, layer]:+.4f}). The neurons that write most into that MLP output "
                "(|key| × ‖value vector‖) — select a row for the atlas drill-down:")
    top = contributions(model_spec, prompt, int(layer), int(t))
    event = st.dataframe(top, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row",
                         key=f"tr-top-{lang}-{layer}-{t}")
    picked = [i for i in (event.selection.rows if event is not None else []) if i < len(top)]
    if picked:
        row = top.iloc[picked[0]]
        langs = [lang] if lang in all_languages else all_languages[:1]
        neuron_drilldown(model_spec, corpus_spec, langs, int(row["layer"]), int(row["neuron"]), key=f"tr-drill-{lang}")


with user_errors():
    model_spec, corpus_spec = current_model_spec(), current_corpus_spec()
    corpus_name, rows = corpus_rows(corpus_spec)
    all_languages = sorted(rows["language"].unique())

    source = kept(st.radio, "Facts", SOURCES, key="tr-source", default=SOURCES[0], horizontal=True)
    default_langs = [lang for lang in ("en", "zh", "de") if lang in all_languages] or all_languages[:2]
    languages = kept(st.multiselect, "Languages", all_languages, key="tr-languages", default=default_langs)
    with st.form("tr-request"):
        if source == SOURCES[0]:
            from data.corpus import Corpus

            aligned = Corpus(rows, name=corpus_name).aligned(languages).rows if languages else rows.iloc[:0]
            facts = list(pd.unique(aligned["fact_id"]))
            first_lang = aligned[aligned["language"] == (languages[0] if languages else "en")]

            def label(f: str) -> str:
                r = first_lang[first_lang["fact_id"] == f].iloc[0]
                return f"{f} · {r['subject']} → {r['object']}"

            fact = kept(st.selectbox, f"Fact ({len(facts):,} in all chosen languages)", facts, key="tr-fact",
                        default=facts[0] if facts else None, format_func=label)
            use_model = kept(st.checkbox, "Trace the model's own prediction instead of the corpus answer",
                             key="tr-use-model", default=False)
        elif source == SOURCES[1]:
            typed = typed_fact(languages)
        else:
            n_facts = kept(st.number_input, "Facts per language", key="tr-n-facts", default=10, min_value=1,
                           max_value=500)
            use_model = kept(st.checkbox, "Trace the model's own prediction instead of the corpus answer",
                             key="tr-use-model-many", default=False)
        c1, c2 = st.columns([3, 2])  # the states selector gets room for all three names
        kinds = kept(c1.multiselect, "States", figures.TRACE_KINDS, key="tr-kinds", default=list(figures.TRACE_KINDS),
                     help="hidden: the residual stream after a layer; mlp / attn: the MLP or attention output "
                          "over a window of layers.")
        seed = kept(c2.number_input, "Seed", key="tr-seed", default=0, min_value=0, max_value=2**31 - 1)
        c3, c4, c5 = st.columns(3)
        samples = kept(c3.number_input, "Noise samples", key="tr-samples", default=10, min_value=1, max_value=100)
        noise = kept(c4.number_input, "Noise (× embedding std)", key="tr-noise", default=3.0, min_value=0.0,
                     max_value=20.0, step=0.5)
        window = kept(c5.number_input, "Window (layers)", key="tr-window", default=10, min_value=1, max_value=64)
        submitted = st.form_submit_button("Trace", type="primary")
    if submitted:
        if not languages or not kinds:
            st.error("Choose at least one language and one kind of state.", icon=":material/error:")
            st.stop()
        params = (tuple(kinds), int(samples), float(noise), int(window), int(seed))
        if source == SOURCES[2]:
            st.session_state["tr_request"] = ("many", model_spec, corpus_spec, tuple(languages), int(n_facts),
                                              "model" if use_model else "object", params)
        else:
            facts_by_lang = (ct.fact_prompt(rows, fact, languages) if source == SOURCES[0] else typed)
            if source == SOURCES[0] and use_model:
                facts_by_lang = {k: (p, s, "") for k, (p, s, o) in facts_by_lang.items()}
            st.session_state["tr_request"] = ("one", model_spec, corpus_spec, facts_by_lang, params)
        st.session_state["tr_done"] = {}

    request = st.session_state.get("tr_request")
    if request is not None and request[1:3] != (model_spec, corpus_spec):
        request = None  # the model or corpus changed on Home since: the old result no longer applies
    if request is None:
        st.info("Choose a fact and press **Trace**. One prompt in three kinds takes seconds to a minute on a "
                "laptop CPU with the embedded model; a request that ran before (in any session) is read back "
                "at once.")
        st.stop()
    done = st.session_state.setdefault("tr_done", {})

    if request[0] == "one":
        _, _, _, facts_by_lang, params = request
        if not facts_by_lang:
            st.error("Nothing to trace.", icon=":material/error:")
            st.stop()
        failed: dict[str, str] = {}
        for lang, (prompt, subject, answer) in facts_by_lang.items():
            # Traced above the tabs, so the progress bar is in sight whichever tab is open; a language that
            # fails keeps its message for its tab and the other languages are still traced.
            if submitted or folder_stamp(done.get(lang)) == 0.0:
                try:
                    done[lang] = trace_one(model_spec, lang, prompt, subject, answer or None, params)
                except NeuroglotError as exc:
                    done.pop(lang, None)
                    failed[lang] = str(exc)
        tabs = st.tabs(list(facts_by_lang), key=f"tr-tabs-{'-'.join(facts_by_lang)}", on_change="rerun")  # stays open
        for tab, lang in zip(tabs, facts_by_lang):
            with tab, user_errors():
                if lang in failed:
                    st.error(failed[lang], icon=":material/error:")
                    continue
                result = traces_in(done[lang], folder_stamp(done[lang]))[lang][0]
                show_trace(lang, result, model_spec, corpus_spec, all_languages)
    else:
        _, _, _, langs, n_facts, answer, params = request
        if submitted or folder_stamp(done.get("many")) == 0.0:
            done["many"] = trace_many(model_spec, corpus_spec, langs, n_facts, answer, params)
        traced = traces_in(done["many"], folder_stamp(done["many"]))
        st.caption("Traced " + ", ".join(f"{lang}: {len(v)} facts" for lang, v in traced.items()) +
                   f" · run folder `{done['many']}`")
        results = {lang: rs for lang, rs in traced.items() if rs}
        if traced.skipped:
            st.caption(f"{len(traced.skipped)} fact(s) skipped (no prompt containing the subject).")
        kinds = params[0]
        effects = {lang: {k: ct.average_effects(rs, k) for k in kinds} for lang, rs in results.items()}
        fig = figures.average_effect_heatmaps(effects)
        st.plotly_chart(fig, width="stretch", key="aie")
        table = pd.concat([frame.reset_index(names="token").assign(language=lang, kind=k)
                           for lang, per in effects.items() for k, frame in per.items()], ignore_index=True)
        downloads(fig, "average_effects", table)
