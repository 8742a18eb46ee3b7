"""cbam_fused.convert: run the CBAM blocks of an existing network through the fused path.

    report = cbam_fused.convert(model)          # in place; returns a ConversionReport
    print(report)                               # what was converted, what was left alone and why
    report.undo()                               # or cbam_fused.unconvert(model)

Recognition is by structure, not by class name: a block is a module whose children have the layout
of one of the known implementations (DESIGN.md section 2):

    official code (Jongchan/attention-module)  CBAM{ChannelGate{mlp=Sequential(Flatten, Linear,
        act, Linear)} + pool_types, SpatialGate{compress, spatial=BasicConv{conv, bn}}}
    timm CbamModule / LightCbamModule           {channel{fc1, act, fc2, gate},
        spatial{conv{conv, bn}, gate}} (1x1 convs, BatchNormAct2d)
    ultralytics CBAM                            {channel_attention{pool, fc, act},
        spatial_attention{cv1, act}}

and the gates alone (a ChannelGate, a timm ChannelAttn, an ultralytics SpatialAttention ... used
without their parent). A user's own copy of any of these is found the same way, whatever its class
is called; so are other layouts of the same maths under any attribute names (a gate module with
two dense layers (Linear or 1x1 conv) and an activation between them, adaptive pools, a sigmoid;
a spatial gate module with one conv to a single map, an optional BatchNorm(1), a sigmoid), and a
module whose one or two children are such gates. A look-alike that computes something else (a
squeeze-excitation block: avg pool only; a sum of per-branch sigmoids) is left alone. What the structure leaves open (the order of the pools of the spatial map, avg + max
against the 'light' blend, channel gate first or spatial first) is settled by a probe: the block's
own forward runs once on a float64 copy with random weights and a small random input, and the
fused variant that reproduces it is chosen. A block that no fused variant reproduces (a pool the
fused path lacks, a hard-sigmoid gate, an activation the fused path lacks, a forward that does
something else) is left alone, and the report says why.

Mechanism (why a class swap). A converted block keeps its object, its parameters and buffers
(the same tensor objects: an optimizer built before keeps working; state_dict keys and values are
unchanged) and its hooks; only its class changes, to a subclass of its own class, made once per
class, whose forward calls cbam_fused.functional.cbam with the block's own tensors, read through
fixed attribute paths at every call (so load_state_dict, .to(), .half() keep working). Compared
with assigning an instance `forward`:
  * torch.compile(fullgraph=True) traces it like any module (a plain class method, no bound
    method stored in the instance dict);
  * pickling (torch.save(model), copy.deepcopy) works: the swapped class pickles as "the original
    class, converted" (see _ConvertedBlock.__reduce_ex__), where a bound method in the instance
    dict would unpickle as the *original* forward, silently unconverted;
  * isinstance(block, OriginalClass) stays true, and repr shows the original class name plus a
    `[cbam_fused]` mark.
The gate sub-modules of a converted composite block keep their classes: the parent's forward
no longer calls them, so forward hooks on the gates themselves (not on the block) stop firing;
use cbam_fused.record_attention for the gates.

Gate-only modules (a gate whose forward returns its map, the caller doing the products:
`out = self.ca(out) * out; out = self.sa(out) * out`, as in the widely copied CBAM.PyTorch) are
fused through their caller (_gate_pairs.py): the caller's forward is traced with torch.fx one
level deep, each chain of such gates it multiplies right away is probed and verified as one
block, the chain's first gate is swapped to run the whole fused block (the second gate reached
through a plain attribute), and the caller's class is swapped to one whose forward is the traced
code with the products removed (with example_input, verify=True also checks that caller as a
whole). state_dict, parameters and hooks stay as they were; undo() restores both classes. A
caller whose forward torch.fx cannot trace, or that branches on train / eval mode, is left
alone and the report says why.

Max-pool ties: where several elements share a maximum (a channel constant over space, e.g. a
dead channel), the fused path sends the gradient to one of them, as max_pool2d / torch.max do (the
official code, ultralytics); timm's amax splits it among them. Both are valid subgradients; the
outputs are the same.

verify=True checks each converted block against its original forward on float64 copies (the
model itself is not touched): with its own weights and with random ones (once per group of
identical blocks), in eval and in train mode: the output, the gradient of the input and of every
parameter, and the running statistics after the step; a mismatch raises ConversionError naming the
block. Nothing is swapped unless every block passes.
"""
import copy
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _gate_pairs as GP
from . import functional as F

__all__ = ["convert", "unconvert", "ConversionReport", "ConversionError", "record_attention",
           "is_converted"]

Path = Tuple[str, ...]


class ConversionError(RuntimeError):
    """A converted block does not reproduce its original forward (raised by verify=True)."""


# ------------------------------------------------------------------------------------- spec
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
    block.__dict__.pop(GP.NEXT, None)


def is_converted(module: nn.Module) -> bool:
    """True for a block convert() swapped onto the fused path."""
    return isinstance(module, _ConvertedBlock)


# ------------------------------------------------------------------------------ recognition
class _Unsupported(Exception):
    pass


@dataclass
class _Part:
    """One gate found in a module: paths relative to that module, candidate variants, and a
    note used in the reason when no candidate reproduces the forward (e.g. a non-sigmoid gate)."""
    fields: dict
    candidates: List[dict]
    note: Optional[str] = None
    family: str = ""


def _children(m: nn.Module) -> Dict[str, nn.Module]:
    return {k: v for k, v in m._modules.items() if v is not None}


