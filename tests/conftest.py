import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real GGUF models (fetched and converted once into the cache)")
    # The interpreter evaluates both sides of tl.where with NumPy, which warns on log(0) lanes it discards.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
