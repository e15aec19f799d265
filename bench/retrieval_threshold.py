"""The retrieval threshold of the ReMaKE-style editor, chosen on MzsRE dev records 100-149 (not those reported).

Each record's new fact is put in the edit memory in English (its question is the key). Questions that
should retrieve it: the record's question, paraphrase and portability question in every test language.
Questions that should not: the record's locality questions, and the questions of the other records
(a memory holding one fact). For the project's embedding (PromptEOL at the second-to-last layer, centred:
:mod:`editors.prompting`) and, as the baseline measured in the same run, the mean of the token states at
the same layer (centred the same way), it prints the ROC AUC of "should" against "should not", the
share of questions whose own fact ranks first among the 50 (cross-lingual), and for the project's
embedding the threshold that maximises balanced accuracy, with its true- and false-positive rates.

    python bench/retrieval_threshold.py                  # en memory; en and zh questions; dev 100-149
    python bench/retrieval_threshold.py --offset 0       # the preset's threshold on the reported records 0-49

Writes ``bench/results/retrieval_threshold_<first>-<last>.csv`` (one row per threshold on the grid) and
prints, at the preset's threshold, how often each kind of question retrieved its fact, per language.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "mzsre" / "dev"))
    ap.add_argument("--offset", type=int, default=100)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--languages", default="en,zh", help="test languages of the questions (memory: en)")
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from analysis.hooks import Hooks
    from analysis.model import load_model
    from analysis.tokens import pad_sequences
    from bench.common import print_model
    from editors.evaluate import load_records
    from editors.prompting import default_layer, embed, reference_center
    from editors.requests import EditRequest

    languages = [s.strip() for s in args.languages.split(",") if s.strip()]
    wb = load_model("embedded")
    print_model(wb)
    records = load_records(args.dataset, sorted({"en", *languages}), args.n, args.offset)
    requests = [EditRequest.from_record(r, sorted({"en", *languages})) for r in records]
    layer = default_layer(wb)

    def mean_pooled(texts: list[str]) -> torch.Tensor:          # the baseline embedding
        tok = wb.tokenizer
        seqs = [list(tok(t)["input_ids"]) for t in texts]
        ids, mask = pad_sequences(seqs, tok.pad_token_id, side="right", device=wb.device)
        seen = {}
        with Hooks() as hooks, torch.no_grad():
            hooks.forward(wb.arch.layer_module(wb.model, layer), lambda m, a, o: seen.__setitem__("h", o))
            wb.base_model()[0](**wb.forward_inputs(ids, mask))
        h = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
        m = mask.clone()
        m[:, 0] = 0                                               # not BOS
        return ((h.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True)).cpu()

    keys_text = [r.facts["en"].prompt for r in requests]
    should, should_not = [], []                                   # (text, record)
    for i, r in enumerate(requests):
        for lang in languages:
            fact = r.facts[lang]
            should += [(fact.prompt, i)] + [(p, i) for p in fact.paraphrases] + [(q, i) for q, _ in fact.portability]
            should_not += [(q, i) for q, _ in fact.locality]
    queries = [t for t, _ in should] + [t for t, _ in should_not]
    rows = []
    results = {}
    for name in ("PromptEOL (project)", "mean-pooled (baseline)"):
        if name.startswith("Prompt"):
            center = reference_center(wb, layer)
            keys, q = embed(wb, keys_text, layer, center), embed(wb, queries, layer, center)
        else:
            from data.loaders import load_demo
            ref = list(load_demo().rows.drop_duplicates("fact_id").sample(64, random_state=0)["prompt"])
            center = mean_pooled(ref).mean(0)
            keys = torch.nn.functional.normalize(mean_pooled(keys_text) - center, dim=-1)
            q = torch.nn.functional.normalize(mean_pooled(queries) - center, dim=-1)
        sims = q @ keys.T                                         # [queries, records]
        n_pos = len(should)
        pos = torch.tensor([sims[k, i] for k, (_, i) in enumerate(should)])
        neg_own = torch.tensor([sims[n_pos + k, i] for k, (_, i) in enumerate(should_not)])
        other = torch.ones_like(sims[:n_pos], dtype=torch.bool)
        other[torch.arange(n_pos), torch.tensor([i for _, i in should])] = False
        neg = torch.cat([neg_own, sims[:n_pos][other]])
        auc = float((pos[:, None] > neg[None, :]).float().mean())
        first = float((sims[:n_pos].argmax(1) == torch.tensor([i for _, i in should])).float().mean())
        results[name] = (auc, first, pos, neg)
        print(f"{name}: ROC AUC {auc:.3f} (should vs should not retrieve), own fact ranked first "
              f"{first:.0%} of {n_pos} questions")
    auc, _, pos, neg = results["PromptEOL (project)"]
    for t in [x / 100 for x in range(10, 81, 5)]:
        tpr, fpr = float((pos >= t).float().mean()), float((neg >= t).float().mean())
        rows.append({"threshold": t, "retrieves when it should": tpr, "retrieves when it should not": fpr,
                     "balanced accuracy": (tpr + 1 - fpr) / 2})
    table = pd.DataFrame(rows)
    best = table.loc[table["balanced accuracy"].idxmax()]
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    name = f"retrieval_threshold_{args.offset}-{args.offset + len(requests) - 1}.csv"
    table.to_csv(ROOT / "bench" / "results" / name, index=False)
    print(table.round(3).to_string(index=False))
    from editors.in_context import RemakeHParams

    preset = RemakeHParams.preset("embedded").threshold
    kinds = []
    for i, r in enumerate(requests):
        for lang in languages:
            fact = r.facts[lang]
            kinds += [(lang, "edit question")] + [(lang, "paraphrase")] * len(fact.paraphrases) + [
                (lang, "portability")] * len(fact.portability)
    for i, r in enumerate(requests):
        for lang in languages:
            kinds += [(lang, "locality")] * len(r.facts[lang].locality)
    own = torch.cat([pos, results["PromptEOL (project)"][3][:len(should_not)]])
    hits = pd.DataFrame({"language": [k[0] for k in kinds], "question": [k[1] for k in kinds],
                         "retrieved": (own >= preset).numpy()})
    print(f"at the preset's threshold {preset:.2f}, share of questions that retrieved their record's fact:")
    print((hits.groupby(["question", "language"])["retrieved"].mean() * 100).round(0).unstack().to_string())
    base_auc = results["mean-pooled (baseline)"][0]
    print(f"chosen threshold: {best['threshold']:.2f} (retrieves {best['retrieves when it should']:.0%} of the "
          f"questions it should, {best['retrieves when it should not']:.1%} of those it should not)")
    print(f"AUC: project {auc:.3f} vs baseline {base_auc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
