"""Reading finished run folders back: what the Runs page and `neuroglot runs` show.

Two kinds of folder are read: an evaluation (``neuroglot evaluate``: ``run.json`` of kind
"evaluate", ``config.json``, ``rows.jsonl``, the derived ``tables.md``) and a sequential
run (``neuroglot sequential``: ``sequential.json``, ``baseline.json``, ``<method>/steps.jsonl``).
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
#: Files whose modification times make a folder's stamp (a folder appended to is read again).
_EVALUATE_FILES = ("run.json", "config.json", "rows.jsonl", "tables.md")
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
    """"evaluate" or "sequential"; InputError (with what the folder holds instead) for anything else."""
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
    if info.state == "other":
        raise InputError(f"{path} is not a run folder of `neuroglot evaluate` or `neuroglot sequential`"
                         f"{' (' + info.problem + ')' if info.problem else ''}.")
    if info.kind != EVALUATE:
        what = runs.KINDS.get(info.kind or "", "another command's results")
        if info.state == "damaged":
            raise InputError(f"{path} is damaged: {info.problem or 'its files cannot be read'}.")
        raise InputError(f"{path} holds {what}, not an evaluation or sequential run; open it on its own page.")
    if info.state == "damaged":
        raise InputError(f"{path} is a damaged evaluation run: {info.problem or 'its files cannot be read'}.")
    return EVALUATE


def find_run_folders(roots: Iterable[str | Path], depth: int = 2) -> list[tuple[str, str]]:
    """(folder, kind) of every evaluation or sequential run folder up to ``depth`` levels below ``roots``."""
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
