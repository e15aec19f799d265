"""Applying an edit and restoring the model bit-exactly (Design Decision 3).

Editors compute; this module applies. ``with edit.applied(wb):`` creates an
:class:`AppliedEdit`, the only code that ever changes a model's parameters or
hooks, and undoes everything it did on the way out.

Weights
    * Entering holds ``wb.lock`` (an ``RLock``), keeps a bit-exact copy of every
      parameter the edit touches (only those), adds the deltas in place and
      registers the patch hooks; on exit, also on an exception, it copies the
      saved values back and removes the hooks.
    * A delta is added to its parameter in place: ``p.add_(delta)``, computed in
      the wider of the two dtypes and rounded once to the parameter's dtype.
    * Applications stack: ``with e1.applied(wb), e2.applied(wb):`` adds e1's
      deltas, then e2's, and unwinds in reverse. Leaving an application also ends
      every application entered after it on the same model (a manual
      ``revert()`` out of order still leaves the model exactly as before).
    * The same Edit object cannot be applied to one model twice at a time
      (:class:`~analysis.errors.InputError`): that is almost always a mistake;
      ``edit + edit`` applies its change twice on purpose.
    * A mismatching model (unknown parameter, other shape, layer or neuron out of
      range, subjects without tokens) is an InputError before anything changes.

Activation patches (lu-lafns Eq. 11)
    A patch adds ``delta`` to the FFN neurons ``neurons`` of ``layer`` (the
    ``"neuron"`` site: ``act_fn(h W1)``, lu-lafns Eq. 2-3) at the last token of
    every occurrence of one of its subjects in the model's input, and nowhere
    else (which token sequences count as an occurrence: :mod:`editors.subjects`).

    * A forward pre-hook on the token-embedding module reads the ``input_ids``
      of every forward call and finds every occurrence of every token variant
      of the subjects (:class:`~editors.subjects.SubjectMatcher`); the neuron
      hooks add ``delta`` (cast to the activation's dtype) at the last token of
      each occurrence only. Rows and positions without an occurrence are left
      untouched, so padded batches (left or right padding) and rows without a
      subject compute exactly what the unedited model computes.
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
    * ``match="fuzzy"`` patches also the last token of every span of the
      ids' decoded text that matches a subject fuzzily
      (:class:`~editors.subjects.FuzzySubjectMatcher`), besides the exact
      occurrences; the same positions are never patched twice.

Added neurons (mpn Eq. 7-8: Transformer-Patcher and MPN patch neurons)
    An :class:`~editors.edit.AddedNeurons` of layer ``L`` adds ``σ(q K_p^T + b_p) V_p`` to the FFN output
    of ``L`` at every token, ``q`` being the FFN input (the input of the layer's first projection, read by
    a forward pre-hook) and ``σ`` the layer's own activation function (its module's ``forward``, called
    directly so that hooks on the neuron site, e.g. a trace, never see the added neurons' activations mixed
    with the layer's own). It changes no parameter; leaving the application removes the hooks, so the model
    is bit-exactly as before. Each AddedNeurons is its own hook, in order, so a composition adds exactly
    what nested applications add. A neuron that is silent (``σ(...) = 0``) adds exactly zero: outputs are
    bit-identical to the unedited model's. :func:`added_neuron_activations` reads the activations.

Prompt contexts (in-context edits: IKE, ReMaKE)
    A :class:`~editors.edit.PromptContext` changes no parameter and registers no
    hook: while its edit is applied, :func:`in_context_prompts` (called by
    :mod:`editors.answers` for every prompt it answers or scores) rewrites each
    prompt as :func:`editors.prompting.rewrite_prompts` says, with the contexts
    of every application in force on the model, oldest first. Forward passes
    that do not go through :mod:`editors.answers` (tracing, attribution, an
    editor's own training) read the prompts they are given.

Threads
    ``wb.lock`` is held from entering an application to leaving it, so other
    sessions wait and never see the edit (Design Decision 4); the thread that
    applied an edit is the one that reverts it.
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from analysis.errors import InputError, NeuroglotError
from analysis.hooks import Hooks
from editors.edit import ActivationPatch, AddedNeurons, Edit, PromptContext, WeightDelta
from editors.prompting import Rewritten, rewrite_prompts
from editors.subjects import FuzzySubjectMatcher, SubjectMatcher

if TYPE_CHECKING:
    from analysis.model import Workbench

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

    def __init__(self, edit: Edit, wb: Workbench):
        if not isinstance(edit, Edit):
            raise InputError(f"Expected an Edit, got {type(edit).__name__}.")
        self.edit, self.wb = edit, wb
        self.model: torch.nn.Module = wb.model
        self.active = False
        self._holds_lock = False
        self._entered = False
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._hooks = Hooks()

    def __enter__(self) -> Workbench:
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
        self._check_contexts()
        plan = _PatchPlan(self.edit.patches, self.wb)
        neuron_plan = _NeuronPlan(self.edit.neurons, self.wb)
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
                self._hooks = plan.register()
                self._hooks.extend(neuron_plan.register())
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

    def _check_contexts(self) -> None:
        for context in self.edit.contexts:
            if not context.retrieve:
                continue
            if context.layer >= int(self.wb.n_layers):
                raise InputError(f"This edit retrieves with layer {context.layer}, but {self.wb.name} has "
                                 f"{self.wb.n_layers} layers (0-{int(self.wb.n_layers) - 1}).")
            if int(context.keys.shape[1]) != int(self.wb.d_model):
                raise InputError(f"This edit's retrieval keys are {int(context.keys.shape[1])} wide, but "
                                 f"{self.wb.name} has d_model {self.wb.d_model}: it was computed for another model.")

    def _undo(self) -> None:
        self._hooks.remove()
        with torch.no_grad():
            for param, saved in self._saved:
                param.copy_(saved)
        self._saved = []
        self.active = False


def active_edits(wb: Workbench) -> list[Edit]:
    """The edits applied to ``wb``'s model now, oldest first."""
    with _ACTIVE_LOCK:
        return [application.edit for application in _ACTIVE.get(wb.model, [])]