def _cls(m) -> str:
    return type(m).__name__


def _act_name(m: nn.Module) -> str:
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.SiLU):
        return "silu"
    if isinstance(m, nn.GELU):
        if m.approximate != "none":
            raise _Unsupported(f"activation GELU(approximate={m.approximate!r}) is not fused "
                               f"(only the exact GELU)")
        return "gelu"
    if isinstance(m, nn.Identity):
        return "identity"
    name = _cls(m).lower()  # e.g. timm's own GELU / Swish classes (checked by the probe)
    if name in ("relu", "silu", "swish", "gelu"):
        if getattr(m, "approximate", "none") != "none":
            raise _Unsupported(f"activation {_cls(m)}(approximate=...) is not fused")
        return {"swish": "silu"}.get(name, name)
    raise _Unsupported(f"activation {_cls(m)} is not fused (supported: ReLU, SiLU/Swish, exact "
                       f"GELU, Identity)")


def _is_sigmoid(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.Sigmoid) or _cls(m) == "Sigmoid"


def _gate_note(m: Optional[nn.Module], what: str) -> Optional[str]:
    if m is None or _is_sigmoid(m):
        return None
    return f"{what} {_cls(m)} is not a sigmoid (only sigmoid gates are fused)"


def _is_flatten(m: nn.Module) -> bool:
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    return _cls(m) == "Flatten" and not list(m.parameters())


def _dense(m: nn.Module, cin: Optional[int] = None, cout: Optional[int] = None
           ) -> Optional[Tuple[int, int]]:
    """(in, out) of a Linear or a plain 1x1 conv, else None."""
    if isinstance(m, nn.Linear):
        io = (m.in_features, m.out_features)
    elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        if any(k != 1 for k in m.kernel_size) or any(s != 1 for s in m.stride) or \
                m.groups != 1 or any(p != 0 for p in _padding(m)):
            return None
        io = (m.in_channels, m.out_channels)
    else:
        return None
    if (cin is not None and io[0] != cin) or (cout is not None and io[1] != cout):
        return None
    return io


