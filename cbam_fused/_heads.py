"""The small heads of CBAM, forward and backward in closed form (ATen ops, no autograd): the math
of the head ops' CPU kernels (cbam_fused._cpu_kernels: channel_head, channel_head_backward,
spatial_head, spatial_head_backward).

Channel head (on [N, C] pooled descriptors: avg, max, lp, lse, or the avg / max blend):
    MLP:    z = W2 act(W1 p + b1) + b2,   zc = sum over the chosen pools p of z(p)
    single: z = W1 p + b1                 (ultralytics: one 1x1 conv, no hidden layer)
Spatial head (on the [N, k, *spatial] map stacked from the pools over C):
    zs = Norm(Conv_k(map)),  Norm = BatchNorm(1) or identity
All of it runs in the accumulation dtype; parameters are cast to it and their gradients cast back.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("relu", "silu", "gelu", "identity")


def act_forward(h: Tensor, act: str) -> Tensor:
    if act == "relu":
        return torch.relu(h)
    if act == "silu":
        return F.silu(h)
    if act == "gelu":
        return F.gelu(h)
    return h


def act_backward(dh: Tensor, h: Tensor, act: str) -> Tensor:
    """d act(h) / dh times dh: the kernels eager autograd uses (one launch each, the same
    results as eager, NaN handling included)."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(dh, h, 0)
    if act == "silu":
        return torch.ops.aten.silu_backward(dh, h)
    if act == "gelu":  # exact (erf) gelu
        return torch.ops.aten.gelu_backward(dh, h)
    return dh


# ----------------------------------------------------------------------------- channel head
# The channel gate's pools over S: mean, max, and the official code's lp (sqrt(sum x^2)) and lse
# (log sum exp x). A `pools` string joins distinct ones with '+' in the order their MLP outputs
# are summed ('avg+max', 'avg+max+lp+lse', ...), or is 'blend' (timm LightCbamModule: one MLP
# on 0.5 (avg + max)).
CHANNEL_POOLS = ("avg", "max", "lp", "lse")


def pool_kinds(pools: str) -> Tuple[str, ...]:
    """The pools a `pools` string needs from the pool over S: 'blend' needs avg and max."""
    return ("avg", "max") if pools == "blend" else tuple(pools.split("+"))


def channel_inputs(pooled: Dict[str, Tensor], pools: str) -> List[Tensor]:
    """The MLP inputs [N, C], in summation order, from the pools over S by name."""
    if pools == "blend":
        return [0.5 * (pooled["avg"] + pooled["max"])]
    return [pooled[k] for k in pool_kinds(pools)]


def pools_in(p: Tensor, pools: str, n: int) -> Dict[str, Tensor]:
    """The pools [N, C] by name inside P, the stacked MLP inputs channel_forward returns (none for
    'blend', whose one input is a mix)."""
    if pools == "blend":
        return {}
    return {name: p[i * n:(i + 1) * n] for i, name in enumerate(pool_kinds(pools))}


def saves_activated(act: str) -> bool:
    """Whether a two-layer channel head saves its hidden layer after the activation (relu: its
    backward needs only where the layer is positive, and the second layer's weight gradient needs
    the activated values, so the backward recomputes nothing) rather than before it."""
    return act == "relu"


def channel_forward(pooled, pools, w1, b1, w2, b2, act):
    """zc [N, C] and what the backward needs: (P, h) with P the stacked pool inputs and h the
    hidden layer, activated where saves_activated says so."""
    inputs = channel_inputs(pooled, pools)
    p = torch.cat(inputs, 0)  # [k N, C]
    h_pre = F.linear(p, w1, b1)
    h = h_pre
    if w2 is None:  # single layer
        z = h_pre
    else:
        h_act = act_forward(h_pre, act)
        z = F.linear(h_act, w2, b2)
        if saves_activated(act):
            h = h_act
    zc = z.reshape(len(inputs), inputs[0].shape[0], z.shape[-1]).sum(0)  # (no -1: N may be 0)
    return zc, p, h


