"""Every editor side by side on one fact: edits computed once, cached on disk, scored per language.

A comparison is one :class:`~editors.requests.EditRequest` (one fact in N languages), a list of
editors with their hyper-parameters, and the languages to test in. For each editor the edit of
the request is computed (``editor.compute``), saved, and the request's probes (reliability,
generality, locality, portability in every test language, :func:`editors.evaluate.probes`) are
scored with the edit applied (:func:`editors.evaluate.score_probes`), beside the unedited model's
answers. :func:`transfer_matrix_runs` edits each language alone and all together, which gives the
edit-language × test-language transfer matrices.

The cache (``cache_root()/compare/``) keeps, per model, editor, hyper-parameters and edit request,
one folder ``edits/<key>/``: ``edit/`` (``Edit.save``), ``editor_run.json`` (seconds, summary,
plain details) and ``scores-<test key>.json`` per set of probes it was scored on. The unedited
answers are kept per model and probe set in ``before/before-<test key>.json``. A rerun, a page
switch or another browser session with the same request reads these files instead of computing;
a folder that is damaged is computed again. The model's identity in the keys is its spec, name,
size, dtype and a fingerprint of its weights (``analysis.stats.model_fingerprint``), taken under
the model's lock, so an edit another session holds applied at that moment is never mistaken for
the model.

On a 7-8B model one cached edit holds 100 MB or more, so ``edits/`` has a size cap: the environment
variable ``NEUROGLOT_COMPARE_CACHE_GB`` (default 20; 0: no cap). After a new edit is written, the least
recently used edit folders are removed (``analysis.cache.prune``) until ``edits/`` fits, never the one
just written; a cache hit marks its folder as used. ``neuroglot cache`` lists and clears the whole cache.
"""
from __future__ import annotations

import shutil
import time
import zipfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import pandas as pd

from analysis import cache, runs
from analysis.errors import InputError, NeuroglotError
from editors.base import get_editor
from editors.edit import Edit
from editors.evaluate import Probe, probe_labels, probes, resolve_hparams, score_probes, unedited_answers
from editors.requests import EditRequest

if TYPE_CHECKING:
    from analysis.model import Workbench

Progress = Callable[[float, str], None]
COMPARE_VERSION = 1      # bump when what a cached edit or score file holds changes
EDIT_FILE, SCORES_PREFIX, BEFORE_PREFIX = "editor_run.json", "scores-", "before-"
KINDS = ("reliability", "generality", "locality", "portability")
CAP_VARIABLE, CAP_GB = "NEUROGLOT_COMPARE_CACHE_GB", 20.0   # size cap of the cached edits (0: none)


def compare_root() -> Path:
    from analysis.model import cache_root

    return cache_root() / "compare"


def model_identity(wb: Workbench) -> dict[str, Any]:
    """What tells this model apart in the cache keys (taken under its lock: no session's edit is applied)."""
    from analysis.stats import model_fingerprint

    with wb.lock:
        weights = model_fingerprint(wb)
    return {"spec": wb.spec, "name": wb.name, "params": wb.n_params, "dtype": str(wb.dtype), "weights": weights}


def test_request(request: EditRequest, languages: Sequence[str] | None = None) -> EditRequest:
    """The request restricted to ``languages`` (default: all of its own), as probed."""
    languages = list(languages or request.languages)
    missing = [lang for lang in languages if lang not in request.facts]
    if missing:
        raise InputError(f"{request.label} has no language {', '.join(missing)} to test; it has "
                         f"{', '.join(request.languages)}.")
    return EditRequest({lang: request.facts[lang] for lang in languages}, case_id=request.case_id)


@dataclass
class EditorRun:
    """One editor's edit of one request, and its scores on one set of probes (plain data)."""

    method: str
    edit_languages: tuple[str, ...]
    hparams: dict[str, Any]
    folder: Path
    seconds: float                          # computing the edit (as first computed; a cache hit costs nothing)
    summary: dict[str, Any]
    rows: list[dict[str, Any]]              # score_probes rows, one per probe
    cached: bool = False                    # True when read back from the disk cache
    error: str | None = None                # the user's error when this editor could not edit the request
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def edit_path(self) -> Path:
        return self.folder / "edit"

    def load_edit(self) -> Edit:
        return Edit.load(self.edit_path)


