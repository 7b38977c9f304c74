"""The RoPE scaling a GGUF file stores, as transformers' rope parameters.

transformers' GGUF loader reads a file's rope_theta but none of its scaling, so the conversion to a
transformers directory (``sources``) reads it here and merges it into the converted config:

- ``{arch}.rope.scaling.type`` linear or yarn, with its factor, pretraining context and YaRN betas;
- ``rope_freqs``, llama.cpp's form of Llama 3.x RoPE: a divisor per frequency, from which the
  llama3 parameters are recovered and checked to give the same divisors.

Whatever else scales RoPE (Phi-3's longrope factor tensors, YaRN's attention knobs, other types)
raises ValueError: a model never runs with a rotation other than the file's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# The divisors are float32; the recovered llama3 parameters must give them to about that precision.
LLAMA3_RTOL = 1e-5
# llama.cpp's YaRN knobs that transformers' yarn has no place for, and the values that mean "unused".
YARN_DEFAULTS = {"attn_factor": 1.0, "yarn_attn_factor": 1.0, "yarn_log_multiplier": 0.0, "yarn_ext_factor": -1.0}


def rope_parameters(path: Path) -> dict | None:
    """transformers' rope parameters for the scaling of the GGUF at path (rope_type and its fields,
    to merge into the full-attention layers' parameters), or None where the file scales nothing."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _value(reader.fields["general.architecture"])
    keys = {name.removeprefix(f"{arch}.rope.scaling."): _value(field) for name, field in reader.fields.items()
            if name.startswith(f"{arch}.rope.scaling.")}
    tensors = {t.name: t for t in reader.tensors}
    if factors := [n for n in ("rope_factors_short.weight", "rope_factors_long.weight") if n in tensors]:
        raise ValueError(f"it scales RoPE by the tensors {factors} (longrope), which se_engine does not read")
    kind = keys.get("type", "none")
    if "rope_freqs.weight" in tensors:
        if kind != "none":
            raise ValueError(f"it has both rope.scaling.type {kind!r} and a rope_freqs tensor")
        divisors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).reshape(-1)
        return llama3_parameters(divisors, float(_value(reader.fields[f"{arch}.rope.freq_base"])))
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(keys["factor"])}
    if kind == "yarn":
        if changed := {k: keys[k] for k, default in YARN_DEFAULTS.items() if k in keys and keys[k] != default}:
            raise ValueError(f"its YaRN sets {changed}, which transformers' yarn cannot express")
        params = {"rope_type": "yarn", "factor": float(keys["factor"]),
                  "original_max_position_embeddings": int(keys["original_context_length"])}
        for name in ("beta_fast", "beta_slow"):
            if f"yarn_{name}" in keys:
                params[name] = float(keys[f"yarn_{name}"])
        return params
    raise ValueError(f"its rope.scaling.type {kind!r} is not linear or yarn")


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


def _value(field):
    """A scalar or string GGUF metadata field's value."""
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value.item()
