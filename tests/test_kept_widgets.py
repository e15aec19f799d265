"""``app.state.kept``: a widget remembers its value across page switches, and the browser is always told the
widget's real value. The Causal-tracing page once answered "choose at least one kind of state" to a user who
had chosen all three: the remembered value was written to Session State, so the browser was sent the
widget's built-in default (an empty multiselect, a number at its minimum) and a form submitted while the page
was still redrawing sent those back (issue 11, the fresh-clone CI run)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCRIPT = '''
import streamlit as st
from app.state import kept

if st.session_state.get("show", True):
    with st.form("f"):
        kinds = kept(st.multiselect, "States", ["hidden", "mlp", "attn"], key="kinds", default=["hidden", "mlp", "attn"])
        noise = kept(st.number_input, "Noise", key="noise", default=3.0, min_value=0.0, max_value=20.0)
        mode = kept(st.radio, "Mode", ["a", "b", "c"], key="mode", default="b")
        pick = kept(st.selectbox, "Pick", ["x", "y"], key="pick", default="y")
        beta = kept(st.slider, "β", key="beta", default=0.8, min_value=0.0, max_value=1.0, step=0.05)
        st.form_submit_button("Go")
    st.write(f"got {kinds} {noise} {mode} {pick} {beta}")
'''


@pytest.fixture
def app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_string(SCRIPT, default_timeout=30).run()


def test_the_browser_is_sent_the_real_first_values(app):
    assert not app.exception and not app.warning            # no "set via Session State and a default" warning
    assert list(app.multiselect(key="kinds").proto.default) == [0, 1, 2]     # not the built-in empty list
    assert app.number_input(key="noise").proto.default == 3.0                 # not the minimum, 0.0
    assert app.radio(key="mode").proto.default == 1
    assert app.selectbox(key="pick").proto.default == 1
    assert list(app.slider(key="beta").proto.default) == [0.8]
    assert "got ['hidden', 'mlp', 'attn'] 3.0 b y 0.8" in app.markdown[0].value


def test_a_value_survives_leaving_and_coming_back_and_is_sent_as_the_first_value(app):
    app.multiselect(key="kinds").set_value(["mlp"])
    app.number_input(key="noise").set_value(5.5)
    app.radio(key="mode").set_value("c")
    app.slider(key="beta").set_value(0.35)
    app.button[0].click().run()
    assert "got ['mlp'] 5.5 c y 0.35" in app.markdown[0].value
    app.session_state["show"] = False                        # leave: the widgets are not drawn, their state goes
    app.run()
    assert "kinds" not in app.session_state
    app.session_state["show"] = True                         # come back
    app.run()
    assert not app.exception and not app.warning
    assert "got ['mlp'] 5.5 c y 0.35" in app.markdown[0].value
    assert list(app.multiselect(key="kinds").proto.default) == [1]
    assert app.number_input(key="noise").proto.default == 5.5
    assert app.radio(key="mode").proto.default == 2


def test_a_remembered_option_that_is_gone_falls_back_to_the_default():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_string(SCRIPT.replace('["x", "y"]', 'st.session_state.get("opts", ["x", "y"])'),
                             default_timeout=30).run()
    at.selectbox(key="pick").set_value("x")
    at.button[0].click().run()
    at.session_state["show"] = False
    at.run()
    at.session_state["opts"] = ["y", "z"]
    at.session_state["show"] = True
    at.run()
    assert not at.exception
    assert at.selectbox(key="pick").value == "y"