def _padding(conv) -> Tuple[int, ...]:
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            return tuple((k - 1) // 2 for k in conv.kernel_size)
        return tuple(0 for _ in conv.kernel_size)
    return tuple(conv.padding)


_POOL_KINDS = {"avg": "avg", "max": "max"}


def _channel_part(m: nn.Module) -> Optional[_Part]:
    """The channel gate layouts; None when m is none of them."""
    ch = _children(m)
    # official ChannelGate: mlp = Sequential(Flatten, Linear, act, Linear), pool_types
    if set(ch) == {"mlp"} and hasattr(m, "pool_types") and isinstance(ch["mlp"], nn.Sequential):
        mlp = list(ch["mlp"])
        if len(mlp) == 4 and _is_flatten(mlp[0]) and _dense(mlp[1]) and _dense(mlp[3]):
            c, h = _dense(mlp[1])
            if _dense(mlp[3]) != (h, c):
                return None
            fields = dict(fc1=("mlp", "1"), fc2=("mlp", "3"), act=_act_name(mlp[2]))
        elif len(mlp) == 2 and _is_flatten(mlp[0]) and _dense(mlp[1]):
            c, c2 = _dense(mlp[1])
            if c2 != c:
                return None
            fields = dict(fc1=("mlp", "1"), fc2=None)
        else:
            return None
        from .modules import pools_from_types
        try:
            pools = pools_from_types(m.pool_types)
        except ValueError as e:
            raise _Unsupported(str(e)) from None
        return _Part(fields, [dict(pools=pools)], family="official")
    # timm ChannelAttn / LightChannelAttn: fc1, act, fc2 (1x1 convs), gate
    if {"fc1", "act", "fc2"} <= set(ch) <= {"fc1", "act", "fc2", "gate"}:
        if not _dense(ch["fc1"]) or not _dense(ch["fc2"]):
            return None
        c, h = _dense(ch["fc1"])
        if _dense(ch["fc2"]) != (h, c):
            return None
        fields = dict(fc1=("fc1",), fc2=("fc2",), act=_act_name(ch["act"]))
        return _Part(fields, [dict(pools="avg+max"), dict(pools="blend")],
                     _gate_note(ch.get("gate"), "gate_layer"), family="timm")
    # ultralytics ChannelAttention: pool (adaptive, 1), fc (1x1 conv C -> C), act (sigmoid)
    if set(ch) == {"pool", "fc", "act"}:
        pool = ch["pool"]
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            pools = "avg"
        elif isinstance(pool, nn.AdaptiveMaxPool2d):
            pools = "max"
        else:
            return None
        if pool.output_size not in (1, (1, 1)) or not _dense(ch["fc"]):
            return None
        c, c2 = _dense(ch["fc"])
        if c2 != c:
            return None
        return _Part(dict(fc1=("fc",), fc2=None), [dict(pools=pools)],
                     _gate_note(ch["act"], "act"), family="ultralytics")
    return _generic_channel(m)


def _leaves(m: nn.Module) -> List[Tuple[Path, nn.Module]]:
    """m's children in registration order, Sequentials opened one level: (path, module)."""
    out = []
    for k, v in _children(m).items():
        if isinstance(v, nn.Sequential):
            out += [((k, i), c) for i, c in _children(v).items()]
        else:
            out.append(((k,), v))
    return out


def _param_free(m: nn.Module) -> bool:
    return not list(m.parameters()) and not list(m.buffers())


_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _generic_channel(m: nn.Module) -> Optional[_Part]:
    """Any other channel gate layout (user copies such as a `fc = Sequential(Linear, ReLU,
    Linear, Sigmoid)` with `avg_pool` / `max_pool` children): the dense layers in registration
    order, the activation between them, a gate after them; the probe settles the pools."""
    items = _leaves(m)
    dense = [i for i, (_, c) in enumerate(items) if _dense(c)]
    if not 1 <= len(dense) <= 2:
        return None
    if any(not _param_free(c) for i, (_, c) in enumerate(items) if i not in dense):
        return None
    pool_kinds = {"avg" if "Avg" in _cls(c) else "max" for _, c in items
                  if isinstance(c, _ADAPTIVE_POOLS)}
    c_in, c_out = _dense(items[dense[0]][1])
    if len(dense) == 2:
        h_in, h_out = _dense(items[dense[1]][1])
        if (c_out, c_in) != (h_in, h_out):
            return None
        between = [c for _, c in items[dense[0] + 1:dense[1]]
                   if not isinstance(c, (nn.Identity,) + _ADAPTIVE_POOLS) and not _is_flatten(c)]
        if len(between) > 1:
            return None
        act = _act_name(between[0]) if between else "identity"
        fields = dict(fc1=items[dense[0]][0], fc2=items[dense[1]][0], act=act)
    else:
        if c_out != c_in:
            return None
        fields = dict(fc1=items[dense[0]][0], fc2=None)
    after = [c for _, c in items[dense[-1] + 1:] if not isinstance(c, nn.Identity)]
    if len(after) > 1:
        return None
    if pool_kinds == {"avg", "max"}:
        cands = ["avg+max", "blend"]
    elif pool_kinds:
        cands = [next(iter(pool_kinds))]
    else:
        cands = ["avg+max", "avg", "max", "blend"]
    return _Part(fields, [dict(pools=p) for p in cands],
                 _gate_note(after[0] if after else None, "gate"), family="generic")


def _spatial_conv(conv: nn.Module) -> Optional[int]:
    """The number of input maps (1 or 2) of a spatial-gate conv; None if m is not one;
    _Unsupported if it is one the fused path cannot run."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
        return None
    if conv.out_channels != 1 or conv.in_channels not in (1, 2):
        return None
    k = conv.kernel_size
    if len(set(k)) != 1 or k[0] % 2 == 0:
        raise _Unsupported(f"spatial conv kernel {tuple(k)}: only odd, square kernels are fused")
    if any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation) or \
            conv.groups != 1 or conv.padding_mode != "zeros" or \
            _padding(conv) != tuple(x // 2 for x in k):
        raise _Unsupported(f"spatial conv {conv}: only stride 1, dilation 1, zero padding k // 2 "
                           f"is fused")
    return conv.in_channels


def _check_bn(bn: nn.Module) -> bool:
    if isinstance(bn, nn.SyncBatchNorm):
        raise _Unsupported("SyncBatchNorm: statistics across processes are not fused (convert "
                           "before nn.SyncBatchNorm.convert_sync_batchnorm is not enough either: "
                           "keep this block eager)")
    frozen = not isinstance(bn, _BatchNorm) and _cls(bn).startswith("FrozenBatchNorm") and \
        all(hasattr(bn, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))
    if not isinstance(bn, _BatchNorm) and not frozen:
        return False
    n = bn.weight.numel() if bn.weight is not None else getattr(bn, "num_features", 1)
    if n != 1:
        return False
    extra = [c for c in _children(bn).values() if not isinstance(c, (nn.Identity, nn.Dropout))]
    if extra:  # timm BatchNormAct2d: act and drop must be no-ops
        raise _Unsupported(f"spatial norm {_cls(bn)} applies {_cls(extra[0])} after the "
                           f"normalisation; not fused")
    return True


def _spatial_candidates(n_in: int) -> List[dict]:
    return [dict(spatial_pools="blend")] if n_in == 1 else \
        [dict(spatial_pools="max,mean"), dict(spatial_pools="mean,max")]


def _conv_bn(m: nn.Module, prefix: Path) -> Optional[Tuple[dict, int]]:
    """A {conv, bn?, relu?} container (official BasicConv, timm ConvNormAct)."""
    ch = _children(m)
    if "conv" not in ch or not set(ch) <= {"conv", "bn", "relu", "act", "drop", "aa"}:
        return None
    n_in = _spatial_conv(ch["conv"])
    if n_in is None:
        return None
    for extra in ("relu", "act", "drop", "aa"):
        if extra in ch and not isinstance(ch[extra], nn.Identity):
            raise _Unsupported(f"spatial head applies {_cls(ch[extra])} after the conv; "
                               f"not fused")
    bn = None
    if "bn" in ch:
        if not _check_bn(ch["bn"]):
            return None
        bn = prefix + ("bn",)
    return dict(conv=prefix + ("conv",), bn=bn, dim=ch["conv"].weight.dim() - 2), n_in


def _spatial_part(m: nn.Module) -> Optional[_Part]:
    ch = _children(m)
    # official SpatialGate: compress (ChannelPool), spatial = BasicConv{conv, bn, relu=None}
    if "spatial" in ch and set(ch) <= {"compress", "spatial"}:
        r = _conv_bn(ch["spatial"], ("spatial",))
        if r is None:
            return None
        return _Part(r[0], _spatial_candidates(r[1]), family="official")
    # timm SpatialAttn / LightSpatialAttn: conv = ConvNormAct{conv, bn}, gate
    if "conv" in ch and set(ch) <= {"conv", "gate"} and \
            not isinstance(ch["conv"], nn.modules.conv._ConvNd):
        r = _conv_bn(ch["conv"], ("conv",))
        if r is None:
            return None
        return _Part(r[0], _spatial_candidates(r[1]), _gate_note(ch.get("gate"), "gate_layer"),
                     family="timm")
    # ultralytics SpatialAttention: cv1 (conv 2 -> 1), act (sigmoid)
    if set(ch) == {"cv1", "act"}:
        n_in = _spatial_conv(ch["cv1"])
        if n_in is None:
            return None
        return _Part(dict(conv=("cv1",), bn=None, dim=ch["cv1"].weight.dim() - 2),
                     _spatial_candidates(n_in), _gate_note(ch["act"], "act"),
                     family="ultralytics")
    return _generic_spatial(m)


def _generic_spatial(m: nn.Module) -> Optional[_Part]:
    """Any other spatial gate layout: one conv to a single map (from 1 or 2 pooled maps), an
    optional BatchNorm(1) after it, an optional gate, and parameter-free pooling modules."""
    items = _leaves(m)
    convs = [i for i, (_, c) in enumerate(items) if isinstance(c, nn.modules.conv._ConvNd)]
    if len(convs) != 1:
        return None
    path, conv = items[convs[0]]
    n_in = _spatial_conv(conv)
    if n_in is None:
        return None
    bn, gate = None, None
    for i, (p, c) in enumerate(items):
        if i == convs[0] or isinstance(c, nn.Identity):
            continue
        if i > convs[0] and bn is None and gate is None and not _param_free(c):
            if not _check_bn(c):
                return None
            bn = p
        elif not _param_free(c):
            return None
        elif i > convs[0]:
            if gate is not None:
                return None
            gate = c
    return _Part(dict(conv=path, bn=bn, dim=conv.weight.dim() - 2), _spatial_candidates(n_in),
                 _gate_note(gate, "gate"), family="generic")


@dataclass
class _Match:
    kind: str
    base: dict               # BlockSpec fields fixed by the structure
    candidates: List[dict]   # BlockSpec fields the probe chooses among
    note: Optional[str]
    channels: Optional[int]


def _prefix(fields: dict, name: str) -> dict:
    return {k: (None if v is None else (name,) + v) if k in ("fc1", "fc2", "conv", "bn") else v
            for k, v in fields.items()}


def _channels(block: nn.Module, fields: dict) -> Optional[int]:
    if fields.get("fc1") is None:
        return None
    return _dense(_get(block, fields["fc1"]))[0]


def _match(m: nn.Module) -> Optional[_Match]:
    """The block layout m has, or None; raises _Unsupported for a CBAM block the fused path
    cannot run."""
    cp = _channel_part(m)
    if cp is not None and cp.family == "generic":  # alone, an avg-only gate is an SE block
        cp.candidates = [c for c in cp.candidates if c["pools"] != "avg"]
        if not cp.candidates:
            cp = None
    if cp is not None:
        return _Match(f"{cp.family} channel gate", cp.fields, cp.candidates, cp.note,
                      _channels(m, cp.fields))
    sp = _spatial_part(m)
    if sp is not None:
        return _Match(f"{sp.family} spatial gate", sp.fields, sp.candidates, sp.note, None)
    ch = _children(m)
    if not 1 <= len(ch) <= 2 or isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return None
    parts, errors = {}, {}
    for name, child in ch.items():
        try:
            p = _channel_part(child)
            if p is not None:
                parts.setdefault("channel", (name, p))
                continue
            p = _spatial_part(child)
            if p is not None:
                parts.setdefault("spatial", (name, p))
                continue
        except _Unsupported as e:
            errors[name] = e
            continue
        return None  # a child that is no gate: not a CBAM block
    if errors:
        name, e = next(iter(errors.items()))
        raise _Unsupported(f"{name}: {e}")
    if len(parts) != len(ch) or "channel" not in parts:
        return None
    cname, cpart = parts["channel"]
    base = _prefix(cpart.fields, cname)
    cands = cpart.candidates
    notes = [cpart.note]
    if "spatial" in parts:
        sname, spart = parts["spatial"]
        base.update(_prefix(spart.fields, sname))
        cands = [dict(**a, **b, arrangement=arr) for arr in ("channel_first", "spatial_first")
                 for a, b in itertools.product(cands, spart.candidates)]
        notes.append(spart.note)
    note = "; ".join(dict.fromkeys(n for n in notes if n)) or None
    fams = sorted({p.family for _, p in parts.values()})
    return _Match(f"{'/'.join(fams)} CBAM", base, cands, note, _channels(m, base))


# ---------------------------------------------------------------------------- probe / verify
def _randomize_(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial weights and statistics (official init zeroes the spatial BN weight, which
    makes every spatial map give the same gate: a probe with such weights decides nothing)."""
    with torch.no_grad():
        for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t)
            if name.endswith("running_var"):
                t.copy_(0.5 + r)
            elif name.endswith("running_mean"):
                t.copy_(r - 0.5)
            else:
                fan = max(1, t[0].numel()) if t.dim() > 1 else 1
                t.copy_((r - 0.5) * 2 / fan ** 0.5 + (0.5 if name.endswith("bn.weight") else 0))


