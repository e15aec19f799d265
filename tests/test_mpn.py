"""Patch neurons (papers/mpn.md Eq. 7-8) in the engine, Transformer-Patcher and MPN (§3.2-3.3), mpn Table 1.

Tiny random models built from config classes; the embedded model in a slow test."""
from __future__ import annotations

import pytest
import torch

from analysis.errors import InputError
from analysis.hooks import Hooks
from editors.base import get_editor
from editors.edit import AddedNeurons, Edit
from editors.mpn import PatcherHParams, training_examples
from editors.requests import EditRequest, LanguageFact
from tests.tiny import MZSRE_DEV, assert_bit_identical, hook_count, snapshot, tiny_workbench

TINY = dict(steps=30, lr=5e-2, memory_facts=6, memory_sentences=3, memory_topk=16)


def request(case: str = "a") -> EditRequest:
    facts = {"a": {"en": LanguageFact("The capital of France is", "France", "Berlin"),
                   "de": LanguageFact("Die Hauptstadt von Frankreich ist", "Frankreich", "Berlin"),
                   "fr": LanguageFact("La capitale de la France est", "France", "Berlin")},
             "b": {"en": LanguageFact("People in Spain speak", "Spain", "German"),
                   "de": LanguageFact("In Spanien spricht man", "Spanien", "Deutsch")}}[case]
    return EditRequest(facts, case)


def random_neurons(wb, layer: int, n: int = 3, seed: int = 0, bias: float | None = None) -> AddedNeurons:
    g = torch.Generator().manual_seed(seed)
    d = int(wb.d_model)
    b = torch.randn(n, generator=g) if bias is None else torch.full((n,), float(bias))
    return AddedNeurons(layer, torch.randn(n, d, generator=g) * 0.3, b, torch.randn(n, d, generator=g) * 0.3)


def inputs(wb, texts=("The capital of France is", "Die Hauptstadt von Frankreich ist Berlin")):
    from analysis.tokens import pad_sequences

    seqs = [list(wb.tokenizer(t)["input_ids"]) for t in texts]
    ids, mask = pad_sequences(seqs, wb.tokenizer.pad_token_id)
    return wb.forward_inputs(ids, mask)


