"""analysis.attribution: integrated gradients (papers/memla.md Eq. 1-2) against an independent
hand-written IG loop and captum run layer by layer, IG completeness, the knowledge-neuron sets
(Eq. 3-4), run folders and bad input.

The hand computation uses no captum and nothing of analysis.attribution: raw hooks replace
the neurons of one layer at the last prompt token of a full forward, and the gradient of
the answer's probability is summed over α = k/m (Dai et al.'s Riemann sum).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import attribution
from analysis.attribution import (
    INDEPENDENT,
    AttributionRun,
    attribute_prompts,
    attribution_run,
    fact_knowledge_neurons,
    fact_prompts,
    language_independent_neurons,
    language_specific_neurons,
    neuron_attributions,
    prompt_knowledge_neurons,
)
from analysis.errors import InputError, NeuroglotError
from analysis.model import Workbench
from analysis.reference import neuron_attributions_reference
from analysis.tokens import answer_ids
from tests.tiny import TINY_FAMILIES, make_corpus, tiny_model_and_tokenizer

PROMPT, ANSWER = "The capital of France is", "Paris city"


@lru_cache(maxsize=None)
def tiny_wb(family: str) -> Workbench:
    model, tokenizer = tiny_model_and_tokenizer(family)
    return Workbench.from_loaded(model, tokenizer, spec=f"tiny-{family}")


def hand_probability(wb, prompt, answer, layer=None, values=None, mean=False):
    """P(answer | prompt) from a plain full forward; layer's neurons at the last prompt token set to values."""
    ids = wb.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    tgt = torch.tensor(answer_ids(wb.tokenizer, prompt, answer))
    tgt = tgt if mean else tgt[:1]
    full = torch.cat([ids, tgt[:-1]]).unsqueeze(0)
    last = len(ids) - 1
    rows = 1 if values is None else values.shape[0]
    handle = None
    if layer is not None:
        def put(module, args, output):
            output = output.clone()
            output[:, last] = values
            return output
        handle = wb.arch.site(wb.model, layer, "neuron").register_forward_hook(put)
    try:
        logits = wb.model(input_ids=full.expand(rows, -1)).logits
    finally:
        if handle is not None:
            handle.remove()
    probs = torch.softmax(logits[:, last:last + len(tgt)].float(), dim=-1)
    return probs.gather(-1, tgt.expand(rows, -1).unsqueeze(-1)).squeeze(-1).mean(1)


def hand_ig(wb, prompt, answer, layer, steps, mean=False):
    """Riemann-right IG of one layer, α = k/m, k = 1..m, by plain autograd."""
    ids = wb.tokenizer(prompt, return_tensors="pt")["input_ids"]
    got = {}
    handle = wb.arch.site(wb.model, layer, "neuron").register_forward_hook(
        lambda m, a, o: got.__setitem__("w", o[0, ids.shape[1] - 1].detach()))
    with torch.no_grad():
        wb.model(input_ids=ids)
    handle.remove()
    w = got["w"]
    alphas = torch.arange(1, steps + 1, dtype=w.dtype) / steps
    x = (alphas[:, None] * w[None]).requires_grad_(True)
    p = hand_probability(wb, prompt, answer, layer, x, mean)
    (grad,) = torch.autograd.grad(p.sum(), x)
    return (w * grad.mean(0)).numpy()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_ig_equals_hand_loop_and_captum_layer_by_layer(family):
    wb = tiny_wb(family)
    for mode in ("first", "mean"):
        # max_rows=10 with 4 steps: two layers per forward, so the chunking is exercised too
        ours = neuron_attributions(wb, PROMPT, ANSWER, steps=4, target_tokens=mode, max_rows=10)
        reference = neuron_attributions_reference(wb, PROMPT, ANSWER, steps=4, target_tokens=mode)
        hand = np.stack([hand_ig(wb, PROMPT, ANSWER, layer, 4, mode == "mean") for layer in range(wb.n_layers)])
        scale = np.abs(hand).max()
        assert scale > 0
        np.testing.assert_allclose(ours.scores, hand, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(reference, hand, rtol=0, atol=1e-4 * scale)
        assert ours.prob == pytest.approx(float(hand_probability(wb, PROMPT, ANSWER, mean=mode == "mean").detach()), rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "gpt_neox"])
