"""KV-cache compaction and fork over all layers in one call, and a layer's writes (the C++/CUDA
extension in csrc/).

Caches are the model's ``k_cache`` and ``v_cache``: contiguous [L, B, Hkv, S, D] tensors (layers,
cache slots, kv heads, capacity, head dim) of one dtype on one device. Index lists are int64 CPU
tensors or Python int sequences: they are host metadata, validated without a device sync.

``compact`` / ``fork`` / ``write`` run the extension (``write``: on the CPU; its twin elsewhere);
``*_reference`` are their PyTorch twins and the specification the tests hold the extension to, bit
for bit. Rollback needs no op: it is ``Transformer.truncate`` on the host lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Index = Tensor | Sequence[int]

try:
    from . import _kv  # noqa: F401  (registers torch.ops.se_kv and torch.ops.se_inv)
    _import_error: ImportError | None = None
except ImportError as e:
    _import_error = e


def ops(namespace: str = "se_kv"):
    """The extension's torch ops of one namespace: se_kv (this module's), se_inv (``se_engine.invariant_ops``)."""
    if _import_error is not None:
        raise ImportError(
            "se_engine's extension (se_engine._kv, from csrc/) is not built or does not load: "
            "rebuild it with `python3 setup.py build_ext --inplace` or "
            f"`pip install --no-build-isolation --use-pep517 -e .` from the repository root ({_import_error})"
        ) from _import_error
    return getattr(torch.ops, namespace)


def _index(x: Index) -> Tensor:
    # Tensors pass through untouched so the extension, not a silent cast, judges their dtype.
    return x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.long)


def compact(k_cache: Tensor, v_cache: Tensor, slots: Index, src: Index, dst: Index) -> None:
    """Moves cache entry (slots[i], src[i]) to (slots[i], dst[i]) for every i, in every layer and kv
    head of both caches, in place. slots, src, dst: [n] int64.

    Every source is read before any destination is written, so src and dst lists may overlap in any
    way (shifts, swaps, one source copied to several destinations); (slot, dst) pairs must be distinct.
    Out-of-range or negative indices raise IndexError, other malformed input ValueError / TypeError.
    """
    ops().compact(k_cache, v_cache, _index(slots), _index(src), _index(dst))


def fork(k_cache: Tensor, v_cache: Tensor, src_slot: int, dst_slots: Index, length: int) -> None:
    """Copies the first ``length`` entries of slot ``src_slot`` to each of ``dst_slots`` ([n] int64,
    not containing src_slot), in every layer and kv head of both caches, in place: n samples of one
    prompt share its prefill. Positions >= length of the destination slots are left as they are.
    """
    ops().fork(k_cache, v_cache, src_slot, _index(dst_slots), length)


def write(k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
    """Writes n new tokens' entries into one layer's caches [B, Hkv, S, D] (contiguous), in place:
    k[t], v[t] ([n, Hkv, D], last dim contiguous) at slot slots[t], position positions[t] ([n] int64,
    on the caches' device; (slot, position) pairs distinct). One op instead of two index_puts."""
    if k_cache.is_cuda:
        write_reference(k_cache, v_cache, slots, positions, k, v)
    else:
        ops().write(k_cache, v_cache, slots, positions, k, v)


def compact_reference(k_cache: Tensor, v_cache: Tensor, slots: Index, src: Index, dst: Index) -> None:
    """The specification of ``compact`` (valid input only; it validates nothing)."""
    slots, src, dst = _index(slots), _index(src), _index(dst)
    for cache in (k_cache, v_cache):
        # The right-hand side gathers into a new tensor: all reads happen before the writes.
        cache[:, slots, :, dst] = cache[:, slots, :, src]


def fork_reference(k_cache: Tensor, v_cache: Tensor, src_slot: int, dst_slots: Index, length: int) -> None:
    """The specification of ``fork`` (valid input only; it validates nothing)."""
    dst_slots = _index(dst_slots)
    for cache in (k_cache, v_cache):
        cache[:, dst_slots, :, :length] = cache[:, src_slot:src_slot + 1, :, :length]


def write_reference(k_cache: Tensor, v_cache: Tensor, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
    """The specification of ``write``."""
    # Advanced indices [n] around a full slice put n first: the value is [n, Hkv, D].
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v