def logits(wb) -> torch.Tensor:
    with torch.no_grad():
        return wb.logits_at(inputs(wb), slice(None))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_a_patch_adds_eq8_computed_by_hand(family):
    wb = tiny_workbench(family)
    layer = 1
    added = random_neurons(wb, layer)
    seen: dict[str, torch.Tensor] = {}
    first = wb.arch.site(wb.model, layer, "first_proj")
    out_module = wb.arch.ffn_output_module(wb.model, layer)
    act = wb.arch.site(wb.model, layer, "neuron")

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with Hooks() as hooks, torch.no_grad():
            hooks.pre(first, lambda m, a: seen.__setitem__("q", a[0].detach().clone()))
            hooks.forward(out_module, lambda m, a, o: seen.__setitem__("y", o.detach().clone()), prepend=False)
            wb.base_model()[0](**inputs(wb))
        return seen["q"], seen["y"]

    q0, y0 = run()
    with Edit(neurons=[added]).applied(wb):
        # our reader runs after the patch's hook (registered later), so it sees FFN'(q)
        q1, y1 = run()
    assert torch.equal(q0, q1)                                   # the FFN input is upstream of the patch
    a = act.forward(q0 @ added.keys.T + added.bias)              # mpn Eq. 7, by hand
    expected = y0 + a @ added.values                             # mpn Eq. 8
    assert torch.allclose(y1, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y1, y0, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_silent_patch_leaves_outputs_bit_identical(family):
    wb = tiny_workbench(family)
    before = logits(wb)
    silent = random_neurons(wb, 2, bias=-1e4)                   # a_p = σ(-1e4 + ...) = 0 exactly
    with Edit(neurons=[silent]).applied(wb):
        assert torch.equal(logits(wb), before)
    loud = random_neurons(wb, 2, bias=5.0)
    with Edit(neurons=[loud]).applied(wb):
        assert not torch.equal(logits(wb), before)


def test_accumulated_patches_compose_save_load_and_revert_bit_exactly(tmp_path):
    wb = tiny_workbench("llama")
    original, hooks = snapshot(wb.model), hook_count(wb.model)
    before = logits(wb)
    editor = get_editor("mpn-all", dict(TINY, layers=[2], parallel="all"))
    e1 = editor.compute(wb, request("a"))
    with e1.applied(wb):
        e2 = editor.compute(wb, request("b"))                   # the second patch trained on top of the first
    assert e1.added_neurons() == {2: 1} and e2.added_neurons() == {2: 1}
    with e1.applied(wb), e2.applied(wb):
        nested = logits(wb)
    both = e1 + e2
    assert both.summary()["added_neurons"] == 2
    with both.applied(wb):
        assert torch.equal(logits(wb), nested)
    both.save(tmp_path / "edit")
    loaded = Edit.load(tmp_path / "edit")
    assert [a.labels for a in loaded.neurons] == [a.labels for a in both.neurons]
    with loaded.applied(wb):
        assert torch.equal(logits(wb), nested)
    assert not torch.equal(nested, before)
    assert_bit_identical(wb.model, original)
    assert hook_count(wb.model) == hooks
    assert all(p.grad is None for p in wb.model.parameters())          # only the patch was trained
    assert torch.equal(logits(wb), before)


def test_the_memory_loss_keeps_the_patch_quieter_on_memory_than_on_the_edit():
    wb = tiny_workbench("llama")
    edit = get_editor("t-patcher", dict(TINY, layers=[2], parallel="none", only_mistakes=False)).compute(
        wb, request("a"))
    record = edit.meta["mpn_edits"][0]
    assert record["added"] and record["memory_tokens"] > 50
    assert record["memory_activation_max"] < record["edit_activation_min"]
    # and the memory loss is what does it: without it, the trained patch fires on memory inputs too
    loose = get_editor("t-patcher", dict(TINY, layers=[2], parallel="none", only_mistakes=False,
                                         memory_weight=0.0, act_weight=5.0)).compute(wb, request("a"))
    assert loose.meta["mpn_edits"][0]["memory_activation_max"] > record["memory_activation_max"]


def test_training_examples_follow_the_parallel_mode():
    r = request("a").validate()
    assert [lang for lang, _, _ in training_examples(r, "en", "none", 0)] == ["en"]
    assert [lang for lang, _, _ in training_examples(r, "en", "all", 0)] == ["en", "de", "fr"]
    one = [training_examples(r, "en", "one", seed) for seed in range(8)]
    assert all(len(x) == 2 and x[0][0] == "en" and x[1][0] in ("de", "fr") for x in one)
    assert one[0] == training_examples(r, "en", "one", 0)                    # seeded
    assert {x[1][0] for x in one} == {"de", "fr"}                             # and sampled
    with pytest.raises(InputError, match="source language"):
        training_examples(r, "zh", "one", 0)
    with pytest.raises(InputError, match="parallel examples"):
        training_examples(EditRequest({"en": r.facts["en"]}, "x"), "en", "one", 0)


@pytest.mark.parametrize("bad, match", [
    (dict(parallel="some"), "parallel mode"),
    (dict(layers=[0, 1]), "one layer"),
    (dict(steps=0), "steps"),
    (dict(memory_topk=0), "memory_topk"),
])
def test_bad_hyper_parameters_are_named(bad, match):
    with pytest.raises(InputError, match=match):
        PatcherHParams(**bad).validate()


def test_the_patch_activation_table_reads_each_language():
    from editors.mpn import patch_activation_table

    wb = tiny_workbench("llama")
    edit = get_editor("mpn-all", dict(TINY, layers=[2], parallel="all", only_mistakes=False)).compute(
        wb, request("a"))
    rows = patch_activation_table(wb, edit, request("a").validate())
    assert [r["language"] for r in rows] == ["en", "de", "fr"]
    d_ff = int(wb.arch.d_ff(wb.model, 2))
    assert all(f"neuron {d_ff}" in r["patch"] for r in rows)                 # an extra neuron of its layer
    assert all(r["activation (max)"] >= r["activation (last token)"] - 1e-6 for r in rows)


def test_the_mpn_table_counts_patches_and_splits_clg(tmp_path):
    from editors.evaluate import EvalConfig, load_records, mpn_table, run_evaluation

    wb = tiny_workbench("llama")
    langs = ["en", "de", "fr"]
    records = load_records(MZSRE_DEV, langs, 2, 100)
    config = EvalConfig(dataset=str(MZSRE_DEV), methods=["t-patcher", "ffn-ft"], edit_sets=[langs],
                        test_languages=langs, n=2, offset=100,
                        hparams={"t-patcher": dict(TINY, layers=[2], parallel="none", steps=5),
                                 "ffn-ft": dict(layers=[2], steps=3)}, model=wb.spec)
    frame = run_evaluation(wb, config, tmp_path / "run", records=records)
    table = mpn_table(frame, "+".join(langs), langs, "en").set_index("method")
    assert list(table.index) == ["Unedited", "Fine-tuning", "T-Patcher"]
    assert table.loc["T-Patcher", "patches"] == sum(
        r["diagnostics"]["patches_added"] for r in map(__import__("json").loads,
                                                       (tmp_path / "run" / "rows.jsonl").read_text().splitlines())
        if r["method"] == "t-patcher")
    assert table.loc["Fine-tuning", "patches"] == 0
    assert {"CLG de", "CLG fr", "CLG avg", "MLG", "Locality", "Reliability (en)"} <= set(table.columns)
    assert "mpn Table 1" in (tmp_path / "run" / "tables.md").read_text()


@pytest.mark.slow
def test_on_the_embedded_model_mpn_edits_english_and_fires_on_chinese():
    from analysis.model import load_model
    from editors.evaluate import before_after, load_records
    from editors.mpn import patch_activation_table

    wb = load_model("embedded")
    record = load_records(MZSRE_DEV, ["en", "zh"], 1, 100)[0]
    req = EditRequest.from_record(record, ["en", "zh"])
    edit = get_editor("mpn").compute(wb, req)                    # MPN-only: the parallel example is zh
    assert edit.summary()["added_neurons"] == 1
    info = edit.meta["mpn_edits"][0]
    assert info["languages"] == ["en", "zh"]
    table = before_after(wb, req, edit, ["en", "zh"])
    en = table[(table.language == "en") & (table.kind == "reliability")].iloc[0]
    assert en["answer after"] != en["answer before"]
    assert en["P(new) after"] > en["P(new) before"]
    fires = {r["language"]: r["activation (last token)"] for r in patch_activation_table(wb, edit, req.validate())}
    assert fires["zh"] > info["memory_activation_max"]           # it fires on the Chinese question
    assert fires["en"] > info["memory_activation_max"]


@pytest.mark.parametrize("name, mode", [("t-patcher", "none"), ("mpn", "one"), ("mpn-all", "all")])
def test_each_editor_keeps_its_own_parallel_mode_through_presets_and_overrides(name, mode):
    from editors.evaluate import resolve_hparams

    wb = tiny_workbench("llama")
    assert resolve_hparams(wb, name, {"steps": 3}).parallel == mode     # the evaluation's path
    assert get_editor(name).hparams_class.preset("embedded").parallel == mode   # the preset's path
    other = next(m for m in ("none", "one", "all") if m != mode)
    with pytest.raises(InputError, match="parallel mode"):
        resolve_hparams(wb, name, {"parallel": other}).validate()
