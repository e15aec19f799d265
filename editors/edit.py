"""Edits: what an editor computes (weight deltas, activation patches), composed, saved and loaded.

Design Decision 3: *editors compute; the infrastructure applies.* An :class:`Edit`
holds weight deltas (:class:`WeightDelta`: full tensors, or low-rank factors
``(u, v)`` with ``delta = u @ v``), activation patches
(:class:`ActivationPatch`, the LU-LAFNs cache of lu-lafns Eq. 11) and/or
prompt contexts (:class:`PromptContext`: in-context edits, which change what the
model is told before a question and no weight; :mod:`editors.prompting`) and/or
added FFN neurons (:class:`AddedNeurons`: Transformer-Patcher / MPN patch
neurons, mpn Eq. 7-8, which add ``a_p * v_p`` to a layer's FFN output).
Only :meth:`Edit.applied` ever changes a model (:mod:`editors.apply`).

* ``Edit.compose(e1, e2)`` (or ``e1 + e2``) keeps, per parameter, the list of
  terms in order and the union (concatenation) of the patches and added neurons, so applying the
  composition is bit-identical to applying e1 and then e2 (nested). The total
  change of a parameter is :meth:`Edit.delta`. Low-rank terms stay low-rank.
* Deltas are in the parameter's own layout (GPT-2's ``Conv1D`` weights are
  ``[in, out]``; see ``ArchAdapter.down_orientation``).
* ``save(folder)`` writes ``edit.safetensors`` (all tensors) and ``edit.json``
  (everything else, with the SHA-256 of the tensor file) into a temporary
  folder swapped into place crash-safely (:func:`analysis.runs.replace_folder`);
  :meth:`Edit.load` checks the pair.
* Which tokens a patch changes: :mod:`editors.subjects`.
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from analysis import runs
from analysis.errors import InputError, NeuroglotError
from editors.hparams import json_default, plain
from editors.requests import EditRequest, language_code
from editors.subjects import DEFAULT_MATCH_THRESHOLD, check_match, check_match_threshold, subject_token_variants

if TYPE_CHECKING:
    from analysis.model import Workbench
    from editors.apply import AppliedEdit

EDIT_FORMAT = "neuroglot-edit"
EDIT_FORMAT_VERSION = 1
TENSOR_FILE = "edit.safetensors"
JSON_FILE = "edit.json"


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

    The cache entry ``{S_G: ΔV_{D_G}}`` of lu-lafns Eq. 11, applied by :mod:`editors.apply`.

    ``subjects`` is the aligned multilingual subject set S_G, ``{language:
    [subject, ...]}``; ``contexts`` (same keys) are texts containing the
    subjects, used only to collect how the tokenizer writes them in context;
    ``match`` is ``"exact"``, ``"normalized"`` or ``"fuzzy"`` (see :mod:`editors.subjects`);
    ``match_threshold`` (0-100) is the rapidfuzz score from which ``"fuzzy"`` counts a span of the
    input as an occurrence (the other modes ignore it). Build one from requests with :meth:`for_requests`.
    """

    layer: int
    neurons: torch.Tensor
    delta: torch.Tensor
    subjects: dict[str, list[str]]
    match: str = "exact"
    contexts: dict[str, list[str]] = field(default_factory=dict)
    match_threshold: float = DEFAULT_MATCH_THRESHOLD

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
        check_match(self.match)
        self.match_threshold = check_match_threshold(self.match_threshold)
        self.subjects = _texts_by_language(self.subjects, "subjects")
        if not any(self.subjects.values()):
            raise InputError("A patch needs at least one subject: it is used only where a subject occurs.")
        self.contexts = _texts_by_language(self.contexts or {}, "contexts")

    @classmethod
    def for_requests(cls, layer: int, neurons: Any, delta: Any, requests: EditRequest | Sequence[EditRequest],
                     match: str = "exact", match_threshold: float = DEFAULT_MATCH_THRESHOLD) -> "ActivationPatch":
        """A patch keyed by the subjects of ``requests`` (S_G), with their prompts as contexts."""
        if isinstance(requests, EditRequest):
            requests = [requests]
        subjects: dict[str, list[str]] = {}
        contexts: dict[str, list[str]] = {}
        for request in requests:
            for lang, fact in request.facts.items():
                subjects.setdefault(lang, []).append(fact.subject)
                contexts.setdefault(lang, []).extend(fact.contexts())
        return cls(layer, neurons, delta, subjects, match, contexts, match_threshold)

    def token_variants(self, tokenizer: Any) -> list[tuple[int, ...]]:
        """The token-id sequences whose last token this patch changes (:mod:`editors.subjects`); with
        ``match="fuzzy"`` the exact ones, to which the fuzzy spans of the text are added when applied."""
        subjects = [s for texts in self.subjects.values() for s in texts]
        contexts = [c for texts in self.contexts.values() for c in texts]
        return subject_token_variants(tokenizer, subjects, contexts, self.match)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "subjects": self.subjects, "contexts": self.contexts, "match": self.match,
                "match_threshold": self.match_threshold, "n_neurons": int(self.neurons.numel())}


