"""Pure-PyTorch kernels of the cbam_fused ops: the oracle the CUDA kernels (and the CPU kernels of
cbam_fused._cpu_fast) are tested against, the math cbam_fused.export decomposes the ops into, and
(while the package is built without CUDA kernels) the kernels for CUDA tensors.

Every op views x as [N, C, S] (S = product of the spatial sizes), works in the accumulation dtype
(float64 for float64 inputs, float32 otherwise) and accepts any memory layout. The formulas are
those of csrc/ops.cpp. While cbam_fused.testing.use_simulator() is active, each call is handed to
the simulator's build of the CUDA kernel instead (cbam_fused/_sim_hook.py)."""
import math
from typing import Optional

import torch
from torch import Tensor

from . import _heads
from ._sim_hook import sim_op


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).to(acc_dtype(x.dtype))


def _max_first(t: Tensor, dim: int):
    """max and argmax along dim with torch.max's rules: first occurrence, a NaN wins."""
    if t.shape[dim] == 0:
        raise RuntimeError("cbam_fused: cannot take the max over an empty dimension")
    return torch.max(t, dim)


def _like_x(flat: Tensor, x: Tensor) -> Tensor:
    out = torch.empty_like(x)  # keeps x's memory format
    out.copy_(flat.reshape(x.shape))
    return out


def pool_over_s(x: Tensor, scale: Optional[Tensor]):
    xf = _flat(x)
    if scale is not None:
        xf = xf * scale[:, None, :]
    mx, idx = _max_first(xf, 2)
    return xf.mean(2), mx, idx


def pool_over_s_lp_lse(x: Tensor, scale: Optional[Tensor]):
    """pool_over_s plus the official code's lp pool (F.lp_pool2d, norm 2: sqrt(sum v^2)) and lse
    pool (logsumexp_2d: M + log(sum exp(v - M)), M = max v; NaN where M is not finite, as there)."""
    xf = _flat(x)
    if scale is not None:
        xf = xf * scale[:, None, :]
    mx, idx = _max_first(xf, 2)
    lp = xf.square().sum(2).sqrt()
    lse = mx + (xf - mx[:, :, None]).exp().sum(2).log()
    return xf.mean(2), mx, idx, lp, lse


def pool_over_c(x: Tensor, scale: Optional[Tensor]):
    xf = _flat(x)
    if scale is not None:
        xf = xf * scale[:, :, None]
    mx, idx = _max_first(xf, 1)
    return xf.mean(1), mx, idx


def apply_gates(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]) -> Tensor:
    yf = _flat(x)
    if gc is not None:
        yf = yf * gc[:, :, None]
    if gs is not None:
        yf = yf * gs[:, None, :]
    return yf


def backward_reduce(grad: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
                    need_rc: bool, need_rs: bool):
    gx = _flat(grad) * _flat(x)
    empty = gx.new_empty((0,))
    rc = (gx if gs is None else gx * gs[:, None, :]).sum(2) if need_rc else empty
    rs = (gx if gc is None else gx * gc[:, :, None]).sum(1) if need_rs else empty
    return rc, rs


def _at_argmax(d: Tensor, idx: Tensor, n: int, dim: int) -> Tensor:
    """d placed at the argmax position along `dim` (size n) and 0 elsewhere: [N, C, S].
    (A select, not a product with a one-hot mask: a non-finite d stays at its position.)"""
    shape = [1, 1, 1]
    shape[dim] = n
    pos = torch.arange(n, device=idx.device).view(shape)
    return torch.where(idx.unsqueeze(dim) == pos, d.unsqueeze(dim), d.new_zeros(()))


