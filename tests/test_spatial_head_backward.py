"""cbam_fused::spatial_head_backward, the spatial gate's head backward in two kernels
(csrc/kernels/spatial_head_backward.cuh): du, dv and the conv / BatchNorm (eval) parameters'
gradients from d gs, or from d zconv when BatchNorm ran with batch statistics.

Its CPU kernel (the ATen ops the block ran before) against float64 autograd through the forward's
definitions; its CUDA kernels through the SIMT simulator against the CPU kernel with poisoned
outputs, on 1-D / 2-D / 3-D maps, every map order, k = 1, 3, 7 (and wide 1-D kernels with more
parameter slots than threads), maps smaller than the kernel, with and without bias and BatchNorm,
with and without gs; the staged and unstaged paths, one block walking every chunk, the three fiber
schedules; its checks on every kernel; opcheck; its place in the block.
"""
import math

import pytest
import torch

from cbam_fused import _cpu_kernels as cpu
from cbam_fused import _ops

from conftest import needs_cuda, sim_has
from test_spatial_head import (GEOMS, TILE_FULL_BLOCKS, TILE_NORMAL, TILE_ONE_BLOCK,
                               TILE_UNSTAGED, check_refused_everywhere, make_args, oracle)
from test_spatial_head import run_sim as run_head_sim

testing = pytest.importorskip("cbam_fused.testing")
HAVE_SIM = sim_has("spatial_head_backward")
needs_sim = pytest.mark.skipif(not HAVE_SIM, reason="the simulator build (cbam_fused._sim) is "
                               "missing")
OP = "spatial_head_backward"
NAMES = ("du", "dv", "d_conv_w", "d_conv_b", "d_bn_w", "d_bn_b")
# (order, bias, bn, from_gs): each order with and without bias and each BatchNorm form; without
# gs (grad is d zconv: BatchNorm with batch statistics ran before the op) BatchNorm is not given
VARIANTS = [("max,mean", False, "affine", True), ("mean,max", True, "none", True),
            ("blend", False, "plain", True), ("max,mean", True, "none", False),
            ("mean,max", False, "plain", True), ("blend", True, "affine", True),
            ("blend", True, "none", False)]


