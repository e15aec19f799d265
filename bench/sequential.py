"""Benchmark: the target values z of one batch of requests, one by one against batched, in the same run.

    .venv/bin/python bench/sequential.py [--n 32] [--offset 100] [--language en] [--layer 6] [--device auto]

``--n`` MzsRE dev records (from ``--offset``; dev records 100-131 by default, not reported ones) in
``--language``, as one batch of a sequential stream, on the embedded model with the embedded MEMIT /
LangEdit target settings (contexts, steps, learning rate; the z layer ``--layer`` = the last edited layer):

* one by one: :func:`editors.keyvalue.compute_targets` called on each request alone (what the key-value
  editors did before batching: one optimisation per fact);
* batched: one :func:`~editors.keyvalue.compute_targets` call on the whole batch (every request's δ in one
  padded batch, each on its own loss; converged requests leave the batch).

Both start after a warm-up call; the contexts (generated prefixes) are made before timing. It prints both
times, the largest difference between the two results' δ (relative to ||δ||) and the steps each request
took, and as its last line ``speedup: X`` (one by one / batched). Results go to ``bench/results/sequential_z.csv``.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--offset", type=int, default=100)
    parser.add_argument("--language", default="en")
    parser.add_argument("--layer", type=int, default=None, help="z layer (default: the preset's last layer)")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "mzsre" / "dev"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sequential_z.csv"))
    args = parser.parse_args()

    import torch

    from analysis.model import load_model
    from bench.common import print_model
    from editors.evaluate import load_records
    from editors.keyvalue import compute_targets, fact_contexts
    from editors.langedit import LangEditHParams
    from editors.requests import EditRequest

    wb = load_model("embedded", device=args.device)
    print_model(wb)
    hp = LangEditHParams.preset(wb)
    layer = args.layer if args.layer is not None else max(hp.layer_indices(wb))
    records = load_records(args.dataset, [args.language], args.n, args.offset)
    requests = [EditRequest.from_record(r, [args.language]).validate(wb) for r in records]
    facts = fact_contexts(wb, requests, hp)
    print(f"batch: {len(facts)} requests ({args.language}, MzsRE dev {args.offset}-{args.offset + args.n - 1}), "
          f"{sum(len(f.contexts) for f in facts) / len(facts):.1f} contexts each, z at layer {layer}, "
          f"{hp.v_num_grad_steps} steps at most, early stop below {hp.early_stop_loss}")
    compute_targets(wb, facts[:2], layer, "layer", hp)                 # warm-up

    t0 = time.perf_counter()
    single = [compute_targets(wb, [f], layer, "layer", hp)[0] for f in facts]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = compute_targets(wb, facts, layer, "layer", hp)
    t_batched = time.perf_counter() - t0

    rel = max(float((a.delta - b.delta).norm() / a.delta.norm().clamp_min(1e-12)) for a, b in zip(single, batched))
    same_steps = sum(a.record["steps"] == b.record["steps"] for a, b in zip(single, batched))
    steps = [b.record["steps"] for b in batched]
    print(f"one by one: {t_single:.1f} s ({t_single / len(facts):.2f} s per request)")
    print(f"batched:    {t_batched:.1f} s ({t_batched / len(facts):.2f} s per request)")
    print(f"largest ||δ_batched − δ_single|| / ||δ_single||: {rel:.2e}; same number of steps for "
          f"{same_steps}/{len(facts)} requests (steps: min {min(steps)}, mean {sum(steps) / len(steps):.1f}, "
          f"max {max(steps)})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["requests", "language", "offset", "z_layer", "threads", "one_by_one_s", "batched_s",
                         "speedup", "max_relative_delta_difference", "same_steps"])
        writer.writerow([len(facts), args.language, args.offset, layer, torch.get_num_threads(),
                         round(t_single, 2), round(t_batched, 2), round(t_single / t_batched, 2), f"{rel:.2e}",
                         same_steps])
    print(f"speedup: {t_single / t_batched:.2f}")


if __name__ == "__main__":
    main()
