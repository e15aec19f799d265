"""MLaKE end to end: subjects derived per record and language, the skip count, single-hop edits with their
multi-hop portability questions, aliases as right answers in F1 / EM, and `neuroglot evaluate` on an MLaKE
folder (tests/data/mlake: our own facts in MLaKE's published layout, en / zh / de)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analysis.errors import CorpusError, InputError
from data.edit_records import (SUBJECT_RULES, derive_subject, edit_data_format, load_edit_records, load_mlake,
                               subject_report)
from editors.evaluate import Probe, load_records, probes, score_probes
from editors.metrics import best_exact_match, best_token_f1
from editors.requests import EditRequest, LanguageFact
from tests.tiny import run_cli, tiny_workbench, write_dataset

MLAKE = Path(__file__).parent / "data" / "mlake"


# ==================================================================== subjects

@pytest.mark.parametrize("language, fields, expected", [
    ("en", {"prompt": "Where did Carl Sagan work during his career?", "target_new": "BBC",
            "statement_new": "Carl Sagan worked at BBC during his career."}, ("Carl Sagan", "statement")),
    # the shared words "during his career" are longer, but hold no capitalised word
    ("en", {"prompt": "Where is the main office of the institution known as the University of Leeds?",
            "target_new": "Leeds", "statement_new": "The main office of the institution known as the University "
                                                    "of Leeds is in Leeds."}, ("University of Leeds", "statement")),
    ("en", {"prompt": "Who wrote the novel 'Middlemarch'?", "target_new": "George Eliot",
            "statement_new": "\"Middlemarch\" was written by George Eliot."}, ("Middlemarch", "quoted")),
    ("en", {"prompt": "Who was Mary Anna Custis Lee's husband?", "target_new": "Robert E. Lee",
            "statement_new": "Mary Anna Custis Lee was married to Robert E. Lee."},
     ("Mary Anna Custis Lee", "statement")),
    ("en", {"prompt": "From which country does the sport of cricket originate?", "target_new": "India",
            "statement_new": "The sport of cricket originates from India."}, ("the sport of cricket", "statement")),
    ("de", {"prompt": "Welche Staatsbürgerschaft besitzt Pelé?", "target_new": "Portugal",
            "statement_new": "Pelé besitzt die Staatsbürgerschaft von Portugal."}, ("Pelé", "statement")),
    ("zh", {"prompt": "卡尔·萨根曾受雇于哪所位于伊萨卡的学术机构？", "target_new": "英国广播公司",
            "statement_new": "卡尔·萨根曾受雇于英国广播公司。"}, ("卡尔·萨根", "statement")),
    ("zh", {"prompt": "剑桥大学的总部位于哪个城市？", "target_new": "剑桥",
            "statement_new": "剑桥大学的总部位于剑桥。"}, ("剑桥大学", "statement")),
    ("zh", {"prompt": "《浩劫后》首播于哪个电视网络？", "target_new": "英国广播公司",
            "statement_new": "《浩劫后》首播于英国广播公司。"}, ("浩劫后", "quoted")),
    ("ja", {"prompt": "カール・セーガンはどこで働いていましたか？", "target_new": "BBC",
            "statement_new": "カール・セーガンはBBCで働いていました。"}, ("カール・セーガン", "statement")),
    # no statement: a capitalised run (not the question's first word alone), a transliterated name
    ("en", {"prompt": "Where is the University of Cambridge located?", "target_new": "Paris"},
     ("University of Cambridge", "capitalised")),
    ("zh", {"prompt": "让-雅克·贝内来自哪个国家？", "target_new": "美国"}, ("让-雅克·贝内", "name")),
    # an explicit subject wins over every rule
    ("en", {"prompt": "Where did Carl Sagan work?", "subject": "Sagan", "target_new": "BBC",
            "statement_new": "Carl Sagan worked at BBC."}, ("Sagan", "given")),
])
def test_derive_subject_rules(language, fields, expected):
    assert derive_subject(fields, language) == expected
    assert expected[0] in fields["prompt"] and expected[1] in SUBJECT_RULES


@pytest.mark.parametrize("language, fields", [
    ("en", {"prompt": "Who is in charge there today?", "target_new": "Rachida Dati",
            "statement_new": "The current mayor is Rachida Dati."}),
    ("de", {"prompt": "Wer ist dort heute zuständig?", "target_new": "Rachida Dati"}),
    ("zh", {"prompt": "魁省的官方语言是什么？", "target_new": "英语", "statement_new": "魁北克省的官方语言是英语。"}),
    ("en", {"prompt": "Where is Oxford?", "target_true": "Oxford", "target_new": "Oxford"}),  # never the answer
    ("en", {"prompt": "  ", "target_new": "X"}),
])
def test_derive_subject_finds_none(language, fields):
    assert derive_subject(fields, language) is None


# ==================================================================== the folder as edits

def test_mlake_folder_is_single_hop_edits_with_multi_hop_portability():
    assert edit_data_format(MLAKE) == "mlake"
    records = load_edit_records(MLAKE)
    assert [r.record_id for r in records] == [f"mlake:single_hop/qa:{i}" for i in range(8)]
    curie = records[0]
    assert curie.languages == ["de", "en", "zh"]
    en = curie["en"]
    assert (en["subject"], en["subject_source"]) == ("Marie Curie", "statement")
    assert en["target_new"] == "University of Oxford" and en["target_true"] == "University of Paris"
    assert en["portability"] == [{"question": "In which country is the university where Marie Curie worked "
                                              "located?", "answer": "United Kingdom",
                                  "aliases": ["UK", "Britain", "Great Britain"]}]
    assert curie["zh"]["portability"][0]["answer"] == "英国"
    # Frida Kahlo has no multi-hop item; the "mayor of Paris" multi-hop item matches no single-hop statement
    assert records[5]["en"]["portability"] == []
    linked = [hop["question"] for r in records for hop in r["en"]["portability"]]
    assert len(linked) == 6 and not any("mayor" in q for q in linked)
    assert len(load_mlake(MLAKE)) == 8 + 7 + 2  # load_mlake keeps every group as it is


def test_subject_report_counts_rules_and_the_records_skipped():
    report = subject_report(load_edit_records(MLAKE))
    assert report.records == 8
    assert report.missing == [("mlake:single_hop/qa:6", "de"), ("mlake:single_hop/qa:6", "en"),
                              ("mlake:single_hop/qa:6", "zh"), ("mlake:single_hop/qa:7", "zh")]
    assert sum(report.rules.values()) + len(report.missing) == 24
    assert report.rules["quoted"] == 3  # Moby-Dick in every language
    assert report.skipped_records == {"mlake:single_hop/qa:6", "mlake:single_hop/qa:7"}
    assert subject_report(load_edit_records(MLAKE, ["en"])).skipped_records == {"mlake:single_hop/qa:6"}


@pytest.mark.parametrize("languages, n_kept, skipped", [(["en", "zh", "de"], 6, 2), (["en"], 7, 1), (["de"], 7, 1)])
def test_load_records_skips_records_without_subject_and_says_so(languages, n_kept, skipped):
    said: list[str] = []
    records = load_records(MLAKE, languages, 50, 0, on_skip=said.append)
    assert len(records) == n_kept and "mlake:single_hop/qa:6" not in {r.record_id for r in records}
    assert len(said) == 1 and said[0].startswith(f"skipped {skipped} of 8 records")
    assert load_records(MLAKE, languages, 2, 1)[0].record_id == "mlake:single_hop/qa:1"  # no callback: no crash


def test_format_detection_and_mzsre_unchanged(tmp_path):
    write_dataset(tmp_path)
    assert edit_data_format(tmp_path) == "mzsre"
    assert [r.record_id for r in load_records(tmp_path, ["en", "de"], 2)] == ["mzsre:0", "mzsre:1"]
    assert edit_data_format(MLAKE / "single_hop" / "qa" / "zh_qa.json") == "mlake"
    one = load_edit_records(MLAKE / "single_hop" / "qa" / "zh_qa.json")
    assert len(one) == 8 and one[0]["zh"]["subject"] == "玛丽·居里" and one[0]["zh"]["portability"] == []


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(MLAKE, tmp_path / "mlake"))


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "single_hop" / "qa" / "de_qa.json").write_text("[{", encoding="utf-8"),
     r"de_qa.json, line 1: not valid JSON"),
    (lambda root: (root / "single_hop" / "qa" / "en_qa.json").write_text(
        json.dumps([{"o_answer": "A"}] * 8), encoding="utf-8"), r"en_qa.json, item 0: missing field 'question'"),
    (lambda root: (root / "single_hop" / "qa" / "zh_qa.json").write_text(
        json.dumps([{"question": "Q?", "e_answer": "A"}]), encoding="utf-8"), "different numbers of items"),
    (lambda root: shutil.rmtree(root / "single_hop"), "no single-hop MLaKE file"),
    (lambda root: [p.unlink() for p in root.rglob("*.json")] and (root / "notes.json").write_text("[]"),
     "neither an MzsRE / Bi-ZsRE folder"),
])
def test_bad_mlake_folders_are_corpus_errors(tmp_path, damage, message):
    root = _copy(tmp_path)
    damage(root)
    with pytest.raises(CorpusError, match=message):
        load_edit_records(root)


# ==================================================================== aliases and requests

def test_best_f1_and_em_take_any_alias():
    assert best_exact_match("Oxford", ["University of Oxford", "Oxford"], "en") == 1.0
    assert best_exact_match("Oxford", ["University of Oxford"], "en") == 0.0
    assert best_token_f1("Oxford", ["University of Oxford"], "en") == pytest.approx(2 * (1 * 1 / 3) / (1 + 1 / 3))
    assert best_token_f1("牛津", ["牛津大学", "牛津"], "zh") == 1.0
    assert best_token_f1("the UK", ["United Kingdom", "UK"], "en") == 1.0  # English articles dropped
    assert best_exact_match("x", [], "en") == 0.0


def test_request_from_mlake_record_has_portability_and_aliases():
    record = load_edit_records(MLAKE)[0]
    request = EditRequest.from_record(record, ["en", "zh"]).validate()
    en = request.facts["en"]
    assert en.subject == "Marie Curie" and en.target_old == "University of Paris"
    assert en.portability == [("In which country is the university where Marie Curie worked located?",
                               "United Kingdom")]
    assert en.aliases == {"University of Oxford": ["Oxford University", "Oxford"],
                          "United Kingdom": ["UK", "Britain", "Great Britain"]}
    items = {(p.language, p.kind): p for p in probes(request)}
    assert items[("en", "reliability")].aliases == ("Oxford University", "Oxford")
    assert items[("zh", "portability")].reference == "英国" and items[("zh", "portability")].aliases == ("联合王国",)
    again = EditRequest.from_dict(json.loads(json.dumps(request.to_dict())))
    assert again.facts["en"].aliases == en.aliases
    # requests saved before aliases existed load as they were, and alias-less facts write no "aliases" key
    old = {"case_id": "r", "facts": {"en": {"prompt": "Where did Ada work?", "subject": "Ada", "target_new": "X",
                                            "target_old": None, "paraphrases": [], "locality": [],
                                            "portability": [["Q?", "A"]]}}}
    loaded = EditRequest.from_dict(old).validate()
    assert loaded.facts["en"].aliases == {} and loaded.to_dict() == old
    with pytest.raises(InputError, match="aliases must be an object"):
        EditRequest({"en": LanguageFact("Where did Ada work?", "Ada", "X", aliases=["Y"])}).validate()


def test_score_probes_counts_an_alias_as_right():
    wb = tiny_workbench("llama")
    items = [Probe("en", "reliability", "Where did Marie Curie work?", "University of Oxford",
                   "University of Oxford", None, ("Oxford University", "Oxford")),
             Probe("en", "portability", "In which country?", "United Kingdom", "United Kingdom"),
             Probe("en", "portability", "In which country?", "United Kingdom", "United Kingdom", aliases=("UK",))]
    before = [(text, wb.tokenizer(" " + text, add_special_tokens=False)["input_ids"]) for text in ("Oxford", "UK", "UK")]
    rows = score_probes(wb, items, before, unedited=True)  # the answers scored are `before` itself
    assert (rows[0]["em"], rows[0]["f1"]) == (1.0, 1.0)
    assert (rows[1]["em"], rows[1]["f1"]) == (0.0, 0.0)   # no alias given: "UK" is wrong
    assert (rows[2]["em"], rows[2]["f1"]) == (1.0, 1.0)
    assert rows[0]["reference"] == "University of Oxford"


# ==================================================================== the CLI, end to end

TINY_LU = '{"layers": [0, 1], "beta": 0.1, "steps": 3, "lr": 0.5, "n_prefixes": 1, "prefix_length": 2}'


@pytest.fixture(scope="module")
def tiny_folder(tiny_checkpoint):
    """This module's tiny gpt2 checkpoint (tiny_checkpoint: tests/conftest.py)."""
    return tiny_checkpoint("gpt2")


