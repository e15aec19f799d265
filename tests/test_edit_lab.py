"""The Edit lab page (app/views/edit_lab.py) under Streamlit's AppTest, on a tiny random llama checkpoint.

A typed two-language fact is edited with LU-LAFNs (a few steps, set in the hyper-parameters box): the
before/after table and chart appear, the session lists one edit, the shared model is bit-identical to
before (the edit is applied only while the page measures), revert empties the list; a bad request is an
error box that keeps the earlier edit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import TYPED_FACT, app_page, assert_bit_identical, snapshot, type_fact

HPARAMS = dict(layers=[0, 1, 2], beta=0.1, steps=5, lr=0.5, clamp_norm_factor=0.0, weight_decay=0.0,
               n_prefixes=1, prefix_length=2, seed=0)


def new_page(spec: str):
    return app_page("edit_lab", spec)


def fill_typed_fact(at, fact=TYPED_FACT, editor: str = "lu-lafns", hparams: dict = HPARAMS) -> None:
    type_fact(at, "el", fact)
    hp_box = next(t for t in at.text_area if str(t.key).startswith(f"el-hp-{editor}"))
    hp_box.set_value(json.dumps(hparams))
    at.run()


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def test_typed_fact_is_edited_for_this_session_only_and_reverted(tiny_spec, monkeypatch):
    import analysis.model
    from app.state import workbench

    loads = []
    real_load = analysis.model.load_model
    monkeypatch.setattr(analysis.model, "load_model", lambda spec: loads.append(spec) or real_load(spec))
    at = new_page(tiny_spec)
    at.run()
    assert not at.exception, at.exception
    # the tiny model has no LU-LAFNs preset: an error box, and editable defaults
    assert any("preset" in e for e in errors(at))
    assert at.selectbox(key="el-editor").value == "lu-lafns"
    wb = workbench(tiny_spec)          # the server-wide shared model the page uses
    assert len(loads) <= 1             # ... the same object (st.cache_resource), not a second copy
    before = snapshot(wb.model)

    fill_typed_fact(at)
    at.button(key="el-apply").click().run()
    assert not at.exception, at.exception
    assert not [e for e in errors(at) if "preset" not in e], errors(at)
    entries = at.session_state["el_edits"]
    assert len(entries) == 1 and entries[0]["editor"] == "lu-lafns"
    assert set(entries[0]["request"]["facts"]) == {"en", "de"}

    assert not at.button(key="el-revert").disabled and not at.button(key="el-revert-all").disabled
    table = at.dataframe[-1].value
    assert list(table["language"]) == ["en", "en", "en", "de", "de"]
    assert list(table["probe"]) == ["edit", "paraphrase 1", "locality 1", "edit", "paraphrase 1"]
    for column in ("answer before", "answer after", "P(target) before", "P(target) after", "P(old) before", "Δ P(target)"):
        assert column in table.columns
    edited = table[table["probe"] == "edit"]
    assert (edited["P(target) after"] != edited["P(target) before"]).all()   # the edit changes the prompt's answer
    assert len(at.get("plotly_chart")) == 1
    # the shared model carries no edit outside the page's measurements
    assert_bit_identical(wb.model, before)

    # an unrelated rerun reuses the cached numbers (no new measurement)
    after_cache = dict(at.session_state["el_after"])
    at.run()
    assert dict(at.session_state["el_after"]).keys() == after_cache.keys()

    at.button(key="el-revert").click().run()
    assert not at.exception, at.exception
    assert at.session_state["el_edits"] == []
    assert any("No edit applied" in i.value for i in at.info)
    assert_bit_identical(wb.model, before)


def test_bad_requests_show_an_error_box_and_keep_earlier_edits(tiny_spec):
    from app.state import workbench

    at = new_page(tiny_spec)
    at.run()
    fill_typed_fact(at)
    at.button(key="el-apply").click().run()
    assert len(at.session_state["el_edits"]) == 1
    wb = workbench(tiny_spec)
    before = snapshot(wb.model)

    # subject not in the prompt
    at.text_input(key="el-subject-en").set_value("Germany").run()
    at.button(key="el-apply").click().run()
    assert not at.exception, at.exception
    assert any("does not occur in the prompt" in e for e in errors(at)), errors(at)
    assert len(at.session_state["el_edits"]) == 1
    assert "answer after" in at.dataframe[-1].value.columns     # the earlier edit's table is still shown
    at.text_input(key="el-subject-en").set_value("France").run()

    # empty target, a layer out of range, bad JSON, an unknown field: each an error box, the edit kept
    at.text_input(key="el-new-de").set_value(" ").run()
    at.button(key="el-apply").click().run()
    assert any("empty target" in e for e in errors(at)), errors(at)
    at.text_input(key="el-new-de").set_value("Berlin").run()
    hp_box = next(t for t in at.text_area if str(t.key).startswith("el-hp-lu-lafns"))
    for text, message in [(json.dumps({**HPARAMS, "layers": [0, 7]}), "out of range"),
                          ("{layers: [0]", "not valid JSON"),
                          (json.dumps({**HPARAMS, "gamma": 1}), "no field")]:
        hp_box.set_value(text).run()
        at.button(key="el-apply").click().run()
        assert not at.exception, at.exception
        assert any(message in e for e in errors(at)), (message, errors(at))
        assert len(at.session_state["el_edits"]) == 1
    assert_bit_identical(wb.model, before)

    # an unknown language typed into the languages box
    at.multiselect(key="el-typed-languages").set_value(["en", "klingon"]).run()
    at.text_input(key="el-prompt-klingon").set_value("x y")
    at.text_input(key="el-subject-klingon").set_value("x")
    at.text_input(key="el-new-klingon").set_value("z")
    hp_box = next(t for t in at.text_area if str(t.key).startswith("el-hp-lu-lafns"))
    hp_box.set_value(json.dumps(HPARAMS)).run()
    at.button(key="el-apply").click().run()
    assert not at.exception, at.exception
    assert any("klingon" in e for e in errors(at)), errors(at)
    assert len(at.session_state["el_edits"]) == 1

    # a second edit stacks on the first; Revert removes the last, Revert all the rest
    at.multiselect(key="el-typed-languages").set_value(["en"]).run()
    at.text_input(key="el-new-en").set_value("Madrid")
    hp_box = next(t for t in at.text_area if str(t.key).startswith("el-hp-lu-lafns"))
    hp_box.set_value(json.dumps(HPARAMS)).run()
    at.button(key="el-apply").click().run()
    assert not at.exception, at.exception
    assert [e["editor"] for e in at.session_state["el_edits"]] == ["lu-lafns", "lu-lafns"]
    assert list(at.session_state["el_after"]) and all(len(k[2]) == 2 for k in at.session_state["el_after"])
    table = at.dataframe[-1].value
    assert list(table["language"]) == ["en", "en", "en"] and table["target"].iloc[0] == "Madrid"
    assert_bit_identical(wb.model, before)
    at.button(key="el-revert").click().run()
    assert [e["request"]["facts"]["en"]["target_new"] for e in at.session_state["el_edits"]] == ["Berlin"]
    at.button(key="el-revert-all").click().run()
    assert at.session_state["el_edits"] == []
    assert_bit_identical(wb.model, before)


def test_a_corpus_fact_with_a_typed_new_target(tiny_spec):
    at = new_page(tiny_spec)
    at.session_state["corpus_spec"] = "demo"
    at.run()
    at.radio(key="el-source").set_value("A fact from the corpus").run()
    assert not at.exception, at.exception
    languages = at.multiselect(key="el-corpus-languages").value
    assert languages == ["en", "zh"]
    for box in at.text_input:
        if str(box.key).startswith("el-corpus-new-"):
            box.set_value("Berlin")
    hp_box = next(t for t in at.text_area if str(t.key).startswith("el-hp-lu-lafns"))
    hp_box.set_value(json.dumps(HPARAMS)).run()
    at.button(key="el-apply").click().run()
    assert not at.exception, at.exception
    assert not [e for e in errors(at) if "preset" not in e], errors(at)
    (entry,) = at.session_state["el_edits"]
    assert set(entry["request"]["facts"]) == {"en", "zh"}
    assert entry["request"]["facts"]["en"]["target_old"]        # the corpus object is the old target
    assert set(at.dataframe[-1].value["language"]) == {"en", "zh"}


def test_mzsre_folder_missing_shows_an_info_box(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROGLOT_MZSRE", str(tmp_path / "absent"))
    at = new_page(tiny_spec)
    at.run()
    assert not at.exception, at.exception
    assert at.radio(key="el-source").value == "A record from a data set (MzsRE, MLaKE)"
    assert any("No data at" in i.value for i in at.info)


def _tensors_in(value, seen=None) -> list[str]:
    """Paths of every torch.Tensor reachable in ``value`` (dicts, lists, tuples, objects' __dict__)."""
    import torch

    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return ["tensor"]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple, set)):
        items = enumerate(value)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        items = vars(value).items()
    else:
        return []
    return [f"{k}/{p}" for k, v in items for p in _tensors_in(v, seen)]