def test_completeness_sum_equals_f_input_minus_f_baseline(family):
    wb = tiny_wb(family)
    for method, steps, tol in (("gausslegendre", 30, 1e-4), ("riemann_right", 200, 2e-2)):
        res = neuron_attributions(wb, PROMPT, ANSWER, steps=steps, method=method)
        for i, layer in enumerate(res.layers):
            zero = hand_probability(wb, PROMPT, ANSWER, layer, torch.zeros(1, wb.n_neurons)).detach()
            assert res.baseline_probs[i] == pytest.approx(float(zero), rel=1e-4)
            total = res.scores[i].sum()
            expected = res.prob - float(zero)
            assert abs(expected) > 1e-7
            assert abs(total - expected) <= tol * abs(expected) + 1e-9, (method, layer, total, expected)
        assert np.abs(res.completeness_gap).max() <= tol * np.abs(res.prob - res.baseline_probs).max() + 1e-9


def test_layer_subset_matches_the_full_run_and_activations_are_the_clean_ones():
    wb = tiny_wb("qwen2")
    full = neuron_attributions(wb, PROMPT, ANSWER, steps=5)
    part = neuron_attributions(wb, PROMPT, ANSWER, steps=5, layers=[2, 0])
    assert part.layers == [0, 2]
    np.testing.assert_allclose(part.scores, full.scores[[0, 2]], atol=1e-9)
    ids = wb.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    seen = {}
    h = wb.arch.site(wb.model, 1, "neuron").register_forward_hook(lambda m, a, o: seen.__setitem__("o", o))
    with torch.no_grad():
        wb.model(input_ids=ids)
    h.remove()
    np.testing.assert_allclose(full.activations[1], seen["o"][0, -1].numpy(), atol=1e-6)


def test_one_token_prompt_needs_no_cache():
    wb = tiny_wb("llama")
    prompt = "Paris"
    assert len(wb.tokenizer(prompt)["input_ids"]) >= 1
    res = neuron_attributions(wb, prompt, "France", steps=3)
    ref = neuron_attributions_reference(wb, prompt, "France", steps=3)
    np.testing.assert_allclose(res.scores, ref, atol=1e-4 * np.abs(ref).max())


# ---------------------------------------------------------------- sets


def test_prompt_threshold_and_fact_share():
    scores = np.array([[0.1, 1.0, 0.19], [0.2, -3.0, 0.5]])
    assert prompt_knowledge_neurons(scores, 0.2).tolist() == [[False, True, False], [True, False, True]]
    assert prompt_knowledge_neurons(-np.abs(scores), 0.2).sum() == 0   # no positive attribution: no neuron
    a, b, c = (np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool), np.array([1, 0, 0, 1], bool))
    assert fact_knowledge_neurons([a, b, c], 0.5).tolist() == [True, False, False, False]  # ≥ 2 of 3
    assert fact_knowledge_neurons([a, b, c], 0.3).tolist() == [True, True, True, True]    # ≥ 1 of 3
    assert fact_knowledge_neurons([a, b], 0.5).tolist() == [True, True, True, False]      # ≥ 1 of 2
    assert fact_knowledge_neurons([a, b, c], 1.0).tolist() == [True, False, False, False]


@pytest.mark.parametrize("seed", range(4))
def test_eq3_eq4_set_laws(seed):
    rng = np.random.default_rng(seed)
    sets = {lang: rng.random((3, 50)) < 0.4 for lang in ("en", "zh", "de")}
    shared = language_independent_neurons(sets)
    specific = language_specific_neurons(sets)
    assert np.array_equal(shared, sets["en"] & sets["zh"] & sets["de"])
    for lang, s in sets.items():
        assert not (specific[lang] & shared).any()
        assert np.array_equal(specific[lang] | shared, s)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "x", None, float("nan")])
def test_fractions_outside_unit_interval_are_input_errors(bad):
    with pytest.raises(InputError):
        prompt_knowledge_neurons(np.ones((2, 2)), bad)
    with pytest.raises(InputError):
        fact_knowledge_neurons([np.ones(3, bool)], bad)


# ---------------------------------------------------------------- many facts


CORPUS = make_corpus(languages=("en", "zh", "de"), n_facts=3)


def test_fact_prompts_round_robin_and_deterministic():
    table = fact_prompts(CORPUS, ["en", "zh"], max_facts=3)
    facts = list(pd.unique(table["fact_id"]))
    assert facts == ["P36:0", "P37:0", "P36:1"]              # alternating relations, sorted facts
    assert set(table["language"]) == {"en", "zh"}
    assert table.equals(fact_prompts(CORPUS, ["en", "zh"], max_facts=3))
    one = fact_prompts(CORPUS, ["en", "zh"], fact_ids=["P37:2"], prompts_per_fact=1)
    assert len(one) == 2 and set(one["fact_id"]) == {"P37:2"}
    with pytest.raises(InputError, match="not in the corpus"):
        fact_prompts(CORPUS, ["en"], fact_ids=["P99:0"])
    with pytest.raises(InputError):
        fact_prompts(CORPUS, ["en"], max_facts=0)


