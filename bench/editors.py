"""Benchmark: time and peak memory of one edit with each editor, in units of a plain forward pass.

    .venv/bin/python bench/editors.py [--editors lu-lafns,rome,memit,alphaedit,lora-ft,memla,ike,remake] [--record 5]
        [--languages en,zh] [--repeats 1] [--prepare] [--device auto]

One request (MzsRE dev record ``--record`` in en and zh) on the embedded model.
Each editor runs in its own fresh process, so that its peak memory is its own:

* the baseline, measured in the same process: a plain forward pass of the
  request's edit prompts (en and zh in one batch, the LM head at every
  position, as ``model(**inputs)``), median of 5 after a warm-up;
* the editor's ``compute`` on the same request: the first call (cold: prefix
  generation, and the key statistics unless an earlier run cached them on disk;
  ``--prepare`` fills that cache with an untimed call first) and then
  ``--repeats`` calls whose median is reported;
* peak memory: the process's peak resident memory during the first edit minus
  its peak before it (model loaded, forward run), i.e. the extra memory an edit
  needs; on CUDA, ``torch.cuda.max_memory_allocated`` above the model's.

MEMLA's time is also split into locating (integrated gradients of the prompts) and training (its
``edit.meta``). In-context editors (IKE, retrieval) compute almost nothing and pay at answer time instead
(a longer prompt; retrieval also embeds the question): the seconds of scoring the edit prompts' targets
without and with the edit applied (median of 3) are printed for every editor. It also prints whether the edit worked: P(new target) before and after, per language.
Results go to ``bench/results/editors.csv``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EDITORS = "lu-lafns,rome,memit,alphaedit,lora-ft,memla,ike,remake"


def worker(args: argparse.Namespace) -> dict:
    import torch

    from analysis.model import load_model
    from bench.common import device_line, peak_rss_mib
    from data.edit_records import load_mzsre
    from editors.answers import answer_scores
    from editors.base import get_editor
    from editors.requests import EditRequest

    langs = args.languages.split(",")
    wb = load_model("embedded", device=args.device)
    record = load_mzsre(args.dataset, langs)[args.record]
    request = EditRequest.from_record(record, langs).validate(wb)
    prompts = [request.facts[lang].prompt for lang in langs]
    targets = [request.facts[lang].target_new for lang in langs]
    batch = wb.tokenizer(prompts, return_tensors="pt", padding=True).to(wb.device)

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            wb.model(**batch)
        if wb.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    forward()
    unit = statistics.median(forward() for _ in range(5))
    editor = get_editor(args.worker)
    before = [s.probability for s in answer_scores(wb, prompts, targets)]
    if args.prepare:                        # fill the disk caches (key statistics) without timing
        editor.compute(wb, request)
    cuda = wb.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(wb.device)
        base_gpu = torch.cuda.memory_allocated(wb.device)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    edit = editor.compute(wb, request)
    first = time.perf_counter() - t0
    peak = peak_rss_mib() - base
    gpu_peak = (torch.cuda.max_memory_allocated(wb.device) - base_gpu) / 2**20 if cuda else None
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        editor.compute(wb, request)
        times.append(time.perf_counter() - t0)
    def answering() -> float:
        t0 = time.perf_counter()
        answer_scores(wb, prompts, targets)
        return time.perf_counter() - t0

    answer_before = statistics.median(answering() for _ in range(3))
    with edit.applied(wb):
        after = [s.probability for s in answer_scores(wb, prompts, targets)]
        answer_after = statistics.median(answering() for _ in range(3))
    split = edit.meta.get("memla", {})
    return {"locating_s": split.get("seconds_locating"), "training_s": split.get("seconds_training"),
            "answer_s_unedited": answer_before, "answer_s_edited": answer_after,
            "editor": args.worker, "forward_s": unit, "first_edit_s": first,
            "edit_s": statistics.median(times) if times else first, "extra_peak_rss_mib": peak,
            "extra_peak_gpu_mib": gpu_peak, "device": device_line(wb), "record": request.case_id,
            **{f"P(new) {lang} before": b for lang, b in zip(langs, before)},
            **{f"P(new) {lang} after": a for lang, a in zip(langs, after)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--editors", default=EDITORS)
    ap.add_argument("--record", type=int, default=5)
    ap.add_argument("--languages", default="en,zh")
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "mzsre" / "dev"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help="Fill the key-statistics cache with an untimed edit first.")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    import pandas as pd

    rows = []
    for name in args.editors.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--record", str(args.record), "--languages",
               args.languages, "--dataset", args.dataset, "--repeats", str(args.repeats), "--device", args.device]
        if args.prepare and name in ("rome", "memit", "alphaedit"):
            cmd.append("--prepare")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(lines[-1][len("RESULT "):])
        row["edit / forward"] = row["edit_s"] / row["forward_s"]
        rows.append(row)
        print(f"{name:10s} edit {row['edit_s']:7.2f} s (first {row['first_edit_s']:.2f} s) = "
              f"{row['edit / forward']:8.0f} forward passes of {row['forward_s'] * 1000:.0f} ms; "
              f"extra peak memory {row['extra_peak_rss_mib']:.0f} MiB"
              + (f"; locating {row['locating_s']:.2f} s, training {row['training_s']:.2f} s"
                 if row.get("locating_s") is not None else "")
              + f"; answering {row['answer_s_edited'] * 1000:.0f} ms edited vs {row['answer_s_unedited'] * 1000:.0f} ms "
                f"unedited", flush=True)
    table = pd.DataFrame(rows)
    out = ROOT / "bench" / "results" / "editors.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"device: {rows[0]['device']}; record {rows[0]['record']} ({args.languages})")
    cols = ["editor", "edit_s", "first_edit_s", "locating_s", "training_s", "forward_s", "edit / forward",
            "extra_peak_rss_mib", "answer_s_unedited", "answer_s_edited"] + [
        c for c in table.columns if c.startswith("P(new)")]
    with pd.option_context("display.width", 220, "display.max_columns", 20):
        print(table[cols].round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
