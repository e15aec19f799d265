"""Corpus type, loaders, edit-record loaders and the bundled demo corpus.

Tests that read the public data sets in ../shared/data skip when it is absent.
"""
from __future__ import annotations

import csv
import json
import os
import re
import unicodedata
from pathlib import Path

import pandas as pd
import pytest

from analysis.errors import CorpusError, NeuroglotError
from data import (
    FLORES_CODES,
    LANGUAGES,
    REQUIRED_COLUMNS,
    Corpus,
    EditRecord,
    as_corpus,
    load_corpus,
    load_mlake,
    load_mzsre,
    load_xfactr,
    normalize_language,
    reduce_xfactr_markup,
)
from data import build_demo

SHARED = Path(os.environ.get("NEUROGLOT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
MPARAREL = SHARED / "mpararel"
PARAREL = SHARED / "pararel"
XFACTR_CSV = SHARED / "xfactr" / "TREx_prompts.csv"
MZSRE = SHARED / "mzsre" / "dev"
FLORES = SHARED / "flores200_devtest"
DEMO_LANGUAGES = ["ar", "de", "en", "es", "fr", "ja", "ru", "zh"]
DEMO_DIR = Path(build_demo.__file__).resolve().parent / "demo"


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not available")


@pytest.fixture(scope="module")
def demo() -> Corpus:
    return load_corpus("demo")


def _lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _patterns(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["pattern"] for line in f if line.strip()]


def _x_before_y(patterns: list[str]) -> int:
    return sum(1 for p in patterns if p.index("[X]") < p.index("[Y]"))


def small_corpus() -> Corpus:
    """Three facts of one relation; fact "P1:2" has no zh row."""
    rows = []
    for fact, langs in (("P1:1", ("en", "zh")), ("P1:2", ("en",)), ("P1:3", ("en", "zh"))):
        for lang in langs:
            subject = f"S{fact[-1]}{lang}"
            template = "[X]的首都是[Y]。" if lang == "zh" else "The capital of [X] is [Y]."
            rows.append({"fact_id": fact, "relation": "P1", "language": lang, "subject": subject,
                         "object": f"O{fact[-1]}", "template_id": f"P1.{lang}.1", "template": template,
                         "prompt": template.split("[Y]")[0].replace("[X]", subject).rstrip()})
    return Corpus(pd.DataFrame(rows), name="small")


# --------------------------------------------------------------------------- demo corpus
def test_demo_has_the_promised_shape(demo):
    assert len(demo.relations) >= 10
    assert demo.languages == DEMO_LANGUAGES
    counts = demo.aligned(DEMO_LANGUAGES).counts()
    assert list(counts.columns) == DEMO_LANGUAGES
    assert (counts >= 50).all().all(), counts
    per = demo.rows.groupby(["relation", "language"])["template_id"].nunique()
    assert len(per) == len(demo.relations) * 8
    assert (per >= 3).all(), per[per < 3]


def test_demo_prompts_are_the_text_before_the_answer(demo):
    rows = demo.rows
    assert (rows["prompt"].str.strip() != "").all()
    assert all(s in p for s, p in zip(rows["subject"], rows["prompt"]))
    # every template ends with [Y] and at most one final punctuation mark
    for template in rows["template"].unique():
        assert re.search(r"\[Y\][.。!?！？]?$", template), template
        assert template.count("[X]") == 1 and template.count("[Y]") == 1
    for lang in ("zh", "ja"):
        assert not rows.loc[rows["language"] == lang, "template"].str.contains(" ").any()
    arabic = rows.loc[rows["language"] == "ar", "template"].unique()
    assert all(re.search(r"[\u0600-\u06FF]", t) for t in arabic)
    statements = demo.statements()
    first = rows.iloc[0]
    assert statements.iloc[0].startswith(first["prompt"])
    assert first["object"] in statements.iloc[0]


def test_demo_facts_align_across_languages(demo):
    facts = demo.facts().merge(demo.rows[["fact_id", "language", "sub_uri"]].drop_duplicates(),
                               on=["fact_id", "language"])
    assert (facts.groupby("fact_id")["sub_uri"].nunique() == 1).all()
    assert (facts.groupby("fact_id")["language"].nunique() == 8).all()


def test_demo_files_are_small_and_have_a_notice():
    total = sum(p.stat().st_size for p in DEMO_DIR.iterdir() if p.is_file())
    assert total < 2_000_000
    notice = (DEMO_DIR / "NOTICE").read_text(encoding="utf-8")
    for needle in ("CC0", "7153b7b", "Neuroglot authors", "T-REx"):
        assert needle in notice
    relations = json.loads((DEMO_DIR / "relations.json").read_text(encoding="utf-8"))
    assert relations["P36"] == "capital"


@needs(MPARAREL)
def test_build_demo_reproduces_the_committed_files(tmp_path):
    build_demo.build(MPARAREL, tmp_path)
    for name in ("facts.jsonl", "templates.jsonl", "relations.json", "NOTICE"):
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name


@needs(MPARAREL)
@needs(XFACTR_CSV)
def test_demo_templates_are_not_copied_from_mpararel_or_xfactr(demo):
    def norm(t: str) -> str:
        t = reduce_xfactr_markup(t) if "[" in t.replace("[X]", "").replace("[Y]", "") else t
        return "".join(ch for ch in t.lower() if not unicodedata.category(ch)[0] in "PZ" or ch in "[]")

    for lang in DEMO_LANGUAGES:
        folder = MPARAREL / "patterns" / ("zh-hans" if lang == "zh" else lang)
        theirs = {norm(p) for f in folder.glob("P*.jsonl") for p in _patterns(f)}
        with XFACTR_CSV.open(encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    theirs.add(norm(row[lang]))
                except (KeyError, ValueError, AttributeError):
                    pass
        ours = demo.rows.loc[demo.rows["language"] == lang, "template"].unique()
        assert not [t for t in ours if norm(t) in theirs]


# --------------------------------------------------------------------------- languages
def test_language_codes_are_normalised():
    assert normalize_language("zh-hans") == "zh"
    assert normalize_language("cz") == "cs"
    assert normalize_language("du") == "nl"
    assert normalize_language("eng_Latn") == "en"
    assert normalize_language("pt-BR") == "pt"
    with pytest.raises(CorpusError, match="xx"):
        normalize_language("xx")


@needs(MPARAREL)
@needs(XFACTR_CSV)
@needs(MZSRE)
@needs(FLORES)
def test_language_table_covers_the_data_sets():
    mpararel = {normalize_language(p.name) for p in (MPARAREL / "patterns").iterdir()}
    with XFACTR_CSV.open(encoding="utf-8") as f:
        xfactr = {normalize_language(c) for c in next(csv.reader(f))[2:]}
    mzsre = {normalize_language(p.stem.rsplit("en", 1)[1]) for p in MZSRE.glob("*.json")}
    assert mpararel | xfactr | mzsre <= set(LANGUAGES)
    assert len(mpararel) >= 45 and len(mzsre) == 11
    stems = {p.stem for p in FLORES.glob("*.devtest")}
    assert set(FLORES_CODES.values()) == stems and len(FLORES_CODES) == 18


# --------------------------------------------------------------------------- ParaRel / mParaRel / X-FACTR
@needs(MPARAREL)
def test_mpararel_aligns_fact_ids_and_matches_hand_counts():
    corpus = load_corpus(MPARAREL, languages=["en", "zh"], relations=["P36"])
    assert corpus.languages == ["en", "zh"] and corpus.relations == ["P36"]
    counts = corpus.counts()
    en_lines = _lines(MPARAREL / "tuples" / "en" / "P36.jsonl")
    zh_lines = _lines(MPARAREL / "tuples" / "zh-hans" / "P36.jsonl")
    assert counts.loc["P36", "en"] == en_lines
    assert counts.loc["P36", "zh"] == zh_lines
    usable = {lang: _x_before_y(_patterns(MPARAREL / "patterns" / d / "P36.jsonl"))
              for lang, d in (("en", "en"), ("zh", "zh-hans"))}
    assert len(corpus) == en_lines * usable["en"] + zh_lines * usable["zh"]
    # fact_id = relation:lineid aligns the same Wikidata fact across languages
    facts = corpus.rows.drop_duplicates(["fact_id", "language"])
    both = facts.pivot(index="fact_id", columns="language", values="sub_uri").dropna()
    assert len(both) > 300
    assert (both["en"] == both["zh"]).all()
    row = corpus.rows[(corpus.rows["fact_id"] == "P36:0") & (corpus.rows["language"] == "en")].iloc[0]
    assert row["subject"] == "Azerbaijan" and row["object"] == "Baku"
    assert row["prompt"] == row["template"].split("[Y]")[0].replace("[X]", "Azerbaijan").rstrip()


@needs(PARAREL)
def test_pararel_rows_are_patterns_times_tuples():
    corpus = load_corpus(PARAREL, relations=["P36"])
    patterns = _patterns(PARAREL / "patterns" / "P36.jsonl")
    tuples = _lines(PARAREL / "tuples" / "P36.jsonl")
    usable = _x_before_y(patterns)  # "[Y] is the capital of [X]." has no prompt containing the subject
    assert 0 < usable < len(patterns)
    assert len(corpus) == usable * tuples
    assert corpus.rows["template_id"].nunique() == usable
    assert corpus.languages == ["en"]
    assert corpus.rows["fact_id"].str.match(r"^P36:[0-9a-f-]{36}$").all()


def test_xfactr_markup_reduction():
    cases = {
        "[X] est [né;X-Gender=MASC|née;X-Gender=FEM] [PREPLOC;Y] [Y] .": "[X] est né [Y] .",
        "[X.Nom] [родился;X-Gender=MASC|родилась;X-Gender=FEM|родилось;X-Gender=NEUT] в [Y.Ess] .":
            "[X] родился в [Y] .",
        "La langue officielle [PREPDEF;X] [X] est [ARTDEF;Y] [Y] .": "La langue officielle [X] est [Y] .",
        "[DEF;X] [X.Nom] πήρε το όνομά [DEF.Gen;X] από [DEF;Y] [Y.Acc] .": "[X] πήρε το όνομά από [Y] .",
        "[X] es [ART;X-Gender] [miembro;X-Gender=MASC|miembra;X-Gender=FEM] de [Y] .": "[X] es miembro de [Y] .",
        "[X.Gen] resmi dili [Y;be] .": "[X] resmi dili [Y] .",
        "[X] [human: একজন ; non-human: একটি] [Y] ।": "[X] একজন [Y] ।",
        "[X] [Y.IN+ESS] született .": "[X] [Y] született .",
    }
    for raw, expected in cases.items():
        assert reduce_xfactr_markup(raw) == expected
    with pytest.raises(ValueError):
        reduce_xfactr_markup("[X bad] is [Y]")


@needs(XFACTR_CSV)
@needs(MPARAREL)
def test_xfactr_loader_fills_real_prompts():
    spec = f"xfactr:{XFACTR_CSV}?tuples={MPARAREL}"
    corpus = load_corpus(spec, languages=["en", "fr", "ru"], relations=["P19", "P37"])
    assert corpus.languages == ["en", "fr", "ru"]
    templates = dict(zip(corpus.rows["template_id"], corpus.rows["template"]))
    assert templates["P19.fr.xfactr"] == "[X] est né [Y] ."
    assert templates["P37.ru.xfactr"] == "Официальный язык [X] — [Y] ."
    row = corpus.rows[corpus.rows["template_id"] == "P19.en.xfactr"].iloc[0]
    assert row["prompt"] == f"{row['subject']} was born in"
    assert corpus.counts().loc["P19", "en"] == _lines(MPARAREL / "tuples" / "en" / "P19.jsonl")
    with pytest.raises(CorpusError, match="tuples"):
        load_xfactr(XFACTR_CSV, None)


def test_xfactr_unknown_markup_names_file_line_and_column(tmp_path):
    tuples = tmp_path / "tuples" / "en"
    tuples.mkdir(parents=True)
    (tuples / "P1.jsonl").write_text(json.dumps({"sub_label": "A", "obj_label": "B", "lineid": 0}) + "\n")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("pid,relation,en\nP1,one,[X] is [Y] .\nP2,two,x\nP1,again,[X bad] is [Y] .\n", encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        load_xfactr(prompts, tmp_path)
    assert "prompts.csv, line 4" in str(err.value) and "'en'" in str(err.value)


# --------------------------------------------------------------------------- MzsRE / MLaKE
@needs(MZSRE)
def test_mzsre_files_have_500_records_with_all_fields():
    fields = {"subject", "prompt", "rephrase", "target_new", "loc", "loc_ans", "port_question", "port_answer"}
    for path in sorted(MZSRE.glob("mzsre_test_duplicate_en*.json")):
        records = load_mzsre(path)
        assert len(records) == 500, path.name
        assert len(records[0].languages) == 2 and "en" in records[0].languages
        for record in records:
            for lang in record.languages:
                assert set(record.fields[lang]) == fields
                assert all(record.fields[lang][k] for k in ("subject", "prompt", "target_new"))


@needs(MZSRE)
def test_mzsre_folder_merges_languages_by_record_index():
    records = load_mzsre(MZSRE)
    assert len(records) == 500
    assert records[0].languages == sorted(["en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"])
    first = records[0]
    assert first["en"]["subject"] == "IAAF Combined Events Challenge"
    assert first["zh"]["prompt"].startswith("IAAF综合项目挑战赛")
    bi = load_mzsre(MZSRE, languages=["en", "zh"])
    assert {tuple(r.languages) for r in bi} == {("en", "zh")}
    corpus = as_corpus(bi)
    assert corpus.counts().loc["mzsre"].tolist() == [500, 500]
    assert set(corpus.rows["template_id"]) == {"prompt", "rephrase"}
    assert (corpus.rows["object"] == [r[lang]["target_new"] for r in bi for lang in r.languages
                                      for _ in ("prompt", "rephrase")]).all()


def test_mzsre_mismatched_files_are_an_error(tmp_path):
    item = {"subject": "S", "src": "Q S?", "rephrase": "R S?", "alt": "A", "loc": "L", "loc_ans": "LA",
            "portability": {"New Question": "PQ", "New Answer": "PA"}}
    (tmp_path / "mzsre_test_duplicate_ende.json").write_text(json.dumps([{"en": item, "de": item}]))
    (tmp_path / "mzsre_test_duplicate_enfr.json").write_text(json.dumps([{"en": dict(item, alt="B"), "fr": item}]))
    with pytest.raises(CorpusError, match=r"mzsre_test_duplicate_enfr.json, item 0"):
        load_mzsre(tmp_path)


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_mlake_single_and_multi_hop(tmp_path):
    root = tmp_path / "dataset"
    en = [{"question": "Where did Ada work?", "o_prompt": "Ada worked at X.", "o_answer": "X Univ",
           "o_answer_aliases": ["X"], "e_prompt": "Ada worked at Y.", "e_answer": "Y Corp", "e_answer_aliases": []},
          {"question": "Who founded Z?", "o_answer": "Bob", "e_answer": "Carl", "aliases": ["Bobby"]}]
    de = [{"question": "Wo arbeitete Ada?", "o_answer": "X Uni", "e_answer": "Y AG"},
          {"question": "Wer gründete Z?", "o_answer": "Bob", "e_answer": "Carl"}]
    _write(root / "single_hop" / "qa" / "en_qa.json", en)
    _write(root / "single_hop" / "qa" / "de_qa.json", de)
    _write(root / "multi_hop" / "qa" / "old_en_qa.json", [{"question": "Q old?", "o_answer": "Ithaca"}])
    _write(root / "multi_hop" / "qa" / "new_en_qa.json", [{"question": "Q new?", "e_answer": "Reith"}])
    records = load_mlake(root)
    by_id = {r.record_id: r for r in records}
    assert set(by_id) == {"mlake:single_hop/qa:0", "mlake:single_hop/qa:1",
                          "mlake:multi_hop/qa/old:0", "mlake:multi_hop/qa/new:0"}
    first = by_id["mlake:single_hop/qa:0"]
    assert first.languages == ["de", "en"]
    assert first["en"]["target_true"] == "X Univ" and first["en"]["target_new"] == "Y Corp"
    assert first["en"]["true_aliases"] == ["X"] and first["de"]["prompt"] == "Wo arbeitete Ada?"
    assert by_id["mlake:single_hop/qa:1"]["en"]["true_aliases"] == ["Bobby"]
    assert by_id["mlake:multi_hop/qa/new:0"]["en"]["target_true"] is None
    # a dict {language: [items]} file, with subjects, turns into a corpus
    file = _write(tmp_path / "mlake.json", {"en": [dict(en[0], subject="Ada")], "zh": [
        {"question": "Ada在哪里工作？", "o_answer": "X大学", "e_answer": "Y公司", "subject": "Ada"}]})
    corpus = as_corpus(load_mlake(file), target="true")
    assert corpus.languages == ["en", "zh"]
    zh = corpus.rows[corpus.rows["language"] == "zh"].iloc[0]
    assert zh["object"] == "X大学" and zh["template"] == "[X]在哪里工作？[Y]"
    with pytest.raises(CorpusError, match="no subject"):
        as_corpus(records)


def test_mlake_malformed_items_name_file_and_item(tmp_path):
    bad = _write(tmp_path / "en_qa.json", [{"question": "Q?", "o_answer": "A"}, {"o_answer": "A"}])
    with pytest.raises(CorpusError, match=r"en_qa.json, item 1: missing field 'question'"):
        load_mlake(bad)
    no_answer = _write(tmp_path / "x" / "fr_qa.json", [{"question": "Q?"}])
    with pytest.raises(CorpusError, match=r"fr_qa.json, item 0: .*o_answer"):
        load_mlake(no_answer)
    _write(tmp_path / "y" / "en_qa.json", [{"question": "Q?", "o_answer": "A"}] * 2)
    _write(tmp_path / "y" / "de_qa.json", [{"question": "Q?", "o_answer": "A"}])
    with pytest.raises(CorpusError, match="different numbers of items"):
        load_mlake(tmp_path / "y")
    unnamed = _write(tmp_path / "questions.json", [{"question": "Q?", "o_answer": "A"}])
    with pytest.raises(CorpusError, match="language"):
        load_mlake(unnamed)
    assert load_mlake(unnamed, language="ja")[0].languages == ["ja"]


def test_edit_record_lookup_normalises_language():
    record = EditRecord("r", {"cs": {"subject": "S"}})
    assert record["cz"]["subject"] == "S"
    with pytest.raises(CorpusError, match="no language"):
        record["de"]


# --------------------------------------------------------------------------- user files
def test_user_jsonl_round_trip(demo, tmp_path):
    small = demo.filter(languages=["en", "zh", "ar"], max_facts=3)
    path = small.to_jsonl(tmp_path / "mine.jsonl")
    back = load_corpus(path)
    cols = list(REQUIRED_COLUMNS)
    pd.testing.assert_frame_equal(back.rows[cols], small.rows[cols], check_dtype=False)
    assert back.name == "mine"


def test_user_csv_round_trip_and_derived_fields(demo, tmp_path):
    small = demo.filter(languages=["de", "ja"], relations=["P36"], max_facts=4)
    path = tmp_path / "mine.csv"
    small.rows[list(REQUIRED_COLUMNS)].to_csv(path, index=False)
    back = load_corpus(path)
    pd.testing.assert_frame_equal(back.rows[list(REQUIRED_COLUMNS)], small.rows[list(REQUIRED_COLUMNS)],
                                  check_dtype=False)
    # template only -> prompt derived; prompt only -> template rebuilt; ids numbered
    lines = [
        {"fact_id": 1, "relation": "P36", "language": "zh-hans", "subject": "法国", "object": "巴黎",
         "template": "[X]的首都是[Y]。"},
        {"fact_id": 2, "relation": "P36", "language": "en", "subject": "Peru", "object": "Lima",
         "prompt": "The capital of Peru is"},
    ]
    jl = tmp_path / "derived.jsonl"
    jl.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    rows = load_corpus(jl).rows
    assert rows.loc[0, "language"] == "zh" and rows.loc[0, "prompt"] == "法国的首都是"
    assert rows.loc[1, "template"] == "The capital of [X] is [Y]"
    assert rows["template_id"].tolist() == ["P36.zh.1", "P36.en.1"]
    assert rows.loc[0, "fact_id"] == "1"


MALFORMED_JSONL = {
    "bad JSON": ('{"fact_id": "a", "relation": "P1", "language": "en", "subject": "S", "object": "O", '
                 '"prompt": "S is"}\n\n{"fact_id": "b", "relation": \n', "line 3", "not valid JSON"),
    "missing field": ('{"fact_id": "a", "relation": "P1", "language": "en", "subject": "S", "object": "O", '
                      '"prompt": "S is"}\n{"fact_id": "b", "relation": "P1", "language": "en", "subject": "S", '
                      '"prompt": "S is"}\n', "line 2", "'object'"),
    "unknown language": ('{"fact_id": "a", "relation": "P1", "language": "en", "subject": "S", "object": "O", '
                         '"prompt": "S is"}\n{"fact_id": "b", "relation": "P1", "language": "klingon", '
                         '"subject": "S", "object": "O", "prompt": "S is"}\n', "line 2", "klingon"),
    "pattern without [Y]": ('{"fact_id": "a", "relation": "P1", "language": "en", "subject": "S", "object": "O", '
                            '"template": "[X] is the capital"}\n', "line 1", "[Y]"),
    "no prompt or template": ('{"fact_id": "a", "relation": "P1", "language": "en", "subject": "S", '
                              '"object": "O"}\n', "line 1", "prompt"),
}


@pytest.mark.parametrize("case", list(MALFORMED_JSONL))
def test_malformed_user_jsonl_names_file_and_line(tmp_path, case):
    text, line, detail = MALFORMED_JSONL[case]
    path = tmp_path / "broken_corpus.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        load_corpus(path)
    message = str(err.value)
    assert "broken_corpus.jsonl" in message and line in message and detail in message
    assert isinstance(err.value, NeuroglotError)


def test_malformed_user_csv_names_file_and_line(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("fact_id,relation,language,subject,prompt\na,P1,en,S,S is\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"broken.csv, line 1: missing column 'object'"):
        load_corpus(path)
    path.write_text("fact_id,relation,language,subject,object,prompt\na,P1,en,S,O,S is\nb,P1,en,S,,S is\n",
                    encoding="utf-8")
    with pytest.raises(CorpusError, match=r"broken.csv, line 3: missing field 'object'"):
        load_corpus(path)


def _mpararel_tree(root: Path, pattern_lines: list[str]) -> Path:
    (root / "patterns" / "en").mkdir(parents=True)
    (root / "tuples" / "en").mkdir(parents=True)
    (root / "patterns" / "en" / "P1.jsonl").write_text("\n".join(pattern_lines) + "\n", encoding="utf-8")
    (root / "tuples" / "en" / "P1.jsonl").write_text(
        json.dumps({"sub_label": "A", "obj_label": "B", "lineid": 0}) + "\n", encoding="utf-8")
    return root


def test_malformed_patterns_and_layouts(tmp_path):
    root = _mpararel_tree(tmp_path / "mp", ['{"pattern": "[X] is in [Y]"}', '{"pattern": "[X] is somewhere"}'])
    with pytest.raises(CorpusError) as err:
        load_corpus(root)
    assert "P1.jsonl, line 2" in str(err.value) and "[Y]" in str(err.value)
    # unknown language folder
    other = _mpararel_tree(tmp_path / "mp2", ['{"pattern": "[X] is in [Y]"}'])
    (other / "patterns" / "en").rename(other / "patterns" / "qq")
    with pytest.raises(CorpusError, match="qq"):
        load_corpus(other)
    # unrecognised folder, missing path, wrong file type
    (tmp_path / "junk").mkdir()
    with pytest.raises(CorpusError, match="junk: unrecognised folder layout"):
        load_corpus(tmp_path / "junk")
    with pytest.raises(CorpusError, match="nowhere.jsonl"):
        load_corpus(tmp_path / "nowhere.jsonl")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(CorpusError, match="c.txt"):
        load_corpus(tmp_path / "c.txt")


def test_malformed_json_files_name_line_or_item(tmp_path):
    broken = tmp_path / "mzsre_test_duplicate_ende.json"
    broken.write_text('[\n {"en": {"subject": "S"},\n  oops\n]', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"mzsre_test_duplicate_ende.json, line 3"):
        load_mzsre(broken)
    item = {"subject": "S", "src": "Q?", "rephrase": "R?", "alt": "A", "loc": "L", "loc_ans": "LA"}
    broken.write_text(json.dumps([{"en": item, "de": item}, {"en": item, "de": dict(item, alt="")}]))
    with pytest.raises(CorpusError, match=r"item 1, 'de': missing field 'alt'"):
        load_mzsre(broken)
    broken.write_text(json.dumps([{"en": item, "xx": item}]))
    with pytest.raises(CorpusError, match=r"item 0: unknown language code 'xx'"):
        load_mzsre(broken)


# --------------------------------------------------------------------------- Corpus behaviour
def test_filter_samples_facts_reproducibly(demo):
    a = demo.filter(languages=["en", "zh"], relations=["P36", "P37"], max_facts=10, seed=1)
    b = demo.filter(languages=["en", "zh"], relations=["P36", "P37"], max_facts=10, seed=1)
    c = demo.filter(languages=["en", "zh"], relations=["P36", "P37"], max_facts=10, seed=2)
    assert a.languages == ["en", "zh"] and a.relations == ["P36", "P37"]
    assert (a.counts() == 10).all().all()
    pd.testing.assert_frame_equal(a.rows, b.rows)
    assert set(a.rows["fact_id"]) != set(c.rows["fact_id"])
    # a kept fact keeps every language and template
    per_fact = a.rows.groupby("fact_id").size()
    assert (per_fact == 2 * 3).all()
    # sampling one relation does not depend on which other relations are kept
    alone = demo.filter(languages=["en", "zh"], relations=["P36"], max_facts=10, seed=1)
    assert set(alone.rows["fact_id"]) == set(a.rows.loc[a.rows["relation"] == "P36", "fact_id"])
    with pytest.raises(CorpusError, match="ko"):
        demo.filter(languages=["ko"])
    with pytest.raises(CorpusError, match="P999"):
        demo.filter(relations=["P999"])


def test_aligned_counts_and_statements():
    corpus = small_corpus()
    assert corpus.counts().to_dict() == {"en": {"P1": 3}, "zh": {"P1": 2}}
    margins = corpus.counts(margins=True)
    assert margins.loc["P1", "total"] == 3 and margins.loc["total", "en"] == 3 and margins.loc["total", "zh"] == 2
    aligned = corpus.aligned(["en", "zh"])
    assert sorted(set(aligned.rows["fact_id"])) == ["P1:1", "P1:3"]
    assert aligned.counts().to_dict() == {"en": {"P1": 2}, "zh": {"P1": 2}}
    assert corpus.aligned(["en"]).languages == ["en"]
    assert corpus.statements().tolist()[:2] == ["The capital of S1en is O1.", "S1zh的首都是O1。"]
    assert len(corpus) == 5


def test_validation_is_one_place():
    rows = small_corpus().rows
    with pytest.raises(CorpusError, match="empty"):
        Corpus(rows.iloc[:0])
    with pytest.raises(CorpusError, match="missing column"):
        Corpus(rows.drop(columns=["prompt"]))
    with pytest.raises(CorpusError, match="empty subject"):
        Corpus(rows.assign(subject=["  "] + rows["subject"].tolist()[1:]))
    with pytest.raises(CorpusError, match="unknown language"):
        Corpus(rows.assign(language="xx"))
    fixed = Corpus(rows.assign(language=rows["language"].replace({"zh": "zh-hans"})))
    assert fixed.languages == ["en", "zh"]
    with pytest.raises(CorpusError, match="not found"):
        load_corpus("no/such/corpus")