def check_store_args(op: str, x: Tensor, base: Optional[Tensor], gate: Optional[Tensor],
                     over_s: bool) -> None:
    """The shapes of the Q2 ops' base and gate ([N, S] for the scale of the pool over S, else
    [N, C]), with the launcher's message (launchers/common.h small_arg)."""
    n, l = x.shape[0], (math.prod(x.shape[2:]) if over_s else x.shape[1])
    for name, t in (("base", base), ("gate", gate)):
        if t is not None and (t.dim() != 2 or tuple(t.shape) != (n, l)):
            raise RuntimeError(f"{op}: {name} must have shape {'[N, S]' if over_s else '[N, C]'} "
                               f"= [{n}, {l}], got {list(t.shape)}")


def _then_base_and_gate(out: Tensor, base: Optional[Tensor], gate: Optional[Tensor]) -> Tensor:
    """The steps the Q2 ops take in their store: (base + out), then the sigmoid's backward
    (times gate (1 - gate)), each where given."""
    if base is not None:
        out = base + out
    if gate is not None:
        out = torch.ops.aten.sigmoid_backward(out, gate)
    return out


def pool_over_c_backward_scale(x: Tensor, d_avg: Optional[Tensor], d_max: Optional[Tensor],
                               argmax: Optional[Tensor], base: Optional[Tensor] = None,
                               gate: Optional[Tensor] = None) -> Tensor:
    check_store_args("pool_over_c_backward_scale", x, base, gate, False)
    xf = _flat(x)
    n, c, _ = xf.shape
    w = torch.zeros_like(xf)
    if d_avg is not None:
        w = w + d_avg[:, None, :] / c
    if d_max is not None:
        w = w + _at_argmax(d_max, argmax, c, 1)
    return _then_base_and_gate((xf * w).sum(2), base, gate)


def _pool_over_s_backward_scale(x: Tensor, d_avg: Optional[Tensor], d_max: Optional[Tensor],
                                argmax: Optional[Tensor]) -> Tensor:
    xf = _flat(x)
    n, c, s = xf.shape
    w = torch.zeros_like(xf)
    if d_avg is not None:
        w = w + d_avg[:, :, None] / s
    if d_max is not None:
        w = w + _at_argmax(d_max, argmax, s, 2)
    return (xf * w).sum(1)


def pool_over_s_backward_scale(x: Tensor, d_avg: Optional[Tensor], d_max: Optional[Tensor],
                               argmax: Optional[Tensor], base: Optional[Tensor] = None,
                               gate: Optional[Tensor] = None) -> Tensor:
    check_store_args("pool_over_s_backward_scale", x, base, gate, True)
    return _then_base_and_gate(_pool_over_s_backward_scale(x, d_avg, d_max, argmax), base, gate)


def _lp_lse_terms(v: Tensor, d_lp: Optional[Tensor], lp: Optional[Tensor],
                  d_lse: Optional[Tensor], lse: Optional[Tensor]) -> Tensor:
    """(d_lp / lp) v + d_lse exp(v - lse) for v [N, C, S] and [N, C] pools: the gradient of the
    lp and lse pools over S with respect to v (a zero or missing d adds nothing)."""
    term = torch.zeros_like(v)
    if d_lp is not None:
        term = term + (d_lp / lp)[:, :, None] * v
    if d_lse is not None:
        d = d_lse[:, :, None]
        term = term + torch.where(d != 0, d * torch.exp(v - lse[:, :, None]), d.new_zeros(()))
    return term


def pool_over_s_backward_scale_lp_lse(x: Tensor, d_avg: Optional[Tensor], d_max: Optional[Tensor],
                                      argmax: Optional[Tensor], scale: Optional[Tensor],
                                      d_lp: Optional[Tensor], lp: Optional[Tensor],
                                      d_lse: Optional[Tensor], lse: Optional[Tensor],
                                      base: Optional[Tensor] = None,
                                      gate: Optional[Tensor] = None) -> Tensor:
    check_store_args("pool_over_s_backward_scale_lp_lse", x, base, gate, True)
    xf = _flat(x)
    v = xf if scale is None else xf * scale[:, None, :]
    extra = (xf * _lp_lse_terms(v, d_lp, lp, d_lse, lse)).sum(1)
    return _then_base_and_gate(_pool_over_s_backward_scale(x, d_avg, d_max, argmax) + extra,
                               base, gate)


