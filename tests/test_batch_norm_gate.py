"""cbam_fused::batch_norm_gate and batch_norm_gate_backward: the spatial gate's BatchNorm with
batch statistics (one channel, training mode) and its sigmoid, two kernels each way
(csrc/kernels/batch_norm_gate.cuh).

Their CPU kernels (the ATen ops the block ran before: native_batch_norm, sigmoid, var_mean;
sigmoid_backward, native_batch_norm_backward) against float64 definitions and autograd; their
CUDA kernels through the SIMT simulator against the CPU kernels, outputs poisoned, on 1-D to 3-D
maps of 2 to 6400 values, with and without the affine parameters, at each launch shape (normal,
one block, ranges of 16 values: hundreds of partials, more than a block's threads); a large
common offset (the variance of values far from zero); NaN; the three fiber schedules; bytes
moved; their checks on every kernel; opcheck; their place in the block.
"""
import pytest
import torch

from cbam_fused import _cpu_kernels as cpu
from cbam_fused import _ops

from conftest import needs_cuda, sim_has
from test_spatial_head import check_refused_everywhere
from test_spatial_head import run_sim as run_head_sim

testing = pytest.importorskip("cbam_fused.testing")
HAVE_SIM = sim_has("batch_norm_gate")
needs_sim = pytest.mark.skipif(not HAVE_SIM, reason="the simulator build (cbam_fused._sim) is "
                               "missing")
FWD, BWD = "batch_norm_gate", "batch_norm_gate_backward"
# the launchers' debug tile modes: normal, one block each, ranges of 16 values a partial
TILE_NORMAL, TILE_ONE_BLOCK, TILE_SMALL_RANGES = 0, 1, 2
EPS = 1e-5
# (N, spatial): 2 values, odd sizes, 1-D to 3-D, several partial blocks at the normal launch
SHAPES = [(2, (1,)), (1, (3,)), (3, (5, 7)), (2, (3, 4, 5)), (4, (40, 40)), (5, (33,))]
AFFINE = ["both", "weight", "bias", "none"]


