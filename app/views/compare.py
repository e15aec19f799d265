"""Compare: every editor side by side on one fact in many languages, and the transfer matrices.

One fact (a data-set record, a corpus fact or a typed fact) in N languages, any set of editors with
their presets (editable). The editors run one after another with their progress shown; each edit is
computed once per model, editor, hyper-parameters and request and kept on disk by
:mod:`editors.compare`, so a rerun, a page switch or a second browser session reads it back. The
session keeps only the request (plain data); nothing here holds a tensor, and no edit stays applied
outside the backend's own ``with edit.applied(wb):`` calls (Decision 4).
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from analysis import fact_figures
from analysis.errors import InputError
from analysis.run_figures import transfer_heatmap
from app.forms import edit_request_from_boxes, hparams_from_text, language_name
from app.state import ERROR_ICON, corpus_rows, current_corpus_spec, current_model_spec, kept, progress_bar, \
    user_errors, workbench
from app.widgets import downloads, edit_fact, hparams_box
from editors import compare as cmp
from editors.base import available_editors
from editors.requests import EditRequest

st.title("Compare editors")
st.caption("Edit one fact with several editors, each on the unedited model, and see per language which probe "
           "each one gets right: the edit question, its paraphrases (generality), unrelated questions whose "
           "answer must not change (locality) and questions that follow from the new fact (portability). Each "
           "edit is computed once and kept on disk for this model and request: running it again, leaving the "
           "page or opening it in another browser costs nothing.")

DEFAULT_EDITORS = ("lu-lafns", "memla", "langedit", "mpn")
METRICS = {"top1": "top-1 accuracy of the new target", "p_new": "P(new target)", "f1": "token F1 of the answer",
           "em": "exact match of the answer"}
SUCCESS_HELP = ("Success is the token F1 of the answer (greedy, as long as the expected answer in tokens) "
                "against the new target (edit and paraphrases), the portability answer, or, for locality, the "
                "unedited model's answer (1 = kept).")


def hparams_boxes(names: list[str], wb, model_spec: str) -> dict[str, str]:
    """A JSON box per chosen editor, starting from its preset for this model (app.widgets.hparams_box)."""
    out = {}
    for name in names:
        key = f"cmp-hp-{name}-{model_spec}"
        with st.expander(f"{name} · hyper-parameters", expanded=False):
            reset = st.button("Reset to preset", key=f"{key}-reset")
            out[name] = hparams_box("cmp-hp", key, name, wb, reset, f"{name} hyper-parameters")
    return out


def run_comparison(wb, job: dict[str, Any]) -> cmp.Comparison:
    """The comparison of ``job`` (computed, or read back from the disk cache) under a progress bar, with a
    line per editor saying whether it is waiting, running or done and in how many seconds."""
    request = EditRequest.from_dict(job["request"])
    methods = job["methods"]
    lines = {m: st.empty() for m in methods}
    for m, line in lines.items():
        line.caption(f":material/hourglass_empty: {m}: waiting")
    order = list(methods)

    def done(run: cmp.EditorRun) -> None:
        if run.error:
            lines[run.method].caption(f":material/error: {run.method}: {run.error}")
        else:
            how = "read back from the cache" if run.cached else "computed"
            lines[run.method].caption(f":material/check_circle: {run.method}: {how} "
                                      f"({run.seconds:.1f} s to compute)")
        following = order.index(run.method) + 1
        if following < len(order):
            lines[order[following]].caption(f":material/progress_activity: {order[following]}: running")

    lines[order[0]].caption(f":material/progress_activity: {order[0]}: running")
    with progress_bar(f"Comparing {len(methods)} editor(s)") as update:
        result = cmp.compare(wb, request, methods, job["test_languages"], progress=update, on_result=done)
    for line in lines.values():
        line.empty()
    return result


def styled_grid(grid: pd.DataFrame, methods: list[str]):
    """The grid with each editor's answer cell coloured by its success (red 0 → green 1)."""
    def colour(value: Any) -> str:
        if value is None or pd.isna(value):
            return ""
        v = min(max(float(value), 0.0), 1.0)
        red, green = int(230 - 120 * v), int(120 + 100 * v)
        return f"background-color: rgba({red}, {green}, 110, 0.35)"

    shown = grid.drop(columns=[f"{m} · success" for m in methods])
    for m in methods:
        # As text: st.dataframe draws a missing value as "None" whatever the Styler's format says, and locality
        # and portability rows have no P(new).
        shown[f"{m} · P(new)"] = ["–" if v is None or pd.isna(v) else f"{v:.3f}" for v in shown[f"{m} · P(new)"]]
    styler = shown.style
    for m in methods:
        success = grid[f"{m} · success"]
        styler = styler.apply(lambda column, s=success: [colour(v) for v in s], subset=[f"{m} · answer"])
    return styler


