"""Registration of the cbam_fused ops' fake (meta) kernels and their pure-PyTorch kernels.

The schemas come from the C++ library (csrc/ops.cpp, loaded by `import cbam_fused._C`); the CUDA
kernels, when the package was built with CUDA, register themselves from C++
(csrc/register_cuda.cpp). Thin typed wrappers over torch.ops.cbam_fused.* live at the bottom."""
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  defines the schemas
from . import _cpu_fast, _cpu_kernels
from ._cpu_kernels import DTYPE_NAMES, acc_dtype, dtype_name

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

OPS = tuple(_cpu_kernels.ORACLE)  # the x-sized ops
HEAD_OPS = tuple(_cpu_kernels.HEAD_KERNELS)  # the ops on the small pooled maps
ALL_OPS = OPS + HEAD_OPS


def _small(x: Tensor, n_last: int) -> Tensor:
    return x.new_empty((x.shape[0], n_last), dtype=acc_dtype(x.dtype))


def _spatial_numel(x: Tensor):
    s = 1
    for d in x.shape[2:]:
        s = s * d
    return s


def _fake_pool_over_s(x, scale):
    a = _small(x, x.shape[1])
    return a, torch.empty_like(a), a.new_empty(a.shape, dtype=torch.int64)


def _fake_pool_over_s_lp_lse(x, scale):
    a, m, i = _fake_pool_over_s(x, scale)
    return a, m, i, torch.empty_like(a), torch.empty_like(a)


def _fake_pool_over_c(x, scale):
    u = _small(x, _spatial_numel(x))
    return u, torch.empty_like(u), u.new_empty(u.shape, dtype=torch.int64)


def _fake_apply_gates(x, gc, gs):
    return torch.empty_like(x)


def _fake_backward_reduce(grad, x, gc, gs, need_rc, need_rs):
    empty = x.new_empty((0,), dtype=acc_dtype(x.dtype))
    rc = _small(x, x.shape[1]) if need_rc else empty
    rs = _small(x, _spatial_numel(x)) if need_rs else empty.clone()
    return rc, rs


def _fake_pool_over_c_backward_scale(x, d_avg, d_max, argmax, base=None, gate=None):
    _cpu_kernels.check_store_args("pool_over_c_backward_scale", x, base, gate, False)
    return _small(x, x.shape[1])


def _fake_pool_over_s_backward_scale(x, d_avg, d_max, argmax, base=None, gate=None):
    _cpu_kernels.check_store_args("pool_over_s_backward_scale", x, base, gate, True)
    return _small(x, _spatial_numel(x))


def _fake_pool_over_s_backward_scale_lp_lse(x, d_avg, d_max, argmax, scale, d_lp, lp, d_lse, lse,
                                            base=None, gate=None):
    _cpu_kernels.check_store_args("pool_over_s_backward_scale_lp_lse", x, base, gate, True)
    return _small(x, _spatial_numel(x))


def _fake_grad_input(grad, gc, gs, da, dm, idx_s, du, dv, idx_c, arrangement):
    return torch.empty_like(grad)


def _fake_grad_input_lp_lse(grad, x, gc, gs, da, dm, idx_s, du, dv, idx_c, d_lp, lp, d_lse, lse,
                            arrangement):
    return torch.empty_like(grad)


def _fake_spatial_head(avg, max, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, bn_eps, spatial_pools,
                       gate):
    _cpu_kernels.check_spatial_head(avg, max, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv,
                                    spatial_pools)
    n = avg.shape[0]
    smap = avg.new_empty((n, 1 if spatial_pools == "blend" else 2, *avg.shape[2:]))
    gs = avg.new_empty((n, _spatial_numel(avg))) if gate else avg.new_empty((0,))
    return gs, smap, torch.empty_like(avg)


_FAKES = {
    "pool_over_s": _fake_pool_over_s,
    "pool_over_s_lp_lse": _fake_pool_over_s_lp_lse,
    "pool_over_c": _fake_pool_over_c,
    "apply_gates": _fake_apply_gates,
    "backward_reduce": _fake_backward_reduce,
    "pool_over_c_backward_scale": _fake_pool_over_c_backward_scale,
    "pool_over_s_backward_scale": _fake_pool_over_s_backward_scale,
    "pool_over_s_backward_scale_lp_lse": _fake_pool_over_s_backward_scale_lp_lse,
    "grad_input": _fake_grad_input,
    "grad_input_lp_lse": _fake_grad_input_lp_lse,
}


def _fake_spatial_head_backward(grad, gs, smap, zconv, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv,
                                bn_eps, spatial_pools):
    _cpu_kernels.check_spatial_head_backward(grad, gs, smap, zconv, conv_w, conv_b, bn_w, bn_b,
                                             bn_rm, bn_rv, spatial_pools)
    n = smap.shape[0]
    du = smap.new_empty((n, _spatial_numel(smap)))

    def scalar(p):
        return smap.new_empty((1,) if p is not None else (0,))

    return (du, torch.empty_like(du), torch.empty_like(conv_w), scalar(conv_b), scalar(bn_w),
            scalar(bn_b))


