"""Edit lab: apply a knowledge edit to one fact in several languages and compare the model before and after.

Design Decision 4: the model is shared by every browser session. This page keeps its
edits per session only: each computed edit is saved (``Edit.save``) into a temporary
folder of this session (app/edit_store.py, which also removes the folders of sessions
long gone), and ``st.session_state`` holds only its id and plain data (no tensors).
Every "after" number is computed inside ``with edit.applied(wb):``, which holds
``wb.lock`` and restores the model bit for bit on exit, so no other session ever sees
them. "Before" numbers are read under ``wb.lock`` too (another session may be
inside its own application at that moment).

Probes are produced and scored by :mod:`editors.evaluate` (``probes``,
``unedited_answers``, ``score_probes``): the page shows what the metrics measure.

No cached function draws anything: the edit is computed in a worker thread while the
page draws its steps and the elapsed seconds; a rerun (any click) stops that worker at
its next step.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import streamlit as st

from analysis import fact_figures, figures
from analysis.errors import InputError
from app.edit_store import edit_zip, load_edit, remove_edit, save_edit, session_folder
from app.forms import edit_request_from_boxes, hparams_from_text
from app.state import (ERROR_ICON, corpus_rows, current_corpus_spec, current_model_spec, progress_bar,
                       user_errors, workbench)
from app.widgets import downloads, edit_fact, hparams_box, neuron_drilldown
from editors.apply import in_context_prompts
from editors.base import available_editors, get_editor
from editors.edit import Edit
from editors.requests import EditRequest
from editors.evaluate import probes as request_probes
from editors.evaluate import probe_labels as evaluate_labels
from editors.evaluate import score_probes, unedited_answers
from editors.mpn import patch_activation_table, patch_drilldown

if TYPE_CHECKING:
    from analysis.model import Workbench

st.title("Edit lab")
st.caption("Edit one fact in several languages and compare the model's answers before and after. Your edits live "
           "in this browser session only: the shared model carries them just while this page measures it, so "
           "other sessions never see them (reloading the page starts a new session without edits).")

P_TARGET_HELP = ("P(target) is the probability of the whole target answer after the question, under teacher "
                 "forcing: the product of the probabilities of its tokens, each given the question and the "
                 "answer's tokens before it (not just its first token).")


# ===================================================================== this session's edits


def plain_details(edit: Edit) -> dict[str, Any]:
    """What the edit's expander shows, as plain data: hyper-parameters, the editor's records, losses per step."""
    meta = json.loads(json.dumps(edit.meta, ensure_ascii=False, default=str))
    details: dict[str, Any] = {"hparams": meta.get("hparams")}
    losses = []
    for key, value in meta.items():
        if key in ("hparams", "requests", "versions", "model", "method", "created"):
            continue
        if isinstance(value, dict) and isinstance(value.get("losses"), list):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):   # per-request records
            losses += [v["losses"] for v in value if isinstance(v.get("losses"), list) and v["losses"]]
            value = [{k: v for k, v in item.items() if k not in ("losses", "prefixes")} for item in value]
            if len(value) == 1 and isinstance(meta[key], dict):
                value = value[0]
        details[key] = value
    return {"meta": details, "losses": losses}


class _Stopped(Exception):
    """Raised in the worker by the progress callback once the page's run has ended."""


def compute_with_progress(editor: Any, wb: Workbench, request: EditRequest, label: str) -> tuple[Edit, float]:
    """``editor.compute`` in a worker thread while the page shows its steps and the elapsed seconds.

    The progress box is removed when the work ends (result or error). If the page's run ends first
    (a click reruns the page), the worker stops at its next step and the model is left as it was.
    """
    state: dict[str, Any] = {"fraction": 0.0, "message": "starting"}
    result: dict[str, Any] = {}
    stop = threading.Event()

    def report(fraction: float, message: str) -> None:
        if stop.is_set():
            raise _Stopped()
        state["fraction"], state["message"] = float(fraction), str(message)

    def work() -> None:
        try:
            result["edit"] = editor.compute(wb, request, progress=report)
        except BaseException as exc:  # noqa: BLE001 - handed to the page's thread
            result["error"] = exc

    started = time.perf_counter()
    worker = threading.Thread(target=work, name="edit-lab-compute", daemon=True)
    with progress_bar(label) as update:
        worker.start()
        try:
            while worker.is_alive():
                update(state["fraction"], state["message"])
                worker.join(0.3)
        finally:
            stop.set()          # a no-op when the worker is done; otherwise it stops at its next step
    seconds = time.perf_counter() - started
    if "error" in result:
        raise result["error"]
    return result["edit"], seconds


