"""The Editor protocol and the registry of editing methods.

``Editor(hparams).compute(wb, requests, progress=None) -> Edit``, as
scikit-learn's estimators: every method has the same small API, and
:meth:`Editor.compute` validates the requests (:mod:`editors.requests`) and the
hyper-parameters (:mod:`editors.hparams`) in one place before calling the
method's ``_compute``. An editor leaves the model exactly as it found it
("Invariant: model at beginning of function == model at end of function", as in
ROME; :func:`frozen`) and returns an :class:`~editors.edit.Edit`; only
:meth:`Edit.applied <editors.edit.Edit.applied>` (:mod:`editors.apply`) ever
changes a model.

The registry maps a name to an Editor class (:func:`register`,
:func:`get_editor`, :func:`available_editors`); it lists only editors that
exist: the modules of :data:`BUILTIN_EDITOR_MODULES`, imported on first lookup,
and any class registered by the caller.
"""
from __future__ import annotations

import abc
import contextlib
import importlib
import inspect
import time
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch

from analysis.errors import InputError
from analysis.runs import versions
from editors.edit import Edit
from editors.hparams import HParams
from editors.requests import EditRequest, validate_requests

if TYPE_CHECKING:
    from analysis.model import Workbench


def model_meta(wb: Workbench) -> dict[str, Any]:
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
    #: False for editors that never read the subject (its presence in the prompt is then not checked).
    needs_subject: ClassVar[bool] = True

    def __init__(self, hparams: HParams | Mapping[str, Any] | None = None):
        if isinstance(hparams, Mapping):
            hparams = self.hparams_class.from_dict(hparams)
        if hparams is not None and not isinstance(hparams, self.hparams_class):
            raise InputError(f"{type(self).__name__} takes {self.hparams_class.__name__}, "
                             f"got {type(hparams).__name__}.")
        if hparams is not None:
            hparams.validate()
        self.hparams = hparams

    def hparams_for(self, wb: Workbench) -> HParams:
        """The hyper-parameters used on ``wb``: the given ones, else the model's preset."""
        return self.hparams if self.hparams is not None else self.hparams_class.preset(wb)

    def compute(self, wb: Workbench, requests: EditRequest | Sequence[EditRequest],
                progress: EditProgress | None = None) -> Edit:
        """Validate, then compute the edit of ``requests`` on ``wb``'s model.

        Invariant: the model at the end equals the model at the beginning.
        Editors never mutate the model themselves; they return an :class:`Edit`.
        Bad requests or hyper-parameters raise InputError before any work.
        ``progress(fraction, message)`` is called as the work goes (see the class).
        """
        report = progress or _no_progress
        checked = validate_requests(requests, wb, self.needs_subject)
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
            created=time.strftime("%Y-%m-%dT%H:%M:%S"), versions=versions())
        return edit

    @abc.abstractmethod
    def _compute(self, wb: Workbench, requests: list[EditRequest], hparams: HParams) -> Edit:
        """The method itself, on validated requests and hyper-parameters. Leave the model as it was."""


# ------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Editor]] = {}
#: Editor modules of this package (each exists), imported on first lookup so that they register themselves.
#: A new editor module is added here when it is written.
BUILTIN_EDITOR_MODULES = ("lu_lafns", "memit", "lora_ft", "memla", "in_context", "langedit", "mpn")


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
        importlib.import_module(f"{__package__ or 'editors'}.{module}")


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
