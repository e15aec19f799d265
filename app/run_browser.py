"""Reading finished run folders back: what the Runs page and `neuroglot runs` show.

Three kinds of folder are read: an evaluation (``neuroglot evaluate``: ``run.json`` of kind
"evaluate", ``config.json``, ``rows.jsonl``, the derived ``tables.md``), a sequential
run (``neuroglot sequential``: ``sequential.json``, ``baseline.json``, ``<method>/steps.jsonl``)
and an overlap run (``neuroglot overlap``: ``run.json`` of kind "overlap", ``points.csv`` with one
row per record and editor, ``correlations.csv`` with Spearman's ρ per editor).
Everything here is plain data in, plain data out (no Streamlit, no model), so the page can
cache it and the CLI prints the same tables.

The probe table puts one probe per row with the answer before the edit beside the answer
after it. "Before" is the unedited model's greedy answer to the same prompt: the row's
``old`` field (reliability, generality), the locality reference (which *is* the unedited
model's answer, editors/evaluate.py), or the unedited method's row for the same record,
language, kind and prompt (portability). A probe *fails* when its exact match is below 1:
the edited model does not give the new answer, or (locality) no longer gives its own.

A sequential run keeps its probes per step (editors/sequential_run.py): each row's "before" is the unedited
model (step 0) and "after" the model carrying the method's state at that step, both as the teacher-forced
prediction (the arg-max at each answer position given the expected answer's earlier tokens, not a greedy
answer) with its top-1 accuracy. An efficacy or generality probe fails when its top-1 is below 1; a
specificity probe fails when the prediction is no longer the unedited model's (not "kept").
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from analysis import runs
from analysis.errors import InputError

EVALUATE = "evaluate"
SEQUENTIAL = "sequential"
OVERLAP = "overlap"
#: Files whose modification times make a folder's stamp (a folder appended to is read again).
_EVALUATE_FILES = ("run.json", "config.json", "rows.jsonl", "tables.md")
_OVERLAP_FILES = ("points.csv", "correlations.csv")
#: Score columns of the probe rows, as the page and the CLI name them; shown when the run has them.
SCORE_TITLES = {"em": "EM", "f1": "F1", "top1": "top-1"}
PROBE_COLUMNS = ["method", "edit_languages", "record", "language", "kind", "question", "expected", "before",
                 "after", "f1", "em", "top1", "failed"]
STEP_KINDS = ("efficacy", "generality", "specificity")
SEQUENTIAL_PROBE_COLUMNS = ["method", "step", "batch", "edited_in", "record", "asked_in", "kind", "question",
                            "expected", "before", "after", "top1_before", "top1_after", "failed"]
#: What the page and the CLI say of a sequential folder written before per-probe rows were kept.
NO_PROBE_ROWS = ("{folder} predates per-probe rows: it keeps only each batch's averaged scores. Run the same "
                 "`neuroglot sequential` command (or the Sequential editing page) again into a new folder (or "
                 "with --overwrite) to keep every probe's prediction before and after each step.")


# ------------------------------------------------------------------ finding and recognising run folders


def run_roots(cwd: str | Path | None = None) -> list[Path]:
    """Where run folders are looked for: ``./runs`` and the folders named in ``NEUROGLOT_RUNS`` (os.pathsep)."""
    roots = [Path(cwd or ".") / "runs"]
    roots += [Path(p).expanduser() for p in os.environ.get("NEUROGLOT_RUNS", "").split(os.pathsep) if p.strip()]
    return list(dict.fromkeys(roots))


def run_kind(folder: str | Path) -> str:
    """"evaluate", "sequential" or "overlap"; InputError (with what the folder holds instead) for anything else."""
    path = Path(str(folder).strip()).expanduser()
    if not str(folder).strip():
        raise InputError("Give a run folder (a path, or choose one from the list).")
    if (path / "sequential.json").is_file():
        return SEQUENTIAL
    info = runs.inspect(path)
    if info.state == "absent":
        raise InputError(f"{path} does not exist.")
    if info.state == "empty":
        raise InputError(f"{path} is empty: no run has written anything there yet.")
    if info.kind == OVERLAP or (info.kind is None and (path / "points.csv").is_file()):
        # run.json names the command; a folder whose run.json is gone or garbled is told by its points
        if info.state == "damaged":
            raise InputError(f"{path} is a damaged overlap run: {info.problem or 'its files cannot be read'}.")
        return OVERLAP
    if info.state == "other":
        raise InputError(f"{path} is not a run folder of `neuroglot evaluate`, `neuroglot sequential` or "
                         f"`neuroglot overlap`{' (' + info.problem + ')' if info.problem else ''}.")
    if info.kind != EVALUATE:
        what = runs.KINDS.get(info.kind or "", "another command's results")
        if info.state == "damaged":
            raise InputError(f"{path} is damaged: {info.problem or 'its files cannot be read'}.")
        raise InputError(f"{path} holds {what}, not an evaluation, sequential or overlap run; open it on its own "
                         "page.")
    if info.state == "damaged":
        raise InputError(f"{path} is a damaged evaluation run: {info.problem or 'its files cannot be read'}.")
    return EVALUATE


def find_run_folders(roots: Iterable[str | Path], depth: int = 2) -> list[tuple[str, str]]:
    """(folder, kind) of every evaluation, sequential or overlap run folder up to ``depth`` levels below ``roots``."""
    found: list[tuple[str, str]] = []

    def visit(folder: Path, level: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            names = {p.name for p in child.iterdir()} if child.is_dir() else set()
            if "sequential.json" in names:
                found.append((str(child), SEQUENTIAL))
            elif "points.csv" in names and ("run.json" not in names or runs.inspect(child).kind in (OVERLAP, None)):
                found.append((str(child), OVERLAP))
            elif "rows.jsonl" in names or "config.json" in names:
                found.append((str(child), EVALUATE))
            elif level < depth:
                visit(child, level + 1)

    for root in roots:
        if Path(root).is_dir():
            visit(Path(root), 1)
    return list(dict.fromkeys(found))


def folder_stamp(folder: str | Path) -> float:
    """The newest modification time of the files a view of ``folder`` reads (0.0: none yet): the cache key that
    makes a folder appended to by a running evaluation, or rewritten by the CLI, be read again."""
    path = Path(folder)
    files = [path / name for name in _EVALUATE_FILES]
    files += [path / "sequential.json", path / "baseline.json", *path.glob("*/steps.jsonl")]
    files += [path / name for name in _OVERLAP_FILES]
    stamps = []
    for f in files:
        try:
            stamps.append(f.stat().st_mtime_ns / 1e9)
        except OSError:
            continue
    return max(stamps, default=0.0)


# ------------------------------------------------------------------ evaluation runs


@dataclass
class EvaluateView:
    """An evaluation folder read back: its config, the probe rows, the report and whether it is finished."""

    folder: str
    config: dict[str, Any]
    frame: pd.DataFrame
    report: str
    finished: bool                 # tables.md is there: the run ended (or was interrupted and closed cleanly)
    rows_per_method: dict[str, int] = field(default_factory=dict)

    @property
    def test_languages(self) -> list[str]:
        return [str(x) for x in self.config.get("test_languages", [])]

    @property
    def main_edit_set(self) -> str:
        """The largest edit-language set (the multilingual edit of Table 2)."""
        sets = ["+".join(s) for s in self.config.get("edit_sets", [])] or ["-"]
        return max(sets, key=lambda s: len(s.split("+")))


def eval_config(config: dict[str, Any]):
    from editors.evaluate import EvalConfig

    known = {k: config[k] for k in EvalConfig.__dataclass_fields__ if k in config}
    try:
        return EvalConfig(**known)
    except TypeError as exc:
        raise InputError(f"config.json is not an evaluation config ({exc}).") from None


def read_evaluate(folder: str | Path) -> EvaluateView:
    """The evaluation in ``folder``; its tables are computed from the rows finished so far (so a run still
    being appended to shows what it has). InputError for a damaged config or rows."""
    from editors import eval_folders
    from editors.evaluate import report, rows_frame

    path = Path(folder)
    config = eval_folders.read_config(path)
    if config is None:
        raise InputError(f"{path} has no config.json: the evaluation has not started writing yet, or it is damaged.")
    try:
        frame = rows_frame(path)
    except (KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}/rows.jsonl is damaged (a row lacks {exc}).") from None
    text = ""
    if not frame.empty:
        try:
            text = report(frame, eval_config(config))
        except (KeyError, ValueError) as exc:
            raise InputError(f"{path}: the rows do not make the run's tables ({exc}); is rows.jsonl damaged?") from None
    counts = frame.groupby("method")["record"].nunique().to_dict() if not frame.empty else {}
    return EvaluateView(str(path), config, frame, text, (path / "tables.md").is_file(),
                        {str(k): int(v) for k, v in counts.items()})


def score_columns(frame: pd.DataFrame) -> list[str]:
    """The score columns (em, f1, top1) that hold at least one value in ``frame``."""
    return [c for c in SCORE_TITLES if c in frame and pd.to_numeric(frame[c], errors="coerce").notna().any()]


def kinds_of(frame: pd.DataFrame) -> list[str]:
    from editors.tables import KINDS

    present = set(frame["kind"]) if "kind" in frame else set()
    return [k for k in KINDS if k in present]


def edited_methods(frame: pd.DataFrame) -> list[str]:
    from editors.tables import UNEDITED

    return [m for m in dict.fromkeys(frame["method"]) if m != UNEDITED] if "method" in frame else []


def transfer_matrices(view: EvaluateView, kind: str, column: str) -> dict[str, pd.DataFrame]:
    """Per edited method: edit-language sets × test languages of ``column`` (%) on ``kind`` probes
    (``editors.tables.transfer_matrix``; its "x-avg" is the mean over test languages outside the edit)."""
    from editors.tables import transfer_matrix

    return {m: transfer_matrix(view.frame, m, view.test_languages, column, (kind,)) for m in edited_methods(view.frame)}


def method_scores(view: EvaluateView, column: str) -> pd.DataFrame:
    """Per method and kind, the mean over test languages of ``column`` (%) when editing the main edit set;
    the unedited model as a baseline row."""
    from editors.tables import METHOD_TITLES, UNEDITED, metric_value

    out = []
    for method in dict.fromkeys(view.frame["method"]):
        label = "-" if method == UNEDITED else view.main_edit_set
        part = view.frame[(view.frame["method"] == method) & (view.frame["edit_languages"] == label)]
        for kind in kinds_of(view.frame):
            vals = [metric_value(part, kind, lang, column) for lang in view.test_languages]
            vals = [v for v in vals if not math.isnan(v)]
            out.append({"method": METHOD_TITLES.get(method, method), "kind": kind,
                        "value": sum(vals) / len(vals) if vals else math.nan})
    return pd.DataFrame(out, columns=["method", "kind", "value"])


def language_scores(view: EvaluateView, kind: str, column: str) -> pd.DataFrame:
    """Per method and test language, ``column`` (%) on ``kind`` probes when editing the main edit set."""
    from editors.tables import METHOD_TITLES, UNEDITED, metric_value

    out = []
    for method in dict.fromkeys(view.frame["method"]):
        label = "-" if method == UNEDITED else view.main_edit_set
        part = view.frame[(view.frame["method"] == method) & (view.frame["edit_languages"] == label)]
        for lang in view.test_languages:
            out.append({"method": METHOD_TITLES.get(method, method), "language": lang,
                        "value": metric_value(part, kind, lang, column)})
    return pd.DataFrame(out, columns=["method", "language", "value"])


def probe_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per probe: method, edit languages, record, language, kind, question, expected answer, the
    answers before and after the edit, the scores and whether it failed (module docstring)."""
    if frame.empty:
        return pd.DataFrame(columns=PROBE_COLUMNS)
    from editors.tables import UNEDITED

    table = frame.copy()
    for column in ("old", "f1", "em", "top1"):
        if column not in table:
            table[column] = math.nan
    keys = ["record", "language", "kind", "prompt"]
    unedited = (table[table["method"] == UNEDITED].drop_duplicates(keys).set_index(keys)["answer"]
                if (table["method"] == UNEDITED).any() else pd.Series(dtype=object))
    looked_up = pd.Series([unedited.get(tuple(k)) for k in table[keys].itertuples(index=False)], index=table.index,
                          dtype=object)
    before = table["old"].where(table["old"].notna(), None)
    before = before.where(before.notna(), table["reference"].where(table["kind"] == "locality"))
    before = before.where(before.notna(), looked_up)
    before = before.where(table["method"] != UNEDITED, table["answer"])
    em = pd.to_numeric(table["em"], errors="coerce")
    out = pd.DataFrame({
        "method": table["method"], "edit_languages": table["edit_languages"], "record": table["record"],
        "language": table["language"], "kind": table["kind"], "question": table["prompt"],
        "expected": table["reference"], "before": before.astype(object).where(before.notna(), ""),
        "after": table["answer"], "f1": pd.to_numeric(table["f1"], errors="coerce"), "em": em,
        "top1": pd.to_numeric(table["top1"], errors="coerce"), "failed": em.lt(1.0) & em.notna()})
    return out.reset_index(drop=True)


