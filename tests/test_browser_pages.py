"""Real-browser tests that use each analysis page as a user does: run it, then keep clicking (sliders, tabs,
a table row that opens the drill-down, every download, leaving the page and coming back, the same request
again, and the same request in a second browser session). After every step the page must still show its
result and no exception text: Streamlit replays the element calls of a cached function on a cache hit, so
a page that works once can break on the second click (issue 11)."""
from __future__ import annotations

import pytest

from tests.browser import (assert_clean, commit, download, go_to, move_slider, run_small_atlas, run_typed_attribution,
                           run_typed_trace, select_first_row, settled, shot, shown, submit)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

WIDE = {"width": 1400, "height": 1100}


def test_atlas_page_survives_every_interaction(app_url, browser):
    page = browser.new_page(viewport=WIDE)
    run_small_atlas(page, app_url)
    shown(page, "LAFNs at β = 0.8", "Counted en:", timeout=600_000)  # the default β is 0.8
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    assert_clean(page, "run")
    # a deep link runs through main.py's st.navigation (not Streamlit's legacy pages/ mode)
    nav = page.locator("[data-testid='stSidebarNav']").inner_text()
    assert "Neuron atlas" in nav and "Home" in nav
    legend = page.locator(".js-plotly-plot .legend").first.text_content()   # Figure 1: LAFN bars, a line per language
    assert "LAFN" in legend and "en" in legend and "zh" in legend
    shot(page, "atlas.png")

    move_slider(page, "β (Eq. 5 threshold)", -2)                       # slider
    settled(page)
    shown(page, "LAFNs at β = 0.7", timeout=120_000)
    assert_clean(page, "moving β")

    for tab in ("Overlap", "β sweep", "LAPE", "Neurons per layer"):    # every tab
        page.get_by_role("tab", name=tab).click()
        settled(page)
        assert_clean(page, f"tab {tab}")

    panel = page.get_by_role("tabpanel", name="Neurons per layer")     # every download of Figure 1
    csv = download(page, panel, "CSV").decode()
    assert "LAFN" in csv and "layer" in csv
    assert b"plotly" in download(page, panel, "HTML")[:200_000].lower()
    assert download(page, panel, "PNG")[:8] == b"\x89PNG\r\n\x1a\n"
    assert_clean(page, "downloads")

    page.get_by_role("tab", name="Neuron drill-down").click()          # a row opens the drill-down
    drill = page.get_by_role("tabpanel", name="Neuron drill-down")
    select_first_row(page, drill.locator("[data-testid='stDataFrame']").first)
    shown(page, "promoted", timeout=300_000)
    assert_clean(page, "selecting a neuron")
    shot(page, "atlas_drill.png")
    png = download(page, drill, "PNG")
    assert png[:4] == b"\x89PNG"
    assert_clean(page, "drill-down PNG")

    go_to(page, "Home")                                                # leave and come back
    shown(page, "Facts per relation × language", timeout=180_000)
    go_to(page, "Neuron atlas")
    shown(page, "LAFNs at β = 0.7", timeout=300_000)                    # β and the result are still there
    assert_clean(page, "coming back")
    assert page.get_by_role("spinbutton", name="Facts per relation").input_value() == "1"

    page.get_by_role("button", name="Run", exact=True).click()         # the same request again
    settled(page)
    shown(page, "LAFNs at β = 0.7", timeout=300_000)
    assert_clean(page, "the same request again")

    page.reload()                                                       # a reload is a new session
    run_small_atlas(page, app_url)
    shown(page, "LAFNs at β = 0.8", timeout=300_000)
    assert_clean(page, "the same request after a reload")

    other = browser.new_context(viewport=WIDE)                          # a second browser session
    second = other.new_page()
    run_small_atlas(second, app_url)
    shown(second, "LAFNs at β = 0.8", timeout=300_000)
    assert_clean(second, "the same request in a second session")
    move_slider(second, "β (Eq. 5 threshold)", 1)
    shown(second, "LAFNs at β = 0.85", timeout=120_000)
    assert_clean(second, "moving β in the second session")
    other.close()
    page.close()


