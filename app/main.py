"""Neuroglot's Streamlit entry point: `neuroglot app` runs this file."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

# Pages live in views/, not pages/: a pages/ folder beside the main script switches Streamlit to its
# legacy multipage mode, where a deep link such as /atlas runs the page file without main.py.
PAGES = Path(__file__).with_name("views")

st.set_page_config(page_title="Neuroglot", page_icon="🧠", layout="wide")

navigation = st.navigation([
    st.Page(str(PAGES / "home.py"), title="Home", icon="🏠", default=True),
    st.Page(str(PAGES / "atlas.py"), title="Neuron atlas", icon="🗺️", url_path="atlas"),
    st.Page(str(PAGES / "attribution.py"), title="Attribution", icon="🎯", url_path="attribution"),
    st.Page(str(PAGES / "tracing.py"), title="Causal tracing", icon="🔬", url_path="tracing"),
    st.Page(str(PAGES / "edit_lab.py"), title="Edit lab", icon="✏️", url_path="edit-lab"),
])
navigation.run()
