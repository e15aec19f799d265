"""What ROME, MEMIT and AlphaEdit (and every key-value editor after them) share.

The down-projection of an FFN read as a linear associative memory ``W k = v``
(DESIGN.md Decision 1; :mod:`editors.memit` has the papers' equations and our
deviations from them). This module holds the steps that do not depend on how
the new pairs are inserted, so that a further key-value editor (LangEdit's
null-space solve over a stream of batches) uses them without importing another
editor (tests/test_layering.py):

* :class:`KeyValueHParams`: the fields of the target and of the key statistics;
* contexts ``x_j + s`` per (request, language) (:func:`fact_contexts`);
* keys ``k*`` (rome Eq. 3, :func:`fact_keys`) and reads of any site at the last
  subject token (:func:`read_at_subject`);
* the target value (ROME's compute_v / MEMIT's compute_z, :func:`compute_target`; a batch of facts
  optimised at once, each on its own loss, :func:`compute_targets`);
* the key statistics ``C = E[k kᵀ]`` (:func:`key_second_moments`);
* the closed-form updates (rome Eq. 2, memit Eq. 14, alphaedit Eq. 8) and the
  null-space projection they use.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from analysis.arch import first_tensor, resolve
from analysis.errors import InputError
from analysis.hooks import Hooks
from analysis.stats import cached_key_statistics
from analysis.tokens import pad_sequences, subject_last_ids
from data.flores import statistics_texts
from editors.contexts import PrefixSpec, generate_prefixes, kl_prompt, prefixed
from editors.hparams import Constraint, HParams, Interval
from editors.requests import EditRequest
from editors.rows import TeacherForcedRows

if TYPE_CHECKING:
    from analysis.model import Workbench

# ============================================================ hyper-parameters


@dataclass
class KeyValueHParams(HParams):
    """Fields shared by ROME, MEMIT and AlphaEdit: the target (compute_v / compute_z) and the key statistics."""

    v_lr: float = 0.5                     # Adam learning rate on δ
    v_num_grad_steps: int = 25            # iterations (the last one only evaluates, as the code)
    v_weight_decay: float = 1e-3          # v_weight_decay * ||δ|| / ||v_0||^2
    clamp_norm_factor: float = 4.0        # ||δ|| <= factor * ||v_0|| (0: no clamp)
    kl_factor: float = 0.0625             # weight of KL on "{subject} is a"
    early_stop_loss: float = 5e-2         # stop when the total loss is below this (ROME/MEMIT code)
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[10, 5]])  # [[length, count]]
    empty_prefix: bool = True             # the bare prompt is a context too (the "{}" template)
    seed: int = 0                         # prefix sampling
    mom2_adjustment: bool = True          # use C = E[k kᵀ] (False: C = I; ROME only)
    mom2_n_tokens: int = 100_000          # tokens of key statistics
    mom2_source: str = "flores"           # "flores" (FLORES-200 in the request languages)

    BOUNDS: ClassVar[dict[str, Constraint]] = {
        "v_lr": Interval(Real, 0, None, closed="neither"),
        **dict.fromkeys(("v_weight_decay", "clamp_norm_factor", "kl_factor", "early_stop_loss"),
                        Interval(Real, 0, None, closed="left")),
        "v_num_grad_steps": Interval(Integral, 1, None, closed="left"),
        "mom2_n_tokens": Interval(Integral, 1, None, closed="left"),
        "seed": Interval(Integral, 0, None, closed="left"),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        params = self.context_template_length_params
        if isinstance(params, (list, tuple)):
            self.context_template_length_params = [list(p) if isinstance(p, (list, tuple)) else p for p in params]

    def validate(self, wb: Workbench | None = None) -> None:
        super().validate(wb)
        if not self.layers:
            raise InputError(f"{type(self).__name__} needs at least one layer to edit (layers=[...]).")
        params = self.context_template_length_params
        if not isinstance(params, list) or any(
                not isinstance(p, list) or len(p) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in p)
                or p[0] < 1 or p[1] < 0 for p in params):
            raise InputError("context_template_length_params must be a list of [length, count] pairs "
                             f"(length >= 1, count >= 0), got {params!r}.")
        if not self.empty_prefix and sum(p[1] for p in params) == 0:
            raise InputError("No context to optimise the target on: empty_prefix is False and "
                             "context_template_length_params asks for no prefix.")
        if not isinstance(self.mom2_source, str) or not self.mom2_source.strip():
            raise InputError(f"mom2_source must name the text of the key statistics ('flores'), "
                             f"got {self.mom2_source!r}.")


# ================================================================== contexts


@dataclass
class FactContexts:
    """One (request, language) pair to insert: its texts and where its subject ends."""

    case_id: str
    language: str
    prompt: str
    subject: str
    target_new: str
    contexts: list[str]        # x_j + s (the bare prompt first when empty_prefix)

    @property
    def label(self) -> str:
        return f"{self.case_id or 'request'}/{self.language}"


def context_prefixes(wb: Workbench, language: str, hp: KeyValueHParams) -> list[str]:
    """The model-generated prefixes of ``language`` for every ``[length, count]`` of the hparams."""
    out: list[str] = []
    for length, count in hp.context_template_length_params:
        out.extend(generate_prefixes(wb, language, PrefixSpec(int(count), int(length), int(hp.seed))))
    return out


def fact_contexts(wb: Workbench, requests: list[EditRequest], hp: KeyValueHParams) -> list[FactContexts]:
    """One :class:`FactContexts` per language of every request, in request then language order."""
    facts: list[FactContexts] = []
    for request in requests:
        for lang, fact in request.facts.items():
            contexts = ([fact.prompt] if hp.empty_prefix else []) + [
                prefixed(p, fact.prompt) for p in context_prefixes(wb, lang, hp)]
            facts.append(FactContexts(request.case_id, lang, fact.prompt, fact.subject, fact.target_new,
                                      list(dict.fromkeys(contexts))))
    return facts


# ================================================================== sites


def _with_output(output: Any, tensor: torch.Tensor) -> Any:
    """``output`` with its first tensor replaced (modules that return tuples)."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (_with_output(output[0], tensor),) + tuple(output[1:])
    if isinstance(output, list):
        return [_with_output(output[0], tensor)] + list(output[1:])
    raise TypeError(f"Cannot replace the tensor in a module output of type {type(output).__name__}.")