def filter_probes(table: pd.DataFrame, methods: Sequence[str] | None = None,
                  edit_languages: Sequence[str] | None = None, languages: Sequence[str] | None = None,
                  kinds: Sequence[str] | None = None, failures_only: bool = False) -> pd.DataFrame:
    """The rows of ``probe_table`` that match every filter given (None or empty: no filter on that column)."""
    mask = pd.Series(True, index=table.index)
    for column, wanted in (("method", methods), ("edit_languages", edit_languages), ("language", languages),
                           ("kind", kinds)):
        if wanted:
            mask &= table[column].isin(list(wanted))
    if failures_only:
        mask &= table["failed"].astype(bool)
    return table[mask]


def record_probes(table: pd.DataFrame, record: str, method: str | None = None,
                  edit_languages: str | None = None) -> pd.DataFrame:
    """Every probe of ``record`` (for one method and edit set when given), language by language."""
    part = table[table["record"] == record]
    if method is not None:
        part = part[part["method"] == method]
    if edit_languages is not None:
        part = part[part["edit_languages"] == edit_languages]
    return part.sort_values(["method", "edit_languages", "language"], kind="stable")


# ------------------------------------------------------------------ sequential runs


def read_sequential(folder: str | Path) -> dict[str, Any]:
    """A sequential run's tables as plain data: info, languages, methods, steps measured per method, the
    curves, the final / retention / seconds / null-space tables, every interference matrix, the per-step
    scores (every batch asked in every language after every step) and the report text."""
    from editors.sequential_run import (curve_rows, final_rows, interference_matrix, nullspace_rows, read_run,
                                        report, retention_rows, seconds_rows)

    try:
        view = read_run(folder)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{folder} is a damaged sequential run ({exc}).") from None
    matrices = {}
    try:
        for method in view.steps:
            for kind in STEP_KINDS:
                for rel in ("value", "own step", "unedited"):
                    matrices[(method, kind, rel)] = interference_matrix(view, method, kind, relative_to=rel)
        data = {"info": view.info, "languages": view.languages, "methods": list(view.steps),
                "steps": {m: len(r) for m, r in view.steps.items()},
                "curves": pd.DataFrame(curve_rows(view)), "final": pd.DataFrame(final_rows(view)),
                "retention": pd.DataFrame(retention_rows(view)), "nullspace": pd.DataFrame(nullspace_rows(view)),
                "seconds": pd.DataFrame(seconds_rows(view)), "matrices": matrices,
                "step_scores": step_scores(view), "report": report(view) if any(view.steps.values()) else ""}
        data["probes"], data["probes_note"] = sequential_probes(view)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise InputError(f"{folder} is a damaged sequential run (its steps cannot be read: {exc}).") from None
    return data