def _plain_copy(block: nn.Module) -> nn.Module:
    """A float64 copy without hooks, with the block's original class."""
    c = copy.deepcopy(block)
    for m in c.modules():
        for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            h = getattr(m, d, None)
            if h is not None:
                h.clear()
    if isinstance(c, _ConvertedBlock):
        _swap_out(c)
    return c.double()


def _probe_input(channels: Optional[int], dim: int, shape, gen, device):
    if shape is None:
        shape = (2, channels or 4) + (5, 6, 4)[:dim]
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device)


def _rel(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|, with max |b| floored at 1e-6: a gradient that is zero in exact
    arithmetic (a conv bias before a train-mode BatchNorm) is rounding noise on both sides."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if not b.numel():
        return 0.0
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    a, b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)


def _device(block: nn.Module):
    for t in itertools.chain(block.parameters(), block.buffers()):
        return t.device
    return torch.device("cpu")


def _run(block: nn.Module, x: Tensor, grad: bool):
    """The block's forward on x; with grad, also the gradients of x and of every parameter for
    a fixed random output gradient."""
    x = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = block.forward(x)
    if not grad:
        return y, {}
    params = dict(block.named_parameters())
    for p in params.values():
        p.grad = None
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(y)
    y.backward(g)
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in params.items()})
    return y, grads


