"""cbam_fused.CBAM / functional.cbam against the naive reference (cbam_fused.reference) in
float64: every variant, train and eval, NCHW and channels-last, 1-D / 2-D / 3-D, edge shapes.
Forward, every gradient and the BatchNorm running statistics."""
import copy

import pytest
import torch

import cbam_fused
from cbam_fused import functional, reference
from conftest import randomize_, rel_err
from variants import HAS_BN, VARIANTS, make

SHAPES_2D = [(3, 16, 5, 7), (1, 16, 4, 4), (2, 1, 3, 5), (4, 8, 1, 1), (2, 12, 9, 11)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _module(variant, c, dim, dtype):
    m = make(variant, c, dim=dim, hidden=max(1, min(4, c)))
    return randomize_(m).to(dtype)


def _reference_run(m, x, g=None):
    """The reference on module m's parameters (a copy) in x's dtype: y, grads, the copy."""
    mref = copy.deepcopy(m).to(x.dtype)
    xr = x.detach().clone().requires_grad_()
    yr = reference.cbam(xr, **mref.functional_kwargs())
    if g is None:
        return yr, None, mref
    grads = torch.autograd.grad(yr, [xr] + list(mref.parameters()), g.to(x.dtype))
    return yr, grads, mref


def compare_with_reference(m, x, train, tol):
    """Runs m on x and the reference on a float64 copy; checks y, all grads and BN stats.

    Outside float64 the bound is max(tol, 4 x the error of the reference computed in x's dtype)
    (4 tol for the parameters' gradients): a gradient that is a sum with heavy cancellation (C =
    1, say) carries that much error in any float32 implementation, and the fused kernels sum in
    another order than ATen's (the H200 run of 2026-11-28: 1.35e-5 for the BatchNorm weight of
    spatial_first_lp_lse)."""
    m.train(train)
    m_ref32 = copy.deepcopy(m)
    mref = copy.deepcopy(m).double()
    xr = x.detach().double().requires_grad_()
    yr = reference.cbam(xr, **mref.functional_kwargs())
    xf = x.detach().clone().requires_grad_()
    y = m(xf)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, yr) < tol, f"forward: {rel_err(y, yr)}"
    g = torch.randn_like(yr)
    params = [p for p in m.parameters()]
    params_ref = [p for p in mref.parameters()]
    gf = torch.autograd.grad(y, [xf] + params, g.to(y.dtype))
    gr = torch.autograd.grad(yr, [xr] + params_ref, g)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    g_low = None
    if x.dtype != torch.float64:
        _, g_low, _ = _reference_run(m_ref32, x, g)
    for i, (name, a, b) in enumerate(zip(names, gf, gr)):
        # a parameter's gradient is a sum over the batch whose terms cancel (BatchNorm's weight:
        # the normalised map has mean 0), so its floor is 4 tol outside float64
        floor = tol if g_low is None or i == 0 else 4 * tol
        bound = floor if g_low is None else max(floor, 4 * rel_err(g_low[i], b))
        assert rel_err(a, b) < bound, f"grad of {name}: {rel_err(a, b)} (bound {bound})"
    for (name, buf), (_, buf_ref) in zip(m.named_buffers(), mref.named_buffers()):
        if buf.is_floating_point():
            assert rel_err(buf, buf_ref) < tol, f"buffer {name}: {rel_err(buf, buf_ref)}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES_2D, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_2d(variant, shape, train, dtype):
    m = _module(variant, shape[1], 2, dtype)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    compare_with_reference(m, x, train, TOL[dtype])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_channels_last(variant, train):
    m = _module(variant, 12, 2, torch.float64)
    x = torch.randn(3, 12, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    compare_with_reference(m, x, train, TOL[torch.float64])
    m32 = _module(variant, 12, 2, torch.float32)
    compare_with_reference(m32, x.float(), train, TOL[torch.float32])


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_3d"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["official", "spatial_first", "parallel", "ultralytics",
                                     "timm_light", "official_lp_lse"])
def test_variant_3d(variant, train, layout):
    m = _module(variant, 6, 3, torch.float64)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    if layout == "channels_last_3d":
        x = x.to(memory_format=torch.channels_last_3d)
    compare_with_reference(m, x, train, TOL[torch.float64])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["official", "spatial_first", "parallel", "ultralytics",
                                     "timm", "official_lp_lse"])
