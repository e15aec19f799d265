"""Home: pick the model and the corpus; see what was loaded."""
from __future__ import annotations

import streamlit as st

from analysis.errors import NeuroglotError
from app.state import corpus_rows, current_corpus_spec, current_model_spec, user_errors, workbench

st.title("Neuroglot")
st.caption("Multilingual neurons and knowledge edits in large language models.")

if failed := st.session_state.pop("load_error", None):
    st.error(failed, icon=":material/error:")

# The boxes are keyed by a counter that a failed load bumps: the box then shows again the spec in use.
boxes = st.session_state.setdefault("picker_boxes", 0)
with st.sidebar.form("pickers"):
    st.subheader("Model and corpus")
    model_spec = st.text_input("Model", value=current_model_spec(), key=f"model-box-{boxes}",
                               help="'embedded' (Gemma 3 270M), a Hugging Face id, a checkpoint folder or a .gguf "
                                    "file. A Hugging Face id that is not in the local Hugging Face cache is "
                                    "downloaded, which needs the network (without it, loading fails after a wait).")
    corpus_spec = st.text_input("Corpus", value=current_corpus_spec(), key=f"corpus-box-{boxes}",
                                help="'demo' (bundled), a ParaRel/mParaRel folder, an X-FACTR csv, or a JSONL/CSV file.")
    if st.form_submit_button("Load", type="primary"):
        st.session_state["pending_model"] = model_spec.strip()
        st.session_state["pending_corpus"] = corpus_spec.strip()

# A new spec replaces the old one only once it has loaded: a bad spec shows an
# error and leaves the previous model and corpus in place.
def try_load(kind: str, spec: str, load) -> None:
    """Load ``spec``; on failure say that the previous one is kept and put its spec back in the box."""
    state_key = f"{kind}_spec"
    previous = current_model_spec() if kind == "model" else current_corpus_spec()
    if spec == previous:
        return
    note = (" (a Hugging Face id that is not cached locally is downloaded: that needs the network)"
            if kind == "model" and "/" in spec and not spec.startswith((".", "/", "~")) else "")
    with st.spinner(f"Loading {spec}{note}..."):
        try:
            load(spec)
        except Exception as exc:  # noqa: BLE001 - any failure: say so, keep the previous one, reset the box
            message = str(exc) if isinstance(exc, NeuroglotError) else f"{type(exc).__name__}: {exc}"
            st.session_state["load_error"] = f"{message}\n\nThe previous {kind} (`{previous}`) is still in use."
            st.session_state["picker_boxes"] = st.session_state.get("picker_boxes", 0) + 1
            st.rerun()  # draw the box again with the spec in use
    st.session_state[state_key] = spec


if pending := st.session_state.pop("pending_model", None):
    try_load("model", pending, workbench)
if pending := st.session_state.pop("pending_corpus", None):
    try_load("corpus", pending, corpus_rows)

st.header("Model")
with user_errors():
    with st.spinner("Loading the model (the first run de-quantizes the embedded model once)..."):
        wb = workbench(current_model_spec())
    s = wb.summary()
    st.subheader(s["name"])
    cols = st.columns(4)
    cols[0].metric("Layers × neurons", f"{s['layers']} × {s['neurons_per_layer']:,}")
    cols[1].metric("Parameters", f"{s['parameters'] / 1e6:,.1f}M")
    cols[2].metric("Device", s["device"])
    cols[3].metric("Dtype", s["dtype"])
    st.caption(f"family `{s['family']}` · {s['neurons_total']:,} FFN neurons in all · hidden size {s['d_model']} · "
               f"vocabulary {s['vocab_size']:,} · spec `{s['spec']}`")

st.header("Corpus")
with user_errors():
    from data.corpus import Corpus

    name, rows = corpus_rows(current_corpus_spec())
    st.subheader(name)
    st.caption(Corpus(rows, name=name).summary(" · "))
    counts = rows.groupby(["relation", "language"])["fact_id"].nunique().unstack(fill_value=0)
    st.markdown("**Facts per relation × language**")
    st.dataframe(counts, width="stretch")
    languages = sorted(rows["language"].unique())
    pick = st.multiselect("Preview languages", languages, default=languages[: min(3, len(languages))])
    preview = rows[rows["language"].isin(pick)] if pick else rows
    st.dataframe(preview[["fact_id", "relation", "language", "subject", "object", "prompt"]].head(200),
                 width="stretch", hide_index=True)
