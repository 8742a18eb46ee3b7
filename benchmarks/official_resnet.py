"""The official ResNet with CBAM (Jongchan/attention-module, MODELS/model_resnet.py).

The code lives in official_cbam.py (one file, the single copy of the official structure); this
module re-exports it for `from official_resnet import ResidualNet`."""
from official_cbam import BasicBlock, Bottleneck, ResidualNet, ResNet, conv3x3  # noqa: F401

__all__ = ["BasicBlock", "Bottleneck", "ResidualNet", "ResNet", "conv3x3"]
