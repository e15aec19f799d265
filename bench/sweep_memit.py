"""M-MEMIT preset sweep on the embedded model: the window of edited layers, then λ (``mom2_update_weight``).

The embedded M-MEMIT preset's layers (2-6) were chosen from the causal trace and
its λ (2000) by a scaling argument (see the comment at the preset in
``editors/memit.py``); this sweep measures them against other choices. Each
configuration edits the same MzsRE dev records in en+zh (multilingual editing,
one record at a time), scored with :mod:`editors.evaluate`; the figure is Table
2's "avg" (the mean of the F1 and EM of Reliability, Generality, Locality and
Portability in both languages). The records are taken after the first
``--offset`` ones, so the 50 records of the reported evaluation (0-49) are not
the ones the preset is chosen on. AlphaEdit shares these layers (it has no λ).

    python bench/sweep_memit.py --n 6 --offset 100        # layer windows at λ 2000, then λ at the best window

Run folders go to ``runs/sweep-memit/<config>`` and are resumed; the table is
also written to ``bench/results/memit_sweep.csv``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Windows of five consecutive layers of Gemma 3 270M (18 layers): early, the preset (around the causal
#: trace's MLP peak at layer 4) and later.
LAYER_SETS = [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [5, 6, 7, 8, 9]]
#: λ at the best window: the preset, a quarter of it and the papers' 15000.
LAMBDAS = [500.0, 2000.0, 15000.0]


def main(argv: list[str] | None = None) -> int:
    from bench.common import save_sweep, sweep_parser, sweep_point

    args = sweep_parser(__doc__, "sweep-memit", ["layers", "lambda"]).parse_args(argv)

    from analysis.model import load_model

    wb = load_model("embedded")
    done: dict[tuple[str, float], dict] = {}

    def run(layers: list[int], lam: float) -> dict:
        key = (",".join(map(str, layers)), lam)
        if key not in done:
            name = f"L{'-'.join(map(str, layers))}_lam{lam:g}"
            figures, _ = sweep_point(wb, "memit", {"layers": layers, "mom2_update_weight": lam}, name,
                                     args.dataset, args.n, args.offset, args.out)
            done[key] = {"layers": key[0], "lambda": lam, **figures}
            print(f"{name}: avg {figures['avg F1/EM']:.2f}", flush=True)
        return done[key]

    best = [2, 3, 4, 5, 6]
    if args.only in ("layers", "all"):
        best = [int(x) for x in max((run(ls, 2000.0) for ls in LAYER_SETS),
                                    key=lambda r: r["avg F1/EM"])["layers"].split(",")]
    if args.only in ("lambda", "all"):
        for lam in LAMBDAS:
            run(best, lam)
    save_sweep(list(done.values()), "memit_sweep.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