@dataclass(eq=False)
class PromptContext:
    """What an in-context edit tells the model before each prompt (IKE, ReMaKE; :mod:`editors.prompting`).

    It changes no weight: while the edit is applied, :mod:`editors.answers` reads every prompt as
    :func:`editors.prompting.rewrite_prompts` writes it. ``facts`` are the new facts, each
    ``{"language", "prompt", "answer"}``; ``demonstrations`` are IKE demonstration blocks (text).
    ``retrieve=False`` (IKE) puts every fact before every prompt. ``retrieve=True`` (ReMaKE) makes
    ``facts`` an edit memory: a prompt gets only the fact whose key is most similar to it, when that
    cosine similarity reaches ``threshold``; ``keys`` [facts, d_model] are the facts' prompts embedded
    at ``layer`` and centred on ``center`` [d_model] (:func:`editors.prompting.embed`).
    """

    facts: list[dict[str, str]]
    demonstrations: list[str] = field(default_factory=list)
    retrieve: bool = False
    threshold: float = 0.0
    layer: int = 0
    keys: torch.Tensor | None = None
    center: torch.Tensor | None = None

    def __post_init__(self) -> None:
        from editors.prompting import check_threshold

        facts = []
        for fact in list(self.facts or []):
            if not isinstance(fact, Mapping) or not all(isinstance(fact.get(k), str) and fact.get(k).strip()
                                                        for k in ("language", "prompt", "answer")):
                raise InputError("A prompt context's facts are {language, prompt, answer} objects of non-empty "
                                 f"texts, got {fact!r}.")
            facts.append({k: str(fact[k]) for k in ("language", "prompt", "answer")})
        if not facts:
            raise InputError("A prompt context needs at least one new fact.")
        self.facts = facts
        if any(not isinstance(d, str) or not d.strip() for d in self.demonstrations):
            raise InputError("A prompt context's demonstrations must be non-empty texts.")
        self.demonstrations = list(self.demonstrations)
        self.retrieve = bool(self.retrieve)
        self.threshold = check_threshold(self.threshold)
        try:
            self.layer = operator.index(self.layer)
        except TypeError:
            raise InputError(f"A prompt context's layer must be a whole number, got {self.layer!r}.") from None
        if self.retrieve:
            if self.keys is None or self.center is None:
                raise InputError("A retrieving prompt context needs the keys of its facts and their centre.")
            self.keys = torch.as_tensor(self.keys).detach().float()
            self.center = torch.as_tensor(self.center).detach().float()
            if self.keys.ndim != 2 or self.keys.shape[0] != len(facts) or self.center.shape != self.keys.shape[1:]:
                raise InputError(f"A prompt context needs one key per fact ({len(facts)}) and a centre of their "
                                 f"width; got keys {tuple(self.keys.shape)} and centre {tuple(self.center.shape)}.")

    def fact_texts(self) -> list[str]:
        """The new facts as statements (question and answer), in order."""
        from editors.prompting import fact_text

        return [fact_text(f["prompt"], f["answer"]) for f in self.facts]

    def to_json(self) -> dict[str, Any]:
        return {"facts": self.facts, "demonstrations": self.demonstrations, "retrieve": self.retrieve,
                "threshold": self.threshold, "layer": self.layer}


