"""Benchmark: Transformer-Patcher / MPN as sequential editors -- 50 edits one after another on the embedded
model, each patch trained with every earlier patch in place (papers/mpn.md §3.2: patches accumulate).

    .venv/bin/python bench/mpn_sequential.py [--methods mpn,t-patcher] [--n 50] [--offset 0]

MzsRE dev records ``offset .. offset+n-1`` with en, de, fr, es, zh, ru (source en, the others the parallel pool).
Before any edit, the unedited model answers every probe (the locality references). Then, per method, the n
edits are computed in order (edit i with edits 1..i-1 applied) and, with all of them applied, every record's
probes are scored: the patch count, Reliability / MLG / CLG / Locality (EM %, mpn Table 1's columns) after all
n edits, and seconds per edit. The single-edit figures of ``neuroglot evaluate --table mpn`` on the same records
are the baseline each edit is measured against there. Results: ``bench/results/mpn_sequential.csv``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LANGS = ["en", "de", "fr", "es", "zh", "ru"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "mzsre" / "dev"))
    ap.add_argument("--methods", default="mpn,t-patcher")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--offset", type=int, default=0)
    args = ap.parse_args(argv)

    import pandas as pd

    from analysis.model import load_model
    from bench.common import print_model
    from editors.base import get_editor
    from editors.edit import Edit
    from editors.evaluate import load_records, mpn_table, probes, score_probes, unedited_answers
    from editors.requests import EditRequest

    wb = load_model("embedded")
    print_model(wb, f"{args.n} MzsRE dev records from {args.offset}, languages {', '.join(LANGS)}")
    records = load_records(args.dataset, LANGS, args.n, args.offset)
    requests = [EditRequest.from_record(r, LANGS).validate(wb, need_subject=False) for r in records]
    items = {r.case_id: probes(r) for r in requests}
    t0 = time.perf_counter()
    before = {cid: unedited_answers(wb, ps) for cid, ps in items.items()}
    print(f"unedited answers: {time.perf_counter() - t0:.0f} s", flush=True)
    flat = []
    for cid, ps in items.items():
        for p in score_probes(wb, ps, before[cid], unedited=True):
            flat.append({"method": "unedited", "edit_languages": "-", "record": cid, "seconds": None,
                         "patches": None, **p})
    frame = pd.DataFrame(flat)
    unedited = mpn_table(frame, "+".join(LANGS), LANGS, "en").iloc[0].to_dict()
    unedited.update(setting="before any edit", edits=0)
    out = []
    for method in args.methods.split(","):
        editor = get_editor(method)
        total = Edit()
        seconds, counts = [], []
        for i, request in enumerate(requests):
            t = time.perf_counter()
            with total.applied(wb):
                edit = editor.compute(wb, request)
            seconds.append(time.perf_counter() - t)
            total = total + edit
            counts.append(edit.summary()["added_neurons"])
            print(f"{method} edit {i + 1}/{len(requests)}: {seconds[-1]:.1f} s, patches so far "
                  f"{sum(counts)}", flush=True)
        with total.applied(wb):
            for cid, ps in items.items():
                for p in score_probes(wb, ps, before[cid]):
                    flat.append({"method": method, "edit_languages": "+".join(LANGS), "record": cid,
                                 "seconds": statistics.mean(seconds), "patches": None, **p})
        flat_patches = sum(counts)
        frame = pd.DataFrame(flat)
        row = mpn_table(frame[frame["method"].isin(["unedited", method])], "+".join(LANGS), LANGS, "en")
        row = row[row["method"] != "Unedited"].iloc[0].to_dict()
        row.update(patches=flat_patches, edits=len(requests), s_per_edit=statistics.mean(seconds),
                   setting=f"{len(requests)} edits in sequence")
        out.append(row)
        write(pd.DataFrame([unedited] + out))      # after each method: a later one may be interrupted
    return 0


def write(table) -> None:
    import pandas as pd

    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    table.to_csv(ROOT / "bench" / "results" / "mpn_sequential.csv", index=False)
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(table.round(2).to_string(index=False), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
