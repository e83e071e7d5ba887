"""Triton kernels of the co-attention device ops (backend "triton"): fused, flash-style forward
and backward over all levels in one launch. See forward.py and backward.py."""
from .backward import coattention_backward
from .forward import coattention_forward

__all__ = ["coattention_forward", "coattention_backward"]
