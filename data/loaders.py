"""Read corpora: the bundled demo, ParaRel, mParaRel, X-FACTR and user JSONL/CSV files.

One entry point, :func:`load_corpus`, takes a spec:

``"demo"``
    the bundled demo corpus (data/demo/, see its NOTICE).
a directory
    ParaRel when it holds ``patterns/P*.jsonl`` and ``tuples/P*.jsonl``
    (English only; every pattern x every tuple; ``fact_id = "<rel>:<uuid>"``),
    mParaRel when it holds ``patterns/<lang>/P*.jsonl`` and
    ``tuples/<lang>/P*.jsonl`` (``fact_id = "<rel>:<lineid>"``, which aligns a
    fact across languages).
``"xfactr:<TREx_prompts.csv>?tuples=<mParaRel folder>"``
    X-FACTR's one prompt per relation and language, filled with the mParaRel
    tuples (see :func:`load_xfactr` and :func:`reduce_xfactr_markup`).
a ``.jsonl`` or ``.csv`` file
    a user corpus, one row per line with fields fact_id, relation, language,
    subject, object and either prompt or template (template_id optional).

Patterns whose [Y] comes before [X] (e.g. "[Y] is the capital of [X]") are
left out of ParaRel, mParaRel and X-FACTR corpora: the prompt is the text
before [Y], and it would not contain the subject.  Their number is logged.

Malformed input raises :class:`CorpusError` naming the file and the 1-based
line number.
"""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import parse_qs

import pandas as pd

from analysis.errors import CorpusError
from data.corpus import (
    NO_SPACE_LANGUAGES,
    REQUIRED_COLUMNS,
    Corpus,
    check_template,
    normalize_language,
    prompt_from_template,
    subject_before_object,
)

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"
_RELATION_FILE = re.compile(r"^P\d+\.jsonl$")


# --------------------------------------------------------------------------- entry point
def load_corpus(
    spec: str | Path = "demo",
    languages: Iterable[str] | None = None,
    relations: Iterable[str] | None = None,
    max_facts: int | None = None,
    seed: int = 0,
) -> Corpus:
    """Load a corpus from ``spec`` (see the module docstring), then filter it.

    ``languages`` and ``relations`` restrict what is read (large folders load
    faster); ``max_facts`` keeps at most that many facts per relation, sampled
    reproducibly from ``seed``.
    """
    try:
        return _load_corpus(spec, languages, relations, max_facts, seed)
    except UnicodeDecodeError:  # the user-file readers name the file; this covers the folder layouts
        raise CorpusError(f"corpus {str(spec).strip()!r}: a file of it is not UTF-8 text (a binary file, or "
                          "another encoding); save it as UTF-8.") from None


def _load_corpus(spec, languages, relations, max_facts, seed) -> Corpus:
    langs = _normalize_languages(languages)
    rels = _as_list(relations)
    text = str(spec).strip()
    if text == "demo":
        corpus = load_demo()
    elif text.startswith("xfactr:"):
        csv_path, tuples_dir = _parse_xfactr_spec(text)
        corpus = load_xfactr(csv_path, tuples_dir, languages=langs, relations=rels)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise CorpusError(
                f"corpus {text!r} not found: give 'demo', a ParaRel or mParaRel folder, "
                "'xfactr:<TREx_prompts.csv>?tuples=<mParaRel folder>', or a .jsonl/.csv file."
            )
        if path.is_dir():
            layout = detect_layout(path)
            if layout == "pararel":
                corpus = load_pararel(path, languages=langs, relations=rels)
            else:
                corpus = load_mpararel(path, languages=langs, relations=rels)
        elif path.suffix.lower() in (".jsonl", ".csv"):
            corpus = load_user_corpus(path)
        else:
            raise CorpusError(f"{path}: unsupported file type {path.suffix!r}; a corpus file must be .jsonl or .csv.")
    if langs is not None or rels is not None or max_facts is not None:
        corpus = corpus.filter(languages=langs, relations=rels, max_facts=max_facts, seed=seed)
    return corpus


def detect_layout(path: Path) -> str:
    """"pararel" or "mpararel" for a folder; CorpusError for anything else."""
    patterns, tuples = path / "patterns", path / "tuples"
    if patterns.is_dir() and tuples.is_dir():
        if any(_RELATION_FILE.match(p.name) for p in patterns.iterdir() if p.is_file()):
            return "pararel"
        for sub in patterns.iterdir():
            if sub.is_dir() and any(_RELATION_FILE.match(p.name) for p in sub.iterdir()):
                return "mpararel"
    raise CorpusError(
        f"{path}: unrecognised folder layout. Expected ParaRel (patterns/P*.jsonl and "
        "tuples/P*.jsonl) or mParaRel (patterns/<lang>/P*.jsonl and tuples/<lang>/P*.jsonl)."
    )


