"""The reference and the fused module against the implementations people use: the official code's
structure (benchmarks/official_cbam.py) and timm's CbamModule / LightCbamModule."""
import pytest
import torch

import cbam_fused
from cbam_fused import functional, reference
from conftest import randomize_, rel_err
from official_cbam import CBAM as OfficialCBAM


def _grads(y, x, module, g):
    return torch.autograd.grad(y, [x] + list(module.parameters()), g)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool_types,no_spatial", [(["avg", "max"], False), (["avg"], False),
                                                   (["max"], False), (["avg", "max"], True)])
def test_official_checkpoint_loads_strict_and_matches(pool_types, no_spatial, train, layout):
    off = randomize_(OfficialCBAM(32, 8, pool_types, no_spatial)).double().train(train)
    fused = cbam_fused.CBAM(32, 8, pool_types, no_spatial).double().train(train)
    assert set(fused.state_dict()) == set(off.state_dict())
    fused.load_state_dict(off.state_dict(), strict=True)
    x = torch.randn(3, 32, 6, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xo, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yf = off(xo), fused(xf)
    assert rel_err(yf, yo) < 1e-10
    g = torch.randn_like(yo)
    for a, b in zip(_grads(yf, xf, fused, g), _grads(yo, xo, off, g)):
        assert rel_err(a, b) < 1e-10
    for (k, a), (_, b) in zip(sorted(fused.state_dict().items()), sorted(off.state_dict().items())):
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-14), k


def test_fused_state_dict_loads_into_official():
    fused = randomize_(cbam_fused.CBAM(16, 4))
    off = OfficialCBAM(16, 4)
    off.load_state_dict(fused.state_dict(), strict=True)


def _timm_kwargs(m, light=False):
    bn = m.spatial.conv.bn
    return dict(mlp_w1=m.channel.fc1.weight, mlp_b1=m.channel.fc1.bias,
                mlp_w2=m.channel.fc2.weight, mlp_b2=m.channel.fc2.bias,
                conv_w=m.spatial.conv.conv.weight, bn_weight=bn.weight, bn_bias=bn.bias,
                bn_running_mean=bn.running_mean.clone(), bn_running_var=bn.running_var.clone(),
                batch_norm=True, bn_training=m.training, bn_momentum=bn.momentum, bn_eps=bn.eps,
                pools="blend" if light else "avg+max",
                spatial_pools="blend" if light else "mean,max")


@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("light", [False, True], ids=["CbamModule", "LightCbamModule"])
def test_reference_and_fused_match_timm(light, train, mlp_bias):
    timm_cbam = pytest.importorskip("timm.layers.cbam", reason="timm is not installed")
    cls = timm_cbam.LightCbamModule if light else timm_cbam.CbamModule
    m = randomize_(cls(24, rd_channels=6, mlp_bias=mlp_bias)).double().train(train)
    x = torch.randn(2, 24, 5, 7, dtype=torch.float64, requires_grad=True)
    kw = _timm_kwargs(m, light)
    y_timm = m(x)
    for impl in (reference.cbam, functional.cbam):
        y = impl(x, **dict(kw, bn_running_mean=kw["bn_running_mean"].clone(),
                           bn_running_var=kw["bn_running_var"].clone()))
        assert rel_err(y, y_timm) < 1e-10, impl.__module__
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        (gx_timm,) = torch.autograd.grad(m(x), x, g)
        assert rel_err(gx, gx_timm) < 1e-10, impl.__module__