# ============================================================ before / after


def probe_labels(request: EditRequest) -> list[str]:
    """"edit", "paraphrase 1", "locality 1" ... for the probes of :func:`editors.evaluate.probes`."""
    return evaluate_labels((p.language, p.kind) for p in request_probes(request))


def request_key(request: dict) -> str:
    return json.dumps(request, sort_keys=True, ensure_ascii=False)


def before_numbers(wb: Workbench, model_spec: str, request: EditRequest) -> dict[str, Any]:
    """The unedited model's answers (text and token ids) and scores, cached per request in this session."""
    cache = st.session_state.setdefault("el_before", {})
    key = (model_spec, request_key(request.to_dict()))
    if key not in cache:
        items = request_probes(request)
        with st.spinner("Measuring the model before the edit..."), wb.lock:
            answers = unedited_answers(wb, items)
            rows = score_probes(wb, items, answers, unedited=True)
        cache[key] = {"answers": [[text, [int(t) for t in ids]] for text, ids in answers], "rows": rows}
    return cache[key]


def after_numbers(wb: Workbench, model_spec: str, request: EditRequest, entries: list[dict],
                  folder: Path, before: dict[str, Any]) -> list[dict[str, Any]]:
    """The scores with this session's edits applied (stacked in order), reverted on leaving."""
    cache = st.session_state.setdefault("el_after", {})
    key = (model_spec, request_key(request.to_dict()), tuple(e["id"] for e in entries))
    if key not in cache:
        with st.spinner(f"Measuring the model with {len(entries)} edit(s) applied..."):
            edits = [load_edit(folder, e["id"]) for e in entries]
            edit = edits[0] if len(edits) == 1 else Edit.compose(*edits)
            answers = [(text, ids) for text, ids in before["answers"]]
            reads = st.session_state.setdefault("el_reads", {})
            with edit.applied(wb):
                cache[key] = score_probes(wb, request_probes(request), answers)
                reads[key] = [{"text": r.text, "retrieved": r.retrieved, "similarity": r.similarity,
                               "facts": len(r.facts)}
                              for r in in_context_prompts(wb, [p.prompt for p in request_probes(request)])
                              ] if edit.contexts else []
        # keep only the current stack's entries: older stacks are not shown again
        for store in (cache, st.session_state.get("el_reads", {})):
            for old in [k for k in store if k[2] != key[2]]:
                del store[old]
    return cache[key]


def context_table(request: EditRequest, reads: list[dict]) -> pd.DataFrame:
    """One row per probe: the question, the new fact(s) an in-context edit put before it, the similarity."""
    rows = []
    for probe, label, read in zip(request_probes(request), probe_labels(request), reads):
        told = read["retrieved"] if read["retrieved"] else (f"{read['facts']} fact(s)" if read["facts"] else "–")
        rows.append({"language": probe.language, "probe": label, "question": probe.prompt, "fact put before it": told,
                     "similarity": None if read["similarity"] is None else round(read["similarity"], 3)})
    return pd.DataFrame(rows)


def in_context_panel(request: EditRequest, reads: list[dict]) -> None:
    """Under in-context edits (IKE, retrieval): what the model reads for each probe; a row shows the whole text."""
    if not reads:
        return
    st.markdown("**What the model reads** under the in-context edit(s): no weight changes; the new facts are put "
                "before the question (IKE: before every question; retrieval: only where the edit memory holds a "
                "fact whose similarity reaches the threshold) · select a row for the whole text")
    table = context_table(request, reads)
    event = st.dataframe(table, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row",
                         key="el-context-rows", placeholder="–",
                         column_config={"question": st.column_config.TextColumn(width="medium"),
                                        "fact put before it": st.column_config.TextColumn(width="medium")})
    picked = [i for i in (event.selection.rows if event is not None else []) if i < len(reads)] or [0]
    st.caption(f"The text the model reads for “{table.iloc[picked[0]]['probe']}” "
               f"({table.iloc[picked[0]]['language']}):")
    st.code(reads[picked[0]]["text"], language=None, wrap_lines=True)


