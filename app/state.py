"""What every page shares: the cached model, the cached corpus, error boxes and progress.

The model is one object per spec for the whole server (`st.cache_resource`),
together with its lock; corpora are plain DataFrames (`st.cache_data`).
No tensor is ever put in `st.session_state`.

Long work (counting, attribution, tracing) never runs inside a cached function:
Streamlit replays a cached function's element calls on every cache hit, and a
progress bar created outside the function then fails the replay. The pages run
it through :func:`run_or_read` (under a :func:`progress_bar`) and keep its result
in the backend's run folder, which reruns, page switches and other sessions read
back; session state holds only the request (:func:`submit_request`,
:func:`last_request`) and the folder's path.
"""
from __future__ import annotations

import os
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

import pandas as pd
import streamlit as st

from analysis.errors import NeuroglotError

DEFAULT_MODEL = os.environ.get("NEUROGLOT_MODEL", "embedded")
DEFAULT_CORPUS = os.environ.get("NEUROGLOT_CORPUS", "demo")
ERROR_ICON = ":material/error:"


@st.cache_resource(show_spinner=False, max_entries=2)
def workbench(spec: str):
    """The loaded model (with its lock), shared by all sessions."""
    from analysis.model import load_model

    return load_model(spec)


@st.cache_data(show_spinner=False, max_entries=8)
def corpus_rows(spec: str) -> tuple[str, pd.DataFrame]:
    """A corpus as (name, rows DataFrame); plain data, so cached per spec."""
    from data import load_corpus

    corp = load_corpus(spec)
    return corp.name, corp.rows


def current_model_spec() -> str:
    return st.session_state.get("model_spec", DEFAULT_MODEL)


def current_corpus_spec() -> str:
    return st.session_state.get("corpus_spec", DEFAULT_CORPUS)


def show_unexpected(exc: BaseException) -> None:
    """A short error box for an error that is not the user's, with the traceback in a collapsed expander."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    st.error(f"Something went wrong ({type(exc).__name__}{': ' + first if first else ''}). The page is still "
             "usable: change the request or run it again.", icon=ERROR_ICON)
    with st.expander("details"):
        st.code("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), language="text")


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a NeuroglotError as an error box, anything else as a short box with details; the page (and the
    app) keep running. Streamlit's own control flow (``st.stop``, reruns) is a BaseException and passes."""
    try:
        yield
    except NeuroglotError as exc:
        st.error(str(exc), icon=ERROR_ICON)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a page
        show_unexpected(exc)


def folder_stamp(folder: str | None) -> float:
    """The modification time of a run folder's manifest (0.0 when the folder is gone or incomplete): part of
    the key of the cached readers, so a folder rewritten by another session or the CLI is read again."""
    from pathlib import Path

    manifest = Path(folder) / "manifest.json" if folder else None
    return manifest.stat().st_mtime if manifest is not None and manifest.is_file() else 0.0


def last_request(slot: str, hint: str):
    """The request this page last submitted (kept in ``st.session_state[slot]`` by :func:`submit_request`);
    when there is none, or the model or corpus changed on Home since, ``hint`` in an info box and the page
    stops."""
    kept_request = st.session_state.get(slot)
    if kept_request is None or kept_request[:2] != (current_model_spec(), current_corpus_spec()):
        st.info(hint)
        st.stop()
    return kept_request[2]


def submit_request(slot: str, request) -> None:
    """Keep ``request`` as this page's request for the model and corpus in use, forgetting its run folders."""
    st.session_state[slot] = (current_model_spec(), current_corpus_spec(), request)
    st.session_state.pop(f"{slot}_folders", None)


@st.cache_data(show_spinner=False, max_entries=64)
def read_run(kind: str, folder: str, stamp: float):
    """A run folder's results: ``"counts"`` (the atlas), ``"attribution"`` or ``"traces"``. Read once per folder
    and ``stamp`` (the manifest's modification time), so a folder rewritten by another session or the CLI is
    read again. Pure: draws nothing."""
    if kind == "counts":
        from analysis.neurons import NeuronCounts

        return NeuronCounts.load(folder)
    if kind == "attribution":
        from analysis.attribution import AttributionRun

        return AttributionRun.load(folder)
    from analysis.causal_trace import load_traces

    return load_traces(folder)


def run_or_read(slot: str, part: str, kind: str, label: str, run: Callable, again: bool = False):
    """The results of ``part`` of this page's request and their run folder.

    ``run(progress)`` is the backend's run-folder call (``(results, folder, reused)``: it computes the request
    or reads it back); it runs under a progress bar labelled ``label`` when the request is new (``again``) or
    its folder is gone or unfinished (the page was left while it ran). Otherwise the folder kept in session
    state is read back (:func:`read_run`, ``kind``). Only the folder's path is kept; if ``run`` fails, none.
    """
    folders = st.session_state.setdefault(f"{slot}_folders", {})
    folder = folders.get(part)
    if again or folder_stamp(folder) == 0.0:
        folders.pop(part, None)
        with progress_bar(label) as progress:
            folder = folders[part] = str(run(progress)[1])
    return read_run(kind, folder, folder_stamp(folder)), folder


@contextmanager
def progress_bar(label: str) -> Iterator[Callable]:
    """A visible progress bar with the current step and the elapsed seconds, removed when the work ends
    (also on an error, so no stale "running" box stays above the error or the result).

    The callback takes either ``(done, total)`` counts or ``(fraction, message)``, the two forms the
    backend's ``progress=`` arguments use.
    """
    holder = st.empty()
    started = time.perf_counter()

    def update(done: float, total_or_message: float | str = 1.0) -> None:
        if isinstance(total_or_message, str):
            fraction, step = float(done), total_or_message
        else:
            fraction, step = done / max(total_or_message, 1), f"{int(done):,} / {int(total_or_message):,}"
        elapsed = time.perf_counter() - started
        holder.progress(min(max(fraction, 0.0), 1.0), text=f"{label} · {step[:120]} · {elapsed:.0f} s")

    update(0.0, "starting")
    try:
        yield update
    finally:
        holder.empty()


# The parameter through which each kind of widget takes its first value.
_FIRST_VALUE = {"multiselect": "default", "radio": "index", "selectbox": "index"}


def kept(widget: Callable, label: str, *args, key: str, default, **kwargs):
    """Draw ``widget(label, *args, key=key, **kwargs)`` with its last value as its first value, so a request's
    widgets still show that request after the user leaves the page and comes back (Streamlit forgets the
    state of widgets that were not drawn). ``default`` is the value before any; with ``options`` (the first
    positional argument) a remembered value no longer among them falls back to ``default``.

    The value goes in through the widget's own parameter (``value``, ``default`` or ``index``), never by
    writing Session State before the widget: a keyed widget's identity does not depend on that parameter,
    so it only matters when Streamlit holds no state for the widget, and then the browser is told the real
    value. Seeding Session State instead left the browser with the widget's built-in default (an empty
    multiselect, a number input at its minimum); a form submitted while the page was still redrawing
    sent those, and the Causal-tracing page answered "choose at least one kind of state" to a user who
    had chosen all three."""
    shadow = f"_kept_{key}"
    value = st.session_state.get(shadow, default)
    parameter = _FIRST_VALUE.get(getattr(widget, "__name__", ""), "value")
    if args:
        options = list(args[0])
        if isinstance(value, (list, tuple)):
            value = [v for v in value if v in options]
        elif value not in options:
            value = default
        if parameter == "index":
            value = options.index(value) if value in options else 0
    value = widget(label, *args, key=key, **{parameter: value}, **kwargs)
    st.session_state[shadow] = value
    return value
