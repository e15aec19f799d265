"""One exception family for everything a user can get wrong.

Messages are written for users: the CLI prints them and exits with code 2,
the app shows them in an error box and keeps running.
"""
from __future__ import annotations


class NeuroglotError(Exception):
    """Base of every error caused by user input (bad spec, bad file, bad value)."""


class ModelSpecError(NeuroglotError):
    """The model spec cannot be resolved: unknown spec, missing file, download failure."""


class UnsupportedArchitectureError(NeuroglotError):
    """The model loads but its family has no architecture adapter."""


class CorpusError(NeuroglotError):
    """A corpus cannot be read: missing file, malformed line, unknown language, bad pattern."""


class InputError(NeuroglotError):
    """A parameter value is out of range or inconsistent with the others."""
