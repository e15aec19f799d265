"""Sequential editing: run or open a multilingual stream (LangEdit, AlphaEdit, MEMIT) and watch it live."""
from __future__ import annotations

import io
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis import stream_figures as sf
from analysis.errors import InputError
from app import forms
from app.state import current_model_spec, kept, user_errors, workbench
from app.widgets import downloads

st.title("Sequential editing")
st.caption("Edit the model batch after batch, one language per batch, and see what later batches do to earlier "
           "ones (papers/langedit.md). Every method gets the same stream of MzsRE records; after every step the "
           "edits so far are asked again in every language, and the model's perplexity on held-out FLORES-200 "
           "text is compared with the unedited model's. A run lives in its folder: leave the page, open a second "
           "browser, or run `neuroglot sequential` on the same folder, and it is read back from there.")

LANGUAGES = ["en", "de", "nl", "es", "fr", "zh", "pt", "ru", "th", "tr", "vi", "cs"]
DEFAULT_DATA = str((Path.cwd() / ".." / "shared" / "data" / "mzsre" / "dev").resolve())
RUNS = Path("runs")


# ------------------------------------------------------------------ background runs (one per folder, all sessions)


@st.cache_resource(show_spinner=False)
def jobs() -> dict:
    """Runs started from the app, by folder: thread, last progress, error. Shared by every session."""
    return {}


def running(folder: str) -> dict | None:
    job = jobs().get(str(Path(folder).resolve()))
    return job if job is not None and job["thread"].is_alive() else None


