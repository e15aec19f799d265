"""Edit requests: one fact in one or several languages, and their validation in one place.

:class:`LanguageFact` is one fact in one language (question, subject, new target,
optional old target, paraphrases, locality and portability pairs);
:class:`EditRequest` groups the languages of one fact. :meth:`EditRequest.validate`
(and :func:`validate_requests` for a list) checks them before any work: languages
known and given once, no empty field, the subject inside its prompt and (with a
Workbench) covered by some token of it. Every problem is an
:class:`~analysis.errors.InputError` with a message for users.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from analysis.errors import CorpusError, InputError
from analysis.tokens import encode, subject_char_span
from data.corpus import normalize_language

if TYPE_CHECKING:
    from analysis.model import Workbench


@dataclass
class LanguageFact:
    """One fact to edit, in one language.

    ``prompt`` is the question (MzsRE ``src``) and must contain ``subject``;
    ``target_new`` is the answer the edited model should give, ``target_old``
    the answer before the edit where known. ``paraphrases`` are rephrased
    prompts (generality), ``locality`` (prompt, answer) pairs the edit must not
    change, ``portability`` (question, answer) pairs that follow from the edit.
    ``aliases`` maps an answer (the new target or a portability answer) to other
    answers accepted as correct for it in F1 / EM (MLaKE's ``e_answer_aliases``);
    saved requests without it load with none.
    """

    prompt: str
    subject: str
    target_new: str
    target_old: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)
    portability: list[tuple[str, str]] = field(default_factory=list)
    aliases: dict[str, list[str]] = field(default_factory=dict)

    def accepted(self, answer: str) -> list[str]:
        """``answer`` and its aliases: every text scored as a right answer where ``answer`` is the reference."""
        return [answer, *(a for a in self.aliases.get(answer, []) if a != answer)]

    def contexts(self) -> list[str]:
        """The texts of this fact that contain its subject (prompt, paraphrases, portability questions)."""
        texts = [self.prompt, *self.paraphrases, *(q for q, _ in self.portability)]
        return [t for t in dict.fromkeys(texts) if self.subject and self.subject in t]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "subject": self.subject, "target_new": self.target_new,
            "target_old": self.target_old, "paraphrases": list(self.paraphrases),
            "locality": [list(p) for p in self.locality], "portability": [list(p) for p in self.portability],
            **({"aliases": {k: list(v) for k, v in self.aliases.items()}} if self.aliases else {}),
        }  # no "aliases" key without aliases: the dicts (and run keys) of requests written before it stay the same

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "a language fact") -> "LanguageFact":
        if not isinstance(data, Mapping):
            raise InputError(f"{where}: expected an object with prompt, subject and target_new, "
                             f"got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"the fields are {', '.join(sorted(known))}.")
        missing = [name for name in ("prompt", "subject", "target_new") if name not in data]
        if missing:
            raise InputError(f"{where}: missing field(s) {', '.join(missing)}.")
        return cls(**dict(data))


@dataclass
class EditRequest:
    """One fact to edit in several languages: ``facts[language]`` (ISO codes after :meth:`validate`)."""

    facts: dict[str, LanguageFact]
    case_id: str = ""

    @property
    def languages(self) -> list[str]:
        return list(self.facts)

    @property
    def label(self) -> str:
        """How error messages name this request."""
        return f"Edit request {self.case_id!r}" if self.case_id else "The edit request"

    def subjects(self) -> dict[str, list[str]]:
        """The aligned multilingual subject set S_G: ``{language: [subject]}``."""
        return {lang: [fact.subject] for lang, fact in self.facts.items()}

    def contexts(self) -> dict[str, list[str]]:
        """Per language, the request's texts that contain the subject (see :meth:`LanguageFact.contexts`)."""
        return {lang: fact.contexts() for lang, fact in self.facts.items()}

    def validate(self, wb: Workbench | None = None, need_subject: bool = True) -> "EditRequest":
        """A checked copy with ISO language codes; InputError with a message for users otherwise.

        Checks: at least one language; every language code known (normalised with
        :func:`data.corpus.normalize_language`, "cz" -> "cs") and given once; prompt,
        subject and new target not empty; the subject occurs in its prompt and (with
        ``wb``) some token of the prompt covers it; paraphrases, locality and
        portability entries are non-empty texts. ``need_subject=False`` (editors that never read the subject,
        e.g. Transformer-Patcher and MPN) skips the two subject checks.
        """
        label = self.label
        if not isinstance(self.facts, Mapping) or not self.facts:
            raise InputError(f"{label} has no language: give at least one language with its prompt, "
                             "subject and new target.")
        facts: dict[str, LanguageFact] = {}
        for raw, fact in self.facts.items():
            code = language_code(raw, label)
            if code in facts:
                raise InputError(f"{label} gives language {code!r} twice ({raw!r} is {code!r} too).")
            facts[code] = _checked_fact(fact, f"{label}, language {code!r}", wb, need_subject)
        return EditRequest(facts, str(self.case_id or ""))

    @classmethod
    def from_record(cls, record: Any, languages: Iterable[str] | None = None) -> "EditRequest":
        """A request from a :class:`data.edit_records.EditRecord` (MzsRE / Bi-ZsRE, MLaKE).

        Per language: prompt, subject, target_new; ``rephrase`` becomes the
        paraphrase, ``(loc, loc_ans)`` the locality pair, ``(port_question,
        port_answer)`` the portability pair. MLaKE (single-hop question as the
        edit): ``target_true`` is the old target, ``new_aliases`` the new
        target's aliases, and every linked multi-hop question of ``portability``
        ({question, answer, aliases}) a portability pair with its aliases.
        ``languages`` (default: all of the record's) selects languages.
        """
        record_id = str(getattr(record, "record_id", ""))
        available = dict(getattr(record, "fields", {}) or {})
        codes = list(available) if languages is None else [language_code(c, f"Record {record_id}") for c in languages]
        if not codes:
            raise InputError(f"Record {record_id} has no language to edit.")
        facts: dict[str, LanguageFact] = {}
        for code in codes:
            if code not in available:
                raise InputError(f"Record {record_id} has no language {code!r}; it has {', '.join(sorted(available))}.")
            f = available[code]
            if not f.get("subject"):
                raise InputError(f"Record {record_id} ({code}) has no subject, which every editor needs; none "
                                 "could be derived from its question and statements: add a 'subject' field to "
                                 "its items.")
            target_new = f.get("target_new") or ""
            portability = ([(f["port_question"], f["port_answer"])]
                           if f.get("port_question") and f.get("port_answer") else [])
            aliases: dict[str, list[str]] = {}
            _add_aliases(aliases, target_new, f.get("new_aliases"))
            hops = f.get("portability") if isinstance(f.get("portability"), list) else []
            for hop in hops:  # MLaKE: the multi-hop questions linked to this single-hop edit
                if not (isinstance(hop, Mapping) and hop.get("question") and hop.get("answer")):
                    continue
                portability.append((hop["question"], hop["answer"]))
                _add_aliases(aliases, hop["answer"], hop.get("aliases"))
            facts[code] = LanguageFact(
                prompt=f.get("prompt") or "", subject=f["subject"], target_new=target_new,
                target_old=f.get("target_true"),
                paraphrases=[f["rephrase"]] if f.get("rephrase") else [],
                locality=[(f["loc"], f["loc_ans"])] if f.get("loc") and f.get("loc_ans") else [],
                portability=portability, aliases=aliases,
            )
        return cls(facts, case_id=record_id)

    def to_dict(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "facts": {lang: fact.to_dict() for lang, fact in self.facts.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EditRequest":
        if not isinstance(data, Mapping) or not isinstance(data.get("facts"), Mapping):
            raise InputError("An edit request must be an object with 'facts': {language: {prompt, subject, "
                             "target_new, ...}} and optionally 'case_id'.")
        case_id = str(data.get("case_id") or "")
        where = f"Edit request {case_id!r}" if case_id else "The edit request"
        facts = {str(lang): LanguageFact.from_dict(fact, f"{where}, language {lang!r}")
                 for lang, fact in data["facts"].items()}
        return cls(facts, case_id)


def _add_aliases(aliases: dict[str, list[str]], answer: str, more: Iterable[str] | None) -> None:
    """Add ``more`` as aliases of ``answer`` (in order, once each, never the answer itself)."""
    if not answer or not more:
        return
    kept = aliases.setdefault(answer, [])
    for alias in more:
        if alias and alias != answer and alias not in kept:
            kept.append(alias)
    if not kept:
        del aliases[answer]


def validate_requests(requests: EditRequest | Sequence[EditRequest], wb: Workbench | None = None,
                      need_subject: bool = True) -> list[EditRequest]:
    """Checked copies of ``requests`` (one request or a sequence); InputError for an empty list."""
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise InputError("No edit requests: give at least one fact to edit.")
    for i, request in enumerate(requests):
        if not isinstance(request, EditRequest):
            raise InputError(f"Edit request {i} is a {type(request).__name__}, not an EditRequest.")
    return [request.validate(wb, need_subject) for request in requests]


def language_code(raw: Any, label: str) -> str:
    """Our ISO code for ``raw`` ("cz" -> "cs"); an InputError starting with ``label`` if unknown."""
    try:
        return normalize_language(raw)
    except CorpusError as exc:
        raise InputError(f"{label}: {exc}") from None


def _text_field(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: the {what} must be text, got {type(value).__name__} {value!r}.")
    if not value.strip():
        raise InputError(f"{where}: empty {what}.")
    return value


def _pairs(value: Any, what: str, where: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InputError(f"{where}: {what} must be a list of (question, answer) pairs.")
    out = []
    for i, pair in enumerate(value):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InputError(f"{where}: {what} entry {i} must be a (question, answer) pair.")
        out.append((_text_field(pair[0], f"{what} question (entry {i})", where),
                    _text_field(pair[1], f"{what} answer (entry {i})", where)))
    return out


def _checked_fact(fact: Any, where: str, wb: Workbench, need_subject: bool = True) -> LanguageFact:
    if isinstance(fact, Mapping):
        fact = LanguageFact.from_dict(fact, where)
    if not isinstance(fact, LanguageFact):
        raise InputError(f"{where}: expected a LanguageFact, got {type(fact).__name__}.")
    prompt = _text_field(fact.prompt, "prompt (the question to edit)", where)
    subject = _text_field(fact.subject, "subject", where)
    if not isinstance(fact.target_new, str):
        raise InputError(f"{where}: the new target (target_new) must be text, got {type(fact.target_new).__name__} "
                         f"{fact.target_new!r}.")
    if not fact.target_new.strip():
        raise InputError(f"{where}: empty target; give the new answer the edited model should produce.")
    try:
        if need_subject:
            subject_char_span(prompt, subject)
            if wb is not None:
                encode(wb.tokenizer, [prompt], [subject])
    except InputError as exc:
        message = str(exc)
        raise InputError(f"{where}: {message[:1].lower()}{message[1:]}") from None
    paraphrases = fact.paraphrases
    if isinstance(paraphrases, str) or not isinstance(paraphrases, Iterable):
        raise InputError(f"{where}: paraphrases must be a list of texts.")
    paraphrases = [_text_field(p, f"paraphrase {i}", where) for i, p in enumerate(paraphrases)]
    old = fact.target_old
    if old is not None and not isinstance(old, str):
        raise InputError(f"{where}: the old target must be text.")
    return LanguageFact(prompt, subject, fact.target_new, old if old and old.strip() else None, paraphrases,
                        _pairs(fact.locality, "locality", where), _pairs(fact.portability, "portability", where),
                        _alias_map(fact.aliases, where))


def _alias_map(value: Any, where: str) -> dict[str, list[str]]:
    """``{answer: [alias, ...]}`` checked: texts only, empty aliases dropped."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: aliases must be an object {{answer: [alias, ...]}}.")
    out: dict[str, list[str]] = {}
    for answer, alias_list in value.items():
        if not isinstance(answer, str) or isinstance(alias_list, (str, bytes)) or not isinstance(alias_list, Iterable):
            raise InputError(f"{where}: aliases must be an object {{answer: [alias, ...]}}; "
                             f"got {answer!r}: {alias_list!r}.")
        texts = [_text_field(a, f"alias of {answer!r}", where) for a in alias_list if not (isinstance(a, str)
                                                                                          and not a.strip())]
        if texts:
            out[answer] = texts
    return out
