"""Recognition of CBAM blocks by structure (convert.py): the gates' layouts of the official code,
timm, ultralytics and generic look-alikes, and of a block whose children are such gates. A
match gives the BlockSpec fields the structure fixes and the candidates a probe (_verify.py)
chooses among."""
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._spec import Path, _get

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
