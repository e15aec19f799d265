"""Multilingual sequential knowledge editing (papers/langedit.md §2-3): a stream of batches, one language each.

The model is edited batch after batch; batch ``t`` (``L_t`` of the paper) is
computed on the model that carries every earlier batch. What the key-value
methods that take part (MEMIT, AlphaEdit, LangEdit) need across batches is the
:class:`SequentialState`:

* per step: its language and requests, and per edited layer the low-rank
  factors ``(u, v)`` of the weight change ``ΔW_t`` that step made, the keys
  ``K_t`` (``[n_t, d_ff]``) and value residuals it inserted, the target values
  ``z`` of its facts, and the rank of the null space the method kept at that
  layer (``None`` for MEMIT, which projects nothing);
* per edited layer, the :class:`LayerMemory`: the key statistics ``K_0`` of the
  unedited model (``E[k kᵀ]`` over ``n_0`` tokens, :func:`editors.keyvalue.key_second_moments`),
  the running uncentred covariance ``K̃_t`` and its count ``n̄_t`` (langedit Eq. 4)
  and ``Σ_t K_t K_tᵀ`` of the edited keys (AlphaEdit's ``cache_c``).

The accumulated weight change is the list of steps' factors:
:meth:`SequentialState.edit` is an :class:`~editors.edit.Edit` with one term per
step and layer, applied in step order, so applying it (and reverting it,
bit-exactly) is what every other edit does. :meth:`~SequentialState.rollback`
drops the steps after ``t`` and rebuilds the memory from ``K_0`` and the kept
keys with the same float64 operations in the same order, so the weights and
covariances after a rollback are bit for bit those the stream had at step ``t``.
:meth:`~SequentialState.save` / :meth:`~SequentialState.load`: one folder,
``state.safetensors`` + ``state.json``, written atomically (``K_0`` is stored as
the float32 statistics it came from, so a loaded state needs no cache).

A method is a :class:`SequentialMethod` (registered with
:func:`register_sequential`): its hyper-parameters (a
:class:`~editors.keyvalue.KeyValueHParams` with ``layers``) and its per-layer
closed form :meth:`~SequentialMethod.layer_update`. :func:`sequential_step` does
the rest, the same for every method: contexts, the batch's target values
(:func:`editors.keyvalue.compute_targets`, batched), MEMIT's spread over the
layers (:func:`editors.keyvalue.spread_update`), and the memory update after the
step. MEMIT and AlphaEdit register theirs in :mod:`editors.memit`, LangEdit in
:mod:`editors.langedit`.
"""
from __future__ import annotations

import abc
import importlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from analysis.errors import InputError
from editors.base import frozen, model_meta
from editors.edit import Edit
from editors.keyvalue import (
    KeyValueHParams, compute_targets, fact_contexts, key_second_moments_of, param_name, spread_update)
from editors.requests import EditRequest, validate_requests

if TYPE_CHECKING:
    from analysis.model import Workbench

STATE_FORMAT = "neuroglot-sequential-state"
STATE_VERSION = 1
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"

StepProgress = Callable[[float, str], None]


# ================================================================== memory


@dataclass
class LayerMemory:
    """What one edited layer remembers of the stream (float64 on the model's device)."""

    k0: torch.Tensor            # 𝒦_0 = E[k kᵀ] of the unedited model's keys  [d_ff, d_ff]
    n0: int                     # the tokens behind k0
    cov: torch.Tensor           # K̃_t: the running uncentred covariance (langedit Eq. 4)
    count: int                  # n̄_t
    edited_kkt: torch.Tensor    # Σ_{s ≤ t} K_s K_sᵀ of the edited keys (AlphaEdit's cache_c)
    edited: int = 0             # Σ_{s ≤ t} n_s

    @classmethod
    def start(cls, k0: torch.Tensor, n0: int, device: Any) -> "LayerMemory":
        k0 = k0.to(device, torch.float64)
        return cls(k0, int(n0), k0.clone(), int(n0), torch.zeros_like(k0), 0)

    def add(self, keys: torch.Tensor) -> None:
        """Eq. 4 with the keys ``[n, d_ff]`` of one step: K̃ ← n̄/(n̄+n) K̃ + n/(n̄+n) 𝒦_t, 𝒦_t = KᵀK / n."""
        k = keys.to(self.cov.device, torch.float64)
        n = int(k.shape[0])
        if n == 0:
            return
        kkt = k.T @ k
        total = self.count + n
        self.cov = (self.count / total) * self.cov + (n / total) * (kkt / n)
        self.count = total
        self.edited_kkt = self.edited_kkt + kkt
        self.edited += n


