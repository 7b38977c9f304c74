"""se_engine: fast, exact LLM ensembles by speculative ensemble decoding.

Builds the extension se_engine._kv from csrc/: the KV-cache ops se_kv::compact and se_kv::fork (CPU
always, CUDA kernels too where torch was built with CUDA and a CUDA toolkit is found) and the
batch-invariant bf16 CPU kernels se_inv::linear and se_inv::attention, and the int4 drafter's
se_q::int4_linear. It imports
the installed torch (the extension must match its ABI), so install torch first and build without
isolation: pip install --no-build-isolation --use-pep517 -e . (--use-pep517: pip < 25.3 otherwise
picks `setup.py develop`, which recent setuptools re-runs as an isolated pip build that lacks torch).
"""

import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:  # typically pip's isolated build environment
    sys.exit("se_engine builds a torch extension: install torch first, then "
             "pip install --no-build-isolation --use-pep517 -e .")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def kv_extension():
    # at::parallel_for expands to OpenMP pragmas in the extension's own code (torch's CPU build is OpenMP).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", *openmp]
    if torch.version.cuda and CUDA_HOME:
        return CUDAExtension("se_engine._kv", ["csrc/kv_cache.cpp", "csrc/invariant_cpu.cpp", "csrc/quant_cpu.cpp",
                              "csrc/kv_cache_kernels.cu"],
                             define_macros=[("SE_KV_CUDA", None)],
                             extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=openmp)
    return CppExtension("se_engine._kv", ["csrc/kv_cache.cpp", "csrc/invariant_cpu.cpp", "csrc/quant_cpu.cpp"],
                        extra_compile_args={"cxx": cxx}, extra_link_args=openmp)


SERVER = ["fastapi>=0.110", "uvicorn>=0.23", "jinja2"]  # se-engine serve (jinja2: chat templates); not the engine

setup(
    name="se_engine",
    version="0.1.0",
    description="Kernel-accelerated speculative ensemble decoding for LLM ensembles",
    packages=find_packages(include=["se_engine", "se_engine.*", "triton_kernels", "triton_kernels.*"]),
    python_requires=">=3.10",
    # Lower bounds only: the GPU machines run torch 2.11 / transformers 5.17, the CPU ones 2.13 / 5.2x.
    install_requires=[
        "torch>=2.5",
        "triton>=3.2",  # the fused kernels; on the CPU they run under TRITON_INTERPRET=1 (tests)
        "transformers>=5.0",
        "accelerate",  # transformers needs it to load GGUF files
        "gguf>=0.10",
        "safetensors",
        "tokenizers",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "server": SERVER,
        "bench": ["matplotlib"],  # bench.e2e's plots
        "ray": [*SERVER, "ray[serve]>=2.50"],  # se-engine serve --ray: replicas behind Ray Serve
        "dev": ["pytest>=8", "scipy", *SERVER, "openai>=1.0", "httpx", "matplotlib", "ray[serve]>=2.50"],
    },
    entry_points={"console_scripts": ["se-engine=se_engine.cli:main"]},
    ext_modules=[kv_extension()],
    cmdclass={"build_ext": BuildExtension},
)
