"""The CUDA kernels of every cbam_fused op, executed on the CPU by the SIMT simulator.

Each op's CUDA kernel sources (csrc/kernels, csrc/launchers, built by g++ into cbam_fused._sim)
run in the simulator through cbam_fused.testing.use_simulator() and are compared against the
op's pure-PyTorch CPU kernel (cbam_fused._cpu_kernels, the oracle), for every dtype, both memory
layouts (channels-first and channels-last, 1-D / 2-D / 3-D spatial) and a non-dense input, on
shapes that reach every code path: S = 1, C = 1, N = 1, odd sizes, sizes that are not multiples
of the vector width or of the lanes of a tile, and every tiling (the launchers' debug tile modes:
the normal heuristics; tiny tiles that split every reduction into many partials, which the last
block of each group folds in the same launch; one row tile spanning all rows, whose small-tensor
staging goes in several chunks). Outputs (and partials) are poisoned (NaN, INT64_MIN) by the
launchers before the kernels run, so an element no kernel writes fails the comparison. Also:
NaN / inf / ties in the pools, bitwise-equal results under the forward, reverse and shuffled
fiber and block orders, and the pass budget (DESIGN.md section 3) from the simulator's byte
counts.
"""
import contextlib
import zlib

import pytest
import torch

import cbam_fused  # noqa: F401  registers the ops
from cbam_fused import _cpu_kernels as cpu

from conftest import sim_has

testing = pytest.importorskip("cbam_fused.testing")
HAVE_SIM = sim_has("grad_input")

pytestmark = pytest.mark.skipif(not HAVE_SIM, reason="the simulator build (cbam_fused._sim) "
                                "is missing")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TILE_NORMAL, TILE_SMALL, TILE_SINGLE = 0, 1, 2


@pytest.fixture(autouse=True)
def poisoned_outputs():
    torch.ops.cbam_fused_sim.set_debug(True, TILE_NORMAL)
    yield
    torch.ops.cbam_fused_sim.set_debug(False, TILE_NORMAL)


def tile_mode(mode):
    torch.ops.cbam_fused_sim.set_debug(True, mode)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ inputs
