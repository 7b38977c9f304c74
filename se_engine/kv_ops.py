"""KV-cache compaction and fork over all layers in one call (the C++/CUDA extension in csrc/).

Caches are the model's ``k_cache`` and ``v_cache``: contiguous [L, B, Hkv, S, D] tensors (layers,
cache slots, kv heads, capacity, head dim) of one dtype on one device. Index lists are int64 CPU
tensors or Python int sequences: they are host metadata, validated without a device sync.

``compact`` / ``fork`` run the extension; ``compact_reference`` / ``fork_reference`` are their
PyTorch twins and the specification the tests hold the extension to, bit for bit. Rollback needs no
op: it is ``Transformer.truncate`` on the host lengths.
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
