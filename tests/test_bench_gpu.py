"""bench/gpu.py, the prepared GPU check: its model has Llama-3.1-8B's shape, and without CUDA it says so and exits 2.

The whole path runs in ``python bench/gpu.py --tiny`` (about 40 s on CPU), not here."""
from __future__ import annotations

import pytest
import torch
import transformers

from bench import gpu
from tests.tiny import tiny_tokenizer


def test_config_has_the_shape_and_size_of_llama_3_1_8b():
    config = gpu.llama_config(gpu.LLAMA_31_8B, tiny_tokenizer())
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama-3.1-8B's parameter count
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)


def test_preset_layers_scale_to_the_tiny_model_and_stay_for_the_full_one():
    assert gpu.scaled_layers([11, 12, 13, 31], 32) == [11, 12, 13, 31]
    assert gpu.scaled_layers([11, 12, 13, 31], 8) == [2, 3, 7]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_exit_2(capsys):
    assert gpu.main([]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1 and "no CUDA" in out.err