def _fake_channel_head(avg, max, lp, lse, w1, b1, w2, b2, pools, act):
    n, c, hid, k = _cpu_kernels.check_channel_head(avg, max, lp, lse, w1, b1, w2, b2, pools, act)
    return avg.new_empty((n, c)), avg.new_empty((k * n, c)), avg.new_empty((k * n, hid))


def _fake_channel_head_backward(dzc, p, h, w1, w2, has_b1, has_b2, pools, act):
    n, c, hid, k = _cpu_kernels.check_channel_head_backward(dzc, p, h, w1, w2, has_b1, has_b2,
                                                            pools, act)
    empty = dzc.new_empty((0,))
    return (dzc.new_empty((k * n, c)), dzc.new_empty((hid, c)),
            dzc.new_empty((hid,)) if has_b1 else empty,
            dzc.new_empty((c, hid)) if w2 is not None else empty.clone(),
            dzc.new_empty((c,)) if has_b2 else empty.clone())


def _fake_batch_norm_gate(zconv, bn_w, bn_b, bn_eps):
    n, s = _cpu_kernels.check_batch_norm_gate(zconv, bn_w, bn_b, bn_eps)
    return (zconv.new_empty((n, s)), zconv.new_empty((1,)), zconv.new_empty((1,)),
            zconv.new_empty((1,)))


def _fake_batch_norm_gate_backward(dgs, gs, zconv, mean, invstd, bn_w, has_b):
    n, s = _cpu_kernels.check_batch_norm_gate_backward(dgs, gs, zconv, mean, invstd, bn_w, has_b)
    return (zconv.new_empty((n, s)), zconv.new_empty((1,) if bn_w is not None else (0,)),
            zconv.new_empty((1,) if has_b else (0,)))


_HEAD_FAKES = {"channel_head": _fake_channel_head,
               "channel_head_backward": _fake_channel_head_backward,
               "spatial_head": _fake_spatial_head,
               "spatial_head_backward": _fake_spatial_head_backward,
               "batch_norm_gate": _fake_batch_norm_gate,
               "batch_norm_gate_backward": _fake_batch_norm_gate_backward}

# op name -> whether the C++ library registered a CUDA kernel for it (filled by _register)
NATIVE_CUDA = {}


def has_cuda_kernel(name: str) -> bool:
    """Whether op `name` runs a hand-written CUDA kernel for CUDA tensors (not the PyTorch one)."""
    return NATIVE_CUDA[name]


def _cuda_fallback(name, fn):
    warned = []

    def run(*args):
        if not warned:
            warned.append(True)
            warnings.warn(f"cbam_fused was built without a CUDA kernel for {name}: CUDA tensors go "
                          f"through the pure-PyTorch kernel (rebuild with a CUDA toolkit for speed)",
                          stacklevel=3)
        return fn(*args)

    return run


_INDEX_ARGS = ("argmax", "idx_s", "idx_c")


def _check_dtypes(op: str, names, args) -> None:
    """The dtype checks of the C++ launchers (csrc/launchers/common.h: like_x, small_arg), for the
    CPU and fake kernels: the x-sized arguments share one dtype, the indices are int64 and every
    other tensor argument is in the accumulation dtype of x. A fake kernel that skipped them would
    let torch.compile trace a graph that only fails once it runs on a GPU."""
    ref = "grad" if op == "grad_input_lp_lse" or "x" not in names else "x"
    x = args[names.index(ref)]
    if not isinstance(x, Tensor) or x.dtype not in DTYPES:
        return  # the kernels' own checks name the problem
    acc = acc_dtype(x.dtype)
    for name, t in zip(names, args):
        if not isinstance(t, Tensor) or name == ref:
            continue
        if name in ("x", "grad"):
            if t.dtype != x.dtype:
                raise RuntimeError(f"{op}: {name} must have the dtype of {ref} "
                                   f"({DTYPE_NAMES[x.dtype]}), got {dtype_name(t.dtype)}")
        elif name in _INDEX_ARGS:
            if t.dtype != torch.int64:
                raise RuntimeError(f"{op}: {name} must have dtype Long, got "
                                   f"{dtype_name(t.dtype)}")
        elif t.dtype != acc:
            raise RuntimeError(f"{op}: {name} must have dtype {DTYPE_NAMES[acc]} (the "
                               f"accumulation dtype of x), got {dtype_name(t.dtype)}")




def _checked(name, fn):
    names = [a.name for a in getattr(torch.ops.cbam_fused, name).default._schema.arguments]

    def run(*args):
        _check_dtypes(name, names, args)
        return fn(*args)

    run.__name__ = fn.__name__
    return run


