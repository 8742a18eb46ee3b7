"""Random cases of every x-sized op through the SIMT simulator against the oracle: shapes, spatial
rank, layout (channels-first, channels-last, non-dense), dtype, the optional arguments, the
launchers' tuning knobs (the settings a GPU sweep may pick as defaults) and debug tilings drawn
together, so that combinations the hand-picked cases of test_kernels_sim.py do not list still
run on every commit. The cases come from fixed seeds (reproducible; a failure names its seed);
CBAM_FUZZ_CASES=N runs N of them (default 300; half as many head cases, a fifth as many cases of
the whole module), CBAM_FUZZ_START=K starts at seed K."""
import os
import random

import pytest
import torch

import cbam_fused  # noqa: F401  registers the ops
from test_kernels_sim import (DEFAULT_TUNING, DTYPES, HAVE_SIM, OPS, TILE_NORMAL, check_same,
                              op_args, rand_x, run_cpu, run_sim)

pytestmark = pytest.mark.skipif(not HAVE_SIM, reason="the simulator build (cbam_fused._sim) "
                                "is missing")

CASES = int(os.environ.get("CBAM_FUZZ_CASES", "300"))
START = int(os.environ.get("CBAM_FUZZ_START", "0"))


def draw_tuning(r: random.Random):
    """The launchers' tuning knobs (set_tuning's arguments), each over the values a GPU sweep
    may pick (tiles 0, rows in flight -1, share 0: each op's own, csrc/launchers/op_tuning.h)."""
    return (r.choice([0, 1, 2, 8, 32, 64]), r.choice([1, 2, 4, 16, 64]),
            r.choice([-1, 0, 1, 2, 4]),
            r.randint(0, 3), r.choice([1, 4]), r.randint(0, 1), r.choice([0, 1, 4, 16, 64]),
            r.choice([1, 2, 4, 8, 32]))


def draw_case(seed: int):
    """(op, dtype, layout, shape, variant, tuning, tile mode) for one seed."""
    r = random.Random(seed)
    op = r.choice(OPS)
    dtype = r.choice(DTYPES)
    layout = r.choices(["cf", "cl", "strided"], weights=[4, 4, 1])[0]
    rank = r.choice([1, 2, 2, 3])
    big = r.random() < 0.15  # now and then an extent over a tile, a staging chunk, a block
    spatial = tuple(r.randint(1, 40 if big and rank == 1 else 12 if big else 7)
                    for _ in range(rank))
    small_c = [1, 2, 3, 4, 5, 7, 8, 9, 16, 24, 31, 33, 64, 70]
    c = r.randint(65, 600) if big else r.choice(small_c)
    n = r.randint(1, 3)
    variant = r.randint(0, 2)
    tuning = draw_tuning(r)
    tile = r.choice([0, 0, 1, 2])
    return op, dtype, layout, (n, c) + spatial, variant, tuning, tile


@pytest.fixture
def restore_knobs():
    yield
    torch.ops.cbam_fused_sim.set_tuning(*DEFAULT_TUNING)
    torch.ops.cbam_fused_sim.set_debug(False, TILE_NORMAL)


@pytest.mark.parametrize("seed", range(START, START + CASES))
def test_random_case_matches_the_oracle(seed, restore_knobs):
    op, dtype, layout, shape, variant, tuning, tile = draw_case(seed)
    gen = torch.Generator().manual_seed(seed)
    x = rand_x(shape, dtype, layout, gen)
    args = op_args(op, x, gen, variant)
    torch.ops.cbam_fused_sim.set_tuning(*tuning)
    torch.ops.cbam_fused_sim.set_debug(True, tile)  # outputs poisoned
    got = run_sim(op, args)
    want = run_cpu(op, args)
    check_same(op, got, want, x, layout)


def test_the_draws_cover_every_op_dtype_layout_and_knob():
    """The default number of cases reaches every op, dtype, layout, spatial rank, tile mode and
    value of each knob (so a smaller default would not silently drop one)."""
    draws = [draw_case(s) for s in range(120)]
    assert {d[0] for d in draws} == set(OPS)
    assert {d[1] for d in draws} == set(DTYPES)
    assert {d[2] for d in draws} == {"cf", "cl", "strided"}
    assert {len(d[3]) - 2 for d in draws} == {1, 2, 3}
    assert {d[6] for d in draws} == {0, 1, 2}
    for i, values in enumerate([{0, 1, 2, 8, 32, 64}, {1, 2, 4, 16, 64}, {-1, 0, 1, 2, 4},
                                {0, 1, 2, 3}, {1, 4}, {0, 1}, {0, 1, 4, 16, 64},
                                {1, 2, 4, 8, 32}]):
        assert {d[5][i] for d in draws} == values, i
    assert any(d[3][1] > 64 for d in draws)


