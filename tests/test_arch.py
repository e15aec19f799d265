"""analysis.arch: every claimed site, checked by hooks on tiny random models of every family."""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from torch import nn

from analysis.arch import (
    SITE_NAMES,
    SITE_READS,
    SUPPORTED_FAMILIES,
    ArchAdapter,
    adapter_for,
    embedding,
    final_norm,
    first_tensor,
    lm_head,
    resolve,
)
from analysis.errors import InputError, NeuroglotError, UnsupportedArchitectureError
from tests.tiny import EXTRA_FAMILIES, TINY_FAMILIES, TINY_VOCAB_SIZE, tiny_config, tiny_model, tiny_tokenizer

B, T = 2, 7
FAMILIES = TINY_FAMILIES + EXTRA_FAMILIES  # + the multimodal gemma3 wrapper (alias)
SENTENCES = [
    "The capital of France is Paris, and Berlin is the capital of Germany.",
    "德国的首都是柏林。法国的首都是巴黎。",
]


@dataclass
class Capture:
    """Everything one forward pass showed the hooks, per layer and site."""

    model: nn.Module
    adapter: ArchAdapter
    inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    outputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    globals_out: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[tuple[int, str], int] = field(default_factory=dict)
    logits: torch.Tensor | None = None


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return first_tensor(args[0])
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _batch() -> torch.Tensor:
    tok = tiny_tokenizer()
    enc = tok(SENTENCES, truncation=True, max_length=T, padding="max_length", return_tensors="pt")
    assert enc.input_ids.shape == (B, T)
    return enc.input_ids


@pytest.fixture(scope="module", params=FAMILIES)
def cap(request) -> Capture:
    model = tiny_model(request.param)
    adapter = adapter_for(model)
    c = Capture(model=model, adapter=adapter)
    handles = []

    def site_hook(key):
        def hook(module, args, kwargs, output):
            c.inputs[key] = _first_input(args, kwargs).detach()
            c.outputs[key] = first_tensor(output).detach()
            c.calls[key] = c.calls.get(key, 0) + 1
        return hook

    for layer in range(adapter.n_layers(model)):
        for name in SITE_NAMES:
            if name == "up_proj" and not adapter.gated:
                continue
            module = adapter.site(model, layer, name)
            handles.append(module.register_forward_hook(site_hook((layer, name)), with_kwargs=True))
    for name, module in (("embed", adapter.embedding(model)), ("final_norm", adapter.final_norm_module(model)),
                         ("lm_head", adapter.lm_head_module(model))):
        handles.append(module.register_forward_hook(
            lambda m, a, o, name=name: c.globals_out.__setitem__(name, first_tensor(o).detach())))
    try:
        with torch.no_grad():
            c.logits = model(input_ids=_batch()).logits
    finally:
        for h in handles:
            h.remove()
    return c


def _layers(c: Capture) -> range:
    return range(c.adapter.n_layers(c.model))


# 1 --------------------------------------------------------------------------------
def test_every_site_fires_once_with_the_claimed_shape(cap):
    a, m = cap.adapter, cap.model
    d_ff, d_model = a.d_ff(m), a.d_model(m)
    assert d_ff != d_model
    for layer in _layers(cap):
        assert cap.outputs[(layer, "neuron")].shape == (B, T, d_ff)
        assert cap.inputs[(layer, "key")].shape == (B, T, d_ff)
        assert cap.outputs[(layer, "down_proj")].shape == (B, T, d_model)
        assert cap.outputs[(layer, "layer")].shape == (B, T, d_model)
        assert cap.outputs[(layer, "attn")].shape == (B, T, d_model)
        assert cap.outputs[(layer, "mlp")].shape == (B, T, d_model)
        assert cap.outputs[(layer, "first_proj")].shape == (B, T, d_ff)
        assert cap.inputs[(layer, "first_proj")].shape == (B, T, d_model)
        if a.gated:
            assert cap.outputs[(layer, "up_proj")].shape == (B, T, d_ff)
        for name in SITE_NAMES:
            if name != "up_proj" or a.gated:
                assert cap.calls[(layer, name)] == 1, (layer, name)
    assert cap.globals_out["embed"].shape == (B, T, d_model)
    assert cap.globals_out["final_norm"].shape == (B, T, d_model)
    assert cap.globals_out["lm_head"].shape == (B, T, TINY_VOCAB_SIZE)
    logits = cap.globals_out["lm_head"]
    cap_value = getattr(m.config.get_text_config(), "final_logit_softcapping", None)
    if cap_value:  # gemma2 (and gemma3 where configured) soft-cap the LM head output
        logits = torch.tanh(logits / cap_value) * cap_value
    torch.testing.assert_close(logits, cap.logits)


def test_module_level_getters_match_the_adapter(cap):
    a, m = cap.adapter, cap.model
    assert embedding(m) is a.embedding(m) is resolve(m, a.embed)
    assert final_norm(m) is a.final_norm_module(m)
    assert lm_head(m) is a.lm_head_module(m)
    assert a.n_layers(m) == 3
    assert isinstance(a.layer_modules(m), nn.ModuleList)


