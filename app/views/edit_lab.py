"""Edit lab: apply a knowledge edit to one fact in several languages and compare the model before and after.

Design Decision 4: the model is shared by every browser session. This page keeps its
edits only in ``st.session_state`` (this session) and computes every "after" number
inside ``with edit.applied(wb):``, which holds ``wb.lock`` and restores the model bit
for bit on exit, so no other session ever sees them. "Before" numbers are read under
``wb.lock`` too (another session may be inside its own application at that moment).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from analysis.errors import InputError, NeuroglotError
from analysis import figures
from app.state import corpus_rows, current_corpus_spec, current_model_spec, user_errors, workbench
from editors.answers import answer_length, answer_scores, greedy_answers
from editors.base import Edit, EditRequest, LanguageFact, available_editors, get_editor
from editors.evaluate import probes as request_probes

st.title("Edit lab")
st.caption("Edit one fact in several languages and compare the model's answers before and after. Your edits live "
           "in this browser session only: the shared model carries them just while this page measures it, so "
           "other sessions never see them.")

SOURCES = ("A record from MzsRE", "Type a fact", "A fact from the corpus")
ROOT = Path(__file__).resolve().parents[2]
TYPED_LANGUAGES = ["en", "zh", "de", "fr", "es", "ru", "ja", "cs", "nl", "pt", "it", "ar", "th", "tr", "vi"]
EXAMPLES = {
    "en": dict(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome",
               target_old="Paris", paraphrases="The Eiffel Tower can be found in the city of",
               locality="The capital of Japan is | Tokyo",
               portability="The Eiffel Tower is located in the country of | Italy"),
    "zh": dict(prompt="埃菲尔铁塔位于", subject="埃菲尔铁塔", target_new="罗马", target_old="巴黎",
               paraphrases="埃菲尔铁塔坐落于", locality="日本的首都是 | 东京", portability=""),
    "de": dict(prompt="Der Eiffelturm steht in der Stadt", subject="Eiffelturm", target_new="Rom",
               target_old="Paris", paraphrases="Der Eiffelturm befindet sich in", locality="Die Hauptstadt von Japan ist | Tokio",
               portability=""),
}


def mzsre_folder() -> Path:
    """``NEUROGLOT_MZSRE``, else ``../shared/data/mzsre/dev`` beside the repository."""
    return Path(os.environ.get("NEUROGLOT_MZSRE") or ROOT.parent / "shared" / "data" / "mzsre" / "dev")


@st.cache_data(show_spinner=False, max_entries=4)
def mzsre_records(path: str) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """MzsRE records as plain data: (record_id, {language: fields})."""
    from data.edit_records import load_mzsre

    return [(r.record_id, dict(r.fields)) for r in load_mzsre(path)]


# ============================================================== the fact to edit


def pairs_from_lines(text: str, what: str, lang: str) -> list[tuple[str, str]]:
    """``question | answer`` lines as pairs; InputError naming the bad line."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "|" not in line:
            raise InputError(f"Language {lang!r}, {what} line {i}: write 'question | answer' ({line.strip()!r} "
                             "has no '|').")
        question, answer = line.rsplit("|", 1)
        out.append((question.strip(), answer.strip()))
    return out


def typed_request() -> dict[str, dict[str, str]]:
    """Widgets for a typed fact: per language, the raw texts (checked when the edit is applied)."""
    languages = st.multiselect("Languages", TYPED_LANGUAGES, default=["en", "zh"], key="el-typed-languages",
                               accept_new_options=True,
                               help="ISO codes (or language names); type a code that is not listed to add it.")
    raw = {}
    for lang in languages:
        ex = EXAMPLES.get(lang, {})
        with st.container(border=True):
            st.markdown(f"**{lang}**")
            c = st.columns(4)
            row = {
                "prompt": c[0].text_input(f"Prompt ({lang})", ex.get("prompt", ""), key=f"el-prompt-{lang}"),
                "subject": c[1].text_input(f"Subject ({lang})", ex.get("subject", ""), key=f"el-subject-{lang}"),
                "target_new": c[2].text_input(f"New target ({lang})", ex.get("target_new", ""),
                                              key=f"el-new-{lang}"),
                "target_old": c[3].text_input(f"Old target ({lang}, optional)", ex.get("target_old", ""),
                                              key=f"el-old-{lang}"),
            }
            c = st.columns(3)
            row["paraphrases"] = c[0].text_area(f"Paraphrases ({lang}, one per line)", ex.get("paraphrases", ""),
                                                key=f"el-para-{lang}", height=80)
            row["locality"] = c[1].text_area(f"Locality ({lang}, question | answer per line)",
                                             ex.get("locality", ""), key=f"el-loc-{lang}", height=80)
            row["portability"] = c[2].text_area(f"Portability ({lang}, question | answer per line)",
                                                ex.get("portability", ""), key=f"el-port-{lang}", height=80)
        raw[lang] = row
    return raw


