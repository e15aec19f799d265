"""editors.metrics / editors.answers / editors.evaluate: the metrics against hand computations (English and
Chinese), greedy decoding and teacher-forced scores against plain single-text runs, and evaluation runs on a
tiny model (tables, resume, bad input)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from analysis.errors import InputError
from analysis.tokens import answer_ids
from editors.answers import answer_scores, greedy_answers, greedy_decode
from editors.base import get_editor
from editors.evaluate import (
    EvalConfig,
    Probe,
    probes,
    rows_frame,
    run_evaluation,
    score_probes,
    table1,
    table2,
    transfer_matrix,
    unedited_answers,
)
from editors.metrics import answer_tokens, exact_match, normalize_answer, token_f1
from editors.requests import EditRequest, LanguageFact
from tests.tiny import TINY_FAMILIES, assert_bit_identical, fake_run, snapshot, tiny_workbench, write_dataset

# ==================================================================== metrics


def test_normalisation_follows_squad_and_handles_unicode():
    assert normalize_answer("The  Eiffel Tower!", "en") == "eiffel tower"
    assert normalize_answer("An apple, a day", "en") == "apple day"
    assert normalize_answer("A Paris", "fr") == "a paris"            # articles dropped for English only
    assert normalize_answer("２００６年。", "zh") == "2006年"             # NFKC full width, CJK punctuation
    assert normalize_answer("《呼叫医生》", "zh") == "呼叫医生"


@pytest.mark.parametrize("text, lang, tokens", [
    ("沟胫天牛亚科", "zh", ["沟", "胫", "天", "牛", "亚", "科"]),
    ("2006年", "zh", ["2006", "年"]),
    ("Volvo B12M 公司", "zh", ["volvo", "b12m", "公", "司"]),
    ("ขอบคุณ", "th", ["ข", "อ", "บ", "ค", "ุ", "ณ"]),
    ("서울 특별시", "ko", ["서울", "특별시"]),
    ("The String", "en", ["string"]),
])
def test_tokens_for_f1_split_scripts_without_spaces_into_characters(text, lang, tokens):
    assert answer_tokens(text, lang) == tokens


@pytest.mark.parametrize("pred, ref, lang, f1, em", [
    ("Paris", "paris", "en", 1.0, 1.0),
    ("Paris France", "Paris", "en", 2 * 0.5 * 1.0 / 1.5, 0.0),          # P = 1/2, R = 1
    ("the city of Paris", "Paris, France", "en", 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 0.0),
    ("沟胫天牛亚科", "天牛科", "zh", 2 * 0.5 * 1.0 / 1.5, 0.0),            # 3 common of 6 and 3
    ("2006年", "2006", "zh", 2 * 0.5 * 1.0 / 1.5, 0.0),
    ("巴黎。", "巴黎", "zh", 1.0, 1.0),
    ("巴 黎", "巴黎", "zh", 1.0, 1.0),                                    # spacing inside Chinese does not count
    ("也门也门", "也门", "zh", 2 * 0.5 * 1.0 / 1.5, 0.0),                 # bag of tokens: 2 of 4, 2 of 2
    ("", "Paris", "en", 0.0, 0.0),
    ("", "", "en", 1.0, 1.0),
    ("Berlin", "Paris", "en", 0.0, 0.0),
])
def test_f1_and_em_equal_hand_computations(pred, ref, lang, f1, em):
    assert token_f1(pred, ref, lang) == pytest.approx(f1)
    assert exact_match(pred, ref, lang) == em


# ==================================================================== answers

FAMILIES = ("llama", "gpt2", "gemma3_text")
PROMPTS = ["The capital of France is", "Die Hauptstadt von Deutschland ist", "法国的首都是", "Paris"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_greedy_decoding_equals_one_text_at_a_time(family):
    wb = tiny_workbench(family)
    lengths = [3, 5, 2, 4]
    batch = greedy_decode(wb, PROMPTS, lengths, stop_at_newline=False)
    for prompt, n, (text, ids) in zip(PROMPTS, lengths, batch):
        alone_text, alone_ids = greedy_decode(wb, [prompt], n, stop_at_newline=False)[0]
        assert ids == alone_ids and text == alone_text
        # by hand: arg-max of the full model's logits, one token at a time
        seq = wb.tokenizer(prompt, return_tensors="pt")["input_ids"]
        hand = []
        with torch.no_grad():
            while len(hand) < len(ids):
                nxt = int(wb.model(input_ids=seq).logits[0, -1].argmax())
                hand.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        assert hand == ids


@pytest.mark.parametrize("family", ("llama", "gemma3_text"))
def test_cached_decoding_equals_recomputing_every_step_under_an_activation_patch(family):
    """An LU-LAFNs edit patches the subject's last token: with the key/value cache that happens once, in the
    prompt's run, and the answers must be those of running every row's whole text at every step."""
    from editors.answers import _decode_batch, _decode_batch_recompute
    from editors.lu_lafns import LULAFNsHParams

    wb = tiny_workbench(family)
    request = EditRequest({"en": LanguageFact("The capital of France", "France", "Berlin"),
                           "de": LanguageFact("Die Hauptstadt von Frankreich", "Frankreich", "Berlin")}, "france")
    hp = LULAFNsHParams(layers=[0, 1, 2], beta=0.1, steps=15, lr=0.5, clamp_norm_factor=0.0, weight_decay=0.0,
                        n_prefixes=1, prefix_length=2, seed=0)
    edit = get_editor("lu-lafns", hp).compute(wb, request)
    prompts = ["The capital of France", "Paris is in France and", "Die Hauptstadt von Frankreich", "法国的首都是"]
    lengths = [5, 3, 6, 4]
    plain = _decode_batch(wb, prompts, lengths)
    with edit.applied(wb):
        cached = _decode_batch(wb, prompts, lengths)
        again = _decode_batch_recompute(wb, [wb.tokenizer(p)["input_ids"] for p in prompts], lengths)
    assert cached == again
    assert cached[0] != plain[0] or cached[2] != plain[2]      # the edit changed an answer of a subject prompt
    assert cached[3] == plain[3]                               # a prompt without the subject is not patched


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_scores_equal_a_single_text_run_and_greedy_answers_are_top1(family):
    wb = tiny_workbench(family)
    answers = ["Paris", "Berlin", "巴黎", "France"]
    scores = answer_scores(wb, PROMPTS, answers)
    for prompt, answer, score in zip(PROMPTS, answers, scores):
        ids = wb.tokenizer(prompt, return_tensors="pt")["input_ids"]
        ans = answer_ids(wb.tokenizer, prompt, answer)
        with torch.no_grad():
            logp = torch.log_softmax(wb.model(input_ids=torch.cat([ids, torch.tensor([ans])], 1)).logits[0].float(), -1)
        n = ids.shape[1]
        hand = [float(logp[n - 1 + k, a]) for k, a in enumerate(ans)]
        assert score.token_ids == ans
        assert score.logprobs == pytest.approx(hand, abs=1e-4)
        assert score.probability == pytest.approx(math.exp(sum(hand)), rel=1e-3)
    # the greedy answer's own ids are the arg-max at every step
    for (_, ids), score in zip(greedy_decode(wb, PROMPTS, 4), answer_scores(wb, PROMPTS, [ids for _, ids in
                                                                                         greedy_decode(wb, PROMPTS, 4)])):
        assert score.token_ids == ids and score.top1_accuracy == 1.0


def test_answer_functions_reject_bad_input():
    wb = tiny_workbench()
    with pytest.raises(InputError, match="No prompt"):
        greedy_answers(wb, [], 3)
    with pytest.raises(InputError, match="empty"):
        greedy_answers(wb, ["  "], 3)
    with pytest.raises(InputError, match="1-64"):
        greedy_answers(wb, ["Paris"], 0)
    with pytest.raises(InputError, match="one answer"):
        answer_scores(wb, ["Paris"], ["a", "b"])
    with pytest.raises(InputError, match="empty"):
        answer_scores(wb, ["Paris"], [""])


# ============================================================ probes and rows


def two_language_request() -> EditRequest:
    return EditRequest({
        "en": LanguageFact("The capital of France is", "France", "Berlin", paraphrases=["France has the capital"],
                           locality=[("The capital of Spain is", "Madrid")],
                           portability=[("The language of France is", "German")]),
        "zh": LanguageFact("法国的首都是", "法国", "柏林", paraphrases=["法国首都"],
                           locality=[("西班牙的首都是", "马德里")]),
    }, "t1")


def test_the_unedited_model_keeps_its_own_answers():
    wb = tiny_workbench()
    items = probes(two_language_request().validate(wb))
    assert [(p.language, p.kind) for p in items] == [
        ("en", "reliability"), ("en", "generality"), ("en", "locality"), ("en", "portability"),
        ("zh", "reliability"), ("zh", "generality"), ("zh", "locality")]
    before = unedited_answers(wb, items)
    rows = score_probes(wb, items, before)
    assert score_probes(wb, items, before, unedited=True) == rows     # decoding again gives the same answers
    for row, probe, (text, _) in zip(rows, items, before):
        if probe.kind == "locality":
            assert row["em"] == 1.0 and row["f1"] == 1.0 and row["top1"] == 1.0   # Locality and Specificity
            assert row["reference"] == text
            assert row["ns"] == token_f1(text, probe.gold, probe.language)
        if probe.kind in ("reliability", "generality"):
            # y° is the unedited answer itself: ES = 1[P(y*) > P(y°)] with y° the arg-max path
            assert row["es"] == float(row["p_new"] > row["p_old"])
            assert row["reference"] == probe.reference


# ====================================================================== tables


def synthetic_frame() -> pd.DataFrame:
    """Hand-made probe rows: two records, two languages, one method, three edit sets."""
    rows = []
    values = {  # (edit set, language) -> em of reliability, generality, locality, portability
        ("en+zh", "en"): (1, 1, 1, 0), ("en+zh", "zh"): (1, 0, 1, 0),
        ("en", "en"): (1, 1, 1, 1), ("en", "zh"): (0, 0, 1, 0),
        ("zh", "en"): (0, 0, 1, 0), ("zh", "zh"): (1, 1, 0, 0),
    }
    for (edit, lang), ems in values.items():
        for record in ("r1", "r2"):
            for kind, em in zip(("reliability", "generality", "locality", "portability"), ems):
                rows.append({"method": "memit", "edit_languages": edit, "record": record, "seconds": 2.0,
                             "language": lang, "kind": kind, "em": float(em), "f1": 0.5 if em else 0.0})
    return pd.DataFrame(rows)


def test_table2_avg_is_the_mean_of_every_f1_and_em_value():
    t = table2(synthetic_frame(), "en+zh", ["en", "zh"])
    row = t.iloc[0]
    assert row["method"] == "M-MEMIT"
    assert row["en Reliability EM"] == 100.0 and row["en Reliability F1"] == 50.0
    assert row["zh Generality EM"] == 0.0
    ems = [100, 100, 100, 0, 100, 0, 100, 0]
    f1s = [50, 50, 50, 0, 50, 0, 50, 0]
    assert row["avg"] == pytest.approx(sum(ems + f1s) / 16)
    assert row["records"] == 2 and row["s/edit"] == 2.0


def test_table1_and_transfer_matrix_by_hand():
    frame = synthetic_frame()
    t = table1(frame, ["en", "zh"]).iloc[0]
    assert t["mono en"] == pytest.approx(100.0) and t["mono zh"] == pytest.approx(50.0)
    assert t["multi en"] == pytest.approx(75.0) and t["multi zh"] == pytest.approx(50.0)
    assert t["Δ en"] == pytest.approx(-25.0) and t["Δ zh"] == pytest.approx(0.0)
    m = transfer_matrix(frame, "memit", ["en", "zh"]).set_index("edit")
    assert m.loc["en", "zh"] == pytest.approx(25.0) and m.loc["zh", "en"] == pytest.approx(25.0)
    assert m.loc["en", "x-avg"] == pytest.approx(25.0) and math.isnan(m.loc["en+zh", "x-avg"])


def test_a_record_with_two_paraphrases_weighs_as_much_as_one_with_one():
    rows = [{"method": "rome", "edit_languages": "en", "record": "a", "language": "en", "kind": "generality",
             "em": 1.0, "f1": 1.0, "seconds": 1.0},
            {"method": "rome", "edit_languages": "en", "record": "a", "language": "en", "kind": "generality",
             "em": 1.0, "f1": 1.0, "seconds": 1.0},
            {"method": "rome", "edit_languages": "en", "record": "b", "language": "en", "kind": "generality",
             "em": 0.0, "f1": 0.0, "seconds": 1.0}]
    assert table2(pd.DataFrame(rows), "en", ["en"]).iloc[0]["en Generality EM"] == pytest.approx(50.0)


# ==================================================================== runs


def tiny_config(dataset: str, **kw) -> EvalConfig:
    fields = dict(dataset=dataset, methods=["lu-lafns"], edit_sets=[["en", "de"], ["en"], ["de"]],
                  test_languages=["en", "de"], n=2, model="tiny-llama",
                  hparams={"lu-lafns": dict(layers=[0, 1, 2], beta=0.1, steps=3, lr=0.5, n_prefixes=1,
                                            prefix_length=2)})
    fields.update(kw)
    return EvalConfig(**fields)


def test_a_run_writes_every_table_resumes_and_leaves_the_model_untouched(tmp_path, monkeypatch):
    wb = tiny_workbench()
    snap = snapshot(wb.model)
    dataset = write_dataset(tmp_path)
    out = tmp_path / "run"
    seen = []
    frame = run_evaluation(wb, tiny_config(dataset), out, progress=lambda f, m: seen.append((f, m)))
    assert_bit_identical(wb.model, snap)
    assert seen[-1] == (1.0, "done") and all(0 <= f <= 1 for f, _ in seen)
    assert set(frame["method"]) == {"unedited", "lu-lafns"}
    assert set(frame[frame["method"] == "lu-lafns"]["edit_languages"]) == {"en+de", "en", "de"}
    assert frame["record"].nunique() == 2
    text = (out / "tables.md").read_text(encoding="utf-8")
    for title in ("Table 2 style", "Table 1 style", "Transfer matrix", "memla App. B", "LangEdit"):
        assert title in text
    assert (out / "probes.csv").exists()
    # the unedited model keeps its own locality answers exactly
    unedited = frame[(frame["method"] == "unedited") & (frame["kind"] == "locality")]
    assert (unedited["em"] == 1.0).all()

    # resuming computes nothing that is done; a new method adds its rows
    calls = []
    import editors.lu_lafns as lu

    original = lu.LULAFNsEditor._compute
    monkeypatch.setattr(lu.LULAFNsEditor, "_compute", lambda self, *a: calls.append(1) or original(self, *a))
    again = run_evaluation(wb, tiny_config(dataset), out)
    assert calls == [] and len(again) == len(frame)
    lines = (out / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "rows.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20], encoding="utf-8")  # cut last line
    run_evaluation(wb, tiny_config(dataset), out)
    assert len(calls) == 1                       # only the interrupted record is redone
    assert len(rows_frame(out)) == len(frame)


def test_a_run_folder_of_another_evaluation_is_refused(tmp_path):
    wb = tiny_workbench()
    dataset = write_dataset(tmp_path)
    run_evaluation(wb, tiny_config(dataset, methods=[], edit_sets=[["en"]]), tmp_path / "run")
    with pytest.raises(InputError, match="another evaluation"):
        run_evaluation(wb, tiny_config(dataset, methods=[], test_languages=["en"]), tmp_path / "run")


def test_bad_dataset_requests_are_input_errors(tmp_path):
    wb = tiny_workbench()
    dataset = write_dataset(tmp_path)
    with pytest.raises(InputError, match="no record"):
        run_evaluation(wb, tiny_config(dataset, offset=5), tmp_path / "a")
    with pytest.raises(InputError, match="Unknown editor"):
        run_evaluation(wb, tiny_config(dataset, methods=["nope"]), tmp_path / "b")
    with pytest.raises(Exception, match="zz|language"):
        run_evaluation(wb, tiny_config(dataset, test_languages=["zz"]), tmp_path / "c")


def test_probe_for_a_missing_language_is_an_input_error():
    request = two_language_request()
    with pytest.raises(InputError, match="no language 'de'"):
        probes(request, ["de"])
    assert Probe("en", "reliability", "p", "r").gold == ""


def test_run_folders_of_one_evaluation_merge_and_others_are_refused(tmp_path):
    from editors.evaluate import merge_runs

    fake_run(tmp_path / "a", "rome")
    fake_run(tmp_path / "b", "memit", em=0.0)
    frame, config = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "all")
    assert config.methods == ["rome", "memit"] and set(frame["method"]) == {"unedited", "rome", "memit"}
    t = table2(frame, "en", ["en"]).set_index("method")
    assert t.loc["M-ROME", "avg"] == 100.0 and t.loc["M-MEMIT", "avg"] == 0.0
    assert "M-MEMIT" in (tmp_path / "all" / "tables.md").read_text(encoding="utf-8")
    fake_run(tmp_path / "c", "lora-ft", dataset="other")
    with pytest.raises(InputError, match="different evaluations"):
        merge_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "x")
    with pytest.raises(InputError, match="not an evaluation run folder"):
        merge_runs([tmp_path / "nothing"], tmp_path / "y")


def test_run_folders_of_two_record_ranges_merge_into_one_run(tmp_path):
    from editors.evaluate import merge_runs

    fake_run(tmp_path / "first", "memit", record="mzsre:0")
    fake_run(tmp_path / "second", "memit", em=0.0, offset=25, record="mzsre:25")
    frame, config = merge_runs([tmp_path / "second", tmp_path / "first"], tmp_path / "all")
    assert (config.offset, config.n) == (0, 26)
    assert set(frame["record"]) == {"mzsre:0", "mzsre:25"}
    assert table2(frame, "en", ["en"]).set_index("method").loc["M-MEMIT", "avg"] == 50.0
    saved = json.loads((tmp_path / "all" / "config.json").read_text(encoding="utf-8"))
    assert (saved["offset"], saved["n"]) == (0, 26)


def test_table1_compares_only_records_edited_with_every_set():
    frame = synthetic_frame()
    extra = frame[(frame["record"] == "r1") & (frame["edit_languages"] == "en+zh")].assign(record="r3", em=0.0)
    t = table1(pd.concat([frame, extra]), ["en", "zh"]).iloc[0]
    assert t["records"] == 2 and t["multi en"] == pytest.approx(75.0)   # r3 has no monolingual edits


def test_memla_table_has_the_cross_lingual_averages_of_the_languages_outside_the_edit():
    import pandas as pd

    from editors.evaluate import EvalConfig, memla_report, memla_table

    rows = []
    for record in ("r1", "r2"):
        for lang, es, ns in (("en", 1.0, 1.0), ("zh", 0.5 if record == "r1" else 0.0, 0.25), ("de", 0.0, 0.75)):
            for kind in ("reliability", "generality", "locality"):
                rows.append({"method": "memla", "edit_languages": "en", "record": record, "language": lang,
                             "kind": kind, "es": es if kind != "locality" else None,
                             "ns": ns if kind == "locality" else None})
    frame = pd.DataFrame(rows)
    table = memla_table(frame, "en", ["en", "zh", "de"])
    row = table.iloc[0]
    assert row["method"] == "MEMLA"
    assert row["en ES"] == 100 and row["zh ES"] == 25 and row["de ES"] == 0
    assert row["x-avg ES"] == pytest.approx(12.5) and row["x-avg PS"] == pytest.approx(12.5)
    assert row["x-avg NS"] == pytest.approx(50.0)                       # (25 + 75) / 2: en is the source
    config = EvalConfig(dataset="d", methods=["memla"], edit_sets=[["en"]], test_languages=["en", "zh", "de"], n=2)
    text = memla_report(frame, config)
    assert "edited in en" in text and "x-avg ES" in text and "MKEB" in text
