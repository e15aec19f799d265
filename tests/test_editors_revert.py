"""Every registered editor, through the engine: computed edits applied, composed and reverted in random orders
leave every parameter bit-identical; a composition is bit-identical to nesting; save/load round trips.

Tiny random models with FLORES key statistics capped at a few thousand tokens (ROME/MEMIT/AlphaEdit)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from editors.base import available_editors, get_editor
from editors.edit import Edit
from editors.requests import EditRequest, LanguageFact
from tests.tiny import assert_bit_identical, hook_count, lock_is_free, snapshot, tiny_workbench

#: Small, fast hyper-parameters per editor for the tiny models (3 layers).
TINY_HPARAMS = {
    "lu-lafns": dict(layers=[0, 1], beta=0.1, steps=3, lr=0.5, n_prefixes=1, prefix_length=2),
    "rome": dict(layers=[1], v_num_grad_steps=3, context_template_length_params=[[2, 1]], mom2_n_tokens=500),
    "memit": dict(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[2, 1]], mom2_n_tokens=500),
    "alphaedit": dict(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[2, 1]],
                      mom2_n_tokens=500),
    "lora-ft": dict(layers=[0, 2], target_modules=["down_proj"], steps=3),
    "memla": dict(layers=[], threshold=0.2, ig_steps=4, steps=3, lr=1e-2, stop_prob=1.0),
    "ike": dict(k=2),
    "remake": dict(k=2, threshold=0.0, layers=[1]),
    "langedit": dict(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[2, 1]],
                     mom2_n_tokens=500, nullspace_threshold=0.05, nullspace_relative=True),
    "t-patcher": dict(layers=[2], parallel="none", steps=3, memory_facts=4, memory_sentences=2),
    "mpn": dict(layers=[2], parallel="one", steps=3, memory_facts=4, memory_sentences=2),
    "mpn-all": dict(layers=[1], parallel="all", steps=3, memory_facts=4, memory_sentences=2),
    "ffn-ft": dict(layers=[2], steps=3),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NEUROGLOT_CACHE", str(tmp_path_factory.getbasetemp() / "revert-cache"))


def requests() -> list[EditRequest]:
    return [
        EditRequest({"en": LanguageFact("The capital of France is", "France", "Berlin"),
                     "de": LanguageFact("Die Hauptstadt von Frankreich ist", "Frankreich", "Berlin")}, "a"),
        EditRequest({"en": LanguageFact("People in Spain speak", "Spain", "German"),
                     "de": LanguageFact("In Spanien spricht man", "Spanien", "Deutsch")}, "b"),
    ]


def test_every_builtin_editor_is_covered():
    builtin = {n for n in available_editors() if type(get_editor(n)).__module__.startswith("editors.")}
    assert {"lu-lafns", "rome", "memit", "alphaedit", "lora-ft"} <= builtin   # other tests register their own
    assert builtin <= set(TINY_HPARAMS)


@pytest.mark.parametrize("name", sorted(TINY_HPARAMS))
def test_random_apply_revert_compose_sequences_are_bit_exact(name):
    wb = tiny_workbench("llama")
    original = snapshot(wb.model)
    hooks = hook_count(wb.model)
    editor = get_editor(name, TINY_HPARAMS[name])
    e1, e2 = (editor.compute(wb, r) for r in requests())
    assert_bit_identical(wb.model, original)               # computing never changes the model
    ids = wb.tokenizer(["The capital of France is", "People in Spain speak"], return_tensors="pt",
                       padding=True)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return wb.model(**ids).logits

    plain = logits()
    with e1.applied(wb), e2.applied(wb):
        nested_state, nested_logits = snapshot(wb.model), logits()
    with Edit.compose(e1, e2).applied(wb):
        assert_bit_identical(wb.model, nested_state)       # composition == nesting, bit for bit
        assert torch.equal(logits(), nested_logits)
    assert_bit_identical(wb.model, original)

    for seq in range(6):
        rng = np.random.default_rng([seq, sorted(TINY_HPARAMS).index(name)])
        stack = []
        for _ in range(int(rng.integers(2, 7))):
            op = rng.choice(["apply", "compose", "revert", "revert-any", "forward"])
            if op in ("apply", "compose"):
                edit = (e1 if rng.random() < 0.5 else e2) if op == "apply" else (e1 + e2)
                if any(a.edit is edit for a in stack):
                    continue
                stack.append(edit.apply(wb))
            elif op == "revert" and stack:
                stack.pop().revert()
            elif op == "revert-any" and stack:
                i = int(rng.integers(len(stack)))
                stack[i].revert()                           # out of order: later applications end too,
                for later in stack[i + 1:]:                 # and each holds the lock until its own revert
                    assert not later.active
                    later.revert()
                stack = stack[:i]
            elif op == "forward":
                logits()
        for applied in reversed(stack):
            applied.revert()
        assert_bit_identical(wb.model, original)
        assert hook_count(wb.model) == hooks
        assert torch.equal(logits(), plain)
        assert lock_is_free(wb)


@pytest.mark.parametrize("name", sorted(TINY_HPARAMS))
def test_a_saved_edit_loads_and_applies_identically(name, tmp_path):
    wb = tiny_workbench("llama")
    edit = get_editor(name, TINY_HPARAMS[name]).compute(wb, requests()[0])
    with edit.applied(wb):
        applied = snapshot(wb.model)
    loaded = Edit.load(edit.save(tmp_path / name))
    assert loaded.method == name and loaded.meta["requests"] == edit.meta["requests"]
    with loaded.applied(wb):
        assert_bit_identical(wb.model, applied)