def grad_input(grad: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], da: Optional[Tensor],
               dm: Optional[Tensor], idx_s: Optional[Tensor], du: Optional[Tensor],
               dv: Optional[Tensor], idx_c: Optional[Tensor], arrangement: int) -> Tensor:
    if arrangement not in (0, 1, 2):
        raise RuntimeError(f"grad_input: arrangement must be 0, 1 or 2, got {arrangement}")
    gf = _flat(grad)
    n, c, s = gf.shape
    ones = gf.new_ones(())
    gcb = gc[:, :, None] if gc is not None else ones
    gsb = gs[:, None, :] if gs is not None else ones
    # terms from the pool over S (a, m) and from the pool over C (u, v)
    term_s = torch.zeros_like(gf)
    if da is not None:
        term_s = term_s + da[:, :, None] / s
    if dm is not None:
        term_s = term_s + _at_argmax(dm, idx_s, s, 2)
    term_c = torch.zeros_like(gf)
    if du is not None:
        term_c = term_c + du[:, None, :] / c
    if dv is not None:
        term_c = term_c + _at_argmax(dv, idx_c, c, 1)
    kc = gsb if arrangement == 1 else ones
    ks = gcb if arrangement == 0 else ones
    dx = gf * gcb * gsb + kc * term_s + ks * term_c
    return dx


def grad_input_lp_lse(grad: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
                      da: Optional[Tensor], dm: Optional[Tensor], idx_s: Optional[Tensor],
                      du: Optional[Tensor], dv: Optional[Tensor], idx_c: Optional[Tensor],
                      d_lp: Optional[Tensor], lp: Optional[Tensor], d_lse: Optional[Tensor],
                      lse: Optional[Tensor], arrangement: int) -> Tensor:
    dx = grad_input(grad, gc, gs, da, dm, idx_s, du, dv, idx_c, arrangement)
    xf = _flat(x)
    gsb = gs[:, None, :] if arrangement == 1 and gs is not None else None
    v = xf if gsb is None else xf * gsb  # what the pools over S saw
    term = _lp_lse_terms(v, d_lp, lp, d_lse, lse)
    return dx + (term if gsb is None else gsb * term)


# ----------------------------------------------------------------------------- the head op
# spatial_head is not x-sized: its inputs are the [N, 1, *spatial] pools over C in the
# accumulation dtype. Its checks (the launcher's, csrc/launchers/spatial_head.cu, word for word)
# run in the CPU and the fake kernel alike.
SPATIAL_ORDERS = ("max,mean", "mean,max", "blend")
_MAX_HEAD_TAPS = 1024  # kMaxHeadTaps, csrc/kernels/spatial_head.cuh


# dtype names as the C++ checks print them (c10::ScalarType), so that an error reads the same on
# every device
DTYPE_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
               torch.float64: "Double", torch.int64: "Long"}


def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_like_head(t, ref, op, name, ref_name):
    if t.device != ref.device:
        raise RuntimeError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got "
                           f"{t.device}")
    if t.dtype != ref.dtype:
        raise RuntimeError(f"{op}: {name} must have the dtype of {ref_name} "
                           f"({dtype_name(ref.dtype)}), got {dtype_name(t.dtype)}")


def _check_head_order(spatial_pools, op):
    if spatial_pools not in SPATIAL_ORDERS:
        raise RuntimeError(f"{op}: spatial_pools must be 'max,mean', 'mean,max' or 'blend', got "
                           f"'{spatial_pools}'")
    return 1 if spatial_pools == "blend" else 2


