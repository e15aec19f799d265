"""What users type, turned into requests: shared by the CLI (app/cli.py) and the pages (app/views/).

Comma lists, ``LANG:TEXT`` options, layer ranges, ``question | answer`` lines, typed languages,
JSON given inline or as a file, typed facts for attribution and tracing, edit requests and an
editor's hyper-parameters. Nothing here draws (no Streamlit) and nothing loads a model: every
problem is an :class:`~analysis.errors.InputError` whose message the CLI prints as its one line
and a page shows in its error box. Heavy modules are imported inside the functions, so that
``neuroglot --help`` stays fast.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from analysis.errors import InputError, NeuroglotError

if TYPE_CHECKING:
    from analysis.model import Workbench

#: A typed fact's example per language, shown in the pages' boxes: subject, answer, prompts (paraphrases).
EXAMPLE_FACTS = {
    "en": ("Eiffel Tower", "Paris", ["The Eiffel Tower is located in the city of", "The Eiffel Tower is in"]),
    "zh": ("埃菲尔铁塔", "巴黎", ["埃菲尔铁塔位于", "埃菲尔铁塔所在的城市是"]),
    "de": ("Eiffelturm", "Paris", ["Der Eiffelturm ist ein Wahrzeichen von", "Der Eiffelturm befindet sich in"]),
}


# ----------------------------------------------------------------------------- lists and languages


def split_list(value: Optional[str]) -> Optional[list[str]]:
    """``"en, zh,de"`` → ["en", "zh", "de"]; None for nothing given (None or blanks)."""
    if value is None or not value.strip():
        return None
    return [x.strip() for x in value.split(",") if x.strip()]


def default_languages(available: Sequence[str], preferred: Sequence[str] = ("en", "zh"), n: int = 2) -> list[str]:
    """The languages a picker starts with: the preferred ones the corpus has, else its first ``n``."""
    return [lang for lang in preferred if lang in available] or list(available)[:n]


def language_name(code: str) -> str:
    """``"de"`` → ``"de · German"`` (the code alone when the name is not known)."""
    from data import LANGUAGES

    return f"{code} · {LANGUAGES[code]}" if code in LANGUAGES else code


def typed_language(raw: str) -> str:
    """A typed language: an ISO code, an alias ("zh-cn") or an English name ("German"); a clear error otherwise."""
    from analysis.errors import CorpusError
    from data import LANGUAGES
    from data.corpus import normalize_language

    by_name = {name.lower(): code for code, name in LANGUAGES.items()}
    text = str(raw).strip()
    if text.lower() in by_name:
        return by_name[text.lower()]
    try:
        return normalize_language(text)
    except CorpusError:
        raise InputError(f"Unknown language {text!r}: choose one from the Languages list, or type an ISO 639-1 "
                         "code (en, zh, de ...) or an English language name (German).") from None


def per_language(values: Optional[Iterable[str]], what: str) -> dict[str, list[str]]:
    """``["en:The capital of France is", "zh:法国的首都是"]`` → {"en": [...], "zh": [...]}."""
    from data.corpus import normalize_language

    out: dict[str, list[str]] = {}
    for value in values or []:
        lang, sep, text = value.partition(":")
        if not sep or not text.strip():
            raise InputError(f"{what} must be written LANG:TEXT, e.g. en:Paris; got {value!r}.")
        out.setdefault(normalize_language(lang.strip(), where=what), []).append(text.strip())
    return out


def parse_layers(value: Optional[str], n_layers: int, what: str = "--layers") -> Optional[list[int]]:
    """"3,5,9-12" → [3, 5, 9, 10, 11, 12]; None → all layers."""
    if value is None or not value.strip():
        return None
    layers: list[int] = []
    try:
        for part in value.split(","):
            lo, dash, hi = part.strip().partition("-")
            layers.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    except ValueError:
        raise InputError(f"{what} must look like 3,5,9-12; got {value!r}.") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise InputError(f"Layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}.")
    return layers


# ------------------------------------------------------------------------ question | answer


def question_answer(text: str) -> Optional[tuple[str, str]]:
    """``"question | answer"`` → ("question", "answer"), split at the last "|"; None when there is no "|"."""
    question, bar, answer = text.rpartition("|")
    return (question.strip(), answer.strip()) if bar else None


def pairs_from_lines(text: str, what: str, lang: str) -> list[tuple[str, str]]:
    """A page's box of ``question | answer`` lines as pairs (blank lines skipped); InputError naming the bad line."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        pair = question_answer(line)
        if pair is None:
            raise InputError(f"Language {lang!r}, {what} line {i}: write 'question | answer' ({line.strip()!r} "
                             "has no '|').")
        out.append(pair)
    return out


def pairs_from_options(values: Optional[Iterable[str]], what: str) -> dict[str, list[tuple[str, str]]]:
    """The CLI's ``LANG:QUESTION|ANSWER`` options per language; both halves must be given."""
    out: dict[str, list[tuple[str, str]]] = {}
    for lang, texts in per_language(values, what).items():
        for text in texts:
            pair = question_answer(text)
            if pair is None or not all(pair):
                raise InputError(f"{what} must be written LANG:QUESTION|ANSWER; got {lang}:{text!r}.")
            out.setdefault(lang, []).append(pair)
    return out


