"""IKE's number of demonstrations k on the embedded model, chosen on MzsRE dev records (not those reported).

Each k edits the same records in en+zh (one record at a time), scored with :mod:`editors.evaluate`; the
figure is Table 2's "avg" (the mean of the F1 and EM of Reliability, Generality, Locality and Portability in
both languages). The retrieval variant (``remake``) takes the k chosen here; its threshold comes from
``bench/retrieval_threshold.py``.

    python bench/sweep_in_context.py --n 10 --offset 100

Run folders go to ``runs/sweep-in-context/<config>`` and are resumed; the table is also written to
``bench/results/in_context_sweep.csv``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMONSTRATIONS = [0, 2, 6]


def main(argv: list[str] | None = None) -> int:
    from bench.common import save_sweep, sweep_parser, sweep_point

    args = sweep_parser(__doc__, "sweep-in-context", ["k"]).parse_args(argv)

    from analysis.model import load_model

    wb = load_model("embedded")
    rows = []
    for k in DEMONSTRATIONS:
        figures, _ = sweep_point(wb, "ike", {"k": k}, f"ike_k{k}", args.dataset, args.n, args.offset, args.out)
        rows.append({"method": "ike", "k": k, **figures})
        print(f"ike k={k}: avg {figures['avg F1/EM']:.2f}  {figures['s/edit']:.1f} s/edit", flush=True)
    best = max(rows, key=lambda r: r["avg F1/EM"])        # ties keep the smaller k
    print(f"best k: {best['k']}")
    save_sweep(rows, "in_context_sweep.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
