"""cbam_fused.functional.cbam: the whole CBAM block as one autograd node.

Forward (channel-first arrangement; DESIGN.md section 1), 4 passes over x-sized tensors:
    a, m, is = pool_over_s(x)                  read x
    gc = channel_head(a, m)                    [N, C], one op (MLP, sum over the pools, sigmoid)
    u, v, ic = pool_over_c(x, gc)              read x
    gs = spatial_head(u, v)                    [N, S], one op (map, conv, BatchNorm, sigmoid;
                                                 with batch statistics, batch_norm_gate after it)
    y = apply_gates(x, gc, gs)                 read x, write y
Backward, 5 passes:
    rc, rs = backward_reduce(g, x, gc, gs)     read g and x      (Q1)
    du, dv = spatial_head_backward(rs, gs)     [N, S], one op (and the conv / BN gradients;
                                                 batch_norm_gate_backward before it)
    dzc = pool_over_c_backward_scale(x, du, dv, ic, rc, gc)     read x  (Q2; its store adds
                                                 rc and takes the sigmoid's backward)
    da, dm = channel_head_backward(dzc)        [N, C], one op (and the MLP's gradients)
    dx = grad_input(g, gc, gs, da, dm, is, du, dv, ic)  read g, write dx  (Q3)
Spatial-first swaps the roles of the two gates (the channel gate pools x * gs); parallel computes
both gates from plain x (no Q2). Saved for backward: x, plus [N, C] / [N, S] tensors and argmax
indices. Every piece is a custom op with a fake kernel (the heads' CPU kernels are their
closed forms in _heads.py) or an ATen op, so the whole block traces under
torch.compile(fullgraph=True). The forward composite is the op's C++ kernel
(csrc/block_forward.cpp: one call from Python instead of a dozen) and, for fake tensors, _forward
below; the backward likewise: csrc/block_backward.cpp and _backward_composite.
With the official code's lp / lse pools in `pools`, pool_over_s_lp_lse computes them in the same
pass as avg and max (lp = sqrt(sum_s x^2), lse = log sum_s exp x), and Q3 is grad_input_lp_lse,
which also reads x for their gradients (dl x / lp + de exp(x - lse)): 6 backward passes
(spatial first: Q2 is pool_over_s_backward_scale_lp_lse, with those terms too).
"""
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _heads, _ops
from ._cpu_kernels import acc_dtype

ARRANGEMENTS = {"channel_first": 0, "spatial_first": 1, "parallel": 2}
# pools: distinct names of _heads.CHANNEL_POOLS joined by '+' (their MLP outputs summed in that
# order), or 'blend'; the common ones:
POOLS = ("avg", "max", "avg+max", "blend", "avg+max+lp+lse")
SPATIAL_POOLS = ("max,mean", "mean,max", "blend")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Config(NamedTuple):
    pools: str
    act: str
    spatial_pools: str
    arrangement: int
    batch_norm: bool
    bn_training: bool
    bn_eps: float


