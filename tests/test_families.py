"""Model families of the native runner: RoPE scaling tables against transformers', family-specific
layers against transformers' models (the tiny models of every family also run through
tests/test_runner.py), refusals of what the runner does not implement."""

from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from test_exactness import (ALPHA, SAMPLING, V, check_greedy_identity, chi_square_pvalue, draw, enumerable,
                             exact_joint)
from test_quant import check_quantized_drafter
from test_runner import TOLERANCE, check_ragged_schedule, full_logits
from transformers import AutoConfig, Gemma3Config, Gemma3ForConditionalGeneration, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from se_engine.ensemble import EnsembleSpec
from se_engine.engine import Engine
from se_engine.errors import UnsupportedModelError, VocabularyMismatchError
from se_engine.model import FAMILIES, ROPE_TYPES, Family, ModelConfig, Transformer, rope_tables
from se_engine.quant import LAYERS
from se_engine.runner import LoadedModel, load_model
from se_engine.sampling import SamplingParams
from se_engine.sources import TINY_VOCAB, tiny_random_model, tiny_tokenizer

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


def small_llama_config(**config) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=259, **config)


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


@pytest.mark.parametrize("max_len", [32, 40])
def test_longrope_tables_match_transformers(max_len):
    """Phi-4-mini's longrope over 3/4 of each head: the short factors while the cache fits the
    pretraining context (32 here), else the long ones, as transformers rotates max_len tokens."""
    config = tiny_random_model("tiny-random-phi4", original_max_position_embeddings=32).config
    cos, sin = rope_tables(ModelConfig.from_hf(config), max_len)
    ref_cos, ref_sin = (t[0] for t in Phi3RotaryEmbedding(config)(torch.zeros(1, 1, 32), torch.arange(max_len)[None]))
    assert cos.shape == (max_len, 24)
    torch.testing.assert_close(cos, ref_cos, atol=1e-5, rtol=0)  # measured <= 2e-6
    torch.testing.assert_close(sin, ref_sin, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
def test_longrope_past_the_pretraining_context_matches_transformers(dtype):
    """A cache longer than the pretraining context (16 here) rotates every key with the long
    factors: one prefill past 16 tokens equals transformers' (which switches sets by sequence
    length), and the ragged schedules equal a transformers model whose short factors are the long."""
    context = dict(original_max_position_embeddings=16, max_position_embeddings=64)  # attention_factor 1.22
    hf = tiny_random_model("tiny-random-phi4", **context)
    rope = dict(hf.config.rope_parameters, short_factor=hf.config.rope_parameters["long_factor"])
    always_long = tiny_random_model("tiny-random-phi4", **context, rope_scaling=rope)
    runner = Transformer.from_hf(hf, max_batch=5, max_len=64, dtype=dtype)
    seq = list(range(7, 47))
    torch.testing.assert_close(runner.forward([0], [seq], [len(seq)]), full_logits(hf, seq),
                               atol=TOLERANCE[dtype], rtol=0)
    runner.truncate([0], [0])
    check_ragged_schedule(always_long, runner, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("rope_parameters,message", [
    (dict(rope_type="proportional", rope_theta=1e4), "rope_type 'proportional' is not one of"),
    (dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.3), "partial_rotary_factor 0.3"),
])
def test_unimplemented_rope_is_refused_by_name(rope_parameters, message):
    config = small_llama_config(max_position_embeddings=8192)
    config.rope_parameters = rope_parameters
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf(config)


# Mistral-7B-v0.1 attends within sliding_window=4096 on every layer, Gemma-2-2b on alternate layers,
# Gemma-3-4b within 1024 on 5 layers of 6; shrunk to 8 so that the schedules' 5 .. 20-token
# sequences cross it.
WINDOW = 8


# Qwen2 / Qwen3 window the layers from max_window_layers on when use_sliding_window is set.
QWEN_WINDOWS = dict(use_sliding_window=True, max_window_layers=1)
WINDOWED = {"tiny-random-mistral": {}, "tiny-random-gemma2": {}, "tiny-random-gemma3": {},
            "tiny-random-qwen2": QWEN_WINDOWS, "tiny-random-qwen3": QWEN_WINDOWS}


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("name", WINDOWED)
def test_sliding_window_matches_transformers(name, dtype):
    """The mask path (fp32, and bf16 with batch_invariant=False) against transformers' Mistral, Gemma 2
    (alternate windowed layers, soft-capping, sandwich norms, query_pre_attn_scalar), Gemma 3
    (5 windowed layers of 6 with their own RoPE base) and Qwen2 / Qwen3 (all but the first layer)."""
    hf = tiny_random_model(name, sliding_window=WINDOW, **WINDOWED[name])
    seq = list(range(3, 3 + 2 * WINDOW))
    assert (full_logits(hf, seq) - full_logits(tiny_random_model(name), seq)).abs().max() > 0.1  # the window matters
    runner = Transformer.from_hf(hf, max_batch=5, max_len=64, dtype=dtype, batch_invariant=False)
    assert runner.cfg.sliding_window == WINDOW
    check_ragged_schedule(hf, runner, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma2_and_gemma3_ensemble_exactly(tiny_models, dtype):
    models = tiny_models(["tiny-random-gemma3", "tiny-random-gemma2"], dtype=dtype, max_len=96)
    check_greedy_identity(models, EnsembleSpec.weighted([0.5, 0.5]), seed=2, max_new_tokens=32)


# Gemma 2's cap of the attention scores, lowered from 50 to where these random models' scores reach it.
CAPPED = dict(attn_logit_softcapping=0.5)


@pytest.mark.parametrize("name,config", [("tiny-random-mistral", {}), ("tiny-random-gemma2", CAPPED),
                                         ("tiny-random-gemma3", {}), ("tiny-random-qwen3", QWEN_WINDOWS)])
def test_invariant_attention_attends_within_the_window(name, config):
    """The batch-invariant kernels (bf16, the default) take the window and Gemma 2's soft-capping:
    contexts past the window match transformers' models as the mask path does."""
    hf = tiny_random_model(name, sliding_window=WINDOW, **config)
    if config is CAPPED:
        seq = list(range(3, 3 + 2 * WINDOW))  # the cap matters
        uncapped = tiny_random_model(name, sliding_window=WINDOW)
        assert (full_logits(hf, seq) - full_logits(uncapped, seq)).abs().max() > 0.1
    runner = Transformer.from_hf(hf, max_batch=5, max_len=64)
    assert runner.invariant and runner.cfg.sliding_window == WINDOW
    check_ragged_schedule(hf, runner, atol=TOLERANCE[torch.bfloat16])


def tiny_gemma3_vision(text) -> Gemma3ForConditionalGeneration:
    """A Gemma 3 vision-language model (how gemma-3-4b-it ships) around the text decoder ``text``."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text.config.to_dict(), vision_config=vision,
                                                        mm_tokens_per_image=4)).eval()
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.tie_weights()
    return model


def test_gemma3_vision_checkpoint_serves_its_text_decoder(tmp_path):
    """A Gemma3ForConditionalGeneration directory loads its text decoder (the vision tower and
    projector left out): text logits equal transformers' multimodal model's, in fp32 and through the
    invariant kernels in bf16."""
    text = tiny_random_model("tiny-random-gemma3", sliding_window=WINDOW)
    vision = tiny_gemma3_vision(text)
    assert any(k.startswith("model.vision_tower.") for k in vision.state_dict())
    vision.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.float32)
    assert loaded.runner.cfg == ModelConfig.from_hf(text.config)
    seq = list(range(3, 3 + 2 * WINDOW))
    torch.testing.assert_close(loaded.runner.forward([0], [seq], [len(seq)]), full_logits(vision, seq),
                               atol=1e-4, rtol=0)
    check_ragged_schedule(vision, Transformer.from_hf(vision, max_batch=5, max_len=64),
                          atol=TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("model_type,config,message", [
    ("llama", dict(attention_bias=True), "attention_bias=True"),
    ("llama", dict(mlp_bias=True), "mlp_bias=True"),
    ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("gemma3n", {}, "model_type 'gemma3n' is not one of"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_act 'gelu' is not one of"),
])
def test_unimplemented_configs_are_refused_by_name(model_type, config, message):
    hf_config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=259, **config)
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf(hf_config)


def test_checkpoint_weights_left_over_are_refused():
    """A layer the decoder would skip fails the load: Qwen3's q/k norms in a decoder without them."""
    hf = tiny_random_model("tiny-random-qwen3")
    cfg = replace(ModelConfig.from_hf(hf.config), qk_norm=False)
    with pytest.raises(UnsupportedModelError, match="does not implement.*q_norm"):
        Transformer(cfg, max_batch=1, max_len=8, dtype=torch.float32).load_hf_state_dict(hf.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_two_families_ensemble_exactly(tiny_models, dtype):
    """Qwen3 and Llama 3 (scaled RoPE) on one tokenizer: se and ensemble_sd emit the plain
    ensemble's greedy tokens, bf16 through the invariant kernels and fp32."""
    models = tiny_models(["tiny-random-qwen3", "tiny-random-llama3"], dtype=dtype, max_len=96)
    check_greedy_identity(models, EnsembleSpec.weighted([0.5, 0.5]), seed=0, max_new_tokens=32)


def test_two_families_sample_the_ensemble():
    """The same pair over an enumerable vocabulary: se's sampled tokens follow the ensemble's law."""
    models = enumerable(V, ["tiny-random-qwen3", "tiny-random-llama3"])
    spec, params = SAMPLING[0]
    pvalue, stat, df = chi_square_pvalue(draw(models, spec, "se", [2, 1], params), exact_joint(models, spec, params))
    assert pvalue > ALPHA, f"chi2={stat:.1f} df={df} p={pvalue:.2e}"


@pytest.mark.parametrize("scheme", list(LAYERS))
def test_a_quantized_qwen3_drafts_for_the_pair(tiny_models, scheme):
    models = tiny_models(["tiny-random-qwen3", "tiny-random-llama3"], max_batch=3, max_len=160)
    (drafter,) = tiny_models(["tiny-random-qwen3"], max_batch=3, max_len=160, quantize=scheme)
    check_quantized_drafter(models, EnsembleSpec.weighted([0.5, 0.5]), drafter.runner)


def padded_llama3(dtype: torch.dtype) -> tuple[LoadedModel, LoadedModel]:
    """tiny-random-llama3 with its (tied) output layer padded from 259 to 320 rows that outscore the
    real ones, and the same model cut to the tokenizer's 259 rows."""
    hf = tiny_random_model("tiny-random-llama3", vocab_size=320)
    with torch.no_grad():
        hf.model.embed_tokens.weight[TINY_VOCAB:] = 4 * hf.model.embed_tokens.weight[:320 - TINY_VOCAB]
    padded = Transformer.from_hf(hf, max_len=96, dtype=dtype)
    cut = Transformer(replace(padded.cfg, vocab_size=TINY_VOCAB), max_batch=1, max_len=96, dtype=dtype)
    cut.load_hf_state_dict({k: v[:TINY_VOCAB] if k in ("model.embed_tokens.weight", "lm_head.weight") else v
                            for k, v in hf.state_dict().items()})
    size = sum(p.numel() for p in hf.parameters())
    return (LoadedModel("llama3-padded", padded, tiny_tokenizer(), size),
            LoadedModel("llama3-cut", cut, tiny_tokenizer(), size))


def test_padded_vocabularies_ensemble_over_the_shared_rows(tiny_models):
    """Qwen2 (259 rows) with a Llama 3 padded to 320: the padding rows, which would win every argmax,
    are never sampled and take no part in r; the ensemble is the one with the padding cut off, token
    for token and logprob for logprob, and se keeps greedy identity."""
    (qwen2,) = tiny_models(["tiny-random-qwen2"], max_len=96)
    padded, cut = padded_llama3(torch.bfloat16)
    logits = padded.runner.forward([0], [[5, 17, 99]], [1])
    padded.runner.truncate([0], [0])
    assert logits[0, TINY_VOCAB:].max() > logits[0, :TINY_VOCAB].max()
    spec = EnsembleSpec.weighted([0.5, 0.5])
    assert Engine([qwen2, padded], spec, "se").vocab_size == TINY_VOCAB
    check_greedy_identity([qwen2, padded], spec, seed=1, max_new_tokens=24)
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=24, ignore_eos=True, logprobs=True)
        got = Engine([qwen2, padded], spec, "se", [3, 1]).generate([seed, 8, 1], params)[0]
        ref = Engine([qwen2, cut], spec, "se", [3, 1]).generate([seed, 8, 1], params)[0]
        assert got.token_ids == ref.token_ids and max(got.token_ids) < TINY_VOCAB
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)


def test_different_tokenizers_are_refused_by_the_engine(tiny_models):
    (qwen2,) = tiny_models(["tiny-random-qwen2"], max_len=96)
    other, _ = padded_llama3(torch.bfloat16)
    other.tokenizer.add_special_tokens({"additional_special_tokens": ["<|fim_prefix|>"]})
    with pytest.raises(VocabularyMismatchError, match=r"token id 259 is '<\|fim_prefix\|>' in llama3-padded"):
        Engine([qwen2, other], EnsembleSpec.weighted([0.5, 0.5]), "se")


# The README's words for each Family switch.
FAMILY_WORDS = {"qkv_bias": "q/k/v biases", "qk_norm": "per-head q/k RMSNorm", "sliding_window": "sliding-window mask",
                "fused_projections": "fused qkv / gate_up weights",
                "gemma": "(1 + w) RMSNorm, sandwich norms, embedding scale"}


def test_readme_families_table_matches_the_family_data():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = readme.splitlines()
    at = lines.index("| model_type | models | beyond the Llama decoder |") + 2  # past the rule
    rows = []
    while lines[at].startswith("|"):
        rows.append([c.strip() for c in lines[at].strip("|").split("|")])
        at += 1
    assert [r[0].strip("`") for r in rows] == list(FAMILIES)
    assert set(FAMILY_WORDS) == {f.name for f in fields(Family)}
    for (model_type, _, beyond), family in zip(rows, FAMILIES.values()):
        assert beyond == ", ".join(w for name, w in FAMILY_WORDS.items() if getattr(family, name)), model_type
    assert "RoPE scaling (`rope_type`): " + ", ".join(f"`{t}`" for t in ROPE_TYPES) + "." in readme


def test_sharded_safetensors_directory_loads(tmp_path):
    """A local directory of safetensors shards with model.safetensors.index.json (how large models ship)."""
    hf = tiny_random_model("tiny-random-qwen3")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    tiny_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    loaded = load_model(str(tmp_path), dtype=torch.float32)
    seq = [1, 2, 3, 200]
    torch.testing.assert_close(loaded.runner.forward([0], [seq], [4]), full_logits(hf, seq), atol=1e-4, rtol=0)


def test_gemma2_without_attention_soft_capping_runs_the_invariant_kernels():
    """query_pre_attn_scalar through the invariant attention (its queries prescaled), in bf16."""
    hf = tiny_random_model("tiny-random-gemma2", attn_logit_softcapping=None)
    runner = Transformer.from_hf(hf, max_batch=5, max_len=64)
    assert runner.invariant
    check_ragged_schedule(hf, runner, atol=TOLERANCE[torch.bfloat16])
