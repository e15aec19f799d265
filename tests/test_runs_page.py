"""The Runs page (app/views/runs.py), its reader (app/run_browser.py), its figures (analysis/run_figures.py) and
`neuroglot runs`, on run folders built for real in the test: an evaluation (IKE and LU-LAFNs on a tiny random
llama, two records in en and de, edit sets en+de, en, de) and a sequential run (MEMIT, two steps of two MzsRE dev
records). What the page and the CLI count is checked against rows.jsonl / steps.jsonl / baseline.json read
independently; a copy of the sequential folder without its per-probe rows stands for one written before them.
Overlap runs (`neuroglot overlap`) are folders written by hand (tests/tiny.py ``write_overlap_run``): points.csv,
correlations.csv (with and without the p column) and run.json through ``analysis.runs.write_run``."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from tests.tiny import (MZSRE_DEV, app_page, neuroglot_cache, raw_probes, raw_sequential_probes,
                        run_small_evaluation, run_small_sequential)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An evaluation folder and (when the MzsRE dev data is there) a sequential run folder, built for real."""
    base = tmp_path_factory.mktemp("runs-page")
    with neuroglot_cache(base / "cache"):                         # tiny models' key statistics stay here
        evaluation = run_small_evaluation(base, "eval")
        sequential = run_small_sequential(base, "seq") if MZSRE_DEV.is_dir() else None
    return {"eval": evaluation, "seq": sequential, "base": base}


def new_page():
    return app_page("runs").run()


def open_folder(at, folder) -> None:
    at.text_input(key="runs-typed").set_value(str(folder))
    at.button(key="runs-open").click().run()


def errors(at) -> list[str]:
    return [e.value for e in at.error] + [str(e.value) for e in at.exception]


def probe_count(at) -> tuple[int, int, int]:
    """(shown, all, failed) from the probe table's caption."""
    caption = next(c.value for c in at.caption if " probes · " in c.value)
    shown, _, total = caption.split(" probes")[0].split(" ")[:3]
    failed = caption.split(" · ")[1].split(" ")[0]
    return int(shown.replace(",", "")), int(total.replace(",", "")), int(failed.replace(",", ""))


# ------------------------------------------------------------------ the reader and the figures


def test_the_probe_table_has_the_answers_before_and_after_and_the_failures(folders):
    from app import run_browser as rb

    view = rb.read_evaluate(folders["eval"])
    table = rb.probe_table(view.frame)
    raw = raw_probes(folders["eval"])
    assert len(table) == len(raw) and view.finished
    unedited = {(p["record"], p["language"], p["kind"], p["prompt"]): p["answer"] for p in raw
                if p["method"] == "unedited"}
    for row in table.itertuples():
        # before: the unedited model's own answer to the very same prompt
        assert row.before == unedited[(row.record, row.language, row.kind, row.question)]
        assert row.failed == (row.em < 1)
    edited = [p for p in raw if p["method"] != "unedited"]
    assert (table["method"] != "unedited").sum() == len(edited)
    failed_de = sum(1 for p in raw if p["em"] < 1 and p["language"] == "de" and p["method"] == "ike")
    assert len(rb.filter_probes(table, methods=["ike"], languages=["de"], failures_only=True)) == failed_de
    assert len(rb.filter_probes(table, edit_languages=["en"], kinds=["locality"])) == sum(
        1 for p in raw if p["edit_languages"] == "en" and p["kind"] == "locality")
    record = table.iloc[0]["record"]
    mine = rb.record_probes(table, record, "ike", "en+de")
    assert set(mine["record"]) == {record} and len(mine) == sum(
        1 for p in raw if p["record"] == record and p["method"] == "ike" and p["edit_languages"] == "en+de")


