"""Our own deprecated calls are test errors (issue 12 part 7).

A deprecation warning (DeprecationWarning, PendingDeprecationWarning, FutureWarning, or a
``transformers`` logger message saying "deprecated") counts as *ours* when the call that
caused it was made from one of our packages (``app/``, ``analysis/``, ``editors/``, ``data/``).

pyproject's ``filterwarnings`` already turns a warning whose attributed frame lies in our
packages into an exception. That misses the common case: ``transformers`` announces
``past_key_values`` → ``cache`` with ``warnings.warn(..., FutureWarning, stacklevel=2)`` from
a ``deprecate_kwarg`` wrapper, so the warning is attributed to ``torch.nn.Module._call_impl``,
not to our ``base(**inputs)`` line; reading ``output.past_key_values`` logs through
``logger.warning_once`` and is no warning at all. So while a test runs, :func:`watching`
intercepts both, walks the stack from the attributed frame past frames that only pass the
call on (:data:`PASS_THROUGH`), and records the warning when the first other frame is ours.
``tests/conftest.py`` fails the test phase that recorded one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
OWN_PACKAGES: tuple[str, ...] = ("app", "analysis", "editors", "data")
CATEGORIES: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
#: Files whose frames only hand a call's arguments on (module __call__, decorators, wrappers,
#: nnsight's interleaving, logging): a deprecation raised through them belongs to their caller.
PASS_THROUGH: tuple[str, ...] = tuple(p.replace("/", os.sep) for p in (
    "/torch/nn/modules/module.py", "/transformers/utils/", "/accelerate/hooks.py", "/nnsight/",
    "/functools.py", "/contextlib.py", "/logging/__init__.py", "/tests/deprecations.py",
))


@dataclass(frozen=True)
class OwnDeprecation:
    """A deprecation caused by a call at ``filename:lineno`` in one of our packages."""

    category: str
    message: str
    filename: str
    lineno: int

    def __str__(self) -> str:
        where = os.path.relpath(self.filename, ROOT)
        return f"{where}:{self.lineno}: {self.category}: {self.message}"


def is_own(filename: str, roots: tuple[str, ...] | None = None) -> bool:
    """Whether ``filename`` lies in one of our packages."""
    roots = roots or tuple(str(ROOT / p) + os.sep for p in OWN_PACKAGES)
    return os.path.abspath(filename).startswith(roots)


def call_site(frame: FrameType | None) -> FrameType | None:
    """From the frame a warning is attributed to, the first frame that is not pass-through."""
    while frame is not None and any(p in frame.f_code.co_filename for p in PASS_THROUGH):
        frame = frame.f_back
    return frame


def _attributed(frame: FrameType | None, stacklevel: int) -> FrameType | None:
    """The frame ``warnings.warn(stacklevel=...)`` names, counting from ``frame`` (the caller of warn)."""
    for _ in range(max(int(stacklevel), 1) - 1):
        if frame is None:
            break
        frame = frame.f_back
    return frame


def _own(frame: FrameType | None, category: type[Warning], message: object) -> OwnDeprecation | None:
    site = call_site(frame)
    if site is None or not is_own(site.f_code.co_filename):
        return None
    return OwnDeprecation(category.__name__, str(message), site.f_code.co_filename, site.f_lineno)


class _DeprecatedLog(logging.Handler):
    """Records transformers' logged deprecations (``logger.warning_once``) caused by our calls."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" not in message.lower():
            return
        hit = _own(sys._getframe(1), FutureWarning, message)
        if hit is not None:
            _record(OwnDeprecation("logged deprecation", message, hit.filename, hit.lineno))


_active: list[list[OwnDeprecation]] = []  # innermost last; only it records


def _record(hit: OwnDeprecation | None) -> None:
    if hit is not None and _active:
        _active[-1].append(hit)


@contextlib.contextmanager
def watching(found: list[OwnDeprecation]) -> Iterator[list[OwnDeprecation]]:
    """Within the block, append every deprecation caused by our own calls to ``found``.

    Blocks nest: an inner block records instead of the outer one (a test of this module
    watches its own probes while conftest watches the test).
    """
    _active.append(found)
    if len(_active) > 1:
        try:
            yield found
        finally:
            _active.pop()
        return
    real_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if isinstance(cat, type) and issubclass(cat, CATEGORIES):
            _record(_own(_attributed(sys._getframe(1), stacklevel), cat, message))
        # one frame more: the warning keeps naming the frame its issuer meant
        return real_warn(message, category, stacklevel + 1, source, **kwargs)

    handler = _DeprecatedLog()
    tf_logger = logging.getLogger("transformers")
    warning_once = getattr(logging.Logger, "warning_once", None)  # transformers' lru_cached helper
    warnings.warn = warn
    tf_logger.addHandler(handler)
    if hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()  # a once-per-process message is seen in every test that causes it
    try:
        yield found
    finally:
        warnings.warn = real_warn
        tf_logger.removeHandler(handler)
        _active.pop()