def read_at_subject(wb: Workbench, texts: list[str], subjects: list[str],
                    reads: list[tuple[int, str, str]]) -> dict[tuple[int, str, str], torch.Tensor]:
    """One forward over ``texts``: for each ``(layer, site, "input" | "output")`` the site's value at
    each text's last subject token, float32 ``[len(texts), dim]``."""
    seqs, cols = zip(*(subject_last_ids(wb.tokenizer, t, s) for t, s in zip(texts, subjects)))
    ids, mask = pad_sequences(list(seqs), wb.tokenizer.pad_token_id, device=wb.device)
    rows = torch.arange(len(seqs), device=wb.device)
    col = torch.tensor(cols, dtype=torch.long, device=wb.device)
    got: dict[tuple[int, str, str], torch.Tensor] = {}

    def reader(key: tuple[int, str, str]):
        def hook(module: Any, args: tuple, output: Any) -> None:
            value = args[0] if key[2] == "input" else first_tensor(output)
            got[key] = value[rows, col].detach().float()
        return hook

    base, _ = wb.base_model()
    with Hooks() as hooks, torch.no_grad():
        for key in dict.fromkeys(reads):
            hooks.forward(wb.arch.site(wb.model, key[0], key[1]), reader(key))
        base(**wb.forward_inputs(ids, mask))
    return got


def fact_keys(wb: Workbench, layer: int, facts: list[FactContexts]) -> torch.Tensor:
    """k* per fact (rome Eq. 3): mean over its contexts of the key at the last subject token, ``[n, d_ff]``."""
    keys, _ = _keys_and_reads(wb, layer, facts, [])
    return keys


def _keys_and_reads(wb: Workbench, layer: int, facts: list[FactContexts], bare_reads: list[tuple[int, str, str]]):
    """Keys of ``layer`` per fact, and ``bare_reads`` at each fact's bare prompt, in one forward."""
    texts, subjects, owner = [], [], []
    for i, fact in enumerate(facts):
        for ctx in fact.contexts:
            texts.append(ctx)
            subjects.append(fact.subject)
            owner.append(i)
    n_ctx = len(texts)
    texts += [f.prompt for f in facts]
    subjects += [f.subject for f in facts]
    key = (layer, "key", "input")
    got = read_at_subject(wb, texts, subjects, [key, *bare_reads])
    owner_t = torch.tensor(owner, device=got[key].device)
    ctx_keys = got[key][:n_ctx]
    sums = torch.zeros(len(facts), ctx_keys.shape[1], dtype=ctx_keys.dtype, device=ctx_keys.device)
    sums.index_add_(0, owner_t, ctx_keys)
    counts = torch.bincount(owner_t, minlength=len(facts)).to(ctx_keys.dtype)[:, None]
    return sums / counts, {k: got[k][n_ctx:] for k in bare_reads}


