"""The Compare page used as a user does (issue 16), in headless Chromium on the embedded model: two editors on a
typed en+zh fact, the grid (a row per probe, an answer column per editor) and its CSV, the same request again
(every edit read back from the disk cache), the transfer matrices (a heatmap per editor with the value written
in each cell) under two cell values, the "why did it transfer" figure (another editor, another β), leaving the
page and coming back (the comparison is read back from disk, nothing is computed), a second browser session (it starts empty and runs its own comparison, read back from
the same cache), and a bad hyper-parameter (an error box; the earlier comparison stays).

Cheap editors keep the test to minutes on a CPU: LU-LAFNs with two layers, two steps and one short prefix (as
the Edit lab's browser test), and IKE (an in-context edit computes nothing but its prompt). Every wait is for
what the page says, never for a fixed time."""
from __future__ import annotations

import io
import json
import time

import pandas as pd
import pytest

from tests.browser import assert_clean, commit, download, go_to, settled, shot, shown, submit, typed_fact_mode

pytestmark = [pytest.mark.slow, pytest.mark.browser]

TALL = {"width": 1400, "height": 2400}
LONG = 600_000                               # a loaded machine: wait for what the page says, up to 10 minutes
EDITORS = ("lu-lafns", "ike")
CHEAP = {"lu-lafns": dict(layers=[9, 17], steps=2, n_prefixes=1, prefix_length=2, paraphrase_sources=["prompt"])}
MARKER = {"lu-lafns": "beta", "ike": "corpus"}    # a field only that editor's hyper-parameters have
# The default typed fact (app/widgets.py EDIT_EXAMPLES) in en and zh: en has a paraphrase, a locality and a
# portability question, zh a paraphrase and a locality question.
PROBES = [("en", "edit"), ("en", "paraphrase 1"), ("en", "locality 1"), ("en", "portability 1"),
          ("zh", "edit"), ("zh", "paraphrase 1"), ("zh", "locality 1")]
GRID = "Every probe, every editor"
EMPTY = "Choose a fact and the editors, then press"


def multiselect(page, label: str):
    return page.locator("[data-testid='stMultiSelect']").filter(has=page.get_by_role("combobox", name=label)).first


def remove_chip(page, widget: str, chip: str) -> None:
    """Remove the chosen option ``chip`` from the multiselect labelled ``widget`` (its chip's ×)."""
    remove = multiselect(page, widget).get_by_role("button", name=f"Remove {chip}", exact=True)
    remove.click()
    remove.wait_for(state="detached", timeout=LONG)
    settled(page)


def add_option(page, widget: str, option: str) -> None:
    """Choose ``option`` in the multiselect labelled ``widget`` from its drop-down list."""
    select = multiselect(page, widget)
    select.get_by_role("combobox", name=widget).click()
    page.get_by_role("option", name=option, exact=True).click()
    page.keyboard.press("Escape")
    select.get_by_role("button", name=f"Remove {option}", exact=True).wait_for(timeout=LONG)
    settled(page)


def chosen(page, widget: str) -> list[str]:
    """The options the multiselect labelled ``widget`` shows as chosen (its chips)."""
    return multiselect(page, widget).locator("[data-tag]").evaluate_all(
        "tags => tags.map(t => t.getAttribute('aria-label'))")


def pick_fact_and_editors(page, url: str) -> None:
    """The typed Eiffel Tower fact in en and zh (German removed), and the editors LU-LAFNs and IKE only."""
    typed_fact_mode(page, url, "/compare", "Subject (de)")
    remove_chip(page, "Languages", "de · German")
    page.get_by_role("textbox", name="Subject (de)").wait_for(state="detached", timeout=LONG)
    for name in [n for n in chosen(page, "Editors") if n not in EDITORS]:
        remove_chip(page, "Editors", name)
    for name in EDITORS:
        if name not in chosen(page, "Editors"):
            add_option(page, "Editors", name)
    assert sorted(chosen(page, "Editors")) == sorted(EDITORS)


