"""The CUDA kernels of every cbam_fused op on a GPU (skipped without one): the comparisons of
test_kernels_sim.py against the pure-PyTorch kernels, ResNet-50 CBAM-site shapes, a CUDA-graph
capture and replay, and bitwise-equal repeated runs (deterministic reductions)."""
import pytest
import torch

import cbam_fused  # noqa: F401
from cbam_fused import _cpu_kernels as cpu
from cbam_fused import _ops

from test_kernels_sim import (DTYPES, OPS, SHAPES, TILE_NORMAL, TILE_SINGLE, TILE_SMALL, op_args,
                              rand_x, to_layout, tolerances)

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


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check(op, got, want, dtype):
    for g, w in zip(got, want):
        assert g.is_cuda and g.dtype == w.dtype and g.shape == w.shape, op
        g, w = g.cpu(), w.cpu()
        if g.dtype == torch.int64:
            assert torch.equal(g, w), op
        else:
            torch.testing.assert_close(g, w, equal_nan=True, **tolerances(op, dtype))


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
            check(op, got, as_tuple(cpu.KERNELS[op](*args)), dtype)


RESNET50_SITES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


@pytest.mark.parametrize("site", RESNET50_SITES, ids=lambda s: f"C{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "cf"), (torch.bfloat16, "cl")],
                         ids=["f32-nchw", "bf16-cl"])
def test_resnet50_sites(site, dtype, layout):
    """Batch 8 at every ResNet-50 CBAM site, against the pure-PyTorch kernels run on the GPU."""
    c, hw = site
    gen = torch.Generator().manual_seed(2)
    x = rand_x((8, c, hw, hw), dtype, layout, gen)
    for op in OPS:
        args = cuda_args(op_args(op, x, gen, 0))
        got = as_tuple(getattr(torch.ops.cbam_fused, op)(*args))
        want = as_tuple(cpu.KERNELS[op](*args))  # device-agnostic PyTorch code
        check(op, got, want, dtype)
        again = as_tuple(getattr(torch.ops.cbam_fused, op)(*args))
        for a, b in zip(got, again):  # deterministic: bitwise equal (random data: no NaN)
            assert torch.equal(a, b), op


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
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(to_layout(torch.randn(4, 64, 14, 14, generator=gen), "cl").cuda())
    graph.replay()
    fresh = step()
    for a, b in zip(captured, fresh):
        assert torch.equal(a, b)
    assert not torch.equal(captured[4], eager[4])  # the replay saw the new x
