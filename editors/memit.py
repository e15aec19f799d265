"""ROME, MEMIT and AlphaEdit on one implementation of keys, target values and key statistics.

All three treat the down-projection of an FFN as a linear associative memory
``W k = v`` whose keys ``k`` are the down-projection *input* (the ``"key"``
site of :mod:`analysis.arch`, DESIGN.md Decision 1) and insert new
(key, value) pairs with a closed-form update of ``W`` (``[d_model, d_ff]``).

Multilingual editing: M-ROME / M-MEMIT (papers/lu-lafns.md §4.2)
    "since the knowledge to be edited of different languages corresponds to
    different answers, we train the new value for updating FFNs separately for
    each language. And we estimate the previously memorized keys of FFNs for
    each language." Every language ``l`` of every request is therefore one
    (key, value) pair of its own:

    * its target (:func:`compute_target`: ROME's ``compute_v`` / MEMIT's
      ``compute_z``) is optimised on that language's prompt and target only;
    * its key (:func:`fact_keys`: rome Eq. 3 ``k* = 1/N Σ_j k(x_j + s)``) is
      the mean of the key site at the last subject token over that language's
      contexts;
    * all pairs of all requests are then inserted together.

The shared steps (one function each, named after its symbol)
    Contexts ``x_j + s``: the bare prompt (``empty_prefix``, ROME/MEMIT's
    ``"{}"`` template) and the prompt after model-generated prefixes, for each
    ``[length, count]`` of ``context_template_length_params``
    (:func:`editors.contexts.generate_prefixes`, joined with
    :func:`editors.contexts.prefixed` as ``"{prefix}. {prompt}"``).

    Target (:func:`compute_target`): a vector ``δ`` added at the last subject
    token of every context (and of the KL prompt), at the output of the
    down-projection of ROME's layer (ROME: the MLP output ``m``) or at the
    output of MEMIT's last layer ``L`` (the residual stream ``h^L``), is
    optimised with Adam (``v_lr``, ``v_num_grad_steps``) on

        mean over contexts of the per-token NLL of ``target_new`` (teacher forced,
        all target tokens, :func:`analysis.tokens.answer_ids`)
        + kl_factor · KL(P_δ || P_0) on ``kl_prompt(l, subject)`` at its last subject token
        + v_weight_decay · ||δ|| / ||v_0||²

    (as ROME's and MEMIT's code: ``v_0`` is the site's output at the bare
    prompt; after every step ``||δ||`` is clamped to ``clamp_norm_factor ·
    ||v_0||``; the loop stops once the total loss is below ``early_stop_loss``
    and, as the code does, the last iteration only evaluates). The target is
    ``v_0 + δ``.

    Keys (:func:`fact_keys`) and the statistics ``C = E[k kᵀ]`` of the key over
    text (:func:`key_second_moments`: :func:`analysis.stats.cached_key_statistics`
    over the union of the requests' languages, ``mom2_n_tokens`` tokens of
    ``mom2_source``).

ROME (Meng et al. 2022, rome Eq. 2), one layer, ``n`` pairs at once
    ``Δ = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹`` with ``K = [k_1 … k_n]`` (``d_ff × n``) and
    ``R = V − W K`` (:func:`rome_update`). For ``n = 1`` this is the paper's
    rank-one ``Λ (C⁻¹k*)ᵀ`` with ``Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*)``; for ``n``
    pairs it is the exact multi-constraint solution of the same problem
    (minimise ``||Δ||_C`` subject to ``(W + Δ) K = V``): ``(W + Δ) k_l = v_l``
    holds for every language's key. The target value of language ``l`` is
    ``v_l = W k_l + b + δ_l`` (the MLP output at the mean key, moved by the
    optimised ``δ_l``), so ``R = [δ_1 … δ_n]``.

MEMIT (Meng et al. 2023, memit Alg. 1 and memit Eq. 14)
    ``z_l = h^L_0 + δ_l`` at the last layer ``L`` of ``layers``. For each layer
    ``i`` in ascending order (with the updates of the earlier layers in force,
    applied through :meth:`Edit.applied` and undone at the end): keys ``K``
    at layer ``i``; ``R = (Z − h^L(K)) / (number of layers left)`` where
    ``h^L`` is read at the bare prompts' last subject token; ``ΔW = R Kᵀ (λ C +
    K Kᵀ)⁻¹`` with ``λ = mom2_update_weight`` (:func:`memit_update`).

AlphaEdit (Fang et al. 2025, alphaedit Eq. 8 and its code; papers/langedit.md §2.2, §3)
    MEMIT's ``z`` and spreading, with ``P = Û Ûᵀ`` where ``Û`` are the
    eigenvectors of ``C`` whose eigenvalue is below ``nullspace_threshold``
    (:func:`nullspace_projection`) and ``ΔW = R Kᵀ P (K Kᵀ P + λ I)⁻¹`` with
    ``λ = l2`` (:func:`alphaedit_update`). For any key ``k`` in the preserved
    subspace (``P k = 0``): ``(K Kᵀ P + λ I) k = λ k``, so ``ΔW k = 0``.

Sandwich norms (Gemma 2/3: ``h = x + post_ffn_norm(m)``, ``arch.post_ffn_norm``)
    ROME's target is already in the down-projection's output space (``δ`` is
    added before the norm, and the gradient goes through it). MEMIT/AlphaEdit's
    layer residual ``r`` is in the residual stream: at layer ``i`` with the
    current MLP output ``m`` (bare prompt) and ``c = norm(m) = g ⊙ m / rms(m)``,
    the wanted contribution is ``t = c + r``. The norm's outputs are exactly
    the set ``{g ⊙ a : rms(a) = 1}`` (its input's scale does not matter), so we
    take the point of that set closest to ``t`` (``a = g t / (g² + μ)`` with the
    Lagrange multiplier ``μ`` found by bisection so that ``rms(a) = 1``;
    ``a = t / g`` whenever ``t`` is reachable) and invert the norm keeping the
    current scale: ``m' = rms(m) · a``; ``m' − m`` is the residual the closed form
    inserts. Since ``c`` itself lies in that set, the layer's contribution never
    ends farther from ``t`` than before; what is left over is seen by the next
    layer (Alg. 1 reads ``h^L`` again) and the fraction of ``||r||`` closed is
    reported per layer (``post_ffn_norm_fit`` in ``edit.meta``).

Deviations from the papers and their code (each a hyper-parameter where it can be)
    * Prefixes are sampled by the model from BOS (``generate_prefixes``), not
      from ROME's ``"<|endoftext|>"`` / MEMIT's ``["The", "Therefore",
      "Because", "I", "You"]`` starts, and not with nucleus sampling.
    * ``C`` comes from FLORES-200 (or a corpus) in the request languages, not
      Wikipedia, and ``mom2_n_tokens`` counts *tokens* where the papers'
      ``mom2_n_samples`` counts texts (100 000 Wikipedia records).
    * MEMIT's ``C``: MEMIT's code uses ``λ · E[k kᵀ]`` (the *mean* second moment,
      ``mom2.moment()``) with ``λ = mom2_update_weight = 15000`` standing in
      for the unknown count ``n`` of the paper's ``K₀K₀ᵀ``; we do the same
      (``KeyStats.second_moment`` is that mean), not ``tokens × E[k kᵀ]``.
    * AlphaEdit's threshold is absolute on the eigenvalues of ``E[k kᵀ]``, as
      its code (``S < nullspace_threshold`` on the SVD of ``mom2.moment()``);
      ``nullspace_relative=True`` makes it relative to the largest eigenvalue
      (the scale of keys differs between models; the tiny test models use it;
      the embedded preset keeps the absolute 2e-2).
      Eigen-decomposition (``eigh``) instead of SVD: ``C`` is symmetric PSD,
      the two agree.
    * AlphaEdit's cache of earlier edited keys (``cache_c``, sequential editing)
      is not kept: each ``compute`` is one batch edit (``cache_c = 0``).
    * ROME's code puts the equality constraint on the bare prompt's key
      (``right_vector = (v − W k_prompt) / (k_prompt · u)``); we use the
      paper's ``k*`` (the mean over contexts) for both the direction and the
      constraint, which with ``v = W k* + b + δ`` gives ``R = δ``.
    * ROME's ``mom2_adjustment=False`` (EasyEdit's Llama/Qwen presets) uses
      ``C = I``; the multi-pair formula stays exact.
    * Keys are the plain mean over all contexts (rome Eq. 3); MEMIT's code
      averages the mean of each context *type* (bare prompt; prefixed).
    * A singular ``C`` (or ``λC + KKᵀ``) gets a ridge of ``1e-6 · trace/d``
      (logged in ``edit.meta``) where the code would fail.
    * Weight decay as the code writes it: ``||δ|| / ||v_0||²`` (not squared).
    * The target's tokens are :func:`analysis.tokens.answer_ids` of the prompt
      and ``target_new`` (the join of :mod:`editors.lu_lafns`: a leading-space
      token exactly where the model would write one), not ``" " + target``
      tokenised alone; the per-token NLL is averaged as MEMIT's ``compute_z``.
    * ROME's ``δ`` is added at the down-projection's output (ROME: the MLP
      module's output); they are the same tensor for every family except BLOOM,
      whose MLP module adds the residual itself (its down-projection output is
      the FFN output proper).
    * The tiny test models need a small ``mom2_update_weight`` (their keys'
      ``E[k kᵀ]`` is O(1) over 80 neurons) and a relative null-space
      threshold; see tests/test_memit.py.

Invariant: the model at the end of ``_compute`` equals the model at its
beginning (parameters bit for bit, ``requires_grad`` flags, training flag, no
hooks), also when it raises.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from analysis.arch import first_tensor, resolve
from analysis.errors import InputError
from analysis.hooks import Hooks
from analysis.stats import cached_key_statistics
from analysis.tokens import pad_sequences, subject_last_ids
from data.flores import statistics_texts
from editors.base import Editor, frozen, register
from editors.contexts import PrefixSpec, generate_prefixes, kl_prompt, prefixed
from editors.edit import Edit
from editors.hparams import Constraint, HParams, Interval
from editors.requests import EditRequest
from editors.rows import TeacherForcedRows, clamp_norm_

if TYPE_CHECKING:
    from analysis.model import Workbench

log = logging.getLogger(__name__)


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


@dataclass
class ROMEHParams(KeyValueHParams):
    """ROME (Meng et al. 2022): one layer; the target is the MLP output of that layer."""

    layers: list[int] = field(default_factory=lambda: [5])
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # EasyEdit hparams/ROME/llama3-8b.yaml (published for Llama-3-8B; the same shape as 3.1):
        # layer 5, v_lr 5e-1, 25 steps, weight decay 1e-3, clamp 4, kl 0.0625, mom2_adjustment false,
        # context_template_length_params [[5, 10], [10, 10]].
        "meta-llama/Llama-3.1-8B": dict(layers=[5], v_lr=0.5, v_num_grad_steps=25, v_weight_decay=1e-3,
                                        clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=False,
                                        context_template_length_params=[[5, 10], [10, 10]]),
        # EasyEdit hparams/ROME/qwen2-7b.yaml: the same values.
        "Qwen/Qwen2-7B": dict(layers=[5], v_lr=0.5, v_num_grad_steps=25, v_weight_decay=1e-3,
                              clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=False,
                              context_template_length_params=[[5, 10], [10, 10]]),
        # No published ROME preset for BLOOMZ: EasyEdit's LLaMA values (layer 5 of 30), with ROME's own
        # mom2_adjustment (true, as the ROME paper for GPT-2 XL / GPT-J).
        "bigscience/bloomz-7b1-mt": dict(layers=[5], v_lr=0.5, v_num_grad_steps=25, v_weight_decay=1e-3,
                                         clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=True,
                                         context_template_length_params=[[5, 10], [10, 10]]),
        # Embedded Gemma 3 270M (18 layers): layer 4 CHOSEN FROM OUR CAUSAL TRACE (strongest MLP restoration
        # at the subject's last token), not swept; the rest ROME's values with fewer prefixes (speed).
        # Contexts: 2 + 2 generated prefixes and the bare prompt, 20 steps (ROME's count): on 2 CPU cores one
        # en+zh edit then takes ~40 s; ROME's 20 contexts x 25 steps took minutes.
        "embedded": dict(layers=[4], v_lr=0.5, v_num_grad_steps=20, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                         kl_factor=0.0625, mom2_adjustment=True, mom2_n_tokens=20_000,
                         context_template_length_params=[[5, 2], [10, 2]]),
    }

    def validate(self, wb: Workbench | None = None) -> None:
        super().validate(wb)
        if len(self.layers) != 1:
            raise InputError(f"ROME edits exactly one layer; got layers={self.layers}. Use MEMIT for several.")


@dataclass
class MEMITHParams(KeyValueHParams):
    """MEMIT (Meng et al. 2023): several layers; the target is the residual stream after the last one."""

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 15000.0   # λ of ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹

    BOUNDS: ClassVar[dict[str, Constraint]] = {"mom2_update_weight": Interval(Real, 0, None, closed="left")}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # AlphaEdit repository hparams/MEMIT/Llama3-8B.json (MEMIT as run by the AlphaEdit authors on
        # Llama-3-8B): layers 4-8, clamp 0.75, v_lr 1e-1, 25 steps, weight decay 0.5, kl 0.0625, λ 15000.
        "meta-llama/Llama-3.1-8B": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=0.75, v_lr=0.1,
                                        v_num_grad_steps=25, v_weight_decay=0.5, kl_factor=0.0625,
                                        mom2_update_weight=15000.0),
        # EasyEdit hparams/MEMIT/qwen2-7b.yaml: layers 4-8, clamp 4, v_lr 5e-1, weight decay 1e-3, λ 15000.
        "Qwen/Qwen2-7B": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=4.0, v_lr=0.5, v_num_grad_steps=25,
                              v_weight_decay=1e-3, kl_factor=0.0625, mom2_update_weight=15000.0),
        # No published MEMIT preset for BLOOMZ: EasyEdit's LLaMA/Qwen layer choice (4-8) and values.
        "bigscience/bloomz-7b1-mt": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=4.0, v_lr=0.5,
                                         v_num_grad_steps=25, v_weight_decay=1e-3, kl_factor=0.0625,
                                         mom2_update_weight=15000.0),
        # Embedded Gemma 3 270M: layers 2-6 around layer 4 CHOSEN FROM OUR CAUSAL TRACE (swept since, see below);
        # clamp 4 and weight decay 1e-3 as EasyEdit's Qwen2 values; MEMIT's 5 prefixes of 10 tokens.
        # λ = 2000: 15000 scaled by d_ff (2048 / 16384, GPT-J's), since kᵀ(λC)⁻¹k ≈ d_ff / λ for a typical
        # key. Checked on MzsRE dev record 5 (en+zh) only: 15000 raised P(en) 1.6e-6 → 1.3e-5 and P(zh)
        # 1.2e-7 → 1.7e-7; 2000 raised them to 1.5e-2 and 4.7e-6. Measured since by bench/sweep_memit.py
        # (MzsRE dev 100-105, en+zh, Table 2 avg): layers 0-4 60.8, 2-6 64.9, 5-9 59.4 at λ 2000; at 2-6,
        # λ 500 66.6 (one probe more), 15000 25.0 (no edit). Kept 2-6 and 2000.
        # Contexts and steps as ROME's embedded preset (speed on CPU).
        # v_lr 5, not the papers' 0.5: Adam moves each coordinate of δ by about v_lr per step, and Gemma 3's
        # residual stream at layer 6 has norm ≈ 4,300 (per-coordinate RMS ≈ 170), so 0.5 × 20 steps cannot
        # reach z (final NLL at z 5.5 on record 5). Checked on MzsRE dev records 5 (en) and 120 (en+zh),
        # P(new) after the edit: v_lr 0.5 → en 0.0009 (record 5); 2 → en 0.83, zh 1e-4 (record 120);
        # 5 → en 0.97 (5), en 0.95, zh 4e-4 (120); 10 → en 0.69, zh 0 (120). Not a sweep of the tables' metrics.
        "embedded": dict(layers=[2, 3, 4, 5, 6], clamp_norm_factor=4.0, v_lr=5.0, v_num_grad_steps=20,
                         v_weight_decay=1e-3, kl_factor=0.0625, mom2_update_weight=2000.0, mom2_n_tokens=20_000,
                         context_template_length_params=[[5, 2], [10, 2]]),
    }

@dataclass
class AlphaEditHParams(MEMITHParams):
    """AlphaEdit (Fang et al. 2025): MEMIT's targets and spreading, projected on the null space of C."""

    nullspace_threshold: float = 2e-2     # eigenvalues of E[k kᵀ] below this span the null space
    nullspace_relative: bool = False      # threshold relative to the largest eigenvalue (code: absolute)
    l2: float = 10.0                      # λ of ΔW = R Kᵀ P (K Kᵀ P + λ I)⁻¹ (the code's "L2")

    BOUNDS: ClassVar[dict[str, Constraint]] = {
        "nullspace_threshold": Interval(Real, 0, None, closed="neither"),
        "l2": Interval(Real, 0, None, closed="neither"),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # EasyEdit hparams/AlphaEdit/llama3.1-8b.yaml: layers 4-8, clamp 0.75, v_lr 1e-1, weight decay 0.5,
        # kl 0.0625, threshold 2e-2, L2 10.
        "meta-llama/Llama-3.1-8B": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=0.75, v_lr=0.1,
                                        v_num_grad_steps=25, v_weight_decay=0.5, kl_factor=0.0625,
                                        nullspace_threshold=2e-2, l2=10.0),
        # EasyEdit hparams/AlphaEdit/qwen2.5-7b.yaml (Qwen2.5-7B, the same shape as Qwen2-7B): clamp 4,
        # v_lr 5e-1, weight decay 1e-3, threshold 2e-2, L2 1.
        "Qwen/Qwen2-7B": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=4.0, v_lr=0.5, v_num_grad_steps=25,
                              v_weight_decay=1e-3, kl_factor=0.0625, nullspace_threshold=2e-2, l2=1.0),
        # No published AlphaEdit preset for BLOOMZ: the Llama-3.1 values.
        "bigscience/bloomz-7b1-mt": dict(layers=[4, 5, 6, 7, 8], clamp_norm_factor=0.75, v_lr=0.1,
                                         v_num_grad_steps=25, v_weight_decay=0.5, kl_factor=0.0625,
                                         nullspace_threshold=2e-2, l2=10.0),
        # Embedded Gemma 3 270M: layers 2-6 as the MEMIT preset (swept for MEMIT, not here); the targets as
        # the embedded MEMIT preset; AlphaEdit's absolute threshold 2e-2 and L2 10. On 20k FLORES en+zh tokens
        # that leaves 1139-1818 of 2048 null directions per layer (relative 2e-2 would leave 10-70
        # preserved ones). v_lr 5 as the embedded MEMIT preset (Gemma 3's residual-stream scale).
        "embedded": dict(layers=[2, 3, 4, 5, 6], clamp_norm_factor=4.0, v_lr=5.0, v_num_grad_steps=20,
                         v_weight_decay=1e-3, kl_factor=0.0625, nullspace_threshold=2e-2, nullspace_relative=False,
                         l2=10.0, mom2_n_tokens=20_000, context_template_length_params=[[5, 2], [10, 2]]),
    }

    def validate(self, wb: Workbench | None = None) -> None:
        super().validate(wb)
        if self.nullspace_relative and self.nullspace_threshold > 1:
            raise InputError(f"A relative nullspace_threshold must be at most 1, got {self.nullspace_threshold}.")


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