def lines(text: str) -> list[str]:
    """The non-blank lines of a box, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ JSON


def _utf8_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{what}: {path} is not UTF-8 text (a binary file, or another encoding); "
                         "give a JSON file saved as UTF-8.") from None


def method_hparams(value: Optional[str], methods: list[str], what: str = "--hparams",
                   among: str = "--methods") -> dict[str, dict]:
    """``{"method": {"field": value}}`` given inline or as a file (:func:`read_json`), every method among
    ``methods``; {} when not given."""
    overrides = read_json(value, what) or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise InputError(f'{what} must be a JSON object {{"method": {{"field": value}}}}.')
    unknown = sorted(set(overrides) - set(methods))
    if unknown:
        raise InputError(f"{what} names {unknown[0]!r}, which is not in {among}.")
    return overrides


def read_json(value: Optional[str], what: str) -> Any:
    """A JSON value given inline or as the path of a JSON file; None when not given."""
    if value is None or not value.strip():
        return None
    inline = value.lstrip().startswith(("{", "["))
    if not inline and not Path(value).is_file():
        raise InputError(f"{what}: {value!r} is neither JSON nor a file.")
    text = value if inline else _utf8_file(Path(value), what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        source = "" if inline else f" ({Path(value)})"
        raise InputError(f"{what}{source} is not valid JSON: {exc}.") from None


# -------------------------------------------------------------------- typed facts (analysis pages)


@dataclass
class TypedFact:
    """One language of a fact typed by a user: its prompts (the first, then paraphrases), subject and answer."""

    prompts: list[str]
    subject: str = ""
    answer: str = ""

    @property
    def prompt(self) -> str:
        return self.prompts[0] if self.prompts else ""


def typed_facts(prompts: Mapping[str, list[str]], subjects: Mapping[str, list[str]] | None = None,
                answers: Mapping[str, list[str]] | None = None) -> dict[str, TypedFact]:
    """Per-language prompts (from ``per_language``) with the first subject and answer given for each language."""
    subjects, answers = subjects or {}, answers or {}
    return {lang: TypedFact(list(texts), (subjects.get(lang) or [""])[0], (answers.get(lang) or [""])[0])
            for lang, texts in prompts.items()}


def typed_prompt_table(facts: Mapping[str, TypedFact]):
    """One typed fact as an attribution prompt table (fact_id "typed"): one row per language and prompt."""
    import pandas as pd

    from analysis.attribution import PROMPT_COLUMNS

    rows = [dict(fact_id="typed", relation="typed", language=lang, subject=fact.subject.strip(),
                 object=fact.answer.strip(), prompt=text.strip(), template_id=f"typed.{lang}.{j}")
            for lang, fact in facts.items() for j, text in enumerate(t for t in fact.prompts if t.strip())]
    return pd.DataFrame(rows, columns=list(PROMPT_COLUMNS))


def check_typed_prompts(facts: Mapping[str, TypedFact], languages: Sequence[str]) -> None:
    """A page's typed fact: at least one prompt, and one in every chosen language."""
    typed = [lang for lang, fact in facts.items() if any(t.strip() for t in fact.prompts)]
    if not typed:
        raise InputError("Type at least one prompt.")
    missing = sorted(set(languages) - set(typed))
    if missing:
        raise InputError(f"Type a prompt for {', '.join(missing)} too, or drop the language.")


def trace_facts(facts: Mapping[str, TypedFact]) -> dict[str, tuple[str, str, str]]:
    """A typed fact as causal tracing takes it: language -> (prompt, subject, answer; "" = the prediction),
    as typed (a prompt's spaces are part of its tokens)."""
    return {lang: (fact.prompt, fact.subject, fact.answer) for lang, fact in facts.items()}


def fact_label(rows, fact_id: str) -> str:
    """``P36:12 · France → Paris``: a fact by its first row in ``rows`` (a corpus or prompt table)."""
    first = rows[rows["fact_id"] == fact_id].iloc[0]
    return f"{fact_id} · {first['subject']} → {first['object']}"


# ------------------------------------------------------------------------------ edit requests


def edit_request(fields: Mapping[str, Mapping[str, Any]], case_id: str = "typed"):
    """An EditRequest from plain per-language fields (prompt, subject, target_new; optional target_old,
    paraphrases, locality and portability pairs). Texts are stripped; an empty old target is none;
    the languages are typed ones (codes, aliases or English names), each given once."""
    from editors.requests import EditRequest, LanguageFact

    facts = {}
    for lang, row in fields.items():
        code = typed_language(lang)
        if code in facts:
            raise InputError(f"The language {language_name(code)} is chosen twice.")
        facts[code] = LanguageFact(
            prompt=str(row["prompt"]).strip(), subject=str(row["subject"]).strip(),
            target_new=str(row["target_new"]).strip(), target_old=(str(row.get("target_old") or "").strip() or None),
            paraphrases=[p.strip() for p in row.get("paraphrases", []) if p.strip()],
            locality=list(row.get("locality", [])), portability=list(row.get("portability", [])))
    return EditRequest(facts, case_id=case_id)


