"""editors.memit: ROME, MEMIT and AlphaEdit (M-ROME / M-MEMIT of papers/lu-lafns.md §4.2) on tiny models.

ROME's exact multi-pair constraint, MEMIT/AlphaEdit lowering the new target's NLL in every language,
AlphaEdit's null-space property, GPT-2's [in, out] layout and Gemma 3's sandwich norm, no mutation of the
model (also on errors), hyper-parameter validation and presets. The embedded model in a slow test."""
from __future__ import annotations

import os
import time

import pytest
import torch

import editors.memit as memit
from analysis.errors import InputError
from analysis.model import Workbench
from analysis.stats import cached_key_statistics
from data.flores import statistics_texts
from editors.base import available_editors, get_editor
from editors.edit import Edit
from editors.memit import (
    AlphaEditEditor,
    AlphaEditHParams,
    MEMITEditor,
    MEMITHParams,
    ROMEEditor,
    ROMEHParams,
    fact_contexts,
    fact_keys,
    nullspace_projection,
)
from editors.requests import EditRequest, LanguageFact
from tests.tiny import MZSRE_DEV, assert_bit_identical, hook_count, snapshot, target_nll, tiny_workbench

FAMILIES = ("llama", "gpt2", "gemma3_text")
PAPER_MODELS = ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2-7B", "bigscience/bloomz-7b1-mt")


_USER_CACHE: dict[str, str | None] = {}


@pytest.fixture(scope="module", autouse=True)
def stats_cache(tmp_path_factory):
    """Key statistics of the tiny models go to a temporary cache (FLORES-200 from ../shared/data)."""
    before = os.environ.get("NEUROGLOT_CACHE")
    _USER_CACHE["NEUROGLOT_CACHE"] = before
    os.environ["NEUROGLOT_CACHE"] = str(tmp_path_factory.mktemp("memit-cache"))
    yield
    if before is None:
        os.environ.pop("NEUROGLOT_CACHE", None)
    else:
        os.environ["NEUROGLOT_CACHE"] = before


#: Tiny random models can be over-fitted: a large step, no clamp or decay, two short prefixes, 2000 tokens
#: of statistics, and (MEMIT/AlphaEdit) a small λ: the tiny keys' second moment is O(1), not O(1/15000).
TINY = dict(v_lr=1.0, v_num_grad_steps=40, clamp_norm_factor=0.0, v_weight_decay=0.0,
            context_template_length_params=[[5, 2]], mom2_n_tokens=2000)


def tiny_hparams(name: str, **kw):
    fields = dict(TINY)
    if name == "rome":
        fields.update(layers=[1])
        fields.update(kw)
        return ROMEHParams(**fields)
    fields.update(layers=[0, 1], mom2_update_weight=1.0)
    if name == "alphaedit":
        fields.update(nullspace_threshold=0.05, nullspace_relative=True, l2=1.0)
        fields.update(kw)
        return AlphaEditHParams(**fields)
    fields.update(kw)
    return MEMITHParams(**fields)


EDITORS = {"rome": ROMEEditor, "memit": MEMITEditor, "alphaedit": AlphaEditEditor}


def berlin_request(languages=("en", "zh")) -> EditRequest:
    """Prompts that end with their subject (the edit acts at the predicting position); easy targets."""
    facts = {
        "en": LanguageFact("The capital of France", "France", "Berlin"),
        "zh": LanguageFact("首都是法国", "法国", "柏林"),
        "de": LanguageFact("Die Hauptstadt von Frankreich", "Frankreich", "Berlin"),
    }
    return EditRequest({lang: facts[lang] for lang in languages}, "france")


def down_name(wb: Workbench, layer: int) -> str:
    weight = wb.arch.site(wb.model, layer, "down_proj").weight
    return next(n for n, p in wb.model.named_parameters() if p is weight)


# ================================================================= registry, hparams


def test_registered_with_hparams_classes():
    assert {"rome", "memit", "alphaedit"} <= set(available_editors())
    assert isinstance(get_editor("ROME"), ROMEEditor)
    assert isinstance(get_editor("memit", {"layers": [0, 1]}).hparams, MEMITHParams)
    assert issubclass(AlphaEditHParams, MEMITHParams)
    assert issubclass(ROMEHParams, memit.KeyValueHParams) and issubclass(MEMITHParams, memit.KeyValueHParams)