def request_from_typed(raw: dict[str, dict[str, str]]) -> EditRequest:
    facts = {}
    for lang, row in raw.items():
        facts[lang] = LanguageFact(
            prompt=row["prompt"].strip(), subject=row["subject"].strip(), target_new=row["target_new"].strip(),
            target_old=row["target_old"].strip() or None,
            paraphrases=[line.strip() for line in row["paraphrases"].splitlines() if line.strip()],
            locality=pairs_from_lines(row["locality"], "locality", lang),
            portability=pairs_from_lines(row["portability"], "portability", lang))
    return EditRequest(facts, case_id="typed")


class _Record:
    """The shape :meth:`EditRequest.from_record` reads."""

    def __init__(self, record_id: str, fields: dict[str, dict[str, Any]]):
        self.record_id, self.fields = record_id, fields


def mzsre_request() -> EditRequest | None:
    folder = mzsre_folder()
    if not folder.exists():
        st.info(f"No MzsRE data at `{folder}`. Put the MzsRE test files (mzsre_test_duplicate_en*.json) there, "
                "or set the NEUROGLOT_MZSRE environment variable to their folder; or type a fact.")
        return None
    with st.spinner("Reading MzsRE..."):
        records = mzsre_records(str(folder))
    query = st.text_input("Search the records (subject, question or target)", key="el-mzsre-search").strip().lower()
    matches = [i for i, (_, fields) in enumerate(records)
               if not query or any(query in str(v).lower() for f in fields.values() for v in f.values())]
    if not matches:
        st.warning(f"No record matches {query!r}.")
        return None

    def label(i: int) -> str:
        rid, fields = records[i]
        f = fields.get("en") or next(iter(fields.values()))
        return f"{i} · {f.get('subject', '')} · {f.get('prompt', '')} → {f.get('target_new', '')}"

    index = st.selectbox(f"Record ({len(matches):,} of {len(records):,})", matches, format_func=label,
                         key="el-mzsre-record")
    rid, fields = records[index]
    available = sorted(fields)
    default = [lang for lang in ("en", "zh") if lang in available] or available[:1]
    languages = st.multiselect("Languages", available, default=default, key="el-mzsre-languages")
    request = EditRequest.from_record(_Record(rid, fields), languages) if languages else None
    if request is not None:
        st.dataframe(pd.DataFrame([{"language": lang, "question": f.prompt, "subject": f.subject,
                                    "new target": f.target_new, "paraphrases": " / ".join(f.paraphrases)}
                                   for lang, f in request.facts.items()]), hide_index=True, width="stretch")
    return request


def corpus_request() -> EditRequest | None:
    from analysis import causal_trace as ct
    from data.corpus import Corpus

    corpus_name, rows = corpus_rows(current_corpus_spec())
    all_languages = sorted(rows["language"].unique())
    default = [lang for lang in ("en", "zh") if lang in all_languages] or all_languages[:1]
    languages = st.multiselect("Languages", all_languages, default=default, key="el-corpus-languages")
    if not languages:
        return None
    aligned = Corpus(rows, name=corpus_name).aligned(languages).rows
    facts = list(pd.unique(aligned["fact_id"]))
    first = aligned[aligned["language"] == languages[0]]

    def label(f: str) -> str:
        r = first[first["fact_id"] == f].iloc[0]
        return f"{f} · {r['subject']} → {r['object']}"

    fact = st.selectbox(f"Fact ({len(facts):,} in all chosen languages of {corpus_name})", facts, format_func=label,
                        key="el-corpus-fact")
    if fact is None:
        return None
    found = ct.fact_prompt(rows, fact, languages)
    cols = st.columns(len(languages))
    out = {}
    for col, lang in zip(cols, languages):
        prompt, subject, obj = found[lang]
        col.caption(f"**{lang}** · {prompt} … (now: {obj})")
        new = col.text_input(f"New target ({lang})", key=f"el-corpus-new-{lang}-{fact}")
        out[lang] = LanguageFact(prompt, subject, new.strip(), target_old=obj)
    return EditRequest(out, case_id=str(fact))