def test_transfer_matrices_match_the_rows_and_the_heatmap_writes_them_on_the_cells(folders):
    from analysis.errors import InputError
    from analysis.run_figures import transfer_heatmap
    from app import run_browser as rb

    view = rb.read_evaluate(folders["eval"])
    raw = raw_probes(folders["eval"])
    matrices = rb.transfer_matrices(view, "locality", "f1")
    assert set(matrices) == {"ike", "lu-lafns"}
    for method, matrix in matrices.items():
        for _, row in matrix.iterrows():
            for lang in ("en", "de"):
                values = [p["f1"] for p in raw if p["method"] == method and p["edit_languages"] == row["edit"]
                          and p["language"] == lang and p["kind"] == "locality"]
                assert row[lang] == pytest.approx(100 * sum(values) / len(values))
        fig = transfer_heatmap(matrix, f"{method}: Locality F1", "Locality F1")
        heat = fig.data[0]
        assert list(heat.y) == list(matrix["edit"]) and list(heat.x) == ["en", "de", "x-avg"]
        assert (heat.zmin, heat.zmax) == (0, 100)
        expected = [["–" if pd.isna(v) else f"{v:.1f}" for v in row] for row in matrix[["en", "de", "x-avg"]].values]
        assert [list(r) for r in heat.text] == expected
    with pytest.raises(InputError, match="empty"):
        transfer_heatmap(pd.DataFrame(columns=["edit", "en"]), "t", "m")
    with pytest.raises(InputError, match="between 0 and 100"):
        transfer_heatmap(pd.DataFrame({"edit": ["en"], "en": [140.0]}), "t", "m")


def test_run_folders_are_found_and_told_apart(folders, tmp_path):
    from analysis.errors import InputError
    from app import run_browser as rb

    found = dict(rb.find_run_folders([folders["base"]]))
    assert found[str(folders["eval"])] == "evaluate"
    if folders["seq"] is not None:
        assert found[str(folders["seq"])] == "sequential"
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    for folder, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "empty", "is empty"),
                            (tmp_path / "other", "not a run folder"), (folders["base"], "not a run folder")):
        with pytest.raises(InputError, match=message):
            rb.run_kind(folder)


# ------------------------------------------------------------------ the page (AppTest)


def test_an_evaluation_folder_its_heatmaps_filters_and_tables(folders):
    raw = raw_probes(folders["eval"])
    at = new_page()
    assert not errors(at)
    open_folder(at, folders["eval"])
    assert not errors(at), errors(at)
    text = " ".join(m.value for m in at.markdown)
    assert "ike, lu-lafns" in text and "en+de, en, de" in text and "tiny-llama" in text
    # one heatmap per edited method and the two summary figures
    charts = at.get("plotly_chart")
    assert len(charts) == 4
    assert probe_count(at) == (len(raw), len(raw), sum(1 for p in raw if p["em"] < 1))

    at.toggle(key="runs-f-failures").set_value(True).run()
    assert probe_count(at)[0] == sum(1 for p in raw if p["em"] < 1)
    at.multiselect(key="runs-f-method").set_value(["lu-lafns"]).run()
    at.multiselect(key="runs-f-kind").set_value(["locality"]).run()
    assert probe_count(at)[0] == sum(1 for p in raw if p["em"] < 1 and p["method"] == "lu-lafns"
                                     and p["kind"] == "locality")
    at.toggle(key="runs-f-failures").set_value(False).run()
    at.multiselect(key="runs-f-lang").set_value(["de"]).run()
    at.multiselect(key="runs-f-edit").set_value(["en"]).run()
    assert probe_count(at)[0] == sum(1 for p in raw if p["method"] == "lu-lafns" and p["kind"] == "locality"
                                     and p["language"] == "de" and p["edit_languages"] == "en") > 0
    assert not errors(at)

    # another metric and score redraw the heatmaps; the tables are the run's report
    at.radio(key="runs-eval-kind").set_value("generality").run()
    at.radio(key="runs-eval-score").set_value("f1").run()
    assert not errors(at)
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert "ike: Generality F1" in titles and "lu-lafns: Generality F1" in titles
    report = " ".join(m.value for m in at.markdown)
    assert "Table 2 style" in report and "Transfer matrix" in report


