"""Shared test helpers: seeding, error metrics, model factories."""
import os
import sys

import pytest
import torch

# The tensors here are tiny: one intra-op thread is many times faster than two contending ones
# on a 2-core machine shared with the compiler.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (norm-wise relative error, in float64)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial parameters and BatchNorm statistics (never zeros / ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                t.copy_(0.5 + r)
            elif name.endswith("running_mean"):
                t.copy_(r - 0.5)
            elif "bn" in name and name.endswith("weight"):
                t.copy_(0.5 + r)
            else:
                t.copy_((r - 0.5) * 2 / max(1, t[0].numel()) ** 0.5)
    return module


def sim_has(op: str) -> bool:
    """Whether the simulator build (cbam_fused._sim) is there with a kernel for op `op`."""
    try:
        from cbam_fused import _sim  # noqa: F401  registers torch.ops.cbam_fused_sim.*
    except ImportError:  # pragma: no cover
        return False
    return hasattr(torch.ops.cbam_fused_sim, op)


NEEDS_CUDA_REASON = "needs a CUDA device"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA_REASON)


def pytest_collection_modifyitems(config, items):
    """A test marked needs_cuda is a GPU test: it gets the `gpu` marker too, so that
    `pytest -m gpu` (scripts/gpu_check.py's lease part) selects it. (The CUDA tests of the
    spatial head ops had needs_cuda alone, and the lease part left them out.)"""
    for item in items:
        if any(m.name == "skipif" and m.kwargs.get("reason") == NEEDS_CUDA_REASON
               for m in item.iter_markers()):
            item.add_marker(pytest.mark.gpu)
