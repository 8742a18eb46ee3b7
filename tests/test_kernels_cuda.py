"""The CUDA kernels of every cbam_fused op on a GPU (skipped without one): the comparisons of
test_kernels_sim.py against the pure-PyTorch kernels, ResNet-50 CBAM-site shapes, a CUDA-graph
capture and replay, and bitwise-equal repeated runs (deterministic reductions)."""
import pytest
import torch

import cbam_fused  # noqa: F401
from cbam_fused import _cpu_kernels as cpu
from cbam_fused import _ops

from test_kernels_sim import (BASE_TUNING, DEFAULT_TUNING, DTYPES, FOLD_SHAPES, SHIFTED_SHAPES,
                              MEDIUM_ROW_SHAPES, OP_TUNING_SHAPES, OPS, SHAPES, TILE_NORMAL,
                              TILE_SINGLE, TILE_SMALL, X_SHAPED, op_args, op_tuning_rows, rand_x,
                              to_layout, tolerances)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def native_kernels():
    if not all(_ops.has_cuda_kernel(op) for op in OPS):
        pytest.skip("cbam_fused was built without its CUDA kernels")
    torch.ops.cbam_fused_debug.set_debug(True, TILE_NORMAL)  # poisoned outputs
    yield
    torch.ops.cbam_fused_debug.set_debug(False, TILE_NORMAL)


