"""Native decoder for the Llama / Qwen2 family with a static, per-sequence KV cache.

Written in plain PyTorch in the manner of gpt-fast: one module per block, weights
fused where that saves a matmul (q|k|v and gate|up), the KV cache preallocated once.

Shapes used throughout:
    B  batch rows (cache slots)         k  new query tokens per row in one forward
    L  layers    Hq / Hkv  query / key-value heads    D  head dim    S  cache capacity (max_len)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CacheOverflowError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


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

    @classmethod
    def from_hf(cls, config) -> "ModelConfig":
        """Reads a transformers config, refusing what this decoder does not implement."""
        name = getattr(config, "_name_or_path", "") or config.model_type
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{name}: model_type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}; "
                "use runner='hf' for other architectures"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{name}: hidden_act {config.hidden_act!r} is not silu")
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(
                f"{name}: rope_type {rope_type!r} is not implemented by the native runner; use runner='hf'"
            )
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError(f"{name}: sliding-window attention is not implemented; use runner='hf'")
        if getattr(config, "mlp_bias", False) or getattr(config, "o_proj_bias", False):
            raise UnsupportedModelError(f"{name}: MLP / output-projection biases are not implemented")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
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
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            tie_word_embeddings=bool(config.tie_word_embeddings),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 like the reference implementations, then cast back before the scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[Tensor, Tensor]:
    """cos, sin: [S, D] in fp32, laid out for the rotate-half convention of Llama / Qwen2."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, k, D]; cos, sin: [B, 1, k, D] (fp32)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                rows: Tensor, positions: Tensor, kv_len: int, mask: Tensor) -> Tensor:
        """x: [B, k, hidden]; k_cache, v_cache: this layer's [B, Hkv, S, D], written at (rows, positions)."""
        cfg = self.cfg
        B, k, _ = x.shape
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, kx, vx = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, k, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        kx = kx.view(B, k, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        vx = vx.view(B, k, cfg.num_kv_heads, cfg.head_dim)
        q, kx = apply_rope(q, cos, sin), apply_rope(kx, cos, sin)
        # Advanced indices [B, k] around a full slice put (B, k) first: the value is [B, k, Hkv, D].
        k_cache[rows, :, positions] = kx.transpose(1, 2)
        v_cache[rows, :, positions] = vx
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, k, q_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)