@pytest.mark.parametrize("model", PAPER_MODELS + ("embedded",))
def test_presets_resolve_by_name(model):
    rome, mem, alpha = (cls.preset(model) for cls in (ROMEHParams, MEMITHParams, AlphaEditHParams))
    for hp in (rome, mem, alpha):
        hp.validate()
        assert hp.kl_factor == 0.0625 and hp.v_num_grad_steps == (20 if model == "embedded" else 25)
    if model == "embedded":
        assert rome.layers == [4] and mem.layers == alpha.layers == [2, 3, 4, 5, 6]
        assert rome.mom2_n_tokens == mem.mom2_n_tokens == 20_000
    else:
        assert rome.layers == [5] and mem.layers == alpha.layers == [4, 5, 6, 7, 8]
        assert mem.mom2_update_weight == 15000 and alpha.nullspace_threshold == 2e-2
    assert ROMEHParams.preset("Llama-3.1-8B").layers == [5]    # by the last part of the name, too


def test_bad_layer_is_an_input_error_before_any_work(monkeypatch):
    wb = tiny_workbench("llama")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the hyper-parameters were checked")

    monkeypatch.setattr(memit, "compute_target", no_work)
    monkeypatch.setattr(memit, "fact_contexts", no_work)
    for name, hp in (("rome", tiny_hparams("rome", layers=[7])), ("memit", tiny_hparams("memit", layers=[1, 9])),
                     ("alphaedit", tiny_hparams("alphaedit", layers=[-4]))):
        with pytest.raises(InputError, match=r"out of range.*3 layers \(0-2"):
            EDITORS[name](hp).compute(wb, berlin_request())
    with pytest.raises(InputError, match="exactly one layer"):
        ROMEEditor(ROMEHParams(layers=[0, 1])).compute(wb, berlin_request())
    for bad in (dict(v_lr=0), dict(v_num_grad_steps=0), dict(context_template_length_params=[[5]]),
                dict(empty_prefix=False, context_template_length_params=[[5, 0]])):
        with pytest.raises(InputError):
            MEMITEditor(tiny_hparams("memit", **bad))
    with pytest.raises(InputError, match="nullspace_threshold"):
        AlphaEditEditor(tiny_hparams("alphaedit", nullspace_threshold=0))


# ================================================================= all editors, all families


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["rome", "memit", "alphaedit"])
def test_edit_lowers_nll_in_every_language_and_leaves_model_untouched(name, family):
    wb = tiny_workbench(family)
    request = berlin_request()
    snap, hooks = snapshot(wb.model), hook_count(wb.model)
    flags = [p.requires_grad for p in wb.model.parameters()]
    edit = EDITORS[name](tiny_hparams(name)).compute(wb, request)
    assert_bit_identical(wb.model, snap)
    assert hook_count(wb.model) == hooks and not wb.model.training
    assert [p.requires_grad for p in wb.model.parameters()] == flags

    layers = [1] if name == "rome" else [0, 1]
    assert sorted(edit.weights) == sorted(down_name(wb, layer) for layer in layers)
    for param_name, terms in edit.weights.items():
        assert terms[0].kind == "low_rank" and terms[0].rank == 2                  # one pair per language
        assert tuple(terms[0].shape) == tuple(wb.model.get_parameter(param_name).shape)
    records = edit.meta[name]["facts"]
    assert [r["language"] for r in records] == ["en", "zh"]
    assert all(r["final_nll"] < r["initial_nll"] for r in records)

    before = {lang: target_nll(wb, f.prompt, f.target_new) for lang, f in request.facts.items()}
    with edit.applied(wb):
        after = {lang: target_nll(wb, f.prompt, f.target_new) for lang, f in request.facts.items()}
    assert_bit_identical(wb.model, snap)
    for lang in request.facts:
        assert after[lang] < before[lang] - 0.1, (lang, before, after)
    if name != "rome" and family == "gemma3_text":      # the sandwich norm was inverted at each layer
        assert all(0 < info["post_ffn_norm_fit"] <= 1.0 for info in edit.meta[name]["layers"])


