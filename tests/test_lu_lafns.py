"""editors.lu_lafns (papers/lu-lafns.md §3.3): locating D_G (Eq. 4-6) against a hand computation, the edit
(Eq. 7-10) raising the new target's probability under ``edit.applied``, Eq. 11 (texts without the subject
unchanged), no mutation of the model, clear errors. Tiny random models; the embedded model in a slow test."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from analysis.errors import InputError
from analysis.model import Workbench
from editors.base import available_editors, get_editor
from editors.contexts import KL_TEMPLATES, generate_prefixes, kl_prompt
from editors.edit import ActivationPatch, Edit
from editors.lu_lafns import LULAFNsEditor, LULAFNsHParams, locate, paraphrase_set
from editors.requests import EditRequest, LanguageFact
from tests.tiny import MZSRE_DEV, assert_bit_identical, hook_count, snapshot, target_nll, tiny_workbench

FAMILIES = ("llama", "gpt2", "gemma3_text")


tiny_wb = tiny_workbench


def tiny_hparams(**kw) -> LULAFNsHParams:
    """Tiny random models can be over-fitted: no clamp or decay, a large step, two prefixes."""
    fields = dict(layers=[0, 1, 2], beta=0.1, steps=40, lr=0.5, clamp_norm_factor=0.0, weight_decay=0.0,
                  n_prefixes=2, seed=0)
    fields.update(kw)
    return LULAFNsHParams(**fields)


def berlin_request(case_id: str = "france") -> EditRequest:
    """Prompts that end with their subject and a one-token target of the tiny tokenizer (" Berlin")."""
    return EditRequest({
        "en": LanguageFact("The capital of France", "France", "Berlin", paraphrases=["Capital city of France"]),
        "de": LanguageFact("Die Hauptstadt von Frankreich", "Frankreich", "Berlin",
                           paraphrases=["Hauptstadt von Frankreich"]),
    }, case_id)


# ================================================================== locating


def hand_counts(wb: Workbench, texts: list[str]) -> torch.Tensor:
    """Eq. 4 by hand: plain hooks on every layer's neuron module, one text at a time, real tokens only."""
    counts = torch.zeros(wb.n_layers, wb.n_neurons, dtype=torch.long)
    special = set(wb.tokenizer.all_special_ids)
    for text in texts:
        ids = wb.tokenizer(text, return_tensors="pt")["input_ids"]
        real = torch.tensor([int(i) not in special for i in ids[0]])
        seen: dict[int, torch.Tensor] = {}
        handles = [wb.arch.site(wb.model, i, "neuron").register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out[0].detach())) for i in range(wb.n_layers)]
        try:
            with torch.no_grad():
                wb.model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
        for i in range(wb.n_layers):
            counts[i] += (seen[i][real] > 0).sum(0)
    return counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_located_neurons_equal_a_hand_computation_of_eq_4_to_6(family, beta):
    wb = tiny_wb(family)
    request = berlin_request().validate(wb)
    hp = tiny_hparams(beta=beta, layers=[0, 2])
    located = locate(wb, request, hp)
    factual = {}
    for lang, fact in request.facts.items():
        texts = paraphrase_set(fact, hp)
        assert texts[0] == fact.prompt and fact.paraphrases[0] in texts and f"Q: {fact.prompt}" in texts
        n = hand_counts(wb, texts).double()
        factual[lang] = n / n.max(dim=1, keepdim=True).values > beta                  # Eq. 5
    agnostic = factual["en"] & factual["de"]                                            # Eq. 6
    assert sorted(located) == [0, 2]
    for layer in (0, 2):
        expected = agnostic[layer].nonzero().flatten()
        assert torch.equal(located[layer], expected), layer
        assert 0 < expected.numel() <= wb.n_neurons


def test_one_language_uses_its_own_factual_neurons_and_sources_are_chosen():
    wb = tiny_wb()
    request = EditRequest({"en": berlin_request().facts["en"]}).validate(wb)
    hp = tiny_hparams(beta=0.5, layers=[1], paraphrase_sources=["prompt"])
    assert paraphrase_set(request.facts["en"], hp) == ["The capital of France"]
    n = hand_counts(wb, ["The capital of France"]).double()
    expected = (n / n.max(dim=1, keepdim=True).values > 0.5)[1].nonzero().flatten()
    assert torch.equal(locate(wb, request, hp)[1], expected)