_PROBE_TOL = 1e-6
_GATE_ONLY = ("not converted: its forward returns the attention map and the caller multiplies "
              "x by it (`out = self.ca(out) * out`), and the caller's forward could not be "
              "rewritten to fuse the products ({why}); build the caller with cbam_fused.CBAM "
              "(or ChannelGate / SpatialGate), which returns x times the map")
_VERIFY_TOL = 1e-8


def _probe_forward(block: nn.Module, match: _Match, gen):
    """(ref, x, y): a float64 copy of the block with random weights in eval mode, a random
    input and the copy's output on it (no grad); None when its forward does not take the input."""
    ref = _plain_copy(block)
    _randomize_(ref, gen)
    ref.eval()
    x = _probe_input(match.channels, match.base.get("dim", 2), None, gen, _device(block))
    with torch.no_grad():
        try:
            return ref, x, ref.forward(x)
        except Exception:  # noqa: BLE001  its forward does not take this input
            return None


def _probe(block: nn.Module, match: _Match, gen) -> Tuple[Optional[BlockSpec], float]:
    """The candidate that reproduces the block's forward (eval, random weights), if any."""
    if _device(block).type == "meta":
        return BlockSpec(**match.base, **match.candidates[0]), 0.0
    run = _probe_forward(block, match, gen)
    if run is None:
        return None, float("inf")
    ref, x, y = run
    best = float("inf")
    with torch.no_grad():
        for cand in match.candidates:
            spec = BlockSpec(**match.base, **cand)
            try:
                yf = F.cbam(x, **_spec_kwargs(ref, spec))
            except (ValueError, RuntimeError, TypeError):
                continue
            err = _rel(yf, y)
            best = min(best, err)
            if err < _PROBE_TOL:
                return spec, err
    return None, best


def _returns_gate(block: nn.Module, match: _Match, gen) -> bool:
    """Whether the block's forward returns its attention map (gc as [N, C, 1, ...] or gs as
    [N, 1, *spatial]) rather than x times it: the gate modules of code that multiplies in the
    caller (`out = self.ca(out) * out`), which a module swap cannot fuse."""
    if _device(block).type == "meta":
        return False
    run = _probe_forward(block, match, gen)
    if run is None:
        return False
    ref, x, y = run
    if not isinstance(y, Tensor) or y.shape == x.shape:
        return False
    with torch.no_grad():
        for cand in match.candidates:
            try:
                _, gc, gs = F.cbam(x, **_spec_kwargs(ref, BlockSpec(**match.base, **cand)),
                                   return_gates=True)
            except (ValueError, RuntimeError, TypeError):
                continue
            gate = gs if gc is None else gc.reshape(gc.shape + (1,) * (x.dim() - 2))
            if gate.shape == y.shape and _rel(gate, y) < _PROBE_TOL:
                return True
    return False


def _signature(block: nn.Module, spec: BlockSpec) -> tuple:
    """Blocks with equal signatures run the same code on tensors of the same shapes: a check
    with random weights of one of them holds for all."""
    shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in
                   itertools.chain(block.named_parameters(), block.named_buffers()))
    return type(block), spec, shapes, repr(block)


def _verify(name: str, block: nn.Module, spec: BlockSpec, shape, gen,
            random_weights: bool = True) -> float:
    """Compare the converted block with its original forward on float64 copies; raise
    ConversionError naming the block on a difference. Returns the largest relative error.
    Eval and train mode, with its own weights and (once per signature) with random ones: the
    output, the gradients of the input and of every parameter, and the buffers after the step."""
    device = _device(block)
    worst = 0.0
    runs = [("its own weights", False, True), ("its own weights", True, True)]
    if random_weights:
        runs += [("random weights", False, True), ("random weights", True, True)]
    x, base, prev_weights = None, None, None
    for weights, train, grad in runs:
        if base is None or weights != prev_weights:
            base = _plain_copy(block)
            if weights == "random weights":
                _randomize_(base, gen)
            prev_weights = weights
        orig, fused = copy.deepcopy(base), copy.deepcopy(base)
        orig.train(train)
        fused.train(train)
        if x is None:
            x = _probe_input(None if spec.fc1 is None else _dense(_get(block, spec.fc1))[0],
                             spec.dim, shape, gen, device)
        _swap_in(fused, spec)
        mode = f"{'train' if train else 'eval'} mode, {weights}, input {tuple(x.shape)}"
        worst = max(worst, _check_same(name, block, orig, fused, x, grad, mode))
    return worst