def test_a_sequential_folder_shows_the_stream_figures_and_every_steps_scores(folders):
    if folders["seq"] is None:
        pytest.skip("MzsRE dev data not found")
    steps = [json.loads(x) for x in (folders["seq"] / "memit" / "steps.jsonl").read_text().splitlines()]
    baseline = json.loads((folders["seq"] / "baseline.json").read_text())["scores"]
    at = new_page()
    open_folder(at, folders["seq"])
    assert not errors(at), errors(at)
    assert any("memit 2/2" in m.value for m in at.markdown)
    assert len(at.get("plotly_chart")) == 3               # curves, interference, null space
    rows = sum(len(s["scores"]) for s in steps) + len(baseline)
    caption = next(c.value for c in at.caption if "every batch edited so far" in c.value)
    assert caption.startswith(f"{rows} of {rows} rows")
    at.multiselect(key="runs-seq-f-step").set_value([2]).run()
    caption = next(c.value for c in at.caption if "every batch edited so far" in c.value)
    assert caption.startswith(f"{len(steps[1]['scores'])} of {rows} rows")
    at.radio(key="runs-seq-rel").set_value("own step").run()
    at.radio(key="runs-seq-metric").set_value("specificity").run()
    assert not errors(at)


def without_probe_rows(folder, to):
    """A copy of a sequential folder as it was written before per-probe rows were kept."""
    shutil.copytree(folder, to)
    baseline = json.loads((to / "baseline.json").read_text())
    baseline.pop("probes")
    (to / "baseline.json").write_text(json.dumps(baseline))
    for path in to.glob("*/steps.jsonl"):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "probes"}) + "\n" for r in rows))
    return to


def test_the_sequential_probe_table_is_every_probe_before_and_after_each_step(folders):
    if folders["seq"] is None:
        pytest.skip("MzsRE dev data not found")
    from app import run_browser as rb

    raw = raw_sequential_probes(folders["seq"])
    table, note = rb.sequential_probes(folders["seq"])
    assert note == "" and len(table) == len(raw) and list(table.columns) == rb.SEQUENTIAL_PROBE_COLUMNS
    stream = {s["index"]: s["language"] for s in json.loads((folders["seq"] / "sequential.json").read_text())["stream"]}
    for row, p in zip(table.itertuples(), raw):
        assert (row.step, row.batch, row.record, row.asked_in, row.kind) == (p["step"], p["batch"], p["record"],
                                                                               p["language"], p["kind"])
        assert (row.question, row.expected, row.after, row.top1_after) == (p["prompt"], p["expected"],
                                                                            p["predicted"], p["top1"])
        assert (row.before, row.top1_before, row.failed, row.edited_in) == (p["before"], p["top1_before"],
                                                                             p["failed"], stream[p["batch"]])
    last = rb.filter_sequential_probes(table, step=2, languages=["de"], kinds=["specificity"], failures_only=True)
    assert len(last) == sum(1 for p in raw if p["step"] == 2 and p["language"] == "de" and p["kind"] == "specificity"
                            and p["failed"])
    record = table.iloc[0]["record"]
    mine = rb.sequential_record_probes(table, "memit", record)
    assert set(mine["record"]) == {record} and len(mine) == sum(1 for p in raw if p["record"] == record)


