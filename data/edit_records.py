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
MLaKE gives no subjects: :func:`derive_subject` derives one per item and
language (``subject``, ``subject_source``; None where no rule finds one, and
:func:`subject_report` counts those). :func:`load_mlake_edits` makes edits of
the single-hop items, each with the post-edit multi-hop questions linked to it
as ``portability`` [{question, answer, aliases}].

:func:`load_edit_records` loads either benchmark, telling them apart with
:func:`edit_data_format`.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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


# --------------------------------------------------------------------------- MLaKE subjects
#: How a subject was found, in the order :func:`derive_subject` tries the rules.
SUBJECT_RULES = ("given", "quoted", "statement", "capitalised", "name")

# title quotes: "…" “…” „…“ «…» 《…》 and 'single' quotes that stand alone (not the apostrophe of "Lee's")
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”|„([^“”]+)[“”]|«\s?([^»]+?)\s?»|《([^》]+)》|(?<!\w)\'([^\']+)\'(?!\w)')
# joins the parts of a transliterated name in scripts without spaces: 卡尔·萨根, カール・セーガン, 让-雅克
_NAME_JOINS = "·・‧-－"
# where the subject of a question or statement written without spaces ends: particles and the most common
# relation openings (zh, ja). The subject is the text before the first of them.
_UNSPACED_STOPS = ("通常", "来自", "位于", "出生", "去世", "起源", "から", "まで", *"的是在曾由被于从与和最为将把对这", *"はがのをにでとへもや")
_SMALL_JOINERS = 3  # a lower-case word of at most this many letters may join capitalised words ("University of X")


def derive_subject(fields: Mapping[str, Any], language: str) -> tuple[str, str] | None:
    """(subject, rule) for one MLaKE item in ``language``, or None when no rule finds one.

    MLaKE gives no subject, but each single-hop item has a question and two
    statements of the fact (``o_prompt``/``e_prompt``, here statement_true /
    statement_new) that differ only in the answer. The subject is a span of
    the *question* (editors find it there), chosen by the first rule that
    gives one:

    1. ``given``: a ``subject`` field of the item, as it is.
    2. ``quoted``: the first span in title quotes ("…", “…”, „…“, «…», 《…》,
       a stand-alone '…'), which is how MLaKE's questions name works.
    3. ``statement``: a span the question shares with a statement once the
       answer is taken out of it. Scripts with spaces: maximal runs of shared
       words (case and edge punctuation ignored, "'s" dropped), cut to the
       words from the first to the last capitalised one; the run with the most
       capitalised words wins (then one that opens the statement, then the
       longer one); a question's first word counts
       as capitalised only inside a longer capitalised run. With no capitalised
       word shared, the longest shared run of at least two words, one of four
       letters or more. Scripts without spaces (zh, ja, th, ...): maximal
       shared substrings, each cut before its first particle or relation
       opening (的 是 在 曾 由 被 于 位于 出生 起源 ..., は が の を ...); a transliterated name
       (卡尔·萨根) wins, then a span at the question's start, then the longest;
       at least two characters.
    4. ``capitalised`` (scripts with case, no statement shared): the longest run
       of capitalised words in the question, short lower-case joiners allowed
       ("University of Cambridge"), not the question's first word alone.
    5. ``name`` (scripts without spaces): a transliterated name in the question
       (parts joined by ·, ・, -), cut before a particle.

    A span equal to the item's answer (old or new) is never taken. None when no
    rule applies: such an item cannot be edited and the loaders skip it, with
    a count (:func:`subject_report`).
    """
    given = fields.get("subject")
    if isinstance(given, str) and given.strip():
        return given.strip(), "given"
    question = str(fields.get("prompt") or "").strip()
    if not question:
        return None
    code = normalize_language(language)
    answers = {str(a).casefold() for a in (fields.get("target_true"), fields.get("target_new")) if a}

    def allowed(span: str | None) -> bool:
        return bool(span) and span.casefold() not in answers and any(ch.isalnum() for ch in span)

    for m in _QUOTED.finditer(question):
        inner = next(g for g in m.groups() if g is not None).strip()
        if allowed(inner) and any(ch.isalpha() for ch in inner):
            return inner, "quoted"
    unspaced = code in NO_SPACE_LANGUAGES
    for statement, answer in ((fields.get("statement_new"), fields.get("target_new")),
                              (fields.get("statement_true"), fields.get("target_true"))):
        if not statement:
            continue
        rest = _without_answer(str(statement), answer)
        span = _shared_span_unspaced(question, rest) if unspaced else _shared_span_spaced(question, rest)
        if allowed(span):
            return span, "statement"
    if unspaced:
        span = _name_span(question)
        return (span, "name") if allowed(span) else None
    span = _capitalised_span(question)
    return (span, "capitalised") if allowed(span) else None