def _check_same(name, block, orig, fused, x, grad, mode) -> float:
    """Runs both on x (and backward with grad); raises ConversionError naming the block on a
    difference of the output, a gradient or a buffer; the largest relative error."""
    y0, g0 = _run(orig, x, grad)
    y1, g1 = _run(fused, x, grad)
    checks = [("output", y1, y0)] + [(f"grad of {k}", g1.get(k), g0[k]) for k in g0
                                     if g0[k] is not None or g1.get(k) is not None]
    checks += [(f"buffer {k}", b1, b0) for (k, b0), (_, b1) in
               zip(orig.named_buffers(), fused.named_buffers())]
    worst = 0.0
    for what, a, b in checks:
        if a is None or b is None:
            raise ConversionError(f"cbam_fused.convert: block {name!r} ({_cls(block)}): "
                                  f"{what} is None on one side only ({mode})")
        err = _rel(a, b)
        worst = max(worst, err)
        if not err < _VERIFY_TOL:
            raise ConversionError(
                f"cbam_fused.convert: block {name!r} ({_cls(block)}) differs from its "
                f"original forward: {what}, relative error {err:.3g} ({mode})")
    return worst


# ---------------------------------------------------------------------------------- report
@dataclass
class ConvertedBlock:
    name: str
    cls: str
    kind: str
    spec: BlockSpec
    verified_error: Optional[float] = None

    def __str__(self):
        opts = ", ".join(f"{k}={v}" for k, v in self.spec.describe().items())
        v = "" if self.verified_error is None else f"; verified (max rel. error " \
            f"{self.verified_error:.1e})"
        return f"{self.name or '<model>'} ({self.cls}): {self.kind}, {opts}{v}"


@dataclass
class SkippedBlock:
    name: str
    cls: str
    reason: str

    def __str__(self):
        return f"{self.name or '<model>'} ({self.cls}): {self.reason}"


@dataclass
class ConversionReport:
    """What convert() did: `converted` (name, class, kind, options), `skipped` (name, class,
    reason), and `already_fused` (cbam_fused modules found). `undo()` restores every converted
    block."""
    converted: List[ConvertedBlock] = field(default_factory=list)
    skipped: List[SkippedBlock] = field(default_factory=list)
    already_fused: List[str] = field(default_factory=list)
    _blocks: list = field(default_factory=list, repr=False)

    @property
    def converted_names(self) -> List[str]:
        return [c.name for c in self.converted]

    @property
    def skipped_names(self) -> List[str]:
        return [s.name for s in self.skipped]

    def undo(self) -> int:
        n = 0
        for b in self._blocks:
            if isinstance(b, _ConvertedBlock):
                _swap_out(b)
                n += 1
            elif GP.is_rewritten(b):
                GP.swap_out_caller(b)
        self._blocks = []
        return n

    def __str__(self):
        lines = [f"cbam_fused.convert: {len(self.converted)} block(s) converted, "
                 f"{len(self.skipped)} left unconverted"]
        lines += [f"  converted  {c}" for c in self.converted]
        lines += [f"  left alone {s}" for s in self.skipped]
        if self.already_fused:
            names = ", ".join(n or "<model>" for n in self.already_fused)
            lines.append(f"  already fused: {names}")
        return "\n".join(lines)


def _native_classes() -> tuple:
    from . import modules
    classes = (modules.CBAM, modules.ChannelGate, modules.SpatialGate, _SpecForward)
    return classes


def convert(model: nn.Module, verify: bool = True, *, example_input: Optional[Tensor] = None,
            include: Optional[List[str]] = None, exclude: Optional[List[str]] = None,
            seed: int = 0) -> ConversionReport:
    """Run every CBAM block recognised in `model` through cbam_fused's fused path, in place.

    model          any nn.Module (the model itself may be a block).
    verify         check each converted block against its original forward (float64 copies of
                   the block; eval and train; output, input / parameter gradients, running
                   statistics; its own and random weights) and raise ConversionError naming the
                   block on a difference.
    example_input  a model input; when given, one forward (eval mode, no grad, model state
                   restored) records each block's input shape, used by the verification instead
                   of a small default shape [2, C, 5, 6].
    include / exclude  module names (as in named_modules) to convert only / to leave alone.
    Returns a ConversionReport; report.undo() (or unconvert(model)) restores the original
    classes. Parameters, buffers, state_dict and hooks of the model are untouched."""
    report = ConversionReport()
    gen = torch.Generator().manual_seed(seed)
    native = _native_classes()
    found: List[Tuple[str, nn.Module, BlockSpec, str]] = []
    gate_only: List[Tuple[str, nn.Module]] = []

    def walk(name: str, m: nn.Module):
        if isinstance(m, native):
            report.already_fused.append(name)
            return
        if exclude is not None and name in exclude:
            return
        try:
            match = _match(m)
        except _Unsupported as e:
            report.skipped.append(SkippedBlock(name, _cls(m), f"not converted: {e}"))
            return
        if match is not None and (include is None or name in include):
            spec, err = _probe(m, match, gen)
            if spec is not None:
                found.append((name, m, spec, match.kind))
                return
            if not match.kind.endswith("CBAM") and _returns_gate(m, match, gen):
                gate_only.append((name, m))
                return
            if match.kind.startswith("generic ") and not match.kind.endswith("CBAM"):
                pass  # a layout like a gate's that computes something else: not a CBAM block
            else:
                why = match.note or ("its forward matches no fused variant (best relative "
                                     f"error {err:.2g} on a random probe)")
                report.skipped.append(SkippedBlock(name, _cls(m), f"not converted: {why}"))
                if match.note or not match.kind.endswith("CBAM"):
                    return  # explained (e.g. a non-sigmoid gate), or a gate: nothing inside
        for cname, child in m.named_children():
            walk(f"{name}.{cname}" if name else cname, child)

    walk("", model)

    callers = {n.rpartition(".")[0] for n, _ in gate_only}
    callers = [model.get_submodule(n) for n in callers if n in dict(model.named_modules())]
    shapes = _record_shapes(model, [b for _, b, _, _ in found] + callers, example_input) \
        if example_input is not None else {}
    checked = set()
    for name, m, spec, kind in found:
        err = None
        if verify:
            sig = _signature(m, spec)
            err = _verify(name, m, spec, shapes.get(id(m)), gen, random_weights=sig not in checked)
            checked.add(sig)
        report.converted.append(ConvertedBlock(name, _cls(m), kind, spec, err))
    plans = _plan_gate_chains(model, gate_only, report, gen, verify, checked, shapes)
    for _, m, spec, _ in found:  # swap only after every block verified
        _swap_in(m, spec)
        report._blocks.append(m)
    for caller, chains in plans:
        report._blocks += _apply_gate_chains(caller, chains)
    return report


