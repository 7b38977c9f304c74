"""Between text and token ids: a prompt's ids, and each generated token's part of the text, for logprobs.

A byte-level token may end inside a multi-byte UTF-8 character (one emoji can be four tokens), so
decoding tokens one by one gives U+FFFD pieces that neither join to the text nor have its length.
A token's *share* is the text it completes: the characters that appear once it is decoded after the
tokens before it, "" for a token that ends inside a character (the token completing it gets the
whole character). Shares join to the text (``skip_special_tokens``: special tokens share ""). A
token's *bytes* are its own bytes: for a byte-level tokenizer those of its vocabulary entry, else
the UTF-8 of its share.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

CONTEXT = 8  # tokens decoded before each one: enough for the longest UTF-8 character (4 bytes)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]``. A fast tokenizer's Rust backend is
    called directly, without offsets: it releases the GIL while it works and its result frees in
    milliseconds, where transformers' path holds the GIL some 0.1 s for a 4 MiB prompt (building and
    freeing offsets and token strings), which would stall a server's event loop meanwhile."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation or backend.padding
            or backend.encode_special_tokens != getattr(tokenizer, "split_special_tokens", False)):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return backend.encode_batch_fast([text], add_special_tokens=False)[0].ids


def token_shares(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's share of ``tokenizer.decode(ids, skip_special_tokens=True)``."""
    shares, start, done, text = [], 0, 0, ""  # decode from ids[start:]; its first `done` characters are out
    for i in range(len(ids)):
        text = tokenizer.decode(ids[start:i + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") and i + 1 < len(ids):  # a character still incomplete: wait for more bytes
            shares.append("")
            continue
        shares.append(text[done:])
        if i + 1 - start > CONTEXT:  # move the window on at a character boundary
            start = i + 1 - CONTEXT
            done = len(tokenizer.decode(ids[start:i + 1], skip_special_tokens=True))
        else:
            done = len(text)
    return shares


def token_bytes(tokenizer: Any, ids: list[int], shares: list[str]) -> list[list[int]]:
    """Each token's bytes (``shares``: token_shares of the same ids)."""
    decoder = _byte_decoder() if _is_byte_level(tokenizer) else None
    if decoder is None:
        return [list(s.encode()) for s in shares]
    out, special = [], set(tokenizer.all_special_ids)  # a property that builds its list on every read
    for t, piece, share in zip(ids, tokenizer.convert_ids_to_tokens(ids), shares):
        if t in special or any(c not in decoder for c in piece):  # special or added text
            out.append(list(share.encode()))
        else:
            out.append([decoder[c] for c in piece])
    return out


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character map of byte-level tokenizers, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in enumerate(bytes_to_unicode())}
