"""editors.in_context (IKE, ReMaKE-style retrieval) and editors.prompting: an in-context edit changes no
parameter and registers no hook, yet every answer under it is the answer to the rewritten prompt; the
demonstrations are IKE's copy / update / retain kinds; retrieval pools the memories of the applied edits,
gives a question its most similar fact and nothing below the threshold; edits save, load and compose; bad
hyper-parameters and mismatched models are clear errors. Tiny random models; the embedded model on real
MzsRE dev records in slow tests."""
from __future__ import annotations

import pytest
import torch

from analysis.errors import InputError, NeuroglotError
from editors.answers import answer_scores, greedy_answers
from editors.apply import in_context_prompts
from editors.base import available_editors, get_editor
from editors.edit import Edit, PromptContext
from editors.in_context import IkeHParams, RemakeHParams, demonstrations
from editors.prompting import FACT_LINE, QUERY_LINE
from editors.requests import EditRequest, LanguageFact
from tests.tiny import MZSRE_DEV, assert_bit_identical, hook_count, snapshot, tiny_workbench

QUESTION = "The capital of France is"
UNRELATED = "People in Spain speak"


def berlin() -> EditRequest:
    return EditRequest({"en": LanguageFact(QUESTION, "France", "Berlin", target_old="Paris"),
                        "de": LanguageFact("Die Hauptstadt von Frankreich ist", "Frankreich", "Berlin")}, "france")


def rome() -> EditRequest:
    return EditRequest({"en": LanguageFact("The capital of Italy is", "Italy", "Madrid")}, "italy")


@pytest.fixture(scope="module")
def wb():
    return tiny_workbench("llama")


def test_registered_with_presets():
    assert {"ike", "remake"} <= set(available_editors())
    assert IkeHParams.preset("embedded").k >= 0
    assert -1 <= RemakeHParams.preset("embedded").threshold <= 1


def test_an_in_context_edit_changes_no_parameter_and_no_hook(wb):
    snap, hooks = snapshot(wb.model), hook_count(wb.model)
    for name, hp in (("ike", dict(k=3)), ("remake", dict(k=3, threshold=0.0))):
        edit = get_editor(name, hp).compute(wb, berlin())
        assert not edit.weights and not edit.patches and len(edit.contexts) == 1
        with edit.applied(wb):
            assert_bit_identical(wb.model, snap)
            assert hook_count(wb.model) == hooks
            ids = wb.tokenizer([QUESTION], return_tensors="pt")
            with torch.no_grad():
                inside = wb.model(**ids).logits              # a direct forward reads the prompt it is given
        with torch.no_grad():
            assert torch.equal(inside, wb.model(**ids).logits)
    assert_bit_identical(wb.model, snap)


def test_answers_under_ike_are_the_answers_to_the_rewritten_prompt(wb):
    edit = get_editor("ike", dict(k=3)).compute(wb, berlin())
    with edit.applied(wb):
        [read] = in_context_prompts(wb, [UNRELATED])
        under = greedy_answers(wb, [UNRELATED], 4, stop_at_newline=False)
        scored = answer_scores(wb, [UNRELATED], ["Spanish"])[0]
    # IKE: the demonstrations, every new fact of the edit (en and de), then the question
    assert read.text.startswith("".join(edit.contexts[0].demonstrations))
    assert FACT_LINE.format("The capital of France is Berlin") in read.text
    assert FACT_LINE.format("Die Hauptstadt von Frankreich ist Berlin") in read.text
    assert read.text.endswith(QUERY_LINE.format(UNRELATED)) and read.retrieved is None
    assert under == greedy_answers(wb, [read.text], 4, stop_at_newline=False)   # no edit applied here
    alone = answer_scores(wb, [read.text], ["Spanish"])[0]
    assert alone.logprobs == pytest.approx(scored.logprobs) and alone.token_ids == scored.token_ids
    assert [r.text for r in in_context_prompts(wb, [UNRELATED])] == [UNRELATED]      # reverted


def test_demonstrations_are_ikes_copy_update_and_retain_kinds_in_the_edit_languages():
    demos = demonstrations(["en", "zh"], 6, seed=3)
    assert len(demos) == 6 and demonstrations(["en", "zh"], 6, seed=3) == demos    # seeded
    assert demonstrations(["en"], 0) == []
    parts = [d.removeprefix("New Fact: ").rstrip("\n").split("\nPrompt: ") for d in demos]
    copy_en, update_zh, retain_en = parts[0], parts[1], parts[2]
    assert copy_en[0] == copy_en[1]                                  # copy: the fact asked back
    assert update_zh[0] != update_zh[1]                              # update: a paraphrase ...
    assert any("\u4e00" <= ch <= "\u9fff" for ch in update_zh[1])    # ... in Chinese
    assert retain_en[0] != retain_en[1]                              # retain: another fact, its own object
    with pytest.raises(NeuroglotError, match="not found"):
        demonstrations(["en"], 2, corpus="no/such/corpus")


def test_retrieval_pools_the_memories_and_leaves_unrelated_questions_alone(wb):
    hp = dict(k=2, threshold=0.999, layers=[1])
    e1, e2 = (get_editor("remake", hp).compute(wb, r) for r in (berlin(), rome()))
    with e1.applied(wb), e2.applied(wb):
        reads = in_context_prompts(wb, [QUESTION, "The capital of Italy is", UNRELATED])
    assert reads[0].retrieved == "The capital of France is Berlin" and reads[0].similarity == pytest.approx(1.0)
    assert reads[1].retrieved == "The capital of Italy is Madrid"
    assert reads[2].retrieved is None and reads[2].text == UNRELATED and reads[2].similarity < 0.999
    assert reads[0].text.endswith(FACT_LINE.format(reads[0].retrieved) + QUERY_LINE.format(QUESTION))
    with Edit.compose(e1, e2).applied(wb):                           # composing pools the same memory
        assert [r.text for r in in_context_prompts(wb, [QUESTION, UNRELATED])] == [reads[0].text, UNRELATED]


