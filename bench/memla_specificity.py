"""Why a MEMLA edit does or does not keep unrelated answers: how active its trained neurons are on the
record's locality question compared with the edit prompt.

    python bench/memla_specificity.py runs/sweep-memla/c1_t0.3 [--language en]

Reads the evaluation run folder's stored diagnostics (the neurons each MEMLA edit trained) and, per record,
prints how many neurons were trained, how many of them sit in the last layer, and the median over them of
|activation on the locality question| / |activation on the edit prompt| at the last token (the baseline:
1.0 would mean the neurons fire as much for the unrelated question as for the fact). A value vector that an
unrelated question reads as strongly as the fact carries the edit to that question too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="An evaluation run folder with MEMLA rows (rows.jsonl).")
    ap.add_argument("--language", default="en")
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "mzsre" / "dev"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from analysis.hooks import Hooks
    from analysis.model import load_model
    from data.edit_records import load_mzsre
    from editors.requests import EditRequest

    rows = [json.loads(line) for line in (Path(args.folder) / "rows.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if r["method"] == "memla" and r.get("done") and "memla" in (r.get("diagnostics") or {})]
    if not rows:
        print(f"{args.folder} holds no finished MEMLA row with its diagnostics.", file=sys.stderr)
        return 2
    wb = load_model("embedded")
    records = load_mzsre(args.dataset, [args.language])
    base, _ = wb.base_model()

    def last_token_activations(text: str) -> dict[int, torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        with Hooks() as hooks, torch.no_grad():
            for layer in range(wb.n_layers):
                hooks.forward(wb.arch.site(wb.model, layer, "neuron"),
                              lambda m, a, out, layer=layer: seen.__setitem__(layer, out[0, -1].float()))
            enc = wb.tokenizer(text, return_tensors="pt").to(wb.device)
            base(**wb.forward_inputs(enc["input_ids"], enc["attention_mask"]))   # no LM head: none is read
        return seen

    medians = []
    for row in rows:
        sets = row["diagnostics"]["memla"]["neurons"]["sets"]
        fact = EditRequest.from_record(records[int(row["record"].split(":")[1])], [args.language]).facts[args.language]
        if not fact.locality:
            continue
        edit, other = last_token_activations(fact.prompt), last_token_activations(fact.locality[0][0])
        trained = [(int(layer), n) for layers in sets.values() for layer, ns in layers.items() for n in ns]
        ratios = [abs(float(other[l][n])) / max(abs(float(edit[l][n])), 1e-6) for l, n in trained]
        last = sum(layer == wb.n_layers - 1 for layer, _ in trained)
        medians.append(float(np.median(ratios)))
        print(f"{row['record']}: {len(trained)} trained neurons, {last} in the last layer; median |activation on the "
              f"locality question| / |on the edit prompt| = {medians[-1]:.2f}")
    print(f"over {len(medians)} records: median of the medians {np.median(medians):.2f} (1.0: the neurons fire as "
          "much for the unrelated question as for the edited fact)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
