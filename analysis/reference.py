"""Slow reference implementations, written as the original papers' code runs: test oracles and benchmark baselines.

* :func:`causal_trace_per_cell` — ROME's ``trace_with_patch`` loop: one forward of
  the full causal LM per cell. ``tests/test_causal_trace.py`` checks
  :func:`analysis.causal_trace.causal_trace` against it, ``bench/causal_trace.py``
  times both.
* :func:`neuron_attributions_reference` — captum layer by layer, as a captum user
  would write it. ``tests/test_attribution.py`` checks
  :func:`analysis.attribution.neuron_attributions` against it, ``bench/attribution.py``
  times both.

Nothing in the app or the CLI uses this module.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from analysis.arch import first_tensor
from analysis.attribution import AttributionParams, _check_method, _neuron_modules, _prompt_ids
from analysis.causal_trace import Progress, TraceParams, TraceResult
from analysis.hooks import Hooks
from analysis.tokens import answer_ids
from analysis.trace_setup import kind_module, prepare, restored_layers

if TYPE_CHECKING:
    from analysis.model import Workbench


# ------------------------------------------------------- causal tracing, per cell


def causal_trace_per_cell(wb: Workbench, prompt: str, subject: str, answer: str | None = None,
                          params: TraceParams | None = None, *, progress: Progress | None = None,
                          language: str | None = None, **changes: Any) -> TraceResult:
    """Reference causal trace written as ROME's ``trace_with_patch`` loop (same arguments as
    :func:`analysis.causal_trace.causal_trace`).

    For every cell one forward of the full ``wb.model`` (logits at every
    position) on ``1 + samples`` rows: row 0 clean, rows 1.. with the same
    noise as :func:`analysis.causal_trace.causal_trace` on the subject's
    embeddings, the cell's states of rows 1.. overwritten with row 0's inside
    that forward. The clean run is recomputed in every forward and no cell is
    skipped. ``max_rows`` is accepted for a common signature and unused.
    """
    started = time.perf_counter()
    params = TraceParams.of(params, **changes)
    prep = prepare(wb, prompt, subject, answer, params, language)
    ids = prep.input_ids
    T, L = ids.shape[1], wb.n_layers
    report = progress or (lambda frac, message: None)
    with wb.lock, torch.no_grad():
        logits = _trace_with_patch(wb, ids, prep.subject, prep.noise, [])
        answer_id = prep.answer_id if prep.answer_id is not None else int(logits[0, -1].argmax())
        probs = torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]
        p_clean, p_corrupted = float(probs[0]), float(probs[1:].mean())
        scores = {}
        n_cells, done = len(prep.kinds) * T * L, 0
        for kind in prep.kinds:
            table = np.zeros((T, L), dtype=np.float64)
            for t in range(T):
                for layer in range(L):
                    states = [(t, kind, other) for other in restored_layers(kind, layer, int(params.window), L)]
                    logits = _trace_with_patch(wb, ids, prep.subject, prep.noise, states)
                    # ROME: softmax(logits[1:, -1, :]).mean(dim=0)[answer]
                    table[t, layer] = float(torch.softmax(logits[1:, -1].float(), dim=1).mean(dim=0)[answer_id])
                    done += 1
                    report(done / n_cells, f"{kind}: cell {done}/{n_cells}")
            scores[kind] = table
    meta = dict(prep.meta, seconds=round(time.perf_counter() - started, 3), method="per-cell")
    return TraceResult(prep.tokens, prep.subject, wb.tokenizer.decode([answer_id]), answer_id, p_clean,
                       p_corrupted, scores, meta)


def _trace_with_patch(wb: Workbench, ids: torch.Tensor, subject: tuple[int, int], noise: torch.Tensor,
                      states: list[tuple[int, str, int]]) -> torch.Tensor:
    """ROME's ``trace_with_patch``: full logits [1 + samples, T, vocab]; noise on rows 1..'s
    subject embeddings; each (token, kind, layer) state of rows 1.. restored from row 0."""
    s0, s1 = subject
    rows = ids.expand(1 + noise.shape[0], ids.shape[1])

    def corrupt(module, args, output):
        first_tensor(output)[1:, s0:s1] += noise
        return None

    def restore(tokens: list[int]):
        def hook(module, args, output):
            h = first_tensor(output)
            for t in tokens:
                h[1:, t] = h[0, t]
            return None
        return hook

    patch_spec: dict[tuple[str, int], list[int]] = {}
    for t, kind, layer in states:
        patch_spec.setdefault((kind, layer), []).append(t)
    with Hooks() as hooks:
        hooks.forward(wb.arch.embedding(wb.model), corrupt)
        for (kind, layer), tokens in patch_spec.items():
            hooks.forward(kind_module(wb, kind, layer), restore(tokens))
        return wb.model(input_ids=rows, attention_mask=torch.ones_like(rows), use_cache=False).logits


# ------------------------------------------------------- attribution, layer by layer


def neuron_attributions_reference(wb: Workbench, prompt: str, target: str, layers: Sequence[int] | None = None,
                                  steps: int = AttributionParams.steps, method: str = AttributionParams.method,
                                  target_tokens: str = AttributionParams.target_tokens) -> np.ndarray:
    """The scores of :func:`analysis.attribution.neuron_attributions` computed as a captum user would:
    layer by layer, whole model, whole prompt.

    For each layer one ``IntegratedGradients`` call over a function that runs
    ``wb.model`` on the full prompt (plus teacher-forced answer tokens) for all
    steps, replaces that layer's neurons at the last prompt token through a
    hook, and reads the full logits. Returns ``[len(layers), d_ff]``.
    """
    from captum.attr import IntegratedGradients

    _check_method(method, steps, target_tokens)
    chosen = wb.check_layers(layers)
    ids = _prompt_ids(wb, prompt)
    tgt = torch.tensor(answer_ids(wb.tokenizer, prompt, target), device=wb.device)
    tgt = tgt if target_tokens == "mean" else tgt[:1]
    full = torch.cat([ids[0], tgt[:-1]]).unsqueeze(0)
    last = ids.shape[1] - 1
    modules = _neuron_modules(wb)
    out = []
    with wb.lock:
        for layer in chosen:
            clean: dict[str, torch.Tensor] = {}

            def read(module, args, output):
                clean["w"] = output[0, last].detach()

            with Hooks() as hooks, torch.no_grad():
                hooks.forward(modules[layer], read)
                wb.model(input_ids=full)

            def probability(x: torch.Tensor, layer=layer) -> torch.Tensor:
                def put(module, args, output):
                    output = output.clone()
                    output[:, last] = x.to(output.dtype)
                    return output

                with Hooks() as hooks:
                    hooks.forward(modules[layer], put)
                    logits = wb.model(input_ids=full.expand(x.shape[0], -1)).logits.float()
                probs = torch.softmax(logits[:, last:last + len(tgt)], dim=-1)
                return probs.gather(-1, tgt.expand(x.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(1)

            inputs = clean["w"].unsqueeze(0)
            attr = IntegratedGradients(probability).attribute(
                inputs, baselines=torch.zeros_like(inputs), n_steps=steps, method=method,
                internal_batch_size=steps)
            out.append(attr[0].detach().float().cpu().numpy())
    return np.stack(out)
