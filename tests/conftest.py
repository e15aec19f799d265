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


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, request):
    """``tiny_checkpoint(family)``: the folder of a tiny random checkpoint of ``family`` (tests/tiny.py), written
    once per test module and family. Each module gets folders of its own (named after it, e.g.
    ``tiny-llama-edit_lab0``), so a model spec (and the Workbench the app caches for it) is never shared between
    modules."""
    from tests.tiny import save_tiny_checkpoint

    module = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    folders: dict[str, Path] = {}

    def folder(family: str = "llama") -> Path:
        if family not in folders:
            folders[family] = tmp_path_factory.mktemp(f"tiny-{family}-{module}")
            save_tiny_checkpoint(family, folders[family])
        return folders[family]

    return folder


@pytest.fixture(scope="module")
def tiny_spec(tiny_checkpoint) -> str:
    """The model spec (a folder path) of this module's tiny llama checkpoint, as the pages and the CLI take it."""
    return str(tiny_checkpoint("llama"))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """``NEUROGLOT_CACHE`` in this test's tmp dir: edits and statistics cached by one test are not read back by
    another. A module opts in with ``pytestmark = pytest.mark.usefixtures("private_cache")``."""
    monkeypatch.setenv("NEUROGLOT_CACHE", str(tmp_path / "cache"))


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