def channel_backward(dzc, pools, p, h, w1, w2, has_b1, has_b2, act):
    """Gradients of sum_p z(p) for dzc: (dP, dw1, db1, dw2, db2), None for an absent bias
    (has_b1, has_b2 false) or second layer; dP is the gradient of the stacked inputs P [k N, C]
    (blend: [N, C], already halved: the gradient of avg and of max alike; pool_grads splits it).
    h: what channel_forward saved."""
    k = 1 if pools == "blend" else len(pool_kinds(pools))
    dz = dzc.repeat(k, 1) if k > 1 else dzc  # the same dzc flows into every pool's MLP output
    if w2 is None:
        dh_pre = dz
        dw2 = db2 = None
    else:
        # relu: h is activated, and relu's backward at h is the one at h_pre (same sign)
        h_act = h if saves_activated(act) else act_forward(h, act)
        dw2 = dz.t() @ h_act
        db2 = dz.sum(0) if has_b2 else None
        dh_pre = act_backward(dz @ w2, h, act)
    dw1 = dh_pre.t() @ p
    db1 = dh_pre.sum(0) if has_b1 else None
    dp = dh_pre @ w1  # [k N, C]
    return (0.5 * dp if pools == "blend" else dp), dw1, db1, dw2, db2


def pool_grads(dp: Tensor, pools: str, n: int) -> Dict[str, Tensor]:
    """The gradient of each pool [N, C] by name, from channel_backward's dP (views of it)."""
    if pools == "blend":
        return {"avg": dp, "max": dp}
    return pools_in(dp, pools, n)


# ----------------------------------------------------------------------------- spatial head
def spatial_map(u: Tensor, v: Tensor, order: str, spatial_shape) -> Tensor:
    """Stack the pools over C ([N, S] each) into the conv input [N, k, *spatial]."""
    n = u.shape[0]
    u = u.reshape(n, 1, *spatial_shape)
    v = v.reshape(n, 1, *spatial_shape)
    if order == "max,mean":
        return torch.cat([v, u], 1)
    if order == "mean,max":
        return torch.cat([u, v], 1)
    return 0.5 * (u + v)  # blend


def spatial_map_backward(dmap: Tensor, order: str):
    """(du, dv) as [N, S] from the gradient of the stacked map: two separate contiguous tensors
    (spatial_head_backward's outputs, which may not alias each other)."""
    n = dmap.shape[0]
    if order == "blend":
        du = 0.5 * dmap[:, 0]
        return du.reshape(n, -1), du.clone().reshape(n, -1)
    first, second = dmap[:, 0].reshape(n, -1).clone(), dmap[:, 1].reshape(n, -1).clone()
    return (second, first) if order == "max,mean" else (first, second)


def _conv(x, w, b, pad):
    return torch.ops.aten.convolution(x, w, b, [1] * (x.dim() - 2), [pad] * (x.dim() - 2),
                                      [1] * (x.dim() - 2), False, [0] * (x.dim() - 2), 1)


def spatial_forward(smap, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, bn_eps):
    """(zs, zconv) [N, 1, *spatial]: the conv, then BatchNorm in eval mode where bn_rv is given
    (with batch statistics: batch_norm_gate's math, cbam_fused._cpu_kernels)."""
    zconv = _conv(smap, conv_w, conv_b, conv_w.shape[-1] // 2)
    if bn_rv is None:
        return zconv, zconv
    zs, _, _ = torch.ops.aten.native_batch_norm(zconv, bn_w, bn_b, bn_rm, bn_rv, False, 0.0,
                                                bn_eps)
    return zs, zconv


def spatial_backward(dzs, smap, zconv, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, bn_eps):
    """(dmap, dconv_w, dconv_b, dbn_w, dbn_b) from dzs = d zs, BatchNorm in eval mode where bn_rv
    is given; None for a parameter not given."""
    dbn_w = dbn_b = None
    if bn_rv is not None:
        # eval mode, zs = (zconv - rm) invstd w + b with invstd = 1 / sqrt(rv + eps), written
        # out: ATen's CUDA native_batch_norm_backward asserts saved batch statistics even in
        # eval mode (torch 2.11), and this path also serves CUDA tensors (the benchmarks' ATen
        # side, the GPU tests' references)
        shape = [1, -1] + [1] * (zconv.dim() - 2)
        invstd = torch.rsqrt(bn_rv + bn_eps).reshape(shape)
        dims = [0] + list(range(2, zconv.dim()))
        dzconv = dzs * (invstd if bn_w is None else invstd * bn_w.reshape(shape))
        if bn_w is not None:
            dbn_w = (dzs * ((zconv - bn_rm.reshape(shape)) * invstd)).sum(dims)
        if bn_b is not None:
            dbn_b = dzs.sum(dims)
    else:
        dzconv = dzs
    pad = conv_w.shape[-1] // 2
    nd = smap.dim() - 2
    dmap, dw, db = torch.ops.aten.convolution_backward(
        dzconv, smap, conv_w, [conv_w.shape[0]] if conv_b is not None else None, [1] * nd,
        [pad] * nd, [1] * nd, False, [0] * nd, 1, [True, True, conv_b is not None])
    return dmap, dw, db, dbn_w, dbn_b
