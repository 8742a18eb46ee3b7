"""cbam_fused::channel_head, the channel gate's head as one op (csrc/kernels/channel_head.cuh):
the stacked pools over S, the MLP (or the single layer of ultralytics' variant) summed over the
pools, the sigmoid.

Its CPU kernel (the ATen ops the block ran before) against a float64 oracle written here from the
definitions; its CUDA kernels through the SIMT simulator against the CPU kernel, with poisoned
outputs, on every pool list (one to four pools, any order, the blend), every activation, one and
two layers, with and without biases, shapes under, at and over a 32-wide tile and a split of the
c axis, the one-split, the split and the chunk-a-split launches and the three fiber schedules;
NaN propagation; its checks, word for word on every kernel; opcheck; the bytes it moves; and its
place in the block (one op, no ATen linear).
"""
import pytest
import torch

from cbam_fused import _cpu_kernels as cpu
from cbam_fused import _ops

from conftest import needs_cuda, sim_has
from test_spatial_head import run_sim as run_head_sim

testing = pytest.importorskip("cbam_fused.testing")
needs_sim = pytest.mark.skipif(not sim_has("channel_head"),
                               reason="the simulator build (cbam_fused._sim) is missing")
# the launcher's debug tile modes: normal, one split of the c axis, a 32-column chunk a split
TILE_NORMAL, TILE_ONE_SPLIT, TILE_CHUNK_SPLITS = 0, 1, 2
ACTS = ("relu", "silu", "gelu", "identity")
POOLS = ("avg+max", "max", "blend", "avg+max+lp+lse", "lse+avg", "max+lp+avg")


def make_args(n, c, hidden, pools="avg+max", act="relu", two_layers=True, bias=True,
              dtype=torch.float64, seed=0):
    """Random pools ([N, C]; max >= avg, lp > 0 as the pools over S give them) and parameters
    in the accumulation dtype, as the block passes them: (avg, max, lp, lse, w1, b1, w2, b2,
    pools, act). One layer: w1 is [C, C] and there is no w2 / b2."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    avg = r(n, c)
    mx = avg + r(n, c, lo=0.0, hi=2.0)
    lp = r(n, c, lo=0.1, hi=3.0)
    lse = mx + r(n, c, lo=0.0, hi=1.0)
    h = hidden if two_layers else c
    scale = 1.0 / max(c, 1) ** 0.5
    w1 = r(h, c) * scale
    b1 = r(h) if bias else None
    w2 = r(c, h) * (1.0 / max(h, 1) ** 0.5) if two_layers else None
    b2 = r(c) if bias and two_layers else None
    return [avg, mx, lp, lse, w1, b1, w2, b2, pools, act]


def oracle(avg, mx, lp, lse, w1, b1, w2, b2, pools, act):
    """float64 from the definitions: (gc, P, h as the op saves it)."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    named = {"avg": d(avg), "max": d(mx), "lp": d(lp), "lse": d(lse)}
    w1, b1, w2, b2 = d(w1), d(b1), d(w2), d(b2)
    ins = [0.5 * (named["avg"] + named["max"])] if pools == "blend" else [
        named[k] for k in pools.split("+")]
    p = torch.cat(ins, 0)
    h = p @ w1.t() + (0 if b1 is None else b1)
    if w2 is None:
        z, saved = h, h
    else:
        a = {"relu": torch.relu, "silu": torch.nn.functional.silu,
             "gelu": torch.nn.functional.gelu, "identity": lambda t: t}[act](h)
        z = a @ w2.t() + (0 if b2 is None else b2)
        saved = a if act == "relu" else h
    gc = torch.sigmoid(z.reshape(len(ins), avg.shape[0], -1).sum(0))
    return gc, p, saved


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def magnitudes(avg, mx, lp, lse, w1, b1, w2, b2, pools, act):
    """Each output's sum of |terms| in float64 (gc: of its logit, including what h's own error
    carries through W2): the scale of a float32 sum's rounding error, whatever its order."""
    a = lambda t: None if t is None else t.double().abs()  # noqa: E731
    _, p, _ = oracle(avg, mx, lp, lse, w1, b1, w2, b2, pools, act)
    mag_h = p.abs() @ a(w1).t() + (0 if b1 is None else a(b1))
    k = p.shape[0] // avg.shape[0] if avg.shape[0] else 1
    if w2 is None:
        mag_z = mag_h
    else:  # |act(h)| <= |h| + its error, for every activation here (gelu: <= |h| too)
        mag_z = 2 * mag_h @ a(w2).t() + (0 if b2 is None else a(b2))
    mag_gc = mag_z.reshape(k, avg.shape[0], -1).sum(0)
    return mag_gc, p.abs(), mag_h