def hparams_box(page, editor: str):
    """The editor's JSON box (its expander opened), once it holds this editor's preset."""
    box = page.get_by_label(f"{editor} hyper-parameters (JSON", exact=False)
    if not box.is_visible():
        page.get_by_text(f"{editor} · hyper-parameters", exact=True).click()
    box.wait_for(timeout=LONG)
    deadline = time.time() + LONG / 1000
    while time.time() < deadline:
        try:
            if MARKER[editor] in json.loads(box.input_value(timeout=5_000)):
                break
        except ValueError:
            pass
        page.wait_for_timeout(250)           # polling what the page shows, not a fixed wait
    return box


def set_hparams(page, editor: str, values: dict) -> None:
    """Write ``values`` over the editor's preset in its JSON box, as a user edits the box."""
    box = hparams_box(page, editor)
    hparams = json.loads(box.input_value())
    hparams.update(values)
    box.fill(json.dumps(hparams))
    box.press("Control+Enter")
    settled(page)


def run_comparison(page) -> str:
    submit(page, "Run comparison")
    shown(page, GRID, timeout=LONG)
    settled(page, timeout=LONG)
    return shown(page, GRID, "Grid (CSV)", timeout=LONG)


def table_text(page, first_headers: list[str]) -> dict[str, list]:
    """The column headers and rows of the st.dataframe whose first columns are ``first_headers``, as the page's
    accessible grid gives them, once it is drawn. The grid draws only the columns in view: it is scrolled to
    its right end and back, as a user reads a wide table, and the headers of both views are joined in order."""
    found = page.wait_for_function("""first => {
        const tables = Array.from(document.querySelectorAll("[data-testid='stDataFrame']"));
        const i = tables.findIndex(t => {
            const h = Array.from(t.querySelectorAll('[role=columnheader]')).map(e => e.innerText.trim());
            return first.every((f, k) => h[k] === f) && t.querySelector('[role=gridcell]');
        });
        return i < 0 ? null : i + 1;
    }""", arg=first_headers, timeout=LONG)
    table = page.locator("[data-testid='stDataFrame']").nth(found.json_value() - 1)
    table.scroll_into_view_if_needed()
    read = """el => ({
        headers: Array.from(el.querySelectorAll('[role=columnheader]')).map(h => h.innerText.trim()),
        rows: Array.from(el.querySelectorAll('[role=row]'))
            .map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))
            .filter(r => r.length)})"""
    left = table.evaluate(read)
    scroller = table.locator(".dvn-scroller").first
    if not scroller.evaluate("s => s.scrollWidth > s.clientWidth"):
        return left                           # every column is in view
    scroller.evaluate("s => { s.scrollLeft = s.scrollWidth; }")
    right = table.evaluate(read)
    deadline = time.time() + 30
    while right["headers"] == left["headers"] and time.time() < deadline:   # redrawn on the grid's next frame
        page.wait_for_timeout(100)
        right = table.evaluate(read)
    scroller.evaluate("s => { s.scrollLeft = 0; }")
    return {"headers": list(dict.fromkeys(left["headers"] + right["headers"])), "rows": left["rows"]}


def heatmaps(page, count: int) -> list[dict]:
    """The drawn heatmaps (title, rows, columns, cell texts, colour-bar title) once ``count`` are there (plotly
    draws a chart after the script run that sent it)."""
    read = """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .filter(p => p.data && p.data.length && p.data[0].type === 'heatmap')
        .map(p => ({title: p.layout.title.text.replace(/<[^>]+>/g, ''), y: p.data[0].y, x: p.data[0].x,
                    text: p.data[0].text, colorbar: p.data[0].colorbar.title.text}))"""
    deadline = time.time() + LONG / 1000
    found = page.evaluate(read)
    while len(found) < count and time.time() < deadline:
        page.wait_for_timeout(300)
        found = page.evaluate(read)
    return found


def overlap_titles(page, count: int) -> list[str]:
    """The titles of the drawn "why did it transfer" figures (stacked bars of weight per layer) once ``count``
    are there; with ``count`` 0, once none is left."""
    read = """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .filter(p => p.data && p.data.length && p.layout.barmode === 'stack')
        .map(p => p.layout.title.text.replace(/<[^>]+>/g, ''))"""
    deadline = time.time() + LONG / 1000
    found = page.evaluate(read)
    while (len(found) < count if count else found) and time.time() < deadline:
        page.wait_for_timeout(300)
        found = page.evaluate(read)
    return found


