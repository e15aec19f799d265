"""Real-browser tests of the Home page: the app as a subprocess, opened in headless Chromium (tests/browser.py).
Each analysis page and the Edit lab have their own interaction tests (test_browser_pages.py,
test_browser_edit_lab.py), which do everything the first per-page tests here did and then keep clicking."""
from __future__ import annotations

import pytest

from tests.browser import shot, shown

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
