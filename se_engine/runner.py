"""Loading a model argument into a runner: the object every decoding method drives.

A runner owns one model's KV cache of ``max_batch`` slots and exposes::

    forward(rows, tokens, num_logits) -> fp32 logits [sum(num_logits), V]
        appends the ragged token lists tokens[i] to slots rows[i], in one pass; returns the logits
        of the last num_logits[i] tokens of each row, row after row
    truncate(rows, lengths)     # O(1) rollback of those slots
    lengths                     # host list: cache entries per slot
    writes                      # host list: per slot, the forwards and forks that wrote into it
    max_batch, max_len, vocab_size, device
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from .checks import is_int
from .errors import VocabularyMismatchError
from .hf_runner import HFRunner
from .model import Transformer
from .quant import LAYERS, Scheme
from .quant import quantize as quantize_weights
from .sources import resolve


@runtime_checkable  # isinstance checks every member's presence: the engine's test of a drafter
class Runner(Protocol):
    max_batch: int
    max_len: int
    vocab_size: int
    device: torch.device
    lengths: list[int]
    writes: list[int]

    def forward(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], num_logits: Sequence[int]) -> Tensor: ...

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None: ...

    def fork(self, src: int, dst: Sequence[int]) -> None: ...


@dataclass
class LoadedModel:
    name: str
    runner: Runner
    tokenizer: object  # a transformers tokenizer
    num_params: int


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 everywhere: fastest on GPUs and on these AMX CPUs."""
    return torch.bfloat16


def check_load_args(*, runner: str, dtype: torch.dtype | None, device: torch.device | str, max_batch: int,
                    max_len: int, quantize: Scheme | None = None, batch_invariant: bool = True) -> None:
    """Raises for any ``load_model`` argument but the name that it would refuse, before anything loads."""
    if not isinstance(batch_invariant, bool):
        raise ValueError(f"batch_invariant must be a bool, got {batch_invariant!r}")
    if runner not in ("native", "hf"):
        raise ValueError(f"runner must be 'native' or 'hf', got {runner!r}")
    if quantize is not None and quantize not in LAYERS:
        raise ValueError(f"quantize must be None or one of {sorted(LAYERS)}, got {quantize!r}")
    if quantize is not None and runner != "native":
        raise ValueError(f"quantize={quantize!r} needs runner='native', got runner={runner!r}")
    if not is_int(max_batch) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    if runner == "hf" and max_batch != 1:
        raise ValueError(f"runner='hf' serves batch 1 only, got max_batch={max_batch}")
    if not is_int(max_len) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be None or a torch.dtype, got {dtype!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device or its name ('cpu', 'cuda:1', ...), got {device!r}") from e


def load_model(name: str, *, runner: Literal["native", "hf"] = "native", dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", max_batch: int = 1, max_len: int = 2048,
               quantize: Scheme | None = None, batch_invariant: bool = True) -> LoadedModel:
    """batch_invariant: the native runner's batch-invariant bf16 CPU kernels (``Transformer``).
    quantize="int8" | "int4": weight-only quantized linear layers (``se_engine.quant``), native
    runner only. Such a model is not the model its name says (its name says so): use it as a drafter,
    never as an ensemble member. The fast kernels are torch's CPU ones; elsewhere the layers
    dequantize at every forward and the copy is slower than the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_load_args(runner=runner, dtype=dtype, device=device, max_batch=max_batch, max_len=max_len,
                    quantize=quantize, batch_invariant=batch_invariant)
    dtype = dtype or default_dtype(device)
    path = resolve(name, dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    num_params = sum(p.numel() for p in hf_model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if runner == "native":
        model: Runner = Transformer.from_hf(hf_model, max_batch=max_batch, max_len=max_len, dtype=dtype,
                                            device=device, batch_invariant=batch_invariant)
        del hf_model
        if quantize is not None:
            model = quantize_weights(model, quantize)
    else:
        model = HFRunner(hf_model, max_len=max_len)
    label = name if quantize is None else f"{name} ({quantize})"
    return LoadedModel(name=label, runner=model, tokenizer=tokenizer, num_params=num_params)


def check_same_vocabulary(models: list[LoadedModel]) -> int:
    """Ensembles mix distributions token by token: every model must index the same tokens, so their
    tokenizers must be identical. Output layers may be padded to different sizes (Qwen2.5-7B's
    152,064 rows, 1.5B's 151,936): returns the shared vocabulary, the smallest output layer; the rows
    past it are padding that no ensemble samples or normalises over."""
    first = models[0]
    first_vocab = first.tokenizer.get_vocab()
    for other in models[1:]:
        if (vocab := other.tokenizer.get_vocab()) != first_vocab:
            raise VocabularyMismatchError(f"{other.name} and {first.name} use different tokenizers: "
                                          f"{first_difference(vocab, first_vocab, other.name, first.name)}")
    return min(m.runner.vocab_size for m in models)


def first_difference(a: dict[str, int], b: dict[str, int], a_name: str, b_name: str) -> str:
    """The lowest token id that two tokenizer vocabularies (token -> id) map differently, in words."""
    a_tokens, b_tokens = ({i: t for t, i in v.items()} for v in (a, b))
    i = min(i for i in a_tokens.keys() | b_tokens.keys() if a_tokens.get(i) != b_tokens.get(i))
    return f"token id {i} is {a_tokens.get(i)!r} in {a_name}, {b_tokens.get(i)!r} in {b_name}"
