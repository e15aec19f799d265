"""The papers' editing metrics per language, and evaluation runs over an edit data set.

One *probe* is a prompt with a reference answer in one test language. For each
record and test language the probes are (MzsRE / Bi-ZsRE fields):

=============  =======================  ==========================================
kind           prompt                   reference
=============  =======================  ==========================================
reliability    the edit question         the new target
generality     each paraphrase           the new target
locality       each locality question    the *unedited* model's answer
portability    each portability question the portability answer
=============  =======================  ==========================================

MLaKE records (:func:`data.edit_records.load_mlake_edits`): the single-hop
question is the reliability probe, its linked multi-hop questions the
portability probes; there are no paraphrases or locality questions. Where the
data set gives aliases (``LanguageFact.aliases``), F1 and EM are the best over
the reference and its aliases (:func:`editors.metrics.best_token_f1`).

Answers are produced by :mod:`editors.answers` (the prompt as it is, greedy,
as many tokens as the reference has) and compared by :mod:`editors.metrics`
(SQuAD normalisation, characters as tokens in scripts without spaces).

Metric families (all computed on every probe, see :func:`score_probes`)
    * papers/lu-lafns.md App. A.1 (Wang et al. 2023a): **Reliability,
      Generality, Locality, Portability** as F1 and EM of the greedy answer
      against the reference. Locality compares the edited model's answer with
      the unedited model's answer to the same question (Locality: "F'(x) should
      be the same as F(x)").
    * papers/memla.md App. B: **ES** (memla Eq. 9) and **PS** (memla Eq. 10) =
      1[P'(y*|x) > P'(y°|x)] with sequence probabilities, where y° is the old
      target when the request gives one and otherwise the unedited model's
      greedy answer (MzsRE has no old target; a probe whose y° is empty is
      skipped); **NS** (memla Eq. 11) = F1 of the edited model's answer against the
      locality question's gold answer. Transferability = the mean over source
      ≠ target language pairs (:func:`transfer_matrix`).
    * papers/langedit.md §4.1.2: **Efficacy / Generality** = top-1 accuracy of
      the new target on the edit question / paraphrases, **Specificity** = top-1
      accuracy of the unedited model's answer on the locality questions; top-1
      accuracy is the share of answer tokens that are the arg-max under teacher
      forcing (MEMIT's zsRE convention for multi-token answers).

Runs
    :func:`run_evaluation` edits every record with every method and every set
    of edit languages (one edit at a time, reverted before the next: the
    papers' single-edit setting), scores the test languages and appends one
    JSON line per record to ``rows.jsonl`` of the run folder, so an
    interrupted run resumes where it stopped. :mod:`editors.tables` turns the
    rows into the papers' tables (re-exported here).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import pandas as pd

from analysis import runs
from analysis.errors import InputError
from editors.answers import answer_length, answer_scores, greedy_decode
from editors.apply import active_contexts, in_context_prompts
from editors import eval_folders
from editors.base import get_editor
from editors.requests import EditRequest
from editors.metrics import best_exact_match, best_token_f1, token_f1
from editors.tables import (  # noqa: F401 - the tables, re-exported where they always were
    KIND_TITLES, KINDS, METHOD_TITLES, UNEDITED, format_table, format_table2, langedit_table, mean_em,
    memla_report, memla_table, metric_value, mpn_report, mpn_table, report, table1, table2, transfer_matrix)

if TYPE_CHECKING:
    from analysis.model import Workbench

ROWS_FILE = "rows.jsonl"
CONFIG_FILE = "config.json"

Progress = Callable[[float, str], None]


@dataclass
class Probe:
    """One prompt with its reference answer in one test language."""

    language: str
    kind: str
    prompt: str
    reference: str          # what the answer is scored against (see the module table)
    gold: str = ""          # locality: the data set's answer (memla NS); others: = reference
    old: str | None = None  # reliability/generality: the old target y° given by the request
    aliases: tuple[str, ...] = ()  # other answers scored as right (MLaKE's aliases): F1 / EM keep the best


def probes(request: EditRequest, languages: Sequence[str] | None = None) -> list[Probe]:
    """The probes of ``request`` in ``languages`` (default: all of its languages); locality references unset."""
    out: list[Probe] = []
    for lang in languages or request.languages:
        if lang not in request.facts:
            raise InputError(f"{request.label} has no language {lang!r} to test.")
        fact = request.facts[lang]
        new_aliases = tuple(fact.accepted(fact.target_new)[1:])
        out.append(Probe(lang, "reliability", fact.prompt, fact.target_new, fact.target_new, fact.target_old,
                         new_aliases))
        out += [Probe(lang, "generality", p, fact.target_new, fact.target_new, fact.target_old, new_aliases)
                for p in fact.paraphrases]
        out += [Probe(lang, "locality", q, "", a) for q, a in fact.locality]
        out += [Probe(lang, "portability", q, a, a, aliases=tuple(fact.accepted(a)[1:])) for q, a in fact.portability]
    return out


#: How a probe of each kind is named in tables ("edit", "paraphrase 1", "locality 2", ...).
PROBE_LABELS = {"reliability": "edit", "generality": "paraphrase", "locality": "locality",
                "portability": "portability"}


def probe_labels(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """"edit", "paraphrase 1", "locality 1" ... for probes given as (language, kind) pairs, in the order of
    :func:`probes` (numbered per language and kind)."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for lang, kind in pairs:
        n = seen[(lang, kind)] = seen.get((lang, kind), 0) + 1
        name = PROBE_LABELS.get(kind, kind)
        out.append(name if kind == "reliability" else f"{name} {n}")
    return out