def start_job(wb, config, methods: list[str], folder: str, hparams: dict) -> None:
    from editors.sequential_run import run_sequential

    key = str(Path(folder).resolve())
    if running(folder):
        raise InputError(f"A stream is already running in {folder}; wait for it or open it below.")
    job = {"progress": ("starting", 0, 0.0, "loading"), "error": None, "started": time.time(), "finished": None}

    def work() -> None:
        try:
            run_sequential(wb, config, methods, folder, hparams=hparams,
                           progress=lambda m, s, f, msg: job.__setitem__("progress", (m, s, f, msg)))
        except Exception as exc:  # noqa: BLE001 - shown on the page, the app keeps running
            job["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, InputError) else str(exc)
        finally:
            job["finished"] = time.time()

    job["thread"] = threading.Thread(target=work, name=f"sequential:{key}", daemon=True)
    jobs()[key] = job
    job["thread"].start()


# ------------------------------------------------------------------ reading a run (pure, cached by the files' times)


def run_stamp(folder: str) -> float:
    p = Path(folder)
    files = [p / "sequential.json", p / "baseline.json", *p.glob("*/steps.jsonl"), *p.glob("*/state/state.json")]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


@st.cache_data(show_spinner=False, max_entries=16)
def read_view(folder: str, stamp: float):
    from editors.sequential_run import (curve_rows, final_rows, interference_matrix, nullspace_rows, read_run,
                                        retention_rows, seconds_rows)

    view = read_run(folder)
    matrices = {}
    for method in view.steps:
        for kind in ("efficacy", "generality", "specificity"):
            for rel in ("value", "own step", "unedited"):
                matrices[(method, kind, rel)] = interference_matrix(view, method, kind, relative_to=rel)
    return {"info": view.info, "languages": view.languages, "methods": list(view.steps),
            "steps": {m: len(r) for m, r in view.steps.items()},
            "curves": pd.DataFrame(curve_rows(view)), "final": pd.DataFrame(final_rows(view)),
            "retention": pd.DataFrame(retention_rows(view)), "nullspace": pd.DataFrame(nullspace_rows(view)),
            "seconds": pd.DataFrame(seconds_rows(view)), "matrices": matrices}


@st.cache_data(show_spinner=False, max_entries=2)
def state_zip(folder: str, method: str, stamp: float) -> bytes:
    """The method's saved state folder as a zip (safetensors + JSON)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted((Path(folder) / method / "state").iterdir()):
            zf.write(path, arcname=f"{method}-state/{path.name}")
    return buffer.getvalue()


def run_folders() -> list[str]:
    return sorted(str(p.parent) for p in RUNS.glob("*/sequential.json")) if RUNS.is_dir() else []


# ------------------------------------------------------------------ the page


def new_run_form() -> None:
    from editors.sequential import available_sequential, get_sequential
    from editors.sequential_run import StreamConfig, check_run_folder, make_stream, over_preset

    with st.form("seq-form"):
        c1, c2, c3 = st.columns(3)
        methods = kept(c1.multiselect, "Methods", available_sequential(), key="seq-methods",
                       default=["langedit", "alphaedit", "memit"])
        languages = kept(c2.multiselect, "Languages (in stream order)", LANGUAGES, key="seq-langs",
                         default=["en", "zh"])
        order = kept(c3.radio, "Order", ["blocks", "interleaved"], key="seq-order", default="blocks", horizontal=True,
                     help="blocks: each language's steps one after the other (as the paper); interleaved: the "
                          "languages take turns.")
        c4, c5, c6, c7 = st.columns(4)
        batch = kept(c4.number_input, "Edits per step", key="seq-batch", default=4, min_value=1, max_value=500)
        steps = kept(c5.number_input, "Steps", key="seq-steps", default=2, min_value=1, max_value=100)
        seed = kept(c6.number_input, "Seed", key="seq-seed", default=0, min_value=0)
        flores = kept(c7.number_input, "FLORES sentences per language", key="seq-flores", default=20, min_value=1,
                      max_value=1000)
        c8, c9, c10 = st.columns([2, 1, 2])
        dataset = kept(c8.text_input, "Data set (MzsRE folder or Bi-ZsRE file)", key="seq-data", default=DEFAULT_DATA)
        records = kept(c9.text_input, "Records", key="seq-records", default="100-149",
                       help="Ranges of record indices the stream may use, e.g. 0-99,150- (empty: all).")
        out = kept(c10.text_input, "Run folder", key="seq-out", default="runs/sequential-app")
        hparams_text = kept(st.text_area, "Hyper-parameters over the presets (JSON, optional)", key="seq-hparams",
                            default="", height=68,
                            placeholder='{"langedit": {"nullspace_threshold": 0.01}}')
        submitted = st.form_submit_button("Run the stream", type="primary")
    if not submitted:
        return
    if not methods:
        raise InputError("Choose at least one method.")
    hparams = forms.method_hparams(hparams_text.strip() or None, list(methods), "Hyper-parameters", "the methods")
    config = StreamConfig(dataset=dataset.strip(), languages=list(languages), batch=int(batch), steps=int(steps),
                          order=order, seed=int(seed), records=records.strip(), flores_sentences=int(flores)).validate()
    make_stream(config)
    if not out.strip():
        raise InputError("Give a run folder.")
    check_run_folder(out.strip(), config, {"spec": current_model_spec()})
    wb = workbench(current_model_spec())          # loaded here (the script's thread), used by the run's thread
    for name in methods:
        get_sequential(name, over_preset(wb, name, hparams.get(name))).hparams_for(wb)   # bad ones: an error box now
    start_job(wb, config, list(methods), out.strip(), hparams)
    st.session_state["seq-folder"] = out.strip()


def open_run_form() -> None:
    found = run_folders()
    c1, c2 = st.columns([3, 1])
    choice = c1.selectbox("Run folders under runs/", found, index=None, key="seq-found",
                          placeholder="none found" if not found else "choose a run")
    typed = c1.text_input("…or another folder", key="seq-typed")
    c2.write("")
    if c2.button("Open the run", key="seq-open"):
        folder = typed.strip() or choice
        if not folder:
            raise InputError("Choose or type a run folder.")
        from editors.sequential_run import is_run_folder

        if not is_run_folder(folder):
            raise InputError(f"{folder} holds no sequential run (no sequential.json).")
        st.session_state["seq-folder"] = folder


def show_progress(folder: str) -> bool:
    """The running job's progress (if any); True while it runs."""
    job = jobs().get(str(Path(folder).resolve()))
    if job is None:
        return False
    if job["thread"].is_alive():
        method, step, fraction, message = job["progress"]
        st.progress(min(max(fraction, 0.0), 1.0),
                    text=f"running · {method} · step {step} · {message[:100]} · {time.time() - job['started']:.0f} s")
        return True
    if job["error"]:
        st.error(f"The stream in {folder} stopped: {job['error']}. The steps finished before are kept; run it "
                 "again to continue.", icon=":material/error:")
    return False


def show_run(folder: str) -> None:
    live = show_progress(folder)
    stamp = run_stamp(folder)
    if stamp == 0.0:
        st.info("Waiting for the first results…" if live else f"{folder} holds no results yet.")
        return
    data = read_view(folder, stamp)
    cfg = data["info"].get("config", {})
    st.markdown(f"**{folder}** · {data['info'].get('model', {}).get('name', '?')} · "
                f"{cfg.get('steps')} steps × {cfg.get('batch')} edits ({cfg.get('order')}) · languages "
                f"{', '.join(data['languages'])} · measured steps: "
                + ", ".join(f"{m} {n}/{cfg.get('steps')}" for m, n in data["steps"].items()))
    curves = data["curves"]
    if curves.empty:
        st.info("No step has been measured yet." if live else "No step was measured in this run.")
        return
    metric = kept(st.radio, "Metric", list(sf.METRIC_TITLES), key="seq-metric", default="efficacy", horizontal=True,
                  format_func=sf.METRIC_TITLES.get)
    fig = sf.curves_figure(curves, metric, data["methods"])
    st.plotly_chart(fig, width="stretch", key="seq-curves")
    downloads(fig, f"sequential_{metric}", curves, key="seq-curves-dl")

    st.subheader("Interference: each batch asked in every language")
    c1, c2, c3 = st.columns(3)
    method = kept(c1.selectbox, "Method", data["methods"], key="seq-im-method", default=data["methods"][0])
    kind = kept(c2.selectbox, "Metric ", list(sf.METRIC_TITLES), key="seq-im-kind", default="efficacy",
                format_func=sf.METRIC_TITLES.get)
    rel = kept(c3.radio, "Show", ["value", "own step", "unedited"], key="seq-im-rel", default="value",
               format_func={"value": "after the last step", "own step": "change since the batch's own step",
                            "unedited": "change against the unedited model"}.get)
    labels, langs, matrix = data["matrices"][(method, kind, rel)]
    title = (f"{method}: {sf.METRIC_TITLES[kind]}" + {"value": "", "own step": " − right after its own step",
                                                     "unedited": " − unedited model"}[rel])
    heat = sf.interference_figure(labels, langs, matrix, title, diverging=rel != "value")
    st.plotly_chart(heat, width="stretch", key="seq-interference")
    st.caption("Rows are the batches in stream order (step · its language); columns the language the same facts are "
               "asked in. The diagonal-like cells (a batch in its own language) are what the batch edited; the "
               "others show cross-lingual transfer. 'Change since its own step' is what later batches did to it: "
               "negative interference is red.")

    st.subheader("Null space kept per layer")
    st.plotly_chart(sf.nullspace_figure(data["nullspace"]), width="stretch", key="seq-nullspace")
    st.caption("AlphaEdit projects on the null space of the unedited model's keys K₀ for the whole stream; LangEdit "
               "recomputes it from the running covariance of K₀ and every edited key (Eq. 4-7); MEMIT projects "
               "nothing.")

    st.subheader("Tables")
    final = data["final"]
    if not final.empty:
        st.markdown("After each method's last measured step (%; ΔPPL: FLORES perplexity change against the "
                    "unedited model, %):")
        st.dataframe(final.round(2), hide_index=True, width="stretch", key="seq-final")
    if not data["retention"].empty:
        st.markdown("The first batch, asked in its own language, after every step:")
        st.dataframe(data["retention"].round(2), hide_index=True, width="stretch", key="seq-retention")
    if not data["seconds"].empty:
        st.dataframe(data["seconds"].round(2), hide_index=True, width="stretch", key="seq-seconds")
    if live:
        return
    st.subheader("State")
    c1, c2, c3 = st.columns([2, 1, 1])
    which = kept(c1.selectbox, "Method's state", data["methods"], key="seq-dl-method", default=data["methods"][0])
    state_dir = Path(folder) / which / "state"
    if (state_dir / "state.json").is_file():
        c1.download_button(f"Download the {which} state (zip: safetensors + JSON)",
                           data=state_zip(folder, which, stamp), file_name=f"{which}-state.zip",
                           mime="application/zip", key="seq-dl")
    last = max(data["steps"].values())
    back = c2.selectbox("Roll back to step", list(range(last + 1)), index=last, key=f"seq-rollback-step-{last}")
    c3.write("")
    if c3.button("Roll back every method", key="seq-rollback"):
        from editors.sequential_run import rollback_run

        rollback_run(folder, int(back))
        st.success(f"Rolled back to step {int(back)}: later steps are gone from {folder}; run the same stream "
                   "again to recompute them.")
        st.rerun()


mode = st.radio("Mode", ["Run a stream", "Open a run folder"], horizontal=True, key="seq-mode", label_visibility="collapsed")
with user_errors():
    if mode == "Run a stream":
        new_run_form()
    else:
        open_run_form()

current = st.session_state.get("seq-folder")
if current:
    st.divider()
    interval = 2.0 if running(current) else None

    def live_part() -> None:
        with user_errors():
            show_run(current)
        if interval is not None and not running(current):
            st.rerun()                      # the stream ended: redraw the whole page once, without polling

    _ = st.fragment(live_part, run_every=interval)()