@pytest.fixture(scope="module")
def small_run() -> AttributionRun:
    wb = tiny_wb("gpt2")
    return attribute_prompts(wb, fact_prompts(CORPUS, ["en", "zh"], max_facts=2), steps=3)


def test_run_tables_agree_with_the_sets(small_run):
    run = small_run
    assert run.scores.shape == (len(run.prompts), 3, 80)
    counts = run.set_counts(threshold=0.2, share=0.5)
    per_layer = run.per_layer(threshold=0.2, share=0.5)
    assert list(counts["fact_id"]) == run.fact_ids
    for lang in ("en", "zh"):
        assert per_layer[lang].sum() == counts[f"N_{lang}"].sum()
        assert per_layer[f"specific {lang}"].sum() == counts[f"S_{lang}"].sum()
        assert (counts[f"N_{lang}"] == counts[f"S_{lang}"] + counts[INDEPENDENT]).all()
    assert per_layer[INDEPENDENT].sum() == counts[INDEPENDENT].sum()
    fact = run.fact_ids[0]
    sets = run.fact_sets(fact)
    top = run.top_neurons(fact, k=1000)
    union = sets["en"] | sets["zh"]
    assert len(top) == union.sum()
    assert top["attr_max"].is_monotonic_decreasing
    for row in top.itertuples():
        assert union[row.layer, row.neuron]
        assert (row.set == INDEPENDENT) == bool(sets["en"][row.layer, row.neuron] & sets["zh"][row.layer, row.neuron])


def test_save_load_round_trip(tmp_path, small_run):
    small_run.save(tmp_path / "run")
    back = AttributionRun.load(tmp_path / "run")
    assert np.array_equal(back.scores, small_run.scores)
    pd.testing.assert_frame_equal(back.prompts, small_run.prompts)
    assert back.layers == small_run.layers and back.meta == small_run.meta
    with pytest.raises(NeuroglotError):
        AttributionRun.load(tmp_path / "nowhere")


def test_attribution_run_reuses_recomputes_and_repairs(tmp_path, monkeypatch):
    wb = tiny_wb("llama")
    prompts = fact_prompts(CORPUS, ["en", "de"], max_facts=1)
    folder = tmp_path / "ig"
    first, where, reused = attribution_run(wb, prompts, steps=3, folder=folder)
    assert not reused and where == folder
    with monkeypatch.context() as m:
        m.setattr(attribution, "attribute_prompts", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
        again, _, reused = attribution_run(wb, prompts, steps=3, folder=folder)
        assert reused and np.array_equal(again.scores, first.scores)
    other, _, reused = attribution_run(wb, prompts, steps=4, folder=folder, overwrite=True)
    assert not reused and other.meta["steps"] == 4
    (folder / "scores.npz").write_bytes(b"broken")
    repaired, _, reused = attribution_run(wb, prompts, steps=4, folder=folder)
    assert not reused and np.allclose(repaired.scores, other.scores)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="", target="Paris"), "prompt is empty"),
    (dict(prompt="The capital", target="  "), "empty"),
    (dict(prompt="The capital", target="Paris", layers=[7]), "out of range"),
    (dict(prompt="The capital", target="Paris", layers=[]), "at least one layer"),
    (dict(prompt="The capital", target="Paris", steps=0), "steps"),
    (dict(prompt="The capital", target="Paris", method="simpson"), "integration method"),
    (dict(prompt="The capital", target="Paris", target_tokens="all"), "target_tokens"),
])
def test_bad_input_is_a_clear_error(kwargs, message):
    wb = tiny_wb("llama")
    before = {k: v.clone() for k, v in wb.model.state_dict().items()}
    with pytest.raises(InputError, match=message):
        neuron_attributions(wb, **kwargs)
    after = wb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def embedded():
    from analysis.model import load_model

    return load_model("embedded")


@pytest.mark.slow
def test_embedded_model_knowledge_neurons_en_zh(embedded):
    wb = embedded
    res = neuron_attributions(wb, "The Eiffel Tower is located in the city of", "Paris", layers=[3, 11, 17])
    assert res.prob > 0.3                        # the model knows it
    ref = neuron_attributions_reference(wb, "The Eiffel Tower is located in the city of", "Paris", layers=[17])
    np.testing.assert_allclose(res.scores[2], ref[0], atol=1e-4)
    zh = neuron_attributions(wb, "埃菲尔铁塔位于", "巴黎", layers=[3, 11, 17])
    assert zh.target_ids == answer_ids(wb.tokenizer, "埃菲尔铁塔位于", "巴黎")
    for r in (res, zh):
        kn = prompt_knowledge_neurons(r.scores)
        assert 0 < kn.sum() < kn.size // 10       # a few neurons, not most of them