def _check_head_scalars(ref, ref_name, op, **params):
    """[1] parameters on ref's device, in its dtype (launchers/spatial_head_common.h head_scalar);
    None: absent."""
    for name, t in params.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise RuntimeError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), "
                               f"got {t.device}")
        if t.dim() != 1 or t.numel() != 1:
            raise RuntimeError(f"{op}: {name} must have shape [1], got {list(t.shape)}")
        if t.dtype != ref.dtype:
            raise RuntimeError(f"{op}: {name} must have the dtype of {ref_name} "
                               f"({dtype_name(ref.dtype)}), got {dtype_name(t.dtype)}")


def _check_head_params(ref, ref_name, nd, cin, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, op):
    """conv_w, the [1] parameters and BatchNorm's pairing rules (launchers/spatial_head_common.h)."""
    _check_like_head(conv_w, ref, op, "conv_w", ref_name)
    k = conv_w.shape[-1] if conv_w.dim() == nd + 2 else 0
    if not (conv_w.dim() == nd + 2 and tuple(conv_w.shape) == (1, cin) + (k,) * nd
            and k % 2 == 1):
        ks = ", k" * nd
        raise RuntimeError(f"{op}: conv_w must have shape [1, {cin}{ks}] with an odd k, got "
                           f"{list(conv_w.shape)}")
    if cin * k ** nd > _MAX_HEAD_TAPS:
        raise RuntimeError(f"{op}: conv_w has {cin * k ** nd} weights, at most {_MAX_HEAD_TAPS} "
                           f"are supported")
    _check_head_scalars(ref, ref_name, op, conv_b=conv_b, bn_w=bn_w, bn_b=bn_b, bn_rm=bn_rm,
                        bn_rv=bn_rv)
    if (bn_rm is None) != (bn_rv is None):
        raise RuntimeError(f"{op}: bn_rm and bn_rv must be given together (BatchNorm in eval mode)")
    if bn_rv is None and (bn_w is not None or bn_b is not None):
        raise RuntimeError(f"{op}: bn_w and bn_b need bn_rm and bn_rv (BatchNorm in eval mode)")


def _check_accumulation_dtype(t, op, name):
    if t.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: {name} must be float32 or float64 (the accumulation dtype), got "
                           f"{dtype_name(t.dtype)}")


def check_spatial_head(avg, max, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, spatial_pools):
    op = "spatial_head"
    cin = _check_head_order(spatial_pools, op)
    nd = avg.dim() - 2
    if not (1 <= nd <= 3 and avg.shape[1] == 1):
        raise RuntimeError(f"{op}: avg must have shape [N, 1, *spatial] with 1 to 3 spatial "
                           f"dimensions, got {list(avg.shape)}")
    _check_accumulation_dtype(avg, op, "avg")
    _check_like_head(max, avg, op, "max", "avg")
    if max.shape != avg.shape:
        raise RuntimeError(f"{op}: max must have the shape of avg {list(avg.shape)}, got "
                           f"{list(max.shape)}")
    _check_head_params(avg, "avg", nd, cin, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, op)


def check_spatial_head_backward(grad, gs, smap, zconv, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv,
                                spatial_pools):
    op = "spatial_head_backward"
    cin = _check_head_order(spatial_pools, op)
    nd = smap.dim() - 2
    if not (1 <= nd <= 3 and smap.shape[1] == cin):
        raise RuntimeError(f"{op}: smap must have shape [N, {cin}, *spatial] with 1 to 3 spatial "
                           f"dimensions, got {list(smap.shape)}")
    _check_accumulation_dtype(smap, op, "smap")
    n, s = smap.shape[0], math.prod(smap.shape[2:])
    for name, t, want in (("grad", grad, [n, s]), ("gs", gs, [n, s]),
                          ("zconv", zconv, [n, 1, *smap.shape[2:]])):
        if t is None:
            continue
        _check_like_head(t, smap, op, name, "smap")
        if list(t.shape) != want:
            raise RuntimeError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")
    _check_head_params(smap, "smap", nd, cin, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, op)
    if gs is None and bn_rv is not None:
        raise RuntimeError(f"{op}: BatchNorm (bn_rm, bn_rv) needs gs (without gs, grad is the conv "
                           f"output's gradient)")
    if zconv is None and bn_rv is not None:
        raise RuntimeError(f"{op}: BatchNorm (bn_rm, bn_rv) needs zconv")


