"""MPN's learning rate and step budget on the embedded model, chosen on MzsRE dev records 100-149 (not those
reported).

Each configuration runs ``neuroglot evaluate``'s engine with MPN-only (papers/mpn.md §3.3) on ``--n`` dev
records from ``--offset`` 100: source en, parallel pool de, fr, es, zh, ru. The figure is the mean of
Reliability, MLG, CLG avg and Locality (papers/mpn.md Table 1's columns, EM %), with seconds per edit beside.

    python bench/sweep_mpn.py [--n 5]

Run folders go to ``runs/sweep-mpn/<config>`` and are resumed; the table goes to ``bench/results/mpn_sweep.csv``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: (lr, steps): Adam's step size on the patch and the step budget.
GRID = [(1e-2, 40), (1e-1, 40)]
LANGS = ["en", "de", "fr", "es", "zh", "ru"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "mzsre" / "dev"))
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--offset", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "runs" / "sweep-mpn"))
    args = ap.parse_args(argv)
    if not (100 <= args.offset and args.offset + args.n <= 150):
        raise SystemExit("presets are chosen on dev records 100-149 only")

    from analysis.model import load_model
    from bench.common import save_sweep
    from editors.evaluate import EvalConfig, load_records, mpn_table, run_evaluation

    wb = load_model("embedded")
    records = load_records(args.dataset, LANGS, args.n, args.offset)
    rows = []
    for lr, steps in GRID:
        name = f"lr{lr:g}_steps{steps}"
        config = EvalConfig(dataset=str(Path(args.dataset).resolve()), methods=["mpn"], edit_sets=[LANGS],
                            test_languages=LANGS, n=args.n, offset=args.offset,
                            hparams={"mpn": {"lr": lr, "steps": steps}}, model=wb.spec)
        frame = run_evaluation(wb, config, Path(args.out) / name, records=records,
                               progress=lambda f, m, name=name: print(f"  {name} {f:4.0%} {m[:70]}", flush=True))
        table = mpn_table(frame, "+".join(LANGS), LANGS, "en")
        row = table[table["method"] == "MPN (only)"].iloc[0]
        score = (row["Reliability (en)"] + row["MLG"] + row["CLG avg"] + row["Locality"]) / 4
        rows.append({"lr": lr, "steps": steps, "score": score, "reliability": row["Reliability (en)"],
                     "mlg": row["MLG"], "clg_avg": row["CLG avg"], "locality": row["Locality"],
                     "patches": row["patches"], "s_per_edit": row["s/edit"]})
        print(f"{name}: score {score:.2f}", flush=True)
    best = max(rows, key=lambda r: r["score"])            # ties keep the earlier (smaller step size)
    print(f"best: lr {best['lr']}, steps {best['steps']}")
    save_sweep(rows, "mpn_sweep.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