@dataclass
class Comparison:
    """The unedited model's rows and one :class:`EditorRun` per editor, for one request and test languages."""

    request: EditRequest
    test_languages: tuple[str, ...]
    before: list[dict[str, Any]]
    runs: list[EditorRun]

    def frame(self) -> pd.DataFrame:
        """Long table: a row per (editor, probe), the unedited model as method ``unedited``."""
        return comparison_frame(self.before, self.runs)


# --------------------------------------------------------------------- keys and files


def probe_key(model: Mapping[str, Any], items: Sequence[Probe]) -> str:
    return runs.request_key({"model": dict(model), "probes": [vars(p) for p in items],
                             "version": COMPARE_VERSION})


def edit_key(model: Mapping[str, Any], method: str, hparams: Mapping[str, Any], request: EditRequest) -> str:
    return runs.request_key({"model": dict(model), "method": method, "hparams": dict(hparams),
                             "request": request.to_dict(), "version": COMPARE_VERSION})


def _read(path: Path) -> Any:
    try:
        return runs.read_json(path)
    except (OSError, ValueError):
        return None


def unedited_rows(wb: Workbench, items: Sequence[Probe], model: Mapping[str, Any]) -> tuple[list, list]:
    """The unedited model's greedy answers (text, ids) and scored rows for ``items``, read from the cache
    when computed before."""
    root = compare_root() / "before"
    path = root / f"{BEFORE_PREFIX}{probe_key(model, items)}.json"
    saved = _read(path)
    if isinstance(saved, dict) and len(saved.get("rows", [])) == len(items):
        return [(text, list(ids)) for text, ids in saved["answers"]], saved["rows"]
    with wb.lock:
        answers = unedited_answers(wb, items)
        rows = score_probes(wb, items, answers, unedited=True)
    root.mkdir(parents=True, exist_ok=True)
    runs.write_json(path, {"answers": [[t, [int(i) for i in ids]] for t, ids in answers], "rows": rows})
    return answers, rows


