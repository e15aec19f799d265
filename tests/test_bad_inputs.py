"""Bad input across every command: exit code 2, exactly one clear line naming the problem, never a traceback.

One table, run through typer's CliRunner on a tiny checkpoint; output paths that cannot be used are refused
before the model loads. The Python API raises our own errors for the same mistakes.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from analysis.errors import NeuroglotError
from app.cli import cli
from tests.tiny import fake_run, make_corpus, save_tiny_checkpoint, write_dataset

runner = CliRunner()
BAR = re.compile(r"\d+%\|")  # tqdm progress bars are not messages
FACT = ["--prompt", "en:The capital of France is", "--subject", "en:France", "--target", "en:Rome"]
TINY_LU = '{"layers": [0, 1], "beta": 0.1, "steps": 3, "lr": 0.5, "n_prefixes": 1, "prefix_length": 2}'
LATIN1 = 'Caf\xe9'


def _tiny_gguf(path: Path) -> bytes:
    """A small valid GGUF file (llama layout, one tensor), for cutting short."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(32)])
    w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _unwritable(root: Path) -> Path:
    """A folder nobody may create files in: a read-only folder, or (as root, who may write anywhere) sysfs."""
    if os.geteuid() == 0:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("running as root without sysfs: no folder is unwritable")
        return Path("/sys/kernel/neuroglot-test")
    folder = root / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "run"


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    tiny = t / "tiny"
    save_tiny_checkpoint("gpt2", tiny)
    cut = t / "cut-safetensors"
    shutil.copytree(tiny, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad_config = t / "bad-config"
    shutil.copytree(tiny, bad_config)
    (bad_config / "config.json").write_bytes(b"\xff\xfe{not json")
    gguf_bytes = _tiny_gguf(t / "whole.gguf")
    (t / "cut.gguf").write_bytes(gguf_bytes[: len(gguf_bytes) * 3 // 10])
    (t / "cut-late.gguf").write_bytes(gguf_bytes[: len(gguf_bytes) * 9 // 10])
    (t / "empty.gguf").write_bytes(b"")
    (t / "noise.gguf").write_bytes(bytes(range(256)) * 4)
    row = '{"fact_id": "1", "relation": "P1", "language": "en", "subject": "%s", "object": "x", "prompt": "%s is"}\n'
    (t / "latin1.jsonl").write_bytes((row % (LATIN1, LATIN1)).encode("latin-1"))
    (t / "latin1.csv").write_bytes(f"fact_id,relation,language,subject,object,prompt\n1,P1,en,{LATIN1},x,{LATIN1} is\n"
                                   .encode("latin-1"))
    (t / "binary.jsonl").write_bytes(bytes(range(128, 256)) * 8)
    (t / "latin1.json").write_bytes(f'{{"beta": "{LATIN1}"}}'.encode("latin-1"))
    (t / "notes.txt").write_text("mine")
    (t / "empty.jsonl").write_text("")
    (t / "broken.jsonl").write_text('{"fact_id": "1",\n')
    (t / "nofield.jsonl").write_text('{"fact_id": "1"}\n')
    (t / "noheader.csv").write_text("a,b\n1,2\n")
    (t / "empty-dir").mkdir()
    make_corpus(("en", "de")).to_jsonl(t / "corpus.jsonl")
    (t / "data").mkdir()
    write_dataset(t / "data")
    (t / "others").mkdir()
    (t / "others" / "thesis.tex").write_text("mine")
    fake_run(t / "eval-a", "rome")
    fake_run(t / "eval-other", "lora-ft", dataset="other")
    atlas = t / "atlas"
    result = runner.invoke(cli, ["neurons", "--model", str(tiny), "--languages", "en,de", "--max-facts", "1",
                                 "--no-png", "--out", str(atlas)])
    assert result.exit_code == 0, result.output
    paths = {p.name.replace("-", "_").replace(".", "_"): str(p) for p in t.iterdir()}
    return SimpleNamespace(**paths, root=t, unwritable=str(_unwritable(t)), regular=str(t / "notes.txt"),
                           under_file=str(t / "notes.txt" / "run"), fresh=str(t / "fresh"))


def M(f):
    return ["--model", f.tiny]


def out(f, name="fresh"):
    return ["--out", getattr(f, name)]


# (id, args from the fixture paths, fragment the one line must contain, fragments it must not contain)
CASES = [
    # ---- info: the model spec, device and dtype
    ("info-gguf-missing", lambda f: ["info", "--model", "/nope/model.gguf"], "GGUF file not found", ()),
    ("info-unknown-spec", lambda f: ["info", "--model", "???"], "Unknown model spec", ()),
    ("info-empty-spec", lambda f: ["info", "--model", " "], "empty", ()),
    ("info-folder-no-config", lambda f: ["info", "--model", f.empty_dir], "no config.json", ()),
    ("info-file-not-gguf", lambda f: ["info", "--model", f.regular], "not a .gguf model", ()),
    ("info-gguf-cut-in-header", lambda f: ["info", "--model", f.cut_gguf], "truncated", ()),
    ("info-gguf-cut-in-data", lambda f: ["info", "--model", f.cut_late_gguf], "truncated", ()),
    ("info-gguf-empty", lambda f: ["info", "--model", f.empty_gguf], "not a GGUF model", ()),
    ("info-gguf-not-gguf", lambda f: ["info", "--model", f.noise_gguf], "not a GGUF model", ()),
    ("info-safetensors-cut", lambda f: ["info", "--model", f.cut_safetensors], "truncated", ()),
    ("info-config-not-utf8", lambda f: ["info", "--model", f.bad_config], "config", ()),
    ("info-dtype", lambda f: ["info", *M(f), "--dtype", "float8"], "Unknown dtype 'float8'", ()),
    ("info-device", lambda f: ["info", *M(f), "--device", "tpu"], "Unknown device 'tpu'", ()),
    # ---- corpus: files and filters
    ("corpus-missing", lambda f: ["corpus", "--corpus", "/nope/corpus.jsonl"], "/nope/corpus.jsonl", ()),
    ("corpus-language", lambda f: ["corpus", "--languages", "en,xx"], "xx", ()),
    ("corpus-aligned-one", lambda f: ["corpus", "--aligned", "--languages", "en"], "at least two", ()),
    ("corpus-jsonl-latin1", lambda f: ["corpus", "--corpus", f.latin1_jsonl], "not UTF-8", ()),
    ("corpus-csv-latin1", lambda f: ["corpus", "--corpus", f.latin1_csv], "not UTF-8", ()),
    ("corpus-binary", lambda f: ["corpus", "--corpus", f.binary_jsonl], "not UTF-8", ()),
    ("corpus-file-type", lambda f: ["corpus", "--corpus", f.regular], "unsupported file type", ()),
    ("corpus-broken-json", lambda f: ["corpus", "--corpus", f.broken_jsonl], "not valid JSON", ()),
    ("corpus-missing-field", lambda f: ["corpus", "--corpus", f.nofield_jsonl], "missing field", ()),
    ("corpus-csv-header", lambda f: ["corpus", "--corpus", f.noheader_csv], "missing column", ()),
    ("corpus-empty", lambda f: ["corpus", "--corpus", f.empty_jsonl], "empty", ()),
    ("corpus-folder-layout", lambda f: ["corpus", "--corpus", f.empty_dir], "unrecognised folder layout", ()),
    ("corpus-relation", lambda f: ["corpus", "--relations", "P999"], "P999", ()),
    # ---- neurons
    ("neurons-one-language", lambda f: ["neurons", *M(f), "--languages", "en", *out(f)], "at least two", ()),
    ("neurons-beta", lambda f: ["neurons", *M(f), "--beta", "1.5", *out(f)], "β", ()),
    ("neurons-positions", lambda f: ["neurons", *M(f), "--positions", "middle", *out(f)], "positions", ()),
    ("neurons-text", lambda f: ["neurons", *M(f), "--text", "tweet", *out(f)], "--text", ()),
    ("neurons-language", lambda f: ["neurons", *M(f), "--languages", "en,xx", *out(f)], "xx", ()),
    ("neurons-max-facts", lambda f: ["neurons", *M(f), "--languages", "en,de", "--max-facts", "0", *out(f)],
     "max_facts", ()),
    ("neurons-corpus-latin1", lambda f: ["neurons", *M(f), "--corpus", f.latin1_jsonl, *out(f)], "not UTF-8", ()),
    ("neurons-out-file", lambda f: ["neurons", *M(f), "--languages", "en,de", *out(f, "regular")],
     "is a file, not a folder", ()),
    ("neurons-out-under-file", lambda f: ["neurons", *M(f), "--languages", "en,de", *out(f, "under_file")],
     "is a file", ()),
    ("neurons-out-unwritable", lambda f: ["neurons", *M(f), "--languages", "en,de", *out(f, "unwritable")],
     "cannot be written", ()),
    ("neurons-out-other-files", lambda f: ["neurons", *M(f), "--languages", "en,de", *out(f, "others")],
     "other files", ()),
    ("neurons-out-other-request", lambda f: ["neurons", *M(f), "--languages", "en,de", "--positions", "last",
                                             "--max-facts", "1", *out(f, "atlas")], "another request", ()),
    ("neurons-out-evaluation", lambda f: ["neurons", *M(f), "--languages", "en,de", *out(f, "eval_a")],
     "evaluation run", ()),
    ("neurons-model-cut", lambda f: ["neurons", "--model", f.cut_safetensors, "--languages", "en,de",
                                     "--max-facts", "1", "--no-png", *out(f)], "truncated", ()),
    ("neurons-dtype", lambda f: ["neurons", *M(f), "--languages", "en,de", "--dtype", "half", *out(f)],
     "Unknown dtype", ()),
    # ---- attribute
    ("attribute-threshold", lambda f: ["attribute", *M(f), "--threshold", "0", *out(f)], "threshold", ()),
    ("attribute-share", lambda f: ["attribute", *M(f), "--share", "2", *out(f)], "share", ()),
    ("attribute-language", lambda f: ["attribute", *M(f), "--languages", "en,xx", *out(f)], "xx", ()),
    ("attribute-no-language", lambda f: ["attribute", *M(f), "--languages", "", *out(f)], "at least one", ()),
    ("attribute-layers-range", lambda f: ["attribute", *M(f), "--languages", "en,de", "--max-facts", "1",
                                          "--layers", "0-9", *out(f)], "out of range", ()),
    ("attribute-layers-syntax", lambda f: ["attribute", *M(f), "--languages", "en,de", "--max-facts", "1",
                                           "--layers", "a", *out(f)], "--layers", ()),
    ("attribute-prompt-syntax", lambda f: ["attribute", *M(f), "--prompt", "The capital is", *out(f)],
     "LANG:TEXT", ()),
    ("attribute-prompt-no-answer", lambda f: ["attribute", *M(f), "--prompt", "en:The capital is", *out(f)],
     "answer for en", ()),
    ("attribute-method", lambda f: ["attribute", *M(f), "--languages", "en,de", "--method", "simpson", *out(f)],
     "integration method", ()),
    ("attribute-steps", lambda f: ["attribute", *M(f), "--languages", "en,de", "--steps", "0", *out(f)],
     "steps", ()),
    ("attribute-target-tokens", lambda f: ["attribute", *M(f), "--languages", "en,de", "--target-tokens", "all",
                                           *out(f)], "target_tokens", ()),
    ("attribute-fact", lambda f: ["attribute", *M(f), "--languages", "en,de", "--facts", "P99:1", *out(f)],
     "P99:1", ()),
    ("attribute-out-file", lambda f: ["attribute", *M(f), "--languages", "en,de", *out(f, "regular")],
     "is a file", ()),
    ("attribute-out-atlas", lambda f: ["attribute", *M(f), "--languages", "en,de", "--max-facts", "1",
                                       *out(f, "atlas")], "neuron atlas", ()),
    # ---- trace
    ("trace-no-subject", lambda f: ["trace", *M(f), "--prompt", "en:The capital of France is", *out(f)],
     "subject of the en prompt", ()),
    ("trace-subject-not-in-prompt", lambda f: ["trace", *M(f), "--prompt", "en:The capital of France is",
                                               "--subject", "en:Germany", "--no-png", *out(f)], "Germany", ()),
    ("trace-kinds", lambda f: ["trace", *M(f), "--kinds", "hidden,mlps", *out(f)], "--kinds", ()),
    ("trace-fact", lambda f: ["trace", *M(f), "--languages", "en,de", "--fact", "P99:1", *out(f)], "P99:1", ()),
    ("trace-answer-from", lambda f: ["trace", *M(f), "--answer-from", "nobody", *out(f)], "--answer-from", ()),
    ("trace-subject-alone", lambda f: ["trace", *M(f), "--subject", "en:France", *out(f)], "go with --prompt", ()),
    ("trace-samples", lambda f: ["trace", *M(f), "--samples", "0", *out(f)], "samples", ("subject",)),
    ("trace-noise", lambda f: ["trace", *M(f), "--noise", "-1", *out(f)], "noise", ()),
    ("trace-no-language", lambda f: ["trace", *M(f), "--languages", "", *out(f)], "at least one", ()),
    ("trace-out-file", lambda f: ["trace", *M(f), *out(f, "regular")], "is a file", ()),
    ("trace-out-atlas", lambda f: ["trace", *M(f), "--languages", "en,de", "--max-facts", "1", "--samples", "1",
                                   *out(f, "atlas")], "neuron atlas", ()),
    # ---- edit
    ("edit-no-fact", lambda f: ["edit", *M(f)], "one way", ()),
    ("edit-subject-not-in-prompt", lambda f: ["edit", *M(f), "--prompt", "en:The capital of France is",
                                              "--subject", "en:Spain", "--target", "en:Rome"], "does not occur", ()),
    ("edit-no-target", lambda f: ["edit", *M(f), *FACT[:4]], "--target", ()),
    ("edit-empty-target", lambda f: ["edit", *M(f), *FACT[:4], "--target", "en:"], "LANG:TEXT", ()),
    ("edit-language", lambda f: ["edit", *M(f), "--prompt", "xx:The capital", "--subject", "xx:capital",
                                 "--target", "xx:Rome"], "xx", ()),
    ("edit-hparams-range", lambda f: ["edit", *M(f), *FACT, "--hparams", '{"layers": [99]}'], "out of range", ()),
    ("edit-method", lambda f: ["edit", *M(f), *FACT, "--method", "nope"], "Unknown editor", ()),
    ("edit-hparams-json", lambda f: ["edit", *M(f), *FACT, "--hparams", "{bad"], "not valid JSON", ()),
    ("edit-hparams-not-object", lambda f: ["edit", *M(f), *FACT, "--hparams", "[1]"], "JSON object", ()),
    ("edit-hparams-latin1", lambda f: ["edit", *M(f), *FACT, "--hparams", f.latin1_json], "not UTF-8", ()),
    ("edit-locality", lambda f: ["edit", *M(f), *FACT, "--locality", "en:no bar"], "QUESTION|ANSWER", ()),
    ("edit-request-latin1", lambda f: ["edit", *M(f), "--request", f.latin1_json], "not UTF-8", ()),
    ("edit-request-binary", lambda f: ["edit", *M(f), "--request", f.binary_jsonl], "not UTF-8", ()),
    ("edit-request-missing", lambda f: ["edit", *M(f), "--request", "/nope/request.json"],
     "neither JSON nor a file", ()),
    ("edit-request-list", lambda f: ["edit", *M(f), "--request", "[1]"], "one JSON object", ()),
    ("edit-request-number-target", lambda f: ["edit", *M(f), "--request", '{"facts": {"en": {"prompt": "The capital '
                                              'of France is", "subject": "France", "target_new": 5}}}'],
     "must be text", ("empty",)),
    ("edit-request-unknown-field", lambda f: ["edit", *M(f), "--request", '{"facts": {"en": {"prompt": "France is", '
                                              '"subject": "France", "target_new": "x", "tgt": 1}}}'],
     "unknown field", ()),
    ("edit-record-syntax", lambda f: ["edit", *M(f), "--record", "x"], "record number", ()),
    ("edit-record-corpus-dataset", lambda f: ["edit", *M(f), "--record", "0", "--dataset", f.corpus_jsonl],
     "not an edit data set", ()),
    ("edit-preset", lambda f: ["edit", *M(f), *FACT, "--preset", "nope"], "preset", ()),
    ("edit-save-file", lambda f: ["edit", *M(f), *FACT, "--hparams", TINY_LU, "--save", f.regular],
     "is a file", ()),
    ("edit-save-under-file", lambda f: ["edit", *M(f), *FACT, "--save", f.under_file], "is a file", ()),
    ("edit-save-unwritable", lambda f: ["edit", *M(f), *FACT, "--save", f.unwritable], "cannot be written", ()),
    ("edit-save-run-folder", lambda f: ["edit", *M(f), *FACT, "--save", f.atlas], "not a saved edit", ()),
    # ---- evaluate
    ("evaluate-method", lambda f: ["evaluate", *M(f), "--methods", "nope", "--dataset", f.data, *out(f)],
     "Unknown editor", ()),
    ("evaluate-no-method", lambda f: ["evaluate", *M(f), "--methods", "", "--dataset", f.data, *out(f)],
     "--methods", ()),
    ("evaluate-dataset-missing", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", "/nope",
                                            *out(f)], "/nope", ()),
    ("evaluate-dataset-is-corpus", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset",
                                              f.corpus_jsonl, "--edit-languages", "en,de", "--test-languages",
                                              "en,de", *out(f)], "not an edit data set", ()),
    ("evaluate-dataset-latin1", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.latin1_json,
                                           *out(f)], "not UTF-8", ()),
    ("evaluate-n", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                              "--edit-languages", "en,de", "--test-languages", "en,de", "--n", "0", *out(f)],
     "--n", ()),
    ("evaluate-edit-languages-twice", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                                                 "--edit-languages", "en,en", *out(f)], "twice", ()),
    ("evaluate-edit-languages-empty", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                                                 "--edit-languages", "", *out(f)], "--edit-languages", ()),
    ("evaluate-test-languages-empty", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                                                 "--edit-languages", "en,de", "--test-languages", "", *out(f)],
     "--test-languages", ("edit",)),
    ("evaluate-hparams-method", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                                           "--edit-languages", "en,de", "--test-languages", "en,de",
                                           "--hparams", '{"memit": {"layers": [0]}}', *out(f)], "not in --methods",
     ()),
    ("evaluate-hparams-shape", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                                          "--hparams", "[1]", *out(f)], "JSON object", ()),
    ("evaluate-out-file", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                                     "--edit-languages", "en,de", "--test-languages", "en,de", *out(f, "regular")],
     "is a file", ()),
    ("evaluate-out-atlas", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                                      "--edit-languages", "en,de", "--test-languages", "en,de", *out(f, "atlas")],
     "neuron atlas", ()),
    ("evaluate-out-other-evaluation", lambda f: ["evaluate", *M(f), "--methods", "lu-lafns", "--dataset", f.data,
                                                 "--edit-languages", "en,de", "--test-languages", "en,de",
                                                 *out(f, "eval_a")], "another evaluation", ()),
    ("evaluate-merge-no-out", lambda f: ["evaluate", "--merge", f.eval_a], "--out", ()),
    ("evaluate-merge-atlas-in", lambda f: ["evaluate", "--merge", f.eval_a, "--merge", f.atlas, *out(f)],
     "not an evaluation run folder", ()),
    ("evaluate-merge-into-atlas", lambda f: ["evaluate", "--merge", f.eval_a, *out(f, "atlas")], "neuron atlas", ()),
    ("evaluate-merge-different", lambda f: ["evaluate", "--merge", f.eval_a, "--merge", f.eval_other, *out(f)],
     "different evaluations", ()),
    ("evaluate-merge-into-other-evaluation", lambda f: ["evaluate", "--merge", f.eval_a, *out(f, "eval_other")],
     "another evaluation", ()),
    # ---- sequential
    ("sequential-method", lambda f: ["sequential", *M(f), "--methods", "rome", "--dataset", f.data,
                                     "--languages", "en,de", "--batch", "1", "--steps", "2", *out(f)],
     "Unknown sequential", ()),
    ("sequential-order", lambda f: ["sequential", *M(f), "--dataset", f.data, "--languages", "en,de",
                                    "--batch", "1", "--steps", "2", "--order", "random", *out(f)], "--order", ()),
    ("sequential-batch", lambda f: ["sequential", *M(f), "--dataset", f.data, "--languages", "en,de",
                                    "--batch", "0", *out(f)], "--batch", ()),
    ("sequential-languages-twice", lambda f: ["sequential", *M(f), "--dataset", f.data, "--languages", "en,en",
                                              "--batch", "1", "--steps", "1", *out(f)], "twice", ()),
    ("sequential-too-few-records", lambda f: ["sequential", *M(f), "--dataset", f.data, "--languages", "en,de",
                                              "--batch", "2", "--steps", "2", *out(f)], "the stream needs 4", ()),
    ("sequential-records", lambda f: ["sequential", *M(f), "--dataset", f.data, "--languages", "en,de",
                                      "--batch", "1", "--steps", "1", "--records", "5-2", *out(f)], "range", ()),
    ("sequential-dataset-missing", lambda f: ["sequential", *M(f), "--dataset", "/nope", "--languages", "en,de",
                                              "--batch", "1", "--steps", "1", *out(f)], "/nope", ()),
    ("sequential-hparams-method", lambda f: ["sequential", *M(f), "--methods", "langedit", "--dataset", f.data,
                                             "--languages", "en,de", "--batch", "1", "--steps", "1", "--hparams",
                                             '{"memit": {"layers": [0]}}', *out(f)], "not in --methods", ()),
    ("sequential-hparams-value", lambda f: ["sequential", *M(f), "--methods", "langedit", "--dataset", f.data,
                                            "--languages", "en,de", "--batch", "1", "--steps", "1", "--hparams",
                                            '{"langedit": {"nullspace_threshold": -1, "layers": [0]}}', *out(f)],
     "nullspace_threshold", ()),
    ("sequential-out-atlas", lambda f: ["sequential", *M(f), "--dataset", f.data, "--languages", "en,de",
                                        "--batch", "1", "--steps", "1", *out(f, "atlas")], "no sequential run", ()),
    ("sequential-rollback-no-out", lambda f: ["sequential", "--rollback", "1"], "--out", ()),
    ("sequential-rollback-not-a-run", lambda f: ["sequential", "--rollback", "1", *out(f, "atlas")],
     "no sequential run", ()),
    # ---- app: checked before the server starts
    ("app-port", lambda f: ["app", "--port", "0"], "--port", ()),
    ("app-address", lambda f: ["app", "--address", " "], "--address", ()),
    ("app-model-missing", lambda f: ["app", "--model", "/nope/model.gguf"], "GGUF file not found", ()),
    ("app-model-unknown", lambda f: ["app", "--model", "???"], "Unknown model spec", ()),
    ("app-corpus-missing", lambda f: ["app", "--corpus", "/nope/corpus.jsonl"], "/nope/corpus.jsonl", ()),
    ("app-corpus-latin1", lambda f: ["app", "--corpus", f.latin1_jsonl], "not UTF-8", ()),
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Conversions of GGUF files (and anything else cached) go to a fresh folder, never the user's."""
    monkeypatch.setenv("NEUROGLOT_CACHE", str(tmp_path / "cache"))


