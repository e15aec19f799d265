"""The Edit lab's session folders (app/edit_store.py): folders of sessions long gone are removed when a new
session starts; live ones, and anything else in the parent folder, are left alone."""
from __future__ import annotations

import os
import time

from app.edit_store import PREFIX, STALE_AFTER, new_session_folder, remove_stale_sessions


def _aged(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_new_session_removes_only_the_folders_of_sessions_long_gone(tmp_path):
    root = tmp_path / "sessions"
    gone, recent = new_session_folder(root), new_session_folder(root)
    (gone / "abc").mkdir()
    (gone / "abc" / "edit.json").write_text("{}")
    (gone / "abc.zip").write_bytes(b"zip")
    _aged(gone, STALE_AFTER + 60)                         # untouched for more than a day: removed
    _aged(recent, STALE_AFTER - 3600)                     # used an hour before the limit: kept
    other = root / "notes"                                # not a session folder: never touched
    other.mkdir()
    _aged(other, 10 * STALE_AFTER)

    fresh = new_session_folder(root)

    assert not gone.exists()
    assert recent.is_dir() and fresh.is_dir() and other.is_dir()
    assert fresh.name.startswith(PREFIX) and fresh.parent == root
    assert sorted(p.name for p in root.iterdir()) == sorted([recent.name, fresh.name, "notes"])


def test_remove_stale_sessions_takes_the_age_and_the_clock(tmp_path):
    a, b = tmp_path / f"{PREFIX}a", tmp_path / f"{PREFIX}b"
    a.mkdir()
    b.mkdir()
    _aged(a, 100)
    now = time.time()
    assert remove_stale_sessions(tmp_path, max_age=50, now=now) == [a]
    assert remove_stale_sessions(tmp_path, max_age=50, now=now + 3600) == [b]
    assert remove_stale_sessions(tmp_path / "absent") == []
