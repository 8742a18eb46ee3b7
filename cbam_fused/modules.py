"""nn.Modules: CBAM, ChannelGate, SpatialGate.

CBAM is a drop-in replacement for the official code's `CBAM` (Jongchan/attention-module): same
constructor and the same state_dict keys (`ChannelGate.mlp.1.weight`, `ChannelGate.mlp.1.bias`,
`ChannelGate.mlp.3.weight`, `ChannelGate.mlp.3.bias`, `SpatialGate.spatial.conv.weight`,
`SpatialGate.spatial.bn.{weight,bias,running_mean,running_var,num_batches_tracked}`), so an
official checkpoint loads with strict=True. Keyword-only options select the other variants
(DESIGN.md section 2). Every forward is one call of cbam_fused.functional.cbam.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import functional as F
from ._heads import ACTIVATIONS, CHANNEL_POOLS

_ACT_MODULES = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "identity": nn.Identity}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def pools_from_types(pool_types: Sequence[str]) -> str:
    """The official code's pool_types list as the functional's `pools` string: its names joined by
    '+' in its order (the order the MLP outputs are summed in), or 'blend'."""
    if isinstance(pool_types, str):
        pool_types = [pool_types]
    kinds = list(pool_types)
    unsupported = [p for p in kinds if p not in CHANNEL_POOLS + ("blend",)]
    if unsupported:
        raise ValueError(f"pool_types: {unsupported} not supported by the fused path (supported: "
                         f"distinct names of {CHANNEL_POOLS}, or ['blend'])")
    if kinds == ["blend"]:
        return "blend"
    if len(set(kinds)) != len(kinds) or not kinds or "blend" in kinds:
        raise ValueError(f"pool_types: expected distinct names of {CHANNEL_POOLS} (e.g. ['avg', "
                         f"'max'] or ['avg', 'max', 'lp', 'lse']) or ['blend'], got {kinds}")
    return "avg+max" if kinds == ["max", "avg"] else "+".join(kinds)  # a + b == b + a exactly


_ABSENT = object()


def _dict_member(mod: nn.Module, name: str):
    """mod.<name> for a parameter, buffer or submodule, read from the module's own dicts in the
    order nn.Module.__getattr__ reads them, without the call (about 1 us each, some twenty per
    forward: half of a module call's Python time before). A name in none of them (a
    parametrization's property, which takes the parameter out of _parameters; a plain
    attribute) goes through getattr."""
    d = mod.__dict__
    for store in ("_parameters", "_buffers", "_modules"):
        v = d[store].get(name, _ABSENT)
        if v is not _ABSENT:
            return v
    return getattr(mod, name)


def _reader():
    """How functional_kwargs reads a module's members: from its dicts in plain execution;
    through getattr while torch.fx traces (its tracer records parameters as get_attr nodes from
    getattr calls) or torch.compile does."""
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling():
        return getattr
    return _dict_member


def _nth(seq: nn.Module, i: int) -> nn.Module:
    """seq[i]: by position in an nn.Sequential's children (what Sequential.__getitem__ returns,
    without its checks), through __getitem__ for any other container."""
    if type(seq) is nn.Sequential:
        return list(seq.__dict__["_modules"].values())[i]
    return seq[i]


def hidden_size(channels: int, reduction_ratio: float, rounding: str = "floor") -> int:
    """The MLP's hidden size: official code floors C / r, timm rounds half up (round_channels)."""
    v = channels / reduction_ratio
    h = int(v) if rounding == "floor" else int(v + 0.5)
    return h


def _check_x(x: Tensor, dim: int, channels: Optional[int], who: str):
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dim() != dim + 2:
        raise ValueError(f"x: {who} was built for {dim}-d inputs and expects rank {dim + 2} "
                         f"([N, C, *spatial]), got rank {x.dim()} with shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"x: {who} expects {channels} channels (gate_channels), got "
                         f"{x.shape[1]} in shape {tuple(x.shape)}")


# a leaf under torch.fx.symbolic_trace: the check runs on every call of the traced graph, and
# dead-code elimination keeps it (it raises)
torch.fx.wrap("_check_x")
torch.fx.node.has_side_effect(_check_x)