def _check_bn_zconv(zconv, op):
    """zconv of the BatchNorm gate ops (launchers/batch_norm_gate.cu check_bn_zconv); (N, S)."""
    nd = zconv.dim() - 2
    if not (1 <= nd <= 3 and zconv.shape[1] == 1):
        raise RuntimeError(f"{op}: zconv must have shape [N, 1, *spatial] with 1 to 3 spatial "
                           f"dimensions, got {list(zconv.shape)}")
    _check_accumulation_dtype(zconv, op, "zconv")
    if zconv.numel() <= 1:
        raise RuntimeError(f"{op}: zconv must hold more than 1 value (batch statistics), got "
                           f"shape {list(zconv.shape)}")
    return zconv.shape[0], math.prod(zconv.shape[2:])


def check_batch_norm_gate(zconv, bn_w, bn_b, bn_eps):
    op = "batch_norm_gate"
    n, s = _check_bn_zconv(zconv, op)
    _check_head_scalars(zconv, "zconv", op, bn_w=bn_w, bn_b=bn_b)
    return n, s


def check_batch_norm_gate_backward(dgs, gs, zconv, mean, invstd, bn_w, has_b):
    op = "batch_norm_gate_backward"
    n, s = _check_bn_zconv(zconv, op)
    for name, t in (("dgs", dgs), ("gs", gs)):
        _check_like_head(t, zconv, op, name, "zconv")
        if list(t.shape) != [n, s]:
            raise RuntimeError(f"{op}: {name} must have shape [{n}, {s}], got {list(t.shape)}")
    _check_head_scalars(zconv, "zconv", op, mean=mean, invstd=invstd, bn_w=bn_w)
    return n, s


_MAX_HEAD_UNITS = 65535 * 32  # max_grid_y() tiles of kHeadTile (csrc/kernels/head_gemm.cuh)


def _check_channel_pools_act(pools, act, op) -> int:
    """The pools and act arguments (launchers/channel_head_common.h); the MLP inputs' count k."""
    kinds = pools.split("+")
    if pools != "blend" and (len(set(kinds)) != len(kinds)
                             or any(k not in _heads.CHANNEL_POOLS for k in kinds)):
        raise RuntimeError(f"{op}: pools must be 'blend' or distinct names of avg, max, lp, lse "
                           f"joined by '+', got '{pools}'")
    if act not in _heads.ACTIVATIONS:
        raise RuntimeError(f"{op}: act must be 'relu', 'silu', 'gelu' or 'identity', got '{act}'")
    return 1 if pools == "blend" else len(kinds)


def _check_head_tensors(ref, ref_name, op, specs):
    """(name, tensor or None, wanted shape, its formula) each on ref's device, in its dtype and
    of that shape (launchers/channel_head_common.h head_param)."""
    for name, t, want, shape in specs:
        if t is None:
            continue
        _check_like_head(t, ref, op, name, ref_name)
        if list(t.shape) != want:
            raise RuntimeError(f"{op}: {name} must have shape {shape} = {want}, got "
                               f"{list(t.shape)}")


