"""Edit requests of multilingual knowledge-editing benchmarks: MzsRE / Bi-ZsRE and MLaKE.

Each loader returns a list of :class:`EditRecord`: one fact to edit, with a
dict of fields per language.  :func:`as_corpus` turns records into a
:class:`~data.corpus.Corpus` (one row per record, language and question).

MzsRE / Bi-ZsRE (upstream ``mzsre_test_duplicate_en<xx>.json``): a JSON list;
each item has two language keys (``en`` and one of cz de du es fr pt ru th tr
vi zh), each with subject, src, rephrase, alt, loc, loc_ans and
portability{"New Question", "New Answer"}.  Per language the record holds:

    subject, prompt (= src), rephrase, target_new (= alt), loc, loc_ans,
    port_question, port_answer (None when the item has no portability part)

``loc`` is kept as given (English loc questions carry ZsRE's "nq question: "
prefix).  A folder loads every ``mzsre_test_duplicate_en*.json`` in it and
merges them by record index: record i of every file is the same English fact.
This holds for the ReMaKE files (all 11 files list identical English parts,
checked on the 500-record dev copies in shared/data/mzsre/dev), and the
loader checks it: a differing English part is a CorpusError.

MLaKE (upstream ``dataset/single_hop/qa/<lang>_qa.json`` and
``dataset/multi_hop/qa/{old,new}_<lang>_qa.json``): a JSON list of items with
question, o_answer (answer before the edit), e_answer (after the edit) and
their aliases (``o_answer_aliases``/``e_answer_aliases``, or ``aliases`` for the
answer the item has), optionally o_prompt/e_prompt statements and a subject.
Per language the record holds:

    prompt (= question), target_true (= o_answer), target_new (= e_answer),
    true_aliases, new_aliases, statement_true (= o_prompt),
    statement_new (= e_prompt), subject (None: MLaKE gives no subjects)

A file may also be a dict {language: [items]}.  A folder loads every *.json
below it; files that differ only in their language code (``en_qa.json``,
``de_qa.json``) are merged by item index, the same assumption MLaKE's
parallel construction rests on; files of one group must have equal lengths.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from analysis.errors import CorpusError
from data.corpus import NO_SPACE_LANGUAGES, REQUIRED_COLUMNS, Corpus, normalize_language


@dataclass
class EditRecord:
    """One fact to edit, in several languages: ``fields[language][name]``."""

    record_id: str
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: str = ""

    @property
    def languages(self) -> list[str]:
        return sorted(self.fields)

    def __getitem__(self, language: str) -> dict[str, Any]:
        code = normalize_language(language)
        if code not in self.fields:
            raise CorpusError(f"record {self.record_id} has no language {code!r}; it has {', '.join(self.languages)}.")
        return self.fields[code]


# --------------------------------------------------------------------------- JSON helpers
def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise CorpusError(f"{path}: file not found.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CorpusError(f"{path}: not UTF-8 text (a binary file, or another encoding), so not an edit data set."
                          ) from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}).") from None


def _text(block: dict, key: str, where: str, required: bool = True) -> str | None:
    value = block.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise CorpusError(f"{where}: missing field {key!r}.")
        return None
    if isinstance(value, (list, dict)):
        raise CorpusError(f"{where}: field {key!r} must be text, got {type(value).__name__}.")
    return str(value).strip()


def _aliases(value: Any, where: str, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise CorpusError(f"{where}: field {key!r} must be a list of strings.")
    return [str(v) for v in value if str(v).strip()]


# --------------------------------------------------------------------------- MzsRE
MZSRE_FIELDS = {  # our name -> upstream key
    "subject": "subject", "prompt": "src", "rephrase": "rephrase",
    "target_new": "alt", "loc": "loc", "loc_ans": "loc_ans",
}


def _mzsre_block(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, dict):
        raise CorpusError(f"{where}: expected an object with subject, src, alt, ..., got {type(block).__name__}.")
    out = {ours: _text(block, theirs, where) for ours, theirs in MZSRE_FIELDS.items()}
    port = block.get("portability")
    if port is None:
        out["port_question"] = out["port_answer"] = None
    elif isinstance(port, dict):
        out["port_question"] = _text(port, "New Question", f"{where}, portability")
        out["port_answer"] = _text(port, "New Answer", f"{where}, portability")
    else:
        raise CorpusError(f"{where}: field 'portability' must be an object with 'New Question' and 'New Answer'.")
    return out


def load_mzsre(path: str | Path, languages: Iterable[str] | None = None) -> list[EditRecord]:
    """MzsRE / Bi-ZsRE records from one upstream file or a folder of them (merged by index)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("mzsre_test_duplicate_en*.json"))
        if not files:
            raise CorpusError(f"{path}: no mzsre_test_duplicate_en*.json file in this folder.")
    elif path.is_file():
        if path.suffix.lower() in (".jsonl", ".csv"):
            raise CorpusError(f"{path} looks like a fact corpus ({path.suffix} file), not an edit data set: give an "
                              "MzsRE / Bi-ZsRE folder or .json file (corpora go to --corpus).")
        files = [path]
    else:
        raise CorpusError(f"{path}: file or folder not found.")
    wanted = None if languages is None else {normalize_language(code) for code in languages}
    records: list[EditRecord] = []
    first_seen: dict[tuple[int, str], Path] = {}
    for file in files:
        try:
            items = _load_json(file)
        except CorpusError as exc:
            if "not valid JSON" in str(exc):
                raise CorpusError(f"{exc} It is not an MzsRE / Bi-ZsRE edit data set (one JSON list).") from None
            raise
        if not isinstance(items, list):
            raise CorpusError(f"{file}: expected a JSON list of records, got {type(items).__name__}; not an "
                              "MzsRE / Bi-ZsRE edit data set.")
        for i, item in enumerate(items):
            where = f"{file}, item {i}"
            if not isinstance(item, dict) or not item:
                raise CorpusError(f"{where}: expected an object keyed by language codes.")
            if i == len(records):
                records.append(EditRecord(record_id=f"mzsre:{i}", dataset="mzsre"))
            record = records[i]
            for key, block in item.items():
                code = normalize_language(key, where=where)
                parsed = _mzsre_block(block, f"{where}, {key!r}")
                if code in record.fields:
                    if record.fields[code] != parsed:
                        raise CorpusError(
                            f"{where}: its {key!r} part differs from item {i} of {first_seen[(i, code)]}. "
                            "Files are merged by item index, so they must list the same facts in the same order."
                        )
                    continue
                record.fields[code] = parsed
                first_seen[(i, code)] = file
    if wanted is not None:
        for record in records:
            record.fields = {k: v for k, v in record.fields.items() if k in wanted}
        records = [r for r in records if r.fields]
        if not records:
            raise CorpusError(f"{path}: no record in language(s) {', '.join(sorted(wanted))}.")
    return records


