"""Nothing earlier is lost: run folders and saved edits are hashed before and after.

* A folder holding another request's or another command's results is refused before any work
  (CLI and Python API); ``--overwrite`` / ``overwrite=True`` replaces it on purpose.
* Ctrl-C (a real SIGINT, at chosen points and from outside) during neurons, attribute, trace,
  edit --save and evaluate: one line, exit code 130, every earlier folder as it was; an
  interrupted evaluation resumes and its tables always match its rows.
* kill -9 at every step of ``Edit.save`` (both swap strategies, and at random moments of a
  saving loop): the earlier edit stays loadable and unchanged, no hidden folders pile up.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from analysis import runs
from analysis.errors import InputError, NeuroglotError
from analysis.runs import RunFolderError
from app.cli import cli
from tests.tiny import fake_run, make_corpus, save_tiny_checkpoint, tiny_workbench, write_dataset

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
BAR = re.compile(r"\d+%\|")
FACT = ["--prompt", "en:The capital of France is", "--subject", "en:France"]
LORA = '{"steps": 1, "layers": [0], "target_modules": ["down_proj"]}'
DOWN = "model.layers.0.mlp.down_proj.weight"


def digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (the folder as it is, byte for byte)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary or moved-aside folders of ``folder`` beside it."""
    return sorted(p.name for p in Path(folder).parent.iterdir() if p.name.startswith(f".{Path(folder).name}."))


def messages(result) -> list[str]:
    assert "Traceback" not in result.stdout + result.stderr
    return [line for line in result.stderr.splitlines() if line.strip() and not BAR.search(line)]


@pytest.fixture(autouse=True)
def ctrl_c_as_at_a_terminal():
    """Ctrl-C raises KeyboardInterrupt, as in a process started from a terminal, also when this test process
    inherited SIGINT as ignored (a job started with ``&`` by a non-interactive shell, as some CI runners do)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def terminal_sigint() -> None:
    """In a child process before exec: SIGINT back to its default, so Python installs its Ctrl-C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_checkpoint("gpt2", folder)
    return str(folder)


def neurons(tiny, out, *extra):
    return ["neurons", "--model", tiny, "--languages", "en,de", "--max-facts", "1", "--no-png", "--out", str(out),
            *extra]


def attribute(tiny, out, *extra):
    return ["attribute", "--model", tiny, "--languages", "en,de", "--max-facts", "1", "--prompts-per-fact", "1",
            "--steps", "2", "--no-png", "--out", str(out), *extra]


def trace(tiny, out, *extra):
    return ["trace", "--model", tiny, "--languages", "en,de", "--max-facts", "1", "--samples", "1",
            "--kinds", "hidden", "--no-png", "--out", str(out), *extra]


def typed_trace(tiny, out, *extra):
    return ["trace", "--model", tiny, *FACT, "--samples", "1", "--kinds", "hidden", "--no-png", "--out", str(out),
            *extra]


def edit(tiny, save, target="Rome"):
    return ["edit", "--model", tiny, "--method", "lora-ft", "--hparams", LORA, *FACT, "--target", f"en:{target}",
            "--save", str(save)]


def evaluate(tiny, data, out, n, *extra):
    return ["evaluate", "--model", tiny, "--methods", "lora-ft", "--dataset", str(data), "--edit-languages", "en",
            "--test-languages", "en", "--no-monolingual", "--n", str(n), "--hparams", '{"lora-ft": ' + LORA + "}",
            "--out", str(out), *extra]


def ok(args):
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


# ================================================================== no silent overwrite


def test_a_run_folder_is_refused_to_another_request_or_command_and_replaced_only_on_purpose(tiny, tmp_path):
    folder = tmp_path / "D"
    ok(neurons(tiny, folder, "--beta", "0.3"))
    before = digest(folder)
    fake_run(tmp_path / "eval", "rome")
    (tmp_path / "data").mkdir()
    write_dataset(tmp_path / "data")
    refused = [neurons(tiny, folder, "--positions", "last"),      # same command, another request
               neurons(tiny, folder, "--languages", "en,zh"),
               attribute(tiny, folder), trace(tiny, folder), typed_trace(tiny, folder),
               ["evaluate", "--merge", str(tmp_path / "eval"), "--out", str(folder)],
               evaluate(tiny, tmp_path / "data", folder, 1),
               edit(tiny, folder)]
    for args in refused:
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert len(messages(result)) == 1
        assert digest(folder) == before, args                   # not one byte changed
    # --overwrite replaces the whole folder: the other request's tables do not linger beside the new counts
    ok(neurons(tiny, folder, "--positions", "last", "--beta", "0.5", "--overwrite"))
    assert runs.inspect(folder).request["positions"] == "last"
    assert not (folder / "neurons_per_layer_beta0.3.csv").exists() and (folder / "neurons_per_layer_beta0.5.csv").exists()
    ok(trace(tiny, folder, "--overwrite"))
    assert runs.inspect(folder).kind == "trace" and not (folder / "counts.npz").exists()
    assert leftovers(folder) == []


