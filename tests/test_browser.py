"""Real-browser tests: the app as a subprocess, opened in headless Chromium (tests/browser.py)."""
from __future__ import annotations

import time

import pytest

from tests.browser import run_typed_attribution, select_first_row, settled, shot, shown

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_home_shows_embedded_model_summary(app_url, browser):
    page = browser.new_page()
    page.goto(app_url)
    page.get_by_text("Layers × neurons").wait_for(timeout=180_000)
    body = shown(page, "18 × 2,048", "gemma3_text", "Facts per relation × language")
    assert "Traceback" not in body
    shot(page, "home.png", full_page=True)
    page.close()


def test_bad_model_spec_shows_error_and_keeps_model(app_url, browser):
    page = browser.new_page()
    page.goto(app_url)
    page.get_by_text("Layers × neurons").wait_for(timeout=180_000)
    box = page.get_by_role("textbox", name="Model")
    box.fill("/no/such/model.gguf")
    page.get_by_role("button", name="Load", exact=True).click()
    page.get_by_text("GGUF file not found").wait_for(timeout=60_000)
    body = shown(page, "18 × 2,048")  # the previously loaded model is still there
    assert "Traceback" not in body
    page.close()


def test_neuron_atlas_page_runs_and_drills_down(app_url, browser):
    """Run a small atlas in the browser, see Figure 1, switch β, open a neuron's drill-down."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url + "/atlas")
    page.get_by_role("button", name="Run", exact=True).wait_for(timeout=120_000)
    facts = page.get_by_role("spinbutton", name="Facts per relation")
    facts.fill("1")
    facts.press("Enter")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("LAFNs at β = 0.8").wait_for(timeout=300_000)  # the default β is 0.8 (issue 11)
    body = shown(page, "Counted en:")
    assert "Traceback" not in body
    # a deep link runs through main.py's st.navigation (not Streamlit's legacy pages/ mode)
    nav = page.locator("[data-testid='stSidebarNav']").inner_text()
    assert "Neuron atlas" in nav and "Home" in nav
    # Figure 1 is drawn: a plotly chart with the LAFN bars and one line per language
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "LAFN" in legend and "en" in legend and "zh" in legend
    shot(page, "atlas.png")
    # drill-down: select the first neuron of the table
    page.get_by_role("tab", name="Neuron drill-down").click()
    settled(page)
    select_first_row(page, page.get_by_role("tabpanel", name="Neuron drill-down").locator("[data-testid='stDataFrame']").first)
    shown(page, "promoted", timeout=120_000)
    assert "Traceback" not in page.inner_text("body")
    page.close()


def test_attribution_page_typed_fact_and_drilldown(app_url, browser):
    """Integrated gradients of a typed fact in en and zh: the per-language figure, then a neuron's drill-down."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    run_typed_attribution(page, app_url)
    page.get_by_text("language-independent", exact=False).first.wait_for(timeout=300_000)
    body = shown(page, "Attributed 4 prompts", "Mean answer probability: en")
    assert "Traceback" not in body
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "language-independent" in legend and "en-specific" in legend and "zh-specific" in legend
    shot(page, "attribution.png")
    page.get_by_role("tab", name="Top neurons").click()
    panel = page.get_by_role("tabpanel", name="Top neurons")
    settled(page)
    select_first_row(page, panel.locator("[data-testid='stDataFrame']").first)
    try:
        shown(page, "promoted", timeout=120_000)
    finally:
        shot(page, "attribution_drill.png")
    assert "Traceback" not in page.inner_text("body")
    page.close()