def check_channel_head(avg, max, lp, lse, w1, b1, w2, b2, pools, act):
    """The launcher's checks (csrc/launchers/channel_head.cu), word for word."""
    op = "channel_head"
    k = _check_channel_pools_act(pools, act, op)
    kinds = _heads.pool_kinds(pools)
    if avg.dim() != 2:
        raise RuntimeError(f"{op}: avg must have shape [N, C], got {list(avg.shape)}")
    _check_accumulation_dtype(avg, op, "avg")
    n, c = avg.shape
    given = {"avg": avg, "max": max, "lp": lp, "lse": lse}
    for name, t in given.items():
        if t is None:
            continue
        _check_like_head(t, avg, op, name, "avg")
        if t.shape != avg.shape:
            raise RuntimeError(f"{op}: {name} must have the shape of avg {list(avg.shape)}, got "
                               f"{list(t.shape)}")
    for name in kinds:
        if given[name] is None:
            raise RuntimeError(f"{op}: pools '{pools}' need {name}")
    if w1.dim() != 2 or w1.shape[1] != c:
        raise RuntimeError(f"{op}: w1 must have shape [H, C] with C = {c}, got {list(w1.shape)}")
    hid = w1.shape[0]
    _check_head_tensors(avg, "avg", op, (("w1", w1, [hid, c], "[H, C]"), ("b1", b1, [hid], "[H]"),
                                         ("w2", w2, [c, hid], "[C, H]"), ("b2", b2, [c], "[C]")))
    if w2 is None and hid != c:
        raise RuntimeError(f"{op}: w1 must have shape [C, C] = [{c}, {c}] without w2 (one "
                           f"layer), got {list(w1.shape)}")
    if w2 is None and b2 is not None:
        raise RuntimeError(f"{op}: b2 needs w2")
    if c > _MAX_HEAD_UNITS or hid > _MAX_HEAD_UNITS:
        raise RuntimeError(f"{op}: at most {_MAX_HEAD_UNITS} channels and hidden units are "
                           f"supported, got C = {c}, H = {hid}")
    return n, c, hid, k


def channel_head(avg: Tensor, max: Tensor, lp: Optional[Tensor], lse: Optional[Tensor],
                 w1: Tensor, b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor],
                 pools: str, act: str):
    """(gc [N, C], P [k N, C], h [k N, H]): the ATen ops the kernels fuse (cat, two linear, the
    activation, the sum over the pools, sigmoid), as the block's composite ran them before."""
    pooled = {"avg": avg, "max": max, "lp": lp, "lse": lse}
    zc, p, h = _heads.channel_forward(pooled, pools, w1, b1, w2, b2, act)
    return torch.sigmoid(zc), p, h


def check_channel_head_backward(dzc, p, h, w1, w2, has_b1, has_b2, pools, act):
    """The launcher's checks (csrc/launchers/channel_head_backward.cu), word for word."""
    op = "channel_head_backward"
    k = _check_channel_pools_act(pools, act, op)
    if dzc.dim() != 2:
        raise RuntimeError(f"{op}: dzc must have shape [N, C], got {list(dzc.shape)}")
    _check_accumulation_dtype(dzc, op, "dzc")
    n, c = dzc.shape
    if w1.dim() != 2 or w1.shape[1] != c:
        raise RuntimeError(f"{op}: w1 must have shape [H, C] with C = {c}, got {list(w1.shape)}")
    hid = w1.shape[0]
    _check_head_tensors(dzc, "dzc", op, (("w1", w1, [hid, c], "[H, C]"),
                                         ("p", p, [k * n, c], "[k N, C]"),
                                         ("h", h, [k * n, hid], "[k N, H]"),
                                         ("w2", w2, [c, hid], "[C, H]")))
    if w2 is None and hid != c:
        raise RuntimeError(f"{op}: w1 must have shape [C, C] = [{c}, {c}] without w2 (one "
                           f"layer), got {list(w1.shape)}")
    if w2 is None and has_b2:
        raise RuntimeError(f"{op}: has_b2 needs w2")
    if hid > _MAX_HEAD_UNITS:
        raise RuntimeError(f"{op}: at most {_MAX_HEAD_UNITS} hidden units are supported, got "
                           f"{hid}")
    return n, c, hid, k


def channel_head_backward(dzc: Tensor, p: Tensor, h: Tensor, w1: Tensor, w2: Optional[Tensor],
                          has_b1: bool, has_b2: bool, pools: str, act: str):
    """(dP, dw1, db1, dw2, db2), empty where absent: the ATen ops the kernels fuse (repeat, four
    mm, two sums, the activation's backward), as the block's composite ran them before."""
    dp, dw1, db1, dw2, db2 = _heads.channel_backward(dzc, pools, p, h, w1, w2, has_b1, has_b2,
                                                     act)
    return tuple(t if t is not None else dzc.new_empty((0,)) for t in (dp, dw1, db1, dw2, db2))