# ================================================================== targets


@dataclass
class TargetValue:
    """The optimised shift ``δ`` of one fact at its site and the site's value ``v_0`` at the bare prompt."""

    fact: FactContexts
    delta: torch.Tensor     # [d_model] float32
    init: torch.Tensor      # [d_model] float32
    record: dict[str, Any]

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


def compute_target(wb: Workbench, fact: FactContexts, layer: int, site: str, hp: KeyValueHParams,
                   progress: Callable[[float, str], None] | None = None) -> TargetValue:
    """ROME's compute_v (``site="down_proj"``) / MEMIT's compute_z (``site="layer"``) for one fact
    (:func:`compute_targets` of a batch of one)."""
    return compute_targets(wb, [fact], layer, site, hp, progress=progress)[0]


@dataclass
class _FactRows:
    """The rows of one fact in a :class:`TeacherForcedRows` batch of that fact alone."""

    rows: TeacherForcedRows
    init_row: int
    kl_row: int


def _fact_rows(wb: Workbench, fact: FactContexts) -> _FactRows:
    b = TeacherForcedRows(wb.tokenizer, wb.device)
    for ctx in fact.contexts:                 # MEMIT: per-token mean, then mean over contexts
        b.add(ctx, fact.subject, fact.target_new, contexts=len(fact.contexts))
    init_row = fact.contexts.index(fact.prompt) if fact.prompt in fact.contexts else b.add(fact.prompt, fact.subject)
    kl_row = b.add(kl_prompt(fact.language, fact.subject), fact.subject)
    return _FactRows(b, init_row, kl_row)


@dataclass
class _Row:
    """One row of the batched optimisation: a fact's context (+ target), bare prompt or KL prompt."""

    fact: int                      # the fact's index in ``facts``
    ids: list[int]
    col: int                       # the subject's last token: where δ is added
    targets: list[tuple[int, int, float]]   # (column, token id, weight) of the teacher-forced target tokens
    is_init: bool                  # v_0 is read here
    is_kl: bool                    # the KL prompt


def _rows_of(parts: list[_FactRows]) -> list[_Row]:
    rows: list[_Row] = []
    for i, part in enumerate(parts):
        b = part.rows
        targets: dict[int, list[tuple[int, int, float]]] = {}
        for r, c, t, w in zip(b.target_rows, b.target_cols, b.target_ids, b.target_weights):
            targets.setdefault(r, []).append((c, t, w))
        for r, seq in enumerate(b.seqs):
            rows.append(_Row(i, list(seq), b.patch_cols[r], targets.get(r, []), r == part.init_row, r == part.kl_row))
    return rows


def _groups(rows: list[int], lengths: list[int], slack: float = 0.8, min_rows: int = 16) -> list[list[int]]:
    """``rows`` split into padded batches of similar length (longest first): a new batch starts only when the
    current one has ``min_rows`` rows and the next row is shorter than ``slack`` × its width, so that little of
    each forward is padding while no forward is so small that its per-call overhead dominates (the rows of one
    fact, a handful, stay one forward)."""
    order = sorted(rows, key=lambda r: -lengths[r])
    groups: list[list[int]] = []
    for r in order:
        if groups and (len(groups[-1]) < min_rows or lengths[r] >= slack * lengths[groups[-1][0]]):
            groups[-1].append(r)
        else:
            groups.append([r])
    if len(groups) > 1 and len(groups[-1]) < min_rows:      # a short tail rides with the batch before it
        groups[-2].extend(groups.pop())
    return groups