# --------------------------------------------------------------------------- MLaKE
_MLAKE_NAME = re.compile(r"^(?:(?P<prefix>old|new)_)?(?P<lang>[A-Za-z]{2,3}(?:-[A-Za-z]+)?)(?:_(?:qa|mcqa))?$")


def _mlake_item(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise CorpusError(f"{where}: expected an object with 'question' and 'o_answer' or 'e_answer'.")
    question = _text(item, "question", where)
    target_true = _text(item, "o_answer", where, required=False)
    target_new = _text(item, "e_answer", where, required=False)
    if target_true is None and target_new is None:
        raise CorpusError(f"{where}: missing field 'o_answer' or 'e_answer' (an item needs an answer).")
    generic = _aliases(item.get("aliases"), where, "aliases")
    true_aliases = _aliases(item.get("o_answer_aliases"), where, "o_answer_aliases")
    new_aliases = _aliases(item.get("e_answer_aliases"), where, "e_answer_aliases")
    if generic:
        if target_true is not None and not true_aliases:
            true_aliases = generic
        elif target_true is None and not new_aliases:
            new_aliases = generic
    return {
        "prompt": question, "target_true": target_true, "target_new": target_new,
        "true_aliases": true_aliases, "new_aliases": new_aliases,
        "statement_true": _text(item, "o_prompt", where, required=False),
        "statement_new": _text(item, "e_prompt", where, required=False),
        "subject": _text(item, "subject", where, required=False),
    }


def _mlake_file(file: Path, language: str | None) -> tuple[str, dict[str, list[tuple[str, Any]]]]:
    """(group prefix, {language: [(where, item)]}) of one MLaKE file."""
    data = _load_json(file)
    m = _MLAKE_NAME.match(file.stem)
    prefix = (m.group("prefix") or "") if m else file.stem
    if isinstance(data, dict):
        out = {}
        for key, items in data.items():
            code = normalize_language(key, where=f"{file}, key {key!r}")
            if not isinstance(items, list):
                raise CorpusError(f"{file}, key {key!r}: expected a list of items, got {type(items).__name__}.")
            out[code] = [(f"{file}, {key!r} item {i}", item) for i, item in enumerate(items)]
        return prefix, out
    if not isinstance(data, list):
        raise CorpusError(f"{file}: expected a JSON list of items or an object {{language: [items]}}.")
    if language is None:
        if not m:
            raise CorpusError(f"{file}: cannot tell the language from the file name; name it <lang>_qa.json "
                              "or pass language=.")
        language = m.group("lang")
    code = normalize_language(language, where=str(file))
    return prefix, {code: [(f"{file}, item {i}", item) for i, item in enumerate(data)]}


def load_mlake(path: str | Path, language: str | None = None) -> list[EditRecord]:
    """MLaKE records from one file (list of items, or {language: [items]}) or a folder of files.

    Items of parallel files (same folder and old_/new_ prefix, different
    language) are merged by index into one record.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.json") if p.is_file())
        if not files:
            raise CorpusError(f"{path}: no .json file below this folder.")
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise CorpusError(f"{path}: file or folder not found.")
    groups: dict[str, dict[str, tuple[Path, list[tuple[str, Any]]]]] = {}
    for file in files:
        prefix, per_language = _mlake_file(file, language)
        folder = file.parent.relative_to(root).as_posix()
        group = "/".join(part for part in (folder if folder != "." else "", prefix) if part)
        for code, items in per_language.items():
            bucket = groups.setdefault(group, {})
            if code in bucket:
                raise CorpusError(f"{file}: language {code!r} of group {group or '(top)'} is also in {bucket[code][0]}.")
            bucket[code] = (file, items)
    records = []
    for group, bucket in groups.items():
        lengths = {code: len(items) for code, (_, items) in bucket.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{bucket[c][0].name}: {n}" for c, n in lengths.items())
            raise CorpusError(f"{path}: parallel MLaKE files have different numbers of items ({detail}); "
                              "they are merged by item index, so they must be the same length.")
        n = next(iter(lengths.values()))
        for i in range(n):
            record_id = f"mlake:{group}:{i}" if group else f"mlake:{i}"
            fields = {code: _mlake_item(items[i][1], items[i][0]) for code, (_, items) in bucket.items()}
            records.append(EditRecord(record_id=record_id, fields=fields, dataset="mlake"))
    if not records:
        raise CorpusError(f"{path}: no MLaKE items.")
    return records


# --------------------------------------------------------------------------- to a corpus
def as_corpus(records: list[EditRecord], target: str = "new", name: str | None = None) -> Corpus:
    """One corpus row per record, language and question (prompt, and rephrase where given).

    ``target="new"`` uses the edit's new answer as the object, ``"true"`` the
    answer before the edit (MLaKE only: MzsRE gives no original answer).  The
    relation is the data set name; fact_id is the record id.  Records need a
    subject in every language (MLaKE gives none).
    """
    if target not in ("new", "true"):
        raise CorpusError(f"target must be 'new' or 'true', got {target!r}.")
    if not records:
        raise CorpusError("no edit records to turn into a corpus.")
    key = "target_new" if target == "new" else "target_true"
    rows = []
    for record in records:
        for code, f in record.fields.items():
            where = f"record {record.record_id} ({code})"
            subject = f.get("subject")
            if not subject:
                raise CorpusError(f"{where} has no subject; MLaKE gives none. Add a 'subject' field to its items.")
            obj = f.get(key)
            if not obj:
                raise CorpusError(f"{where} has no {key}: use target={'true' if target == 'new' else 'new'!r}.")
            sep = "" if code in NO_SPACE_LANGUAGES else " "
            for template_id in ("prompt", "rephrase"):
                prompt = f.get(template_id)
                if not prompt:
                    continue
                template = prompt.replace(subject, "[X]", 1) + sep + "[Y]"
                rows.append((record.record_id, record.dataset or "edit", code, subject, obj, prompt,
                             template_id, template))
    frame = pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))
    dataset = records[0].dataset or "edits"
    return Corpus(frame, name=name or dataset, source=dataset)