def test_causal_tracing_page_heatmaps_and_bad_subject(app_url, browser):
    """Trace a typed fact (en, zh, de): three heatmaps per language; a subject not in the prompt is an error box."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url + "/tracing")
    page.get_by_text("Type a fact").wait_for(timeout=120_000)
    page.get_by_text("Type a fact").click()
    page.get_by_role("textbox", name="Subject (de)").wait_for(timeout=60_000)
    samples = page.get_by_role("spinbutton", name="Noise samples")
    samples.fill("2")
    samples.press("Enter")
    page.get_by_role("button", name="Trace", exact=True).click()
    page.get_by_text("Strongest MLP effect").first.wait_for(timeout=300_000)
    body = page.inner_text("body")
    assert "Traceback" not in body
    titles = page.locator(".js-plotly-plot").first.text_content()
    assert "single restored hidden state" in titles and "restored MLP" in titles and "restored attention" in titles
    assert "Eiffel" in titles
    shot(page, "tracing.png")
    for lang in ("zh", "de"):
        settled(page)
        page.get_by_role("tab", name=lang, exact=True).click()
    # bad input: the English subject is not in the English prompt
    subject = page.get_by_role("textbox", name="Subject (en)")
    subject.fill("Louvre")
    page.get_by_role("button", name="Trace", exact=True).click()
    settled(page)
    page.get_by_role("tab", name="en", exact=True).click()
    page.get_by_text("does not occur in the prompt").wait_for(timeout=120_000)
    body = page.inner_text("body")
    assert "Traceback" not in body
    page.get_by_role("tab", name="zh", exact=True).click()
    settled(page)
    page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
    assert page.locator(".js-plotly-plot").count() >= 1   # the other languages' traces are still shown
    page.close()


def test_edit_lab_mzsre_record_and_a_second_session_sees_no_edit(app_url, browser):
    """Edit an MzsRE record (en, zh) with LU-LAFNs in one browser session: the before/after table and chart
    appear. A second browser context (another session on the same server) shows no applied edit and no
    "after" numbers."""
    import json

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url + "/edit-lab")
    page.get_by_text("Record (").wait_for(timeout=180_000)
    search = page.get_by_role("textbox", name="Search the records")
    search.fill("IAAF Combined Events")
    search.press("Enter")
    page.get_by_text("Record (1 of").wait_for(timeout=60_000)
    # a cheap LU-LAFNs: two layers, two steps, one short prefix (the preset's 25 steps take minutes on a CPU)
    box = page.get_by_label("Hyper-parameters (JSON", exact=False)
    box.wait_for(timeout=60_000)
    deadline = time.time() + 240          # on a busy machine the box can be drawn long before its value arrives
    while not box.input_value().strip().startswith("{") and time.time() < deadline:
        page.wait_for_timeout(500)
    hparams = json.loads(box.input_value())
    hparams.update(layers=[9, 17], steps=2, n_prefixes=1, prefix_length=2, paraphrase_sources=["prompt"])
    box.fill(json.dumps(hparams))
    box.press("Control+Enter")
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Apply edit", exact=True).click()
    page.get_by_text("1 edit(s) applied in this session").wait_for(timeout=300_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
    body = shown(page, "Edit 1: lu-lafns · mzsre:0")
    assert "Traceback" not in body and "⚠️" not in body
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "before" in legend and "after" in legend
    assert page.locator("[data-testid='stDataFrame']").count() >= 3   # record preview, edit list, before/after
    assert "Edit 1: lu-lafns · mzsre:0" in body
    page.locator("[data-testid='stDataFrame']").last.scroll_into_view_if_needed()
    shot(page, "edit_lab.png")

    # another session on the same server: no edit, no "after"
    other = browser.new_context(viewport={"width": 1400, "height": 1000})
    second = other.new_page()
    second.goto(app_url + "/edit-lab")
    second.get_by_text("No edit applied in this session").wait_for(timeout=120_000)
    body2 = second.inner_text("body")
    assert "edit(s) applied" not in body2 and "Edit 1:" not in body2
    assert second.locator(".js-plotly-plot").count() == 0
    other.close()
    # the first session still has its edit after the other session's visit
    page.get_by_role("button", name="Revert all", exact=True).wait_for(timeout=10_000)
    assert "1 edit(s) applied in this session" in page.inner_text("body")
    page.close()
