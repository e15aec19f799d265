"""analysis.cache and `neuroglot cache`: usage per area, clearing, pruning least recently used first, never
outside the cache root; and the Compare cache's size cap in editors.compare.run_editor (tiny model)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from analysis import cache
from analysis.errors import InputError
from app.cli import cli

runner = CliRunner()
NOW = time.time()
DAY = 86400


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("NEUROGLOT_CACHE", str(folder))
    monkeypatch.delenv("NEUROGLOT_COMPARE_CACHE_GB", raising=False)
    return folder


def put(path: Path, size: int, days_ago: float = 0.0) -> Path:
    """A file of ``size`` bytes whose mtime is ``days_ago`` days back (and its folders, if new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    age(path, days_ago)
    return path


def age(path: Path, days_ago: float) -> Path:
    stamp = NOW - days_ago * DAY
    os.utime(path, (stamp, stamp))
    return path


def entry(folder: Path, sizes: list[int], days_ago: float) -> Path:
    """A folder entry holding files of ``sizes`` bytes, last modified ``days_ago`` days back."""
    for i, size in enumerate(sizes):
        put(folder / f"part{i}.bin", size)
    return age(folder, days_ago)


@pytest.fixture
def areas(root) -> dict[str, Path]:
    """Every area with entries of known sizes and ages."""
    return {
        "model": entry(root / "models" / "gemma", [4000], 30),
        "gguf": put(root / "gguf" / "model.gguf", 2520, 30),
        "stats": entry(root / "stats" / "k1", [600, 400], 5),
        "old_run": entry(root / "runs" / "neurons-a", [1000, 500], 10),
        "new_run": put(root / "runs" / "trace-b.json", 200, 1),
        "edit": entry(root / "compare" / "edits" / "e1", [3000], 2),
        "before": put(root / "compare" / "before" / "before-x.json", 100, 20),
        "facts": put(root / "compare" / "facts" / "f.npz", 60, 0.5),
    }


def usage_of(name: str) -> cache.Usage:
    return {u.area: u for u in cache.usage()}[name]


# ----------------------------------------------------------------------------- usage


def test_usage_counts_bytes_entries_and_ages_per_area(areas, root):
    found = {u.area: u for u in cache.usage()}
    assert list(found) == ["models", "gguf", "stats", "runs", "compare"]
    runs = found["runs"]
    assert (runs.bytes, runs.entries, runs.path) == (1700, 2, root / "runs")
    assert runs.oldest == pytest.approx(NOW - 10 * DAY) and runs.newest == pytest.approx(NOW - DAY)
    compare = found["compare"]                 # entries: the children of edits/, before/ and facts/
    assert (compare.bytes, compare.entries) == (3160, 3)
    assert compare.oldest == pytest.approx(NOW - 20 * DAY) and compare.newest == pytest.approx(NOW - DAY / 2)
    assert (found["models"].bytes, found["gguf"].bytes, found["stats"].bytes) == (4000, 2520, 1000)
    assert all(u.description for u in found.values())


def test_usage_of_a_missing_cache_is_zero_and_hidden_staging_is_no_entry(root):
    assert all((u.bytes, u.entries, u.oldest, u.newest) == (0, 0, None, None) for u in cache.usage())
    put(root / "runs" / f".neurons-a.tmp-{os.getpid()}-abc" / "counts.npz", 300)
    assert (usage_of("runs").bytes, usage_of("runs").entries) == (300, 0)


# ----------------------------------------------------------------------------- clear


def test_clear_removes_every_entry_of_one_area_and_nothing_else(areas, root):
    freed = cache.clear("compare")
    assert freed.bytes == 3160 and sorted(p.name for p in freed.paths) == ["before-x.json", "e1", "f.npz"]
    assert not areas["edit"].exists() and not areas["before"].exists() and not areas["facts"].exists()
    assert (root / "compare" / "edits").is_dir()        # the area's own folders stay
    assert all(areas[k].exists() for k in ("model", "gguf", "stats", "old_run", "new_run"))
    assert not [p for p in root.rglob("*") if cache.DELETING in p.name]


def test_clear_older_than_keeps_what_was_used_since(areas):
    freed = cache.clear("runs", older_than_days=3)
    assert freed.paths == (areas["old_run"],) and freed.bytes == 1500
    assert areas["new_run"].exists()
    assert cache.clear("runs", older_than_days=3).paths == ()
    with pytest.raises(InputError, match="0 or more"):
        cache.clear("runs", older_than_days=-1)


def test_clear_removes_only_the_listed_entries_still_stale(areas, root):
    listed = cache.stale_entries("runs", 3)
    age(areas["old_run"], 0)                            # used between the listing and the confirmation
    late = put(root / "runs" / "trace-c.json", 10, 40)  # came after the listing
    assert cache.clear("runs", 3, listed=listed).paths == ()
    assert areas["old_run"].exists() and late.exists()


def test_select_areas_all_leaves_models_and_gguf_unless_named():
    assert cache.select_areas("all") == ["stats", "runs", "compare"]
    assert cache.select_areas("all, models") == ["stats", "runs", "compare", "models"]
    assert cache.select_areas("gguf,runs,gguf") == ["gguf", "runs"]
    with pytest.raises(InputError, match="Unknown cache area 'nope'"):
        cache.select_areas("runs,nope")


# ----------------------------------------------------------------------------- prune and safety


def test_prune_removes_least_recently_used_first_never_kept_ones(root):
    edits = root / "compare" / "edits"
    e = {i: entry(edits / f"e{i}", [1000], days) for i, days in ((1, 4), (2, 3), (3, 2), (4, 1))}
    freed = cache.prune(edits, 2500, keep=[e[1]])       # e1 is the oldest but kept
    assert freed.paths == (e[2], e[3]) and freed.bytes == 2000
    assert sorted(p.name for p in edits.iterdir()) == ["e1", "e4"]
    assert cache.prune(edits, 2000).paths == ()         # fits already
    assert cache.prune(edits, 0, keep=[e[1], e[4]]).paths == ()
    assert cache.prune(edits, 0).paths == (e[1], e[4]) and list(edits.iterdir()) == []


def test_prune_after_a_cache_hit_touch_keeps_the_touched_entry(root):
    edits = root / "compare" / "edits"
    old, new = entry(edits / "old", [1000], 5), entry(edits / "new", [1000], 1)
    cache.touch(old)
    assert cache.prune(edits, 1000).paths == (new,)


def test_removal_renames_aside_before_deleting(root, monkeypatch):
    target = entry(root / "runs" / "neurons-a", [10, 20], 0)
    seen = []
    real = cache.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        seen.append((Path(path).name, target.exists()))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache.shutil, "rmtree", rmtree)
    assert cache.remove_entry(target) == 30
    (name, still_there), = seen
    assert name.startswith(".neurons-a.deleting-") and not still_there   # readers find all of it or nothing
    assert list((root / "runs").iterdir()) == []


