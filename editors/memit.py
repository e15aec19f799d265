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

The shared steps (one function each, named after its symbol; in :mod:`editors.keyvalue`)
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

import logging
import time
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from analysis.errors import InputError
from editors.base import Editor, frozen, register
from editors.edit import Edit
from editors.hparams import Constraint, HParams, Interval
from editors.keyvalue import (  # noqa: F401 (re-exported: the shared steps keep their old address)
    FactContexts, KeyValueHParams, TargetValue, _keys_and_reads, alphaedit_update, compute_target, compute_targets,
    fact_contexts, fact_keys, key_second_moments, memit_update, nullspace_projection, rome_update, spread_update)
from editors.keyvalue import closest_on_norm_image as _closest_on_norm_image  # noqa: F401 (old address)
from editors.keyvalue import factor_layout as _layout
from editors.keyvalue import param_name as _param_name
from editors.keyvalue import sandwich_residual as _sandwich_residual  # noqa: F401 (old address)
from editors.requests import EditRequest
from editors.sequential import LayerMemory, SequentialMethod, register_sequential

if TYPE_CHECKING:
    from analysis.model import Workbench

log = logging.getLogger(__name__)


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


# ================================================================== the editors


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

    def _insert(self, wb: Workbench, layers: list[int], facts: list[FactContexts], targets: list[TargetValue],
                moments: dict[int, torch.Tensor], hp: KeyValueHParams):
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

    def _layer_update(self, wb: Workbench, layer: int, keys: torch.Tensor, resid: torch.Tensor,
                      moments: dict[int, torch.Tensor], hp: KeyValueHParams, notes: list[str],
                      info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _insert(self, wb: Workbench, layers: list[int], facts: list[FactContexts], targets: list[TargetValue],
                moments: dict[int, torch.Tensor], hp: KeyValueHParams):
        notes: list[str] = []

        def update(layer: int, keys: torch.Tensor, resid: torch.Tensor, info: dict[str, Any]):
            return self._layer_update(wb, layer, keys, resid, moments, hp, notes, info)

        spread = spread_update(wb, layers, facts, targets, update)
        self.keys_, self.resid_ = spread.keys, spread.resid
        return spread.weights, spread.layer_meta, notes


@register("memit")
class MEMITEditor(_SpreadEditor):
    """MEMIT / M-MEMIT: every language's (k, z) pair, spread over ``layers`` (MEMIT Alg. 1)."""

    hparams_class = MEMITHParams

    def _layer_update(self, wb: Workbench, layer: int, keys: torch.Tensor, resid: torch.Tensor,
                      moments: dict[int, torch.Tensor], hp: KeyValueHParams, notes: list[str],
                      info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return memit_update(keys, resid, moments[layer], float(hp.mom2_update_weight), notes)


@register("alphaedit")
class AlphaEditEditor(_SpreadEditor):
    """AlphaEdit (multilingual as M-MEMIT): MEMIT's targets, updates projected on the null space of C."""

    hparams_class = AlphaEditHParams

    def _layer_update(self, wb: Workbench, layer: int, keys: torch.Tensor, resid: torch.Tensor,
                      moments: dict[int, torch.Tensor], hp: KeyValueHParams, notes: list[str],
                      info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
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


# ================================================================== on a stream (editors.sequential)


@register_sequential("memit")
class SequentialMEMIT(SequentialMethod):
    """MEMIT applied batch after batch (papers/langedit.md §4.1.4): each batch's ΔW = R Kᵀ (λ C_0 + K Kᵀ)⁻¹
    on the weights the earlier batches left; nothing of the earlier batches enters the solve."""

    title = "MEMIT"
    hparams_class = MEMITHParams

    def layer_update(self, layer: int, memory: LayerMemory, keys: torch.Tensor, resid: torch.Tensor,
                     hp: KeyValueHParams, notes: list[str], info: dict[str, Any]):
        return memit_update(keys, resid, memory.k0, float(hp.mom2_update_weight), notes), None


@register_sequential("alphaedit")
class SequentialAlphaEdit(SequentialMethod):
    """AlphaEdit's sequential form (its code): P from K_0 only, fixed for the whole stream, and the keys edited
    in earlier batches kept in the solve (``cache_c`` = Σ K_p K_pᵀ): ΔW = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + λI)⁻¹."""

    title = "AlphaEdit"
    hparams_class = AlphaEditHParams

    def layer_update(self, layer: int, memory: LayerMemory, keys: torch.Tensor, resid: torch.Tensor,
                     hp: KeyValueHParams, notes: list[str], info: dict[str, Any]):
        key = ("k0", layer, memory.n0, float(memory.k0.trace()), float(memory.k0[0].sum()),
               float(hp.nullspace_threshold), bool(hp.nullspace_relative))
        p, dim = nullspace_projection(memory.k0, float(hp.nullspace_threshold), bool(hp.nullspace_relative), key)
        cache = memory.edited_kkt if memory.edited else None
        return alphaedit_update(keys, resid, p, float(hp.l2), notes, cache=cache), dim