def _apply_gate_chains(caller: nn.Module, chains) -> List[nn.Module]:
    """Rewrites the caller's forward for `chains` ([(gate names, head spec)], as planned) and
    swaps the heads and the caller; returns the swapped modules."""
    graph = GP._trace(caller)
    gates = {n: getattr(caller, n) for names, _ in chains for n in names}
    want = {tuple(names) for names, _ in chains}
    found, _ = GP.find_chains(graph, gates)
    done = [names for names, _ in found if tuple(names) in want]
    if len(done) != len(want):  # the planning traced the same forward: cannot happen
        raise RuntimeError(f"cbam_fused.convert: the chains {sorted(want)} of "
                           f"{_cls(caller)} were not found again")
    for names, nodes in found:
        if tuple(names) in want:
            GP.rewrite(graph, nodes)
    swapped = []
    for names, spec in chains:
        head = gates[names[0]]
        if len(names) > 1:
            head.__dict__[GP.NEXT] = gates[names[1]]  # a plain attribute: not a submodule
        _swap_in(head, spec)
        swapped.append(head)
    GP.swap_in_caller(caller, graph)
    return swapped + [caller]


def _verify_caller(name: str, caller: nn.Module, chains, shape, gen) -> float:
    """The rewritten caller against its original forward on float64 copies, on an input of the
    shape the example input gave it: eval and train mode, output, gradients, buffers."""
    base = _plain_copy(caller)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(_device(caller))
    worst = 0.0
    for train in (False, True):
        orig, fused = copy.deepcopy(base), copy.deepcopy(base)
        orig.train(train)
        fused.train(train)
        _apply_gate_chains(fused, chains)
        worst = max(worst, _check_same(name, caller, orig, fused, x, True,
                                       f"{'train' if train else 'eval'} mode, the caller's "
                                       f"forward, input {tuple(x.shape)}"))
    return worst


def _head_spec(spec: BlockSpec) -> BlockSpec:
    """A _GatePair's spec with its paths relative to the chain's first gate (g0), the second
    (g1) reached through the first's plain attribute GP.NEXT."""
    def move(path):
        if path is None:
            return None
        return path[1:] if path[0] == "g0" else (GP.NEXT,) + path[1:]
    return BlockSpec(**{k: move(v) if k in ("fc1", "fc2", "conv", "bn") else v
                        for k, v in spec.__dict__.items()})