def test_variant_1d(variant, train):
    m = _module(variant, 8, 1, torch.float64)
    compare_with_reference(m, torch.randn(3, 8, 11, dtype=torch.float64), train, 1e-10)


def test_other_strides_are_copied_once_to_a_supported_layout():
    m = _module("official", 8, 2, torch.float64)
    base = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    x = base[..., ::2]  # non-contiguous in W
    compare_with_reference(m, x, True, 1e-10)
    nhwc_view = torch.randn(2, 5, 6, 8, dtype=torch.float64).permute(0, 3, 1, 2)
    compare_with_reference(m, nhwc_view, False, 1e-10)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_steps_track_running_stats(variant):
    """Several training steps: running statistics and num_batches_tracked follow eager BN."""
    m = _module(variant, 8, 2, torch.float64)
    mref = copy.deepcopy(m)
    for _ in range(3):
        x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
        m(x)
        kw = mref.functional_kwargs()
        reference.cbam(x, **kw)
        if variant in HAS_BN:
            mref.SpatialGate.spatial.bn.num_batches_tracked.add_(1)
    for (name, a), (_, b) in zip(m.named_buffers(), mref.named_buffers()):
        assert torch.equal(a, b) if not a.is_floating_point() else rel_err(a, b) < 1e-12, name


@pytest.mark.parametrize("arrangement", ["channel_first", "parallel"])
def test_bn_momentum_none_is_a_cumulative_average(arrangement):
    """momentum=None: batch i updates the running statistics with factor 1 / i (nn.BatchNorm's
    cumulative average), computed on the device: the same statistics as the reference run with
    those factors as floats."""
    m = randomize_(cbam_fused.CBAM(8, hidden_channels=2, bn_momentum=None,
                                   arrangement=arrangement)).double().train()
    bn = m.SpatialGate.spatial.bn
    bn.num_batches_tracked.zero_()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for i in range(1, 4):
        x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
        kw = dict(m.functional_kwargs(), bn_running_mean=rm, bn_running_var=rv,
                  bn_momentum=1.0 / i)
        yr = reference.cbam(x, **kw)
        assert float(m.SpatialGate._bn_momentum()) == pytest.approx(1.0 / i)
        assert rel_err(m(x), yr) < 1e-12
        assert rel_err(bn.running_mean, rm) < 1e-12 and rel_err(bn.running_var, rv) < 1e-12
    assert int(bn.num_batches_tracked) == 3


def test_return_gates_matches_reference():
    m = _module("official", 8, 2, torch.float64).eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    y, gc, gs = functional.cbam(x, **m.functional_kwargs(), return_gates=True)
    yr, gcr, gsr = reference.cbam(x, **m.functional_kwargs(), return_gates=True)
    assert gc.shape == (2, 8) and gs.shape == (2, 1, 5, 5)
    assert rel_err(gc, gcr) < 1e-12 and rel_err(gs, gsr) < 1e-12 and rel_err(y, yr) < 1e-12
    assert not gc.requires_grad and not gs.requires_grad


