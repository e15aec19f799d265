"""editors.sequential / editors.langedit / editors.sequential_run: multilingual sequential editing.

The covariance recursion (langedit Eq. 4) equals the covariance of all keys so far; an update projected by
P leaves the protected keys' outputs unchanged (Eq. 2-3) for LangEdit's running null space and AlphaEdit's
fixed one with its cache; batched target values equal one-by-one ones; rollback restores the exact earlier
weights and memory; save/load round-trips; streams are seeded, per language, disjoint and respect record
ranges; a run resumes after an interruption (stopped on purpose or by an error) with the same result as an
uninterrupted one; every probe is kept as a row (its teacher-forced prediction and top-1) that agrees with the
averaged scores, and folders written before those rows still read. Tiny random models; the embedded model in a
slow test."""
from __future__ import annotations

import json
import os

import pytest
import torch

from analysis.errors import InputError
from editors.keyvalue import alphaedit_update, compute_target, compute_targets, fact_contexts
from editors.langedit import LangEditHParams, running_projection
from editors.memit import MEMITHParams
from editors.requests import EditRequest, LanguageFact
from editors.sequential import (
    LayerMemory, SequentialState, available_sequential, get_sequential, new_state, sequential_step)
from editors.sequential_run import (
    StreamConfig, curve_rows, final_rows, interference_matrix, make_stream, read_run, report, rollback_run,
    run_sequential, step_languages)
from tests.tiny import MZSRE_DEV, snapshot, tiny_workbench

TINY = dict(v_lr=1.0, v_num_grad_steps=8, clamp_norm_factor=0.0, v_weight_decay=0.0,
            context_template_length_params=[[4, 1]], mom2_n_tokens=1500, layers=[0, 1])
