"""editors.overlap: the neurons an edit touches against the fact's agnostic / specific neurons, checked by hand
on tiny models (llama's nn.Linear and GPT-2's Conv1D layouts), and the overlap-vs-transfer points."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.errors import InputError
from editors import overlap as ov
from editors.base import get_editor
from editors.edit import ActivationPatch, AddedNeurons, Edit
from editors.requests import EditRequest, LanguageFact
from tests.tiny import D_FF, D_MODEL, N_LAYERS, tiny_workbench


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROGLOT_CACHE", str(tmp_path / "cache"))


def down_name(wb, layer: int) -> str:
    return f"{wb.arch.site_path(layer, 'down_proj')}.weight"


def test_edit_neurons_reads_value_columns_keys_patches_and_added_neurons_by_hand():
    wb = tiny_workbench("llama")
    delta = torch.zeros(D_MODEL, D_FF)          # nn.Linear down_proj: [d_model, d_ff]; neuron j = column j
    delta[:, 3] = 2.0                            # ||·||² = 4 · 32 = 128
    delta[0, 7] = 1.0                            # 1
    up = torch.zeros(D_FF, D_MODEL)              # up_proj: [d_ff, d_model]; neuron j = row j
    up[7, :2] = 3.0                              # 18
    patch = ActivationPatch(layer=2, neurons=torch.tensor([1, 5]), delta=torch.tensor([0.5, -2.0]),
                            subjects={"en": ["France"]})
    added = AddedNeurons(layer=2, keys=torch.ones(2, D_MODEL), bias=torch.zeros(2),
                         values=torch.tensor([[1.0] * D_MODEL, [0.0] * D_MODEL]))
    edit = Edit({down_name(wb, 1): delta, f"{wb.arch.site_path(1, 'up_proj')}.weight": up}, patches=[patch],
                neurons=[added])
    touched = ov.edit_neurons(wb, edit).set_index(["layer", "neuron"])
    assert touched.loc[(1, 3), "weight"] == pytest.approx(128.0)
    assert touched.loc[(1, 7), "weight"] == pytest.approx(1.0 + 18.0)      # value and key of one neuron summed
    assert touched.loc[(1, 7), "part"] == "key + value"
    assert touched.loc[(2, 1), "weight"] == pytest.approx(0.25) and touched.loc[(2, 5), "weight"] == pytest.approx(4)
    assert touched.loc[(2, D_FF), "weight"] == pytest.approx(D_MODEL) and touched.loc[(2, D_FF), "part"] == "added neurons"
    assert (2, D_FF + 1) not in touched.index                                 # a zero value vector touches nothing
    assert len(touched) == 5


def test_edit_neurons_reads_gpt2_conv1d_rows():
    wb = tiny_workbench("gpt2")
    d_ff = wb.arch.d_ff(wb.model, 0)
    delta = torch.zeros(d_ff, D_MODEL)           # Conv1D c_proj: [d_ff, d_model]; neuron j = row j
    delta[4, :] = 1.0
    touched = ov.edit_neurons(wb, Edit({down_name(wb, 0): delta}))
    assert list(touched["neuron"]) == [4] and touched["weight"].iloc[0] == pytest.approx(D_MODEL)


def test_overlap_by_layer_matches_a_hand_count():
    touched = pd.DataFrame({"layer": [0, 0, 0, 0, 1, 1], "neuron": [1, 2, 3, 4, 1, D_FF],
                            "weight": [50.0, 30.0, 15.0, 5.0, 60.0, 40.0],
                            "part": ["value"] * 5 + ["added neurons"]})
    agnostic = np.zeros((N_LAYERS, D_FF), bool)
    agnostic[0, [1, 4, 9]] = True                # neuron 9 untouched
    en = np.zeros_like(agnostic)
    en[0, 2] = True
    en[1, 1] = True
    zh = np.zeros_like(agnostic)
    zh[0, 3] = True
    table = ov.overlap_by_layer(touched, {"agnostic": agnostic, "en": en, "zh": zh}, top_share=0.8)
    t = table.set_index(["layer", "set"])
    # layer 0 weight 100 of the edit's 200; top neurons carrying 80 %: 1 and 2 (50 + 30)
    assert t.loc[(0, "agnostic"), "top"] == 2
    assert t.loc[(0, "agnostic"), "overlap"] == 1                # neuron 1 (4 is not a top neuron)
    assert t.loc[(0, "agnostic"), "weight share"] == pytest.approx((50 + 5) / 200)
    assert t.loc[(0, "agnostic"), "layer share"] == pytest.approx(0.55)
    assert t.loc[(0, "agnostic"), "set size"] == 3
    assert t.loc[(0, "en"), "overlap"] == 1 and t.loc[(0, "en"), "weight share"] == pytest.approx(30 / 200)
    assert t.loc[(0, "zh"), "overlap"] == 0 and t.loc[(0, "zh"), "weight share"] == pytest.approx(15 / 200)
    assert t.loc[(0, "other"), "weight share"] == pytest.approx(0.0)
    # layer 1: neuron 1 (60, en) and an added neuron (40); 80 % needs both
    assert t.loc[(1, "en"), "overlap"] == 1 and t.loc[(1, "en"), "weight share"] == pytest.approx(60 / 200)
    assert t.loc[(1, "added neurons"), "overlap"] == 1
    assert t.loc[(1, "added neurons"), "weight share"] == pytest.approx(40 / 200)
    assert table["weight share"].sum() == pytest.approx(1.0)       # every unit of weight is in exactly one set
    summary = ov.overlap_summary(table).set_index("set")
    assert summary.loc["agnostic", "overlap"] == 1 and summary.loc["en", "overlap"] == 2
    assert summary.loc["en", "weight share"] == pytest.approx(90 / 200)
    assert summary.loc["agnostic", "top"] == 4
    with pytest.raises(InputError, match="top_share"):
        ov.overlap_by_layer(touched, {"agnostic": agnostic}, top_share=0)


def request() -> EditRequest:
    return EditRequest({
        "en": LanguageFact("The capital of France is", "France", "Berlin", target_old="Paris",
                           paraphrases=["France has the capital"]),
        "de": LanguageFact("Die Hauptstadt von Frankreich ist", "Frankreich", "Berlin", target_old="Paris"),
    }, case_id="fr")


def test_atlas_sets_follow_eq_5_and_6_and_are_cached():
    from analysis.neurons import NeuronCounts, count_batch, factual_neurons
    from analysis.tokens import encode

    wb = tiny_workbench("llama")
    sets = ov.atlas_sets(wb, request(), beta=0.5)
    # by hand: counts over each language's prompts, Eq. 5 with β = 0.5, Eq. 6 the intersection
    factual = {}
    for lang, texts in ov.fact_prompts(request()).items():
        batch = encode(wb.tokenizer, texts)
        counts = count_batch(wb, batch.input_ids, batch.attention_mask, batch.real)[None]
        factual[lang] = factual_neurons(NeuronCounts([lang], counts, np.array([1]), np.array([1]), "all", {}),
                                        0.5)[lang]
    assert np.array_equal(sets["agnostic"], factual["en"] & factual["de"])
    assert np.array_equal(sets["en"], factual["en"] & ~factual["de"])
    assert sets["agnostic"].any() and not (sets["agnostic"] & sets["en"]).any()
    cached = ov.fact_neuron_sets(wb, request(), beta=0.5)["atlas"]
    again = ov.fact_neuron_sets(wb, request(), beta=0.5)["atlas"]
    assert all(np.array_equal(cached[k], sets[k]) and np.array_equal(again[k], sets[k]) for k in sets)


def test_ig_sets_follow_memla_eq_3_and_4():
    wb = tiny_workbench("llama")
    sets = ov.fact_neuron_sets(wb, request(), ig=True, ig_steps=4)["ig"]
    assert set(sets) == {"agnostic", "en", "de"}
    assert not (sets["agnostic"] & sets["en"]).any() and not (sets["agnostic"] & sets["de"]).any()
    assert sets["agnostic"].shape == (N_LAYERS, D_FF)


def test_overlap_transfer_points_and_rank_correlation(tmp_path):
    from data.edit_records import load_mzsre
    from tests.tiny import write_dataset

    wb = tiny_workbench("llama")
    records = load_mzsre(write_dataset(tmp_path))
    hp = {"rome": dict(layers=[1], v_num_grad_steps=3, context_template_length_params=[[2, 1]],
                       mom2_n_tokens=500), "ike": dict(k=1)}
    points = ov.overlap_transfer(wb, records, hp, "en", ["en", "de"], beta=0.5)
    assert len(points) == 4 and set(points["method"]) == {"rome", "ike"}
    rome = points[points.method == "rome"]
    assert ((rome["agnostic share"] >= 0) & (rome["agnostic share"] <= 1)).all()
    assert math.isnan(points[points.method == "ike"]["agnostic share"].iloc[0])   # in-context: no neuron
    # the edit comes from the Compare cache: computed once
    again = ov.overlap_transfer(wb, records, hp, "en", ["en", "de"], beta=0.5)
    assert again["cached"].all()
    pd.testing.assert_series_equal(again["agnostic share"], points["agnostic share"])
    frame = pd.DataFrame({"method": ["a"] * 4 + ["b"] * 2, "agnostic share": [0.1, 0.2, 0.3, 0.4, 0.1, 0.2],
                          "transfer": [1.0, 3.0, 2.0, 4.0, 0.0, 1.0]})
    corr = ov.rank_correlations(frame).set_index("method")
    assert corr.loc["a", "spearman"] == pytest.approx(0.8)    # 1 - 6·Σd²/(n(n²-1)) = 1 - 6·2/60
    assert math.isnan(corr.loc["b", "spearman"]) and corr.loc["b", "records"] == 2
    assert math.isnan(corr.loc["b", "p (permutation)"])
    # the permutation p value: 4 records have 24 orders, of which 8 reach |ρ| >= 0.8 (Σd² = 0 once, 2 three
    # times, and their mirror images 20 and 18)
    assert corr.loc["a", "p (permutation)"] == pytest.approx(8 / 24, abs=0.02)
    steady = pd.DataFrame({"method": "c", "agnostic share": np.arange(12.0), "transfer": np.arange(12.0) ** 2})
    assert ov.rank_correlations(steady)["p (permutation)"].iloc[0] < 0.001       # a monotone relation: ρ = 1


def test_edit_neurons_are_kept_beside_a_cached_edit_and_a_damaged_file_is_recomputed(tmp_path):
    wb = tiny_workbench("llama")
    delta = torch.zeros(D_MODEL, D_FF)
    delta[:, 3], delta[1, 9] = 2.0, 0.5
    folder = tmp_path / "one-edit"
    Edit({down_name(wb, 1): delta}).save(folder / "edit")
    first = ov.cached_edit_neurons(wb, folder)
    path = folder / f"neurons-v{ov.OVERLAP_VERSION}.csv"
    assert path.is_file() and list(first["neuron"]) == [3, 9]
    assert first["weight"].tolist() == pytest.approx([4.0 * D_MODEL, 0.25])
    # read back, not computed: a changed saved edit is not looked at while the table is there
    Edit({down_name(wb, 1): torch.zeros(D_MODEL, D_FF)}).save(folder / "edit")
    pd.testing.assert_frame_equal(ov.cached_edit_neurons(wb, folder), first)
    path.write_text("not,a\ntable")                # damaged: computed again from the saved edit (now empty)
    assert ov.cached_edit_neurons(wb, folder).empty
    tables = ov.edit_overlap(wb, first, request(), beta=0.5)        # a neuron table is accepted as the edit
    assert tables["atlas"]["weight share"].sum() == pytest.approx(1.0)


def test_a_real_rome_edit_puts_weight_on_the_layer_it_edits():
    wb = tiny_workbench("llama")
    hp = dict(layers=[1], v_num_grad_steps=3, context_template_length_params=[[2, 1]], mom2_n_tokens=500)
    edit = get_editor("rome", hp).compute(wb, request())
    tables = ov.edit_overlap(wb, edit, request(), beta=0.5)
    table = tables["atlas"]
    assert set(table["layer"]) == {1}
    assert table["weight share"].sum() == pytest.approx(1.0)


def test_cli_overlap_writes_points_and_correlations(tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli
    from tests.tiny import save_tiny_checkpoint, write_dataset

    model = tmp_path / "tiny"
    save_tiny_checkpoint("llama", model)
    dataset = write_dataset(tmp_path)
    hp = '{"rome": {"layers": [1], "v_num_grad_steps": 3, "context_template_length_params": [[2, 1]], ' \
         '"mom2_n_tokens": 500}}'
    args = ["overlap", "--model", str(model), "--dataset", dataset, "--records", "0-1", "--methods", "rome",
            "--hparams", hp, "--test-languages", "en,de", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    points = pd.read_csv(tmp_path / "out" / "points.csv")
    assert list(points["record"]) == ["mzsre:0", "mzsre:1"] and set(points["method"]) == {"rome"}
    assert pd.read_csv(tmp_path / "out" / "correlations.csv")["records"].iloc[0] == 2
    assert (tmp_path / "out" / "overlap_vs_transfer.html").is_file()
    for extra, fragment in ((["--edit-language", "zh"], "must be one of"), (["--records", "5-9"], "no record"),
                            (["--methods", "nope"], "Unknown editor"), (["--test-languages", "en"], "at least two")):
        bad = CliRunner().invoke(cli, [*args[:-2], *extra])
        assert bad.exit_code == 2, bad.output
        assert fragment in bad.output


def test_mpn_gets_the_whole_fact_as_its_parallel_pool_and_its_patch_is_apart(tmp_path):
    from data.edit_records import load_mzsre
    from tests.tiny import write_dataset

    wb = tiny_workbench("llama")
    records = load_mzsre(write_dataset(tmp_path))[:1]
    hp = {"mpn": dict(layers=[2], parallel="one", steps=3, memory_facts=4, memory_sentences=2),
          "t-patcher": dict(layers=[2], parallel="none", steps=3, memory_facts=4, memory_sentences=2)}
    points = ov.overlap_transfer(wb, records, hp, "en", ["en", "de"]).set_index("method")
    assert points.loc["mpn", "pooled"] and not points.loc["t-patcher", "pooled"]
    assert not points.loc["mpn", "error"], points.loc["mpn", "error"]
    # a patch adds neurons: its weight is on them, none on the model's own agnostic neurons
    assert points.loc["mpn", "added share"] == pytest.approx(1.0)
    assert points.loc["mpn", "agnostic share"] == pytest.approx(0.0)