# (_cast and _back skip the no-op .to / .reshape calls: about 2 us of host time each, tens of
# them per training step)
def _cast(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _back(g: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    """A gradient computed in the accumulation dtype, in the parameter's dtype and shape."""
    if g is None or like is None:
        return None
    if g.dtype != like.dtype:
        g = g.to(like.dtype)
    return g if g.shape == like.shape else g.reshape(like.shape)


def _sigmoid_grad(dg: Tensor, g: Tensor) -> Tensor:
    """dg g (1 - g), g = sigmoid(z): ATen's fused kernel (one launch instead of three)."""
    return torch.ops.aten.sigmoid_backward(dg, g)


def _none_if_empty(t: Tensor) -> Optional[Tensor]:
    return t if t.numel() else None


def _linear_form(w: Tensor) -> Tensor:
    """A Linear ([out, in]) or 1x1-conv ([out, in, 1, ...]) weight as [out, in]."""
    return w if w.dim() == 2 else w.reshape(w.shape[0], w.shape[1])


def _acc_params(x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv):
    """The heads' parameters in the accumulation dtype, MLP weights in Linear form."""
    acc = acc_dtype(x.dtype)
    return (None if w1 is None else _linear_form(_cast(w1, acc)),
            _cast(b1, acc),
            None if w2 is None else _linear_form(_cast(w2, acc)),
            _cast(b2, acc), _cast(conv_w, acc), _cast(conv_b, acc), _cast(bn_w, acc),
            _cast(bn_b, acc), _cast(bn_rm, acc), _cast(bn_rv, acc))


# What the forward hands to the backward besides x and the parameters: [N, C], [N, S] and
# spatial-map-sized tensors and argmax indices; an empty tensor stands for "absent".
_SAVED = ("gc", "gs", "idx_s", "idx_c", "p", "h", "smap", "zconv", "mean", "invstd")
# (p, the stacked MLP inputs, holds the lp / lse pools the backward needs: no slots of their own)
# The block's outputs are [y, *_SAVED, var]: var, the unbiased batch variance of zconv (training
# mode with batch statistics; empty otherwise), updates the BatchNorm's running variance.
_VAR = 1 + len(_SAVED)


def _forward(x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, cfg: _Config):
    """The forward composite: [y, *_SAVED, var], as the op's fake kernel (every piece is a custom op
    with a fake kernel, or an ATen op). Real tensors run its C++ twin, csrc/block_forward.cpp."""
    n = x.shape[0]
    sp = tuple(x.shape[2:])
    pw1, pb1, pw2, pb2, pcw, pcb, pbw, pbb, prm, prv = _acc_params(
        x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv)
    channel, spatial = w1 is not None, conv_w is not None

    def channel_gate(scale):
        lp = lse = None
        if _needs_lp_lse(cfg.pools):  # the same pass, two more pools
            a, m, idx_s, lp, lse = _ops.pool_over_s_lp_lse(x, scale)
        else:
            a, m, idx_s = _ops.pool_over_s(x, scale)
        gc, p, h = _ops.channel_head(a, m, lp, lse, pw1, pb1, pw2, pb2, cfg.pools, cfg.act)
        return gc, idx_s, p, h

    def spatial_gate(scale):  # the head in one op; BatchNorm with batch statistics after it
        u, v, idx_c = _ops.pool_over_c(x, scale)
        u, v = u.reshape(n, 1, *sp), v.reshape(n, 1, *sp)
        bn_eval = cfg.batch_norm and not cfg.bn_training
        bn_batch = cfg.batch_norm and cfg.bn_training
        ev = (pbw, pbb, prm, prv) if bn_eval else (None,) * 4
        gs, smap, zconv = _ops.spatial_head(u, v, pcw, pcb, *ev, cfg.bn_eps, cfg.spatial_pools,
                                            not bn_batch)
        mean = invstd = var = None
        if bn_eval:  # what native_batch_norm returns in eval mode: no batch statistics
            mean, invstd = u.new_empty((0,)), u.new_empty((0,))
        if bn_batch:
            if zconv.numel() <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got "
                                 f"input size {list(zconv.shape)} (the spatial map's BatchNorm)")
            gs, mean, invstd, var = _ops.batch_norm_gate(zconv, pbw, pbb, cfg.bn_eps)
        return gs, idx_c, smap, zconv, mean, invstd, var

    no_ch, no_sp = (None,) * 4, (None,) * 7
    if cfg.arrangement == 0:  # channel first: the spatial gate pools x * gc
        ch = channel_gate(None) if channel else no_ch
        spg = spatial_gate(ch[0]) if spatial else no_sp
    elif cfg.arrangement == 1:  # spatial first: the channel gate pools x * gs
        spg = spatial_gate(None) if spatial else no_sp
        ch = channel_gate(spg[0]) if channel else no_ch
    else:  # parallel: both gates pool plain x
        ch = channel_gate(None) if channel else no_ch
        spg = spatial_gate(None) if spatial else no_sp
    gc, idx_s, p, h = ch
    gs, idx_c, smap, zconv, mean, invstd, var = spg
    y = _ops.apply_gates(x, gc, gs)
    acc = acc_dtype(x.dtype)
    saved = [gc, gs, idx_s, idx_c, p, h, smap, zconv, mean, invstd, var]
    return [y] + [x.new_empty((0,), dtype=acc) if t is None else t for t in saved]


# The block op, cbam_fused::cbam_block: schema and kernel (the forward composite, for every
# device) in C++, csrc/block_forward.cpp; its fake kernel and its autograd here. Registered with
# torch.library's lower-level API rather than @custom_op: custom_op's generic autograd wrapper
# (argument defaults rebuilt from the schema, pytree flattening of the list output) costs about
# 0.2 ms of host time per training forward; the hand-written Autograd kernel below does the same
# job directly.
_lib = torch.library.Library("cbam_fused", "FRAGMENT")


def _cbam_block_fake(x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, pools, act,
                     spatial_pools, arrangement, batch_norm, bn_training, bn_eps):
    """The op's fake kernel: the forward composite in Python (_forward), which handles symbolic
    shapes; the C++ kernel computes the same (tests: bitwise on real tensors)."""
    cfg = _Config(pools, act, spatial_pools, arrangement, batch_norm, bn_training, bn_eps)
    return [t.clone() for t in
            _forward(x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv, cfg)]


torch.library.register_fake("cbam_fused::cbam_block", _cbam_block_fake, lib=_lib)
cbam_block = torch.ops.cbam_fused.cbam_block.default
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset


class _CbamBlockFunction(torch.autograd.Function):
    """The op's autograd node: forward = the op below autograd, backward = _backward. The saved
    outputs (gates, indices, head intermediates) are not differentiable."""

    @staticmethod
    def forward(ctx, keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            if keyset is None:  # eager, from cbam() directly (_eager_direct): the C++ kernel
                out = cbam_block(*args)
            else:
                out = cbam_block.redispatch(keyset & _BELOW_AUTOGRAD, *args)
        _setup_context(ctx, args, out)
        ctx.mark_non_differentiable(*out[1:])
        # their gradients stay None: no zero-filled tensors (ten allocations and launches a
        # step); the backward reads only the gradient of y, which always exists when it runs
        ctx.set_materialize_grads(False)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(_backward(ctx, grads))


def _cbam_block_autograd(keyset, *args):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return list(_CbamBlockFunction.apply(keyset, *args))
    with torch._C._AutoDispatchBelowAutograd():
        return cbam_block.redispatch(keyset & _BELOW_AUTOGRAD, *args)


_lib.impl("cbam_block", _cbam_block_autograd, "Autograd", with_keyset=True)

# Eager calls skip the op: "auto" runs the composite directly in plain eager execution (see
# _eager_direct), "never" always goes through the op, "always" skips it whenever the input is a
# plain tensor (tests: under a counting dispatch mode).
EAGER_DIRECT = "auto"


def _eager_direct(x: Tensor) -> bool:
    """Whether cbam() may run the block's composite itself instead of calling the cbam_block op.
    The op is what graphs record (torch.compile, export, make_fx, torch.jit.trace, opcheck); in
    plain eager execution it adds two trips through the dispatcher with 18 boxed arguments, a
    Python kernel each, and copies of the outputs that alias (an op's contract): about 50 us of
    host time a call, on a GPU whose small CBAM sites are bound by host time (the H200 run of
    2026-11-26). The same kernels run either way, so the results are bitwise equal."""
    if EAGER_DIRECT == "never" or torch.compiler.is_compiling() or type(x) is not Tensor \
            or torch.jit.is_tracing():
        return False
    return EAGER_DIRECT == "always" or not (
        torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active())


# Parameters cast to the accumulation dtype (a bfloat16 module's weights to float32), for calls
# that record no autograd graph: ten casts, each a launch, saved on every inference call. An entry
# holds while the parameter's version counter and storage are unchanged (an optimizer step or a
# load_state_dict bumps the version), and dies with the parameter.
_CAST_CACHE = WeakIdKeyDictionary()


def _cast_cached(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    if t is None or t.dtype == dtype:
        return t
    if t.is_inference() or type(t) not in (Tensor, torch.nn.Parameter) or (
            t.is_cuda and torch.cuda.is_current_stream_capturing()):
        # no version counter (inference tensors), a subclass, or a CUDA graph being captured
        # (a cast made there holds its values only once the graph replays)
        return t.to(dtype)
    key = (t._version, t.data_ptr(), dtype)
    hit = _CAST_CACHE.get(t)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = t.to(dtype)
    _CAST_CACHE[t] = (key, out)
    return out


def _run_direct(args):
    """The block's outputs [y, *_SAVED, var] from its C++ kernel, past the op's Python autograd
    kernel (_eager_direct)."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args[:11]):
        return list(_CbamBlockFunction.apply(None, *args))
    acc = acc_dtype(args[0].dtype)
    params = [_cast_cached(t, acc) for t in args[1:11]]
    with torch._C._AutoDispatchBelowAutograd():
        return cbam_block(args[0], *params, *args[11:])


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv = inputs[:11]
    ctx.cfg = _Config(*inputs[11:])
    ctx.device_type = x.device.type
    if ctx.cfg.bn_training:  # BN's backward uses the batch statistics (mean, invstd); the
        bn_rm = bn_rv = None  # running ones are updated in place after the op returns
    ctx.save_for_backward(x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv,
                          *output[1:_VAR])


def _backward(ctx, grads):
    """The block's backward: its op, cbam_block_backward (C++ kernel; fake kernel
    _backward_composite). Once-differentiable: a double backward raises (torch's
    @once_differentiable mechanism). Grad mode is on in a backward only under create_graph=True:
    then every gradient carries an error node, so differentiating it again raises a clear error
    (whether or not the incoming gradient itself requires grad)."""
    g = grads[0]
    if g is None:  # no gradient reached y (grads are not materialised): none for the inputs
        return (None,) * 18
    # autocast off as in the forward (the C++ kernel turns it off itself; the fake kernel, traced
    # by torch.compile inside the caller's autocast region, needs it)
    saved = ctx.saved_tensors
    with torch.no_grad(), torch.autocast(ctx.device_type, enabled=False):
        out = cbam_block_backward(g, *saved, *ctx.cfg)
    grads = iter(out[1:])  # one per parameter given (w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b)
    out = (out[0], *[None if t is None else next(grads) for t in saved[1:9]], None, None) \
        + (None,) * 7
    if not torch.is_grad_enabled():
        return out
    err = torch._C._functions.DelayedError(
        b"cbam_fused: the CBAM backward is once-differentiable (no double backward)", 1)
    return tuple(None if t is None else err(t.detach().requires_grad_()) for t in out)


def _cbam_block_backward_fake(grad, x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv,
                              *rest):
    """cbam_block_backward's fake kernel: _backward_composite, [dx, then the gradient of each
    parameter given]."""
    saved, cfg = rest[:len(_SAVED)], _Config(*rest[len(_SAVED):])
    params = (w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b)
    out = _backward_composite(grad, (x, *params, bn_rm, bn_rv) + tuple(saved), cfg)
    return [out[0].clone()] + [t.clone() for t, p in zip(out[1:], params) if p is not None]


torch.library.register_fake("cbam_fused::cbam_block_backward", _cbam_block_backward_fake,
                            lib=_lib)
cbam_block_backward = torch.ops.cbam_fused.cbam_block_backward.default


def _backward_composite(g, saved, cfg):
    """The backward in closed form, in Python: Q1, the heads' backward, Q2, Q3 (see the module
    docstring); [dx, dw1, db1, dw2, db2, dconv_w, dconv_b, dbn_w, dbn_b] (None for a parameter
    not given). The fake kernel of cbam_block_backward, whose C++ kernel (block_backward.cpp)
    computes the same."""
    x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv = saved[:11]
    gc, gs, idx_s, idx_c, p, h, smap, zconv, mean, invstd = \
        [_none_if_empty(t) for t in saved[11:]]
    n = x.shape[0]
    pw1, pb1, pw2, pb2, pcw, pcb, pbw, pbb, prm, prv = _acc_params(
        x, w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b, bn_rm, bn_rv)
    channel, spatial = gc is not None, gs is not None
    if not _same_layout(g, x):  # e.g. a contiguous g for a channels-last x
        g = g.contiguous(memory_format=_memory_format(x))

    rc, rs = _ops.backward_reduce(g, x, gc, gs, channel, spatial)  # Q1
    dpool = {}  # the gradients of the channel gate's pools over S, by name
    lp_lse = channel and _needs_lp_lse(cfg.pools)
    pooled = _heads.pools_in(p, cfg.pools, n) if lp_lse else {}  # the lp / lse pools, by name
    du = dv = None
    dw1 = db1 = dw2 = db2 = dcw = dcb = dbw = dbb = None

    def channel_back(dzc):  # dzc: d of the channel gate's logits; the head's backward in one op
        dp, dw1_, db1_, dw2_, db2_ = _ops.channel_head_backward(
            dzc, p, h, pw1, pw2, pb1 is not None, pb2 is not None, cfg.pools, cfg.act)
        return (_heads.pool_grads(dp, cfg.pools, n), dw1_, db1_ if pb1 is not None else None,
                dw2_ if pw2 is not None else None, db2_ if pb2 is not None else None)

    def spatial_back(dgs):  # the head's backward in one op; BatchNorm's batch statistics first
        if cfg.batch_norm and cfg.bn_training:
            dzconv, dbw_, dbb_ = _ops.batch_norm_gate_backward(dgs, gs, zconv, mean, invstd, pbw,
                                                               pbb is not None)
            du_, dv_, dcw_, dcb_, _, _ = _ops.spatial_head_backward(
                dzconv, None, smap, None, pcw, pcb, None, None, None, None, cfg.bn_eps,
                cfg.spatial_pools)
            return du_, dv_, dcw_, *[_none_if_empty(t) for t in (dcb_, dbw_, dbb_)]
        ev = (pbw, pbb, prm, prv) if cfg.batch_norm else (None,) * 4
        du_, dv_, dcw_, dcb_, dbw_, dbb_ = _ops.spatial_head_backward(
            dgs, gs, smap, zconv if cfg.batch_norm else None, pcw, pcb, *ev, cfg.bn_eps,
            cfg.spatial_pools)
        return du_, dv_, dcw_, *[_none_if_empty(t) for t in (dcb_, dbw_, dbb_)]

    if cfg.arrangement == 0:  # channel first: the spatial gate pooled x * gc
        if spatial:
            du, dv, dcw, dcb, dbw, dbb = spatial_back(rs)
        if channel:  # Q2, its store adding rc and taking the sigmoid's backward
            dzc = (_ops.pool_over_c_backward_scale(x, du, dv, idx_c, rc, gc) if spatial
                   else _sigmoid_grad(rc, gc))
            dpool, dw1, db1, dw2, db2 = channel_back(dzc)
    elif cfg.arrangement == 1:  # spatial first: the channel gate pooled x * gs
        if channel:
            dpool, dw1, db1, dw2, db2 = channel_back(_sigmoid_grad(rc, gc))
        if spatial:
            dgs = rs
            if channel:  # Q2, its store adding rs
                q2 = (x, dpool.get("avg"), dpool.get("max"), idx_s)
                dgs = (_ops.pool_over_s_backward_scale_lp_lse(
                    *q2, gs, dpool.get("lp"), pooled.get("lp"), dpool.get("lse"),
                    pooled.get("lse"), rs) if lp_lse
                    else _ops.pool_over_s_backward_scale(*q2, rs))
            du, dv, dcw, dcb, dbw, dbb = spatial_back(dgs)
    else:  # parallel: both gates pooled plain x, no Q2
        if channel:
            dpool, dw1, db1, dw2, db2 = channel_back(_sigmoid_grad(rc, gc))
        if spatial:
            du, dv, dcw, dcb, dbw, dbb = spatial_back(rs)

    dm = dpool.get("max")
    q3 = (gc, gs, dpool.get("avg"), dm, idx_s if dm is not None else None, du, dv,
          idx_c if dv is not None else None)
    if lp_lse:  # Q3, also reading x for the lp / lse pools' gradients
        dx = _ops.grad_input_lp_lse(g, x, *q3, dpool.get("lp"), pooled.get("lp"),
                                    dpool.get("lse"), pooled.get("lse"), cfg.arrangement)
    else:  # Q3
        dx = _ops.grad_input(g, *q3, cfg.arrangement)
    return [dx] + [_back(gr, like) for gr, like in zip(
        (dw1, db1, dw2, db2, dcw, dcb, dbw, dbb), (w1, b1, w2, b2, conv_w, conv_b, bn_w, bn_b))]


def _memory_format(x: Tensor):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not \
            x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not \
            x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _nearest_format(x: Tensor):
    """channels-last when x's channel stride is the smallest (e.g. a permuted NHWC view)."""
    if x.dim() in (4, 5) and x.stride(1) == min(x.stride()):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.stride() == b.stride()