# ------------------------------------------------------------------ the spatial gate's head ops
def draw_head_case(seed: int):
    """(spatial, k, (order, bias, bn, gate / from_gs), n, tile mode) for one seed: float64 maps
    of rank 1 to 3 (now and then a long 1-D row), odd k with at most 1024 taps, every BatchNorm
    form, every launch shape of the head kernels (normal, one block, unstaged, full blocks)."""
    r = random.Random(10_000 + seed)
    rank = r.choice([1, 2, 2, 3])
    if rank == 1 and r.random() < 0.3:
        spatial = (r.randint(20, 300),)
    else:
        spatial = tuple(r.randint(1, 12 if rank < 3 else 6) for _ in range(rank))
    ks = [k for k in (1, 3, 5, 7, 9) if 2 * k ** rank <= 1024]
    k = r.choice(ks)
    order = r.choice(["max,mean", "mean,max", "blend"])
    gate = r.random() < 0.8
    bn = r.choice(["none", "plain", "affine"])
    return spatial, k, (order, r.random() < 0.5, bn, gate), r.randint(1, 4), r.randint(0, 3)


@pytest.mark.parametrize("seed", range(START, START + CASES // 2))
def test_random_head_case_matches_the_cpu_kernel(seed):
    from test_spatial_head import make_args
    from test_spatial_head import run_sim as run_head_sim
    from test_spatial_head_backward import make_bwd_args

    from cbam_fused import _cpu_kernels as cpu

    spatial, k, variant, n, tile = draw_head_case(seed)
    args = make_args(spatial, k, *variant, n=n, seed=seed)
    out, _ = run_head_sim(args, tile=tile)
    want = cpu.HEAD_KERNELS["spatial_head"](*args)
    for g, w in zip(out, want):
        if w is not None and w.numel():
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    bargs, _ = make_bwd_args(spatial, k, *variant, n=n, seed=seed)
    out, _ = run_head_sim(bargs, tile=tile, op="spatial_head_backward")
    want = cpu.HEAD_KERNELS["spatial_head_backward"](*bargs)
    for g, w in zip(out, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the channel gate's head ops
def draw_channel_head_case(seed: int):
    """(n, c, hidden, pools, act, two layers, bias, dtype, tile mode) for one seed: pool lists of
    one to four pools in any order or the blend, every activation, extents around the 32-wide
    tiles (now and then a c axis long enough to split), one split, the normal split, a chunk a
    split."""
    r = random.Random(20_000 + seed)
    names = ["avg", "max", "lp", "lse"]
    r.shuffle(names)
    pools = "blend" if r.random() < 0.2 else "+".join(names[:r.randint(1, 4)])
    c = r.randint(129, 700) if r.random() < 0.2 else r.choice([1, 2, 5, 16, 31, 32, 33, 64, 70])
    return (r.randint(1, 40), c, r.choice([1, 3, 8, 31, 32, 33, 70]), pools,
            r.choice(["relu", "silu", "gelu", "identity"]), r.random() < 0.8, r.random() < 0.7,
            r.choice([torch.float64, torch.float32]), r.randint(0, 2))


@pytest.mark.parametrize("seed", range(START, START + CASES // 2))
def test_random_channel_head_case_matches_the_cpu_kernel(seed):
    import test_channel_head as fwd_tests
    import test_channel_head_backward as bwd_tests

    from cbam_fused import _cpu_kernels as cpu

    n, c, hidden, pools, act, two, bias, dtype, tile = draw_channel_head_case(seed)
    args = fwd_tests.make_args(n, c, hidden, pools, act, two, bias, dtype=dtype, seed=seed)
    out, _ = fwd_tests.run_sim(args, tile=tile)
    fwd_tests.check_close(out, cpu.HEAD_KERNELS["channel_head"](*args), dtype, args)
    bargs, fwd = bwd_tests.make_bwd_args(n, c, hidden, pools, act, two, bias, dtype=dtype,
                                         seed=seed)
    out, _ = bwd_tests.run_sim(bargs, tile=tile)
    bwd_tests.check_close(out, cpu.HEAD_KERNELS["channel_head_backward"](*bargs), dtype, bargs,
                          fwd)


# ------------------------------------------------------------------ the BatchNorm gate ops
def draw_batch_norm_gate_case(seed: int):
    """(n, spatial, affine, offset, tile mode) for one seed: 1-D to 3-D maps of 2 to a few
    thousand values, each affine form, values near zero or far from it, the three launch shapes
    (normal, one block each, ranges of 16 values)."""
    r = random.Random(30_000 + seed)
    rank = r.choice([1, 2, 2, 3])
    big = r.random() < 0.2
    spatial = tuple(r.randint(1, 60 if big and rank == 1 else 30 if big else 7)
                    for _ in range(rank))
    n = r.randint(1, 6)
    if n == 1 and all(d == 1 for d in spatial):
        n = 2  # batch statistics need two values
    return (n, spatial, r.choice(["both", "weight", "bias", "none"]),
            r.choice([0.0, 0.5, -3.0, 100.0]), r.randint(0, 2))


@pytest.mark.parametrize("seed", range(START, START + CASES // 4))
def test_random_batch_norm_gate_case_matches_the_cpu_kernel(seed):
    import test_batch_norm_gate as bng

    from cbam_fused import _cpu_kernels as cpu

    n, spatial, affine, offset, tile = draw_batch_norm_gate_case(seed)
    args = bng.make_args(n, spatial, affine, seed=seed, offset=offset)
    out, _ = bng.run_sim(bng.FWD, args, tile)
    bng.check_close(out, cpu.HEAD_KERNELS[bng.FWD](*args), bng.oracle(*args), torch.float64)
    bargs, fwd = bng.make_bwd_args(n, spatial, affine, seed=seed, offset=offset)
    out, _ = bng.run_sim(bng.BWD, bargs, tile)
    bng.check_close(out, cpu.HEAD_KERNELS[bng.BWD](*bargs), bng.bwd_oracle(bargs, fwd),
                    torch.float64)


# ------------------------------------------------------------------ the whole module
def draw_module_case(seed: int):
    """(variant, spatial rank, layout, shape, train, tuning, tile mode) for one seed: the
    variants of variants.py in turn, maps of rank 1 to 3, channels-first and channels-last
    (strided too), now and then a map or a channel count long enough to split the reductions,
    the tuning knobs and debug tilings as in draw_case. float64 only: random parameters make
    sums with heavy cancellation now and then (the BatchNorm bias's gradient, a sum over the
    batch and the map), where float32 in any order of summation misses the float64 reference
    by more than the float32 reference does (seen 16-fold); the float32 paths of the kernels
    are the op cases' (above) and the fixed module cases' (test_kernels_sim.py)."""
    from variants import VARIANTS

    r = random.Random(40_000 + seed)
    names = sorted(VARIANTS)
    variant = names[seed % len(names)]  # each in turn: any len(VARIANTS) seeds meet them all
    rank = r.choice([1, 2, 2, 3])
    layout = r.choices(["cf", "cl", "strided"], weights=[4, 4, 1])[0]
    big = r.random() < 0.2
    spatial = tuple(r.randint(1, 40 if big and rank == 1 else 12 if big else 7)
                    for _ in range(rank))
    c = r.randint(65, 300) if big else r.choice([1, 2, 3, 5, 8, 16, 24, 33])
    n = r.randint(1, 3)
    if n == 1 and all(d == 1 for d in spatial):
        n = 2  # the spatial BatchNorm's batch statistics need two values
    tuning = draw_tuning(r)
    return (variant, rank, layout, (n, c) + spatial, r.random() < 0.6, tuning,
            r.choice([0, 0, 1, 2]))


@pytest.mark.parametrize("where", ["simulator", "cpu"])
@pytest.mark.parametrize("seed", range(START, START + max(1, CASES // 5)))
def test_random_module_case_matches_the_reference(seed, where, restore_knobs):
    """cbam_fused.CBAM of a random variant and shape in float64, with every op in the simulator
    (outputs poisoned, random launcher knobs, blocks in shuffled order) or on the CPU path (its
    C++ pools and PyTorch kernels), against cbam_fused.reference: the output, every gradient and
    the BatchNorm statistics to 1e-10. The ops' own fuzz cases above do not meet the
    composites, the heads' shapes and the layouts together."""
    from test_functional import _module, compare_with_reference

    from cbam_fused import testing

    variant, rank, layout, shape, train, tuning, tile = draw_module_case(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the parameters and the incoming gradient: reproducible too
    m = _module(variant, shape[1], rank, torch.float64)
    x = rand_x(shape, torch.float64, layout, gen)
    if where == "cpu":
        compare_with_reference(m, x, train, 1e-10)
        return
    torch.ops.cbam_fused_sim.set_tuning(*tuning)
    torch.ops.cbam_fused_sim.set_debug(True, tile)  # outputs poisoned
    with testing.use_simulator(schedule="shuffle", seed=seed):
        compare_with_reference(m, x, train, 1e-10)
        launched = testing.simulator_stats()
    assert launched, "nothing ran in the simulator"


def test_the_module_draws_cover_every_variant_rank_and_layout():
    """The default number of module cases (60) reaches every variant of variants.py, each rank
    and layout, training and evaluation, every tile mode, and now and then a long channel
    axis."""
    from variants import VARIANTS

    draws = [draw_module_case(s) for s in range(60)]
    assert {d[0] for d in draws} == set(VARIANTS), set(VARIANTS) - {d[0] for d in draws}
    assert {d[1] for d in draws} == {1, 2, 3}
    assert {d[2] for d in draws} == {"cf", "cl", "strided"}
    assert {d[4] for d in draws} == {True, False}
    assert {d[6] for d in draws} == {0, 1, 2}
    assert any(d[3][1] > 64 for d in draws)