class ChannelGate(nn.Module):
    """gc = sigmoid(sum over pools of MLP(pool_s(x))); y = x * gc. Official keys mlp.1 / mlp.3."""

    def __init__(self, gate_channels: int, reduction_ratio: float = 16,
                 pool_types: Sequence[str] = ("avg", "max"), *,
                 hidden_channels: Optional[int] = None, act: str = "relu", mlp_bias: bool = True,
                 head: str = "mlp", dim: int = 2):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act: expected one of {ACTIVATIONS}, got {act!r}")
        if head not in ("mlp", "single"):
            raise ValueError(f"head: expected 'mlp' or 'single', got {head!r}")
        if dim not in (1, 2, 3):
            raise ValueError(f"dim: expected 1, 2 or 3 spatial dims, got {dim}")
        self.gate_channels = gate_channels
        self.pool_types = list(pool_types) if not isinstance(pool_types, str) else [pool_types]
        self.pools = pools_from_types(self.pool_types)
        self.act, self.head, self.dim = act, head, dim
        if head == "single":  # ultralytics ChannelAttention: one C -> C layer with bias
            self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(gate_channels, gate_channels))
        else:
            hidden = hidden_channels if hidden_channels is not None else \
                hidden_size(gate_channels, reduction_ratio)
            if hidden < 1:
                raise ValueError(f"reduction_ratio: gate_channels={gate_channels} // "
                                 f"{reduction_ratio} gives an empty hidden layer; pass "
                                 f"hidden_channels or a smaller reduction_ratio")
            self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(gate_channels, hidden, bias=mlp_bias),
                                     _ACT_MODULES[act](), nn.Linear(hidden, gate_channels,
                                                                    bias=mlp_bias))

    def functional_kwargs(self, _get=None) -> dict:
        get = _get or _reader()
        mlp = get(self, "mlp")
        lin1 = _nth(mlp, 1)
        mlp2 = _nth(mlp, 3) if self.head == "mlp" else None
        return dict(mlp_w1=get(lin1, "weight"), mlp_b1=get(lin1, "bias"),
                    mlp_w2=None if mlp2 is None else get(mlp2, "weight"),
                    mlp_b2=None if mlp2 is None else get(mlp2, "bias"), pools=self.pools,
                    act=self.act)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim, self.gate_channels, "ChannelGate")
        return F.cbam(x, **self.functional_kwargs())


class BasicConv(nn.Module):
    """The official code's BasicConv as the spatial gate uses it: conv, BatchNorm, no ReLU."""

    def __init__(self, in_planes: int, kernel_size: int, *, bias: bool, norm: Optional[str],
                 dim: int, bn_momentum: Optional[float], bn_eps: float):
        super().__init__()
        self.conv = _CONV[dim](in_planes, 1, kernel_size, stride=1, padding=kernel_size // 2,
                               bias=bias)
        self.bn = _BN[dim](1, eps=bn_eps, momentum=bn_momentum, affine=True) \
            if norm == "batchnorm" else None


class SpatialGate(nn.Module):
    """gs = sigmoid(BN(conv_k(stack(pools over C of x)))); y = x * gs. Official keys spatial.*."""

    def __init__(self, kernel_size: int = 7, *, spatial_pools: str = "max,mean",
                 norm: Optional[str] = "batchnorm", conv_bias: bool = False, dim: int = 2,
                 bn_momentum: Optional[float] = 0.01, bn_eps: float = 1e-5):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd positive int, got {kernel_size!r}")
        if spatial_pools not in F.SPATIAL_POOLS:
            raise ValueError(f"spatial_pools: expected one of {F.SPATIAL_POOLS}, got "
                             f"{spatial_pools!r}")
        if norm not in ("batchnorm", None):
            raise ValueError(f"norm: expected 'batchnorm' or None, got {norm!r}")
        if dim not in (1, 2, 3):
            raise ValueError(f"dim: expected 1, 2 or 3 spatial dims, got {dim}")
        self.kernel_size, self.spatial_pools, self.dim = kernel_size, spatial_pools, dim
        self.spatial = BasicConv(1 if spatial_pools == "blend" else 2, kernel_size,
                                 bias=conv_bias, norm=norm, dim=dim, bn_momentum=bn_momentum,
                                 bn_eps=bn_eps)

    def _bn_momentum(self, get=getattr):
        """The running-statistics factor of the next training step, as nn.BatchNorm computes it
        (the cumulative average as a 0-d tensor: no host synchronisation)."""
        bn = get(get(self, "spatial"), "bn")
        if bn.momentum is not None:
            return bn.momentum
        return F._cumulative_momentum(get(bn, "num_batches_tracked") + 1)

    def functional_kwargs(self, _get=None) -> dict:
        get = _get or _reader()
        spatial = get(self, "spatial")
        conv, bn = get(spatial, "conv"), get(spatial, "bn")
        kw = dict(conv_w=get(conv, "weight"), conv_b=get(conv, "bias"),
                  spatial_pools=self.spatial_pools)
        if bn is not None:
            running_mean = get(bn, "running_mean")
            kw.update(bn_weight=get(bn, "weight"), bn_bias=get(bn, "bias"),
                      bn_running_mean=running_mean, bn_running_var=get(bn, "running_var"),
                      batch_norm=True, bn_training=self.training or running_mean is None,
                      bn_momentum=self._bn_momentum(get) if self.training else 0.0,
                      bn_eps=bn.eps)
        return kw

    def _count_batch(self, x: Tensor, kw: dict, get=getattr) -> None:
        """Counts this training batch in the BatchNorm's num_batches_tracked and sets the running
        statistics factor of kw (the arguments of the coming cbam call) from the new count."""
        bn = get(get(self, "spatial"), "bn")
        if bn is not None and self.training:
            count = get(bn, "num_batches_tracked")
            if count is not None:
                kw["bn_momentum"] = F._count_bn_batch(x, count, bn.momentum)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim, None, "SpatialGate")
        get = _reader()
        kw = self.functional_kwargs(get)
        self._count_batch(x, kw, get)
        return F.cbam(x, **kw)