def comparison_table(request: EditRequest, before: list[dict], after: list[dict]) -> pd.DataFrame:
    """One row per probe: the question early, then the target, its probability before and after, the answers."""
    rows = []
    for probe, label, b, a in zip(request_probes(request), probe_labels(request), before, after):
        rows.append({
            "language": probe.language, "probe": label, "question": probe.prompt,
            "target": probe.gold or probe.reference,
            "P(target) before": b.get("p_new"), "P(target) after": a.get("p_new"),
            "answer before": b["answer"], "answer after": a["answer"],
            "F1 after": a["f1"],
            "old target": b.get("old"), "P(old) before": b.get("p_old"), "P(old) after": a.get("p_old"),
        })
    table = pd.DataFrame(rows)
    for column in ("P(target) before", "P(target) after", "P(old) before", "P(old) after", "F1 after"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    table.insert(table.columns.get_loc("P(target) after") + 1, "Δ P(target)",
                 table["P(target) after"] - table["P(target) before"])
    if table["P(old) before"].isna().all():
        table = table.drop(columns=["old target", "P(old) before", "P(old) after"])
    return table


COLUMN_HELP = {
    "language": st.column_config.TextColumn("language", width=70),
    "probe": st.column_config.TextColumn("probe", width=95),
    "question": st.column_config.TextColumn(
        "question", width=220, help="The probe's question (the edit prompt, a paraphrase, a locality or a "
                                        "portability question), given to the model as it is."),
    "target": st.column_config.TextColumn(
        "target", width=90, help="Edit and paraphrases: the new target. Portability: the expected answer. "
                                 "Locality: the data set's answer (the edit should leave the model's answer "
                                 "unchanged)."),
    "answer before": st.column_config.TextColumn(
        "answer before", width=125,
        help="Greedy answer of the unedited model: exactly as many tokens as the target has."),
    "answer after": st.column_config.TextColumn(
        "answer after", width=125,
        help="Greedy answer with this session's edits applied (highlighted where it changed)."),
    "P(target) before": st.column_config.NumberColumn("P(target) before", width=95, help=P_TARGET_HELP),
    "P(target) after": st.column_config.NumberColumn("P(target) after", width=90, help=P_TARGET_HELP),
    "Δ P(target)": st.column_config.NumberColumn("Δ P(target)", width=75),
    "F1 after": st.column_config.NumberColumn(
        "F1 after", width="small", help="Token F1 of the answer after the edit against the target (locality: "
                                        "against the answer before the edit), as the evaluation computes it."),
    "old target": st.column_config.TextColumn(
        "old target", help="The old target of the request, or the unedited model's answer where it gives none."),
    "P(old) before": st.column_config.NumberColumn("P(old) before", width="small"),
    "P(old) after": st.column_config.NumberColumn("P(old) after", width="small"),
}


def styled(table: pd.DataFrame):
    def delta_colour(v: float) -> str:
        if pd.isna(v) or abs(v) < 1e-4:
            return ""
        return "background-color: rgba(46, 160, 67, 0.25)" if v > 0 else "background-color: rgba(218, 54, 51, 0.25)"

    def changed(row: pd.Series) -> list[str]:
        mark = "font-weight: bold; background-color: rgba(255, 196, 0, 0.25)"
        return ["" if c != "answer after" or row["answer after"] == row["answer before"] else mark
                for c in row.index]

    numbers = [c for c in table.columns if c.startswith(("P(", "Δ", "F1"))]
    texts = [c for c in ("old target",) if c in table.columns]
    return (table.style.map(delta_colour, subset=["Δ P(target)"]).apply(changed, axis=1)
            .format({c: "{:.4f}" for c in numbers}, na_rep="–").format(na_rep="–", subset=texts))


def edit_details(entry: dict, folder: Path) -> None:
    st.markdown(f"**{entry['editor']}** · case `{entry['case_id'] or '–'}` · {entry['seconds']:.1f} s · "
                f"languages {', '.join(entry['request']['facts'])}")
    st.json(entry["summary"], expanded=True)
    st.json(entry["details"]["meta"], expanded=False)
    for i, losses in enumerate(entry["details"]["losses"]):
        frame = pd.DataFrame(losses if isinstance(losses[0], dict) else {"loss": losses})
        st.caption(f"Losses per step ({i + 1})")
        st.line_chart(frame, height=180)
    st.download_button("Download the edit (zip)", edit_zip(folder, entry["id"]),
                       f"edit-{entry['editor']}-{entry['id'][:8]}.zip", "application/zip",
                       key=f"el-dl-{entry['id']}", on_click="ignore")


def trained_neurons_table(entry: dict) -> pd.DataFrame | None:
    """One row per (layer, editor, neuron) a MEMLA edit trained, from its stored record; None for other edits."""
    record = entry.get("details", {}).get("meta", {}).get("memla")
    sets = (record or {}).get("neurons", {}).get("sets") if isinstance(record, dict) else None
    if not sets:
        return None
    rows = [{"layer": int(layer), "editor": name, "neuron": int(n)}
            for name, layers in sets.items() for layer, neurons in layers.items() for n in neurons]
    return pd.DataFrame(rows).sort_values(["layer", "editor", "neuron"], ignore_index=True) if rows else None


def trained_neurons_panel(entry: dict, index: int, n_layers: int, model_spec: str) -> None:
    """Beside the before/after table of a MEMLA edit: the neurons its LSEs and LIE trained, per layer; a row
    of the table opens the atlas drill-down of that neuron."""
    table = trained_neurons_table(entry)
    if table is None:
        return
    st.markdown("**The neurons this MEMLA edit trained** (value vectors its masked editors changed; memla "
                "Eq. 5-7) · select a row for the atlas drill-down")
    fig = fact_figures.trained_neurons(table, n_layers)
    left, right = st.columns([3, 2])
    left.plotly_chart(fig, width="stretch", key=f"el-memla-{entry['id']}")
    event = right.dataframe(table, hide_index=True, width="stretch", height=340, on_select="rerun",
                            selection_mode="single-row", key=f"el-memla-rows-{entry['id']}")
    downloads(fig, f"memla_neurons_{entry['id'][:8]}", table, key=f"el-memla-dl-{entry['id']}")
    picked = [i for i in (event.selection.rows if event is not None else []) if i < len(table)]
    if picked:
        row = table.iloc[picked[0]]
        languages = [k for k in entry["request"]["facts"]] if row["editor"] == "independent" else [row["editor"]]
        neuron_drilldown(model_spec, current_corpus_spec(), languages, int(row["layer"]), int(row["neuron"]),
                         key=f"el-memla-drill-{index}")


def patch_panel(entry: dict, index: int, entries: list[dict], folder: Path, wb: Workbench,
                model_spec: str) -> None:
    """Beside the before/after table of a Transformer-Patcher / MPN edit: each patch neuron's activation on
    the edit question in every language of the fact (does it fire in zh, de, ...?), read with the session's
    earlier edits in place; cached per stack of edits."""
    if not entry.get("summary", {}).get("added_neurons"):
        return
    cache = st.session_state.setdefault("el_patch", {})
    key = (model_spec, tuple(e["id"] for e in entries[:index + 1]))
    if key not in cache:
        with st.spinner("Reading the patch neurons' activations..."):
            edits = [load_edit(folder, e["id"]) for e in entries[:index + 1]]
            request = EditRequest.from_dict(entry["request"])
            with Edit.compose(*edits[:-1]).applied(wb) if index else contextlib.nullcontext():
                cache[key] = patch_activation_table(wb, edits[-1], request)
    rows = pd.DataFrame(cache[key])
    records = [r for r in entry["details"]["meta"].get("mpn_edits", []) if isinstance(r, dict) and r.get("added")]
    memory_max = max((float(r["memory_activation_max"]) for r in records), default=None)
    st.markdown(f"**Patch neurons of this edit** ({entry['summary']['added_neurons']} added to layer(s) "
                f"{', '.join(map(str, entry['summary']['added_neuron_layers']))}; numbered after the layer's own "
                "neurons) · does the patch fire on the question in each language?")
    fig = fact_figures.patch_activations(rows, memory_max)
    left, right = st.columns([3, 2])
    left.plotly_chart(fig, width="stretch", key=f"el-patch-{entry['id']}")
    event = right.dataframe(rows.drop(columns=["question"]).round(3), hide_index=True, width="stretch",
                            height=340, key=f"el-patch-rows-{entry['id']}", on_select="rerun",
                            selection_mode="single-row")
    st.caption("a_p = σ(q·k_p + b_p) (mpn Eq. 7) with q the FFN input: bars at the question's last token (which "
               "predicts the answer), diamonds the largest over its tokens. Above the dashed line the patch fires "
               "more than on any text of its memory set (unrelated inputs it was trained to stay silent on).")
    downloads(fig, f"patch_activations_{entry['id'][:8]}", rows, key=f"el-patch-dl-{entry['id']}")
    picked = [i for i in (event.selection.rows if event is not None else []) if i < len(rows)]
    if picked:
        patch_drilldown_panel(entry, index, entries, folder, wb, rows.iloc[picked[0]]["patch"],
                              list(rows["patch"].drop_duplicates()))


def patch_drilldown_panel(entry: dict, index: int, entries: list[dict], folder: Path, wb: Workbench,
                          patch: str, patches: list[str]) -> None:
    """The atlas drill-down of a patch neuron, as an extra neuron of its layer: the corpus statements it fires
    on most per language, and what its value vector promotes. Cached per stack of edits and patch."""
    from data import load_corpus

    number = patches.index(patch)
    languages = list(entry["request"]["facts"])
    cache = st.session_state.setdefault("el_patch_drill", {})
    key = (tuple(e["id"] for e in entries[:index + 1]), number, current_corpus_spec(), tuple(languages))
    if key not in cache:
        with st.spinner(f"Reading {patch} over the corpus..."):
            edits = [load_edit(folder, e["id"]) for e in entries[:index + 1]]
            corpus = load_corpus(current_corpus_spec(), languages=languages)
            with Edit.compose(*edits[:-1]).applied(wb) if index else contextlib.nullcontext():
                cache[key] = patch_drilldown(wb, corpus, edits[-1], number, languages)
    top, tokens = cache[key]
    layer = int(entry["summary"]["added_neuron_layers"][0])
    neuron = int(patch.rsplit("neuron ", 1)[-1].rstrip(")"))
    fig = figures.neuron_drilldown(top, tokens, layer, neuron,
                                   title=f"Patch neuron L{layer}.{neuron}: the corpus statements it fires on, and "
                                         "the tokens its value promotes")
    st.plotly_chart(fig, width="stretch", key=f"el-patch-drill-{entry['id']}")
    downloads(fig, f"patch_neuron_L{layer}_{neuron}", top, key=f"el-patch-drill-dl-{entry['id']}")


# ========================================================================= page

with user_errors():
    model_spec = current_model_spec()
    with st.spinner("Loading the model..."):
        wb = workbench(model_spec)
    folder = session_folder()
    all_entries: list[dict] = st.session_state.setdefault("el_edits", [])
    entries = [e for e in all_entries if e["model"] == model_spec]

    st.subheader("1 · The fact")
    request: EditRequest | None = None
    typed_raw = None
    with user_errors():
        request, typed_raw = edit_fact("el", lambda: corpus_rows(current_corpus_spec()))

    st.subheader("2 · The editor")
    names = available_editors()
    names = (["lu-lafns"] if "lu-lafns" in names else []) + [n for n in names if n != "lu-lafns"]
    c1, c2 = st.columns([1, 3])
    editor_name = c1.selectbox("Editor", names, key="el-editor")
    hp_key = f"el-hp-{editor_name}-{model_spec}"
    reset = c1.button("Reset to preset", key="el-hp-reset", help="Start again from the preset for this model")
    hp_text = hparams_box("el-hp", hp_key, editor_name, wb, reset, "Hyper-parameters", place=c2, height=220,
                          problem=lambda message: st.error(message, icon=ERROR_ICON))

    b = st.columns([1, 1, 1, 3])
    apply = b[0].button("Apply edit", type="primary", key="el-apply", disabled=not editor_name)
    revert = b[1].button("Revert", key="el-revert", disabled=not entries,
                         help="Remove the last edit applied in this session")
    revert_all = b[2].button("Revert all", key="el-revert-all", disabled=not entries)

    if (revert and entries) or revert_all:
        removed = entries if revert_all else entries[-1:]
        for entry in removed:
            all_entries.remove(entry)
            remove_edit(folder, entry["id"])
        st.session_state["el_flash"] = ("info", f"Reverted {len(removed)} edit(s).")
        st.rerun()                                  # redraw the buttons for the new list
    if apply:
        with user_errors():
            if typed_raw is not None:
                request = edit_request_from_boxes(typed_raw)
            if request is None:
                raise InputError("Choose a fact to edit first (a record and at least one language).")
            hp = hparams_from_text(editor_name, hp_text, wb)
            editor = get_editor(editor_name, hp)
            checked = request.validate(wb, editor.needs_subject)
            edit, seconds = compute_with_progress(
                editor, wb, checked, f"Computing the {editor_name} edit of {', '.join(checked.languages)}")
            edit_id = save_edit(folder, edit)
            all_entries.append(dict(id=edit_id, editor=editor_name, model=model_spec, request=checked.to_dict(),
                                    case_id=checked.case_id, seconds=seconds, summary=edit.summary(),
                                    details=plain_details(edit)))
            if edit.is_empty():
                st.session_state["el_flash"] = (
                    "warning", f"{editor_name} computed an empty edit (nothing to change with these "
                               "hyper-parameters); it is kept in the list but changes nothing.")
            else:
                st.session_state["el_flash"] = ("success", f"Applied the {editor_name} edit ({seconds:.1f} s).")
            st.rerun()                              # redraw the buttons (Revert) for the new list
    if flash := st.session_state.pop("el_flash", None):
        kind, text = flash
        getattr(st, kind)(text)
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
    after = after_numbers(wb, model_spec, shown_request, entries, folder, before)
    table = comparison_table(shown_request, before["rows"], after)
    st.caption("Answers are greedy and exactly as long as the target (in tokens), as in the evaluation. "
               + P_TARGET_HELP + " It is measured on the edit question and its paraphrases (“–” on the "
               "locality and portability rows). Locality rows should keep their answer; changed answers are "
               "highlighted.")
    # rows tall enough for two or three lines: long questions and answers wrap instead of being cut off
    st.dataframe(styled(table), hide_index=True, width="stretch", key="el-table", row_height=66, placeholder="–",
                 height=min(38 + 66 * len(table), 760),
                 column_config={c: v for c, v in COLUMN_HELP.items() if c in table.columns})
    fig = fact_figures.edit_probability_bars(table[table["probe"] == "edit"],
                                        f"P(new target) before vs after ({len(entries)} edit(s) applied)")
    st.plotly_chart(fig, width="stretch", key="el-bars")
    downloads(fig, f"edit_lab_{entries[shown]['editor']}_{len(entries)}_edits", table)
    trained_neurons_panel(entries[shown], shown, wb.n_layers, model_spec)
    with user_errors():
        patch_panel(entries[shown], shown, entries, folder, wb, model_spec)
    in_context_panel(shown_request, st.session_state.get("el_reads", {}).get(
        (model_spec, request_key(shown_request.to_dict()), tuple(e["id"] for e in entries)), []))
    for i, entry in enumerate(entries):
        with st.expander(f"Edit {i + 1}: {entry['editor']} · {entry['case_id'] or '–'} · summary and download",
                         expanded=False):
            edit_details(entry, folder)
