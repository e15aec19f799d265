"""Benchmark: on the Neuron atlas page, the time from clicking Run to Figure 1 with the page's default
settings, cold (the first run after `neuroglot app`) and warm (the same request again), against the
backend call the page makes, measured in the same run.

    .venv/bin/python bench/app_atlas.py [--screenshot bench/results/atlas_page.png]

It starts `neuroglot app` on a free port with an empty run-folder cache (the converted embedded model is
reused from the usual cache, so model conversion is not timed), opens the page in headless Chromium
(/usr/bin/chromium), clicks Run and waits until Figure 1's headline ("LAFNs at β = …") and its plot are
drawn; then clicks Run again (warm: read back from the run folder). The baseline is the page's own backend
call, `analysis.neurons.atlas_counts` on the same request, timed in this process on another empty cache
(model loaded beforehand, as the app's Home page does). Printed: cold, warm, the backend time and
cold / backend.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.model import cache_root  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


def fresh_cache() -> Path:
    """An empty cache root that shares the converted models (and the .gguf) with the usual one."""
    root = Path(tempfile.mkdtemp(prefix="neuroglot-bench-"))
    for name in ("models", "gguf"):
        if (cache_root() / name).exists():
            (root / name).symlink_to(cache_root() / name)
    return root


def start_app(cache: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NEUROGLOT_CACHE=str(cache))
    exe = Path(sys.executable).parent / "neuroglot"
    proc = subprocess.Popen([str(exe), "app", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("the app did not start within 300 s")


def click_run_until_figure(page) -> float:
    """Seconds from clicking Run to Figure 1 drawn."""
    page.get_by_role("button", name="Run", exact=True).wait_for(timeout=300_000)
    page.wait_for_timeout(500)
    t0 = time.perf_counter()
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_timeout(300)   # the click's rerun has started; the old result (if any) goes stale
    page.locator("[data-testid='stStatusWidget']").filter(has_text="Running").wait_for(state="detached",
                                                                                     timeout=1_800_000)
    page.get_by_text("LAFNs at β =").locator("visible=true").first.wait_for(timeout=1_800_000)
    page.locator(".js-plotly-plot .legend").first.wait_for(timeout=120_000)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--screenshot", default=None, help="save the page after the cold run here")
    args = ap.parse_args()
    if not Path("/usr/bin/chromium").exists():
        raise SystemExit("needs Debian's chromium (/usr/bin/chromium)")
    from playwright.sync_api import sync_playwright

    cache = fresh_cache()
    proc, url = start_app(cache)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url + "/atlas")
            cold = click_run_until_figure(page)
            if args.screenshot:
                page.screenshot(path=args.screenshot, full_page=True)
            warm = click_run_until_figure(page)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    # The baseline: the page's backend call on the same default request, in this process, on an empty cache.
    os.environ["NEUROGLOT_CACHE"] = str(fresh_cache())
    from analysis import neurons as nr
    from analysis.model import load_model
    from data import load_corpus

    wb = load_model("embedded")
    corp = load_corpus("demo", languages=["en", "zh"], max_facts=10).aligned(["en", "zh"])
    t0 = time.perf_counter()
    nr.atlas_counts(wb, corp, ["en", "zh"], positions=nr.POSITIONS[0], text=nr.TEXTS[0])
    backend = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(os.environ["NEUROGLOT_CACHE"], ignore_errors=True)

    print("atlas Run -> Figure 1, default settings (en, zh; 10 facts per relation; all tokens; statements)")
    print(f"  cold (first run after `neuroglot app`): {cold:6.1f} s")
    print(f"  warm (the same request again):          {warm:6.1f} s")
    print(f"  baseline: the backend call alone:       {backend:6.1f} s")
    print(f"cold / backend: {cold / backend:.2f}")


if __name__ == "__main__":
    main()