# ============================================================ before / after


def probes(request: EditRequest) -> list[dict[str, Any]]:
    """One row per probe of :func:`editors.evaluate.probes` (the edit prompt, each paraphrase, each locality
    and portability question), labelled for the table; locality rows carry the data set's answer."""
    labels = {"reliability": "edit", "generality": "paraphrase", "locality": "locality", "portability": "portability"}
    seen: dict[tuple[str, str], int] = {}
    out = []
    for p in request_probes(request):
        n = seen[(p.language, p.kind)] = seen.get((p.language, p.kind), 0) + 1
        label = labels[p.kind] if p.kind == "reliability" else f"{labels[p.kind]} {n}"
        out.append(dict(language=p.language, probe=label, prompt=p.prompt, target=p.gold, old=p.old))
    return out


def measure(wb: Any, rows: list[dict[str, Any]]) -> dict[str, list]:
    """Greedy answers and teacher-forced probabilities of the probes on the model as it is now."""
    prompts = [r["prompt"] for r in rows]
    lengths = [max(answer_length(wb, r["prompt"], r["target"]), 4) for r in rows]
    answers = greedy_answers(wb, prompts, lengths)
    p_target = [s.probability for s in answer_scores(wb, prompts, [r["target"] for r in rows])]
    with_old = [i for i, r in enumerate(rows) if r["old"]]
    p_old: list[float | None] = [None] * len(rows)
    if with_old:
        scores = answer_scores(wb, [prompts[i] for i in with_old], [rows[i]["old"] for i in with_old])
        for i, s in zip(with_old, scores):
            p_old[i] = s.probability
    return {"answer": answers, "p_target": p_target, "p_old": p_old}


def request_key(request: dict) -> str:
    return json.dumps(request, sort_keys=True, ensure_ascii=False)


def before_numbers(wb: Any, model_spec: str, request: EditRequest) -> dict[str, list]:
    """The unedited model's numbers, cached per request in this session."""
    cache = st.session_state.setdefault("el_before", {})
    key = (model_spec, request_key(request.to_dict()))
    if key not in cache:
        with st.spinner("Measuring the model before the edit..."), wb.lock:
            cache[key] = measure(wb, probes(request))
    return cache[key]


def after_numbers(wb: Any, model_spec: str, request: EditRequest, entries: list[dict]) -> dict[str, list]:
    """The numbers with this session's edits applied (stacked in order), reverted on leaving."""
    cache = st.session_state.setdefault("el_after", {})
    key = (model_spec, request_key(request.to_dict()), tuple(e["id"] for e in entries))
    if key not in cache:
        edits = [e["edit"] for e in entries]
        edit = edits[0] if len(edits) == 1 else Edit.compose(*edits)
        with st.spinner(f"Measuring the model with {len(edits)} edit(s) applied..."), edit.applied(wb):
            cache[key] = measure(wb, probes(request))
        # keep only the current stack's entries: older stacks are not shown again
        for old in [k for k in cache if k[2] != key[2]]:
            del cache[old]
    return cache[key]


def comparison_table(request: EditRequest, before: dict, after: dict) -> pd.DataFrame:
    table = pd.DataFrame(probes(request))[["language", "probe", "prompt", "target", "old"]]
    table["answer before"] = before["answer"]
    table["answer after"] = after["answer"]
    table["P(target) before"] = before["p_target"]
    table["P(target) after"] = after["p_target"]
    table["Δ P(target)"] = table["P(target) after"] - table["P(target) before"]
    table["P(old) before"] = pd.to_numeric(pd.Series(before["p_old"], dtype="object"), errors="coerce")
    table["P(old) after"] = pd.to_numeric(pd.Series(after["p_old"], dtype="object"), errors="coerce")
    table = table.rename(columns={"old": "old target"})
    columns = ["language", "probe", "target", "answer before", "answer after", "P(target) before", "P(target) after",
               "Δ P(target)", "old target", "P(old) before", "P(old) after", "prompt"]
    if table["old target"].isna().all():
        columns = [c for c in columns if c not in ("old target", "P(old) before", "P(old) after")]
    return table[columns]