# 2 --------------------------------------------------------------------------------
def test_neuron_is_act_of_first_projection_and_key_is_down_proj_input(cap):
    a, m = cap.adapter, cap.model
    for layer in _layers(cap):
        x = cap.inputs[(layer, "first_proj")]  # the FFN input (after the pre-FFN norm)
        act = a.site(m, layer, "neuron")
        with torch.no_grad():
            pre = a.site(m, layer, "first_proj")(x)
            expected_neuron = act(pre)
            torch.testing.assert_close(cap.outputs[(layer, "neuron")], expected_neuron)
            torch.testing.assert_close(cap.inputs[(layer, "neuron")], cap.outputs[(layer, "first_proj")])
            neuron = cap.outputs[(layer, "neuron")]
            key = cap.inputs[(layer, "key")]
            if a.gated:
                torch.testing.assert_close(key, neuron * a.site(m, layer, "up_proj")(x))
                assert not torch.allclose(key, neuron)
            else:
                torch.testing.assert_close(key, neuron)
        # non-degenerate: some neurons activated (> 0), some not
        assert (neuron > 0).any() and (neuron <= 0).any()
        assert neuron.abs().max() > 0.1


# 3 --------------------------------------------------------------------------------
def test_down_weight_applied_to_the_key_gives_the_ffn_output(cap):
    a, m = cap.adapter, cap.model
    for layer in _layers(cap):
        key = cap.inputs[(layer, "key")]
        w = a.down_weight(m, layer)
        assert w.shape == (a.d_model(m), a.d_ff(m))
        out = key @ w.T
        bias = a.down_bias(m, layer)
        if bias is not None:
            out = out + bias
        ffn_out = cap.outputs[(layer, "mlp")]
        assert a.ffn_output_module(m, layer) is a.site(m, layer, "mlp")
        torch.testing.assert_close(out, ffn_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cap.outputs[(layer, "down_proj")], ffn_out)
        assert ffn_out.abs().max() > 0.1


def test_layer_output_is_input_plus_attention_plus_ffn(cap):
    """Checks the attn / mlp sites carry no residual (bloom) and the post-norm fields (gemma2/3)."""
    a, m = cap.adapter, cap.model
    for layer in _layers(cap):
        block = a.layer_module(m, layer)
        attn = cap.outputs[(layer, "attn")]
        ffn = cap.outputs[(layer, "mlp")]
        with torch.no_grad():
            if a.post_attn_norm:
                attn = resolve(block, a.post_attn_norm)(attn)
            if a.post_ffn_norm:
                ffn = resolve(block, a.post_ffn_norm)(ffn)
        torch.testing.assert_close(cap.outputs[(layer, "layer")], cap.inputs[(layer, "layer")] + attn + ffn,
                                   rtol=1e-5, atol=1e-5)
        if layer > 0:
            torch.testing.assert_close(cap.inputs[(layer, "layer")], cap.outputs[(layer - 1, "layer")])


def test_parallel_residual_ffn_reads_the_layer_input(cap):
    a, m = cap.adapter, cap.model
    for layer in _layers(cap):
        block = a.layer_module(m, layer)
        x = cap.inputs[(layer, "layer")]
        ffn_in = cap.inputs[(layer, "first_proj")]
        if a.family in ("gptj", "gpt_neox") and a.parallel_residual:
            norm = block.ln_1 if a.family == "gptj" else block.post_attention_layernorm
            with torch.no_grad():
                torch.testing.assert_close(ffn_in, norm(x))
        else:
            assert not a.parallel_residual


# 4 --------------------------------------------------------------------------------
def test_value_vectors_are_views_of_the_down_projection(cap):
    a, m = cap.adapter, cap.model
    for layer in _layers(cap):
        vv = a.value_vectors(m, layer)
        w = a.down_weight(m, layer)
        param = a.site(m, layer, "down_proj").weight
        assert vv.shape == (a.d_ff(m), a.d_model(m))
        torch.testing.assert_close(vv, w.T, rtol=0, atol=0)
        # views, not copies
        assert vv.data_ptr() == w.data_ptr() == param.data_ptr()
        assert vv.requires_grad and (w is param or w._base is param)
        # row j is what a unit key e_j adds to the FFN output
        j = 5
        e = torch.zeros(1, 1, a.d_ff(m))
        e[..., j] = 1.0
        with torch.no_grad():
            out = a.site(m, layer, "down_proj")(e)[0, 0]
        bias = a.down_bias(m, layer)
        torch.testing.assert_close(out - (bias if bias is not None else 0), vv[j])


def test_down_orientation_matches_the_weight_layout(cap):
    a, m = cap.adapter, cap.model
    param = a.site(m, 0, "down_proj").weight
    if a.down_orientation == "out_in":
        assert tuple(param.shape) == (a.d_model(m), a.d_ff(m))
    else:
        assert a.down_orientation == "in_out" and a.family == "gpt2"
        assert tuple(param.shape) == (a.d_ff(m), a.d_model(m))


