"""The Compare page (app/views/compare.py) under Streamlit's AppTest, on a tiny random llama checkpoint.

Two editors on a typed en+de fact: the timing table, the grid (a row per probe, a column group per editor)
and the summary chart appear, the shared model is bit-identical afterwards; a second run of the same request
reads every edit back from the disk cache; the transfer matrices draw one heatmap per editor; a bad
hyper-parameter value is an error box that keeps the earlier comparison."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import app_page, assert_bit_identical, snapshot, type_fact

pytestmark = pytest.mark.usefixtures("private_cache")   # tiny_spec, private_cache: tests/conftest.py

HPARAMS = {
    "rome": dict(layers=[1], v_num_grad_steps=3, context_template_length_params=[[2, 1]], mom2_n_tokens=500),
    "ike": dict(k=2),
}


def new_page(spec: str):
    return app_page("compare", spec, timeout=180)


def fill(at, hparams=HPARAMS) -> None:
    type_fact(at, "cmp")
    at.multiselect(key="cmp-editors").set_value(list(hparams)).run()
    for name, values in hparams.items():
        box = next(t for t in at.text_area if str(t.key).startswith(f"cmp-hp-{name}-"))
        box.set_value(json.dumps(values))
    at.run()


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def grid(at):
    return next(d.value for d in at.dataframe if "ike · answer" in getattr(d.value, "columns", []))


def test_two_editors_side_by_side_then_cached_then_transfer_matrices(tiny_spec):
    from app.state import workbench

    at = new_page(tiny_spec)
    at.run()
    assert not at.exception and not errors(at)
    assert any("Run comparison" in i.value for i in at.info)
    fill(at)
    wb = workbench(tiny_spec)
    before = snapshot(wb.model)
    at.button(key="cmp-run").click().run()
    assert not at.exception, at.exception
    assert not errors(at), errors(at)
    timing = next(d.value for d in at.dataframe if "from cache" in getattr(d.value, "columns", []))
    assert list(timing["editor"]) == ["rome", "ike"] and not timing["from cache"].any()
    table = grid(at)
    # en: edit, paraphrase, locality; de: edit, paraphrase
    assert list(table["language"]) == ["en", "en", "en", "de", "de"]
    assert {"unedited · answer", "rome · answer", "rome · P(new)"} <= set(table.columns)
    assert len(at.get("plotly_chart")) >= 1
    assert_bit_identical(wb.model, before)

    # the same request again: every edit comes back from disk
    at.button(key="cmp-run").click().run()
    timing = next(d.value for d in at.dataframe if "from cache" in getattr(d.value, "columns", []))
    assert timing["from cache"].all()
    assert grid(at).equals(table)

    # transfer matrices: one heatmap per editor, edit languages en, de and all
    at.button(key="cmp-transfer-run").click().run()
    assert not at.exception and not errors(at), errors(at)
    charts = at.get("plotly_chart")
    heatmaps = [c for c in charts if "heatmap" in json.dumps(json.loads(c.proto.spec)["data"])]
    assert len(heatmaps) == 2
    z = json.loads(heatmaps[0].proto.spec)["data"][0]
    assert len(z["y"]) == 3 and len(z["x"]) >= 2
    # another metric redraws from the same runs
    at.radio(key="cmp-transfer-metric").set_value("p_new").run()
    assert not at.exception and not errors(at)
    assert_bit_identical(wb.model, before)

    # a bad value: an error box, and the earlier comparison stays
    box = next(t for t in at.text_area if str(t.key).startswith("cmp-hp-rome-"))
    box.set_value(json.dumps({**HPARAMS["rome"], "layers": [99]})).run()
    at.button(key="cmp-run").click().run()
    assert not at.exception
    assert any("layer" in e.lower() for e in errors(at)), errors(at)
    assert grid(at).equals(table)


def test_no_fact_chosen_is_an_error_box(tiny_spec, monkeypatch, tmp_path):
    monkeypatch.setenv("NEUROGLOT_MZSRE", str(tmp_path / "absent"))
    at = new_page(tiny_spec)
    at.run()
    at.multiselect(key="cmp-editors").set_value(["ike"]).run()
    at.button(key="cmp-run").click().run()
    assert not at.exception
    assert any("Choose a fact" in e for e in errors(at))


def test_why_section_draws_the_overlap_of_the_chosen_edit(tiny_spec):
    at = new_page(tiny_spec)
    at.run()
    fill(at)
    at.button(key="cmp-run").click().run()
    assert not at.exception and not errors(at), errors(at)
    assert at.selectbox(key="cmp-why-editor").value == "rome"
    summary = next(d.value for d in at.dataframe if "weight share %" in getattr(d.value, "columns", []))
    assert summary["weight share %"].sum() == pytest.approx(100.0, abs=0.5)
    assert "agnostic" in set(summary["set"])
    # IKE touches no neuron: said in words, no figure
    at.selectbox(key="cmp-why-editor").set_value("ike").run()
    assert not at.exception and not errors(at)
    assert any("touches no FFN neuron" in i.value for i in at.info)
    # another β: recomputed from the cache of the fact's counts, still whole
    at.selectbox(key="cmp-why-editor").set_value("rome").run()
    at.number_input(key="cmp-why-beta").set_value(0.2).run()
    assert not at.exception and not errors(at)


def test_an_mlake_record_is_compared_with_its_multi_hop_question_as_portability(tiny_spec):
    folder = Path(__file__).resolve().parent / "data" / "mlake"
    at = new_page(tiny_spec)
    at.run()
    at.text_input(key="cmp-dataset").set_value(str(folder)).run()
    assert not at.exception and not errors(at), errors(at)
    at.multiselect(key="cmp-mzsre-languages").set_value(["en"]).run()
    at.multiselect(key="cmp-editors").set_value(["ike"]).run()
    box = next(t for t in at.text_area if str(t.key).startswith("cmp-hp-ike-"))
    box.set_value(json.dumps(HPARAMS["ike"])).run()
    at.button(key="cmp-run").click().run()
    assert not at.exception and not errors(at), errors(at)
    table = next(d.value for d in at.dataframe if "ike · answer" in getattr(d.value, "columns", []))
    assert list(table["language"]) == ["en"] * len(table) and table["probe"].iloc[0] == "edit"
    assert any(str(p).startswith("portability") for p in table["probe"])
