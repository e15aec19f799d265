"""LangEdit's null-space threshold and λ on the embedded model, chosen on MzsRE dev records 100-149 (not those
reported).

Each configuration edits the same short stream (en then zh, ``--steps`` steps of ``--batch`` dev records from
100-149, seeded) with :func:`editors.sequential_run.run_sequential`; the figure is the mean over languages of
Efficacy, Generality and Specificity after the last step (papers/langedit.md Table 1's three editing metrics),
with the first batch's efficacy at the end (retention) beside it.

    python bench/sweep_langedit.py [--batch 6] [--steps 2]

Run folders go to ``runs/sweep-langedit/<config>`` and are resumed; the table goes to
``bench/results/langedit_sweep.csv``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: (nullspace_threshold, l2): AlphaEdit's 2e-2 with Eq. 10's λ = 1 and AlphaEdit's 10, and a smaller threshold.
GRID = [(2e-2, 1.0), (2e-2, 10.0), (5e-3, 1.0)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "mzsre" / "dev"))
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--languages", default="en,zh")
    ap.add_argument("--records", default="100-149")
    ap.add_argument("--out", default=str(ROOT / "runs" / "sweep-langedit"))
    args = ap.parse_args(argv)

    from analysis.model import load_model
    from bench.common import save_sweep
    from editors.sequential_run import StreamConfig, final_rows, read_run, retention_rows, run_sequential

    wb = load_model("embedded")
    config = StreamConfig(args.dataset, args.languages.split(","), batch=args.batch, steps=args.steps,
                          records=args.records, flores_sentences=10)
    rows = []
    for threshold, l2 in GRID:
        name = f"t{threshold:g}_l2{l2:g}"
        out = Path(args.out) / name
        run_sequential(wb, config, ["langedit"], out,
                       hparams={"langedit": {"nullspace_threshold": threshold, "l2": l2}},
                       progress=lambda m, s, f, msg, name=name: print(f"  {name} step {s} {f:4.0%} {msg[:70]}",
                                                                       flush=True))
        view = read_run(out)
        final = {r["language"]: r for r in final_rows(view) if r["method"] == "langedit"}
        mean = final["all"]
        score = (mean["efficacy"] + mean["generality"] + mean["specificity"]) / 3
        kept = [r for r in retention_rows(view) if r["method"] == "langedit"]
        ranks = [r["nullspace"] for r in view.steps["langedit"]]
        rows.append({"nullspace_threshold": threshold, "l2": l2, "score": score, "efficacy": mean["efficacy"],
                     "generality": mean["generality"], "specificity": mean["specificity"],
                     "first_batch_efficacy_end": kept[-1]["efficacy"] if kept else None,
                     "nullspace_last_step": ranks[-1] if ranks else None})
        print(f"{name}: score {score:.2f}", flush=True)
    best = max(rows, key=lambda r: r["score"])            # ties keep the earlier (AlphaEdit's values first)
    print(f"best: nullspace_threshold {best['nullspace_threshold']}, l2 {best['l2']}")
    save_sweep(rows, "langedit_sweep.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