def _without_answer(statement: str, answer: Any) -> str:
    """The statement with its last occurrence of ``answer`` replaced by a break that matches nothing."""
    if not answer:
        return statement
    at = statement.rfind(str(answer))
    return statement if at < 0 else statement[:at] + "\x00" + statement[at + len(str(answer)):]


def _words(text: str) -> list[tuple[int, int, str]]:
    """(start, end, key) per word: edge punctuation and a possessive 's left out of the span, key case-folded."""
    out = []
    for m in re.finditer(r"\S+", text):
        start, end = m.start(), m.end()
        while start < end and unicodedata.category(text[start])[0] in "PS":
            start += 1
        while end > start and unicodedata.category(text[end - 1])[0] in "PS":
            end -= 1
        if text[start:end].endswith(("'s", "’s")):
            end -= 2
        if end > start:
            out.append((start, end, text[start:end].casefold()))
    return out


def _shared_runs(a: Sequence[Any], b: Sequence[Any]) -> list[tuple[int, int, int]]:
    """Maximal runs ``a[i:j]`` that also occur in ``b`` as a run, as (i, j, where the run starts in ``b``)."""
    length = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            if a[i] == b[j]:
                length[i + 1][j + 1] = length[i][j] + 1
    runs = set()
    for i in range(len(a)):
        for j in range(len(b)):
            n = length[i + 1][j + 1]
            if n and not (i + 1 < len(a) and j + 1 < len(b) and a[i + 1] == b[j + 1]):
                runs.add((i + 1 - n, i + 1, j + 1 - n))
    return sorted(runs)


def _capitalised(word: str) -> bool:
    return word[:1].isupper() or word[:1].isdigit()


def _shared_span_spaced(question: str, statement: str) -> str | None:
    q_words, s_words = _words(question), _words(statement)
    best: tuple[tuple[int, bool, int], str] | None = None
    longest: tuple[int, str] | None = None
    for start, stop, in_statement in _shared_runs([k for _, _, k in q_words], [k for _, _, k in s_words]):
        run = q_words[start:stop]
        named = [i for i, (a, b, _) in enumerate(run) if _capitalised(question[a:b])
                 and (start + i > 0 or (len(run) > 1 and _capitalised(question[run[1][0]:run[1][1]])))]
        if named:
            core = run[named[0]:named[-1] + 1]
            text = question[core[0][0]:core[-1][1]]
            score = (len(named), in_statement + named[0] == 0, len(text))  # MLaKE's statements open with it
            if best is None or score > best[0]:
                best = (score, text)
        elif len(run) >= 2 and any(len(k) >= 4 for _, _, k in run):
            text = question[run[0][0]:run[-1][1]]
            if longest is None or len(text) > longest[0]:
                longest = (len(text), text)
    if best:
        return best[1]
    return longest[1] if longest else None


