"""Benchmark: integrated-gradient attributions of every neuron of every layer for one prompt.

    .venv/bin/python bench/attribution.py [--model embedded] [--steps 20] [--device auto]
        [--prompt "The Eiffel Tower is located in the city of"] [--target Paris] [--repeats 1]

(a) the baseline: captum run layer by layer as a user would
    (``analysis.reference.neuron_attributions_reference``): for each layer one
    ``IntegratedGradients`` call whose forward function runs the whole causal LM
    on the whole prompt for all steps, with a hook that sets that layer's neurons
    at the last prompt token, and reads the full logits;
(b) the project (``neuron_attributions``): the prompt's other tokens once, then
    every (layer, step) row in one forward and one backward over the last token,
    the LM head at the answer position only.

Both use the same quadrature (captum's ``riemann_right``, ``--steps`` points)
and the same zero baseline, so they compute the same numbers: the script checks
that every score agrees within 1e-4 and exits 1 otherwise. After one warm-up
call of each, ``--repeats`` rounds time both; the median is reported. The last
line is ``speedup: time(a) / time(b)``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.attribution import neuron_attributions  # noqa: E402
from analysis.model import load_model  # noqa: E402
from analysis.reference import neuron_attributions_reference  # noqa: E402
from bench.common import device_line, peak_rss_mib  # noqa: E402

TARGET = 3.0
TOLERANCE = 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--target", default="Paris")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    wb = load_model(args.model, device=args.device)
    n_tokens = len(wb.tokenizer(args.prompt)["input_ids"])
    print(f"model {wb.name} · {wb.n_layers} layers × {wb.n_neurons} neurons · device {device_line(wb)} · "
          f"torch {torch.__version__}")
    print(f"prompt {args.prompt!r} ({n_tokens} tokens) → {args.target!r}; {args.steps} steps, riemann_right")

    def project():
        return neuron_attributions(wb, args.prompt, args.target, steps=args.steps).scores

    def reference():
        return neuron_attributions_reference(wb, args.prompt, args.target, steps=args.steps)

    ours, ref = project(), reference()  # warm-up, and the agreement check
    diff = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    print(f"max |project − reference| = {diff:.2e} (largest attribution {scale:.3f})")
    times = {"reference": [], "project": []}
    for _ in range(args.repeats):
        for name, fn in (("reference", reference), ("project", project)):
            if wb.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if wb.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    t_ref, t_ours = statistics.median(times["reference"]), statistics.median(times["project"])
    print(f"(a) captum layer by layer: {t_ref:.2f} s")
    print(f"(b) project:               {t_ours:.2f} s")
    print(f"peak RSS {peak_rss_mib() / 1024:.2f} GiB; target speedup ≥ {TARGET}")
    if diff > TOLERANCE:
        print(f"FAIL: results differ by {diff:.2e} > {TOLERANCE}")
        return 1
    print(f"speedup: {t_ref / t_ours:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
