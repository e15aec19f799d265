"""What the CLI writes: output folders checked before any work, result files written atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from analysis import runs
from analysis.errors import NeuroglotError
from app.cli_errors import on_interrupt


def claim_out(out: Path, kind: str, request: Optional[dict] = None, overwrite: bool = False, key=None):
    """Check --out before any work: writable, and new, empty or a run of this very request (or --overwrite)."""
    info = runs.claim(out, kind, key, request, overwrite, what="--out")
    on_interrupt(f"{out} is as it was before this command." if info.state not in ("absent", "empty")
                 else "nothing was written.")
    return info


def save_table(frame, path: Path, **kwargs) -> None:
    """A CSV written atomically: an interruption leaves the earlier file or the new one, never half of one."""
    runs.write_text(path, frame.to_csv(**kwargs))


def save_parquet(frame, path: Path) -> None:
    runs.atomic_write(path, lambda f: frame.to_parquet(f, index=False))


def save_figures(folder: Path, figs: dict, png: bool) -> None:
    """Every figure written beside ``folder`` first, then renamed into it (atomic per file)."""
    from analysis import figures

    def move(tmp: Path) -> None:
        for path in tmp.iterdir():
            os.replace(path, folder / path.name)

    with runs.staging(folder) as tmp:
        try:
            for name, fig in figs.items():
                figures.save_figure(fig, tmp / name, formats=("html", "png") if png else ("html",))
        except NeuroglotError:  # e.g. no Chromium for PNG: keep the HTML written so far
            move(tmp)
            raise
        move(tmp)