def _register():
    for name in OPS:
        qual = f"cbam_fused::{name}"
        torch.library.register_fake(qual)(_checked(name, _FAKES[name]))
        torch.library.impl(qual, "CPU")(_checked(name, _cpu_fast.KERNELS[name]))
        NATIVE_CUDA[name] = torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA")
        if not NATIVE_CUDA[name]:
            torch.library.impl(qual, "CUDA")(_cuda_fallback(name, _cpu_kernels.ORACLE[name]))
    for name, kernel in _cpu_kernels.HEAD_KERNELS.items():  # checks of their own
        qual = f"cbam_fused::{name}"
        torch.library.register_fake(qual)(_HEAD_FAKES[name])
        torch.library.impl(qual, "CPU")(kernel)
        NATIVE_CUDA[name] = torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA")
        if not NATIVE_CUDA[name]:
            torch.library.impl(qual, "CUDA")(_cuda_fallback(name, kernel))


_register()

ops = torch.ops.cbam_fused


# Typed wrappers (what functional.py calls).
def pool_over_s(x: Tensor, scale: Optional[Tensor] = None):
    return ops.pool_over_s(x, scale)


def pool_over_s_lp_lse(x: Tensor, scale: Optional[Tensor] = None):
    return ops.pool_over_s_lp_lse(x, scale)


def pool_over_c(x: Tensor, scale: Optional[Tensor] = None):
    return ops.pool_over_c(x, scale)


def apply_gates(x: Tensor, gc: Optional[Tensor], gs: Optional[Tensor]) -> Tensor:
    return ops.apply_gates(x, gc, gs)


def channel_head(avg: Tensor, max: Tensor, lp: Optional[Tensor], lse: Optional[Tensor],
                 w1: Tensor, b1: Optional[Tensor], w2: Optional[Tensor], b2: Optional[Tensor],
                 pools: str, act: str):
    return ops.channel_head(avg, max, lp, lse, w1, b1, w2, b2, pools, act)


def channel_head_backward(dzc: Tensor, p: Tensor, h: Tensor, w1: Tensor, w2: Optional[Tensor],
                          has_b1: bool, has_b2: bool, pools: str, act: str):
    return ops.channel_head_backward(dzc, p, h, w1, w2, has_b1, has_b2, pools, act)


def spatial_head(avg: Tensor, max: Tensor, conv_w: Tensor, conv_b: Optional[Tensor],
                 bn_w: Optional[Tensor], bn_b: Optional[Tensor], bn_rm: Optional[Tensor],
                 bn_rv: Optional[Tensor], bn_eps: float, spatial_pools: str, gate: bool):
    return ops.spatial_head(avg, max, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, bn_eps,
                            spatial_pools, gate)


def spatial_head_backward(grad: Tensor, gs: Optional[Tensor], smap: Tensor,
                          zconv: Optional[Tensor], conv_w: Tensor, conv_b: Optional[Tensor],
                          bn_w: Optional[Tensor], bn_b: Optional[Tensor], bn_rm: Optional[Tensor],
                          bn_rv: Optional[Tensor], bn_eps: float, spatial_pools: str):
    return ops.spatial_head_backward(grad, gs, smap, zconv, conv_w, conv_b, bn_w, bn_b, bn_rm,
                                     bn_rv, bn_eps, spatial_pools)


def batch_norm_gate(zconv: Tensor, bn_w: Optional[Tensor], bn_b: Optional[Tensor],
                    bn_eps: float):
    return ops.batch_norm_gate(zconv, bn_w, bn_b, bn_eps)


def batch_norm_gate_backward(dgs: Tensor, gs: Tensor, zconv: Tensor, mean: Tensor,
                             invstd: Tensor, bn_w: Optional[Tensor], has_b: bool):
    return ops.batch_norm_gate_backward(dgs, gs, zconv, mean, invstd, bn_w, has_b)


def backward_reduce(grad, x, gc, gs, need_rc: bool, need_rs: bool):
    return ops.backward_reduce(grad, x, gc, gs, need_rc, need_rs)


def pool_over_c_backward_scale(x, d_avg, d_max, argmax, base=None, gate=None) -> Tensor:
    return ops.pool_over_c_backward_scale(x, d_avg, d_max, argmax, base, gate)


def pool_over_s_backward_scale(x, d_avg, d_max, argmax, base=None, gate=None) -> Tensor:
    return ops.pool_over_s_backward_scale(x, d_avg, d_max, argmax, base, gate)


def pool_over_s_backward_scale_lp_lse(x, d_avg, d_max, argmax, scale, d_lp, lp, d_lse,
                                      lse, base=None, gate=None) -> Tensor:
    return ops.pool_over_s_backward_scale_lp_lse(x, d_avg, d_max, argmax, scale, d_lp, lp, d_lse,
                                                 lse, base, gate)


def grad_input(grad, gc, gs, da, dm, idx_s, du, dv, idx_c, arrangement: int) -> Tensor:
    return ops.grad_input(grad, gc, gs, da, dm, idx_s, du, dv, idx_c, arrangement)


def grad_input_lp_lse(grad, x, gc, gs, da, dm, idx_s, du, dv, idx_c, d_lp, lp, d_lse, lse,
                      arrangement: int) -> Tensor:
    return ops.grad_input_lp_lse(grad, x, gc, gs, da, dm, idx_s, du, dv, idx_c, d_lp, lp, d_lse,
                                 lse, arrangement)
