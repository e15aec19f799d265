"""editors.compare: every editor on one fact, cached on disk, its grid and the live transfer matrices, on a tiny
model."""
from __future__ import annotations

import io
import zipfile

import pytest

from analysis.errors import InputError
from editors import compare as cmp
from editors.evaluate import probes, score_probes, unedited_answers
from editors.base import get_editor
from editors.requests import EditRequest, LanguageFact
from tests.tiny import assert_bit_identical, run_cli, snapshot, tiny_workbench

HP = {
    "rome": dict(layers=[1], v_num_grad_steps=3, context_template_length_params=[[2, 1]], mom2_n_tokens=500),
    "memit": dict(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[2, 1]], mom2_n_tokens=500),
    "ike": dict(k=2),
}

pytestmark = pytest.mark.usefixtures("private_cache")   # tiny_spec, private_cache: tests/conftest.py


def request() -> EditRequest:
    return EditRequest({
        "en": LanguageFact("The capital of France is", "France", "Berlin", paraphrases=["France has the capital"],
                           locality=[("The capital of Italy is", "Rome")]),
        "de": LanguageFact("Die Hauptstadt von Frankreich ist", "Frankreich", "Berlin",
                           locality=[("Die Hauptstadt von Italien ist", "Rom")]),
    }, case_id="fr")


def test_comparison_scores_each_editor_as_a_direct_edit_would_and_leaves_the_model_unchanged():
    wb = tiny_workbench("llama")
    original = snapshot(wb.model)
    result = cmp.compare(wb, request(), {"rome": HP["rome"], "memit": HP["memit"]})
    assert_bit_identical(wb.model, original)
    assert [r.method for r in result.runs] == ["rome", "memit"]
    assert not any(r.cached or r.error for r in result.runs)
    items = probes(request().validate(wb))
    answers = unedited_answers(wb, items)
    # each editor's rows equal what applying its edit by hand and scoring gives
    edit = get_editor("rome", HP["rome"]).compute(wb, request())
    with edit.applied(wb):
        direct = score_probes(wb, items, answers)
    rows = result.runs[0].rows
    assert [r["answer"] for r in rows] == [r["answer"] for r in direct]
    assert [r.get("p_new") for r in rows] == pytest.approx([r.get("p_new") for r in direct])
    assert result.before == score_probes(wb, items, answers, unedited=True)
    # the grid: a row per probe, the unedited model's and each editor's columns
    grid = cmp.probe_grid(result)
    assert len(grid) == len(items)
    assert list(grid["probe"][:3]) == ["edit", "paraphrase 1", "locality 1"]
    for method in ("unedited", "rome", "memit"):
        assert {f"{method} · answer", f"{method} · P(new)", f"{method} · success"} <= set(grid.columns)
    assert list(grid["rome · answer"]) == [r["answer"] for r in direct]
    summary = cmp.summary_table(result)
    mine = summary[(summary.method == "rome") & (summary.language == "en") & (summary.kind == "reliability")]
    assert float(mine["success"].iloc[0]) == pytest.approx(100 * rows[0]["f1"])


def test_a_second_comparison_reads_every_edit_back_from_disk_and_a_new_hparam_computes_again(monkeypatch):
    wb = tiny_workbench("llama")
    first = cmp.compare(wb, request(), {"rome": HP["rome"]})
    calls = []
    original = type(get_editor("rome")).compute

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(get_editor("rome")), "compute", counting)
    again = cmp.compare(wb, request(), {"rome": HP["rome"]})
    assert calls == [] and again.runs[0].cached
    assert again.runs[0].rows == first.runs[0].rows and again.runs[0].seconds == first.runs[0].seconds
    # scored on other test languages: the edit is reused, only the scores are new
    en_only = cmp.compare(wb, request(), {"rome": HP["rome"]}, test_languages=["en"])
    assert calls == [] and en_only.runs[0].cached
    assert {r["language"] for r in en_only.runs[0].rows} == {"en"}
    # another hyper-parameter value is another edit
    cmp.compare(wb, request(), {"rome": {**HP["rome"], "v_num_grad_steps": 2}})
    assert calls == ["rome"]
    # a damaged saved edit is computed again
    (first.runs[0].folder / "edit" / "edit.safetensors").write_bytes(b"broken")
    for scores in first.runs[0].folder.glob("scores-*.json"):
        scores.unlink()
    redone = cmp.compare(wb, request(), {"rome": HP["rome"]})
    assert calls == ["rome", "rome"] and not redone.runs[0].cached


def test_an_editor_that_cannot_edit_is_recorded_and_the_others_run():
    wb = tiny_workbench("llama")
    result = cmp.compare(wb, request(), {"rome": {**HP["rome"], "layers": [99]}, "ike": HP["ike"]})
    assert result.runs[0].error and "layer" in result.runs[0].error.lower()
    assert not result.runs[1].error and result.runs[1].rows
    assert set(cmp.comparison_frame(result.before, result.runs)["method"]) == {"unedited", "ike"}
    assert cmp.timing_table(result)["error"].iloc[0]
    with pytest.raises(InputError):
        cmp.compare(wb, request(), {"rome": {**HP["rome"], "layers": [99]}}, on_error="raise")
    with pytest.raises(InputError, match="at least one editor"):
        cmp.compare(wb, request(), {})
    with pytest.raises(InputError, match="no language"):
        cmp.compare(wb, request(), {"ike": HP["ike"]}, test_languages=["zh"])


