"""analysis.causal_trace: the batched trace against the ROME-style per-cell reference on every
tiny family, identities, determinism, subject location with three tokenizer styles, the
ROME token categories, serialisation and run folders; one trace of the embedded model (slow)."""
from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import causal_trace as ct
from analysis.causal_trace import (
    CATEGORIES,
    KINDS,
    TraceResult,
    average_effects,
    average_scores,
    category_facts,
    causal_trace,
    load_traces,
    save_traces,
    trace_facts,
    trace_run,
)
from analysis.errors import InputError, NeuroglotError
from analysis.model import Workbench, is_embedded_cached
from analysis.reference import causal_trace_per_cell
from analysis.trace_setup import embedding_noise_std, locate_subject, subject_noise
from analysis.tokens import answer_ids
from data.corpus import Corpus, prompt_from_template
from tests.tiny import TINY_FAMILIES, tiny_corpus, tiny_model_and_tokenizer

# subject in the middle: "<bos> The capital of France is" -> tokens before "France" are skipped
PROMPT, SUBJECT, ANSWER = "The capital of France is", "France", "Paris"
LONG_PROMPT, LONG_SUBJECT = "People in Albert Einstein speak", "Albert Einstein"


@functools.lru_cache(maxsize=None)
def tiny_wb(family: str = "llama") -> Workbench:
    model, tok = tiny_model_and_tokenizer(family)
    return Workbench.from_loaded(model, tok, spec=f"tiny-{family}", name=f"tiny-{family}")


def max_diff(a: TraceResult, b: TraceResult) -> float:
    return max(float(np.abs(a.scores[k] - b.scores[k]).max()) for k in a.scores)


# ------------------------------------------------------------- batched == reference


def assert_same_scores(fast: TraceResult, ref: TraceResult) -> None:
    """Within 1e-5 absolute (the brief) and 1e-4 relative: tiny random models give small probabilities."""
    assert fast.tokens == ref.tokens and fast.subject_range == ref.subject_range
    assert fast.answer_id == ref.answer_id and fast.answer == ref.answer
    assert fast.p_clean == pytest.approx(ref.p_clean, rel=1e-4, abs=1e-6)
    assert fast.p_corrupted == pytest.approx(ref.p_corrupted, rel=1e-4, abs=1e-6)
    assert set(fast.scores) == set(ref.scores)
    assert max_diff(fast, ref) < 1e-5
    for kind in fast.scores:
        np.testing.assert_allclose(fast.scores[kind], ref.scores[kind], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_equals_per_cell(family):
    wb = tiny_wb(family)
    # window 2 on 3 layers gives three different windows; max_rows 5 splits every token's group
    kw = dict(prompt=LONG_PROMPT, subject=LONG_SUBJECT, samples=3, window=2, max_rows=5)
    fast, ref = causal_trace(wb, **kw), causal_trace_per_cell(wb, **kw)
    start, end = fast.subject_range
    assert start >= 2 and end < len(fast.tokens)  # tokens before and after the subject
    for kind in KINDS:
        assert fast.scores[kind].shape == (len(fast.tokens), wb.n_layers)
    assert_same_scores(fast, ref)
    assert max(np.ptp(fast.scores[kind]) for kind in KINDS) > 1e-3  # restorations do change P(answer)


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "bloom"])
def test_batched_equals_per_cell_given_answer_default_window(family):
    """A given answer; the default window covers all 3 layers (one restoration per token and kind)."""
    wb = tiny_wb(family)
    kw = dict(prompt=PROMPT, subject=SUBJECT, answer=ANSWER, samples=2, max_rows=4)
    fast, ref = causal_trace(wb, **kw), causal_trace_per_cell(wb, **kw)
    assert fast.answer_id == answer_ids(wb.tokenizer, PROMPT, ANSWER)[0]
    assert_same_scores(fast, ref)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("prompt, subject, bos", [
    ("France is the home of", "France", False),          # subject at token 0: no prefix cache at all
    ("The capital city of France", "France", True),      # subject ends at the last token
])
def test_batched_equals_per_cell_at_the_edges(family, prompt, subject, bos):
    from tokenizers import processors

    model, tok = tiny_model_and_tokenizer(family)
    if not bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    wb = Workbench.from_loaded(model, tok)
    kw = dict(prompt=prompt, subject=subject, samples=2, window=2, max_rows=7)
    fast, ref = causal_trace(wb, **kw), causal_trace_per_cell(wb, **kw)
    start, end = fast.subject_range
    assert (start == 0) == (not bos) and (end == len(fast.tokens)) == bos
    assert_same_scores(fast, ref)


