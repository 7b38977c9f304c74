"""What a GGUF file stores that transformers' GGUF loader drops, restored onto its config.

transformers' loader (GGUF_CONFIG_MAPPING in integrations/ggml.py) reads an architecture's sizes and
rope_theta; the conversion to a transformers directory (``sources``) reads the rest here and sets it
on the config before the weights load, so that the converted model is the file's:

- ``FIELDS``: per architecture, the metadata keys transformers does not map (Qwen3's head_dim,
  Phi-3's window and rotary width, Gemma's soft-capping and local RoPE base), and Gemma's
  query_pre_attn_scalar by llama.cpp's rule (its converter writes no attention.scale; one a file
  has is taken);
- RoPE scaling: ``{arch}.rope.scaling.type`` linear or yarn, with its factor, pretraining context
  and YaRN betas; llama.cpp's ``rope_freqs`` (Llama 3.x: a divisor per frequency, from which the
  llama3 parameters are recovered and checked to give the same divisors); Phi-3's
  ``rope_factors_short`` / ``rope_factors_long`` (longrope), with its context and cos / sin scale.

A scaling that transformers' rope parameters cannot express (YaRN's attention knobs, another type)
raises ModelSourceError: a model never runs with a rotation other than the file's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import ModelSourceError
from .model import longrope_attention_factor

# The divisors are float32; the recovered llama3 parameters must give them to about that precision.
LLAMA3_RTOL = 1e-5
# llama.cpp's YaRN knobs that transformers' yarn has no place for, and the values that mean "unused".
YARN_UNUSED = {"attn_factor": (1.0,), "yarn_attn_factor": (1.0,), "yarn_log_multiplier": (0.0,),
               "yarn_ext_factor": (-1.0, 1.0)}


def _attribute(name: str) -> Callable:
    def set_attribute(config, value) -> None:
        setattr(config, name, value)
    return set_attribute


def _window(config, window: int) -> None:
    config.sliding_window = window or None  # llama.cpp writes 0 for none (Phi-4)


def _rotary_dims(config, dims: int) -> None:
    """partial_rotary_factor from the rotated dims of a head (Phi-4-mini: 96 of 128)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if dims != head_dim:
        config.partial_rotary_factor = _full_rope(config)["partial_rotary_factor"] = dims / head_dim


def _attention_scale(config, scale: float) -> None:
    """Gemma's query_pre_attn_scalar from the attention scale, its inverse square root."""
    scalar = float(f"{scale ** -2:.6g}")  # stored as a float32
    config.query_pre_attn_scalar = int(scalar) if scalar.is_integer() else scalar


def _sliding_rope_theta(config, theta: float) -> None:
    config.rope_parameters["sliding_attention"]["rope_theta"] = theta


# general.architecture -> {metadata key after "{arch}.": what sets it on the config}
FIELDS: dict[str, dict[str, Callable]] = {
    "qwen3": {"attention.key_length": _attribute("head_dim")},
    "phi3": {"attention.sliding_window": _window, "rope.dimension_count": _rotary_dims},
    "gemma2": {"attn_logit_softcapping": _attribute("attn_logit_softcapping"),
               "final_logit_softcapping": _attribute("final_logit_softcapping"),
               "attention.scale": _attention_scale},
    "gemma3": {"final_logit_softcapping": _attribute("final_logit_softcapping"), "attention.scale": _attention_scale,
               "rope.freq_base_swa": _sliding_rope_theta},
}


