"""Run folders: where long computations keep their results, and how they are written safely.

One mechanism for every command that writes a folder (the neuron atlas, attribution,
causal tracing, evaluation runs) and for saved edits:

* **Request key.** :func:`request_key` hashes everything that determines a result.
* **Manifest.** ``run.json`` records which command (``kind``) wrote the folder, its
  request key, the request in readable form, when, and the versions used.
* **Check before work.** :func:`claim` says what a folder holds before anything is
  computed: nothing (new), this very request (reuse it), this request but damaged
  files (recompute), or something else — another request or another command's
  results, which are refused unless ``overwrite`` is given, or files that are not
  a run at all, which are always refused. :func:`check_writable` refuses a path
  that is a file or lies in a folder that cannot be written.
* **Atomic write.** :func:`write_run` fills a temporary folder beside the target and
  swaps it in (:func:`replace_folder`); single files go through :func:`atomic_write`.
  An interruption (Ctrl-C, kill -9, a crash) leaves the earlier folder as it was:
  the swap is one atomic exchange where the file system offers it (Linux
  ``renameat2``), else two renames that :func:`recover` completes or undoes the
  next time the folder is written or read. Temporary folders carry the writer's
  process id, so leftovers of dead processes are removed and nothing piles up.

Folders written before ``run.json`` existed are recognised by their files.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from analysis.errors import InputError

RUN_FILE = "run.json"
#: What each kind of run folder holds, as messages name it.
KINDS = {
    "neurons": "a neuron atlas (neuroglot neurons)",
    "attribute": "knowledge-neuron attributions (neuroglot attribute)",
    "trace": "causal traces (neuroglot trace)",
    "evaluate": "an evaluation run (neuroglot evaluate)",
    "compare": "a comparison of editors on one fact (neuroglot compare)",
    "overlap": "edits' overlap with agnostic neurons against transfer (neuroglot overlap)",
    "stats": "FFN key statistics (cached for the ROME-family editors)",
}
#: The record's file name for kinds that do not use ``run.json`` (the key statistics cache keeps its ``key.json``).
RECORD_FILES = {"stats": "key.json"}
OVERWRITE_HINT = "choose another folder, or replace it on purpose with --overwrite"


class RunFolderError(InputError):
    """A run folder or output path that cannot be used as asked (nothing was written)."""


# ----------------------------------------------------------------- keys and versions


def request_key(request: Any) -> str:
    """A stable 16-hex-digit hash of a JSON-able request."""
    text = json.dumps(request, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("neuroglot", "torch", "transformers", "nnsight"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


# ----------------------------------------------------------------- parameters


class Params:
    """Base of the frozen parameter dataclasses of the long computations (``CountParams``,
    ``AttributionParams``, ``TraceParams``): their defaults are the CLI's and the pages' defaults."""

    @classmethod
    def of(cls, params: Any = None, **changes: Any) -> Any:
        """``params`` (default: the defaults) with ``changes`` applied."""
        base = cls() if params is None else params
        if not isinstance(base, cls):
            raise InputError(f"Expected {cls.__name__}, got {type(base).__name__}.")
        return dataclasses.replace(base, **changes) if changes else base

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


# ----------------------------------------------------------------- writable paths


def check_writable(path: str | Path, what: str = "") -> Path:
    """Refuse ``path`` before any work when it is a file or cannot be created and written.

    ``what`` names the option in messages (``"--out"``). Writability is probed by
    creating and removing an empty folder, which holds for every user and file system.
    """
    path = Path(path).expanduser()
    label = f"{what} {path}" if what else str(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{label} is a file, not a folder; give a folder to write into.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"{label} cannot be created: {existing} is a file, not a folder.")
    probes = [existing] if existing != path else [path, path.parent if path.parent.exists() else path]
    for folder in dict.fromkeys(probes):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".neuroglot-write-test-", dir=folder))
        except OSError as exc:
            raise RunFolderError(f"{label} cannot be written: no permission to write in {folder} "
                                 f"({exc.strerror or exc}).") from None
    return path


# ----------------------------------------------------------------- what a folder holds


@dataclass
class RunInfo:
    """What a folder holds. ``state``: absent, empty, run, damaged (run files that cannot be read) or other."""

    path: Path
    state: str
    kind: str | None = None
    key: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    problem: str = ""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def record_file(kind: str) -> str:
    """The name of the record (manifest) file of a ``kind`` run folder."""
    return RECORD_FILES.get(kind, RUN_FILE)


def _legacy(folder: Path, names: set[str]) -> RunInfo:
    """A run folder written before ``run.json``: recognised by its files."""
    if "key.json" in names and any(n.startswith("layer_") and n.endswith(".safetensors") for n in names):
        return RunInfo(folder, "damaged", "stats", problem="its key.json is not a run record")
    if "rows.jsonl" in names or "config.json" in names and "manifest.json" not in names:
        try:
            config = _read_json(folder / "config.json")
        except (OSError, ValueError) as exc:
            if "rows.jsonl" in names:
                return RunInfo(folder, "damaged", "evaluate", problem=f"config.json cannot be read ({exc})")
            return RunInfo(folder, "other")
        if isinstance(config, dict) and "test_languages" in config:
            return RunInfo(folder, "run", "evaluate")
        return RunInfo(folder, "damaged" if "rows.jsonl" in names else "other")
    if "manifest.json" not in names:
        known = {"counts.npz", "scores.npz", "prompts.parquet", "rows.jsonl"}
        if names & known:
            return RunInfo(folder, "damaged", problem="its manifest.json is missing")
        return RunInfo(folder, "other")
    try:
        manifest = _read_json(folder / "manifest.json")
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return RunInfo(folder, "damaged", problem=f"manifest.json cannot be read ({exc})")
    if "counts.npz" in names or "positions" in manifest:
        kind, key = "neurons", manifest.get("key")
    elif "prompts.parquet" in names or "steps" in manifest:
        kind, key = "attribute", manifest.get("key")
    elif "traces" in manifest or "skipped" in manifest:
        request = manifest.get("request")
        kind, key = "trace", request.get("key") if isinstance(request, dict) else None
    else:
        return RunInfo(folder, "other")
    return RunInfo(folder, "run", kind, key if isinstance(key, str) else None)


def inspect(folder: str | Path) -> RunInfo:
    """What ``folder`` holds (see :class:`RunInfo`); never raises for a folder's contents."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        return RunInfo(folder, "absent")
    if not folder.is_dir():
        return RunInfo(folder, "other", problem="it is a file")
    names = {p.name for p in folder.iterdir()}
    if not names:
        return RunInfo(folder, "empty")
    name = RUN_FILE if RUN_FILE in names else next((n for n in RECORD_FILES.values() if n in names), None)
    if name is None:
        return _legacy(folder, names)
    try:
        record = _read_json(folder / name)
        if not isinstance(record, dict) or record.get("kind") not in KINDS or record_file(record["kind"]) != name:
            raise ValueError("not a run record")
    except (OSError, ValueError) as exc:
        if name != RUN_FILE:  # another kind's record name, in a folder that may not be ours
            return _legacy(folder, names)
        guess = _legacy(folder, names - {RUN_FILE})
        return RunInfo(folder, "damaged", guess.kind, problem=f"{RUN_FILE} cannot be read ({exc})")
    request = record.get("request")
    return RunInfo(folder, "run", record["kind"], record.get("key"), request if isinstance(request, dict) else {})