def make_args(n, spatial, affine="both", dtype=torch.float64, seed=0, offset=0.5):
    """(zconv, bn_w, bn_b, eps): random conv outputs around `offset`, affine parameters as asked."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    z = (r(n, 1, *spatial, lo=-2.0, hi=2.0).double() + offset).to(dtype)
    w = r(1, lo=0.5, hi=1.5) if affine in ("both", "weight") else None
    b = r(1) if affine in ("both", "bias") else None
    return z, w, b, EPS


def make_bwd_args(n, spatial, affine="both", dtype=torch.float64, seed=0, offset=0.5):
    """The backward's arguments (dgs, gs, zconv, mean, invstd, bn_w, has_b) from the CPU
    forward, and the forward's."""
    fwd = make_args(n, spatial, affine, dtype, seed, offset)
    gs, mean, invstd, _ = cpu.HEAD_KERNELS[FWD](*fwd)
    g = torch.Generator().manual_seed(seed + 1)
    dgs = (torch.rand(gs.shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    return (dgs, gs, fwd[0], mean, invstd, fwd[1], fwd[2] is not None), fwd


def oracle(z, w, b, eps):
    """float64 from the definitions: (gs, mean, invstd, unbiased var)."""
    z = z.double()
    m = z.numel()
    mean = z.sum() / m
    var = ((z - mean) ** 2).sum() / m
    invstd = 1 / torch.sqrt(var + eps)
    zs = (z - mean) * invstd
    if w is not None:
        zs = zs * w.double()
    if b is not None:
        zs = zs + b.double()
    return (torch.sigmoid(zs).reshape(z.shape[0], -1), mean.reshape(1), invstd.reshape(1),
            (var * m / (m - 1)).reshape(1))


def bwd_oracle(args, fwd):
    """float64 autograd through oracle: the gradients of sum(dgs * gs) with respect to zconv (as
    [N, S]), bn_w and bn_b (None where not given)."""
    dgs = args[0]
    leaves = [t.detach().double().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
              for t in fwd]
    gs = oracle(*leaves)[0]
    want = [t for t in leaves[:3] if t is not None]
    grads = torch.autograd.grad((gs * dgs.double()).sum(), want)
    it = iter(grads)
    dz, dw, db = [next(it) if t is not None else None for t in leaves[:3]]
    return dz.reshape(dgs.shape), dw, db


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_close(got, want, exact, dtype, terms=1):
    """got against the CPU kernel's want: to 1e-12 in float64; in float32, against the float64
    `exact`, within twice the CPU kernel's own error there plus a sum's error in another order:
    1e-6, or float32's epsilon times the square root of the `terms` summed where that is more
    (the H200 run of 2026-11-28: 1.9e-6 over 256 x 7 x 7 terms, the CPU kernel's 2.4e-7).
    An output absent in `exact` (None) must be empty."""
    floor = max(1e-6, torch.finfo(torch.float32).eps * terms ** 0.5)
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        assert g.dtype == dtype and g.is_contiguous(), i
        if e is None:
            assert g.numel() == 0 and w.numel() == 0, i
            continue
        assert g.shape == w.shape == e.shape, (i, g.shape, w.shape, e.shape)
        if dtype == torch.float64:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        else:
            assert _err(g, e) <= 2 * _err(w, e) + floor * max(1.0, e.abs().max().item()), \
                (i, _err(g, e), _err(w, e))


def run_sim(op, args, tile=TILE_NORMAL, schedule="forward"):
    """(outputs, launch stats) of `op` through the simulator, outputs poisoned."""
    return run_head_sim(args, schedule=schedule, tile=tile, op=op)


# ------------------------------------------------------------------------------ the CPU kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", AFFINE)
def test_cpu_kernels_match_the_definitions(shape, affine):
    args = make_args(*shape, affine)
    for g, e in zip(cpu.HEAD_KERNELS[FWD](*args), oracle(*args)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    bargs, fwd = make_bwd_args(*shape, affine)
    got = cpu.HEAD_KERNELS[BWD](*bargs)
    for g, e in zip(got, bwd_oracle(bargs, fwd)):
        if e is None:
            assert g.numel() == 0
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ the simulator
@needs_sim
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tile", [TILE_NORMAL, TILE_ONE_BLOCK, TILE_SMALL_RANGES])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", ["both", "none"])
def test_simulated_kernels_match_the_cpu_kernels(shape, affine, tile, dtype):
    args = make_args(*shape, affine, dtype)
    out, stats = run_sim(FWD, args, tile)
    assert [s["name"] for s in stats] == [FWD, FWD]
    if tile == TILE_ONE_BLOCK:
        assert [s["grid"][0] for s in stats] == [1, 1]
    check_close(out, cpu.HEAD_KERNELS[FWD](*args), oracle(*args), dtype)
    bargs, fwd = make_bwd_args(*shape, affine, dtype)
    out, stats = run_sim(BWD, bargs, tile)
    assert [s["name"] for s in stats] == [BWD, BWD]
    check_close(out, cpu.HEAD_KERNELS[BWD](*bargs), bwd_oracle(bargs, fwd), dtype)


@needs_sim
@pytest.mark.parametrize("affine", ["weight", "bias"])
def test_one_affine_parameter(affine):
    """bn_w without bn_b (d bn_b empty) and bn_b without bn_w (d bn_w empty)."""
    bargs, fwd = make_bwd_args(3, (5, 7), affine, torch.float32)
    args = make_args(3, (5, 7), affine, torch.float32)
    out, _ = run_sim(FWD, args)
    check_close(out, cpu.HEAD_KERNELS[FWD](*args), oracle(*args), torch.float32)
    out, _ = run_sim(BWD, bargs)
    check_close(out, cpu.HEAD_KERNELS[BWD](*bargs), bwd_oracle(bargs, fwd), torch.float32)


@needs_sim
def test_more_partials_than_threads():
    """Ranges of 16 values over 5000 positions: 313 partials, so each thread of the apply kernels
    folds two before the tree; the normal launch (5 partials) gives the same values."""
    args = make_args(2, (50, 50), "both", torch.float64)
    out, stats = run_sim(FWD, args, TILE_SMALL_RANGES)
    assert stats[0]["grid"][0] == 313
    normal, nstats = run_sim(FWD, args)
    assert nstats[0]["grid"][0] == 5
    for a, b in zip(out, normal):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    bargs, _ = make_bwd_args(2, (50, 50), "both", torch.float64)
    out, _ = run_sim(BWD, bargs, TILE_SMALL_RANGES)
    normal, _ = run_sim(BWD, bargs)
    for a, b in zip(out, normal):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@needs_sim
@pytest.mark.parametrize("tile", [TILE_NORMAL, TILE_SMALL_RANGES])
def test_variance_far_from_zero(tile):
    """float32 values around 1000 with a spread of 2: the centred sums (each range's own mean,
    then Chan's merge) keep the variance; E[z^2] - E[z]^2 in float32 would lose it to
    cancellation."""
    args = make_args(4, (40, 40), "both", torch.float32, offset=1000.0)
    out, _ = run_sim(FWD, args, tile)
    exact = oracle(*args)
    var_err = abs(out[3].double().item() - exact[3].item()) / exact[3].item()
    assert var_err < 1e-4, var_err
    check_close(out, cpu.HEAD_KERNELS[FWD](*args), exact, torch.float32)


@needs_sim
def test_nan_spreads_as_in_aten():
    """A NaN in zconv makes the batch statistics NaN, so every gate is NaN, as with ATen."""
    z, w, b, eps = make_args(3, (5, 7))
    z[1, 0, 2, 3] = float("nan")
    out, _ = run_sim(FWD, (z, w, b, eps))
    want = cpu.HEAD_KERNELS[FWD](z, w, b, eps)
    for g, e in zip(out, want):
        assert torch.equal(g.isnan(), e.isnan())
    assert out[0].isnan().all()


@needs_sim
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_no_race(schedule):
    args = make_args(2, (50, 50), "both", torch.float32)
    bargs, _ = make_bwd_args(2, (50, 50), "both", torch.float32)
    for op, a in ((FWD, args), (BWD, bargs)):
        for tile in (TILE_NORMAL, TILE_SMALL_RANGES):
            want, _ = run_sim(op, a, tile)
            got, _ = run_sim(op, a, tile, schedule)
            for x, y in zip(got, want):
                assert torch.equal(x, y), (op, tile)


@needs_sim
def test_bytes_moved():
    """The forward reads z three times (the partials walk their ranges twice: L1 hits on a GPU,
    counted here) and writes gs, the backward reads dgs, gs and z twice and writes dz; the
    partials and the [1] tensors are read once a block: a few kilobytes more."""
    args = make_args(4, (40, 40), "both", torch.float32)
    m_bytes = args[0].numel() * 4
    _, stats = run_sim(FWD, args)
    assert sum(s["bytes_read"] for s in stats) <= 3 * m_bytes + 4096
    assert sum(s["bytes_written"] for s in stats) <= m_bytes + 4096
    bargs, _ = make_bwd_args(4, (40, 40), "both", torch.float32)
    _, stats = run_sim(BWD, bargs)
    assert sum(s["bytes_read"] for s in stats) <= 6 * m_bytes + 4096  # dgs, gs, z twice
    assert sum(s["bytes_written"] for s in stats) <= m_bytes + 4096


# ------------------------------------------------------------------------------ bad input
def _fwd_args(mutate):
    args = list(make_args(3, (5, 7)))
    mutate(args)
    return args


def _bwd_args(mutate):
    args = list(make_bwd_args(3, (5, 7))[0])
    mutate(args)
    return args


BAD = [
    (FWD, lambda a: a.__setitem__(0, a[0].reshape(3, 5, 7)),
     "zconv must have shape [N, 1, *spatial] with 1 to 3 spatial dimensions, got [3, 5, 7]"),
    (FWD, lambda a: a.__setitem__(0, a[0].half()),
     "zconv must be float32 or float64 (the accumulation dtype), got Half"),
    (FWD, lambda a: a.__setitem__(0, a[0][:1, :, :1, :1]),
     "zconv must hold more than 1 value (batch statistics), got shape [1, 1, 1, 1]"),
    (FWD, lambda a: a.__setitem__(1, torch.ones(2, dtype=torch.float64)),
     "bn_w must have shape [1], got [2]"),
    (FWD, lambda a: a.__setitem__(2, torch.ones(1)), "bn_b must have the dtype of zconv "
                                                     "(Double), got Float"),
    (BWD, lambda a: a.__setitem__(0, a[0][:2]), "dgs must have shape [3, 35], got [2, 35]"),
    (BWD, lambda a: a.__setitem__(1, a[1].float()), "gs must have the dtype of zconv (Double), "
                                                    "got Float"),
    (BWD, lambda a: a.__setitem__(3, torch.zeros(2, dtype=torch.float64)),
     "mean must have shape [1], got [2]"),
    (BWD, lambda a: a.__setitem__(4, torch.ones(1, 1, dtype=torch.float64)),
     "invstd must have shape [1], got [1, 1]"),
    (BWD, lambda a: a.__setitem__(2, a[2].reshape(105)),
     "zconv must have shape [N, 1, *spatial] with 1 to 3 spatial dimensions, got [105]"),
]


@pytest.mark.parametrize("op,mutate,message", BAD)
@pytest.mark.parametrize("where", ["cpu", "fake", "sim"])
def test_bad_input_is_named(op, mutate, message, where):
    args = _fwd_args(mutate) if op == FWD else _bwd_args(mutate)
    check_refused_everywhere(op, args, message, where)


@pytest.mark.parametrize("affine", ["both", "none"])
def test_opcheck(affine):
    args = make_args(3, (5, 6), affine, torch.float32)
    torch.library.opcheck(torch.ops.cbam_fused.batch_norm_gate.default, args)
    bargs, _ = make_bwd_args(3, (5, 6), affine, torch.float32)
    torch.library.opcheck(torch.ops.cbam_fused.batch_norm_gate_backward.default, bargs)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = make_args(3, (4, 5, 6), "weight")
    bargs, _ = make_bwd_args(3, (4, 5, 6), "weight")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        gs, mean, invstd, var = torch.ops.cbam_fused.batch_norm_gate(*fake)
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in bargs]
        dz, dw, db = torch.ops.cbam_fused.batch_norm_gate_backward(*fake)
    assert gs.shape == (3, 120) and mean.shape == invstd.shape == var.shape == (1,)
    assert dz.shape == (3, 120) and dw.shape == (1,) and db.shape == (0,)


# ------------------------------------------------------------------------------ in the block
@needs_sim
@pytest.mark.parametrize("variant", ["official", "timm_light"])
def test_block_in_training_runs_the_gate_ops(variant):
    """A block whose spatial gate has BatchNorm, in training mode: batch_norm_gate (two launches)
    after spatial_head and batch_norm_gate_backward (two) before spatial_head_backward, matching
    the reference, forward, gradients and the running statistics; eval mode runs neither."""
    from test_functional import _module, compare_with_reference
    m = _module(variant, 6, 2, torch.float64)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    for train in (True, False):
        with testing.use_simulator():
            compare_with_reference(m, x, train, 1e-10)
            names = [s["name"] for s in testing.simulator_stats()]
        assert names.count(FWD) == (2 if train else 0), names
        assert names.count(BWD) == (2 if train else 0), names


@needs_cuda
@pytest.mark.skipif(not _ops.has_cuda_kernel(FWD), reason="no CUDA kernel built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(64, (56, 56)), (256, (7, 7))])
@pytest.mark.parametrize("affine", ["both", "none"])
def test_cuda_kernels_match_the_cpu_kernels(shape, affine, dtype):
    args = make_args(*shape, affine, dtype)
    bargs, fwd = make_bwd_args(*shape, affine, dtype)
    for op, a, exact in ((FWD, args, oracle(*args)), (BWD, bargs, bwd_oracle(bargs, fwd))):
        dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in a]
        got = getattr(torch.ops.cbam_fused, op)(*dev)
        check_close([t.cpu() for t in got], cpu.HEAD_KERNELS[op](*a), exact, dtype,
                    terms=a[0].numel())
        again = getattr(torch.ops.cbam_fused, op)(*dev)
        for x, y in zip(got, again):
            assert torch.equal(x, y), op
