"""cbam_fused::channel_head_backward, the channel gate's head backward as one op
(csrc/kernels/channel_head_backward.cuh): from the gradient of the gate's logits, the gradient of
the stacked pools and of the MLP's (or the single layer's) weights and biases.

Its CPU kernel (the ATen ops the block ran before) against float64 autograd through the forward's
definitions; its CUDA kernels through the SIMT simulator against the CPU kernel, with poisoned
outputs, on every pool list, every activation, one and two layers, with and without biases,
shapes around the 32-wide tiles and the split of the c axis, every launch shape and fiber
schedule; NaN propagation; its checks, word for word on every kernel; opcheck; and its place in
the block's backward (one op, no ATen mm).
"""
import pytest
import torch

from cbam_fused import _cpu_kernels as cpu
from cbam_fused import _ops

from conftest import needs_cuda, sim_has
from test_spatial_head import run_sim as run_head_sim
from test_channel_head import (ACTS, GPU_SHAPES, SHAPES, TILE_CHUNK_SPLITS, TILE_NORMAL,
                               TILE_ONE_SPLIT, VARIANTS, _set, assert_matches, assert_no_race,
                               make_args, run_cuda)

testing = pytest.importorskip("cbam_fused.testing")
needs_sim = pytest.mark.skipif(not sim_has("channel_head_backward"),
                               reason="the simulator build (cbam_fused._sim) is missing")


def make_bwd_args(n, c, hidden, pools="avg+max", act="relu", two_layers=True, bias=True,
                  dtype=torch.float64, seed=0):
    """(dzc, p, h, w1, w2, has_b1, has_b2, pools, act) from a forward of the CPU kernel on
    make_args' inputs, dzc random; and the forward's arguments."""
    fwd = make_args(n, c, hidden, pools, act, two_layers, bias, dtype=dtype, seed=seed)
    _, p, h = cpu.HEAD_KERNELS["channel_head"](*fwd)
    g = torch.Generator().manual_seed(seed + 1)
    dzc = (torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    return [dzc, p, h, fwd[4], fwd[6], fwd[5] is not None, fwd[7] is not None, pools, act], fwd


def autograd_oracle(dzc, fwd):
    """float64 autograd through the forward's definitions (the logits of
    test_channel_head.oracle): (dP stacked as the op returns it, dw1, db1, dw2, db2; None where
    absent)."""
    avg, mx, lp, lse, w1, b1, w2, b2, pools, act = fwd
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    avg, mx, lp, lse, w1, b1, w2, b2 = map(leaf, (avg, mx, lp, lse, w1, b1, w2, b2))
    named = {"avg": avg, "max": mx, "lp": lp, "lse": lse}
    ins = [0.5 * (avg + mx)] if pools == "blend" else [named[k] for k in pools.split("+")]
    p = torch.cat(ins, 0)
    hpre = p @ w1.t() + (0 if b1 is None else b1)
    if w2 is None:
        z = hpre
    else:
        a = {"relu": torch.relu, "silu": torch.nn.functional.silu,
             "gelu": torch.nn.functional.gelu, "identity": lambda t: t}[act](hpre)
        z = a @ w2.t() + (0 if b2 is None else b2)
    logits = z.reshape(len(ins), avg.shape[0], -1).sum(0)
    params = {k: t for k, t in zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2)) if t is not None}
    got = torch.autograd.grad(logits, [p, *params.values()], dzc.double())
    grads = dict(zip(params, got[1:]))
    dp = 0.5 * got[0] if pools == "blend" else got[0]
    return (dp, *(grads.get(k) for k in ("w1", "b1", "w2", "b2")))


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def magnitudes(args):
    """Each output's sum of |terms| in float64 (with what dh's own error carries): the scale of
    a float32 sum's rounding error, whatever its order."""
    dzc, p, h, w1, w2, _, _, pools, _ = args
    ab = lambda t: t.double().abs()  # noqa: E731
    n = dzc.shape[0]
    k = p.shape[0] // n if n else 1
    dz = ab(dzc).repeat(k, 1)
    if w2 is None:
        mag_dh = dz
        mag_w2 = mag_b2 = None
    else:  # |act'| <= 1.2 for every activation here (gelu's derivative peaks near 1.13)
        mag_dh = 1.2 * dz @ ab(w2)
        mag_w2 = dz.t() @ ab(h)  # |act(h)| <= |h|
        mag_b2 = dz.sum(0)
    mag_dw1 = 2 * mag_dh.t() @ ab(p)
    mag_db1 = 2 * mag_dh.sum(0)
    mag_dp = 2 * mag_dh @ ab(w1)
    return mag_dp, mag_dw1, mag_db1, mag_w2, mag_b2


