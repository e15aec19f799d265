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
* the target value (ROME's compute_v / MEMIT's compute_z, :func:`compute_target`);
* the key statistics ``C = E[k kᵀ]`` (:func:`key_second_moments`);
* the closed-form updates (rome Eq. 2, memit Eq. 14, alphaedit Eq. 8) and the
  null-space projection they use.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from analysis.arch import first_tensor
from analysis.errors import InputError
from analysis.hooks import Hooks
from analysis.stats import cached_key_statistics
from analysis.tokens import pad_sequences, subject_last_ids
from data.flores import statistics_texts
from editors.contexts import PrefixSpec, generate_prefixes, kl_prompt, prefixed
from editors.hparams import Constraint, HParams, Interval
from editors.requests import EditRequest
from editors.rows import TeacherForcedRows, clamp_norm_

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
    """ROME's compute_v (``site="down_proj"``) / MEMIT's compute_z (``site="layer"``) for one fact.

    One padded batch holds every context + target (teacher forced), the bare
    prompt (for ``v_0``, when it is not a context already) and the KL prompt;
    each step is one forward and backward of that batch. ``progress(fraction,
    message)`` is called after every step (fraction of ``v_num_grad_steps``).
    """
    b = TeacherForcedRows(wb.tokenizer, wb.device)
    for ctx in fact.contexts:                 # MEMIT: per-token mean, then mean over contexts
        b.add(ctx, fact.subject, fact.target_new, contexts=len(fact.contexts))
    if fact.prompt in fact.contexts:
        init_row = fact.contexts.index(fact.prompt)
    else:
        init_row = b.add(fact.prompt, fact.subject)
    kl_row = b.add(kl_prompt(fact.language, fact.subject), fact.subject)
    # ROME/MEMIT read the KL distribution at the subject's last token

    dev = wb.device
    input_ids, mask = b.batch()
    rows, cols = torch.arange(len(b.seqs), device=dev), b.long(b.patch_cols)
    read_rows = b.long(b.target_rows + [kl_row])
    read_cols = b.long(b.target_cols + [b.patch_cols[kl_row]])
    target_ids, weights = b.long(b.target_ids), b.weights()
    n_t = len(b.target_ids)

    d_site = wb.d_model
    delta = torch.zeros(d_site, dtype=torch.float32, device=dev, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def add_delta(module: Any, args: tuple, output: Any) -> Any:
        hidden = first_tensor(output)
        if "init" not in state:
            state["init"] = hidden[init_row, cols[init_row]].detach().float()
        shifted = hidden.index_put((rows, cols), delta.to(hidden.dtype).expand(rows.numel(), -1), accumulate=True)
        return _with_output(output, shifted)

    module = wb.arch.site(wb.model, layer, site)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        logits = wb.logits_at(wb.forward_inputs(input_ids, mask), (read_rows, read_cols))
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp[:n_t], logp[n_t:]

    record: dict[str, Any] = {"case_id": fact.case_id, "language": fact.language, "contexts": len(fact.contexts),
                              "layer": int(layer), "site": site, "steps": 0}
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init: torch.Tensor | None = None
    with Hooks().forward(module, add_delta), torch.enable_grad():
        for it in range(hp.v_num_grad_steps):
            optimizer.zero_grad()
            target_logp, kl_logp = forward()
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            nll = (-target_logp.gather(1, target_ids[:, None]).squeeze(1) * weights).sum()
            kl = F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")   # KL(P_δ || P_0), as the code
            init_norm = state["init"].norm().clamp_min(1e-12)
            decay = hp.v_weight_decay * (delta.norm() / init_norm ** 2)
            loss = nll + hp.kl_factor * kl + decay
            if it == 0:
                record["initial_nll"] = float(nll.detach())
            record.update(final_nll=float(nll.detach()), final_kl=float(kl.detach()), final_loss=float(loss.detach()))
            if progress is not None:
                progress((it + 1) / hp.v_num_grad_steps,
                         f"step {it + 1}/{hp.v_num_grad_steps}, loss {float(loss.detach()):.3f}")
            if float(loss.detach()) < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            optimizer.step()
            record["steps"] = it + 1
            if hp.clamp_norm_factor > 0:
                clamp_norm_(delta, hp.clamp_norm_factor * float(init_norm))
    init = state["init"]
    delta = delta.detach()
    record.update(delta_norm=float(delta.norm()), init_norm=float(init.norm()),
                  target_norm=float((init + delta).norm()))
    return TargetValue(fact, delta, init, record)


# ================================================================== statistics


def key_second_moments(wb: Workbench, layers: list[int], requests: list[EditRequest], hp: KeyValueHParams,
                       progress: Callable[[int, int], None] | None = None,
                       ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """``C = E[k kᵀ]`` per layer (float64 on the model's device) over the requests' languages.

    ``progress(tokens done, tokens planned)`` is called while statistics missing from the disk cache are counted.
    """
    languages = sorted({lang for r in requests for lang in r.languages})
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
                     notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """alphaedit Eq. 8: ΔW = R Kᵀ P (K Kᵀ P + λ I)⁻¹, solved as the code: ((P K Kᵀ + λI)⁻¹ P K)ᵀ."""
    eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    x = _solve(p @ keys @ keys.T + l2 * eye, p @ keys, notes, "PKKᵀ + λI")           # [d_ff, n]
    return resid, x.T
