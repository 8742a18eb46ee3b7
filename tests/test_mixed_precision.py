"""float16 / bfloat16 and autocast: error against the float64 oracle at most 2x the error of eager
PyTorch computing the same module in the same precision, on the same inputs (DESIGN.md 6).

The oracle runs on the very inputs and parameters the low-precision runs see (rounded to the
dtype, then widened), so the errors compared are the implementations' own. A result rounded to the
dtype is off by up to half an ulp whoever computes it, so the bound never goes below one ulp
(relative to the tensor's largest entry): a one-element gradient that eager happens to round
exactly is not held against the fused path."""
import copy

import pytest
import torch

from cbam_fused import reference
from conftest import randomize_, rel_err
from variants import make


def _run(fn, module, x, g):
    xr = x.detach().clone().requires_grad_()
    y = fn(module, xr)
    grads = torch.autograd.grad(y, [xr] + list(module.parameters()), g.to(y.dtype))
    return y, grads


def _fused(module, x):
    return module(x)


def _eager(module, x):
    return reference.cbam(x, **module.functional_kwargs())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["official", "spatial_first", "parallel", "ultralytics",
                                     "timm_light", "official_lp_lse"])
def test_low_precision_error_at_most_twice_eager(variant, dtype, layout):
    base = randomize_(make(variant, 32, hidden=8)).train().to(dtype)  # parameters rounded
    x = torch.randn(4, 32, 7, 9, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype).double()
    y64, g64 = _run(_eager, copy.deepcopy(base).double(), x.double(), g)
    ulp = torch.finfo(dtype).eps
    y_f, g_f = _run(_fused, copy.deepcopy(base).to(dtype), x, g)
    y_e, g_e = _run(_eager, copy.deepcopy(base).to(dtype), x, g)
    assert y_f.dtype == dtype
    assert rel_err(y_f, y64) <= max(2 * rel_err(y_e, y64), ulp), (rel_err(y_f, y64),
                                                                   rel_err(y_e, y64))
    for i, (a, b, ref) in enumerate(zip(g_f, g_e, g64)):
        assert a.dtype == b.dtype
        assert rel_err(a, ref) <= max(2 * rel_err(b, ref), ulp), (i, rel_err(a, ref),
                                                                  rel_err(b, ref))


@pytest.mark.parametrize("variant", ["official", "parallel"])
def test_autocast_matches_eager_dtype_and_is_at_least_as_accurate(variant):
    base = randomize_(make(variant, 32, hidden=8)).train()
    x = torch.randn(4, 32, 6, 6)
    g = torch.randn(4, 32, 6, 6, dtype=torch.float64)
    y64, g64 = _run(_eager, copy.deepcopy(base).double(), x.double(), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f, g_f = _run(_fused, copy.deepcopy(base), x, g)
        y_e, g_e = _run(_eager, copy.deepcopy(base), x, g)
    assert y_f.dtype == y_e.dtype == torch.float32
    assert rel_err(y_f, y64) <= 2 * rel_err(y_e, y64)
    for a, b, ref in zip(g_f, g_e, g64):
        assert a.dtype == b.dtype
        assert rel_err(a, ref) <= 2 * rel_err(b, ref) + 1e-6
