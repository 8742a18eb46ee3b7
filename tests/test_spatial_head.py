"""cbam_fused::spatial_head, the spatial gate's head in one kernel (csrc/kernels/spatial_head.cuh):
the map stacked from the pools over C, its k^d convolution, BatchNorm in eval mode, the sigmoid.

Its CPU kernel (the ATen ops the block ran before) against a float64 oracle written here from the
definitions; its CUDA kernel through the SIMT simulator against the CPU kernel, with poisoned
outputs, on 1-D / 2-D / 3-D maps, every map order, k = 1, 3, 7, maps smaller than the kernel,
with and without bias and BatchNorm, the staged and the unstaged path, a grid-stride loop over
many chunks, and the three fiber schedules; its checks, word for word on every kernel; opcheck;
and its place in the block (one launch, no ATen convolution).
"""
import pytest
import torch
import torch.nn.functional as F

from cbam_fused import _cpu_kernels as cpu
from cbam_fused import _ops

from conftest import needs_cuda, sim_has

testing = pytest.importorskip("cbam_fused.testing")
HAVE_SIM = sim_has("spatial_head")
needs_sim = pytest.mark.skipif(not HAVE_SIM, reason="the simulator build (cbam_fused._sim) is "
                               "missing")
# the launchers' debug tile modes: normal, one block, no staging, blocks of 256 threads whatever
# the grid (normally these small maps take blocks of 64: head_block_threads)
TILE_NORMAL, TILE_ONE_BLOCK, TILE_UNSTAGED, TILE_FULL_BLOCKS = 0, 1, 2, 3