def spatial_head(avg: Tensor, max: Tensor, conv_w: Tensor, conv_b: Optional[Tensor],
                 bn_w: Optional[Tensor], bn_b: Optional[Tensor], bn_rm: Optional[Tensor],
                 bn_rv: Optional[Tensor], bn_eps: float, spatial_pools: str, gate: bool):
    """(gs [N, S] or empty, smap, zconv): the ATen ops the kernel fuses (cat, convolution,
    batch_norm in eval mode, sigmoid), as the block's composite ran them before it."""
    n = avg.shape[0]
    smap = _heads.spatial_map(avg, max, spatial_pools, tuple(avg.shape[2:]))
    zs, zconv = _heads.spatial_forward(smap, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, bn_eps)
    gs = torch.sigmoid(zs).reshape(n, math.prod(avg.shape[2:])) if gate else avg.new_empty((0,))
    return gs, smap, zconv


def spatial_head_backward(grad: Tensor, gs: Optional[Tensor], smap: Tensor,
                          zconv: Optional[Tensor], conv_w: Tensor, conv_b: Optional[Tensor],
                          bn_w: Optional[Tensor], bn_b: Optional[Tensor], bn_rm: Optional[Tensor],
                          bn_rv: Optional[Tensor], bn_eps: float, spatial_pools: str):
    """(du, dv, d conv_w, d conv_b, d bn_w, d bn_b), empty where a parameter is not given: the
    ATen ops the kernels fuse (sigmoid_backward, batch_norm_backward in eval mode,
    convolution_backward, the split of the map's gradient)."""
    n, sp = smap.shape[0], tuple(smap.shape[2:])
    empty = smap.new_empty((0,))
    if n == 0:  # every sum is 0 (ATen's batch_norm_backward in eval mode dies of SIGFPE on it)
        du = smap.new_empty((0, math.prod(sp)))
        return (du, du.clone(), torch.zeros_like(conv_w),
                *[smap.new_zeros((1,)) if p is not None else empty.clone()
                  for p in (conv_b, bn_w, bn_b)])
    dzs = grad if gs is None else torch.ops.aten.sigmoid_backward(grad, gs)
    dmap, dcw, dcb, dbw, dbb = _heads.spatial_backward(
        dzs.reshape(n, 1, *sp), smap, zconv, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, bn_eps)
    du, dv = _heads.spatial_map_backward(dmap, spatial_pools)
    return (du, dv, dcw, dcb if dcb is not None else empty,
            dbw if dbw is not None else empty.clone(), dbb if dbb is not None else empty.clone())


def batch_norm_gate(zconv: Tensor, bn_w: Optional[Tensor], bn_b: Optional[Tensor],
                    bn_eps: float):
    """(gs [N, S], mean, invstd, unbiased var): the ATen ops the kernels fuse (native_batch_norm
    with batch statistics, sigmoid, var_mean for the running variance), as the block ran them
    before."""
    zs, mean, invstd = torch.ops.aten.native_batch_norm(zconv, bn_w, bn_b, None, None, True, 0.0,
                                                        bn_eps)
    var = torch.var_mean(zconv, dim=None, correction=1)[0].reshape(1)
    return torch.sigmoid(zs).reshape(zconv.shape[0], -1), mean, invstd, var


