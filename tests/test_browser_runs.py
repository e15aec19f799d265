"""The Runs page used as a user does, in headless Chromium: open a small evaluation folder (IKE and LU-LAFNs on a
tiny random llama, built in the test) by typing its path, read its heatmaps and probe table, show only the
failures, select a row to see its record, download the CSV, leave for another page and come back, open the same
folder in a second browser session, and type a folder that is no run; open a small sequential run (MEMIT, two
steps), read its probe table at the last step, show only the failures, select a row to see its record after every
step and download the CSV; open a small overlap run (written by hand), filter its editors, select a point to see
its record under every editor and download the CSV. Every wait is for what the page says; screenshots go to the
test's tmp dir."""
from __future__ import annotations

import io
import time

import pandas as pd
import pytest

from tests.browser import assert_clean, commit, download, go_to, select_row, settled, shown, submit
from tests.tiny import (MZSRE_DEV, neuroglot_cache, overlap_points, raw_probes, raw_sequential_probes,
                        run_small_evaluation, run_small_sequential, write_overlap_run)

pytestmark = [pytest.mark.browser]

WIDE = {"width": 1400, "height": 2600}
LONG = 300_000


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser-runs")
    with neuroglot_cache(base / "cache"):
        return run_small_evaluation(base, "small-run")


def heatmap_titles(page) -> list[str]:
    return page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .filter(p => p.data && p.data.length && p.data[0].type === 'heatmap')
        .map(p => p.layout.title.text.replace(/<[^>]+>/g, ''))""")


def drawn_heatmaps(page, count: int, timeout: float = 120) -> list[str]:
    """The heatmaps' titles once ``count`` are drawn (plotly draws a chart after the script run that sent it)."""
    deadline = time.time() + timeout
    titles = heatmap_titles(page)
    while len(titles) < count and time.time() < deadline:
        page.wait_for_timeout(300)
        titles = heatmap_titles(page)
    return titles


def open_run(page, url: str, folder) -> None:
    page.goto(url + "/runs")
    shown(page, "Open the run", timeout=LONG)
    commit(page, page.get_by_role("textbox", name="…or a folder path", exact=True), str(folder))
    submit(page, "Open the run")
    settled(page)