def test_a_sequential_folders_probes_filter_and_a_selected_row_shows_its_record(folders, tmp_path):
    if folders["seq"] is None:
        pytest.skip("MzsRE dev data not found")
    raw = raw_sequential_probes(folders["seq"])
    at = new_page()
    open_folder(at, folders["seq"])
    assert not errors(at), errors(at)
    # the last measured step first
    at_last = [p for p in raw if p["step"] == 2]
    assert probe_count(at) == (len(at_last), len(raw), sum(p["failed"] for p in at_last))
    assert at.selectbox(key="runs-seq-p-step").value == 2
    assert not any("keeps no per-record" in c.value for c in at.caption)

    at.toggle(key="runs-seq-p-failures").set_value(True).run()
    assert probe_count(at)[0] == sum(p["failed"] for p in at_last)
    at.selectbox(key="runs-seq-p-step").set_value(1).run()
    at.multiselect(key="runs-seq-p-lang").set_value(["de"]).run()
    at.multiselect(key="runs-seq-p-kind").set_value(["efficacy", "specificity"]).run()
    at.multiselect(key="runs-seq-p-method").set_value(["memit"]).run()
    assert probe_count(at)[0] == sum(1 for p in raw if p["step"] == 1 and p["failed"] and p["language"] == "de"
                                     and p["kind"] in ("efficacy", "specificity"))
    at.toggle(key="runs-seq-p-failures").set_value(False).run()
    shown = [p for p in raw if p["step"] == 1 and p["language"] == "de" and p["kind"] in ("efficacy", "specificity")]
    assert probe_count(at)[0] == len(shown) > 0
    assert not errors(at)

    # selecting a row: that record's probes after every step, in a small table of their own
    table = next(d for d in at.dataframe if (d.key or "").startswith("runs-seq-probes-"))
    assert list(table.value["record"]) == [p["record"] for p in shown]
    at.session_state[table.key] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert not errors(at), errors(at)
    record = shown[0]["record"]
    assert any(m.value.startswith(f"**Record {record}** · memit") for m in at.markdown)
    probe_tables = [d.value for d in at.dataframe if "top1_after" in d.value]
    assert len(probe_tables) == 2                          # the filtered probes, then the record's own
    small = probe_tables[1]
    assert set(small["record"]) == {record} and len(small) == sum(1 for p in raw if p["record"] == record)
    assert sorted(set(small["step"])) == sorted({p["step"] for p in raw if p["record"] == record})

    # a folder written before per-probe rows: the reason and how to get them; the averaged scores still there
    old = without_probe_rows(folders["seq"], tmp_path / "old-seq")
    open_folder(at, old)
    assert not errors(at), errors(at)
    assert any("predates per-probe rows" in i.value and "again" in i.value for i in at.info)
    assert any("every batch edited so far" in c.value and "predates per-probe rows" in c.value for c in at.caption)


def test_bad_folders_are_error_boxes_and_the_page_keeps_working(folders, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(folders["eval"], damaged)
    (damaged / "config.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("x")
    at = new_page()
    for folder, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "is empty"),
                            (plain, "not a run folder"), (damaged, "damaged"), ("", "Choose a run folder")):
        open_folder(at, folder)
        assert any(message in e for e in (x.value for x in at.error)), (folder, errors(at))
        assert not at.exception
    open_folder(at, folders["eval"])
    assert not errors(at) and len(at.get("plotly_chart")) == 4