def test_the_page_scores_probes_as_the_evaluation_does_and_keeps_no_tensor_in_session_state(tiny_spec):
    """The table's answers and P(target) are editors.evaluate's (answers exactly as long as the target), the
    question comes early, the chart's legend colours are its bars' colours, and the session keeps its edits as
    saved folders (ids in session_state), removed on revert."""
    from app.state import workbench
    from editors.edit import Edit
    from editors.requests import EditRequest
    from editors.evaluate import before_after

    at = new_page(tiny_spec)
    at.run()
    fill_typed_fact(at)
    at.button(key="el-apply").click().run()
    assert not at.exception, at.exception
    (entry,) = at.session_state["el_edits"]
    state = {k: at.session_state[k] for k in ("el_edits", "el_before", "el_after", "el_store")}
    assert _tensors_in(state) == []
    folder = Path(at.session_state["el_store"].root)
    assert (folder / entry["id"] / "edit.json").exists() and (folder / f"{entry['id']}.zip").exists()

    table = at.dataframe[-1].value
    assert list(table.columns[:4]) == ["language", "probe", "question", "target"]
    wb = workbench(tiny_spec)
    expected = before_after(wb, EditRequest.from_dict(entry["request"]), Edit.load(folder / entry["id"]))
    assert list(table["question"]) == list(expected["prompt"])
    assert list(table["answer before"]) == list(expected["answer before"])
    assert list(table["answer after"]) == list(expected["answer after"])
    edits = expected["kind"].isin(["reliability", "generality"])
    assert table["P(target) after"][edits].tolist() == pytest.approx(expected["P(new) after"][edits].tolist())

    (chart,) = at.get("plotly_chart")
    traces = json.loads(chart.proto.spec)["data"]
    assert [t["name"] for t in traces] == ["before", "after"]
    assert all(isinstance(t["marker"]["color"], str) for t in traces)          # one colour per legend entry
    assert traces[0]["marker"]["color"] != traces[1]["marker"]["color"]

    at.button(key="el-revert").click().run()
    assert not at.exception, at.exception
    assert not (folder / entry["id"]).exists() and not (folder / f"{entry['id']}.zip").exists()