# ================================================================== steps and the state


@dataclass
class StepRecord:
    """One step of the stream (see the module docstring)."""

    language: str
    case_ids: list[str]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]     # layer → (u, v) in the parameter's layout, float32
    keys: dict[int, torch.Tensor]                             # layer → K_t [n, d_ff] float64 (CPU)
    resid: dict[int, torch.Tensor]                            # layer → value residuals [n, d_model] float64 (CPU)
    z: torch.Tensor                                           # target values [n, d_model] float32 (CPU)
    nullspace: dict[int, int | None]                          # layer → dim of the kept null space
    meta: dict[str, Any] = field(default_factory=dict)        # seconds, notes, per-layer and per-fact records

    @property
    def n(self) -> int:
        return int(self.z.shape[0])


class SequentialState:
    """The state of one stream for one method on one model (module docstring)."""

    def __init__(self, method: str, hparams: Mapping[str, Any], model: Mapping[str, Any], layers: Sequence[int],
                 param_names: Mapping[int, str], k0: Mapping[int, torch.Tensor], n0: Mapping[int, int],
                 statistics: Mapping[str, Any] | None = None, device: Any = "cpu"):
        self.method = str(method)
        self.hparams = dict(hparams)
        self.model = dict(model)
        self.layers = [int(layer) for layer in layers]
        self.param_names = {int(k): str(v) for k, v in param_names.items()}
        self.k0 = {int(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in k0.items()}
        self.n0 = {int(k): int(v) for k, v in n0.items()}
        self.statistics = dict(statistics or {})
        self.device = torch.device(device)
        self.steps: list[StepRecord] = []
        self.memory: dict[int, LayerMemory] = {}
        self._rebuild_memory()

    # --- views -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.steps)

    @property
    def n_edits(self) -> int:
        return sum(s.n for s in self.steps)

    def edit(self, upto: int | None = None) -> Edit:
        """The weight change of steps ``1..upto`` (all by default) as an Edit: one term per step and layer."""
        upto = len(self.steps) if upto is None else self._check_step(upto)
        weights: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for step in self.steps[:upto]:
            for layer in self.layers:
                weights.setdefault(self.param_names[layer], []).append(step.factors[layer])
        meta = {"method": f"{self.method} (sequential)", "sequential": {
            "method": self.method, "steps": upto, "edits": sum(s.n for s in self.steps[:upto]),
            "languages": [s.language for s in self.steps[:upto]]}, "hparams": self.hparams, "model": self.model}
        return Edit(weights=weights, meta=meta)

    def nullspace_table(self) -> list[dict[str, Any]]:
        """One row per step and layer: the rank of the null space the method kept there."""
        return [{"step": t + 1, "language": s.language, "layer": layer, "nullspace_dim": s.nullspace.get(layer)}
                for t, s in enumerate(self.steps) for layer in self.layers]

    # --- changes -----------------------------------------------------------------
    def _check_step(self, step: Any) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= len(self.steps):
            raise InputError(f"Step must be a whole number from 0 to {len(self.steps)} (the steps this state "
                             f"holds), got {step!r}.")
        return step

    def append(self, step: StepRecord) -> None:
        """Add a computed step and update every layer's memory with its keys (Eq. 4)."""
        missing = [layer for layer in self.layers if layer not in step.factors or layer not in step.keys]
        if missing:
            raise InputError(f"A step must change every layer of the state; it lacks layer(s) {missing}.")
        self.steps.append(step)
        for layer in self.layers:
            self.memory[layer].add(step.keys[layer])

    def rollback(self, step: int) -> None:
        """Keep steps ``1..step`` only (0: none); the memory is rebuilt as it was after that step."""
        step = self._check_step(step)
        self.steps = self.steps[:step]
        self._rebuild_memory()

    def _rebuild_memory(self) -> None:
        self.memory = {layer: LayerMemory.start(self.k0[layer], self.n0[layer], self.device) for layer in self.layers}
        for record in self.steps:
            for layer in self.layers:
                self.memory[layer].add(record.keys[layer])

    def to(self, device: Any) -> "SequentialState":
        self.device = torch.device(device)
        self._rebuild_memory()
        return self

    # --- files -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the folder ``path`` (``state.safetensors`` + ``state.json``) atomically."""
        path = Path(path)
        if path.exists() and not (path / STATE_JSON).is_file():
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            else:
                raise InputError(f"{path} exists and is not a saved sequential state; choose another folder.")
        tensors: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            tensors[f"k0/{layer}"] = self.k0[layer]
        steps_json = []
        for t, s in enumerate(self.steps):
            for layer in self.layers:
                u, v = s.factors[layer]
                tensors[f"steps/{t}/{layer}/u"] = u.detach().to("cpu", torch.float32).contiguous()
                tensors[f"steps/{t}/{layer}/v"] = v.detach().to("cpu", torch.float32).contiguous()
                tensors[f"steps/{t}/{layer}/keys"] = s.keys[layer].detach().to("cpu", torch.float64).contiguous()
                tensors[f"steps/{t}/{layer}/resid"] = s.resid[layer].detach().to("cpu", torch.float64).contiguous()
            tensors[f"steps/{t}/z"] = s.z.detach().to("cpu", torch.float32).contiguous()
            steps_json.append({"language": s.language, "case_ids": s.case_ids,
                               "nullspace": {str(k): v for k, v in s.nullspace.items()}, "meta": s.meta})
        info = {"format": STATE_FORMAT, "version": STATE_VERSION, "method": self.method, "hparams": self.hparams,
                "model": self.model, "layers": self.layers,
                "param_names": {str(k): v for k, v in self.param_names.items()},
                "n0": {str(k): v for k, v in self.n0.items()}, "statistics": self.statistics, "steps": steps_json,
                "edits": self.n_edits, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{time.time_ns()}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(info, ensure_ascii=False, indent=1), encoding="utf-8")
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{time.time_ns()}"
                path.rename(old)
            tmp.rename(path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, device: Any = "cpu") -> "SequentialState":
        path = Path(path)
        if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
            raise InputError(f"{path} is not a saved sequential state (no {STATE_JSON} and {STATE_TENSORS}).")
        try:
            info = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
            tensors = load_file(str(path / STATE_TENSORS))
        except Exception as exc:  # noqa: BLE001 (a damaged file: say which)
            raise InputError(f"{path}: the saved sequential state cannot be read ({exc}).") from None
        if info.get("format") != STATE_FORMAT:
            raise InputError(f"{path} is not a saved sequential state (format {info.get('format')!r}).")
        if int(info.get("version", 0)) > STATE_VERSION:
            raise InputError(f"{path} was saved by a newer Neuroglot (state version {info['version']}).")
        layers = [int(x) for x in info["layers"]]
        try:
            state = cls(info["method"], info["hparams"], info["model"], layers,
                        {int(k): v for k, v in info["param_names"].items()},
                        {layer: tensors[f"k0/{layer}"] for layer in layers},
                        {int(k): v for k, v in info["n0"].items()}, info.get("statistics"), device=device)
            for t, s in enumerate(info["steps"]):
                state.append(StepRecord(
                    language=s["language"], case_ids=list(s["case_ids"]),
                    factors={layer: (tensors[f"steps/{t}/{layer}/u"], tensors[f"steps/{t}/{layer}/v"])
                             for layer in layers},
                    keys={layer: tensors[f"steps/{t}/{layer}/keys"] for layer in layers},
                    resid={layer: tensors[f"steps/{t}/{layer}/resid"] for layer in layers},
                    z=tensors[f"steps/{t}/z"],
                    nullspace={int(k): v for k, v in s["nullspace"].items()}, meta=s.get("meta", {})))
        except KeyError as exc:
            raise InputError(f"{path}: the saved sequential state is incomplete (missing {exc}).") from None
        return state


def check_state_for(state: SequentialState, wb: Workbench, method: str | None = None) -> None:
    """InputError unless ``state`` was made on a model shaped as ``wb`` (and by ``method``, when given)."""
    here = model_meta(wb)
    for key in ("layers", "d_model", "neurons_per_layer", "family"):
        if state.model.get(key) != here.get(key):
            raise InputError(f"This sequential state was made on {state.model.get('name')} ({key} "
                             f"{state.model.get(key)}), not on {here['name']} ({key} {here.get(key)}).")
    if method is not None and state.method != method:
        raise InputError(f"This sequential state belongs to {state.method}, not to {method}.")


# ================================================================== methods


class SequentialMethod(abc.ABC):
    """A key-value editing method applied batch after batch: its hyper-parameters and per-layer closed form."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    hparams_class: ClassVar[type[KeyValueHParams]] = KeyValueHParams

    def __init__(self, hparams: KeyValueHParams | Mapping[str, Any] | None = None):
        if isinstance(hparams, Mapping):
            hparams = self.hparams_class.from_dict(hparams)
        if hparams is not None and not isinstance(hparams, self.hparams_class):
            raise InputError(f"{self.name} takes {self.hparams_class.__name__}, got {type(hparams).__name__}.")
        if hparams is not None:
            hparams.validate()
        self.hparams = hparams

    def hparams_for(self, wb: Workbench) -> KeyValueHParams:
        hp = self.hparams if self.hparams is not None else self.hparams_class.preset(wb)
        hp.validate(wb)
        return hp

    @abc.abstractmethod
    def layer_update(self, layer: int, memory: LayerMemory, keys: torch.Tensor, resid: torch.Tensor,
                     hp: KeyValueHParams, notes: list[str], info: dict[str, Any]
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], int | None]:
        """Factors ``(u, v)`` of ``ΔW_t = u v`` for keys ``K_t`` ``[d_ff, n]`` and residuals ``R_t``
        ``[d_model, n]`` (float64) given the layer's memory *before* this step, and the null-space rank kept."""


_SEQUENTIAL: dict[str, type[SequentialMethod]] = {}
#: Modules that register sequential methods, imported on first lookup.
SEQUENTIAL_MODULES = ("memit", "langedit")


def register_sequential(name: str) -> Callable[[type[SequentialMethod]], type[SequentialMethod]]:
    key = str(name).strip().lower()

    def decorate(cls: type[SequentialMethod]) -> type[SequentialMethod]:
        if not (isinstance(cls, type) and issubclass(cls, SequentialMethod)):
            raise TypeError(f"@register_sequential({name!r}) needs a SequentialMethod subclass, got {cls!r}.")
        existing = _SEQUENTIAL.get(key)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"Two sequential methods named {key!r}.")
        cls.name = key
        _SEQUENTIAL[key] = cls
        return cls
    return decorate