# ------------------------------------------------------------------ identities


def test_p_clean_is_the_plain_forward_probability_and_identities_hold():
    wb = tiny_wb("llama")
    result = causal_trace(wb, LONG_PROMPT, LONG_SUBJECT, samples=3, window=2)
    ids = wb.tokenizer(LONG_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(wb.model(input_ids=ids).logits[0, -1], dim=-1)
    assert result.answer_id == int(probs.argmax())  # answer=None: the model's greedy prediction
    assert result.p_clean == pytest.approx(float(probs[result.answer_id]), abs=1e-6)
    T, L = len(result.tokens), wb.n_layers
    start, _ = result.subject_range
    # the last layer's hidden state at the last token is what the LM head reads: p_clean
    assert result.scores["hidden"][T - 1, L - 1] == pytest.approx(result.p_clean, abs=1e-6)
    # tokens before the subject never see the noise; a last-layer state elsewhere never reaches the last token
    for kind in KINDS:
        assert np.all(result.scores[kind][:start] == result.p_corrupted)
    assert np.all(result.scores["hidden"][: T - 1, L - 1] == result.p_corrupted)
    assert np.all(result.indirect_effect("hidden")[:start] == 0.0)


def test_zero_noise_restores_nothing():
    wb = tiny_wb("qwen2")
    result = causal_trace(wb, PROMPT, SUBJECT, samples=2, sigma=0.0)
    assert result.p_corrupted == pytest.approx(result.p_clean, abs=1e-6)
    for kind in KINDS:
        assert np.allclose(result.scores[kind], result.p_clean, atol=1e-6)


def test_seed_determinism_and_noise_draws():
    wb = tiny_wb("gpt2")
    a = causal_trace(wb, PROMPT, SUBJECT, samples=3, seed=5)
    b = causal_trace(wb, PROMPT, SUBJECT, samples=3, seed=5)
    c = causal_trace(wb, PROMPT, SUBJECT, samples=3, seed=6)
    for kind in KINDS:
        assert np.array_equal(a.scores[kind], b.scores[kind])
    assert a.p_corrupted == b.p_corrupted != c.p_corrupted
    assert max_diff(a, c) > 1e-6
    noise = subject_noise(3, 2, 4, 2.0, seed=5)
    assert noise.shape == (3, 2, 4) and torch.equal(noise, subject_noise(3, 2, 4, 2.0, seed=5))
    assert not torch.equal(noise[0], noise[1])  # every sample has its own draw


def test_sigma_is_noise_times_embedding_std_and_std_is_cached():
    wb = tiny_wb("gemma")  # gemma scales the embedding by sqrt(d_model) inside the module
    module = wb.arch.embedding(wb.model)
    with torch.no_grad():
        out = module(torch.arange(module.weight.shape[0]).unsqueeze(0))
    std = embedding_noise_std(wb, chunk=100)
    assert std == pytest.approx(float(out.double().std()), rel=1e-9)
    assert std == pytest.approx(float(module.weight.detach().double().std()) * wb.d_model ** 0.5, rel=1e-5)
    assert embedding_noise_std(wb) == std  # cached
    result = causal_trace(wb, PROMPT, SUBJECT, kinds="hidden", samples=1, noise=2.0)
    assert result.meta["sigma"] == pytest.approx(2.0 * std)
    model, tok = tiny_model_and_tokenizer("gemma")
    other = Workbench.from_loaded(model, tok)
    with torch.no_grad():
        other.arch.embedding(other.model).weight.mul_(2.0)  # in place: the cache notices
    assert embedding_noise_std(other) == pytest.approx(2 * std, rel=1e-6)
    assert causal_trace(wb, PROMPT, SUBJECT, kinds="hidden", samples=1, sigma=0.5).meta["sigma"] == 0.5


def test_progress_and_kinds_subset():
    wb = tiny_wb("bloom")
    calls = []
    result = causal_trace(wb, PROMPT, SUBJECT, kinds=("mlp",), samples=2, window=2, max_rows=3,
                          progress=lambda frac, message: calls.append((frac, message)))
    assert list(result.scores) == ["mlp"]
    fracs = [f for f, _ in calls]
    assert fracs == sorted(fracs) and fracs[-1] == pytest.approx(1.0) and len(calls) > 3
    assert all(isinstance(m, str) and m for _, m in calls)


@pytest.mark.parametrize("bad, match", [
    (dict(kinds=("mlp", "neuron")), "Unknown kind"),
    (dict(kinds=()), "Unknown kind"),
    (dict(samples=0), "samples"),
    (dict(window=0), "window"),
    (dict(max_rows=0), "max_rows"),
    (dict(noise=-1.0), "noise"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(subject="Berlin"), "does not occur in the prompt"),
    (dict(subject=""), "subject is empty"),
    (dict(answer=" "), "answer"),
])
def test_bad_input_is_an_input_error(bad, match):
    kw = dict(prompt=PROMPT, subject=SUBJECT, samples=1)
    kw.update(bad)
    with pytest.raises(InputError, match=match):
        causal_trace(tiny_wb("llama"), **kw)


# ------------------------------------------------------------ subject location

EN = ("The Eiffel Tower is located in", "Eiffel Tower")
ZH = ("埃菲尔铁塔位于", "埃菲尔铁塔")


@functools.lru_cache(maxsize=1)
def metaspace_tokenizer():
    """A Llama/SentencePiece-style tokenizer: "▁" word prefix (Metaspace), BPE, <s> prepended."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(tiny_corpus() + [EN[0], ZH[0], "铁塔很高。", "埃及位于非洲。"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")


@functools.lru_cache(maxsize=1)
def gemma_tokenizer():
    from transformers import AutoTokenizer

    from analysis.model import embedded_checkpoint

    return AutoTokenizer.from_pretrained(str(embedded_checkpoint()))


_GEMMA_MARKS = () if is_embedded_cached() else (pytest.mark.slow,)  # converting the model is slow


@pytest.mark.parametrize("make", [
    pytest.param(lambda: tiny_wb("gpt2").tokenizer, id="byte-level-bpe"),
    pytest.param(metaspace_tokenizer, id="metaspace"),
    pytest.param(gemma_tokenizer, id="gemma", marks=_GEMMA_MARKS),
])
@pytest.mark.parametrize("prompt, subject", [EN, ZH], ids=["en", "zh"])
def test_subject_location(make, prompt, subject):
    tok = make()
    ids, (start, end) = locate_subject(tok, prompt, subject)
    ids = ids[0].tolist()
    assert 0 <= start < end <= len(ids)
    assert subject in tok.decode(ids[start:end])
    assert tok.unk_token_id not in ids[start:end]
    offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    s, e = prompt.rindex(subject), prompt.rindex(subject) + len(subject)
    for i, (a, b) in enumerate(offsets):
        if not start <= i < end:
            assert b <= s or a >= e or a == b, (i, tok.convert_ids_to_tokens(ids[i]))
    with pytest.raises(InputError, match="does not occur in the prompt"):
        locate_subject(tok, prompt, "Colosseum")


def test_subject_range_on_a_chinese_prompt_traces():
    wb = tiny_wb("llama")
    result = causal_trace(wb, "法国的首都是", "法国", answer="巴黎", samples=2)
    start, end = result.subject_range
    assert "法国" in "".join(result.tokens[start:end])
    assert result.meta["subject"] == "法国"


# ------------------------------------------------------------------ averages


def hand_result(T: int, subject: tuple[int, int], L: int = 2, p_corrupted: float = 0.1, **meta) -> TraceResult:
    """scores[t, l] = p_corrupted + t + 10 l: the effect of token t in layer l is t + 10 l."""
    table = p_corrupted + np.arange(T)[:, None] + 10.0 * np.arange(L)[None, :]
    return TraceResult([f"t{i}" for i in range(T)], subject, "x", 7, 0.9, p_corrupted,
                       {"hidden": table, "mlp": table * 0}, dict(meta))


def test_average_effects_categories():
    a = hand_result(9, (2, 6))  # first 2, middle 3-4, last 5, first after 6, further 7, last 8
    b = hand_result(4, (2, 4), p_corrupted=0.3)  # the subject ends at the last token: 2 | - | 3 | - | - | 3
    c = hand_result(3, (1, 2))  # one-token subject: first = last = 1, first after = last = 2
    frame = average_effects([a, b, c], "hidden")
    assert list(frame.index) == list(CATEGORIES) and list(frame.columns) == [0, 1]
    expect = {
        "First subject token": np.mean([2, 2, 1]),
        "Middle subject tokens": 3.5,           # a only, mean of 3 and 4 first
        "Last subject token": np.mean([5, 3, 1]),
        "First subsequent token": np.mean([6, 2]),
        "Further tokens": 7.0,
        "Last token": np.mean([8, 3, 2]),
    }
    for category, value in expect.items():
        assert frame.loc[category, 0] == pytest.approx(value)
        assert frame.loc[category, 1] == pytest.approx(value + 10)
    facts = {"First subject token": 3, "Middle subject tokens": 1, "Last subject token": 3,
             "First subsequent token": 2, "Further tokens": 1, "Last token": 3}
    assert frame.attrs["facts"] == facts
    assert category_facts([a, b, c]).to_dict() == facts
    scores = average_scores([a, b], "hidden")
    assert scores.loc["Last token", 0] == pytest.approx(np.mean([8 + 0.1, 3 + 0.3]))
    only_b = average_effects([b], "hidden")
    assert only_b.loc["Middle subject tokens"].isna().all() and only_b.attrs["facts"]["Further tokens"] == 0
    assert np.allclose(average_effects([a], "mlp").to_numpy()[~np.isnan(average_effects([a], "mlp").to_numpy())],
                       -0.1)
    with pytest.raises(InputError):
        average_effects([], "hidden")
    with pytest.raises(InputError, match="attn"):
        average_effects([a], "attn")
    with pytest.raises(InputError, match="layer"):
        average_effects([a, hand_result(5, (1, 3), L=3)], "hidden")


def test_average_effects_of_real_traces():
    wb = tiny_wb("gpt_neox")
    results = [causal_trace(wb, p, s, samples=2, kinds=("hidden", "attn"))
               for p, s in [(PROMPT, SUBJECT), (LONG_PROMPT, LONG_SUBJECT), ("法国的首都是", "法国")]]
    frame = average_effects(results, "attn")
    assert frame.shape == (len(CATEGORIES), wb.n_layers)
    manual = np.mean([r.indirect_effect("attn")[-1] for r in results], axis=0)
    assert np.allclose(frame.loc["Last token"].to_numpy(), manual)


# ------------------------------------------------------------ serialisation


def test_to_dict_from_dict_round_trip_is_exact():
    result = causal_trace(tiny_wb("xglm"), PROMPT, SUBJECT, samples=2, language="en")
    data = json.loads(json.dumps(result.to_dict()))
    back = TraceResult.from_dict(data)
    assert back.tokens == result.tokens and back.subject_range == result.subject_range
    assert (back.answer, back.answer_id, back.p_clean, back.p_corrupted) == \
        (result.answer, result.answer_id, result.p_clean, result.p_corrupted)
    for kind in KINDS:
        assert np.array_equal(back.scores[kind], result.scores[kind])
    assert back.meta == result.meta and back.meta["language"] == "en"
    assert result.meta["samples"] == 2 and result.meta["model"] == "tiny-xglm"


def test_save_and_load_round_trip(tmp_path):
    a, b = hand_result(9, (2, 6), fact_id="f1"), hand_result(4, (2, 4), fact_id="f2")
    traces = ct.FactTraces({"en": [a, b], "zh": [b]}, skipped=[{"fact_id": "f3", "reason": "no subject"}])
    save_traces(tmp_path / "run", traces, {"request": {"key": "abc"}})
    back = load_traces(tmp_path / "run")
    assert list(back) == ["en", "zh"] and len(back["en"]) == 2
    assert np.array_equal(back["en"][0].scores["hidden"], a.scores["hidden"])
    assert back["zh"][0].meta == {"fact_id": "f2"} and back["zh"][0].subject_range == (2, 4)
    assert back.skipped == traces.skipped and back.meta["request"] == {"key": "abc"}
    assert back.meta["facts"] == {"en": 2, "zh": 1}
    (tmp_path / "run" / "scores.npz").write_bytes(b"broken")
    with pytest.raises(NeuroglotError, match="damaged"):
        load_traces(tmp_path / "run")
    with pytest.raises(NeuroglotError, match="not a causal-tracing run folder"):
        load_traces(tmp_path / "nothing")


# ------------------------------------------------------------------ corpora

_FACTS = {"en": [("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo")],
          "zh": [("法国", "巴黎"), ("德国", "柏林"), ("日本", "东京")]}
_TEMPLATES = {"en": ["Answer: [Y] is the capital of [X].", "The capital of [X] is [Y]."], "zh": ["[X]的首都是[Y]。"]}


def small_corpus(broken_zh: int | None = None) -> Corpus:
    """3 facts in en and zh; the first en template has [Y] before [X] (its prompt lacks the subject).
    ``broken_zh``: that fact's Chinese template also puts [Y] first, so no zh prompt holds the subject."""
    rows = []
    for lang, facts in _FACTS.items():
        for i, (subject, obj) in enumerate(facts):
            templates = ["答案[Y]是[X]的首都。"] if lang == "zh" and i == broken_zh else _TEMPLATES[lang]
            for j, template in enumerate(templates):
                rows.append(dict(fact_id=f"P36:{i}", relation="P36", language=lang, subject=subject, object=obj,
                                 prompt=prompt_from_template(template, subject),
                                 template_id=f"P36.{lang}.{j}", template=template))
    return Corpus(pd.DataFrame(rows), name="small")


def test_trace_facts_picks_usable_prompts_and_skips():
    wb = tiny_wb("llama")
    traces = trace_facts(wb, small_corpus(broken_zh=1), ["en", "zh"], max_facts=5, kinds=("hidden",), samples=2)
    assert list(traces) == ["en", "zh"]
    assert len(traces["en"]) == len(traces["zh"]) == 2  # fact 1 has no usable zh prompt
    assert [s["fact_id"] for s in traces.skipped] == ["P36:1"] and "subject" in traces.skipped[0]["reason"]
    assert [r.meta["fact_id"] for r in traces["en"]] == [r.meta["fact_id"] for r in traces["zh"]]
    for lang, results in traces.items():
        for r in results:
            assert r.meta["language"] == lang and r.meta["relation"] == "P36"
            assert r.meta["subject"] in r.meta["prompt"]
            assert r.answer_id == answer_ids(wb.tokenizer, r.meta["prompt"], r.meta["object"])[0]
    assert traces["en"][0].meta["template_id"] == "P36.en.1"  # the first template lacks the subject
    one = trace_facts(wb, small_corpus(), ["en", "zh"], max_facts=1, kinds=("hidden",), samples=2, answer="model")
    assert len(one["en"]) == 1 and not one.skipped
    r = one["en"][0]
    assert r.p_clean == pytest.approx(causal_trace(wb, r.meta["prompt"], r.meta["subject"], kinds="hidden",
                                                   samples=2).p_clean)
    with pytest.raises(InputError, match="answer"):
        trace_facts(wb, small_corpus(), ["en"], answer="gold")


def test_trace_run_reuses_and_recomputes(tmp_path):
    wb = tiny_wb("gpt2")
    corpus = small_corpus()
    kw = dict(max_facts=2, kinds=("hidden", "mlp"), samples=2, folder=tmp_path / "run")
    first, folder, reused = trace_run(wb, corpus, ["en", "zh"], **kw)
    assert not reused and (folder / "manifest.json").is_file() and (folder / "scores.npz").is_file()
    again, _, reused = trace_run(wb, corpus, ["en", "zh"], **kw)
    assert reused
    assert np.array_equal(again["zh"][1].scores["mlp"], first["zh"][1].scores["mlp"])
    assert again.meta["request"] == first.meta["request"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["request"]["samples"] == 2 and manifest["request"]["version"] == ct.CAUSAL_TRACE_VERSION
    changed, _, reused = trace_run(wb, corpus, ["en", "zh"], **dict(kw, samples=3), overwrite=True)
    assert not reused and changed["en"][0].meta["samples"] == 3
    assert json.loads((folder / "manifest.json").read_text())["request"]["samples"] == 3
    _, _, reused = trace_run(wb, corpus, ["en"], **dict(kw, samples=3), overwrite=True)
    assert not reused  # other languages
    (folder / "manifest.json").write_text("{not json")
    _, _, reused = trace_run(wb, corpus, ["en"], **dict(kw, samples=3))
    assert not reused  # damaged: recomputed


# -------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def embedded():
    from analysis.model import load_model

    return load_model("embedded")


@pytest.mark.slow
def test_embedded_trace(embedded):
    wb = embedded
    result = causal_trace(wb, "The Eiffel Tower is located in the city of", "Eiffel Tower", samples=3)
    T, L = len(result.tokens), wb.n_layers
    start, end = result.subject_range
    assert "Eiffel Tower" in "".join(result.tokens[start:end])
    for kind in KINDS:
        assert result.scores[kind].shape == (T, L)
        assert np.all((result.scores[kind] >= 0) & (result.scores[kind] <= 1))
    assert result.p_clean > result.p_corrupted
    t, _ = np.unravel_index(int(np.argmax(result.scores["hidden"])), (T, L))
    assert start <= t < end or t == T - 1
