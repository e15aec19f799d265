"""The one way to hook modules with plain PyTorch hooks.

Tracing that reads like the forward pass goes through nnsight
(:meth:`analysis.model.Workbench.tracer`). Where an intervention must be an
ordinary function of the forward — captum differentiating through it, one set of
hooks serving many forwards of a causal trace, an edit's patches living as long as
``edit.applied(wb)`` — modules are hooked with :class:`Hooks`::

    with Hooks() as hooks:
        hooks.forward(module, read)              # register_forward_hook
        hooks.pre(embedding, look, with_kwargs=True)   # register_forward_pre_hook
        model(**inputs)
    # every hook is removed here, also when registering or the forward raised

Hooks registered inside the ``with`` block are removed on the way out, whatever
happens. Outside a ``with`` block, :meth:`Hooks.remove` removes them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class Hooks:
    """Forward and forward-pre hooks registered together and removed together (a context manager)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def forward(self, module: torch.nn.Module, hook: Callable[..., Any], **options: Any) -> "Hooks":
        """``module.register_forward_hook(hook, **options)`` (``with_kwargs``, ``always_call``, ...)."""
        self.handles.append(module.register_forward_hook(hook, **options))
        return self

    def pre(self, module: torch.nn.Module, hook: Callable[..., Any], **options: Any) -> "Hooks":
        """``module.register_forward_pre_hook(hook, **options)`` (``with_kwargs``, ...)."""
        self.handles.append(module.register_forward_pre_hook(hook, **options))
        return self

    def extend(self, other: "Hooks") -> "Hooks":
        """Take over every hook of ``other`` (removed with these from now on)."""
        self.handles.extend(other.handles)
        other.handles = []
        return self

    def remove(self) -> None:
        """Remove every hook registered so far (latest first); safe to call twice."""
        while self.handles:
            self.handles.pop().remove()

    def __len__(self) -> int:
        return len(self.handles)

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
