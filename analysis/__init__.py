"""Neuroglot analysis backend. No Streamlit import anywhere in this package."""
