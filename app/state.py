"""What every page shares: the cached model, the cached corpus, error boxes.

The model is one object per spec for the whole server (`st.cache_resource`),
together with its lock; corpora are plain DataFrames (`st.cache_data`).
No tensor is ever put in `st.session_state`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import pandas as pd
import streamlit as st

from analysis.errors import NeuroglotError

DEFAULT_MODEL = os.environ.get("NEUROGLOT_MODEL", "embedded")
DEFAULT_CORPUS = os.environ.get("NEUROGLOT_CORPUS", "demo")


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


@contextmanager
def user_errors():
    """Show a NeuroglotError as an error box; the page (and the app) keep running."""
    try:
        yield
    except NeuroglotError as exc:
        st.error(str(exc), icon="⚠️")