def step_scores(view) -> pd.DataFrame:
    """Per method and step, every batch edited so far asked in every language: the three top-1 accuracies (%)
    and the number of records (what a sequential folder keeps of its probes; the unedited model as step 0)."""
    langs = {int(s["index"]): s["language"] for s in view.stream}
    out = []
    sources = [("unedited", 0, (view.baseline or {}).get("scores", []))]
    sources += [(m, int(row["step"]), row["scores"]) for m, rows in view.steps.items() for row in rows]
    for method, step, scores in sources:
        for r in scores:
            out.append({"method": method, "step": step, "batch": int(r["batch"]),
                        "batch_language": langs.get(int(r["batch"]), "?"), "asked_in": r["probe"],
                        **{k: r.get(k) for k in STEP_KINDS}, "records": r.get("n")})
    return pd.DataFrame(out, columns=["method", "step", "batch", "batch_language", "asked_in", *STEP_KINDS, "records"])


def sequential_probes(view_or_folder: Any) -> tuple[pd.DataFrame, str]:
    """Per method and measured step, every probe: the batch, its edit language, the record, the language asked
    in, the kind, question, expected answer, the prediction and top-1 before (step 0, the unedited model) and
    after (that step), and whether it failed (module docstring). Returns ``(table, note)``: the note is "" when
    every measured step has rows, says which steps have none in a folder resumed across versions, and says why
    the table is empty for a folder written before per-probe rows were kept (:data:`NO_PROBE_ROWS`)."""
    from editors.sequential_run import read_run

    view = read_run(view_or_folder) if isinstance(view_or_folder, (str, Path)) else view_or_folder
    langs = {int(s["index"]): s["language"] for s in view.stream}
    key = ("batch", "record", "language", "kind")
    before = {tuple(p[k] for k in key): p for p in (view.baseline or {}).get("probes", [])}
    out, missing = [], []
    for method, rows in view.steps.items():
        for row in rows:
            step = int(row["step"])
            if "probes" not in row:
                missing.append(f"{method} {step}")
                continue
            for p in row["probes"]:
                b = before.get(tuple(p[k] for k in key))
                top1 = float(p["top1"])
                if p["kind"] == "specificity":
                    failed = b is not None and p["predicted"] != b["predicted"]
                else:
                    failed = top1 < 1.0
                out.append({"method": method, "step": step, "batch": int(p["batch"]),
                            "edited_in": langs.get(int(p["batch"]), "?"), "record": str(p["record"]),
                            "asked_in": p["language"], "kind": p["kind"], "question": p["prompt"],
                            "expected": p["expected"], "before": b["predicted"] if b is not None else "",
                            "after": p["predicted"], "top1_before": float(b["top1"]) if b is not None else math.nan,
                            "top1_after": top1, "failed": bool(failed)})
    table = pd.DataFrame(out, columns=SEQUENTIAL_PROBE_COLUMNS)
    measured = sum(len(rows) for rows in view.steps.values())
    if not measured:
        return table, ""
    if table.empty:
        return table, NO_PROBE_ROWS.format(folder=view.folder)
    notes = []
    if missing:
        notes.append(f"steps measured before per-probe rows were kept have none ({', '.join(missing)})")
    if not before:
        notes.append("baseline.json predates per-probe rows, so the unedited model's predictions (before) are "
                     "missing and specificity cannot fail")
    text = "; ".join(notes)
    return table, (text[:1].upper() + text[1:] + ".") if notes else ""


