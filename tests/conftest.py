"""Shared pytest setup: make the repository root importable (``analysis``, ``tests.tiny``)
also when pytest is started as ``pytest`` rather than ``python -m pytest``."""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


import pytest  # noqa: E402
import torch  # noqa: E402

from tests.browser import app_url, browser  # noqa: E402,F401  (real-browser fixtures, one app per session)


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tests that are not marked slow run tiny models on one intra-op thread: their matrices are too
    small to share, and on a busy machine a second thread turns each small op into a wait for a
    descheduled thread. Slow tests (the embedded model) keep the default thread count."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fail_own_deprecations(found) -> None:
    if found:
        lines = "\n".join(f"  {d}" for d in dict.fromkeys(found))
        pytest.fail(f"our own code made a deprecated call (issue 12 part 7; tests/deprecations.py):\n{lines}",
                    pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _watched_phase())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _watched_phase())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _watched_phase())


def _watched_phase():
    """Run one test phase recording deprecations that our packages' calls cause; fail the phase on any."""
    from tests.deprecations import watching

    found: list = []
    with watching(found):
        result = yield
    _fail_own_deprecations(found)
    return result
