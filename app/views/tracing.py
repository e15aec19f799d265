"""Causal tracing (ROME): which hidden states, MLPs and attention layers carry a fact, per language."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis import causal_trace as ct
from analysis import figures
from analysis import neurons as nr
from app.state import corpus_rows, current_corpus_spec, current_model_spec, user_errors, workbench
from app.widgets import downloads, neuron_drilldown

st.title("Causal tracing")
st.caption("The subject's token embeddings are corrupted with Gaussian noise (σ = 3 × the embeddings' standard "
           "deviation); then one state at a time is restored to its clean value. Colour = the probability of the "
           "answer with that state restored: the states that bring the answer back carry the fact (ROME). "
           "MLP and attention are restored over a window of layers.")

SOURCES = ("One fact from the corpus", "Type a fact", "Average over many facts")


@st.cache_data(show_spinner=False, max_entries=32)
def trace_one(model_spec: str, prompt: str, subject: str, answer: str | None, kinds: tuple[str, ...], samples: int,
              noise: float, window: int, seed: int, language: str, _progress=None) -> dict:
    result = ct.causal_trace(workbench(model_spec), prompt, subject, answer, kinds=kinds, samples=samples,
                             noise=noise, window=window, seed=seed, progress=_progress, language=language)
    return result.to_dict()


@st.cache_data(show_spinner=False, max_entries=8)
def trace_many(model_spec: str, corpus_spec: str, languages: tuple[str, ...], max_facts: int,
               kinds: tuple[str, ...], samples: int, noise: float, window: int, seed: int, answer: str,
               _progress=None) -> tuple[dict[str, list[dict]], list]:
    from data import load_corpus

    corp = load_corpus(corpus_spec, languages=list(languages))
    traces, _, _ = ct.trace_run(workbench(model_spec), corp, list(languages), max_facts=max_facts, kinds=kinds,
                                samples=samples, noise=noise, window=window, seed=seed, answer=answer,
                                progress=_progress)
    return {lang: [r.to_dict() for r in results] for lang, results in traces.items()}, list(traces.skipped)


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
        p = col.text_input(f"Prompt ({lang})", prompt, key=f"tr-prompt-{lang}")
        s = col.text_input(f"Subject ({lang})", subject, key=f"tr-subject-{lang}")
        a = col.text_input(f"Answer ({lang}, empty = the model's prediction)", answer, key=f"tr-answer-{lang}")
        out[lang] = (p, s, a)
    return out


def show_trace(lang: str, data: dict, model_spec: str, corpus_spec: str, all_languages: list[str]) -> None:
    result = ct.TraceResult.from_dict(data)
    prompt = result.meta.get("prompt", "")
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
                         key=f"tr-top-{lang}")
    picked = event.selection.rows if event is not None else []
    if picked:
        row = top.iloc[picked[0]]
        langs = [lang] if lang in all_languages else all_languages[:1]
        neuron_drilldown(model_spec, corpus_spec, langs, int(row["layer"]), int(row["neuron"]), key=f"tr-drill-{lang}")


with user_errors():
    model_spec, corpus_spec = current_model_spec(), current_corpus_spec()
    corpus_name, rows = corpus_rows(corpus_spec)
    all_languages = sorted(rows["language"].unique())

    source = st.radio("Facts", SOURCES, horizontal=True, key="tr-source")
    default_langs = [lang for lang in ("en", "zh", "de") if lang in all_languages] or all_languages[:2]
    languages = st.multiselect("Languages", all_languages, default=default_langs, key="tr-languages")
    with st.form("tr-request"):
        if source == SOURCES[0]:
            from data.corpus import Corpus

            aligned = Corpus(rows, name=corpus_name).aligned(languages).rows if languages else rows.iloc[:0]
            facts = list(pd.unique(aligned["fact_id"]))
            first_lang = aligned[aligned["language"] == (languages[0] if languages else "en")]

            def label(f: str) -> str:
                r = first_lang[first_lang["fact_id"] == f].iloc[0]
                return f"{f} · {r['subject']} → {r['object']}"

            fact = st.selectbox(f"Fact ({len(facts):,} in all chosen languages)", facts, format_func=label)
            use_model = st.checkbox("Trace the model's own prediction instead of the corpus answer")
        elif source == SOURCES[1]:
            typed = typed_fact(languages)
        else:
            n_facts = st.number_input("Facts per language", 1, 500, 10)
            use_model = st.checkbox("Trace the model's own prediction instead of the corpus answer")
        c1, c2, c3, c4 = st.columns(4)
        kinds = c1.multiselect("States", figures.TRACE_KINDS, default=list(figures.TRACE_KINDS))
        samples = c2.number_input("Noise samples", 1, 100, 10)
        noise = c3.number_input("Noise (× embedding std)", 0.0, 20.0, 3.0, 0.5)
        window = c4.number_input("Window (layers)", 1, 64, 10)
        seed = st.number_input("Seed", 0, 2**31 - 1, 0)
        submitted = st.form_submit_button("Trace", type="primary")
    if submitted:
        if not languages or not kinds:
            st.error("Choose at least one language and one kind of state.")
            st.stop()
        params = (tuple(kinds), int(samples), float(noise), int(window), int(seed))
        if source == SOURCES[2]:
            st.session_state["tr_request"] = ("many", tuple(languages), int(n_facts),
                                              "model" if use_model else "object", params)
        else:
            facts_by_lang = (ct.fact_prompt(rows, fact, languages) if source == SOURCES[0] else typed)
            if source == SOURCES[0] and use_model:
                facts_by_lang = {k: (p, s, "") for k, (p, s, o) in facts_by_lang.items()}
            st.session_state["tr_request"] = ("one", facts_by_lang, params)

    request = st.session_state.get("tr_request")
    if request is None:
        st.info("Choose a fact and press **Trace**. One prompt in three kinds takes seconds to a minute on a "
                "laptop CPU with the embedded model; results are cached.")
        st.stop()

    if request[0] == "one":
        _, facts_by_lang, (kinds, samples, noise, window, seed) = request
        if not facts_by_lang:
            st.error("Nothing to trace.")
            st.stop()
        tabs = st.tabs(list(facts_by_lang))
        for tab, (lang, (prompt, subject, answer)) in zip(tabs, facts_by_lang.items()):
            with tab, user_errors():
                bar = st.progress(0.0, text=f"tracing {lang}...")

                def progress(frac: float, message: str, bar=bar) -> None:
                    bar.progress(min(max(frac, 0.0), 1.0), text=message[:120])

                data = trace_one(model_spec, prompt, subject, answer or None, kinds, samples, noise, window, seed,
                                 lang, _progress=progress)
                bar.empty()
                show_trace(lang, data, model_spec, corpus_spec, all_languages)
    else:
        _, langs, n_facts, answer, (kinds, samples, noise, window, seed) = request
        with st.status(f"Tracing {n_facts} facts in {', '.join(langs)}...", expanded=False) as status:
            bar = st.progress(0.0)

            def progress(frac: float, message: str) -> None:
                bar.progress(min(max(frac, 0.0), 1.0), text=message[:120])

            traced, skipped = trace_many(model_spec, corpus_spec, langs, n_facts, kinds, samples, noise, window,
                                         seed, answer, _progress=progress)
            status.update(label="Traced " + ", ".join(f"{lang}: {len(v)} facts" for lang, v in traced.items()),
                          state="complete")
        results = {lang: [ct.TraceResult.from_dict(d) for d in v] for lang, v in traced.items() if v}
        if skipped:
            st.caption(f"{len(skipped)} fact(s) skipped (no prompt containing the subject).")
        effects = {lang: {k: ct.average_effects(rs, k) for k in kinds} for lang, rs in results.items()}
        fig = figures.average_effect_heatmaps(effects)
        st.plotly_chart(fig, width="stretch", key="aie")
        table = pd.concat([frame.reset_index(names="token").assign(language=lang, kind=k)
                           for lang, per in effects.items() for k, frame in per.items()], ignore_index=True)
        downloads(fig, "average_effects", table)