def _length(wb: Workbench, probe: Probe) -> int:
    return answer_length(wb, probe.prompt, probe.gold or probe.reference)


def unedited_answers(wb: Workbench, items: Sequence[Probe]) -> list[tuple[str, list[int]]]:
    """The unedited model's greedy answers and their token ids (the locality references and y°).

    Call it without an edit applied.
    """
    return greedy_decode(wb, [p.prompt for p in items], [_length(wb, p) for p in items])


def score_probes(wb: Workbench, items: Sequence[Probe], before: Sequence[tuple[str, list[int]]],
                 unedited: bool = False) -> list[dict[str, Any]]:
    """Every metric of every probe on ``wb`` as it is now (apply the edit around this call).

    ``before`` holds the unedited model's greedy answers to the same probes with
    their token ids (:func:`unedited_answers`). y° and the locality answer kept
    are scored on those very token ids. ``unedited=True`` says ``wb`` is the
    unedited model, whose answers are then ``before`` itself (not decoded again).
    Returns one plain dict per probe; under an in-context edit it also says how many new facts the probe was
    read with (``context_facts``) and, for retrieval, the best similarity (``similarity``).
    """
    items = list(items)
    before_text = [b[0] for b in before]
    with wb.lock:
        answers = before_text if unedited else [
            a for a, _ in greedy_decode(wb, [p.prompt for p in items], [_length(wb, p) for p in items])]
        # teacher-forced scores: y* and y° on the edit prompts, the unedited answer on the locality prompts
        jobs: list[tuple[int, str, Any]] = []
        for i, (p, (b_text, b_ids)) in enumerate(zip(items, before)):
            if p.kind in ("reliability", "generality"):
                jobs.append((i, "new", p.reference))
                old = p.old if p.old else (b_ids if b_text.strip() else None)
                if old:
                    jobs.append((i, "old", old))
            elif p.kind == "locality" and b_ids:
                jobs.append((i, "kept", b_ids))
        scored = answer_scores(wb, [items[i].prompt for i, _, _ in jobs], [a for _, _, a in jobs]) if jobs else []
        # in-context edits: whether each probe was read with a new fact before it (retrieval: its similarity)
        reads = None if unedited or not active_contexts(wb) else in_context_prompts(wb, [p.prompt for p in items])
    by: dict[tuple[int, str], Any] = {(i, what): s for (i, what, _), s in zip(jobs, scored)}
    rows = []
    for i, (p, answer, b) in enumerate(zip(items, answers, before_text)):
        reference = b if p.kind == "locality" else p.reference
        accepted = [reference] if p.kind == "locality" else [reference, *p.aliases]  # the best of answer and aliases
        row: dict[str, Any] = {"language": p.language, "kind": p.kind, "prompt": p.prompt, "reference": reference,
                               "answer": answer, "f1": best_token_f1(answer, accepted, p.language),
                               "em": best_exact_match(answer, accepted, p.language)}
        if p.kind in ("reliability", "generality"):
            new = by[(i, "new")]
            old = by.get((i, "old"))
            row.update(p_new=new.probability, top1=new.top1_accuracy,
                       p_old=None if old is None else old.probability,
                       old=(p.old if p.old else b) or None,
                       es=None if old is None else float(new.logprob > old.logprob))  # memla Eq. 9 / memla Eq. 10
        elif p.kind == "locality":
            row["ns"] = token_f1(answer, p.gold, p.language)  # memla Eq. 11
            kept = by.get((i, "kept"))
            row["top1"] = None if kept is None else kept.top1_accuracy
        if reads is not None:
            row.update(context_facts=len(reads[i].facts), similarity=reads[i].similarity)
        rows.append(row)
    return rows


