"""Compiles every variant of the fused kernels (triton_kernels.verify) and the batch-invariant ones
(triton_kernels.invariant) for a Hopper GPU (sm_90) on a machine without one.

    python tools/kernel_compile.py        (run by tests/test_kernels.py; TRITON_INTERPRET must be unset)

The interpreter that runs the kernels in CPU tests skips Triton's compiler, whose type rules are
stricter (a variable set in both branches of a runtime ``if`` must have one type, loop-carried
values keep theirs). Here each launch of ``triton_kernels.verify._launch`` is recorded instead of
run, with the tiling it uses on a GPU, and compiled to a cubin by the Triton wheel's own ptxas.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import triton_kernels.invariant as inv  # noqa: E402
import triton_kernels.verify as vm  # noqa: E402
from se_engine.ensemble import EnsembleSpec  # noqa: E402

KERNELS = ("_stats_kernel", "_pick_kernel", "_finish_kernel")
TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
         torch.int32: "*i32"}


def arg_type(x) -> str:
    if isinstance(x, torch.Tensor):
        return TYPES[x.dtype]
    if isinstance(x, float):
        return "fp32"
    return "i32" if -2**31 <= x < 2**31 else "i64"


def recorded_launches(n: int, linear: bool, sample: bool, logprobs: bool, dtype: torch.dtype) -> list:
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **constexprs: launches.append((self.fn, args, constexprs))

    T, V, B = 6, 151936, 2
    logits = [torch.randn(T, V).to(dtype) for _ in range(n)]
    spec = EnsembleSpec.linear([1.0] + [-0.1] * (n - 1)) if linear else EnsembleSpec.weighted([1.0] * n)
    ids = torch.zeros(T, dtype=torch.long)
    originals = {k: getattr(vm, k) for k in KERNELS}
    tiling = vm._tiling
    try:
        for k in KERNELS:
            setattr(vm, k, Recorder(originals[k]))
        vm._tiling = lambda device, V: tiling(torch.device("cuda"), V)  # the GPU's tiling
        vm._launch(logits, spec.coefficients, linear, torch.tensor([0, 4, T]), torch.ones(B), torch.ones(T),
                   torch.arange(B), ids, ids, torch.arange(T), 1, sample, 4, logprobs)
    finally:
        vm._tiling = tiling
        for k, fn in originals.items():
            setattr(vm, k, fn)
    return launches


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    compiled = 0
    for n, linear, sample, logprobs, dtype in itertools.product(
            (1, 2, 3, 4), (False, True), (False, True), (False, True), (torch.bfloat16, torch.float32)):
        if (linear and n == 1) or (dtype == torch.float32 and (n, logprobs) != (2, True)):
            continue
        for fn, args, constexprs in recorded_launches(n, linear, sample, logprobs, dtype):
            signature = {name: arg_type(a) for name, a in zip(fn.arg_names, args)}
            signature.update({name: "constexpr" for name in constexprs})
            consts = {(fn.arg_names.index(name),): v for name, v in constexprs.items()}
            try:
                triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target)
            except Exception as e:
                sys.exit(f"{fn.__name__} (n={n}, linear={linear}, sample={sample}, logprobs={logprobs}, {dtype}) "
                         f"does not compile for sm_90:\n{e}")
            compiled += 1
    for dtype in (torch.bfloat16, torch.float32):
        t = TYPES[dtype]
        for bias in (False, True):
            compile_one(target, inv._linear_kernel,
                        {"x_ptr": t, "w_ptr": t, "b_ptr": t, "y_ptr": t, "M": "i32", "N": "i32", "K": "i32"},
                        {"HAS_BIAS": bias, "BM": inv.BLOCK_M, "BN": inv.BLOCK_N, "BK": inv.BLOCK_K, "UPCAST": False})
            compiled += 1
        for d in (64, 128):
            compile_one(target, inv._attention_kernel,
                        {"q_ptr": t, "k_ptr": t, "v_ptr": t, "slots_ptr": "*i64", "positions_ptr": "*i64", "out_ptr": t,
                         "Hq": "i32", "Hkv": "i32", "S": "i32", "scale": "fp32", "window": "i32",
                         "softcap": "fp32"},
                        {"D": d, "BLOCK_D": d, "BLOCK": inv.BLOCK_KV})
            compiled += 1
    print(f"{compiled} kernel variants compiled for sm_90")


def compile_one(target, fn, signature: dict, constexprs: dict) -> None:
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    consts = {(fn.arg_names.index(name),): v for name, v in constexprs.items()}
    try:
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target)
    except Exception as e:
        sys.exit(f"{fn.__name__} ({constexprs}) does not compile for sm_90:\n{e}")


if __name__ == "__main__":
    main()
