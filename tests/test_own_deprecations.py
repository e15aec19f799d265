"""The mechanism that turns our own deprecated calls into test errors (tests/deprecations.py).

Probe code is compiled with a file name inside ``analysis/`` (no file is written there), so
its frames look like ours to the stack walk; its module name stays outside our packages so
that pyproject's ``filterwarnings`` (which matches on module names) does not raise first.
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from transformers.utils.deprecation import deprecate_kwarg

from tests.deprecations import ROOT, watching
from tests.tiny import tiny_model

PROBE_FILE = str(ROOT / "analysis" / "_deprecation_probe.py")
LIBRARY_FILE = "/site-packages/somelib/internal.py"


def _compile(source: str, filename: str, name: str = "deprecation_probe") -> dict:
    namespace: dict = {"__name__": name}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def _probe(source: str) -> dict:
    """Functions defined by ``source`` whose frames sit in analysis/."""
    return _compile(source, PROBE_FILE)


class Renamed(torch.nn.Module):
    """A module whose forward renames a keyword the way transformers announces it (deprecate_kwarg)."""

    @deprecate_kwarg("old", version="99.0", new_name="new")
    def forward(self, x, new=None):
        return x


def test_renamed_keyword_through_module_call_is_ours():
    """The FutureWarning is attributed to torch's Module.__call__; the walk finds our call."""
    call = _probe("def call(m, x):\n    return m(x, old=1)\n")["call"]
    found: list = []
    with watching(found), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        call(Renamed(), torch.zeros(1))
    assert [w.category for w in shown] == [FutureWarning]
    assert "torch" in shown[0].filename  # what a module filter in filterwarnings would see
    assert len(found) == 1 and found[0].filename == PROBE_FILE and found[0].lineno == 2
    assert "`old` is deprecated" in found[0].message


def test_same_call_from_a_test_is_not_ours():
    found: list = []
    with watching(found), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Renamed()(torch.zeros(1), old=1)
    assert found == []


def test_library_internal_deprecation_is_not_ours():
    """A library that warns about its own internals (stacklevel 1) during our call is not ours;
    with stacklevel 2 it names its caller, our code, and is."""
    lib = _compile("import warnings\n"
                   "def inner(level):\n    warnings.warn('x is deprecated', DeprecationWarning, stacklevel=level)\n",
                   LIBRARY_FILE)
    call = _probe("def call(f, level):\n    f(level)\n")["call"]
    for level, expected in ((1, 0), (2, 1)):
        found: list = []
        with watching(found), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(lib["inner"], level)
        assert len(found) == expected, level


def test_pyproject_filter_raises_for_warnings_attributed_to_our_modules():
    """pyproject's filterwarnings: a FutureWarning whose module is one of our packages is an error."""
    fn = _compile("import warnings\ndef f():\n    warnings.warn('soon gone', FutureWarning)\n",
                  PROBE_FILE, name="analysis._deprecation_probe")["f"]
    found: list = []
    with watching(found), pytest.raises(FutureWarning, match="soon gone"):
        fn()
    assert len(found) == 1


@pytest.mark.skipif("cache" not in inspect.signature(transformers.LlamaModel.forward).parameters,
                    reason="this transformers has no `cache` keyword: `past_key_values` is not deprecated")
def test_past_key_values_keyword_and_attribute_are_caught():
    """transformers >= 5 (`cache`): passing `past_key_values=` warns (FutureWarning through
    deprecate_kwarg); reading `output.past_key_values` logs once (logger.warning_once)."""
    model = tiny_model("llama").model
    ids = torch.tensor([[1, 5, 6, 7]])
    probe = _probe("def run(m, ids):\n"
                   "    out = m(input_ids=ids[:, :2], use_cache=True)\n"
                   "    cache = out.past_key_values\n"
                   "    return m(input_ids=ids[:, 2:], past_key_values=cache)\n")
    found: list = []
    with watching(found), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            probe["run"](model, ids)
    kinds = {(d.category, d.lineno) for d in found}
    assert ("logged deprecation", 3) in kinds
    assert ("FutureWarning", 4) in kinds
    assert all(d.filename == PROBE_FILE for d in found)
