import os

import pytest
import torch

from se_engine import LoadedModel, load_model

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def tiny_models():
    """A loader of the built-in tiny models: tiny_models(names, **load_kwargs) -> one LoadedModel per
    name, loaded with ``load_model(name, **load_kwargs)`` once per test module and arguments (the
    tests of a module share them, as they share a module fixture)."""
    loaded: dict[tuple, list[LoadedModel]] = {}

    def load(names: list[str], **load_kwargs) -> list[LoadedModel]:
        key = (tuple(names), tuple(sorted(load_kwargs.items())))
        if key not in loaded:
            loaded[key] = [load_model(name, **load_kwargs) for name in names]
        return loaded[key]

    return load