def test_transfer_matrix_edits_each_language_alone_then_all_and_reuses_the_comparison_edit(monkeypatch):
    wb = tiny_workbench("llama")
    cmp.compare(wb, request(), {"rome": HP["rome"]})        # the "all" edit, computed here
    runs = cmp.transfer_matrix_runs(wb, request(), {"rome": HP["rome"], "ike": HP["ike"]})
    assert set(runs) == {"rome", "ike"} and list(runs["rome"]) == ["en", "de", "all"]
    assert runs["rome"]["all"].cached and not runs["rome"]["en"].cached
    assert runs["rome"]["en"].edit_languages == ("en",)
    matrix = cmp.transfer_matrix(runs["rome"], "top1")
    assert list(matrix.index) == ["en", "de", "all"] and list(matrix.columns) == ["en", "de"]
    # each cell is the mean top-1 of that run's reliability probe in that language
    rows = runs["rome"]["de"].rows
    want = [r["top1"] for r in rows if r["kind"] == "reliability" and r["language"] == "en"]
    assert matrix.loc["de", "en"] == pytest.approx(100 * sum(want) / len(want))
    assert ((matrix >= 0) & (matrix <= 100)).all().all()
    with pytest.raises(InputError, match="metric"):
        cmp.transfer_matrix(runs["rome"], "nope")


def test_edits_zip_holds_every_computed_edit():
    wb = tiny_workbench("llama")
    result = cmp.compare(wb, request(), {"rome": HP["rome"], "ike": HP["ike"]})
    names = zipfile.ZipFile(io.BytesIO(cmp.edits_zip(result.runs))).namelist()
    assert {"rome-en+de/edit.json", "rome-en+de/edit.safetensors", "rome-en+de/editor_run.json", "ike-en+de/edit.json"} <= set(names)


# ============================================================================== CLI


def test_cli_compare_writes_the_grid_summary_matrices_and_edits_and_reads_them_back(tiny_spec, tmp_path):
    import json

    import pandas as pd
    fact = ["--prompt", "en:The capital of France is", "--subject", "en:France", "--target", "en:Berlin",
            "--paraphrase", "en:France has the capital", "--prompt", "de:Die Hauptstadt von Frankreich ist",
            "--subject", "de:Frankreich", "--target", "de:Berlin"]
    args = ["compare", "--model", tiny_spec, "--methods", "rome,ike", "--hparams",
            json.dumps({"rome": HP["rome"], "ike": HP["ike"]}), "--transfer", "--out", str(tmp_path / "out"), *fact]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    grid = pd.read_csv(out / "grid.csv")
    assert list(grid["language"]) == ["en", "en", "de"] and "rome · answer" in grid.columns
    assert list(pd.read_csv(out / "timing.csv")["editor"]) == ["rome", "ike"]
    matrix = pd.read_csv(out / "transfer_rome.csv", index_col=0)
    assert list(matrix.index) == ["en", "de", "all"] and list(matrix.columns) == ["en", "de"]
    names = zipfile.ZipFile(out / "edits.zip").namelist()
    assert "rome-en+de/edit.safetensors" in names
    assert (out / "summary.html").is_file() and (out / "transfer_ike.html").is_file()
    # the same request again: every edit is read back, and the folder of this request is reused
    again = run_cli(args)
    assert again.exit_code == 0, again.output
    assert pd.read_csv(out / "timing.csv")["from cache"].all()


@pytest.mark.parametrize("extra, fragment", [
    (["--methods", "nope"], "Unknown editor"),
    (["--methods", ""], "at least one editor"),
    (["--hparams", '{"memit": {}}', "--methods", "rome"], "not in --methods"),
    (["--hparams", "[1]"], "--hparams"),
    (["--methods", "rome", "--hparams", '{"rome": {"layers": [99]}}'], "layer"),
])
def test_cli_compare_bad_input_exits_2(tiny_spec, extra, fragment):
    args = ["compare", "--model", tiny_spec, "--prompt", "en:The capital of France is", "--subject",
            "en:France", "--target", "en:Berlin", *extra]
    result = run_cli(args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_timing_table_counts_what_each_edit_changes_in_words():
    from pathlib import Path

    import pandas as pd

    from editors.compare import Comparison, EditorRun, timing_table

    def run(method, summary, error=None):
        return EditorRun(method=method, edit_languages=("en",), hparams={}, folder=Path(), seconds=1.234,
                         summary=summary, rows=[], error=error)

    runs = [run("mpn", {"added_neurons": 1}), run("rome", {"parameters": 1}),
            run("lu-lafns", {"patched_neurons": 7335, "parameters": 2}), run("ike", {"context_facts": 3}),
            run("memit", {}, error="no subject")]
    table = timing_table(Comparison(request=None, test_languages=("en",), before=[], runs=runs))
    assert list(table["changes"]) == ["1 added neuron", "1 weight matrix", "2 weight matrices, 7335 patched neurons",
                                      "3 facts in context", ""]
    assert list(table["seconds"])[:4] == [1.23] * 4 and pd.isna(table["seconds"].iloc[4])
    assert table["error"].iloc[4] == "no subject"
