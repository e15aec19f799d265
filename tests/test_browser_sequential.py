"""The Sequential editing page used as a user does, in headless Chromium on the embedded model (issue 14): start
a short stream (LangEdit, AlphaEdit and MEMIT, en then zh, 2 steps of 2 dev records, cheap hyper-parameters), watch its
progress, read the curves, switch the metric and the interference view, download a state, leave and come
back, open the run in a second browser session, run the same stream again (nothing is recomputed), roll
back, make a mistake. Every wait is for what the page says."""
from __future__ import annotations

import io
import json
import time
import zipfile

import pytest

from tests.browser import assert_clean, commit, download, go_to, settled, shot, shown, submit

pytestmark = [pytest.mark.slow, pytest.mark.browser]

TALL = {"width": 1400, "height": 3000}
LONG = 600_000
CHEAP = dict(layers=[5, 6], v_num_grad_steps=4, context_template_length_params=[[5, 1]], mom2_n_tokens=4000)
HPARAMS = {"langedit": CHEAP, "alphaedit": CHEAP, "memit": CHEAP}


def idle(page) -> None:
    """Wait until no stream runs for this page (its progress bar is gone) and the page has finished redrawing:
    while a stream runs the page redraws its results every 2 s."""
    running = page.get_by_text("running ·", exact=False)
    deadline = time.time() + LONG / 1000
    while running.count() and time.time() < deadline:
        page.wait_for_timeout(500)
    settled(page)


def pick(page, label: str, option: str) -> None:
    """Choose ``option`` in the select box ``label``; a redraw that closes the list while it is open is retried."""
    from playwright.sync_api import Error as PlaywrightError

    for attempt in range(4):
        idle(page)
        box = page.locator("[data-testid='stSelectbox']").filter(has_text=label).first
        try:
            box.click()
            page.get_by_role("option", name=option, exact=True).click(timeout=10_000)
            settled(page)
            return
        except PlaywrightError:
            if attempt == 3:
                raise
            page.keyboard.press("Escape")


def curve_names(page) -> set[str]:
    data = page.evaluate("() => Array.from(document.querySelectorAll('.js-plotly-plot'))[0].data.map(t => t.name)")
    return set(data)


def test_a_stream_runs_live_and_survives_switches_downloads_a_second_session_and_rollback(app_url, browser, tmp_path):
    out = str(tmp_path / "stream")
    page = browser.new_page(viewport=TALL)
    page.goto(app_url + "/sequential")
    shown(page, "Run the stream", timeout=LONG)
    assert_clean(page, "opening the page")

    # a mistake first: a stream that asks for more records than the range holds
    shown(page, "langedit", "alphaedit", "memit")          # the three methods are chosen by default
    commit(page, page.get_by_role("textbox", name="Run folder", exact=True), out)
    commit(page, page.get_by_role("textbox", name="Records", exact=True), "100-101")
    page.get_by_role("textbox", name="Hyper-parameters over the presets (JSON, optional)", exact=True).fill(json.dumps(HPARAMS))
    submit(page, "Run the stream")
    shown(page, "the stream needs", timeout=LONG)
    assert_clean(page, "a stream too long for its records")

    # the real stream: 2 steps of 2 edits, en then zh; its progress shows while it runs
    commit(page, page.get_by_role("textbox", name="Records", exact=True), "100-149")
    commit(page, page.get_by_role("spinbutton", name="Edits per step", exact=True), "2")
    commit(page, page.get_by_role("spinbutton", name="FLORES sentences per language", exact=True), "3")
    submit(page, "Run the stream")
    shown(page, "running ·", timeout=LONG)
    shot(page, "sequential_running.png")
    shown(page, "langedit 2/2, alphaedit 2/2, memit 2/2", "After each method's last measured step", timeout=LONG)
    settled(page)
    assert_clean(page, "the finished stream")
    charts = page.locator(".js-plotly-plot")
    deadline = time.time() + 60                 # a chart of the previous run can fade out for a moment
    while charts.count() != 3 and time.time() < deadline:
        page.wait_for_timeout(250)
    assert charts.count() == 3                  # curves, interference, null space
    assert {"en", "zh", "all languages"} <= curve_names(page)
    shot(page, "sequential_done.png", full_page=True)

    # switch the metric and the interference view
    page.get_by_text("Generality", exact=True).first.click()
    settled(page)
    page.get_by_text("change since the batch's own step", exact=True).click()
    settled(page)
    pick(page, "Method", "memit")
    shown(page, "memit: Efficacy − right after its own step")
    assert_clean(page, "switching views")

    # the state as a zip
    archive = zipfile.ZipFile(io.BytesIO(download(page, page, "Download the langedit state")))
    assert sorted(archive.namelist()) == ["langedit-state/state.json", "langedit-state/state.safetensors"]
    state = json.loads(archive.read("langedit-state/state.json"))
    assert len(state["steps"]) == 2 and [s["language"] for s in state["steps"]] == ["en", "zh"]

    # leave and come back: the run is shown again
    go_to(page, "Home")
    shown(page, "Facts per relation × language", timeout=LONG)
    go_to(page, "Sequential editing")
    shown(page, "langedit 2/2, alphaedit 2/2, memit 2/2", timeout=LONG)
    assert_clean(page, "leaving and coming back")

    # a second browser session opens the same folder
    other = browser.new_context(viewport=TALL)
    second = other.new_page()
    second.goto(app_url + "/sequential")
    shown(second, "Run the stream", timeout=LONG)
    second.get_by_text("Open a run folder", exact=True).click()
    settled(second)
    commit(second, second.get_by_role("textbox", name="…or another folder", exact=True), out)
    submit(second, "Open the run")
    shown(second, "langedit 2/2, alphaedit 2/2, memit 2/2", timeout=LONG)
    assert_clean(second, "a second session")
    other.close()

    # the same stream again: the folder holds it, nothing is recomputed, the page shows it at once
    submit(page, "Run the stream")
    shown(page, "langedit 2/2, alphaedit 2/2, memit 2/2", timeout=LONG)
    idle(page)
    assert_clean(page, "the same stream again")

    # roll back to step 1
    pick(page, "Roll back to step", "1")
    submit(page, "Roll back every method")
    shown(page, "langedit 1/2, alphaedit 1/2, memit 1/2", timeout=LONG)
    assert_clean(page, "rollback")
    shot(page, "sequential_rolled_back.png", full_page=True)
    page.close()