class _Group:
    """One padded forward of rows of the still active facts; index tensors for the hook and the losses."""

    def __init__(self, wb: Workbench, rows: list[_Row], members: list[int], position: dict[int, int]):
        dev = wb.device
        self.members = members
        sel = [rows[m] for m in members]
        self.input_ids, self.mask = pad_sequences([r.ids for r in sel], wb.tokenizer.pad_token_id, device=dev)
        self.width = int(self.input_ids.shape[1])
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=dev)  # noqa: E731
        self.rows = as_long(list(range(len(sel))))
        self.cols = as_long([r.col for r in sel])
        self.owner = as_long([position[r.fact] for r in sel])            # position of the fact among the active
        t_rows = [k for k, r in enumerate(sel) for _ in r.targets]
        t_cols = [c for r in sel for c, _, _ in r.targets]
        self.kl_rows = [k for k, r in enumerate(sel) if r.is_kl]
        self.read_rows = as_long(t_rows + self.kl_rows)
        self.read_cols = as_long(t_cols + [sel[k].col for k in self.kl_rows])
        self.target_ids = as_long([t for r in sel for _, t, _ in r.targets])
        self.target_owner = as_long([position[r.fact] for r in sel for _ in r.targets])
        self.weights = torch.tensor([w for r in sel for _, _, w in r.targets], dtype=torch.float32, device=dev)
        self.kl_owner = [position[sel[k].fact] for k in self.kl_rows]
        self.init_rows = [k for k, r in enumerate(sel) if r.is_init]
        self.init_owner = [position[sel[k].fact] for k in self.init_rows]
        self.n_targets = len(t_rows)


class SkipBelow:
    """After the first step of :func:`compute_targets` at a layer's output (MEMIT's z site), the decoder layers
    up to that layer are not run again: their output does not depend on δ (which is added after them), so the
    first step's output of the z layer is kept per row and returned in their place (padding columns hold
    zeros: with right padding no real token reads them). Only where the decoder layers return a plain tensor
    (checked on the first step); otherwise every step runs them all."""

    def __init__(self, wb: Workbench, layer: int):
        self.modules = [wb.arch.layer_module(wb.model, i) for i in range(layer + 1)]
        self.below: dict[int, torch.Tensor] = {}       # row → [its length, d_model], the z layer's output
        self.enabled = True
        self.current: torch.Tensor | None = None
        self.patched = False

    def __enter__(self) -> "SkipBelow":
        return self

    def keep(self, members: list[int], lengths: list[int], hidden: torch.Tensor) -> None:
        for k, m in enumerate(members):
            self.below[m] = hidden[k, :lengths[m]].detach()

    def use(self, members: list[int], width: int) -> bool:
        """Return the kept states for these rows (padded to ``width``) instead of running the layers; False when
        that is not possible (nothing kept for a row, or the layers return tuples)."""
        if not self.enabled or any(m not in self.below for m in members):
            self.release()
            return False
        first = self.below[members[0]]
        batch = first.new_zeros((len(members), width, first.shape[-1]))
        for k, m in enumerate(members):
            batch[k, :self.below[m].shape[0]] = self.below[m]
        self.current = batch
        if not self.patched:
            def passthrough(*args: Any, **kwargs: Any) -> Any:
                return args[0] if args else kwargs["hidden_states"]

            def cached(*args: Any, **kwargs: Any) -> Any:
                return self.current

            for m in self.modules[:-1]:
                m.forward = passthrough
            self.modules[-1].forward = cached
            self.patched = True
        return True

    def release(self) -> None:
        if self.patched:
            for m in self.modules:
                m.__dict__.pop("forward", None)
            self.patched = False

    def __exit__(self, *exc: Any) -> None:
        self.release()