def _trim_unspaced(text: str) -> str:
    """``text`` without edge spaces, breaks and punctuation (the joins of a name stay inside it)."""
    def edge(ch: str) -> bool:
        return ch.isspace() or ch == "\x00" or unicodedata.category(ch)[0] == "P"
    start, end = 0, len(text)
    while start < end and edge(text[start]):
        start += 1
    while end > start and edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _cut_unspaced(text: str) -> str:
    """``text`` up to its first particle or relation opening (after its first character), trimmed."""
    text = _trim_unspaced(text)
    while text and text[0] in _UNSPACED_STOPS:  # a run may start with the particle after the previous word
        text = _trim_unspaced(text[1:])
    cut = len(text)
    for stop in _UNSPACED_STOPS:
        at = text.find(stop, 1)
        if 0 < at < cut:
            cut = at
    return _trim_unspaced(text[:cut])


def _shared_span_unspaced(question: str, statement: str) -> str | None:
    best: tuple[tuple[bool, bool, int], str] | None = None
    for start, stop, _ in _shared_runs(question, statement):
        text = _cut_unspaced(question[start:stop])
        if len(text) < 2:
            continue
        score = (any(j in text[1:-1] for j in _NAME_JOINS), question.startswith(text), len(text))
        if best is None or score > best[0]:
            best = (score, text)
    return best[1] if best else None


def _name_span(question: str) -> str | None:
    joins = re.escape(_NAME_JOINS)
    m = re.search(rf"[^\s{joins}\W]+(?:[{joins}][^\s{joins}\W]+)+", question)
    if not m:
        return None
    text = m.group()
    last_join = max(text.rfind(j) for j in _NAME_JOINS)
    tail = _cut_unspaced(text[last_join + 1:])
    return text[:last_join + 1] + tail if tail else None


def _capitalised_span(question: str) -> str | None:
    words = _words(question)
    best: tuple[tuple[int, int], str] | None = None
    i = 0
    while i < len(words):
        starts_alone = i == 0 and not (len(words) > 1 and _capitalised(question[words[1][0]:words[1][1]]))
        if starts_alone or not _capitalised(question[words[i][0]:words[i][1]]):
            i += 1  # a question's first word is capitalised anyway: it counts only before another capitalised one
            continue
        j, last, count = i + 1, i, 1
        while j < len(words):
            word = question[words[j][0]:words[j][1]]
            if _capitalised(word):
                last, count = j, count + 1
            elif not (len(word) <= _SMALL_JOINERS and word.isalpha() and word.islower()):
                break
            j += 1
        text = question[words[i][0]:words[last][1]]
        if best is None or (count, len(text)) > best[0]:
            best = ((count, len(text)), text)
        i = last + 1
    return best[1] if best else None


@dataclass
class SubjectReport:
    """How the subjects of edit records were found: counts per rule, and the (record, language) pairs without."""

    rules: dict[str, int] = field(default_factory=dict)
    missing: list[tuple[str, str]] = field(default_factory=list)
    records: int = 0

    @property
    def skipped_records(self) -> set[str]:
        return {record_id for record_id, _ in self.missing}

    def skip_message(self) -> str:
        """One line: how many records are skipped and which (record, language) had no subject."""
        shown = ", ".join(f"{rid} ({code})" for rid, code in self.missing[:5])
        more = f" and {len(self.missing) - 5} more" if len(self.missing) > 5 else ""
        return (f"skipped {len(self.skipped_records)} of {self.records} records: no subject could be derived "
                f"for {shown}{more}")


def subject_report(records: Sequence[EditRecord], languages: Iterable[str] | None = None) -> SubjectReport:
    """Count the subjects of ``records`` in ``languages`` (default: each record's own) by rule; list the missing.

    MzsRE records have a subject everywhere (counted as "given").
    """
    wanted = None if languages is None else [normalize_language(c) for c in languages]
    report = SubjectReport(records=len(records))
    for record in records:
        for code in wanted or record.languages:
            f = record.fields.get(code)
            if f is None:
                continue
            if f.get("subject"):
                rule = f.get("subject_source") or "given"
                report.rules[rule] = report.rules.get(rule, 0) + 1
            else:
                report.missing.append((record.record_id, code))
    return report


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


