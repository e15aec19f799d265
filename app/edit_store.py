"""The Edit lab's edits of one browser session, kept as saved edit folders (``Edit.save``) on disk.

Each session gets its own temporary folder under one parent folder; ``st.session_state`` holds only
that folder (an object that removes it when the session's state is dropped) and, per edit, its id and
plain data: the tensors stay on disk (DESIGN: no tensors in session state). A server that was killed
never drops its sessions' state, so their folders would stay: every new session first removes the
session folders that nobody has used for :data:`STALE_AFTER` seconds (each page run of a session
touches its folder).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import weakref
import zipfile
from pathlib import Path

import streamlit as st

from analysis.errors import InputError
from editors.edit import Edit

STALE_AFTER = 24 * 3600.0   # seconds a session folder may stay untouched before a new session removes it
PREFIX = "session-"


def sessions_root() -> Path:
    """The parent of every session folder: ``<temp>/neuroglot-edit-lab-<uid>`` (``NEUROGLOT_EDIT_LAB_TMP``
    overrides it)."""
    if os.environ.get("NEUROGLOT_EDIT_LAB_TMP"):
        return Path(os.environ["NEUROGLOT_EDIT_LAB_TMP"])
    owner = f"-{os.getuid()}" if hasattr(os, "getuid") else ""
    return Path(tempfile.gettempdir()) / f"neuroglot-edit-lab{owner}"


def remove_stale_sessions(root: Path, max_age: float = STALE_AFTER, now: float | None = None) -> list[Path]:
    """Remove the session folders under ``root`` untouched for more than ``max_age`` seconds; returns them.
    Other files and folders are left alone, and a folder that cannot be removed is skipped."""
    now = time.time() if now is None else now
    removed = []
    for folder in sorted(root.glob(f"{PREFIX}*")) if root.is_dir() else []:
        try:
            stale = folder.is_dir() and not folder.is_symlink() and now - folder.stat().st_mtime > max_age
        except OSError:         # removed meanwhile by another session's sweep
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def new_session_folder(root: Path | None = None) -> Path:
    """A fresh session folder under ``root`` (default :func:`sessions_root`), after removing stale ones."""
    root = sessions_root() if root is None else root
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    remove_stale_sessions(root)
    return Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))


class _FolderCleanup:
    """Kept in ``st.session_state``: removes this session's edit folder when the session's state is dropped
    (and at exit). Read back by its ``root`` only (the page's classes are new objects on every run)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        weakref.finalize(self, shutil.rmtree, str(root), True)


def session_folder() -> Path:
    """This session's temporary folder of saved edits (``Edit.save``): one sub-folder and one zip per edit id.
    Touched on every call, so that it is not taken for the folder of a session long gone."""
    root = getattr(st.session_state.get("el_store"), "root", None)
    if root is None or not Path(root).is_dir():
        root = new_session_folder()
        st.session_state["el_store"] = _FolderCleanup(root)
    os.utime(root)
    return Path(root)


def save_edit(folder: Path, edit: Edit) -> str:
    """Save ``edit`` (and a zip of it for the download) under a new id."""
    edit_id = uuid.uuid4().hex
    saved = edit.save(folder / edit_id)
    with zipfile.ZipFile(folder / f"{edit_id}.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for file in sorted(saved.iterdir()):
            z.write(file, f"edit/{file.name}")
    return edit_id


def load_edit(folder: Path, edit_id: str) -> Edit:
    if not (folder / edit_id).is_dir():
        raise InputError("This session's saved copy of an edit is gone (its temporary folder was removed). "
                         "Press Revert all and apply the edit again.")
    return Edit.load(folder / edit_id)


def remove_edit(folder: Path, edit_id: str) -> None:
    shutil.rmtree(folder / edit_id, ignore_errors=True)
    (folder / f"{edit_id}.zip").unlink(missing_ok=True)


def edit_zip(folder: Path, edit_id: str) -> bytes:
    path = folder / f"{edit_id}.zip"
    return path.read_bytes() if path.exists() else b""
