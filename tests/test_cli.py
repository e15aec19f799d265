"""The CLI: real commands, and exit code 2 with a one-line message on bad input."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.tiny import tiny_model_and_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    model, tok = tiny_model_and_tokenizer("gpt2")
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model


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
