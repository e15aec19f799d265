"""Real-browser test: the app as a subprocess, opened in headless Chromium."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _require_chromium():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium installed (.ci/run installs it)")
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    _require_chromium()
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    neuroglot = shutil.which("neuroglot", path=str(Path(sys.executable).parent)) or "neuroglot"
    with open(log, "w") as out:
        proc = subprocess.Popen([neuroglot, "app", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the teardown can reap it all
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # the first run may convert the embedded model
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app exited early:\n{log.read_text()}")
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
    else:
        _kill_group(proc)
        pytest.fail(f"app did not start:\n{log.read_text()}")
    yield url
    # Terminating `neuroglot app` alone must stop the server (it execs Streamlit rather than leaving a child).
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.time() + 20
    while time.time() < deadline and _serving(url):
        time.sleep(0.5)
    outlived = _serving(url)
    _kill_group(proc)
    if outlived:
        pytest.fail("the Streamlit server outlived the terminated `neuroglot app` process")


def _serving(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200
    except OSError:
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def test_home_shows_embedded_model_summary(app_url, browser):
    page = browser.new_page()
    page.goto(app_url)
    page.get_by_text("Layers × neurons").wait_for(timeout=180_000)
    body = _shown(page, "18 × 2,048", "gemma3_text", "Facts per relation × language")
    assert "Traceback" not in body
    page.screenshot(path=str(Path(os.environ.get("NEUROGLOT_SHOTS", "/tmp")) / "home.png"), full_page=True)
    page.close()


def test_bad_model_spec_shows_error_and_keeps_model(app_url, browser):
    page = browser.new_page()
    page.goto(app_url)
    page.get_by_text("Layers × neurons").wait_for(timeout=180_000)
    box = page.get_by_role("textbox", name="Model")
    box.fill("/no/such/model.gguf")
    page.get_by_role("button", name="Load", exact=True).click()
    page.get_by_text("GGUF file not found").wait_for(timeout=60_000)
    body = _shown(page, "18 × 2,048")  # the previously loaded model is still there
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
    page.get_by_text("LAFNs at β = 0.1").wait_for(timeout=300_000)
    body = _shown(page, "Counted en:")
    assert "Traceback" not in body
    # a deep link runs through main.py's st.navigation (not Streamlit's legacy pages/ mode)
    nav = page.locator("[data-testid='stSidebarNav']").inner_text()
    assert "Neuron atlas" in nav and "Home" in nav
    # Figure 1 is drawn: a plotly chart with the LAFN bars and one line per language
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "LAFN" in legend and "en" in legend and "zh" in legend
    page.screenshot(path=str(Path(os.environ.get("NEUROGLOT_SHOTS", "/tmp")) / "atlas.png"))
    # drill-down: select the first neuron of the table
    page.get_by_role("tab", name="Neuron drill-down").click()
    table = page.locator("[data-testid='stDataFrame']").first
    table.wait_for(timeout=60_000)
    box = table.bounding_box()
    # the row-selection checkbox column sits at the left edge of the first data row
    page.mouse.click(box["x"] + 15, box["y"] + 55)
    page.get_by_text("promoted").first.wait_for(timeout=120_000)
    assert "Traceback" not in page.inner_text("body")
    page.close()


def _shown(page, *texts: str, timeout: int = 60_000) -> str:
    """Wait until every text is on the page, then return the page's text.

    Streamlit draws a script run's elements one after another, so a text that comes later in the script
    may not be there yet when an earlier one appears: wait for each text instead of reading the body once."""
    for text in texts:
        page.get_by_text(text, exact=False).first.wait_for(timeout=timeout)
    return page.inner_text("body")


def _shot(page, name: str) -> None:
    page.screenshot(path=str(Path(os.environ.get("NEUROGLOT_SHOTS", "/tmp")) / name))


def test_attribution_page_typed_fact_and_drilldown(app_url, browser):
    """Integrated gradients of a typed fact in en and zh: the per-language figure, then a neuron's drill-down."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url + "/attribution")
    page.get_by_text("Type a fact").wait_for(timeout=120_000)
    page.get_by_text("Type a fact").click()
    page.get_by_role("textbox", name="Answer (zh)").wait_for(timeout=60_000)
    steps = page.get_by_role("spinbutton", name="Steps m")
    steps.fill("4")
    steps.press("Enter")
    page.get_by_role("button", name="Compute", exact=True).click()
    page.get_by_text("language-independent", exact=False).first.wait_for(timeout=300_000)
    body = _shown(page, "Attributed 4 prompts", "Mean answer probability: en")
    assert "Traceback" not in body
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "language-independent" in legend and "en-specific" in legend and "zh-specific" in legend
    _shot(page, "attribution.png")
    page.get_by_role("tab", name="Top neurons").click()
    panel = page.get_by_role("tabpanel", name="Top neurons")
    table = panel.locator("[data-testid='stDataFrame']").first
    table.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    box = table.bounding_box()
    page.mouse.click(box["x"] + 15, box["y"] + 55)
    try:
        page.get_by_text("promoted").first.wait_for(timeout=120_000)
    finally:
        _shot(page, "attribution_drill.png")
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
    _shot(page, "tracing.png")
    for lang in ("zh", "de"):
        page.get_by_role("tab", name=lang, exact=True).click()
    # bad input: the English subject is not in the English prompt
    subject = page.get_by_role("textbox", name="Subject (en)")
    subject.fill("Louvre")
    page.get_by_role("button", name="Trace", exact=True).click()
    page.get_by_role("tab", name="en", exact=True).click()
    page.get_by_text("does not occur in the prompt").wait_for(timeout=120_000)
    body = page.inner_text("body")
    assert "Traceback" not in body
    page.get_by_role("tab", name="zh", exact=True).click()
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
    body = _shown(page, "Edit 1: lu-lafns · mzsre:0")
    assert "Traceback" not in body and "⚠️" not in body
    legend = page.locator(".js-plotly-plot .legend").first.text_content()
    assert "before" in legend and "after" in legend
    assert page.locator("[data-testid='stDataFrame']").count() >= 3   # record preview, edit list, before/after
    assert "Edit 1: lu-lafns · mzsre:0" in body
    page.locator("[data-testid='stDataFrame']").last.scroll_into_view_if_needed()
    _shot(page, "edit_lab.png")

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