def results(wb, job: dict[str, Any], comparison: cmp.Comparison) -> None:
    methods = ["unedited"] + [r.method for r in comparison.runs if not r.error]
    st.subheader("4 · Results")
    st.markdown("**Seconds per edit** (the time to compute it the first time; read back from disk since)")
    st.dataframe(cmp.timing_table(comparison), hide_index=True, width="stretch", key="cmp-timing")
    for r in comparison.runs:
        if r.error:
            st.error(f"{r.method} could not edit this fact: {r.error}", icon=ERROR_ICON)
    grid = cmp.probe_grid(comparison)
    if grid.empty:
        return
    st.markdown("**Every probe, every editor** · answer cells coloured by success (red 0 → green 1)")
    st.caption(SUCCESS_HELP + " P(new) is the probability of the whole new target after the question, under "
               "teacher forcing (edit and paraphrase rows).")
    language = st.multiselect("Show languages", list(comparison.test_languages),
                              default=list(comparison.test_languages), key="cmp-grid-languages",
                              format_func=language_name)
    part = grid[grid["language"].isin(language)].reset_index(drop=True)
    st.dataframe(styled_grid(part, methods), hide_index=True, width="stretch", key="cmp-grid", row_height=56,
                 height=min(40 + 56 * max(len(part), 1), 800))
    summary = cmp.summary_table(comparison)
    fig = fact_figures.compare_summary(summary)
    st.plotly_chart(fig, width="stretch", key="cmp-summary")
    st.caption("Bars: the mean success of each editor's probes of one kind in one language (" + SUCCESS_HELP + ")")
    stem = f"compare_{comparison.request.case_id or 'fact'}_{'-'.join(comparison.test_languages)}"
    c = st.columns([2, 5])
    c[0].download_button("Grid (CSV)", grid.to_csv(index=False).encode(), f"{stem}_grid.csv", "text/csv",
                         key="cmp-grid-csv", on_click="ignore", icon=":material/download:")
    c[1].download_button(f"Every edit ({len(comparison.runs)} editor(s), zip)", cmp.edits_zip(comparison.runs),
                         f"{stem}_edits.zip", "application/zip", key="cmp-edits-zip", on_click="ignore",
                         icon=":material/download:")
    downloads(fig, f"{stem}_summary", summary, key="cmp-summary-dl")


def transfer_section(wb, job: dict[str, Any]) -> None:
    st.subheader("5 · Transfer matrices")
    request = EditRequest.from_dict(job["request"])
    n = len(request.languages)
    st.caption(f"Each editor edits the fact in each language alone, then in all {n} together"
               if n > 1 else "With one language, the matrix is that language's own cell; add languages to see "
                             "transfer.")
    wanted = st.session_state.get("cmp_transfer") == job
    if st.button(f"Compute the transfer matrices ({len(job['methods'])} editor(s) × "
                 f"{n + (1 if n > 1 else 0)} edit(s); edits already made are read back)", key="cmp-transfer-run"):
        st.session_state["cmp_transfer"] = job
        wanted = True
    if not wanted:
        return
    with progress_bar("Transfer matrices") as update:
        found = cmp.transfer_matrix_runs(wb, request, job["methods"], progress=update)
    metric = kept(st.radio, "Cell value", list(METRICS), key="cmp-transfer-metric", default="top1",
                  format_func=lambda m: METRICS[m], horizontal=True)
    kinds = kept(st.multiselect, "Probes", ["reliability", "generality"], key="cmp-transfer-kinds",
                 default=["reliability"])
    if not kinds:
        st.info("Choose at least one kind of probe.")
        return
    columns = st.columns(2)
    for i, (method, runs) in enumerate(found.items()):
        errors = {label: run for label, run in runs.items() if isinstance(run, str)}
        with columns[i % 2]:
            for label, message in errors.items():
                st.warning(f"{method} editing {label}: {message}")
            matrix = cmp.transfer_matrix(runs, metric, kinds)
            if matrix.empty:
                continue
            fig = transfer_heatmap(matrix, f"{method}: edit language × test language", METRICS[metric])
            st.plotly_chart(fig, width="stretch", key=f"cmp-transfer-{method}")
            downloads(fig, f"transfer_{method}_{metric}", matrix.reset_index(), key=f"cmp-transfer-dl-{method}",
                      narrow=True)


