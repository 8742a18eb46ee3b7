"""cbam_fused: fused CUDA kernels for CBAM (Convolutional Block Attention Module)."""
from . import _C  # noqa: F401  registers the op schemas (torch.ops.cbam_fused.*)
