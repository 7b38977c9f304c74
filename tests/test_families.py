"""Model families of the native runner: RoPE scaling tables against transformers', family-specific
layers against transformers' models (the tiny models of every family also run through
tests/test_runner.py), refusals of what the runner does not implement."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from se_engine.errors import UnsupportedModelError
from se_engine.model import ModelConfig, rope_tables

# rope_parameters of real configs; dims shrunk (head_dim 32). dynamic's threshold is
# max_position_embeddings, shrunk from Llama-2's 4096 to 24 so that the table passes it.
ROPE_CONFIGS = {
    "llama3": dict(rope_theta=500000.0, max_position_embeddings=131072, rope_scaling=dict(  # Llama-3.2-1B
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
    "linear": dict(rope_theta=10000.0, max_position_embeddings=4096,  # vicuna-7b-v1.5-16k
                   rope_scaling=dict(type="linear", factor=4.0)),
    "yarn": dict(rope_theta=1000000.0, max_position_embeddings=32768, rope_scaling=dict(  # Qwen2.5-7B, long context
        type="yarn", factor=4.0, original_max_position_embeddings=32768)),
    "dynamic": dict(rope_theta=10000.0, max_position_embeddings=24, rope_scaling=dict(type="dynamic", factor=2.0)),
}
ROPE_LEN = 64


def small_llama_config(**fields) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=259, **fields)


@pytest.mark.parametrize("rope_type", ROPE_CONFIGS)
def test_rope_tables_match_transformers(rope_type):
    """cos and sin of every position against transformers' rotary embedding; dynamic one position at
    a time, as transformers decodes (each position with the frequencies of a sequence ending there)."""
    config = small_llama_config(**ROPE_CONFIGS[rope_type])
    cos, sin = rope_tables(ModelConfig.from_hf(config), ROPE_LEN)
    rotary, x = LlamaRotaryEmbedding(config), torch.zeros(1, 1, 32)
    if rope_type == "dynamic":
        ref = [rotary(x, torch.tensor([[p]])) for p in range(ROPE_LEN)]
        ref_cos, ref_sin = torch.cat([c[0] for c, _ in ref]), torch.cat([s[0] for _, s in ref])
    else:
        ref_cos, ref_sin = (t[0] for t in rotary(x, torch.arange(ROPE_LEN)[None]))
    torch.testing.assert_close(cos, ref_cos, atol=1e-5, rtol=0)  # measured <= 2e-6
    torch.testing.assert_close(sin, ref_sin, atol=1e-5, rtol=0)
    plain_cos, _ = rope_tables(ModelConfig.from_hf(small_llama_config(rope_theta=config.rope_parameters["rope_theta"])),
                               ROPE_LEN)
    assert (cos - plain_cos).abs().max() > 1e-3  # the scaling shows within ROPE_LEN positions


@pytest.mark.parametrize("rope_parameters,message", [
    (dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 16, long_factor=[1.0] * 16,
          original_max_position_embeddings=4096), "rope_type 'longrope' is not one of"),
    (dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
])
def test_unimplemented_rope_is_refused_by_name(rope_parameters, message):
    config = small_llama_config(max_position_embeddings=8192)
    config.rope_parameters = rope_parameters
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf(config)