def to_layout(x, layout):
    """x ([N, C, *spatial], contiguous) in `layout`: cf, cl (channels-last, any spatial rank) or
    strided (neither; the launchers copy it once)."""
    if layout == "cf":
        return x
    if layout == "cl":
        perm = [0] + list(range(2, x.dim())) + [1]
        inv = [perm.index(i) for i in range(x.dim())]
        return x.permute(perm).contiguous().permute(inv)
    if layout == "strided":
        big = torch.empty(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(layout)


def rand_x(shape, dtype, layout, gen, kind="normal"):
    if kind == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:  # small integers: many ties in the max, exact in every dtype
        x = torch.randint(-3, 4, shape, generator=gen).to(torch.float64)
    return to_layout(x.to(dtype), layout)


def small(n, l, dtype, gen, lo=0.0, hi=1.0):
    return (torch.rand((n, l), generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(acc(dtype))


def index(n, l, ext, gen):
    return torch.randint(0, ext, (n, l), generator=gen)


def dims(x):
    s = 1
    for d in x.shape[2:]:
        s *= d
    return x.shape[0], x.shape[1], s


# --------------------------------------------------------------------------------- the ops
def op_args(op, x, gen, variant):
    """Arguments of `op` for input x; `variant` picks which optional tensors are present."""
    n, c, s = dims(x)
    dt = x.dtype
    full = variant == 0
    if op in ("pool_over_s", "pool_over_c", "pool_over_s_lp_lse"):
        ext = c if op == "pool_over_c" else s
        return (x, small(n, ext, dt, gen, 0.2, 1.5) if full else None)
    if op == "apply_gates":
        gc = small(n, c, dt, gen) if variant in (0, 1) else None
        gs = small(n, s, dt, gen) if variant in (0, 2) else None
        return (x, gc, gs)
    if op == "backward_reduce":
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dt)
        g = to_layout(g.contiguous(), "cl" if variant == 2 else "cf")  # grad may differ from x
        gc = small(n, c, dt, gen) if variant in (0, 2) else None
        gs = small(n, s, dt, gen) if variant in (0, 2) else None
        need = [(True, True), (True, False), (False, True)][variant]
        return (g, x, gc, gs) + need
    if op == "pool_over_s_backward_scale_lp_lse":  # the pools saw x * scale
        scale = small(n, s, dt, gen, 0.2, 1.5) if variant in (0, 1) else None
        v = x.to(acc(dt)).reshape(n, c, s) * (1 if scale is None else scale[:, None, :])
        d_lp = torch.randn((n, c), generator=gen, dtype=acc(dt)) if variant in (0, 2) else None
        d_lse = torch.randn((n, c), generator=gen, dtype=acc(dt)) if variant in (0, 1) else None
        q2 = op_args("pool_over_s_backward_scale", x, gen, variant)
        return (q2[:4] + (scale, d_lp, v.square().sum(2).sqrt(), d_lse, torch.logsumexp(v, 2))
                + q2[4:])
    if op in ("pool_over_c_backward_scale", "pool_over_s_backward_scale"):
        l, ext = (s, c) if op == "pool_over_c_backward_scale" else (c, s)
        d_avg = torch.randn((n, l), generator=gen, dtype=acc(dt)) if variant in (0, 1) else None
        d_max = torch.randn((n, l), generator=gen, dtype=acc(dt)) if variant in (0, 2) else None
        am = index(n, l, ext, gen) if variant in (0, 2) else None
        # the store's steps: + base and the sigmoid's backward (variant 0), + base (1), none (2)
        base = torch.randn((n, ext), generator=gen, dtype=acc(dt)) if variant in (0, 1) else None
        gate = small(n, ext, dt, gen, 0.05, 0.95) if variant == 0 else None
        return (x, d_avg, d_max, am, base, gate)
    if op == "grad_input":
        arrangement = variant
        gc, gs = small(n, c, dt, gen), small(n, s, dt, gen)
        da, dm = torch.randn((n, c), generator=gen, dtype=acc(dt)), torch.randn(
            (n, c), generator=gen, dtype=acc(dt))
        du, dv = torch.randn((n, s), generator=gen, dtype=acc(dt)), torch.randn(
            (n, s), generator=gen, dtype=acc(dt))
        i_s, i_c = index(n, c, s, gen), index(n, s, c, gen)
        if arrangement == 1:  # spatial first: the spatial pool has no max here
            dv, i_c = None, None
        if arrangement == 2:  # parallel, channel gate only
            gs, du, dv, i_c = None, None, None, None
        return (x, gc, gs, da, dm, i_s, du, dv, i_c, arrangement)
    if op == "grad_input_lp_lse":  # x plays grad; the pooled input is another x-sized tensor
        args = op_args("grad_input", x, gen, variant)
        xin = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dt)
        xin = to_layout(xin.contiguous(), "cl" if variant == 1 else "cf")  # may differ from grad
        v = xin.to(acc(dt)).reshape(n, c, s)
        if variant == 1 and args[2] is not None:  # spatial first: the pools saw x gs
            v = v * args[2][:, None, :]
        lp = v.square().sum(2).sqrt()
        lse = torch.logsumexp(v, 2)
        d_lp = torch.randn((n, c), generator=gen, dtype=acc(dt)) if variant in (0, 1) else None
        d_lse = torch.randn((n, c), generator=gen, dtype=acc(dt)) if variant in (0, 2) else None
        return (args[0], xin) + args[1:9] + (d_lp, lp, d_lse, lse, args[9])
    raise ValueError(op)


OPS = ["pool_over_s", "pool_over_s_lp_lse", "pool_over_c", "apply_gates", "backward_reduce",
       "pool_over_c_backward_scale", "pool_over_s_backward_scale",
       "pool_over_s_backward_scale_lp_lse", "grad_input", "grad_input_lp_lse"]
X_SHAPED = ("apply_gates", "grad_input", "grad_input_lp_lse")


def run_sim(op, args, schedule="forward", seed=0):
    with testing.use_simulator(schedule=schedule, seed=seed):
        out = getattr(torch.ops.cbam_fused, op)(*args)
    return out if isinstance(out, (tuple, list)) else (out,)


def run_cpu(op, args):
    out = cpu.ORACLE[op](*args)
    return out if isinstance(out, (tuple, list)) else (out,)


def tolerances(op, dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if op in X_SHAPED and dtype in (torch.float16, torch.bfloat16):
        # same float32 arithmetic, then one rounding to the output dtype
        return dict(rtol=1e-3 if dtype == torch.float16 else 8e-3, atol=1e-5)
    return dict(rtol=1e-5, atol=2e-5)


def check_same(op, got, want, x, layout):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype, (op, g.dtype, w.dtype)
        assert g.shape == w.shape, (op, g.shape, w.shape)
        if g.dtype == torch.int64:
            assert torch.equal(g, w), (op, g, w)
        else:
            torch.testing.assert_close(g, w, equal_nan=True, **tolerances(op, x.dtype))
    if op in X_SHAPED and layout != "strided":
        # x's memory format (the input of grad_input is grad, args[0])
        assert got[0].stride() == x.stride(), (op, got[0].stride(), x.stride())


# Shapes (N, C, spatial): every path at least once.
SHAPES = [
    (2, 5, (7,)),          # 1-D, odd everything
    (1, 1, (3, 5)),        # C = 1, N = 1
    (3, 6, (1, 1)),        # S = 1
    (1, 12, (5, 7)),       # odd H and W
    (2, 3, (2, 3, 3)),     # 3-D
    (1, 16, (4, 8)),       # C and S multiples of every vector width
    (2, 70, (3, 3)),       # C over 64 (several row tiles / lanes), S odd
    (1, 4, (10, 30)),      # S = 300: more rows than one staging chunk (channels-last)
    (1, 2, (33, 33)),      # S = 1089: a channels-first row over several column tiles
    (1, 600, (2,)),        # C = 600: the channels-first strided reductions split over row tiles
    (1, 2, (20, 30)),      # S = 600: the same in channels-last
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_op_matches_cpu_kernel(op, dtype, layout):
    """Every shape under every tiling (normal, tiny tiles, one row tile), outputs poisoned."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{op}{dtype}{layout}".encode()))
    for si, (n, c, sp) in enumerate(SHAPES):
        x = rand_x((n, c) + sp, dtype, layout, gen)
        for mode in (TILE_NORMAL, TILE_SMALL, TILE_SINGLE):
            variant = (si + mode) % 3
            args = op_args(op, x, gen, variant)
            tile_mode(mode)
            got = run_sim(op, args)
            tile_mode(TILE_NORMAL)
            want = run_cpu(op, args)
            check_same(op, got, want, x, layout)


@pytest.mark.parametrize("op", OPS)
def test_non_dense_input(op):
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float16):
        x = rand_x((2, 6, 3, 5), dtype, "strided", gen)
        args = op_args(op, x, gen, 0)
        check_same(op, run_sim(op, args), run_cpu(op, args), x, "strided")


@pytest.mark.parametrize("op", OPS)
def test_every_optional_combination(op):
    """The variants not reached above: every optional tensor present or absent."""
    gen = torch.Generator().manual_seed(11)
    x = rand_x((2, 5, 3, 3), torch.float32, "cf", gen)
    for variant in range(3):
        args = op_args(op, x, gen, variant)
        check_same(op, run_sim(op, args), run_cpu(op, args), x, "cf")


def ties_nan_inf_x(shape, dtype, layout, gen):
    """Small integers (ties everywhere) with NaN twice in one row, inf, a -inf position in every
    channel and an all -inf channel: the max pools' hard cases (shape at least (2, 8, 4, 5))."""
    x = rand_x(shape, dtype, "cf", gen, kind="ints")
    x[0, 2, 1, 1] = float("nan")
    x[0, 2, 3, 4] = float("nan")
    x[0, 4, 2, 2] = float("inf")
    x[1, :, 0, 3] = float("-inf")
    x[1, 1, :, :] = float("-inf")
    x[1, 7, 3, 4] = float("nan")
    return to_layout(x, layout)


@pytest.mark.parametrize("shape", [(2, 9, 5, 5), (2, 16, 4, 8)], ids=["scalar", "vector"])
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pools_ties_nan_inf(layout, dtype, shape):
    """Max pooling as torch.max: first occurrence of ties, NaN wins (first NaN), inf; on the
    scalar path and on the vector path (C and S multiples of 8)."""
    gen = torch.Generator().manual_seed(3)
    for mode in (TILE_NORMAL, TILE_SMALL):
        x = ties_nan_inf_x(shape, dtype, layout, gen)
        for op in ("pool_over_s", "pool_over_c", "pool_over_s_lp_lse"):
            for variant in (0, 1):
                args = op_args(op, x, gen, variant)
                tile_mode(mode)
                got = run_sim(op, args)
                tile_mode(TILE_NORMAL)
                check_same(op, got, run_cpu(op, args), x, layout)


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_lp_lse_pools_match_the_official_code(layout):
    """pool_over_s_lp_lse's lp and lse against the official code's own formulas (F.lp_pool2d
    with norm 2, logsumexp_2d), NaN / inf / -inf / an all -inf channel / huge values included:
    the CPU kernel and the simulated CUDA kernel, every tiling."""
    import torch.nn.functional as F
    import official_cbam as oc

    gen = torch.Generator().manual_seed(13)
    x = torch.randn((2, 7, 6, 5), generator=gen, dtype=torch.float64) * 4
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    x[0, 3, :, 1] = float("-inf")
    x[0, 4] = float("-inf")
    x[1, 5, 1, 1] = 800.0  # exp overflows without the max shift
    want_lp = F.lp_pool2d(x, 2, (6, 5), stride=(6, 5)).flatten(1)
    want_lse = oc.logsumexp_2d(x).flatten(1)
    x = to_layout(x, layout)
    got = [run_cpu("pool_over_s_lp_lse", (x, None))]
    for mode in (TILE_NORMAL, TILE_SMALL, TILE_SINGLE):
        tile_mode(mode)
        got.append(run_sim("pool_over_s_lp_lse", (x, None)))
    tile_mode(TILE_NORMAL)
    for _, _, _, lp, lse in got:
        torch.testing.assert_close(lp, want_lp, equal_nan=True, rtol=1e-12, atol=0)
        torch.testing.assert_close(lse, want_lse, equal_nan=True, rtol=1e-12, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_bitwise_equal_under_every_schedule(op):
    """No races: forward, reverse and shuffled fiber orders give bitwise-equal results."""
    gen = torch.Generator().manual_seed(5)
    for layout, mode in (("cf", TILE_SMALL), ("cl", TILE_SMALL), ("cf", TILE_NORMAL)):
        x = rand_x((2, 7, 3, 5), torch.float32, layout, gen)
        args = op_args(op, x, gen, 0)
        tile_mode(mode)
        ref = run_sim(op, args, "forward")
        for schedule, seed in (("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
            got = run_sim(op, args, schedule, seed)
            for g, r in zip(got, ref):
                assert g.dtype == r.dtype and g.shape == r.shape
                if g.is_floating_point():
                    g, r = g.contiguous().view(torch.int32), r.contiguous().view(torch.int32)
                assert torch.equal(g, r), (op, layout, mode, schedule, seed)
        tile_mode(TILE_NORMAL)


REDUCTIONS = [op for op in OPS if op not in X_SHAPED]


@pytest.mark.parametrize("op", REDUCTIONS)
def test_split_reductions_finish_in_one_launch(op):
    """A reduction split over tiles (the tiny tiles split every one; the normal tiles the folded
    rows of a 7x7 map over its 512 channels) is one launch: the last block of each group of tiles folds the
    group's partials (kernels/combine_partials.cuh). Whichever block comes last (the simulator
    runs the blocks in linear, reverse and shuffled order), the CPU kernel's values, the same
    bits; the kept group counters are zero again after every launch, and a counter left non-zero
    loses its group's outputs (so the counters are what finishes them). Under a CUDA-graph
    capture (simulated) each launch zeroes a buffer of its own and the kept ones stay as they
    were."""
    from cbam_fused import _sim as sim

    counters = torch.ops.cbam_fused_sim.group_counters
    gen = torch.Generator().manual_seed(zlib.crc32(op.encode()))
    # (layout, tiling, shape, split): a 7x7 map of 512 channels folds 4 rows of 49 into one
    # (reduce_r's and backward_reduce's folded kernels, split over row tiles); the reductions
    # along its rows of 49 take one thread a row, one tile (reduce_k_rows)
    folded_split = op in ("pool_over_c", "backward_reduce", "pool_over_s_backward_scale",
                          "pool_over_s_backward_scale_lp_lse")
    cases = [("cf", TILE_SMALL, (2, 7, 3, 5), True), ("cl", TILE_SMALL, (2, 7, 3, 5), True),
             ("cf", TILE_NORMAL, (1, 512, 7, 7), folded_split)]
    for layout, mode, shape, split in cases:
        x = rand_x(shape, torch.float32, layout, gen)
        args = op_args(op, x, gen, 0)
        want = run_cpu(op, args)
        tile_mode(mode)
        try:
            ref = None
            for schedule, seed in (("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
                with testing.use_simulator(schedule=schedule, seed=seed):
                    got = getattr(torch.ops.cbam_fused, op)(*args)
                    stats = testing.simulator_stats()
                got = got if isinstance(got, (tuple, list)) else (got,)
                assert len(stats) == 1, (op, layout, mode, [s["name"] for s in stats])
                check_same(op, got, want, x, layout)
                ref = ref or got
                for g, r in zip(got, ref):
                    assert torch.equal(g.contiguous().view(torch.uint8),
                                       r.contiguous().view(torch.uint8)), (op, schedule, seed)
                kept = counters()
                assert kept and all(int(b.abs().sum()) == 0 for b in kept), (op, layout, mode)
            # counters that are not zero at the launch: no group sees its last block, its
            # outputs stay poisoned
            (buf,) = [b for b in counters() if b.device.type == "cpu"]
            buf.fill_(1 << 20)
            try:
                bad = run_sim(op, args)
                differs = any(not torch.equal(b, r) for b, r in zip(bad, ref))
                assert differs == split, (op, layout, mode, split)
            finally:
                buf.zero_()
            # the CUDA-graph path: a zeroed buffer of the launch's own, the kept one untouched
            before = [b.data_ptr() for b in counters()]
            buf[1] = 7  # (the kept buffer, not read by the capture path)
            sim.set_capturing(True)
            try:
                got = run_sim(op, args)
            finally:
                sim.set_capturing(False)
                assert int(buf[1]) == 7
                buf.zero_()
            assert [b.data_ptr() for b in counters()] == before
            for g, r in zip(got, ref):
                assert torch.equal(g, r), (op, "capture")
        finally:
            tile_mode(TILE_NORMAL)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("op", REDUCTIONS)
def test_long_splits_fold_in_a_second_launch(op, layout):
    """Groups of very many partials (launchers/common.h combine_in_second_launch: 1024, 64 under
    the tiny tiles) are folded by a second launch, combine_groups_kernel, one output a warp: each
    lane a contiguous run of the partials in batches, then the lanes in order through a xor tree;
    the first launch's blocks find no group finished. The tiny tiles (2 lanes of a vector, 3
    rows a tile) split rows of 520 or 600 elements into 65 to 75 column tiles and 200 to 600 rows
    into 67 to 200 row tiles, so both directions' groups take that path: two launches, the CPU
    kernel's values, the same bits whichever block of the first launch finishes last, and the
    kept group counters untouched."""
    gen = torch.Generator().manual_seed(zlib.crc32((op + layout).encode()))
    shape = (1, 200, 20, 30) if layout == "cf" else (1, 520, 20, 30)
    rows, cols = (shape[1], 600) if layout == "cf" else (600, shape[1])
    assert -(-cols // (4 * 2)) >= 64 and -(-rows // 3) >= 64  # float32: 4 a vector
    x = rand_x(shape, torch.float32, layout, gen)
    args = op_args(op, x, gen, 0)
    want = run_cpu(op, args)
    counters = torch.ops.cbam_fused_sim.group_counters
    tile_mode(TILE_SMALL)
    try:
        ref = None
        for schedule, seed in (("forward", 0), ("reverse", 0), ("shuffle", 3)):
            with testing.use_simulator(schedule=schedule, seed=seed):
                got = getattr(torch.ops.cbam_fused, op)(*args)
                stats = testing.simulator_stats()
            got = got if isinstance(got, (tuple, list)) else (got,)
            # backward_reduce: both sides split, each folded by a launch of its own
            assert len(stats) == (3 if op == "backward_reduce" else 2), \
                (op, [s["name"] for s in stats])
            check_same(op, got, want, x, layout)
            ref = ref or got
            for g, r in zip(got, ref):
                assert torch.equal(g.contiguous().view(torch.uint8),
                                   r.contiguous().view(torch.uint8)), (op, schedule, seed)
            assert all(int(b.abs().sum()) == 0 for b in counters()), op
    finally:
        tile_mode(TILE_NORMAL)


def test_group_counters_grow():
    """A launch with more groups than the kept counter buffer holds gets a longer one, zeroed
    (the old one is dropped), and is right; every counter is zero after it."""
    counters = torch.ops.cbam_fused_sim.group_counters
    gen = torch.Generator().manual_seed(31)
    tile_mode(TILE_SMALL)  # rows of 16 in 2 column tiles, 3 rows a tile: a group per 3 channels
    try:
        run_sim("pool_over_s", (rand_x((1, 8, 4, 4), torch.float32, "cf", gen), None))
        (before,) = [b.numel() for b in counters() if b.device.type == "cpu"]
        c = 3 * (before + 100)
        x = rand_x((1, c, 4, 4), torch.float32, "cf", gen)
        got = run_sim("pool_over_s", (x, None))
    finally:
        tile_mode(TILE_NORMAL)
    check_same("pool_over_s", got, run_cpu("pool_over_s", (x, None)), x, "cf")
    (after,) = [b for b in counters() if b.device.type == "cpu"]
    assert after.numel() >= before + 100 and int(after.abs().sum()) == 0, (before, after.numel())


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("shape", [(2, 256, 14, 14), (1, 512, 14, 14)])
def test_block_launches(shape, layout):
    """The kernel launches of a CBAM block (cbam_fused.CBAM, BatchNorm in its spatial gate) on
    shapes where the reductions over the strided axis, Q1 and the channel head split over tiles
    (the launch's bytes written exceed its outputs: partials): an eval-mode forward is 6 (the
    two pools, the channel head's 2, the spatial head, the apply), its backward 7 (Q1, the
    spatial head's 2, Q2, the channel head's 2, Q3); with batch statistics 8 and 9 (the
    BatchNorm gate's 2 more each way). A reduction split over tiles finishes in its launch
    (kernels/combine_partials.cuh), so no shape adds one."""
    gen = torch.Generator().manual_seed(37)
    m = cbam_fused.CBAM(shape[1])  # (BatchNorm in the spatial gate by default)
    x = rand_x(shape, torch.float32, layout, gen)
    for train, fwd, bwd in ((False, 6, 7), (True, 8, 9)):
        m.train(train)
        xr = x.clone().requires_grad_()
        with testing.use_simulator():
            y = m(xr)
            stats = testing.simulator_stats()
            names_fwd = [_stat(s, "name") for s in stats]
        n, c = shape[:2]
        outs = {"pool_over_s": n * c * 16, "pool_over_c": x[0, 0].numel() * n * 16}  # avg max arg
        assert any(_stat(s, "bytes_written") > outs[_stat(s, "name")] for s in stats
                   if _stat(s, "name") in outs), "no pool split over tiles"
        with testing.use_simulator():
            y.backward(torch.randn(y.shape, generator=gen))
            names_bwd = [_stat(s, "name") for s in testing.simulator_stats()]
        assert len(names_fwd) == fwd, (train, names_fwd)
        assert len(names_bwd) == bwd, (train, names_bwd)
        assert names_fwd.count("channel_head") == 2 and names_bwd.count("backward_reduce") == 1


def _stat(s, key):
    return s[key] if isinstance(s, dict) else getattr(s, key)


def run_tuned(op, args, setting, with_bytes=False):
    """op in the simulator under set_tuning(*setting): (its outputs as a tuple, its launches as
    (kernel instance, grid, block) each; with_bytes: and bytes read, bytes written, in which
    tilings of one grid differ by their partials)."""
    torch.ops.cbam_fused_sim.set_tuning(*setting)
    with testing.use_simulator():
        got = getattr(torch.ops.cbam_fused, op)(*args)
        launches = [(_stat(s, "kernel"), tuple(_stat(s, "grid")), tuple(_stat(s, "block")))
                    + ((_stat(s, "bytes_read"), _stat(s, "bytes_written")) if with_bytes else ())
                    for s in testing.simulator_stats()]
    return (got if isinstance(got, (tuple, list)) else (got,)), launches


def assert_schedules_agree(op, args, outs, seed):
    """The reverse and shuffled fiber schedules give the same bits as `outs` (no race), under
    the tuning set now."""
    for sched in ("reverse", "shuffle"):
        for a, b in zip(outs, run_sim(op, args, sched, seed=seed)):
            assert torch.equal(a, b), (op, sched)


def op_bytes(op, args):
    """(bytes read, bytes written) by all launches of one op call in the simulator."""
    with testing.use_simulator():
        getattr(torch.ops.cbam_fused, op)(*args)
        stats = testing.simulator_stats()
    assert stats, f"{op}: no simulated launch"
    return (sum(_stat(s, "bytes_read") for s in stats),
            sum(_stat(s, "bytes_written") for s in stats))


# op -> (x-sized passes read, x-sized passes written): DESIGN.md section 3.
BUDGET = {
    "pool_over_s": (1, 0),
    "pool_over_c": (1, 0),
    "apply_gates": (1, 1),
    "backward_reduce": (2, 0),
    "pool_over_c_backward_scale": (1, 0),
    "pool_over_s_backward_scale": (1, 0),
    "grad_input": (1, 1),
    "pool_over_s_lp_lse": (1, 0),
    "grad_input_lp_lse": (2, 1),  # reads g and x
    "pool_over_s_backward_scale_lp_lse": (1, 0),
}


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pass_budget(layout, dtype):
    """Each op reads and writes x-sized tensors only as often as its passes (plus 10% for the
    small tensors it reads and writes, and the partials of its two-stage reductions); the forward
    (3 ops) stays within 4.2 x-sized passes and the backward (3 ops) within 5.3 (issue 4)."""
    gen = torch.Generator().manual_seed(9)
    x = rand_x((1, 256, 16, 16), dtype, layout, gen)
    xb = x.numel() * x.element_size()
    total = {}
    for op, (r, w) in BUDGET.items():
        read, written = op_bytes(op, op_args(op, x, gen, 0))
        assert read >= r * xb and written >= w * xb, (op, read, written, xb)
        assert read <= (r + 0.2) * xb, (op, "read", read / xb)
        assert written <= (w + 0.2) * xb, (op, "written", written / xb)
        total[op] = read + written
    forward = total["pool_over_s"] + total["pool_over_c"] + total["apply_gates"]
    backward = (total["backward_reduce"] + total["pool_over_c_backward_scale"]
                + total["grad_input"])
    assert forward <= 4.2 * xb and backward <= 5.3 * xb, (
        forward / xb, backward / xb, {op: t / xb for op, t in total.items()})


def test_bad_arguments_name_what_was_expected():
    x = torch.randn(2, 4, 3, 3)
    with testing.use_simulator():
        with pytest.raises(RuntimeError, match="scale must have shape"):
            torch.ops.cbam_fused_sim.pool_over_s(x, torch.ones(2, 4))
        with pytest.raises(RuntimeError, match="gc must have dtype"):
            torch.ops.cbam_fused_sim.apply_gates(x, torch.ones(2, 4, dtype=torch.float64), None)
        with pytest.raises(RuntimeError, match="at least one spatial dimension"):
            torch.ops.cbam_fused_sim.pool_over_c(torch.randn(2, 4), None)
        with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
            torch.ops.cbam_fused_sim.apply_gates(x.int(), None, None)
        with pytest.raises(RuntimeError, match="grad must have the shape of x"):
            torch.ops.cbam_fused_sim.backward_reduce(x[:1], x, None, None, True, True)
        with pytest.raises(RuntimeError, match="arrangement must be"):
            torch.ops.cbam_fused_sim.grad_input(x, None, None, None, None, None, None, None,
                                                None, 3)
        with pytest.raises(RuntimeError, match="x must have the shape of grad"):
            torch.ops.cbam_fused_sim.grad_input_lp_lse(x, x[:1], *[None] * 12, 0)
        with pytest.raises(RuntimeError, match="d_lse needs lse"):
            torch.ops.cbam_fused_sim.grad_input_lp_lse(x, x, *[None] * 10, torch.ones(2, 4),
                                                       None, 0)
        with pytest.raises(RuntimeError, match="lp must have shape"):
            torch.ops.cbam_fused_sim.grad_input_lp_lse(x, x, *[None] * 8, torch.ones(2, 4),
                                                       torch.ones(2, 9), None, None, 0)
        with pytest.raises(RuntimeError, match="d_lp needs lp"):
            torch.ops.cbam_fused_sim.pool_over_s_backward_scale_lp_lse(
                x, None, None, None, None, torch.ones(2, 4), None, None, None)
        with pytest.raises(RuntimeError, match="scale must have shape"):
            torch.ops.cbam_fused_sim.pool_over_s_backward_scale_lp_lse(
                x, None, None, None, torch.ones(2, 4), None, None, None, None)
        with pytest.raises(RuntimeError, match="d_max needs argmax"):
            torch.ops.cbam_fused_sim.pool_over_s_backward_scale(x, None, torch.ones(2, 4), None)


def test_empty_and_unneeded_outputs():
    x = torch.randn(0, 4, 3, 3)
    with testing.use_simulator():
        a, m, i = torch.ops.cbam_fused_sim.pool_over_s(x, None)
        assert a.shape == (0, 4) and i.dtype == torch.int64
        x = torch.randn(2, 4, 3, 3)
        rc, rs = torch.ops.cbam_fused_sim.backward_reduce(x, x, None, None, False, True)
        assert rc.shape == (0,) and rc.dtype == torch.float32 and rs.shape == (2, 9)


# ------------------------------------------------------------------ the whole block, simulated
def _module_cases():
    from variants import VARIANTS
    return sorted(VARIANTS)


@pytest.mark.parametrize("variant", _module_cases())
def test_cbam_module_through_simulator(variant):
    """cbam_fused.CBAM with every op in the simulator against cbam_fused.reference: forward,
    every gradient and the BatchNorm statistics, train and eval, float64 and float32,
    channels-first and channels-last."""
    from test_functional import _module, compare_with_reference

    gen = torch.Generator().manual_seed(zlib.crc32(variant.encode()))
    for dtype, layout, train in ((torch.float64, "cf", True), (torch.float32, "cl", False),
                                 (torch.float32, "cf", True), (torch.float64, "cl", False)):
        m = _module(variant, 6, 2, dtype)
        x = rand_x((2, 6, 5, 3), dtype, layout, gen)
        with testing.use_simulator():
            compare_with_reference(m, x, train, 1e-10 if dtype == torch.float64 else 1e-5)
            names = {s["name"] if isinstance(s, dict) else s.name
                     for s in testing.simulator_stats()}
        assert names, "nothing ran in the simulator"


@pytest.mark.parametrize("variant", ["official", "spatial_first", "parallel", "timm_light",
                                     "official_lp_lse", "spatial_first_lp_lse"])
def test_gradcheck_through_simulator(variant):
    """float64 gradcheck of functional.cbam for x and every parameter, every op simulated."""
    from conftest import randomize_
    from test_gradcheck import gradcheck_module
    from variants import make

    m = randomize_(make(variant, 5, hidden=3)).double().train()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    with testing.use_simulator(schedule="shuffle", seed=3):
        assert gradcheck_module(m, x)
        x = to_layout(x, "cl")
        assert gradcheck_module(m.eval(), x)


def _bytes_by_op(stats, names):
    """{"launches": [launches of each op in names], "bytes": [their bytes read and written]}."""
    mine = [[s for s in stats if _stat(s, "name") == n] for n in names]
    return {"launches": [len(m) for m in mine],
            "bytes": [sum(_stat(s, "bytes_read") + _stat(s, "bytes_written") for s in m)
                      for m in mine]}


@pytest.mark.parametrize("variant,fwd_max,bwd_max", [("official", 4.2, 5.3),
                                                     ("spatial_first", 4.2, 5.3),
                                                     ("parallel", 4.2, 4.3),
                                                     # Q3 also reads x for lp / lse
                                                     ("official_lp_lse", 4.2, 6.3),
                                                     ("parallel_lse", 4.2, 5.3),
                                                     ("spatial_first_lp_lse", 4.2, 6.3)])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "cf"), (torch.bfloat16, "cl")],
                         ids=["f32-cf", "bf16-cl"])
def test_block_pass_budget(variant, fwd_max, bwd_max, dtype, layout):
    """The whole CBAM block (cbam_fused.CBAM, every op simulated): global bytes of the forward
    and of the backward over the bytes of x (DESIGN.md section 3, issue 4). The budget is the
    x-sized ops' (as it was while the heads were ATen ops, uncounted); the spatial head's kernels
    (forward, and backward: its pass and its sums) and its BatchNorm's with batch statistics
    (batch_norm_gate, two launches each way) work on maps of 1 / C of x and are bounded on
    their own: here (C = 256) under 10% of x each, each way. The channel head's move its MLP's
    weights (at batch 1, a third of a bfloat16 x here): tests/test_channel_head*.py bound them by
    their tensors' bytes."""
    from conftest import randomize_
    from variants import make

    m = randomize_(make(variant, 256, hidden=16)).to(dtype).train()
    gen = torch.Generator().manual_seed(4)
    x = rand_x((1, 256, 16, 16), dtype, layout, gen).requires_grad_()
    xb = x.numel() * x.element_size()
    with testing.use_simulator():
        y = m(x)
        stats = testing.simulator_stats()
    small = ("spatial_head", "batch_norm_gate")
    head = _bytes_by_op(stats, small)
    fwd = sum(_stat(s, "bytes_read") + _stat(s, "bytes_written") for s in stats
              if _stat(s, "name") not in small + ("channel_head",))
    assert head["launches"] == [1, 2] and max(head["bytes"]) < 0.1 * xb, (head, xb)
    assert sum(_stat(s, "name") == "channel_head" for s in stats) == 2
    g = torch.randn(y.shape, generator=gen).to(dtype)
    with testing.use_simulator():
        y.backward(g)
        stats = testing.simulator_stats()
    small = ("spatial_head_backward", "batch_norm_gate_backward")
    head = _bytes_by_op(stats, small)
    bwd = sum(_stat(s, "bytes_read") + _stat(s, "bytes_written") for s in stats
              if _stat(s, "name") not in small + ("channel_head_backward",))
    assert head["launches"] == [2, 2] and max(head["bytes"]) < 0.1 * xb, (head, xb)
    assert fwd <= fwd_max * xb and bwd <= bwd_max * xb, (fwd / xb, bwd / xb)


# The launchers' tuning knobs at their defaults (csrc/launchers/launchers.h; the default_tuning
# fixture checks the build's, test_benchmarks_smoke bench_kernels'): tiles per SM (0: by op,
# csrc/launchers/op_tuning.h, else 32), min rows per thread, vector rows in flight (-1: by op,
# else as 0; 0: by element size), reduce_k mode, reduce_k vectors in flight, reduce_r mode, side
# share (0: by op, else 16), reduce_k vectors a lane per tile
DEFAULT_TUNING = (0, 4, -1, 3, 4, 1, 0, 32)
# The same for every op: the base values the ops without a row of op_tuning.h take
BASE_TUNING = (32, 4, 0, 3, 4, 1, 16, 32)


@pytest.fixture
def default_tuning():
    old = torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)
    assert tuple(old) == DEFAULT_TUNING, "a test left the tuning knobs changed"
    yield
    torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)


@pytest.mark.parametrize("op", OPS)
def test_grid_sizing_knobs_change_the_grid_not_the_result(op, default_tuning):
    """set_tuning (the knobs a GPU session sweeps, benchmarks/bench_kernels.py --sweep) changes
    how many blocks a launch has, and the results stay those of the CPU kernels."""
    gen = torch.Generator().manual_seed(11)
    # many rows (R = C = 2048), few columns: the row split is the knobs' to make
    x = rand_x((1, 2048, 2, 2), torch.float32, "cf", gen)
    args = op_args(op, x, gen, 0)
    want = run_cpu(op, args)
    grids = set()
    for tiles, rows in [(8, 4), (1, 1), (64, 1), (2, 16)]:
        # reduce_k mode 1: rows of 4 elements would take reduce_k_rows, whose grid is not tiled
        torch.ops.cbam_fused_sim.set_tuning(tiles, rows, 1, 1)
        with testing.use_simulator():
            got = getattr(torch.ops.cbam_fused, op)(*args)
            stats = testing.simulator_stats()
        got = got if isinstance(got, (tuple, list)) else (got,)
        check_same(op, got, want, x, "cf")
        grids.add(tuple(_stat(s, "grid")[0] for s in stats))
    assert len(grids) > 1, grids


def test_grid_sizing_knobs_are_checked(default_tuning):
    for bad in [(-1, 4, 1, 1), (65, 4, 1, 1), (8, 0, 1, 1), (8, 65, 1, 1), (8, 4, -2, 1),
                (8, 4, 3, 1), (8, 4, 1, 4), (8, 4, 1, -1), (8, 4, 1, 2, 0), (8, 4, 1, 2, 2),
                (8, 4, 1, 2, 8), (8, 4, 1, 2, 4, 2), (8, 4, 1, 2, 4, -1), (8, 4, 1, 2, 4, 0, -1),
                (8, 4, 1, 2, 4, 0, 65), (8, 4, 1, 2, 4, 0, 16, 3), (8, 4, 1, 2, 4, 0, 16, 0),
                (8, 4, 1, 2, 4, 0, 16, 12), (8, 4, 1, 2, 4, 0, 16, 64)]:
        with pytest.raises(RuntimeError, match="set_tuning"):
            torch.ops.cbam_fused_sim.set_tuning(*bad)
    # unchanged by the refusals
    assert tuple(torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)) == DEFAULT_TUNING


def test_side_traffic_floors_of_the_rows_per_tile(default_tuning):
    """The fewest rows a tile may have at a small channels-last site (R = S = 49, K = C = 2048,
    bfloat16), with one row per thread allowed (min_rows_per_thread 1, so the side traffic
    decides): the small tensors a tile stages may cost 1/16 of its x bytes (apply_gates' 4-byte
    gate and pool_over_c's 4-byte weight: 32 rows, 2 row tiles; the scale gradient's 12-byte
    weight and grad_input's 20 bytes: one tile), a second stage's partials 1/32 (pool_over_s, a
    reduction over rows: one tile). At 1/32 for both, every one of these ops ran one row tile
    there; at 1/8 the block's backward went over its pass budget (test_block_pass_budget)."""
    gen = torch.Generator().manual_seed(31)
    x = rand_x((2, 2048, 7, 7), torch.bfloat16, "cl", gen)
    want = {"apply_gates": 2 * 8 * 2, "grad_input": 2 * 8 * 1,  # 8 column tiles of 256
            "pool_over_c": 2 * 2 * 2, "pool_over_s_backward_scale": 2 * 2 * 1,  # 2 of 1024
            "pool_over_s": 2 * 8 * 1}
    torch.ops.cbam_fused_sim.set_tuning(8, 1, 0, 2, 4, 0, 16)
    for op, grid in want.items():
        args = op_args(op, x, gen, 0)
        with testing.use_simulator():
            got = getattr(torch.ops.cbam_fused, op)(*args)
            stats = testing.simulator_stats()
        assert _stat(stats[0], "grid")[0] == grid, (op, [_stat(s, "grid") for s in stats])
        check_same(op, got if isinstance(got, (tuple, list)) else (got,), run_cpu(op, args), x,
                   "cl")


def test_side_share_and_k_tile_vectors_change_the_grid_not_the_result(default_tuning):
    """The two knobs of the small sites' grids (a GPU sweep times them): side_share 4 lets a tile's
    staged values cost 1/4 of its x bytes (not 1/16), so the 7x7 channels-last site of 2048
    channels splits its 49 rows into more tiles (with min_rows_per_thread 1); k_tile_vectors 1
    gives reduce_k's column tiles one vector a lane (not 4), so its rows of 2048 channels split
    into 8 column tiles (not 2) and a second stage. Every op keeps the CPU kernels' results and
    its bits under every fiber schedule."""
    gen = torch.Generator().manual_seed(52)
    x = rand_x((2, 2048, 7, 7), torch.bfloat16, "cl", gen)
    base = (8, 1, 0, 3, 4, 0)  # one row a thread allowed: the side traffic decides
    for op in OPS:
        args = op_args(op, x, gen, 0)
        want = run_cpu(op, args)
        grids = {}
        for share, ktv in ((16, 4), (4, 4), (16, 1)):
            got, launches = run_tuned(op, args, base + (share, ktv))
            check_same(op, got, want, x, "cl")
            if (share, ktv) != (16, 4):
                assert_schedules_agree(op, args, got, seed=7)
            grids[share, ktv] = launches[0][1][0]
        if op in ("apply_gates", "pool_over_c"):  # staged values of 4 bytes: 32 rows, then 8
            assert grids[4, 4] > grids[16, 4], (op, grids)
        if op in REDUCE_K_OPS["cl"]:
            assert grids[16, 1] == 4 * grids[16, 4], (op, grids)
        else:
            assert grids[16, 1] == grids[16, 4], (op, grids)
        torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)


def op_tuning_rows():
    """The rows of csrc/launchers/op_tuning.h's kOpTuning: (op, channels-last, element bytes,
    tiles_per_sm, vec_rows_in_flight, side_share), 0 where the op keeps the base value."""
    import os
    import re
    path = os.path.join(os.path.dirname(__file__), "..", "csrc", "launchers", "op_tuning.h")
    with open(path) as f:
        text = f.read()
    table = text[text.index("kOpTuning[] = {"):]
    table = table[:table.index("};")]
    return [(op, cl == "true", int(eb), int(t), int(u), int(share)) for op, cl, eb, t, u, share
            in re.findall(r'\{"(\w+)", (true|false), (\d+), (\d+), (\d+), (\d+)\}', table)]


# One shape a row of kOpTuning, on one modelled SM (the grid's target is then tiles_per_sm
# tiles) where the row's knobs give another launch than the base values: rows of 2048 channels
# over 16 columns for the channels-first reductions across C and dx (256 rows a tile at least:
# 8 tiles at 32, 4 at 4), 2048 rows of 256 for the pool over S (64 rows a tile at least: 32 tiles
# at 32, 16 at 16), the 7x7 channels-last map of 2048 channels for the side shares (its 49 rows
# split by the staged values' floor), and for the rows in flight the kernel instance.
OP_TUNING_SHAPES = {("pool_over_s", False): (1, 2048, 16, 16),
                    ("pool_over_c", False): (1, 2048, 4, 4),
                    ("pool_over_s_backward_scale", False): (1, 2048, 4, 4),
                    ("grad_input", False): (1, 2048, 4, 4),
                    ("pool_over_c", True): (2, 2048, 7, 7),
                    ("apply_gates", True): (2, 256, 7, 7),
                    ("pool_over_c_backward_scale", True): (2, 256, 7, 7),
                    ("pool_over_s_backward_scale", True): (2, 2048, 7, 7)}


def test_each_op_takes_its_own_tuning_by_default(default_tuning):
    """The defaults (tiles_per_sm, vec_rows_in_flight and side_share 0) give each op of
    kOpTuning (op_tuning.h, the H200 sweep's choices) the launches of its row's setting, which
    are not those of the base values (the same for every op: 32 tiles an SM, rows in flight by
    element size, a share of 16); the other layout and element size of the same op, and the ops
    without a row, the base values' launches. float16 takes the 2-byte rows. Each result as the
    CPU kernels' under every fiber schedule."""
    rows = op_tuning_rows()
    assert len(rows) == len(OP_TUNING_SHAPES) and len({r[:3] for r in rows}) == len(rows)
    gen = torch.Generator().manual_seed(61)
    dtypes = {4: [torch.float32], 2: [torch.bfloat16, torch.float16]}
    with testing.l2_model(1 << 20, sms=1):
        for op, cl, eb, tiles, u, share in rows:
            own = list(BASE_TUNING)
            for i, v in ((0, tiles), (2, u), (6, share)):
                own[i] = v or own[i]
            layout = "cl" if cl else "cf"
            for dtype in dtypes[eb]:
                x = rand_x(OP_TUNING_SHAPES[op, cl], dtype, layout, gen)
                args = op_args(op, x, gen, 0)
                got, launches = run_tuned(op, args, DEFAULT_TUNING, with_bytes=True)
                check_same(op, got, run_cpu(op, args), x, layout)
                assert_schedules_agree(op, args, got, seed=3)
                assert launches == run_tuned(op, args, tuple(own), with_bytes=True)[1], \
                    (op, dtype, layout)
                assert launches != run_tuned(op, args, BASE_TUNING, with_bytes=True)[1], \
                    (op, dtype, layout)
                torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)
            # the other layout (same extents, same bytes): the base values
            other = "cf" if cl else "cl"
            x = rand_x(OP_TUNING_SHAPES[op, cl], dtypes[eb][0], other, gen)
            args = op_args(op, x, gen, 0)
            assert run_tuned(op, args, DEFAULT_TUNING, with_bytes=True)[1] == \
                run_tuned(op, args, BASE_TUNING, with_bytes=True)[1], (op, other)
            torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)
        # an op without a row in either layout, and the rows' ops at an element size of none
        for op, dtype, layout in (("backward_reduce", torch.float32, "cf"),
                                  ("backward_reduce", torch.bfloat16, "cl"),
                                  ("pool_over_c", torch.float64, "cf"),
                                  ("grad_input", torch.bfloat16, "cf")):
            x = rand_x((1, 2048, 4, 4), dtype, layout, gen)
            args = op_args(op, x, gen, 0)
            assert run_tuned(op, args, DEFAULT_TUNING, with_bytes=True)[1] == \
                run_tuned(op, args, BASE_TUNING, with_bytes=True)[1], (op, dtype, layout)
            torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)


