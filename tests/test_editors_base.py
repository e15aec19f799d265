"""editors.base: edit requests, hyper-parameters and presets, edits (apply / revert / compose, bit-exact),
activation patches keyed by subject tokens, save / load, the Editor wrapper and the registry.

Tiny random models (llama, gpt2 with its Conv1D layout, gemma3_text, bloom); one check of
subject detection on the embedded model (slow)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

from analysis.errors import InputError, NeuroglotError
from analysis.model import EMBEDDED_NAME, Workbench
from analysis.tokens import encode
from data.edit_records import EditRecord
from editors.base import Editor, available_editors, get_editor, register
from editors.edit import ActivationPatch, Edit, WeightDelta
from editors.hparams import HParams
from editors.requests import EditRequest, LanguageFact
from editors.subjects import SubjectMatcher, subject_token_variants
from tests.tiny import assert_bit_identical, hook_count, lock_is_free, snapshot, tiny_model_and_tokenizer, tiny_workbench

FAMILIES = ("llama", "gpt2", "gemma3_text", "bloom")


tiny_wb = tiny_workbench


def down_name(wb: Workbench, layer: int) -> str:
    return wb.arch.site_path(layer, "down_proj") + ".weight"


def en_fact(**kw) -> LanguageFact:
    fields = dict(prompt="The capital of France is", subject="France", target_new="Rome", target_old="Paris",
                  paraphrases=["People in France speak"], locality=[("The capital of Spain is", "Madrid")],
                  portability=[("France is in the continent of", "Europe")])
    fields.update(kw)
    return LanguageFact(**fields)


def zh_fact(**kw) -> LanguageFact:
    fields = dict(prompt="法国的首都是", subject="法国", target_new="罗马")
    fields.update(kw)
    return LanguageFact(**fields)


def france_request(case_id: str = "france", **facts) -> EditRequest:
    return EditRequest(facts or {"en": en_fact(), "zh": zh_fact()}, case_id)


# ===================================================================== requests


def test_request_validation_normalises_languages_and_round_trips_through_json():
    req = EditRequest({"EN": en_fact(), "zh-cn": zh_fact(), "cz": en_fact()}, "c1").validate(tiny_wb())
    assert req.languages == ["en", "zh", "cs"]
    assert req.subjects() == {"en": ["France"], "zh": ["法国"], "cs": ["France"]}
    assert req.contexts()["en"] == ["The capital of France is", "People in France speak",
                                    "France is in the continent of"]
    back = EditRequest.from_dict(json.loads(json.dumps(req.to_dict())))
    assert back.validate() == req


def test_request_from_mzsre_record():
    fields = {"subject": "Watts Humphrey", "prompt": "What university did Watts Humphrey attend?",
              "rephrase": "Which university did Watts Humphrey go to?", "target_new": "University of Michigan",
              "loc": "nq question: who played desmond doss father", "loc_ans": "Hugo Weaving",
              "port_question": "Which state is Watts Humphrey's university in?", "port_answer": "Michigan"}
    zh = dict(fields, prompt="Watts Humphrey上的是哪所大学？", rephrase="Watts Humphrey就读于哪所大学？",
              target_new="密歇根大学", port_question=None, port_answer=None)
    record = EditRecord("mzsre:7", {"en": fields, "zh": zh}, "mzsre")
    req = EditRequest.from_record(record).validate()
    assert req.case_id == "mzsre:7" and req.languages == ["en", "zh"]
    en = req.facts["en"]
    assert en.paraphrases == [fields["rephrase"]] and en.target_old is None
    assert en.locality == [(fields["loc"], "Hugo Weaving")]
    assert en.portability == [(fields["port_question"], "Michigan")] and req.facts["zh"].portability == []
    assert EditRequest.from_record(record, ["ZH"]).languages == ["zh"]
    with pytest.raises(InputError, match="no language 'de'"):
        EditRequest.from_record(record, ["de"])
    mlake = EditRecord("mlake:0", {"en": {"prompt": "Who leads X?", "target_new": "Y", "subject": None}}, "mlake")
    with pytest.raises(InputError, match="no subject"):
        EditRequest.from_record(mlake)


BAD_REQUESTS = [
    (lambda: france_request(en=en_fact(subject="Germany")), r"language 'en'.*subject 'Germany' does not occur"),
    (lambda: france_request(en=en_fact(target_new="  ")), r"language 'en'.*empty target"),
    (lambda: france_request(xx=en_fact()), r"unknown language code 'xx'"),
    (lambda: EditRequest({}, "none"), r"'none' has no language"),
    (lambda: france_request(en=en_fact(), EN=en_fact()), r"language 'en' twice"),
    (lambda: france_request(en=en_fact(prompt="")), r"empty prompt"),
    (lambda: france_request(en=en_fact(locality=[("only a question",)])),
     r"locality entry 0 must be a \(question, answer\)"),
]


@pytest.mark.parametrize("make, message", BAD_REQUESTS)
def test_bad_requests_are_clear_errors_and_leave_the_model_untouched(make, message):
    wb = tiny_wb()
    snap = snapshot(wb.model)
    with pytest.raises(InputError, match=message):
        DummyEditor(DummyHParams(layers=[1])).compute(wb, [make()])
    assert_bit_identical(wb.model, snap)


def test_layer_out_of_range_is_a_clear_error():
    wb = tiny_wb()
    snap = snapshot(wb.model)
    with pytest.raises(InputError, match=r"Layer 3 is out of range: tiny-llama has 3 layers \(0-2"):
        DummyHParams(layers=[0, 3]).validate(wb)
    with pytest.raises(InputError, match="Layer -4 is out of range"):
        DummyEditor(DummyHParams(layers=[-4])).compute(wb, [france_request()])
    assert DummyHParams(layers=[0, -1]).layer_indices(wb) == [0, 2]
    with pytest.raises(InputError, match="twice"):
        DummyHParams(layers=[2, -1]).layer_indices(wb)
    assert_bit_identical(wb.model, snap)


# ============================================================== hyper-parameters


@dataclass
class DummyHParams(HParams):
    """A test editor's hyper-parameters: a random delta of size ``scale`` on each layer's down-projection."""

    scale: float = 0.1
    rank: int = 2
    seed: int = 0
    patch: bool = True

    PRESETS: ClassVar[dict[str, dict]] = {
        "embedded": dict(layers=[3, 9, 10, 17]),
        "meta-llama/Llama-3.1-8B": dict(layers=[11, 12, 13, 31]),
        "Qwen/Qwen2-7B": dict(layers=[19, 20, 21, 27]),
        "bigscience/bloomz-7b1-mt": dict(layers=[9, 10, 11, 29]),
        "tiny-gpt2": dict(layers=[1], scale=0.5),
    }

    def validate(self, wb=None):
        super().validate(wb)
        if self.rank < 1:
            raise InputError(f"rank must be 1 or more, got {self.rank}.")


@pytest.mark.parametrize("name, key", [
    ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
    ("META-LLAMA/llama-3.1-8b", "meta-llama/Llama-3.1-8B"),
    ("/models/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
    ("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
    ("Qwen2-7B", "Qwen/Qwen2-7B"),
    ("bigscience/bloomz-7b1-mt", "bigscience/bloomz-7b1-mt"),
    ("embedded", "embedded"),
])
def test_preset_by_name(name, key):
    assert DummyHParams.preset_name(name) == key
    assert DummyHParams.preset(name).layers == DummyHParams.PRESETS[key]["layers"]


def fake_wb(family, n_layers, d_model, spec="my-finetune", name="my-finetune"):
    return SimpleNamespace(spec=spec, name=name, arch=SimpleNamespace(family=family), n_layers=n_layers,
                           d_model=d_model, model=SimpleNamespace(config=SimpleNamespace(_name_or_path=spec)))


def test_preset_by_workbench_name_then_family_and_size():
    assert DummyHParams.preset(tiny_wb("gpt2")) == DummyHParams(layers=[1], scale=0.5)  # by spec
    assert DummyHParams.preset_name(fake_wb("qwen2", 28, 3584, "Qwen/Qwen2-7B-Instruct")) == "Qwen/Qwen2-7B"
    assert DummyHParams.preset_name(fake_wb("gemma3_text", 18, 640, "/tmp/x", EMBEDDED_NAME)) == "embedded"
    with pytest.raises(InputError, match=r"No DummyHParams preset for 'my-finetune' \(qwen3, 36 layers, "
                                         r"d_model 4096\)\. Presets: embedded, meta-llama/Llama-3.1-8B"):
        DummyHParams.preset(fake_wb("qwen3", 36, 4096))
    with pytest.raises(InputError, match="HParams has no presets"):
        HParams.preset("embedded")


def test_hparams_plain_data_and_field_checks():
    hp = DummyHParams(layers=(np.int64(1), 2), scale=0.25)
    assert hp.layers == [1, 2] and all(type(x) is int for x in hp.layers)
    assert DummyHParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp
    with pytest.raises(InputError, match=r"DummyHParams has no field\(s\) 'betta'; its fields are"):
        DummyHParams.from_dict({"layers": [1], "betta": 0.1})
    with pytest.raises(InputError, match="layers must be whole numbers"):
        DummyHParams(layers=[1.5])
    with pytest.raises(InputError, match="rank must be 1 or more"):
        DummyEditor(DummyHParams(rank=0))


def test_declared_bounds_are_checked_in_one_place_and_merge_over_subclasses():
    from numbers import Integral, Real

    from editors.hparams import Interval, Options

    @dataclass
    class Base(HParams):
        rate: float = 0.5
        steps: int = 3
        mode: str = "a"

        BOUNDS: ClassVar[dict] = {"rate": Interval(Real, 0, 1, closed="left"),
                                  "steps": Interval(Integral, 1, None, closed="left"),
                                  "mode": Options("mode", ("a", "b"))}

    @dataclass
    class Child(Base):
        BOUNDS: ClassVar[dict] = {"rate": Interval(Real, 0, None, closed="neither")}

    Base().validate()
    for kwargs, message in [(dict(rate=1.0), r"rate must be a number in \[0, 1\), got 1.0"),
                            (dict(rate=True), "rate must be a number in"),
                            (dict(rate=float("nan")), "rate must be a number in"),
                            (dict(steps=0), "steps must be a whole number >= 1, got 0"),
                            (dict(steps=2.0), "steps must be a whole number >= 1, got 2.0"),
                            (dict(mode="c"), "Unknown mode 'c'; use one of: a, b")]:
        with pytest.raises(InputError, match=message):
            Base(**kwargs).validate()
    Child(rate=5.0).validate()  # the subclass's bound replaces its parent's
    with pytest.raises(InputError, match="rate must be a number > 0, got 0"):
        Child(rate=0).validate()
    with pytest.raises(InputError, match="steps must be a whole number >= 1"):
        Child(steps=-1).validate()  # the parent's other bounds still hold
    assert set(Child.bounds()) == {"rate", "steps", "mode"}


# ============================================================= apply / revert


def random_term(rng: np.random.Generator, param: torch.Tensor, gen: torch.Generator):
    if param.ndim == 2 and rng.random() < 0.5:
        r = int(rng.integers(1, 4))
        return (torch.randn(param.shape[0], r, generator=gen) * 0.1, torch.randn(r, param.shape[1], generator=gen))
    return torch.randn(param.shape, generator=gen) * 0.1


def random_edit(rng: np.random.Generator, wb: Workbench, gen: torch.Generator) -> Edit:
    state = dict(wb.model.named_parameters(remove_duplicate=False))  # tied names too
    names = sorted(state)
    chosen = rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)
    weights = {names[i]: [random_term(rng, state[names[i]], gen) for _ in range(int(rng.integers(1, 3)))]
               for i in chosen}
    patches = []
    if rng.random() < 0.5:
        neurons = torch.from_numpy(rng.choice(wb.n_neurons, size=4, replace=False))
        patches.append(ActivationPatch(int(rng.integers(wb.n_layers)), neurons, torch.randn(4, generator=gen),
                                       {"en": ["France"]}))
    return Edit(weights, patches)


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every state_dict name -> the first name of the tensor it shares storage with (tied weights)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(t.data_ptr(), name) for name, t in model.state_dict().items()}


def add_edit(expected: dict[str, torch.Tensor], edit: Edit, canon: dict[str, str]) -> dict[str, torch.Tensor]:
    """What applying ``edit`` makes of the parameters: each term added in order, as p.add_(term) does."""
    out = dict(expected)
    for name, terms in edit.weights.items():
        key = canon[name]
        for term in terms:
            out[key] = out[key] + (term.full if term.kind == "full" else term.u @ term.v)
    return out


def assert_params_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor], canon: dict[str, str]) -> None:
    state = model.state_dict()
    for name, key in canon.items():
        assert torch.equal(state[name], expected[key]), name


class Boom(Exception):
    pass


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_revert_compose_property(family):
    """8 seeded random sequences per family (32 in all): nested applications, compositions, an edit applied
    twice (refused), exceptions at random depths. Inside, every parameter is original + the terms in order;
    after every exit, every tensor of the state dict is bit-identical to what it was before."""
    wb = tiny_wb(family)
    model = wb.model
    canon = canonical_names(model)
    original = snapshot(model)
    hooks = hook_count(model)
    ids = wb.tokenizer(["People in France speak"], return_tensors="pt")["input_ids"]
    for seq in range(8):
        rng = np.random.default_rng([seq, FAMILIES.index(family)])
        gen = torch.Generator().manual_seed(1000 * seq + FAMILIES.index(family))
        edits = [random_edit(rng, wb, gen) for _ in range(int(rng.integers(1, 4)))]
        if len(edits) > 1 and rng.random() < 0.4:
            i = int(rng.integers(len(edits) - 1))
            edits[i:i + 2] = [edits[i] + edits[i + 1]] if rng.random() < 0.5 else [Edit.compose(*edits[i:i + 2])]
        raise_at = int(rng.integers(len(edits) + 1))  # len(edits): no exception
        twice_at = int(rng.integers(len(edits) + 2))  # >= len(edits): no second application

        def nested(depth: int, expected: dict[str, torch.Tensor]) -> None:
            if depth == len(edits):
                return
            with edits[depth].applied(wb):
                inside = add_edit(expected, edits[depth], canon)
                assert_params_equal(model, inside, canon)
                if twice_at == depth:
                    with pytest.raises(InputError, match="already applied"):
                        with edits[depth].applied(wb):
                            pass
                    assert_params_equal(model, inside, canon)
                if raise_at == depth:
                    with torch.no_grad():
                        model(input_ids=ids)  # the hooks run
                    raise Boom
                nested(depth + 1, inside)
                assert_params_equal(model, inside, canon)  # the inner application unwound to here
            assert_params_equal(model, expected, canon)

        try:
            nested(0, {k: original[k] for k in set(canon.values())})
        except Boom:
            assert raise_at < len(edits)
        else:
            assert raise_at == len(edits)
        assert_bit_identical(model, original)
        assert hook_count(model) == hooks
    assert lock_is_free(wb)


def test_composition_is_bit_identical_to_nesting_and_keeps_low_rank_terms():
    wb = tiny_wb("llama")
    name = down_name(wb, 1)
    gen = torch.Generator().manual_seed(0)
    shape = wb.model.get_parameter(name).shape
    e1 = Edit({name: (torch.randn(shape[0], 2, generator=gen), torch.randn(2, shape[1], generator=gen))})
    e2 = Edit({name: torch.randn(shape, generator=gen) * 0.01, down_name(wb, 0): torch.randn(shape, generator=gen)})
    both = e1 + e2
    assert [t.kind for t in both.weights[name]] == ["low_rank", "full"] and both.meta["method"] == "compose"
    with e1.applied(wb), e2.applied(wb):
        nested = snapshot(wb.model)
    with both.applied(wb):
        assert_bit_identical(wb.model, nested)
    total = e1.delta(name) + e2.delta(name)
    torch.testing.assert_close(both.delta(name), total, rtol=0, atol=1e-6)
    assert Edit.compose().is_empty()


def test_out_of_order_revert_unwinds_later_applications():
    wb = tiny_wb("gpt2")
    original = snapshot(wb.model)
    name = "transformer.h.0.mlp.c_fc.weight"
    shape = wb.model.get_parameter(name).shape
    e1, e2 = Edit({name: torch.ones(shape)}), Edit({name: torch.full(shape, 2.0)})
    first, second = e1.apply(wb), e2.apply(wb)
    assert torch.equal(wb.model.get_parameter(name), original[name] + 1 + 2)
    first.revert()  # also ends `second`
    assert_bit_identical(wb.model, original)
    assert not second.active
    assert not lock_is_free(wb)  # `second` still holds the lock until its own revert
    second.revert()  # nothing left to undo; releases the lock
    assert_bit_identical(wb.model, original)
    assert lock_is_free(wb)


def test_tied_weights_and_the_conv1d_layout_of_gpt2():
    wb = tiny_wb("gpt2")
    original = snapshot(wb.model)
    assert wb.model.get_parameter("lm_head.weight") is wb.model.get_parameter("transformer.wte.weight")
    c_proj = wb.model.get_parameter("transformer.h.1.mlp.c_proj.weight")  # Conv1D: [d_ff, d_model]
    d_ff, d_model = c_proj.shape
    delta = torch.randn(d_ff, d_model)
    ones = torch.ones(original["lm_head.weight"].shape)
    edit = Edit({"transformer.h.1.mlp.c_proj.weight": delta, "lm_head.weight": ones, "transformer.wte.weight": ones})
    with edit.applied(wb):
        assert torch.equal(c_proj, original["transformer.h.1.mlp.c_proj.weight"] + delta)
        assert torch.equal(wb.model.get_parameter("lm_head.weight"), original["lm_head.weight"] + 1 + 1)
    assert_bit_identical(wb.model, original)
    transposed = Edit({"transformer.h.1.mlp.c_proj.weight": delta.T.contiguous()})
    with pytest.raises(InputError, match=r"shape \(32, 80\), but the parameter of tiny-gpt2 has shape \(80, 32\)"):
        with transposed.applied(wb):
            pass
    assert_bit_identical(wb.model, original)


def test_deltas_are_added_in_float32_and_rounded_once_to_the_parameters_dtype():
    model, tok = tiny_model_and_tokenizer("llama")
    wb = Workbench.from_loaded(model.to(torch.bfloat16), tok)
    name = down_name(wb, 2)
    before = wb.model.get_parameter(name).detach().clone()
    delta = torch.randn(before.shape) * 1e-3
    with Edit({name: delta}).applied(wb):
        assert torch.equal(wb.model.get_parameter(name), (before.float() + delta).to(torch.bfloat16))
    assert torch.equal(wb.model.get_parameter(name), before)


MISMATCHES = [
    (lambda wb: Edit({"model.layers.9.mlp.down_proj.weight": torch.zeros(3)}), "which tiny-llama does not have"),
    (lambda wb: Edit({"model.layers.0.mlp.down_proj.weight": torch.zeros(80, 32)}), r"shape \(80, 32\)"),
    (lambda wb: Edit(patches=[ActivationPatch(3, [1], [1.0], {"en": ["France"]})]), r"layer 3, but tiny-llama has 3"),
    (lambda wb: Edit(patches=[ActivationPatch(0, [80], [1.0], {"en": ["France"]})]), r"neuron 80 of layer 0.*\(0-79\)"),
]


@pytest.mark.parametrize("make, message", MISMATCHES)
def test_an_edit_for_another_model_is_refused_before_anything_changes(make, message):
    wb = tiny_wb("llama")
    snap, hooks = snapshot(wb.model), hook_count(wb.model)
    # a valid change first, so a half-applied edit would show
    edit = Edit({down_name(wb, 1): torch.ones(32, 80)}) + make(wb)
    with pytest.raises(InputError, match=message):
        with edit.applied(wb):
            pytest.fail("the body must not run")
    assert_bit_identical(wb.model, snap)
    assert hook_count(wb.model) == hooks
    assert lock_is_free(wb)


def test_bad_deltas_and_patches_are_input_errors():
    with pytest.raises(InputError, match="u \\[rows, r\\] and v \\[r, cols\\]"):
        WeightDelta.of((torch.zeros(3, 2), torch.zeros(3, 4)))
    with pytest.raises(InputError, match="floating point"):
        Edit({"w": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(InputError, match="one delta per neuron"):
        ActivationPatch(0, [1, 2], [1.0], {"en": ["France"]})
    with pytest.raises(InputError, match="lists a neuron twice"):
        ActivationPatch(0, [1, 1], [1.0, 2.0], {"en": ["France"]})
    with pytest.raises(InputError, match="at least one subject"):
        ActivationPatch(0, [1], [1.0], {"en": []})
    with pytest.raises(InputError, match="unknown language code 'xx'"):
        ActivationPatch(0, [1], [1.0], {"xx": ["France"]})
    with pytest.raises(InputError, match="Unknown subject match 'fuzzzy'"):
        ActivationPatch(0, [1], [1.0], {"en": ["France"]}, match="fuzzzy")
    with pytest.raises(InputError, match="threshold must be a number from 0 to 100"):
        ActivationPatch(0, [1], [1.0], {"en": ["France"]}, match="fuzzy", match_threshold=-1)


# ============================================================ activation patches


class NeuronRecorder:
    """Records a layer's neuron activations: registered before an edit it sees them unpatched, after it patched."""

    def __init__(self, wb: Workbench, layer: int):
        self.values: list[torch.Tensor] = []
        self.handle = wb.arch.site(wb.model, layer, "neuron").register_forward_hook(
            lambda module, args, out: self.values.append(out.detach().clone()))

    def remove(self) -> None:
        self.handle.remove()