TINY_HP = {"memit": dict(TINY, mom2_update_weight=1.0),
           "alphaedit": dict(TINY, nullspace_threshold=0.05, nullspace_relative=True, l2=1.0),
           "langedit": dict(TINY, nullspace_threshold=0.05, nullspace_relative=True, l2=1.0)}


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch):
    """Tiny models' key statistics go to a temporary cache; the embedded model (slow tests) keeps the user's
    cache, where its conversion and statistics already are."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("NEUROGLOT_CACHE", str(tmp_path_factory.getbasetemp() / "sequential-cache"))


@pytest.fixture(scope="module")
def wb():
    return tiny_workbench("llama")


def batch(lang: str, i: int) -> list[EditRequest]:
    facts = {"en": [("The capital of France is", "France", "Berlin"), ("People in Spain speak", "Spain", "German")],
             "de": [("Die Hauptstadt von Italien ist", "Italien", "Paris"), ("In Japan spricht man", "Japan", "Polnisch")]}
    return [EditRequest({lang: LanguageFact(p, s, t)}, f"{lang}{i}:{k}") for k, (p, s, t) in enumerate(facts[lang])]


def test_the_three_methods_are_registered():
    assert {"langedit", "alphaedit", "memit"} <= set(available_sequential())
    with pytest.raises(InputError, match="Unknown sequential"):
        get_sequential("rome")


def test_covariance_recursion_equals_the_covariance_of_all_keys_so_far():
    g = torch.Generator().manual_seed(0)
    k0 = torch.randn(300, 12, generator=g, dtype=torch.float64)
    memory = LayerMemory.start(k0.T @ k0 / 300, 300, "cpu")
    seen = [k0]
    for n in (5, 1, 17):
        keys = torch.randn(n, 12, generator=g, dtype=torch.float64) * 3
        memory.add(keys)
        seen.append(keys)
        everything = torch.cat(seen)
        torch.testing.assert_close(memory.cov, everything.T @ everything / len(everything), rtol=1e-12, atol=1e-12)
        assert memory.count == len(everything)
        edited = torch.cat(seen[1:])
        torch.testing.assert_close(memory.edited_kkt, edited.T @ edited, rtol=1e-12, atol=1e-12)


def _low_rank_memory(d: int = 24, rank: int = 8, n0: int = 400, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    k0 = torch.randn(n0, rank, generator=g, dtype=torch.float64) @ basis[:, :rank].T     # K_0 spans `rank` dims
    return LayerMemory.start(k0.T @ k0 / n0, n0, "cpu"), basis, g


def test_a_projected_update_leaves_the_protected_keys_outputs_unchanged():
    memory, basis, g = _low_rank_memory()
    hp = LangEditHParams(layers=[0], nullspace_threshold=1e-8, nullspace_relative=True, l2=1.0)
    # step 1: keys outside span(K_0); the update must leave every key of span(K_0) unchanged
    k1 = torch.randn(3, 10, generator=g, dtype=torch.float64) @ basis[:, 8:18].T
    r1 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    p, dim = running_projection(0, memory, hp)
    assert dim == 24 - 8
    u, v = alphaedit_update(k1.T, r1, p, hp.l2, [])
    protected = torch.randn(8, 5, generator=g, dtype=torch.float64)
    k0_like = basis[:, :8] @ protected
    assert float((u @ v @ k0_like).abs().max()) < 1e-9
    # LangEdit after step 1: the running covariance now holds k1, so step 2 protects them too (dynamic null space)
    memory.add(k1)
    p2, dim2 = running_projection(0, memory, hp)
    assert dim2 == 24 - 8 - 3
    k2 = torch.randn(4, 6, generator=g, dtype=torch.float64) @ basis[:, 18:].T
    u2, v2 = alphaedit_update(k2.T, torch.randn(16, 4, generator=g, dtype=torch.float64), p2, hp.l2, [])
    assert float((u2 @ v2 @ k1.T).abs().max()) < 1e-9
    assert float((u2 @ v2 @ k0_like).abs().max()) < 1e-9
    # and the update does move the new keys' outputs
    assert float((u2 @ v2 @ k2.T).abs().max()) > 1e-3
    # AlphaEdit's fixed P (from K_0 only) does not protect k1 through P: with its cache term it keeps them better
    p0, _ = running_projection(0, _low_rank_memory()[0], hp)
    plain = alphaedit_update(k2.T, torch.ones(16, 4, dtype=torch.float64), p0, 1.0, [])
    cached = alphaedit_update(k2.T, torch.ones(16, 4, dtype=torch.float64), p0, 1.0, [], cache=k1.T @ k1)
    assert float((cached[0] @ cached[1] @ k1.T).norm()) <= float((plain[0] @ plain[1] @ k1.T).norm()) + 1e-9


def test_batched_target_values_equal_one_by_one(wb):
    hp = MEMITHParams(**dict(TINY, v_num_grad_steps=12, early_stop_loss=6.5, v_lr=1.0))
    requests = batch("en", 0) + batch("de", 0)
    facts = fact_contexts(wb, requests, hp)
    together = compute_targets(wb, facts, 1, "layer", hp)
    steps = []
    for fact, t in zip(facts, together):
        alone = compute_target(wb, fact, 1, "layer", hp)
        steps.append(alone.record["steps"])
        assert t.record["steps"] == alone.record["steps"]
        torch.testing.assert_close(t.delta, alone.delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t.init, alone.init, rtol=1e-5, atol=1e-6)
    assert len(set(steps)) > 1, steps        # some stopped early, others went on: converged ones left the batch


def test_rollback_restores_the_exact_earlier_weights_and_memory(wb, tmp_path):
    method = get_sequential("langedit", TINY_HP["langedit"])
    state = new_state(wb, method, ["en", "de"])
    state.append(sequential_step(wb, method, state, batch("en", 1)))
    with state.edit().applied(wb):
        after_one = snapshot(wb.model)
    cov_one = {layer: m.cov.clone() for layer, m in state.memory.items()}
    state.append(sequential_step(wb, method, state, batch("de", 2)))
    assert state.steps[1].nullspace[0] is not None
    with state.edit().applied(wb):
        after_two = snapshot(wb.model)
    assert any(not torch.equal(after_one[k], after_two[k]) for k in after_one)
    state.save(tmp_path / "state")
    state.rollback(1)
    with state.edit().applied(wb):
        again = snapshot(wb.model)
    assert all(torch.equal(after_one[k], again[k]) for k in after_one)
    assert all(torch.equal(cov_one[layer], state.memory[layer].cov) for layer in state.layers)
    loaded = SequentialState.load(tmp_path / "state")
    assert len(loaded) == 2 and loaded.steps[1].language == "de"
    with loaded.edit().applied(wb):
        assert all(torch.equal(after_two[k], v) for k, v in snapshot(wb.model).items())
    with pytest.raises(InputError, match="Step must be"):
        state.rollback(5)


def test_a_step_edits_one_language_and_a_state_fits_its_model(wb, tmp_path):
    method = get_sequential("memit", TINY_HP["memit"])
    state = new_state(wb, method, ["en", "de"])
    mixed = [EditRequest({"en": LanguageFact("The capital of France is", "France", "Berlin"),
                          "de": LanguageFact("Die Hauptstadt von Italien ist", "Italien", "Paris")})]
    with pytest.raises(InputError, match="one language"):
        sequential_step(wb, method, state, mixed)
    with pytest.raises(InputError, match="belongs to memit"):
        sequential_step(wb, get_sequential("langedit", TINY_HP["langedit"]), state, batch("en", 0))
    other = tiny_workbench("gpt2")
    with pytest.raises(InputError, match="was made on"):
        sequential_step(other, method, state, batch("en", 0))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not a saved sequential state"):
        SequentialState.load(tmp_path / "junk")
    with pytest.raises(InputError, match="not a saved sequential state"):
        state.save(tmp_path / "junk")


def test_streams_are_seeded_disjoint_per_language_and_respect_record_ranges():
    if not MZSRE_DEV.is_dir():
        pytest.skip("MzsRE dev data not found")
    cfg = StreamConfig(str(MZSRE_DEV), ["en", "de", "zh"], batch=5, steps=6, records="0-99,150-199", seed=3)
    stream = make_stream(cfg)
    assert [s.language for s in stream] == ["en", "en", "de", "de", "zh", "zh"]
    used = [i for s in stream for i in s.records]
    assert len(used) == len(set(used)) == 30
    assert all(i <= 99 or 150 <= i <= 199 for i in used)
    assert [s.records for s in make_stream(cfg)] == [s.records for s in stream]
    other = make_stream(StreamConfig(**{**cfg.__dict__, "seed": 4}))
    assert [s.records for s in other] != [s.records for s in stream]
    assert step_languages(["en", "de", "zh"], 5, "interleaved") == ["en", "de", "zh", "en", "de"]
    with pytest.raises(InputError, match="needs 600 records"):
        make_stream(StreamConfig(str(MZSRE_DEV), ["en", "de"], batch=100, steps=6, records="0-99"))
    for bad in (dict(order="random"), dict(batch=0), dict(languages=[]), dict(records="9-3"), dict(seed=-1)):
        with pytest.raises(InputError):
            StreamConfig(**{**dict(dataset=str(MZSRE_DEV), languages=["en"]), **bad}).validate()


def _config(**kw) -> StreamConfig:
    return StreamConfig(**{**dict(dataset=str(MZSRE_DEV), languages=["en", "de"], batch=2, steps=3,
                                  order="interleaved", records="0-40", flores_sentences=3), **kw})


def _states_equal(a, b) -> bool:
    sa, sb = SequentialState.load(a), SequentialState.load(b)
    return len(sa) == len(sb) and all(
        torch.equal(x.factors[layer][0], y.factors[layer][0]) and torch.equal(x.factors[layer][1], y.factors[layer][1])
        for x, y in zip(sa.steps, sb.steps) for layer in sa.layers)


def test_a_run_resumes_after_an_interruption_with_the_same_result(wb, tmp_path, monkeypatch):
    if not MZSRE_DEV.is_dir():
        pytest.skip("MzsRE dev data not found")
    methods = ["langedit", "alphaedit"]
    whole = run_sequential(wb, _config(), methods, tmp_path / "whole", hparams=TINY_HP)
    assert whole.steps_done == {"langedit": 3, "alphaedit": 3}
    # stopped on purpose after one step, then continued
    run_sequential(wb, _config(), methods, tmp_path / "parts", hparams=TINY_HP, stop_after=1)
    assert len(read_run(tmp_path / "parts").steps["langedit"]) == 1
    # an error in the middle of step 2 (after LangEdit's state was saved, before its line was written)
    import editors.sequential_run as sr

    real = sr.probe_scores
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(sr, "probe_scores", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sequential(wb, _config(), methods, tmp_path / "parts", hparams=TINY_HP)
    monkeypatch.setattr(sr, "probe_scores", real)
    run_sequential(wb, _config(), methods, tmp_path / "parts", hparams=TINY_HP)
    for m in methods:
        assert _states_equal(tmp_path / "whole" / m / "state", tmp_path / "parts" / m / "state")
    a, b = read_run(tmp_path / "whole"), read_run(tmp_path / "parts")
    for m in methods:
        assert [r["scores"] for r in a.steps[m]] == [r["scores"] for r in b.steps[m]]
        assert [r["probes"] for r in a.steps[m]] == [r["probes"] for r in b.steps[m]]   # per-probe rows too
        assert [r["step"] for r in b.steps[m]] == [1, 2, 3]
    # the views: curves per language and "all", the final table with the unedited rows, the matrix
    curves = curve_rows(a)
    assert {c["language"] for c in curves} == {"en", "de", "all"}
    assert max(c["edits"] for c in curves) == 6
    final = final_rows(a)
    assert {r["method"] for r in final} == {"unedited", "langedit", "alphaedit"}
    labels, langs, matrix = interference_matrix(a, "langedit", relative_to="own step")
    assert labels == ["step 1 · en", "step 2 · de", "step 3 · en"] and langs == ["en", "de"]
    assert matrix[2] == [0.0, 0.0]                 # the last batch has not changed since its own step
    assert "## After the last step" in report(a)
    # another configuration in the same folder is refused; --overwrite replaces it
    with pytest.raises(InputError, match="another sequential run"):
        run_sequential(wb, _config(seed=1), methods, tmp_path / "parts", hparams=TINY_HP)
    # rollback of the folder: states and lines after step 1 go, and a rerun recomputes them identically
    rollback_run(tmp_path / "parts", 1)
    assert [r["step"] for r in read_run(tmp_path / "parts").steps["langedit"]] == [1]
    run_sequential(wb, _config(), methods, tmp_path / "parts", hparams=TINY_HP)
    assert _states_equal(tmp_path / "whole" / "langedit" / "state", tmp_path / "parts" / "langedit" / "state")


def test_answer_scores_keep_the_arg_max_token_of_every_answer_position(wb):
    from editors.answers import AnswerScore, answer_scores

    prompts = ["The capital of France is", "Die Hauptstadt von Italien ist"]
    for score in answer_scores(wb, prompts, ["Berlin and more", "Paris"]):
        assert len(score.predicted) == len(score.token_ids) == len(score.top1)
        assert [p == t for p, t in zip(score.predicted, score.token_ids)] == score.top1
    assert AnswerScore([1], [-0.5], [True]).predicted == []          # the field has a default: old callers work


def test_every_probe_is_kept_as_a_row_and_an_older_folder_still_reads(wb, tmp_path):
    """One row per (batch so far, language, kind present, record) after every step and at step 0; each row's
    top-1 averages to the batch's score; its prediction is the decoded arg-max tokens. A folder without the
    rows (written before them) reads as before, and its probe table is empty with the reason."""
    if not MZSRE_DEV.is_dir():
        pytest.skip("MzsRE dev data not found")
    import shutil

    from app.run_browser import NO_PROBE_ROWS, read_sequential, sequential_probes
    from editors.answers import answer_scores
    from editors.sequential_run import load_stream_records

    cfg = _config(steps=2)
    run_sequential(wb, cfg, ["memit"], tmp_path / "run", hparams=TINY_HP)
    view = read_run(tmp_path / "run")
    records, _ = load_stream_records(cfg)
    stream = {s["index"]: s["records"] for s in view.stream}
    kinds_of = {}                                # (record index, language) -> kinds the record has
    for i in {i for ids in stream.values() for i in ids}:
        for lang in cfg.languages:
            fact = EditRequest.from_record(records[i], [lang]).facts[lang]
            kinds_of[(i, lang)] = 1 + bool(fact.paraphrases) + bool(fact.locality)
    for step, probes in [(2, view.baseline["probes"])] + [(r["step"], r["probes"]) for r in view.steps["memit"]]:
        expected = sum(kinds_of[(i, lang)] for b in range(1, step + 1) for i in stream[b] for lang in cfg.languages)
        assert len(probes) == expected, (step, len(probes), expected)
        assert {p["record"] for p in probes} == {records[i].record_id for b in range(1, step + 1) for i in stream[b]}
        assert len({(p["batch"], p["record"], p["language"], p["kind"]) for p in probes}) == len(probes)
    for row in [view.baseline] + view.steps["memit"]:
        for s in row["scores"]:
            for kind in ("efficacy", "generality", "specificity"):
                mine = [p["top1"] for p in row["probes"] if (p["batch"], p["language"], p["kind"]) ==
                        (s["batch"], s["probe"], kind)]
                assert (s[kind] is None) == (not mine)
                if mine:
                    assert s[kind] == pytest.approx(100 * sum(mine) / len(mine))
                    assert all(0.0 <= x <= 1.0 for x in mine)
    # the prediction: the unedited model's arg-max tokens at each answer position, decoded
    some = view.baseline["probes"][:6]
    for probe, score in zip(some, answer_scores(wb, [p["prompt"] for p in some], [p["expected"] for p in some])):
        assert probe["predicted"] == wb.tokenizer.decode(score.predicted, skip_special_tokens=True).strip()
        assert probe["top1"] == score.top1_accuracy
    # the browser's table: every step's probes beside the unedited model's
    table, note = sequential_probes(view)
    assert note == "" and len(table) == sum(len(r["probes"]) for r in view.steps["memit"])
    assert (table["failed"] == ((table["kind"] != "specificity") & (table["top1_after"] < 1))
            | ((table["kind"] == "specificity") & (table["after"] != table["before"]))).all()

    # a folder resumed across versions: its first step has no rows; the others show, with a note saying so
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "run", mixed)
    lines = [json.loads(x) for x in (mixed / "memit" / "steps.jsonl").read_text().splitlines()]
    lines[0].pop("probes")
    (mixed / "memit" / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    part, note = sequential_probes(mixed)
    assert set(part["step"]) == {2} and len(part) == len(lines[1]["probes"]) and "(memit 1)" in note

    # an older folder: no "probes" anywhere; everything else reads exactly as before
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    baseline = json.loads((old / "baseline.json").read_text())
    baseline.pop("probes")
    (old / "baseline.json").write_text(json.dumps(baseline))
    lines = [json.loads(x) for x in (old / "memit" / "steps.jsonl").read_text().splitlines()]
    (old / "memit" / "steps.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "probes"})
                                                       + "\n" for r in lines))
    before = read_run(old)
    assert curve_rows(before) == curve_rows(view) and report(before) == report(view)
    table, note = sequential_probes(old)
    assert table.empty and note == NO_PROBE_ROWS.format(folder=old) and "predates per-probe rows" in note
    data = read_sequential(old)
    assert data["probes"].empty and data["probes_note"] == note and not data["step_scores"].empty


def test_run_folder_checks(wb, tmp_path):
    if not MZSRE_DEV.is_dir():
        pytest.skip("MzsRE dev data not found")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no sequential run"):
        run_sequential(wb, _config(steps=1), ["memit"], tmp_path / "other", hparams=TINY_HP)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="Unknown sequential"):
        run_sequential(wb, _config(steps=1), ["rome"], tmp_path / "x")
    with pytest.raises(InputError):
        run_sequential(wb, _config(steps=1), ["langedit"], tmp_path / "x",
                       hparams={"langedit": dict(TINY_HP["langedit"], nullspace_threshold=-1)})
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_on_the_embedded_model_a_short_langedit_stream_edits_its_facts(tmp_path):
    """2 languages × 2 steps of 3 dev records (100-149, not reported ones): every batch's efficacy in its own
    language rises well above the unedited model's."""
    if not MZSRE_DEV.is_dir():
        pytest.skip("MzsRE dev data not found")
    from analysis.model import load_model

    wb = load_model("embedded")
    cfg = StreamConfig(str(MZSRE_DEV), ["en", "zh"], batch=3, steps=2, records="100-149", flores_sentences=4)
    run_sequential(wb, cfg, ["langedit"], tmp_path / "run")
    view = read_run(tmp_path / "run")
    last = view.steps["langedit"][-1]
    base = {(r["batch"], r["probe"]): r["efficacy"] for r in view.baseline["scores"]}
    own = {(r["batch"], r["probe"]): r["efficacy"] for r in last["scores"]}
    for b, lang in ((1, "en"), (2, "zh")):
        assert own[(b, lang)] >= base[(b, lang)] + 30, (b, lang, own, base)
    state = json.loads((tmp_path / "run" / "langedit" / "state" / "state.json").read_text())
    assert len(state["steps"]) == 2 and os.path.getsize(tmp_path / "run" / "langedit" / "state" / "state.safetensors") > 0