def filter_sequential_probes(table: pd.DataFrame, methods: Sequence[str] | None = None, step: int | None = None,
                             languages: Sequence[str] | None = None, kinds: Sequence[str] | None = None,
                             failures_only: bool = False) -> pd.DataFrame:
    """The rows of :func:`sequential_probes` that match every filter given (None or empty: no filter there)."""
    mask = pd.Series(True, index=table.index)
    for column, wanted in (("method", methods), ("asked_in", languages), ("kind", kinds)):
        if wanted:
            mask &= table[column].isin(list(wanted))
    if step is not None:
        mask &= table["step"] == int(step)
    if failures_only:
        mask &= table["failed"].astype(bool)
    return table[mask]


def sequential_record_probes(table: pd.DataFrame, method: str, record: str) -> pd.DataFrame:
    """Every probe of ``record`` under ``method`` after every measured step: language, kind, then step."""
    part = table[(table["method"] == method) & (table["record"] == str(record))]
    order = {k: i for i, k in enumerate(STEP_KINDS)}
    return part.sort_values(["asked_in", "kind", "step"], key=lambda c: c.map(order) if c.name == "kind" else c,
                            kind="stable")


# ------------------------------------------------------------------ overlap runs

#: Columns points.csv must have for the page's table and figure (editors.overlap.overlap_transfer writes more).
OVERLAP_NEEDED = ("record", "method", "agnostic share", "transfer")
#: The shares of the edit's weight (0-1 in points.csv), shown as percentages.
SHARE_COLUMNS = ("agnostic share", "edit-language share", "other-language share", "added share")
OVERLAP_NUMBERS = (*SHARE_COLUMNS, "agnostic overlap", "top neurons", "transfer", "reliability", "seconds")
P_COLUMN = "p (permutation)"


