"""How a recognised CBAM block maps onto cbam_fused.functional.cbam (BlockSpec: attribute paths of
the modules holding its tensors, read at every call, plus the variant's options) and the class
swap that puts a block on the fused path (convert.py's mechanism; see its docstring)."""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as F

Path = Tuple[str, ...]


@dataclass(frozen=True)
class BlockSpec:
    """How a block maps onto cbam_fused.functional.cbam: attribute paths (relative to the block)
    of the modules holding the tensors, read at every call, plus the variant's options."""
    fc1: Optional[Path] = None        # Linear / 1x1 conv: mlp_w1, mlp_b1 (None: no channel gate)
    fc2: Optional[Path] = None        # Linear / 1x1 conv: mlp_w2, mlp_b2 (None: single layer)
    pools: str = "avg+max"
    act: str = "relu"
    conv: Optional[Path] = None       # spatial conv (None: no spatial gate)
    bn: Optional[Path] = None         # BatchNorm(1) after the conv (None: none)
    spatial_pools: str = "max,mean"
    arrangement: str = "channel_first"
    dim: int = 2                      # spatial dims of the input

    def describe(self) -> dict:
        d = {}
        if self.fc1 is not None:
            d.update(pools=self.pools, head="mlp" if self.fc2 is not None else "single")
            if self.fc2 is not None:
                d.update(act=self.act)
        if self.conv is not None:
            d.update(spatial_pools=self.spatial_pools, batch_norm=self.bn is not None)
        if self.fc1 is not None and self.conv is not None:
            d.update(arrangement=self.arrangement)
        return d


def _get(module: nn.Module, path: Path) -> nn.Module:
    for name in path:
        module = getattr(module, name)
    return module


def _bn_kwargs(bn: nn.Module, x: Optional[Tensor]) -> dict:
    """BatchNorm(1) as nn.BatchNorm's forward would run it on x (counts the batch in training;
    x None: a look at the arguments, nothing counted)."""
    if not isinstance(bn, _BatchNorm):  # a frozen BatchNorm: running statistics, never updated
        return dict(batch_norm=True, bn_weight=bn.weight, bn_bias=bn.bias,
                    bn_running_mean=bn.running_mean, bn_running_var=bn.running_var,
                    bn_training=False, bn_eps=bn.eps)
    if isinstance(bn, nn.SyncBatchNorm) and bn.training:
        raise RuntimeError("cbam_fused: a converted CBAM block's BatchNorm became a "
                           "SyncBatchNorm; its cross-process statistics are not fused. Call "
                           "cbam_fused.unconvert(model) before convert_sync_batchnorm")
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if x is not None:
            factor = F._count_bn_batch(x, bn.num_batches_tracked, bn.momentum)
        elif bn.momentum is None:
            factor = F._cumulative_momentum(bn.num_batches_tracked + 1)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return dict(batch_norm=True, bn_weight=bn.weight, bn_bias=bn.bias,
                bn_running_mean=bn.running_mean if track else None,
                bn_running_var=bn.running_var if track else None,
                bn_training=batch_stats, bn_momentum=factor, bn_eps=bn.eps)


def _spec_kwargs(block: nn.Module, spec: BlockSpec, x: Optional[Tensor] = None) -> dict:
    kw = dict(arrangement=spec.arrangement)
    if spec.fc1 is not None:
        l1 = _get(block, spec.fc1)
        kw.update(mlp_w1=l1.weight, mlp_b1=l1.bias, pools=spec.pools, act=spec.act)
        if spec.fc2 is not None:
            l2 = _get(block, spec.fc2)
            kw.update(mlp_w2=l2.weight, mlp_b2=l2.bias)
    if spec.conv is not None:
        conv = _get(block, spec.conv)
        kw.update(conv_w=conv.weight, conv_b=conv.bias, spatial_pools=spec.spatial_pools)
        if spec.bn is not None:
            kw.update(_bn_kwargs(_get(block, spec.bn), x))
    return kw


class _SpecForward(nn.Module):
    """A module whose forward is one cbam_fused.functional.cbam call described by `_cbam_spec`.
    Base of the converted classes and of the drop-in classes (compat.py)."""
    _cbam_spec: BlockSpec
    _cbam_record = None  # (dict, name) while record_attention() is active

    def forward(self, x: Tensor) -> Tensor:
        kw = _spec_kwargs(self, self._cbam_spec, x)
        rec = self._cbam_record
        if rec is None:
            return F.cbam(x, **kw)
        y, gc, gs = F.cbam(x, **kw, return_gates=True)
        rec[0][rec[1]] = (gc, gs)
        return y


class _ConvertedBlock(_SpecForward):
    """Mixin placed in front of a converted block's own class (see the module docstring)."""
    _cbam_converted_from: type

    def __reduce_ex__(self, protocol):
        # pickle as "the original class, converted": the swapped class is made at run time and
        # cannot be found by name, the original one can
        return (_rebuild_converted, (type(self)._cbam_converted_from,), self.__getstate__())

    def _get_name(self):
        return self._cbam_converted_from.__name__

    def extra_repr(self) -> str:
        rest = self._cbam_converted_from.extra_repr(self)
        return "[cbam_fused]" + (", " + rest if rest else "")


_CONVERTED_CLASSES: Dict[type, type] = {}


def _converted_class(cls: type) -> type:
    if issubclass(cls, _ConvertedBlock):
        return cls
    if cls not in _CONVERTED_CLASSES:
        _CONVERTED_CLASSES[cls] = type(cls.__name__, (_ConvertedBlock, cls), {
            "_cbam_converted_from": cls, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CONVERTED_CLASSES[cls]


def _rebuild_converted(cls: type) -> nn.Module:
    return object.__new__(_converted_class(cls))


def _swap_in(block: nn.Module, spec: BlockSpec) -> None:
    block.__dict__["_cbam_spec"] = spec  # a plain attribute: not a parameter, buffer or module
    block.__class__ = _converted_class(type(block))


def _swap_out(block: nn.Module) -> None:
    block.__class__ = type(block)._cbam_converted_from
    block.__dict__.pop("_cbam_spec", None)
    block.__dict__.pop("_cbam_record", None)
    block.__dict__.pop("_cbam_pair_next", None)  # _gate_pairs.NEXT: a chain head's second gate


def is_converted(module: nn.Module) -> bool:
    """True for a block convert() swapped onto the fused path."""
    return isinstance(module, _ConvertedBlock)