# ================================================================== the editors


def _param_name(wb: Workbench, layer: int) -> str:
    weight = wb.arch.site(wb.model, layer, "down_proj").weight
    for name, param in wb.model.named_parameters():
        if param is weight:
            return name
    raise InputError(f"The down-projection weight of layer {layer} is not a parameter of {wb.name}.")


def _layout(wb: Workbench, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of Δ [d_model, d_ff] in the parameter's own layout (Conv1D: [d_ff, d_model] = vᵀ uᵀ)."""
    u, v = u.detach().float().cpu().contiguous(), v.detach().float().cpu().contiguous()
    if wb.arch.down_orientation == "in_out":
        return v.T.contiguous(), u.T.contiguous()
    return u, v


def _closest_on_norm_image(gain: torch.Tensor, target: torch.Tensor, iterations: int = 200) -> torch.Tensor:
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


def _sandwich_residual(wb: Workbench, layer: int, m: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, float]:
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
        new_m = (_closest_on_norm_image(gain, target) * scale).float()
        miss = (norm(new_m.to(dtype)).float() - target).norm(dim=-1)
        fit = 1 - miss / resid.norm(dim=-1).clamp_min(1e-30)
    return new_m - m, float(fit.mean())


class _KeyValueEditor(Editor):
    """What ROME, MEMIT and AlphaEdit share: invariants, contexts, targets, statistics, meta."""

    target_site: ClassVar[str] = "layer"

    def _compute(self, wb: Workbench, requests: list[EditRequest], hparams: HParams,
                 progress: Callable[[float, str], None] | None = None) -> Edit:
        hp: KeyValueHParams = hparams  # type: ignore[assignment]
        report = progress or (lambda fraction, message: None)
        started = time.perf_counter()
        with frozen(wb.model):
            layers = sorted(hp.layer_indices(wb))
            report(0.0, "generating the contexts (prefixes) of every language")
            facts = fact_contexts(wb, requests, hp)
            z_layer = layers[-1]
            t0 = time.perf_counter()
            targets = []
            # progress: targets 0-50 %, key statistics 50-90 %, the update 90-100 %
            for i, fact in enumerate(facts):
                def target_step(f: float, message: str, i: int = i, fact: FactContexts = fact) -> None:
                    report(0.5 * (i + f) / len(facts), f"target value of {fact.label} ({i + 1}/{len(facts)}, "
                                                       f"layer {z_layer}): {message}")

                target_step(0.0, "starting")
                targets.append(compute_target(wb, fact, z_layer, self.target_site, hp, progress=target_step))
            t_targets = time.perf_counter() - t0
            moments, stats_meta = ({}, None)
            t0 = time.perf_counter()
            if hp.mom2_adjustment or not isinstance(self, ROMEEditor):
                report(0.5, f"key statistics C = E[k kᵀ] of layers {', '.join(map(str, layers))}")

                def stats_step(done: int, planned: int) -> None:
                    report(0.5 + 0.4 * done / max(planned, 1), f"key statistics of layers "
                           f"{', '.join(map(str, layers))}: {done:,} / {planned:,} tokens counted")

                moments, stats_meta = key_second_moments(wb, layers, requests, hp, progress=stats_step)
            t_stats = time.perf_counter() - t0
            t0 = time.perf_counter()
            report(0.9, f"inserting {len(facts)} key-value pair(s) into layer(s) {', '.join(map(str, layers))}")
            weights, layer_meta, notes = self._insert(wb, layers, facts, targets, moments, hp)
            t_insert = time.perf_counter() - t0
        meta = {
            "facts": [t.record for t in targets], "layers": layer_meta, "statistics": stats_meta, "notes": notes,
            "seconds": {"targets": round(t_targets, 3), "statistics": round(t_stats, 3),
                        "insert": round(t_insert, 3), "total": round(time.perf_counter() - started, 3)},
        }
        return Edit(weights=weights, meta={self.name: meta})

    def _insert(self, wb: Workbench, layers: list[int], facts: list[FactContexts], targets: list[TargetValue],
                moments: dict[int, torch.Tensor], hp: KeyValueHParams):
        raise NotImplementedError


@register("rome")
class ROMEEditor(_KeyValueEditor):
    """ROME / M-ROME: every language's (k*, v*) inserted into one layer at once (exact constraints).

    After :meth:`compute`, ``keys_`` and ``resid_`` hold ``K`` ``[n, d_ff]`` and
    ``R`` ``[n, d_model]`` (float64, one row per request language) so that the
    constraint ``(W + Δ) k_l = W k_l + r_l`` can be checked.
    """

    hparams_class = ROMEHParams
    target_site = "down_proj"

    def _insert(self, wb, layers, facts, targets, moments, hp):
        layer = layers[0]
        notes: list[str] = []
        keys = fact_keys(wb, layer, facts).to(torch.float64)                       # [n, d_ff]
        resid = torch.stack([t.delta for t in targets]).to(keys)                  # R = V − W K = δ  [n, d_model]
        c = moments.get(layer) if hp.mom2_adjustment else None
        u, v = rome_update(keys.T, resid.T, c, notes)
        self.keys_, self.resid_ = keys.cpu(), resid.cpu()
        delta_norm = float((u @ v).norm())
        return ({_param_name(wb, layer): _layout(wb, u, v)},
                [{"layer": layer, "pairs": len(facts), "resid_norm": float(resid.norm(dim=1).mean()),
                  "update_norm": delta_norm}], notes)


class _SpreadEditor(_KeyValueEditor):
    """MEMIT Alg. 1: the residual of the last layer spread over ``layers`` in ascending order."""

    target_site = "layer"

    def _layer_update(self, wb, layer, keys, resid, moments, hp, notes, info) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _insert(self, wb, layers, facts, targets, moments, hp):
        notes: list[str] = []
        z_layer = layers[-1]
        z = torch.stack([t.target for t in targets]).to(wb.device, torch.float64)    # [n, d_model]
        sandwich = wb.arch.post_ffn_norm is not None
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        layer_meta: list[dict[str, Any]] = []
        self.keys_, self.resid_ = {}, {}
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
                    value_resid, fit = _sandwich_residual(wb, layer, m, resid.float())
                    info["post_ffn_norm_fit"] = fit
                    resid = value_resid.to(torch.float64)
                    info["value_resid_norm"] = float(resid.norm(dim=1).mean())
                keys = keys.to(torch.float64)
                u, v = self._layer_update(wb, layer, keys.T, resid.T, moments, hp, notes, info)
                info["update_norm"] = float((u @ v).norm())
                self.keys_[layer], self.resid_[layer] = keys.cpu(), resid.cpu()
                name = _param_name(wb, layer)
                weights[name] = _layout(wb, u, v)
                layer_meta.append(info)
                if i < len(layers) - 1:   # the next layers see this update (MEMIT Alg. 1)
                    applied.enter_context(Edit(weights={name: weights[name]}).applied(wb))
        return weights, layer_meta, notes


@register("memit")
class MEMITEditor(_SpreadEditor):
    """MEMIT / M-MEMIT: every language's (k, z) pair, spread over ``layers`` (MEMIT Alg. 1)."""

    hparams_class = MEMITHParams

    def _layer_update(self, wb, layer, keys, resid, moments, hp, notes, info):
        return memit_update(keys, resid, moments[layer], float(hp.mom2_update_weight), notes)


@register("alphaedit")
class AlphaEditEditor(_SpreadEditor):
    """AlphaEdit (multilingual as M-MEMIT): MEMIT's targets, updates projected on the null space of C."""

    hparams_class = AlphaEditHParams

    def _layer_update(self, wb, layer, keys, resid, moments, hp, notes, info):
        c = moments[layer]
        key = (wb.spec, id(wb.model), layer, float(c.trace()), float(c[0].sum()), float(hp.nullspace_threshold),
               bool(hp.nullspace_relative))
        p, dim = nullspace_projection(c, float(hp.nullspace_threshold), bool(hp.nullspace_relative), key)
        info["nullspace_dim"] = dim
        if dim == 0:
            notes.append(f"layer {layer}: the null space of C is empty at threshold {hp.nullspace_threshold} "
                         f"({'relative' if hp.nullspace_relative else 'absolute'}); this layer is not changed")
            log.warning("AlphaEdit: %s", notes[-1])
        return alphaedit_update(keys, resid, p, float(hp.l2), notes)