def test_float32_rows_with_span_lanes_at_the_14x14_site(default_tuning):
    """The float32 channels-first rows of op_tuning.h (4 tiles an SM, 4 rows in flight) with the
    span lanes of reduce_r_mode 1 (one lane a vector of a row of 49), a combination the sweep
    that chose them did not time: at the ResNet-50 1024x14x14 site, batch 64, on the simulator's
    132 SMs, blocks of 49 x 5 threads, fewer of them than under the base values where the
    row's tiles bind, each result as the CPU kernels' under every fiber schedule."""
    gen = torch.Generator().manual_seed(67)
    x = rand_x((64, 1024, 14, 14), torch.float32, "cf", gen)
    fewer = set()
    for op, cl, eb, *_ in op_tuning_rows():
        if cl or eb != 4 or op == "pool_over_s":  # (the pool over S reduces along the rows)
            continue
        args = op_args(op, x, gen, 0)
        got, launches = run_tuned(op, args, DEFAULT_TUNING, with_bytes=True)
        check_same(op, got, run_cpu(op, args), x, "cf")
        assert_schedules_agree(op, args, got, seed=9)
        base = run_tuned(op, args, BASE_TUNING, with_bytes=True)[1]
        assert launches[0][2] == (49, 5, 1), (op, launches)
        assert launches[0][1][0] <= base[0][1][0], (op, launches, base)
        if launches[0][1][0] < base[0][1][0]:
            fewer.add(op)
        torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)
    assert fewer == {"pool_over_s_backward_scale", "grad_input"}, fewer


