"""editors.memla (papers/memla.md §4): the located sets obey Eq. 3-4, each editor's rank is n·|S(l)|, the
neuron masks confine the change to the knowledge neurons' value vectors (and without a mask it spreads),
the ablations drop what they name, the edit lowers the new target's NLL, the model is left as found, bad
hyper-parameters are clear errors. Tiny random models; the embedded model on a real MzsRE dev record in a
slow test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import editors.memla as memla
from analysis.errors import InputError
from editors.base import available_editors, get_editor
from editors.memla import INDEPENDENT, MemlaHParams
from editors.requests import EditRequest, LanguageFact
from tests.tiny import assert_bit_identical, hook_count, snapshot, target_nll, tiny_workbench

FAMILIES = ("llama", "gpt2", "gemma3_text")


def tiny_hparams(**kw) -> MemlaHParams:
    fields = dict(layers=[], threshold=0.2, ig_steps=4, n=2, steps=15, lr=5e-2, stop_prob=1.0, stop_loss=0.0)
    fields.update(kw)
    return MemlaHParams(**fields)


def berlin() -> EditRequest:
    return EditRequest({
        "en": LanguageFact("The capital of France is", "France", "Berlin", target_old="Paris",
                           paraphrases=["Capital city of France:"]),
        "de": LanguageFact("Die Hauptstadt von Frankreich ist", "Frankreich", "Berlin"),
    }, "france")


def dense(edit, name: str) -> torch.Tensor:
    """The whole change of one parameter."""
    return sum(d.materialize() for d in edit.weights[name])


@pytest.fixture(scope="module")
def wb():
    return tiny_workbench("llama")


@pytest.fixture(scope="module")
def located(wb):
    return memla.locate(wb, [berlin()], tiny_hparams())


def test_registered_with_presets():
    assert "memla" in available_editors()
    for key in ("ai-forever/mGPT", "meta-llama/Meta-Llama-3-8B"):          # the authors' settings
        hp = MemlaHParams.preset(key)
        assert (hp.layers, hp.threshold, hp.n, hp.lr, hp.steps, hp.c) == ([], 0.3, 4, 1e-3, 60, 0.5)
    assert MemlaHParams.preset("embedded").c == 1.0


def test_located_sets_obey_eq_3_and_4(wb, located):
    n = {k: v for k, v in located.located.items()}
    assert set(n) == {"en", "de"} and all(v.shape == (wb.n_layers, wb.n_neurons) for v in n.values())
    assert all(v.any() for v in n.values())                               # a prompt always has its maximum
    assert np.array_equal(located.independent, n["en"] & n["de"])          # Eq. 3
    for lang in n:
        assert np.array_equal(located.specific[lang], n[lang] & ~located.independent)   # Eq. 4
        assert not (located.specific[lang] & located.independent).any()
        assert np.array_equal(located.specific[lang] | located.independent, n[lang])
    assert located.prompts["en"] == ["The capital of France is", "Capital city of France:"]
    assert located.targets["en"] == ["Paris"]          # the old answer; de has none: the model's own answer
    assert located.targets["de"][0] and located.targets["de"] != ["Berlin"]


def test_union_of_paraphrases_contains_each_prompts_set(wb):
    union = memla.locate(wb, [berlin()], tiny_hparams(share=0.0)).located["en"]
    both = memla.locate(wb, [berlin()], tiny_hparams(share=1.0)).located["en"]
    assert (both <= union).all() and union.sum() >= both.sum()


def test_ranks_are_n_times_the_neurons_and_masks_confine_the_change(wb, located):
    hp = tiny_hparams(n=3)
    editors = memla.build_editors(wb, located, hp)
    per_layer = located.per_layer()
    assert editors and {e.name for e in editors} <= {"en", "de", INDEPENDENT}
    for e in editors:
        assert e.neurons == per_layer[e.name][e.layer]
        assert e.rank == 3 * len(e.neurons)                                # r = n · |S(l)|
        assert e.b.shape == (wb.d_model, e.rank) and e.a.shape == (e.rank, wb.n_neurons)
        assert torch.count_nonzero(e.b) == 0                               # B = 0: Δ = 0 at the start
    edit = get_editor("memla", hp).compute(wb, berlin())
    for name in edit.weights:
        layer = int(name.split(".")[2])
        full = dense(edit, name)                                          # [d_model, d_ff] (llama)
        changed = set(torch.nonzero(full.abs().sum(0)).flatten().tolist())
        allowed = {i for k in ("en", "de", INDEPENDENT) for i in per_layer.get(k, {}).get(layer, [])}
        assert changed and changed <= allowed                             # only the neurons' value vectors


def test_without_the_masks_other_value_vectors_change_too(wb, located):
    edit = get_editor("memla", tiny_hparams(specific_mask=False, independent_mask=False)).compute(wb, berlin())
    per_layer = located.per_layer()
    spread = False
    for name in edit.weights:
        layer = int(name.split(".")[2])
        changed = set(torch.nonzero(dense(edit, name).abs().sum(0)).flatten().tolist())
        allowed = {i for k in per_layer for i in per_layer[k].get(layer, [])}
        spread |= bool(changed - allowed)
    assert spread


@pytest.mark.parametrize("switch, gone", [("lse", {"en", "de"}), ("lie", {INDEPENDENT})])
def test_ablations_drop_their_editor(wb, switch, gone):
    edit = get_editor("memla", tiny_hparams(steps=2, **{switch: False})).compute(wb, berlin())
    names = {e["name"] for e in edit.meta["memla"]["editors"]}
    assert names and not (names & gone)


def test_the_edit_lowers_the_new_targets_nll_in_both_languages_and_leaves_the_model(wb):
    before = {lang: target_nll(wb, f.prompt, "Berlin", mean=True) for lang, f in berlin().facts.items()}
    original, hooks = snapshot(wb.model), hook_count(wb.model)
    flags = [p.requires_grad for p in wb.model.parameters()]
    edit = get_editor("memla", tiny_hparams(c=1.0)).compute(wb, berlin())
    assert_bit_identical(wb.model, original)                              # computing changes nothing
    assert hook_count(wb.model) == hooks and [p.requires_grad for p in wb.model.parameters()] == flags
    with edit.applied(wb):
        after = {lang: target_nll(wb, f.prompt, "Berlin", mean=True) for lang, f in berlin().facts.items()}
    assert_bit_identical(wb.model, original)
    assert all(after[lang] < before[lang] for lang in before), (before, after)
    record = edit.meta["memla"]
    assert record["final_loss"] < record["initial_loss"]
    assert record["seconds_locating"] > 0 and record["seconds_training"] > 0


def test_c_scales_the_inserted_delta(wb):
    full = get_editor("memla", tiny_hparams(steps=3, c=1.0)).compute(wb, berlin())
    half = get_editor("memla", tiny_hparams(steps=3, c=0.5)).compute(wb, berlin())
    for name in full.weights:
        assert torch.allclose(dense(half, name), 0.5 * dense(full, name), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_edits_its_down_projection(family):
    wb = tiny_workbench(family)
    edit = get_editor("memla", tiny_hparams(steps=3)).compute(wb, berlin())
    names = dict(wb.model.named_parameters())
    for name in edit.weights:
        assert name in names and dense(edit, name).shape == names[name].shape


@pytest.mark.parametrize("fields, message", [
    (dict(lse=False, lie=False), "at least one of its two editors"),
    (dict(threshold=0), "threshold"),
    (dict(locate_target="both"), "locate_target"),
    (dict(n=0), "n"),
    (dict(c=-1), "c"),
    (dict(specific_mask="yes"), "specific_mask"),
])
def test_bad_hyper_parameters_are_clear_errors(fields, message):
    with pytest.raises(InputError, match=message):
        MemlaHParams(**fields).validate()


def test_no_neuron_to_edit_is_a_clear_error(wb, monkeypatch):
    monkeypatch.setattr(memla, "prompt_knowledge_neurons", lambda scores, t: np.zeros(scores.shape, dtype=bool))
    with pytest.raises(InputError, match="no knowledge neuron"):
        get_editor("memla", tiny_hparams()).compute(wb, berlin())


@pytest.mark.slow
def test_embedded_model_mzsre_dev_record_is_edited_in_english_and_chinese():
    """An MzsRE dev record of the preset-choosing range (100-149), edited in en and zh with the embedded
    preset: the greedy answer changes to the new target in both languages; the model is left as it was."""
    import time

    from analysis.model import load_model
    from data.edit_records import load_mzsre
    from editors.answers import greedy_answers
    from tests.tiny import MZSRE_DEV

    wb = load_model("embedded", device="cpu")
    request = EditRequest.from_record(load_mzsre(MZSRE_DEV, ["en", "zh"])[100], ["en", "zh"])
    prompts = [f.prompt for f in request.facts.values()]
    before = greedy_answers(wb, prompts, n_tokens=6)
    snap = snapshot(wb.model)
    started = time.perf_counter()
    edit = get_editor("memla").compute(wb, request)
    seconds = time.perf_counter() - started
    assert_bit_identical(wb.model, snap)
    with edit.applied(wb):
        after = greedy_answers(wb, prompts, n_tokens=6)
    record = edit.meta["memla"]
    print(f"\nMEMLA on the embedded model, {request.case_id}: {seconds:.1f} s (locating "
          f"{record['seconds_locating']:.1f} s), {record['steps']} steps, stopped by {record['stopped']}, "
          f"editors {[(e['layer'], e['name'], e['rank']) for e in record['editors']]}; before {before}; after {after}")
    for (lang, fact), old, new in zip(request.facts.items(), before, after):
        assert new != old and new.startswith(fact.target_new[:2]), (lang, old, new, fact.target_new)
    assert greedy_answers(wb, prompts, n_tokens=6) == before


def test_trained_neurons_figure_stacks_one_bar_set_per_editor():
    import pandas as pd

    from analysis.fact_figures import trained_neurons

    table = pd.DataFrame({"layer": [1, 1, 2, 2, 2], "editor": ["en", INDEPENDENT, "de", "en", "en"],
                          "neuron": [5, 6, 7, 8, 9]})
    fig = trained_neurons(table, n_layers=3)
    bars = {t.name.split(":")[0]: list(t.y) for t in fig.data}
    assert bars == {"LIE": [0, 1, 0], "LSE de": [0, 0, 1], "LSE en": [0, 1, 2]}
    assert fig.layout.barmode == "stack"
    with pytest.raises(InputError, match="trained-neuron table"):
        trained_neurons(table.drop(columns="neuron"), n_layers=3)