def _difference(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    for name, value in _plain(wanted).items():
        if name in saved and saved[name] != value:
            return f"{name} {_show(saved[name])} there, {_show(value)} now"
    return ""


def _show(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ",".join(map(str, value)) or "none"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def claim(folder: str | Path, kind: str, key: str | None = None, request: dict[str, Any] | None = None,
          overwrite: bool = False, what: str = "") -> RunInfo:
    """Check that ``folder`` may receive a ``kind`` run of ``request`` (key ``key``) — before any work.

    Returns the folder's :class:`RunInfo`: ``state`` "run" with the same key means
    the results are there to reuse. Refused (:class:`RunFolderError`): a path that
    is a file or cannot be written; a folder of files that are not a run (always:
    they are not ours to delete); another command's run, or another request's
    (``key`` differs, or a field of ``request`` differs from the saved one when the
    key is not known yet) — unless ``overwrite``. A damaged folder is recomputed.
    """
    folder = check_writable(folder, what)
    info = inspect(folder)
    label = f"{what} {folder}" if what else str(folder)
    if info.state == "other":
        raise RunFolderError(f"{label} already holds other files (not a Neuroglot run folder); "
                             "choose a new or empty folder.")
    if info.state in ("absent", "empty") or overwrite:
        return info
    if info.kind is not None and info.kind != kind:
        raise RunFolderError(f"{label} holds {KINDS[info.kind]}, not {KINDS[kind]}; {OVERWRITE_HINT}.")
    if info.state == "damaged":
        return info
    if key is not None and info.key != key:
        diff = _difference(info.request, request or {})
        raise RunFolderError(f"{label} holds {KINDS[kind]} of another request"
                             f"{f' ({diff})' if diff else ''}; {OVERWRITE_HINT}.")
    if key is None and request:
        diff = _difference(info.request, request)
        if diff:
            raise RunFolderError(f"{label} holds {KINDS[kind]} of another request ({diff}); {OVERWRITE_HINT}.")
    return info


def run_record(kind: str, key: str, request: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "command": KINDS[kind], "key": key, "request": _plain(request),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()}


def write_run(folder: str | Path, kind: str, key: str, request: dict[str, Any],
              write: Callable[[Path], Any]) -> Path:
    """Write a whole run folder at once: ``write(tmp)`` fills a temporary folder, then it replaces ``folder``.

    Whatever interrupts it, ``folder`` holds either its earlier contents or the new run.
    """
    folder = Path(folder).expanduser()
    with staging(folder) as tmp:
        write(tmp)
        write_record(tmp, kind, key, request)
        replace_folder(tmp, folder)
    return folder


def add_to_run(folder: str | Path, kind: str, key: str, request: dict[str, Any],
               write: Callable[[Path], Any]) -> Path:
    """Add files to the run folder of this request in place: ``write(folder)`` writes each file atomically
    (:func:`atomic_write`, :func:`atomic_save`), then the record is rewritten.

    For caches that grow a piece at a time (the key statistics, one file per layer), where
    :func:`write_run` would copy what is already there. An interruption leaves every file whole.
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    write(folder)
    write_record(folder, kind, key, request)
    return folder


def write_record(folder: Path, kind: str, key: str, request: dict[str, Any]) -> None:
    """The record (``run.json``, or the kind's :data:`RECORD_FILES` name) of ``folder``, atomically."""
    text = json.dumps(run_record(kind, key, request), indent=2, ensure_ascii=False)
    atomic_write(folder / record_file(kind), lambda f: f.write(text.encode("utf-8")))


# ----------------------------------------------------------------- atomic files and folders


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """``write(binary file)`` into a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(path: Path, save: Callable[[str], Any]) -> None:
    """``save(temporary file name)`` beside ``path``, then rename it over ``path`` (for writers that take a
    file name, as safetensors does)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (UTF-8), written atomically (a manifest)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


def read_json(path: Path) -> Any:
    """What :func:`write_json` wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_arrays(path: Path, **arrays: Any) -> None:
    """The numpy ``arrays`` as one compressed ``.npz`` file, written atomically."""
    import numpy as np

    atomic_write(Path(path), lambda f: np.savez_compressed(f, **arrays))


def read_arrays(path: Path) -> dict[str, Any]:
    """Every array of an ``.npz`` file written by :func:`write_arrays`."""
    import numpy as np

    with np.load(path) as z:
        return {name: z[name] for name in z.files}


def read_manifest(folder: str | Path, arrays: str) -> tuple[Any, dict[str, Any]]:
    """A result folder's ``manifest.json`` and the arrays of its ``.npz`` file ``arrays``."""
    folder = Path(folder)
    return read_json(folder / "manifest.json"), read_arrays(folder / arrays)


#: The name of a writer's staging folder beside ``target`` (``.NAME.tmp-PID-…`` or ``.NAME.old-PID-…``).
SIDE_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<role>tmp|old)-(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+$")


def _side_name(target: Path, role: str) -> str:
    return f".{target.name}.{role}-{os.getpid()}-"


def temp_folder(target: Path) -> Path:
    """A new hidden temporary folder beside ``target`` (removed by :func:`recover` if its writer dies)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_side_name(target, "tmp"), dir=target.parent))


@contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` that is removed on the way out, whatever happens."""
    recover(target)
    tmp = temp_folder(target)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (this process counts as running; so does another user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def recover(target: str | Path) -> None:
    """Finish what a killed writer of ``target`` left: put a moved-aside folder back when ``target`` is
    missing, and delete temporary and moved-aside folders whose writer is gone."""
    target = Path(target).expanduser()
    parent = target.parent
    if not parent.is_dir():
        return
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(f".{target.name}.")]
    except OSError:
        return
    leftovers = []
    for path in entries:
        match = SIDE_NAME.match(path.name)
        if not match or match["name"] != target.name or not path.is_dir():
            continue
        if match["pid"] and process_alive(int(match["pid"])):
            continue
        leftovers.append((match["role"], path))
    for role, path in sorted(leftovers, key=lambda x: x[0] != "old"):  # put back before deleting
        try:
            if role == "old" and not target.exists():
                os.rename(path, target)
            else:
                shutil.rmtree(path)
        except OSError:
            pass  # another process got there first, or no permission: the next call tries again


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` at ``target``; an existing ``target`` ends up in ``tmp`` (then deleted).

    With an atomic exchange, ``target`` always holds the old or the new folder. Without one,
    ``target`` is renamed aside first (``.NAME.old-PID-…``) and the new folder renamed in; a crash
    between the two renames leaves ``target`` missing until :func:`recover` puts the old one back.
    """
    target = Path(target)
    if not target.exists():
        try:
            os.rename(tmp, target)
            return
        except OSError as exc:  # another writer put the same run there first: swap with it
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(_side_name(target, "old") + uuid.uuid4().hex[:8])
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