@dataclass(eq=False)
class AddedNeurons:
    """FFN neurons added to ``layer`` (Transformer-Patcher's patch neurons; papers/mpn.md Eq. 7-8).

    ``keys`` [n, d_model], ``bias`` [n] and ``values`` [n, d_model]: neuron ``j`` fires
    ``a_j = σ(q · keys[j] + bias[j])`` on the FFN input ``q`` (mpn Eq. 7, σ the layer's own activation
    function) and adds ``a_j * values[j]`` to the FFN output (mpn Eq. 8), at every token. In a gated FFN
    (``act(q W_gate) * (q W_up)``) the added neuron has the gate branch only: its activation is then the
    quantity the atlas reads for every other neuron (``act_fn(h W1)``, lu-lafns Eq. 2-3), and it can be
    silent (σ near 0 for a negative pre-activation), which the memory loss of Transformer-Patcher relies
    on; a bilinear up branch would let it fire with either sign. ``labels`` name each neuron (the edit it
    was trained for); :mod:`editors.apply` applies them.
    """

    layer: int
    keys: torch.Tensor
    bias: torch.Tensor
    values: torch.Tensor
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            self.layer = operator.index(self.layer)
        except TypeError:
            raise InputError(f"Added neurons need a whole layer number, got {self.layer!r}.") from None
        if self.layer < 0:
            raise InputError(f"Added neurons' layer must be 0 or more, got {self.layer}.")
        keys, bias, values = (torch.as_tensor(t).detach() for t in (self.keys, self.bias, self.values))
        if not (keys.is_floating_point() and bias.is_floating_point() and values.is_floating_point()):
            raise InputError("Added neurons' keys, bias and values must be floating point tensors.")
        if keys.ndim != 2 or values.ndim != 2 or bias.ndim != 1 or not (
                keys.shape[0] == bias.shape[0] == values.shape[0]) or keys.shape[1] != values.shape[1]:
            raise InputError(f"Added neurons need keys [n, d_model], bias [n] and values [n, d_model]; got "
                             f"{tuple(keys.shape)}, {tuple(bias.shape)} and {tuple(values.shape)}.")
        if keys.shape[0] == 0:
            raise InputError("Added neurons: at least one neuron.")
        self.keys, self.bias, self.values = keys, bias, values
        labels = [str(x) for x in (self.labels or [])]
        if labels and len(labels) != self.n:
            raise InputError(f"Added neurons: {self.n} neurons but {len(labels)} labels.")
        self.labels = labels or [f"patch {j}" for j in range(self.n)]

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.keys.shape[1])

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "n": self.n, "labels": self.labels}


def _texts_by_language(value: Any, what: str) -> dict[str, list[str]]:
    if not isinstance(value, Mapping):
        raise InputError(f"A patch's {what} must be a dict {{language: [text, ...]}}.")
    out: dict[str, list[str]] = {}
    for raw, texts in value.items():
        code = language_code(raw, f"A patch's {what}")
        if isinstance(texts, str):
            texts = [texts]
        bucket = out.setdefault(code, [])
        for text in list(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"A patch's {what} for {code!r} must be non-empty texts, got {text!r}.")
            if text not in bucket:
                bucket.append(text)
    return out


