"""Real-browser support shared by every browser test module: the app as a subprocess (one per test
session) and headless Chromium. The fixtures are registered in conftest.py."""
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
from playwright.sync_api import TimeoutError as PlaywrightTimeout

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]

def _require_chromium():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium installed (.ci/run installs it)")
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def browser():
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def shown(page, *texts: str, timeout: int = 60_000) -> str:
    """Wait until every text is on the page, then return the page's text.

    Streamlit draws a script run's elements one after another, so a text that comes later in the script
    may not be there yet when an earlier one appears: wait for each text instead of reading the body once.
    An exception shown meanwhile fails at once, and a timeout fails with what the page said instead, so a
    failure on CI says why."""
    deadline = time.time() + timeout / 1000
    for text in texts:
        # only a visible copy counts: plotly keeps hidden copies of some texts (e.g. legend entries)
        target = page.get_by_text(text, exact=False).locator("visible=true").first
        while True:
            try:
                target.wait_for(timeout=2_000)
                break
            except PlaywrightTimeout:
                body = page.inner_text("body")
                if any(f in body for f in FAULTS) or page.locator("[data-testid='stException']").count():
                    _fail_with(page, f"an exception while waiting for {text!r}", body)
                if time.time() > deadline:
                    _fail_with(page, f"{text!r} not shown within {timeout / 1000:.0f} s", body)
    return page.inner_text("body")


def _fail_with(page, why: str, body: str) -> None:
    name = "failure-" + "".join(c if c.isalnum() else "-" for c in why[:40]) + ".png"
    try:
        shot(page, name, full_page=True)
    except Exception:   # a screenshot is a bonus; the message below is the report
        pass
    pytest.fail(f"{why}; the page said:\n{body[:4000]}", pytrace=False)


def shot(page, name: str, full_page: bool = False) -> None:
    """A screenshot into ``NEUROGLOT_SHOTS`` (default /tmp)."""
    page.screenshot(path=str(Path(os.environ.get("NEUROGLOT_SHOTS", "/tmp")) / name), full_page=full_page)




FAULTS = ("Traceback", "Something went wrong", "CacheReplayClosureError", "KeyError", "StreamlitAPIException")


def assert_clean(page, step: str) -> str:
    """After a user step: no exception box and no exception text on the page; returns the page's text."""
    body = page.inner_text("body")
    found = [f for f in FAULTS if f in body]
    exceptions = page.locator("[data-testid='stException']").count()
    assert not found and not exceptions, f"after {step}: {found or 'an exception box'} on the page:\n{body[:3000]}"
    return body


def settled(page, timeout: int = 600_000) -> None:
    """Wait until Streamlit has finished the current script run (its status widget says "Running" meanwhile)."""
    running = page.locator("[data-testid='stStatusWidget']").filter(has_text="Running")
    idle = 0
    deadline = time.time() + timeout / 1000
    while idle < 2 and time.time() < deadline:   # idle at two looks 300 ms apart: a rerun a click started late
        page.wait_for_timeout(300)               # is not missed
        if running.count():
            running.wait_for(state="detached", timeout=timeout)
            idle = 0
        else:
            idle += 1


def move_slider(page, label: str, presses: int) -> None:
    """Move the slider named ``label`` by ``presses`` steps with the keyboard (negative: to the left).

    One step at a time, as a user who watches the page: press, wait until the thumb shows the new value and
    the rerun it starts has finished, then the next step. A key press that lands while the previous rerun
    redraws the slider can be lost on a busy machine; it is pressed again (the slider must end exactly
    ``presses`` steps away, checked on its value)."""
    def thumb():
        found = page.get_by_role("slider", name=label)
        if not found.count():
            found = page.locator("[data-testid='stSlider']").filter(has_text=label).get_by_role("slider")
        return found.first

    def value() -> float:
        return float(thumb().input_value(timeout=60_000))  # the thumb is an <input type="range">

    key = "ArrowRight" if presses > 0 else "ArrowLeft"
    for _ in range(abs(presses)):
        start = value()
        for _attempt in range(4):
            thumb().focus()
            thumb().press(key)
            deadline = time.time() + 15
            while value() == start and time.time() < deadline:
                page.wait_for_timeout(250)
            settled(page)
            if value() != start:
                break
        else:
            _fail_with(page, f"the slider {label!r} did not move from {start} after four key presses",
                       page.inner_text("body"))
        now = value()
        assert (now > start) == (presses > 0), f"slider {label!r} moved the wrong way: {start} -> {now}"


