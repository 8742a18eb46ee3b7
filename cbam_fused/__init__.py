"""cbam_fused: fused CUDA kernels for CBAM (Convolutional Block Attention Module)."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ops  # noqa: F401  schemas (cbam_fused._C), fake and CPU kernels
