"""Evaluation run folders (``neuroglot evaluate``) on top of :mod:`analysis.runs`.

An evaluation folder holds ``run.json`` (kind "evaluate"), ``config.json`` (what the
run evaluates), ``rows.jsonl`` (one line per finished record and method, appended as
the run goes, so an interrupted run resumes) and the derived ``tables.md`` and
``probes.csv``. The derived files are removed before new rows are appended and
written again (atomically) from the rows when the run ends or is interrupted, so
they never disagree with the rows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from analysis import runs
from analysis.errors import InputError

CONFIG_FILE = "config.json"
ROWS_FILE = "rows.jsonl"
DERIVED = ("tables.md", "probes.csv")


def read_config(folder: str | Path) -> dict[str, Any] | None:
    """``config.json`` of ``folder`` as a dict; None when there is none; InputError when it cannot be read."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text, so not an evaluation config.") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is damaged ({exc}).") from None
    if not isinstance(data, dict) or "test_languages" not in data or "methods" not in data:
        raise InputError(f"{path} is not the config of an evaluation run.")
    return data


def check_folder(out: str | Path, identity: Mapping[str, Any], identity_of: Callable[[Mapping], dict],
                 overwrite: bool = False, what: str = "") -> str:
    """Before any work: may ``out`` receive the evaluation whose identity is ``identity``?

    "new" (nothing there), "resume" (the same evaluation) or "replace" (``overwrite``
    given for a folder holding something else). Another command's folder, other
    files, or another evaluation without ``overwrite`` raise an InputError.
    """
    key = runs.request_key(dict(identity))
    info = runs.claim(out, "evaluate", overwrite=overwrite, what=what)
    label = f"{what} {info.path}" if what else str(info.path)
    if info.state in ("absent", "empty"):
        return "new"
    try:
        old = read_config(info.path)
    except InputError:
        if overwrite:
            return "replace"
        if info.state == "run" and info.key == key:
            return "resume"  # run.json names this evaluation: the config is written again
        raise
    if old is None:
        if info.state == "run" and info.key == key:
            return "resume"
        if overwrite:
            return "replace"
        raise InputError(f"{label} has evaluation rows but no {CONFIG_FILE}, so they cannot be matched to this "
                         f"evaluation; {runs.OVERWRITE_HINT}.")
    if identity_of(old) != dict(identity):
        if overwrite:
            return "replace"
        raise InputError(f"{label} holds another evaluation ({old.get('dataset')}, model {old.get('model')}, "
                         "other test languages or hyper-parameters); choose a new --out folder, or replace it "
                         "on purpose with --overwrite.")
    return "replace" if overwrite else "resume"


def start_folder(out: Path, state: str, config: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Write ``config`` into ``out``: a new folder for "new"/"replace", the config updated in place for "resume"."""
    key = runs.request_key(dict(identity))
    text = json.dumps(dict(config), indent=2, ensure_ascii=False)
    if state in ("new", "replace"):
        runs.write_run(out, "evaluate", key, dict(identity), lambda tmp: (tmp / CONFIG_FILE).write_text(
            text, encoding="utf-8"))
        return
    runs.write_text(out / CONFIG_FILE, text)
    if runs.inspect(out).key != key:
        runs.write_record(out, "evaluate", key, dict(identity))


def drop_derived(out: Path) -> None:
    """Remove ``tables.md`` and ``probes.csv`` before rows are added: stale tables must not outlive them."""
    for name in DERIVED:
        (out / name).unlink(missing_ok=True)
