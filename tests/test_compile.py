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