def _plan_gate_chains(model, gate_only, report, gen, verify, checked, shapes):
    """Gate-only modules (their forward returns the map) fused through their caller's forward
    (_gate_pairs.py): each chain of them the caller multiplies right away is recognised,
    probed and verified as one block; the rest are reported as skipped with the reason. Returns
    [(caller, [([gate names], head spec)])]; nothing is swapped here. With an example input
    (`shapes` holds the caller's input shape) the rewritten caller as a whole is verified too."""
    by_caller: Dict[str, Dict[str, nn.Module]] = {}
    for name, m in gate_only:
        cname, _, attr = name.rpartition(".")
        by_caller.setdefault(cname, {})[attr] = m
    uses: Dict[int, int] = {}
    for m in model.modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    plans = []
    for cname, gates in by_caller.items():
        def skip(attr, why, cname=cname, gates=gates):
            full = f"{cname}.{attr}" if cname else attr
            report.skipped.append(SkippedBlock(full, _cls(gates[attr]),
                                               _GATE_ONLY.format(why=why)))
        if not gates or "" in gates:  # the model itself is a gate: no caller to rewrite
            for attr in gates:
                skip(attr, "it has no caller inside the model")
            continue
        caller = model.get_submodule(cname) if cname else model
        try:
            graph = GP._trace(caller)
        except Exception as e:  # noqa: BLE001  any tracing failure: leave it alone, say why
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            for attr in gates:
                skip(attr, f"torch.fx cannot trace the caller's forward: {msg[:200]}")
            continue
        chains, why = GP.find_chains(graph, gates)
        accepted = []
        for names, _ in chains:
            label = "+".join(f"{cname}.{n}" if cname else n for n in names)
            if any(uses[id(gates[n])] > 1 for n in names):
                for n in names:
                    why[n] = "the same module object is used at several places of the model"
                continue
            hooked = [n for n in names if gates[n]._forward_hooks or gates[n]._forward_pre_hooks]
            if hooked:  # they would see the fused block's output, or not fire at all
                for n in names:
                    why[n] = f"{', '.join(hooked)} has forward hooks"
                continue
            pair = GP._GatePair([gates[n] for n in names])
            try:
                match = _match(pair)
            except _Unsupported as e:
                match, err = None, str(e)
            spec = None
            if match is not None:
                spec, err = _probe(pair, match, gen)
            if spec is None:
                for n in names:
                    why[n] = (f"the chain {label} matches no fused variant" +
                              ("" if match is None else
                               f" (best relative error {err:.2g} on a random probe)"))
                continue
            verr = None
            if verify:
                sig = _signature(pair, spec)
                verr = _verify(label, pair, spec, None, gen, random_weights=sig not in checked)
                checked.add(sig)
            kind = f"{match.kind} (gate-only modules, products fused through the caller)"
            accepted.append((ConvertedBlock(label, "/".join(_cls(gates[n]) for n in names),
                                            kind, spec, verr), (names, _head_spec(spec))))
        for attr, w in why.items():
            skip(attr, w)
        if not accepted:
            continue
        chains = [c for _, c in accepted]
        if verify and id(caller) in shapes:
            err = _verify_caller(cname or "<model>", caller, chains, shapes[id(caller)], gen)
            for blk, _ in accepted:
                blk.verified_error = max(blk.verified_error or 0.0, err)
        report.converted += [blk for blk, _ in accepted]
        plans.append((caller, chains))
    return plans


def _record_shapes(model, blocks, example_input) -> dict:
    shapes, handles = {}, []
    for b in blocks:
        def hook(mod, args):
            shapes.setdefault(id(mod), tuple(args[0].shape))  # returns None: args unchanged
        handles.append(b.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return shapes


def unconvert(model: nn.Module) -> int:
    """Restore the original class of every block convert() swapped in `model` (and of the
    callers of gate-only modules whose forward it rewrote); the number of blocks."""
    n = 0
    for m in model.modules():
        if isinstance(m, _ConvertedBlock):
            _swap_out(m)
            n += 1
        elif GP.is_rewritten(m):
            GP.swap_out_caller(m)
    return n


# ---------------------------------------------------------------------------- attention maps
def _native_spec(m: nn.Module) -> Optional[BlockSpec]:
    """The spec of a cbam_fused.CBAM / ChannelGate / SpatialGate (for record_attention)."""
    from . import modules
    if isinstance(m, modules.CBAM):
        f = {}
        if not m.no_channel:
            f.update(_prefix(_native_spec(m.ChannelGate).__dict__, "ChannelGate"))
        if not m.no_spatial:
            s = _prefix(_native_spec(m.SpatialGate).__dict__, "SpatialGate")
            f.update({k: s[k] for k in ("conv", "bn", "spatial_pools")})
        f.update(arrangement=m.arrangement, dim=m.dim)
        return BlockSpec(**f)
    if isinstance(m, modules.ChannelGate):
        return BlockSpec(fc1=("mlp", "1"), fc2=("mlp", "3") if m.head == "mlp" else None,
                         pools=m.pools, act=m.act, dim=m.dim)
    if isinstance(m, modules.SpatialGate):
        return BlockSpec(conv=("spatial", "conv"),
                         bn=("spatial", "bn") if m.spatial.bn is not None else None,
                         spatial_pools=m.spatial_pools, dim=m.dim)
    return None


@contextmanager
def record_attention(model: nn.Module, names: Optional[List[str]] = None):
    """Within the context, every forward of `model` stores each CBAM block's gates, detached:
    `maps[name] = (gc [N, C] or None, gs [N, 1, *spatial] or None)` (the last call of a block
    wins). The gates come out of the same fused forward (return_gates), no second pass; outside
    the context the blocks run as before, at no cost.

        with cbam_fused.record_attention(model) as maps:
            logits = model(images)
        gc, gs = maps["layer4.2.se"]

    Covers converted blocks, the drop-in classes and cbam_fused.CBAM / ChannelGate / SpatialGate
    (those are switched to the recording path for the duration of the context)."""
    maps: Dict[str, Tuple[Optional[Tensor], Optional[Tensor]]] = {}
    from . import modules
    native = (modules.CBAM, modules.ChannelGate, modules.SpatialGate)
    recorded, swapped = [], []
    skip_under = []
    for name, m in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in skip_under):
            continue  # the gates of a block recorded as a whole
        if names is not None and name not in names:
            continue
        if isinstance(m, _SpecForward):
            recorded.append(m)
        elif isinstance(m, native):
            _swap_in(m, _native_spec(m))
            swapped.append(m)
            recorded.append(m)
        else:
            continue
        m.__dict__["_cbam_record"] = (maps, name)
        skip_under.append(name)
    try:
        yield maps
    finally:
        for m in recorded:
            m.__dict__.pop("_cbam_record", None)
        for m in swapped:
            _swap_out(m)
