"""Knowledge editors (Design Decision 3): each computes an :class:`~editors.edit.Edit`; none mutates the model.

The engine, one job per module: :mod:`editors.requests` (what to edit),
:mod:`editors.hparams` (hyper-parameters, their bounds and presets),
:mod:`editors.edit` (what an editor returns; save / load), :mod:`editors.apply`
(applying and restoring bit-exactly), :mod:`editors.subjects` (which tokens an
activation patch changes) and :mod:`editors.base` (the Editor protocol and the
registry). The methods live in one module each and register themselves.
"""
from editors.base import Editor, available_editors, get_editor, register
from editors.edit import ActivationPatch, Edit, WeightDelta
from editors.hparams import HParams
from editors.requests import EditRequest, LanguageFact

__all__ = ["ActivationPatch", "Edit", "Editor", "EditRequest", "HParams", "LanguageFact", "WeightDelta",
           "available_editors", "get_editor", "register"]
