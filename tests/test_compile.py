"""torch.compile(fullgraph=True) of the fused module: forward and a training step on the CPU with
no graph break, matching eager."""
import copy

import pytest
import torch

import cbam_fused
from conftest import randomize_, rel_err
from variants import make


@pytest.mark.parametrize("variant", ["official", "spatial_first", "parallel", "ultralytics",
                                     "channel_only", "official_lp_lse", "spatial_first_lp_lse"])
def test_compile_fullgraph_training_step_matches_eager(variant):
    torch._dynamo.reset()
    m = randomize_(make(variant, 16, hidden=4)).train()
    m_eager = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt_eager = torch.optim.SGD(m_eager.parameters(), lr=0.1)
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    for _ in range(2):
        x = torch.randn(2, 16, 6, 5)
        for model, o in ((compiled, opt), (m_eager, opt_eager)):
            o.zero_grad()
            y = model(x)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            o.step()
    for (k, a), (_, b) in zip(m.state_dict().items(), m_eager.state_dict().items()):
        if a.is_floating_point():
            assert rel_err(a, b) < 1e-5, k
        else:
            assert torch.equal(a, b), k
    m.eval()
    m_eager.eval()
    x = torch.randn(3, 16, 4, 4)
    assert rel_err(compiled(x), m_eager(x)) < 1e-5


def test_compile_channels_last_and_dynamic_batch():
    torch._dynamo.reset()
    m = randomize_(cbam_fused.CBAM(8, hidden_channels=2)).eval()
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for n in (2, 3):
        x = torch.randn(n, 8, 5, 6).to(memory_format=torch.channels_last)
        y = compiled(x)
        assert rel_err(y, m(x)) < 1e-5


@pytest.mark.parametrize("variant", ["official", "official_lp_lse"])
def test_compiled_training_step_under_autocast_matches_eager(variant):
    """A compiled training step under bfloat16 autocast, the block behind a conv (x arrives in
    bfloat16, the parameters stay float32): AOT autograd traces the block's backward inside the
    autocast region, where the heads' matmuls would run in bfloat16 and hand the kernels gradients
    of the wrong dtype. The parameters' gradients match eager autocast's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1),
                              randomize_(make(variant, 16, hidden=4))).train()
    net_eager = copy.deepcopy(net)
    x = torch.randn(2, 3, 6, 5)
    w = torch.linspace(-1, 1, 2 * 16 * 6 * 5).reshape(2, 16, 6, 5)
    compiled = torch.compile(net, fullgraph=True, backend="inductor")
    grads = []
    with torch._inductor.config.patch(force_disable_caches=True):  # trace, never a cached graph
        for model in (compiled, net_eager):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(x)
            assert y.dtype == torch.bfloat16
            (y.float() * w).sum().backward()
            grads.append([p.grad for p in model.parameters()])
    for (name, _), a, b in zip(net.named_parameters(), *grads):
        assert a.dtype == b.dtype == torch.float32, name
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))