def batch_norm_gate_backward(dgs: Tensor, gs: Tensor, zconv: Tensor, mean: Tensor,
                             invstd: Tensor, bn_w: Optional[Tensor], has_b: bool):
    """(d zconv [N, S], d bn_w, d bn_b), empty where not asked for: the ATen ops the kernels fuse
    (sigmoid_backward, native_batch_norm_backward with batch statistics)."""
    dzs = torch.ops.aten.sigmoid_backward(dgs, gs).reshape(zconv.shape)
    dz, dbw, dbb = torch.ops.aten.native_batch_norm_backward(
        dzs, zconv, bn_w, None, None, mean, invstd, True, 0.0, [True, bn_w is not None, has_b])
    empty = zconv.new_empty((0,))
    return (dz.reshape(dgs.shape), dbw if dbw is not None else empty,
            dbb if dbb is not None else empty.clone())


# The math of each op, functional (no in-place writes, no simulator): what the kernels below run
# and what cbam_fused.export decomposes the ops into. apply_gates and grad_input give [N, C, S].
MATH = {
    "pool_over_s": pool_over_s,
    "pool_over_s_lp_lse": pool_over_s_lp_lse,
    "pool_over_c": pool_over_c,
    "apply_gates": apply_gates,
    "backward_reduce": backward_reduce,
    "pool_over_c_backward_scale": pool_over_c_backward_scale,
    "pool_over_s_backward_scale": pool_over_s_backward_scale,
    "pool_over_s_backward_scale_lp_lse": pool_over_s_backward_scale_lp_lse,
    "grad_input": grad_input,
    "grad_input_lp_lse": grad_input_lp_lse,
}
# ops whose output has the shape and memory format of their first argument
X_SHAPED = ("apply_gates", "grad_input", "grad_input_lp_lse")


def _kernel(name: str):
    math = MATH[name]

    def kernel(*args):
        sim = sim_op(name)
        if sim is not None:
            return sim(*args)
        out = math(*args)
        return _like_x(out, args[0]) if name in X_SHAPED else out

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = (f"The oracle's kernel of cbam_fused::{name} (the simulator's while it is "
                      f"active).")
    return kernel


def _checked_head(name, math, check, n_tensors):
    """The CPU kernel of a head op: check(the tensor arguments, spatial_pools), then the simulator
    or the math. The tensors come first, bn_eps after them, spatial_pools after that."""
    def kernel(*args):
        check(*args[:n_tensors], args[n_tensors + 1])
        sim = sim_op(name)
        return sim(*args) if sim is not None else math(*args)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = f"The CPU kernel of cbam_fused::{name} (the simulator's while it is active)."
    return kernel


# op name -> the oracle's kernel: MATH with the output in the first argument's layout (the CPU
# kernels registered for the ops are cbam_fused._cpu_fast.KERNELS)
ORACLE = {name: _kernel(name) for name in MATH}
# the ops on the small pooled maps (not x-sized): their math and CPU kernels
HEAD_MATH = {"channel_head": channel_head, "channel_head_backward": channel_head_backward,
             "spatial_head": spatial_head, "spatial_head_backward": spatial_head_backward,
             "batch_norm_gate": batch_norm_gate,
             "batch_norm_gate_backward": batch_norm_gate_backward}


def _head_kernel(name, math, check):
    """The CPU kernel of a head op whose check takes every argument: check, then the simulator or
    the math."""
    def kernel(*args):
        check(*args)
        sim = sim_op(name)
        return sim(*args) if sim is not None else math(*args)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = f"The CPU kernel of cbam_fused::{name} (the simulator's while it is active)."
    return kernel


HEAD_KERNELS = {
    "channel_head": _head_kernel("channel_head", channel_head, check_channel_head),
    "channel_head_backward": _head_kernel("channel_head_backward", channel_head_backward,
                                          check_channel_head_backward),
    "spatial_head": _checked_head("spatial_head", spatial_head, check_spatial_head, 8),
    "spatial_head_backward": _checked_head("spatial_head_backward", spatial_head_backward,
                                           check_spatial_head_backward, 10),
    "batch_norm_gate": _head_kernel("batch_norm_gate", batch_norm_gate, check_batch_norm_gate),
    "batch_norm_gate_backward": _head_kernel("batch_norm_gate_backward", batch_norm_gate_backward,
                                             check_batch_norm_gate_backward),
}