class Edit:
    """Weight deltas, activation patches, prompt contexts and/or added neurons computed by an editor;
    applied only inside :meth:`applied`.

    ``weights`` maps a parameter name (as ``model.named_parameters()`` /
    ``state_dict()`` spell it; tied names work) to a delta: a tensor of the
    parameter's shape, a pair ``(u, v)`` of low-rank factors, or a list of such
    terms added in order. ``patches`` are :class:`ActivationPatch` es (applied in
    order). ``neurons`` are :class:`AddedNeurons` (mpn Eq. 7-8). ``meta`` is plain data (method,
    hyper-parameters, requests, model, created, versions) filled by :meth:`Editor.compute`.
    """

    def __init__(self, weights: Mapping[str, Any] | None = None, patches: Iterable[ActivationPatch] = (),
                 meta: Mapping[str, Any] | None = None, contexts: Iterable[PromptContext] = (),
                 neurons: Iterable[AddedNeurons] = ()):
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
        self.contexts: list[PromptContext] = list(contexts)
        for context in self.contexts:
            if not isinstance(context, PromptContext):
                raise InputError(f"An edit's contexts must be PromptContext objects, got {type(context).__name__}.")
        self.neurons: list[AddedNeurons] = list(neurons)
        for added in self.neurons:
            if not isinstance(added, AddedNeurons):
                raise InputError(f"An edit's added neurons must be AddedNeurons objects, got {type(added).__name__}.")
        self.meta: dict[str, Any] = dict(meta or {})

    # --- views ------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return list(self.weights)

    @property
    def method(self) -> str:
        return str(self.meta.get("method", ""))

    def is_empty(self) -> bool:
        return not self.weights and not self.patches and not self.contexts and not self.neurons

    def added_neurons(self) -> dict[int, int]:
        """How many neurons this edit adds to each layer."""
        out: dict[int, int] = {}
        for added in self.neurons:
            out[added.layer] = out.get(added.layer, 0) + added.n
        return dict(sorted(out.items()))

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
            "prompt_contexts": len(self.contexts),
            "context_facts": sum(len(c.facts) for c in self.contexts),
            "added_neurons": sum(a.n for a in self.neurons),
            "added_neuron_layers": sorted({a.layer for a in self.neurons}),
            "stored_values": (sum(t.stored_values() for t in terms)
                              + sum(2 * int(p.neurons.numel()) for p in self.patches)
                              + sum(a.keys.numel() + a.bias.numel() + a.values.numel() for a in self.neurons)),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"Edit(method={s['method']!r}, parameters={s['parameters']} "
                f"({s['low_rank_deltas']} low-rank terms), patches={s['patches']}, "
                f"prompt_contexts={s['prompt_contexts']}, added_neurons={s['added_neurons']}, "
                f"stored_values={s['stored_values']})")

    # --- composition ------------------------------------------------------------
    @classmethod
    def compose(cls, *edits: "Edit") -> "Edit":
        """One edit that does what ``edits`` do one after the other.

        Per parameter the terms are kept in order (so applying the composition is
        bit-identical to nesting the applications); patches, prompt contexts and added neurons are concatenated.
        """
        weights: dict[str, list[WeightDelta]] = {}
        patches: list[ActivationPatch] = []
        contexts: list[PromptContext] = []
        neurons: list[AddedNeurons] = []
        for edit in edits:
            if not isinstance(edit, Edit):
                raise InputError(f"Only edits can be composed, got {type(edit).__name__}.")
            for name, terms in edit.weights.items():
                weights.setdefault(name, []).extend(terms)
            patches.extend(edit.patches)
            contexts.extend(edit.contexts)
            neurons.extend(edit.neurons)
        meta = {"method": "compose", "parts": [dict(e.meta) for e in edits]}
        return cls(weights, patches, meta, contexts, neurons)

    def __add__(self, other: "Edit") -> "Edit":
        if not isinstance(other, Edit):
            return NotImplemented
        return Edit.compose(self, other)

    # --- application -----------------------------------------------------------
    def applied(self, wb: Workbench) -> AppliedEdit:
        """Context manager: the model carries this edit inside the ``with`` block only (:mod:`editors.apply`).

        ``with edit.applied(wb): ...`` holds ``wb.lock``; on exit (also on an
        exception) every touched parameter is restored bit-exactly and the hooks
        are removed. A mismatching model (unknown parameter, other shape, layer
        or neuron out of range) is an InputError before anything is changed.
        ``with edit.applied(wb) as wb:`` gives the Workbench back.
        """
        from editors.apply import AppliedEdit

        return AppliedEdit(self, wb)

    def apply(self, wb: Workbench) -> AppliedEdit:
        """Apply now; call ``.revert()`` on the result (in the same thread) to undo. Prefer :meth:`applied`."""
        application = self.applied(wb)
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
            text = json.dumps(layout, indent=2, ensure_ascii=False, default=json_default)
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
        for i, context in enumerate(self.contexts):
            if context.retrieve:
                put(f"contexts/{i}/keys", context.keys)
                put(f"contexts/{i}/center", context.center)
        for i, added in enumerate(self.neurons):
            put(f"neurons/{i}/keys", added.keys)
            put(f"neurons/{i}/bias", added.bias)
            put(f"neurons/{i}/values", added.values)
        try:
            meta = plain(self.meta)
        except (TypeError, ValueError) as exc:
            raise InputError(f"The edit's meta must be plain data (JSON) to be saved: {exc}") from None
        layout = {"format": EDIT_FORMAT, "version": EDIT_FORMAT_VERSION, "weights": weights_layout,
                  "patches": [p.to_json() for p in self.patches],
                  "contexts": [c.to_json() for c in self.contexts],
                  "neurons": [a.to_json() for a in self.neurons], "meta": meta}
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
                                       p["subjects"], p["match"], p.get("contexts") or {},
                                       p.get("match_threshold", DEFAULT_MATCH_THRESHOLD))
                       for i, p in enumerate(layout["patches"])]
            contexts = [PromptContext(c["facts"], c.get("demonstrations") or [], c["retrieve"], c["threshold"],
                                      c["layer"], tensors.get(f"contexts/{i}/keys"), tensors.get(f"contexts/{i}/center"))
                        for i, c in enumerate(layout.get("contexts") or [])]
            neurons = [AddedNeurons(a["layer"], tensors[f"neurons/{i}/keys"], tensors[f"neurons/{i}/bias"],
                                    tensors[f"neurons/{i}/values"], a.get("labels") or [])
                       for i, a in enumerate(layout.get("neurons") or [])]
            return cls(weights, patches, layout.get("meta") or {}, contexts, neurons)
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