def test_the_cli_runs_resumes_and_rolls_back_a_stream(tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli
    from tests.tiny import save_tiny_checkpoint, write_dataset

    model = tmp_path / "tiny"
    save_tiny_checkpoint("llama", model)
    (tmp_path / "data").mkdir()
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    hp = json.dumps({"langedit": TINY_HP["langedit"], "memit": TINY_HP["memit"]})
    args = ["sequential", "--model", str(model), "--methods", "langedit,memit", "--dataset", data,
            "--languages", "en,de", "--batch", "1", "--steps", "2", "--flores-sentences", "2", "--hparams", hp,
            "--out", str(out), "--no-png"]
    runner = CliRunner()
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "## After the last step" in first.output and "| langedit | 2 | mean |" in first.output
    assert (out / "tables.md").is_file() and (out / "figures" / "curves_efficacy.html").is_file()
    assert (out / "figures" / "interference_langedit_change.html").is_file()
    lines = (out / "langedit" / "steps.jsonl").read_text()
    again = runner.invoke(cli, args)                       # the same command: resumed, nothing recomputed
    assert again.exit_code == 0 and (out / "langedit" / "steps.jsonl").read_text() == lines
    back = runner.invoke(cli, ["sequential", "--out", str(out), "--rollback", "1"])
    assert back.exit_code == 0, back.output
    assert len(SequentialState.load(out / "langedit" / "state")) == 1
    assert len((out / "memit" / "steps.jsonl").read_text().splitlines()) == 1
    bad = runner.invoke(cli, ["sequential", "--out", str(out), "--rollback", "7"])
    assert bad.exit_code == 2 and "--rollback must be a step from 0 to 1" in bad.output


def test_run_overrides_sit_on_the_preset(wb):
    from types import SimpleNamespace

    from editors.sequential_run import over_preset

    embedded = SimpleNamespace(spec="embedded", name="embedded")
    merged = over_preset(embedded, "langedit", {"l2": 3.0})
    assert merged["l2"] == 3.0 and merged["layers"] == LangEditHParams.PRESETS["embedded"]["layers"]
    assert merged["mom2_n_tokens"] == LangEditHParams.PRESETS["embedded"]["mom2_n_tokens"]
    assert over_preset(embedded, "langedit", None) is None
    assert over_preset(wb, "memit", {"layers": [0]})["layers"] == [0]      # no preset for a tiny model