# reduce_k's groups (k_tile_vectors 32: up to 8 groups of 4 vectors a lane of a row in one
# column tile, make_geom): (op, dtype, layout, shape, variant, whether it takes groups), rows
# longer than one group (32 lanes x 4 vectors: 512 float32, 1024 bfloat16, 256 float64) whose
# last group is partial (lanes with fewer vectors, or none). The policies' staged weights bound
# the groups (reduce_k_groups): 8 without weights, 6 for a float32 scale, 2 for the float32
# scale gradient's 12 bytes, 3 for a bfloat16 x's scale, 1 (none) for its scale gradient.
GROUP_CASES = [
    ("pool_over_s", torch.float32, "cf", (2, 64, 40, 41), 1, True),  # no scale: no weights
    ("pool_over_s", torch.float32, "cf", (2, 64, 40, 41), 0, True),  # scaled
    ("pool_over_s_lp_lse", torch.float32, "cf", (2, 64, 40, 41), 1, True),  # fold not unrolled
    ("pool_over_c_backward_scale", torch.float32, "cf", (2, 64, 40, 41), 0, True),
    ("pool_over_s", torch.float64, "cf", (2, 64, 24, 29), 0, True),
    ("pool_over_c", torch.bfloat16, "cl", (2, 1096, 10, 10), 0, True),
    ("pool_over_s_backward_scale", torch.bfloat16, "cl", (2, 1096, 10, 10), 0, False),
]