# Gemma's 27B models scale attention by hidden / heads, the others by head_dim: llama.cpp tells them
# by their layer count.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def restore(config, path: Path) -> None:
    """Sets on ``config`` (what transformers' GGUF loader read from the file at path) the fields the
    file stores that the loader dropped; ModelSourceError for a RoPE scaling that cannot be expressed."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _value(reader.fields["general.architecture"])
    meta = {name.removeprefix(f"{arch}."): _value(field) for name, field in reader.fields.items()
            if name.startswith(f"{arch}.")}
    for key, set_field in FIELDS.get(arch, {}).items():
        if key in meta:
            set_field(config, meta[key])
    if arch in GEMMA_27B_LAYERS and "attention.scale" not in meta:
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads \
            if config.num_hidden_layers == GEMMA_27B_LAYERS[arch] else config.head_dim
    try:
        scaling = rope_scaling(meta, {t.name: t for t in reader.tensors})
    except ValueError as e:
        raise ModelSourceError(f"cannot load GGUF {path}: {e}; load a transformers directory instead") from e
    if scaling:
        _full_rope(config).update(scaling)
        if "original_max_position_embeddings" in scaling and hasattr(config, "original_max_position_embeddings"):
            # Phi3Config's own attribute: transformers takes it over the rope parameters' on reload.
            config.original_max_position_embeddings = scaling["original_max_position_embeddings"]


def rope_scaling(meta: dict, tensors: dict) -> dict | None:
    """transformers' rope parameters for a GGUF's RoPE scaling (rope_type and its fields), from its
    metadata (keys after "{arch}.") and tensors by name; None where the file scales nothing."""
    keys = {k.removeprefix("rope.scaling."): v for k, v in meta.items() if k.startswith("rope.scaling.")}
    kind = keys.get("type", "none")
    factors = [n for n in ("rope_factors_short.weight", "rope_factors_long.weight") if n in tensors]

    def required(name: str):
        if name not in keys:
            raise ValueError(f"its RoPE scaling ({kind}) has no rope.scaling.{name}")
        return keys[name]

    if "rope_freqs.weight" in tensors:
        if kind != "none" or factors:
            raise ValueError(f"it has a rope_freqs tensor beside rope.scaling.type {kind!r} or longrope factors")
        return llama3_parameters(_floats(tensors["rope_freqs.weight"]), float(meta["rope.freq_base"]))
    if factors:
        if kind not in ("none", "longrope"):
            raise ValueError(f"it has longrope factor tensors beside rope.scaling.type {kind!r}")
        if len(factors) < 2:
            raise ValueError(f"it has {factors[0]} without the other longrope set")
        kind, original = "longrope", int(required("original_context_length"))
        params = {"rope_type": "longrope", "original_max_position_embeddings": original,
                  **{f"{w}_factor": [float(f) for f in _floats(tensors[f"rope_factors_{w}.weight"])]
                     for w in ("short", "long")}}
        default = longrope_attention_factor(meta["context_length"] / original, original)
        # The file's is a float32: transformers' own where it is that one, so that configs compare equal.
        if "attn_factor" in keys and not math.isclose(keys["attn_factor"], default, rel_tol=1e-6):
            params["attention_factor"] = float(keys["attn_factor"])
        return params
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(required("factor"))}
    if kind == "yarn":
        if changed := {k: keys[k] for k, unused in YARN_UNUSED.items() if k in keys and keys[k] not in unused}:
            raise ValueError(f"its YaRN sets {changed}, which transformers' yarn cannot express")
        params = {"rope_type": "yarn", "factor": float(required("factor"))}
        if "original_context_length" in keys:  # else transformers takes max_position_embeddings, as llama.cpp does
            params["original_max_position_embeddings"] = int(keys["original_context_length"])
        for name in ("beta_fast", "beta_slow"):
            if f"yarn_{name}" in keys:
                params[name] = float(keys[f"yarn_{name}"])
        return params
    raise ValueError(f"its rope.scaling.type {kind!r} is not linear or yarn (nor longrope with its factor tensors)")


def llama3_parameters(divisors: np.ndarray, theta: float) -> dict:
    """The llama3 rope parameters whose frequency divisors are ``divisors`` ([dim / 2], llama.cpp's
    rope_freqs) for the base theta; ValueError where no llama3 parameters give them.

    A divisor v is 1 / ((1 - s) / factor + s), s = (original / wavelength - low) / (high - low)
    clamped to [0, 1]. Only the ratios matter, so low_freq_factor is taken as 1, as in every released
    Llama 3.x; the band 0 < s < 1 is then a line in 1 / wavelength, slope original / (high - 1) and
    intercept -1 / (high - 1). A band of one frequency fixes one of the two: high_freq_factor is then
    taken as Llama 3.x's 4."""
    dim = 2 * divisors.size
    wavelength = 2 * math.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor = float(f"{divisors.max():.6g}")
    s = (1 / divisors - 1 / factor) / (1 - 1 / factor) if factor > 1 else np.zeros_like(divisors)
    band = (s > 1e-4) & (s < 1 - 1e-4)
    if not band.any():
        raise ValueError("no frequency of its rope_freqs tensor lies between kept and stretched, which "
                         "leaves llama3's parameters unknown")
    if band.sum() == 1:
        high = 4.0
        original = float(wavelength[band][0] * (1 + (high - 1) * s[band][0]))
    else:
        slope, intercept = np.polyfit(1 / wavelength[band], s[band], 1)
        high = float(f"{1 - 1 / intercept:.6g}")
        original = slope * (high - 1)
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
              "original_max_position_embeddings": round(original)}
    smooth = ((params["original_max_position_embeddings"] / wavelength - 1) / (high - 1)).clip(0, 1)
    err = np.abs(1 / ((1 - smooth) / factor + smooth) / divisors - 1).max()
    if not err <= LLAMA3_RTOL:
        raise ValueError(f"its rope_freqs tensor is not llama3's: the nearest llama3 parameters {params} "
                         f"miss it by {err:.1e} (relative)")
    return params


def _full_rope(config) -> dict:
    """The full-attention layers' rope parameters (all layers', where they share them)."""
    rope = config.rope_parameters
    return rope.get("full_attention", rope)


def _floats(tensor) -> np.ndarray:
    """[n] float64: a GGUF tensor's values."""
    return np.asarray(tensor.data, dtype=np.float64).reshape(-1)


def _value(field):
    """A scalar or string GGUF metadata field's value."""
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value.item()