def pick(page, label: str, option: str) -> None:
    """Choose ``option`` in the selectbox labelled ``label``, as a user does."""
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()
    settled(page, timeout=LONG)


def test_compare_two_editors_grid_cache_transfer_leave_return_second_session_and_a_bad_value(app_url, browser):
    page = browser.new_page(viewport=TALL)
    pick_fact_and_editors(page, app_url)
    assert_clean(page, "choosing the fact and the editors")
    set_hparams(page, "lu-lafns", CHEAP["lu-lafns"])
    hparams_box(page, "ike")                                  # its preset, as it is

    # 1. run: the timing table, the grid with an answer column per editor and a row per probe, the CSV
    body = run_comparison(page)
    assert_clean(page, "running the comparison")
    assert "could not edit" not in body
    assert "Comparing lu-lafns, ike on “The Eiffel Tower is located in the city of → Rome”" in body
    shot(page, "compare_grid.png", full_page=True)
    grid = pd.read_csv(io.StringIO(download(page, page, "Grid (CSV)").decode()))
    assert list(zip(grid["language"], grid["probe"])) == PROBES
    answers = [f"{m} · answer" for m in ("unedited",) + EDITORS]
    assert set(answers) <= set(grid.columns), list(grid.columns)
    assert grid.loc[0, "expected"] == "Rome" and grid.loc[2, "expected"] == "(unchanged) Tokyo"
    assert grid[answers].notna().all().all()
    successes = grid[[f"{m} · success" for m in ("unedited",) + EDITORS]]
    assert ((successes >= 0) & (successes <= 1)).all().all()
    assert (grid.loc[grid["probe"] == "locality 1", "unedited · success"] == 1).all()   # its own answer, kept
    shown_grid = table_text(page, ["language", "probe"])      # the page's grid says what the CSV says
    assert {"language", "probe", *answers} <= set(shown_grid["headers"]), shown_grid["headers"]
    column = shown_grid["headers"].index("unedited · answer")
    assert [r[:2] for r in shown_grid["rows"]] == [list(p) for p in PROBES]
    assert [r[column] for r in shown_grid["rows"]] == list(grid["unedited · answer"])
    timing = table_text(page, ["editor", "seconds"])
    assert timing["headers"][:3] == ["editor", "seconds", "from cache"], timing

    # 2. the same request again: every edit is read back from the disk cache
    run_comparison(page)
    assert_clean(page, "the same comparison again")
    again = table_text(page, ["editor", "seconds"])
    cache_column = again["headers"].index("from cache")
    assert [r[0] for r in again["rows"]] == list(EDITORS)
    assert [r[cache_column] for r in again["rows"]] == ["true", "true"], again

    # 3. the transfer matrices: a heatmap per editor, edit languages en, zh and both, a number in every cell
    page.get_by_role("button", name="Compute the transfer matrices", exact=False).click()
    shown(page, "Cell value", timeout=LONG)
    settled(page, timeout=LONG)
    drawn = heatmaps(page, 2)
    assert sorted(h["title"] for h in drawn) == [f"{m}: edit language × test language" for m in sorted(EDITORS)]
    for h in drawn:
        assert list(h["y"]) == ["en", "zh", "all"] and list(h["x"])[:2] == ["en", "zh"], h
        assert all(float(cell) >= 0 for row in h["text"] for cell in row if cell != "–"), h["text"]
        assert any(cell != "–" for row in h["text"] for cell in row)
        assert h["colorbar"].startswith("top-1 accuracy")
    assert_clean(page, "the transfer matrices")
    shot(page, "compare_transfer.png", full_page=True)

    # another cell value redraws the heatmaps from the same runs
    page.get_by_text("P(new target)", exact=True).click()
    settled(page, timeout=LONG)
    deadline = time.time() + LONG / 1000
    redrawn = heatmaps(page, 2)
    while not all(h["colorbar"].startswith("P(new target)") for h in redrawn) and time.time() < deadline:
        page.wait_for_timeout(300)
        redrawn = heatmaps(page, 2)
    assert len(redrawn) == 2 and all(h["colorbar"].startswith("P(new target)") for h in redrawn), redrawn
    assert_clean(page, "another cell value")

    # 3b. why did it transfer: the chosen edit's weight per layer against the fact's neurons; another editor
    # (IKE touches no neuron: said so, no figure), back to LU-LAFNs, and another β redraws the figure
    why = "lu-lafns: where the edit's weight falls, per layer"
    assert why in overlap_titles(page, 1), overlap_titles(page, 1)
    assert_clean(page, "the why section")
    pick(page, "Edit of", "ike")
    shown(page, "touches no FFN neuron", timeout=LONG)
    settled(page, timeout=LONG)
    assert overlap_titles(page, 0) == []
    pick(page, "Edit of", "lu-lafns")
    assert why in overlap_titles(page, 1)
    commit(page, page.get_by_role("spinbutton", name="β (lu-lafns Eq. 5)"), "0.20")
    assert why in overlap_titles(page, 1)
    assert_clean(page, "another editor and another β in the why section")
    shot(page, "compare_why.png", full_page=True)

    # 4. leave for the Edit lab and come back: the comparison shows again, read back from disk
    go_to(page, "Edit lab")
    shown(page, "Apply edit", timeout=LONG)
    settled(page, timeout=LONG)
    go_to(page, "Compare editors")
    body = shown(page, GRID, "Grid (CSV)", "Cell value", timeout=LONG)
    settled(page, timeout=LONG)
    assert_clean(page, "leaving and coming back")
    assert "Comparing lu-lafns, ike on" in body
    back = table_text(page, ["editor", "seconds"])
    assert [r[back["headers"].index("from cache")] for r in back["rows"]] == ["true", "true"], back
    assert len(heatmaps(page, 2)) == 2
    # the fact picker too: still the typed fact in en and zh (German removed), not the record picker
    assert page.get_by_role("textbox", name="Subject (zh)").is_visible()
    assert page.get_by_role("textbox", name="Subject (de)").count() == 0

    # 5. a second browser session starts empty, and runs its own comparison (IKE alone, read back from the cache)
    other = browser.new_context(viewport=TALL)
    second = other.new_page()
    second.goto(app_url + "/compare")
    body2 = shown(second, EMPTY, timeout=LONG)
    settled(second)
    assert_clean(second, "a second session")
    assert GRID not in body2 and "Comparing" not in body2 and second.locator(".js-plotly-plot").count() == 0
    typed_fact_mode(second, app_url, "/compare", "Subject (de)")
    remove_chip(second, "Languages", "de · German")
    for name in [n for n in chosen(second, "Editors") if n != "ike"]:
        remove_chip(second, "Editors", name)
    add_option(second, "Editors", "ike")
    body2 = run_comparison(second)
    assert_clean(second, "the second session's comparison")
    assert "Comparing ike on" in body2
    own = table_text(second, ["editor", "seconds"])
    assert [r[0] for r in own["rows"]] == ["ike"] and own["rows"][0][own["headers"].index("from cache")] == "true"
    shot(second, "compare_second_session.png", full_page=True)
    other.close()
    shown(page, GRID, "Comparing lu-lafns, ike on")          # ... and the first session still shows its own

    # 6. a bad hyper-parameter: an error box, and the earlier comparison stays
    set_hparams(page, "lu-lafns", {"layers": [99]})
    submit(page, "Run comparison")
    body = shown(page, "99", GRID, timeout=LONG)
    settled(page, timeout=LONG)
    assert_clean(page, "a bad hyper-parameter")
    errors = page.locator("[data-testid='stAlertContentError']")
    assert errors.count() >= 1 and "layer" in errors.first.inner_text().lower(), body
    assert "Comparing lu-lafns, ike on" in body
    after = pd.read_csv(io.StringIO(download(page, page, "Grid (CSV)").decode()))
    assert after.equals(grid)
    errors.first.scroll_into_view_if_needed()
    shot(page, "compare_error.png")
    page.close()
