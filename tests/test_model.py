"""load_model: specs, errors, and the embedded Gemma 3 270M (slow)."""
from __future__ import annotations

import torch
import pytest

from analysis.errors import ModelSpecError, UnsupportedArchitectureError
from analysis.model import Workbench, load_model
from tests.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, save_tiny_checkpoint("llama", folder)


def test_local_folder_loads_into_workbench(tiny_folder):
    folder, original = tiny_folder
    wb = load_model(str(folder))
    assert isinstance(wb, Workbench)
    s = wb.summary()
    assert s["family"] == "llama"
    assert s["layers"] == original.config.num_hidden_layers
    assert s["neurons_per_layer"] == original.config.intermediate_size
    assert s["parameters"] == sum(p.numel() for p in original.parameters())
    assert s["device"] == "cpu" and s["dtype"] == "float32"
    ids = wb.tokenizer("Paris is the capital of France", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(wb.model(**ids).logits, original(**ids).logits)
    assert not any(p.requires_grad for p in wb.model.parameters())


def test_explicit_dtype(tiny_folder):
    folder, _ = tiny_folder
    assert load_model(str(folder), dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty"),
    ("not a model spec!", "Unknown model spec"),
    ("/no/such/model.gguf", "GGUF file not found"),
])
def test_bad_specs_are_clear_errors(spec, fragment):
    with pytest.raises(ModelSpecError, match=fragment):
        load_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json"):
        load_model(str(tmp_path))


def test_plain_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(ModelSpecError, match="not a .gguf"):
        load_model(str(f))


def test_unsupported_architecture(tmp_path):
    from transformers import OPTConfig

    OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
              vocab_size=100, word_embed_proj_dim=16).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        load_model(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_without_gpu_is_a_clear_error(tiny_folder):
    with pytest.raises(ModelSpecError, match="no CUDA"):
        load_model(str(tiny_folder[0]), device="cuda")


def test_bad_device_and_dtype(tiny_folder):
    with pytest.raises(ModelSpecError, match="device"):
        load_model(str(tiny_folder[0]), device="tpu9")
    with pytest.raises(ModelSpecError, match="dtype"):
        load_model(str(tiny_folder[0]), dtype="int3")


# ------------------------------------------------------------------ embedded


@pytest.fixture(scope="session")
def embedded():
    return load_model("embedded")


@pytest.mark.slow
def test_embedded_model_summary(embedded):
    s = embedded.summary()
    assert s["family"] == "gemma3_text"
    assert (s["layers"], s["neurons_per_layer"], s["d_model"]) == (18, 2048, 640)
    assert 260e6 < s["parameters"] < 275e6
    assert s["vocab_size"] == 262144
    assert s["dtype"] == "float32"


@pytest.mark.slow
def test_embedded_model_knows_facts(embedded):
    """De-quantization is right only if the model still ranks true answers above false ones."""
    tok, model = embedded.tokenizer, embedded.model
    cases = [("The capital of France is", " Paris", " Berlin"),
             ("The capital of Japan is", " Tokyo", " Madrid"),
             ("Der Eiffelturm steht in", " Paris", " Rom")]
    for prompt, good, bad in cases:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            logits = model(**ids).logits[0, -1]
        g = tok(good, add_special_tokens=False).input_ids[0]
        b = tok(bad, add_special_tokens=False).input_ids[0]
        assert logits[g] > logits[b], prompt


@pytest.mark.slow
def test_embedded_cache_reload_is_identical(embedded):
    again = load_model("embedded")
    for (name, a), (_, b) in zip(embedded.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
