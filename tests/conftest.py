"""Shared pytest setup: make the repository root importable (``analysis``, ``tests.tiny``)
also when pytest is started as ``pytest`` rather than ``python -m pytest``."""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