def _mlake_groups(path: str | Path, language: str | None = None, skip_mcqa: bool = False
                  ) -> list[tuple[str, str, list[EditRecord]]]:
    """(group, old_/new_ prefix or "", records) per group of parallel MLaKE files, subjects derived."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.json") if p.is_file()
                       and not (skip_mcqa and p.stem.lower().endswith("_mcqa")))
        if not files:
            raise CorpusError(f"{path}: no .json file below this folder.")
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise CorpusError(f"{path}: file or folder not found.")
    groups: dict[str, dict[str, tuple[Path, list[tuple[str, Any]]]]] = {}
    prefixes: dict[str, str] = {}
    for file in files:
        prefix, per_language = _mlake_file(file, language)
        folder = file.parent.relative_to(root).as_posix()
        group = "/".join(part for part in (folder if folder != "." else "", prefix) if part)
        prefixes[group] = prefix if prefix in ("old", "new") else ""
        for code, items in per_language.items():
            bucket = groups.setdefault(group, {})
            if code in bucket:
                raise CorpusError(f"{file}: language {code!r} of group {group or '(top)'} is also in {bucket[code][0]}.")
            bucket[code] = (file, items)
    out = []
    for group, bucket in groups.items():
        lengths = {code: len(items) for code, (_, items) in bucket.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{bucket[c][0].name}: {n}" for c, n in lengths.items())
            raise CorpusError(f"{path}: parallel MLaKE files have different numbers of items ({detail}); "
                              "they are merged by item index, so they must be the same length.")
        n = next(iter(lengths.values()))
        records = []
        for i in range(n):
            record_id = f"mlake:{group}:{i}" if group else f"mlake:{i}"
            fields = {code: _mlake_item(items[i][1], items[i][0]) for code, (_, items) in bucket.items()}
            for code, f in fields.items():
                derived = derive_subject(f, code)
                f["subject"], f["subject_source"] = derived if derived else (None, None)
            records.append(EditRecord(record_id=record_id, fields=fields, dataset="mlake"))
        out.append((group, prefixes[group], records))
    return out


def load_mlake(path: str | Path, language: str | None = None) -> list[EditRecord]:
    """MLaKE records from one file (list of items, or {language: [items]}) or a folder of files.

    Items of parallel files (same folder and old_/new_ prefix, different
    language) are merged by index into one record. Every language of every
    record gets ``subject`` and ``subject_source`` from :func:`derive_subject`
    (both None where no subject could be found). Every group is returned as it
    is; :func:`load_mlake_edits` makes edit requests of them.
    """
    records = [r for _, _, group in _mlake_groups(path, language) for r in group]
    if not records:
        raise CorpusError(f"{path}: no MLaKE items.")
    return records


def load_mlake_edits(path: str | Path, languages: Iterable[str] | None = None) -> list[EditRecord]:
    """MLaKE as edits: its single-hop questions, each with the multi-hop questions that follow from it.

    The records are the single-hop items (files ``<lang>_qa.json``, merged by
    index): question, e_answer as the new target, o_answer as the old one,
    aliases. A post-edit multi-hop item (``new_<lang>_qa.json``) belongs to the
    single-hop item whose edited statement it repeats: MLaKE writes the
    single-hop ``e_prompt`` into each of its multi-hop items (its ``triples``
    start with the same Wikidata subject and relation, but single-hop items
    carry no triples). The first language whose ``e_prompt`` matches links the
    merged multi-hop record; each of its languages then adds
    ``{"question", "answer", "aliases"}`` to that language's ``portability``
    list. Pre-edit multi-hop files (``old_``) ask what the edit should change,
    with the old answers, and are not used; MCQA files (``*_mcqa.json``) neither.
    Multi-hop items that match no single-hop item are left out.
    """
    groups = _mlake_groups(path, skip_mcqa=True)
    single = [r for _, prefix, records in groups if not prefix for r in records]
    if not single:
        raise CorpusError(f"{path}: no single-hop MLaKE file (<lang>_qa.json). MLaKE's edits are its single-hop "
                          "questions; the multi-hop files (old_/new_<lang>_qa.json) only add portability questions.")
    by_statement: dict[tuple[str, str], EditRecord] = {}
    for record in single:
        for code, f in record.fields.items():
            f["portability"] = []
            if f.get("statement_new"):
                by_statement.setdefault((code, f["statement_new"]), record)
    for _, prefix, records in groups:
        if prefix != "new":
            continue
        for hop in records:
            order = sorted(hop.fields, key=lambda c: (c != "en", c))
            target = next((by_statement[(c, hop.fields[c]["statement_new"])] for c in order
                           if (c, hop.fields[c].get("statement_new")) in by_statement), None)
            if target is None:
                continue
            for code, f in hop.fields.items():
                if code in target.fields and f.get("target_new"):
                    target.fields[code]["portability"].append(
                        {"question": f["prompt"], "answer": f["target_new"], "aliases": list(f["new_aliases"])})
    if languages is not None:
        wanted = {normalize_language(code) for code in languages}
        for record in single:
            record.fields = {k: v for k, v in record.fields.items() if k in wanted}
        single = [r for r in single if r.fields]
        if not single:
            raise CorpusError(f"{path}: no MLaKE record in language(s) {', '.join(sorted(wanted))}.")
    return single


def edit_data_format(path: str | Path) -> str:
    """"mzsre" or "mlake": which benchmark a folder or file holds, by file names and, for a file, content."""
    path = Path(path)
    if path.is_dir():
        if any(path.glob("mzsre_test_duplicate_en*.json")):
            return "mzsre"
        if any(_MLAKE_NAME.match(p.stem) for p in path.rglob("*.json")):
            return "mlake"
        raise CorpusError(f"{path}: neither an MzsRE / Bi-ZsRE folder (mzsre_test_duplicate_en*.json) nor an MLaKE "
                          "folder (<lang>_qa.json, multi-hop old_/new_<lang>_qa.json).")
    if not path.exists():
        raise CorpusError(f"{path}: file or folder not found.")
    if path.name.startswith("mzsre_") or path.suffix.lower() != ".json":
        return "mzsre"  # load_mzsre says what is wrong with other files
    data = _load_json(path)
    if isinstance(data, dict):
        return "mlake"  # {language: [items]}
    if isinstance(data, list) and data and isinstance(data[0], dict) and "question" in data[0]:
        return "mlake"
    return "mzsre"


def load_edit_records(path: str | Path, languages: Iterable[str] | None = None) -> list[EditRecord]:
    """The edit records of an MzsRE / Bi-ZsRE or MLaKE folder or file, the format told by :func:`edit_data_format`.

    MzsRE: :func:`load_mzsre`. MLaKE: :func:`load_mlake_edits` (single-hop
    edits, multi-hop portability, subjects derived; see :func:`subject_report`
    for the ones that could not be).
    """
    if edit_data_format(path) == "mzsre":
        return load_mzsre(path, languages)
    return load_mlake_edits(path, languages)


# --------------------------------------------------------------------------- to a corpus
def as_corpus(records: list[EditRecord], target: str = "new", name: str | None = None) -> Corpus:
    """One corpus row per record, language and question (prompt, and rephrase where given).

    ``target="new"`` uses the edit's new answer as the object, ``"true"`` the
    answer before the edit (MLaKE only: MzsRE gives no original answer).  The
    relation is the data set name; fact_id is the record id.  Records need a
    subject in every language (MLaKE's are derived; see :func:`derive_subject`).
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
                raise CorpusError(f"{where} has no subject: none could be derived (see derive_subject). "
                                  "Add a 'subject' field to its items.")
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