def test_attribution_page_survives_every_interaction(app_url, browser):
    page = browser.new_page(viewport=WIDE)
    run_typed_attribution(page, app_url)
    shown(page, "Attributed 4 prompts", "language-independent", "Mean answer probability: en", timeout=600_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    assert_clean(page, "compute")
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "language-independent" in legend and "en-specific" in legend and "zh-specific" in legend

    move_slider(page, "t (per prompt)", 2)                              # both sliders
    settled(page)
    shown(page, "(t = 0.3, p = 0.5", timeout=120_000)
    move_slider(page, "p (per fact)", 1)
    settled(page)
    shown(page, "(t = 0.3, p = 0.6", timeout=120_000)
    assert_clean(page, "moving t and p")

    panel = page.get_by_role("tabpanel", name="Knowledge neurons per layer")
    assert "layer" in download(page, panel, "CSV").decode()
    assert download(page, panel, "PNG")[:4] == b"\x89PNG"
    assert download(page, panel, "HTML")[:200].lower().find(b"html") >= 0
    page.get_by_role("tab", name="Per fact").click()
    settled(page)
    assert "fact_id" in download(page, page.get_by_role("tabpanel", name="Per fact"), "CSV").decode()
    assert_clean(page, "downloads")

    page.get_by_role("tab", name="Top neurons").click()                # a row opens the drill-down
    top = page.get_by_role("tabpanel", name="Top neurons")
    select_first_row(page, top.locator("[data-testid='stDataFrame']").first)
    shown(page, "promoted", timeout=300_000)
    assert_clean(page, "selecting a neuron")
    shot(page, "attribution_drill.png")

    go_to(page, "Neuron atlas")                                        # leave and come back
    page.get_by_role("button", name="Run", exact=True).wait_for(timeout=120_000)
    go_to(page, "Attribution")
    shown(page, "Attributed 4 prompts", "(t = 0.3, p = 0.6", timeout=300_000)
    assert_clean(page, "coming back")
    shot(page, "attribution.png")

    page.get_by_role("button", name="Compute", exact=True).click()     # the same request again
    settled(page)
    shown(page, "Attributed 4 prompts", timeout=300_000)
    assert_clean(page, "the same request again")

    other = browser.new_context(viewport=WIDE)                          # a second session: read back at once
    second = other.new_page()
    run_typed_attribution(second, app_url)
    shown(second, "Attributed 4 prompts", "(t = 0.2, p = 0.5", timeout=300_000)
    assert_clean(second, "the same request in a second session")
    other.close()
    page.close()


def test_tracing_page_survives_every_interaction(app_url, browser):
    page = browser.new_page(viewport=WIDE)
    run_typed_trace(page, app_url)
    shown(page, "Strongest MLP effect", "p(answer), clean run", "p(answer), subject corrupted",
          "are the subject's", timeout=600_000)
    assert_clean(page, "trace")
    en_plot = page.get_by_role("tabpanel", name="en").locator(".js-plotly-plot").first
    en_plot.wait_for(timeout=120_000)
    titles = en_plot.text_content()                                     # three heatmaps of the en fact
    assert "single restored hidden state" in titles and "restored MLP" in titles and "restored attention" in titles
    assert "Eiffel" in titles
    shot(page, "tracing.png", full_page=True)

    panel = page.get_by_role("tabpanel", name="en")                     # downloads of the en heatmaps
    assert "token" in download(page, panel, "CSV").decode()
    assert download(page, panel, "PNG")[:4] == b"\x89PNG"
    assert_clean(page, "downloads")

    select_first_row(page, panel.locator("[data-testid='stDataFrame']").first)   # a row opens the drill-down
    shown(page, "promoted", timeout=300_000)
    assert_clean(page, "selecting a neuron")

    for lang in ("zh", "de", "en"):                                     # every language's tab
        page.get_by_role("tab", name=lang, exact=True).click()
        settled(page)
        assert_clean(page, f"tab {lang}")

    go_to(page, "Attribution")                                          # leave and come back
    page.get_by_role("button", name="Compute", exact=True).wait_for(timeout=120_000)
    go_to(page, "Causal tracing")
    shown(page, "Strongest MLP effect", timeout=300_000)
    assert_clean(page, "coming back")
    assert page.get_by_role("spinbutton", name="Noise samples").input_value() == "2"

    page.get_by_role("button", name="Trace", exact=True).click()        # the same request again
    settled(page)
    shown(page, "Strongest MLP effect", timeout=300_000)
    assert_clean(page, "the same request again")

    other = browser.new_context(viewport=WIDE)                          # a second session: read back at once
    second = other.new_page()
    run_typed_trace(second, app_url)
    shown(second, "Strongest MLP effect", timeout=300_000)
    assert_clean(second, "the same request in a second session")
    other.close()

    page.get_by_role("tab", name="en", exact=True).click()             # a bad subject: an error box in en only
    commit(page, page.get_by_role("textbox", name="Subject (en)"), "Louvre")
    submit(page, "Trace")
    settled(page)
    page.get_by_role("tab", name="en", exact=True).click()
    page.get_by_text("does not occur in the prompt").first.wait_for(timeout=300_000)
    assert_clean(page, "a subject not in the prompt")
    page.get_by_role("tab", name="zh", exact=True).click()
    shown(page, "Strongest MLP effect", timeout=120_000)                 # the other languages are still traced
    page.close()


def test_home_failed_load_keeps_the_model_and_resets_the_box(app_url, browser):
    page = browser.new_page(viewport=WIDE)
    page.goto(app_url)
    shown(page, "Layers × neurons", timeout=180_000)
    box = page.get_by_role("textbox", name="Model")
    box.fill("/no/such/model.gguf")
    page.get_by_role("button", name="Load", exact=True).click()
    shown(page, "GGUF file not found", "The previous model (embedded) is still in use", "18 × 2,048",
          timeout=120_000)
    assert page.get_by_role("textbox", name="Model").input_value() == "embedded"   # the box shows the model in use
    icons = page.locator("[data-testid='stSidebarNav'] [data-testid='stIconMaterial']").all()
    assert len(icons) >= 5 and all(i.inner_text().isascii() for i in icons)   # Material icons, not emoji
    go_to(page, "Neuron atlas")                                         # the other pages still work
    page.get_by_role("button", name="Run", exact=True).wait_for(timeout=120_000)
    assert_clean(page, "a page after a failed load")
    page.close()