@dataclass
class OverlapView:
    """An overlap folder read back: the request (from run.json), one row per record and editor, Spearman's ρ
    per editor, and the rows whose editor failed."""

    folder: str
    config: dict[str, Any]
    points: pd.DataFrame           # every row of points.csv, ``error`` "" where the editor succeeded
    correlations: pd.DataFrame     # method, records, spearman, p (permutation), mean agnostic share, mean transfer
    errors: pd.DataFrame           # record, method, error of the rows whose editor failed
    recomputed: bool = False       # correlations.csv lacked the p column (written before it): ρ and p from points

    @property
    def methods(self) -> list[str]:
        """The editors asked for (run.json), then any other that has points."""
        return list(dict.fromkeys([*map(str, self.config.get("methods", [])), *self.points["method"]]))

    @property
    def scored(self) -> pd.DataFrame:
        """The points whose editor succeeded (what the correlations and the figure are made of)."""
        return self.points[self.points["error"] == ""]


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, keep_default_na=True)
    except FileNotFoundError:
        raise InputError(f"{path.parent} is a damaged overlap run: it has no {path.name} ({what}).") from None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path} is damaged ({what} cannot be read: {text}).") from None


def overlap_config(folder: str | Path) -> dict[str, Any]:
    """The request of ``neuroglot overlap`` that wrote ``folder`` (run.json's ``request``); {} when it has none."""
    info = runs.inspect(folder)
    if info.state == "damaged":
        raise InputError(f"{folder} is a damaged overlap run: {info.problem or 'its run.json cannot be read'}.")
    if info.kind not in (OVERLAP, None):
        raise InputError(f"{folder} holds {runs.KINDS.get(info.kind, 'another command')}, not an overlap run.")
    return dict(info.request)