def compute_targets(wb: Workbench, facts: list[FactContexts], layer: int, site: str, hp: KeyValueHParams,
                    progress: Callable[[float, str], None] | None = None) -> list[TargetValue]:
    """ROME's compute_v (``site="down_proj"``) / MEMIT's compute_z (``site="layer"``) of every fact, batched.

    Each fact ``i`` has its own shift ``δ_i``, added at the last subject token of
    its own rows only (its contexts + target, teacher forced; its bare prompt for
    ``v_0`` when that is not a context already; its KL prompt), so its loss

        mean over its contexts of the per-token NLL of its target
        + kl_factor · KL(P_δ || P_0) on its KL prompt + v_weight_decay · ||δ_i|| / ||v_0,i||²

    depends on ``δ_i`` alone, and the gradient of the summed loss with respect
    to ``δ_i`` is the gradient of its own loss. Adam works per coordinate (its
    update is written out here as ``torch.optim.Adam`` computes it), the norm
    clamp per fact, and a fact stops as in ROME/MEMIT's loop: once its own loss
    is below ``early_stop_loss`` or at the last iteration (which only
    evaluates). A fact that has stopped leaves the batch: its rows are no
    longer run. So the result equals optimising the facts one by one, up to
    float rounding (rows padded to another length, batched matmuls).

    Work saved per iteration (both are exact): the rows of all active facts run
    in padded forwards of similar length (:func:`_groups`), and at MEMIT's z
    site the decoder layers up to ``layer`` run only in the first iteration
    (:class:`SkipBelow`). ``progress(fraction, message)`` after every iteration.
    """
    if not facts:
        return []
    dev = wb.device
    parts = [_fact_rows(wb, f) for f in facts]
    rows = _rows_of(parts)
    lengths = [len(r.ids) for r in rows]
    n, d_site = len(facts), wb.d_model
    delta = torch.zeros(n, d_site, dtype=torch.float32, device=dev)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8                          # torch.optim.Adam's defaults
    init = torch.zeros(n, d_site, dtype=torch.float32, device=dev)
    kl_init: list[torch.Tensor | None] = [None] * n
    records: list[dict[str, Any]] = [
        {"case_id": f.case_id, "language": f.language, "contexts": len(f.contexts), "layer": int(layer),
         "site": site, "steps": 0} for f in facts]
    module = wb.arch.site(wb.model, layer, site)
    active = list(range(n))
    state: dict[str, Any] = {}

    with contextlib.ExitStack() as stack:
        skip = stack.enter_context(SkipBelow(wb, layer))

        def add_delta(module: Any, args: tuple, output: Any) -> Any:
            hidden = first_tensor(output)
            group, shift = state["group"], state["shift"]
            if state["first"]:
                if group.init_rows:
                    init[torch.tensor([state["active"][j] for j in group.init_owner], device=dev)] = \
                        hidden[group.init_rows, group.cols[group.init_rows]].detach().float()
                if site == "layer" and isinstance(output, torch.Tensor):
                    skip.keep(group.members, lengths, hidden)    # nothing up to here depends on δ
                else:
                    skip.enabled = False
            shifted = hidden.index_put((group.rows, group.cols), shift[group.owner].to(hidden.dtype), accumulate=True)
            return _with_output(output, shifted)

        stack.enter_context(Hooks().forward(module, add_delta))
        stack.enter_context(torch.enable_grad())
        for it in range(hp.v_num_grad_steps):
            idx = torch.tensor(active, dtype=torch.long, device=dev)
            position = {i: j for j, i in enumerate(active)}
            shift = delta[idx].clone().requires_grad_(True)
            state.update(shift=shift, first=(it == 0), active=active)
            nll = torch.zeros(len(active), dtype=torch.float32, device=dev)
            kl = torch.zeros(len(active), dtype=torch.float32, device=dev)
            live = [r for r in range(len(rows)) if rows[r].fact in position]
            for members in _groups(live, lengths):
                group = _Group(wb, rows, members, position)
                state["group"] = group
                if it > 0:
                    skip.use(members, group.width)
                logits = wb.logits_at(wb.forward_inputs(group.input_ids, group.mask), (group.read_rows, group.read_cols))
                logp = torch.log_softmax(logits.float(), dim=-1)
                target_logp, kl_logp = logp[:group.n_targets], logp[group.n_targets:]
                picked = -target_logp.gather(1, group.target_ids[:, None]).squeeze(1) * group.weights
                nll = nll.index_add(0, group.target_owner, picked)
                if group.kl_owner:
                    if it == 0:
                        for k, j in enumerate(group.kl_owner):
                            kl_init[active[j]] = kl_logp[k:k + 1].detach().clone()
                    kl0 = torch.cat([kl_init[active[j]] for j in group.kl_owner])
                    per = (kl_logp.exp() * (kl_logp - kl0)).sum(-1)            # KL(P_δ || P_0), as the code
                    kl = kl.index_add(0, torch.tensor(group.kl_owner, dtype=torch.long, device=dev), per)
            init_norm = init[idx].norm(dim=1).clamp_min(1e-12)
            decay = hp.v_weight_decay * (shift.norm(dim=1) / init_norm ** 2)
            loss = nll + hp.kl_factor * kl + decay
            values = loss.detach().tolist()
            keep: list[int] = []
            for j, i in enumerate(active):
                if it == 0:
                    records[i]["initial_nll"] = float(nll[j].detach())
                records[i].update(final_nll=float(nll[j].detach()), final_kl=float(kl[j].detach()),
                                  final_loss=values[j])
                if not (values[j] < hp.early_stop_loss or it == hp.v_num_grad_steps - 1):
                    keep.append(j)
            if progress is not None:
                progress((it + 1) / hp.v_num_grad_steps, f"step {it + 1}/{hp.v_num_grad_steps}, "
                         f"{len(keep)} of {n} target(s) still optimised, mean loss {sum(values) / len(values):.3f}")
            if not keep:
                break
            grad, = torch.autograd.grad(loss[keep].sum(), shift)
            with torch.no_grad():
                step = it + 1                      # every fact still active has taken exactly ``it`` steps
                kept_rows = idx[keep]
                g = grad[keep]
                m = exp_avg[kept_rows].mul_(beta1).add_(g, alpha=1 - beta1)
                v = exp_avg_sq[kept_rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                exp_avg[kept_rows], exp_avg_sq[kept_rows] = m, v
                bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
                denom = (v.sqrt() / (bias2 ** 0.5)).add_(eps)
                new = delta[kept_rows].addcdiv(m, denom, value=-hp.v_lr / bias1)
                if hp.clamp_norm_factor > 0:
                    limit = hp.clamp_norm_factor * init[kept_rows].norm(dim=1, keepdim=True)
                    norms = new.norm(dim=1, keepdim=True)
                    new = torch.where((norms > limit) & (limit > 0), new * (limit / norms), new)   # clamp_norm_ per fact
                delta[kept_rows] = new
            for j in keep:
                records[active[j]]["steps"] = it + 1
            active = [active[j] for j in keep]
    out = []
    for i, fact in enumerate(facts):
        d = delta[i].detach().clone()
        records[i].update(delta_norm=float(d.norm()), init_norm=float(init[i].norm()),
                          target_norm=float((init[i] + d).norm()))
        out.append(TargetValue(fact, d, init[i].clone(), records[i]))
    return out


# ================================================================== layers and the spread

def param_name(wb: Workbench, layer: int) -> str:
    weight = wb.arch.site(wb.model, layer, "down_proj").weight
    for name, param in wb.model.named_parameters():
        if param is weight:
            return name
    raise InputError(f"The down-projection weight of layer {layer} is not a parameter of {wb.name}.")


def factor_layout(wb: Workbench, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of Δ [d_model, d_ff] in the parameter's own layout (Conv1D: [d_ff, d_model] = vᵀ uᵀ)."""
    u, v = u.detach().float().cpu().contiguous(), v.detach().float().cpu().contiguous()
    if wb.arch.down_orientation == "in_out":
        return v.T.contiguous(), u.T.contiguous()
    return u, v


def closest_on_norm_image(gain: torch.Tensor, target: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """``a`` with ``rms(a) = 1`` minimising ``||g ⊙ a − t||`` per row (the RMSNorm's image closest to ``t``).

    Lagrange: ``a = g t / (g² + μ)`` with ``μ > −min g²`` such that ``mean(a²) = 1``
    (``mean(a²)`` decreases in ``μ``): found by bisection, float64.
    """
    g, t = gain.double()[None, :], target.double()
    g2 = g * g
    size = lambda mu: ((g * t / (g2 + mu)) ** 2).mean(-1, keepdim=True)  # noqa: E731
    floor = -float(g2.min())
    spread = max(float(g2.max()), 1e-12)
    lo = torch.full((t.shape[0], 1), floor + 1e-12 * spread, dtype=torch.float64, device=t.device)
    hi = torch.full_like(lo, spread)
    for _ in range(200):                                  # bracket: mean(a²) < 1 at hi
        big = size(hi) > 1
        if not bool(big.any()):
            break
        hi = torch.where(big, hi * 2 + spread, hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = size(mid) > 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    a = g * t / (g2 + hi)
    return a / a.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)


def sandwich_residual(wb: Workbench, layer: int, m: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Map a residual-stream change ``resid`` through the post-FFN RMSNorm to a change of its input ``m``
    (module docstring): ``m' = rms(m) · a`` with ``g ⊙ a`` the point of the norm's image closest to
    ``t = norm(m) + resid``. Returns ``m' − m`` and the fraction of ``||resid||`` closed,
    ``1 − ||norm(m') − t|| / ||resid||`` (mean over pairs; 1 = reached exactly, 0 = no closer than before)."""
    norm = resolve(wb.arch.layer_module(wb.model, layer), wb.arch.post_ffn_norm)
    dtype = wb.dtype
    with torch.no_grad():
        gain = norm(torch.full((1, m.shape[1]), 1e3, dtype=dtype, device=m.device)).float()[0]
        current = norm(m.to(dtype)).float()
        target = current + resid
        scale = m.double().pow(2).mean(-1, keepdim=True).sqrt()
        new_m = (closest_on_norm_image(gain, target) * scale).float()
        miss = (norm(new_m.to(dtype)).float() - target).norm(dim=-1)
        fit = 1 - miss / resid.norm(dim=-1).clamp_min(1e-30)
    return new_m - m, float(fit.mean())


@dataclass
class SpreadResult:
    """What :func:`spread_update` inserted: the factors per parameter, per-layer meta, and per layer the keys
    ``[n, d_ff]`` and the value residuals ``[n, d_model]`` it inserted (float64, CPU)."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layer_meta: list[dict[str, Any]]
    keys: dict[int, torch.Tensor]
    resid: dict[int, torch.Tensor]


def spread_update(wb: Workbench, layers: list[int], facts: list[FactContexts], targets: list[TargetValue],
                  update: Callable[[int, torch.Tensor, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]],
                  ) -> SpreadResult:
    """MEMIT Alg. 1: the residual of the last layer's targets spread over ``layers`` in ascending order.

    At each layer (with the updates of the earlier layers in force, applied
    through :meth:`Edit.applied` and undone at the end): the keys ``K`` of every
    fact and ``h^L`` at its bare prompt; ``R = (Z − h^L) / (layers left)`` (mapped
    through the post-FFN norm for sandwich-norm models, :func:`sandwich_residual`);
    ``update(layer, K [d_ff, n], R [d_model, n], info)`` returns the factors
    ``(u, v)`` of ``ΔW = u v`` ([d_model, d_ff]) of the method (MEMIT,
    AlphaEdit, LangEdit); ``info`` is that layer's meta.
    """
    from editors.edit import Edit

    z_layer = layers[-1]
    z = torch.stack([t.target for t in targets]).to(wb.device, torch.float64)    # [n, d_model]
    sandwich = wb.arch.post_ffn_norm is not None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layer_meta: list[dict[str, Any]] = []
    keys_out: dict[int, torch.Tensor] = {}
    resid_out: dict[int, torch.Tensor] = {}
    with contextlib.ExitStack() as applied:
        for i, layer in enumerate(layers):
            reads = [(z_layer, "layer", "output")] + ([(layer, "down_proj", "output")] if sandwich else [])
            keys, bare = _keys_and_reads(wb, layer, facts, reads)
            cur_z = bare[(z_layer, "layer", "output")].to(torch.float64)
            resid = (z - cur_z) / (len(layers) - i)                              # Alg. 1: spread the residual
            info: dict[str, Any] = {"layer": layer, "z_error": float((z - cur_z).norm(dim=1).mean()),
                                    "resid_norm": float(resid.norm(dim=1).mean())}
            if sandwich:
                m = bare[(layer, "down_proj", "output")]
                value_resid, fit = sandwich_residual(wb, layer, m, resid.float())
                info["post_ffn_norm_fit"] = fit
                resid = value_resid.to(torch.float64)
                info["value_resid_norm"] = float(resid.norm(dim=1).mean())
            keys = keys.to(torch.float64)
            u, v = update(layer, keys.T, resid.T, info)
            info["update_norm"] = float((u @ v).norm())
            keys_out[layer], resid_out[layer] = keys.cpu(), resid.cpu()
            name = param_name(wb, layer)
            weights[name] = factor_layout(wb, u, v)
            layer_meta.append(info)
            if i < len(layers) - 1:   # the next layers see this update (MEMIT Alg. 1)
                applied.enter_context(Edit(weights={name: weights[name]}).applied(wb))
    return SpreadResult(weights, layer_meta, keys_out, resid_out)


# ================================================================== statistics


def key_second_moments(wb: Workbench, layers: list[int], requests: list[EditRequest], hp: KeyValueHParams,
                       progress: Callable[[int, int], None] | None = None,
                       ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``C = E[k kᵀ]`` per layer (float64 on the model's device) over the requests' languages.

    ``progress(tokens done, tokens planned)`` is called while statistics missing from the disk cache are counted.
    """
    return key_second_moments_of(wb, layers, sorted({lang for r in requests for lang in r.languages}), hp, progress)


def key_second_moments_of(wb: Workbench, layers: list[int], languages: list[str], hp: KeyValueHParams,
                          progress: Callable[[int, int], None] | None = None,
                          ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """:func:`key_second_moments` over the text of ``languages``."""
    languages = sorted(set(languages))
    texts, sources = statistics_texts(languages, hp.mom2_source)
    stats, folder, from_disk = cached_key_statistics(wb, layers, texts, sources, n_tokens=hp.mom2_n_tokens,
                                                     progress=progress)
    moments = {layer: stats[layer].second_moment.to(wb.device, torch.float64) for layer in layers}
    meta = {"languages": languages, "source": hp.mom2_source, "tokens": {str(l): stats[l].tokens for l in layers},
            "folder": str(folder), "from_disk": bool(from_disk)}
    return moments, meta


def _solve(a: torch.Tensor, b: torch.Tensor, notes: list[str], what: str) -> torch.Tensor:
    """``a⁻¹ b``; a ridge of 1e-6 · trace/d where ``a`` is singular (noted)."""
    try:
        return torch.linalg.solve(a, b)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        ridge = 1e-6 * float(torch.diagonal(a).abs().mean().clamp_min(1e-30))
        notes.append(f"{what} is singular: solved with a ridge of {ridge:.3g}")
        return torch.linalg.solve(a + ridge * torch.eye(a.shape[0], dtype=a.dtype, device=a.device), b)


_PROJECTIONS: "OrderedDict[tuple, tuple[torch.Tensor, int]]" = OrderedDict()
_MAX_PROJECTIONS = 5


def nullspace_projection(c: torch.Tensor, threshold: float, relative: bool = False,
                         cache_key: tuple | None = None) -> tuple[torch.Tensor, int]:
    """AlphaEdit's ``P = Û Ûᵀ``: ``Û`` the eigenvectors of ``c`` with eigenvalue < threshold; and ``dim Û``.

    ``relative``: the threshold is a fraction of the largest eigenvalue. Cached
    (at most five, float64 on ``c``'s device) under ``cache_key``.
    """
    if cache_key is not None and cache_key in _PROJECTIONS:
        _PROJECTIONS.move_to_end(cache_key)
        return _PROJECTIONS[cache_key]
    evals, evecs = torch.linalg.eigh(c.to(torch.float64))
    limit = threshold * float(evals.max()) if relative else threshold
    null = evecs[:, evals < limit]
    result = (null @ null.T, int(null.shape[1]))
    if cache_key is not None:
        _PROJECTIONS[cache_key] = result
        while len(_PROJECTIONS) > _MAX_PROJECTIONS:
            _PROJECTIONS.popitem(last=False)
    return result


# ================================================================== closed forms
# K is [d_ff, n] (one key per column), R is [d_model, n]; each returns low-rank factors (u, v) with
# ΔW = u @ v in the [d_model, d_ff] layout.


def rome_update(keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor | None,
                notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """rome Eq. 2 for n pairs: Δ = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹ (C = I without mom2 adjustment)."""
    cinv_k = keys if c is None else _solve(c, keys, notes, "C")                      # C⁻¹ K  [d_ff, n]
    gram = keys.T @ cinv_k                                                           # Kᵀ C⁻¹ K  [n, n]
    v = _solve(gram, cinv_k.T, notes, "KᵀC⁻¹K")                                       # (KᵀC⁻¹K)⁻¹ Kᵀ C⁻¹
    return resid, v


def memit_update(keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor, weight: float,
                 notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """memit Eq. 14: ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹."""
    a = weight * c + keys @ keys.T
    return resid, _solve(a, keys, notes, "λC + KKᵀ").T                              # a symmetric


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, p: torch.Tensor, l2: float,
                     notes: list[str], cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """alphaedit Eq. 8: ΔW = R Kᵀ P (K Kᵀ P + λ I)⁻¹, solved as the code: ((P K Kᵀ + λI)⁻¹ P K)ᵀ.

    ``cache``: AlphaEdit's sequential form (its code's ``cache_c``, Σ K_p K_pᵀ of the keys edited in earlier
    batches): ΔW = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + λ I)⁻¹, which keeps those keys' outputs in the solve.
    LangEdit's Eq. 10 is the form without it (λ = 1, P from its running covariance)."""
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    if cache is None:
        a = p @ keys @ keys.T + l2 * eye
    else:
        a = p @ (keys @ keys.T + cache) + l2 * eye
    x = _solve(a, p @ keys, notes, "P(KKᵀ + K_pK_pᵀ) + λI" if cache is not None else "PKKᵀ + λI")   # [d_ff, n]
    return resid, x.T