def test_cli_evaluate_on_an_mlake_folder(tiny_folder, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["evaluate", "--model", str(tiny_folder), "--methods", "lu-lafns",
                      "--dataset", str(MLAKE), "--edit-languages", "en,zh", "--test-languages", "en,zh",
                      "--n", "2", "--offset", "5", "--no-monolingual",
                      "--hparams", '{"lu-lafns": ' + TINY_LU + "}", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: skipped 2 of 8 records: no subject could be derived" in result.output
    assert "Table 2 style" in result.output and "| LU-LAFNs |" in result.output
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    # records 6 and 7 have no subject in en+zh: offset 5 takes record 5 (no multi-hop item) and then the end
    assert {r["record"] for r in rows} == {"mlake:single_hop/qa:5"}
    result = run_cli(["evaluate", "--model", str(tiny_folder), "--methods", "lu-lafns",
                      "--dataset", str(MLAKE), "--edit-languages", "en,zh", "--test-languages", "en,zh",
                      "--n", "1", "--no-monolingual", "--hparams", '{"lu-lafns": ' + TINY_LU + "}",
                      "--out", str(tmp_path / "run0")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run0" / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    edited = next(r for r in rows if r["method"] == "lu-lafns")
    kinds = {(p["language"], p["kind"]): p for p in edited["probes"]}
    assert kinds[("en", "portability")]["reference"] == "United Kingdom"
    assert kinds[("zh", "portability")]["reference"] == "英国"
    assert kinds[("zh", "reliability")]["old"] == "巴黎大学"


def test_cli_evaluate_bad_mlake_folder_exits_2(tiny_folder, tmp_path):
    root = _copy(tmp_path)
    (root / "single_hop" / "qa" / "en_qa.json").write_text("[{", encoding="utf-8")
    result = run_cli(["evaluate", "--model", str(tiny_folder), "--methods", "lu-lafns",
                      "--dataset", str(root), "--edit-languages", "en", "--test-languages", "en",
                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "en_qa.json, line 1: not valid JSON" in result.output and "Traceback" not in result.output
    result = run_cli(["evaluate", "--model", str(tiny_folder), "--methods", "lu-lafns",
                      "--dataset", str(MLAKE), "--edit-languages", "en", "--test-languages", "en",
                      "--offset", "7", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no record with all of en at offset 7" in result.output
