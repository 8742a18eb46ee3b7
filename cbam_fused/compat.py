"""Drop-in classes with the constructors and state_dict keys of timm's and ultralytics' CBAM modules
(cbam_fused.CBAM is the official code's). Each forward is one cbam_fused.functional.cbam call;
checkpoints of the originals load with strict=True, and the originals' converted forms
(cbam_fused.convert) compute the same.

    timm (timm.layers.cbam)         CbamModule, LightCbamModule, ChannelAttn, LightChannelAttn,
                                    SpatialAttn, LightSpatialAttn
    ultralytics (nn/modules/conv.py) ChannelAttention, SpatialAttention,
                                    UltralyticsCBAM (their CBAM)

timm's act_layer may be any of ReLU / SiLU (Swish) / exact GELU / Identity, as a class or a timm
name ('relu', 'silu', 'swish', 'gelu', 'identity'); gate_layer must be a sigmoid ('sigmoid' or a
sigmoid class): the fused path has no other gate.
"""
from typing import Optional, Type, Union

from torch import nn

from ._recognize import _act_name, _is_sigmoid, _Unsupported
from ._spec import BlockSpec, _SpecForward

__all__ = ["CbamModule", "LightCbamModule", "ChannelAttn", "LightChannelAttn", "SpatialAttn",
           "LightSpatialAttn", "ChannelAttention", "SpatialAttention", "UltralyticsCBAM",
           "make_divisible"]