def edit_request_from_boxes(raw: Mapping[str, Mapping[str, str]]):
    """The Edit lab's typed fact: per language the raw texts of its boxes (paraphrases one per line,
    locality and portability ``question | answer`` per line)."""
    return edit_request({lang: dict(row, paraphrases=lines(row.get("paraphrases", "")),
                                    locality=pairs_from_lines(row.get("locality", ""), "locality", lang),
                                    portability=pairs_from_lines(row.get("portability", ""), "portability", lang))
                         for lang, row in raw.items()})


def edit_request_from_options(prompt, subject, target, old, paraphrase, locality, portability):
    """An EditRequest from the CLI's per-language ``LANG:TEXT`` options (``Q|A`` pairs for locality/portability)."""
    prompts, subjects = per_language(prompt, "--prompt"), per_language(subject, "--subject")
    targets, olds = per_language(target, "--target"), per_language(old, "--old")
    paras = per_language(paraphrase, "--paraphrase")
    locs, ports = pairs_from_options(locality, "--locality"), pairs_from_options(portability, "--portability")
    for what, given in (("--subject", subjects), ("--target", targets)):
        missing = sorted(set(prompts) - set(given))
        if missing:
            raise InputError(f"Give {what} for {', '.join(missing)} too ({what} {missing[0]}:...).")
    extra = sorted((set(subjects) | set(targets) | set(olds) | set(paras) | set(locs) | set(ports)) - set(prompts))
    if extra:
        raise InputError(f"Language {extra[0]!r} has no --prompt {extra[0]}:...")
    return edit_request({lang: dict(prompt=prompts[lang][0], subject=subjects[lang][0], target_new=targets[lang][0],
                                    target_old=(olds.get(lang) or [None])[0],
                                    paraphrases=prompts[lang][1:] + paras.get(lang, []),
                                    locality=locs.get(lang, []), portability=ports.get(lang, []))
                         for lang in prompts})


def record_index(record: str) -> int:
    """``"mzsre:5"`` or ``"5"`` → 5."""
    index = record.split(":")[-1].strip()
    if not index.isdigit():
        raise InputError(f"--record must be a record number such as mzsre:5; got {record!r}.")
    return int(index)


# ------------------------------------------------------------------------------ hyper-parameters


def preset_values(editor_name: str, wb: Workbench) -> tuple[dict, str, str | None]:
    """The editor's hyper-parameters to start a box from: ``(values, origin, problem)`` — the model's preset
    (origin "preset '<name>'"), else the class defaults with a message saying there is no preset."""
    from editors.base import get_editor

    hp_class = get_editor(editor_name).hparams_class
    try:
        return hp_class.preset(wb).to_dict(), f"preset {hp_class.preset_name(wb)!r}", None
    except NeuroglotError:
        try:
            values = hp_class().to_dict()
        except Exception:  # noqa: BLE001 - a class without defaults for every field
            values = {}
        return values, "defaults (no preset for this model)", (
            f"{editor_name} has no preset for this model ({wb.name}): starting from its default hyper-parameters; "
            "check them before you run.")


def hparams_from_text(editor_name: str, text: str, wb: Workbench) -> Any:
    """A box of JSON as the editor's hyper-parameters, checked for ``wb``; messages name the editor (not its
    Python class)."""
    from editors.base import get_editor

    hp_class = get_editor(editor_name).hparams_class
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"The hyper-parameters are not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise InputError("The hyper-parameters must be one JSON object of field values, such as {\"steps\": 10}.")
    try:
        hp = hp_class.from_dict(data)
        hp.validate(wb)
    except InputError as exc:
        raise InputError(str(exc).replace(hp_class.__name__, editor_name)) from None
    return hp


def editor_with(wb: Workbench, method: str, hparams_json: Optional[str], preset: Optional[str]) -> Any:
    """The editor ``method`` with the model's preset (or ``preset``'s) and JSON overrides (inline or a file)."""
    from editors.base import get_editor
    from editors.evaluate import resolve_hparams

    overrides = read_json(hparams_json, "--hparams") or {}
    if not isinstance(overrides, dict):
        raise InputError("--hparams must be a JSON object of field values, e.g. '{\"beta\": 0.2}'.")
    if preset:
        cls = get_editor(method).hparams_class
        fields = dict(cls.PRESETS[cls.preset_name(preset)])
        fields.update(overrides)
        return get_editor(method, cls.from_dict(fields))
    return get_editor(method, resolve_hparams(wb, method, overrides))


@dataclass
class Choice:
    """What a page's fact picker gives: the source, the languages and the fact (or facts) chosen."""

    source: str                         # "one" (a corpus fact), "many" (corpus facts) or "typed"
    languages: list[str]
    fact_id: Optional[str] = None       # source "one"
    n_facts: int = 0                    # source "many"
    model_answer: bool = False          # trace the model's own prediction instead of the corpus answer
    typed: dict[str, TypedFact] = field(default_factory=dict)
