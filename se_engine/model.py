"""Native decoder for the Llama / Qwen2 family with a static, per-sequence KV cache.

Written in plain PyTorch in the manner of gpt-fast: one module per block, weights
fused where that saves a matmul (q|k|v and gate|up), the KV cache preallocated once.

Shapes used throughout:
    B  batch rows (cache slots)         k  new query tokens per row in one forward
    L  layers    Hq / Hkv  query / key-value heads    D  head dim    S  cache capacity (max_len)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import invariant_ops, kv_ops
from .cuda_graphs import GraphedForward
from .errors import UnsupportedModelError
from .packing import PackedBatch, check_forward

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
    """x: [N, H, D]; cos, sin: [N, 1, D] (fp32)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, batch: PackedBatch,
                mask: Tensor | None) -> Tensor:
        """x: [N, hidden]; k_cache, v_cache: this layer's [B, Hkv, S, D], written at (slots, positions)."""
        cfg = self.cfg
        N = x.shape[0]
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = project(self.wqkv, x, batch.invariant).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(N, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.view(N, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        # Advanced indices [N] around a full slice put N first: the value is [N, Hkv, D].
        k_cache[batch.slots, :, batch.positions] = k
        v_cache[batch.slots, :, batch.positions] = v.view(N, cfg.num_kv_heads, cfg.head_dim)
        if batch.invariant:
            out = invariant_ops.attention(q, k_cache, v_cache, batch.slots, batch.positions)
            return project(self.wo, out.view(N, q_dim), True)
        span, width = batch.span, batch.width
        if batch.pad_index is not None:
            q = q.new_zeros(span * width, cfg.num_heads, cfg.head_dim).index_copy_(0, batch.pad_index, q)
        q = q.view(span, width, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        window = slice(batch.lo, batch.lo + span)
        out = F.scaled_dot_product_attention(q, k_cache[window, :, :batch.kv_len], v_cache[window, :, :batch.kv_len],
                                             attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(span * width, q_dim)
        if batch.pad_index is not None:
            out = out.index_select(0, batch.pad_index)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, invariant: bool) -> Tensor:
        gate, up = project(self.w13, x, invariant).chunk(2, dim=-1)
        return project(self.w2, F.silu(gate) * up, invariant)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, batch: PackedBatch,
                mask: Tensor | None) -> Tensor:
        """x: [N, hidden] -> [N, hidden]; writes the N tokens' K, V into this layer's cache."""
        x = x + self.attention(self.attention_norm(x), cos, sin, k_cache, v_cache, batch, mask)
        return x + self.feed_forward(self.ffn_norm(x), batch.invariant)


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
        self.lengths = [0] * max_batch
        self.writes = [0] * max_batch
        self.invariant = batch_invariant and dtype == torch.bfloat16 and self.device.type in ("cpu", "cuda")
        if self.invariant and self.device.type == "cpu":
            invariant_ops.has_fast_path()  # fails here, not mid-forward, if the extension is missing
        self.graphs: GraphedForward | None = None
        cos, sin = rope_tables(cfg, max_len)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

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
        x = self.run_layers(self.tok_embeddings(batch.tokens), batch, range(self.cfg.num_layers),
                            self.k_cache, self.v_cache)
        return x[batch.logit_index]

    def run_layers(self, x: Tensor, batch: PackedBatch, layers: range, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """Runs the packed hidden states x [N, hidden] through ``layers``, layer l writing K, V into
        ``k_cache[l]``, ``v_cache[l]`` (caches [>= layers.stop, B, Hkv, S, D]); returns [N, hidden]."""
        # A padded query at position p sees its slot's entries 0 .. p (the invariant kernel needs no mask).
        mask = None if batch.invariant else \
            (torch.arange(batch.kv_len, device=x.device) <= batch.query_pos[..., None])[:, None]
        cos, sin = self.rope_cos[batch.positions][:, None], self.rope_sin[batch.positions][:, None]
        for l in layers:
            x = self.layers[l](x, cos, sin, k_cache[l], v_cache[l], batch, mask)
        return x

    def head(self, x: Tensor) -> Tensor:
        """Final norm and LM head: hidden states [M, hidden] -> fp32 logits [M, V]."""
        return project(self.output, self.norm(x), self.invariant).float()

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