def make_args(spatial, k, order, bias, bn, gate, dtype=torch.float64, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cin = 1 if order == "blend" else 2

    def r(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    u = r(n, 1, *spatial)
    v = u + r(n, 1, *spatial, lo=0.0, hi=2.0)  # a max is at least the mean
    w = r(1, cin, *([k] * len(spatial)))
    b = r(1) if bias else None
    if bn == "none":
        bn_args = (None,) * 4
    else:
        affine = bn == "affine"
        bn_args = (r(1, lo=0.5, hi=1.5) if affine else None, r(1) if affine else None, r(1),
                   r(1, lo=0.5, hi=1.5))
    return (u, v, w, b, *bn_args, 1e-5, order, gate)


def oracle(u, v, w, b, bn_w, bn_b, bn_rm, bn_rv, eps, order, gate):
    """float64, from the definitions: the stacked map, conv with zero padding k // 2, BatchNorm
    in eval mode, sigmoid."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    u, v, w, b = d(u), d(v), d(w), d(b)
    smap = {"max,mean": lambda: torch.cat([v, u], 1), "mean,max": lambda: torch.cat([u, v], 1),
            "blend": lambda: 0.5 * (u + v)}[order]()
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[u.dim() - 2]
    z = conv(smap, w, b, padding=w.shape[-1] // 2)
    zs = z
    if bn_rv is not None:
        zs = (z - bn_rm.double()) / torch.sqrt(bn_rv.double() + eps)
        if bn_w is not None:
            zs = zs * bn_w.double()
        if bn_b is not None:
            zs = zs + bn_b.double()
    gs = torch.sigmoid(zs).reshape(u.shape[0], -1) if gate else None
    return gs, smap, z


# (spatial, k): 1-D / 2-D / 3-D, k = 1, 3, 7, maps smaller than the kernel, a long row
GEOMS = [((11,), 3), ((5, 9), 7), ((2, 3), 7), ((3, 4, 5), 3), ((1, 1), 3), ((6, 6), 1),
         ((2, 3, 2), 7), ((40,), 7)]
# (order, bias, bn, gate): each order with and without bias and each BatchNorm form
VARIANTS = [("max,mean", False, "affine", True), ("mean,max", True, "none", True),
            ("blend", False, "plain", True), ("max,mean", True, "none", False),
            ("mean,max", False, "plain", True), ("blend", True, "affine", False)]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_close(got, want, dtype, args=None):
    """got against want (float64: to 1e-12); in float32, against the float64 oracle of args,
    within twice the float32 CPU kernel's own error there (plus 1e-7: sums of cin k^d terms
    round differently in another order)."""
    gs, smap, z = got
    wgs, wsmap, wz = want
    assert smap.dtype == z.dtype == dtype
    assert (gs.numel() == 0) if wgs is None else (gs.dtype == dtype and gs.is_contiguous())
    if dtype == torch.float64 or args is None:
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                                atol=1e-6)
        for g, w in zip((gs, smap, z), (wgs, wsmap, wz)):
            if w is not None:
                torch.testing.assert_close(g.double(), w.double(), **tol)
        return
    exact = oracle(*[t.double() if isinstance(t, torch.Tensor) else t for t in args])
    for name, g, w, e in zip(("gs", "smap", "zconv"), (gs, smap, z), (wgs, wsmap, wz), exact):
        if e is None:
            continue
        assert _max_err(g, e) <= 2 * _max_err(w, e) + 1e-7, (name, _max_err(g, e),
                                                             _max_err(w, e))


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_kernel_matches_the_definitions(geom, variant):
    args = make_args(geom[0], geom[1], *variant)
    check_close(cpu.HEAD_KERNELS["spatial_head"](*args), oracle(*args), torch.float64)


def run_sim(args, schedule="forward", tile=TILE_NORMAL, op="spatial_head"):
    """(outputs, launch stats) of head op `op` through the simulator, outputs poisoned."""
    torch.ops.cbam_fused_sim.set_debug(True, tile)  # outputs poisoned with NaN
    try:
        with testing.use_simulator(schedule=schedule, seed=3):
            out = getattr(torch.ops.cbam_fused, op)(*args)
            stats = testing.simulator_stats()
    finally:
        torch.ops.cbam_fused_sim.set_debug(False, TILE_NORMAL)
    return out, stats


@needs_sim
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_simulated_kernel_matches_the_cpu_kernel(geom, variant, dtype):
    args = make_args(geom[0], geom[1], *variant, dtype=dtype)
    out, stats = run_sim(args)
    assert [s["name"] for s in stats] == ["spatial_head"]
    check_close(out, cpu.HEAD_KERNELS["spatial_head"](*args), dtype, args)


@needs_sim
@pytest.mark.parametrize("tile", [TILE_ONE_BLOCK, TILE_UNSTAGED, TILE_FULL_BLOCKS])
@pytest.mark.parametrize("geom", [((5, 9), 7), ((3, 4, 5), 3), ((40,), 7)])
def test_grid_stride_unstaged_and_full_block_paths(geom, tile):
    """One block walking every chunk (N S = 135 to 600 positions, chunks of 64), the taps
    reading global memory, and chunks of 256: the same values as the normal launch."""
    args = make_args(geom[0], geom[1], "max,mean", True, "affine", True, n=5)
    out, stats = run_sim(args, tile=tile)
    if tile == TILE_ONE_BLOCK:
        assert stats[0]["grid"][0] == 1
    elif tile == TILE_UNSTAGED:
        assert stats[0]["smem_bytes"] == 0
    else:
        assert stats[0]["block"][0] == 256
    normal, nstats = run_sim(args)
    assert nstats[0]["smem_bytes"] > 0 and nstats[0]["block"][0] == 64  # staged, small chunks
    for a, b in zip(out, normal):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


@needs_sim
def test_staging_reads_the_map_about_once():
    """The staged path reads u and v (blockDim + 2 reach) / blockDim times over, not cin k^2
    times: 2-D 16x16 maps, k = 7 (reach 3 * 16 + 3 = 51), 8 samples, blocks of 256."""
    args = make_args((16, 16), 7, "max,mean", False, "none", True, n=8, dtype=torch.float32)
    _, staged = run_sim(args, tile=TILE_FULL_BLOCKS)
    _, direct = run_sim(args, tile=TILE_UNSTAGED)
    map_bytes = 2 * args[0].numel() * 4
    assert staged[0]["bytes_read"] < 1.5 * map_bytes + 4096, staged[0]["bytes_read"]
    assert direct[0]["bytes_read"] > 20 * map_bytes, direct[0]["bytes_read"]


@needs_sim
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_no_race(schedule):
    args = make_args((6, 7), 7, "mean,max", True, "affine", True, n=4, dtype=torch.float32)
    want, _ = run_sim(args)
    for tile in (TILE_NORMAL, TILE_ONE_BLOCK, TILE_FULL_BLOCKS):
        got, _ = run_sim(args, schedule=schedule, tile=tile)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------ bad input
BAD = [
    (lambda a: a.__setitem__(9, "avg,max"), "spatial_pools must be 'max,mean', 'mean,max' or "
                                            "'blend', got 'avg,max'"),
    (lambda a: a.__setitem__(0, a[0].reshape(3, 5, 9)), "avg must have shape [N, 1, *spatial] "
                                                        "with 1 to 3 spatial dimensions, got [3, 5, 9]"),
    (lambda a: a.__setitem__(1, a[1][:2]), "max must have the shape of avg [3, 1, 5, 9], got "
                                           "[2, 1, 5, 9]"),
    (lambda a: a.__setitem__(1, a[1].float()), "max must have the dtype of avg (Double), got Float"),
    (lambda a: a.__setitem__(2, a[2][:, :, :6, :6]), "conv_w must have shape [1, 2, k, k] with "
                                                     "an odd k, got [1, 2, 6, 6]"),
    (lambda a: a.__setitem__(2, a[2][:, :1]), "conv_w must have shape [1, 2, k, k] with an odd "
                                              "k, got [1, 1, 7, 7]"),
    (lambda a: a.__setitem__(3, torch.zeros(2, dtype=torch.float64)),
     "conv_b must have shape [1], got [2]"),
    (lambda a: a.__setitem__(7, None), "bn_rm and bn_rv must be given together"),
    (lambda a: (a.__setitem__(6, None), a.__setitem__(7, None)),
     "bn_w and bn_b need bn_rm and bn_rv"),
]


def _bad_args(mutate):
    args = list(make_args((5, 9), 7, "max,mean", True, "affine", True))
    mutate(args)
    return args


def check_refused_everywhere(op, args, message, where):
    """op refuses args with `message` (after "op: ") on its CPU kernel, its fake kernel or the
    simulator's launcher (`where`)."""
    if where == "sim" and not sim_has(op):
        pytest.skip("the simulator build is missing")
    with pytest.raises(RuntimeError, match=f"{op}: ") as e:
        if where == "fake":
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode(allow_non_fake_inputs=True):
                getattr(torch.ops.cbam_fused, op)(*args)
        elif where == "sim":
            getattr(torch.ops.cbam_fused_sim, op)(*args)
        else:
            getattr(torch.ops.cbam_fused, op)(*args)
    assert message in str(e.value), (where, str(e.value))


@pytest.mark.parametrize("mutate,message", BAD)
@pytest.mark.parametrize("where", ["cpu", "fake", "sim"])
def test_bad_input_is_named(mutate, message, where):
    check_refused_everywhere("spatial_head", _bad_args(mutate), message, where)


def test_float16_maps_are_refused():
    args = _bad_args(lambda a: None)
    args = [t.half() if isinstance(t, torch.Tensor) else t for t in args]
    with pytest.raises(RuntimeError, match="avg must be float32 or float64"):
        torch.ops.cbam_fused.spatial_head(*args)


@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_opcheck(variant):
    args = make_args((5, 6), 3, *variant, dtype=torch.float32)
    torch.library.opcheck(torch.ops.cbam_fused.spatial_head.default, args)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = make_args((4, 5, 6), 3, "blend", False, "none", True)
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        gs, smap, z = torch.ops.cbam_fused.spatial_head(*fargs)
    assert gs.shape == (3, 120) and smap.shape == (3, 1, 4, 5, 6) and z.shape == (3, 1, 4, 5, 6)


# ------------------------------------------------------------------------------ in the block
@needs_sim
@pytest.mark.parametrize("variant", ["official", "timm_light", "ultralytics"])
@pytest.mark.parametrize("train", [True, False])
def test_block_runs_one_head_launch(variant, train):
    """The block's spatial gate is one spatial_head launch whatever its BatchNorm (with batch
    statistics the op gives the conv output and batch_norm_gate follows; ultralytics has
    none), its backward one spatial_head_backward (two launches: the pass and the sums), and the
    block still matches the reference, forward and gradients."""
    from test_functional import _module, compare_with_reference
    m = _module(variant, 6, 2, torch.float64)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    with testing.use_simulator():
        compare_with_reference(m, x, train, 1e-10)
        names = [s["name"] for s in testing.simulator_stats()]
    assert names.count("spatial_head") == 1, names
    assert names.count("spatial_head_backward") == 2, names


@needs_cuda
@pytest.mark.skipif(not _ops.has_cuda_kernel("spatial_head"), reason="no CUDA kernel built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("geom", GEOMS + [((56, 56), 7), ((7, 7), 7)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_kernel_matches_the_cpu_kernel(geom, variant, dtype):
    args = make_args(geom[0], geom[1], *variant, dtype=dtype, n=4)
    want = cpu.HEAD_KERNELS["spatial_head"](*args)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]
    got = torch.ops.cbam_fused.spatial_head(*dev)
    check_close([t.cpu() for t in got], want, dtype, args)
    again = torch.ops.cbam_fused.spatial_head(*dev)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["cpu", "sim"])
def test_empty_batch(where):
    if where == "sim" and not HAVE_SIM:
        pytest.skip("the simulator build is missing")
    args = make_args((5, 6), 3, "max,mean", True, "affine", True, n=0)
    if where == "sim":
        (gs, smap, z), stats = run_sim(args)
        assert stats == []  # nothing to launch
    else:
        gs, smap, z = torch.ops.cbam_fused.spatial_head(*args)
    assert gs.shape == (0, 30) and smap.shape == (0, 2, 5, 6) and z.shape == (0, 1, 5, 6)


@needs_sim
def test_wide_maps_take_the_unstaged_path():
    """A map whose chunk span does not fit kMaxHeadStageBytes (7 x 1200, k = 7: reach 3603,
    2 x 7462 floats) runs unstaged by itself, with the same values as the CPU kernel."""
    args = make_args((7, 1200), 7, "max,mean", True, "affine", True, n=1, dtype=torch.float32)
    out, stats = run_sim(args)
    assert stats[0]["smem_bytes"] == 0
    check_close(out, cpu.HEAD_KERNELS["spatial_head"](*args), torch.float32, args)
