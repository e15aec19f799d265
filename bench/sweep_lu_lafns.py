"""LU-LAFNs preset sweep on the embedded model (papers/lu-lafns.md Tables 4-5): edited layers, then β.

Each configuration edits the same MzsRE dev records in en+zh (multilingual editing,
one record at a time) and is scored with :mod:`editors.evaluate`; the figure is
Table 2's "avg" (the mean of the F1 and EM of Reliability, Generality, Locality
and Portability in both languages). "Num (Proportion)" is the mean size of D_G
per edited layer and its share of the layer's neurons, as Table 5. The records
are taken after the first ``--offset`` ones, so the 50 records of the reported
evaluation (0-49) are not the ones the preset is chosen on.

    python bench/sweep_lu_lafns.py --n 6 --offset 100            # layers at β = 0.1, then β at the best layers

Run folders go to ``runs/sweep-lu-lafns/<config>`` and are resumed; the table is
also written to ``bench/results/lu_lafns_sweep.csv``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Table 4 analogue: single layers (an early LAFN peak, a middle peak) and groups with and without the last layer.
LAYER_SETS = [[3], [9], [8, 9, 10], [3, 9, 10, 17], [8, 9, 10, 17]]
#: Table 5 analogue, at the best layer set.
BETAS = [0.0, 0.3, 0.6]


def main(argv: list[str] | None = None) -> int:
    from bench.common import sweep_parser, sweep_point

    args = sweep_parser(__doc__, "sweep-lu-lafns", ["layers", "beta"]).parse_args(argv)

    import pandas as pd

    from analysis.model import load_model

    wb = load_model("embedded")

    def run(layers: list[int], beta: float) -> dict:
        name = f"L{'-'.join(map(str, layers))}_b{beta:g}"
        figures, out = sweep_point(wb, "lu-lafns", {"layers": layers, "beta": beta}, name, args.dataset,
                                   args.n, args.offset, args.out)
        sizes = _dg_sizes(out)
        row = {"layers": ",".join(map(str, layers)), "beta": beta,
               "num": sizes, "proportion %": 100 * sizes / wb.n_neurons if sizes == sizes else float("nan"),
               **figures}
        print(f"{name}: avg {row['avg F1/EM']:.2f}  D_G {sizes:.0f}/layer", flush=True)
        return row

    rows = []
    if args.only in ("layers", "all"):
        rows += [run(layers, 0.1) for layers in LAYER_SETS]
    if args.only in ("beta", "all"):
        best = LAYER_SETS[0]
        if rows:
            best = [int(x) for x in max(rows, key=lambda r: r["avg F1/EM"])["layers"].split(",")]
        rows += [run(best, beta) for beta in BETAS]
    table = pd.DataFrame(rows)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    table.to_csv(ROOT / "bench" / "results" / "lu_lafns_sweep.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(2).to_string(index=False))
    return 0


def _dg_sizes(out: Path) -> float:
    """Mean |D_G| per edited layer over the run's edits (from the edits' diagnostics)."""
    import json

    sizes = []
    for line in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        for group in (r.get("diagnostics") or {}).get("lu_lafns", []):
            sizes += list(group.get("d_g_sizes", {}).values())
    return sum(sizes) / len(sizes) if sizes else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
