"""The tables of an evaluation run: the papers' layouts, computed from its probe rows.

:func:`table2` (F1/EM per metric and language, "avg" = the mean of all F1 and EM
values, as lu-lafns Table 2), :func:`table1` (mean EM of the four metrics,
monolingual vs multilingual editing, lu-lafns Table 1), :func:`transfer_matrix`
(edit-language sets × test languages; memla's transferability), :func:`memla_table`
(memla App. B and Tables 3-4: ES / PS / NS with cross-lingual averages),
:func:`langedit_table` (LangEdit §4.1.2 top-1 accuracies) and :func:`mpn_table` (mpn Table 1:
Reliability, MLG, CLG per language, Locality, patch count); :func:`report` puts them
in one Markdown text. The rows come from :func:`editors.evaluate.rows_frame`; what
each metric means is in :mod:`editors.evaluate`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

if TYPE_CHECKING:
    from editors.evaluate import EvalConfig

KINDS = ("reliability", "generality", "locality", "portability")
KIND_TITLES = {"reliability": "Reliability", "generality": "Generality", "locality": "Locality",
               "portability": "Portability"}
#: Display names of methods in tables; a multilingual edit with ROME/MEMIT is their M- adaptation.
METHOD_TITLES = {"lu-lafns": "LU-LAFNs", "rome": "M-ROME", "memit": "M-MEMIT", "alphaedit": "M-AlphaEdit",
                 "lora-ft": "LoRA-FT", "memla": "MEMLA", "ike": "IKE", "remake": "ReMaKE (retrieval)",
                 "t-patcher": "T-Patcher", "mpn": "MPN (only)", "mpn-all": "MPN (all)", "ffn-ft": "Fine-tuning",
                 "unedited": "Unedited"}
UNEDITED = "unedited"


def _mean100(values: pd.Series) -> float:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return float(values.mean() * 100) if len(values) else math.nan


def _record_means(frame: pd.DataFrame, column: str) -> pd.Series:
    """Mean per record first (a record with two paraphrases weighs as one with one), then over records."""
    return frame.groupby("record")[column].mean()


def metric_value(frame: pd.DataFrame, kind: str, language: str, column: str) -> float:
    part = frame[(frame["kind"] == kind) & (frame["language"] == language)]
    if part.empty or column not in part:
        return math.nan
    part = part.assign(**{column: pd.to_numeric(part[column], errors="coerce")}).dropna(subset=[column])
    if part.empty:
        return math.nan
    return float(_record_means(part, column).mean() * 100)


def table2(frame: pd.DataFrame, edit_languages: str, test_languages: Sequence[str],
           methods: Sequence[str] | None = None) -> pd.DataFrame:
    """lu-lafns Table 2: F1 and EM (%) per metric per test language for edits of ``edit_languages``; avg."""
    methods = list(methods or _methods(frame))
    out = []
    for method in methods:
        part = _method_rows(frame, method, edit_languages)
        if part.empty:
            continue
        row: dict[str, Any] = {"method": METHOD_TITLES.get(method, method)}
        values = []
        for lang in test_languages:
            for kind in KINDS:
                f1, em = metric_value(part, kind, lang, "f1"), metric_value(part, kind, lang, "em")
                row[f"{lang} {KIND_TITLES[kind]} F1"] = f1
                row[f"{lang} {KIND_TITLES[kind]} EM"] = em
                values += [f1, em]
        finite = [v for v in values if not math.isnan(v)]
        row["avg"] = sum(finite) / len(finite) if finite else math.nan
        row["records"] = part["record"].nunique()
        row["s/edit"] = float(part.groupby("record")["seconds"].first().mean()) if method != UNEDITED else math.nan
        out.append(row)
    return pd.DataFrame(out)


def mean_em(frame: pd.DataFrame, language: str) -> float:
    """Mean EM (%) of the four metrics in ``language`` (lu-lafns Table 1's number)."""
    vals = [metric_value(frame, kind, language, "em") for kind in KINDS]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def table1(frame: pd.DataFrame, edit_languages: Sequence[str], methods: Sequence[str] | None = None) -> pd.DataFrame:
    """lu-lafns Table 1: mean EM of the four metrics; monolingual (edit l, test l) vs multilingual (edit all, test l).

    Only records edited with every set (each language alone and all together) count, so both sides of the
    comparison cover the same records; the "records" column says how many.
    """
    multi = "+".join(edit_languages)
    sets = [multi] + list(edit_languages)
    out = []
    for method in list(methods or _methods(frame)):
        if method == UNEDITED:
            continue
        part = frame[frame["method"] == method]
        # the same records on both sides: those edited with every set (a partial run compares what it has)
        common = set.intersection(*(set(part.loc[part["edit_languages"] == s, "record"]) for s in sets))
        part = part[part["record"].isin(common)]
        row: dict[str, Any] = {"method": METHOD_TITLES.get(method, method), "records": len(common)}
        for lang in edit_languages:
            row[f"mono {lang}"] = mean_em(part[part["edit_languages"] == lang], lang)
        for lang in edit_languages:
            m = mean_em(part[part["edit_languages"] == multi], lang)
            row[f"multi {lang}"] = m
            row[f"Δ {lang}"] = m - row[f"mono {lang}"]
        out.append(row)
    return pd.DataFrame(out)


def transfer_matrix(frame: pd.DataFrame, method: str, test_languages: Sequence[str],
                    column: str = "em", kinds: Sequence[str] = KINDS) -> pd.DataFrame:
    """Edit-language sets × test languages for one method: the mean of ``column`` (%) over ``kinds``.

    With ``column="es"`` and ``kinds=("reliability",)`` this is memla's ES_{ls,lt}
    (``"generality"``: PS; ``column="ns", kinds=("locality",)``: NS). The last
    column, "x-avg", is memla's transferability: the mean over test languages
    that are not in the edit set.
    """
    part = frame[frame["method"] == method]
    sets = list(dict.fromkeys(part["edit_languages"]))
    out = []
    for label in sets:
        sub = part[part["edit_languages"] == label]
        row: dict[str, Any] = {"edit": label}
        cross = []
        for lang in test_languages:
            vals = [metric_value(sub, kind, lang, column) for kind in kinds]
            vals = [v for v in vals if not math.isnan(v)]
            row[lang] = sum(vals) / len(vals) if vals else math.nan
            if lang not in label.split("+") and not math.isnan(row[lang]):
                cross.append(row[lang])
        row["x-avg"] = sum(cross) / len(cross) if cross else math.nan
        out.append(row)
    return pd.DataFrame(out)


def _method_rows(frame: pd.DataFrame, method: str, edit_languages: str) -> pd.DataFrame:
    """The probe rows of ``method`` for edits of ``edit_languages`` (the unedited model's rows for "unedited")."""
    label = "-" if method == UNEDITED else edit_languages
    return frame[(frame["method"] == method) & (frame["edit_languages"] == label)]


def _per_language_table(frame: pd.DataFrame, edit_languages: str, test_languages: Sequence[str],
                        columns: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """One row per method; per test language the columns ``(title, kind, value column)`` as %."""
    out = []
    for method in _methods(frame):
        part = _method_rows(frame, method, edit_languages)
        if part.empty:
            continue
        row: dict[str, Any] = {"method": METHOD_TITLES.get(method, method)}
        for lang in test_languages:
            for title, kind, column in columns:
                row[f"{lang} {title}"] = metric_value(part, kind, lang, column)
        out.append(row)
    return pd.DataFrame(out)


def memla_table(frame: pd.DataFrame, edit_languages: str, test_languages: Sequence[str]) -> pd.DataFrame:
    """memla App. B: ES (memla Eq. 9), PS (memla Eq. 10) and NS (memla Eq. 11) in %, per method and test
    language, for edits of ``edit_languages``; with "x-avg" columns, their means over the test languages
    outside the edit (memla Tables 3-4's cross-lingual averages: the transferability)."""
    columns = [("ES", "reliability", "es"), ("PS", "generality", "es"), ("NS", "locality", "ns")]
    table = _per_language_table(frame, edit_languages, test_languages, columns)
    others = [lang for lang in test_languages if lang not in edit_languages.split("+")]
    if others and not table.empty:
        for title, _, _ in columns:
            table[f"x-avg {title}"] = table[[f"{lang} {title}" for lang in others]].mean(axis=1, skipna=True)
    return table


def memla_report(frame: pd.DataFrame, config: EvalConfig) -> str:
    """``neuroglot evaluate --table memla``: for every edit (source) language set of the run, ES / PS / NS in
    every test language and their cross-lingual averages, per method (MzsRE stands in for MKEB, which is not
    public)."""
    tests = list(config.test_languages)
    parts = []
    for edit_set in config.edit_sets:
        source = "+".join(edit_set)
        parts += [f"## memla Tables 3-4 style: ES / PS / NS (%), edited in {source}, tested in {', '.join(tests)}, "
                  f"{frame['record'].nunique()} records (MzsRE stands in for MKEB)",
                  format_table(memla_table(frame, source, tests))]
    return "\n\n".join(parts) + "\n"


def langedit_table(frame: pd.DataFrame, edit_languages: str, test_languages: Sequence[str]) -> pd.DataFrame:
    """LangEdit §4.1.2: Efficacy, Generality, Specificity (top-1 accuracy, %) per method and test language."""
    return _per_language_table(frame, edit_languages, test_languages,
                               [("Efficacy", "reliability", "top1"), ("Generality", "generality", "top1"),
                                ("Specificity", "locality", "top1")])


def mpn_table(frame: pd.DataFrame, edit_languages: str, test_languages: Sequence[str],
              source: str = "en") -> pd.DataFrame:
    """mpn Table 1 (mpn Eq. 10-13) for edits whose source is ``source``: Reliability (EM of the source edit
    question, %), MLG (EM of its rephrase), CLG (EM of the same question in each other test language) and
    their average, Locality (agreement with the unedited model's answer on the source language's locality
    questions, EM), the patches added over the run and seconds per edit.

    The paper's metrics are accuracies of a classifier's label; here each is the exact match of the greedy
    answer (an LM answering MzsRE questions), the indicator of mpn Eq. 10-13."""
    others = [lang for lang in test_languages if lang != source]
    out = []
    for method in _methods(frame):
        part = _method_rows(frame, method, edit_languages)
        if part.empty:
            continue
        patches = (part.drop_duplicates("record")["patches"] if "patches" in part else pd.Series(dtype=float))
        patches = pd.to_numeric(patches, errors="coerce").dropna()
        row: dict[str, Any] = {"method": METHOD_TITLES.get(method, method),
                               "patches": int(patches.sum()) if method != UNEDITED else 0,
                               f"Reliability ({source})": metric_value(part, "reliability", source, "em"),
                               "MLG": metric_value(part, "generality", source, "em")}
        for lang in others:
            row[f"CLG {lang}"] = metric_value(part, "reliability", lang, "em")
        row["CLG avg"] = (sum(row[f"CLG {lang}"] for lang in others) / len(others)) if others else math.nan
        row["Locality"] = metric_value(part, "locality", source, "em")
        seconds = pd.to_numeric(part.drop_duplicates("record")["seconds"], errors="coerce").dropna()
        row["s/edit"] = float(seconds.mean()) if method != UNEDITED and len(seconds) else math.nan
        row["records"] = int(part["record"].nunique())
        out.append(row)
    return pd.DataFrame(out)


def mpn_report(frame: pd.DataFrame, config: EvalConfig) -> str:
    """``neuroglot evaluate --table mpn``: mpn Table 1 for every edit-language set of the run (the source is
    the set's first language; its other languages are the parallel pool MPN trains with)."""
    tests = list(config.test_languages)
    parts = []
    for edit_set in config.edit_sets:
        label = "+".join(edit_set)
        parts += [f"## mpn Table 1 style (EM %), source {edit_set[0]}, parallel pool {', '.join(edit_set[1:]) or '-'}, "
                  f"tested in {', '.join(tests)}, {frame['record'].nunique()} records",
                  format_table(mpn_table(frame, label, tests, edit_set[0]))]
    return "\n\n".join(parts) + "\n"


def _methods(frame: pd.DataFrame) -> list[str]:
    order = [UNEDITED, "lu-lafns", "memla", "memit", "rome", "alphaedit", "lora-ft", "ike", "remake",
             "ffn-ft", "t-patcher", "mpn", "mpn-all"]
    present = list(dict.fromkeys(frame["method"])) if not frame.empty else []
    return [m for m in order if m in present] + [m for m in present if m not in order]


def format_table2(table: pd.DataFrame, test_languages: Sequence[str]) -> str:
    """Table 2 as Markdown: one "F1 / EM" cell per metric and language."""
    head = ["Method"] + [f"{lang} {KIND_TITLES[k]}" for lang in test_languages for k in KINDS] + ["avg", "s/edit",
                                                                                                "records"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in table.iterrows():
        cells = [row["method"]]
        for lang in test_languages:
            for k in KINDS:
                cells.append(f"{_fmt(row[f'{lang} {KIND_TITLES[k]} F1'])} / {_fmt(row[f'{lang} {KIND_TITLES[k]} EM'])}")
        cells += [_fmt(row["avg"]), _fmt(row.get("s/edit"), 1), str(row.get("records", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(table: pd.DataFrame, digits: int = 2) -> str:
    """Any table of this module as Markdown."""
    if table.empty:
        return "(no rows)"
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], digits) if isinstance(row[c], float) else str(row[c])
                                       for c in cols) + " |")
    return "\n".join(lines)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def report(frame: pd.DataFrame, config: EvalConfig) -> str:
    """Every table of a run as one Markdown text."""
    tests = list(config.test_languages)
    sets = ["+".join(s) for s in config.edit_sets]
    multi = max(sets, key=lambda s: len(s.split("+")))
    parts = [f"## Table 2 style: F1 / EM (%), editing {multi}, {frame['record'].nunique()} records",
             format_table2(table2(frame, multi, tests), tests)]
    multi_langs = multi.split("+")
    if len(multi_langs) > 1 and all(lang in sets for lang in multi_langs):
        parts += ["## Table 1 style: mean EM (%) of the four metrics, monolingual vs multilingual editing",
                  format_table(table1(frame, multi_langs))]
    for method in _methods(frame):
        if method == UNEDITED:
            continue
        parts += [f"## Transfer matrix, {METHOD_TITLES.get(method, method)}: mean EM (%) of the four metrics "
                  "(rows: edit languages; x-avg: test languages outside the edit)",
                  format_table(transfer_matrix(frame, method, tests))]
    parts += [f"## memla App. B: ES / PS / NS (%), editing {multi}", format_table(memla_table(frame, multi, tests))]
    for method in _methods(frame):
        if method == UNEDITED or len(sets) < 2:
            continue
        es = transfer_matrix(frame, method, tests, "es", ("reliability",))
        parts += [f"## memla ES transfer, {METHOD_TITLES.get(method, method)} (x-avg: transferability)",
                  format_table(es)]
    parts += [f"## LangEdit §4.1.2: top-1 accuracy (%), editing {multi}",
              format_table(langedit_table(frame, multi, tests))]
    if set(_methods(frame)) & {"t-patcher", "mpn", "mpn-all", "ffn-ft"}:
        parts += [f"## mpn Table 1 style (EM %), source {multi_langs[0]}, parallel pool "
                  f"{', '.join(multi_langs[1:]) or '-'}", format_table(mpn_table(frame, multi, tests, multi_langs[0]))]
    return "\n\n".join(parts) + "\n"