def check_close(got, want, dtype, args=None):
    """got against want (float64: to 1e-12); in float32, element by element against the float64
    oracle of args, within twice the float32 CPU kernel's own largest error plus 4e-6 of the
    output's sum of |terms| (dot products of up to a few hundred terms, summed in another
    order)."""
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape and g.is_contiguous()
    if dtype == torch.float64 or args is None:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        return
    exact = oracle(*args)
    for name, g, w, e, mag in zip(("gc", "p", "h"), got, want, exact, magnitudes(*args)):
        if not g.numel():
            continue
        bound = 2 * _err(w, e) + 4e-6 * mag
        excess = ((g.double() - e).abs() - bound).max().item()
        assert excess <= 0, (name, _err(g, e), _err(w, e), excess)


def run_sim(args, schedule="forward", tile=TILE_NORMAL):
    """(outputs, launch stats) of channel_head through the simulator, outputs poisoned."""
    return run_head_sim(args, schedule=schedule, tile=tile, op="channel_head")


# (N, C, hidden): under a tile, a row tile's edge (33 rows of P), several 32-column chunks and
# splits of c, C = 1, a hidden layer of 1 and over a tile
SHAPES = [(2, 16, 4), (3, 40, 5), (17, 70, 33), (1, 1, 1), (5, 300, 20), (40, 129, 64),
          (1, 7, 1)]