def why_section(wb, job: dict[str, Any], comparison: cmp.Comparison) -> None:
    """For one editor's edit: where its weight falls among the fact's agnostic and specific neurons."""
    from editors import overlap as ov

    st.subheader("6 · Why did it transfer?")
    st.caption("The neurons the edit touches (value vectors a weight delta changes, weighted by their squared "
               "norm; LU-LAFNs' patched neurons D_G; MPN's added neurons), set against this fact's neurons in "
               "these languages in the unedited model: language-agnostic (factual in every language, lu-lafns "
               "Eq. 4-6; or IG knowledge neurons shared by every language, memla Eq. 3-4) and language-specific "
               "(in one language only). Weight on agnostic neurons is weight every language's question reaches.")
    runs = [r for r in comparison.runs if not r.error]
    if not runs:
        return
    c = st.columns([2, 1, 1, 1])
    method = kept(c[0].selectbox, "Edit of", [r.method for r in runs], key="cmp-why-editor",
                  default=runs[0].method)
    beta = float(kept(c[1].number_input, "β (lu-lafns Eq. 5)", key="cmp-why-beta", default=0.5, min_value=0.0,
                      max_value=0.99, step=0.05, help="A neuron is factual in a language when it fires on more "
                                                      "than β × the count of the layer's most frequent neuron."))
    top_share = float(kept(c[2].number_input, "Top neurons carry", key="cmp-why-top", default=0.9, min_value=0.05,
                           max_value=1.0, step=0.05, help="Per layer, the fewest neurons carrying this share of "
                                                          "the edit's weight there are its top neurons."))
    ig = kept(c[3].checkbox, "Also IG neurons (slower)", key="cmp-why-ig", default=False)
    run = next(r for r in runs if r.method == method)
    with st.spinner("Reading the edit's neurons and the fact's neurons..."):
        touched = ov.cached_edit_neurons(wb, run.folder)      # kept beside the cached edit: once per edit
        tables = ov.edit_overlap(wb, touched, comparison.request, beta=beta, ig=ig, top_share=top_share)
    table = pd.concat(tables.values(), ignore_index=True)
    if table.empty:
        st.info(f"The {method} edit touches no FFN neuron (an in-context edit changes the prompt, not the model), "
                "so its transfer is the model reading the new fact in context.")
        return
    fig = fact_figures.edit_overlap_by_layer(table, f"{method}: where the edit's weight falls, per layer")
    st.plotly_chart(fig, width="stretch", key="cmp-why-figure")
    summary = pd.concat([ov.overlap_summary(t).assign(source=s) for s, t in tables.items()], ignore_index=True)
    summary["weight share"] = (100 * summary["weight share"]).round(1)
    success = cmp.summary_table(comparison)
    reached = success[(success["method"] == method) & (success["kind"] == "reliability")]
    left, right = st.columns([3, 2])
    left.dataframe(summary.rename(columns={"weight share": "weight share %"}), hide_index=True, width="stretch",
                   key="cmp-why-summary")
    right.markdown("**Reliability of this edit per language** (success %)")
    right.dataframe(reached[["language", "success"]].round(1), hide_index=True, width="stretch", key="cmp-why-rel")
    downloads(fig, f"why_{method}", table, key="cmp-why-dl")


# =========================================================================== page

with user_errors():
    model_spec = current_model_spec()
    with st.spinner("Loading the model..."):
        wb = workbench(model_spec)

    st.subheader("1 · The fact")
    request: EditRequest | None = None
    typed_raw = None
    with user_errors():
        request, typed_raw = edit_fact("cmp", lambda: corpus_rows(current_corpus_spec()), default=("en", "zh", "de"))

    st.subheader("2 · The editors")
    names = available_editors()
    chosen = kept(st.multiselect, "Editors", names, key="cmp-editors",
                  default=[n for n in DEFAULT_EDITORS if n in names])
    st.caption("Each editor starts from its preset for this model; open its box to change a value.")
    boxes = hparams_boxes(list(chosen), wb, model_spec)

    st.subheader("3 · Run")
    if st.button("Run comparison", type="primary", key="cmp-run", disabled=not chosen):
        with user_errors():
            if typed_raw is not None:
                request = edit_request_from_boxes(typed_raw)
            if request is None:
                raise InputError("Choose a fact first (a record and at least one language).")
            methods = {name: hparams_from_text(name, boxes[name], wb).to_dict() for name in chosen}
            checked = request.validate(wb, need_subject=False)
            st.session_state["cmp_job"] = {"model": model_spec, "request": checked.to_dict(), "methods": methods,
                                           "test_languages": list(checked.languages)}
    job = st.session_state.get("cmp_job")
    if not job or job.get("model") != model_spec:
        st.info("Choose a fact and the editors, then press **Run comparison**.")
        st.stop()
    request_shown = EditRequest.from_dict(job["request"])
    first = next(iter(request_shown.facts.values()))
    st.caption(f"Comparing {', '.join(job['methods'])} on “{first.prompt} → {first.target_new}” in "
               f"{', '.join(language_name(lang) for lang in request_shown.languages)}.")
    comparison = run_comparison(wb, job)
    results(wb, job, comparison)
    with user_errors():
        transfer_section(wb, job)
    with user_errors():
        why_section(wb, job, comparison)
