"""Benchmark: the cost of counting neuron activations (lu-lafns Eq. 4) against a plain forward pass.

    .venv/bin/python bench/neurons.py [--model embedded] [--facts N] [--languages en,zh]
                                      [--batch-size 32] [--repeats 3] [--device auto]

The same batches of the bundled demo corpus (full statements, sorted by
length and batched as ``count_activations`` does) go through

(a) the baseline: a plain forward of the causal LM that computes the LM head
    only at each row's last real token — the decoder stack under
    ``torch.no_grad()``, then the final logits at one position per row;
(b) ``count_batch``: the same decoder stack traced with nnsight, every
    layer's neurons compared with 0 and summed over the real tokens.

For reference it also times (s) the decoder stack alone, without any LM head
(what (b) runs, minus nnsight and the counting), and prints time(b)/time(s).

Tokenisation is done once, up front; only model work is timed. After a
warm-up batch, each of ``--repeats`` rounds takes every batch through the
paths back to back in a rotating order; the median round is reported. The last line is
``overhead: time(b) / time(a)``.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.model import Workbench, load_model  # noqa: E402
from bench.common import peak_rss_mib, print_model  # noqa: E402
from analysis.neurons import corpus_texts, count_batch  # noqa: E402
from analysis.tokens import Batch, encode  # noqa: E402
from data import load_corpus  # noqa: E402

TARGET = 1.15


def make_batches(wb: Workbench, corpus, languages: list[str], batch_size: int) -> list[Batch]:
    """Statements per language, sorted by length and batched exactly as count_activations does."""
    batches = []
    for lang in languages:
        texts, _ = corpus_texts(corpus, lang, "statement")
        texts = sorted(texts, key=len)  # same order as count_activations' stable argsort by length
        for start in range(0, len(texts), batch_size):
            batches.append(encode(wb.tokenizer, texts[start:start + batch_size]).to(wb.device))
    return batches


def last_token_logits(wb: Workbench, batch: Batch) -> torch.Tensor:
    """(a) The causal LM's next-token logits at each row's last real token only."""
    with torch.no_grad():
        # same inputs as count_batch (position ids from the mask, use_cache=False); the base
        # model already ends with the final norm (model.norm, transformer.ln_f, ...)
        return wb.logits_at(wb.forward_inputs(batch.input_ids, batch.attention_mask), batch.last)


def stack_only(wb: Workbench, batch: Batch) -> None:
    """(s) The decoder stack alone (no LM head, no tracing)."""
    base, _ = wb.base_model()
    with torch.no_grad():
        base(**wb.forward_inputs(batch.input_ids, batch.attention_mask))


def count(wb: Workbench, batch: Batch) -> None:
    """(b) lu-lafns Eq. 4 counts of one batch (all real tokens)."""
    count_batch(wb, batch.input_ids, batch.attention_mask, batch.positions("all"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, wb: Workbench, batch: Batch) -> float:
    sync(wb.device)
    started = time.perf_counter()
    fn(wb, batch)
    sync(wb.device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--facts", type=int, default=None,
                        help="facts per relation of the demo corpus (default: 2 on CPU, all (80) on GPU)")
    parser.add_argument("--languages", default="en,zh")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    languages = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
    wb = load_model(args.model, device=args.device)
    facts = args.facts or (80 if wb.device.type == "cuda" else 2)
    corpus = load_corpus("demo", languages=languages, max_facts=facts)
    batches = make_batches(wb, corpus, languages, args.batch_size)
    n_texts = sum(int(b.input_ids.shape[0]) for b in batches)
    n_tokens = sum(int(b.real.sum()) for b in batches)
    n_padded = sum(int(b.input_ids.numel()) for b in batches)

    # warm-up: one batch through every path (allocator, kernels, nnsight wrapper)
    paths = {"a": last_token_logits, "b": count, "s": stack_only}
    for fn in paths.values():
        fn(wb, batches[-1])
    if wb.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(wb.device)

    # Each round takes every batch through all three paths back to back, in a rotating order,
    # so that load from other processes hits the paths alike; a path's round time is the sum
    # over the batches.
    times: dict[str, list[float]] = {name: [] for name in paths}
    orders = list(itertools.permutations(paths))
    for r in range(args.repeats):
        totals = dict.fromkeys(paths, 0.0)
        for i, batch in enumerate(batches):
            for name in orders[(r * len(batches) + i) % len(orders)]:
                totals[name] += timed(paths[name], wb, batch)
        for name, total in totals.items():
            times[name].append(total)
    ta, tb, ts = (statistics.median(times[name]) for name in ("a", "b", "s"))

    rss_mib = peak_rss_mib()
    print_model(wb, f"{wb.n_layers} layers x {wb.n_neurons} neurons")
    print(f"corpus: demo, {facts} fact(s) per relation, languages {','.join(languages)}: "
          f"{n_texts} texts, {n_tokens} real tokens ({n_padded} with padding and BOS), "
          f"{len(batches)} batches of <= {args.batch_size}")
    print(f"rounds: {args.repeats} (median of each); " + "; ".join(
        f"{name} = {', '.join(f'{t:.3f}' for t in times[name])} s" for name in ("a", "b", "s")))
    print(f"(a) forward, LM head at the last token: {ta:.3f} s, {n_tokens / ta:,.0f} tokens/s")
    print(f"(b) count_batch (Eq. 4 counts):        {tb:.3f} s, {n_tokens / tb:,.0f} tokens/s")
    print(f"(s) decoder stack only (reference):    {ts:.3f} s, {n_tokens / ts:,.0f} tokens/s; "
          f"b/s = {tb / ts:.3f}")
    memory = f"peak memory: RSS {rss_mib:,.0f} MiB"
    if wb.device.type == "cuda":
        memory += f", CUDA allocated {torch.cuda.max_memory_allocated(wb.device) / 2**20:,.0f} MiB"
    print(memory)
    print(f"target: overhead <= {TARGET:.2f}")
    print(f"overhead: {tb / ta:.3f}")


if __name__ == "__main__":
    main()
