"""The kernels registered for CPU tensors: the math of cbam_fused._cpu_kernels.MATH (the oracle)
in fewer full-size passes.

The oracle builds every term of a formula as its own [N, C, S] tensor: the argmax terms as
masks over the whole tensor, then their sum. Here the x-sized work is what the formula needs and
no more, each pass an in-place ATen op on one buffer:
- an argmax term touches one element per row: a gather of x at the argmax and a scatter_add of
  the row's value (rows of [N, C] or [N, S]; at most one index per output row for grad_input,
  so the order of its adds is fixed);
- the products and broadcast terms go into the output (or one accumulation-dtype buffer for
  float16 / bfloat16, rounded once at the end, as the oracle does);
- the Q2 ops' sums over S or C of x times a broadcast weight are one product and one sum;
- the forward pools (mean, max, argmax of x * scale) are one pass in C++
  (csrc/cpu/pool_rows.cpp), with no x * scale tensor.
Sums run in another order than the oracle's, so results agree to rounding, not bit for bit;
tests/test_cpu_fast.py checks each kernel against the oracle, non-finite values included.

Ops without an entry in FAST, and the cases an entry hands back (None: a missing average
gradient, whose term the oracle's product with zeros turns into NaN wherever x is not finite;
output layouts whose spatial dimensions cannot be viewed as one; an empty reduced extent), run
the oracle's math (the lp / lse variants always do). While
cbam_fused.testing.use_simulator() is active, every call goes to the simulator, as in the
oracle's kernels."""
import math
from typing import Optional

import torch
from torch import Tensor

from . import _cpu_kernels as oracle
from ._sim_hook import sim_op


def _rows(t: Tensor) -> Tensor:
    """t as [N, C, S], in its own dtype (a view wherever the layout allows)."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _x_sized_buffer(like: Tensor):
    """(buffer, its [N, C, S] view): a new tensor of like's shape and memory format in the
    accumulation dtype, or (None, None) where its spatial dimensions do not merge into one view."""
    buf = torch.empty_like(like, dtype=oracle.acc_dtype(like.dtype))
    try:
        return buf, buf.view(like.shape[0], like.shape[1], math.prod(like.shape[2:]))
    except RuntimeError:
        return None, None


def _in_dtype(buf: Tensor, like: Tensor) -> Tensor:
    """The accumulation-dtype result in like's dtype (one rounding; the buffer itself if equal)."""
    return buf if buf.dtype == like.dtype else buf.to(like.dtype)


def _product(out: Tensor, v: Tensor, a: Optional[Tensor], b: Optional[Tensor]) -> None:
    """out = v * a * b in out's dtype, each factor where given (a: [N, C, 1], b: [N, 1, S], both
    in the accumulation dtype: a float16 / bfloat16 v is promoted element by element)."""
    if a is None and b is None:
        out.copy_(v)
        return
    torch.mul(v, a if a is not None else b, out=out)
    if a is not None and b is not None:
        out.mul_(b)


def _pool(x: Tensor, scale: Optional[Tensor], dim: int):
    """mean, max and argmax over `dim` of [N, C, S] x * scale, one pass in C++
    (csrc/cpu/pool_rows.cpp). An empty reduced extent goes to the oracle (and its error)."""
    xr = _rows(x)
    if xr.shape[dim] == 0:
        return None
    return tuple(torch.ops.cbam_fused_cpu.pool_rows(
        xr, scale.contiguous() if scale is not None else None, dim))


def pool_over_s(x: Tensor, scale: Optional[Tensor]):
    return _pool(x, scale, 2)


def pool_over_c(x: Tensor, scale: Optional[Tensor]):
    return _pool(x, scale, 1)


def apply_gates(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]):
    buf, y = _x_sized_buffer(x)
    if buf is None:
        return None
    _product(y, _rows(x), gc[:, :, None] if gc is not None else None,
             gs[:, None, :] if gs is not None else None)
    return _in_dtype(buf, x)