def last_subject_token(tokenizer, texts: list[str], subject: str, padding_side: str) -> list[int | None]:
    """Per text of the padded batch, the index of the last token covering ``subject`` (found by
    analysis.tokens' character offsets, independently of the edit's token-id matching), or None."""
    tokenizer.padding_side = padding_side
    placeholders = [subject if subject in text else text for text in texts]  # encode wants one subject per text
    mask = encode(tokenizer, texts, placeholders).subject
    return [int(mask[row].nonzero().max()) if subject in text else None for row, text in enumerate(texts)]


PATCH_CASES = [
    ("en", "France", ["The capital of France is", "People in Germany speak", "The official language of France is",
                      "Water boils at one hundred degrees"]),
    ("zh", "法国", ["法国的首都是", "德国的首都是", "我去了法国。", "天气很冷"]),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("lang, subject, texts", PATCH_CASES, ids=["en", "zh"])
def test_patch_changes_the_last_subject_token_by_delta_and_nothing_else(family, padding_side, lang, subject, texts):
    wb = tiny_wb(family)
    tok = wb.tokenizer
    tok.padding_side = padding_side
    layer, neurons = 1, torch.tensor([2, 7, 11, 40])
    delta = torch.tensor([1.5, -0.75, 0.25, 3.0])
    edit = Edit(patches=[ActivationPatch(layer, neurons, delta, {lang: [subject]})])
    enc = tok(texts, return_tensors="pt", padding=True)
    inputs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                  position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    if family == "bloom":
        inputs.pop("position_ids")
    expected_rows = last_subject_token(tok, texts, subject, padding_side)
    with torch.no_grad():
        unedited = wb.model(**inputs).logits
        before = NeuronRecorder(wb, layer)
        try:
            with edit.applied(wb):
                after = NeuronRecorder(wb, layer)
                edited = wb.model(**inputs).logits
                after.remove()
        finally:
            before.remove()
    a, b = after.values[0], before.values[0]
    expected = b.clone()
    for row, pos in enumerate(expected_rows):
        if pos is not None:
            expected[row, pos, neurons] = b[row, pos, neurons] + delta
    assert torch.equal(a, expected)
    assert (a != b).sum() == 4 * sum(p is not None for p in expected_rows)
    for row, pos in enumerate(expected_rows):
        if pos is None:
            assert torch.equal(edited[row], unedited[row])  # rows without the subject: bit-identical
        else:
            assert not torch.equal(edited[row], unedited[row])
    # and each row without the subject alone computes what the unedited model computes
    with torch.no_grad(), edit.applied(wb):
        alone = wb.model(**tok(texts[1:2], return_tensors="pt")).logits
    with torch.no_grad():
        assert torch.equal(alone, wb.model(**tok(texts[1:2], return_tensors="pt")).logits)


def test_patch_during_generation_with_a_kv_cache():
    wb = tiny_wb("llama")
    tok = wb.tokenizer
    layer, neurons, delta = 1, torch.tensor([0, 5]), torch.tensor([4.0, -4.0])
    edit = Edit(patches=[ActivationPatch(layer, neurons, delta, {"en": ["France"]})])
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True,
              pad_token_id=tok.pad_token_id)
    without = tok(["People in Germany speak"], return_tensors="pt")
    with torch.no_grad():
        plain = wb.model.generate(**without, **kw)
        with edit.applied(wb):
            patched = wb.model.generate(**without, **kw)
    assert torch.equal(plain.sequences, patched.sequences)
    assert all(torch.equal(x, y) for x, y in zip(plain.scores, patched.scores))
    tok.padding_side = "left"  # a left-padded batch: the row without the subject generates as unedited
    mixed = tok(["The capital of France is", "People in Germany speak"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = wb.model.generate(**mixed, **kw)
        with edit.applied(wb):
            patched = wb.model.generate(**mixed, **kw)
    assert torch.equal(plain.sequences[1], patched.sequences[1])
    assert all(torch.equal(x[1], y[1]) for x, y in zip(plain.scores, patched.scores))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(plain.scores, patched.scores))
    tok.padding_side = "right"

    with_subject = tok(["The capital of France is"], return_tensors="pt")
    position = last_subject_token(tok, ["The capital of France is"], "France", "right")[0]
    with torch.no_grad():
        before = NeuronRecorder(wb, layer)
        try:
            with edit.applied(wb):
                after = NeuronRecorder(wb, layer)
                out = wb.model.generate(**with_subject, **kw)
                after.remove()
        finally:
            before.remove()
    steps = len(after.values)
    assert steps == out.sequences.shape[1] - with_subject["input_ids"].shape[1] > 1
    assert after.values[0].shape[1] == with_subject["input_ids"].shape[1]
    expected = before.values[0].clone()
    expected[0, position, neurons] += delta
    assert torch.equal(after.values[0], expected)  # prefill: the subject's last token only
    generated = tok.convert_ids_to_tokens(out.sequences[0, with_subject["input_ids"].shape[1]:].tolist())
    assert "ĠFrance" not in generated
    for step in range(1, steps):  # later steps (one new token each, no subject): nothing added
        assert after.values[step].shape[1] == 1
        assert torch.equal(after.values[step], before.values[step])


def test_subject_variants_leading_space_contexts_and_normalized_match():
    tok = tiny_wb().tokenizer
    names = lambda variants: [tok.convert_ids_to_tokens(list(v)) for v in variants]  # noqa: E731
    assert names(subject_token_variants(tok, ["France"])) == [["ĠFrance"], ["F", "ran", "ce"]]
    # byte-level BPE merges "首都" into "的首都是" inside this sentence: the context supplies that variant
    merged = ["çļĦé¦ĸéĥ½æĺ¯"]  # "的首都是", one token
    assert merged not in names(subject_token_variants(tok, ["首都"]))
    assert merged in names(subject_token_variants(tok, ["首都"], ["法国的首都是巴黎。"]))
    exact = set(subject_token_variants(tok, ["France"], match="exact"))
    normalized = set(subject_token_variants(tok, ["France"], match="normalized"))
    assert exact < normalized and tuple(tok(" france", add_special_tokens=False)["input_ids"]) in normalized
    # full-width letters and doubled spaces in the subject are NFKC / whitespace-normalised
    assert exact <= set(subject_token_variants(tok, ["Ｆｒａｎｃｅ"], match="normalized"))
    two = set(subject_token_variants(tok, ["Albert  Einstein"], match="normalized"))
    assert set(subject_token_variants(tok, ["Albert Einstein"])) <= two


@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_subject_matcher_against_a_brute_force_reference(chunk, monkeypatch):
    """Many groups, variants shared between groups and overlapping occurrences, on a small vocabulary (many
    hits); also with tiny comparison blocks."""
    monkeypatch.setattr(SubjectMatcher, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    groups = [[tuple(torch.randint(4, 10, (int(k),), generator=gen).tolist())
               for k in torch.randint(1, 4, (3,), generator=gen)] for _ in range(20)]
    groups[5] = groups[3][:2]
    ids = torch.randint(4, 10, (5, 17), generator=gen)
    got = SubjectMatcher(groups).positions(ids)
    for g, variants in enumerate(groups):
        expected = sorted({(b, j + len(v) - 1) for v in variants for b in range(5) for j in range(17 - len(v) + 1)
                           if tuple(ids[b, j:j + len(v)].tolist()) == v})
        actual = list(zip(*(t.tolist() for t in got[g]))) if g in got else []
        assert actual == expected, g
    assert SubjectMatcher(groups).positions(ids[:, :0]) == {}


def test_normalized_match_patches_lower_case_text_and_exact_does_not():
    wb = tiny_wb("llama")
    text = ["the capital of france is"]
    ids = wb.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        plain = wb.model(**ids).logits
        for match, changes in (("exact", False), ("normalized", True)):
            patch = ActivationPatch(1, [3], [5.0], {"en": ["France"]}, match=match)
            with Edit(patches=[patch]).applied(wb):
                assert (not torch.equal(wb.model(**ids).logits, plain)) == changes


def test_patch_contexts_from_requests_and_calls_without_token_ids():
    wb = tiny_wb("llama")
    patch = ActivationPatch.for_requests(0, [1], [1.0], [france_request()])
    assert patch.subjects == {"en": ["France"], "zh": ["法国"]}
    assert "法国的首都是" in patch.contexts["zh"]
    with Edit(patches=[patch]).applied(wb):
        with pytest.raises(InputError, match="must be called with input_ids"):
            with torch.no_grad():
                wb.model(inputs_embeds=torch.randn(1, 4, wb.d_model))


# =================================================================== save / load


def sample_edit(wb: Workbench) -> Edit:
    gen = torch.Generator().manual_seed(3)
    shape = wb.model.get_parameter(down_name(wb, 0)).shape
    weights = {down_name(wb, 0): [torch.randn(shape, generator=gen) * 0.1,
                                  (torch.randn(shape[0], 2, generator=gen), torch.randn(2, shape[1], generator=gen))],
               down_name(wb, 2): (torch.randn(shape[0], 1, generator=gen), torch.randn(1, shape[1], generator=gen))}
    patch = ActivationPatch.for_requests(1, torch.tensor([4, 9]), torch.tensor([2.0, -1.0]), [france_request()],
                                         match="normalized")
    meta = {"method": "sample", "note": np.int64(3), "requests": [france_request().to_dict()]}
    return Edit(weights, [patch], meta=meta)


def outputs(wb: Workbench, edit: Edit | None) -> torch.Tensor:
    ids = wb.tokenizer(["The capital of France is", "法国的首都是", "People in Germany speak"], return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        if edit is None:
            return wb.model(**ids).logits
        with edit.applied(wb):
            return wb.model(**ids).logits


def test_save_load_round_trip(tmp_path):
    wb = tiny_wb("llama")
    edit = sample_edit(wb)
    folder = edit.save(tmp_path / "edits" / "france")
    assert sorted(p.name for p in folder.iterdir()) == ["edit.json", "edit.safetensors"]
    loaded = Edit.load(folder)
    assert loaded.meta == json.loads(json.dumps(edit.meta, default=int))
    assert loaded.param_names == edit.param_names
    for name in edit.weights:
        for t1, t2 in zip(edit.weights[name], loaded.weights[name]):
            assert t1.kind == t2.kind and all(torch.equal(t1.tensors()[k], t2.tensors()[k]) for k in t1.tensors())
    p1, p2 = edit.patches[0], loaded.patches[0]
    assert (p1.layer, p1.subjects, p1.contexts, p1.match) == (p2.layer, p2.subjects, p2.contexts, p2.match)
    assert torch.equal(outputs(wb, loaded), outputs(wb, edit))
    assert not torch.equal(outputs(wb, loaded), outputs(wb, None))
    # saving again over it replaces it; a folder holding other files is refused
    (edit + edit).save(folder)
    assert len(Edit.load(folder).weights[down_name(wb, 0)]) == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a saved edit"):
        edit.save(tmp_path / "other")


def test_a_failed_save_leaves_no_half_edit_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import safetensors.torch

    wb = tiny_wb("llama")
    edit = sample_edit(wb)
    target = tmp_path / "edit"

    def half_write_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        edit.save(target)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary folder
    monkeypatch.undo()
    edit.save(target)
    monkeypatch.setattr(safetensors.torch, "save_file", half_write_then_fail)
    with pytest.raises(OSError):
        Edit({down_name(wb, 1): torch.ones(32, 80)}).save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["edit"]
    assert torch.equal(outputs(wb, Edit.load(target)), outputs(wb, edit))  # the earlier save, intact


def test_damaged_or_missing_files_are_neuroglot_errors(tmp_path):
    wb = tiny_wb("llama")
    edit = sample_edit(wb)
    with pytest.raises(NeuroglotError, match="No saved edit at"):
        Edit.load(tmp_path / "nowhere")
    good = edit.save(tmp_path / "good")

    def damaged(name: str, change) -> None:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        with pytest.raises(NeuroglotError) as info:
            Edit.load(folder)
        assert str(folder) in str(info.value)

    def truncate(folder):
        data = (folder / "edit.safetensors").read_bytes()
        (folder / "edit.safetensors").write_bytes(data[: len(data) // 2])

    def flip_a_byte(folder):
        data = bytearray((folder / "edit.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (folder / "edit.safetensors").write_bytes(bytes(data))

    def bad_json(folder):
        (folder / "edit.json").write_text("{ not json")

    def other_tensors(folder):
        Edit({down_name(wb, 1): torch.ones(32, 80)}).save(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "edit.safetensors", folder / "edit.safetensors")

    def missing_tensor_entry(folder):
        layout = json.loads((folder / "edit.json").read_text())
        layout["weights"]["model.layers.1.mlp.down_proj.weight"] = [{"kind": "full", "shape": [32, 80]}]
        (folder / "edit.json").write_text(json.dumps(layout))

    for name, change in [("truncated", truncate), ("flipped", flip_a_byte), ("json", bad_json),
                         ("mismatch", other_tensors), ("missing", missing_tensor_entry),
                         ("no-tensors", lambda f: (f / "edit.safetensors").unlink())]:
        damaged(name, change)


# ============================================================ editors, registry


@register("dummy-random")
class DummyEditor(Editor):
    """Returns a fixed random low-rank delta on each layer's down-projection and a patch keyed by the subjects."""

    hparams_class = DummyHParams
    calls: ClassVar[int] = 0

    def _compute(self, wb, requests, hparams):
        type(self).calls += 1
        gen = torch.Generator().manual_seed(hparams.seed)
        weights = {}
        for layer in hparams.layer_indices(wb):
            rows, cols = wb.arch.site(wb.model, layer, "down_proj").weight.shape
            weights[wb.arch.site_path(layer, "down_proj") + ".weight"] = (
                torch.randn(rows, hparams.rank, generator=gen) * hparams.scale,
                torch.randn(hparams.rank, cols, generator=gen))
        patches = []
        if hparams.patch:
            layer = hparams.layer_indices(wb)[0]
            patches.append(ActivationPatch.for_requests(layer, [0, 1], torch.randn(2, generator=gen), requests))
        return Edit(weights, patches, meta={"located": {"layers": hparams.layer_indices(wb)}})


def test_get_editor_validates_computes_and_fills_meta():
    wb = tiny_wb("gpt2")
    snap = snapshot(wb.model)
    editor = get_editor("Dummy-Random", {"layers": [0, -1], "rank": 3})
    assert isinstance(editor, DummyEditor) and editor.hparams == DummyHParams(layers=[0, -1], rank=3)
    edit = editor.compute(wb, EditRequest({"ZH-CN": zh_fact(), "en": en_fact()}, "c7"))
    assert_bit_identical(wb.model, snap)  # editors never change the model
    assert edit.param_names == ["transformer.h.0.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
    assert [t.rank for ts in edit.weights.values() for t in ts] == [3, 3]
    meta = edit.meta
    assert meta["method"] == "dummy-random" and meta["located"] == {"layers": [0, 2]}
    assert meta["hparams"] == {"layers": [0, -1], "scale": 0.1, "rank": 3, "seed": 0, "patch": True}
    assert meta["requests"][0]["case_id"] == "c7" and list(meta["requests"][0]["facts"]) == ["zh", "en"]
    assert meta["model"]["name"] == "tiny-gpt2" and meta["model"]["layers"] == 3
    assert {"created", "versions"} <= set(meta) and "torch" in meta["versions"]
    assert edit.patches[0].subjects == {"zh": ["法国"], "en": ["France"]}
    # without hyper-parameters: the model's preset (tiny-gpt2 is in DummyHParams.PRESETS)
    assert get_editor("dummy-random").compute(wb, [france_request()]).meta["hparams"]["scale"] == 0.5
    with pytest.raises(InputError, match=r"No DummyHParams preset for 'tiny-llama' \(llama, 3 layers"):
        get_editor("dummy-random").compute(tiny_wb("llama"), [france_request()])


def test_editor_validation_happens_before_compute():
    wb = tiny_wb("llama")
    calls = DummyEditor.calls
    with pytest.raises(InputError, match="No edit requests"):
        DummyEditor(DummyHParams(layers=[1])).compute(wb, [])
    with pytest.raises(InputError, match="Layer 5 is out of range"):
        DummyEditor(DummyHParams(layers=[5])).compute(wb, [france_request()])
    with pytest.raises(InputError, match="takes DummyHParams, got HParams"):
        DummyEditor(HParams(layers=[1]))
    assert DummyEditor.calls == calls


def test_progress_of_an_editor_without_steps_reports_its_start_and_end():
    """``compute(progress=...)``: an editor whose ``_compute`` takes no ``progress`` gets its start and end
    reported; one that takes it gets the callback itself."""
    wb = tiny_wb("gpt2")
    seen: list[tuple[float, str]] = []
    DummyEditor(DummyHParams(layers=[1])).compute(wb, [france_request()], progress=lambda f, m: seen.append((f, m)))
    assert seen[0][0] == 0.0 and seen[-1] == (1.0, "done") and any("computing" in m for _, m in seen)

    class Stepping(DummyEditor):
        def _compute(self, wb, requests, hparams, progress=None):
            progress(0.5, "half way")
            return super()._compute(wb, requests, hparams)

    seen.clear()
    Stepping(DummyHParams(layers=[1])).compute(wb, [france_request()], progress=lambda f, m: seen.append((f, m)))
    assert (0.5, "half way") in seen and seen[-1] == (1.0, "done")


def test_registry_lists_editors_and_names_the_known_ones_on_a_typo():
    assert "dummy-random" in available_editors()
    with pytest.raises(InputError, match=r"Unknown editor 'memlaa'; known editors: .*dummy-random"):
        get_editor("memlaa")
    with pytest.raises(ValueError, match="Two editors named 'dummy-random'"):
        @register("dummy-random")
        class Other(Editor):  # noqa: F841
            def _compute(self, wb, requests, hparams):
                return Edit()
    with pytest.raises(TypeError, match="needs an Editor subclass"):
        register("not-an-editor")(dict)


def test_an_edit_computed_and_applied_end_to_end_round_trips(tmp_path):
    wb = tiny_wb("bloom")
    snap = snapshot(wb.model)
    edit = get_editor("dummy-random", DummyHParams(layers=[1, 2], scale=0.5)).compute(wb, [france_request()])
    again = Edit.load(edit.save(tmp_path / "e"))
    assert again.meta == edit.meta
    assert torch.equal(outputs(wb, again), outputs(wb, edit))
    assert_bit_identical(wb.model, snap)


# ====================================================================== embedded


@pytest.mark.slow
def test_patch_on_the_embedded_model_english_and_chinese():
    """Gemma 3's SentencePiece tokenizer: '▁Eiffel ▁Tower' mid-sentence and 'E iffel' at the start; Chinese
    characters one per token. Rows without the subject stay bit-identical in a padded batch."""
    from analysis.model import load_model

    wb = load_model("embedded", device="cpu")
    texts = ["The Eiffel Tower is located in the city of", "埃菲尔铁塔位于", "Eiffel Tower is in",
             "The Colosseum is located in the city of", "长城位于"]
    subjects = {"en": ["Eiffel Tower"], "zh": ["埃菲尔铁塔"]}
    layer, neurons = 9, torch.tensor([10, 500, 1500])
    edit = Edit(patches=[ActivationPatch(layer, neurons, torch.tensor([3.0, -3.0, 1.0]), subjects)])
    wb.tokenizer.padding_side = "left"
    enc = wb.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = wb.model(**enc).logits[:, -1]
        before = NeuronRecorder(wb, layer)
        try:
            with edit.applied(wb):
                after = NeuronRecorder(wb, layer)
                edited = wb.model(**enc).logits[:, -1]
                after.remove()
        finally:
            before.remove()
    changed = (after.values[0] != before.values[0]).any(-1)  # [B, T]
    subject_of = ["Eiffel Tower", "埃菲尔铁塔", "Eiffel Tower", None, None]
    for row, subject in enumerate(subject_of):
        if subject is None:
            assert not changed[row].any() and torch.equal(edited[row], plain[row])
        else:
            last = last_subject_token(wb.tokenizer, texts[row:row + 1], subject, "left")[0]
            offset = enc["input_ids"].shape[1] - len(wb.tokenizer(texts[row])["input_ids"])
            assert changed[row].nonzero().flatten().tolist() == [offset + last]
