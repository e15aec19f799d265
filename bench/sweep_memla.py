"""MEMLA preset sweep on the embedded model: Eq. 8's coefficient c, the neuron threshold t, then the layers.

The authors' constant c = 0.5 inserts half of what was trained (their code; papers/memla.md leaves c as "a
function generating a coefficient"); c = 1 inserts all of it. The threshold (0.3 × a prompt's maximum
attribution in the authors' code) sets how many knowledge neurons, hence how many value vectors and how
large a rank, each editor gets. Each configuration edits the same MzsRE dev records in en+zh (one record
at a time), scored with :mod:`editors.evaluate`; the figure is Table 2's "avg" (the mean of the F1 and EM
of Reliability, Generality, Locality and Portability in both languages). The records are taken after the
first ``--offset`` ones, so the 50 records of the reported evaluation (0-49) are not the ones the preset is
chosen on. The layers searched for knowledge neurons (every layer in the authors' code) are the last
stage: the top attributions of a 270M model sit in its last layer, whose value vectors every prompt reads.

    python bench/sweep_memla.py --n 6 --offset 100        # c at t = 0.3, t at the best c, then the layers

Run folders go to ``runs/sweep-memla/<config>`` and are resumed; the table is also written to
``bench/results/memla_sweep.csv``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COEFFICIENTS = [0.5, 1.0]
THRESHOLDS = [0.2, 0.3, 0.5]
#: Gemma 3 270M has 18 layers: every layer, every layer but the last, the middle ones.
LAYER_SETS = [[], list(range(17)), list(range(4, 13))]


def main(argv: list[str] | None = None) -> int:
    from bench.common import save_sweep, sweep_parser, sweep_point

    args = sweep_parser(__doc__, "sweep-memla", ["c", "threshold", "layers"]).parse_args(argv)

    from analysis.model import load_model

    wb = load_model("embedded")
    done: dict[tuple, dict] = {}

    def run(c: float, threshold: float, layers: list[int]) -> dict:
        key = (c, threshold, ",".join(map(str, layers)) or "all")
        if key not in done:
            name = f"c{c:g}_t{threshold:g}" + (f"_L{layers[0]}-{layers[-1]}" if layers else "")
            fields = {"c": c, "threshold": threshold, **({"layers": layers} if layers else {})}   # [] = preset's
            figures, _ = sweep_point(wb, "memla", fields, name,
                                     args.dataset, args.n, args.offset, args.out)
            done[key] = {"c": c, "threshold": threshold, "layers": key[2], **figures}
            print(f"{name}: avg {figures['avg F1/EM']:.2f}  {figures['s/edit']:.1f} s/edit", flush=True)
        return done[key]

    def best_of(rows: list[dict]) -> dict:       # ties keep the earlier (the authors') value
        return max(rows, key=lambda r: r["avg F1/EM"])

    c, t = 0.5, 0.3
    if args.only in ("c", "all"):
        c = best_of([run(value, 0.3, []) for value in COEFFICIENTS])["c"]
    if args.only in ("threshold", "all"):
        t = best_of([run(c, 0.3, [])] + [run(c, value, []) for value in THRESHOLDS if value != 0.3])["threshold"]
    if args.only in ("layers", "all"):
        for layers in LAYER_SETS:
            run(c, t, layers)
    save_sweep(list(done.values()), "memla_sweep.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