def _import_modules() -> None:
    for module in SEQUENTIAL_MODULES:
        importlib.import_module(f"{__package__ or 'editors'}.{module}")


def available_sequential() -> list[str]:
    """Names of the methods that can edit a stream."""
    _import_modules()
    return sorted(_SEQUENTIAL)


def get_sequential(name: str, hparams: KeyValueHParams | Mapping[str, Any] | None = None) -> SequentialMethod:
    key = str(name).strip().lower()
    if key not in _SEQUENTIAL:
        _import_modules()
    if key not in _SEQUENTIAL:
        raise InputError(f"Unknown sequential editing method {name!r}; known: {', '.join(available_sequential())}.")
    return _SEQUENTIAL[key](hparams)


# ================================================================== the engine


def new_state(wb: Workbench, method: SequentialMethod, languages: Sequence[str],
              progress: Callable[[int, int], None] | None = None) -> SequentialState:
    """An empty state for ``method`` on ``wb``: ``K_0`` of every edited layer over ``languages``'s text."""
    hp = method.hparams_for(wb)
    layers = sorted(hp.layer_indices(wb))
    moments, meta = key_second_moments_of(wb, layers, list(languages), hp, progress=progress)
    tokens = {layer: int(meta["tokens"][str(layer)]) for layer in layers}
    return SequentialState(method.name, hp.to_dict(), model_meta(wb), layers,
                           {layer: param_name(wb, layer) for layer in layers},
                           {layer: moments[layer].float() for layer in layers}, tokens,
                           statistics={k: v for k, v in meta.items() if k != "folder"}, device=wb.device)


