"""The whole block on a GPU (skipped without one): every op runs its hand-written CUDA kernel (no
silent fallback), every variant matches the float64 reference forward and backward, float64
gradcheck, opcheck and torch.compile(fullgraph=True) with CUDA tensors."""
import copy

import pytest
import torch
from torch.library import opcheck

import cbam_fused
from cbam_fused import _ops
from conftest import randomize_
from test_functional import compare_with_reference
from test_gradcheck import gradcheck_module
from test_ops import op_args
from variants import VARIANTS, make

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_every_op_has_its_cuda_kernel():
    missing = [op for op in _ops.ALL_OPS if not _ops.has_cuda_kernel(op)]
    assert not missing, (f"on a GPU machine the package must be built with its CUDA kernels; "
                         f"these ops would run the PyTorch fallback: {missing}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_on_gpu_matches_reference(variant, train, dtype, layout):
    m = randomize_(make(variant, 24, hidden=6)).to(dtype).cuda()
    x = torch.randn(3, 24, 9, 7, dtype=dtype, device="cuda")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    compare_with_reference(m, x, train, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("variant", ["official", "spatial_first", "parallel", "ultralytics",
                                     "timm_light"])
def test_gradcheck_on_gpu(variant):
    m = randomize_(make(variant, 6, hidden=3)).double().cuda().train()
    assert gradcheck_module(m, torch.randn(2, 6, 3, 4, dtype=torch.float64, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cuda(dtype):
    for name, arg_list in op_args((2, 5, 3, 4), dtype, "channels_last").items():
        for args in arg_list:
            args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
            opcheck(getattr(torch.ops.cbam_fused, name), args)


def test_compile_fullgraph_on_gpu_matches_eager():
    torch._dynamo.reset()
    m = randomize_(cbam_fused.CBAM(32, hidden_channels=4)).cuda().train()
    m_eager = copy.deepcopy(m)
    x = torch.randn(4, 32, 14, 14, device="cuda").to(memory_format=torch.channels_last)
    y = torch.compile(m, fullgraph=True)(x.requires_grad_())
    y_e = m_eager(x)
    torch.testing.assert_close(y, y_e)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_e,) = torch.autograd.grad(y_e.square().sum(), x)
    torch.testing.assert_close(gx, gx_e)


@pytest.mark.parametrize("bn_momentum", [0.01, None], ids=["momentum", "cumulative"])
def test_training_step_captures_in_a_cuda_graph(bn_momentum):
    """Forward and backward of the whole module, running statistics and batch count included,
    captured in one CUDA graph (no host synchronisation anywhere, the cumulative average
    included) and replayed: the same as the same steps run eagerly."""
    torch.ops.cbam_fused_debug.set_debug(False, 0)  # no poisoning fill inside the capture
    m = randomize_(cbam_fused.CBAM(32, hidden_channels=4, bn_momentum=bn_momentum)).cuda()
    m.train()
    eager = copy.deepcopy(m)
    params = list(m.parameters())
    x = torch.randn(4, 32, 14, 14, device="cuda").to(memory_format=torch.channels_last)
    g = torch.randn_like(x)

    def step():
        xr = x.detach().requires_grad_()
        y = m(xr)
        return (y,) + torch.autograd.grad(y, [xr] + params, g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (counts as a step, as the eager copy's first below)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    xe = x.detach().requires_grad_()
    eager(xe)  # the warm-up step
    for _ in range(2):
        graph.replay()
        xe = x.detach().requires_grad_()
        ye = eager(xe)
        want = (ye,) + torch.autograd.grad(ye, [xe] + list(eager.parameters()), g)
        for a, b in zip(captured, want):
            torch.testing.assert_close(a, b)
    for (k, a), b in zip(m.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, msg=k)


def test_low_precision_inference_captured_first_keeps_eager_calls_right():
    """A bfloat16 module's float32 parameter casts are cached for inference calls, but not while
    a CUDA graph is captured (a cast made there holds its values only once the graph replays):
    a capture with no eager call before it leaves eager calls after it exact."""
    torch.ops.cbam_fused_debug.set_debug(False, 0)
    m = randomize_(cbam_fused.CBAM(32, hidden_channels=4)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(4, 32, 14, 14, device="cuda", dtype=torch.bfloat16)
    want = copy.deepcopy(m).float()(x.float())
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        copy.deepcopy(m)(x)  # warms cuBLAS and cuDNN up; m's own casts stay uncached
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.cuda.graph(graph):  # no eager call before
            captured = m(x)
        torch.cuda.current_stream().wait_stream(side)
        eager = m(x)
        graph.replay()
    for y in (eager, captured):
        torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
    assert torch.equal(eager, captured)
