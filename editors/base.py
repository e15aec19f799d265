"""The editing engine: edit requests, hyper-parameters, edits, editors and their registry.

Design Decision 3: *editors compute; the infrastructure applies.* An editor turns
requests into an :class:`Edit` and leaves the model exactly as it found it
("Invariant: model at beginning of function == model at end of function", as in
ROME). Only :meth:`Edit.applied` ever changes a model, and leaving it restores
every parameter bit for bit.

Requests
    :class:`LanguageFact` is one fact in one language (question, subject, new
    target, optional old target, paraphrases, locality and portability pairs);
    :class:`EditRequest` groups the languages of one fact. ``validate(wb)`` checks
    them in one place (languages, empty fields, the subject inside its prompt).

Hyper-parameters
    :class:`HParams` is the dataclass every editor's hyper-parameters extend, with
    presets per model (``PRESETS``) and :meth:`HParams.preset` to pick one for a
    model by name, or by family and size.

Edits
    :class:`Edit` holds weight deltas (full tensors, or low-rank factors
    ``(u, v)`` with ``delta = u @ v``) and/or activation patches
    (:class:`ActivationPatch`, the LU-LAFNs cache of papers/lu-lafns.md Eq. 11).

    * ``with edit.applied(wb):`` holds ``wb.lock``, keeps a bit-exact copy of
      every parameter the edit touches (only those), adds the deltas in place and
      registers the patch hooks; on exit, also on an exception, it copies the
      saved values back and removes the hooks.
    * A delta is added to its parameter in place: ``p.add_(delta)``, computed in
      the wider of the two dtypes and rounded once to the parameter's dtype.
      Deltas are in the parameter's own layout (GPT-2's ``Conv1D`` weights are
      ``[in, out]``; see ``ArchAdapter.down_orientation``).
    * Applications stack: ``with e1.applied(wb), e2.applied(wb):`` adds e1's
      deltas, then e2's, and unwinds in reverse. Leaving an application also ends
      every application entered after it on the same model (a manual
      ``revert()`` out of order still leaves the model exactly as before).
    * The same Edit object cannot be applied to one model twice at a time
      (:class:`~analysis.errors.InputError`): that is almost always a mistake;
      ``edit + edit`` applies its change twice on purpose.
    * ``Edit.compose(e1, e2)`` (or ``e1 + e2``) keeps, per parameter, the list of
      terms in order and the union (concatenation) of the patches, so applying the
      composition is bit-identical to applying e1 and then e2 (nested). The total
      change of a parameter is :meth:`Edit.delta`. Low-rank terms stay low-rank.
    * ``save(folder)`` writes ``edit.safetensors`` (all tensors) and ``edit.json``
      (everything else, with the SHA-256 of the tensor file) into a temporary
      folder renamed into place; :meth:`Edit.load` checks the pair.

Activation patches: which tokens are patched
    A patch adds ``delta`` to the FFN neurons ``neurons`` of ``layer`` (the
    ``"neuron"`` site: ``act_fn(h W1)``, papers/lu-lafns.md Eq. 2-3) at the last
    token of every occurrence of one of its subjects in the model's input, and
    nowhere else (Eq. 11: the cache is used only when the query contains a
    subject of S_G). Detection works on token ids, not on text:

    * A forward pre-hook on the token-embedding module reads the ``input_ids``
      of every forward call and finds every occurrence of every *token variant*
      of the subjects; the neuron hooks add ``delta`` (cast to the activation's
      dtype) at the last token of each occurrence only. Rows and positions
      without an occurrence are left untouched, so padded batches (left or
      right padding) and rows without a subject compute exactly what the unedited
      model computes.
    * Token variants of a subject ``s`` (special tokens dropped, the tokens
      whose character span overlaps ``s``): ``s`` tokenised alone; ``" " + s``
      (the leading-space token of GPT-2/Llama-3 style tokenizers, "▁" of
      SentencePiece); and ``s`` as tokenised inside each of the patch's
      ``contexts`` (the request's prompts, paraphrases and portability questions:
      a tokenizer that merges the subject with its neighbours, e.g. byte-level
      BPE on Chinese, is then still matched on the edit's own texts).
    * ``match="exact"``: those variants of the subjects as given.
      ``match="normalized"``: also the variants of these forms of the subject
      (the same transform applied to the subject and to each context): Unicode
      NFKC; NFKC with runs of whitespace collapsed to one space and the ends
      stripped; that, lower-cased; upper-cased; title-cased (``str.title``);
      with its first letter upper-cased. It does not match other mixed case or
      other internal spacing in the input (detection is on token ids).
    * Matching is done within the ``input_ids`` of each forward call. With a
      key/value cache (``model.generate``) the prompt's occurrences are patched at
      the prefill step (their keys and values carry the change on); a later step
      is patched only if its own new tokens contain a whole occurrence (e.g. a
      one-token subject the model writes itself). Steps without a subject add
      nothing.
    * A forward call without ``input_ids`` (``inputs_embeds`` only) cannot be
      matched: the patch hooks raise InputError rather than silently not editing
      (embeddings made by the model's own embedding module just before the call
      are matched on the ids it read).
    * A patch's subjects are matched together, whatever their language: the
      patch applies wherever any subject of S_G occurs.

Threads
    ``wb.lock`` (an ``RLock``) is held from entering an application to leaving
    it, so other sessions wait and never see the edit (Design Decision 4); the
    thread that applied an edit is the one that reverts it.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import operator
import os
import threading
import time
import unicodedata
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch

from analysis import runs
from analysis.errors import CorpusError, InputError, NeuroglotError
from analysis.tokens import encode, subject_char_span
from data.corpus import normalize_language

MATCH_MODES = ("exact", "normalized")
EDIT_FORMAT = "neuroglot-edit"
EDIT_FORMAT_VERSION = 1
TENSOR_FILE = "edit.safetensors"
JSON_FILE = "edit.json"


# =================================================================== requests


@dataclass
class LanguageFact:
    """One fact to edit, in one language.

    ``prompt`` is the question (MzsRE ``src``) and must contain ``subject``;
    ``target_new`` is the answer the edited model should give, ``target_old``
    the answer before the edit where known. ``paraphrases`` are rephrased
    prompts (generality), ``locality`` (prompt, answer) pairs the edit must not
    change, ``portability`` (question, answer) pairs that follow from the edit.
    """

    prompt: str
    subject: str
    target_new: str
    target_old: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)
    portability: list[tuple[str, str]] = field(default_factory=list)

    def contexts(self) -> list[str]:
        """The texts of this fact that contain its subject (prompt, paraphrases, portability questions)."""
        texts = [self.prompt, *self.paraphrases, *(q for q, _ in self.portability)]
        return [t for t in dict.fromkeys(texts) if self.subject and self.subject in t]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "subject": self.subject, "target_new": self.target_new,
            "target_old": self.target_old, "paraphrases": list(self.paraphrases),
            "locality": [list(p) for p in self.locality], "portability": [list(p) for p in self.portability],
        }

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

    def validate(self, wb: Any = None) -> "EditRequest":
        """A checked copy with ISO language codes; InputError with a message for users otherwise.

        Checks: at least one language; every language code known (normalised with
        :func:`data.corpus.normalize_language`, "cz" -> "cs") and given once; prompt,
        subject and new target not empty; the subject occurs in its prompt and (with
        ``wb``) some token of the prompt covers it; paraphrases, locality and
        portability entries are non-empty texts.
        """
        label = self.label
        if not isinstance(self.facts, Mapping) or not self.facts:
            raise InputError(f"{label} has no language: give at least one language with its prompt, "
                             "subject and new target.")
        facts: dict[str, LanguageFact] = {}
        for raw, fact in self.facts.items():
            code = _language_code(raw, label)
            if code in facts:
                raise InputError(f"{label} gives language {code!r} twice ({raw!r} is {code!r} too).")
            facts[code] = _checked_fact(fact, f"{label}, language {code!r}", wb)
        return EditRequest(facts, str(self.case_id or ""))

    @classmethod
    def from_record(cls, record: Any, languages: Iterable[str] | None = None) -> "EditRequest":
        """A request from a :class:`data.edit_records.EditRecord` (MzsRE / Bi-ZsRE; MLaKE with subjects).

        Per language: prompt, subject, target_new; ``rephrase`` becomes the
        paraphrase, ``(loc, loc_ans)`` the locality pair, ``(port_question,
        port_answer)`` the portability pair, MLaKE's ``target_true`` the old
        target. ``languages`` (default: all of the record's) selects languages.
        """
        record_id = str(getattr(record, "record_id", ""))
        available = dict(getattr(record, "fields", {}) or {})
        codes = list(available) if languages is None else [_language_code(c, f"Record {record_id}") for c in languages]
        if not codes:
            raise InputError(f"Record {record_id} has no language to edit.")
        facts: dict[str, LanguageFact] = {}
        for code in codes:
            if code not in available:
                raise InputError(f"Record {record_id} has no language {code!r}; it has {', '.join(sorted(available))}.")
            f = available[code]
            if not f.get("subject"):
                raise InputError(f"Record {record_id} ({code}) has no subject, which every editor needs; "
                                 "MLaKE gives none: add a 'subject' field to its items.")
            facts[code] = LanguageFact(
                prompt=f.get("prompt") or "", subject=f["subject"], target_new=f.get("target_new") or "",
                target_old=f.get("target_true"),
                paraphrases=[f["rephrase"]] if f.get("rephrase") else [],
                locality=[(f["loc"], f["loc_ans"])] if f.get("loc") and f.get("loc_ans") else [],
                portability=([(f["port_question"], f["port_answer"])]
                             if f.get("port_question") and f.get("port_answer") else []),
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


def validate_requests(requests: EditRequest | Sequence[EditRequest], wb: Any = None) -> list[EditRequest]:
    """Checked copies of ``requests`` (one request or a sequence); InputError for an empty list."""
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise InputError("No edit requests: give at least one fact to edit.")
    for i, request in enumerate(requests):
        if not isinstance(request, EditRequest):
            raise InputError(f"Edit request {i} is a {type(request).__name__}, not an EditRequest.")
    return [request.validate(wb) for request in requests]


def _language_code(raw: Any, label: str) -> str:
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


def _checked_fact(fact: Any, where: str, wb: Any) -> LanguageFact:
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
                        _pairs(fact.locality, "locality", where), _pairs(fact.portability, "portability", where))


# ============================================================ hyper-parameters


@dataclass(frozen=True)
class ModelSignature:
    """What identifies a model's shape for presets: family, layers, width."""

    family: str
    n_layers: int
    d_model: int


#: Models the papers' presets are for (Design Decision 5), with their shapes.
KNOWN_MODELS: dict[str, ModelSignature] = {
    "embedded": ModelSignature("gemma3_text", 18, 640),
    "meta-llama/Llama-3.1-8B": ModelSignature("llama", 32, 4096),
    "meta-llama/Meta-Llama-3-8B": ModelSignature("llama", 32, 4096),
    "Qwen/Qwen2-7B": ModelSignature("qwen2", 28, 3584),
    "Qwen/Qwen2.5-7B": ModelSignature("qwen2", 28, 3584),
    "bigscience/bloomz-7b1-mt": ModelSignature("bloom", 30, 4096),
    "EleutherAI/gpt-j-6b": ModelSignature("gptj", 28, 4096),
}
#: Other names of the known models (lower case, without the organisation).
MODEL_ALIASES: dict[str, str] = {
    "meta-llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "gemma-3-270m": "embedded",
}


def model_signature(wb: Any) -> ModelSignature:
    """The :class:`ModelSignature` of a Workbench."""
    return ModelSignature(wb.arch.family, int(wb.n_layers), int(wb.d_model))


def known_model_key(name: str | None) -> str | None:
    """The :data:`KNOWN_MODELS` key for a model name, id or local folder name; None if unknown."""
    if not name:
        return None
    name = str(name).strip()
    lowered = {key.lower(): key for key in KNOWN_MODELS}
    if name.lower() in lowered:
        return lowered[name.lower()]
    base = name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    by_base = {key.rsplit("/", 1)[-1].lower(): key for key in KNOWN_MODELS}
    return by_base.get(base) or MODEL_ALIASES.get(base)


@dataclass
class HParams:
    """Hyper-parameters common to all editors; each editor extends this dataclass.

    ``layers`` are the layers an editor changes (negative numbers count from the
    end). ``PRESETS`` maps a model key (``"embedded"``, a Hugging Face id of
    :data:`KNOWN_MODELS`, or any exact spec) to the field values for that model;
    :meth:`preset` picks one. An editor's class looks like::

        @dataclass
        class LuLafnsHParams(HParams):
            beta: float = 0.1          # Eq. 5 threshold
            lambda_target: float = 1.0  # Eq. 10
            lambda_kl: float = 0.0625   # Eq. 10 (MEMIT's value)
            steps: int = 25

            PRESETS: ClassVar[dict[str, dict]] = {
                "meta-llama/Llama-3.1-8B": dict(layers=[11, 12, 13, 31], beta=0.1),
                "Qwen/Qwen2-7B": dict(layers=[19, 20, 21, 27], beta=0.0),
                "bigscience/bloomz-7b1-mt": dict(layers=[9, 10, 11, 29], beta=0.2),
                "embedded": dict(layers=[3, 9, 10, 17], beta=0.1),  # example: LAFN peaks of the atlas; to be measured
            }

            def validate(self, wb=None):
                super().validate(wb)
                if not 0 <= self.beta <= 1:
                    raise InputError(f"beta must be in [0, 1], got {self.beta}.")

    A subclass that defines ``__post_init__`` calls ``super().__post_init__()``.
    """

    layers: list[int] = field(default_factory=list)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
            raise InputError(f"layers must be a list of layer numbers, got {self.layers!r}.")
        try:
            self.layers = [operator.index(layer) for layer in self.layers]
        except TypeError:
            raise InputError(f"layers must be whole numbers, got {self.layers!r}.") from None

    def validate(self, wb: Any = None) -> None:
        """Check the values (against ``wb``'s model where given); InputError naming the valid range."""
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"layers lists a layer twice: {self.layers}.")
        if wb is not None:
            self.layer_indices(wb)

    def layer_indices(self, wb: Any) -> list[int]:
        """``layers`` as non-negative indices into ``wb``'s model; InputError for a layer out of range."""
        n = int(wb.n_layers)
        out = []
        for layer in self.layers:
            if not -n <= layer < n:
                raise InputError(f"Layer {layer} is out of range: {wb.name} has {n} layers "
                                 f"(0-{n - 1}; -1 is the last).")
            out.append(layer % n)
        if len(set(out)) != len(out):
            raise InputError(f"layers {self.layers} name one layer twice on this {n}-layer model.")
        return out

    # presets --------------------------------------------------------------
    @classmethod
    def preset_name(cls, name_or_wb: Any) -> str:
        """The key of ``PRESETS`` for a model name/spec or a Workbench.

        A name matches a key exactly, ignoring case, by its last path part
        ("Llama-3.1-8B", a local folder of that name) or through
        :data:`MODEL_ALIASES`. A Workbench is tried by its spec, name and
        ``config._name_or_path``, then by family and size (:data:`KNOWN_MODELS`:
        an instruct or fine-tuned variant of a known model gets its preset).
        """
        wb = None if isinstance(name_or_wb, str) else name_or_wb
        names = [name_or_wb] if wb is None else [
            getattr(wb, "spec", None), getattr(wb, "name", None),
            getattr(getattr(getattr(wb, "model", None), "config", None), "_name_or_path", None)]
        for name in names:
            key = cls._preset_key_for_name(name)
            if key is not None:
                return key
        signature = None
        if wb is not None:
            signature = model_signature(wb)
            for key in cls.PRESETS:
                if KNOWN_MODELS.get(known_model_key(key) or key) == signature:
                    return key
        what = repr(name_or_wb) if wb is None else (
            f"{getattr(wb, 'name', '?')!r} ({signature.family}, {signature.n_layers} layers, "
            f"d_model {signature.d_model})")
        if not cls.PRESETS:
            raise InputError(f"{cls.__name__} has no presets; set its fields yourself: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}.")
        raise InputError(f"No {cls.__name__} preset for {what}. Presets: {', '.join(cls.PRESETS)}. "
                         f"Pick one by name or set the fields yourself ({cls.__name__}(layers=[...], ...)).")

    @classmethod
    def _preset_key_for_name(cls, name: Any) -> str | None:
        if not name:
            return None
        name = str(name).strip()
        if name in cls.PRESETS:
            return name
        lowered = {key.lower(): key for key in cls.PRESETS}
        if name.lower() in lowered:
            return lowered[name.lower()]
        known = known_model_key(name)
        for key in cls.PRESETS:
            if known is not None and known_model_key(key) == known:
                return key
        return None

    @classmethod
    def preset(cls, name_or_wb: Any) -> "HParams":
        """The preset for a model (see :meth:`preset_name`), as a new instance."""
        return cls.from_dict(cls.PRESETS[cls.preset_name(name_or_wb)])

    # plain data -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HParams":
        if not isinstance(data, Mapping):
            raise InputError(f"{cls.__name__}: expected an object of field values, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; "
                             f"its fields are {', '.join(sorted(names))}.")
        try:
            return cls(**{k: _copy_value(v) for k, v in data.items()})
        except TypeError as exc:
            raise InputError(f"{cls.__name__}: {exc}") from None


