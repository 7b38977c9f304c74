"""Fused kernels of se_engine and their PyTorch reference twins (same signatures)."""