def test_browse_an_evaluation_folder_filter_select_download_leave_and_a_second_session(app_url, browser, small_run,
                                                                                        tmp_path):
    raw = raw_probes(small_run)
    failed = sum(1 for p in raw if p["em"] < 1)
    page = browser.new_page(viewport=WIDE)
    open_run(page, app_url, small_run)
    shown(page, "Transfer: edit languages × test languages", f"{len(raw)} of {len(raw)} probes", timeout=LONG)
    body = assert_clean(page, "opening the small run")
    assert "ike, lu-lafns" in body and "tiny-llama" in body
    assert sorted(drawn_heatmaps(page, 2)) == ["ike: Reliability EM", "lu-lafns: Reliability EM"]
    cells = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .filter(p => p.data[0].type === 'heatmap').map(p => p.data[0].text)""")
    assert all(len(t) == 3 and all(len(r) == 3 for r in t) for t in cells)   # 3 edit sets × (en, de, x-avg)
    page.screenshot(path=str(tmp_path / "runs_opened.png"), full_page=True)

    # failures only: the count drops to the probes whose EM is below 1
    page.get_by_text("Failures only", exact=True).click()
    settled(page)
    shown(page, f"{failed} of {len(raw)} probes", timeout=LONG)
    assert_clean(page, "failures only")

    # select a row: its record's probes appear
    probes = page.locator("[data-testid='stDataFrame']").first
    select_row(page, probes, 0)
    settled(page)
    body = shown(page, "Record mzsre:", "The same record under every method", timeout=LONG)
    assert " · edited in " in body
    assert page.locator("[data-testid='stDataFrame']").count() >= 2           # the record's own probe table
    page.screenshot(path=str(tmp_path / "runs_selected.png"), full_page=True)

    # the CSV of the filtered table is exactly the failed probes
    csv = download(page, page.locator("body"), "CSV of these probes").decode()
    table = pd.read_csv(io.StringIO(csv))
    assert len(table) == failed and table["failed"].all()
    assert {"question", "expected", "before", "after"} <= set(table.columns)

    # leave and come back: the folder and the filter are still there
    go_to(page, "Home")
    settled(page)
    go_to(page, "Runs")
    shown(page, f"{failed} of {len(raw)} probes", timeout=LONG)
    assert len(drawn_heatmaps(page, 2)) == 2
    assert_clean(page, "coming back")

    # a second browser session opens the same folder on its own (no filter there)
    other = browser.new_context(viewport=WIDE)
    second = other.new_page()
    open_run(second, app_url, small_run)
    shown(second, f"{len(raw)} of {len(raw)} probes", timeout=LONG)
    assert len(drawn_heatmaps(second, 2)) == 2
    assert_clean(second, "the second session")
    second.screenshot(path=str(tmp_path / "runs_second_session.png"), full_page=True)
    other.close()

    # a folder that is no run: an error box, and the page keeps the run it showed
    commit(page, page.get_by_role("textbox", name="…or a folder path", exact=True), str(tmp_path))
    submit(page, "Open the run")
    # the error box comes first and shifts the elements below it, so Streamlit redraws them one after
    # another: wait for the kept run's caption instead of reading the page once (CI caught it mid-redraw)
    shown(page, "not a run folder", f"{failed} of {len(raw)} probes", timeout=LONG)
    assert_clean(page, "a folder that is no run")
    page.screenshot(path=str(tmp_path / "runs_bad_folder.png"), full_page=True)
    page.close()


@pytest.fixture(scope="module")
def small_sequential(tmp_path_factory):
    if not MZSRE_DEV.is_dir():
        pytest.skip("MzsRE dev data not found")
    base = tmp_path_factory.mktemp("browser-runs-seq")
    with neuroglot_cache(base / "cache"):
        return run_small_sequential(base, "small-seq")


def test_browse_a_sequential_runs_probes_filter_select_and_download(app_url, browser, small_sequential, tmp_path):
    raw = raw_sequential_probes(small_sequential)
    last = [p for p in raw if p["step"] == 2]
    failed = sum(p["failed"] for p in last)
    page = browser.new_page(viewport=WIDE)
    open_run(page, app_url, small_sequential)
    shown(page, "Probes after each step", f"{len(last)} of {len(raw)} probes · {failed} failed · step 2",
          timeout=LONG)
    body = assert_clean(page, "opening the sequential run")
    assert "keeps no per-record answers" not in body
    page.screenshot(path=str(tmp_path / "runs_sequential.png"), full_page=True)

    page.get_by_text("Failures only", exact=True).click()
    settled(page)
    shown(page, f"{failed} of {len(raw)} probes", timeout=LONG)
    tables = page.locator("[data-testid='stDataFrame']").count()
    probes = page.locator("[class*='st-key-runs-seq-probes-'] [data-testid='stDataFrame']").first
    select_row(page, probes, 0)
    settled(page)
    first = next(p for p in last if p["failed"])
    body = shown(page, f"Record {first['record']}", "after every step", timeout=LONG)
    assert page.locator("[data-testid='stDataFrame']").count() == tables + 1      # the record's own table
    page.screenshot(path=str(tmp_path / "runs_sequential_selected.png"), full_page=True)

    csv = download(page, page.locator("body"), "CSV of these probes").decode()
    table = pd.read_csv(io.StringIO(csv), keep_default_na=False)
    assert len(table) == failed and table["failed"].all() and set(table["step"]) == {2}
    assert {"question", "expected", "before", "after", "top1_before", "top1_after"} <= set(table.columns)
    assert_clean(page, "the sequential run's probes")
    page.close()


def test_browse_an_overlap_run_filter_select_and_download(app_url, browser, tmp_path):
    folder = write_overlap_run(tmp_path / "overlap")
    points = overlap_points()
    page = browser.new_page(viewport=WIDE)
    open_run(page, app_url, folder)
    body = shown(page, "Spearman's ρ per editor", "10 of 10 points · 5 records · 1 failed", timeout=LONG)
    assert_clean(page, "opening the overlap run")
    assert "editors: langedit, mpn" in body and "mzsre:4 · mpn: mpn: no subject token" in body
    deadline = time.time() + 120                 # plotly draws the chart after the script run that sent it
    names: list[str] = []
    while not names and time.time() < deadline:
        page.wait_for_timeout(300)
        names = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
            .flatMap(p => (p.data || []).map(t => t.name))""")
    assert names == ["langedit (ρ = +1.00)", "mpn"]

    # only MPN's points, then a point: its record under both editors
    page.get_by_role("combobox", name="Editor").click()
    page.get_by_role("option", name="mpn", exact=True).click()
    page.keyboard.press("Escape")
    settled(page)
    shown(page, "5 of 10 points", timeout=LONG)
    table = page.locator("[class*='st-key-runs-ov-points-'] [data-testid='stDataFrame']").first
    select_row(page, table, 1)
    settled(page)
    shown(page, "Record mzsre:1 under every editor", timeout=LONG)
    page.screenshot(path=str(tmp_path / "runs_overlap_selected.png"), full_page=True)
    csv = download(page, page.locator("body"), "CSV of these points").decode()
    table = pd.read_csv(io.StringIO(csv))
    assert len(table) == (points["method"] == "mpn").sum() and set(table["method"]) == {"mpn"}
    assert_clean(page, "the overlap run's points")
    page.close()