def test_nothing_outside_the_cache_root_is_removed(root, tmp_path):
    outside = put(tmp_path / "precious" / "data.bin", 100)
    for path in (outside, outside.parent, root, root / "runs" / ".." / ".." / "precious"):
        with pytest.raises(InputError, match="Refusing to delete"):
            cache.remove_entry(path)
    with pytest.raises(InputError, match="not inside the cache folder"):
        cache.prune(tmp_path / "precious", 0)
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "link").symlink_to(outside.parent, target_is_directory=True)
    assert usage_of("runs").entries == 1
    cache.clear("runs")                                 # the link goes, never what it points to
    assert not (root / "runs" / "link").exists() and outside.read_bytes() == b"x" * 100


def test_clear_finishes_abandoned_removals_and_leaves_live_staging(root):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    abandoned = put(root / "runs" / f".neurons-a.deleting-{dead}-0123abcd" / "x.bin", 50).parent
    live = put(root / "runs" / f".trace-b.tmp-{os.getpid()}-xyz" / "y.bin", 70).parent
    cache.clear("runs")
    assert not abandoned.exists() and live.exists()


def test_cap_bytes_reads_gigabytes_from_the_environment(monkeypatch):
    monkeypatch.delenv("NG_TEST_CAP", raising=False)
    assert cache.cap_bytes("NG_TEST_CAP", 20) == 20 * 10**9
    monkeypatch.setenv("NG_TEST_CAP", "0.5")
    assert cache.cap_bytes("NG_TEST_CAP", 20) == 5 * 10**8
    monkeypatch.setenv("NG_TEST_CAP", "0")
    assert cache.cap_bytes("NG_TEST_CAP", 20) is None
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("NG_TEST_CAP", bad)
        with pytest.raises(InputError, match="NG_TEST_CAP"):
            cache.cap_bytes("NG_TEST_CAP", 20)


# ----------------------------------------------------------------------------- the CLI