def test_a_memla_edit_shows_the_neurons_it_trained(tiny_spec):
    """MEMLA in the Edit lab: beside the before/after table, the neurons its editors trained per layer and
    editor (a figure and a table whose rows open the drill-down)."""
    at = new_page(tiny_spec)
    at.run()
    at.selectbox(key="el-editor").set_value("memla").run()
    assert not at.exception, at.exception
    fill_typed_fact(at, editor="memla", hparams=dict(layers=[], threshold=0.2, ig_steps=4, n=2, steps=5, lr=5e-2))
    at.button(key="el-apply").click().run()
    assert not at.exception, at.exception
    assert not [e for e in errors(at) if "preset" not in e], errors(at)
    entries = at.session_state["el_edits"]
    assert [e["editor"] for e in entries] == ["memla"]
    assert len(at.get("plotly_chart")) == 2                       # P(new) bars and the trained neurons
    trained = next(d.value for d in at.dataframe if list(d.value.columns) == ["layer", "editor", "neuron"])
    sets = entries[0]["details"]["meta"]["memla"]["neurons"]["sets"]
    assert len(trained) == sum(len(ns) for layers in sets.values() for ns in layers.values()) > 0
    assert set(trained["editor"]) <= {"en", "de", "independent"}


def test_in_context_edits_show_what_the_model_reads_and_change_no_weight(tiny_spec):
    """IKE and the retrieval variant in the Edit lab: the before/after table, and a table of what the model
    reads for every probe (the fact put before it, the similarity); a selected row shows the whole text.
    The shared model's weights are never changed."""
    at = new_page(tiny_spec)
    at.run()
    for name, hp in (("ike", dict(k=2)), ("remake", dict(k=2, threshold=0.999, layers=[1]))):
        at.selectbox(key="el-editor").set_value(name).run()
        fill_typed_fact(at, editor=name, hparams=hp)
        at.button(key="el-apply").click().run()
        assert not at.exception, at.exception
        assert not [e for e in errors(at) if "preset" not in e], errors(at)
    entries = at.session_state["el_edits"]
    assert [e["editor"] for e in entries] == ["ike", "remake"]
    assert all(e["summary"]["parameters"] == 0 and e["summary"]["prompt_contexts"] == 1 for e in entries)
    reads = next(d.value for d in at.dataframe if "fact put before it" in d.value.columns)
    edit_rows = reads[reads["probe"] == "edit"]
    # IKE puts its fact before every question; the two stacked edits' facts are the same fact here
    assert len(edit_rows) == 2 and (reads["fact put before it"] != "–").all()
    code = [c.value for c in at.code]
    assert code and "New Fact:" in code[-1] and code[-1].rstrip().endswith(reads.iloc[0]["question"])


