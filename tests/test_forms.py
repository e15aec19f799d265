"""app/forms.py: what users type, parsed the same way for the CLI and the pages."""
from __future__ import annotations

import pytest

from analysis.errors import InputError
from app import forms


def test_lists_languages_and_layers():
    assert forms.split_list(" en, zh ,,de ") == ["en", "zh", "de"]
    assert forms.split_list("  ") is None and forms.split_list(None) is None
    assert forms.default_languages(["de", "en", "fr"]) == ["en"]
    assert forms.default_languages(["de", "fr", "ja"]) == ["de", "fr"]
    assert forms.per_language(["en:Paris", "en: Lyon ", "zh-cn:巴黎"], "--target") == {"en": ["Paris", "Lyon"],
                                                                                       "zh": ["巴黎"]}
    with pytest.raises(InputError, match="LANG:TEXT"):
        forms.per_language(["Paris"], "--target")
    assert forms.parse_layers("0,2-3", 4) == [0, 2, 3] and forms.parse_layers(None, 4) is None
    with pytest.raises(InputError, match="out of range"):
        forms.parse_layers("1-4", 4)
    assert forms.typed_language("German") == "de"
    with pytest.raises(InputError, match="klingon"):
        forms.typed_language("klingon")


def test_question_answer_lines_and_options():
    assert forms.question_answer("What is 1 | 2 ? | two ") == ("What is 1 | 2 ?", "two")
    assert forms.question_answer("no bar") is None
    assert forms.pairs_from_lines("A | a\n\n B|b ", "locality", "en") == [("A", "a"), ("B", "b")]
    with pytest.raises(InputError, match="locality line 2"):
        forms.pairs_from_lines("A | a\nno bar", "locality", "en")
    assert forms.pairs_from_options(["en:Q|A"], "--locality") == {"en": [("Q", "A")]}
    with pytest.raises(InputError, match="QUESTION|ANSWER"):
        forms.pairs_from_options(["en:Q|"], "--locality")


def test_json_inline_or_from_a_file(tmp_path):
    assert forms.read_json('{"a": 1}', "--hparams") == {"a": 1} and forms.read_json(" ", "--hparams") is None
    path = tmp_path / "h.json"
    path.write_text('[1, 2]', encoding="utf-8")
    assert forms.read_json(str(path), "--hparams") == [1, 2]
    path.write_bytes("{\"é\": 1}".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        forms.read_json(str(path), "--hparams")
    with pytest.raises(InputError, match="neither JSON nor a file"):
        forms.read_json(str(tmp_path / "absent.json"), "--request")
    with pytest.raises(InputError, match="not valid JSON"):
        forms.read_json("{bad", "--hparams")


def test_typed_facts_and_edit_requests_are_built_once_for_both_front_ends():
    facts = forms.typed_facts({"en": ["The capital of France is", "France's capital is"]}, answers={"en": ["Paris"]})
    table = forms.typed_prompt_table(facts)
    assert list(table["prompt"]) == ["The capital of France is", "France's capital is"]
    assert set(table["object"]) == {"Paris"} and list(table["template_id"]) == ["typed.en.0", "typed.en.1"]
    with pytest.raises(InputError, match="for de too"):
        forms.check_typed_prompts(facts, ["en", "de"])

    boxes = {"en": dict(prompt=" The capital of France is ", subject="France", target_new="Lyon", target_old=" ",
                        paraphrases="France's capital is\n\n", locality="The capital of Japan is | Tokyo",
                        portability="")}
    typed = forms.edit_request_from_boxes(boxes)
    options = forms.edit_request_from_options(["en:The capital of France is", "en:France's capital is"],
                                              ["en:France"], ["en:Lyon"], None, None,
                                              ["en:The capital of Japan is|Tokyo"], None)
    assert typed.to_dict() == options.to_dict()
    assert typed.facts["en"].target_old is None and typed.facts["en"].paraphrases == ["France's capital is"]
    with pytest.raises(InputError, match="chosen twice"):
        forms.edit_request_from_boxes({"German": boxes["en"], "de": boxes["en"]})