def read_overlap(folder: str | Path) -> OverlapView:
    """The overlap run in ``folder``: its config, points, correlations (recomputed with
    ``editors.overlap.rank_correlations`` from the points when correlations.csv predates the permutation p value,
    as the CLI computes them: over the rows whose editor succeeded) and the editors' errors. InputError for a
    damaged folder (run.json, points.csv or correlations.csv that cannot be read, or points without the columns
    the page needs)."""
    from editors.overlap import rank_correlations

    path = Path(folder)
    config = overlap_config(path)
    points = _read_csv(path / "points.csv", "the points: one row per record and editor")
    missing = [c for c in OVERLAP_NEEDED if c not in points.columns]
    if missing:
        raise InputError(f"{path}/points.csv is damaged: it lacks the column(s) {', '.join(missing)} (a points.csv "
                         f"of `neuroglot overlap` has {', '.join(OVERLAP_NEEDED)}, ...).")
    points = points.copy()
    points["record"] = points["record"].astype(str)
    points["method"] = points["method"].astype(str)
    points["error"] = points["error"].fillna("").astype(str) if "error" in points else ""
    for column in OVERLAP_NUMBERS:
        if column in points:
            values = pd.to_numeric(points[column], errors="coerce")
            if (values.isna() & points[column].notna()).any():
                raise InputError(f"{path}/points.csv is damaged: its column {column!r} holds text where numbers "
                                 "belong.")
            points[column] = values
    for column in ("cached", "pooled"):
        if column in points:
            points[column] = points[column].map(lambda v: str(v).strip().lower() == "true")
    scored = points[points["error"] == ""]
    recomputed = False
    if (path / "correlations.csv").is_file():
        correlations = _read_csv(path / "correlations.csv", "Spearman's ρ per editor")
        if not {"method", "spearman"} <= set(correlations.columns):
            raise InputError(f"{path}/correlations.csv is damaged: it lacks the columns method and spearman.")
    else:
        correlations = pd.DataFrame(columns=["method", "spearman"])
    if P_COLUMN not in correlations.columns:
        # written before the permutation p value existed (or without correlations.csv): the same numbers again,
        # from the points, the way `neuroglot overlap` computes them now
        correlations = rank_correlations(scored) if not scored.empty else pd.DataFrame(
            columns=["method", "records", "spearman", P_COLUMN, "mean agnostic share", "mean transfer"])
        recomputed = True
    correlations = correlations.copy()
    correlations["method"] = correlations["method"].astype(str)
    errors = points.loc[points["error"] != "", ["record", "method", "error"]].reset_index(drop=True)
    return OverlapView(str(path), config, points.reset_index(drop=True), correlations.reset_index(drop=True),
                       errors, recomputed)


