"""smca_kernels: fused Gaussian-modulated and scale-selective co-attention for SMCA-DETR.

Public API:
    gaussian_coattention, scale_selective_coattention   functional ops (smca_kernels.ops)
    SMCAAttention                                        nn.MultiheadAttention-style module
    reference                                            pure-PyTorch versions (the truth)
    available_backends(device)                           backends usable on a device
"""
from . import reference
from .modules import SMCAAttention
from .ops import available_backends, gaussian_coattention, scale_selective_coattention

__all__ = [
    "gaussian_coattention",
    "scale_selective_coattention",
    "SMCAAttention",
    "reference",
    "available_backends",
]
__version__ = "0.1.0"
