"""cbam_fused: fused CUDA kernels for CBAM (Convolutional Block Attention Module).

Layers (DESIGN.md section 4):
    cbam_fused.CBAM / ChannelGate / SpatialGate   nn.Modules (official state_dict keys)
    cbam_fused.functional.cbam                    the whole block as one autograd node
    torch.ops.cbam_fused.*                        the custom ops (CUDA kernels, CPU kernels)
    cbam_fused.reference                          naive eager CBAM, the oracle of the tests
    cbam_fused.export.decompositions()            the ops as ATen, for ONNX and other backends
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _ops  # noqa: F401  schemas (cbam_fused._C), fake and CPU kernels
from . import functional, reference  # noqa: F401
from .modules import CBAM, ChannelGate, SpatialGate, hidden_size, pools_from_types  # noqa: F401
from .convert import (ConversionError, ConversionReport, convert, is_converted,  # noqa: F401
                      record_attention, unconvert)
from .compat import (CbamModule, ChannelAttention, LightCbamModule, SpatialAttention,  # noqa: F401
                     UltralyticsCBAM)
from . import compat, export, viz  # noqa: F401

__version__ = "0.1.0"
__all__ = ["CBAM", "ChannelGate", "SpatialGate", "functional", "reference", "hidden_size",
           "pools_from_types", "convert", "unconvert", "is_converted", "record_attention",
           "ConversionReport", "ConversionError", "CbamModule", "LightCbamModule", "ChannelAttention",
           "SpatialAttention", "UltralyticsCBAM", "compat", "export", "viz"]