def _failing_on_call(real, n: int, message: str):
    """``real``, except that its ``n``-th call raises RuntimeError(message)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("name", ["rome", "memit", "alphaedit"])
def test_model_untouched_when_compute_raises(name, monkeypatch):
    """Errors inside the optimisation (hooks registered) and inside the layer loop (an earlier layer's
    update applied) leave parameters, flags, training mode and hooks as they were."""
    wb = tiny_workbench("llama")
    first = next(wb.model.parameters())
    first.requires_grad_(True)
    wb.model.train()
    try:
        snap, hooks = snapshot(wb.model), hook_count(wb.model)
        flags = [p.requires_grad for p in wb.model.parameters()]
        EDITORS[name](tiny_hparams(name)).compute(wb, berlin_request())  # caches the prefixes: the next
        real_forward_inputs = wb.forward_inputs                              # forwards are the optimisation's
        failing = _failing_on_call(real_forward_inputs, 3, "boom in the optimisation")
        monkeypatch.setattr(wb, "forward_inputs", failing)
        with pytest.raises(RuntimeError, match="boom in the optimisation"):
            EDITORS[name](tiny_hparams(name)).compute(wb, berlin_request())
        monkeypatch.setattr(wb, "forward_inputs", real_forward_inputs)
        if name != "rome":
            update = "memit_update" if name == "memit" else "alphaedit_update"
            monkeypatch.setattr(memit, update, _failing_on_call(getattr(memit, update), 2, "boom in the second layer"))
            with pytest.raises(RuntimeError, match="boom in the second layer"):
                EDITORS[name](tiny_hparams(name)).compute(wb, berlin_request())
        assert_bit_identical(wb.model, snap)
        assert hook_count(wb.model) == hooks and wb.model.training
        assert [p.requires_grad for p in wb.model.parameters()] == flags
    finally:
        first.requires_grad_(False)
        wb.model.eval()


@pytest.mark.parametrize("name", ["rome", "memit"])
def test_progress_reports_every_target_step_the_statistics_and_the_insertion(name):
    wb = tiny_workbench("llama")
    hp = tiny_hparams(name, v_num_grad_steps=3)
    seen: list[tuple[float, str]] = []
    edit = EDITORS[name](hp).compute(wb, berlin_request(), progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    messages = " | ".join(m for _, m in seen)
    for lang in ("en", "zh"):
        assert f"target value of france/{lang}" in messages
    assert "step 3/3" in messages and "inserting 2 key-value pair(s)" in messages
    if name == "memit":
        assert "key statistics" in messages
    plain = EDITORS[name](hp).compute(wb, berlin_request())
    assert all(torch.equal(edit.delta(n), plain.delta(n)) for n in edit.param_names)


# ================================================================= ROME


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rome_exact_constraint_for_every_language(family):
    """(W + Δ) k_l = v_l = W k_l + b + δ_l for each language's key, and only that layer changes."""
    wb = tiny_workbench(family)
    request = berlin_request(("en", "zh", "de"))
    hp = tiny_hparams("rome", v_num_grad_steps=5)
    editor = ROMEEditor(hp)
    edit = editor.compute(wb, request)
    name = down_name(wb, 1)
    assert list(edit.weights) == [name] and edit.weights[name][0].rank == 3
    keys = fact_keys(wb, 1, fact_contexts(wb, [request.validate(wb)], hp)).double()
    torch.testing.assert_close(keys, editor.keys_, rtol=1e-5, atol=1e-6)      # the keys are the model's keys
    resid = editor.resid_                                                     # δ_l, one row per language
    for r, d in zip(edit.meta["rome"]["facts"], resid):
        assert abs(r["delta_norm"] - float(d.norm())) < 1e-3 * max(1.0, r["delta_norm"])
    old = wb.arch.down_weight(wb.model, 1).detach().double().clone()
    snap = snapshot(wb.model)
    with edit.applied(wb):
        new = wb.arch.down_weight(wb.model, 1).detach().double()
        changed = [k for k, v in wb.model.state_dict().items() if not torch.equal(v, snap[k])]
        got = keys @ (new - old).T                                            # (W' − W) k_l
    assert changed == [name]
    scale = resid.norm(dim=1, keepdim=True)
    assert ((got - resid).norm(dim=1, keepdim=True) / scale).max() < 1e-3


