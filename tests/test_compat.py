"""Drop-in classes (cbam_fused.compat): timm's and ultralytics' constructors and state_dict keys;
checkpoints of the originals load strictly and compute the same (outputs, gradients, running
statistics), in eval and train mode."""
import copy

import pytest
import torch
from torch import nn

import cbam_fused
from cbam_fused import compat

from conftest import randomize_, rel_err

import ultralytics_modules as U

timm = pytest.importorskip("timm")
from timm.layers import cbam as tcbam  # noqa: E402
from timm.layers import get_act_layer  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _same(orig, new, x, tol=1e-10):
    """Load orig's state_dict into new (strict), then compare eval and train steps."""
    randomize_(orig)
    assert list(new.state_dict()) == list(orig.state_dict())
    new.load_state_dict(orig.state_dict(), strict=True)
    for train in (False, True, True):
        orig.train(train)
        new.train(train)
        outs = []
        for m in (orig, new):
            xi = x.clone().requires_grad_(True)
            for p in m.parameters():
                p.grad = None
            y = m(xi)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1),
                                   dtype=y.dtype))
            outs.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
        (y0, dx0, g0), (y1, dx1, g1) = outs
        assert rel_err(y1, y0) < tol
        assert rel_err(dx1, dx0) < tol
        assert g0.keys() == g1.keys()
        for n in g0:
            assert rel_err(g1[n], g0[n]) < tol, n
        for (n, b0), (_, b1) in zip(orig.named_buffers(), new.named_buffers()):
            assert rel_err(b1, b0) < tol, n


X = torch.randn(2, 32, 7, 6, dtype=torch.float64)


@pytest.mark.parametrize("kwargs", [
    {}, dict(rd_ratio=1 / 8), dict(rd_channels=5, mlp_bias=True), dict(spatial_kernel_size=3),
    dict(act_layer=nn.SiLU), dict(act_layer="gelu"), dict(rd_divisor=8, rd_ratio=0.1)])
@pytest.mark.parametrize("light", [False, True])
def test_timm_cbam(kwargs, light):
    orig_cls = tcbam.LightCbamModule if light else tcbam.CbamModule
    new_cls = cbam_fused.LightCbamModule if light else cbam_fused.CbamModule
    okw = dict(kwargs)
    if okw.get("act_layer") == "gelu":
        okw["act_layer"] = get_act_layer("gelu")
    orig = orig_cls(32, **okw).double()
    new = new_cls(32, **kwargs).double()
    assert orig.channel.fc1.weight.shape == new.channel.fc1.weight.shape
    _same(orig, new, X)


def test_timm_gates_alone():
    _same(tcbam.ChannelAttn(32).double(), compat.ChannelAttn(32).double(), X)
    _same(tcbam.LightChannelAttn(32).double(), compat.LightChannelAttn(32).double(), X)
    _same(tcbam.SpatialAttn(5).double(), compat.SpatialAttn(5).double(), X)
    _same(tcbam.LightSpatialAttn().double(), compat.LightSpatialAttn().double(), X)


def test_timm_create_model_with_drop_in_class():
    """timm takes the drop-in class as attn_layer; a timm checkpoint loads into it."""
    kw = dict(pretrained=False, num_classes=3, zero_init_last=False)
    orig = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), **kw).double()
    new = timm.create_model("resnet18", block_args=dict(attn_layer=cbam_fused.CbamModule),
                            **kw).double()
    assert isinstance(new.layer4[1].se, cbam_fused.CbamModule)
    new.load_state_dict(orig.state_dict(), strict=True)
    orig.eval()
    new.eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert rel_err(new(x), orig(x)) < 1e-10


@pytest.mark.parametrize("k", [3, 7])
def test_ultralytics(k):
    _same(U.CBAM(32, k).double(), cbam_fused.UltralyticsCBAM(32, k).double(), X)
    _same(U.ChannelAttention(32).double(), cbam_fused.ChannelAttention(32).double(), X)
    _same(U.SpatialAttention(k).double(), cbam_fused.SpatialAttention(k).double(), X)


def test_bad_options():
    with pytest.raises(ValueError, match="gate_layer"):
        cbam_fused.CbamModule(32, gate_layer="hard_sigmoid")
    with pytest.raises(ValueError, match="act_layer"):
        cbam_fused.CbamModule(32, act_layer=nn.Mish)
    with pytest.raises(ValueError, match="act_layer"):
        cbam_fused.CbamModule(32, act_layer="tanh")
    with pytest.raises(ValueError, match="kernel_size"):
        cbam_fused.SpatialAttention(4)
    with pytest.raises(ValueError, match="spatial_kernel_size"):
        cbam_fused.CbamModule(32, spatial_kernel_size=6)


def test_drop_in_is_left_alone_by_convert_and_pickles():
    import pickle
    m = nn.Sequential(cbam_fused.CbamModule(16), cbam_fused.UltralyticsCBAM(16))
    rep = cbam_fused.convert(m)
    assert rep.converted == [] and rep.already_fused == ["0", "1"]
    x = torch.randn(2, 16, 5, 5)
    m.eval()
    assert torch.equal(pickle.loads(pickle.dumps(m))(x), m(x))
    assert torch.equal(copy.deepcopy(m)(x), m(x))