def test_an_mpn_edit_shows_whether_its_patch_fires_in_each_language(tiny_spec):
    """MPN in the Edit lab: beside the before/after table, the patch neuron's activation on the edit question
    in every language of the fact; a second MPN edit stacks its own patch; both revert."""
    at = new_page(tiny_spec)
    at.run()
    at.selectbox(key="el-editor").set_value("mpn").run()
    assert not at.exception, at.exception
    hp = dict(layers=[2], parallel="one", steps=5, lr=5e-2, memory_facts=4, memory_sentences=2,
              only_mistakes=False)
    fill_typed_fact(at, editor="mpn", hparams=hp)
    at.button(key="el-apply").click().run()
    assert not at.exception, at.exception
    assert not [e for e in errors(at) if "preset" not in e], errors(at)
    entries = at.session_state["el_edits"]
    assert [e["editor"] for e in entries] == ["mpn"] and entries[0]["summary"]["added_neurons"] == 1
    assert len(at.get("plotly_chart")) == 2                       # P(new) bars and the patch activations
    table = next(d.value for d in at.dataframe if "activation (last token)" in d.value.columns)
    assert list(table["language"]) == ["en", "de"]
    at.button(key="el-apply").click().run()                       # the same edit again: a second patch on top
    assert not at.exception, at.exception
    assert [e["summary"]["added_neurons"] for e in at.session_state["el_edits"]] == [1, 1]
    assert len(at.get("plotly_chart")) == 2
    at.button(key="el-revert-all").click().run()
    assert not at.exception, at.exception
    assert at.session_state["el_edits"] == []