def test_a_folder_still_being_written_is_read_again_as_it_grows(folders, tmp_path):
    growing = tmp_path / "growing"
    shutil.copytree(folders["eval"], growing)
    lines = (growing / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    (growing / "tables.md").unlink()
    (growing / "probes.csv").unlink()
    (growing / "rows.jsonl").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    first = sum(len(json.loads(x)["probes"]) for x in lines[:3])
    at = new_page()
    open_folder(at, growing)
    assert not errors(at), errors(at)
    assert any("still being written" in i.value for i in at.info)
    assert probe_count(at)[1] == first
    import os
    import time

    with (growing / "rows.jsonl").open("a", encoding="utf-8") as fh:   # the run appends a record
        fh.write(lines[3] + "\n")
    later = time.time() + 5
    os.utime(growing / "rows.jsonl", (later, later))                   # a newer stamp even on a coarse clock
    at.run()
    assert probe_count(at)[1] == first + len(json.loads(lines[3])["probes"])
    # only a config so far: an info box, no error
    (growing / "rows.jsonl").unlink()
    at.run()
    assert not errors(at) and any("no finished record yet" in i.value for i in at.info)


# ------------------------------------------------------------------ the CLI


def test_the_cli_prints_the_same_tables_and_probes(folders, tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli

    raw = raw_probes(folders["eval"])
    runner = CliRunner()
    out = tmp_path / "failures.csv"
    result = runner.invoke(cli, ["runs", "show", str(folders["eval"]), "--failures", "--method", "ike",
                                 "--csv", str(out), "--transfer", "--metric", "locality", "--score", "f1"])
    assert result.exit_code == 0, result.output
    assert "Table 2 style" in result.output and "Transfer matrix, ike: Locality F1" in result.output
    written = pd.read_csv(out)
    assert len(written) == sum(1 for p in raw if p["method"] == "ike" and p["em"] < 1)
    assert set(written["method"]) == {"ike"} and written["failed"].all()
    listed = runner.invoke(cli, ["runs", "list", str(folders["base"])])
    assert listed.exit_code == 0 and str(folders["eval"]) in listed.output
    for bad in (["runs", "show", str(tmp_path / "nope")], ["runs", "show", str(folders["eval"]), "--score", "x"]):
        result = runner.invoke(cli, bad)
        assert result.exit_code == 2 and "Traceback" not in result.output
    if folders["seq"] is not None:
        result = runner.invoke(cli, ["runs", "show", str(folders["seq"]), "--probes", "--language", "de"])
        assert result.exit_code == 0 and "memit" in result.output, result.output
        raw = raw_sequential_probes(folders["seq"])
        assert f"{sum(1 for p in raw if p['step'] == 2 and p['language'] == 'de')} rows" in result.output
        for n, (args, keep) in enumerate(((["--step", "1", "--failures", "--kind", "efficacy,generality"],
                            lambda p: p["step"] == 1 and p["failed"] and p["kind"] != "specificity"),
                           (["--step", "all", "--method", "memit"], lambda p: True),
                           ([], lambda p: p["step"] == 2))):
            out = tmp_path / f"seq{n}.csv"
            result = runner.invoke(cli, ["runs", "show", str(folders["seq"]), "--table", "none", "--csv", str(out),
                                         *args])
            assert result.exit_code == 0, result.output
            written = pd.read_csv(out, keep_default_na=False)
            mine = [p for p in raw if keep(p)]
            assert len(written) == len(mine) and list(written["after"]) == [p["predicted"] for p in mine], args
            assert {"question", "expected", "before", "after", "top1_before", "top1_after"} <= set(written.columns)
        for bad, message in ((["--step", "9"], "measured steps are 1, 2"), (["--step", "x"], "--step must be"),
                             (["--edit-languages", "en"], "for evaluation runs")):
            result = runner.invoke(cli, ["runs", "show", str(folders["seq"]), "--table", "none", *bad])
            assert result.exit_code == 2 and message in result.output, (bad, result.output)
        result = runner.invoke(cli, ["runs", "show", str(folders["eval"]), "--step", "1"])
        assert result.exit_code == 2 and "for sequential runs" in result.output
        old = without_probe_rows(folders["seq"], tmp_path / "old-seq")
        result = runner.invoke(cli, ["runs", "show", str(old), "--table", "none", "--probes"])
        assert result.exit_code == 0 and "predates per-probe rows" in result.output and "batch_language" in \
            result.output
        result = runner.invoke(cli, ["runs", "show", str(old), "--failures"])
        assert result.exit_code == 2 and "predates per-probe rows" in result.output


# ------------------------------------------------------------------ overlap runs (a folder written by hand)


@pytest.fixture()
def overlap_folder(tmp_path):
    from tests.tiny import write_overlap_run

    return write_overlap_run(tmp_path / "runs" / "overlap")


def test_an_overlap_folder_is_found_read_and_its_old_correlations_recomputed(overlap_folder, tmp_path):
    from app import run_browser as rb
    from editors.overlap import rank_correlations
    from tests.tiny import overlap_points, write_overlap_run

    assert dict(rb.find_run_folders([tmp_path / "runs"])) == {str(overlap_folder): "overlap"}
    assert rb.run_kind(overlap_folder) == "overlap"
    view = rb.read_overlap(overlap_folder)
    raw = overlap_points()
    assert len(view.points) == len(raw) and view.methods == ["langedit", "mpn"] and not view.recomputed
    assert view.config["edit_language"] == "en" and view.config["test_languages"] == ["en", "zh", "de"]
    assert list(view.errors["method"]) == ["mpn"] and "no subject token" in view.errors["error"][0]
    assert len(view.scored) == len(raw) - 1
    header = rb.overlap_header(view)
    assert "tiny-llama" in header and "5 records" in header and "langedit, mpn" in header and "en, zh, de" in header
    table = rb.correlation_table(view).set_index("editor")
    assert table.loc["langedit", "ρ"] == pytest.approx(1.0) and 0 < table.loc["langedit", "p"] < 0.05
    assert pd.isna(table.loc["mpn", "ρ"]) and table.loc["mpn", "records"] == 4
    assert table.loc["langedit", "mean agnostic share (%)"] == pytest.approx(13.0)
    assert len(rb.filter_points(view.points, ["mpn"])) == 5 and len(rb.filter_points(view.points, [])) == 10
    side = rb.record_overlap(view.points, "mzsre:1")
    assert list(side.columns) == ["langedit", "mpn"]
    assert side.loc["agnostic share", "langedit"] == "9.0 %" and side.loc["added share", "mpn"] == "100.0 %"
    assert side.loc["transfer", "mpn"] == "+45.0" and side.loc["pooled", "mpn"] == "yes"
    assert rb.record_overlap(view.points, "mzsre:4").loc["error", "mpn"].startswith("mpn: no subject")

    # a folder written before the p column: the same ρ, and p computed again from the points
    old = rb.read_overlap(write_overlap_run(tmp_path / "old", with_p=False))
    assert old.recomputed
    fresh = rank_correlations(view.scored)
    pd.testing.assert_frame_equal(old.correlations, fresh)
    assert rb.correlation_table(old)["p"].tolist()[0] == pytest.approx(table.loc["langedit", "p"])


def damaged_overlap_folders(folder, base) -> list[tuple[object, str]]:
    """Copies of an overlap folder damaged in one way each, with what the error says."""
    out = []
    for name, damage, message in (
            ("no-points", lambda f: (f / "points.csv").unlink(), "has no points.csv"),
            ("bad-columns", lambda f: (f / "points.csv").write_text("a,b\n1,2\n"), "lacks the column"),
            ("text", lambda f: (f / "points.csv").write_text((f / "points.csv").read_text().replace(",60.0,", ",sixty,",
                                                                                                 1)),
             "holds text where numbers"),
            ("bad-json", lambda f: (f / "run.json").write_text("{oops"), "damaged overlap run"),
            ("bad-corr", lambda f: (f / "correlations.csv").write_text("x\n1\n"), "correlations.csv is damaged")):
        copy = base / name
        shutil.copytree(folder, copy)
        damage(copy)
        out.append((copy, message))
    return out


def test_overlap_folders_damaged_in_any_way_are_clear_errors(overlap_folder, tmp_path):
    from analysis.errors import InputError
    from app import run_browser as rb

    for folder, message in damaged_overlap_folders(overlap_folder, tmp_path):
        with pytest.raises(InputError, match=message):
            rb.run_kind(folder)                   # only a garbled run.json is refused here
            rb.read_overlap(folder)


def chart_traces(at) -> list[str]:
    return [t["name"] for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"]]


def points_caption(at) -> str:
    return next(c.value for c in at.caption if " points · " in c.value)


def test_an_overlap_folder_on_the_page_table_figure_filter_and_a_selected_record(overlap_folder, tmp_path):
    from tests.tiny import overlap_points, write_overlap_run

    at = new_page()
    open_folder(at, overlap_folder)
    assert not errors(at), errors(at)
    header = next(m.value for m in at.markdown if "· overlap ·" in m.value)
    assert "tiny-llama" in header and "editors: langedit, mpn" in header and "test languages en, zh, de" in header
    assert [w.value for w in at.warning] == ["mzsre:4 · mpn: mpn: no subject token found in the prompt."]
    corr = next(d.value for d in at.dataframe if "ρ" in d.value.columns)
    assert list(corr["editor"]) == ["langedit", "mpn"] and corr["ρ"][0] == pytest.approx(1.0)
    assert not any("predates" in c.value for c in at.caption)
    assert any("language-agnostic neurons" in c.value and "added" in c.value for c in at.caption)
    assert chart_traces(at) == ["langedit (ρ = +1.00)", "mpn"]
    assert points_caption(at).startswith("10 of 10 points · 5 records · 1 failed")

    # the editor filter narrows the figure and the table
    at.multiselect(key="runs-ov-method").set_value(["mpn"]).run()
    assert not errors(at) and chart_traces(at) == ["mpn"]
    assert points_caption(at).startswith("5 of 10 points")
    at.multiselect(key="runs-ov-method").set_value([]).run()

    # selecting a row: that record under every editor, side by side
    table = next(d for d in at.dataframe if (d.key or "").startswith("runs-ov-points-"))
    assert list(table.value["record"]) == list(overlap_points()["record"])
    at.session_state[table.key] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    assert not errors(at), errors(at)
    assert any(m.value == "**Record mzsre:1** under every editor" for m in at.markdown)
    side = next(d.value for d in at.dataframe if list(d.value.columns) == ["langedit", "mpn"])
    assert side.loc["agnostic share", "langedit"] == "9.0 %" and side.loc["added share", "mpn"] == "100.0 %"

    # the folder rewritten by a new run is read again; an old folder gets its p values recomputed
    points = overlap_points()
    import os
    import time

    points[points["record"] != "mzsre:0"].to_csv(overlap_folder / "points.csv", index=False)
    later = time.time() + 5
    os.utime(overlap_folder / "points.csv", (later, later))
    at.run()
    assert points_caption(at).startswith("8 of 8 points · 4 records")
    open_folder(at, write_overlap_run(tmp_path / "old", with_p=False))
    assert not errors(at), errors(at)
    assert any("predates the permutation p value" in c.value for c in at.caption)
    corr = next(d.value for d in at.dataframe if "ρ" in d.value.columns)
    assert 0 < corr["p"][0] < 0.05


def test_a_damaged_overlap_folder_is_an_error_box_and_the_page_keeps_working(overlap_folder, tmp_path):
    at = new_page()
    for folder, message in damaged_overlap_folders(overlap_folder, tmp_path):
        open_folder(at, folder)
        assert any(message in e.value for e in at.error), (folder, errors(at))
        assert not at.exception
    open_folder(at, overlap_folder)
    assert not errors(at) and len(at.get("plotly_chart")) == 1


def test_the_cli_lists_and_shows_an_overlap_folder(overlap_folder, tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["runs", "list", str(tmp_path / "runs")])
    assert listed.exit_code == 0 and f"overlap     {overlap_folder}" in listed.output, listed.output
    out = tmp_path / "mpn.csv"
    result = runner.invoke(cli, ["runs", "show", str(overlap_folder), "--method", "mpn", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    assert "Spearman's ρ" in result.output and "langedit" in result.output and "5 points" in result.output
    assert "no subject token" in result.output                       # the editor's error, as a warning
    written = pd.read_csv(out)
    assert len(written) == 5 and set(written["method"]) == {"mpn"}
    assert written["added share"].iloc[0] == 1.0                      # shares as in points.csv (0-1), not %
    result = runner.invoke(cli, ["runs", "show", str(tmp_path / "runs"), "--table", "none"])
    assert result.exit_code == 2 and "not a run folder" in result.output
    for bad, message in ((["--kind", "reliability"], "not for overlap runs"), (["--method", "rome"], "editors are"),
                         (["--table", "memla"], "--table must be all or none")):
        result = runner.invoke(cli, ["runs", "show", str(overlap_folder), *bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, bad
    old = tmp_path / "old"
    from tests.tiny import write_overlap_run

    write_overlap_run(old, with_p=False)
    result = runner.invoke(cli, ["runs", "show", str(old), "--figures", str(tmp_path / "figs"), "--no-png"])
    assert result.exit_code == 0 and "recomputed from points.csv" in result.output, result.output
    assert (tmp_path / "figs" / "overlap_vs_transfer.html").is_file()