def grad_input(grad: Tensor, gc: Optional[Tensor], gs: Optional[Tensor], da: Optional[Tensor],
               dm: Optional[Tensor], idx_s: Optional[Tensor], du: Optional[Tensor],
               dv: Optional[Tensor], idx_c: Optional[Tensor], arrangement: int):
    """dx = g gc gs + kc (da / S + dm at idx_s) + ks (du / C + dv at idx_c), kc = gs for the
    spatial-first arrangement (else 1), ks = gc for channel-first (else 1): three to five passes
    over an x-sized buffer, the argmax terms a scatter of one element per row."""
    if arrangement not in (0, 1, 2):
        raise RuntimeError(f"grad_input: arrangement must be 0, 1 or 2, got {arrangement}")
    buf, dx = _x_sized_buffer(grad)
    if buf is None:
        return None
    n, c, s = dx.shape
    _product(dx, _rows(grad), gc[:, :, None] if gc is not None else None,
             gs[:, None, :] if gs is not None else None)
    kc = gs if arrangement == 1 else None  # None: 1
    ks = gc if arrangement == 0 else None
    if da is not None:
        if kc is not None:
            dx.addcmul_(kc[:, None, :], (da / s)[:, :, None])
        else:
            dx.add_((da / s)[:, :, None])
    if du is not None:
        if ks is not None:
            dx.addcmul_(ks[:, :, None], (du / c)[:, None, :])
        else:
            dx.add_((du / c)[:, None, :])
    if dx.numel() == 0:  # no element for the argmax terms to land on
        return _in_dtype(buf, grad)
    if dm is not None:  # one element of each (n, c) row
        val = dm if kc is None else dm * kc.gather(1, idx_s)
        dx.scatter_add_(2, idx_s[:, :, None], val[:, :, None])
    if dv is not None:  # one element of each (n, s) column
        val = dv if ks is None else dv * ks.gather(1, idx_c)
        dx.scatter_add_(1, idx_c[:, None, :], val[:, None, :])
    return _in_dtype(buf, grad)


def backward_reduce(grad: Tensor, x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor],
                    need_rc: bool, need_rs: bool):
    """rc = sum_s g x gs, rs = sum_c g x gc: g x into one buffer, rc's product into a second, rs's
    into the first (g x is not needed after it)."""
    gx = _rows(grad).to(oracle.acc_dtype(x.dtype)) * _rows(x)
    rc = rs = gx.new_empty((0,))
    if need_rc:
        rc = (gx if gs is None else gx * gs[:, None, :]).sum(2)
    if need_rs:
        rs = (gx if gc is None else gx.mul_(gc[:, :, None])).sum(1)
    return rc, rs


def _backward_scale(op: str, x: Tensor, d_avg: Optional[Tensor], d_max: Optional[Tensor],
                    argmax: Optional[Tensor], base: Optional[Tensor], gate: Optional[Tensor],
                    pooled: int):
    """The Q2 ops: sum over the other axis of x (d_avg / P + d_max at the argmax), P the extent of
    the `pooled` axis of [N, C, S] (1: the pool over C, 2: over S): one product and its sum (a
    float16 / bfloat16 x promoted element by element), then each row's x at its argmax times
    d_max added to that position's sum."""
    if d_avg is None:
        return None
    oracle.check_store_args(op, x, base, gate, pooled == 2)
    xr = _rows(x)
    summed = 3 - pooled
    out = torch.mul(xr, (d_avg / xr.shape[pooled]).unsqueeze(pooled)).sum(summed)
    if d_max is not None and out.numel() > 0:
        at = xr.gather(pooled, argmax.unsqueeze(pooled)).squeeze(pooled).to(out.dtype)
        out.scatter_add_(1, argmax, at * d_max)
    return oracle._then_base_and_gate(out, base, gate)


def pool_over_c_backward_scale(x: Tensor, d_avg: Optional[Tensor], d_max: Optional[Tensor],
                               argmax: Optional[Tensor], base: Optional[Tensor] = None,
                               gate: Optional[Tensor] = None):
    return _backward_scale("pool_over_c_backward_scale", x, d_avg, d_max, argmax, base, gate, 1)


def pool_over_s_backward_scale(x: Tensor, d_avg: Optional[Tensor], d_max: Optional[Tensor],
                               argmax: Optional[Tensor], base: Optional[Tensor] = None,
                               gate: Optional[Tensor] = None):
    return _backward_scale("pool_over_s_backward_scale", x, d_avg, d_max, argmax, base, gate, 2)


# op name -> its fast math: the op's outputs, or None to take the oracle's math for this call
FAST = {
    "pool_over_s": pool_over_s,
    "pool_over_c": pool_over_c,
    "apply_gates": apply_gates,
    "grad_input": grad_input,
    "backward_reduce": backward_reduce,
    "pool_over_c_backward_scale": pool_over_c_backward_scale,
    "pool_over_s_backward_scale": pool_over_s_backward_scale,
}


def _kernel(name: str):
    fast, slow = FAST.get(name), oracle.ORACLE[name]

    def kernel(*args):
        if sim_op(name) is None and fast is not None:
            out = fast(*args)
            if out is not None:
                return out
        return slow(*args)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = f"The CPU kernel of cbam_fused::{name} (the simulator's while it is active)."
    return kernel


# op name -> the kernel registered for CPU tensors
KERNELS = {name: _kernel(name) for name in oracle.MATH}
