"""cbam_fused.reference: naive eager CBAM written from the math (DESIGN.md section 1).

The oracle every test compares against. Plain PyTorch ops and autograd, computed in x's dtype
(like an eager module would), no custom ops, no closed-form backward. `cbam` takes exactly the
arguments of cbam_fused.functional.cbam; a module's `functional_kwargs()` gives them.
Max pools use torch.max over a dim: the gradient goes to the first maximal element, as in the
official code's max_pool2d (timm's amax would split it between ties, which random data never has).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _act(h: Tensor, act: str) -> Tensor:
    return {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "identity": lambda t: t}[act](h)


def _mlp(p: Tensor, w1, b1, w2, b2, act) -> Tensor:
    """p [N, C] -> [N, C]; weights in Linear or 1x1-conv form."""
    w1 = w1.reshape(w1.shape[0], w1.shape[1]).to(p.dtype)
    h = F.linear(p, w1, None if b1 is None else b1.to(p.dtype))
    if w2 is None:
        return h
    w2 = w2.reshape(w2.shape[0], w2.shape[1]).to(p.dtype)
    return F.linear(_act(h, act), w2, None if b2 is None else b2.to(p.dtype))


def _pool_s(flat: Tensor, kind: str) -> Tensor:
    """One pool over the flattened spatial dim of flat [N, C, S], as the official code writes it."""
    if kind == "avg":
        return flat.mean(2)
    if kind == "max":
        return flat.max(2).values
    if kind == "lp":  # F.lp_pool2d(x, 2, (H, W)): sqrt(S * mean(x^2))
        return (flat.pow(2).mean(2) * flat.shape[2]).pow(0.5)
    # lse: logsumexp_2d
    s = flat.max(2, keepdim=True).values
    return (s + (flat - s).exp().sum(2, keepdim=True).log()).squeeze(2)


def channel_gate(inp: Tensor, pools, w1, b1, w2, b2, act) -> Tensor:
    """gc [N, C]: sigmoid of the MLP outputs summed over the pools of inp over its spatial dims
    (in the order of `pools`, as the official code's loop over pool_types sums them)."""
    flat = inp.flatten(2)
    if pools == "blend":
        return torch.sigmoid(_mlp(0.5 * _pool_s(flat, "avg") + 0.5 * _pool_s(flat, "max"), w1, b1,
                                  w2, b2, act))
    z = None
    for kind in pools.split("+"):
        raw = _mlp(_pool_s(flat, kind), w1, b1, w2, b2, act)
        z = raw if z is None else z + raw
    return torch.sigmoid(z)


def spatial_gate(inp: Tensor, spatial_pools, conv_w, conv_b, batch_norm, bn_w, bn_b, bn_rm, bn_rv,
                 bn_training, bn_momentum, bn_eps) -> Tensor:
    """gs [N, 1, *spatial]: sigmoid(Norm(conv(pools of inp over its channels)))."""
    mean = inp.mean(1, keepdim=True)
    mx = inp.max(1, keepdim=True).values
    if spatial_pools == "max,mean":
        smap = torch.cat([mx, mean], 1)
    elif spatial_pools == "mean,max":
        smap = torch.cat([mean, mx], 1)
    else:
        smap = 0.5 * mean + 0.5 * mx
    nd = inp.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    k = conv_w.shape[-1]
    z = conv(smap, conv_w.to(inp.dtype), None if conv_b is None else conv_b.to(inp.dtype),
             padding=k // 2)
    if batch_norm:
        z = F.batch_norm(z, bn_rm, bn_rv, bn_w, bn_b, training=bn_training or bn_rm is None,
                         momentum=bn_momentum, eps=bn_eps)
    return torch.sigmoid(z)


def cbam(x: Tensor,
         mlp_w1: Optional[Tensor] = None, mlp_b1: Optional[Tensor] = None,
         mlp_w2: Optional[Tensor] = None, mlp_b2: Optional[Tensor] = None,
         conv_w: Optional[Tensor] = None, conv_b: Optional[Tensor] = None,
         bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
         bn_running_mean: Optional[Tensor] = None, bn_running_var: Optional[Tensor] = None,
         *, pools: str = "avg+max", act: str = "relu", spatial_pools: str = "max,mean",
         arrangement: str = "channel_first", batch_norm: bool = False, bn_training: bool = False,
         bn_momentum: float = 0.1, bn_eps: float = 1e-5, return_gates: bool = False):
    """Same arguments and results as cbam_fused.functional.cbam."""
    n = x.shape[0]

    def cg(inp):
        return channel_gate(inp, pools, mlp_w1, mlp_b1, mlp_w2, mlp_b2, act)

    def sg(inp):
        return spatial_gate(inp, spatial_pools, conv_w, conv_b, batch_norm, bn_weight, bn_bias,
                            bn_running_mean, bn_running_var, bn_training, bn_momentum, bn_eps)

    def bc(gc):  # [N, C] -> broadcastable over x
        return gc.reshape(*gc.shape, *([1] * (x.dim() - 2)))

    gc = gs = None
    has_c, has_s = mlp_w1 is not None, conv_w is not None
    if arrangement == "channel_first":
        xc = x
        if has_c:
            gc = cg(x)
            xc = x * bc(gc)
        y = xc
        if has_s:
            gs = sg(xc)
            y = xc * gs
    elif arrangement == "spatial_first":
        xs = x
        if has_s:
            gs = sg(x)
            xs = x * gs
        y = xs
        if has_c:
            gc = cg(xs)
            y = xs * bc(gc)
    else:  # parallel
        y = x
        if has_c:
            gc = cg(x)
            y = y * bc(gc)
        if has_s:
            gs = sg(x)
            y = y * gs
    if return_gates:
        return (y, None if gc is None else gc.detach(),
                None if gs is None else gs.detach().reshape(n, 1, *x.shape[2:]))
    return y
