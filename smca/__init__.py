"""smca: SMCA-DETR (Spatially Modulated Co-Attention DETR) on the smca_kernels operators.

Light on purpose: importing `smca` loads only the config. The model lives in `smca.models`
(`build_model(cfg)`), data in `smca.data`, training and inference in `smca.train` /
`smca.predict`.
"""
from .config import PRESETS, Config

__all__ = ["Config", "PRESETS"]
__version__ = "0.1.0"