def check_close(got, want, dtype, args=None, fwd=None):
    """got against want (float64: to 1e-12); in float32, element by element against the float64
    autograd oracle, within twice the float32 CPU kernel's own largest error plus 4e-6 of the
    output's sum of |terms|. Absent outputs are empty."""
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape and g.is_contiguous(), (g.shape, w.shape)
    if dtype == torch.float64 or args is None:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        return
    exact = autograd_oracle(args[0], fwd)
    for name, g, w, e, mag in zip(("dp", "dw1", "db1", "dw2", "db2"), got, want, exact,
                                  magnitudes(args)):
        if e is None or not g.numel():
            assert e is None or not e.numel(), name
            continue
        bound = 2 * _err(w, e) + 4e-6 * mag
        excess = ((g.double() - e).abs() - bound).max().item()
        assert excess <= 0, (name, _err(g, e), _err(w, e), excess)


def run_sim(args, schedule="forward", tile=TILE_NORMAL):
    """(outputs, launch stats) of channel_head_backward through the simulator, outputs poisoned."""
    return run_head_sim(args, schedule=schedule, tile=tile, op="channel_head_backward")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_kernel_matches_autograd(shape, variant):
    args, fwd = make_bwd_args(*shape, *variant)
    got = cpu.HEAD_KERNELS["channel_head_backward"](*args)
    for name, g, e in zip(("dp", "dw1", "db1", "dw2", "db2"), got, autograd_oracle(args[0], fwd)):
        if e is None:
            assert g.numel() == 0, name
        else:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)


@needs_sim
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_simulated_kernels_match_the_cpu_kernel(shape, variant, dtype):
    args, fwd = make_bwd_args(*shape, *variant, dtype=dtype)
    out, stats = run_sim(args)
    two_layers = variant[2]
    assert {s["name"] for s in stats} == {"channel_head_backward"}
    assert len(stats) in ((2, 3) if two_layers else (1,)), len(stats)
    check_close(out, cpu.HEAD_KERNELS["channel_head_backward"](*args), dtype, args, fwd)


@needs_sim
@pytest.mark.parametrize("tile", [TILE_ONE_SPLIT, TILE_CHUNK_SPLITS])
@pytest.mark.parametrize("shape", [(5, 300, 20), (40, 129, 64), (3, 40, 5)])
def test_split_and_unsplit_launches_agree(shape, tile):
    """One split of the c axis and a 32-column chunk a split (partials, which each tile's last
    split to finish adds in the same launch): two launches, the normal launch's values, the
    tiles' counters zero again after."""
    args, _ = make_bwd_args(*shape, "avg+max+lp+lse", "gelu")
    out, stats = run_sim(args, tile=tile)
    assert len(stats) == 2
    kept = torch.ops.cbam_fused_sim.group_counters()
    assert all(int(b.abs().sum()) == 0 for b in kept)
    normal, _ = run_sim(args)
    for a, b in zip(out, normal):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@needs_sim
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_no_race(schedule):
    args, _ = make_bwd_args(17, 70, 33, "lse+avg", "silu", dtype=torch.float32)
    assert_no_race(run_sim, args, schedule)


@needs_sim
@pytest.mark.parametrize("shape", [(0, 16, 4), (3, 0, 4), (3, 16, 0)])
def test_empty_extents(shape):
    """No sample: every parameter gradient is zero. No channel or no hidden unit: the shapes
    follow, zeros where a sum has no term."""
    args, _ = make_bwd_args(*shape)
    out, _ = run_sim(args)
    assert_matches(out, cpu.HEAD_KERNELS["channel_head_backward"](*args))


@needs_sim
@pytest.mark.parametrize("act", ACTS)
def test_nan_propagates_as_in_aten(act):
    """A NaN in the logits' gradient or in the hidden layer spreads as ATen's kernels spread it
    (relu's backward passes a NaN h's gradient, as threshold_backward does)."""
    args, _ = make_bwd_args(3, 40, 5, "avg+max", act)
    args[0][1, 3] = float("nan")
    args[2][4, 2] = float("nan")
    got, _ = run_sim(args)
    assert_matches(got, cpu.HEAD_KERNELS["channel_head_backward"](*args), nan=True)


