"""The CLI: real commands, and exit code 2 with a one-line message on bad input."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.tiny import save_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    return folder, save_tiny_checkpoint("gpt2", folder)


def test_info_on_a_local_folder(tiny_folder):
    folder, model = tiny_folder
    result = runner.invoke(cli, ["info", "--model", str(folder)])
    assert result.exit_code == 0, result.output
    assert "gpt2" in result.output
    assert f"layers             {model.config.n_layer}" in result.output
    assert str(model.config.n_inner or 4 * model.config.n_embd) in result.output


@pytest.mark.parametrize("args, fragment", [
    (["info", "--model", "/nope/model.gguf"], "GGUF file not found"),
    (["info", "--model", "???"], "Unknown model spec"),
    (["corpus", "--corpus", "/nope/corpus.jsonl"], "/nope/corpus.jsonl"),
    (["corpus", "--languages", "en,xx"], "xx"),
    (["corpus", "--aligned", "--languages", "en"], "at least two"),
])
def test_bad_input_exits_2_without_traceback(args, fragment):
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_corpus_counts_demo():
    result = runner.invoke(cli, ["corpus", "--languages", "en,zh"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines[1].split()
    assert "en" in header and "zh" in header
    assert any(line.startswith("P36") for line in lines)


@pytest.mark.slow
def test_info_embedded():
    result = runner.invoke(cli, ["info"])
    assert result.exit_code == 0, result.output
    assert "gemma3_text" in result.output and "2048" in result.output and "18" in result.output


def test_neurons_writes_run_folder_and_figures_then_reuses_it(tiny_folder, tmp_path):
    folder, model = tiny_folder
    out = tmp_path / "run"
    args = ["neurons", "--model", str(folder), "--languages", "en,de", "--beta", "0.3", "--max-facts", "1",
            "--out", str(out), "--no-png"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "wrote counts" in first.output and "LAFNs (β=0.3) peak at layer(s)" in first.output
    for name in ("counts.npz", "manifest.json", "neurons_per_layer_beta0.3.csv", "neurons_beta0.3.parquet",
                 "beta_sweep.csv", "neurons_per_layer_beta0.3.html", "overlap_beta0.3.html", "lape.html"):
        assert (out / name).stat().st_size > 0, name
    import pandas as pd

    table = pd.read_csv(out / "neurons_per_layer_beta0.3.csv")
    assert sorted(table["layer"].unique()) == list(range(model.config.n_layer))
    assert set(table["set"]) >= {"en", "de", "LAFN"}
    second = runner.invoke(cli, args)
    assert second.exit_code == 0 and "read counts" in second.output


@pytest.mark.parametrize("extra, fragment", [
    (["--languages", "en"], "at least two"),
    (["--beta", "1.5"], "β"),
    (["--positions", "middle"], "positions"),
    (["--languages", "en,xx"], "xx"),
])
def test_neurons_bad_input_exits_2(tiny_folder, tmp_path, extra, fragment):
    args = ["neurons", "--model", str(tiny_folder[0]), "--languages", "en,de", "--out", str(tmp_path / "r"),
            "--no-png", *extra]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_attribute_writes_run_folder_counts_and_figures_then_reuses_it(tiny_folder, tmp_path):
    folder, model = tiny_folder
    out = tmp_path / "ig"
    args = ["attribute", "--model", str(folder), "--languages", "en,de", "--max-facts", "2", "--steps", "3",
            "--prompts-per-fact", "2", "--out", str(out), "--no-png"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "wrote attributions" in first.output and "language-independent" in first.output
    import pandas as pd

    counts = pd.read_csv(out / "knowledge_neurons_t0.2_p0.5.csv")
    assert len(counts) == 2 and {"N_en", "N_de", "independent", "S_en", "S_de"} <= set(counts.columns)
    assert (counts["N_en"] == counts["S_en"] + counts["independent"]).all()
    for name in ("manifest.json", "scores.npz", "prompts.parquet", "knowledge_neurons_by_layer_t0.2_p0.5.html",
                 "attribution_strength.html", "top_neurons_t0.2_p0.5.csv"):
        assert (out / name).stat().st_size > 0, name
    second = runner.invoke(cli, args + ["--threshold", "0.5"])
    assert second.exit_code == 0 and "read attributions" in second.output
    assert (out / "knowledge_neurons_t0.5_p0.5.csv").is_file()


def test_attribute_a_typed_fact(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    result = runner.invoke(cli, ["attribute", "--model", str(folder), "--prompt", "en:The capital of France is",
                                 "--prompt", "de:Die Hauptstadt von Frankreich ist", "--target", "en:Paris",
                                 "--target", "de:Paris", "--steps", "2", "--layers", "0-1", "--out",
                                 str(tmp_path / "typed"), "--no-png"])
    assert result.exit_code == 0, result.output
    assert "2 prompts, 1 facts, de, en" in result.output


@pytest.mark.parametrize("extra, fragment", [
    (["--threshold", "0"], "threshold"),
    (["--share", "2"], "share"),
    (["--languages", "en,xx"], "xx"),
    (["--layers", "0-9"], "out of range"),
    (["--layers", "a"], "--layers"),
    (["--prompt", "The capital is"], "LANG:TEXT"),
    (["--prompt", "en:The capital is"], "answer for en"),
    (["--method", "simpson"], "integration method"),
    (["--facts", "P99:1"], "P99:1"),
])
def test_attribute_bad_input_exits_2(tiny_folder, tmp_path, extra, fragment):
    args = ["attribute", "--model", str(tiny_folder[0]), "--languages", "en,de", "--max-facts", "1",
            "--steps", "2", "--out", str(tmp_path / "r"), "--no-png", *extra]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_trace_a_typed_fact_in_two_languages(tiny_folder, tmp_path):
    folder, model = tiny_folder
    out = tmp_path / "tr"
    result = runner.invoke(cli, ["trace", "--model", str(folder), "--prompt", "en:The capital of France is",
                                 "--subject", "en:France", "--prompt", "de:Die Hauptstadt von Frankreich ist",
                                 "--subject", "de:Frankreich", "--answer", "en:Paris", "--samples", "2",
                                 "--out", str(out), "--no-png"])
    assert result.exit_code == 0, result.output
    assert "en: 'The capital of France is' → " in result.output and "de: " in result.output
    assert (out / "trace_en.html").stat().st_size > 0 and (out / "trace_de.html").stat().st_size > 0
    from analysis.causal_trace import load_traces

    traces = load_traces(out)
    assert traces["en"][0].scores["hidden"].shape[1] == model.config.n_layer


def test_trace_averages_corpus_facts_then_reuses(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    out = tmp_path / "avg"
    args = ["trace", "--model", str(folder), "--languages", "en,de", "--max-facts", "2", "--samples", "2",
            "--kinds", "hidden,mlp", "--out", str(out), "--no-png"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "wrote traces" in first.output and "en hidden: strongest average effect" in first.output
    assert (out / "average_effects.html").is_file() and (out / "average_effect_de_mlp.csv").is_file()
    second = runner.invoke(cli, args)
    assert second.exit_code == 0 and "read traces" in second.output


@pytest.mark.parametrize("extra, fragment", [
    (["--prompt", "en:The capital of France is"], "subject of the en prompt"),
    (["--prompt", "en:The capital of France is", "--subject", "en:Germany"], "Germany"),
    (["--kinds", "hidden,mlps"], "--kinds"),
    (["--fact", "P99:1"], "P99:1"),
    (["--answer-from", "nobody"], "--answer-from"),
    (["--subject", "en:France"], "go with --prompt"),
])
def test_trace_bad_input_exits_2(tiny_folder, tmp_path, extra, fragment):
    args = ["trace", "--model", str(tiny_folder[0]), "--languages", "en,de", "--max-facts", "1", "--samples", "1",
            "--out", str(tmp_path / "r"), "--no-png", *extra]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


# ============================================================ edit / evaluate

TINY_LU = '{"layers": [0, 1], "beta": 0.1, "steps": 3, "lr": 0.5, "n_prefixes": 1, "prefix_length": 2}'


def test_edit_a_typed_fact_prints_before_and_after_and_saves(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    result = runner.invoke(cli, ["edit", "--model", str(folder), "--method", "lu-lafns", "--hparams", TINY_LU,
                                 "--prompt", "en:The capital of France is", "--subject", "en:France",
                                 "--target", "en:Berlin", "--prompt", "de:Die Hauptstadt von Frankreich ist",
                                 "--subject", "de:Frankreich", "--target", "de:Berlin",
                                 "--locality", "en:The capital of Spain is|Madrid",
                                 "--save", str(tmp_path / "edit")])
    assert result.exit_code == 0, result.output
    assert "[en]" in result.output and "[de]" in result.output
    assert "answer before" in result.output and "answer after" in result.output and "locality" in result.output
    from editors.edit import Edit

    saved = Edit.load(tmp_path / "edit")
    assert saved.method == "lu-lafns" and saved.patches
    assert set(saved.meta["requests"][0]["facts"]) == {"en", "de"}


def test_edit_a_request_file_with_another_editor(tiny_folder, tmp_path):
    import json

    folder, _ = tiny_folder
    path = tmp_path / "req.json"
    path.write_text(json.dumps({"case_id": "x", "facts": {"en": {"prompt": "The capital of France is",
                                                                  "subject": "France", "target_new": "Rome"}}}))
    result = runner.invoke(cli, ["edit", "--model", str(folder), "--method", "lora-ft", "--request", str(path),
                                 "--hparams", '{"steps": 2, "layers": [0], "target_modules": ["down_proj"]}'])
    assert result.exit_code == 0, result.output
    assert "reliability" in result.output


@pytest.mark.parametrize("extra, fragment", [
    ([], "one way"),
    (["--prompt", "en:The capital of France is", "--subject", "en:Spain", "--target", "en:Rome"], "does not occur"),
    (["--prompt", "en:The capital of France is", "--subject", "en:France"], "--target"),
    (["--prompt", "en:The capital of France is", "--subject", "en:France", "--target", "en:"], "LANG:TEXT"),
    (["--prompt", "xx:The capital", "--subject", "xx:capital", "--target", "xx:Rome"], "xx"),
    (["--prompt", "en:The capital of France is", "--subject", "en:France", "--target", "en:Rome",
      "--hparams", '{"layers": [99]}'], "out of range"),
    (["--prompt", "en:The capital of France is", "--subject", "en:France", "--target", "en:Rome",
      "--method", "nope"], "Unknown editor"),
    (["--prompt", "en:The capital of France is", "--subject", "en:France", "--target", "en:Rome",
      "--hparams", "{bad"], "not valid JSON"),
    (["--prompt", "en:The capital of France is", "--subject", "en:France", "--target", "en:Rome",
      "--locality", "en:no bar"], "QUESTION|ANSWER"),
])
def test_edit_bad_input_exits_2(tiny_folder, extra, fragment):
    result = runner.invoke(cli, ["edit", "--model", str(tiny_folder[0])] + extra)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_evaluate_prints_both_tables_and_writes_a_run_folder(tiny_folder, tmp_path):
    from tests.tiny import write_dataset

    folder, _ = tiny_folder
    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data)
    out = tmp_path / "run"
    result = runner.invoke(cli, ["evaluate", "--model", str(folder), "--methods", "lu-lafns", "--dataset", str(data),
                                 "--edit-languages", "en,de", "--test-languages", "en,de", "--n", "2",
                                 "--hparams", '{"lu-lafns": ' + TINY_LU + '}', "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Table 2 style" in result.output and "Table 1 style" in result.output
    assert "| LU-LAFNs |" in result.output and "mono en" in result.output
    assert (out / "tables.md").exists() and (out / "rows.jsonl").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--methods", "nope"], "Unknown editor"),
    (["--dataset", "/nope"], "/nope"),
    (["--n", "0"], "--n"),
    (["--edit-languages", "en,en"], "twice"),
    (["--hparams", '{"memit": {"layers": [0]}}'], "not in --methods"),
])
def test_evaluate_bad_input_exits_2(tiny_folder, tmp_path, extra, fragment):
    from tests.tiny import write_dataset

    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data)
    args = ["evaluate", "--model", str(tiny_folder[0]), "--methods", "lu-lafns", "--dataset", str(data),
            "--edit-languages", "en,de", "--test-languages", "en,de", "--out", str(tmp_path / "r")]
    result = runner.invoke(cli, args + extra)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_evaluate_merges_run_folders(tmp_path):
    from tests.tiny import fake_run

    fake_run(tmp_path / "a", "rome")
    fake_run(tmp_path / "b", "memit")
    result = runner.invoke(cli, ["evaluate", "--merge", str(tmp_path / "a"), "--merge", str(tmp_path / "b"),
                                 "--out", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    assert "| M-ROME |" in result.output and "| M-MEMIT |" in result.output
    result = runner.invoke(cli, ["evaluate", "--merge", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--out" in result.output


def test_evaluate_table_memla_prints_only_memlas_tables_and_a_bad_table_is_exit_2(tmp_path):
    from tests.tiny import fake_run

    fake_run(tmp_path / "a", "rome")
    result = runner.invoke(cli, ["evaluate", "--merge", str(tmp_path / "a"), "--out", str(tmp_path / "m"),
                                 "--table", "memla"])
    assert result.exit_code == 0, result.output
    assert "memla Tables 3-4 style" in result.output and "Table 2 style" not in result.output
    result = runner.invoke(cli, ["evaluate", "--merge", str(tmp_path / "a"), "--out", str(tmp_path / "n"),
                                 "--table", "everything"])
    assert result.exit_code == 2 and "--table must be one of: all, memla" in result.output