def run_tuned_bytes(op, args, setting, sms=None):
    """op in the simulator under set_tuning(*setting) (and, with sms, the L2 model's SMs, which
    num_sms() then gives the launchers): (its outputs, its launches' bytes written)."""
    torch.ops.cbam_fused_sim.set_tuning(*setting)
    with contextlib.ExitStack() as stack:
        if sms is not None:
            stack.enter_context(testing.l2_model(1 << 20, sms=sms))
        with testing.use_simulator():
            got = getattr(torch.ops.cbam_fused, op)(*args)
            written = sum(_stat(s, "bytes_written") for s in testing.simulator_stats())
    return (got if isinstance(got, (tuple, list)) else (got,)), written


@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}")
def test_reduce_k_groups_fold_more_of_a_row_per_tile(case, default_tuning):
    """With groups (k_tile_vectors 32) reduce_k's rows take fewer column tiles than with one group
    a lane (4): fewer partials written for a second stage (one SM and one tile an SM: a grid of a
    few tiles keeps as many as the launcher aims at). Every instance (one row or kReduceKRows rows
    in flight, reduce_k_mode 2 and 3; one vector or four in flight) keeps the CPU kernels'
    results and its bits under every fiber schedule; a policy whose weights fill the staging
    with one group writes what it wrote with 4."""
    op, dtype, layout, shape, variant, grouped = case
    gen = torch.Generator().manual_seed(77)
    x = rand_x(shape, dtype, layout, gen)
    args = op_args(op, x, gen, variant)
    want = run_cpu(op, args)
    for mode in (2, 3):
        for kv in (4, 1):
            written = {}
            for ktv in (32, 4):
                got, written[ktv] = run_tuned_bytes(op, args, (1, 1, 0, mode, kv, 0, 1, ktv), 1)
                check_same(op, got, want, x, layout)
                if ktv == 32 and kv == 4:
                    with testing.l2_model(1 << 20, sms=1):
                        assert_schedules_agree(op, args, got, seed=5)
            assert (written[32] < written[4]) == grouped, (op, mode, kv, written)
            assert written[32] <= written[4], (op, mode, kv, written)
            torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)


def test_reduce_k_groups_keep_the_waves_of_a_pass(default_tuning):
    """Groups only where the grid keeps 3/4 of the tiles of one group a lane (or of the target,
    num_sms * tiles_per_sm, where those are more): few rows (2 samples of 16 or 128 channels)
    keep one group a lane and the partials of a second stage; 512 channels take one tile a row
    and none."""
    gen = torch.Generator().manual_seed(78)
    for c, grouped in ((16, False), (128, False), (512, True)):
        x = rand_x((2, c, 40, 41), torch.float32, "cf", gen)
        args = op_args("pool_over_s", x, gen, 1)
        want = run_cpu("pool_over_s", args)
        written = {}
        for ktv in (32, 4):
            got, written[ktv] = run_tuned_bytes("pool_over_s", args, (1, 1, 0, 2, 4, 0, 1, ktv))
            check_same("pool_over_s", got, want, x, "cf")
        assert (written[32] < written[4]) == grouped, (c, written)
        out_bytes = sum(t.numel() * t.element_size() for t in want)
        if grouped:
            assert written[32] == out_bytes, (c, written, out_bytes)  # no partials


# The ops that are one reduction of x (the pools and their scale gradients).
POOL_OPS = {"pool_over_s", "pool_over_s_lp_lse", "pool_over_c", "pool_over_c_backward_scale",
            "pool_over_s_backward_scale", "pool_over_s_backward_scale_lp_lse"}