def before_after(wb: Workbench, request: EditRequest, edit: Any,
                 languages: Sequence[str] | None = None) -> pd.DataFrame:
    """Every probe of ``request`` answered and scored by the unedited model and under ``edit``.

    One row per probe: language, kind, prompt, reference, and for "before" and
    "after" the greedy answer, F1, EM and (edit prompts) P(new target). The
    model is edited only inside this call (``edit.applied``).
    """
    request = request.validate(wb, need_subject=False)  # probes never read the subject
    items = probes(request, languages)
    with wb.lock:
        answers = unedited_answers(wb, items)
        before = score_probes(wb, items, answers, unedited=True)
        with edit.applied(wb):
            after = score_probes(wb, items, answers)
    rows = []
    for p, b, a in zip(items, before, after):
        rows.append({"language": p.language, "kind": p.kind, "prompt": p.prompt,
                     "reference": p.gold if p.kind == "locality" else p.reference,
                     "answer before": b["answer"], "answer after": a["answer"],
                     "P(new) before": b.get("p_new"), "P(new) after": a.get("p_new"),
                     "F1 after": a["f1"], "EM after": a["em"]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- configuration

def parse_language_sets(values: Iterable[str] | str, what: str = "Edit languages") -> list[tuple[str, ...]]:
    """"en,zh" -> [("en", "zh")]; several values give several edit-language sets. ``what`` names them."""
    from data.corpus import normalize_language

    values = [values] if isinstance(values, str) else list(values)
    out = []
    for value in values:
        langs = tuple(normalize_language(x.strip()) for x in str(value).replace("+", ",").split(",") if x.strip())
        if not langs:
            raise InputError(f"{what}: none given ({value!r}); name at least one language, e.g. en,zh.")
        if len(set(langs)) != len(langs):
            raise InputError(f"{what} {value!r} name a language twice.")
        out.append(langs)
    return out


def edit_sets_for(edit_languages: Sequence[str], monolingual: bool = True) -> list[tuple[str, ...]]:
    """The multilingual set of ``edit_languages`` and (for Table 1) each language alone."""
    langs = tuple(edit_languages)
    sets = [langs]
    if monolingual and len(langs) > 1:
        sets += [(lang,) for lang in langs]
    return sets


@dataclass
class EvalConfig:
    """What a run evaluates; saved as ``config.json`` and checked when a run folder is resumed."""

    dataset: str
    methods: list[str]
    edit_sets: list[list[str]]
    test_languages: list[str]
    n: int
    offset: int = 0
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: str = ""

    def key(self) -> dict[str, Any]:
        return self.identity(asdict(self))

    @staticmethod
    def identity(saved: Mapping[str, Any], also_ignore: Sequence[str] = ()) -> dict[str, Any]:
        """What must agree for two runs (``config.json`` dicts) to be one evaluation: all but the parts a
        resumed run may extend (methods, edit sets, n) and ``also_ignore``."""
        ignore = {"methods", "edit_sets", "n", *also_ignore}
        return {k: v for k, v in saved.items() if k not in ignore}


def resolve_hparams(wb: Workbench, method: str, overrides: Mapping[str, Any] | None) -> Any:
    """The preset of ``method`` for ``wb`` with ``overrides`` applied (field values)."""
    editor = get_editor(method)
    cls = editor.hparams_class
    try:
        base = cls.preset(wb).to_dict()
    except InputError:
        if not overrides:
            raise
        base = {}
    base.update(dict(overrides or {}))
    return cls.from_dict(base)


def load_records(dataset: str | Path, languages: Sequence[str], n: int, offset: int = 0,
                 on_skip: Callable[[str], None] | None = None) -> list[Any]:
    """``n`` records of an edit data set (MzsRE / Bi-ZsRE or MLaKE folder or file) that have every one of
    ``languages`` with a subject.

    The format is told by :func:`data.edit_records.load_edit_records`. MLaKE gives no subjects: they are
    derived (:func:`data.edit_records.derive_subject`); records where none could be found in some of
    ``languages`` are skipped, and ``on_skip`` (e.g. the CLI's warning line) is told how many and which.
    """
    from data.edit_records import load_edit_records, subject_report

    if offset < 0 or n < 1:
        raise InputError("--n must be at least 1 and --offset at least 0.")
    loaded = load_edit_records(dataset, languages)
    records = [r for r in loaded if all(lang in r.fields for lang in languages)]
    report = subject_report(records, languages)
    if report.skipped_records and on_skip is not None:
        on_skip(report.skip_message())
    records = [r for r in records if r.record_id not in report.skipped_records]
    chosen = records[offset:offset + n]
    if not chosen:
        raise InputError(f"{dataset}: no record with all of {', '.join(languages)} at offset {offset}"
                         + (f" ({report.skip_message()})" if report.skipped_records else "") + ".")
    return chosen


# --------------------------------------------------------------------- the run

def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line cut by an interrupted write: that record is redone
    return rows


def _append(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_run_folder(config: EvalConfig, out: str | Path, overwrite: bool = False, what: str = "") -> str:
    """Before any work: "new", "resume" or "replace" for ``out``; InputError for a folder that holds another
    evaluation or another command's results (unless ``overwrite``) or files that are not a run."""
    return eval_folders.check_folder(out, config.key(), EvalConfig.identity, overwrite, what)


def run_evaluation(wb: Workbench, config: EvalConfig, out: str | Path, progress: Progress | None = None,
                   records: Sequence[Any] | None = None, overwrite: bool = False) -> pd.DataFrame:
    """Evaluate ``config`` on ``wb`` into the run folder ``out`` (resumed when it holds the same run).

    Returns the probe rows of the whole folder as a DataFrame (columns: method,
    edit_languages, record, seconds, and those of :func:`score_probes`). A folder
    holding another evaluation or another command's results is refused before any
    work unless ``overwrite`` (which starts it afresh). The tables are written from
    the rows at the end, also when the run is interrupted (it resumes next time).
    """
    out = Path(out)
    state = check_run_folder(config, out, overwrite)
    all_langs = list(dict.fromkeys([lang for s in config.edit_sets for lang in s] + list(config.test_languages)))
    if records is None:
        records = load_records(config.dataset, all_langs, config.n, config.offset)
    editors = {m: get_editor(m, resolve_hparams(wb, m, config.hparams.get(m))) for m in config.methods}
    merged = asdict(config)
    try:
        old = eval_folders.read_config(out) if state == "resume" else None
    except InputError:
        old = None  # damaged, but run.json names this evaluation: written again
    if old:
        merged["methods"] = sorted(set(old.get("methods", [])) | set(config.methods))
        merged["edit_sets"] = [list(s) for s in dict.fromkeys(
            tuple(s) for s in list(old.get("edit_sets", [])) + config.edit_sets)]
        merged["n"] = max(int(old.get("n", 0)), config.n)
    eval_folders.start_folder(out, state, merged, config.key())
    rows_path = out / ROWS_FILE
    if rows_path.exists() and rows_path.stat().st_size:
        with rows_path.open("rb+") as fh:           # a line cut by an interruption: end it, it is skipped
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    done = {(r["method"], r["edit_languages"], r["record"]) for r in _read_rows(rows_path) if r.get("done")}
    jobs = [(m, tuple(s)) for m in config.methods for s in config.edit_sets]
    try:
        _run_jobs(wb, config, out, records, editors, jobs, done, progress)
    except BaseException:
        frame = rows_frame(out)
        if not frame.empty:
            write_tables(frame, out, config)  # the tables of the rows written so far; the run resumes next time
        raise
    frame = rows_frame(out)
    write_tables(frame, out, config)
    return frame


def _run_jobs(wb: Workbench, config: EvalConfig, out: Path, records: Sequence[Any], editors: dict[str, Any],
              jobs: list[tuple[str, tuple[str, ...]]], done: set, progress: Progress | None) -> None:
    rows_path = out / ROWS_FILE
    eval_folders.drop_derived(out)  # written again from the rows when the run ends or stops
    total = len(records) * (1 + len(jobs))
    need_subject = any(getattr(e, "needs_subject", True) for e in editors.values())
    step = 0
    before_cache: dict[str, tuple[list[Probe], list[tuple[str, list[int]]]]] = {}
    for record in records:
        test_request = EditRequest.from_record(record, config.test_languages).validate(wb, need_subject)
        items = probes(test_request)
        rid = test_request.case_id
        if (UNEDITED, "-", rid) not in done or any((m, "+".join(s), rid) not in done for m, s in jobs):
            if progress:
                progress(step / total, f"{rid}: the unedited model")
            before = unedited_answers(wb, items)
            before_cache[rid] = (items, before)
            if (UNEDITED, "-", rid) not in done:
                t0 = time.perf_counter()
                scored = score_probes(wb, items, before, unedited=True)
                _append(rows_path, {"method": UNEDITED, "edit_languages": "-", "record": rid, "done": True,
                                    "seconds": time.perf_counter() - t0, "probes": scored})
        step += 1
        for method, langs in jobs:
            label = "+".join(langs)
            if (method, label, rid) in done:
                step += 1
                continue
            if progress:
                progress(step / total, f"{rid}: {METHOD_TITLES.get(method, method)} editing {label}")
            request = EditRequest.from_record(record, langs)
            t0 = time.perf_counter()
            edit = editors[method].compute(wb, request)
            seconds = time.perf_counter() - t0
            with edit.applied(wb):
                scored = score_probes(wb, items, before_cache[rid][1])
            _append(rows_path, {"method": method, "edit_languages": label, "record": rid, "done": True,
                                "seconds": seconds, "probes": scored,
                                "diagnostics": _diagnostics(edit.meta)})
            step += 1
    if progress:
        progress(1.0, "done")


def merge_runs(folders: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> tuple[pd.DataFrame, EvalConfig]:
    """Merge run folders of the same evaluation (e.g. one process per method) into ``out`` and write its tables.

    The folders must agree on data set, test languages, hyper-parameters and
    model; methods, edit-language sets and records are united (a record's latest
    result wins). Folders may cover different record ranges (``--offset``, e.g.
    one process per half of the records): the merged run spans from the smallest
    offset to the end of the last range. An ``out`` that already holds a run of the
    same evaluation is merged too; one that holds anything else is refused unless
    ``overwrite``. ``out`` is written as a whole, atomically.
    """
    folders = [Path(f) for f in folders]
    target = Path(out)
    info = runs.claim(target, "evaluate", overwrite=overwrite)
    configs = []
    for folder in folders:
        config = eval_folders.read_config(folder)
        if config is None:
            raise InputError(f"{folder} is not an evaluation run folder (no {CONFIG_FILE}).")
        configs.append(config)
    keys = [EvalConfig.identity(c, also_ignore=("offset", "hparams")) for c in configs]
    if any(k != keys[0] for k in keys):
        raise InputError("These run folders hold different evaluations (data set, test languages or model).")
    if info.state not in ("absent", "empty") and not overwrite and target.resolve() not in {
            f.resolve() for f in folders}:
        own = eval_folders.read_config(target)
        if own is None or EvalConfig.identity(own, also_ignore=("offset", "hparams")) != keys[0]:
            raise runs.RunFolderError(f"{target} holds another evaluation than the folders merged into it; "
                                      f"{runs.OVERWRITE_HINT}.")
        folders, configs = [*folders, target], [*configs, own]  # nothing it holds is lost
    start = min(int(c.get("offset", 0)) for c in configs)
    end = max(int(c.get("offset", 0)) + int(c["n"]) for c in configs)
    hparams: dict[str, Any] = {}
    for c in configs:
        for method, values in c.get("hparams", {}).items():
            if method in hparams and hparams[method] != values:
                raise InputError(f"The run folders evaluate {method} with different hyper-parameters.")
            hparams[method] = values
    merged = EvalConfig(**{**configs[0], "hparams": hparams,
                           "methods": list(dict.fromkeys(m for c in configs for m in c["methods"])),
                           "edit_sets": [list(s) for s in dict.fromkeys(tuple(s) for c in configs
                                                                          for s in c["edit_sets"])],
                           "offset": start, "n": end - start})
    lines = []
    for folder in folders:
        lines += [json.dumps(r, ensure_ascii=False) for r in _read_rows(folder / ROWS_FILE) if r.get("done")]
    result: dict[str, pd.DataFrame] = {}

    def write(tmp: Path) -> None:
        (tmp / ROWS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(merged), indent=2, ensure_ascii=False), encoding="utf-8")
        result["frame"] = rows_frame(tmp)
        write_tables(result["frame"], tmp, merged)

    runs.write_run(target, "evaluate", runs.request_key(merged.key()), merged.key(), write)
    return result["frame"], merged


def _diagnostics(meta: Mapping[str, Any]) -> dict[str, Any]:
    keep = {}
    for key, value in meta.items():
        if key in ("requests", "model", "versions", "created"):
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        keep[key] = value
    return keep


def rows_frame(out: str | Path) -> pd.DataFrame:
    """One row per probe of a run folder (the latest result per method, edit set and record)."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in _read_rows(Path(out) / ROWS_FILE):
        if r.get("done"):
            latest[(r["method"], r["edit_languages"], r["record"])] = r
    flat = []
    for (method, label, rid), r in latest.items():
        for p in r["probes"]:
            flat.append({"method": method, "edit_languages": label, "record": rid, "seconds": r.get("seconds"),
                         "patches": (r.get("diagnostics") or {}).get("patches_added"), **p})
    return pd.DataFrame(flat)


def write_tables(frame: pd.DataFrame, out: Path, config: EvalConfig) -> Path:
    """``tables.md`` (all tables) and ``probes.csv`` (every probe) in the run folder."""
    text = report(frame, config)
    runs.write_text(out / "probes.csv", frame.to_csv(index=False))
    runs.write_text(out / "tables.md", text)  # written atomically: an interruption leaves no half table
    return out / "tables.md"
