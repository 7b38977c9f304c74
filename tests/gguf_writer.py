"""Writes a transformers causal LM and its tokenizer to a GGUF file (F32 tensors) the way llama.cpp's
converter lays one out, so that tests can load it back through transformers' GGUF loader.

Every transform below is the inverse of one that transformers' legacy GGUF loader
(``transformers/modeling_gguf_pytorch_utils.py``, which serves all of these architectures) applies
on load; metadata keys that transformers does not read are written anyway, as llama.cpp would.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import torch

from se_engine.model import longrope_attention_factor

# model_type -> what differs from a plain decoder:
#   arch: general.architecture; name: general.name; permute_qk: llama.cpp's LlamaModel
#   interleaves the rotary halves of q/k rows (transformers' LlamaTensorProcessor undoes it for
#   "llama" files); norm_offset: Gemma's norms compute x * (1 + w) and llama.cpp stores 1 + w
#   (Gemma2TensorProcessor subtracts 1 from every "*norm.weight").
# Phi-3's fused qkv_proj / gate_up_proj map as they are onto attn_qkv / ffn_up: nothing to split.
# Mistral is a "llama" file, as llama.cpp writes it, so it loads as a Llama (the same network while
# sliding_window is None). transformers loads a "llama" file as Mistral only when general.name is
# exactly "mistral", and that path fails (test_gguf.py: test_a_file_named_mistral_loads).
ARCHS: dict[str, dict] = {
    "llama": dict(arch="llama", permute_qk=True),
    "mistral": dict(arch="llama", name="Mistral", permute_qk=True),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "phi3": dict(arch="phi3"),
    "gemma2": dict(arch="gemma2", norm_offset=1.0),
    "gemma3_text": dict(arch="gemma3", norm_offset=1.0),
}


def write_gguf(hf_model: torch.nn.Module, tokenizer, path: str | Path) -> None:
    """Writes ``hf_model`` (fp32) and ``tokenizer`` (byte-level BPE) to the GGUF file ``path``."""
    config = hf_model.config
    spec = ARCHS[config.model_type]
    writer = gguf.GGUFWriter(str(path), spec["arch"])
    writer.add_name(spec.get("name", config.model_type))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_config(writer, config)
    _add_tokenizer(writer, tokenizer)
    _add_tensors(writer, hf_model, spec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope(config) -> tuple[dict, dict | None]:
    """(the full-attention layers' rope parameters, the sliding layers' own where they differ)."""
    rope = config.rope_parameters
    return rope.get("full_attention", rope), rope.get("sliding_attention")


def _add_config(writer: gguf.GGUFWriter, config) -> None:
    """The model's hyperparameters under llama.cpp's ``{arch}.*`` keys."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope, sliding_rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)  # transformers reads it as head_dim for gemma2 / gemma3 only
    writer.add_value_length(head_dim)
    # read as head_dim for llama / mistral (it is the rotary width: the same unless partial rotary)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if sliding_rope is not None:
        writer.add_rope_freq_base_swa(sliding_rope["rope_theta"])
    if rope.get("rope_type", "default") in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for name, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                          ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(name) is not None:
                add(rope[name])
    if rope.get("rope_type") == "longrope":  # llama.cpp's Phi-3: the pretraining context and cos / sin scale
        original = rope["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = longrope_attention_factor(config.max_position_embeddings / original, original)
        writer.add_rope_scaling_attn_factors(scale)
    if getattr(config, "sliding_window", None) is not None:
        writer.add_sliding_window(config.sliding_window)
    elif config.model_type == "phi3":  # llama.cpp's Phi-3 writes 0 for no window (Phi-4)
        writer.add_sliding_window(0)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    # llama.cpp writes no attention.scale for Gemma (its loader fixes the scale by model size); it is
    # written here so that the tiny models' query_pre_attn_scalar, which that rule cannot give, loads.
    if getattr(config, "query_pre_attn_scalar", None) is not None:
        writer.add_attention_scale(config.query_pre_attn_scalar ** -0.5)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    """The vocabulary as ``tokenizer.ggml.model = "gpt2"``: tokens, types, merges, special ids, template."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids must be 0 .. n-1"
    added = tokenizer.added_tokens_decoder  # special ones are CONTROL, others USER_DEFINED
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for i, token in added.items():
        types[i] = gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    if merges:
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:
        # gguf-py refuses an empty array, and transformers derives the merges from the scores of a
        # file with none: every split of a token into two tokens, of which this vocabulary has none.
        writer.add_token_scores([0.0] * len(tokens))
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from rotate-half to interleaved order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` tensor for llama3 RoPE: default / scaled inverse frequency."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = scaled.numel() * 2
    default = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return default / scaled


def _add_tensors(writer: gguf.GGUFWriter, hf_model: torch.nn.Module, spec: dict) -> None:
    """The weights as F32 tensors under gguf's names, with llama.cpp's per-arch transforms."""
    config = hf_model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec["arch"])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a file without output.weight is loaded tied
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        tensor = tensor.detach().float()
        if spec.get("permute_qk") and ".attn_q." in name:
            tensor = _permute(tensor, config.num_attention_heads)
        if spec.get("permute_qk") and ".attn_k." in name:
            tensor = _permute(tensor, config.num_key_value_heads)
        if name.endswith("norm.weight"):
            tensor = tensor + spec.get("norm_offset", 0.0)
        writer.add_tensor(name, tensor.numpy())
    rope = _rope(config)[0]
    if rope.get("rope_type") == "llama3":  # llama.cpp's form; transformers ignores it
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config).float().numpy())
    if rope.get("rope_type") == "longrope":  # llama.cpp's Phi-3: both factor sets, as tensors
        for which in ("short", "long"):
            writer.add_tensor(f"rope_factors_{which}.weight", torch.tensor(rope[f"{which}_factor"]).float().numpy())