def _copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


# ====================================================================== edits


@dataclass(eq=False)
class WeightDelta:
    """One additive change of one parameter: ``full`` (the parameter's shape) or ``u @ v``.

    Low-rank factors keep large edits small: ``u`` is ``[rows, r]``, ``v`` is
    ``[r, cols]`` for a ``[rows, cols]`` parameter.
    """

    full: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.full is None) == (self.u is None and self.v is None) or ((self.u is None) != (self.v is None)):
            raise InputError("A weight delta is either a full tensor or a pair of low-rank factors (u, v).")
        for name in ("full", "u", "v"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise InputError(f"A weight delta's {name} must be a torch.Tensor, got {type(t).__name__}.")
            if not t.is_floating_point():
                raise InputError(f"A weight delta's {name} must be floating point, got {t.dtype}.")
            setattr(self, name, t.detach())
        if self.u is not None:
            if self.u.ndim != 2 or self.v.ndim != 2 or self.u.shape[1] != self.v.shape[0]:
                raise InputError(f"Low-rank factors must be u [rows, r] and v [r, cols]; got "
                                 f"{tuple(self.u.shape)} and {tuple(self.v.shape)}.")

    @classmethod
    def of(cls, value: Any) -> "WeightDelta":
        """A WeightDelta from a tensor (full), a pair ``(u, v)`` (low rank) or a WeightDelta."""
        if isinstance(value, WeightDelta):
            return value
        if isinstance(value, torch.Tensor):
            return cls(full=value)
        if isinstance(value, tuple) and len(value) == 2:
            return cls(u=value[0], v=value[1])
        raise InputError(f"A weight delta must be a tensor or a (u, v) pair of tensors, got {type(value).__name__}.")

    @property
    def kind(self) -> str:
        return "full" if self.full is not None else "low_rank"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.full is not None:
            return tuple(self.full.shape)
        return (int(self.u.shape[0]), int(self.v.shape[1]))

    @property
    def rank(self) -> int | None:
        return None if self.u is None else int(self.u.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"full": self.full} if self.full is not None else {"u": self.u, "v": self.v}

    def stored_values(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def materialize(self, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The delta as a full tensor (``u @ v`` computed in the factors' dtype on ``device``)."""
        if self.full is not None:
            return self.full.to(device=device or self.full.device, dtype=dtype or self.full.dtype)
        u = self.u.to(device=device or self.u.device)
        v = self.v.to(device=u.device)
        product = u @ v
        return product if dtype is None else product.to(dtype)


@dataclass(eq=False)
class ActivationPatch:
    """Add ``delta`` to FFN neurons ``neurons`` of ``layer`` at the last token of each subject occurrence.

    ``subjects`` is the aligned multilingual subject set S_G, ``{language:
    [subject, ...]}``; ``contexts`` (same keys) are texts containing the
    subjects, used only to collect how the tokenizer writes them in context;
    ``match`` is ``"exact"`` or ``"normalized"`` (see the module docstring).
    Build one from requests with :meth:`for_requests`.
    """

    layer: int
    neurons: torch.Tensor
    delta: torch.Tensor
    subjects: dict[str, list[str]]
    match: str = "exact"
    contexts: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.layer = operator.index(self.layer)
        except TypeError:
            raise InputError(f"A patch's layer must be a whole number, got {self.layer!r}.") from None
        if self.layer < 0:
            raise InputError(f"A patch's layer must be 0 or more, got {self.layer}.")
        neurons = torch.as_tensor(self.neurons).detach()
        if neurons.ndim != 1 or neurons.is_floating_point() or neurons.is_complex() or neurons.dtype == torch.bool:
            raise InputError("A patch's neurons must be a 1-D tensor of neuron indices.")
        neurons = neurons.to(torch.long)
        if neurons.numel() and int(neurons.min()) < 0:
            raise InputError("A patch's neuron indices must be 0 or more.")
        if neurons.unique().numel() != neurons.numel():
            raise InputError("A patch lists a neuron twice; give each neuron once with its summed delta.")
        delta = torch.as_tensor(self.delta).detach()
        if not delta.is_floating_point():
            delta = delta.to(torch.float32)
        if delta.shape != neurons.shape:
            raise InputError(f"A patch needs one delta per neuron: {neurons.numel()} neurons, "
                             f"delta of shape {tuple(delta.shape)}.")
        self.neurons, self.delta = neurons, delta
        if self.match not in MATCH_MODES:
            raise InputError(f"Unknown subject match {self.match!r}; use one of: {', '.join(MATCH_MODES)}.")
        self.subjects = _texts_by_language(self.subjects, "subjects")
        if not any(self.subjects.values()):
            raise InputError("A patch needs at least one subject: it is used only where a subject occurs.")
        self.contexts = _texts_by_language(self.contexts or {}, "contexts")

    @classmethod
    def for_requests(cls, layer: int, neurons: Any, delta: Any, requests: EditRequest | Sequence[EditRequest],
                     match: str = "exact") -> "ActivationPatch":
        """A patch keyed by the subjects of ``requests`` (S_G), with their prompts as contexts."""
        if isinstance(requests, EditRequest):
            requests = [requests]
        subjects: dict[str, list[str]] = {}
        contexts: dict[str, list[str]] = {}
        for request in requests:
            for lang, fact in request.facts.items():
                subjects.setdefault(lang, []).append(fact.subject)
                contexts.setdefault(lang, []).extend(fact.contexts())
        return cls(layer, neurons, delta, subjects, match, contexts)

    def token_variants(self, tokenizer: Any) -> list[tuple[int, ...]]:
        """The token-id sequences whose last token this patch changes (see the module docstring)."""
        subjects = [s for texts in self.subjects.values() for s in texts]
        contexts = [c for texts in self.contexts.values() for c in texts]
        return subject_token_variants(tokenizer, subjects, contexts, self.match)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "subjects": self.subjects, "contexts": self.contexts, "match": self.match,
                "n_neurons": int(self.neurons.numel())}


def _texts_by_language(value: Any, what: str) -> dict[str, list[str]]:
    if not isinstance(value, Mapping):
        raise InputError(f"A patch's {what} must be a dict {{language: [text, ...]}}.")
    out: dict[str, list[str]] = {}
    for raw, texts in value.items():
        code = _language_code(raw, f"A patch's {what}")
        if isinstance(texts, str):
            texts = [texts]
        bucket = out.setdefault(code, [])
        for text in list(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"A patch's {what} for {code!r} must be non-empty texts, got {text!r}.")
            if text not in bucket:
                bucket.append(text)
    return out


# ---------------------------------------------------------------- subject tokens


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _spaced(text: str) -> str:
    return " ".join(_nfkc(text).split())


def _capitalized(text: str) -> str:
    text = _spaced(text)
    return text[:1].upper() + text[1:]


#: The text transforms of ``match="normalized"`` (applied to a subject and to its contexts alike).
NORMALIZED_FORMS: tuple[Callable[[str], str], ...] = (
    lambda t: t, _nfkc, _spaced, lambda t: _spaced(t).lower(), lambda t: _spaced(t).upper(),
    lambda t: _spaced(t).title(), _capitalized,
)


def _span_ids(tokenizer: Any, text: str, start: int, end: int, special: set[int]) -> tuple[int, ...]:
    """Ids of the tokens of ``text`` whose character span overlaps ``[start, end)``, special tokens dropped."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return tuple(int(i) for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
                 if s < end and e > start and int(i) not in special)


def _occurrence_ids(tokenizer: Any, text: str, subject: str, special: set[int]) -> list[tuple[int, ...]]:
    out, start = [], text.find(subject)
    while start >= 0 and subject:
        out.append(_span_ids(tokenizer, text, start, start + len(subject), special))
        start = text.find(subject, start + 1)
    return out


def subject_token_variants(tokenizer: Any, subjects: Iterable[str], contexts: Iterable[str] = (),
                           match: str = "exact") -> list[tuple[int, ...]]:
    """Every token-id sequence that counts as an occurrence of one of ``subjects`` (module docstring).

    Sorted by length then ids; empty sequences dropped. Slow (Python)
    tokenizers give only the ids of ``s`` and ``" " + s`` (no offsets).
    """
    if match not in MATCH_MODES:
        raise InputError(f"Unknown subject match {match!r}; use one of: {', '.join(MATCH_MODES)}.")
    forms = NORMALIZED_FORMS if match == "normalized" else NORMALIZED_FORMS[:1]
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    subjects, contexts = list(subjects), list(contexts)
    fast = bool(getattr(tokenizer, "is_fast", False))
    variants: set[tuple[int, ...]] = set()
    for subject in subjects:
        for form in forms:
            s = form(subject)
            if not s.strip():
                continue
            for text in (s, " " + s):
                if fast:
                    variants.update(_occurrence_ids(tokenizer, text, s, special))
                else:
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                    variants.add(tuple(int(i) for i in ids if int(i) not in special))
            if fast:
                for context in contexts:
                    variants.update(_occurrence_ids(tokenizer, form(context), s, special))
    return sorted((v for v in variants if v), key=lambda v: (len(v), v))


class SubjectMatcher:
    """Finds the last token of every occurrence of token-id sequences in a batch of ids, for many groups at once.

    ``groups[g]`` is the list of token variants of one subject set (one per
    distinct set of patched subjects). One pass per variant length: the
    positions whose token ends some variant are found with ``torch.isin``, and
    only those windows are compared exactly, so the cost stays small with
    thousands of variants (many composed edits).
    """

    _CHUNK = 1 << 22  # compared values per block of candidate windows

    def __init__(self, groups: Sequence[Sequence[tuple[int, ...]]]):
        owners: dict[tuple[int, ...], set[int]] = {}
        for g, variants in enumerate(groups):
            for v in variants:
                if v:
                    owners.setdefault(tuple(int(i) for i in v), set()).add(g)
        self.n_groups = len(groups)
        # per length k: variants [n, k], and their groups as a flat list with each variant's start and count
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for k in sorted({len(v) for v in owners}):
            variants = sorted(v for v in owners if len(v) == k)
            lists = [sorted(owners[v]) for v in variants]
            counts = torch.tensor([len(gs) for gs in lists], dtype=torch.long)
            flat = torch.tensor([g for gs in lists for g in gs], dtype=torch.long)
            self._tables[k] = (torch.tensor(variants, dtype=torch.long), flat, counts.cumsum(0) - counts, counts)

    def positions(self, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{group: (rows, cols)}`` of the last tokens of its occurrences in ``input_ids`` [B, T] (sorted,
        each position once); groups without an occurrence are absent."""
        ids = input_ids if input_ids.ndim == 2 else input_ids.reshape(1, -1)
        B, T = ids.shape
        keys = []  # (group * B + row) * T + col of every hit
        for k, tables in self._tables.items():
            if k > T:
                continue
            table, flat, first, count = (t.to(ids.device) for t in tables)
            ends = torch.isin(ids[:, k - 1:], table[:, -1])       # windows [j, j+k) whose last token may match
            if not bool(ends.any()):
                continue
            rows, starts = ends.nonzero(as_tuple=True)
            windows = ids.unfold(1, k, 1)[rows, starts]           # [P, k] candidate windows
            step = max(1, self._CHUNK // max(1, table.numel()))
            for a in range(0, rows.numel(), step):
                hit, variant = (windows[a:a + step, None, :] == table[None]).all(-1).nonzero(as_tuple=True)
                n = count[variant]                                # each matching variant -> its groups
                hit = hit.repeat_interleave(n) + a
                offset = torch.arange(int(n.sum()), device=ids.device) - (n.cumsum(0) - n).repeat_interleave(n)
                group = flat[first[variant].repeat_interleave(n) + offset]
                keys.append((group * B + rows[hit]) * T + starts[hit] + (k - 1))
        if not keys:
            return {}
        keys = torch.cat(keys).unique()  # sorted: by group, then row, then column
        groups, rest = keys // (B * T), keys % (B * T)
        values, counts = torch.unique_consecutive(groups, return_counts=True)
        return {int(g): (part // T, part % T) for g, part in zip(values.tolist(), rest.split(counts.tolist()))}

    def last_token_mask(self, input_ids: torch.Tensor, group: int = 0) -> torch.Tensor:
        """Bool ``[B, T]``: True at the last token of each occurrence of ``group``'s variants."""
        ids = input_ids if input_ids.ndim == 2 else input_ids.reshape(1, -1)
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        hits = self.positions(ids).get(group)
        if hits is not None:
            mask[hits] = True
        return mask


# --------------------------------------------------------------------- the Edit


class Edit:
    """Weight deltas and/or activation patches computed by an editor; applied only inside :meth:`applied`.

    ``weights`` maps a parameter name (as ``model.named_parameters()`` /
    ``state_dict()`` spell it; tied names work) to a delta: a tensor of the
    parameter's shape, a pair ``(u, v)`` of low-rank factors, or a list of such
    terms added in order. ``patches`` are :class:`ActivationPatch` es (applied in
    order). ``meta`` is plain data (method, hyper-parameters, requests, model,
    created, versions) filled by :meth:`Editor.compute`.
    """

    def __init__(self, weights: Mapping[str, Any] | None = None, patches: Iterable[ActivationPatch] = (),
                 meta: Mapping[str, Any] | None = None):
        self.weights: dict[str, list[WeightDelta]] = {}
        for name, value in (weights or {}).items():
            terms = value if isinstance(value, list) else [value]
            if not terms:
                continue
            self.weights[str(name)] = [WeightDelta.of(term) for term in terms]
        self.patches: list[ActivationPatch] = list(patches)
        for patch in self.patches:
            if not isinstance(patch, ActivationPatch):
                raise InputError(f"An edit's patches must be ActivationPatch objects, got {type(patch).__name__}.")
        self.meta: dict[str, Any] = dict(meta or {})

    # --- views ------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return list(self.weights)

    @property
    def method(self) -> str:
        return str(self.meta.get("method", ""))

    def is_empty(self) -> bool:
        return not self.weights and not self.patches

    def delta(self, name: str, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> torch.Tensor:
        """The total change of parameter ``name`` (its terms summed in ``dtype``), for inspection."""
        if name not in self.weights:
            raise InputError(f"This edit does not change {name!r}; it changes: {', '.join(self.weights) or 'nothing'}.")
        terms = self.weights[name]
        total = terms[0].materialize(device, dtype).clone()
        for term in terms[1:]:
            total += term.materialize(device, dtype)
        return total

    def summary(self) -> dict[str, Any]:
        """Plain data: what the edit changes and how much it stores."""
        terms = [t for ts in self.weights.values() for t in ts]
        return {
            "method": self.method,
            "parameters": len(self.weights),
            "full_deltas": sum(t.kind == "full" for t in terms),
            "low_rank_deltas": sum(t.kind == "low_rank" for t in terms),
            "patches": len(self.patches),
            "patch_layers": sorted({p.layer for p in self.patches}),
            "patched_neurons": sum(int(p.neurons.numel()) for p in self.patches),
            "stored_values": (sum(t.stored_values() for t in terms)
                              + sum(2 * int(p.neurons.numel()) for p in self.patches)),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"Edit(method={s['method']!r}, parameters={s['parameters']} "
                f"({s['low_rank_deltas']} low-rank terms), patches={s['patches']}, stored_values={s['stored_values']})")

    # --- composition ------------------------------------------------------------
    @classmethod
    def compose(cls, *edits: "Edit") -> "Edit":
        """One edit that does what ``edits`` do one after the other.

        Per parameter the terms are kept in order (so applying the composition is
        bit-identical to nesting the applications); patches are concatenated.
        """
        weights: dict[str, list[WeightDelta]] = {}
        patches: list[ActivationPatch] = []
        for edit in edits:
            if not isinstance(edit, Edit):
                raise InputError(f"Only edits can be composed, got {type(edit).__name__}.")
            for name, terms in edit.weights.items():
                weights.setdefault(name, []).extend(terms)
            patches.extend(edit.patches)
        meta = {"method": "compose", "parts": [dict(e.meta) for e in edits]}
        return cls(weights, patches, meta)

    def __add__(self, other: "Edit") -> "Edit":
        if not isinstance(other, Edit):
            return NotImplemented
        return Edit.compose(self, other)

    # --- application -----------------------------------------------------------
    def applied(self, wb: Any) -> "AppliedEdit":
        """Context manager: the model carries this edit inside the ``with`` block only.

        ``with edit.applied(wb): ...`` holds ``wb.lock``; on exit (also on an
        exception) every touched parameter is restored bit-exactly and the hooks
        are removed. A mismatching model (unknown parameter, other shape, layer
        or neuron out of range) is an InputError before anything is changed.
        ``with edit.applied(wb) as wb:`` gives the Workbench back.
        """
        return AppliedEdit(self, wb)

    def apply(self, wb: Any) -> "AppliedEdit":
        """Apply now; call ``.revert()`` on the result (in the same thread) to undo. Prefer :meth:`applied`."""
        application = AppliedEdit(self, wb)
        application.__enter__()
        return application

    # --- files -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the folder ``path`` with ``edit.safetensors`` + ``edit.json``, atomically.

        Both files are written into a temporary folder beside ``path`` that is then
        renamed to ``path``; an earlier saved edit at ``path`` is replaced only
        after the new one is complete. A folder holding anything else is refused.
        """
        from safetensors.torch import save_file

        target = check_save_folder(path)
        tensors, layout = self._tensors_and_layout()
        with runs.staging(target) as tmp:  # crash-safe swap; see analysis.runs.replace_folder
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": EDIT_FORMAT})
            layout["tensors_sha256"] = _sha256(tmp / TENSOR_FILE)
            text = json.dumps(layout, indent=2, ensure_ascii=False, default=_json_default)
            (tmp / JSON_FILE).write_text(text, encoding="utf-8")
            runs.replace_folder(tmp, target)
        return target

    def _tensors_and_layout(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()

        def put(key: str, t: torch.Tensor) -> None:
            t = t.detach().to("cpu").contiguous()
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()  # safetensors refuses tensors that share memory
                storage = t.untyped_storage()
            seen.add(storage.data_ptr())
            tensors[key] = t

        weights_layout: dict[str, list[dict[str, Any]]] = {}
        for name, terms in self.weights.items():
            weights_layout[name] = []
            for j, term in enumerate(terms):
                for part, t in term.tensors().items():
                    put(f"weights/{name}/{j}/{part}", t)
                weights_layout[name].append({"kind": term.kind, "shape": list(term.shape)})
        for i, patch in enumerate(self.patches):
            put(f"patches/{i}/neurons", patch.neurons)
            put(f"patches/{i}/delta", patch.delta)
        try:
            meta = _plain(self.meta)
        except (TypeError, ValueError) as exc:
            raise InputError(f"The edit's meta must be plain data (JSON) to be saved: {exc}") from None
        layout = {"format": EDIT_FORMAT, "version": EDIT_FORMAT_VERSION, "weights": weights_layout,
                  "patches": [p.to_json() for p in self.patches], "meta": meta}
        return tensors, layout

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Read an edit written by :meth:`save` (its folder, or a file in it); NeuroglotError for a missing,
        damaged or mismatched pair."""
        from safetensors.torch import load_file

        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise InputError(f"Edit.load needs the folder of a saved edit, got {path!r}.")
        folder = Path(path).expanduser()
        if folder.name in (JSON_FILE, TENSOR_FILE) and folder.is_file():
            folder = folder.parent
        runs.recover(folder)  # a save killed half-way: put the earlier edit back, drop its temporary folders
        json_path, tensor_path = folder / JSON_FILE, folder / TENSOR_FILE
        if not json_path.is_file() or not tensor_path.is_file():
            raise NeuroglotError(f"No saved edit at {folder}: expected a folder with {JSON_FILE} and {TENSOR_FILE}.")
        try:
            layout = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NeuroglotError(f"{json_path} is damaged: {exc}") from None
        if not isinstance(layout, dict) or layout.get("format") != EDIT_FORMAT:
            raise NeuroglotError(f"{json_path} is not a Neuroglot edit file.")
        if layout.get("version") != EDIT_FORMAT_VERSION:
            raise NeuroglotError(f"{json_path} has edit format version {layout.get('version')!r}; this Neuroglot "
                                 f"reads version {EDIT_FORMAT_VERSION}.")
        if _sha256(tensor_path) != layout.get("tensors_sha256"):
            raise NeuroglotError(f"{tensor_path} does not match {json_path} (damaged, or from another save).")
        try:
            tensors = load_file(str(tensor_path))
            weights = {name: [_weight_term(tensors, name, j, entry) for j, entry in enumerate(entries)]
                       for name, entries in layout["weights"].items()}
            patches = [ActivationPatch(p["layer"], tensors[f"patches/{i}/neurons"], tensors[f"patches/{i}/delta"],
                                       p["subjects"], p["match"], p.get("contexts") or {})
                       for i, p in enumerate(layout["patches"])]
            return cls(weights, patches, layout.get("meta") or {})
        except NeuroglotError as exc:
            raise NeuroglotError(f"{folder} holds a damaged edit: {exc}") from None
        except Exception as exc:  # safetensors errors, missing keys, wrong types in a hand-edited JSON
            raise NeuroglotError(f"{folder} holds a damaged edit: {type(exc).__name__}: {exc}") from None


def _weight_term(tensors: Mapping[str, torch.Tensor], name: str, j: int, entry: Mapping[str, Any]) -> WeightDelta:
    prefix = f"weights/{name}/{j}/"
    if entry["kind"] == "full":
        term = WeightDelta(full=tensors[prefix + "full"])
    elif entry["kind"] == "low_rank":
        term = WeightDelta(u=tensors[prefix + "u"], v=tensors[prefix + "v"])
    else:
        raise NeuroglotError(f"unknown delta kind {entry['kind']!r} for {name}")
    if list(term.shape) != list(entry["shape"]):
        raise NeuroglotError(f"the delta of {name} has shape {term.shape}, the JSON says {entry['shape']}")
    return term


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_edit_folder(path: Path) -> bool:
    return path.is_dir() and {p.name for p in path.iterdir()} <= {JSON_FILE, TENSOR_FILE}


def check_save_folder(path: str | Path, what: str = "") -> Path:
    """The folder an edit is saved to, checked before any work: writable, and new, empty or a saved edit."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise InputError(f"An edit is saved to a folder; got {path!r}.")
    target = runs.check_writable(path, what)
    runs.recover(target)
    if target.exists() and not _is_edit_folder(target):
        raise InputError(f"{target} exists and is not a saved edit; choose another folder.")
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _plain(value: Any) -> Any:
    """JSON-ready plain data (tuples become lists)."""
    return json.loads(json.dumps(value, default=_json_default))


# ---------------------------------------------------------------- application

#: Applications in force per model, oldest first (guarded by _ACTIVE_LOCK).
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, list[AppliedEdit]]" = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


class _TokenState:
    """Where the subjects occur in the forward call in progress: ``{group: (rows, cols)}`` and the ids' shape."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.positions: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def clear(self) -> None:
        self.shape, self.positions = None, None


class AppliedEdit:
    """One application of an :class:`Edit` to a Workbench's model; a context manager.

    Entering validates everything, takes ``wb.lock``, keeps a bit-exact copy of
    the touched parameters, adds the deltas and registers the patch hooks.
    :meth:`revert` (or leaving the ``with`` block) restores them; it also ends
    every application entered after this one on the same model.
    """

    def __init__(self, edit: Edit, wb: Any):
        if not isinstance(edit, Edit):
            raise InputError(f"Expected an Edit, got {type(edit).__name__}.")
        self.edit, self.wb = edit, wb
        self.model: torch.nn.Module = wb.model
        self.active = False
        self._holds_lock = False
        self._entered = False
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Any:
        if self._entered:
            raise InputError("This application was already used; call edit.applied(wb) again for a new one.")
        self._entered = True
        self.wb.lock.acquire()
        self._holds_lock = True
        try:
            self._apply()
        except BaseException:
            self._holds_lock = False
            self.wb.lock.release()
            raise
        return self.wb

    def __exit__(self, *exc: Any) -> None:
        self.revert()

    def revert(self) -> None:
        """Restore the model as it was before this application (and before any later one)."""
        try:
            if self.active:
                with _ACTIVE_LOCK:
                    stack = _ACTIVE.get(self.model, [])
                    later = stack[stack.index(self):] if self in stack else [self]
                    del stack[len(stack) - len(later):]
                for application in reversed(later):
                    application._undo()
        finally:
            if self._holds_lock:
                self._holds_lock = False
                self.wb.lock.release()

    # --- internals -----------------------------------------------------------
    def _apply(self) -> None:
        with _ACTIVE_LOCK:
            if any(a.edit is self.edit for a in _ACTIVE.get(self.model, [])):
                raise InputError("This edit is already applied to this model. To apply its change twice, "
                                 "apply `edit + edit`.")
        targets = self._weight_targets()
        plan = _PatchPlan(self.edit.patches, self.wb)
        unique: dict[int, torch.nn.Parameter] = {}
        for _, param, _ in targets:
            unique.setdefault(id(param), param)
        with torch.no_grad():
            self._saved = [(param, param.detach().clone()) for param in unique.values()]
            self.active = True
            try:
                for _, param, terms in targets:
                    for term in terms:
                        param.add_(term.materialize(param.device))
                self._handles = plan.register()
            except BaseException:
                self._undo()
                raise
        with _ACTIVE_LOCK:
            _ACTIVE.setdefault(self.model, []).append(self)

    def _weight_targets(self) -> list[tuple[str, torch.nn.Parameter, list[WeightDelta]]]:
        made_for = _computed_for(self.edit)
        hint = f" (the edit was computed for {made_for})" if made_for else ""
        targets = []
        for name, terms in self.edit.weights.items():
            try:
                param = self.model.get_parameter(name)
            except AttributeError:
                raise InputError(f"This edit changes the parameter {name!r}, which {self.wb.name} does not "
                                 f"have{hint}.") from None
            for term in terms:
                if tuple(term.shape) != tuple(param.shape):
                    raise InputError(f"This edit's delta for {name!r} has shape {tuple(term.shape)}, but the "
                                     f"parameter of {self.wb.name} has shape {tuple(param.shape)}{hint}.")
            if not param.is_floating_point():
                raise InputError(f"The parameter {name!r} is not floating point; it cannot be edited.")
            targets.append((name, param, terms))
        return targets

    def _undo(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        with torch.no_grad():
            for param, saved in self._saved:
                param.copy_(saved)
        self._saved = []
        self.active = False


def _computed_for(edit: Edit) -> str | None:
    model = edit.meta.get("model")
    return model.get("name") if isinstance(model, dict) else None


class _PatchPlan:
    """The hooks of an edit's activation patches on one model (validated on construction)."""

    def __init__(self, patches: Sequence[ActivationPatch], wb: Any):
        self.wb, self.patches = wb, list(patches)
        self.group_of: list[int] = []
        self.state = _TokenState()
        if not self.patches:
            return
        n_layers = int(wb.n_layers)
        group_by_key: dict[Any, int] = {}
        groups: list[list[tuple[int, ...]]] = []
        for patch in self.patches:
            if patch.layer >= n_layers:
                raise InputError(f"This edit patches layer {patch.layer}, but {wb.name} has {n_layers} layers "
                                 f"(0-{n_layers - 1}).")
            d_ff = int(wb.arch.d_ff(wb.model, patch.layer))
            if patch.neurons.numel() and int(patch.neurons.max()) >= d_ff:
                raise InputError(f"This edit patches neuron {int(patch.neurons.max())} of layer {patch.layer}, but "
                                 f"{wb.name} has {d_ff} neurons per layer (0-{d_ff - 1}).")
            key = (tuple((k, tuple(v)) for k, v in patch.subjects.items()),
                   tuple((k, tuple(v)) for k, v in patch.contexts.items()), patch.match)
            if key not in group_by_key:
                variants = patch.token_variants(wb.tokenizer)
                if not variants:
                    raise InputError(f"The subjects {patch.subjects} have no tokens with this tokenizer.")
                group_by_key[key] = len(groups)
                groups.append(variants)
            self.group_of.append(group_by_key[key])
        self.matcher = SubjectMatcher(groups)

    def register(self) -> list[Any]:
        if not self.patches:
            return []
        model, arch = self.wb.model, self.wb.arch
        handles = []
        try:
            handles.append(arch.embedding(model).register_forward_pre_hook(self._read_token_ids, with_kwargs=True))
            handles.append(self.wb.base_model()[0].register_forward_hook(self._forget_token_ids, always_call=True))
            for i, patch in enumerate(self.patches):
                site = arch.site(model, patch.layer, "neuron")
                handles.append(site.register_forward_hook(self._patch_hook(i)))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _read_token_ids(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            self.state.clear()
            return None
        ids = ids if ids.ndim == 2 else ids.reshape(1, -1)
        self.state.shape, self.state.positions = tuple(ids.shape), self.matcher.positions(ids)
        return None

    def _forget_token_ids(self, *args: Any) -> None:
        self.state.clear()
        return None

    def _patch_hook(self, i: int) -> Callable:
        patch, group = self.patches[i], self.group_of[i]

        def add_delta(module: Any, args: tuple, output: Any) -> Any:
            if self.state.positions is None:
                raise InputError("This edit patches FFN activations where its subjects occur, so the model must "
                                 "be called with input_ids (not inputs_embeds alone).")
            hits = self.state.positions.get(group)
            if hits is None:
                return None
            if not isinstance(output, torch.Tensor) or tuple(output.shape[:-1]) != self.state.shape:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise NeuroglotError(f"The neurons of layer {patch.layer} have shape {shape}, which does not line "
                                     f"up with the token ids {self.state.shape}; the patch cannot be placed.")
            rows, cols = (t.to(output.device) for t in hits)
            neurons = patch.neurons.to(output.device)
            values = patch.delta.to(device=output.device, dtype=output.dtype).expand(rows.numel(), -1)
            return output.index_put((rows[:, None], cols[:, None], neurons[None, :]), values, accumulate=True)

        return add_delta


# ==================================================================== editors


def model_meta(wb: Any) -> dict[str, Any]:
    """Plain data naming the model an edit is computed for."""
    return {"spec": wb.spec, "name": wb.name, "family": wb.arch.family, "layers": int(wb.n_layers),
            "d_model": int(wb.d_model), "neurons_per_layer": int(wb.n_neurons),
            "dtype": str(wb.dtype).replace("torch.", "")}


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """Eval mode and no parameter gradients inside; every ``requires_grad`` flag and the training
    flag restored on exit, also on an exception (the editors' invariant)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


#: ``progress(fraction, message)``: how far an editor's compute is (0-1) and the step it is at.
EditProgress = Callable[[float, str], None]


def _no_progress(fraction: float, message: str) -> None:
    return None


class Editor(abc.ABC):
    """An editing method: ``Editor(hparams).compute(wb, requests, progress=None) -> Edit``.

    Subclasses set ``name`` (through :func:`register`) and ``hparams_class`` and
    implement :meth:`_compute`. :meth:`compute` validates the requests and the
    hyper-parameters in one place (scikit-learn style), then calls
    ``_compute`` under ``wb.lock`` and fills the edit's ``meta``. Without
    ``hparams`` the preset for the model is used (:meth:`HParams.preset`).
    A ``_compute`` that takes a ``progress`` keyword gets the caller's
    :data:`EditProgress` callback and calls it at each step (locating,
    optimising, inserting); for the others :meth:`compute` reports only the
    start and the end. An exception raised by the callback stops the compute
    (the model is left as it was).
    """

    name: ClassVar[str] = ""
    hparams_class: ClassVar[type[HParams]] = HParams

    def __init__(self, hparams: HParams | Mapping[str, Any] | None = None):
        if isinstance(hparams, Mapping):
            hparams = self.hparams_class.from_dict(hparams)
        if hparams is not None and not isinstance(hparams, self.hparams_class):
            raise InputError(f"{type(self).__name__} takes {self.hparams_class.__name__}, "
                             f"got {type(hparams).__name__}.")
        if hparams is not None:
            hparams.validate()
        self.hparams = hparams

    def hparams_for(self, wb: Any) -> HParams:
        """The hyper-parameters used on ``wb``: the given ones, else the model's preset."""
        return self.hparams if self.hparams is not None else self.hparams_class.preset(wb)

    def compute(self, wb: Any, requests: EditRequest | Sequence[EditRequest],
                progress: EditProgress | None = None) -> Edit:
        """Validate, then compute the edit of ``requests`` on ``wb``'s model.

        Invariant: the model at the end equals the model at the beginning.
        Editors never mutate the model themselves; they return an :class:`Edit`.
        Bad requests or hyper-parameters raise InputError before any work.
        ``progress(fraction, message)`` is called as the work goes (see the class).
        """
        report = progress or _no_progress
        checked = validate_requests(requests, wb)
        hparams = self.hparams_for(wb)
        hparams.validate(wb)
        report(0.0, "waiting for the model (another computation holds it)")
        with wb.lock:
            report(0.0, "computing")
            if "progress" in inspect.signature(self._compute).parameters:
                edit = self._compute(wb, checked, hparams, progress=report)
            else:
                edit = self._compute(wb, checked, hparams)
        report(1.0, "done")
        if not isinstance(edit, Edit):
            raise TypeError(f"{type(self).__name__}._compute returned {type(edit).__name__}, not an Edit.")
        edit.meta.update(
            method=self.name or type(self).__name__, hparams=hparams.to_dict(),
            requests=[r.to_dict() for r in checked], model=model_meta(wb),
            created=time.strftime("%Y-%m-%dT%H:%M:%S"), versions=_versions())
        return edit

    @abc.abstractmethod
    def _compute(self, wb: Any, requests: list[EditRequest], hparams: HParams) -> Edit:
        """The method itself, on validated requests and hyper-parameters. Leave the model as it was."""


def _versions() -> dict[str, str]:
    from analysis.neurons import versions

    return versions()


# ------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Editor]] = {}
#: Editor modules of this package, imported on first lookup so that they register themselves.
BUILTIN_EDITOR_MODULES = ("lu_lafns", "memla", "langedit", "mpn", "memit", "lora_ft", "in_context")


def register(name: str) -> Callable[[type[Editor]], type[Editor]]:
    """Class decorator: register an :class:`Editor` subclass under ``name`` (case-insensitive)."""
    key = str(name).strip().lower()
    if not key:
        raise ValueError("An editor needs a name.")

    def decorate(cls: type[Editor]) -> type[Editor]:
        if not (isinstance(cls, type) and issubclass(cls, Editor)):
            raise TypeError(f"@register({name!r}) needs an Editor subclass, got {cls!r}.")
        existing = _REGISTRY.get(key)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"Two editors named {key!r}: {existing.__qualname__} and {cls.__qualname__}.")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return decorate


def _import_builtin_editors() -> None:
    for module in BUILTIN_EDITOR_MODULES:
        full = f"{__package__ or 'editors'}.{module}"
        if importlib.util.find_spec(full) is not None:
            importlib.import_module(full)


def available_editors() -> list[str]:
    """Names of the registered editors, sorted."""
    _import_builtin_editors()
    return sorted(_REGISTRY)


def get_editor(name: str, hparams: HParams | Mapping[str, Any] | None = None) -> Editor:
    """An editor by name, with ``hparams`` (an HParams, a dict of field values, or None for the preset)."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        _import_builtin_editors()
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise InputError(f"Unknown editor {name!r}; known editors: {known}.")
    return _REGISTRY[key](hparams)