def active_contexts(wb: Workbench) -> list[PromptContext]:
    """The prompt contexts of every edit applied to ``wb``'s model now, oldest first."""
    with _ACTIVE_LOCK:
        stack = list(_ACTIVE.get(wb.model, []))
    return [c for application in stack for c in application.edit.contexts]


def in_context_prompts(wb: Workbench, prompts: Sequence[str]) -> list[Rewritten]:
    """``prompts`` as the model reads them under the in-context edits applied now (unchanged without any)."""
    contexts = active_contexts(wb)
    if not contexts:
        return [Rewritten(p, p, []) for p in prompts]
    with wb.lock:
        return rewrite_prompts(wb, contexts, prompts)


def _computed_for(edit: Edit) -> str | None:
    model = edit.meta.get("model")
    return model.get("name") if isinstance(model, dict) else None


class _PatchPlan:
    """The hooks of an edit's activation patches on one model (validated on construction).

    lu-lafns Eq. 11: the patched model is used where a subject of S_G occurs, the unedited one elsewhere.
    """

    def __init__(self, patches: Sequence[ActivationPatch], wb: Workbench):
        self.wb, self.patches = wb, list(patches)
        self.group_of: list[int] = []
        self.state = _TokenState()
        self.fuzzy_matcher: FuzzySubjectMatcher | None = None
        if not self.patches:
            return
        n_layers = int(wb.n_layers)
        group_by_key: dict[Any, int] = {}
        groups: list[list[tuple[int, ...]]] = []
        fuzzy_groups: dict[int, tuple[list[str], float]] = {}
        for patch in self.patches:
            if patch.layer >= n_layers:
                raise InputError(f"This edit patches layer {patch.layer}, but {wb.name} has {n_layers} layers "
                                 f"(0-{n_layers - 1}).")
            d_ff = int(wb.arch.d_ff(wb.model, patch.layer))
            if patch.neurons.numel() and int(patch.neurons.max()) >= d_ff:
                raise InputError(f"This edit patches neuron {int(patch.neurons.max())} of layer {patch.layer}, but "
                                 f"{wb.name} has {d_ff} neurons per layer (0-{d_ff - 1}).")
            key = (tuple((k, tuple(v)) for k, v in patch.subjects.items()),
                   tuple((k, tuple(v)) for k, v in patch.contexts.items()), patch.match,
                   patch.match_threshold if patch.match == "fuzzy" else None)
            if key not in group_by_key:
                variants = patch.token_variants(wb.tokenizer)
                if not variants:
                    raise InputError(f"The subjects {patch.subjects} have no tokens with this tokenizer.")
                group_by_key[key] = len(groups)
                if patch.match == "fuzzy":
                    fuzzy_groups[len(groups)] = ([s for texts in patch.subjects.values() for s in texts],
                                                 patch.match_threshold)
                groups.append(variants)
            self.group_of.append(group_by_key[key])
        self.matcher = SubjectMatcher(groups)
        self.fuzzy_matcher = FuzzySubjectMatcher(wb.tokenizer, fuzzy_groups) if fuzzy_groups else None

    def register(self) -> Hooks:
        """The patches' hooks, registered (all or none); ``.remove()`` takes them off."""
        hooks = Hooks()
        if not self.patches:
            return hooks
        model, arch = self.wb.model, self.wb.arch
        try:
            hooks.pre(arch.embedding(model), self._read_token_ids, with_kwargs=True)
            hooks.forward(self.wb.base_model()[0], self._forget_token_ids, always_call=True)
            for i, patch in enumerate(self.patches):
                hooks.forward(arch.site(model, patch.layer, "neuron"), self._patch_hook(i))
        except BaseException:
            hooks.remove()
            raise
        return hooks

    def _read_token_ids(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            self.state.clear()
            return None
        ids = ids if ids.ndim == 2 else ids.reshape(1, -1)
        self.state.shape, self.state.positions = tuple(ids.shape), self._positions(ids)
        return None

    def _positions(self, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The exact matcher's positions, with the fuzzy matcher's added (each position once, sorted)."""
        positions = self.matcher.positions(ids)
        if self.fuzzy_matcher is None:
            return positions
        width = int(ids.shape[1])
        for group, (rows, cols) in self.fuzzy_matcher.positions(ids).items():
            if group in positions:
                keys = torch.cat([positions[group][0] * width + positions[group][1], rows * width + cols]).unique()
                rows, cols = keys // width, keys % width
            positions[group] = (rows, cols)
        return positions

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


# ================================================================= added neurons (mpn Eq. 7-8)


def activation_function(wb: Workbench, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """σ of ``layer``'s FFN: the neuron-site module's own ``forward`` (no hooks run)."""
    module = wb.arch.site(wb.model, layer, "neuron")
    return module.forward


def added_activation(act: Callable[[torch.Tensor], torch.Tensor], q: torch.Tensor, keys: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """``a_p = σ(q · k_p + b_p)`` for every added neuron (mpn Eq. 7): ``q`` [..., d_model] -> [..., n]."""
    return act(q @ keys.to(q.dtype).T + bias.to(q.dtype))


def added_output(a: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``Σ_p a_p v_p``, what the added neurons add to the FFN output (mpn Eq. 8): [..., n] -> [..., d_model]."""
    return a @ values.to(a.dtype)


def add_to_output(output: Any, extra: torch.Tensor) -> Any:
    """``extra`` added to a module's output (a tensor, or the first tensor of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output + extra
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] + extra,) + tuple(output[1:])
    raise NeuroglotError(f"The FFN output is a {type(output).__name__}; added neurons cannot be placed.")


class _NeuronPlan:
    """The hooks of an edit's added neurons on one model (validated on construction)."""

    def __init__(self, neurons: Sequence[AddedNeurons], wb: Workbench):
        self.wb, self.neurons = wb, list(neurons)
        self.inputs: dict[int, torch.Tensor | None] = {}
        n_layers, d_model = int(wb.n_layers), int(wb.d_model)
        for added in self.neurons:
            if added.layer >= n_layers:
                raise InputError(f"This edit adds neurons to layer {added.layer}, but {wb.name} has {n_layers} "
                                 f"layers (0-{n_layers - 1}).")
            if added.d_model != d_model:
                raise InputError(f"This edit's added neurons are {added.d_model} wide, but {wb.name} has d_model "
                                 f"{d_model}: they were computed for another model.")

    def register(self) -> Hooks:
        hooks = Hooks()
        if not self.neurons:
            return hooks
        model, arch = self.wb.model, self.wb.arch
        try:
            for layer in dict.fromkeys(a.layer for a in self.neurons):
                hooks.pre(arch.site(model, layer, "first_proj"), self._reader(layer))
            for added in self.neurons:
                hooks.forward(arch.ffn_output_module(model, added.layer), self._adder(added))
        except BaseException:
            hooks.remove()
            raise
        return hooks

    def _reader(self, layer: int) -> Callable:
        def read(module: Any, args: tuple) -> None:
            self.inputs[layer] = args[0] if args and isinstance(args[0], torch.Tensor) else None
            return None

        return read

    def _adder(self, added: AddedNeurons) -> Callable:
        act = activation_function(self.wb, added.layer)

        def add(module: Any, args: tuple, output: Any) -> Any:
            q = self.inputs.get(added.layer)
            if q is None:
                raise NeuroglotError(f"The FFN input of layer {added.layer} was not seen; the added neurons "
                                     "cannot be placed.")
            a = added_activation(act, q, added.keys.to(q.device), added.bias.to(q.device))
            return add_to_output(output, added_output(a, added.values.to(q.device)))

        return add


@torch.no_grad()
def ffn_inputs(wb: Workbench, layer: int, prompts: Sequence[str], batch_size: int = 16
               ) -> list[torch.Tensor]:
    """The FFN input ``q`` of ``layer`` at every token of each prompt ([tokens, d_model] each, float32),
    read on the model as it is now (with the BOS token where the tokenizer adds one)."""
    from analysis.tokens import pad_sequences

    tok = wb.tokenizer
    out: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}
    module = wb.arch.site(wb.model, layer, "first_proj")

    def read(mod: Any, args: tuple) -> None:
        seen["q"] = args[0].detach()
        return None

    with wb.lock, Hooks().pre(module, read):
        for start in range(0, len(prompts), batch_size):
            seqs = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts[start:start + batch_size]]
            ids, mask = pad_sequences(seqs, tok.pad_token_id, device=wb.device)
            wb.base_model()[0](**wb.forward_inputs(ids, mask))
            for row, seq in enumerate(seqs):
                out.append(seen["q"][row, :len(seq)].float().cpu())
    return out


def added_neuron_activations(wb: Workbench, added: AddedNeurons, prompts: Sequence[str]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each added neuron's activation ``a_p`` (mpn Eq. 7) on each prompt, read in one pass: at its last token
    and the largest over its tokens (both [prompts, n]). Read with earlier edits as they are applied now."""
    act = activation_function(wb, added.layer)
    last, peak = [], []
    for q in ffn_inputs(wb, added.layer, prompts):
        with torch.no_grad():
            a = added_activation(act, q.to(wb.device), added.keys.to(wb.device).float(),
                                 added.bias.to(wb.device).float()).float().cpu()
        last.append(a[-1])
        peak.append(a.max(dim=0).values)
    empty = torch.zeros(0, added.n)
    return (torch.stack(last), torch.stack(peak)) if last else (empty, empty.clone())