def test_empty_batch_returns_empty_output():
    m = cbam_fused.CBAM(8, hidden_channels=2)
    x = torch.randn(0, 8, 4, 4, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 8, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("variant", ["official", "official_lp_lse"])
def test_nan_and_inf_propagate_like_eager(variant):
    m = _module(variant, 8, 2, torch.float64).eval()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    x[0, 3, 1, 2] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    y = m(x)
    yr = reference.cbam(x, **m.functional_kwargs())
    assert torch.isnan(y[0]).any()
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.equal(torch.isinf(y), torch.isinf(yr))
    assert rel_err(y[2], yr[2]) < 1e-10  # the clean sample is untouched


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_eager_direct_path_is_bitwise_the_op(variant, mode):
    """Plain eager calls run the block's composite directly (functional._eager_direct) instead of
    through the cbam_block op that graphs record: outputs, every gradient and the BatchNorm's
    running statistics are bitwise those of the op path, in training, in eval with gradients and
    under no_grad; and the direct path is the one a plain call takes."""
    torch.manual_seed(0)
    base = randomize_(make(variant, 16)).train(mode == "train")
    x = torch.randn(3, 16, 5, 6)
    g = torch.randn(3, 16, 5, 6)
    results = []
    for path in ("never", "auto"):
        m = copy.deepcopy(base)
        xx = x.clone().requires_grad_(mode != "no_grad")
        orig = functional.EAGER_DIRECT
        functional.EAGER_DIRECT = path
        try:
            with torch.set_grad_enabled(mode != "no_grad"):
                assert functional._eager_direct(xx) == (path == "auto")
                y = m(xx)
                grads = [] if mode == "no_grad" else torch.autograd.grad(
                    y, [xx, *m.parameters()], g, allow_unused=True)
        finally:
            functional.EAGER_DIRECT = orig
        results.append((y, grads, [b.clone() for b in m.buffers()]))
    (y0, g0, b0), (y1, g1, b1) = results
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(b0, b1):
        assert torch.equal(a, b)


def test_graphs_and_modes_take_the_op():
    """What records a graph or watches dispatch sees the cbam_block op, never its pieces."""
    from torch.utils._python_dispatch import TorchDispatchMode
    x = torch.randn(2, 8, 3, 3)

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        assert not functional._eager_direct(x)
    assert functional._eager_direct(x)
    traced = torch.jit.trace(cbam_fused.CBAM(8, hidden_channels=2).eval(), x)
    assert "cbam_fused::cbam_block" in str(traced.graph)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpp_kernels_of_the_block_are_bitwise_their_python_twins(variant, dtype, layout):
    """The block ops' C++ kernels (csrc/block_forward.cpp, block_backward.cpp: what real tensors
    run) and the Python composites of their fake kernels (functional._forward,
    _backward_composite) compute the same outputs, bit for bit, in training and in eval, for every
    variant; the backward from a gradient in another layout than x."""
    torch.manual_seed(0)
    m = randomize_(make(variant, 16)).to(dtype)
    x = torch.randn(3, 16, 5, 6, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    for train in (True, False):
        m.train(train)
        kw = m.functional_kwargs()
        kw.pop("bn_momentum", None)
        args = (x, kw.get("mlp_w1"), kw.get("mlp_b1"), kw.get("mlp_w2"), kw.get("mlp_b2"),
                kw.get("conv_w"), kw.get("conv_b"), kw.get("bn_weight"), kw.get("bn_bias"),
                kw.get("bn_running_mean"), kw.get("bn_running_var"))
        cfg = functional._Config(kw.get("pools", "avg+max"), kw.get("act", "relu"),
                                 kw.get("spatial_pools", "max,mean"),
                                 functional.ARRANGEMENTS[kw["arrangement"]],
                                 bool(kw.get("batch_norm", False)),
                                 bool(kw.get("bn_training", False)) or
                                 kw.get("bn_running_mean") is None,
                                 float(kw.get("bn_eps", 1e-5)))
        with torch.no_grad():
            cpp = functional.cbam_block(*args, *cfg)
            py = functional._forward(*args, cfg)
        assert len(cpp) == len(py) == 2 + len(functional._SAVED)
        for name, a, b in zip(("y",) + functional._SAVED + ("var",), cpp, py):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
            assert torch.equal(a, b), (name, train)
        assert cpp[0].stride() == x.stride()
        # the backward: C++ kernel against _backward_composite, from what the forward saved
        saved = list(args)
        if cfg.bn_training:  # as _setup_context saves them: no running statistics
            saved[9] = saved[10] = None
        saved += list(cpp[1:functional._VAR])
        g = torch.randn(x.shape, dtype=dtype).to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            cpp_b = functional.cbam_block_backward(g, *saved, *cfg)
            py_b = functional._backward_composite(g, saved, cfg)
        given = [py_b[0]] + [t for t, prm in zip(py_b[1:], saved[1:9]) if prm is not None]
        assert len(cpp_b) == len(given), (len(cpp_b), len(given))
        for i, (a, b) in enumerate(zip(cpp_b, given)):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (i, train)


def test_compiled_block_under_autocast_keeps_its_heads_in_float32():
    """A compiled graph calls the block op's C++ kernel in the caller's autocast state: the kernel
    turns autocast off itself, so the gates are the float32 ones eager computes."""
    torch._dynamo.reset()
    m = randomize_(cbam_fused.CBAM(16, hidden_channels=4)).eval()
    kw = m.functional_kwargs()

    def gates(x):
        return functional.cbam(x, **kw, return_gates=True)

    x = torch.randn(2, 16, 5, 6, dtype=torch.bfloat16)
    compiled = torch.compile(gates, fullgraph=True, backend="inductor")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, gc, gs = compiled(x)
        y_e, gc_e, gs_e = gates(x)
    assert gc.dtype == gs.dtype == torch.float32
    assert torch.equal(gc, gc_e) and torch.equal(gs, gs_e) and torch.equal(y, y_e)