def one_message(result) -> str:
    """The one message line of a failed command; fails the test for a traceback or several lines."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not BAR.search(line)]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("args, fragment, absent", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(f, args, fragment, absent):
    before = {p.name: p.stat().st_mtime_ns for p in Path(f.atlas).iterdir()}
    result = runner.invoke(cli, args(f))
    assert result.exit_code == 2, result.output
    line = one_message(result)
    assert fragment in line, line
    for word in absent:
        assert word not in line.removeprefix("error: "), line
    assert not Path(f.fresh).exists()                      # nothing was started in the fresh folder
    assert {p.name: p.stat().st_mtime_ns for p in Path(f.atlas).iterdir()} == before  # nor in the atlas


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    assert {c[0].split("-")[0] for c in CASES} == {"info", "corpus", "neurons", "attribute", "trace", "edit",
                                                   "evaluate", "sequential", "app"}


@pytest.mark.parametrize("args", [
    lambda f: ["neurons", "--languages", "en,de", "--out", f.regular],
    lambda f: ["neurons", "--languages", "en,de", "--out", f.eval_a],
    lambda f: ["attribute", "--languages", "en,de", "--out", f.atlas],
    lambda f: ["trace", "--languages", "en,de", "--out", f.atlas],
    lambda f: ["trace", "--prompt", "en:The capital of France is", "--subject", "en:France", "--out", f.atlas],
    lambda f: ["evaluate", "--methods", "lu-lafns", "--dataset", f.data, "--edit-languages", "en,de",
               "--test-languages", "en,de", "--out", f.atlas],
    lambda f: ["edit", *FACT, "--save", f.regular],
    lambda f: ["edit", *FACT, "--save", f.atlas],
], ids=["neurons-file", "neurons-evaluation", "attribute-atlas", "trace-atlas", "trace-typed-atlas",
        "evaluate-atlas", "edit-save-file", "edit-save-folder"])
def test_output_paths_are_refused_before_the_model_loads(f, args, monkeypatch, tmp_path):
    import analysis.model

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the bad output path was refused")

    monkeypatch.setattr(analysis.model, "load_model", no_loading)
    result = runner.invoke(cli, args(f))      # the default model: the embedded one, never loaded here
    assert result.exit_code == 2, result.output
    one_message(result)


@pytest.mark.parametrize("command", [["info"], ["neurons", "--languages", "en,de", "--out", "{fresh}"],
                                     ["edit", *FACT]], ids=["info", "neurons", "edit"])
def test_an_invalid_dtype_is_refused_before_the_embedded_model_is_converted(f, command, monkeypatch, tmp_path):
    import analysis.model

    def no_conversion(*a, **k):
        raise AssertionError("the embedded model was converted before the dtype was checked")

    monkeypatch.setattr(analysis.model, "embedded_checkpoint", no_conversion)
    args = [a.format(fresh=f.fresh) for a in command] + ["--dtype", "float8"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    one_message(result)
    assert not (tmp_path / "cache" / "models").exists()


def test_a_bad_input_prints_no_traceback_from_the_installed_command(f):
    exe = Path(sys.executable).with_name("neuroglot")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]
    done = subprocess.run([*cmd, "corpus", "--corpus", f.latin1_jsonl], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {f.latin1_jsonl}: not UTF-8 text (a binary file, or another "
                                                "encoding); save it as UTF-8."]


# ------------------------------------------------------------------ the Python API raises our own errors


def test_the_python_api_raises_our_own_errors(f, tmp_path):
    from analysis.model import load_model
    from data import load_corpus
    from editors.edit import Edit

    for bad in (None, "", 3):
        with pytest.raises(NeuroglotError, match="saved edit"):
            Edit.load(bad)
    for max_facts in (math.nan, math.inf, 0, -1, 1.5, "3"):
        with pytest.raises(NeuroglotError, match="max_facts"):
            load_corpus("demo", max_facts=max_facts)
    for path in (f.latin1_jsonl, f.latin1_csv, f.binary_jsonl):
        with pytest.raises(NeuroglotError, match="not UTF-8"):
            load_corpus(path)
    for path in (f.cut_gguf, f.cut_late_gguf):
        with pytest.raises(NeuroglotError, match="truncated"):
            load_model(path)
    with pytest.raises(NeuroglotError, match="truncated"):
        load_model(f.cut_safetensors)
    with pytest.raises(NeuroglotError, match="dtype"):
        load_model("embedded", dtype="int4")
    assert not (tmp_path / "cache" / "models").exists()  # nothing was converted


@pytest.mark.slow
def test_the_embedded_gguf_cut_short_is_a_clear_error(tmp_path):
    from analysis.model import embedded_gguf, load_model

    with pytest.MonkeyPatch.context() as m:
        m.delenv("NEUROGLOT_CACHE", raising=False)   # the assembled GGUF of the user's cache (no download)
        source = embedded_gguf()
    cut = tmp_path / "gemma-cut.gguf"
    with open(source, "rb") as src:
        cut.write_bytes(src.read(2_000_000))
    with pytest.raises(NeuroglotError, match="truncated"):
        load_model(str(cut))
    result = runner.invoke(cli, ["info", "--model", str(cut)])
    assert result.exit_code == 2 and "truncated" in one_message(result)