def test_cli_list_shows_every_area_with_its_figures(areas, root):
    result = runner.invoke(cli, ["cache", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:7] == ["area", "size", "entries", "oldest", "newest", "path", "description"]
    runs = next(line for line in lines if line.startswith("runs "))
    assert runs.split()[:4] == ["runs", "1.7", "kB", "2"] and str(root / "runs") in runs
    assert time.strftime("%Y-%m-%d", time.localtime(NOW - 10 * DAY)) in runs
    assert "12.4 kB in all" in result.output


def test_cli_clear_asks_first_and_all_leaves_models_and_gguf(areas):
    declined = runner.invoke(cli, ["cache", "clear", "all"], input="n\n")
    assert declined.exit_code == 1 and "nothing was deleted" in declined.output
    assert "Delete 6 entries (5.9 kB) of stats, runs, compare?" in declined.output
    assert all(path.exists() for path in areas.values())
    result = runner.invoke(cli, ["cache", "clear", "all"], input="y\n")
    assert result.exit_code == 0, result.output
    assert "runs: deleted 2 entries, freed 1.7 kB" in result.output and "freed 5.9 kB in all" in result.output
    assert [k for k, path in areas.items() if path.exists()] == ["model", "gguf"]
    named = runner.invoke(cli, ["cache", "clear", "models,gguf", "--yes"])
    assert named.exit_code == 0 and "freed 6.5 kB in all" in named.output
    assert not areas["model"].exists() and not areas["gguf"].exists()
    again = runner.invoke(cli, ["cache", "clear", "all", "--yes"])
    assert again.exit_code == 0 and "nothing to delete" in again.output


def test_cli_clear_older_than(areas):
    result = runner.invoke(cli, ["cache", "clear", "runs", "--older-than", "3", "--yes"])
    assert result.exit_code == 0, result.output
    assert "runs: deleted 1 entry, freed 1.5 kB" in result.output
    assert not areas["old_run"].exists() and areas["new_run"].exists()


@pytest.mark.parametrize("args, fragment", [
    (["cache", "clear", "nope", "--yes"], "Unknown cache area 'nope'"),
    (["cache", "clear", "", "--yes"], "Name a cache area"),
    (["cache", "clear", "runs", "--older-than", "-2", "--yes"], "0 or more"),
])
def test_cli_clear_bad_input_exits_2_with_one_line(areas, args, fragment):
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert all(path.exists() for path in areas.values())


# ----------------------------------------------------------------------------- the Compare cache's cap


def test_run_editor_touches_a_hit_and_prunes_the_least_recently_used_edits(monkeypatch, root):
    from editors import compare as cmp
    from tests.test_compare import request
    from tests.tiny import tiny_workbench

    wb = tiny_workbench("llama")
    edits = root / "compare" / "edits"

    def run(seed: int) -> Path:
        result = cmp.compare(wb, request(), {"ike": dict(k=2, seed=seed)}, on_error="raise")
        return result.runs[0].folder

    monkeypatch.setenv(cmp.CAP_VARIABLE, "0")               # no cap
    first, second = run(0), run(1)
    assert first.parent == second.parent == edits and first != second
    age(first, 3), age(second, 2)
    assert run(0) == first                                   # a cache hit: marked as just used
    assert cache.mtime(first) > NOW - 60
    # a cap that fits the two edits there now: the third written removes the least recently used one
    monkeypatch.setenv(cmp.CAP_VARIABLE, repr((cache.size_of(edits) + 0.5) / 1e9))
    third = run(2)
    assert sorted(p.name for p in edits.iterdir()) == sorted([first.name, third.name])
    # a cap smaller than one edit: all but the one just written go
    monkeypatch.setenv(cmp.CAP_VARIABLE, "1e-9")
    fourth = run(3)
    assert [p.name for p in edits.iterdir()] == [fourth.name]
    assert (fourth / "edit").is_dir() and any(fourth.glob(f"{cmp.SCORES_PREFIX}*.json"))


def test_run_editor_refuses_a_bad_cap_before_any_work(monkeypatch, root):
    from editors import compare as cmp
    from tests.test_compare import request
    from tests.tiny import tiny_workbench

    monkeypatch.setenv(cmp.CAP_VARIABLE, "twenty")
    wb = tiny_workbench("llama")
    with pytest.raises(InputError, match=cmp.CAP_VARIABLE):
        cmp.compare(wb, request(), {"ike": dict(k=2)}, on_error="raise")
    assert not (root / "compare" / "edits").exists()