def styled(table: pd.DataFrame):
    def delta_colour(v: float) -> str:
        if pd.isna(v) or abs(v) < 1e-4:
            return ""
        return "background-color: rgba(46, 160, 67, 0.25)" if v > 0 else "background-color: rgba(218, 54, 51, 0.25)"

    def changed(row: pd.Series) -> list[str]:
        mark = "font-weight: bold; background-color: rgba(255, 196, 0, 0.25)"
        return ["" if c != "answer after" or row["answer after"] == row["answer before"] else mark
                for c in row.index]

    numbers = [c for c in table.columns if c.startswith(("P(", "Δ"))]
    return (table.style.map(delta_colour, subset=["Δ P(target)"]).apply(changed, axis=1)
            .format({c: "{:.4f}" for c in numbers}, na_rep="–").format(na_rep="–", subset=[c for c in ("old target",) if c in table.columns]))



def edit_zip(entry: dict) -> bytes:
    """The edit as a zip of its saved folder (edit.safetensors + edit.json), made once."""
    if "zip" not in entry:
        with tempfile.TemporaryDirectory() as tmp:
            folder = entry["edit"].save(Path(tmp) / "edit")
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
                for file in sorted(folder.iterdir()):
                    z.write(file, f"edit/{file.name}")
        entry["zip"] = buffer.getvalue()
    return entry["zip"]


def edit_details(entry: dict) -> None:
    edit: Edit = entry["edit"]
    st.markdown(f"**{entry['editor']}** · case `{entry['case_id'] or '–'}` · {entry['seconds']:.1f} s · "
                f"languages {', '.join(entry['request']['facts'])}")
    st.json(edit.summary(), expanded=True)
    details = {"hparams": edit.meta.get("hparams")}
    for key, value in edit.meta.items():
        if key in ("hparams", "requests", "versions", "model", "method", "created"):
            continue
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):   # per-request records
            value = [{k: v for k, v in item.items() if k not in ("losses", "prefixes")} for item in value]
        details[key] = value
    st.json(details, expanded=False)
    for i, item in enumerate(v for value in edit.meta.values() if isinstance(value, list) for v in value
                             if isinstance(v, dict) and isinstance(v.get("losses"), list) and v["losses"]):
        losses = pd.DataFrame(item["losses"])
        st.caption(f"Losses per step (request {i + 1})")
        st.line_chart(losses, height=180)
    st.download_button("Download the edit (zip)", edit_zip(entry), f"edit-{entry['editor']}-{entry['id'][:8]}.zip",
                       "application/zip", key=f"el-dl-{entry['id']}")


# ========================================================================= page