def test_rome_one_pair_is_rank_one():
    wb = tiny_workbench("llama")
    edit = ROMEEditor(tiny_hparams("rome", v_num_grad_steps=3)).compute(wb, berlin_request(("en",)))
    term = edit.weights[down_name(wb, 1)][0]
    assert term.rank == 1
    assert int(torch.linalg.matrix_rank(term.materialize())) == 1


# ================================================================= AlphaEdit


def test_alphaedit_leaves_the_preserved_subspace_unchanged():
    """ΔW k = 0 for the eigenvectors of C with eigenvalues above the threshold (the null-space property)."""
    wb = tiny_workbench("llama")
    request = berlin_request()
    hp = tiny_hparams("alphaedit", v_num_grad_steps=5)
    edit = AlphaEditEditor(hp).compute(wb, request)
    texts, sources = statistics_texts(["en", "zh"], "flores")
    stats, _, _ = cached_key_statistics(wb, [0, 1], texts, sources, n_tokens=hp.mom2_n_tokens)
    for layer in (0, 1):
        c = stats[layer].second_moment.double()
        evals, evecs = torch.linalg.eigh(c)
        kept = evecs[:, evals >= hp.nullspace_threshold * evals.max()]
        assert 0 < kept.shape[1] < c.shape[0]
        delta = edit.delta(down_name(wb, layer), dtype=torch.float64)             # [d_model, d_ff]
        on_kept = (delta @ kept).norm() / delta.norm()
        assert delta.norm() > 0 and on_kept < 1e-4, float(on_kept)
        p, dim = nullspace_projection(c, hp.nullspace_threshold, relative=True)
        assert dim == c.shape[0] - kept.shape[1]
        assert (delta @ p - delta).norm() / delta.norm() < 1e-4                  # ΔW lies in the null space
    assert [info["nullspace_dim"] for info in edit.meta["alphaedit"]["layers"]] == [
        int((torch.linalg.eigvalsh(stats[layer].second_moment.double()) <
             hp.nullspace_threshold * torch.linalg.eigvalsh(stats[layer].second_moment.double()).max()).sum())
        for layer in (0, 1)]


def test_edits_save_and_load(tmp_path):
    wb = tiny_workbench("gpt2")
    edit = MEMITEditor(tiny_hparams("memit", v_num_grad_steps=3)).compute(wb, berlin_request())
    again = Edit.load(edit.save(tmp_path / "memit-edit"))
    for name in edit.weights:
        torch.testing.assert_close(again.delta(name), edit.delta(name))
    assert again.meta["memit"]["facts"][0]["language"] == "en"


# ================================================================= the embedded model


@pytest.mark.slow
def test_m_memit_on_embedded_model_raises_new_target_probability(monkeypatch):
    from analysis.model import load_model
    from data.edit_records import load_mzsre

    if _USER_CACHE.get("NEUROGLOT_CACHE") is None:     # the user's cache (model, statistics), not the tiny one
        monkeypatch.delenv("NEUROGLOT_CACHE", raising=False)
    else:
        monkeypatch.setenv("NEUROGLOT_CACHE", _USER_CACHE["NEUROGLOT_CACHE"])

    wb = load_model("embedded")
    record = load_mzsre(MZSRE_DEV, ["en", "zh"])[5]
    request = EditRequest.from_record(record, ["en", "zh"])
    snap = snapshot(wb.model)
    started = time.perf_counter()
    edit = MEMITEditor().compute(wb, request)
    seconds = time.perf_counter() - started
    assert_bit_identical(wb.model, snap)
    before = {lang: target_nll(wb, f.prompt, f.target_new) for lang, f in request.facts.items()}
    with edit.applied(wb):
        after = {lang: target_nll(wb, f.prompt, f.target_new) for lang, f in request.facts.items()}
    for lang in request.facts:                       # the new target's probability rises in every language
        assert after[lang] < before[lang], (lang, before, after)
    edit.meta["test_seconds"] = seconds               # ~7 min on a loaded 2-core CPU; see the module docstring
