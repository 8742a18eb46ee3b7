"""The structure of ultralytics' CBAM modules (ultralytics/nn/modules/conv.py: ChannelAttention,
SpatialAttention, CBAM, and the Conv block its models are built from), re-written for the tests:
ultralytics is not a dependency. Attribute names (and so state_dict keys) and the forward maths
are ultralytics'."""
import torch
import torch.nn as nn


def autopad(k, p=None, d=1):
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    """conv, BatchNorm, SiLU (ultralytics Conv)."""
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) \
            else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ChannelAttention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, 1, 0, bias=True)
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act(self.fc(self.pool(x)))


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size=7):
        super().__init__()
        assert kernel_size in {3, 7}, "kernel size must be 3 or 7"
        padding = 3 if kernel_size == 7 else 1
        self.cv1 = nn.Conv2d(2, 1, kernel_size, padding=padding, bias=False)
        self.act = nn.Sigmoid()

    def forward(self, x):
        pooled = torch.cat([torch.mean(x, 1, keepdim=True), torch.max(x, 1, keepdim=True)[0]], 1)
        return x * self.act(self.cv1(pooled))


class CBAM(nn.Module):
    def __init__(self, c1, kernel_size=7):
        super().__init__()
        self.channel_attention = ChannelAttention(c1)
        self.spatial_attention = SpatialAttention(kernel_size)

    def forward(self, x):
        return self.spatial_attention(self.channel_attention(x))


class TinyDetector(nn.Module):
    """A small ultralytics-style backbone + classifier head: Conv blocks with a CBAM after each
    stage, plus a stand-alone ChannelAttention and SpatialAttention (as yaml models use them)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.model = nn.Sequential(
            Conv(3, 16, 3, 2), CBAM(16, 7),
            Conv(16, 32, 3, 2), CBAM(32, 3),
            Conv(32, 32, 3, 1), ChannelAttention(32), SpatialAttention(3),
            Conv(32, 64, 3, 2), CBAM(64, 7),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.model(x)).flatten(1))