with user_errors():
    model_spec = current_model_spec()
    with st.spinner("Loading the model..."):
        wb = workbench(model_spec)
    all_entries: list[dict] = st.session_state.setdefault("el_edits", [])
    entries = [e for e in all_entries if e["model"] == model_spec]

    st.subheader("1 · The fact")
    source = st.radio("Source", SOURCES, horizontal=True, key="el-source")
    request: EditRequest | None = None
    typed_raw = None
    with user_errors():
        if source == SOURCES[0]:
            request = mzsre_request()
        elif source == SOURCES[1]:
            typed_raw = typed_request()
        else:
            request = corpus_request()

    st.subheader("2 · The editor")
    names = available_editors()
    names = (["lu-lafns"] if "lu-lafns" in names else []) + [n for n in names if n != "lu-lafns"]
    c1, c2 = st.columns([1, 3])
    editor_name = c1.selectbox("Editor", names, key="el-editor")
    hp_key = f"el-hp-{editor_name}-{model_spec}"
    reset = c1.button("Reset to preset", key="el-hp-reset", help="Start again from the preset for this model")
    # The JSON text lives in a plain dict of session_state, not only in the widget's own state: Streamlit drops
    # a widget's state when a run that did not draw it completes (e.g. a run cut short by the next input), and
    # the box then came back empty. The widget's key carries a version bumped on every reset.
    texts = st.session_state.setdefault("el-hp-texts", {})
    origins = st.session_state.setdefault("el-hp-origins", {})
    versions = st.session_state.setdefault("el-hp-versions", {})
    if editor_name and (hp_key not in texts or reset):
        hp_class = get_editor(editor_name).hparams_class
        try:
            defaults = hp_class.preset(wb).to_dict()
            origins[hp_key] = f"preset {hp_class.preset_name(wb)!r}"
        except NeuroglotError as exc:
            st.error(f"{exc} Starting from {hp_class.__name__}'s defaults: edit them below.", icon="⚠️")
            try:
                defaults = hp_class().to_dict()
            except Exception:                       # a class without defaults for every field
                defaults = {}
            origins[hp_key] = "defaults (no preset for this model)"
        texts[hp_key] = json.dumps(defaults, indent=1, ensure_ascii=False)
        versions[hp_key] = versions.get(hp_key, 0) + 1
    hp_text = c2.text_area(f"Hyper-parameters (JSON; from the {origins.get(hp_key, 'preset')})",
                           value=texts.get(hp_key, ""), key=f"{hp_key}-v{versions.get(hp_key, 0)}", height=220)
    texts[hp_key] = hp_text

    b = st.columns([1, 1, 1, 3])
    apply = b[0].button("Apply edit", type="primary", key="el-apply", disabled=not editor_name)
    revert = b[1].button("Revert", key="el-revert", disabled=not entries,
                         help="Remove the last edit applied in this session")
    revert_all = b[2].button("Revert all", key="el-revert-all", disabled=not entries)

    if (revert and entries) or revert_all:
        if revert_all:
            all_entries[:] = [e for e in all_entries if e["model"] != model_spec]
        else:
            all_entries.remove(entries[-1])
        st.rerun()                                  # redraw the buttons for the new list
    if apply:
        with user_errors():
            if typed_raw is not None:
                request = request_from_typed(typed_raw)
            if request is None:
                raise InputError("Choose a fact to edit first (a record and at least one language).")
            try:
                data = json.loads(hp_text)
            except json.JSONDecodeError as exc:
                raise InputError(f"The hyper-parameters are not valid JSON: {exc}.") from None
            hp = get_editor(editor_name).hparams_class.from_dict(data)
            hp.validate(wb)
            checked = request.validate(wb)
            editor = get_editor(editor_name, hp)
            with st.spinner(f"Computing the {editor_name} edit of {', '.join(checked.languages)}..."):
                started = time.perf_counter()
                edit = editor.compute(wb, checked)
                seconds = time.perf_counter() - started
            if edit.is_empty():
                st.session_state["el_flash"] = (f"{editor_name} computed an empty edit (nothing to change with these "
                                                "hyper-parameters); it is kept in the list but changes nothing.")
            all_entries.append(dict(id=uuid.uuid4().hex, edit=edit, editor=editor_name, model=model_spec,
                                    request=checked.to_dict(), case_id=checked.case_id, seconds=seconds))
            st.rerun()                              # redraw the buttons (Revert) for the new list
    if flash := st.session_state.pop("el_flash", None):
        st.warning(flash)
    entries = [e for e in all_entries if e["model"] == model_spec]

    st.subheader("3 · Before and after")
    if not entries:
        st.info("No edit applied in this session. Choose a fact and an editor, then press **Apply edit**.")
        st.stop()
    st.dataframe(pd.DataFrame([{
        "#": i + 1, "editor": e["editor"], "case": e["case_id"], "languages": ", ".join(e["request"]["facts"]),
        "subject": " / ".join(f["subject"] for f in e["request"]["facts"].values()),
        "new target": " / ".join(f["target_new"] for f in e["request"]["facts"].values()),
        "seconds": round(e["seconds"], 1)} for i, e in enumerate(entries)]), hide_index=True, width="stretch",
        key="el-applied")
    st.caption(f"{len(entries)} edit(s) applied in this session, stacked in order for the “after” columns.")
    shown = st.selectbox("Probes of", range(len(entries)), index=len(entries) - 1,
                         format_func=lambda i: f"edit {i + 1}: {entries[i]['editor']} · {entries[i]['case_id']}")
    shown = min(int(shown if shown is not None else len(entries) - 1), len(entries) - 1)
    shown_request = EditRequest.from_dict(entries[shown]["request"])
    before = before_numbers(wb, model_spec, shown_request)
    after = after_numbers(wb, model_spec, shown_request, entries)
    table = comparison_table(shown_request, before, after)
    st.dataframe(styled(table), hide_index=True, width="stretch", key="el-table")
    fig = figures.edit_probability_bars(table, f"P(new target) before vs after ({len(entries)} edit(s) applied)")
    st.plotly_chart(fig, width="stretch", key="el-bars")
    for i, entry in enumerate(entries):
        with st.expander(f"Edit {i + 1}: {entry['editor']} · {entry['case_id'] or '–'} · summary and download",
                         expanded=False):
            edit_details(entry)