_ACT_NAMES = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU,
              "identity": nn.Identity}


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None,
                   round_limit: float = 0.9) -> int:
    """timm's channel rounding (timm.layers.helpers.make_divisible)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _make_act(act_layer) -> nn.Module:
    if isinstance(act_layer, str):
        if act_layer.lower() not in _ACT_NAMES:
            raise ValueError(f"act_layer: {act_layer!r} is not fused (supported: "
                             f"{sorted(_ACT_NAMES)})")
        act_layer = _ACT_NAMES[act_layer.lower()]
    if isinstance(act_layer, nn.Module):
        act = act_layer
    else:
        try:
            act = act_layer(inplace=True)
        except TypeError:  # nn.GELU, nn.Identity take no inplace
            act = act_layer()
    try:
        _act_name(act)
    except _Unsupported as e:
        raise ValueError(f"act_layer: {e}") from None
    return act


def _make_gate(gate_layer) -> nn.Module:
    if isinstance(gate_layer, str):
        if gate_layer.lower() != "sigmoid":
            raise ValueError(f"gate_layer: {gate_layer!r} is not fused (only 'sigmoid')")
        return nn.Sigmoid()
    gate = gate_layer if isinstance(gate_layer, nn.Module) else gate_layer()
    if not _is_sigmoid(gate):
        raise ValueError(f"gate_layer: {type(gate).__name__} is not fused (only a sigmoid)")
    return gate


def _prefixed(spec: BlockSpec, name: str) -> dict:
    return {k: (None if v is None else (name,) + v) if k in ("fc1", "fc2", "conv", "bn") else v
            for k, v in spec.__dict__.items()}


# ------------------------------------------------------------------------------------- timm
class ConvNormAct(nn.Module):
    """timm ConvNormAct(in, 1, k, apply_act=False) as the spatial gates use it: keys conv, bn."""

    def __init__(self, in_channels: int, kernel_size: int, device=None, dtype=None):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"spatial_kernel_size: expected an odd kernel size, got "
                             f"{kernel_size}")
        self.conv = nn.Conv2d(in_channels, 1, kernel_size, padding=kernel_size // 2, bias=False,
                              device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(1, device=device, dtype=dtype)


class ChannelAttn(_SpecForward):
    """timm ChannelAttn: gc = sigmoid(fc2(act(fc1(avg))) + fc2(act(fc1(max)))); 1x1 convs."""
    _pools = "avg+max"

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 1, act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
                 gate_layer: Union[str, Type[nn.Module]] = "sigmoid", mlp_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        self.act = _make_act(act_layer)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        self.gate = _make_gate(gate_layer)
        self._cbam_spec = BlockSpec(fc1=("fc1",), fc2=("fc2",), pools=self._pools,
                                    act=_act_name(self.act))


class LightChannelAttn(ChannelAttn):
    """timm LightChannelAttn: the MLP of 0.5 (avg + max)."""
    _pools = "blend"


class SpatialAttn(_SpecForward):
    """timm SpatialAttn: gs = sigmoid(BN(conv_k([mean_c, max_c])))."""
    _in, _spatial_pools = 2, "mean,max"

    def __init__(self, kernel_size: int = 7, gate_layer: Union[str, Type[nn.Module]] = "sigmoid",
                 device=None, dtype=None):
        super().__init__()
        self.conv = ConvNormAct(self._in, kernel_size, device=device, dtype=dtype)
        self.gate = _make_gate(gate_layer)
        self._cbam_spec = BlockSpec(conv=("conv", "conv"), bn=("conv", "bn"),
                                    spatial_pools=self._spatial_pools)


class LightSpatialAttn(SpatialAttn):
    """timm LightSpatialAttn: one input map, 0.5 (mean_c + max_c)."""
    _in, _spatial_pools = 1, "blend"


class CbamModule(_SpecForward):
    """timm CbamModule (constructor, children and state_dict keys), fused."""
    _channel_cls, _spatial_cls = ChannelAttn, SpatialAttn

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 1, spatial_kernel_size: int = 7,
                 act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
                 gate_layer: Union[str, Type[nn.Module]] = "sigmoid", mlp_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.channel = self._channel_cls(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                         rd_divisor=rd_divisor, act_layer=act_layer,
                                         gate_layer=gate_layer, mlp_bias=mlp_bias, device=device,
                                         dtype=dtype)
        self.spatial = self._make_spatial(spatial_kernel_size, gate_layer, device, dtype)
        f = _prefixed(self.channel._cbam_spec, "channel")
        s = _prefixed(self.spatial._cbam_spec, "spatial")
        f.update({k: s[k] for k in ("conv", "bn", "spatial_pools")})
        self._cbam_spec = BlockSpec(**f)

    def _make_spatial(self, k, gate_layer, device, dtype):
        return SpatialAttn(k, gate_layer=gate_layer, device=device, dtype=dtype)


class LightCbamModule(CbamModule):
    """timm LightCbamModule (constructor, children and state_dict keys), fused."""
    _channel_cls = LightChannelAttn

    def _make_spatial(self, k, gate_layer, device, dtype):
        return LightSpatialAttn(k, device=device, dtype=dtype)  # timm passes no gate_layer


# ------------------------------------------------------------------------------ ultralytics
class ChannelAttention(_SpecForward):
    """ultralytics ChannelAttention: x * sigmoid(fc(avgpool(x))), fc a 1x1 conv C -> C with bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, 1, 0, bias=True)
        self.act = nn.Sigmoid()
        self._cbam_spec = BlockSpec(fc1=("fc",), pools="avg")


class SpatialAttention(_SpecForward):
    """ultralytics SpatialAttention: x * sigmoid(cv1([mean_c, max_c])), no norm. Any odd kernel
    size (ultralytics allows 3 and 7)."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd positive int (ultralytics: 3 or 7), "
                             f"got {kernel_size!r}")
        self.cv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.act = nn.Sigmoid()
        self._cbam_spec = BlockSpec(conv=("cv1",), spatial_pools="mean,max")


class UltralyticsCBAM(_SpecForward):
    """ultralytics CBAM(c1, kernel_size): ChannelAttention then SpatialAttention, fused."""

    def __init__(self, c1: int, kernel_size: int = 7):
        super().__init__()
        self.channel_attention = ChannelAttention(c1)
        self.spatial_attention = SpatialAttention(kernel_size)
        f = _prefixed(self.channel_attention._cbam_spec, "channel_attention")
        s = _prefixed(self.spatial_attention._cbam_spec, "spatial_attention")
        f.update({k: s[k] for k in ("conv", "bn", "spatial_pools")})
        self._cbam_spec = BlockSpec(**f)
