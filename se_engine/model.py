"""Native decoder for the Llama family of architectures (``FAMILIES``) with a static KV cache.

Written in plain PyTorch in the manner of gpt-fast: one module per block, weights
fused where that saves a matmul (q|k|v and gate|up), the KV cache preallocated once.

Shapes used throughout:
    B  batch rows (cache slots)         k  new query tokens per row in one forward
    L  layers    Hq / Hkv  query / key-value heads    D  head dim    S  cache capacity (max_len)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import invariant_ops, kv_ops
from .cuda_graphs import GraphedForward
from .errors import UnsupportedModelError
from .packing import PackedBatch, check_forward


@dataclass(frozen=True)
class Family:
    """What a ``model_type`` fixes in the decoder; the rest is read from its config."""
    qkv_bias: bool = False  # q/k/v projections always carry biases (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each query and key head before RoPE (Qwen3)
    # Layers attend within config.sliding_window where set: all, or those config.layer_types names
    # sliding_attention (Mistral, Phi-3; Gemma 2 alternates; Qwen's use_sliding_window from max_window_layers).
    sliding_window: bool = False
    fused_projections: bool = False  # checkpoints store qkv_proj and gate_up_proj fused (Phi-3)
    # Gemma: RMSNorm scales by 1 + w (in fp32), embeddings by sqrt(hidden), and the attention and MLP
    # outputs are normed too before their residual adds; soft-capping, windows per layer from the config.
    gemma: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "qwen2": Family(qkv_bias=True, sliding_window=True),
    "qwen3": Family(qk_norm=True, sliding_window=True),
    "mistral": Family(sliding_window=True),
    "phi3": Family(sliding_window=True, fused_projections=True),
    "gemma2": Family(sliding_window=True, gemma=True),
    "gemma3_text": Family(sliding_window=True, gemma=True, qk_norm=True),
}
# Multimodal model_types whose text decoder the runner serves, text in and text out: the config's
# text_config, the weights under this prefix (the vision tower and projector are not loaded).
TEXT_DECODERS = {"gemma3": "model.language_model."}
SUPPORTED_MODEL_TYPES = (*FAMILIES, *TEXT_DECODERS)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """transformers' ``rope_parameters`` beyond rope_theta, under transformers' names."""
    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    # llama3, yarn, longrope: the pretraining context; dynamic: max_position_embeddings, past which it rescales.
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn
    attention_factor: float = 1.0  # yarn, longrope: scales cos and sin
    # longrope: per-frequency divisors for contexts up to original_max_position_embeddings, and beyond.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_hf(cls, name: str, config, rope: dict) -> "RopeScaling":
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"{name}: rope_type {rope_type!r} is not one of {ROPE_TYPES}; use runner='hf'")
        if rope_type == "default":
            return cls()
        max_pos = config.max_position_embeddings
        original = max_pos if rope_type == "dynamic" else rope.get("original_max_position_embeddings") or max_pos
        factor = rope.get("factor") or max_pos / original
        scaling = cls(rope_type=rope_type, factor=float(factor), original_max_position_embeddings=int(original))
        if rope_type == "llama3":
            return replace(scaling, low_freq_factor=float(rope["low_freq_factor"]),
                           high_freq_factor=float(rope["high_freq_factor"]))
        if rope_type == "yarn":
            return replace(scaling, beta_fast=float(rope.get("beta_fast") or 32),
                           beta_slow=float(rope.get("beta_slow") or 1), truncate=bool(rope.get("truncate", True)),
                           attention_factor=float(_yarn_attention_factor(rope, factor)))
        if rope_type == "longrope":
            given = rope.get("attention_factor")
            attention = given if given is not None else longrope_attention_factor(factor, original)
            return replace(scaling, attention_factor=float(attention), short_factor=tuple(map(float, rope["short_factor"])),
                           long_factor=tuple(map(float, rope["long_factor"])))
        return scaling


def longrope_attention_factor(factor: float, original: int) -> float:
    """longrope's default cos / sin scale for a context ``factor`` times the pretraining one."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def _yarn_attention_factor(rope: dict, factor: float) -> float:
    """YaRN's cos / sin scale: given, or 0.1 ln(factor) + 1 (over the same with mscale_all_dim)."""
    if rope.get("attention_factor") is not None:
        return rope["attention_factor"]

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if rope.get("mscale") and rope.get("mscale_all_dim"):
        return mscale(rope["mscale"]) / mscale(rope["mscale_all_dim"])
    return mscale(1.0)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    rope_scaling: RopeScaling = RopeScaling()
    rotary_dim: int | None = None  # the leading dims of a head that RoPE rotates (Phi-4-mini: 3/4); None: all
    qk_norm: bool = False
    sliding_window: int | None = None  # a query at p attends to keys p - sliding_window + 1 .. p
    sliding_layers: tuple[int, ...] | None = None  # the layers the window applies to; None: all
    fused_projections: bool = False
    gemma: bool = False
    activation: str = "silu"  # a key of invariant_ops.ACTIVATIONS
    attention_scale: float | None = None  # of q k^T; None: head_dim ** -0.5
    attn_softcap: float | None = None  # attention scores s -> cap tanh(s / cap)
    final_softcap: float | None = None  # logits likewise
    # The windowed layers' own RoPE where the config gives one (Gemma 3: a local base).
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: RopeScaling = RopeScaling()

    @classmethod
    def from_hf(cls, config) -> "ModelConfig":
        """Reads a transformers config, refusing what this decoder does not implement."""
        name = getattr(config, "_name_or_path", "") or config.model_type
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{name}: model_type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}; "
                "use runner='hf' for other architectures"
            )
        if config.model_type in TEXT_DECODERS:
            config = config.text_config
        family = FAMILIES[config.model_type]
        activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        if activation not in invariant_ops.ACTIVATIONS:
            raise UnsupportedModelError(
                f"{name}: hidden_act {activation!r} is not one of {tuple(invariant_ops.ACTIVATIONS)}")
        rope = getattr(config, "rope_parameters", None) or {}
        # RoPE per layer type (Gemma 3): full_attention's is the model's, sliding_attention's the windowed layers'.
        sliding_rope, rope = rope.get("sliding_attention"), rope.get("full_attention", rope)
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModelError(f"{name}: mlp_bias=True is not implemented")
        if not family.qkv_bias and getattr(config, "attention_bias", False):
            raise UnsupportedModelError(f"{name}: attention_bias=True (q/k/v/o biases) is not implemented")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        window = getattr(config, "sliding_window", None) if family.sliding_window else None
        layer_types = getattr(config, "layer_types", None) if window is not None else None
        rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
        rotary_dim = int(head_dim * partial)
        if rotary_dim % 2 or rotary_dim <= 0:
            raise UnsupportedModelError(f"{name}: partial_rotary_factor {partial} rotates {rotary_dim} of "
                                        f"{head_dim} dims (an even number is implemented)")
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(config.rms_norm_eps),
            qkv_bias=family.qkv_bias,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            rope_scaling=RopeScaling.from_hf(name, config, rope),
            rotary_dim=None if rotary_dim == head_dim else rotary_dim,
            qk_norm=family.qk_norm,
            sliding_window=window,
            sliding_layers=None if layer_types is None else
            tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention"),
            fused_projections=family.fused_projections,
            gemma=family.gemma,
            activation=activation,
            attention_scale=config.query_pre_attn_scalar ** -0.5 if family.gemma else None,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            sliding_rope_theta=None if sliding_rope is None else float(sliding_rope["rope_theta"]),
            sliding_rope_scaling=RopeScaling() if sliding_rope is None else
            RopeScaling.from_hf(name, config, sliding_rope),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim]. Normalised in fp32 like the reference implementations, then cast back
        before the scale w (Llama) or after the scale 1 + w (Gemma)."""
        return invariant_ops.rms_norm(x, self.weight, self.eps, self.gemma)


def text_decoder_weights(model_type: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's decoder weights under the text models' names (``model.layers.0...``): a
    multimodal model's text decoder (``TEXT_DECODERS``) and its head, else sd itself."""
    if (prefix := TEXT_DECODERS.get(model_type)) is None:
        return sd
    text = {"model." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return text | ({"lm_head.weight": sd["lm_head.weight"]} if "lm_head.weight" in sd else {})


def inv_frequencies(theta: float | Tensor, dim: int, rope: RopeScaling, max_len: int) -> Tensor:
    """[..., dim / 2] float64: the rotary frequencies of ``rope_type`` for the base theta (a float, or
    dynamic's bases per position [S, 1]) in a cache of max_len positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rope.rope_type == "longrope":
        # One set for the whole cache, so that every key keeps the rotation it was written with:
        # transformers' short factors while the cache fits the pretraining context, else the long ones.
        long = max_len > rope.original_max_position_embeddings
        return inv_freq / torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float64)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Wavelengths beyond the pretraining context / low_freq_factor are stretched by factor, those
        # below it / high_freq_factor kept, the band between blended linearly in context / wavelength.
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / \
            (rope.high_freq_factor - rope.low_freq_factor)
        return ((1 - smooth.clamp(0, 1)) / rope.factor + smooth.clamp(0, 1)) * inv_freq
    if rope.rope_type == "yarn":
        def correction_dim(rotations: float) -> float:
            return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / \
                (2 * math.log(theta))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / ((high - low) or 1e-3)).clamp(0, 1)
        # Dimensions that turn fewer than beta_slow times over the context interpolate, more than beta_fast extrapolate.
        return inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)
    return inv_freq


def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[Tensor, Tensor]:
    """cos, sin: [S, R] in fp32 (R = rotary_dim), laid out for the rotate-half convention of Llama / Qwen2.

    dynamic NTK: position p rotates with the base of a sequence of max(p + 1, threshold) tokens,
    the frequencies transformers uses for a token decoded at p: a key is rotated once, when written."""
    rope, dim = cfg.rope_scaling, cfg.rotary_dim or cfg.head_dim
    positions = torch.arange(max_len, dtype=torch.float64)
    theta: float | Tensor = cfg.rope_theta
    if rope.rope_type == "dynamic":
        seq_len = (positions + 1).clamp(min=rope.original_max_position_embeddings)
        scale = rope.factor * seq_len / rope.original_max_position_embeddings - (rope.factor - 1)
        theta = cfg.rope_theta * (scale ** (dim / (dim - 2)))[:, None]
    angles = positions[:, None] * inv_frequencies(theta, dim, rope, max_len)  # [S, R / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * rope.attention_factor).float(), (angles.sin() * rope.attention_factor).float()


def project(layer: nn.Module, x: Tensor, invariant: bool) -> Tensor:
    """layer(x), a plain nn.Linear through the batch-invariant kernel where asked. Quantized layers
    (``se_engine.quant``) keep their own kernels: a drafter only proposes, so it need not be invariant."""
    if invariant and type(layer) is nn.Linear:
        return invariant_ops.linear(x, layer.weight, layer.bias)
    return layer(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.gemma) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.gemma) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, batch: PackedBatch,
                mask: Tensor | None, window: int) -> Tensor:
        """x: [N, hidden]; k_cache, v_cache: this layer's [B, Hkv, S, D], written at (slots, positions);
        mask: the padded path's [span, 1, width, kv_len]; window: the invariant kernel's (0: none)."""
        cfg = self.cfg
        N = x.shape[0]
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = project(self.wqkv, x, batch.invariant).split([q_dim, kv_dim, kv_dim], dim=-1)
        q, k = q.view(N, cfg.num_heads, cfg.head_dim), k.view(N, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = invariant_ops.rope(q, cos, sin), invariant_ops.rope(k, cos, sin)
        kv_ops.write(k_cache, v_cache, batch.slots, batch.positions, k, v.view(N, cfg.num_kv_heads, cfg.head_dim))
        if batch.invariant:
            if cfg.attention_scale is not None:  # the kernel scales by head_dim ** -0.5
                q = q * (cfg.attention_scale * cfg.head_dim ** 0.5)
            out = invariant_ops.attention(q, k_cache, v_cache, batch.slots, batch.positions, window,
                                          cfg.attn_softcap or 0.0)
            return project(self.wo, out.view(N, q_dim), True)
        span, width = batch.span, batch.width
        if batch.pad_index is not None:
            q = q.new_zeros(span * width, cfg.num_heads, cfg.head_dim).index_copy_(0, batch.pad_index, q)
        q = q.view(span, width, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        window = slice(batch.lo, batch.lo + span)
        k, v = k_cache[window, :, :batch.kv_len], v_cache[window, :, :batch.kv_len]
        if cfg.attn_softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=cfg.attention_scale)
        else:
            out = softcapped_attention(q, k, v, mask, cfg.attention_scale or cfg.head_dim ** -0.5, cfg.attn_softcap)
        out = out.transpose(1, 2).reshape(span * width, q_dim)
        if batch.pad_index is not None:
            out = out.index_select(0, batch.pad_index)
        return self.wo(out)


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, cap: float) -> Tensor:
    """SDPA with scores s -> cap tanh(s / cap) (Gemma 2), which torch's SDPA has no option for.
    q: [B, Hq, W, D]; k, v: [B, Hkv, S, D]; mask: [B, 1, W, S] bool. Returns [B, Hq, W, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = cap * torch.tanh((q @ k.transpose(-1, -2)) * scale / cap)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32)
    return probs.to(v.dtype) @ v


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.activation = cfg.activation

    def forward(self, x: Tensor, invariant: bool) -> Tensor:
        return project(self.w2, invariant_ops.gated(project(self.w13, x, invariant), self.activation), invariant)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
        self.feed_forward = FeedForward(cfg)
        # Gemma's sandwich: the attention and MLP outputs are normed before their residual adds.
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, True) if cfg.gemma else nn.Identity()
        self.post_ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, True) if cfg.gemma else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, batch: PackedBatch,
                mask: Tensor | None, window: int) -> Tensor:
        """x: [N, hidden] -> [N, hidden]; writes the N tokens' K, V into this layer's cache."""
        x = x + self.post_attention_norm(self.attention(self.attention_norm(x), cos, sin, k_cache, v_cache, batch,
                                                        mask, window))
        return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x), batch.invariant))