# (pools, act, two layers, bias)
VARIANTS = [("avg+max", "relu", True, True), ("max", "silu", True, False),
            ("blend", "gelu", True, True), ("avg+max+lp+lse", "identity", True, True),
            ("lse+avg", "relu", True, False), ("avg", "relu", False, True),
            ("max+lp+avg", "gelu", False, False)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_kernel_matches_the_definitions(shape, variant):
    pools, act, two, bias = variant
    args = make_args(*shape, pools, act, two, bias)
    check_close(cpu.HEAD_KERNELS["channel_head"](*args), oracle(*args), torch.float64)


@needs_sim
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_simulated_kernels_match_the_cpu_kernel(shape, variant, dtype):
    pools, act, two, bias = variant
    args = make_args(*shape, pools, act, two, bias, dtype=dtype)
    out, stats = run_sim(args)
    assert {s["name"] for s in stats} == {"channel_head"} and len(stats) == 2
    check_close(out, cpu.HEAD_KERNELS["channel_head"](*args), dtype, args)


@needs_sim
@pytest.mark.parametrize("tile", [TILE_ONE_SPLIT, TILE_CHUNK_SPLITS])
@pytest.mark.parametrize("shape", [(5, 300, 20), (40, 129, 64), (3, 40, 5)])
def test_split_and_unsplit_launches_agree(shape, tile):
    """One split of the c axis (the hidden layer finished in its kernel) and a 32-column chunk a
    split (partials, which each tile's last split to finish adds: the same launch,
    kernels/combine_partials.cuh), both two launches: the same values as the normal launch, to
    float64 rounding (the splits change the order of a dot product's sum); the tiles' counters
    zero again after."""
    args = make_args(*shape, "avg+max", "silu")
    out, stats = run_sim(args, tile=tile)
    assert len(stats) == 2, [s["grid"] for s in stats]
    kept = torch.ops.cbam_fused_sim.group_counters()
    assert all(int(b.abs().sum()) == 0 for b in kept)
    if tile == TILE_CHUNK_SPLITS:
        assert stats[0]["grid"][2] == -(-shape[1] // 32)
    else:
        assert stats[0]["grid"][2] == 1
    normal, _ = run_sim(args)
    for a, b in zip(out, normal):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def assert_no_race(run, args, schedule):
    """`run` (a run_sim) gives bitwise the forward order's outputs under `schedule`, at every
    launch shape."""
    for tile in (TILE_NORMAL, TILE_ONE_SPLIT, TILE_CHUNK_SPLITS):
        want, _ = run(args, tile=tile)
        got, _ = run(args, schedule=schedule, tile=tile)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def assert_matches(got, want, nan=False):
    """Same shapes, values to 1e-12 (NaN where want has NaN, with nan)."""
    for g, w in zip(got, want):
        assert g.shape == w.shape
        if nan:
            assert torch.equal(torch.isnan(g), torch.isnan(w))
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, equal_nan=nan)


@needs_sim
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_no_race(schedule):
    assert_no_race(run_sim, make_args(17, 70, 33, "avg+max+lp+lse", "gelu", dtype=torch.float32),
                   schedule)


@needs_sim
@pytest.mark.parametrize("shape,launches", [((0, 16, 4), 0), ((3, 0, 4), 1), ((3, 16, 0), 2)])
def test_empty_extents(shape, launches):
    """No sample: nothing launched. No channel: h is b1 (after relu), gc and P are empty. No
    hidden unit: gc = sigmoid(k b2) and P is still written."""
    args = make_args(*shape)
    out, stats = run_sim(args)
    assert len(stats) == launches
    assert_matches(out, cpu.HEAD_KERNELS["channel_head"](*args))


@needs_sim
@pytest.mark.parametrize("act", ACTS)
def test_nan_and_inf_propagate_as_in_aten(act):
    """A NaN pool makes its sample's hidden layer and gate NaN (relu keeps NaN, as ATen's
    does); an inf pool saturates like ATen's."""
    args = make_args(3, 40, 5, "avg+max", act)
    args[0][1, 3] = float("nan")
    args[1][2, 7] = float("inf")
    got, _ = run_sim(args)
    assert_matches(got, cpu.HEAD_KERNELS["channel_head"](*args), nan=True)
    assert torch.isnan(got[0][1]).all()


@needs_sim
@pytest.mark.parametrize("n,c,hidden", [(16, 256, 16), (64, 256, 16), (40, 100, 70)])
def test_bytes_moved(n, c, hidden):
    """Global bytes of the op (one split of c) against its tiling's count: P's inputs read once
    per 32-unit tile of h, W1 once per 32-row tile of P, W2 once per 32-sample tile of gc, h
    once per 32-channel tile of gc, b1 and b2 once per output thread; every output written
    once."""
    args = make_args(n, c, hidden, "avg+max", "relu", dtype=torch.float32)
    _, stats = run_sim(args, tile=TILE_ONE_SPLIT)
    r = 2 * n
    tiles = lambda m: -(-m // 32)  # noqa: E731
    loads = (tiles(hidden) * r * c + tiles(r) * hidden * c + r * hidden + tiles(n) * c * hidden
             + tiles(c) * r * hidden + tiles(n) * c * 8)
    assert sum(s["bytes_read"] for s in stats) <= 4 * loads
    assert sum(s["bytes_written"] for s in stats) == 4 * (n * c + r * c + r * hidden)
    # at most twice the bytes of the tensors themselves where P and h are one tile
    if r <= 32 and hidden <= 32:
        floor = 4 * (r * c + 2 * hidden * c + hidden + c + n * c + r * c + r * hidden)
        total = sum(s["bytes_read"] + s["bytes_written"] for s in stats)
        assert total <= 2 * floor, (total, floor)


# the ResNet-50 sites' heads at batch 64 and 256 (C, C / 16 hidden units): split and unsplit
GPU_SHAPES = SHAPES + [(64, 256, 16), (64, 2048, 128), (256, 1024, 64), (256, 2048, 128)]


@needs_cuda
@pytest.mark.skipif(not _ops.has_cuda_kernel("channel_head"), reason="no CUDA kernel built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_kernels_match_the_cpu_kernel(shape, variant, dtype):
    pools, act, two, bias = variant
    args = make_args(*shape, pools, act, two, bias, dtype=dtype)
    check_close(run_cuda("channel_head", args), cpu.HEAD_KERNELS["channel_head"](*args), dtype,
                args)


def run_cuda(op, args):
    """Op `op` on CUDA copies of args, twice: the outputs (on the CPU) after checking that the
    second run is bitwise equal to the first."""
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in args]
    got = getattr(torch.ops.cbam_fused, op)(*dev)
    again = getattr(torch.ops.cbam_fused, op)(*dev)
    for a, b in zip(got, again):
        assert torch.equal(a, b)
    return [t.cpu() for t in got]


# ------------------------------------------------------------------------------ bad input
def _set(i, v):
    return lambda a: a.__setitem__(i, v(a) if callable(v) else v)


BAD = [
    (_set(8, "avg+avg"), "pools must be 'blend' or distinct names of avg, max, lp, lse joined by "
                         "'+', got 'avg+avg'"),
    (_set(8, "mean"), "pools must be 'blend' or distinct names of avg, max, lp, lse joined by "
                      "'+', got 'mean'"),
    (_set(9, "tanh"), "act must be 'relu', 'silu', 'gelu' or 'identity', got 'tanh'"),
    (_set(0, lambda a: a[0].reshape(3, 2, 20)), "avg must have shape [N, C], got [3, 2, 20]"),
    (_set(1, lambda a: a[1][:2]), "max must have the shape of avg [3, 40], got [2, 40]"),
    (_set(1, lambda a: a[1].float()), "max must have the dtype of avg (Double), got Float"),
    (lambda a: (a.__setitem__(8, "avg+lp"), a.__setitem__(2, None)),
     "pools 'avg+lp' need lp"),
    (_set(4, lambda a: a[4][:, :39]), "w1 must have shape [H, C] with C = 40, got [5, 39]"),
    (_set(5, lambda a: a[5][:4]), "b1 must have shape [H] = [5], got [4]"),
    (_set(6, lambda a: a[6][:, :4]), "w2 must have shape [C, H] = [40, 5], got [40, 4]"),
    (_set(7, lambda a: a[7][:39]), "b2 must have shape [C] = [40], got [39]"),
    (_set(6, None), "w1 must have shape [C, C] = [40, 40] without w2 (one layer), got [5, 40]"),
    (lambda a: (a.__setitem__(6, None), a.__setitem__(4, torch.zeros(40, 40).double()),
                a.__setitem__(5, None)), "b2 needs w2"),
]


def _bad_args(mutate):
    args = make_args(3, 40, 5)
    mutate(args)
    return args


@pytest.mark.parametrize("mutate,message", BAD)
@pytest.mark.parametrize("where", ["cpu", "fake", "sim"])
def test_bad_input_is_named(mutate, message, where):
    from test_spatial_head import check_refused_everywhere
    check_refused_everywhere("channel_head", _bad_args(mutate), message, where)


def test_float16_pools_are_refused():
    args = [t.half() if isinstance(t, torch.Tensor) else t for t in make_args(3, 40, 5)]
    with pytest.raises(RuntimeError, match="avg must be float32 or float64"):
        torch.ops.cbam_fused.channel_head(*args)


@pytest.mark.parametrize("variant", VARIANTS[:6])
def test_opcheck(variant):
    pools, act, two, bias = variant
    args = make_args(4, 24, 6, pools, act, two, bias, dtype=torch.float32)
    torch.library.opcheck(torch.ops.cbam_fused.channel_head.default, args)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = make_args(3, 40, 5, "avg+max+lp+lse")
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        gc, p, h = torch.ops.cbam_fused.channel_head(*fargs)
    assert gc.shape == (3, 40) and p.shape == (12, 40) and h.shape == (12, 5)


# ------------------------------------------------------------------------------ in the block
@needs_sim
@pytest.mark.parametrize("variant", ["official", "timm_light", "ultralytics", "official_lp_lse"])
def test_block_runs_one_channel_head(variant):
    """The block's channel gate is one channel_head op (two launches, no ATen linear),
    and the block still matches the reference, forward and gradients."""
    from test_functional import _module, compare_with_reference
    m = _module(variant, 6, 2, torch.float64)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    with testing.use_simulator():
        m(x)
        names = [s["name"] for s in testing.simulator_stats()]
    assert names.count("channel_head") == 2, names
    with testing.use_simulator():
        compare_with_reference(m, x, train=True, tol=1e-10)