# =================================================================== editing


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_raises_the_target_probability_and_leaves_the_model_as_it_was(family):
    wb = tiny_wb(family)
    request = berlin_request()
    snap = snapshot(wb.model)
    flags = {n: p.requires_grad for n, p in wb.model.named_parameters()}
    hooks = hook_count(wb.model)
    before = {lang: target_nll(wb, f.prompt, f.target_new) for lang, f in request.facts.items()}

    # empty_prefix: also train on the bare prompt (a random tiny model does not generalise from prefixed
    # contexts to the bare one the way a trained model does; the embedded test below uses the paper's setting)
    edit = get_editor("lu-lafns", tiny_hparams(empty_prefix=True)).compute(wb, request)

    # the model is exactly as it was: parameters bit for bit, requires_grad flags, hooks, no gradients
    assert_bit_identical(wb.model, snap)
    assert {n: p.requires_grad for n, p in wb.model.named_parameters()} == flags
    assert all(p.grad is None for p in wb.model.parameters())
    assert hook_count(wb.model) == hooks
    assert wb.lock.acquire(blocking=False)
    wb.lock.release()

    assert isinstance(edit, Edit) and edit.method == "lu-lafns" and not edit.weights
    group = edit.meta["lu_lafns"][0]
    assert group["final_target_loss"] < 0.5 * group["initial_target_loss"]
    assert 1 <= group["steps"] <= 40 and set(group["d_g_sizes"]) == {"0", "1", "2"}
    assert set(group["prefixes"]) == {"en", "de"} and all(len(p) == 2 for p in group["prefixes"].values())
    for patch in edit.patches:
        assert isinstance(patch, ActivationPatch)
        assert patch.subjects == {"en": ["France"], "de": ["Frankreich"]}
        assert patch.neurons.numel() == group["d_g_sizes"][str(patch.layer)] == patch.delta.numel()

    # under the edit the bare prompts (no prefix) give the new target a much higher probability
    with edit.applied(wb):
        after = {lang: target_nll(wb, f.prompt, f.target_new) for lang, f in request.facts.items()}
        # the engine's patch reproduces the optimisation's forward: the mean NLL over the training
        # contexts (one-token target) is the final L_target of the meta
        trained = [target_nll(wb, c, "Berlin") for cs in group["contexts"].values() for c in cs]
    assert np.mean(trained) == pytest.approx(group["final_target_loss"], abs=1e-3)
    for lang in before:
        assert after[lang] < 0.5 * before[lang], (lang, before[lang], after[lang])
    assert_bit_identical(wb.model, snap)

    # Eq. 11: texts without a subject of S_G compute exactly what the unedited model computes
    others = ["The capital of Spain is", "Die Hauptstadt von Italien ist", "People in Japan speak"]
    wb.tokenizer.padding_side = "right"
    enc = wb.tokenizer(others, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = wb.model(**enc).logits
        with edit.applied(wb):
            edited = wb.model(**enc).logits
    assert torch.equal(plain, edited)


def test_several_requests_get_their_own_neurons_deltas_and_subjects():
    wb = tiny_wb()
    spain = EditRequest({
        "en": LanguageFact("The capital of Spain", "Spain", "Paris"),
        "de": LanguageFact("Die Hauptstadt von Spanien", "Spanien", "Paris"),
    }, "spain")
    hp = tiny_hparams(layers=[0, 1], steps=3)
    edit = LULAFNsEditor(hp).compute(wb, [berlin_request(), spain])
    assert [g["case_id"] for g in edit.meta["lu_lafns"]] == ["france", "spain"]
    assert [(p.layer, p.subjects["en"]) for p in edit.patches] == [
        (0, ["France"]), (1, ["France"]), (0, ["Spain"]), (1, ["Spain"])]
    alone = LULAFNsEditor(hp).compute(wb, spain)
    for p, q in zip(edit.patches[2:], alone.patches):
        assert torch.equal(p.neurons, q.neurons) and torch.equal(p.delta, q.delta)


def test_progress_reports_locating_and_every_step_and_a_raising_callback_stops_cleanly():
    wb = tiny_wb()
    hp = tiny_hparams(layers=[0, 1], steps=3, early_stop_loss=0.0)
    seen: list[tuple[float, str]] = []
    edit = LULAFNsEditor(hp).compute(wb, berlin_request(), progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    messages = " | ".join(m for _, m in seen)
    assert "locating language-agnostic neurons" in messages and "generating prefixes" in messages
    assert all(f"step {k}/3" in messages for k in (1, 2, 3))
    # the callback does not change the result
    plain = LULAFNsEditor(hp).compute(wb, berlin_request())
    assert all(torch.equal(p.delta, q.delta) for p, q in zip(edit.patches, plain.patches))

    # a callback that raises (the app stopping a run) stops the compute; the model is as it was
    snap, hooks = snapshot(wb.model), hook_count(wb.model)

    def stop(fraction: float, message: str) -> None:
        if "step 2/" in message:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        LULAFNsEditor(hp).compute(wb, berlin_request(), progress=stop)
    assert_bit_identical(wb.model, snap)
    assert hook_count(wb.model) == hooks and all(p.grad is None for p in wb.model.parameters())
    assert wb.lock.acquire(blocking=False)
    wb.lock.release()


def test_prefixes_are_generated_by_the_model_seeded_and_cached():
    wb = tiny_wb()
    hp = tiny_hparams(n_prefixes=3, prefix_length=4)
    first = generate_prefixes(wb, "en", hp)
    assert len(first) == 3 and all(p.strip() for p in first)
    assert generate_prefixes(wb, "en", hp) == first
    assert generate_prefixes(wb, "en", tiny_hparams(n_prefixes=3, prefix_length=4, seed=1)) != first
    assert generate_prefixes(wb, "en", tiny_hparams(n_prefixes=0)) == []


def test_kl_prompts_are_written_in_each_language_with_an_english_fallback(caplog):
    for lang in ("en", "zh", "de", "fr", "es", "ru", "ja", "ar", "cs", "nl", "it", "pt", "ko", "th", "tr", "pl", "uk"):
        assert lang in KL_TEMPLATES
    assert kl_prompt("en", "France") == "France is a" and kl_prompt("zh", "法国") == "法国是一个"
    with caplog.at_level("INFO"):
        assert kl_prompt("sw", "Ufaransa") == "Ufaransa is a"
    assert "sw" in caplog.text


# ==================================================================== errors


BAD = [
    (lambda: EditRequest({"en": LanguageFact("The capital of France", "Germany", "Berlin")}),
     r"subject 'Germany' does not occur"),
    (lambda: EditRequest({"en": LanguageFact("The capital of France", "France", " ")}), r"empty target"),
    (lambda: EditRequest({"xx": LanguageFact("The capital of France", "France", "Berlin")}),
     r"unknown language code 'xx'"),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_requests_are_input_errors_and_leave_the_model_untouched(make, message):
    wb = tiny_wb()
    snap, hooks = snapshot(wb.model), hook_count(wb.model)
    with pytest.raises(InputError, match=message):
        LULAFNsEditor(tiny_hparams()).compute(wb, make())
    assert_bit_identical(wb.model, snap)
    assert hook_count(wb.model) == hooks


def test_bad_hyperparameters_are_input_errors():
    wb = tiny_wb()
    snap = snapshot(wb.model)
    with pytest.raises(InputError, match=r"Layer 3 is out of range"):
        LULAFNsEditor(tiny_hparams(layers=[0, 3])).compute(wb, berlin_request())
    assert_bit_identical(wb.model, snap)
    for bad, message in [(dict(beta=1.5), "beta"), (dict(match="fuzzzy"), "match"), (dict(steps=0), "steps"),
                         (dict(match_threshold=101), "match_threshold"),
                         (dict(lr=0), "lr"), (dict(paraphrase_sources=["web"]), "paraphrase_sources"),
                         (dict(prompt_variants=["no slot"]), "prompt variant"), (dict(layers=[]), "layer"),
                         (dict(n_prefixes=0), "n_prefixes")]:
        with pytest.raises(InputError, match=message):
            LULAFNsEditor(tiny_hparams(**bad))


def test_presets_and_registry():
    assert "lu-lafns" in available_editors()
    assert isinstance(get_editor("LU-LAFNs"), LULAFNsEditor)
    llama = LULAFNsHParams.preset("meta-llama/Llama-3.1-8B")
    assert (llama.layers, llama.beta, llama.lambda1, llama.lambda2, llama.n_prefixes, llama.prefix_length) == \
        ([11, 12, 13, 31], 0.1, 1.0, 0.0625, 4, 5)
    assert (LULAFNsHParams.preset("Qwen/Qwen2-7B").layers, LULAFNsHParams.preset("Qwen2-7B").beta) == \
        ([19, 20, 21, 27], 0.0)
    bloom = LULAFNsHParams.preset("bigscience/bloomz-7b1-mt")
    assert (bloom.layers, bloom.beta) == ([9, 10, 11, 29], 0.2)
    assert LULAFNsHParams.preset("embedded").layers == [3, 9, 10, 17]
    back = LULAFNsHParams.from_dict(llama.to_dict())
    assert back == llama


# ================================================================== embedded


@pytest.mark.slow
def test_embedded_model_mzsre_record_is_edited_in_english_and_chinese():
    """MzsRE dev record 5 (Shmavon Shmavonyan: Yemen / 也门), edited in en and zh with the embedded preset:
    the greedy answer starts with the new target in both languages; the model is left as it was."""
    from analysis.model import load_model
    from data.edit_records import load_mzsre

    wb = load_model("embedded", device="cpu")
    records = {r.record_id: r for r in load_mzsre(MZSRE_DEV, ["en", "zh"])}
    request = EditRequest.from_record(records["mzsre:5"], ["en", "zh"])
    for fact in request.facts.values():
        assert fact.subject in fact.prompt

    def greedy(prompt: str) -> str:
        enc = wb.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = wb.model.generate(**enc, do_sample=False, max_new_tokens=5)
        return wb.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    before = {lang: greedy(f.prompt) for lang, f in request.facts.items()}
    snap = snapshot(wb.model)
    started = time.perf_counter()
    edit = get_editor("lu-lafns").compute(wb, request)
    seconds = time.perf_counter() - started
    assert_bit_identical(wb.model, snap)
    with edit.applied(wb):
        after = {lang: greedy(f.prompt) for lang, f in request.facts.items()}
    print(f"\nLU-LAFNs on the embedded model, {request.case_id}: {seconds:.1f} s; before {before}; after {after}; "
          f"meta {({k: v for k, v in edit.meta['lu_lafns'][0].items() if k != 'losses'})}")
    for lang, fact in request.facts.items():
        assert not before[lang].strip().startswith(fact.target_new)
        assert after[lang].strip().startswith(fact.target_new), (lang, after[lang])
    assert greedy(request.facts["en"].prompt) == before["en"]