# --------------------------------------------------------------------------- helpers
def _as_list(values: Iterable[str] | str | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        return [values]
    return [str(v) for v in values]


def _normalize_languages(languages: Iterable[str] | str | None) -> list[str] | None:
    values = _as_list(languages)
    return None if values is None else [normalize_language(v) for v in values]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line; CorpusError on bad JSON."""
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e}).") from None
    with f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}, line {lineno}: not valid JSON ({e.msg}).") from None
                if not isinstance(obj, dict):
                    raise CorpusError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}.")
                yield lineno, obj
        except UnicodeDecodeError:
            raise CorpusError(not_utf8(path)) from None


def not_utf8(path: Path) -> str:
    return f"{path}: not UTF-8 text (a binary file, or another encoding); save it as UTF-8."


def _field(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise CorpusError(f"{where}: missing field {key!r}.")
    if not isinstance(value, (str, int, float)):
        raise CorpusError(f"{where}: field {key!r} must be text, got {type(value).__name__}.")
    return str(value).strip()


def _read_patterns(path: Path, relation: str, language: str) -> tuple[list[tuple], int]:
    """Patterns of one file as (relation, language, template_id, template); also the number left out ([Y] before [X])."""
    rows, skipped = [], 0
    for lineno, obj in read_jsonl(path):
        where = f"{path}, line {lineno}"
        template = _field(obj, "pattern", where)
        check_template(template, where)
        if not subject_before_object(template):
            skipped += 1
            continue
        rows.append((relation, language, f"{relation}.{language}.{lineno}", template))
    return rows, skipped


FACT_COLUMNS = ["fact_id", "relation", "language", "subject", "object", "sub_uri", "obj_uri"]
PATTERN_COLUMNS = ["relation", "language", "template_id", "template"]


def _cross(facts: pd.DataFrame | list[tuple], patterns: pd.DataFrame | list[tuple]) -> pd.DataFrame:
    """Every fact x every pattern of the same (relation, language), with prompts.

    Lists are rows in FACT_COLUMNS / PATTERN_COLUMNS order.  Prompts are built
    column-wise (text before [X] + subject + text between [X] and [Y]); a
    template with no or several [X] before [Y] takes the general path.
    """
    if not isinstance(facts, pd.DataFrame):
        facts = pd.DataFrame(facts, columns=FACT_COLUMNS)
    if not isinstance(patterns, pd.DataFrame):
        patterns = pd.DataFrame(patterns, columns=PATTERN_COLUMNS)
    parts = [_split_template(t) for t in patterns["template"]]
    patterns = patterns.assign(_pre=[p[0] for p in parts], _post=[p[1] for p in parts],
                               _simple=[p[2] for p in parts])
    rows = facts.merge(patterns, on=["relation", "language"], how="inner", sort=False)
    prompt = rows["_pre"] + rows["subject"] + rows["_post"]
    general = ~rows["_simple"].to_numpy(dtype=bool)
    if general.any():
        sub = rows.loc[general]
        prompt.loc[general] = [prompt_from_template(t, x) for t, x in zip(sub["template"], sub["subject"])]
    rows["prompt"] = prompt.str.rstrip()
    return rows.drop(columns=["_pre", "_post", "_simple"])


def _split_template(template: str) -> tuple[str, str, bool]:
    head = template.split("[Y]", 1)[0]
    pre, sep, post = head.partition("[X]")
    simple = bool(sep) and "[X]" not in post
    return (pre, post.rstrip(), True) if simple else ("", "", False)


# --------------------------------------------------------------------------- demo
def load_demo() -> Corpus:
    """The bundled demo corpus: facts.jsonl x templates.jsonl (see data/demo/NOTICE)."""
    facts = pd.DataFrame([obj for _, obj in read_jsonl(DEMO_DIR / "facts.jsonl")])
    templates = pd.DataFrame([obj for _, obj in read_jsonl(DEMO_DIR / "templates.jsonl")])
    rows = _cross(facts[FACT_COLUMNS], templates[PATTERN_COLUMNS])
    rows = rows.sort_values(["relation", "fact_id", "language", "template_id"], kind="stable")
    return Corpus(rows, name="demo", source=str(DEMO_DIR))


# --------------------------------------------------------------------------- ParaRel
def load_pararel(
    path: str | Path, languages: list[str] | None = None, relations: list[str] | None = None
) -> Corpus:
    """ParaRel (English): every pattern of a relation x every tuple; fact_id = "<rel>:<uuid>"."""
    path = Path(path)
    if languages is not None and "en" not in languages:
        raise CorpusError(f"{path}: ParaRel is English only; asked for {', '.join(languages)}.")
    fact_parts, pattern_parts, skipped = [], [], 0
    for pattern_file in sorted((path / "patterns").glob("P*.jsonl")):
        relation = pattern_file.stem
        if relations is not None and relation not in relations:
            continue
        tuple_file = path / "tuples" / pattern_file.name
        if not tuple_file.is_file():
            log.info("ParaRel: no tuples for %s, skipped", relation)
            continue
        patterns, n_skipped = _read_patterns(pattern_file, relation, "en")
        skipped += n_skipped
        pattern_parts.extend(patterns)
        for lineno, obj in read_jsonl(tuple_file):
            where = f"{tuple_file}, line {lineno}"
            fact_parts.append((f"{relation}:{_field(obj, 'uuid', where)}", relation, "en",
                               _field(obj, "sub_label", where), _field(obj, "obj_label", where), "", ""))
    if not fact_parts:
        raise CorpusError(f"{path}: no ParaRel relation with both patterns and tuples"
                          + (f" among {', '.join(relations)}." if relations else "."))
    if skipped:
        log.info("ParaRel: %d patterns with [Y] before [X] left out", skipped)
    rows = _cross(fact_parts, pattern_parts).drop(columns=["sub_uri", "obj_uri"])
    return Corpus(rows, name="pararel", source=str(path))


# --------------------------------------------------------------------------- mParaRel
def _language_dirs(root: Path, languages: list[str] | None, where: Path) -> dict[str, Path]:
    """ISO code -> folder under root; with two folders for one code (zh-hans, zh-hant) the first sorted wins."""
    out: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        code = normalize_language(sub.name, where=f"{where}: folder {sub.name!r}")
        if languages is not None and code not in languages:
            continue
        if code in out:
            log.info("mParaRel: %s and %s both map to %r; using %s", out[code].name, sub.name, code, out[code].name)
            continue
        out[code] = sub
    return out


def load_mpararel(
    path: str | Path, languages: list[str] | None = None, relations: list[str] | None = None
) -> Corpus:
    """mParaRel: per language, every pattern x every tuple; fact_id = "<rel>:<lineid>" aligns languages."""
    path = Path(path)
    pattern_dirs = _language_dirs(path / "patterns", languages, path)
    tuple_dirs = _language_dirs(path / "tuples", languages, path)
    codes = sorted(set(pattern_dirs) & set(tuple_dirs))
    if not codes:
        asked = f" for {', '.join(languages)}" if languages else ""
        raise CorpusError(f"{path}: no language has both patterns and tuples{asked}.")
    fact_parts, pattern_parts, skipped = [], [], 0
    for code in codes:
        for tuple_file in sorted(tuple_dirs[code].glob("P*.jsonl")):
            relation = tuple_file.stem
            if relations is not None and relation not in relations:
                continue
            pattern_file = pattern_dirs[code] / tuple_file.name
            if not pattern_file.is_file():
                continue
            patterns, n_skipped = _read_patterns(pattern_file, relation, code)
            skipped += n_skipped
            pattern_parts.extend(patterns)
            fact_parts.extend(_read_mpararel_tuples(tuple_file, relation, code))
    if not fact_parts:
        raise CorpusError(f"{path}: no relation with both patterns and tuples"
                          + (f" among {', '.join(relations)}." if relations else "."))
    if skipped:
        log.info("mParaRel: %d patterns with [Y] before [X] left out", skipped)
    rows = _cross(fact_parts, pattern_parts)
    return Corpus(rows, name="mpararel", source=str(path))


def _read_mpararel_tuples(tuple_file: Path, relation: str, code: str) -> list[tuple]:
    """Rows in FACT_COLUMNS order; fact_id = "<relation>:<lineid>"."""
    facts = []
    for lineno, obj in read_jsonl(tuple_file):
        where = f"{tuple_file}, line {lineno}"
        lineid = obj.get("lineid")
        if lineid is None:
            raise CorpusError(f"{where}: missing field 'lineid'.")
        facts.append((f"{relation}:{lineid}", relation, code, _field(obj, "sub_label", where),
                      _field(obj, "obj_label", where), str(obj.get("sub_uri", "")), str(obj.get("obj_uri", ""))))
    return facts


# --------------------------------------------------------------------------- X-FACTR
_SLOT = re.compile(r"\[([^\[\]]*)\]")
_FEATURE_TAG = re.compile(r"[A-Z][A-Z]*(?:[.\-][\w+\-]*)*")  # DEF, PREPDEF-à, DEF.Gen, ARTIND, ART ...


def reduce_xfactr_markup(template: str) -> str:
    """Reduce X-FACTR's morphology markup to a plain [X]/[Y] template.

    Simplifications (we insert labels uninflected, with no gender or number
    information):

    * ``[X.Nom]``, ``[Y.Ess]``, ``[Y.IN+ESS]``, ``[Y;be]`` -> ``[X]``/``[Y]``:
      case and inflection features of a slot are dropped;
    * ``[né;X-Gender=MASC|née;X-Gender=FEM]`` -> ``né``: a word that agrees
      with an entity becomes its first alternative (the masculine/singular form);
    * ``[DEF;X]``, ``[PREPLOC;Y]``, ``[ARTDEF;Y]``, ``[ART;X-Gender]``,
      ``[DEF;Y.Fem]``, ``[PREPDEF-à;X]``: feature-only tags (an article or
      preposition chosen by the entity's gender, number or case) are dropped,
      so a few prompts lose an article or a preposition;
    * ``[human: একজন ; non-human: একটি]`` -> ``একজন``: labelled alternatives
      keep the first.

    Whitespace is then collapsed.  Raises ValueError for markup it does not know.
    """

    def replace(match: re.Match) -> str:
        content = match.group(1).strip()
        slot = re.fullmatch(r"([XY])(?:[.;].*)?", content)
        if slot:
            return f"[{slot.group(1)}]"
        first = content.split("|", 1)[0]
        head, sep, tail = first.partition(";")
        head, tail = head.strip(), tail.strip()
        if sep and re.fullmatch(r"[XY](?:[.\-=].*)?", tail):
            if "=" in tail:  # word alternative agreeing with X or Y
                return head
            if _FEATURE_TAG.fullmatch(head):  # article/preposition tag
                return ""
        if ":" in head:  # labelled alternatives "human: w1 ; non-human: w2"
            return head.split(":", 1)[1].strip()
        raise ValueError(f"unknown X-FACTR markup [{match.group(1)}]")

    reduced = _SLOT.sub(replace, template)
    return re.sub(r"\s+", " ", reduced).strip()


def _parse_xfactr_spec(text: str) -> tuple[Path, Path | None]:
    body = text[len("xfactr:"):]
    csv_part, _, query = body.rpartition("?") if "?" in body else (body, "", "")
    params = parse_qs(query)
    tuples = params.get("tuples", [None])[0]
    return Path(csv_part).expanduser(), (Path(tuples).expanduser() if tuples else None)


def load_xfactr(
    csv_path: str | Path,
    tuples_dir: str | Path | None,
    languages: list[str] | None = None,
    relations: list[str] | None = None,
) -> Corpus:
    """X-FACTR prompts (TREx_prompts.csv) filled with mParaRel tuples.

    ``tuples_dir`` is an mParaRel folder (or its ``tuples/`` subfolder).  One
    template per relation and language, id ``"<rel>.<lang>.xfactr"``; markup is
    reduced by :func:`reduce_xfactr_markup`.  Languages or relations without
    tuples are skipped; fact_id = "<rel>:<lineid>" as in mParaRel.
    """
    csv_path = Path(csv_path)
    if tuples_dir is None:
        raise CorpusError(
            f"{csv_path}: X-FACTR gives prompts only; pass the facts too, e.g. "
            f"'xfactr:{csv_path}?tuples=<mParaRel folder>'."
        )
    tuples_dir = Path(tuples_dir)
    if (tuples_dir / "tuples").is_dir():
        tuples_dir = tuples_dir / "tuples"
    if not csv_path.is_file():
        raise CorpusError(f"{csv_path}: X-FACTR prompt file not found.")
    if not tuples_dir.is_dir():
        raise CorpusError(f"{tuples_dir}: tuple folder not found.")
    tuple_dirs = _language_dirs(tuples_dir, None, tuples_dir)
    wanted = set(tuple_dirs) if languages is None else set(tuple_dirs) & set(languages)
    patterns, facts, skipped = [], [], 0
    with csv_path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip() != "pid":
            raise CorpusError(f"{csv_path}, line 1: expected a header starting with 'pid'.")
        columns = {}
        for i, name in enumerate(header[2:], start=2):
            code = normalize_language(name, where=f"{csv_path}, line 1, column {name!r}")
            if code in wanted:
                columns[code] = i
        for row in reader:
            lineno = reader.line_num
            if not row or not row[0].strip():
                continue
            relation = row[0].strip()
            if relations is not None and relation not in relations:
                continue
            for code, i in columns.items():
                tuple_file = tuple_dirs[code] / f"{relation}.jsonl"
                if i >= len(row) or not row[i].strip() or not tuple_file.is_file():
                    continue
                where = f"{csv_path}, line {lineno}, column {header[i]!r}"
                try:
                    template = reduce_xfactr_markup(row[i])
                except ValueError as e:
                    raise CorpusError(f"{where}: {e}.") from None
                check_template(template, where)
                if not subject_before_object(template):
                    skipped += 1
                    continue
                patterns.append((relation, code, f"{relation}.{code}.xfactr", template))
                facts.extend(_read_mpararel_tuples(tuple_file, relation, code))
    if not patterns:
        raise CorpusError(f"{csv_path}: no X-FACTR prompt has tuples in {tuples_dir} for the requested languages/relations.")
    if skipped:
        log.info("X-FACTR: %d prompts with [Y] before [X] left out", skipped)
    rows = _cross(facts, patterns)
    return Corpus(rows, name="xfactr", source=str(csv_path))


# --------------------------------------------------------------------------- user files
def _user_rows(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix.lower() == ".jsonl":
        yield from read_jsonl(path)
        return
    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror or e}).") from None
    with f:
        try:
            yield from _csv_rows(path, f)
        except UnicodeDecodeError:
            raise CorpusError(not_utf8(path)) from None
        except csv.Error as e:
            raise CorpusError(f"{path}: not a readable CSV file ({e}).") from None


def _csv_rows(path: Path, f) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(f)
    if not reader.fieldnames:
        raise CorpusError(f"{path}, line 1: empty file, expected a header line.")
    fields = [name.strip() for name in reader.fieldnames]
    for needed in ("fact_id", "relation", "language", "subject", "object"):
        if needed not in fields:
            raise CorpusError(f"{path}, line 1: missing column {needed!r} in the header.")
    if "prompt" not in fields and "template" not in fields:
        raise CorpusError(f"{path}, line 1: the header needs a 'prompt' or a 'template' column.")
    reader.fieldnames = fields
    for row in reader:
        if None in row:
            raise CorpusError(f"{path}, line {reader.line_num}: more values than header columns.")
        if not any((v or "").strip() for v in row.values()):
            continue
        yield reader.line_num, {k: v for k, v in row.items() if v is not None and v != ""}


def load_user_corpus(path: str | Path) -> Corpus:
    """A user corpus file (.jsonl or .csv); see the module docstring for the fields.

    With a template, the prompt is derived from it (unless a prompt is given
    too).  With only a prompt, the template is rebuilt as the prompt with the
    subject replaced by [X], followed by [Y].
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: file not found.")
    records = []
    template_ids: dict[tuple[str, str, str], str] = {}
    for lineno, obj in _user_rows(path):
        where = f"{path}, line {lineno}"
        rec = {key: _field(obj, key, where) for key in ("fact_id", "relation", "language", "subject", "object")}
        rec["language"] = normalize_language(rec["language"], where=where)
        has_template = bool(str(obj.get("template") or "").strip())
        has_prompt = bool(str(obj.get("prompt") or "").strip())
        if not has_template and not has_prompt:
            raise CorpusError(f"{where}: missing field 'prompt' (or 'template').")
        if has_template:
            template = _field(obj, "template", where)
            check_template(template, where)
            prompt = _field(obj, "prompt", where) if has_prompt else prompt_from_template(template, rec["subject"])
            if not prompt:
                raise CorpusError(f"{where}: template {template!r} has no text before [Y], so the prompt is empty.")
        else:
            prompt = _field(obj, "prompt", where)
            sep = "" if rec["language"] in NO_SPACE_LANGUAGES else " "
            template = prompt.replace(rec["subject"], "[X]", 1) + sep + "[Y]"
        rec["prompt"], rec["template"] = prompt, template
        if str(obj.get("template_id") or "").strip():
            rec["template_id"] = _field(obj, "template_id", where)
        else:
            key = (rec["relation"], rec["language"], template)
            if key not in template_ids:
                n = sum(1 for k in template_ids if k[:2] == key[:2]) + 1
                template_ids[key] = f"{rec['relation']}.{rec['language']}.{n}"
            rec["template_id"] = template_ids[key]
        records.append(rec)
    if not records:
        raise CorpusError(f"{path}: no rows; the corpus is empty.")
    rows = pd.DataFrame(records, columns=list(REQUIRED_COLUMNS))
    return Corpus(rows, name=path.stem, source=str(path))
