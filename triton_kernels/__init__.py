"""Triton kernels of se_engine: the fused verify / sample steps (``verify``) and the batch-invariant
matmul and attention (``invariant``). Their PyTorch twins live in se_engine (``se_engine.verify``,
``se_engine.invariant_ops``); nothing here imports se_engine. The package itself imports no Triton,
so that se_engine can check a call against the kernels' limits before loading them."""

MAX_MODELS = 4  # the most models one fused verify / sample launch takes