def run_editor(wb: Workbench, method: str, hparams: Mapping[str, Any] | None, request: EditRequest,
               items: Sequence[Probe], before: Sequence[tuple[str, list[int]]], model: Mapping[str, Any],
               progress: Progress | None = None) -> EditorRun:
    """``method``'s edit of ``request`` (computed, or read from the cache) scored on ``items``.

    ``hparams`` are field values over the model's preset (None: the preset). Bad hyper-parameters or a
    request this editor cannot edit raise InputError before any work.
    """
    editor = get_editor(method, resolve_hparams(wb, method, hparams))
    hp = editor.hparams_for(wb)
    hp.validate(wb)
    checked = request.validate(wb, editor.needs_subject)
    cap = cache.cap_bytes(CAP_VARIABLE, CAP_GB)      # a bad value is refused before any work
    folder = compare_root() / "edits" / edit_key(model, editor.name, hp.to_dict(), checked)
    scores_path = folder / f"{SCORES_PREFIX}{probe_key(model, items)}.json"
    info = _read(folder / EDIT_FILE)
    cached = isinstance(info, dict) and (folder / "edit").is_dir()
    if cached:
        try:
            edit = Edit.load(folder / "edit") if not scores_path.is_file() else None
        except NeuroglotError:           # a damaged saved edit: computed again
            cached, edit = False, None
        if cached:
            cache.touch(folder)          # recently used: the size cap removes it last
    if not cached:
        started = time.perf_counter()
        edit = editor.compute(wb, checked, progress=progress)
        seconds = time.perf_counter() - started
        info = {"method": editor.name, "seconds": seconds, "summary": edit.summary(), "hparams": hp.to_dict(),
                "edit_languages": list(checked.languages), "request": checked.to_dict(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "meta": plain_meta(edit.meta)}
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        edit.save(folder / "edit")
        runs.write_json(folder / EDIT_FILE, info)
        if cap is not None:
            cache.prune(folder.parent, cap, keep=[folder])
    scores = _read(scores_path)
    if not (isinstance(scores, dict) and len(scores.get("rows", [])) == len(items)):
        if edit is None:
            edit = Edit.load(folder / "edit")
        if progress:
            progress(1.0, "measuring the edited model")
        with edit.applied(wb):
            rows = score_probes(wb, items, before)
        scores = {"rows": rows}
        runs.write_json(scores_path, scores)
    return EditorRun(method=editor.name, edit_languages=tuple(checked.languages), hparams=hp.to_dict(),
                     folder=folder, seconds=float(info["seconds"]), summary=dict(info["summary"]),
                     rows=list(scores["rows"]), cached=cached, meta=dict(info.get("meta") or {}))


def plain_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The edit's records as JSON-able data (hyper-parameters, losses, the editor's own records)."""
    from analysis.runs import _plain

    try:
        return _plain(dict(meta))           # one JSON round trip (tensors and other objects as their str)
    except (TypeError, ValueError):
        return {}


# ------------------------------------------------------------------------ comparisons


def compare(wb: Workbench, request: EditRequest, methods: Mapping[str, Mapping[str, Any] | None],
            test_languages: Sequence[str] | None = None, progress: Progress | None = None,
            on_error: str = "record", on_result: Callable[[EditorRun], None] | None = None) -> Comparison:
    """Every editor of ``methods`` (name -> hyper-parameter overrides, None for the preset) on ``request``,
    scored on its probes in ``test_languages`` (default: the request's languages).

    ``progress(fraction, message)`` goes over all editors. An editor that cannot edit this request
    (InputError: no preset, a bad value, a subject it needs) is recorded with its message and the others
    go on (``on_error="record"``); ``on_error="raise"`` raises it. ``on_result(run)`` is called as each
    editor's run is ready (the page marks it done).
    """
    if not methods:
        raise InputError("Choose at least one editor to compare.")
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    probed = test_request(request, test_languages).validate(wb, need_subject=False)
    items = probes(probed)
    model = model_identity(wb)
    report = progress or (lambda f, m: None)
    report(0.0, "the unedited model")
    answers, before = unedited_rows(wb, items, model)
    results = []
    names = list(methods)
    for i, method in enumerate(names):
        def step(fraction: float, message: str, i: int = i, method: str = method) -> None:
            report((i + min(max(fraction, 0.0), 1.0)) / len(names), f"{method}: {message}")

        step(0.0, "starting")
        try:
            results.append(run_editor(wb, method, methods[method], request, items, answers, model, step))
        except InputError as exc:
            if on_error == "raise":
                raise
            results.append(EditorRun(method=method, edit_languages=tuple(request.languages), hparams={},
                                     folder=Path(), seconds=0.0, summary={}, rows=[], error=str(exc)))
        if on_result is not None:
            on_result(results[-1])
    report(1.0, "done")
    return Comparison(request=probed, test_languages=tuple(probed.languages), before=before, runs=results)


def comparison_frame(before: Sequence[Mapping[str, Any]], results: Sequence[EditorRun]) -> pd.DataFrame:
    """One row per (method, probe): the probe's number, language, kind, question, reference, the answer,
    F1, EM, P(new), top-1, and ``success`` (:func:`probe_success`); the unedited model is method
    ``unedited``. Editors that failed are left out."""
    rows = []
    for method, scored in [("unedited", before)] + [(r.method, r.rows) for r in results if not r.error]:
        for n, row in enumerate(scored):
            rows.append({"method": method, "probe": n, **{k: row.get(k) for k in (
                "language", "kind", "prompt", "reference", "answer", "f1", "em", "p_new", "p_old", "top1")},
                "success": probe_success(row)})
    return pd.DataFrame(rows)


def probe_success(row: Mapping[str, Any]) -> float:
    """How far a probe came out as wished, 0–1: the answer's token F1 against the new target
    (reliability, generality), the portability answer, or the unedited answer (locality: kept)."""
    return float(row.get("f1") or 0.0)


def probe_grid(comparison: Comparison) -> pd.DataFrame:
    """The Compare page's grid: a row per probe (language, probe, question, expected), per editor the
    answer, P(new target) and success (as columns ``<method> · answer`` ...); the unedited model first."""
    frame = comparison.frame()
    if frame.empty:
        return frame
    base = frame[frame["method"] == "unedited"].reset_index(drop=True)
    labels = probe_labels(zip(base["language"], base["kind"]))
    grid = pd.DataFrame({"language": base["language"], "probe": labels, "question": base["prompt"],
                         "expected": [r if k != "locality" else f"(unchanged) {r}"
                                      for r, k in zip(base["reference"], base["kind"])]})
    for method in dict.fromkeys(frame["method"]):
        part = frame[frame["method"] == method].reset_index(drop=True)
        grid[f"{method} · answer"] = part["answer"]
        grid[f"{method} · P(new)"] = part["p_new"]
        grid[f"{method} · success"] = part["success"]
    return grid


def summary_table(comparison: Comparison) -> pd.DataFrame:
    """Mean success (0–100) per method, language and probe kind, with the edit's seconds."""
    frame = comparison.frame()
    if frame.empty:
        return pd.DataFrame(columns=["method", "language", "kind", "success", "p_new", "n"])
    out = (frame.groupby(["method", "language", "kind"], sort=False)
           .agg(success=("success", "mean"), p_new=("p_new", "mean"), n=("probe", "size")).reset_index())
    out["success"] = 100.0 * out["success"]
    return out


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def timing_table(comparison: Comparison) -> pd.DataFrame:
    """Per editor: seconds to compute the edit, whether it came from the cache, what it changes, or its error."""
    rows = []
    for r in comparison.runs:
        s = r.summary
        changes = [_count(s[key], one, many) for key, one, many in (
            ("parameters", "weight matrix", "weight matrices"), ("patched_neurons", "patched neuron", "patched neurons"),
            ("added_neurons", "added neuron", "added neurons"), ("context_facts", "fact in context", "facts in context"))
            if s.get(key)]
        rows.append({"editor": r.method, "seconds": round(r.seconds, 2) if not r.error else None,
                     "from cache": r.cached, "changes": ", ".join(changes) or ("–" if not r.error else ""),
                     "error": r.error or ""})
    return pd.DataFrame(rows)


def edits_zip(results: Sequence[EditorRun]) -> bytes:
    """Every computed edit of ``results`` as one zip (``<method>-<languages>/edit.safetensors`` ...)."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for r in results:
            if r.error or not r.edit_path.is_dir():
                continue
            name = f"{r.method}-{'+'.join(r.edit_languages)}"
            for file in sorted(r.edit_path.iterdir()):
                z.write(file, f"{name}/{file.name}")
            z.write(r.folder / EDIT_FILE, f"{name}/{EDIT_FILE}")
    return buffer.getvalue()


# --------------------------------------------------------------------- transfer matrices

ALL = "all"


def transfer_matrix_runs(wb: Workbench, request: EditRequest, methods: Mapping[str, Mapping[str, Any] | None],
                         progress: Progress | None = None) -> dict[str, dict[str, EditorRun | str]]:
    """Per method, per edit-language set (each language alone, then ``all`` together): its run scored on the
    reliability and generality probes of every language of ``request``; an editor's error as its message."""
    probed = request.validate(wb, need_subject=False)
    items = [p for p in probes(probed) if p.kind in ("reliability", "generality")]
    model = model_identity(wb)
    report = progress or (lambda f, m: None)
    answers, _ = unedited_rows(wb, items, model)
    sets = [(lang,) for lang in probed.languages] + ([tuple(probed.languages)] if len(probed.languages) > 1 else [])
    jobs = [(m, s) for m in methods for s in sets]
    out: dict[str, dict[str, EditorRun | str]] = {}
    for i, (method, langs) in enumerate(jobs):
        label = ALL if len(langs) > 1 else langs[0]

        def step(fraction: float, message: str, i: int = i, method: str = method, label: str = label) -> None:
            report((i + min(max(fraction, 0.0), 1.0)) / len(jobs), f"{method} editing {label}: {message}")

        step(0.0, "starting")
        sub = EditRequest({lang: request.facts[lang] for lang in langs}, case_id=request.case_id)
        try:
            out.setdefault(method, {})[label] = run_editor(wb, method, methods[method], sub, items, answers,
                                                           model, step)
        except InputError as exc:
            out.setdefault(method, {})[label] = str(exc)
    report(1.0, "done")
    return out


def transfer_matrix(results: Mapping[str, EditorRun | str], metric: str = "top1",
                    kinds: Sequence[str] = ("reliability",)) -> pd.DataFrame:
    """Edit languages (rows; ``all`` last) × test languages (columns): the mean of ``metric`` (0–100) over the
    probes of ``kinds`` in each test language. Rows of editors that failed are left out."""
    table = {}
    for label, run in results.items():
        if isinstance(run, str) or run.error:
            continue
        frame = pd.DataFrame(run.rows)
        frame = frame[frame["kind"].isin(kinds)]
        if metric not in frame:
            raise InputError(f"Unknown metric {metric!r}; use top1, p_new, f1 or em.")
        table[label] = frame.groupby("language", sort=False)[metric].mean() * 100.0
    matrix = pd.DataFrame(table).T
    matrix.index.name, matrix.columns.name = "edit languages", "test language"
    return matrix