def sequential_step(wb: Workbench, method: SequentialMethod, state: SequentialState,
                    requests: Sequence[EditRequest], progress: StepProgress | None = None,
                    one_language: bool = True) -> StepRecord:
    """Edit one batch on the model that carries ``state``; returns the step (``state.append`` it to keep it).

    All requests of a batch are in one language (the paper's ``L_t``; ``one_language=False`` lets a single
    edit of several languages through, as the Edit lab's LangEdit does); every language of a request is one
    (key, value) pair. The model is left as it was.
    """
    report = progress or (lambda fraction, message: None)
    checked = validate_requests(list(requests), wb)
    languages = sorted({lang for r in checked for lang in r.languages})
    if one_language and len(languages) != 1:
        raise InputError(f"A step of a sequential stream edits one language; this batch has {', '.join(languages)}.")
    check_state_for(wb=wb, state=state, method=method.name)
    hp = method.hparams_for(wb)
    if sorted(hp.layer_indices(wb)) != state.layers:
        raise InputError(f"The state edits layers {state.layers}; the hyper-parameters name "
                         f"{sorted(hp.layer_indices(wb))}.")
    started = time.perf_counter()
    notes: list[str] = []
    nullspace: dict[int, int | None] = {}
    with state.edit().applied(wb), frozen(wb.model):
        report(0.0, f"contexts of {len(checked)} request(s)")
        facts = fact_contexts(wb, checked, hp)
        t0 = time.perf_counter()
        z_layer = state.layers[-1]
        targets = compute_targets(wb, facts, z_layer, "layer", hp,
                                  progress=lambda f, m: report(0.8 * f, f"target values (layer {z_layer}): {m}"))
        t_targets = time.perf_counter() - t0
        report(0.8, f"inserting {len(facts)} pair(s) into layers {', '.join(map(str, state.layers))}")
        t0 = time.perf_counter()

        def update(layer: int, keys: torch.Tensor, resid: torch.Tensor, info: dict[str, Any]):
            (u, v), dim = method.layer_update(layer, state.memory[layer], keys, resid, hp, notes, info)
            nullspace[layer] = dim
            info["nullspace_dim"] = dim
            return u, v

        spread = spread_update(wb, state.layers, facts, targets, update)
        t_insert = time.perf_counter() - t0
    factors = {layer: spread.weights[state.param_names[layer]] for layer in state.layers}
    meta = {"seconds": {"targets": round(t_targets, 3), "insert": round(t_insert, 3),
                        "total": round(time.perf_counter() - started, 3)},
            "notes": notes, "layers": spread.layer_meta, "facts": [t.record for t in targets],
            "requests": [r.to_dict() for r in checked]}
    report(1.0, "done")
    return StepRecord(language="+".join(languages), case_ids=[r.case_id for r in checked], factors=factors,
                      keys={layer: spread.keys[layer] for layer in state.layers},
                      resid={layer: spread.resid[layer] for layer in state.layers},
                      z=torch.stack([t.target for t in targets]).cpu(), nullspace=nullspace, meta=meta)


__all__ = ["LayerMemory", "SequentialMethod", "SequentialState", "StepRecord", "available_sequential",
           "check_state_for", "get_sequential", "new_state", "register_sequential", "sequential_step"]