def download(page, container, label: str):
    """Click the download button ``label`` inside ``container``; returns the saved file's bytes."""
    from playwright.sync_api import Error as PlaywrightError

    button = container.locator("[data-testid='stDownloadButton']").filter(has_text=label).first
    for attempt in range(3):
        settled(page)
        try:
            with page.expect_download(timeout=120_000) as info:
                button.click()
            return Path(info.value.path()).read_bytes()
        except PlaywrightError as exc:
            # A rerun that starts while the file is fetched (a tab click's rerun that began after `settled`
            # looked) replaces the page's media files, and the browser cancels the download; a user clicks
            # again, and so does this helper, once the page has finished its run.
            if "canceled" not in str(exc) or attempt == 2:
                raise


def select_first_row(page, table) -> None:
    """Tick the row-selection box of a st.dataframe's first data row (it sits at the table's left edge)."""
    select_row(page, table, 0)


def select_row(page, table, row: int, row_height: int = 35) -> None:
    """Tick the row-selection box of data row ``row`` (0-based) of a st.dataframe with the default row height."""
    table.wait_for(timeout=120_000)
    table.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    box = table.bounding_box()
    page.mouse.click(box["x"] + 15, box["y"] + 55 + row_height * row)


def go_to(page, title: str) -> None:
    """Leave for another page through the sidebar navigation, as a user does."""
    page.locator("[data-testid='stSidebarNav']").get_by_text(title, exact=True).click()


def commit(page, box, text: str) -> None:
    """Type ``text`` into an input and leave it with Tab, as a user who then reaches for the button: the value
    is committed without submitting the form (Enter would submit it, and a submit that lands while the page
    is still redrawing after the previous click can send a half-drawn form). Waits until the page has
    finished the rerun the commit may start and the box shows the value."""
    box.wait_for(timeout=120_000)
    box.fill(text)
    box.press("Tab")
    settled(page)
    value = box.input_value(timeout=60_000)
    if value != text:
        _fail_with(page, f"the input shows {value!r} after typing {text!r}", page.inner_text("body"))


def submit(page, name: str) -> None:
    """Click the button ``name`` once the page has finished its current run (so the form it sends is whole)."""
    settled(page)
    page.get_by_role("button", name=name, exact=True).click()


def typed_fact_mode(page, url: str, path: str, last_box: str) -> None:
    """Open a page with a fact picker and switch it to "Type a fact"; wait until that redraw has finished."""
    page.goto(url + path)
    page.get_by_text("Type a fact").wait_for(timeout=180_000)
    settled(page)
    page.get_by_text("Type a fact").click()
    page.get_by_role("textbox", name=last_box).wait_for(timeout=120_000)
    settled(page)


# The first request of each analysis page, as a user makes it (small, so that a test runs in minutes).
def run_small_atlas(page, url: str) -> None:
    page.goto(url + "/atlas")
    page.get_by_role("button", name="Run", exact=True).wait_for(timeout=180_000)
    commit(page, page.get_by_role("spinbutton", name="Facts per relation"), "1")
    submit(page, "Run")


def run_typed_attribution(page, url: str) -> None:
    typed_fact_mode(page, url, "/attribution", "Answer (zh)")
    commit(page, page.get_by_role("spinbutton", name="Steps m"), "4")
    submit(page, "Compute")


def run_typed_trace(page, url: str) -> None:
    typed_fact_mode(page, url, "/tracing", "Subject (de)")
    commit(page, page.get_by_role("spinbutton", name="Noise samples"), "2")
    submit(page, "Trace")
