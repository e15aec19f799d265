"""Knowledge editors (Design Decision 3): each computes an :class:`~editors.base.Edit`; none mutates the model.

The engine (requests, hyper-parameters, edits, the editor protocol and the registry)
is :mod:`editors.base`; the methods live in one module each and register themselves.
"""
from editors.base import (ActivationPatch, Edit, Editor, EditRequest, HParams, LanguageFact, available_editors,
                          get_editor, register)

__all__ = ["ActivationPatch", "Edit", "Editor", "EditRequest", "HParams", "LanguageFact", "available_editors",
           "get_editor", "register"]