class Transformer(nn.Module):
    """A decoder with its own static KV cache; the runner interface of the engine.

    State: ``k_cache``, ``v_cache`` of shape [L, B, Hkv, S, D] (layer l's cache is ``k_cache[l]``)
    and ``lengths``, a host list of the number of cache entries of each slot. Lengths live on the
    host because the scheduler decides them: rollback is a list update, and no forward ever reads
    a length back from the device. ``writes`` counts, per slot, the forwards and forks that wrote
    entries into it (the prefix cache's test that a slot's entries are still the ones it kept).

    batch_invariant: run bf16 through the batch-invariant kernels (``se_engine.invariant_ops``: C++
    on the CPU, Triton on CUDA): a token's logits and KV entries are then bitwise the same whatever
    else a forward carries (other rows, its row's other tokens, slots, cache length). Ignored for
    other dtypes, where ``invariant`` is False and torch's kernels run.
    """

    def __init__(self, cfg: ModelConfig, *, max_batch: int, max_len: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 batch_invariant: bool = True):
        super().__init__()
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"max_batch and max_len must be >= 1, got {max_batch} and {max_len}")
        self.cfg, self.max_batch, self.max_len = cfg, max_batch, max_len
        self.invariant = batch_invariant and dtype == torch.bfloat16 and torch.device(device).type in ("cpu", "cuda")
        # Weights are left uninitialised (no random init of billions of values): every
        # constructor path ends in load_hf_state_dict.
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.to_empty(device=device)
        self.to(dtype=dtype)
        cache_shape = (cfg.num_layers, max_batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=dtype, device=device), persistent=False)
        self.lengths = [0] * max_batch
        self.writes = [0] * max_batch
        if self.invariant and self.device.type == "cpu":
            invariant_ops.has_fast_path()  # fails here, not mid-forward, if the extension is missing
        self.graphs: GraphedForward | None = None
        # Per layer: 1 where it attends within the window (its mask and RoPE table), else 0.
        windowed = range(cfg.num_layers) if cfg.sliding_layers is None else cfg.sliding_layers
        self.layer_kind = [int(cfg.sliding_window is not None and l in windowed) for l in range(cfg.num_layers)]
        sliding = cfg if cfg.sliding_rope_theta is None else \
            replace(cfg, rope_theta=cfg.sliding_rope_theta, rope_scaling=cfg.sliding_rope_scaling)
        (cos, sin), (sliding_cos, sliding_sin) = rope_tables(cfg, max_len), rope_tables(sliding, max_len)
        self.register_buffer("rope_cos", torch.stack([cos, sliding_cos]).to(device), persistent=False)  # [2, S, R]
        self.register_buffer("rope_sin", torch.stack([sin, sliding_sin]).to(device), persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, max_batch: int = 1, max_len: int = 2048,
                dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                batch_invariant: bool = True) -> "Transformer":
        """Builds the decoder from a loaded transformers model (GGUF- or safetensors-backed)."""
        model = cls(ModelConfig.from_hf(hf_model.config), max_batch=max_batch, max_len=max_len,
                    dtype=dtype, device=device, batch_invariant=batch_invariant)
        model.load_hf_state_dict(text_decoder_weights(hf_model.config.model_type, hf_model.state_dict()))
        return model

    def load_hf_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Copies transformers-named weights (``model.layers.0.self_attn.q_proj.weight`` ...) in place."""
        cfg = self.cfg
        taken = {"lm_head.weight"}  # a tied head may still be listed

        def take(name: str) -> Tensor:
            if name not in sd:
                raise UnsupportedModelError(f"weight {name!r} missing from the checkpoint")
            taken.add(name)
            return sd[name]

        own: dict[str, Tensor] = {"tok_embeddings.weight": take("model.embed_tokens.weight"),
                                  "norm.weight": take("model.norm.weight")}
        own["output.weight"] = own["tok_embeddings.weight"] if cfg.tie_word_embeddings else take("lm_head.weight")
        for i in range(cfg.num_layers):
            p, a = f"model.layers.{i}.", f"layers.{i}."
            own[a + "attention.wqkv.weight"] = take(p + "self_attn.qkv_proj.weight") if cfg.fused_projections else \
                torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            if cfg.qkv_bias:
                own[a + "attention.wqkv.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            own[a + "attention.wo.weight"] = take(p + "self_attn.o_proj.weight")
            if cfg.qk_norm:
                own[a + "attention.q_norm.weight"] = take(p + "self_attn.q_norm.weight")
                own[a + "attention.k_norm.weight"] = take(p + "self_attn.k_norm.weight")
            own[a + "feed_forward.w13.weight"] = take(p + "mlp.gate_up_proj.weight") if cfg.fused_projections else \
                torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            own[a + "feed_forward.w2.weight"] = take(p + "mlp.down_proj.weight")
            own[a + "attention_norm.weight"] = take(p + "input_layernorm.weight")
            if cfg.gemma:  # post_attention_layernorm norms the attention output, not the MLP input
                own[a + "ffn_norm.weight"] = take(p + "pre_feedforward_layernorm.weight")
                own[a + "post_attention_norm.weight"] = take(p + "post_attention_layernorm.weight")
                own[a + "post_ffn_norm.weight"] = take(p + "post_feedforward_layernorm.weight")
            else:
                own[a + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        # A weight left over is a layer this decoder would silently skip (a bias, a norm of another family).
        if unused := sorted(set(sd) - taken):
            raise UnsupportedModelError(f"checkpoint weights the native decoder does not implement: {unused[:4]}")
        params = dict(self.named_parameters())
        missing = set(params) - set(own)
        if missing:
            raise UnsupportedModelError(f"no checkpoint weight for {sorted(missing)}")
        with torch.no_grad():
            for name, value in own.items():
                if params[name].shape != value.shape:
                    raise UnsupportedModelError(
                        f"weight {name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(params[name].shape)}")
                params[name].copy_(value)

    @torch.inference_mode()
    def forward(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], num_logits: Sequence[int]) -> Tensor:
        """Appends ``tokens[i]`` to cache slot ``rows[i]`` at that slot's length, all rows in one pass.

        rows: b distinct slots; tokens: b non-empty token lists (ragged); num_logits[i] in
        [0, len(tokens[i])]: logits are returned for the last num_logits[i] tokens of row i.
        Returns fp32 logits [sum(num_logits), V], row after row; each slot's length grows by its row.
        """
        starts = check_forward(rows, tokens, num_logits, self.lengths, self.max_batch, self.max_len)
        logits = None if self.graphs is None else self.graphs.try_forward(rows, tokens, num_logits)
        if logits is None:
            batch = PackedBatch.build(rows, starts, [len(t) for t in tokens], num_logits,
                                      [t for row in tokens for t in row], self.device, self.invariant)
            logits = self.head(self.hidden_at_logits(batch))
        for r, row in zip(rows, tokens):
            self.lengths[r] += len(row)
            self.writes[r] += 1
        return logits

    def use_cuda_graphs(self, max_width: int, capture: bool = True) -> None:
        """Replays forwards of up to ``max_width`` tokens per row from CUDA graphs, captured per
        shape bucket on first use (``se_engine.cuda_graphs``); wider ones (prefill) run eagerly.
        capture=False runs the graphs' padded forward without capturing (for tests off CUDA)."""
        self.graphs = GraphedForward(self, max_width, capture)

    def hidden_at_logits(self, batch: PackedBatch) -> Tensor:
        """Embeds batch's tokens and runs them through every layer (writing their K, V into the
        caches); returns the last hidden states at ``batch.logit_index``, [M, hidden]."""
        x = self.run_layers(self.embed(batch.tokens), batch, range(self.cfg.num_layers), self.k_cache, self.v_cache)
        return x[batch.logit_index]

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [N] -> [N, hidden]; Gemma scales by sqrt(hidden), rounded to the model's dtype (as
        transformers does)."""
        x = self.tok_embeddings(tokens)
        return x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype) if self.cfg.gemma else x

    def run_layers(self, x: Tensor, batch: PackedBatch, layers: range, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """Runs the packed hidden states x [N, hidden] through ``layers``, layer l writing K, V into
        ``k_cache[l]``, ``v_cache[l]`` (caches [>= layers.stop, B, Hkv, S, D]); returns [N, hidden]."""
        masks = None if batch.invariant else self.attention_masks(batch)
        cos, sin = self.rope_cos[:, batch.positions, None], self.rope_sin[:, batch.positions, None]  # [2, N, 1, R]
        for l in layers:
            kind = self.layer_kind[l]
            mask = None if masks is None else masks[kind]
            window = self.cfg.sliding_window if kind else 0
            x = self.layers[l](x, cos[kind], sin[kind], k_cache[l], v_cache[l], batch, mask, window)
        return x

    def attention_masks(self, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        """[span, 1, width, kv_len] bool, for global and for windowed layers: a padded query at
        position p sees its slot's entries 0 .. p, within the sliding window where the model has
        one (the invariant kernel needs no mask)."""
        keys = torch.arange(batch.kv_len, device=batch.query_pos.device)
        causal = keys <= batch.query_pos[..., None]
        if self.cfg.sliding_window is None:
            return causal[:, None], causal[:, None]
        return causal[:, None], (causal & (keys > batch.query_pos[..., None] - self.cfg.sliding_window))[:, None]

    def head(self, x: Tensor) -> Tensor:
        """Final norm and LM head: hidden states [M, hidden] -> fp32 logits [M, V]."""
        logits = project(self.output, self.norm(x), self.invariant).float()
        cap = self.cfg.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def fork(self, src: int, dst: Sequence[int]) -> None:
        """Copies slot ``src``'s cache entries to the slots ``dst`` (n samples of one prompt, one
        prefill), all layers in one call of the KV extension."""
        kv_ops.fork(self.k_cache, self.v_cache, src, list(dst), self.lengths[src])
        for r in dst:
            self.lengths[r] = self.lengths[src]
            self.writes[r] += 1

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Rolls slots ``rows`` back to ``lengths`` (each <= its current length): O(1), no copies."""
        for r, n in zip(rows, lengths, strict=True):
            if not 0 <= n <= self.lengths[r]:
                raise ValueError(f"truncate can only shorten slot {r}: it holds {self.lengths[r]}, asked {n}")
        for r, n in zip(rows, lengths):
            self.lengths[r] = n
