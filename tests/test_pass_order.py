"""The tile order of the x-sized passes (launchers/common.h next_pass_reversed): a pass over a
tensor the pass before it on the stream touched runs its tiles in the reverse order of that one,
so that its first blocks read the bytes that pass touched last (L2 hits on a GPU where x is not
much larger than the L2); a pass over other tensors runs from its last tile (their writer most
likely wrote them first to last). Through the simulator, which starts the blocks in order of
blockIdx as a GPU roughly does and records where each launch first touched each tensor (launch
stats' regions): every x-sized op, on shapes that reach each of its kernels, called three times
on the same tensors starts in the last sample, the first, the last, with the same bits and the
CPU kernel's values; under set_pass_order(0) every pass starts in the first; a CBAM block's
pools, apply, Q1, Q2 and Q3 follow the rule."""
import zlib

import pytest
import torch

import cbam_fused

from conftest import sim_has
from test_kernels_sim import (OPS, TILE_NORMAL, TILE_SMALL, check_same, op_args, rand_x, run_cpu,
                              tile_mode)

testing = pytest.importorskip("cbam_fused.testing")
pytestmark = pytest.mark.skipif(not sim_has("grad_input"),
                                reason="the simulator build (cbam_fused._sim) is missing")

# (shape, layout, tiling): two samples each, so a pass from the first tile starts in the first
# half of x and a reversed one in the second
CASES = [
    ((2, 7, 3, 5), "cf", TILE_SMALL),      # tiny tiles: every reduction split, the scalar path
    ((2, 7, 3, 5), "cl", TILE_SMALL),
    ((2, 16, 7, 7), "cf", TILE_NORMAL),    # folded rows (reduce_r, backward_reduce, the apply),
                                           # short rows along S (reduce_k_rows)
    ((2, 40, 13, 13), "cf", TILE_NORMAL),  # rows of 169: staged whole (reduce_k_rows, MED);
                                           # folded rows longer than a tile: loaded shifted
    ((2, 3, 23, 23), "cf", TILE_NORMAL),   # rows of 529: reduce_k_shifted; R = 3: shifted rows
    ((2, 64, 8, 8), "cl", TILE_NORMAL),    # whole vectors: reduce_k, reduce_r
]


@pytest.fixture(autouse=True)
def poisoned_alternating():
    torch.ops.cbam_fused_sim.set_debug(True, TILE_NORMAL)
    old = torch.ops.cbam_fused_sim.set_pass_order(1)  # (also: the passes before are forgotten)
    yield
    torch.ops.cbam_fused_sim.set_pass_order(old)
    torch.ops.cbam_fused_sim.set_debug(False, TILE_NORMAL)


def starts(stats, x_bytes):
    """Per launch: where it first touched each x-sized tensor, as a fraction of the tensor."""
    out = []
    for s in stats:
        fr = [(first - lo) / (hi - lo) for lo, hi, first in s["regions"]
              if hi - lo == x_bytes and first != 0]
        assert fr, (s["name"], "touched no x-sized tensor")
        out.append(fr)
    return out


def run(op, args, x_bytes):
    with testing.use_simulator():
        got = getattr(torch.ops.cbam_fused, op)(*args)
        stats = testing.simulator_stats()
    assert len(stats) == 1, (op, [s["name"] for s in stats])
    return (got if isinstance(got, (tuple, list)) else (got,)), starts(stats, x_bytes)[0]


def same_bits(a, b):
    return all(torch.equal(u.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))
               for u, v in zip(a, b))


@pytest.mark.parametrize("op", OPS)
def test_each_pass_reverses_the_one_before(op):
    gen = torch.Generator().manual_seed(zlib.crc32(op.encode()))
    for shape, layout, mode in CASES:
        x = rand_x(shape, torch.float32, layout, gen)
        args = op_args(op, x, gen, 0)
        want = run_cpu(op, args)
        x_bytes = x.numel() * x.element_size()
        tile_mode(mode)
        try:
            torch.ops.cbam_fused_sim.set_pass_order(1)
            first, f_first = run(op, args, x_bytes)
            second, f_second = run(op, args, x_bytes)
            third, f_third = run(op, args, x_bytes)
            torch.ops.cbam_fused_sim.set_pass_order(0)
            plain = [run(op, args, x_bytes) for _ in range(2)]
        finally:
            tile_mode(TILE_NORMAL)
        case = (op, shape, layout, mode)
        # new tensors: from the last tile; then the reverse of the call before, on the same ones
        assert all(f >= 0.5 for f in f_first + f_third), (case, f_first, f_third)
        assert all(f < 0.5 for f in f_second), (case, f_second)
        assert all(f < 0.5 for _, fs in plain for f in fs), (case, plain)
        check_same(op, first, want, x, layout)
        for got in (second, third, plain[0][0], plain[1][0]):
            assert same_bits(got, first), case