# The ops whose reduction runs along the contiguous axis (reduce_k) in each layout.
REDUCE_K_OPS = {"cf": {"pool_over_s", "pool_over_s_lp_lse", "pool_over_c_backward_scale"},
                "cl": {"pool_over_c", "pool_over_s_backward_scale",
                       "pool_over_s_backward_scale_lp_lse"}}


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reduce_k_lane_rule_changes_the_block_not_the_result(dtype, layout, default_tuning):
    """The fourth tuning knob, modes 1 and 0: reduce_k gives a row the fewest lanes that cover it
    in one tile, or one lane per vector. Short rows (S = 49 channels-first: 16 lanes instead of 32;
    C = 24 channels-last: 1 lane of 3 vectors instead of 4 lanes) get other blocks under the two
    rules, in exactly the reduce_k ops, and the results match the CPU kernels under both (the
    lane-fastest weights in shared memory read back in the right order)."""
    gen = torch.Generator().manual_seed(13)
    x = rand_x((2, 24, 7, 7), dtype, layout, gen)
    changed = set()
    for op in OPS:
        args = op_args(op, x, gen, 0)
        want = run_cpu(op, args)
        blocks = []
        for rule in (1, 0):
            torch.ops.cbam_fused_sim.set_tuning(8, 4, 1, rule)
            with testing.use_simulator():
                got = getattr(torch.ops.cbam_fused, op)(*args)
                stats = testing.simulator_stats()
            check_same(op, got if isinstance(got, (tuple, list)) else (got,), want, x, layout)
            blocks.append([tuple(_stat(s, "block")) for s in stats])
        if blocks[0] != blocks[1]:
            changed.add(op)
    assert changed == REDUCE_K_OPS[layout], changed


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_vector_rows_in_flight_change_no_bit(op, dtype, layout, default_tuning):
    """Two or four rows of 16-byte vectors in flight per thread instead of one (the kernels' U, a
    tuning knob; 4 in reduce_r only): the same rows folded in the same order, so bitwise the same
    results; and they match the CPU kernels. U = 4 picks another kernel instance than U = 2 in
    exactly the ops whose reduction runs along the strided axis (reduce_r)."""
    gen = torch.Generator().manual_seed(12)
    x = rand_x((2, 24, 5, 8), dtype, layout, gen)  # C and S multiples of 8: the vector path
    args = op_args(op, x, gen, 0)
    outs, kernels = [], []
    for u in (1, 2, 4):
        torch.ops.cbam_fused_sim.set_tuning(8, 1, u)  # 1 row per thread minimum: many row steps
        with testing.use_simulator():
            got = getattr(torch.ops.cbam_fused, op)(*args)
            kernels.append([_stat(s, "kernel") for s in testing.simulator_stats()])
        outs.append(got if isinstance(got, (tuple, list)) else (got,))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b), op
    check_same(op, outs[2], run_cpu(op, args), x, layout)
    reduce_r = op in POOL_OPS and op not in REDUCE_K_OPS[layout]
    assert (kernels[2] != kernels[1]) == reduce_r, (op, kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_input_takes_the_form_of_its_arrangement_and_layout(dtype, default_tuning):
    """Q3 on whole rows takes dx in one of three forms, a kernel instance each
    (kernels/grad_input.cuh, grad_input_combine): channel first channels-first and spatial first
    channels-last share one (the row side's gate outside), channel first channels-last and
    spatial first channels-first another (the column side's), the parallel arrangement the
    third, in either layout; each matches the CPU kernels, argmax hits included. Float32 rows
    folded into vectors (7x7 channels-first) take the forms too; 16-bit ones and the lp / lse
    variant take one instance for every form."""
    gen = torch.Generator().manual_seed(5)
    kernels = {}
    for op, shape in (("grad_input", (2, 24, 5, 8)), ("grad_input", (2, 24, 7, 7)),
                      ("grad_input_lp_lse", (2, 24, 5, 8))):
        for layout in ("cf", "cl"):
            x = rand_x(shape, dtype, layout, gen)
            for arrangement in (0, 1, 2):
                args = op_args(op, x, gen, arrangement)
                with testing.use_simulator():
                    got = getattr(torch.ops.cbam_fused, op)(*args)
                    ran = [_stat(s, "kernel") for s in testing.simulator_stats()]
                assert len(ran) == 1, ran
                kernels[op, shape, layout, arrangement] = ran[0]
                check_same(op, (got,), run_cpu(op, args), x, layout)
    whole = {(lay, arr): kernels["grad_input", (2, 24, 5, 8), lay, arr]
             for lay in ("cf", "cl") for arr in (0, 1, 2)}
    assert whole["cf", 0] == whole["cl", 1] and whole["cf", 1] == whole["cl", 0]
    assert whole["cf", 2] == whole["cl", 2]
    assert len({whole["cf", 0], whole["cf", 1], whole["cf", 2]}) == 3, whole
    # 7x7 channels-first rows folded 4 (float32: the forms) or 8 at a time (one instance)
    folded = {kernels["grad_input", (2, 24, 7, 7), "cf", a] for a in (0, 1, 2)}
    assert len(folded) == (3 if dtype == torch.float32 else 1), folded
    for lay in ("cf", "cl"):
        assert len({kernels["grad_input_lp_lse", (2, 24, 5, 8), lay, a] for a in (0, 1, 2)}) == 1


K_VECTOR_SHAPES = [  # (shape, layout, dtype): reduce_k rows whose lanes hold 0 to 4 vectors
    ((2, 24, 13, 16), "cf", torch.float32),   # K = 208: 16 lanes, lanes 0-3 hold 4, the rest 3
    ((1, 8, 40, 40), "cf", torch.float32),    # K = 1600: 4 column tiles, the last 16 vectors
    ((2, 8, 24, 25), "cf", torch.float32),    # K = 600: two column tiles, the second of 22
                                              # vectors
    ((2, 520, 3, 3), "cl", torch.bfloat16),   # K = C = 520: 8-element vectors, 3 then 2 a lane
    ((2, 520, 3, 3), "cl", torch.float32),    # two column tiles, the second of 2 vectors
]


@pytest.mark.parametrize("shape,layout,dtype", K_VECTOR_SHAPES, ids=lambda v: str(v))
def test_reduce_k_vectors_in_flight_change_no_bit(shape, layout, dtype, default_tuning):
    """The fifth tuning knob: reduce_k loads all of a lane's vectors of a row before it folds
    them (4, the default) or one at a time (1). The same elements folded in the same order, so
    bitwise the same results, matching the CPU kernels, with no race under any fiber schedule;
    the knob picks another kernel instance in exactly the reduce_k ops."""
    gen = torch.Generator().manual_seed(17)
    x = rand_x(shape, dtype, layout, gen)
    switched = set()
    for op in OPS:
        args = op_args(op, x, gen, 0)
        outs, kernels = [], []
        for kv in (1, 4):
            got, launches = run_tuned(op, args, (8, 4, 0, 2, kv))
            outs.append(got)
            kernels.append([ln[0] for ln in launches])
            if kv == 4:
                assert_schedules_agree(op, args, got, seed=3)
        for a, b in zip(*outs):
            assert torch.equal(a, b), op
        check_same(op, outs[1], run_cpu(op, args), x, layout)
        if kernels[0] != kernels[1]:
            switched.add(op)
    assert switched == REDUCE_K_OPS[layout] & set(OPS), switched


@pytest.mark.parametrize("shape,layout,dtype", K_VECTOR_SHAPES + [
    ((2, 2048, 7, 7), "cl", torch.bfloat16)], ids=lambda v: str(v))
def test_reduce_k_rows_in_flight_on_small_grids(shape, layout, dtype, default_tuning):
    """reduce_k_mode 3 (the default): where reduce_k's grid is resident at once with 3 blocks an
    SM (every shape here, N <= 2), the instance that loads 2 rows' vectors before folding them.
    In exactly the reduce_k ops it runs another kernel than mode 2 on the same grid, with the same
    bits (the same tiles, each row folded in the same order), matching the CPU kernels, under
    every fiber schedule (no race)."""
    gen = torch.Generator().manual_seed(37)
    x = rand_x(shape, dtype, layout, gen)
    switched = set()
    for op in OPS:
        args = op_args(op, x, gen, 0)
        outs, launches = [], []
        for mode in (3, 2):
            got, ln = run_tuned(op, args, (8, 4, 0, mode, 4))
            outs.append(got)
            launches.append(ln)
            if mode == 3:
                assert_schedules_agree(op, args, got, seed=4)
        for a, b in zip(*outs):
            assert torch.equal(a, b), op
        check_same(op, outs[0], run_cpu(op, args), x, layout)
        assert [ln[1:] for ln in launches[0]] == [ln[1:] for ln in launches[1]], op
        if launches[0] != launches[1]:
            switched.add(op)
    assert switched == REDUCE_K_OPS[layout] & set(OPS), switched


def test_reduce_k_rows_in_flight_only_where_the_grid_is_small(default_tuning):
    """Mode 3 takes the rows-in-flight instance only where the grid is resident at once with 3
    blocks an SM (396 on the simulator's 132 SMs): pool over S of [40, 256, 16, 16]
    channels-first (K = 256 floats: 16 lanes of 4 vectors, one column tile) with one row a
    thread allowed has 640 tiles (16 rows each) for 8 tiles an SM wanted, and keeps mode 2's
    kernel; for 1 an SM, 160 tiles (64 rows), and takes the other kernel, on the same grid."""
    gen = torch.Generator().manual_seed(41)
    x = rand_x((40, 256, 16, 16), torch.float32, "cf", gen)
    launches = {(tiles, mode): run_tuned("pool_over_s", (x, None), (tiles, 1, 0, mode, 4))[1]
                for tiles, mode in ((8, 3), (8, 2), (1, 3), (1, 2))}
    assert launches[8, 3] == launches[8, 2]
    assert launches[8, 3][0][1:] == ((640, 1, 1), (16, 16, 1))
    assert launches[1, 2][0][1:] == launches[1, 3][0][1:] == ((160, 1, 1), (16, 16, 1))
    assert launches[1, 3][0][0] != launches[1, 2][0][0]


# The ops whose reduction runs along the strided axis (reduce_r) in each layout.
REDUCE_R_OPS = {layout: POOL_OPS - ops for layout, ops in REDUCE_K_OPS.items()}


def with_rows(u):
    """BASE_TUNING (every op alike) with vec_rows_in_flight u."""
    return BASE_TUNING[:2] + (u,) + BASE_TUNING[3:]


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_reduce_r_rows_in_flight_on_resident_grids(dtype, layout, default_tuning):
    """vec_rows_in_flight 0 (by element size and grid: the default of the ops without their own,
    op_tuning.h; here for every op): where reduce_r's whole grid is resident at once with
    its U = 4 instance's blocks an SM (every grid here, N = 2), the reductions over rows run that
    instance, 4 rows of loads in flight per thread, in exactly the reduce_r ops (the others run
    the element size's U); the same bits as the element size's U (each column's rows folded in
    the same order), matching the CPU kernels, under every fiber schedule (no race)."""
    gen = torch.Generator().manual_seed(47)
    # several row steps of U = 4 per thread: cf, R = C = 160 rows of 32 (TY = 32 at float32);
    # cl, R = S = 640 rows of 16 channels
    shape = (2, 160, 4, 8) if layout == "cf" else (2, 16, 40, 16)
    x = rand_x(shape, dtype, layout, gen)
    base = 2 if dtype == torch.float32 else 1
    switched = set()
    for op in OPS:
        args = op_args(op, x, gen, 0)
        got, launches = run_tuned(op, args, with_rows(0))
        assert_schedules_agree(op, args, got, seed=5)
        want, base_launches = run_tuned(op, args, with_rows(base))
        for a, b in zip(got, want):
            assert torch.equal(a, b), op
        check_same(op, got, run_cpu(op, args), x, layout)
        if op in REDUCE_R_OPS[layout]:
            assert launches == run_tuned(op, args, with_rows(4))[1], op
        if launches != base_launches:
            switched.add(op)
    assert switched == REDUCE_R_OPS[layout], switched


@pytest.mark.parametrize("op,n,u", [
    ("pool_over_s", 396, 4), ("pool_over_s", 397, 2), ("pool_over_s", 528, 2),
    ("pool_over_s", 529, 1), ("pool_over_s_lp_lse", 264, 4), ("pool_over_s_lp_lse", 265, 1)])
def test_reduce_r_rows_in_flight_only_where_the_grid_is_resident(op, n, u, default_tuning):
    """The rows in flight of reduce_r by the grid, on the simulator's 132 SMs: a bfloat16
    channels-last pool over S of [N, 256, 2, 2] (K = C = 256 channels, one column tile of 32
    lanes; its 4 rows, one row tile) runs N blocks. Up to 396 (3 an SM) take U = 4, up to 528
    (4 an SM) U = 2, more the element size's U = 1; the lp / lse pools' larger states keep 2
    blocks an SM at U = 4 and U = 2, so U = 4 up to 264 and then 1. The instances differ, the
    grid is the same."""
    gen = torch.Generator().manual_seed(53)
    x = rand_x((n, 256, 2, 2), torch.bfloat16, "cl", gen)
    _, launches = run_tuned(op, (x, None), DEFAULT_TUNING)
    assert launches[0][1] == (n, 1, 1), launches
    forced = {v: run_tuned(op, (x, None), with_rows(v))[1] for v in (1, 2, 4)}
    assert launches == forced[u]
    assert len({ln[0][0] for ln in forced.values()}) == 3  # three instances


SPAN_ROW_SHAPES = [  # (shape, layout, dtype): reduce_r rows of K / VEC vectors, not a power of 2
    ((2, 302, 3, 1), "cf", torch.float32),   # K = 3 floats, shorter than a vector: the scalar
                                             # path, TX = 3, TY = 85
    ((2, 64, 14, 14), "cf", torch.float32),  # K = 196: 49 vectors of 4
    ((2, 44, 5, 1), "cf", torch.bfloat16),   # K = 5, the scalar path: TX = 5
    ((2, 24, 5, 5), "cl", torch.float32),    # K = C = 24: 6 vectors, TY = 42 (252 threads)
    ((3, 12, 6, 6), "cl", torch.float64),    # K = 12 doubles: 6 vectors of 2
]


@pytest.mark.parametrize("shape,layout,dtype", SPAN_ROW_SHAPES, ids=lambda v: str(v))
def test_reduce_r_lanes_of_short_rows(shape, layout, dtype, default_tuning):
    """The sixth tuning knob, reduce_r_mode 1 (the default): a reduction over rows whose rows have
    few vectors, not a power of two of them, gives each vector its own lane (blocks of K / VEC x
    256 / (K / VEC) threads, read as whole rows), where mode 0 rounds the lanes up to a power of
    two. Exactly the reduce_r ops change their blocks, and backward_reduce on the vector path
    (its folded-rows kernel with G = 1: row sums through shared memory); their results match the
    CPU kernels under both modes and are the same bits under every fiber schedule (the column
    tree over a TY that is not a power of two folds every state, with no race)."""
    gen = torch.Generator().manual_seed(43)
    x = rand_x(shape, dtype, layout, gen)
    k_len = shape[1] if layout == "cl" else shape[2] * shape[3]
    vec = 16 // x.element_size() if k_len % (16 // x.element_size()) == 0 else 1
    need = k_len // vec
    changed = set()
    for op in OPS:
        args = op_args(op, x, gen, 0)
        want = run_cpu(op, args)
        blocks = {}
        for mode in (1, 0):
            got, launches = run_tuned(op, args, (8, 4, 0, 3, 4, mode))
            blocks[mode] = [ln[2] for ln in launches]
            check_same(op, got, want, x, layout)
            if mode == 1:
                assert_schedules_agree(op, args, got, seed=6)
        if blocks[1] != blocks[0]:
            changed.add(op)
            assert blocks[1][0] == (need, 256 // need, 1), (op, blocks)
    expect = (POOL_OPS - REDUCE_K_OPS[layout]) & set(OPS)
    assert changed == (expect | {"backward_reduce"} if vec > 1 else expect), changed


SHORT_ROW_SHAPES = [  # (shape, layout): rows of K = S (cf) or C (cl) elements, R of them
    ((2, 300, 7, 7), "cf"),   # K = 49, 3 blocks of rows a sample, the last partial; float32 spans
                              # 16-byte aligned: vectors that straddle rows
    ((3, 130, 5, 5), "cf"),   # K = 25, R = 130: unaligned spans, the scalar copy
    ((2, 64, 7, 7), "cl"),    # K = C = 64: 256 bytes of float32, the largest short row
    ((2, 24, 9, 15), "cl"),   # K = 24, R = S = 135: two blocks a sample
]


@pytest.mark.parametrize("shape,layout", SHORT_ROW_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_short_rows_take_one_thread_a_row(shape, layout, dtype, default_tuning):
    """reduce_k_mode 2 (the default): a reduction along rows of at most 256 bytes of acc_t runs
    reduce_k_rows (blocks of 128 threads, one a row, no second stage) in exactly the reduce_k ops,
    every other op keeps its kernels; results match the CPU kernels, and are bitwise the same
    under every fiber schedule (no race in the shared-memory staging). Mode 1 keeps reduce_k.
    (float64 rows of 49: not short, but not whole vectors, so staged as medium rows.)"""
    gen = torch.Generator().manual_seed(21)
    x = rand_x(shape, dtype, layout, gen)
    k_len = shape[1] if layout == "cl" else shape[2] * shape[3]
    short = k_len * (8 if dtype == torch.float64 else 4) <= 256 or (
        k_len % (16 // x.element_size()) != 0 and k_len <= 512)
    for op in OPS:
        for variant in (0, 2):
            args = op_args(op, x, gen, variant)
            want = run_cpu(op, args)
            kernels = {}
            for mode in (2, 1):
                torch.ops.cbam_fused_sim.set_tuning(8, 4, 1, mode)
                with testing.use_simulator():
                    got = getattr(torch.ops.cbam_fused, op)(*args)
                    kernels[mode] = [(_stat(s, "name"), tuple(_stat(s, "block")))
                                     for s in testing.simulator_stats()]
                got = got if isinstance(got, (tuple, list)) else (got,)
                check_same(op, got, want, x, layout)
                if mode == 2:
                    runs = [run_sim(op, args, sched, seed=5)
                            for sched in ("reverse", "shuffle")]
                    for other in runs:
                        for a, b in zip(got, other):
                            assert torch.equal(a, b), op
            torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)
            rows = op in REDUCE_K_OPS[layout] and short
            assert (kernels[2] != kernels[1]) == rows, (op, kernels)
            if rows:
                assert kernels[2] == [(kernels[2][0][0], (128, 1, 1))], kernels[2]


def test_short_rows_read_x_once():
    """reduce_k_rows moves x once, plus its small tensors (the pass budget of the reduce_k ops)."""
    gen = torch.Generator().manual_seed(22)
    x = rand_x((4, 256, 7, 7), torch.float32, "cf", gen)
    xb = x.numel() * x.element_size()
    for op in ("pool_over_s", "pool_over_c_backward_scale"):
        read, written = op_bytes(op, op_args(op, x, gen, 0))
        assert xb <= read <= 1.1 * xb, (op, read / xb)
        assert written <= 0.1 * xb, (op, written / xb)


MEDIUM_ROW_SHAPES = [  # (shape, layout): reduce_k rows of K elements, longer than short rows
    ((2, 40, 13, 13), "cf"),   # K = 169, odd: every dtype staged whole (float32: 32 rows a block
                               # of 4 lanes; float64: 16 of 8), 16-byte spans
    ((2, 24, 14, 14), "cf"),   # K = 196: 16-bit staged (whole 8-byte vectors, not 16-byte);
                               # float32 and float64, whole vectors: reduce_k
    ((3, 100, 3, 3), "cl"),    # K = C = 100: 16-bit staged, float32 / float64 reduce_k
    ((2, 509, 1, 3), "cl"),    # K = C = 509, prime: the longest rows staged (float32: 16 rows a
                               # block, float64: 8 of 16 lanes; not the float64 lp / lse scale
                               # gradient, at most 256), unaligned spans: scalar copy
    ((2, 3, 23, 23), "cf"),    # K = 529 > kMedRowMaxK (512): reduce_k_shifted
]


@pytest.mark.parametrize("shape,layout", MEDIUM_ROW_SHAPES, ids=lambda v: str(v))
def test_medium_rows_are_staged_whole(shape, layout, default_tuning):
    """reduce_k_mode 2 and 3 (the default): the reductions along rows that are not whole 16-byte
    vectors, of at most 512 elements (256 where the weights are float64 lp / lse), run
    reduce_k_rows (blocks of 128 threads, as many rows as its span holds with 128 / rows lanes
    each, one launch), in exactly the reduce_k ops: with 16-byte loads of the span where every
    block's span is aligned (the simulator's bytes_vec); rows of whole vectors and longer rows
    keep reduce_k. Every dtype and variant; results match the CPU kernels and those of mode 1
    (reduce_k), the same bits under every fiber schedule (the lanes' folds and their xor tree,
    the staging)."""
    gen = torch.Generator().manual_seed(61)
    for dtype in DTYPES:
        x = rand_x(shape, dtype, layout, gen)
        xb = x.numel() * x.element_size()
        n, k_len = shape[0], shape[1] if layout == "cl" else shape[2] * shape[3]
        r_len = x[0].numel() // k_len
        vec = 16 // x.element_size()
        acc_bytes = 8 if dtype == torch.float64 else 4
        rows = 1
        while 2 * rows <= min(128, 128 * (256 // acc_bytes + 1) // (k_len | 1)):
            rows *= 2
        aligned = (rows * k_len * x.element_size()) % 16 == 0 and \
            (r_len * k_len * x.element_size()) % 16 == 0
        for op in OPS:
            for variant in (0, 2):
                args = op_args(op, x, gen, variant)
                got, launches = run_tuned(op, args, DEFAULT_TUNING)
                stats = testing.simulator_stats()
                other, other_launches = run_tuned(op, args, DEFAULT_TUNING[:3] + (1,) +
                                                  DEFAULT_TUNING[4:])
                torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)
                want = run_cpu(op, args)
                check_same(op, got, want, x, layout)
                check_same(op, other, want, x, layout)
                if op not in REDUCE_K_OPS[layout]:
                    assert launches == other_launches, op
                    continue
                # (the float64 lp / lse weights, 48 bytes, stage 256 columns at most)
                longest = 256 if (dtype, op) == (torch.float64,
                                                 "pool_over_s_backward_scale_lp_lse") else 512
                staged = k_len % vec != 0 and k_len <= longest
                ran_staged = len(launches) == 1 and launches[0][2] == (128, 1, 1)
                assert ran_staged == staged, (op, dtype, launches)
                assert all(ln[2] != (128, 1, 1) for ln in other_launches), other_launches
                if staged:
                    assert launches[0][1] == (n * -(-r_len // rows), 1, 1), (op, dtype, launches)
                    assert (stats[0]["bytes_vec"] >= xb) == aligned, (op, dtype, stats)
                if dtype in (torch.float32, torch.bfloat16):
                    assert_schedules_agree(op, args, got, seed=7)


FOLD_SHAPES = [  # (shape, layout): rows of K elements (K = S cf, C cl), K % VEC != 0 mostly
    ((2, 16, 7, 7), "cf"),    # K = 49: G = 2, 4, 8 rows a folded row (float64, float32, 16-bit)
    ((2, 40, 14, 14), "cf"),  # K = 196: 16-bit G = 2; float32 and float64 rows are whole vectors
    ((3, 16, 1, 1), "cf"),    # K = 1: rows shorter than a vector do not fold (scalar)
    ((2, 24, 3, 1), "cf"),    # K = 3: float64 folds 2 rows, the others are scalar
    ((2, 3, 4, 4), "cl"),     # K = C = 3, R = S = 16: float64 folds
    ((1, 5, 8, 6), "cl"),     # K = C = 5, R = S = 48: float64 and float32 fold
    ((2, 6, 5, 5), "cl"),     # K = 6, R = 25: float32 / 16-bit G = 2 / 4 do not divide R (scalar)
    ((1, 300, 3, 3), "cf"),   # K = 9, R = 300: a 16-bit G = 8 does not divide R (scalar); float32
                              # G = 4 folds, and its r sides take several staging chunks
    ((2, 8, 19, 19), "cf"),   # K = 361: folded rows of 361 vectors (G = 2, 4, 8), more than one
                              # tile spans: loaded shifted
    ((1, 8, 25, 41), "cf"),   # K = 1025: column tiles of 32 lanes, the last of one lane
]


def fold_of(shape, layout, dtype):
    """Rows a folded row holds on the vector path (1: rows are whole vectors), 0: the scalar path
    (launchers/common.h fold_rows), for x of `shape` in `layout` (cf / cl)."""
    import math
    c, s = shape[1], math.prod(shape[2:])
    k_len, r_len = (c, s) if layout == "cl" else (s, c)
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    g = vec // math.gcd(k_len, vec)
    return g if g == 1 or (r_len % g == 0 and k_len >= vec) else 0


@pytest.mark.parametrize("shape,layout", FOLD_SHAPES, ids=lambda v: str(v))
def test_x_sized_ops_fold_rows_into_whole_vectors(shape, layout):
    """apply_gates and grad_input on rows whose length is not a multiple of the vector width: G
    rows folded into one that is (kernels/common.cuh Fold) where G divides the rows, so every
    x-sized byte moves in 16-byte accesses (the simulator's bytes_vec), else the scalar path (no
    16-byte access). Every dtype, every tiling, every arrangement / gate combination; results
    match the CPU kernels, and are the same bits under every fiber schedule."""
    gen = torch.Generator().manual_seed(47)
    for dtype in DTYPES:
        x = rand_x(shape, dtype, layout, gen)
        xb = x.numel() * x.element_size()
        g = fold_of(shape, layout, dtype)
        for op in X_SHAPED:
            for mode in (TILE_NORMAL, TILE_SMALL, TILE_SINGLE):
                args = op_args(op, x, gen, mode)
                tile_mode(mode)
                with testing.use_simulator():
                    got = getattr(torch.ops.cbam_fused, op)(*args)
                    (stat,) = testing.simulator_stats()
                tile_mode(TILE_NORMAL)
                check_same(op, (got,), run_cpu(op, args), x, layout)
                passes = 3 if op == "grad_input_lp_lse" else 2  # (g, x,) dx / x, y
                if g:
                    assert stat["bytes_vec"] >= passes * xb, (op, dtype, mode, stat, xb)
                else:
                    assert stat["bytes_vec"] == 0, (op, dtype, mode, stat)
                if mode == TILE_NORMAL and dtype == torch.float32:
                    for sched, seed in (("reverse", 0), ("shuffle", 3)):
                        again = run_sim(op, args, sched, seed)[0]
                        assert torch.equal(again.view(torch.int32), got.view(torch.int32)), op


@pytest.mark.parametrize("shape,layout", FOLD_SHAPES, ids=lambda v: str(v))
def test_reductions_over_rows_fold_rows_into_whole_vectors(shape, layout):
    """The reductions over the strided axis (reduce_r: channels-first pool over C and the pool
    over S's scale gradients, channels-last the others) and backward_reduce fold rows like the
    x-sized ops where one tile spans a folded row (at most 128 vectors; not under the tiny
    tiles): every byte of x (and g) in 16-byte loads, the G folded columns of an original column
    combined in a fixed order before the store (or the partials of the second stage), and
    backward_reduce's row sums added lane by lane in order through shared memory. Other rows
    that are not whole vectors, if at least a vector long, are loaded shifted: each lane's
    columns of a row from the 16-byte window they start in and the next lane's (a shuffle),
    every byte of x (and g) in 16-byte loads but the tensor's last few, about once
    (load_rows_shifted); shorter ones, the scalar path (no 16-byte access). Every dtype, tiling
    and variant; results match the CPU kernels, the same bits under every fiber schedule."""
    gen = torch.Generator().manual_seed(50)
    for dtype in DTYPES:
        x = rand_x(shape, dtype, layout, gen)
        xb = x.numel() * x.element_size()
        g = fold_of(shape, layout, dtype)
        vec = 16 // x.element_size()
        k_len = shape[1] if layout == "cl" else x[0, 0].numel()
        for op in sorted((POOL_OPS - REDUCE_K_OPS[layout]) & set(OPS)) + ["backward_reduce"]:
            # (backward_reduce's variants: both sums, rc only, rs only; in every tiling)
            for mode, variant in [(m, m) for m in (TILE_NORMAL, TILE_SMALL, TILE_SINGLE)] + (
                    [(TILE_NORMAL, 1), (TILE_NORMAL, 2)] if op == "backward_reduce" else []):
                args = op_args(op, x, gen, variant)
                tile_mode(mode)
                with testing.use_simulator():
                    got = getattr(torch.ops.cbam_fused, op)(*args)
                    stats = testing.simulator_stats()
                tile_mode(TILE_NORMAL)
                got = got if isinstance(got, (tuple, list)) else (got,)
                check_same(op, got, run_cpu(op, args), x, layout)
                folded = g > 1 and mode != TILE_SMALL and k_len * g // vec <= 128
                passes = 2 if op == "backward_reduce" else 1  # (g and) x
                if g == 1 or folded:
                    assert stats[0]["bytes_vec"] >= passes * xb, (op, dtype, mode, stats)
                elif k_len >= vec:  # shifted: all but the tensor's last 3 VEC elements at most;
                    # a window a lane and row, and the next one for each tile's last lane
                    tx = stats[0]["block"][0]
                    nkt = -(-k_len // (vec * tx))
                    most = passes * x.numel() // k_len * nkt * (tx + 1) * 16
                    assert most >= stats[0]["bytes_vec"] >= passes * (xb - 48), (
                        op, dtype, mode, stats)
                else:
                    assert stats[0]["bytes_vec"] == 0, (op, dtype, mode, stats)
                if mode == TILE_NORMAL and dtype in (torch.float32, torch.bfloat16):
                    assert_schedules_agree(op, args, got, seed=4)


SHIFTED_SHAPES = [  # (shape, layout): reduce_k rows of K > 512 elements (not reduce_k_rows')
    ((2, 8, 26, 26), "cf"),   # K = 676: 16-bit rows of 84 vectors + 4 (each row's head and tail
                              # 0 + 4 or 4 + 0); float32 and float64 whole vectors
    ((2, 8, 18, 35), "cf"),   # K = 630: float32 4 j + 2, 16-bit 8 j + 6
    ((2, 612, 1, 2), "cl"),   # K = C = 612: 16-bit 8 j + 4; float32 whole vectors
    ((2, 3, 23, 23), "cf"),   # K = 529, odd: every dtype, heads and tails of 0 to VEC - 1
    ((1, 6, 25, 41), "cf"),   # K = 1025: two column tiles, the second of one column, where a
                              # row's tail starts in the first (rows of head 3 in float32)
]


def shifted_vector_bytes(x, k_len):
    """Bytes of x that reduce_k_shifted loads in 16-byte vectors: each row's whole vectors from
    its first 16-byte boundary (x's base is aligned), not its head and tail."""
    vec = 16 // x.element_size()
    rows = x.numel() // k_len
    total = 0
    for row in range(rows):
        h = min((-row * k_len) % vec, k_len)
        total += (k_len - h) // vec * vec
    return total * x.element_size()


@pytest.mark.parametrize("shape,layout", SHIFTED_SHAPES, ids=lambda v: str(v))
def test_reductions_along_rows_that_are_not_whole_vectors(shape, layout, default_tuning):
    """The reductions along the contiguous axis (reduce_k) on rows that are not whole 16-byte
    vectors and longer than reduce_k_rows' medium rows (or any such rows under the tiny tiles
    and one row tile, which take no reduce_k_rows): reduce_k_shifted loads each row's 16-byte
    vectors from its first 16-byte boundary, exactly those bytes of x in 16-byte loads (the
    simulator's bytes_vec; none in 8-byte ones), the head and tail elements one at a time; x
    one element off alignment takes the scalar path (no vector access); rows of whole vectors,
    reduce_k's vectors. Every dtype, every tiling, reduce_k's vectors in flight 1 and 4 (which
    the shifted kernel does not take: the same bits); results match the CPU kernels, the same
    bits under every fiber schedule."""
    gen = torch.Generator().manual_seed(59)
    for dtype in DTYPES:
        x = rand_x(shape, dtype, layout, gen)
        xb = x.numel() * x.element_size()
        k_len = shape[1] if layout == "cl" else x[0, 0].numel()
        vec = 16 // x.element_size()
        want_vec = xb if k_len % vec == 0 else shifted_vector_bytes(x, k_len)
        off = torch.empty(x.numel() + 1, dtype=dtype)[1:]  # one element off: the scalar path
        off = off.view(x.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2) if layout == "cl" \
            else off.view(x.shape)
        off.copy_(x)
        for op in sorted(REDUCE_K_OPS[layout] & set(OPS)):
            for mode in (TILE_NORMAL, TILE_SMALL, TILE_SINGLE):
                args = op_args(op, x, gen, 0)
                tile_mode(mode)
                outs = []
                for kv in (4, 1):
                    got, _ = run_tuned(op, args, DEFAULT_TUNING[:4] + (kv,) + DEFAULT_TUNING[5:])
                    stats = testing.simulator_stats()
                    outs.append(got)
                    assert (stats[0]["bytes_vec"], stats[0]["bytes_vec8"]) == (want_vec, 0), (
                        op, dtype, mode, kv, want_vec, stats[0])
                torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)
                if k_len % vec != 0:
                    for a, b in zip(*outs):
                        assert torch.equal(a, b), (op, dtype, mode)
                with testing.use_simulator():
                    got_off = getattr(torch.ops.cbam_fused, op)(off, *args[1:])
                    stats_off = testing.simulator_stats()
                tile_mode(TILE_NORMAL)
                want = run_cpu(op, args)
                check_same(op, outs[0], want, x, layout)
                got_off = got_off if isinstance(got_off, (tuple, list)) else (got_off,)
                check_same(op, got_off, want, x, layout)
                assert stats_off[0]["bytes_vec"] == 0, (op, dtype, mode, stats_off[0])
                if mode == TILE_NORMAL and dtype in (torch.float32, torch.bfloat16):
                    assert_schedules_agree(op, args, outs[0], seed=6)


def test_x_sized_ops_take_span_lanes_where_fuller():
    """apply_gates / grad_input give each vector of a short row its own lane where that leaves
    fewer of a block's threads idle than lanes by powers of two (make_geom, SpanLanes::kIfFuller):
    a folded 7x7 float32 map, 49 vectors a row, runs blocks of 49 x 5 threads (not 2 column
    tiles of 32 lanes, the second 17 busy); 8 vectors a row keep 8 x 32; a 100-vector row is
    as full either way (200 of 256 threads, 4 tiles of 32 lanes for 100) and keeps 32 lanes."""
    gen = torch.Generator().manual_seed(48)
    for shape, layout, dtype, block in (((2, 8, 7, 7), "cf", torch.float32, (49, 5, 1)),
                                        ((2, 8, 7, 7), "cf", torch.bfloat16, (49, 5, 1)),
                                        ((2, 3, 4, 8), "cf", torch.float32, (8, 32, 1)),
                                        ((1, 400, 2, 3), "cl", torch.float32, (32, 8, 1)),
                                        ((2, 24, 3, 3), "cl", torch.bfloat16, (3, 85, 1))):
        x = rand_x(shape, dtype, layout, gen)
        for op in X_SHAPED:
            args = op_args(op, x, gen, 0)
            with testing.use_simulator():
                got = getattr(torch.ops.cbam_fused, op)(*args)
                (stat,) = testing.simulator_stats()
            assert stat["block"] == block, (op, shape, dtype, stat)
            check_same(op, (got,), run_cpu(op, args), x, layout)


def test_folded_rows_stage_each_small_value_once_per_tile():
    """The folded path stages a tile's k values once per original column (not once per folded
    column, G times over), so it moves no more bytes than the scalar path of the same op on the
    same shape (x one element off 16-byte alignment), and x-sized ones only once."""
    gen = torch.Generator().manual_seed(49)
    for shape in ((2, 256, 7, 7), (4, 64, 7, 7), (2, 256, 9, 9)):
        for dtype in (torch.float32, torch.bfloat16):
            x = rand_x(shape, dtype, "cf", gen)
            xb = x.numel() * x.element_size()
            off = torch.empty(x.numel() + 1, dtype=dtype)[1:].view(x.shape)  # the scalar path
            off.copy_(x)
            for op in ("apply_gates", "grad_input"):
                args = op_args(op, x, gen, 0)
                read, written = op_bytes(op, args)
                read_s, written_s = op_bytes(op, (off,) + args[1:])
                assert xb <= read <= read_s and written == written_s == xb, (
                    op, shape, dtype, read / xb, read_s / xb, written / xb)
