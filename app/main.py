"""Neuroglot's Streamlit entry point: `neuroglot app` runs this file."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app.state import user_errors

# Pages live in views/, not pages/: a pages/ folder beside the main script switches Streamlit to its
# legacy multipage mode, where a deep link such as /atlas runs the page file without main.py.
PAGES = Path(__file__).with_name("views")

# Material icons (drawn from Streamlit's own icon font): emoji render as empty boxes where no emoji font is installed.
st.set_page_config(page_title="Neuroglot", page_icon=":material/neurology:", layout="wide")

navigation = st.navigation([
    st.Page(str(PAGES / "home.py"), title="Home", icon=":material/home:", default=True),
    st.Page(str(PAGES / "atlas.py"), title="Neuron atlas", icon=":material/map:", url_path="atlas"),
    st.Page(str(PAGES / "attribution.py"), title="Attribution", icon=":material/target:", url_path="attribution"),
    st.Page(str(PAGES / "tracing.py"), title="Causal tracing", icon=":material/biotech:", url_path="tracing"),
    st.Page(str(PAGES / "edit_lab.py"), title="Edit lab", icon=":material/edit_note:", url_path="edit-lab"),
    st.Page(str(PAGES / "compare.py"), title="Compare editors", icon=":material/compare_arrows:", url_path="compare"),
    st.Page(str(PAGES / "sequential.py"), title="Sequential editing", icon=":material/stacked_line_chart:",
            url_path="sequential"),
    st.Page(str(PAGES / "runs.py"), title="Runs", icon=":material/folder_open:", url_path="runs"),
])
with user_errors():  # whatever a page lets escape becomes an error box, never a raw traceback
    navigation.run()
