"""Causal tracing (ROME): which hidden states, MLPs and attention layers carry a fact, per language."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import causal_trace as ct
from analysis import fact_figures
from analysis import neurons as nr
from analysis.errors import NeuroglotError
from app import forms
from app.state import (corpus_rows, current_corpus_spec, current_model_spec, kept, last_request, run_or_read,
                       submit_request, user_errors, workbench)
from app.widgets import downloads, fact_form, neuron_drilldown

st.title("Causal tracing")
st.caption("The subject's token embeddings are corrupted with Gaussian noise (σ = 3 × the embeddings' standard "
           "deviation); then one state at a time is restored to its clean value. Colour = the probability of the "
           "answer with that state restored: the states that bring the answer back carry the fact (ROME). "
           "MLP and attention are restored over a window of layers.")

SOURCES = {"one": "One fact from the corpus", "typed": "Type a fact", "many": "Average over many facts"}


def trace_params(params: tuple) -> dict:
    """The page's (kinds, samples, noise, window, seed) as the backend's keyword arguments."""
    return dict(zip(("kinds", "samples", "noise", "window", "seed"), params))


def trace_many(model_spec: str, corpus_spec: str, languages: tuple[str, ...], max_facts: int, answer: str,
               params: tuple, progress):
    """Trace many corpus facts per language for the average effects, or read back their run folder. Not cached
    by Streamlit: the backend's run folder is the cache, found again by a rerun, a page switch or another
    session."""
    from data import load_corpus

    corp = load_corpus(corpus_spec, languages=list(languages))
    return ct.trace_run(workbench(model_spec), corp, list(languages), max_facts=max_facts, answer=answer,
                        progress=progress, **trace_params(params))


@st.cache_data(show_spinner=False, max_entries=64)
def contributions(model_spec: str, prompt: str, layer: int, position: int) -> pd.DataFrame:
    return nr.neuron_contributions(workbench(model_spec), prompt, layer, position, k=25)


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
               "state (token × layer) that, restored to its clean value, brings the answer's probability back. In "
               f"short: {result.summary()}.")
    fig = fact_figures.causal_trace_heatmaps(result.tokens, result.subject_range, result.scores, result.p_clean,
                                        result.p_corrupted, result.answer,
                                        title=f"[{lang}] {prompt} → {result.answer.strip()}")
    st.plotly_chart(fig, width="stretch", key=f"trace-{lang}")
    table = pd.concat([pd.DataFrame(v, index=result.tokens).reset_index(names="token").assign(kind=k)
                       for k, v in result.scores.items()], ignore_index=True)
    downloads(fig, f"trace_{lang}", table)
    if "mlp" not in result.scores:
        return
    effect = result.indirect_effect("mlp")
    t, layer = result.strongest("mlp")
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

    with fact_form("tr", rows, corpus_name, SOURCES, preferred=("en", "zh", "de"), many=("Facts per language", 10),
                   subjects=True, model_answer=True) as choice:
        c1, c2 = st.columns([3, 2])  # the states selector gets room for all three names
        kinds = kept(c1.multiselect, "States", fact_figures.TRACE_KINDS, key="tr-kinds", default=list(ct.TraceParams.kinds),
                     help="hidden: the residual stream after a layer; mlp / attn: the MLP or attention output "
                          "over a window of layers.")
        seed = kept(c2.number_input, "Seed", key="tr-seed", default=ct.TraceParams.seed, min_value=0, max_value=2**31 - 1)
        c3, c4, c5 = st.columns(3)
        samples = kept(c3.number_input, "Noise samples", key="tr-samples", default=ct.TraceParams.samples, min_value=1, max_value=100)
        noise = kept(c4.number_input, "Noise (× embedding std)", key="tr-noise", default=ct.TraceParams.noise, min_value=0.0,
                     max_value=20.0, step=0.5)
        window = kept(c5.number_input, "Window (layers)", key="tr-window", default=ct.TraceParams.window, min_value=1, max_value=64)
        submitted = st.form_submit_button("Trace", type="primary")
    if submitted:
        languages = choice.languages
        if not languages or not kinds:
            st.error("Choose at least one language and one kind of state.", icon=":material/error:")
            st.stop()
        params = (tuple(kinds), int(samples), float(noise), int(window), int(seed))
        if choice.source == "many":
            submit_request("tr_request", ("many", tuple(languages), choice.n_facts,
                                          "model" if choice.model_answer else "object", params))
        else:
            facts_by_lang = (ct.fact_prompt(rows, choice.fact_id, languages) if choice.source == "one"
                             else forms.trace_facts(choice.typed))
            if choice.source == "one" and choice.model_answer:
                facts_by_lang = {k: (p, s, "") for k, (p, s, o) in facts_by_lang.items()}
            submit_request("tr_request", ("one", facts_by_lang, params))

    request = last_request("tr_request", "Choose a fact and press **Trace**. One prompt in three kinds takes seconds "
                           "to a minute on a laptop CPU with the embedded model; a request that ran before (in any "
                           "session) is read back at once.")
    if request[0] == "one":
        _, facts_by_lang, params = request
        if not facts_by_lang:
            st.error("Nothing to trace.", icon=":material/error:")
            st.stop()
        failed: dict[str, str] = {}
        traced: dict[str, ct.FactTraces] = {}
        for lang, (prompt, subject, answer) in facts_by_lang.items():
            # Traced above the tabs, so the progress bar is in sight whichever tab is open; a language that
            # fails keeps its message for its tab and the other languages are still traced.
            try:
                traced[lang], _ = run_or_read("tr_request", lang, "traces", f"Tracing {lang}", lambda progress: (
                    ct.prompt_trace_run(workbench(model_spec), prompt, subject, answer or None, language=lang,
                                        progress=progress, **trace_params(params))), again=submitted)
            except NeuroglotError as exc:
                failed[lang] = str(exc)
        tabs = st.tabs(list(facts_by_lang), key=f"tr-tabs-{'-'.join(facts_by_lang)}", on_change="rerun")  # stays open
        for tab, lang in zip(tabs, facts_by_lang):
            with tab, user_errors():
                if lang in failed:
                    st.error(failed[lang], icon=":material/error:")
                    continue
                result = traced[lang][lang][0]
                show_trace(lang, result, model_spec, corpus_spec, all_languages)
    else:
        _, langs, n_facts, answer, params = request
        traced, folder = run_or_read("tr_request", "many", "traces", f"Tracing {n_facts} facts in {', '.join(langs)}",
                                     lambda progress: trace_many(model_spec, corpus_spec, langs, n_facts, answer,
                                                                 params, progress), again=submitted)
        st.caption(f"Traced {traced.summary()} · run folder `{folder}`")
        results = {lang: rs for lang, rs in traced.items() if rs}
        if traced.skipped:
            st.caption(f"{len(traced.skipped)} fact(s) skipped (no prompt containing the subject).")
        kinds = params[0]
        effects = {lang: {k: ct.average_effects(rs, k) for k in kinds} for lang, rs in results.items()}
        fig = fact_figures.average_effect_heatmaps(effects)
        st.plotly_chart(fig, width="stretch", key="aie")
        table = pd.concat([frame.reset_index(names="token").assign(language=lang, kind=k)
                           for lang, per in effects.items() for k, frame in per.items()], ignore_index=True)
        downloads(fig, "average_effects", table)
