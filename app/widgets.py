"""Widgets more than one page uses: figure downloads, the neuron drill-down and the fact picker."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import streamlit as st

from analysis import figures
from analysis import neurons as nr
from app import forms
from app.state import kept, workbench
from editors.requests import EditRequest


def downloads(fig, stem: str, table: pd.DataFrame | None = None, key: str | None = None,
              narrow: bool = False) -> None:
    """One row of downloads: the figure's data as CSV, the figure as HTML, and as PNG in one click.

    The PNG is rendered (kaleido) only when its button is clicked, on Streamlit's download thread, so
    drawing the page costs nothing and the click starts the download itself. ``key`` (default: the
    file stem) tells apart two rows of the same file on one page; ``narrow``: the row is in a narrow column (no
    spacer, so the buttons keep their labels)."""
    key = key or stem
    cols = st.columns([1, 1, 1] if narrow else [1, 1, 1, 5])
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


# ------------------------------------------------------------------- the fact to edit (Edit lab, Compare)

EDIT_SOURCES = ("A record from a data set (MzsRE, MLaKE)", "Type a fact", "A fact from the corpus")
ROOT = Path(__file__).resolve().parents[1]
TYPED_LANGUAGES = ["en", "zh", "de", "fr", "es", "ru", "ja", "cs", "nl", "pt", "it", "ar", "th", "tr", "vi"]
EDIT_EXAMPLES = {
    "en": dict(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome",
               target_old="Paris", paraphrases="The Eiffel Tower can be found in the city of",
               locality="The capital of Japan is | Tokyo",
               portability="The Eiffel Tower is located in the country of | Italy"),
    "zh": dict(prompt="埃菲尔铁塔位于", subject="埃菲尔铁塔", target_new="罗马", target_old="巴黎",
               paraphrases="埃菲尔铁塔坐落于", locality="日本的首都是 | 东京", portability=""),
    "de": dict(prompt="Der Eiffelturm steht in der Stadt", subject="Eiffelturm", target_new="Rom",
               target_old="Paris", paraphrases="Der Eiffelturm befindet sich in",
               locality="Die Hauptstadt von Japan ist | Tokio", portability=""),
}


def mzsre_folder() -> Path:
    """``NEUROGLOT_MZSRE``, else ``../shared/data/mzsre/dev`` beside the repository."""
    return Path(os.environ.get("NEUROGLOT_MZSRE") or ROOT.parent / "shared" / "data" / "mzsre" / "dev")


@st.cache_data(show_spinner=False, max_entries=4)
def dataset_records(path: str, stamp: float) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """The edit records of an MzsRE or MLaKE file or folder as plain data: (record_id, {language: fields}).
    ``stamp`` (the path's modification time) reads a changed folder again. Pure: draws nothing."""
    from data import edit_records

    load = getattr(edit_records, "load_edit_records", None) or edit_records.load_mzsre
    return [(r.record_id, dict(r.fields)) for r in load(path)]


class _Record:
    """The shape :meth:`EditRequest.from_record` reads."""

    def __init__(self, record_id: str, fields: dict[str, dict[str, Any]]):
        self.record_id, self.fields = record_id, fields


def dataset_request(prefix: str, default: Sequence[str]) -> EditRequest | None:
    """A data-set record picker (a folder of MzsRE or MLaKE files; search; record; languages)."""
    typed = kept(st.text_input, "Data set (an MzsRE or MLaKE file or folder)", key=f"{prefix}-dataset",
                 default=str(mzsre_folder()),
                 help="Default: NEUROGLOT_MZSRE, else ../shared/data/mzsre/dev beside the repository.")
    folder = Path(typed.strip()).expanduser()
    if not folder.exists():
        st.info(f"No data at `{folder}`. Give the folder of the MzsRE test files (mzsre_test_duplicate_en*.json) "
                "or of MLaKE's files (en_qa.json ...), or set the NEUROGLOT_MZSRE environment variable; or type "
                "a fact.")
        return None
    with st.spinner("Reading the records..."):
        records = dataset_records(str(folder), folder.stat().st_mtime)
    query = kept(st.text_input, "Search the records (subject, question or target)", key=f"{prefix}-mzsre-search",
                 default="")
    query = query.strip().lower()
    matches = [i for i, (_, fields) in enumerate(records)
               if not query or any(query in str(v).lower() for f in fields.values() for v in f.values())]
    if not matches:
        st.warning(f"No record matches {query!r}.")
        return None

    def label(i: int) -> str:
        rid, fields = records[i]
        f = fields.get("en") or next(iter(fields.values()))
        return f"{i} · {f.get('subject') or ''} · {f.get('prompt', '')} → {f.get('target_new', '')}"

    index = kept(st.selectbox, f"Record ({len(matches):,} of {len(records):,})", matches, format_func=label,
                 key=f"{prefix}-mzsre-record", default=matches[0])
    rid, fields = records[index]
    available = sorted(fields)
    chosen = [lang for lang in default if lang in available] or available[:1]
    languages = kept(st.multiselect, "Languages", available, default=chosen, key=f"{prefix}-mzsre-languages",
                     format_func=forms.language_name)
    request = EditRequest.from_record(_Record(rid, fields), languages) if languages else None
    if request is not None:
        st.dataframe(pd.DataFrame([{"language": lang, "question": f.prompt, "subject": f.subject,
                                    "new target": f.target_new, "paraphrases": " / ".join(f.paraphrases)}
                                   for lang, f in request.facts.items()]), hide_index=True, width="stretch")
    return request


def typed_edit(prefix: str, default: Sequence[str]) -> dict[str, dict[str, str]]:
    """Widgets for a typed fact: per language, the raw texts (checked by ``forms.edit_request_from_boxes``)."""
    from data import LANGUAGES

    options = TYPED_LANGUAGES + sorted(set(LANGUAGES) - set(TYPED_LANGUAGES))
    languages = kept(st.multiselect, "Languages", options, default=list(default), key=f"{prefix}-typed-languages",
                     accept_new_options=True, format_func=forms.language_name,
                     help="Pick from the list, or type an ISO 639-1 code or an English language name.")
    raw = {}
    for lang in languages:
        ex = EDIT_EXAMPLES.get(lang, {})
        with st.container(border=True):
            st.markdown(f"**{forms.language_name(lang)}**")
            c = st.columns(4)
            row = {name: kept(col.text_input, f"{label} ({lang}{extra})", key=f"{prefix}-{short}-{lang}",
                              default=ex.get(name, ""))
                   for col, (name, label, short, extra) in zip(c, (
                       ("prompt", "Prompt", "prompt", ""), ("subject", "Subject", "subject", ""),
                       ("target_new", "New target", "new", ""), ("target_old", "Old target", "old", ", optional")))}
            c = st.columns(3)
            for col, (name, label, short) in zip(c, (
                    ("paraphrases", "Paraphrases ({}, one per line)", "para"),
                    ("locality", "Locality ({}, question | answer per line)", "loc"),
                    ("portability", "Portability ({}, question | answer per line)", "port"))):
                row[name] = kept(col.text_area, label.format(lang), key=f"{prefix}-{short}-{lang}",
                                 default=ex.get(name, ""), height=80)
        raw[lang] = row
    return raw


def corpus_edit(prefix: str, rows: pd.DataFrame, corpus_name: str) -> EditRequest | None:
    """A corpus fact in the chosen languages, with a new target typed per language."""
    from analysis import causal_trace as ct

    all_languages = sorted(rows["language"].unique())
    languages = kept(st.multiselect, "Languages", all_languages, default=forms.default_languages(all_languages, n=1),
                     key=f"{prefix}-corpus-languages", format_func=forms.language_name)
    if not languages:
        return None
    fact = corpus_fact(rows, corpus_name, languages, key=f"{prefix}-corpus-fact", name_corpus=True)
    if fact is None:
        return None
    found = ct.fact_prompt(rows, fact, languages)
    fields = {}
    for col, lang in zip(st.columns(len(languages)), languages):
        prompt, subject, obj = found[lang]
        col.caption(f"**{lang}** · {prompt} … (now: {obj})")
        new = kept(col.text_input, f"New target ({lang})", key=f"{prefix}-corpus-new-{lang}-{fact}", default="")
        fields[lang] = dict(prompt=prompt, subject=subject, target_new=new, target_old=obj)
    return forms.edit_request(fields, case_id=str(fact))


def edit_fact(prefix: str, corpus: Callable[[], tuple[str, pd.DataFrame]], default: Sequence[str] = ("en", "zh"),
              ) -> tuple[EditRequest | None, dict[str, dict[str, str]] | None]:
    """The Edit lab's and Compare page's fact picker: a data-set record, a typed fact or a corpus fact.

    Returns ``(request, None)`` for a record or a corpus fact (None while incomplete) and ``(None, raw
    boxes)`` for a typed fact, checked when the user presses the page's button
    (``forms.edit_request_from_boxes``), so that typing does not show errors before then. ``corpus()`` gives
    the corpus as (name, rows); it is read only when a corpus fact is asked for."""
    source = kept(st.radio, "Source", EDIT_SOURCES, horizontal=True, key=f"{prefix}-source", default=EDIT_SOURCES[0])
    if source == EDIT_SOURCES[1]:
        return None, typed_edit(prefix, default)
    if source == EDIT_SOURCES[0]:
        return dataset_request(prefix, default), None
    corpus_name, rows = corpus()
    return corpus_edit(prefix, rows, corpus_name), None


def hparams_box(store: str, key: str, editor_name: str, wb, reset: bool, label: str, *, place=st,
                height: int = 200, problem: Callable[[str], Any] = st.warning) -> str:
    """An editor's hyper-parameters as an editable JSON box, started from its preset for this model
    (:func:`app.forms.preset_values`) and again when ``reset``; returns the box's text.

    The text lives in a plain dict of session state (``<store>-texts``), not only in the widget's own state:
    Streamlit drops a widget's state when a run that did not draw it completes (e.g. a run cut short by the
    next input), and the box then came back empty. The widget's key carries a version bumped on every reset.
    ``problem`` shows the message when the model has no preset (the box then holds the class defaults)."""
    texts = st.session_state.setdefault(f"{store}-texts", {})
    origins = st.session_state.setdefault(f"{store}-origins", {})
    versions = st.session_state.setdefault(f"{store}-versions", {})
    if key not in texts or reset:
        values, origins[key], message = forms.preset_values(editor_name, wb)
        if message:
            problem(message)
        texts[key] = json.dumps(values, indent=1, ensure_ascii=False)
        versions[key] = versions.get(key, 0) + 1
    texts[key] = place.text_area(f"{label} (JSON; from the {origins.get(key, 'preset')})", value=texts[key],
                                 key=f"{key}-v{versions.get(key, 0)}", height=height)
    return texts[key]
