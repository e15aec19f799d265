"""Runs: open any `neuroglot evaluate`, `neuroglot sequential` or `neuroglot overlap` run folder and browse it.

An evaluation shows its config, the transfer heatmaps (edit languages × test languages per method), the
summary figures, every probe with filters (method, edit languages, test language, metric, failures only) and
its tables; a sequential run shows the figures of the Sequential editing page, its tables, every probe after
each step (the teacher-forced prediction before and after, with filters) and the averaged scores of every
step; an overlap run shows Spearman's ρ per editor, the scatter of agnostic share against transfer and every
point (a selected point shows its record under every editor). Reading is cached by folder and the files'
modification times, so filter clicks are instant and a folder still being written is read again when it grows.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis import fact_figures
from analysis import run_figures as rf
from analysis import stream_figures as sf
from analysis.errors import InputError
from app import run_browser as rb
from app.state import kept, user_errors
from app.widgets import downloads

st.title("Runs")
st.caption("Open a run folder written by `neuroglot evaluate`, `neuroglot sequential` (or by the Sequential "
           "editing page) or `neuroglot overlap`: its configuration, figures and tables, and every probe with the "
           "question, the expected answer and the model's answers before and after the edit (overlap runs: every "
           "record's overlap with the fact's agnostic neurons and its transfer). `neuroglot runs show DIR` prints "
           "the same tables and probes in a terminal.")

KIND_LABELS = {rb.EVALUATE: "evaluation", rb.SEQUENTIAL: "sequential", rb.OVERLAP: "overlap"}


# ------------------------------------------------------------------ cached reading (pure: no st.* inside)


@st.cache_data(show_spinner=False, max_entries=16)
def evaluate_data(folder: str, stamp: float) -> dict:
    """The evaluation in ``folder`` (config, rows, report) and its probe table; keyed by ``stamp`` as well."""
    view = rb.read_evaluate(folder)
    return {"view": view, "probes": rb.probe_table(view.frame)}


@st.cache_data(show_spinner=False, max_entries=64)
def evaluate_figures_data(folder: str, stamp: float, kind: str, column: str) -> dict:
    """Per method transfer matrices, the per-method and per-language scores of one metric."""
    view = evaluate_data(folder, stamp)["view"]
    return {"matrices": rb.transfer_matrices(view, kind, column), "methods": rb.method_scores(view, column),
            "languages": rb.language_scores(view, kind, column)}


@st.cache_data(show_spinner=False, max_entries=16)
def sequential_data(folder: str, stamp: float) -> dict:
    return rb.read_sequential(folder)


@st.cache_data(show_spinner=False, max_entries=16)
def overlap_data(folder: str, stamp: float) -> rb.OverlapView:
    return rb.read_overlap(folder)


@st.cache_data(show_spinner=False, max_entries=4)
def found_folders(roots: tuple[str, ...], when: int) -> list[tuple[str, str]]:
    """Run folders under ``roots``; ``when`` (a coarse clock) lets a new folder appear within seconds."""
    return rb.find_run_folders(roots)


# ------------------------------------------------------------------ picking a folder


def pick_folder() -> None:
    import time

    found = found_folders(tuple(str(r) for r in rb.run_roots()), int(time.time() // 10))
    labels = {path: f"{path}  ({KIND_LABELS[kind]})" for path, kind in found}
    c1, c2 = st.columns([3, 1])
    choice = c1.selectbox("Run folders under runs/" + (" and NEUROGLOT_RUNS" if len(rb.run_roots()) > 1 else ""),
                          list(labels), index=None, key="runs-found", format_func=labels.get,
                          placeholder="none found" if not found else "choose a run")
    typed = kept(c1.text_input, "…or a folder path", key="runs-typed", default="",
                 placeholder="runs/my-evaluation or /full/path/to/a/run")
    c2.write("")
    if c2.button("Open the run", key="runs-open", type="primary"):
        folder = typed.strip() or choice
        if not folder:
            raise InputError("Choose a run folder from the list or type its path.")
        rb.run_kind(folder)                      # not a run folder: the error box says what it is instead
        st.session_state["runs-folder"] = folder


# ------------------------------------------------------------------ an evaluation run


def metric_pickers(view: rb.EvaluateView, key: str) -> tuple[str, str]:
    kinds = rb.kinds_of(view.frame)
    columns = rb.score_columns(view.frame)
    if not kinds or not columns:
        raise InputError(f"{view.folder} has no scored probes yet.")
    c1, c2 = st.columns([3, 2])
    kind = kept(c1.radio, "Metric", kinds, key=f"{key}-kind", default=kinds[0], horizontal=True,
                format_func=str.capitalize)
    column = kept(c2.radio, "Score", columns, key=f"{key}-score", default=columns[0], horizontal=True,
                  format_func=rb.SCORE_TITLES.get)
    return kind, column


def show_config(view: rb.EvaluateView) -> None:
    cfg = view.config
    sets = ", ".join("+".join(s) for s in cfg.get("edit_sets", []))
    st.markdown(
        f"**{view.folder}** · evaluation · model `{cfg.get('model') or '?'}` · data set `{cfg.get('dataset', '?')}` "
        f"(n {cfg.get('n', '?')}, offset {cfg.get('offset', 0)})  \n"
        f"methods: {', '.join(cfg.get('methods', [])) or '–'} · edit sets: {sets or '–'} · test languages: "
        f"{', '.join(view.test_languages) or '–'}  \n"
        "records finished: " + (", ".join(f"{m} {n}" for m, n in view.rows_per_method.items()) or "none"))
    if cfg.get("hparams"):
        with st.expander("Hyper-parameters over the presets"):
            st.json(cfg["hparams"])
    if not view.finished and not view.frame.empty:
        st.info("This run has no tables.md: it is still being written (or was interrupted). What is shown is "
                "computed from the records finished so far; open it again later for more.",
                icon=":material/hourglass_top:")


def show_heatmaps(folder: str, stamp: float, view: rb.EvaluateView, kind: str, column: str) -> None:
    data = evaluate_figures_data(folder, stamp, kind, column)
    metric = f"{kind.capitalize()} {rb.SCORE_TITLES[column]}"
    st.subheader("Transfer: edit languages × test languages")
    if not data["matrices"]:
        st.info("Only the unedited model has rows so far: no edit to show.")
    else:
        st.caption("Rows: the languages edited together; columns: the language the probe is asked in; x-avg: the "
                   "mean over test languages outside the edit (memla's transferability). Colours run from 0 to 100 "
                   "in every heatmap.")
        cols = st.columns(2)
        for i, (method, matrix) in enumerate(data["matrices"].items()):
            with cols[i % 2]:
                fig = rf.transfer_heatmap(matrix, f"{method}: {metric}", metric)
                st.plotly_chart(fig, width="stretch", key=f"runs-heat-{method}")
                downloads(fig, f"transfer_{method}_{kind}_{column}", matrix, key=f"runs-heat-{method}")
    st.subheader("Summary")
    c1, c2 = st.columns(2)
    with c1:
        fig = rf.method_scores_bars(data["methods"], f"Every metric, editing {view.main_edit_set} "
                                                     "(mean over test languages)", rb.SCORE_TITLES[column])
        st.plotly_chart(fig, width="stretch", key="runs-methods")
        downloads(fig, f"methods_{column}", data["methods"], key="runs-methods")
    with c2:
        fig = rf.language_scores_bars(data["languages"], f"{metric} per test language, editing {view.main_edit_set}",
                                      metric)
        st.plotly_chart(fig, width="stretch", key="runs-languages")
        downloads(fig, f"languages_{kind}_{column}", data["languages"], key="runs-languages")


PROBE_CONFIG = {
    "method": st.column_config.TextColumn("method", width="small"),
    "edit_languages": st.column_config.TextColumn("edit languages", width="small"),
    "record": st.column_config.TextColumn("record", width="small"),
    "language": st.column_config.TextColumn("language", width="small"),
    "kind": st.column_config.TextColumn("kind", width="small"),
    "question": st.column_config.TextColumn("question", width="medium"),
    "expected": st.column_config.TextColumn("expected"),
    "before": st.column_config.TextColumn("before", help="The unedited model's answer."),
    "after": st.column_config.TextColumn("after", help="The edited model's answer."),
    "f1": st.column_config.NumberColumn("F1", format="%.2f"),
    "em": st.column_config.NumberColumn("EM", format="%.0f"),
    "top1": st.column_config.NumberColumn("top-1", format="%.2f"),
    "failed": st.column_config.CheckboxColumn("failed", help="EM below 1: not the new answer, or (locality) "
                                                             "no longer the model's own answer."),
}


def show_probes(probes: pd.DataFrame) -> None:
    st.subheader("Probes")
    if probes.empty:
        st.info("No probe rows yet.")
        return
    c1, c2, c3, c4 = st.columns(4)
    methods = kept(c1.multiselect, "Method", list(dict.fromkeys(probes["method"])), key="runs-f-method", default=[],
                   placeholder="all")
    sets = kept(c2.multiselect, "Edit languages", list(dict.fromkeys(probes["edit_languages"])), key="runs-f-edit",
                default=[], placeholder="all")
    langs = kept(c3.multiselect, "Test language", list(dict.fromkeys(probes["language"])), key="runs-f-lang",
                 default=[], placeholder="all")
    kinds = kept(c4.multiselect, "Metric", list(dict.fromkeys(probes["kind"])), key="runs-f-kind", default=[],
                 placeholder="all")
    failures = kept(st.toggle, "Failures only", key="runs-f-failures", default=False,
                    help="Probes where the edited model is wrong (EM < 1), or where a locality answer changed.")
    shown = rb.filter_probes(probes, methods, sets, langs, kinds, failures).reset_index(drop=True)
    st.caption(f"{len(shown):,} of {len(probes):,} probes · {int(shown['failed'].sum()):,} failed · select a row "
               "to see its record's probes")
    filters = "|".join(["+".join(methods), "+".join(sets), "+".join(langs), "+".join(kinds), str(failures)])
    event = st.dataframe(shown, hide_index=True, width="stretch", height=360, column_config=PROBE_CONFIG,
                         on_select="rerun", selection_mode="single-row", key=f"runs-probes-{zlib.crc32(filters.encode())}")
    st.download_button("CSV of these probes", shown.to_csv(index=False).encode(), "probes.csv", "text/csv",
                       key="runs-probes-csv", on_click="ignore", icon=":material/download:")
    picked = [i for i in (event.selection.rows if event is not None else []) if i < len(shown)]
    if picked:
        row = shown.iloc[picked[0]]
        st.markdown(f"**Record {row['record']}** · {row['method']} · edited in {row['edit_languages']}")
        mine = rb.record_probes(probes, row["record"], row["method"], row["edit_languages"])
        st.dataframe(mine.drop(columns=["method", "edit_languages", "record"]), hide_index=True, width="stretch",
                     column_config=PROBE_CONFIG, key="runs-record")
        with st.expander("The same record under every method and edit set"):
            st.dataframe(rb.record_probes(probes, row["record"]).drop(columns=["record"]), hide_index=True,
                         width="stretch", column_config=PROBE_CONFIG, key="runs-record-all")


def show_evaluate(folder: str, stamp: float) -> None:
    data = evaluate_data(folder, stamp)
    view, probes = data["view"], data["probes"]
    show_config(view)
    if view.frame.empty:
        st.info(f"{folder} holds no finished record yet: the evaluation has just started, or stopped before its "
                "first record.")
        return
    kind, column = metric_pickers(view, "runs-eval")
    show_heatmaps(folder, stamp, view, kind, column)
    show_probes(probes)
    st.subheader("Tables")
    with st.expander("Every table of the run (tables.md)", expanded=False):
        st.markdown(view.report)
    st.download_button("tables.md", view.report.encode(), "tables.md", "text/markdown", key="runs-tables-md",
                       on_click="ignore", icon=":material/download:")


# ------------------------------------------------------------------ a sequential run


SEQ_PROBE_CONFIG = {
    "method": st.column_config.TextColumn("method", width="small"),
    "step": st.column_config.NumberColumn("step", width="small", help="Edits so far: this many batches."),
    "batch": st.column_config.NumberColumn("batch", width="small", help="The step that edited this record."),
    "edited_in": st.column_config.TextColumn("edited in", width="small", help="The batch's edit language."),
    "record": st.column_config.TextColumn("record", width="small"),
    "asked_in": st.column_config.TextColumn("asked in", width="small"),
    "kind": st.column_config.TextColumn("kind", width="small"),
    "question": st.column_config.TextColumn("question", width="medium"),
    "expected": st.column_config.TextColumn("expected"),
    "before": st.column_config.TextColumn("before", help="The unedited model's prediction: the arg-max at each "
                                                         "answer position given the expected answer's earlier "
                                                         "tokens (teacher forced, not a greedy answer)."),
    "after": st.column_config.TextColumn("after", help="The same prediction by the model carrying the edits of "
                                                       "every step so far."),
    "top1_before": st.column_config.NumberColumn("top-1 before", format="%.2f"),
    "top1_after": st.column_config.NumberColumn("top-1 after", format="%.2f"),
    "failed": st.column_config.CheckboxColumn("failed", help="Efficacy, generality: top-1 after below 1. "
                                                             "Specificity: the prediction is no longer the "
                                                             "unedited model's."),
}

SEQ_PROBE_ORDER = ["batch", "edited_in", "record", "asked_in", "kind", "question", "expected", "before", "after",
                   "top1_before", "top1_after", "failed"]


def show_sequential_probes(probes: pd.DataFrame, note: str) -> None:
    st.subheader("Probes after each step")
    if probes.empty:
        if note:
            st.info(note, icon=":material/history:")
        return
    if note:
        st.caption(note)
    c1, c2, c3, c4 = st.columns(4)
    steps = sorted(set(int(x) for x in probes["step"]))
    methods = kept(c1.multiselect, "Method", list(dict.fromkeys(probes["method"])), key="runs-seq-p-method",
                   default=[], placeholder="all")
    step = kept(c2.selectbox, "Step", steps, key="runs-seq-p-step", default=steps[-1],
                help="The model after this many steps (batches); the last measured step first.")
    langs = kept(c3.multiselect, "Asked in", list(dict.fromkeys(probes["asked_in"])), key="runs-seq-p-lang",
                 default=[], placeholder="all")
    kinds = kept(c4.multiselect, "Kind", list(dict.fromkeys(probes["kind"])), key="runs-seq-p-kind", default=[],
                 placeholder="all")
    failures = kept(st.toggle, "Failures only", key="runs-seq-p-failures", default=False,
                    help="Efficacy and generality probes whose top-1 after the step is below 1, and specificity "
                         "probes whose prediction changed.")
    shown = rb.filter_sequential_probes(probes, methods, step, langs, kinds, failures).reset_index(drop=True)
    st.caption(f"{len(shown):,} of {len(probes):,} probes · {int(shown['failed'].sum()):,} failed · step {step}; "
               "before / after: the teacher-forced prediction (the arg-max at each answer position given the "
               "expected answer's earlier tokens, not a greedy answer) of the unedited model and after the step · "
               "select a row to see its record after every step")
    filters = "|".join(["+".join(methods), str(step), "+".join(langs), "+".join(kinds), str(failures)])
    # the step is the filter's and the method often one: the answers come first on screen (the CSV has all)
    order = ["method"] * (shown["method"].nunique() > 1) + SEQ_PROBE_ORDER
    event = st.dataframe(shown, hide_index=True, width="stretch", height=360, column_config=SEQ_PROBE_CONFIG,
                         column_order=order, on_select="rerun", selection_mode="single-row",
                         key=f"runs-seq-probes-{zlib.crc32(filters.encode())}")
    st.download_button("CSV of these probes", shown.to_csv(index=False).encode(), "sequential_probes.csv",
                       "text/csv", key="runs-seq-probes-csv", on_click="ignore", icon=":material/download:")
    picked = [i for i in (event.selection.rows if event is not None else []) if i < len(shown)]
    if picked:
        row = shown.iloc[picked[0]]
        st.markdown(f"**Record {row['record']}** · {row['method']} · edited in {row['edited_in']} at step "
                    f"{row['batch']} · after every step")
        mine = rb.sequential_record_probes(probes, row["method"], row["record"])
        st.dataframe(mine, hide_index=True, width="stretch", column_config=SEQ_PROBE_CONFIG, key="runs-seq-record",
                     column_order=["asked_in", "kind", "step", "after", "top1_after", "failed", "before",
                                   "top1_before", "question", "expected"])


def show_sequential(folder: str, stamp: float) -> None:
    data = sequential_data(folder, stamp)
    cfg = data["info"].get("config", {})
    st.markdown(f"**{folder}** · sequential · {data['info'].get('model', {}).get('name', '?')} · "
                f"{cfg.get('steps')} steps × {cfg.get('batch')} edits ({cfg.get('order')}) · languages "
                f"{', '.join(data['languages'])} · measured steps: "
                + (", ".join(f"{m} {n}/{cfg.get('steps')}" for m, n in data["steps"].items()) or "none"))
    curves = data["curves"]
    if curves.empty:
        st.info(f"{folder} holds no measured step yet: the stream is still starting, or stopped before its first "
                "step.")
        return
    metric = kept(st.radio, "Metric", list(sf.METRIC_TITLES), key="runs-seq-metric", default="efficacy",
                  horizontal=True, format_func=sf.METRIC_TITLES.get)
    fig = sf.curves_figure(curves, metric, data["methods"])
    st.plotly_chart(fig, width="stretch", key="runs-seq-curves")
    downloads(fig, f"sequential_{metric}", curves, key="runs-seq-curves")

    st.subheader("Interference: each batch asked in every language")
    c1, c2 = st.columns(2)
    method = kept(c1.selectbox, "Method", data["methods"], key="runs-seq-method", default=data["methods"][0])
    rel = kept(c2.radio, "Show", ["value", "own step", "unedited"], key="runs-seq-rel", default="value",
               format_func={"value": "after the last step", "own step": "change since the batch's own step",
                            "unedited": "change against the unedited model"}.get)
    labels, langs, matrix = data["matrices"][(method, metric, rel)]
    if labels:
        title = f"{method}: {sf.METRIC_TITLES[metric]}" + {"value": "", "own step": " − right after its own step",
                                                             "unedited": " − unedited model"}[rel]
        heat = sf.interference_figure(labels, langs, matrix, title, diverging=rel != "value")
        st.plotly_chart(heat, width="stretch", key="runs-seq-interference")
        downloads(heat, f"interference_{method}_{metric}", None, key="runs-seq-interference")
    st.subheader("Null space kept per layer")
    st.plotly_chart(sf.nullspace_figure(data["nullspace"]), width="stretch", key="runs-seq-nullspace")

    st.subheader("Tables")
    for name, caption in (("final", "After each method's last measured step (%; ΔPPL: FLORES perplexity change "
                                     "against the unedited model, %):"),
                          ("retention", "The first batch, asked in its own language, after every step:"),
                          ("seconds", "Seconds per batch:")):
        if not data[name].empty:
            st.markdown(caption)
            st.dataframe(data[name].round(2), hide_index=True, width="stretch", key=f"runs-seq-{name}")

    show_sequential_probes(data["probes"], data["probes_note"])

    st.subheader("Scores after every step")
    scores = data["step_scores"]
    c1, c2, c3 = st.columns(3)
    methods = kept(c1.multiselect, "Method", list(dict.fromkeys(scores["method"])), key="runs-seq-f-method",
                   default=[], placeholder="all")
    steps = kept(c2.multiselect, "Step", sorted(set(scores["step"])), key="runs-seq-f-step", default=[],
                 placeholder="all")
    asked = kept(c3.multiselect, "Asked in", list(dict.fromkeys(scores["asked_in"])), key="runs-seq-f-lang",
                 default=[], placeholder="all")
    mask = pd.Series(True, index=scores.index)
    for column, wanted in (("method", methods), ("step", steps), ("asked_in", asked)):
        if wanted:
            mask &= scores[column].isin(wanted)
    shown = scores[mask]
    where = ("each record's probes are in the table above" if not data["probes"].empty
             else "this folder predates per-probe rows")
    st.caption(f"{len(shown):,} of {len(scores):,} rows: every batch edited so far, asked in every language "
               f"(top-1 accuracy %, averaged over the batch's records; {where}). Step 0 is the unedited model.")
    st.dataframe(shown.round(2), hide_index=True, width="stretch", height=320, key="runs-seq-scores")
    st.download_button("CSV of these rows", shown.to_csv(index=False).encode(), "step_scores.csv", "text/csv",
                       key="runs-seq-scores-csv", on_click="ignore", icon=":material/download:")
    if data["report"]:
        with st.expander("Every table of the run (as `neuroglot runs show` prints it)"):
            st.markdown(data["report"])


# ------------------------------------------------------------------ an overlap run


CORRELATION_CONFIG = {
    "editor": st.column_config.TextColumn("editor"),
    "ρ": st.column_config.NumberColumn("Spearman ρ", format="%+.2f", help="Rank correlation of the agnostic share "
                                       "and the transfer over the editor's records (empty: one of them is constant, "
                                       "as MPN's agnostic share, or fewer than 3 records)."),
    "p": st.column_config.NumberColumn("p", format="%.3f", help="Two-sided permutation p value (10,000 shuffles "
                                                                 "of the transfer, seeded)."),
    "records": st.column_config.NumberColumn("records", format="%d"),
    "mean agnostic share (%)": st.column_config.NumberColumn("mean agnostic share", format="%.1f %%"),
    "mean transfer": st.column_config.NumberColumn("mean transfer", format="%+.1f",
                                                   help="Mean top-1 gain in the other languages (points)."),
}

POINT_CONFIG = {
    "record": st.column_config.TextColumn("record", width="small"),
    "method": st.column_config.TextColumn("editor", width="small"),
    **{c: st.column_config.NumberColumn(c, format="percent", help=h) for c, h in (      # 0-1 in points.csv
        ("agnostic share", "Share of the edit's weight on the fact's language-agnostic neurons."),
        ("edit-language share", "On the edit language's specific neurons."),
        ("other-language share", "On the other test languages' specific neurons."),
        ("added share", "On neurons the editor added (MPN's patch)."))},
    "agnostic overlap": st.column_config.NumberColumn("agnostic overlap", format="%d",
                                                      help="The edit's top neurons that are agnostic neurons."),
    "top neurons": st.column_config.NumberColumn("top neurons", format="%d", help="Per layer, the fewest neurons "
                                                 "carrying the top share of the edit's weight, summed."),
    "transfer": st.column_config.NumberColumn("transfer", format="%+.1f", help="Top-1 gain in the other languages "
                                                                              "(points)."),
    "reliability": st.column_config.NumberColumn("reliability", format="%+.1f", help="Top-1 gain in the edit "
                                                                                    "language (points)."),
    "pooled": st.column_config.CheckboxColumn("pooled", help="MPN-style: the other languages were the patch's "
                                                             "parallel training pool."),
    "cached": st.column_config.CheckboxColumn("cached"),
    "seconds": st.column_config.NumberColumn("seconds", format="%.2f"),
    "error": st.column_config.TextColumn("error"),
}


def show_overlap(folder: str, stamp: float) -> None:
    view = overlap_data(folder, stamp)
    st.markdown(f"**{folder}** · overlap · {rb.overlap_header(view)}")
    for _, row in view.errors.iterrows():
        st.warning(f"{row['record']} · {row['method']}: {row['error']}", icon=":material/warning:")
    if view.points.empty:
        st.info(f"{folder} holds no point yet: the run has just started.")
        return

    st.subheader("Spearman's ρ per editor")
    corr = rb.correlation_table(view)
    st.dataframe(corr, hide_index=True, width="stretch", column_config=CORRELATION_CONFIG, key="runs-ov-corr")
    if view.recomputed:
        st.caption("correlations.csv predates the permutation p value: ρ and p are recomputed here from "
                   "points.csv, as `neuroglot overlap` computes them now.")

    methods = kept(st.multiselect, "Editor", view.methods, key="runs-ov-method", default=[], placeholder="all")
    scored = rb.filter_points(view.scored, methods).dropna(subset=["agnostic share", "transfer"])
    st.subheader("Overlap with the fact's agnostic neurons vs transfer")
    st.caption("One point per record and editor. x: the share of the edit's weight (squared norm of its weight "
               "delta per neuron, or of its activation patch) that lies on the fact's language-agnostic neurons "
               f"(lu-lafns Eq. 4-6 over the test languages, β {view.config.get('beta', '?')}), the edit made in "
               f"{view.config.get('edit_language') or 'the edit language'} alone; y: the top-1 gain in the other "
               "test languages (points), how far the edit carried over. MPN-style editors' weight is on the neurons "
               "they add, which are nobody's agnostic neurons: their points sit at 0 % (see added share), so their "
               "ρ is empty. The legend gives each editor's Spearman ρ.")
    if scored.empty:
        st.info("No point to plot for these editors (every one failed, or touched no neuron).")
    else:
        fig = fact_figures.overlap_vs_transfer(scored, view.correlations)
        st.plotly_chart(fig, width="stretch", key="runs-ov-scatter")
        downloads(fig, "overlap_vs_transfer", scored, key="runs-ov-scatter")

    st.subheader("Points")
    shown = rb.filter_points(view.points, methods).reset_index(drop=True)
    st.caption(f"{len(shown):,} of {len(view.points):,} points · {shown['record'].nunique():,} records · "
               f"{int((shown['error'] != '').sum()):,} failed · select a row to see its record under every editor")
    event = st.dataframe(shown, hide_index=True, width="stretch", height=360, column_config=POINT_CONFIG,
                         on_select="rerun", selection_mode="single-row",
                         key=f"runs-ov-points-{zlib.crc32('+'.join(methods).encode())}")
    st.download_button("CSV of these points", shown.to_csv(index=False).encode(), "points.csv", "text/csv",
                       key="runs-ov-points-csv", on_click="ignore", icon=":material/download:")
    picked = [i for i in (event.selection.rows if event is not None else []) if i < len(shown)]
    if picked:
        record = str(shown.iloc[picked[0]]["record"])
        st.markdown(f"**Record {record}** under every editor")
        st.dataframe(rb.record_overlap(view.points, record), width="stretch", key="runs-ov-record")


# ------------------------------------------------------------------ the page


with user_errors():
    pick_folder()

current = st.session_state.get("runs-folder")
if current:
    st.divider()
    with user_errors():
        kind = rb.run_kind(current)               # the folder may have gone or changed since it was opened
        stamp = rb.folder_stamp(current)
        folder = str(Path(current))
        if kind == rb.EVALUATE:
            show_evaluate(folder, stamp)
        elif kind == rb.OVERLAP:
            show_overlap(folder, stamp)
        else:
            show_sequential(folder, stamp)
else:
    st.info("Choose a run folder above, or type its path, and open it.")