# 6 --------------------------------------------------------------------------------
def test_neuron_modules_are_distinct_per_layer(cap):
    a, m = cap.adapter, cap.model
    for name in SITE_NAMES:
        if name == "up_proj" and not a.gated:
            continue
        mods = [a.site(m, layer, name) for layer in _layers(cap)]
        assert len({id(x) for x in mods}) == len(mods), name


def test_site_paths_resolve_to_the_same_modules(cap):
    a, m = cap.adapter, cap.model
    n = a.n_layers(m)
    for layer in _layers(cap):
        for name in SITE_NAMES:
            if name == "up_proj" and not a.gated:
                continue
            path = a.site_path(layer, name)
            assert resolve(m, path) is a.site(m, layer, name)
            assert path.startswith(f"{a.layers}.{layer}")
    assert a.site(m, -1, "neuron") is a.site(m, n - 1, "neuron")
    assert a.site_path(-1, "key", n_layers=n) == a.site_path(n - 1, "key")
    assert set(SITE_READS) == set(SITE_NAMES)


# 5 --------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    transformers.T5Config(),
    types.SimpleNamespace(model_type="mamba"),
    types.SimpleNamespace(),
], ids=["t5", "fake", "no-model-type"])
def test_unknown_model_type_is_rejected_with_the_supported_list(config):
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for(config)
    assert isinstance(info.value, NeuroglotError)
    msg = str(info.value)
    for family in SUPPORTED_FAMILIES:
        assert family in msg
    assert repr(getattr(config, "model_type", None)) in msg


def test_supported_families_are_the_twelve_of_the_design():
    assert set(SUPPORTED_FAMILIES) == set(TINY_FAMILIES)
    assert len(SUPPORTED_FAMILIES) == 12


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_from_config_equals_adapter_from_model(family):
    assert adapter_for(tiny_config(family)) == adapter_for(tiny_model(family))


def test_gemma3_alias_finds_the_text_layers_inside_the_multimodal_wrapper():
    text = adapter_for(tiny_config("gemma3_text"))
    wrapped = adapter_for(tiny_config("gemma3"))
    assert wrapped.family == text.family == "gemma3_text"
    assert wrapped.layers == "model.language_model.layers"
    assert (wrapped.neuron, wrapped.down_proj, wrapped.post_ffn_norm) == (text.neuron, text.down_proj,
                                                                         text.post_ffn_norm)
    # a text-only Gemma3ForCausalLM whose config says "gemma3" keeps the text paths
    model = tiny_model("gemma3_text")
    model.config.model_type = "gemma3"
    try:
        assert adapter_for(model).layers == "model.layers"
    finally:
        model.config.model_type = "gemma3_text"


def test_model_with_the_wrong_layout_is_rejected():
    class Impostor(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="llama")
            self.model = nn.Module()

    with pytest.raises(UnsupportedArchitectureError, match="layout"):
        adapter_for(Impostor())


def test_shared_activation_module_is_rejected():
    model = tiny_model("gpt2")
    shared = model.transformer.h[0].mlp.act
    for block in model.transformer.h:
        block.mlp.act = shared
    with pytest.raises(UnsupportedArchitectureError, match="shares"):
        adapter_for(model)


def test_bloom_slow_but_exact_tensor_parallel_is_rejected():
    config = tiny_config("bloom")
    config.pretraining_tp, config.slow_but_exact = 2, True
    with pytest.raises(UnsupportedArchitectureError, match="slow_but_exact"):
        adapter_for(config)
    config.slow_but_exact = False
    assert adapter_for(config).family == "bloom"


def test_gpt_neox_residual_mode_follows_the_config():
    config = tiny_config("gpt_neox")
    assert adapter_for(config).parallel_residual
    config.use_parallel_residual = False
    assert not adapter_for(config).parallel_residual


def test_bad_site_and_layer_are_input_errors():
    model = tiny_model("gpt2")
    a = adapter_for(model)
    with pytest.raises(InputError, match="ungated"):
        a.site(model, 0, "up_proj")
    with pytest.raises(InputError, match="Unknown site"):
        a.site(model, 0, "values")
    with pytest.raises(InputError, match="out of range"):
        a.site(model, 3, "neuron")
    with pytest.raises(InputError, match="out of range"):
        a.down_weight(model, -4)


def test_resolve_and_first_tensor():
    model = tiny_model("llama")
    assert resolve(model, "") is model
    assert resolve(model, "model.layers.1.mlp") is model.model.layers[1].mlp
    with pytest.raises(AttributeError, match="nope"):
        resolve(model, "model.layers.1.nope")
    with pytest.raises(AttributeError):
        resolve(model, "model.layers.9")
    t = torch.ones(2)
    assert first_tensor(t) is t
    assert first_tensor((t, None)) is t
    assert first_tensor([(t,), 1]) is t
    with pytest.raises(TypeError):
        first_tensor(None)