def test_the_python_api_refuses_foreign_folders_and_overwrites_on_purpose(tmp_path):
    from analysis.attribution import attribution_run, fact_prompts
    from analysis.causal_trace import trace_run
    from analysis.neurons import atlas_counts
    from editors.edit import Edit
    from editors.evaluate import EvalConfig, merge_runs, run_evaluation

    wb = tiny_workbench("gpt2")
    corpus = make_corpus(("en", "de"), n_facts=2)
    folder = tmp_path / "D"
    _, _, reused = atlas_counts(wb, corpus, ["en", "de"], folder=folder)
    assert not reused and runs.inspect(folder).kind == "neurons"
    before = digest(folder)
    prompts = fact_prompts(corpus, ["en", "de"], max_facts=1, prompts_per_fact=1)
    fake_run(tmp_path / "eval", "rome")
    config = EvalConfig(dataset=write_dataset(tmp_path), methods=[], edit_sets=[["en"]], test_languages=["en"], n=1)
    for attempt, message in [
        (lambda: atlas_counts(wb, corpus, ["en", "de"], positions="last", folder=folder), "another request"),
        (lambda: atlas_counts(wb, corpus, ["de", "en"], folder=folder), "another request"),
        (lambda: attribution_run(wb, prompts, steps=2, folder=folder), "neuron atlas"),
        (lambda: trace_run(wb, corpus, ["en", "de"], max_facts=1, samples=1, kinds=("hidden",), folder=folder),
         "neuron atlas"),
        (lambda: run_evaluation(wb, config, folder), "neuron atlas"),
        (lambda: merge_runs([tmp_path / "eval"], folder), "neuron atlas"),
        (lambda: Edit({DOWN: torch.ones(32, 80)}).save(folder), "not a saved edit"),
    ]:
        with pytest.raises(InputError, match=message):
            attempt()
        assert digest(folder) == before
    assert atlas_counts(wb, corpus, ["en", "de"], folder=folder)[2]        # the same request: reused
    (folder / runs.RUN_FILE).write_bytes(b"\xff{cut")                         # damaged: recomputed, not refused
    counts, _, reused = atlas_counts(wb, corpus, ["en", "de"], folder=folder)
    assert not reused and digest(folder)["counts.npz"] == before["counts.npz"]
    run, _, reused = attribution_run(wb, prompts, steps=2, folder=folder, overwrite=True)
    assert not reused and runs.inspect(folder).kind == "attribute" and not (folder / "counts.npz").exists()
    # files that are not a run are never ours to delete, overwrite or not
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(RunFolderError, match="other files"):
        atlas_counts(wb, corpus, ["en", "de"], folder=tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    assert leftovers(folder) == []


def test_run_folders_written_before_run_json_are_still_recognised(tmp_path):
    from analysis.causal_trace import trace_run
    from analysis.neurons import atlas_counts

    wb = tiny_workbench("gpt2")
    corpus = make_corpus(("en", "de"), n_facts=2)
    folder = tmp_path / "old"
    atlas_counts(wb, corpus, ["en", "de"], folder=folder)
    (folder / runs.RUN_FILE).unlink()                       # as written by an earlier version
    assert atlas_counts(wb, corpus, ["en", "de"], folder=folder)[2]
    with pytest.raises(RunFolderError, match="neuron atlas"):
        trace_run(wb, corpus, ["en", "de"], max_facts=1, samples=1, folder=folder)
    with pytest.raises(RunFolderError, match="another request"):
        atlas_counts(wb, corpus, ["en", "de"], positions="last", folder=folder)
    fake_run(tmp_path / "eval", "rome")
    assert runs.inspect(tmp_path / "eval").kind == "evaluate"


# ================================================================== Ctrl-C


def interrupt(*args, **kwargs):
    """Stand-in for a step of the work: a real SIGINT arrives while it runs (as Ctrl-C would)."""
    signal.raise_signal(signal.SIGINT)
    time.sleep(30)
    raise AssertionError("SIGINT was not delivered")


@pytest.mark.parametrize("earlier, interrupted, where", [
    (neurons, lambda t, o: neurons(t, o, "--positions", "last", "--overwrite"), "analysis.neurons.count_activations"),
    (neurons, lambda t, o: neurons(t, o, "--positions", "last", "--overwrite"), "analysis.runs.replace_folder"),
    (neurons, lambda t, o: neurons(t, o), "analysis.figures.save_figure"),           # same request: reused
    (attribute, lambda t, o: attribute(t, o, "--steps", "3", "--overwrite"), "analysis.attribution.attribute_prompts"),
    (attribute, lambda t, o: attribute(t, o, "--steps", "3", "--overwrite"), "analysis.runs.replace_folder"),
    (trace, lambda t, o: trace(t, o, "--samples", "2", "--overwrite"), "analysis.causal_trace.trace_facts"),
    (trace, lambda t, o: trace(t, o, "--samples", "2", "--overwrite"), "analysis.runs.replace_folder"),
    (typed_trace, lambda t, o: typed_trace(t, o, "--samples", "2", "--overwrite"), "analysis.causal_trace.causal_trace"),
    (lambda t, o: edit(t, o), lambda t, o: edit(t, o, "Berlin"), "editors.lora_ft.LoRAFTEditor._compute"),
    (lambda t, o: edit(t, o), lambda t, o: edit(t, o, "Berlin"), "safetensors.torch.save_file"),
    (lambda t, o: edit(t, o), lambda t, o: edit(t, o, "Berlin"), "analysis.runs.replace_folder"),
], ids=["neurons-counting", "neurons-swap", "neurons-figures", "attribute-computing", "attribute-swap",
        "trace-computing", "trace-swap", "trace-typed", "edit-computing", "edit-writing", "edit-swap"])
def test_ctrl_c_leaves_the_earlier_folder_as_it_was(tiny, tmp_path, monkeypatch, earlier, interrupted, where):
    import importlib

    folder = tmp_path / "D"
    ok(earlier(tiny, folder))
    before = digest(folder)
    module, _, name = where.rpartition(".")
    try:
        owner = importlib.import_module(module)
    except ModuleNotFoundError:  # a method: module.Class.method
        module, _, cls = module.rpartition(".")
        owner = getattr(importlib.import_module(module), cls)
    monkeypatch.setattr(owner, name, interrupt)
    result = runner.invoke(cli, interrupted(tiny, folder))
    assert result.exit_code == 130, result.output
    lines = messages(result)
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), lines
    assert digest(folder) == before
    assert leftovers(folder) == []