def overlap_header(view: OverlapView) -> str:
    """One line: the model, the records (how many have points), the editors, the edit and test languages, β."""
    cfg = view.config
    n = view.points["record"].nunique()
    records = f"{n} records" + (f" ({cfg['records']} of {cfg['dataset']})" if cfg.get("records") and
                                cfg.get("dataset") else "")
    return (f"model {cfg.get('model') or '?'} · {records} · editors: {', '.join(view.methods) or '–'} · edit "
            f"language {cfg.get('edit_language') or '?'} · test languages "
            f"{', '.join(map(str, cfg.get('test_languages', []))) or '?'} · β {cfg.get('beta', '?')}")


def correlation_table(view: OverlapView) -> pd.DataFrame:
    """Per editor: ρ, its permutation p value, the records with both values, the mean agnostic share (%) and
    the mean transfer (points)."""
    c = view.correlations
    column = lambda name: pd.to_numeric(c[name], errors="coerce") if name in c else math.nan  # noqa: E731
    return pd.DataFrame({"editor": c["method"], "ρ": column("spearman"), "p": column(P_COLUMN),
                         "records": column("records"), "mean agnostic share (%)": 100.0 * column("mean agnostic share"),
                         "mean transfer": column("mean transfer")})


def filter_points(points: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of ``points`` of these editors (None or empty: all)."""
    return points[points["method"].isin(list(methods))] if methods else points


def record_overlap(points: pd.DataFrame, record: str) -> pd.DataFrame:
    """``record``'s row for every editor side by side: one row per quantity, one column per editor, as text
    (shares in %, transfer in points, the error when the editor failed)."""
    part = points[points["record"] == str(record)]
    out: dict[str, list[str]] = {}
    names = [c for c in (*SHARE_COLUMNS, "agnostic overlap", "top neurons", "transfer", "reliability", "pooled",
                         "cached", "seconds", "error") if c in points]

    def shown(column: str, value: Any) -> str:
        if isinstance(value, float) and math.isnan(value):
            return "–"
        if column in SHARE_COLUMNS:
            return f"{100.0 * float(value):.1f} %"
        if column in ("agnostic overlap", "top neurons"):
            return f"{int(value):,}"
        if column in ("transfer", "reliability"):
            return f"{float(value):+.1f}"
        if column == "seconds":
            return f"{float(value):.2f}"
        if isinstance(value, (bool,)) or column in ("pooled", "cached"):
            return "yes" if bool(value) else "no"
        return str(value)

    for _, row in part.iterrows():
        out[str(row["method"])] = [shown(c, row[c]) for c in names]
    return pd.DataFrame(out, index=pd.Index(names, name=str(record)))
