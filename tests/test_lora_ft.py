"""editors.lora_ft (LoRA-FT of papers/lu-lafns.md §4.2, with peft): the returned low-rank deltas reproduce the
trained peft model, the edit lowers the new target's NLL in every language, the model is left exactly as found
(same module objects, bits, flags, no hooks or peft attributes) also when training raises, clear errors for bad
hyper-parameters, presets. Tiny random models; the embedded model in a slow test."""
from __future__ import annotations

import time

import pytest
import torch

import editors.lora_ft as lora_ft
from analysis.errors import InputError
from editors.base import available_editors, get_editor
from editors.edit import Edit
from editors.lora_ft import LoRAFTEditor, LoRAFTHParams, target_paths
from editors.requests import EditRequest, LanguageFact
from tests.tiny import MZSRE_DEV, assert_bit_identical, snapshot, target_nll, tiny_workbench

FAMILIES = ("llama", "gpt2", "gemma3_text")
PROBES = ["The capital of France is Berlin", "Die Hauptstadt von Spanien ist", "People in Japan speak"]


def tiny_hparams(**kw) -> LoRAFTHParams:
    """Every layer, attention and FFN matrices (qkv_proj fits every family), a large step for random weights."""
    fields = dict(layers=[], target_modules=["qkv_proj", "down_proj"], rank=4, alpha=8, lr=2e-2, steps=25,
                  early_stop_loss=0.0, seed=0)
    fields.update(kw)
    return LoRAFTHParams(**fields)


def berlin_request(case_id: str = "france") -> EditRequest:
    return EditRequest({
        "en": LanguageFact("The capital of France is", "France", "Berlin",
                           paraphrases=["Capital city of France:"], locality=[("People in Japan speak", "Japanese")]),
        "de": LanguageFact("Die Hauptstadt von Frankreich ist", "Frankreich", "Berlin"),
    }, case_id)


def probe_logits(wb) -> list[torch.Tensor]:
    with torch.no_grad():
        return [wb.model(input_ids=wb.tokenizer(t, return_tensors="pt")["input_ids"]).logits[0] for t in PROBES]