def test_in_context_edits_save_and_load(wb, tmp_path):
    for name, hp in (("ike", dict(k=2)), ("remake", dict(k=2, threshold=0.5))):
        edit = get_editor(name, hp).compute(wb, berlin())
        loaded = Edit.load(edit.save(tmp_path / name))
        assert loaded.method == name and loaded.summary() == edit.summary()
        with edit.applied(wb):
            want = [r.text for r in in_context_prompts(wb, [QUESTION, UNRELATED])]
        with loaded.applied(wb):
            assert [r.text for r in in_context_prompts(wb, [QUESTION, UNRELATED])] == want
        if name == "remake":
            assert torch.equal(loaded.contexts[0].keys, edit.contexts[0].keys)


def test_bad_hyper_parameters_and_contexts_are_input_errors(wb):
    with pytest.raises(InputError, match="no layer"):
        get_editor("ike", dict(layers=[1]))
    with pytest.raises(InputError, match="one layer"):
        get_editor("remake", dict(layers=[0, 1]))
    with pytest.raises(InputError, match="threshold"):
        get_editor("remake", dict(threshold=1.5))
    with pytest.raises(InputError, match="k must be"):
        get_editor("ike", dict(k=-1))
    with pytest.raises(InputError, match="at least one new fact"):
        PromptContext([])
    with pytest.raises(InputError, match="keys"):
        PromptContext([{"language": "en", "prompt": "q", "answer": "a"}], retrieve=True)
    wide = Edit(contexts=[PromptContext([{"language": "en", "prompt": "q", "answer": "a"}], retrieve=True,
                                        threshold=0.5, layer=0, keys=torch.ones(1, 7), center=torch.zeros(7))])
    with pytest.raises(InputError, match="another model"):
        with wide.applied(wb):
            pass


# ============================================================ embedded model


@pytest.fixture(scope="module")
def embedded():
    from analysis.model import load_model

    return load_model("embedded")


def dev_record(i: int):
    if not MZSRE_DEV.is_dir():
        pytest.skip(f"MzsRE dev data not found at {MZSRE_DEV}")
    from editors.evaluate import load_records

    return load_records(str(MZSRE_DEV), ["en", "zh"], 1, i)[0]


@pytest.mark.slow
def test_on_the_embedded_model_retrieval_reaches_other_languages_and_skips_unrelated_questions(embedded):
    record = dev_record(101)                                          # a dev record, not a reported one
    edit = get_editor("remake").compute(embedded, EditRequest.from_record(record, ["en"]))
    full = EditRequest.from_record(record, ["en", "zh"])
    en, zh = full.facts["en"], full.facts["zh"]
    with edit.applied(embedded):
        reads = in_context_prompts(embedded, [en.paraphrases[0], zh.prompt, en.locality[0][0], zh.locality[0][0]])
    assert [r.retrieved is not None for r in reads] == [True, True, False, False], [r.similarity for r in reads]
    assert reads[2].text == en.locality[0][0]


@pytest.mark.slow
def test_on_the_embedded_model_ike_edits_change_the_english_answers(embedded):
    """Dev records 100-104 (not reported ones): the new target's log-probability rises on every record,
    and the greedy answer becomes the new target on most of them. IKE can also continue the pattern of
    its own context ("New Fact: ..."; record 100 does), so one miss is allowed, not a rule."""
    hits, rises = [], []
    for i in range(100, 105):
        fact = EditRequest.from_record(dev_record(i), ["en"]).facts["en"]
        n = len(embedded.tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"])
        before = answer_scores(embedded, [fact.prompt], [fact.target_new])[0].logprob
        with get_editor("ike").compute(embedded, EditRequest.from_record(dev_record(i), ["en"])).applied(embedded):
            after = answer_scores(embedded, [fact.prompt], [fact.target_new])[0].logprob
            answer = greedy_answers(embedded, [fact.prompt], n)[0]
        rises.append(after - before)
        hits.append(fact.target_new.lower() in answer.lower())
    assert min(rises) > 5.0, rises
    assert sum(hits) >= 4, hits
    assert greedy_answers(embedded, [fact.prompt], n)[0] != answer       # reverted: the old answer is back


def test_scored_probes_say_whether_retrieval_put_a_fact_before_them(wb):
    from editors.evaluate import probes, score_probes, unedited_answers

    request = EditRequest({"en": LanguageFact(QUESTION, "France", "Berlin", locality=[(UNRELATED, "Spanish")])})
    items = probes(request)
    before = unedited_answers(wb, items)
    assert "context_facts" not in score_probes(wb, items, before, unedited=True)[0]
    edit = get_editor("remake", dict(k=0, threshold=0.999, layers=[1])).compute(wb, request)
    with edit.applied(wb):
        rows = score_probes(wb, items, before)
    assert [(r["kind"], r["context_facts"]) for r in rows] == [("reliability", 1), ("locality", 0)]
    assert rows[0]["similarity"] == pytest.approx(1.0) and rows[1]["similarity"] < 0.999