def cuda_args(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def bits(t):
    """t's bytes (a floating tensor, any layout) or t itself, for bitwise comparisons."""
    return t.contiguous().view(torch.uint8) if t.is_floating_point() else t


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check(op, got, want, dtype, on_device=False):
    for g, w in zip(got, want):
        assert g.is_cuda and g.dtype == w.dtype and g.shape == w.shape, op
        if not on_device:
            g, w = g.cpu(), w.cpu()
        if g.dtype == torch.int64:
            assert torch.equal(g, w), op
        else:
            torch.testing.assert_close(g, w, equal_nan=True, **tolerances(op, dtype))


def last_sample(args):
    return tuple(a[-1:] if isinstance(a, torch.Tensor) else a for a in args)


def check_against_float64(op, got, args, dtype, ratio=4.0):
    """got, the outputs of op on args (x of `dtype`): an x-sized output against the pure-PyTorch
    kernel's (elementwise, as check() does); a reduction against that kernel run on args in
    float64 (the oracle), within `ratio` times the error of the same kernel in the accumulation
    dtype (its own error: a float32 sum over 16.8M positions is off by about 3e-5 relative in
    any order) plus the usual tolerances; indices equal to the accumulation-dtype run's."""
    want = as_tuple(cpu.ORACLE[op](*args))
    if op in X_SHAPED:
        check(op, got, want, dtype, on_device=True)
        return
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)
    oracle = as_tuple(cpu.ORACLE[op](*args64))
    del args64
    tol = tolerances(op, dtype)
    for i, (g, w, o) in enumerate(zip(got, want, oracle)):
        assert g.is_cuda and g.dtype == w.dtype and g.shape == w.shape, (op, i)
        if g.dtype == torch.int64:
            assert torch.equal(g, w), (op, i)
            continue
        own = (w.double() - o).abs().max()
        err = (g.double() - o).abs()
        bad = err > ratio * own + tol["atol"] + tol["rtol"] * o.abs()
        assert not bad.any(), (f"{op} output {i}: {int(bad.sum())} of {err.numel()} beyond "
                               f"{ratio} x the accumulation-dtype kernel's own error "
                               f"({float(own):.3g}): max error {float(err.max()):.3g}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["cf", "cl", "strided"])
def test_op_matches_cpu_kernel_on_gpu(op, dtype, layout):
    gen = torch.Generator().manual_seed(1)
    for si, (n, c, sp) in enumerate(SHAPES):
        x = rand_x((n, c) + sp, dtype, layout, gen)
        for mode in (TILE_NORMAL, TILE_SMALL, TILE_SINGLE):
            args = op_args(op, x, gen, (si + mode) % 3)
            torch.ops.cbam_fused_debug.set_debug(True, mode)
            got = as_tuple(getattr(torch.ops.cbam_fused, op)(*cuda_args(args)))
            torch.ops.cbam_fused_debug.set_debug(True, TILE_NORMAL)
            check(op, got, as_tuple(cpu.ORACLE[op](*args)), dtype)


@pytest.mark.parametrize("shape,layout", FOLD_SHAPES + SHIFTED_SHAPES + MEDIUM_ROW_SHAPES,
                         ids=lambda v: str(v))
def test_folded_rows_on_gpu(shape, layout):
    """Rows whose length is not a multiple of the vector width, folded into whole vectors
    (kernels/common.cuh Fold) where their count allows, else loaded shifted across them
    (load_rows_shifted: windows and shuffles), the reductions along such rows staged whole
    (reduce_k_rows' medium rows) or from each row's first 16-byte boundary (reduce_k_shifted,
    launchers/reduction.h): every op, every dtype, the normal tiling and one row tile, against the
    pure-PyTorch kernels, and bitwise the same on a second run."""
    gen = torch.Generator().manual_seed(51)
    for dtype in DTYPES:
        x = rand_x(shape, dtype, layout, gen)
        for op in OPS:
            for mode in (TILE_NORMAL, TILE_SINGLE):
                args = op_args(op, x, gen, mode)
                torch.ops.cbam_fused_debug.set_debug(True, mode)
                try:
                    got = as_tuple(getattr(torch.ops.cbam_fused, op)(*cuda_args(args)))
                    again = as_tuple(getattr(torch.ops.cbam_fused, op)(*cuda_args(args)))
                finally:
                    torch.ops.cbam_fused_debug.set_debug(True, TILE_NORMAL)
                check(op, got, as_tuple(cpu.ORACLE[op](*args)), dtype)
                for a, b in zip(got, again):  # (dx is channels-last: bits of a copy)
                    assert torch.equal(bits(a), bits(b)), op


RESNET50_SITES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


@pytest.mark.parametrize("site", RESNET50_SITES, ids=lambda s: f"C{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "cf"), (torch.bfloat16, "cl")],
                         ids=["f32-nchw", "bf16-cl"])
def test_resnet50_sites(site, dtype, layout):
    """Batch 8 at every ResNet-50 CBAM site, against the pure-PyTorch kernels run on the GPU;
    a second run, its tiles in the reverse order (launchers/common.h next_pass_reversed), gives
    the same bits."""
    c, hw = site
    gen = torch.Generator().manual_seed(2)
    x = rand_x((8, c, hw, hw), dtype, layout, gen)
    for op in OPS:
        args = cuda_args(op_args(op, x, gen, 0))
        torch.ops.cbam_fused_debug.set_pass_order(1)  # (the next pass from the first tile)
        got = as_tuple(getattr(torch.ops.cbam_fused, op)(*args))
        again = as_tuple(getattr(torch.ops.cbam_fused, op)(*args))
        want = as_tuple(cpu.ORACLE[op](*args))  # device-agnostic PyTorch code
        check(op, got, want, dtype)
        for a, b in zip(got, again):  # deterministic: bitwise equal (random data: no NaN)
            assert torch.equal(a, b), op


def _every_op_under(settings, x, gen, dtype):
    """Under each set_tuning setting: every op on the GPU against the pure-PyTorch kernels, and
    bitwise the same on a second run; the defaults restored afterwards."""
    try:
        for setting in settings:
            torch.ops.cbam_fused_debug.set_tuning(*setting)
            for op in OPS:
                args = cuda_args(op_args(op, x, gen, 0))
                got = as_tuple(getattr(torch.ops.cbam_fused, op)(*args))
                check(op, got, as_tuple(cpu.ORACLE[op](*args)), dtype)
                again = as_tuple(getattr(torch.ops.cbam_fused, op)(*args))
                for a, b in zip(got, again):
                    assert torch.equal(a, b), (op, setting)
    finally:
        torch.ops.cbam_fused_debug.set_tuning(*DEFAULT_TUNING)


@pytest.mark.parametrize("row", op_tuning_rows(), ids=lambda r: f"{r[0]}-{'cl' if r[1] else 'cf'}")
def test_each_ops_own_tuning_on_gpu(row):
    """Each row of csrc/launchers/op_tuning.h on the GPU, at the shape where the simulator shows
    its own launches (OP_TUNING_SHAPES) and at the ResNet-50 1024x14x14 site, batch 64 (its rows
    of 49 vectors take span lanes, reduce_r_mode 1, with the row's knobs: a combination no sweep
    timed): every op under the defaults (each op's own) and under the base values (every op
    alike) against the pure-PyTorch kernels, bitwise the same on a second run."""
    op, cl, elem_bytes = row[:3]
    dtype = torch.float32 if elem_bytes == 4 else torch.bfloat16
    gen = torch.Generator().manual_seed(37)
    for shape in (OP_TUNING_SHAPES[op, cl], (64, 1024, 14, 14)):
        x = rand_x(shape, dtype, "cl" if cl else "cf", gen)
        _every_op_under([DEFAULT_TUNING, BASE_TUNING], x, gen, dtype)


@pytest.mark.parametrize("shape,layout", [((4, 300, 7, 7), "cf"), ((3, 130, 5, 5), "cf"),
                                          ((4, 64, 7, 7), "cl"), ((2, 24, 9, 15), "cl")],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_reduce_k_modes_on_gpu(shape, layout, dtype):
    """Short rows under each reduce_k mode (0, 1: the tiled reduce_k; 2: reduce_k_rows, one thread
    a row; 3, the default: as 2, and two rows in flight where the grid is small) on the GPU:
    every op against the pure-PyTorch kernels, and each mode's results bitwise the same on a
    second run."""
    gen = torch.Generator().manual_seed(23)
    x = rand_x(shape, dtype, layout, gen)
    _every_op_under([(8, 4, 0, mode, 4, 0) for mode in (3, 2, 1, 0)], x, gen, dtype)


@pytest.mark.parametrize("shape,layout,dtype", [
    ((2, 24, 13, 16), "cf", torch.float32), ((1, 8, 40, 40), "cf", torch.float32),
    ((2, 8, 7, 11), "cf", torch.float32), ((2, 520, 3, 3), "cl", torch.bfloat16),
    ((4, 256, 28, 28), "cf", torch.float32), ((4, 2048, 7, 7), "cl", torch.bfloat16)],
    ids=lambda v: str(v))
def test_reduce_k_vectors_in_flight_on_gpu(shape, layout, dtype):
    """reduce_k with all of a lane's vectors of a row loaded before the fold (4, the default) and
    one at a time (1), under reduce_k modes 2 and 3 (3: two rows' vectors loaded before the fold
    where the grid is small), and each grid / rows-in-flight setting of a GPU sweep's corners:
    every op against the pure-PyTorch kernels on the GPU, and bitwise the same results under both
    k_vectors_in_flight settings (the same tiles, the same fold order)."""
    gen = torch.Generator().manual_seed(29)
    x = rand_x(shape, dtype, layout, gen)
    try:
        for tiles, rows, u, mode in [(8, 4, 0, 3), (8, 4, 0, 2), (32, 1, 2, 3), (4, 1, 1, 2),
                                     (8, 1, 4, 3), (64, 4, 0, 3)]:
            for op in OPS:
                args = cuda_args(op_args(op, x, gen, 0))
                outs = []
                for kv in (4, 1):
                    torch.ops.cbam_fused_debug.set_tuning(tiles, rows, u, mode, kv)
                    outs.append(as_tuple(getattr(torch.ops.cbam_fused, op)(*args)))
                check(op, outs[0], as_tuple(cpu.ORACLE[op](*args)), dtype)
                for a, b in zip(*outs):
                    assert torch.equal(a, b), (op, tiles, rows, u, mode)
    finally:
        torch.ops.cbam_fused_debug.set_tuning(*DEFAULT_TUNING)


@pytest.mark.parametrize("shape,layout,dtype", [
    ((2, 300, 7, 7), "cf", torch.float32), ((2, 64, 14, 14), "cf", torch.float32),
    ((2, 40, 5, 5), "cf", torch.bfloat16), ((2, 24, 5, 5), "cl", torch.float32),
    ((64, 2048, 7, 7), "cf", torch.float32)], ids=lambda v: str(v))
def test_reduce_r_modes_on_gpu(shape, layout, dtype):
    """reduce_r's lanes of short rows (reduce_r_mode 1: one per vector, blocks of fewer than 256
    threads; 0, the default: a power of two) on the GPU: every op against the pure-PyTorch
    kernels, and each mode's results bitwise the same on a second run."""
    gen = torch.Generator().manual_seed(47)
    x = rand_x(shape, dtype, layout, gen)
    _every_op_under([(8, 4, 0, 3, 4, mode) for mode in (1, 0)], x, gen, dtype)


def capture(step):
    """step() run once on a side stream (warm-up), then captured in a CUDA graph: (the graph, the
    outputs of the captured call, which each replay rewrites)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def test_cuda_graph_capture_and_replay():
    torch.ops.cbam_fused_debug.set_debug(False, TILE_NORMAL)  # no fill_ inside the capture
    gen = torch.Generator().manual_seed(3)
    x = rand_x((4, 64, 14, 14), torch.float32, "cl", gen).cuda()
    gc = torch.rand(4, 64, generator=gen).cuda()
    gs = torch.rand(4, 196, generator=gen).cuda()
    ops = torch.ops.cbam_fused

    def step():
        a, m, _ = ops.pool_over_s(x, None)
        u, v, _ = ops.pool_over_c(x, gc)
        y = ops.apply_gates(x, gc, gs)
        rc, rs = ops.backward_reduce(y, x, gc, gs, True, True)
        return a, m, u, v, y, rc, rs

    eager = step()
    graph, captured = capture(step)
    x.copy_(to_layout(torch.randn(4, 64, 14, 14, generator=gen), "cl").cuda())
    graph.replay()
    fresh = step()
    for a, b in zip(captured, fresh):
        assert torch.equal(a, b)
    assert not torch.equal(captured[4], eager[4])  # the replay saw the new x


def test_programmatic_dependent_launch_gives_the_same_bits():
    """set_pdl(1): each kernel may launch while the one before it in the stream runs its last
    wave and waits for its completion at its first statement (dialect.cuh). Every op, and a
    CBAM block's training step whose kernels each read what the one before wrote (behind an
    ATen kernel that writes x just before), eagerly and replayed from a CUDA graph, gives the
    bits it gives without."""
    torch.ops.cbam_fused_debug.set_debug(False, TILE_NORMAL)  # no fill_ inside the capture
    gen = torch.Generator().manual_seed(31)
    ops = torch.ops.cbam_fused
    x = rand_x((8, 256, 28, 28), torch.float32, "cf", gen).cuda()
    block = cbam_fused.CBAM(256).cuda().to(memory_format=torch.channels_last)
    xb = rand_x((8, 256, 14, 14), torch.float32, "cl", gen).cuda()
    # (on the GPU before the capture: a copy from pageable memory cannot be captured)
    block_args = [cuda_args(op_args(op, x.cpu(), gen, 0)) for op in OPS]

    def step():
        outs = [as_tuple(getattr(ops, op)(*a)) for op, a in zip(OPS, block_args)]
        xi = (xb * 1.5).detach().requires_grad_()  # an ATen kernel writes the block's input
        y = block(xi)
        y.square().sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in block.parameters()]
        block.zero_grad(set_to_none=True)
        # (y detached: a kept autograd graph keeps its AccumulateGrad nodes on the stream they
        # ran on, which the capture's backward would then wait on)
        return [t for o in outs for t in o] + [y.detach()] + grads

    assert torch.ops.cbam_fused_debug.set_pdl(0) == 0
    want = step()
    try:
        assert torch.ops.cbam_fused_debug.set_pdl(1) == 0
        for _ in range(3):
            got = step()
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        graph, captured = capture(step)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(captured, want))
    finally:
        torch.ops.cbam_fused_debug.set_pdl(0)


def test_split_reductions_on_streams_and_graphs():
    """The reductions split over tiles finish in their launch (the last block of each group,
    kernels/combine_partials.cuh), counting on per-stream counters that those blocks set back
    to zero, and on a buffer of its own per launch in a CUDA graph. Side streams running the
    ops at once, then two graphs captured on the same stream replayed at once on two streams,
    each give the eager results bit for bit; every kept counter is zero after."""
    torch.ops.cbam_fused_debug.set_debug(False, TILE_NORMAL)  # no fill_ inside the capture
    gen = torch.Generator().manual_seed(29)
    ops = torch.ops.cbam_fused
    xs = [rand_x((4, 512, 7, 7), torch.float32, "cf", gen).cuda() for _ in range(2)]
    gcs = [torch.rand(4, 512, generator=gen).cuda() for _ in range(2)]

    def step(i):  # a folded pool over C split over row tiles, a pool over S, backward_reduce
        u, v, iu = ops.pool_over_c(xs[i], gcs[i])
        a, m, ia = ops.pool_over_s(xs[i], None)
        rc, rs = ops.backward_reduce(xs[1 - i], xs[i], gcs[i], None, True, True)
        return u, v, iu, a, m, ia, rc, rs

    eager = [step(0), step(1)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = [[], []]
    for _ in range(20):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(step(i))
    torch.cuda.synchronize()
    for i in range(2):
        for got in outs[i]:
            assert all(torch.equal(a, b) for a, b in zip(got, eager[i])), i
    graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    captured = []
    for i, graph in enumerate(graphs):
        with torch.cuda.graph(graph):  # both on torch.cuda.graph's default capture stream
            captured.append(step(i))
    for _ in range(20):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                graphs[i].replay()
        torch.cuda.synchronize()
        for i in range(2):
            assert all(torch.equal(a, b) for a, b in zip(captured[i], eager[i])), i
    kept = [b for b in torch.ops.cbam_fused_debug.group_counters() if b.is_cuda]
    assert len(kept) >= 3  # the current stream's and the two side streams'
    assert all(int(b.abs().sum()) == 0 for b in kept)


# ~50 GB each at its peak (the float64 oracle of a sample: 8.6 GB per x-sized tensor): under
# pytest-xdist (the GPU protocol's -n 8 --dist loadgroup) both
# run on one worker, one after the other, not side by side with each other
@pytest.mark.xdist_group("gpu_memory")
@pytest.mark.parametrize("layout", ["cf", "cl"])
def test_tensors_of_more_than_2_31_elements(layout):
    """64-bit element offsets: x of 3 x 64 x 4097 x 4097 bfloat16 (3.2e9 elements, 6.4 GB), whose
    last sample lies wholly beyond element 2^31. Every op's results for that sample against the
    pure-PyTorch kernels run on the GPU on that sample alone (a 32-bit offset would read the
    wrong sample or fault); its sums over 16.8M positions against the float64 oracle, as a ratio
    to the float32 kernels' own error."""
    if torch.cuda.get_device_properties(0).total_memory < 75 * 2 ** 30:
        pytest.skip("needs a GPU with at least 75 GiB (an 80 GB H100 or larger)")
    torch.ops.cbam_fused_debug.set_debug(False, TILE_NORMAL)
    shape = (3, 64, 4097, 4097)
    n, c, s = 3, 64, 4097 * 4097
    assert n * c * s > 2 ** 31 and 2 * c * s >= 2 ** 31  # the last sample starts past 2^31
    gen = torch.Generator(device="cuda").manual_seed(5)

    def big():
        t = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
        return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t

    def small_(l):
        return torch.rand((n, l), generator=gen, device="cuda") * 1.3 + 0.2

    def idx(l, ext):
        return torch.randint(0, ext, (n, l), generator=gen, device="cuda")

    x = big()
    gc, gs = small_(c), small_(s)
    cases = {
        "pool_over_s": lambda: (x, gs),
        "pool_over_s_lp_lse": lambda: (x, gs),
        "pool_over_c": lambda: (x, gc),
        "apply_gates": lambda: (x, gc, gs),
        "pool_over_c_backward_scale": lambda: (x, small_(s), small_(s), idx(s, c)),
        "pool_over_s_backward_scale": lambda: (x, small_(c), small_(c), idx(c, s)),
    }
    for op, make in cases.items():
        args = make()
        got = as_tuple(getattr(torch.ops.cbam_fused, op)(*args))
        check_against_float64(op, tuple(t[-1:] for t in got), last_sample(args),
                              torch.bfloat16)
        del got
    g = big()
    for op, args in (("backward_reduce", (g, x, gc, gs, True, True)),
                     ("grad_input", (g, gc, gs, small_(c), small_(c), idx(c, s), small_(s),
                                     small_(s), idx(s, c), 0)),
                     ("grad_input_lp_lse", (g, x, gc, gs, small_(c), small_(c), idx(c, s),
                                            small_(s), small_(s), idx(s, c), small_(c),
                                            small_(c), small_(c), small_(c) + 4, 0))):
        got = as_tuple(getattr(torch.ops.cbam_fused, op)(*args))
        check_against_float64(op, tuple(t[-1:] for t in got), last_sample(args),
                              torch.bfloat16)
        del got


def _head_case(op):
    """(float32 arguments, check(got on the CPU, want)) of a small case of head op `op` that
    splits its c axis / spans several blocks at the normal launch shape."""
    import test_batch_norm_gate as bng
    import test_channel_head as ch
    import test_channel_head_backward as chb
    import test_spatial_head as sh
    import test_spatial_head_backward as shb
    f32 = torch.float32
    if op == "batch_norm_gate":  # 4 x 40 x 40: several partial blocks
        args = bng.make_args(4, (40, 40), "both", f32)
        return args, lambda got, want: bng.check_close(got, want, bng.oracle(*args), f32)
    if op == "batch_norm_gate_backward":
        args, fwd = bng.make_bwd_args(4, (40, 40), "both", f32)
        exact = bng.bwd_oracle(args, fwd)
        return args, lambda got, want: bng.check_close(got, want, exact, f32)
    if op == "channel_head":
        args = ch.make_args(5, 300, 20, "avg+max+lp+lse", "gelu", dtype=f32)
        return args, lambda got, want: ch.check_close(got, want, f32, args)
    if op == "channel_head_backward":
        args, fwd = chb.make_bwd_args(5, 300, 20, "lse+avg", "silu", dtype=f32)
        return args, lambda got, want: chb.check_close(got, want, f32, args, fwd)
    geom, variant = ((9, 11), 7), ("max,mean", True, "affine", True)
    if op == "spatial_head":
        args = sh.make_args(*geom, *variant, dtype=f32, n=3)
        return args, lambda got, want: sh.check_close(got, want, f32, args)
    args, _ = shb.make_bwd_args(*geom, *variant, dtype=f32, n=3)
    refs = shb.float32_references(geom, variant, 3)
    return args, lambda got, want: shb.check_close(got, want, f32, *refs)


@pytest.mark.parametrize("op", _ops.HEAD_OPS)
@pytest.mark.parametrize("tile", [TILE_NORMAL, 1, 2])
def test_head_op_matches_cpu_kernel_on_gpu(op, tile):
    """Every head op on small float32 inputs at each debug launch shape (channel heads: normal,
    one split of c, a 32-column chunk a split; spatial heads: normal, one block, unstaged;
    BatchNorm gates: normal, one block each, ranges of 16 values),
    outputs poisoned, against the CPU kernel. Small and quick: the GPU protocol's sanitizer step
    runs them under memcheck, racecheck, initcheck and synccheck (scripts/gpu_check.py
    SANITIZE_K)."""
    if not _ops.has_cuda_kernel(op):
        pytest.skip(f"no CUDA kernel built for {op}")
    args, check_close = _head_case(op)
    want = cpu.HEAD_KERNELS[op](*args)
    torch.ops.cbam_fused_debug.set_debug(True, tile)
    try:
        got = getattr(torch.ops.cbam_fused, op)(*cuda_args(args))
    finally:
        torch.ops.cbam_fused_debug.set_debug(True, TILE_NORMAL)
    check_close([t.cpu() for t in got], want)
