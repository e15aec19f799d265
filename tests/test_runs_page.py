"""The Runs page (app/views/runs.py), its reader (app/run_browser.py), its figures (analysis/run_figures.py) and
`neuroglot runs`, on run folders built for real in the test: an evaluation (IKE and LU-LAFNs on a tiny random
llama, two records in en and de, edit sets en+de, en, de) and a sequential run (MEMIT, two steps of two MzsRE dev
records). What the page and the CLI count is checked against rows.jsonl / steps.jsonl read independently."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from tests.tiny import MZSRE_DEV, app_page, neuroglot_cache, raw_probes, run_small_evaluation, tiny_workbench

MEMIT = dict(v_lr=1.0, v_num_grad_steps=4, clamp_norm_factor=0.0, v_weight_decay=0.0,
             context_template_length_params=[[4, 1]], mom2_n_tokens=1000, layers=[0, 1], mom2_update_weight=1.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An evaluation folder and (when the MzsRE dev data is there) a sequential run folder, built for real."""
    base = tmp_path_factory.mktemp("runs-page")
    with neuroglot_cache(base / "cache"):                         # tiny models' key statistics stay here
        evaluation = run_small_evaluation(base, "eval")
        sequential = None
        if MZSRE_DEV.is_dir():
            from editors.sequential_run import StreamConfig, run_sequential

            stream = StreamConfig(dataset=str(MZSRE_DEV), languages=["en", "de"], batch=2, steps=2,
                                  order="interleaved", records="100-149", flores_sentences=3)
            run_sequential(tiny_workbench("llama"), stream, ["memit"], base / "seq", hparams={"memit": MEMIT})
            sequential = base / "seq"
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