class CBAM(nn.Module):
    """CBAM block, drop-in for the official `CBAM(gate_channels, reduction_ratio, pool_types,
    no_spatial)`.

    Keyword-only options (defaults = the official code):
      hidden_channels   MLP hidden size (default gate_channels // reduction_ratio)
      kernel_size       spatial conv kernel, any odd k (7)
      arrangement       'channel_first' | 'spatial_first' | 'parallel'
      spatial_norm      'batchnorm' | None
      spatial_pools     'max,mean' (official) | 'mean,max' (timm, ultralytics) | 'blend'
      channel_head      'mlp' | 'single' (ultralytics: one C -> C layer with bias)
      act               hidden activation: 'relu' | 'silu' | 'gelu' | 'identity'
      mlp_bias, conv_bias
      no_channel        spatial gate only
      dim               spatial dims of the input: 1, 2 or 3
      bn_momentum, bn_eps  of the spatial BatchNorm (official: 0.01, 1e-5)
    """

    def __init__(self, gate_channels: int, reduction_ratio: float = 16,
                 pool_types: Sequence[str] = ("avg", "max"), no_spatial: bool = False, *,
                 hidden_channels: Optional[int] = None, kernel_size: int = 7,
                 arrangement: str = "channel_first", spatial_norm: Optional[str] = "batchnorm",
                 spatial_pools: str = "max,mean", channel_head: str = "mlp", act: str = "relu",
                 mlp_bias: bool = True, conv_bias: bool = False, no_channel: bool = False,
                 dim: int = 2, bn_momentum: Optional[float] = 0.01, bn_eps: float = 1e-5):
        super().__init__()
        if arrangement not in F.ARRANGEMENTS:
            raise ValueError(f"arrangement: expected one of {tuple(F.ARRANGEMENTS)}, got "
                             f"{arrangement!r}")
        if no_spatial and no_channel:
            raise ValueError("no_spatial and no_channel: a CBAM needs at least one gate")
        self.gate_channels, self.arrangement, self.dim = gate_channels, arrangement, dim
        self.no_spatial, self.no_channel = no_spatial, no_channel
        if not no_channel:
            self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types,
                                           hidden_channels=hidden_channels, act=act,
                                           mlp_bias=mlp_bias, head=channel_head, dim=dim)
        if not no_spatial:
            self.SpatialGate = SpatialGate(kernel_size, spatial_pools=spatial_pools,
                                           norm=spatial_norm, conv_bias=conv_bias, dim=dim,
                                           bn_momentum=bn_momentum, bn_eps=bn_eps)

    def functional_kwargs(self, _get=None) -> dict:
        """The arguments of cbam_fused.functional.cbam (and cbam_fused.reference.cbam) that this
        module's next forward passes."""
        get = _get or _reader()
        kw = dict(arrangement=self.arrangement)
        if not self.no_channel:
            kw.update(get(self, "ChannelGate").functional_kwargs(get))
        if not self.no_spatial:
            kw.update(get(self, "SpatialGate").functional_kwargs(get))
        return kw

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim, self.gate_channels, "CBAM")
        get = _reader()
        kw = self.functional_kwargs(get)
        if not self.no_spatial:
            get(self, "SpatialGate")._count_batch(x, kw, get)
        return F.cbam(x, **kw)
