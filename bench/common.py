"""What every benchmark prints about where it ran, and the run behind one configuration of a preset sweep."""
from __future__ import annotations

import argparse
import platform
import resource
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from analysis.model import Workbench

ROOT = Path(__file__).resolve().parent.parent


def device_line(wb: Workbench) -> str:
    """The device, with the GPU's name or the CPU and its thread count."""
    device = str(wb.device)
    if wb.device.type == "cuda":
        return device + f" ({torch.cuda.get_device_name(wb.device)})"
    return device + f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_model(wb: Workbench, *details: str) -> None:
    """The ``model:`` line (name, family, ``details``, dtype) and the ``device:`` line every benchmark prints."""
    dtype = str(wb.dtype).replace("torch.", "")
    print(f"model: {wb.name} [{', '.join([wb.arch.family, *details, dtype])}]")
    print(f"device: {device_line(wb)}")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sweep_parser(doc: str, name: str, stages: list[str]) -> argparse.ArgumentParser:
    """The command line of a preset sweep: data set, records (``--n`` after ``--offset``), the run folders'
    root ``runs/<name>`` and ``--only`` one of ``stages`` (or all)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "mzsre" / "dev"))
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--offset", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "runs" / name))
    ap.add_argument("--only", choices=[*stages, "all"], default="all")
    return ap


def sweep_point(wb: Workbench, method: str, hparams: dict, name: str, dataset: str, n: int, offset: int, out_root,
                langs=("en", "zh")) -> tuple[dict, Path]:
    """Evaluate ``method`` with ``hparams`` over the preset, editing ``langs`` together on ``n`` records after
    ``offset`` (one record at a time), in the resumable run folder ``out_root/name``.

    Returns the Table 2 figures (avg F1/EM, s/edit and the EM of every metric per language) and the folder.
    """
    from editors.evaluate import EvalConfig, rows_frame, run_evaluation, table2

    langs = list(langs)
    config = EvalConfig(dataset=dataset, methods=[method], edit_sets=[langs], test_languages=langs,
                        n=n, offset=offset, hparams={method: hparams}, model=wb.spec)
    out = Path(out_root) / name
    run_evaluation(wb, config, out, progress=lambda f, m: print(f"  {name} {f:5.1%} {m}", flush=True))
    t2 = table2(rows_frame(out), "+".join(langs), langs, [method]).iloc[0]
    row = {"avg F1/EM": t2["avg"], "s/edit": t2["s/edit"]}
    for lang in langs:
        for kind in ("Reliability", "Generality", "Locality", "Portability"):
            row[f"{lang} {kind} EM"] = t2[f"{lang} {kind} EM"]
    return row, out


def save_sweep(rows: list[dict], csv_name: str) -> None:
    """Write a preset sweep's rows to ``bench/results/<csv_name>`` and print them as a table."""
    import pandas as pd

    table = pd.DataFrame(rows)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    table.to_csv(ROOT / "bench" / "results" / csv_name, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(2).to_string(index=False))