def make_bwd_args(spatial, k, order, bias, bn, from_gs, dtype=torch.float64, n=3, seed=0):
    """The op's arguments: the forward's gs, smap and zconv (CPU kernel) on make_args' maps and
    parameters, and a random grad; plus the forward's own (u, v, ...) for the oracle."""
    fwd = make_args(spatial, k, order, bias, bn if from_gs else "none", from_gs, dtype, n, seed)
    gs, smap, zconv = cpu.HEAD_KERNELS["spatial_head"](*fwd)
    g = torch.Generator().manual_seed(seed + 1)
    s = math.prod(smap.shape[2:])
    grad = (torch.rand(n, s, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    w, b, bn_w, bn_b, bn_rm, bn_rv, eps = fwd[2:9]
    args = (grad, gs if from_gs else None, smap, zconv if bn != "none" and from_gs else None, w, b,
            bn_w, bn_b, bn_rm, bn_rv, eps, order)
    return args, fwd


def bwd_oracle(args, fwd):
    """float64 autograd through the forward's definitions (test_spatial_head.oracle): the
    gradients of sum(grad * gs) (of sum(grad * zconv) without gs) with respect to u and v (du,
    dv as [N, S]), conv_w, conv_b, bn_w and bn_b (None where not given)."""
    grad, gs = args[0], args[1]
    leaves = [t.detach().double().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
              for t in fwd[:8]]
    ogs, _, z = oracle(*leaves, *fwd[8:])
    out = ogs if gs is not None else z.reshape(z.shape[0], -1)
    wrt = [t for t in leaves[:6] if t is not None]
    grads = iter(torch.autograd.grad(out, wrt, grad.double(), allow_unused=True))
    res = [next(grads) if t is not None else None for t in leaves[:6]]
    n = grad.shape[0]
    du, dv = res[0].reshape(n, -1), res[1].reshape(n, -1)
    return [du, dv] + [r if r is not None or t is None else torch.zeros_like(t)
                       for r, t in zip(res[2:], leaves[2:6])]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_close(got, want, dtype, exact=None, scale=None):
    """got against want: float64 to 1e-12; float32 against the float64 oracle `exact`, within
    twice the float32 CPU kernel's own error there plus 4e-6 (about 32 float32 roundings) of
    `scale`, each output's sum of the magnitudes of its terms (abs_scale): a gradient here sums
    cin k^d or N S terms of either sign, in another order than ATen's."""
    assert len(got) == 6
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype and g.is_contiguous(), name
        assert g.shape == w.shape, (name, g.shape, w.shape)
    if dtype == torch.float64 or exact is None:
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                                atol=1e-6)
        for name, g, w in zip(NAMES, got, want):
            torch.testing.assert_close(g.double(), w.double(), **tol, msg=name)
        return
    for name, g, w, e, m in zip(NAMES, got, want, exact, scale):
        if w.numel() == 0:
            continue
        err = (g.double() - e).abs()
        bound = 2 * _max_err(w, e) + 4e-6 * m
        assert (err <= bound).all(), (name, (err - bound).max().item(), _max_err(w, e))


def abs_scale(args64):
    """Each output's sum of |terms|: the float64 CPU kernel on magnitudes (|grad|, |map|, |w|,
    |bn_w|, zconv on the far side of the running mean), where every term is >= 0."""
    grad, gs, smap, zconv, w, b, bn_w, bn_b, bn_rm, bn_rv, eps, order = args64
    if zconv is not None:
        zconv = bn_rm + (zconv - bn_rm).abs()
    mags = (grad.abs(), gs, smap.abs(), zconv, w.abs(), b, None if bn_w is None else bn_w.abs(),
            bn_b, bn_rm, bn_rv, eps, order)
    return cpu.HEAD_KERNELS[OP](*mags)


def float32_references(geom, variant, n=3):
    """(exact, scale) for a float32 run: the float64 CPU kernel on the same values, and
    abs_scale."""
    d64, _ = make_bwd_args(geom[0], geom[1], *variant, n=n)
    return cpu.HEAD_KERNELS[OP](*d64), abs_scale(d64)


def _present(want, args):
    """The oracle's gradients in the op's form: empty for a parameter not given."""
    out = list(want[:3])
    for t, p in zip(want[3:], args[5:8]):
        out.append(t.reshape(1) if p is not None else torch.empty(0, dtype=want[0].dtype))
    return out


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_kernel_matches_autograd_of_the_definitions(geom, variant):
    args, fwd = make_bwd_args(geom[0], geom[1], *variant)
    want = _present(bwd_oracle(args, fwd), args)
    check_close(cpu.HEAD_KERNELS[OP](*args), want, torch.float64)


def run_sim(args, schedule="forward", tile=TILE_NORMAL):
    return run_head_sim(args, schedule, tile, op=OP)


# wide 1-D kernels: more parameter slots (cin k + 3) than threads (k = 127: 257 slots on blocks of
# 128, three for thread 0; k = 511: 1025 slots on 256, five for thread 0, the most a thread folds)
WIDE = [((50,), 127), ((30,), 511)]


@needs_sim
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geom", GEOMS + WIDE)
@pytest.mark.parametrize("variant", VARIANTS)
def test_simulated_kernels_match_the_cpu_kernel(geom, variant, dtype):
    args, fwd = make_bwd_args(geom[0], geom[1], *variant, dtype=dtype)
    out, stats = run_sim(args)
    assert [s["name"] for s in stats] == [OP, OP]  # the pass, the parameter sums
    want = cpu.HEAD_KERNELS[OP](*args)
    refs = float32_references(geom, variant) if dtype == torch.float32 else (None, None)
    check_close(out, want, dtype, *refs)


@needs_sim
@pytest.mark.parametrize("geom,block", [(((5, 9), 7), 64), (((3, 4, 5), 3), 64),
                                        (((40,), 7), 64), (((2, 3, 4), 7), 256)])
def test_grid_stride_full_blocks_and_unstaged_paths(geom, block):
    """One block walking every chunk (its partial sums over all of them), blocks of 256 threads
    (the normal launch of these small maps takes 64, but for the 7x7x7 kernel's 689 parameter
    slots), and the taps reading global memory: the values of the normal launch; unstaged, the
    same bits (the same sums in the same order, only read from elsewhere)."""
    args, _ = make_bwd_args(geom[0], geom[1], "max,mean", True, "affine", True, n=5)
    normal, nstats = run_sim(args)
    assert nstats[0]["smem_bytes"] > 0 and nstats[0]["block"][0] == block  # staged
    for tile in (TILE_ONE_BLOCK, TILE_FULL_BLOCKS):
        other, ostats = run_sim(args, tile=tile)
        if tile == TILE_ONE_BLOCK:
            assert ostats[0]["grid"][0] == 1
        else:
            assert ostats[0]["block"][0] == 256
        for a, b in zip(other, normal):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    direct, dstats = run_sim(args, tile=TILE_UNSTAGED)
    assert dstats[0]["smem_bytes"] == 0
    for a, b in zip(direct, normal):
        assert torch.equal(a, b)


@needs_sim
def test_several_blocks_fold_their_partials():
    """64 x 40 positions: 40 chunks of 64 (fewer chunks than SMs: the smallest blocks), or 10 of
    256; each block its own partial sums, which the second pass folds (against the CPU
    kernel)."""
    args, _ = make_bwd_args((40,), 7, "mean,max", True, "affine", True, n=64)
    want = cpu.HEAD_KERNELS[OP](*args)
    for tile, grid, block in ((TILE_NORMAL, 40, 64), (TILE_FULL_BLOCKS, 10, 256)):
        out, stats = run_sim(args, tile=tile)
        assert stats[0]["grid"][0] == grid and stats[0]["block"][0] == block
        check_close(out, want, torch.float64)


@needs_sim
@pytest.mark.parametrize("k,block", [(63, 64), (127, 128), (401, 256)])
def test_block_size_keeps_slots_and_halo_bounded(k, block):
    """Blocks shrink only while a thread folds at most 5 parameter slots and the halo (2 reach)
    at most doubles a chunk: a 1-D k = 63 kernel (129 slots, reach 31) runs blocks of 64 (three
    slots for thread 0), k = 127 (257 slots, reach 63) blocks of 128, k = 401 (805) blocks of
    256."""
    args, _ = make_bwd_args((30,), k, "max,mean", False, "none", True)
    _, stats = run_sim(args)
    assert stats[0]["block"][0] == block


@needs_sim
def test_staging_reads_each_input_about_once():
    """The staged path reads grad, gs and the map (blockDim + 2 reach) / blockDim times over,
    not cin k^2 times: 2-D 16x16 maps, k = 7 (reach 51), 8 samples, blocks of 256; unstaged,
    20+ times."""
    args, _ = make_bwd_args((16, 16), 7, "max,mean", False, "none", True, n=8,
                            dtype=torch.float32)
    _, staged = run_sim(args, tile=TILE_FULL_BLOCKS)
    _, direct = run_sim(args, tile=TILE_UNSTAGED)
    inputs = 4 * 4 * args[0].numel()  # grad, gs and the map's two channels, float32
    assert staged[0]["bytes_read"] < 1.5 * inputs + 8192, staged[0]["bytes_read"]
    assert direct[0]["bytes_read"] > 20 * inputs, direct[0]["bytes_read"]


@needs_sim
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_no_race(schedule):
    args, _ = make_bwd_args((6, 7), 7, "mean,max", True, "affine", True, n=12,
                            dtype=torch.float32)
    for tile in (TILE_NORMAL, TILE_ONE_BLOCK, TILE_FULL_BLOCKS):
        want, _ = run_sim(args, tile=tile)
        got, _ = run_sim(args, schedule=schedule, tile=tile)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------ bad input
BAD = [
    (lambda a: a.__setitem__(11, "avg,max"), "spatial_pools must be 'max,mean', 'mean,max' or "
                                             "'blend', got 'avg,max'"),
    (lambda a: a.__setitem__(2, a[2][:, :1]), "smap must have shape [N, 2, *spatial] with 1 to 3 "
                                              "spatial dimensions, got [3, 1, 5, 9]"),
    (lambda a: a.__setitem__(0, a[0][:, :44]), "grad must have shape [3, 45], got [3, 44]"),
    (lambda a: a.__setitem__(1, a[1].float()), "gs must have the dtype of smap (Double), got Float"),
    (lambda a: a.__setitem__(3, a[3][:, :, :4]), "zconv must have shape [3, 1, 5, 9], got "
                                                 "[3, 1, 4, 9]"),
    (lambda a: a.__setitem__(4, a[4][:, :, :6, :6]), "conv_w must have shape [1, 2, k, k] with "
                                                     "an odd k, got [1, 2, 6, 6]"),
    (lambda a: a.__setitem__(5, torch.zeros(2, dtype=torch.float64)),
     "conv_b must have shape [1], got [2]"),
    (lambda a: a.__setitem__(9, None), "bn_rm and bn_rv must be given together"),
    (lambda a: (a.__setitem__(8, None), a.__setitem__(9, None)),
     "bn_w and bn_b need bn_rm and bn_rv"),
    (lambda a: a.__setitem__(1, None), "BatchNorm (bn_rm, bn_rv) needs gs"),
    (lambda a: a.__setitem__(3, None), "BatchNorm (bn_rm, bn_rv) needs zconv"),
]


def _bad_args(mutate):
    args, _ = make_bwd_args((5, 9), 7, "max,mean", True, "affine", True)
    args = list(args)
    mutate(args)
    return args


@pytest.mark.parametrize("mutate,message", BAD)
@pytest.mark.parametrize("where", ["cpu", "fake", "sim"])
def test_bad_input_is_named(mutate, message, where):
    check_refused_everywhere(OP, _bad_args(mutate), message, where)


def test_float16_maps_are_refused():
    args = [t.half() if isinstance(t, torch.Tensor) else t for t in _bad_args(lambda a: None)]
    with pytest.raises(RuntimeError, match="smap must be float32 or float64"):
        torch.ops.cbam_fused.spatial_head_backward(*args)


@pytest.mark.parametrize("variant", VARIANTS[:4])
def test_opcheck(variant):
    args, _ = make_bwd_args((5, 6), 3, *variant, dtype=torch.float32)
    torch.library.opcheck(torch.ops.cbam_fused.spatial_head_backward.default, args)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args, _ = make_bwd_args((4, 5, 6), 3, "blend", True, "plain", True)
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        out = torch.ops.cbam_fused.spatial_head_backward(*fargs)
    assert [tuple(t.shape) for t in out] == [(3, 120), (3, 120), (1, 1, 3, 3, 3), (1,), (0,), (0,)]


@pytest.mark.parametrize("where", ["cpu", "sim"])
def test_empty_batch(where):
    """No positions: du and dv empty, every parameter's gradient 0 (the second pass still runs
    on the simulator and writes them)."""
    if where == "sim" and not HAVE_SIM:
        pytest.skip("the simulator build is missing")
    args, _ = make_bwd_args((5, 6), 3, "max,mean", True, "affine", True, n=0)
    if where == "sim":
        out, stats = run_sim(args)
        assert [s["name"] for s in stats] == [OP]  # only the sums
    else:
        out = torch.ops.cbam_fused.spatial_head_backward(*args)
    assert out[0].shape == out[1].shape == (0, 30)
    for t in out[2:]:
        assert torch.equal(t, torch.zeros_like(t))


@needs_sim
def test_wide_maps_take_the_unstaged_path():
    """A map whose chunk span does not fit kMaxHeadStageBytes (7 x 1200, k = 7: reach 3603,
    3 x 7462 floats) runs unstaged by itself, with the CPU kernel's values."""
    args, _ = make_bwd_args((7, 1200), 7, "max,mean", True, "affine", True, n=1)
    out, stats = run_sim(args)
    assert stats[0]["smem_bytes"] == 0
    check_close(out, cpu.HEAD_KERNELS[OP](*args), torch.float64)


@needs_cuda
@pytest.mark.skipif(not _ops.has_cuda_kernel(OP), reason="no CUDA kernel built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geom", GEOMS + WIDE + [((56, 56), 7), ((7, 7), 7)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_kernels_match_the_cpu_kernel(geom, variant, dtype):
    n = 64 if geom[0] in ((56, 56), (7, 7)) else 4  # the ResNet-50 sites at batch 64
    args, _ = make_bwd_args(geom[0], geom[1], *variant, dtype=dtype, n=n)
    want = cpu.HEAD_KERNELS[OP](*args)
    refs = float32_references(geom, variant, n) if dtype == torch.float32 else (None, None)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]
    got = torch.ops.cbam_fused.spatial_head_backward(*dev)
    check_close([t.cpu() for t in got], want, dtype, *refs)
    again = torch.ops.cbam_fused.spatial_head_backward(*dev)
    for a, b in zip(got, again):
        assert torch.equal(a, b)
