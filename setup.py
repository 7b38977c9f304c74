"""se_engine: fast, exact LLM ensembles by speculative ensemble decoding.

The C++/CUDA KV-cache extension (csrc/) is not built yet: it lands with its own issue, and
this file will build it then.
"""

from setuptools import find_packages, setup

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
    extras_require={"dev": ["pytest>=8", "scipy"]},
    entry_points={"console_scripts": ["se-engine=se_engine.cli:main"]},
)