@needs_sim
@pytest.mark.parametrize("n,c,hidden", [(16, 256, 16), (8, 64, 32)])
def test_bytes_moved(n, c, hidden):
    """Where every output fits a tile along its short side (k N, H <= 32), at most twice the
    bytes of the op's tensors (its inputs read once, its outputs written once): the tiles re-read
    only the small h and dh, once per 32 channels."""
    args, _ = make_bwd_args(n, c, hidden, "avg+max", "relu", dtype=torch.float32)
    _, stats = run_sim(args, tile=TILE_ONE_SPLIT)
    r = 2 * n
    ins = n * c + r * c + r * hidden + 2 * hidden * c
    outs = r * c + 2 * hidden * c + hidden + c
    total = sum(s["bytes_read"] + s["bytes_written"] for s in stats)
    assert total <= 2 * 4 * (ins + outs), (total, 4 * (ins + outs))
    # the outputs written once, dh (two layers: a scratch [k N, H]) once
    assert sum(s["bytes_written"] for s in stats) == 4 * (outs + r * hidden)


@needs_cuda
@pytest.mark.skipif(not _ops.has_cuda_kernel("channel_head_backward"),
                    reason="no CUDA kernel built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_kernels_match_the_cpu_kernel(shape, variant, dtype):
    args, fwd = make_bwd_args(*shape, *variant, dtype=dtype)
    check_close(run_cuda("channel_head_backward", args),
                cpu.HEAD_KERNELS["channel_head_backward"](*args), dtype, args, fwd)


# ------------------------------------------------------------------------------ bad input

BAD = [
    (_set(7, "max+max"), "pools must be 'blend' or distinct names of avg, max, lp, lse joined "
                         "by '+', got 'max+max'"),
    (_set(8, "elu"), "act must be 'relu', 'silu', 'gelu' or 'identity', got 'elu'"),
    (_set(0, lambda a: a[0].reshape(-1)), "dzc must have shape [N, C], got [120]"),
    (_set(3, lambda a: a[3][:, :39]), "w1 must have shape [H, C] with C = 40, got [5, 39]"),
    (_set(1, lambda a: a[1][:3]), "p must have shape [k N, C] = [6, 40], got [3, 40]"),
    (_set(2, lambda a: a[2][:, :4]), "h must have shape [k N, H] = [6, 5], got [6, 4]"),
    (_set(4, lambda a: a[4].float()), "w2 must have the dtype of dzc (Double), got Float"),
    (_set(4, None), "w1 must have shape [C, C] = [40, 40] without w2 (one layer), got [5, 40]"),
    (lambda a: (a.__setitem__(4, None), a.__setitem__(3, torch.zeros(40, 40).double()),
                a.__setitem__(2, torch.zeros(6, 40).double())), "has_b2 needs w2"),
]


@pytest.mark.parametrize("mutate,message", BAD)
@pytest.mark.parametrize("where", ["cpu", "fake", "sim"])
def test_bad_input_is_named(mutate, message, where):
    from test_spatial_head import check_refused_everywhere
    args, _ = make_bwd_args(3, 40, 5)
    mutate(args)
    check_refused_everywhere("channel_head_backward", args, message, where)


@pytest.mark.parametrize("variant", VARIANTS[:6])
def test_opcheck(variant):
    args, _ = make_bwd_args(4, 24, 6, *variant, dtype=torch.float32)
    torch.library.opcheck(torch.ops.cbam_fused.channel_head_backward.default, args)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args, _ = make_bwd_args(3, 40, 5, "avg+max+lp+lse", bias=False)
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        dp, dw1, db1, dw2, db2 = torch.ops.cbam_fused.channel_head_backward(*fargs)
    assert dp.shape == (12, 40) and dw1.shape == (5, 40) and dw2.shape == (40, 5)
    assert db1.shape == db2.shape == (0,)


# ------------------------------------------------------------------------------ in the block
@needs_sim
@pytest.mark.parametrize("variant", ["official", "timm_light", "ultralytics", "official_lp_lse",
                                     "spatial_first", "parallel"])
def test_block_backward_runs_one_channel_head_backward(variant):
    """The block's backward runs the channel head's as one op (one or two launches, no ATen
    mm), and the block still matches the reference, forward and gradients."""
    from test_functional import _module, compare_with_reference
    m = _module(variant, 6, 2, torch.float64)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    with testing.use_simulator():
        y = m(x)
        testing.simulator_stats()
        y.backward(torch.randn_like(y))
        names = [s["name"] for s in testing.simulator_stats()]
    assert 1 <= names.count("channel_head_backward") <= 2, names
    with testing.use_simulator():
        compare_with_reference(m, x, train=True, tol=1e-10)
