"""Triton kernels (attention.py, head.py), each beside a pure-PyTorch module (attention_torch.py, head_torch.py)
with its reference, its CPU path and the predicate that says whether the kernel can run. This file and the *_torch
modules never import Triton (it has no macOS wheel), so the model runs on CPU and MPS without it.

The import name `kernels` is also the PyPI package nanochat uses for FlashAttention-3: the two cannot be imported
in one environment."""

import importlib.util
import os

# Triton's interpreter runs the kernels on CPU tensors (the tests); triton.jit reads it when the kernels are defined,
# so it is read once, when this package is imported
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None  # looks for it without importing it


def triton_unavailable(device_type):
    """Why no Triton kernel can run on device_type (one phrase naming the case and the fix), or None."""
    if device_type != "cuda" and not INTERPRET:
        return f"device {device_type} (the kernels need CUDA, or TRITON_INTERPRET=1 set before import)"
    if not HAS_TRITON:
        return "without Triton (not installed: pip install triton, on Linux)"
    return None
