"""Fuzzy subject matching (``match="fuzzy"``, editors.subjects): fixed examples in several scripts, negatives
that must not match, the threshold's effect, character spans mapped to tokens of the tiny tokenizer, and an
LU-LAFNs fuzzy edit on a tiny model that patches a differently written subject, saves, loads and reverts
bit-exactly."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from analysis.errors import InputError
from editors.edit import ActivationPatch, Edit
from editors.lu_lafns import LULAFNsEditor, LULAFNsHParams
from editors.requests import EditRequest, LanguageFact
from editors.subjects import (
    DEFAULT_MATCH_THRESHOLD,
    FuzzySubjectMatcher,
    fold_text,
    fuzzy_subject_spans,
    subject_token_variants,
    token_char_spans,
)
from tests.tiny import assert_bit_identical, save_tiny_checkpoint, snapshot, tiny_tokenizer, tiny_workbench


def matched(text: str, subject: str, threshold: float = DEFAULT_MATCH_THRESHOLD) -> list[str]:
    """The substrings of ``text`` that match ``subject``."""
    return [text[start:end] for start, end, _ in fuzzy_subject_spans(text, [subject], threshold)]


# ================================================================== text: fixed examples in several scripts

@pytest.mark.parametrize("text, subject, expected", [
    # Latin: case and accents, either side
    ("Where was jose marti born?", "José Martí", "jose marti"),
    ("Où est né JOSÉ MARTÍ ?", "jose marti", "JOSÉ MARTÍ"),
    # word order within the name
    ("What did Obama Barack sign in 2010?", "Barack Obama", "Obama Barack"),
    # a partial name: the surname, and a first part of a long name
    ("Where did Einstein teach?", "Albert Einstein", "Einstein"),
    ("When was the Eiffel opened?", "Eiffel Tower", "Eiffel"),
    # Cyrillic: transliteration both ways, upper case, a case form (locative "в Москве")
    ("Moskva is the capital of which country?", "Москва", "Moskva"),
    ("Столица России - МОСКВА.", "Moskva", "МОСКВА"),
    ("Я живу в Москве", "Москва", "Москве"),
    # CJK inside a sentence without spaces: traditional characters for a simplified subject, full-width Latin
    ("埃菲爾鐵塔在哪個城市？", "埃菲尔铁塔", "埃菲爾鐵塔"),
    ("ＩＡＡＦ综合项目挑战赛是什么时候推出的？", "IAAF综合项目挑战赛", "ＩＡＡＦ综合项目挑战赛"),
    # Japanese kana, transliterated; Greek case and accents; Arabic with and without short vowels
    ("ぱりはどこですか", "パリ", "ぱり"),            # hiragana for katakana (the same readings)
    ("Πού είναι η ΑΘΗΝΑ;", "Αθήνα", "ΑΘΗΝΑ"),
    ("أين تقع القاهرة؟", "القَاهِرَة", "القاهرة"),
])
def test_fuzzy_spans_find_subjects_written_differently(text, subject, expected):
    assert subject not in text  # exact matching would not find them
    assert matched(text, subject, 80) == [expected]


@pytest.mark.parametrize("text, subject", [
    ("黎巴嫩的首都是哪里？", "巴黎"),                   # the same characters in another order: Lebanon is not Paris
    ("Osama bin Laden was born in Riyadh", "Barack Obama"),   # a similar surname of someone else
    ("Al went to Bert's house", "Albert Einstein"),           # pieces of the name's letters are not the name
    ("Where is Paris?", "London"),
    ("Was ist ein Haus?", "Haushalt Anstalt"),                 # a word sharing a prefix with the name
    ("How many cats sat there?", "a"),                          # a one-letter subject matches only itself
    ("Sankt Petersburg liegt an der Newa", "Москва"),
])
def test_unrelated_text_is_not_matched_at_the_default_threshold(text, subject):
    assert matched(text, subject) == []


def test_short_subjects_match_only_when_equal_after_folding():
    # "a" is a word of its own here: equal after folding, like exact matching would find it
    assert matched("a cat", "A", 0) == ["a"]
    # never by similarity, whatever the threshold: "at"/"cat" are not "a", "UNO" is not "UN"
    assert matched("the cat sat", "a", 0) == []
    assert matched("UNO is a card game", "UN", 0) == []
    # a part of a name needs MIN_PART_CHARS letters: "Al" of "Al Gore" is not a partial match
    assert matched("Al said hi", "Al Gore", 50) == []


def test_the_threshold_decides_near_misses_and_scores_are_reported():
    text = "Я живу в Москве"
    (start, end, score), = fuzzy_subject_spans(text, ["Москва"], 70)
    assert text[start:end] == "Москве" and 70 < score < 100
    assert matched(text, "Москва", score) == ["Москве"]
    assert matched(text, "Москва", score + 0.5) == []
    # the default (65, chosen on MzsRE dev for recall) admits loose whole-name windows: "of France" scores
    # 66.67 against "Francesco Totti" (sorted: "france of" / "francesco totti"); 70 rejects it
    assert matched("The capital of France is", "Francesco Totti") == ["of France"]
    assert matched("The capital of France is", "Francesco Totti", 70) == []
    # an exact subject scores 100, so it is found at every threshold
    assert fuzzy_subject_spans("Paris is big", ["Paris"], 100) == [(0, 5, 100.0)]
    # a lower threshold never finds fewer spans
    texts = ["Barack Osama spoke", "Sankt Petersburg", "Die Hauptstadt von Frankreich", "Anthony Losila"]
    for text in texts:
        found = [len(fuzzy_subject_spans(text, ["Barack Obama", "Frankreich", "Anthony Losilla"], t))
                 for t in (100, 90, 80, 70, 60)]
        assert found == sorted(found)


def test_several_subjects_give_disjoint_sorted_spans_and_the_best_hit_wins_an_overlap():
    text = "Einstein met Barack Obama and José Martí"
    spans = fuzzy_subject_spans(text, ["Albert Einstein", "Barack Obama", "jose marti"], 85)
    # the whole "Barack Obama" (100) over its parts "Barack" and "Obama" (100 too, but parts)
    assert [text[s:e] for s, e, _ in spans] == ["Einstein", "Barack Obama", "José Martí"]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # a perfect part over a near whole: "the Eiffel" would put the span's last word right, but
    # "Eiffel opened" (the whole name, one word off) would not
    assert matched("When was Eiffel opened?", "Eiffel Tower", 60) == ["Eiffel"]
    # adjacent hits of one subject are one span (its last token is the one patched)
    assert matched("Où se trouve l'Amas des Papillons ?", "Amas de papillons", 70) == ["Amas des Papillons"]


@pytest.mark.parametrize("bad", [-1, 100.5, float("nan"), "high", None, True])
def test_bad_thresholds_are_input_errors(bad):
    with pytest.raises(InputError, match="from 0 to 100"):
        fuzzy_subject_spans("Paris", ["Paris"], bad)
    with pytest.raises(InputError, match="from 0 to 100"):
        ActivationPatch(0, [1], [1.0], {"en": ["Paris"]}, match="fuzzy", match_threshold=bad)


def test_folding_case_accents_and_scripts():
    assert fold_text("José  MARTÍ!") == "jose marti"
    assert fold_text("Москва") == fold_text("MOSKVA") == "moskva"
    assert fold_text("埃菲尔铁塔") == "aifeiertieta"
    assert fold_text("ﬁnal Straße") == "final strasse"
    assert fold_text("e\u0301te\u0301") == "ete"  # decomposed accents join their letter


# ================================================================== tokens: spans mapped back to token positions

def test_token_char_spans_cover_the_decoded_text():
    tok = tiny_tokenizer()
    for text in ["The capital of France is", "Die Hauptstadt von Frankreich", "法国的首都是", "José Martí"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        decoded, spans = token_char_spans(tok, ids)
        assert decoded == text and len(spans) == len(ids)
        assert spans[0][0] == 0 and max(e for _, e in spans) == len(text)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_matcher_patches_the_last_token_of_each_fuzzy_span_in_a_padded_batch(padding_side):
    tok = tiny_tokenizer(padding_side)
    texts = ["The capital of france is", "Paris is in FRANCE, not in Germany", "Nothing here"]
    enc = tok(texts, padding=True, return_tensors="pt")
    matcher = FuzzySubjectMatcher(tok, {0: (["France"], 85.0), 2: (["Deutschland", "Germany"], 85.0)})
    positions = matcher.positions(enc["input_ids"])

    def expected(row: int, word: str) -> int:
        """The column of the token that holds the last character of ``word`` in ``texts[row]``."""
        text = texts[row]
        end = text.lower().index(word.lower()) + len(word)
        plain = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        last = max(k for k, (s, e) in enumerate(plain["offset_mapping"]) if s < end and e > 0 and s < e)
        pad = int((enc["attention_mask"][row] == 0).sum()) if padding_side == "left" else 0
        return pad + last

    rows, cols = positions[0]
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, expected(0, "france")), (1, expected(1, "FRANCE"))]
    rows, cols = positions[2]
    assert list(zip(rows.tolist(), cols.tolist())) == [(1, expected(1, "Germany"))]
    assert 1 not in positions
    # the same ids again come from the cache, equal
    again = matcher.positions(enc["input_ids"])
    assert all(torch.equal(again[g][k], positions[g][k]) for g in positions for k in (0, 1))


def test_fuzzy_token_variants_are_the_exact_ones():
    tok = tiny_tokenizer()
    assert (subject_token_variants(tok, ["France"], ["The capital of France"], "fuzzy")
            == subject_token_variants(tok, ["France"], ["The capital of France"], "exact"))


# ================================================================== an LU-LAFNs fuzzy edit on a tiny model

def berlin_request() -> EditRequest:
    return EditRequest({
        "en": LanguageFact("The capital of France", "France", "Berlin", paraphrases=["Capital city of France"]),
        "de": LanguageFact("Die Hauptstadt von Frankreich", "Frankreich", "Berlin"),
    }, "france")


def logits(wb, texts: list[str]) -> torch.Tensor:
    ids = wb.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return wb.model(**ids).logits


def test_lu_lafns_fuzzy_edit_patches_a_differently_written_subject_saves_and_reverts(tmp_path):
    wb = tiny_workbench("llama")
    snap = snapshot(wb.model)
    hp = dict(layers=[0, 1, 2], beta=0.1, steps=10, lr=0.5, clamp_norm_factor=0.0, weight_decay=0.0,
              n_prefixes=1, prefix_length=2, seed=0)
    fuzzy = LULAFNsEditor(LULAFNsHParams(**hp, match="fuzzy", match_threshold=80)).compute(wb, berlin_request())
    exact = LULAFNsEditor(LULAFNsHParams(**hp)).compute(wb, berlin_request())
    assert fuzzy.patches and all(p.match == "fuzzy" and p.match_threshold == 80 for p in fuzzy.patches)
    assert_bit_identical(wb.model, snap)

    # "FRANCE" (upper case) and "frankreichs" (lower case, a genitive) are not exact occurrences of a subject
    written_differently = ["The capital of FRANCE", "die hauptstadt frankreichs"]
    unrelated = ["People in Spain speak", "Die Hauptstadt von Polen"]
    plain_diff, plain_unrel = logits(wb, written_differently), logits(wb, unrelated)
    with exact.applied(wb):
        assert torch.equal(logits(wb, written_differently), plain_diff)
    with fuzzy.applied(wb):
        edited = logits(wb, written_differently)
        assert not torch.equal(edited[0], plain_diff[0]) and not torch.equal(edited[1], plain_diff[1])
        assert torch.equal(logits(wb, unrelated), plain_unrel)
    assert_bit_identical(wb.model, snap)

    fuzzy.save(tmp_path / "edit")
    loaded = Edit.load(tmp_path / "edit")
    assert [(p.match, p.match_threshold) for p in loaded.patches] == [("fuzzy", 80.0)] * len(fuzzy.patches)
    with loaded.applied(wb):
        assert torch.equal(logits(wb, written_differently), edited)
    assert_bit_identical(wb.model, snap)
    assert torch.equal(logits(wb, written_differently), plain_diff)


@pytest.mark.parametrize("hparams, fragment", [
    ('{"match": "fuzzy", "match_threshold": 150}', "match_threshold must be a number in [0, 100]"),
    ('{"match": "fuzzy", "match_threshold": "high"}', "match_threshold"),
    ('{"match": "fuzy"}', "Unknown subject match 'fuzy'; use one of: exact, normalized, fuzzy"),
])
def test_cli_edit_rejects_bad_fuzzy_hyperparameters_with_exit_code_2(tmp_path, hparams, fragment):
    from app.cli import cli

    save_tiny_checkpoint("gpt2", tmp_path)
    result = CliRunner().invoke(cli, ["edit", "--model", str(tmp_path), "--method", "lu-lafns", "--hparams", hparams,
                                      "--prompt", "en:The capital of France is", "--subject", "en:France",
                                      "--target", "en:Berlin"])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