def structure(model: torch.nn.Module) -> list:
    """Everything about the model but its values: module objects and attributes, flags, every kind of hook."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
             "_load_state_dict_post_hooks")
    modules = [(name, id(m), type(m), m.training, sorted(vars(m)), list(m._modules), list(m._parameters),
                [len(getattr(m, h, {})) for h in hooks]) for name, m in model.named_modules()]
    params = [(name, id(p), p.requires_grad, p.grad is None) for name, p in model.named_parameters()]
    return [modules, params, sorted(vars(model))]


@pytest.fixture
def altered_flags():
    """The cached tiny model with a frozen parameter and a module in training mode (the final norm: no dropout
    there, so outputs stay deterministic): both must survive."""
    def make(wb):
        frozen = next(p for n, p in wb.model.named_parameters() if n.endswith("0.mlp.down_proj.weight")
                      or n.endswith("0.mlp.c_proj.weight"))
        frozen.requires_grad_(False)
        wb.arch.final_norm_module(wb.model).train()
        undo.append((frozen, wb))
    undo: list = []
    yield make
    for frozen, wb in undo:
        frozen.requires_grad_(True)
        wb.model.eval()


# ================================================================== the edit


@pytest.mark.parametrize("family", FAMILIES)
def test_applied_edit_reproduces_the_peft_model_and_lowers_the_target_nll(family, monkeypatch, altered_flags,
                                                                          caplog):
    wb = tiny_workbench(family)
    altered_flags(wb)
    request = berlin_request()
    snap, before_structure = snapshot(wb.model), structure(wb.model)
    base_logits = probe_logits(wb)
    before = {lang: target_nll(wb, f.prompt, f.target_new, mean=True) for lang, f in request.facts.items()}

    # the trained peft model's outputs, read while its adapters are still in the model
    peft_logits: list[list[torch.Tensor]] = []
    original = lora_ft._delta_factors

    def factors_after_reading_the_peft_model(layer, scaling):
        if not peft_logits:
            assert any("lora" in n for n, _ in wb.model.named_parameters())
            peft_logits.append(probe_logits(wb))
        return original(layer, scaling)

    monkeypatch.setattr(lora_ft, "_delta_factors", factors_after_reading_the_peft_model)
    edit = get_editor("lora-ft", tiny_hparams()).compute(wb, request)

    # the model is exactly as found: values, module objects, flags, hooks, no peft attribute
    assert_bit_identical(wb.model, snap)
    assert structure(wb.model) == before_structure
    assert not hasattr(wb.model, "peft_config")
    assert all("lora" not in n for n, _ in wb.model.named_modules())
    assert "putting the original module back" not in caplog.text   # peft's own unload() gave them back
    assert torch.equal(torch.stack([x.sum() for x in probe_logits(wb)]), torch.stack([x.sum() for x in base_logits]))

    # one low-rank term per adapted matrix, in the parameter's own layout (Conv1D [in, out])
    params = dict(wb.model.named_parameters())
    paths = target_paths(wb, tiny_hparams())
    assert sorted(edit.weights) == sorted(f"{p}.weight" for p in paths)
    for name, (term,) in edit.weights.items():
        assert term.kind == "low_rank" and term.rank == 4 and term.shape == tuple(params[name].shape), name
    record = edit.meta["lora_ft"]
    assert record["steps"] == 25 and len(record["losses"]) == 26
    assert record["trainable_parameters"] == sum(t.stored_values() for ts in edit.weights.values() for t in ts)
    assert record["rows"] == ["france:en", "france:de"]

    # base model + applied edit == the trained peft model
    with edit.applied(wb):
        edited = probe_logits(wb)
        after = {lang: target_nll(wb, f.prompt, f.target_new, mean=True) for lang, f in request.facts.items()}
    for got, want in zip(edited, peft_logits[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(edited, base_logits))
    assert sum(after.values()) / 2 == pytest.approx(record["final_loss"], abs=1e-4)
    for lang in before:
        assert after[lang] < 0.5 * before[lang], (lang, before[lang], after[lang])
    assert_bit_identical(wb.model, snap)


def test_seeded_runs_repeat_and_leave_the_global_random_state_alone():
    wb = tiny_workbench("llama")
    hp = tiny_hparams(steps=3, target_modules=["down_proj"], layers=[1])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = LoRAFTEditor(hp).compute(wb, berlin_request())
    assert torch.equal(torch.rand(3), expected_next)
    again = LoRAFTEditor(hp).compute(wb, berlin_request())
    other = LoRAFTEditor(tiny_hparams(steps=3, target_modules=["down_proj"], layers=[1], seed=1)).compute(
        wb, berlin_request())
    name = "model.layers.1.mlp.down_proj.weight"
    assert list(first.weights) == [name]
    assert torch.equal(first.delta(name), again.delta(name))
    assert not torch.equal(first.delta(name), other.delta(name))


def test_progress_reports_every_training_step():
    wb = tiny_workbench("llama")
    hp = tiny_hparams(steps=3, target_modules=["down_proj"], layers=[1])
    seen: list[tuple[float, str]] = []
    edit = LoRAFTEditor(hp).compute(wb, berlin_request(), progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    messages = " | ".join(m for _, m in seen)
    assert all(f"step {k}/3" in messages for k in (1, 2, 3)) and "LoRA adapters" in messages
    plain = LoRAFTEditor(hp).compute(wb, berlin_request())
    assert all(torch.equal(edit.delta(n), plain.delta(n)) for n in edit.param_names)


def test_all_languages_of_all_requests_train_in_one_batch_and_early_stop():
    """(A tiny model's final norm and small LM head bound its logits: its NLL cannot go far below 2.4.)"""
    wb = tiny_workbench("llama")
    spain = EditRequest({"en": LanguageFact("The capital of Spain is", "Spain", "Paris")}, "spain")
    edit = LoRAFTEditor(tiny_hparams(early_stop_loss=3.0, steps=200)).compute(wb, [berlin_request(), spain])
    record = edit.meta["lora_ft"]
    assert record["rows"] == ["france:en", "france:de", "spain:en"]
    assert len(record["initial_row_losses"]) == len(record["final_row_losses"]) == 3
    assert record["early_stopped"] and record["steps"] < 200 and record["final_loss"] < 3.0
    assert len(record["losses"]) == record["steps"] + 1


# ============================================================ model as found


@pytest.mark.parametrize("where", ["training", "injection"])
def test_a_failure_leaves_the_model_as_found(where, monkeypatch, altered_flags, caplog):
    wb = tiny_workbench("gpt2")
    altered_flags(wb)
    snap, before_structure = snapshot(wb.model), structure(wb.model)
    calls = {"n": 0}
    if where == "training":
        original = lora_ft.target_nll

        def fails_on_step_3(wb_, rows):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom in training")
            return original(wb_, rows)

        monkeypatch.setattr(lora_ft, "target_nll", fails_on_step_3)
    else:  # peft fails after wrapping some of the targets: the half-injected model is restored by hand
        from peft.tuners.lora.model import LoraModel

        original = LoraModel._create_and_replace

        def fails_on_the_third_target(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom in injection")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(LoraModel, "_create_and_replace", fails_on_the_third_target)
    with pytest.raises(RuntimeError, match=f"boom in {where}"):
        LoRAFTEditor(tiny_hparams()).compute(wb, berlin_request())
    assert calls["n"] == 3
    # without a tuner to unload, the two targets peft had wrapped are put back by LoRA-FT itself
    assert caplog.text.count("putting the original module back") == (2 if where == "injection" else 0)
    assert_bit_identical(wb.model, snap)
    assert structure(wb.model) == before_structure
    assert not hasattr(wb.model, "peft_config")
    assert wb.lock.acquire(blocking=False)
    wb.lock.release()


# =================================================================== errors


@pytest.mark.parametrize("fields, message", [
    (dict(rank=0), "rank must be a whole number >= 1"),
    (dict(target_modules=["mlp.fc9"]), "Unknown LoRA target module"),
    (dict(target_modules=[]), "target_modules is empty"),
    (dict(alpha=0), "alpha must be a number > 0"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    (dict(steps=0), "steps must be a whole number >= 1"),
    (dict(lr=-1), "lr must be a number > 0"),
])
def test_bad_hparams_are_refused_when_the_editor_is_made(fields, message):
    with pytest.raises(InputError, match=message):
        LoRAFTEditor(tiny_hparams(**fields))


@pytest.mark.parametrize("family, fields, message", [
    ("llama", dict(layers=[3]), "Layer 3 is out of range: tiny-llama has 3 layers"),
    ("gpt2", dict(target_modules=["q_proj"]), "fuses query, key and value.*'qkv_proj'"),
    ("gpt2", dict(target_modules=["up_proj"]), "ungated FFN"),
])
def test_hparams_that_do_not_fit_the_model_are_refused_before_any_work(family, fields, message, monkeypatch):
    wb = tiny_workbench(family)

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(lora_ft, "build_rows", no_work)
    monkeypatch.setattr(lora_ft, "train_adapters", no_work)
    with pytest.raises(InputError, match=message):
        LoRAFTEditor(tiny_hparams(**fields)).compute(wb, berlin_request())


def test_target_names_map_to_each_familys_matrices():
    hp = lambda targets, layers=(1,): LoRAFTHParams(layers=list(layers), target_modules=targets)  # noqa: E731
    assert target_paths(tiny_workbench("llama"), hp(["qkv_proj", "o_proj", "up_proj"])) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"]
    assert target_paths(tiny_workbench("gpt2"), hp(["qkv_proj", "o_proj", "first_proj", "down_proj"])) == [
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj"]
    assert target_paths(tiny_workbench("gemma3_text"), hp(["v_proj"], layers=())) == [
        f"model.layers.{i}.self_attn.v_proj" for i in range(3)]
    assert target_paths(tiny_workbench("llama"), hp(["down_proj"], layers=(-1,))) == ["model.layers.2.mlp.down_proj"]


def test_registered_and_presets_resolve_by_model_name():
    assert "lora-ft" in available_editors()
    assert isinstance(get_editor("lora-ft"), LoRAFTEditor)
    qwen = LoRAFTHParams.preset("Qwen/Qwen2-7B")
    assert isinstance(qwen, LoRAFTHParams)
    assert (qwen.rank, qwen.alpha, qwen.lr, qwen.target_modules, qwen.layers) == (8, 32, 5e-3, ["q_proj", "v_proj"], [])
    assert LoRAFTHParams.preset("meta-llama/Llama-3.1-8B").steps == 50
    assert LoRAFTHParams.preset("bigscience/bloomz-7b1-mt").target_modules == ["qkv_proj"]
    assert LoRAFTHParams.preset("embedded").steps == 40
    for key in LoRAFTHParams.PRESETS:
        LoRAFTHParams.preset(key).validate()
    with pytest.raises(InputError, match="No LoRAFTHParams preset"):
        LoRAFTHParams.preset("gpt2-medium")
    assert LoRAFTHParams.from_dict(LoRAFTHParams(target_modules="down_proj").to_dict()).target_modules == ["down_proj"]


# =============================================================== embedded model


@pytest.mark.slow
def test_embedded_model_mzsre_record_is_edited_in_english_and_chinese():
    """MzsRE dev record 5, edited in en and zh with the embedded preset: the target's probability rises and the
    greedy answer starts with it in both languages; the model is left as it was."""
    from analysis.model import load_model
    from data.edit_records import load_mzsre

    wb = load_model("embedded", device="cpu")
    records = load_mzsre(MZSRE_DEV, ["en", "zh"])
    request = EditRequest.from_record(records[5], ["en", "zh"])

    def greedy(prompt: str) -> str:
        enc = wb.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = wb.model.generate(**enc, do_sample=False, max_new_tokens=5)
        return wb.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    before = {lang: (greedy(f.prompt), target_nll(wb, f.prompt, f.target_new, mean=True)) for lang, f in request.facts.items()}
    snap = snapshot(wb.model)
    started = time.perf_counter()
    edit = get_editor("lora-ft").compute(wb, request)
    seconds = time.perf_counter() - started
    assert_bit_identical(wb.model, snap)
    assert isinstance(edit, Edit)
    with edit.applied(wb):
        after = {lang: (greedy(f.prompt), target_nll(wb, f.prompt, f.target_new, mean=True))
                 for lang, f in request.facts.items()}
    record = edit.meta["lora_ft"]
    print(f"\nLoRA-FT on the embedded model, {request.case_id}: {seconds:.1f} s, {record['steps']} steps, "
          f"{record['trainable_parameters']} trainable; before {before}; after {after}")
    for lang, fact in request.facts.items():
        assert after[lang][1] < before[lang][1] - 1.0, lang
        assert after[lang][0].strip().startswith(fact.target_new), (lang, after[lang])
    assert greedy(request.facts["en"].prompt) == before["en"][0]