X_PASSES = ("pool_over_s", "pool_over_c", "apply_gates", "backward_reduce",
            "pool_over_c_backward_scale", "grad_input")


@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_a_blocks_passes_alternate(layout):
    """A CBAM block (channel first, eval mode), its passes and where they start: the pool over S
    (a new x: from the last tile), the pool over C and the apply (x again: first, last); the
    backward's Q1 (x again, with g: first), Q2 (x: last), Q3 (g and a new dx, not Q2's x: from
    the last tile). The heads' launches between them do not count."""
    gen = torch.Generator().manual_seed(41)
    m = cbam_fused.CBAM(64).eval()
    x = rand_x((2, 64, 6, 6), torch.float32, layout, gen).requires_grad_()
    x_bytes = x.numel() * x.element_size()
    with testing.use_simulator():
        y = m(x)
        y.backward(torch.randn(y.shape, generator=gen))
        stats = [s for s in testing.simulator_stats() if s["name"] in X_PASSES]
    assert [s["name"] for s in stats] == list(X_PASSES)
    from_last = [True, False, True, False, True, True]
    for s, fr, last in zip(stats, starts(stats, x_bytes), from_last):
        assert all((f >= 0.5) == last for f in fr), (s["name"], fr)


def test_set_pass_order_checks_its_mode():
    with pytest.raises(RuntimeError, match="set_pass_order: mode must be 0 .* or 1"):
        torch.ops.cbam_fused_sim.set_pass_order(2)


def _forward_dram(m, x, order, tiles):
    """The DRAM bytes a block's inference forward fetches (the simulator's L2 model), per
    x-sized pass and in all, over the bytes of x; x is 3.3 times the modelled L2, as at the
    float32 256x56x56 site at batch 64 on an H200 (205 MB, 60 MiB), scaled down 32 times with
    the SMs (4 of 132, about as many) so that the grids keep their waves."""
    sim = torch.ops.cbam_fused_sim
    old = sim.set_tuning(tiles, 4)
    sim.set_tuning(tiles, *old[1:])
    old_order = sim.set_pass_order(order)
    try:
        with testing.use_simulator(), testing.l2_model(60 * 2**20 // 32, sms=4), \
                torch.no_grad():
            y = m(x)
            stats = testing.simulator_stats()
    finally:
        sim.set_tuning(*old)
        sim.set_pass_order(old_order)
    xb = x.numel() * x.element_size()
    passes = {s["name"]: s["l2_miss_bytes"] / xb for s in stats if s["name"] in X_PASSES}
    return y, passes, sum(s["l2_miss_bytes"] for s in stats) / xb


def test_a_blocks_passes_meet_in_the_modelled_l2():
    """Through the L2 model: every pass in the forward order fetches all of x from DRAM (x is
    3.3 L2s, each pass starts where the one before it began); in the alternating order, with the
    default grids (32 tiles an SM: a few waves, each over a band of x), the pool over C and the
    apply find in L2 part of what the pass before them touched last, at least a third of an L2
    and a seventh of one. With 8 tiles an SM (the default before: one wave over all of x) the
    same order meets much less. Either order gives the same bits."""
    gen = torch.Generator().manual_seed(43)
    x = rand_x((2, 256, 56, 56), torch.float32, "cf", gen)
    m = cbam_fused.CBAM(256).eval()
    l2_over_x = 60 * 2**20 / 32 / (x.numel() * 4)
    runs = {(order, tiles): _forward_dram(m, x, order, tiles) for order in (0, 1) for tiles in (32, 8)}
    for tiles in (32, 8):
        assert same_bits((runs[(0, tiles)][0],), (runs[(1, tiles)][0],)), tiles
    for tiles in (32, 8):
        fwd = runs[(0, tiles)][1]
        assert all(v > 0.97 for v in fwd.values()), (tiles, fwd)
    alt = runs[(1, 32)][1]
    assert alt["pool_over_s"] > 0.99, alt  # new to the L2
    assert 1 - alt["pool_over_c"] > l2_over_x / 3, (alt, l2_over_x)
    assert 1 - alt["apply_gates"] > l2_over_x / 7, (alt, l2_over_x)
    gain = {t: runs[(0, t)][2] - runs[(1, t)][2] for t in (32, 8)}
    assert gain[32] > 2 * gain[8] and gain[32] > 0.15, gain
