"""torch.fx: the fused modules and converted blocks trace with torch.fx.symbolic_trace (as
torchvision's create_feature_extractor, FX quantization and pruning tools do). The block is one
call_function node of cbam_fused.functional.cbam, the input check and the BatchNorm batch count
are nodes of their own that run on every call of the graph, and the traced graph computes what
the module computes: outputs, gradients, running statistics and num_batches_tracked."""
import pytest
import torch
import torch.fx

import cbam_fused
from cbam_fused import functional as F
from conftest import randomize_, rel_err
import official_cbam as oc


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _step(model, x, g):
    x = x.clone().requires_grad_()
    y = model(x)
    grads = torch.autograd.grad(y, [x] + list(model.parameters()), g)
    return y.detach(), grads


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def _same_training(make, x, steps=3):
    """make() builds the module; its symbolic trace and a copy of it run `steps` training steps on
    x and must agree in outputs, gradients and buffers after each."""
    eager = make()
    traced = torch.fx.symbolic_trace(make())
    traced.load_state_dict(eager.state_dict())
    for i in range(steps):
        g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(i))
        ye, ge = _step(eager, x, g)
        yt, gt = _step(traced, x, g)
        assert rel_err(yt, ye) == 0.0, i
        for a, b in zip(gt, ge):
            assert rel_err(a, b) == 0.0, i
        be, bt = _buffers(eager), _buffers(traced)
        assert be.keys() == bt.keys()
        for k in be:
            assert torch.equal(bt[k], be[k]), (i, k)
    return eager, traced


@pytest.mark.parametrize("arrangement", ["channel_first", "spatial_first", "parallel"])
@pytest.mark.parametrize("bn_momentum", [0.01, None], ids=["momentum", "cumulative"])
def test_cbam_traces_and_trains_like_the_module(arrangement, bn_momentum):
    def make():
        return randomize_(cbam_fused.CBAM(16, 4, arrangement=arrangement,
                                          bn_momentum=bn_momentum)).double().train()
    x = torch.randn(3, 16, 5, 6, dtype=torch.float64)
    eager, traced = _same_training(make, x)
    assert int(eager.SpatialGate.spatial.bn.num_batches_tracked) == 3
    targets = _targets(traced)
    assert targets.count(F.cbam) == 1  # the whole block is one node
    assert F._count_bn_batch in targets


def test_cbam_traced_in_eval_mode_reads_running_statistics():
    m = randomize_(cbam_fused.CBAM(16, 4)).double().eval()
    before = _buffers(m)
    gm = torch.fx.symbolic_trace(m)
    assert F._count_bn_batch not in _targets(gm)  # nothing is counted in eval mode
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    assert rel_err(gm(x), m(x)) == 0.0
    assert all(torch.equal(v, before[k]) for k, v in _buffers(m).items())


@pytest.mark.parametrize("gate", ["channel", "spatial"])
def test_single_gates_trace(gate):
    make = (lambda: randomize_(cbam_fused.ChannelGate(16, 4)).double().train()) \
        if gate == "channel" else (lambda: randomize_(cbam_fused.SpatialGate()).double().train())
    _same_training(make, torch.randn(2, 16, 5, 5, dtype=torch.float64))


def test_tracing_does_not_count_a_batch():
    m = cbam_fused.CBAM(16, 4).train()
    torch.fx.symbolic_trace(m)
    assert int(m.SpatialGate.spatial.bn.num_batches_tracked) == 0


def test_dead_code_elimination_keeps_the_check_and_the_count():
    gm = torch.fx.symbolic_trace(cbam_fused.CBAM(16, 4).train())
    gm.graph.eliminate_dead_code()
    gm.recompile()
    targets = _targets(gm)
    assert F._count_bn_batch in targets
    with pytest.raises(ValueError, match="expects 16 channels"):
        gm(torch.randn(2, 8, 4, 4))  # the module's own check, run by the graph
    gm(torch.randn(2, 16, 4, 4))
    assert int(gm.SpatialGate.spatial.bn.num_batches_tracked) == 1


def test_converted_official_resnet_traces():
    def make():
        model = randomize_(oc.ResidualNet("ImageNet", 18, 7, "CBAM")).double().train()
        rep = cbam_fused.convert(model, verify=False)
        assert len(rep.converted) == 8
        return model
    _same_training_model(make, torch.randn(2, 3, 32, 32, dtype=torch.float64))


def _same_training_model(make, x):
    """As _same_training for a whole classifier (the gradient of its output's sum)."""
    eager = make()
    traced = torch.fx.symbolic_trace(make())
    traced.load_state_dict(eager.state_dict())
    assert _targets(traced).count(F.cbam) == sum(cbam_fused.is_converted(m)
                                                 for m in eager.modules())
    for _ in range(2):
        ye, ge = _step(eager, x, torch.ones(x.shape[0], 7, dtype=x.dtype))
        yt, gt = _step(traced, x, torch.ones(x.shape[0], 7, dtype=x.dtype))
        assert rel_err(yt, ye) == 0.0
        for a, b in zip(gt, ge):
            assert rel_err(a, b) == 0.0
        be, bt = _buffers(eager), _buffers(traced)
        assert all(torch.equal(bt[k], be[k]) for k in be)


def test_timm_resnet_feature_extractor():
    """torchvision's create_feature_extractor (fx) on a converted timm ResNet with CBAM."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    model = timm.create_model("resnet18", pretrained=False, num_classes=7, zero_init_last=False,
                              block_args=dict(attn_layer="cbam"))
    model = randomize_(model).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    nodes = ["layer2", "layer4"]
    expected = fe.create_feature_extractor(model, nodes)(x)
    rep = cbam_fused.convert(model)
    assert len(rep.converted) == 8
    feats = fe.create_feature_extractor(model, nodes)
    got = feats(x)
    for k in nodes:
        assert rel_err(got[k], expected[k]) < 1e-12, k
    assert _targets(feats).count(F.cbam) == 8  # one node per block


@pytest.mark.parametrize("make", [
    lambda: cbam_fused.CbamModule(16, rd_channels=4),
    lambda: cbam_fused.LightCbamModule(16, rd_channels=4),
    lambda: cbam_fused.UltralyticsCBAM(16),
    lambda: cbam_fused.ChannelAttention(16),
    lambda: cbam_fused.SpatialAttention(7),
], ids=["CbamModule", "LightCbamModule", "UltralyticsCBAM", "ChannelAttention",
        "SpatialAttention"])
def test_drop_in_classes_trace(make):
    _same_training(lambda: randomize_(make()).double().train(),
                   torch.randn(2, 16, 5, 5, dtype=torch.float64))
