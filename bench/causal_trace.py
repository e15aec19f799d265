"""Benchmark: batched causal tracing against a ROME-style per-cell loop, same noise.

    .venv/bin/python bench/causal_trace.py [--model embedded] [--samples 10] [--window 10]
                                           [--max-rows 256] [--device auto]

One prompt ("The Eiffel Tower is located in the city of", subject "Eiffel
Tower", answer = the model's own next token), all three kinds (hidden, mlp,
attn), ``samples`` noise draws, ROME's window of layers for mlp/attn:

(r) the reference, ``analysis.reference.causal_trace_per_cell``: as ROME's ``trace_with_patch``,
    one forward of the full causal LM (logits at every position) per cell on
    1 + samples rows, the clean run recomputed as row 0 of every forward;
(p) the project, ``causal_trace``: restorations batched by token, tokens before
    the restored one taken from a key/value cache of the corrupted run, cells
    that are exactly p_corrupted not run, the LM head at the last position only.

Both draw the same noise (same seed and σ; σ, the embedding std, is computed
once before timing) and must agree: the script exits with status 1 when any
score differs by more than 1e-4. After a warm-up trace (one kind, one sample)
each path runs once. The last line is ``speedup: time(r) / time(p)``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.causal_trace import KINDS, causal_trace, noise_sigma  # noqa: E402
from analysis.model import load_model  # noqa: E402
from analysis.reference import causal_trace_per_cell  # noqa: E402
from bench.common import peak_rss_mib, print_model  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
TOLERANCE = 1e-4
TARGET = 5.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    wb = load_model(args.model, device=args.device)
    sigma = noise_sigma(wb, 3.0)  # computed (and cached) before timing
    common = dict(prompt=PROMPT, subject=SUBJECT, answer=None, kinds=KINDS, samples=args.samples, sigma=sigma,
                  window=args.window, seed=args.seed, max_rows=args.max_rows)
    causal_trace(wb, **dict(common, kinds=("hidden",), samples=1))  # warm-up
    sync(wb.device)

    ref, t_ref = timed(causal_trace_per_cell, wb, **common)
    sync(wb.device)
    proj, t_proj = timed(causal_trace, wb, **common)
    sync(wb.device)

    diff = max(float(np.abs(ref.scores[k] - proj.scores[k]).max()) for k in KINDS)
    diff = max(diff, abs(ref.p_clean - proj.p_clean), abs(ref.p_corrupted - proj.p_corrupted))
    T, L = len(proj.tokens), wb.n_layers
    rss_mib = peak_rss_mib()
    print_model(wb, f"{L} layers", f"d_model {wb.d_model}", f"vocab {wb.summary()['vocab_size']:,}")
    print(f"prompt: {PROMPT!r}, subject {SUBJECT!r} = tokens {proj.subject_range[0]}..{proj.subject_range[1] - 1} "
          f"of {T}: {proj.tokens}")
    print(f"answer: {proj.answer!r} (model's prediction), p_clean {proj.p_clean:.4f}, "
          f"p_corrupted {proj.p_corrupted:.4f}; samples {args.samples}, σ {sigma:.4f} (3 x embedding std), "
          f"window {args.window}")
    print(f"cells: {len(KINDS)} kinds x {T} tokens x {L} layers = {len(KINDS) * T * L}")
    best = {k: np.unravel_index(int(np.argmax(proj.scores[k])), proj.scores[k].shape) for k in KINDS}
    print("max score: " + "; ".join(f"{k} {proj.scores[k][best[k]]:.3f} at token {best[k][0]} "
                                     f"({proj.tokens[best[k][0]]!r}), layer {best[k][1]}" for k in KINDS))
    print(f"(r) causal_trace_per_cell (ROME-style reference): {t_ref:.2f} s")
    print(f"(p) causal_trace (batched):                        {t_proj:.2f} s (max_rows {args.max_rows})")
    print(f"max |score difference|: {diff:.2e} (tolerance {TOLERANCE:.0e})")
    print(f"peak memory: RSS {rss_mib:,.0f} MiB")
    print(f"target: speedup >= {TARGET:.2f}")
    print(f"speedup: {t_ref / t_proj:.2f}")
    return 0 if diff <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