class Transformer(nn.Module):
    """A decoder with its own static KV cache; the runner interface of the engine.

    State: ``k_cache``, ``v_cache`` of shape [L, B, Hkv, S, D] (layer l's cache is ``k_cache[l]``)
    and ``lengths`` [B] int64, the number of committed cache entries of each row.
    """

    def __init__(self, cfg: ModelConfig, *, max_batch: int, max_len: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        super().__init__()
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"max_batch and max_len must be >= 1, got {max_batch} and {max_len}")
        self.cfg, self.max_batch, self.max_len = cfg, max_batch, max_len
        # Weights are left uninitialised (no random init of billions of values): every
        # constructor path ends in load_hf_state_dict.
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.to_empty(device=device)
        self.to(dtype=dtype)
        cache_shape = (cfg.num_layers, max_batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(max_batch, dtype=torch.long, device=device), persistent=False)
        cos, sin = rope_tables(cfg, max_len)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        # Host-side upper bound on lengths.max(): lets attention read only the filled prefix of the
        # cache and checks capacity without reading `lengths` back from the device on every step.
        self._length_bound = 0

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, max_batch: int = 1, max_len: int = 2048,
                dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> "Transformer":
        """Builds the decoder from a loaded transformers model (GGUF- or safetensors-backed)."""
        model = cls(ModelConfig.from_hf(hf_model.config), max_batch=max_batch, max_len=max_len,
                    dtype=dtype, device=device)
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    def load_hf_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Copies transformers-named weights (``model.layers.0.self_attn.q_proj.weight`` ...) in place."""
        cfg = self.cfg

        def take(name: str) -> Tensor:
            if name not in sd:
                raise UnsupportedModelError(f"weight {name!r} missing from the checkpoint")
            return sd[name]

        own: dict[str, Tensor] = {"tok_embeddings.weight": take("model.embed_tokens.weight"),
                                  "norm.weight": take("model.norm.weight")}
        own["output.weight"] = own["tok_embeddings.weight"] if cfg.tie_word_embeddings else take("lm_head.weight")
        for i in range(cfg.num_layers):
            p, a = f"model.layers.{i}.", f"layers.{i}."
            own[a + "attention.wqkv.weight"] = torch.cat(
                [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            if cfg.qkv_bias:
                own[a + "attention.wqkv.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            own[a + "attention.wo.weight"] = take(p + "self_attn.o_proj.weight")
            own[a + "feed_forward.w13.weight"] = torch.cat(
                [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            own[a + "feed_forward.w2.weight"] = take(p + "mlp.down_proj.weight")
            own[a + "attention_norm.weight"] = take(p + "input_layernorm.weight")
            own[a + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
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
    def forward(self, tokens: Tensor, num_tokens: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Runs k new tokens per row, each row starting at its own committed length.

        tokens: [B, k] int64, B == max_batch.
        num_tokens: [B] int64 in [0, k], the valid prefix of each row (default: all k). Padding
            positions are computed and written to the cache past the row's new length, where the
            next forward overwrites them; they never become visible.
        last_only: return logits of each row's last valid token only.
        Returns fp32 logits [B, k, V], or [B, 1, V] with ``last_only``; ``lengths`` grows by num_tokens.
        """
        B, k = tokens.shape
        if B != self.max_batch:
            raise ValueError(f"tokens has {B} rows but the cache has max_batch={self.max_batch}")
        if k < 1:
            raise ValueError("forward needs at least one query token per row")
        self._reserve(k)
        device = tokens.device
        offsets = torch.arange(k, device=device)
        positions = self.lengths[:, None] + offsets  # [B, k]
        rows = torch.arange(B, device=device)[:, None].expand(B, k)
        kv_len = self._length_bound + k
        # Query at position p sees cache entries 0..p of its own row.
        mask = (torch.arange(kv_len, device=device) <= positions[..., None])[:, None]  # [B, 1, k, kv_len]
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer.attention_norm(x)
            x = x + layer.attention(h, cos, sin, self.k_cache[i], self.v_cache[i], rows, positions, kv_len, mask)
            x = x + layer.feed_forward(layer.ffn_norm(x))

        n = torch.full((B,), k, device=device, dtype=torch.long) if num_tokens is None else num_tokens
        if last_only:
            last = (n - 1).clamp(min=0)
            x = x[torch.arange(B, device=device), last][:, None]
        self.lengths += n
        self._length_bound += k
        return self.output(self.norm(x)).float()

    def _reserve(self, k: int) -> None:
        if self._length_bound + k <= self.max_len:
            return
        self._length_bound = int(self.lengths.max())  # exact value, read only near the capacity
        if self._length_bound + k > self.max_len:
            raise CacheOverflowError(
                f"cannot append {k} tokens: a row holds {self._length_bound} of max_len={self.max_len} positions")

    def truncate(self, lengths: Tensor) -> None:
        """Rolls every row back to ``lengths`` [B] (each <= its current length): O(1), no copies."""
        if lengths.shape != self.lengths.shape:
            raise ValueError(f"lengths has shape {tuple(lengths.shape)}, expected {tuple(self.lengths.shape)}")
        if bool(((lengths < 0) | (lengths > self.lengths)).any()):
            raise ValueError(f"truncate can only shorten rows: current {self.lengths.tolist()}, asked {lengths.tolist()}")
        self.lengths.copy_(lengths)

    def reset(self) -> None:
        """Empties every row (the cache contents are simply overwritten later)."""
        self.lengths.zero_()
        self._length_bound = 0