def _needs_lp_lse(pools: str) -> bool:
    return "lp" in _heads.pool_kinds(pools) or "lse" in _heads.pool_kinds(pools)


def _check_pools(pools) -> None:
    kinds = pools.split("+") if isinstance(pools, str) else []
    if pools == "blend" or (kinds and len(set(kinds)) == len(kinds)
                            and all(k in _heads.CHANNEL_POOLS for k in kinds)):
        return
    raise ValueError(f"pools: expected 'blend' or distinct names of {_heads.CHANNEL_POOLS} joined "
                     f"by '+' (e.g. {', '.join(repr(p) for p in POOLS if p != 'blend')}), got "
                     f"{pools!r}")


def _check_param(name, t, x, shape=None):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor or None, got {type(t).__name__}")
    if t.device != x.device:
        raise RuntimeError(f"{name}: expected a tensor on {x.device} (the device of x), "
                           f"got one on {t.device}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _validate(x, mlp_w1, mlp_b1, mlp_w2, mlp_b2, conv_w, conv_b, bn_weight, bn_bias,
              bn_running_mean, bn_running_var, pools, act, spatial_pools, arrangement,
              batch_norm):
    """cbam's argument checks: raises with the argument's name and what was expected."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"x: expected a [N, C, *spatial] tensor with 1 to 3 spatial dims "
                         f"(rank 3 to 5), got rank {x.dim()} with shape {tuple(x.shape)}")
    if any(d == 0 for d in x.shape[1:]):
        raise ValueError(f"x: expected non-empty channel and spatial dims, got shape "
                         f"{tuple(x.shape)}")
    _check_pools(pools)
    if spatial_pools not in SPATIAL_POOLS:
        raise ValueError(f"spatial_pools: expected one of {SPATIAL_POOLS}, got {spatial_pools!r}")
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"arrangement: expected one of {tuple(ARRANGEMENTS)}, got {arrangement!r}")
    if act not in _heads.ACTIVATIONS:
        raise ValueError(f"act: expected one of {_heads.ACTIVATIONS}, got {act!r}")
    c = x.shape[1]
    if mlp_w1 is None and conv_w is None:
        raise ValueError("mlp_w1 and conv_w: at least one gate is needed (both are None)")
    if mlp_w1 is not None:
        _check_param("mlp_w1", mlp_w1, x)
        if mlp_w1.dim() < 2 or any(d != 1 for d in mlp_w1.shape[2:]):
            raise ValueError(f"mlp_w1: expected [hidden, C] or [hidden, C, 1, ...], got "
                             f"{tuple(mlp_w1.shape)}")
        if mlp_w1.shape[1] != c:
            raise ValueError(f"mlp_w1: expects {mlp_w1.shape[1]} input channels but x has C={c}")
        hidden = mlp_w1.shape[0]
        _check_param("mlp_b1", mlp_b1, x, (hidden,))
        if mlp_w2 is None:
            if hidden != c:
                raise ValueError(f"mlp_w1: without mlp_w2 the single layer must map C -> C, got "
                                 f"{tuple(mlp_w1.shape)} for C={c}")
            if mlp_b2 is not None:
                raise ValueError("mlp_b2: given without mlp_w2")
        else:
            _check_param("mlp_w2", mlp_w2, x)
            if tuple(mlp_w2.shape[:2]) != (c, hidden) or any(d != 1 for d in mlp_w2.shape[2:]):
                raise ValueError(f"mlp_w2: expected [C, hidden] = [{c}, {hidden}] (or 1x1-conv "
                                 f"form), got {tuple(mlp_w2.shape)}")
            _check_param("mlp_b2", mlp_b2, x, (c,))
    elif any(t is not None for t in (mlp_b1, mlp_w2, mlp_b2)):
        raise ValueError("mlp_b1 / mlp_w2 / mlp_b2: given without mlp_w1")
    if conv_w is not None:
        _check_param("conv_w", conv_w, x)
        nd = x.dim() - 2
        cin = 1 if spatial_pools == "blend" else 2
        if conv_w.dim() != nd + 2 or conv_w.shape[0] != 1 or conv_w.shape[1] != cin:
            raise ValueError(f"conv_w: expected [1, {cin}, k{', k' * (nd - 1)}] for a "
                             f"{nd}-d input with spatial_pools={spatial_pools!r}, got "
                             f"{tuple(conv_w.shape)}")
        k = conv_w.shape[2]
        if any(d != k for d in conv_w.shape[2:]) or k % 2 == 0:
            raise ValueError(f"conv_w: expected an odd, square kernel size, got "
                             f"{tuple(conv_w.shape[2:])}")
        _check_param("conv_b", conv_b, x, (1,))
        for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                        ("bn_running_mean", bn_running_mean),
                        ("bn_running_var", bn_running_var)):
            _check_param(name, t, x, (1,))
            if t is not None and not batch_norm:
                raise ValueError(f"{name}: given but batch_norm=False")
        if (bn_running_mean is None) != (bn_running_var is None):
            raise ValueError("bn_running_mean and bn_running_var: give both or neither")
    elif conv_b is not None or batch_norm:
        raise ValueError("conv_b / batch_norm: given without conv_w")


# The signatures of argument sets cbam has validated: the checks depend only on what a key holds
# (types, dtypes, devices, shapes but the batch, the options), so a repeated call skips them
# (about 5 us a call on a slow CPU). Not used while torch.compile traces, nor for
# arguments that are not tensors (their errors come from _validate).
_VALIDATED = set()
_VALIDATED_MAX = 1024


def _validation_key(x, tensors, options):
    if torch.compiler.is_compiling() or type(x) is not Tensor:
        return None
    sig = []
    for t in tensors:
        if t is None:
            sig.append(None)
        elif isinstance(t, Tensor):
            sig.append((type(t), t.dtype, t.device, t.shape))
        else:
            return None
    try:
        return (x.dtype, x.device, x.shape[1:], options, tuple(sig))
    except TypeError:  # an unhashable option: validated each time (and refused there)
        return None


def cbam(x: Tensor,
         mlp_w1: Optional[Tensor] = None, mlp_b1: Optional[Tensor] = None,
         mlp_w2: Optional[Tensor] = None, mlp_b2: Optional[Tensor] = None,
         conv_w: Optional[Tensor] = None, conv_b: Optional[Tensor] = None,
         bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
         bn_running_mean: Optional[Tensor] = None, bn_running_var: Optional[Tensor] = None,
         *, pools: str = "avg+max", act: str = "relu", spatial_pools: str = "max,mean",
         arrangement: str = "channel_first", batch_norm: bool = False, bn_training: bool = False,
         bn_momentum: Union[float, Tensor] = 0.1, bn_eps: float = 1e-5,
         return_gates: bool = False):
    """CBAM on x of shape [N, C, *spatial] (1, 2 or 3 spatial dims, any of NCHW / channels-last).

    Channel gate (present when mlp_w1 is given): gc = sigmoid(sum over `pools` of MLP(pool)),
    MLP = mlp_w2 act(mlp_w1 p + mlp_b1) + mlp_b2, or mlp_w1 p + mlp_b1 when mlp_w2 is None.
    Weights in Linear ([out, in]) or 1x1-conv ([out, in, 1, ...]) form; biases may be None.
    pools: the pools over S whose MLP outputs are summed, joined by '+' in summation order: 'avg',
    'max', and the official code's 'lp' (sqrt(sum x^2), F.lp_pool2d with norm 2) and 'lse'
    (log sum exp x, its logsumexp_2d), e.g. 'avg+max' (the default) or 'avg+max+lp+lse'; or
    'blend' (MLP of 0.5 (avg + max)).
    Spatial gate (present when conv_w is given): gs = sigmoid(BN(conv(map))), map stacked from the
    pools over C in `spatial_pools` order ('max,mean' official, 'mean,max' timm / ultralytics,
    'blend' = 0.5 (mean + max), one channel); conv_w is [1, 2 or 1, k, ...] with odd k, padding
    k // 2. batch_norm: apply BatchNorm(1) to the conv output (weight / bias / running statistics
    may be None); in training (bn_training) it uses batch statistics and updates the running ones
    in place with bn_momentum, as F.batch_norm does (bn_momentum may be a 0-d tensor, e.g. the
    cumulative-average factor 1 / num_batches_tracked, read on the device without a host sync).
    arrangement: 'channel_first' (paper), 'spatial_first' or 'parallel'.
    Returns y, or (y, gc [N, C], gs [N, 1, *spatial]) with return_gates (gates detached, None for a
    gate not present)."""
    # ------------------------------------------------------------------ validation
    tensors = (mlp_w1, mlp_b1, mlp_w2, mlp_b2, conv_w, conv_b, bn_weight, bn_bias,
               bn_running_mean, bn_running_var)
    options = (pools, act, spatial_pools, arrangement, bool(batch_norm))
    key = _validation_key(x, tensors, options)
    if key is None or key not in _VALIDATED:
        _validate(x, *tensors, *options)
        if key is not None:
            if len(_VALIDATED) >= _VALIDATED_MAX:
                _VALIDATED.clear()
            _VALIDATED.add(key)
    bn_train = bool(bn_training) or bn_running_mean is None
    if x.shape[0] == 0:  # empty batch: empty output, nothing to normalise or update
        y = x.clone()
        return (y, None, None) if return_gates else y
    # NCHW-contiguous and channels-last are native; other strides: one copy to the nearest
    xin = x if (x.is_contiguous() or _memory_format(x) is not torch.contiguous_format) \
        else x.contiguous(memory_format=_nearest_format(x))
    args = (xin, mlp_w1, mlp_b1, mlp_w2, mlp_b2, conv_w, conv_b, bn_weight, bn_bias,
            bn_running_mean, bn_running_var, pools, act, spatial_pools,
            ARRANGEMENTS[arrangement], bool(batch_norm), bn_train, float(bn_eps))
    if _eager_direct(xin):  # (the C++ kernel runs the heads with autocast off itself)
        out = _run_direct(args)
    else:
        with torch.autocast(x.device.type, enabled=False):  # heads run in the accumulation dtype
            out = cbam_block(*args)
    y = out[0]
    if batch_norm and bn_running_mean is not None and bn_training:
        with torch.no_grad():
            mean, var = out[1 + _SAVED.index("mean")], out[_VAR]  # batch_norm_gate's
            # running += m (batch - running) for both buffers in one op (one launch on a GPU,
            # where mul_ and add_ on each made four)
            running = [bn_running_mean, bn_running_var]
            batch = [mean.to(bn_running_mean.dtype), var.to(bn_running_var.dtype)]
            if isinstance(bn_momentum, Tensor):
                torch._foreach_lerp_(running, batch, [bn_momentum.to(r.dtype) for r in running])
            else:
                torch._foreach_lerp_(running, batch, float(bn_momentum))
    if return_gates:
        gc, gs = (_none_if_empty(out[1 + _SAVED.index(k)].detach()) for k in ("gc", "gs"))
        return y, gc, None if gs is None else gs.reshape(x.shape[0], 1, *x.shape[2:])
    return y


def _cumulative_momentum(count: Tensor) -> Tensor:
    """nn.BatchNorm's cumulative-average factor 1 / count (momentum=None) for the batch numbered
    `count`, as a 0-d float64 tensor on the counter's device: no host synchronisation."""
    return torch.reciprocal(count.to(torch.float64))


def _count_bn_batch(x: Tensor, num_batches_tracked: Tensor,
                    momentum: Optional[float]) -> Union[float, Tensor]:
    """Counts one training batch of the spatial gate's BatchNorm, as nn.BatchNorm's forward does,
    and returns the running-statistics factor of this batch: `momentum`, or the cumulative
    average 1 / count when momentum is None, as a 0-d float64 tensor on the counter's device (no
    host synchronisation, unlike nn.BatchNorm's float(count): the step stays capturable in a CUDA
    graph and exportable). x is not used: it ties the call to the block's input,
    so that torch.fx records it as a node of the graph (a leaf, see below) that runs on every call
    instead of once while tracing."""
    num_batches_tracked.add_(1)
    return _cumulative_momentum(num_batches_tracked) if momentum is None else float(momentum)


# torch.fx.symbolic_trace: cbam and _count_bn_batch are leaves (one call_function node each, with
# the block's parameters and buffers as get_attr inputs); tracing into them would meet the
# validation's Python control flow on tensor properties. The count has a side effect, so dead-code
# elimination keeps it. torch.compile is not affected by either.
torch.fx.wrap("cbam")
torch.fx.wrap("_count_bn_batch")
torch.fx.node.has_side_effect(_count_bn_batch)