def test_an_interrupted_evaluation_resumes_and_its_tables_always_match_its_rows(tiny, tmp_path, monkeypatch):
    from editors import base
    from editors.evaluate import EvalConfig, report, rows_frame

    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data)
    folder = tmp_path / "run"
    ok(evaluate(tiny, data, folder, 1))
    rows_before = (folder / "rows.jsonl").read_bytes()

    def tables_match_rows():
        config = EvalConfig(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
        frame = rows_frame(folder)
        assert (folder / "tables.md").read_text(encoding="utf-8") == report(frame, config)
        assert len((folder / "probes.csv").read_text(encoding="utf-8").splitlines()) == len(frame) + 1
        return frame

    tables_match_rows()
    calls = []
    with monkeypatch.context() as m:
        m.setattr(base.Editor, "compute", lambda *a, **k: calls.append(1) or interrupt())
        result = runner.invoke(cli, evaluate(tiny, data, folder, 2))    # one more record, interrupted
    assert result.exit_code == 130 and calls == [1]
    lines = messages(result)
    assert len(lines) == 1 and "resume" in lines[0], lines
    assert (folder / "rows.jsonl").read_bytes().startswith(rows_before)   # the finished rows, untouched
    tables_match_rows()
    original = base.Editor.compute
    monkeypatch.setattr(base.Editor, "compute", lambda *a, **k: calls.append(2) or original(*a, **k))
    ok(evaluate(tiny, data, folder, 2))
    assert calls == [1, 2]                                                 # only the unfinished record ran
    assert tables_match_rows()["record"].nunique() == 2


HARNESS = r"""
import sys, time
import {module} as target
def slow(*args, **kwargs):
    print("WORKING", file=sys.stderr, flush=True)
    time.sleep(120)
setattr(target, "{name}", slow)
from app.cli import main
sys.argv = ["neuroglot", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("earlier, interrupted, where", [
    (neurons, lambda t, o: neurons(t, o, "--positions", "last", "--overwrite"), "analysis.neurons.count_activations"),
    (lambda t, o: edit(t, o), lambda t, o: edit(t, o, "Berlin"), "analysis.runs.replace_folder"),
], ids=["neurons", "edit-save"])
def test_ctrl_c_from_the_terminal_prints_one_line_and_exits_130(tiny, tmp_path, earlier, interrupted, where):
    folder = tmp_path / "D"
    ok(earlier(tiny, folder))
    before = digest(folder)
    module, _, name = where.rpartition(".")
    proc = subprocess.Popen([sys.executable, "-c", HARNESS.format(module=module, name=name),
                             *interrupted(tiny, folder)], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, preexec_fn=terminal_sigint)
    try:
        lines = []
        for line in proc.stderr:                     # wait for the work to start, not for a fixed time
            lines.append(line)
            if "WORKING" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, out = proc.stderr.read(), proc.stdout.read()
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == 130, "".join(lines) + rest
    said = [line for line in rest.splitlines() if line.strip() and not BAR.search(line)]
    assert len(said) == 1 and said[0].startswith("interrupted: ") and "Traceback" not in rest + out, rest
    assert digest(folder) == before
    assert leftovers(folder) == []


# ================================================================== kill -9 while an edit is saved


def two_edits():
    from editors.edit import Edit

    return [Edit({DOWN: torch.full((32, 80), float(i))}, meta={"method": "test", "i": i}) for i in (1, 2)]


def kill_me(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def save_killed_at(edit, folder: Path, point: str) -> None:
    """Save ``edit`` to ``folder`` in a forked child that kill -9s itself at ``point`` of the save."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            import safetensors.torch

            if point.startswith("fallback"):
                runs._exchange = lambda a, b: False          # a file system without an atomic exchange
            if point == "writing":
                def half(tensors, filename, metadata=None):
                    Path(filename).write_bytes(b"\0" * 64)
                    kill_me()
                safetensors.torch.save_file = half
            elif point == "before-swap":
                runs.replace_folder = kill_me
            elif point == "after-exchange":
                exchange = runs._exchange
                runs._exchange = lambda a, b: exchange(a, b) and kill_me()
            elif point.startswith("fallback-after-rename-"):
                last, rename, done = int(point[-1]), os.rename, []

                def counted(*args):
                    rename(*args)
                    done.append(1)
                    if len(done) == last:
                        kill_me()
                os.rename = counted
            edit.save(folder)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child was not killed at {point}"


@pytest.mark.parametrize("point, survivor", [
    ("writing", "earlier"), ("before-swap", "earlier"), ("after-exchange", "new"),
    ("fallback-writing", "earlier"), ("fallback-after-rename-1", "earlier"),   # between the two renames
    ("fallback-after-rename-2", "new"),
])
def test_kill_9_during_a_save_leaves_a_loadable_edit_and_no_hidden_folders(tmp_path, point, survivor):
    from editors.edit import Edit

    earlier, new = two_edits()
    expected = {"earlier": digest(earlier.save(tmp_path / "a")), "new": digest(new.save(tmp_path / "b"))}
    folder = tmp_path / "edits" / "D"
    earlier.save(folder)
    save_killed_at(new, folder, point.replace("fallback-writing", "writing") if not point.startswith("fallback-a")
                   else point)
    loaded = Edit.load(folder)                            # puts a moved-aside folder back, drops temporaries
    assert loaded.meta["i"] == (1 if survivor == "earlier" else 2)
    assert digest(folder) == expected[survivor]
    assert leftovers(folder) == []
    new.save(folder)                                      # and the next save works as usual
    assert digest(folder) == expected["new"] and leftovers(folder) == []


def test_a_killed_writer_is_recovered_by_the_next_save_too(tmp_path):
    earlier, new = two_edits()
    folder = tmp_path / "D"
    earlier.save(folder)
    save_killed_at(new, folder, "fallback-after-rename-1")
    assert not folder.exists() and len(leftovers(folder)) == 2   # the swap was cut between its two renames
    from editors.edit import check_save_folder

    check_save_folder(folder)                                    # what `edit --save` checks first
    assert digest(folder) == digest(earlier.save(tmp_path / "a")) and leftovers(folder) == []


LOOP = r"""
import sys, torch
from editors.edit import Edit
edits = [Edit({"%s": torch.full((256, 256), float(i))}, meta={"method": "test", "i": i}) for i in (1, 2)]
print("SAVING", flush=True)
i = 0
while True:
    edits[i %% 2].save(sys.argv[1])
    i += 1
""" % DOWN


def test_kill_9_at_random_moments_of_repeated_saves(tmp_path):
    from editors.edit import Edit

    folder = tmp_path / "D"
    ours = [Edit({DOWN: torch.full((256, 256), float(i))}, meta={"method": "test", "i": i}) for i in (1, 2)]
    expected = [digest(e.save(tmp_path / f"e{i}")) for i, e in enumerate(ours)]
    ours[0].save(folder)
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", LOOP, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "SAVING"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            proc.kill()                                   # SIGKILL
            proc.wait()
        loaded = Edit.load(folder)
        assert digest(folder) == expected[loaded.meta["i"] - 1]
        assert leftovers(folder) == []


def test_load_of_nothing_is_our_error():
    from editors.edit import Edit

    with pytest.raises(NeuroglotError):
        Edit.load(None)
