"""cbam_fused.convert on whole networks (issue 6): official-layout ResNet with CBAM, timm ResNets
with attn_layer='cbam' / 'lcbam', an ultralytics-style model. Each converted network must give the
same outputs and gradients (train and eval), keep its parameter objects, state_dict keys and
values, keep working with an optimizer built before, give the same Grad-CAM map, and undo.
Models are float64 so "same" means 1e-9, except one float32 run."""
import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import cbam_fused
from cbam_fused.convert import is_converted

from conftest import randomize_, rel_err

import gate_only_resnet as G
import official_cbam as oc
import ultralytics_modules as U

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule, LightCbamModule  # noqa: E402




@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is many times faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------- models
def official_resnet():
    return oc.ResidualNet("ImageNet", 18, 7, "CBAM")


def timm_resnet(name, attn):
    # zero_init_last=False: timm zeroes the last BN of each block, so every CBAM would see a
    # constant input (all ties, nothing tested)
    return timm.create_model(name, pretrained=False, num_classes=7, zero_init_last=False,
                             block_args=dict(attn_layer=attn))


def blocks_of(model, cls):
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


# ---------------------------------------------------------------------------------- checks
def _train_step(model, x, seed=1):
    model.train()
    for p in model.parameters():
        p.grad = None
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(g)
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.grad is not None}


def _gradcam(model, layer, x):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(3)] * x.shape[0])


def check_conversion(model, x, expected, layer_path, tol=1e-7):
    """The acceptance checks of issue 6 for one network; returns the report."""
    for i, n in enumerate(expected):  # non-trivial CBAM weights (official init zeroes the
        randomize_(model.get_submodule(n), seed=i)  # spatial BN weight); the rest as initialised
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # built before conversion. A small step: a large one kills channels (constant over S after a
    # ReLU), and at such ties of the max pool the fused path routes the gradient to one element
    # (as max_pool2d does, the official code) where amax (timm) splits it: both subgradients
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9)

    report = cbam_fused.convert(model)
    assert sorted(report.converted_names) == sorted(expected), str(report)
    assert not report.skipped, str(report)
    # same objects, same state_dict keys and values
    assert all(params[n] is p for n, p in model.named_parameters())
    assert list(dict(model.named_parameters())) == list(params)
    assert all(buffers[n] is b for n, b in model.named_buffers())
    sd2 = model.state_dict()
    assert list(sd2) == list(sd)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert all(is_converted(model.get_submodule(n)) for n in expected)

    # train: outputs, gradients, running statistics; then an optimizer step each
    for step in range(2):
        y0, g0 = _train_step(ref, x, seed=step)
        y1, g1 = _train_step(model, x, seed=step)
        assert rel_err(y1, y0) < tol
        assert g1.keys() == g0.keys()
        for n in g0:
            assert rel_err(g1[n], g0[n]) < tol, n
        for (n, b0), (_, b1) in zip(ref.named_buffers(), model.named_buffers()):
            assert rel_err(b1, b0) < tol, n
        ref_opt.step()
        opt.step()
        for (n, p0), (_, p1) in zip(ref.named_parameters(), model.named_parameters()):
            assert rel_err(p1, p0) < tol, n
    # eval
    ref.eval()
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < tol
    # Grad-CAM on the same layer (a block that contains a converted CBAM, or the block itself)
    cam0 = _gradcam(ref, ref.get_submodule(layer_path), x)
    cam1 = _gradcam(model, model.get_submodule(layer_path), x)
    assert cam0.shape == cam1.shape == (x.shape[0],) + tuple(x.shape[2:])
    assert np.abs(cam0).max() > 0
    np.testing.assert_allclose(cam1, cam0, atol=1e-5)
    # undo
    assert report.undo() == len(expected)
    assert not any(is_converted(m) for m in model.modules())
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < tol
    return report


# ------------------------------------------------------------------------------ acceptance
def test_official_resnet_with_cbam():
    model = official_resnet().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = [f"layer{i}.{j}.cbam" for i in range(1, 5) for j in range(2)]
    rep = check_conversion(model, x, expected, "layer4.1")
    assert all(c.kind == "official CBAM" for c in rep.converted)
    assert all(c.spec.spatial_pools == "max,mean" for c in rep.converted)


def test_timm_resnet50_cbam():
    model = timm_resnet("resnet50", "cbam").double()
    # 64x64: layer4 at 2x2. At 1x1 with a batch of 2 every BatchNorm of layer4 (the CBAMs' too)
    # normalises 2 values, which amplifies rounding differences ~30x per block
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    expected = blocks_of(model, CbamModule)
    assert len(expected) == 16
    rep = check_conversion(model, x, expected, "layer4.2")
    assert all(c.spec.pools == "avg+max" and c.spec.spatial_pools == "mean,max"
               for c in rep.converted)


def test_timm_resnet_lcbam():
    model = timm_resnet("resnet18", "lcbam").double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    expected = blocks_of(model, LightCbamModule)
    assert len(expected) == 8
    rep = check_conversion(model, x, expected, "layer4.1.se")
    assert all(c.spec.pools == "blend" and c.spec.spatial_pools == "blend"
               for c in rep.converted)


def test_timm_resnet50_lcbam_float32():
    """float32: rounding differences grow through 50 layers of train-mode BatchNorm, so "equal"
    is judged against float64: the converted network's error is no larger than eager's own."""
    model = timm_resnet("resnet50", "lcbam")
    names = blocks_of(model, LightCbamModule)
    for i, n in enumerate(names):
        randomize_(model.get_submodule(n), seed=i)
    oracle = copy.deepcopy(model).double()
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    rep = cbam_fused.convert(model)
    assert rep.converted_names == names and list(model.parameters()) == params
    x = torch.randn(2, 3, 64, 64)
    y64, g64 = _train_step(oracle, x.double())
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(model, x)
    assert rel_err(y1, y64) <= 3 * rel_err(y0, y64) + 1e-5
    worst0 = max(rel_err(g0[n], g64[n]) for n in g64)
    worst1 = max(rel_err(g1[n], g64[n]) for n in g64)
    assert worst1 <= 3 * worst0 + 1e-5
    for n in g64:  # per tensor, loosely: a one-element BN gradient is a sum with cancellation
        assert rel_err(g1[n], g64[n]) <= 10 * rel_err(g0[n], g64[n]) + 1e-3, n
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-5
    cam0 = _gradcam(ref, ref.layer3, x)
    cam1 = _gradcam(model, model.layer3, x)
    np.testing.assert_allclose(cam1, cam0, atol=1e-4)


def test_ultralytics_style_model():
    model = U.TinyDetector().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = ["model.1", "model.3", "model.5", "model.6", "model.8"]
    rep = check_conversion(model, x, expected, "model.8")
    kinds = {c.name: c.kind for c in rep.converted}
    assert kinds["model.1"] == "ultralytics CBAM"
    assert kinds["model.5"] == "ultralytics channel gate"
    assert kinds["model.6"] == "ultralytics spatial gate"
    assert rep.converted[0].spec.fc2 is None and rep.converted[0].spec.pools == "avg"


def test_unsupported_block_is_reported_and_the_rest_converted():
    model = official_resnet().double()
    model.layer2[1].cbam = oc.CBAM(128, 16, pool_types=["avg", "avg"]).double()  # sums avg twice
    model.layer3[0].cbam = nn.Sequential(  # timm CBAM with a hard-sigmoid gate
        CbamModule(256, gate_layer="hard_sigmoid")).double()
    randomize_(model)
    ref = copy.deepcopy(model)
    rep = cbam_fused.convert(model)
    skipped = {s.name: s.reason for s in rep.skipped}
    assert set(skipped) == {"layer2.1.cbam", "layer3.0.cbam.0"}, str(rep)
    assert "distinct" in skipped["layer2.1.cbam"]
    assert "sigmoid" in skipped["layer3.0.cbam.0"]
    assert len(rep.converted) == 6
    assert not is_converted(model.layer2[1].cbam)
    assert "left alone layer2.1.cbam" in str(rep)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(model, x)
    assert rel_err(y1, y0) < 1e-9
    assert all(rel_err(g1[n], g0[n]) < 1e-9 for n in g0)


@pytest.mark.parametrize("pool_types", [["avg", "max", "lp", "lse"], ["lse"], ["lp", "max"]],
                         ids="+".join)
def test_official_lp_lse_blocks_convert(pool_types):
    """The official code's lp and lse pools: such blocks convert (no longer left alone) and train
    exactly like the originals, every parameter's gradient included."""
    model = official_resnet().double()
    model.layer2[1].cbam = oc.CBAM(128, 16, pool_types=pool_types).double()
    randomize_(model)
    ref = copy.deepcopy(model)
    rep = cbam_fused.convert(model, verify=True)
    assert not rep.skipped, str(rep)
    assert is_converted(model.layer2[1].cbam)
    assert model.layer2[1].cbam.ChannelGate.pool_types == pool_types
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for step in range(2):  # two steps: the BatchNorm running statistics feed the second
        y0, g0 = _train_step(ref, x, seed=step)
        y1, g1 = _train_step(model, x, seed=step)
        assert rel_err(y1, y0) < 1e-9
        assert g0.keys() == g1.keys()
        # 1e-8: a spatial BatchNorm's bias gradient is a sum over N H W that nearly cancels (in
        # every block, lp / lse or not), so its relative error is larger than the outputs'
        worst = max(g0, key=lambda n: rel_err(g1[n], g0[n]))
        assert rel_err(g1[worst], g0[worst]) < 1e-8, (step, worst, rel_err(g1[worst], g0[worst]))
    ref.eval()
    model.eval()
    assert rel_err(model(x), ref(x)) < 1e-9


# ------------------------------------------------------------------- recognition by structure
class MyChannelPool(nn.Module):
    def forward(self, x):  # the user's copy swapped the order: [mean, max]
        return torch.cat((x.mean(1, keepdim=True), x.amax(1, keepdim=True)), 1)


class MySpatial(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.compress = MyChannelPool()
        self.spatial = oc.BasicConv(2, 1, k, padding=k // 2, relu=False)

    def forward(self, x):
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class MyAttention(nn.Module):
    """A renamed copy of the official CBAM, spatial gate first, silu MLP."""

    def __init__(self, c):
        super().__init__()
        self.sa = MySpatial()
        self.ca = oc.ChannelGate(c, 4, ["max", "avg"])
        self.ca.mlp[2] = nn.SiLU()

    def forward(self, x):
        return self.ca(self.sa(x))


class ResidualAttention(nn.Module):
    """Same children as a CBAM, but a forward no fused variant computes."""

    def __init__(self, c):
        super().__init__()
        self.ca = oc.ChannelGate(c, 4)
        self.sa = oc.SpatialGate()

    def forward(self, x):
        return x + self.sa(self.ca(x))


def test_user_copies_found_by_structure():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), MyAttention(16),
                          nn.Conv2d(16, 16, 3, padding=1), ResidualAttention(16)).double()
    randomize_(model)
    ref = copy.deepcopy(model)
    rep = cbam_fused.convert(model)
    conv = {c.name: c for c in rep.converted}
    assert set(conv) == {"1", "3.ca", "3.sa"}, str(rep)
    s = conv["1"].spec
    assert (s.spatial_pools, s.arrangement, s.act, s.pools) == \
        ("mean,max", "spatial_first", "silu", "avg+max")
    assert [x.name for x in rep.skipped] == ["3"]
    assert "matches no fused variant" in rep.skipped[0].reason
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(model, x)
    assert rel_err(y1, y0) < 1e-9
    assert all(rel_err(g1[n], g0[n]) < 1e-9 for n in g0)


def test_activation_not_fused_is_reported():
    from timm.layers import get_act_layer
    m = nn.Sequential(CbamModule(32, act_layer=nn.Mish), CbamModule(32, act_layer=nn.SiLU),
                      CbamModule(32, act_layer=get_act_layer("gelu")))
    rep = cbam_fused.convert(m)
    assert rep.converted_names == ["1", "2"]
    assert rep.skipped_names == ["0"] and "Mish" in rep.skipped[0].reason


def test_include_exclude_and_already_fused():
    m = nn.Sequential(CbamModule(16), CbamModule(16), cbam_fused.CBAM(16, 4),
                      cbam_fused.CbamModule(16))
    rep = cbam_fused.convert(m, exclude=["1"])
    assert rep.converted_names == ["0"]
    assert rep.already_fused == ["2", "3"]
    rep2 = cbam_fused.convert(m, include=["1"])
    assert rep2.converted_names == ["1"]
    assert cbam_fused.unconvert(m) == 2


def test_verify_raises_naming_the_block(monkeypatch):
    import sys
    cv = sys.modules["cbam_fused.convert"]  # (cbam_fused.convert is the function)
    sp = sys.modules["cbam_fused._spec"]  # where the converted forward reads its arguments
    m = nn.Sequential(nn.Identity(), oc.CBAM(16, 4))
    real = sp._spec_kwargs

    def wrong(block, spec, x=None):  # a conversion bug: the spatial conv read with its sign flipped
        kw = real(block, spec, x)
        if "conv_w" in kw:
            kw["conv_w"] = -kw["conv_w"]
        return kw
    # the probe runs first and would refuse the broken variant: break only the verification
    monkeypatch.setattr(cv, "_probe", lambda b, match, g: (
        cv.BlockSpec(**match.base, **match.candidates[0]), 0.0))
    monkeypatch.setattr(sp, "_spec_kwargs", wrong)
    with pytest.raises(cbam_fused.ConversionError, match=r"block '1' \(CBAM\)"):
        cbam_fused.convert(m)
    assert not is_converted(m[1])  # nothing swapped when verification fails


def test_verify_false_and_example_input():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), CbamModule(8))
    rep = cbam_fused.convert(m, verify=False)
    assert rep.converted[0].verified_error is None
    cbam_fused.unconvert(m)
    rep = cbam_fused.convert(m, example_input=torch.randn(1, 3, 12, 11))
    assert rep.converted[0].verified_error < 1e-9


def test_batchnorm_modes_match():
    """momentum=None (cumulative average), track_running_stats=False, frozen running stats."""
    blocks = []
    for setup in ("none", "notrack", "eval_bn"):
        b = oc.CBAM(16, 4)
        bn = b.SpatialGate.spatial.bn
        if setup == "none":
            bn.momentum = None
        elif setup == "notrack":
            b.SpatialGate.spatial.bn = nn.BatchNorm2d(1, track_running_stats=False)
        blocks.append(b)
    model = nn.Sequential(*blocks).double()
    randomize_(model)
    ref = copy.deepcopy(model)
    cbam_fused.convert(model)
    model[2].SpatialGate.spatial.bn.eval()  # BN in eval inside a training model
    ref[2].SpatialGate.spatial.bn.eval()
    x = torch.randn(3, 16, 6, 5, dtype=torch.float64)
    for _ in range(3):
        model.train()
        ref.train()
        model[2].SpatialGate.spatial.bn.eval()
        ref[2].SpatialGate.spatial.bn.eval()
        y0, g0 = _train_step(ref, x)
        y1, g1 = _train_step(model, x)
        model[2].SpatialGate.spatial.bn.eval()
        assert rel_err(y1, y0) < 1e-9
        for (n, b0), (_, b1) in zip(ref.named_buffers(), model.named_buffers()):
            assert rel_err(b1, b0) < 1e-12, n


# ------------------------------------------------------------ pickling, hooks, torch.compile
def test_pickle_deepcopy_and_hooks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), oc.CBAM(8, 2), U.CBAM(8, 3)).double()
    randomize_(model)
    cbam_fused.convert(model)
    seen = []
    h = model[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = model(x)
    assert seen == [y.shape]  # hooks on a converted block fire
    h.remove()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert is_converted(clone[1]) and is_converted(clone[2])
        assert type(clone[1]) is type(model[1])
        assert isinstance(clone[1], oc.CBAM)
        assert torch.equal(clone(x), y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert is_converted(loaded[1]) and torch.equal(loaded(x), y)
    assert "CBAM([cbam_fused]" in repr(model) or "[cbam_fused]" in repr(model[1])
    # a state_dict round trip into an unconverted model
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), oc.CBAM(8, 2), U.CBAM(8, 3)).double()
    plain.load_state_dict(model.state_dict(), strict=True)
    assert rel_err(plain(x), y) < 1e-12


def _compile_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), oc.CBAM(16, 4), nn.ReLU(),
                         CbamModule(16), LightCbamModule(16), U.CBAM(16, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = _compile_net()
    randomize_(model)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 10, 9)
    # the unconverted network compiles with fullgraph=True, so the converted one must too
    torch.compile(copy.deepcopy(model), backend="eager", fullgraph=True)(x)
    cbam_fused.convert(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(compiled, x)
    assert rel_err(y1, y0) < 1e-5
    g1 = {n.replace("_orig_mod.", ""): g for n, g in g1.items()}
    assert g1.keys() == g0.keys()
    assert all(rel_err(g1[n], g0[n]) < 1e-4 for n in g0)
    for (n, b0), (_, b1) in zip(ref.named_buffers(), model.named_buffers()):
        assert rel_err(b1, b0) < 1e-5, n
    # attention maps from the compiled network too (recompiles for the recording path)
    model.eval()
    with cbam_fused.record_attention(model) as maps:
        y = compiled(x)
    assert sorted(maps) == ["1", "3", "4", "5"]
    with cbam_fused.record_attention(model) as eager_maps:
        assert rel_err(model(x), y) < 1e-6
    assert all(rel_err(maps[k][1], eager_maps[k][1]) < 1e-6 for k in maps)
    torch._dynamo.reset()


# -------------------------------------------------------------------------------- simulator
def test_converted_network_in_simulator():
    testing = pytest.importorskip("cbam_fused.testing",
                                  reason="cbam_fused.testing (simulator helpers) not there yet")
    if not getattr(testing, "simulator_available", lambda: False)():
        pytest.skip("the SIMT simulator extension (cbam_fused._sim) is not built")
    model = nn.Sequential(nn.Conv2d(3, 6, 3), oc.CBAM(6, 2), U.CBAM(6, 3),
                          LightCbamModule(6, rd_channels=3)).double()
    randomize_(model)
    ref = copy.deepcopy(model)
    rep = cbam_fused.convert(model)
    assert len(rep.converted) == 3
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    for schedule in ("forward", "reverse", "shuffle"):  # a race shows as schedule dependence
        y0, g0 = _train_step(ref, x)
        with testing.use_simulator(schedule=schedule, seed=3):
            y1, g1 = _train_step(model, x)
            launches = testing.simulator_stats()
        assert launches, "the converted blocks did not run the simulated kernels"
        assert rel_err(y1, y0) < 1e-9, schedule
        assert all(rel_err(g1[n], g0[n]) < 1e-9 for n in g0), schedule
        for (n, b0), (_, b1) in zip(ref.named_buffers(), model.named_buffers()):
            assert rel_err(b1, b0) < 1e-9, n
    ref.eval()
    model.eval()
    with testing.use_simulator(), torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-9


def test_sync_batchnorm_is_refused():
    m = nn.Sequential(CbamModule(16), CbamModule(16))
    m[0].spatial.conv.bn = nn.SyncBatchNorm(1)
    rep = cbam_fused.convert(m)
    assert rep.converted_names == ["1"] and "SyncBatchNorm" in rep.skipped[0].reason
    # converted first, then convert_sync_batchnorm: training refuses instead of computing
    # per-process statistics
    m[1].spatial.conv.bn = nn.SyncBatchNorm(1)
    with pytest.raises(RuntimeError, match="SyncBatchNorm"):
        m[1](torch.randn(2, 16, 4, 4))


def test_frozen_bn_and_ignored_gate_layer():
    """timm's frozen BatchNorm (freeze_batch_norm_2d) is fused with its running statistics;
    LightCbamModule ignores gate_layer (always a sigmoid), so the probe accepts it."""
    from timm.layers import freeze_batch_norm_2d
    m = nn.Sequential(CbamModule(16), LightCbamModule(16, gate_layer="hard_sigmoid")).double()
    randomize_(m)
    m = freeze_batch_norm_2d(m)
    ref = copy.deepcopy(m)
    rep = cbam_fused.convert(m)
    assert rep.converted_names == ["0", "1"], str(rep)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(m, x)
    assert rel_err(y1, y0) < 1e-12
    assert all(rel_err(g1[n], g0[n]) < 1e-12 for n in g0)


# user copies in the layouts seen in the wild (tutorial code), any attribute names
class TutorialChannel(nn.Module):
    def __init__(self, c, r=4, light=False):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1, bias=False)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Conv2d(c // r, c, 1, bias=False)
        self.sigmoid = nn.Sigmoid()
        self.light = light

    def forward(self, x):
        mlp = lambda p: self.fc2(self.relu1(self.fc1(p)))  # noqa: E731
        if self.light:
            return x * self.sigmoid(mlp(0.5 * (self.avg_pool(x) + self.max_pool(x))))
        return x * self.sigmoid(mlp(self.avg_pool(x)) + mlp(self.max_pool(x)))


class TutorialChannelSeq(nn.Module):
    """fc = Sequential(Linear, ReLU, Linear); but the sigmoid of each branch is summed: not CBAM"""

    def __init__(self, c, r=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // r, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(c // r, c, bias=False), nn.Sigmoid())

    def forward(self, x):
        a = self.fc(self.avg_pool(x).flatten(1))
        m = self.fc(self.max_pool(x).flatten(1))
        return x * (a + m)[:, :, None, None]


class TutorialSpatial(nn.Module):
    def __init__(self, k=7, bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, k, padding=k // 2, bias=True)
        self.norm = nn.BatchNorm2d(1) if bn else nn.Identity()
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        s = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)
        return x * self.sigmoid(self.norm(self.conv1(s)))


class TutorialCBAM(nn.Module):
    def __init__(self, c, light=False, bn=False):
        super().__init__()
        self.ca = TutorialChannel(c, light=light)
        self.sa = TutorialSpatial(5, bn=bn)

    def forward(self, x):
        return self.sa(self.ca(x))


class SE(nn.Module):
    """A squeeze-excitation block: avg pool only. Not a CBAM block: left alone, unreported."""

    def __init__(self, c):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, c, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(self.pool(x))


def test_tutorial_style_copies():
    model = nn.Sequential(TutorialCBAM(16), TutorialCBAM(16, light=True, bn=True),
                          TutorialChannel(16), TutorialSpatial(3), TutorialChannelSeq(16),
                          SE(16)).double()
    randomize_(model)
    ref = copy.deepcopy(model)
    rep = cbam_fused.convert(model)
    conv = {c.name: c for c in rep.converted}
    assert sorted(conv) == ["0", "1", "2", "3"], str(rep)
    assert conv["0"].kind == "generic CBAM"
    assert (conv["1"].spec.pools, conv["1"].spec.bn) == ("blend", ("sa", "norm"))
    assert conv["3"].spec.spatial_pools == "max,mean"
    assert rep.skipped == [], str(rep)  # 4 (sigmoid per branch) and 5 (SE): silently left alone
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64)
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(model, x)
    assert rel_err(y1, y0) < 1e-12
    for n in g0:  # 1.sa.conv1.bias: zero in exact arithmetic (bias before a train-mode BN)
        scale = max(g0[n].abs().max().item(), 1e-6)
        assert (g1[n] - g0[n]).abs().max().item() / scale < 1e-8, n


# The gate modules of code that multiplies in the caller (e.g. the widely copied CBAM.PyTorch
# layout): each returns its attention map, and the block's forward does the products.
class _GateChannel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.avg_pool, self.max_pool = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(nn.Conv2d(c, c // 4, 1, bias=False), nn.ReLU(),
                                nn.Conv2d(c // 4, c, 1, bias=False))
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return self.sigmoid(self.fc(self.avg_pool(x)) + self.fc(self.max_pool(x)))


def _GateSpatial(k=7):  # sigmoid(conv1(cat[mean_c, max_c])), the CBAM.PyTorch spatial gate
    return G.SpatialAttention(k)


class _MultiplyInCaller(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.ca, self.sa = _GateChannel(16), _GateSpatial()

    def forward(self, x):
        out = self.conv(x)
        out = self.ca(out) * out
        return self.sa(out) * out


def _LuuuyiChannel(c):
    """The channel gate of the CBAM.PyTorch layout (benchmarks/gate_only_resnet.py): separate
    pools, fc1 / relu1 / fc2 as 1x1 convs without bias, sigmoid(mlp(avg) + mlp(max))."""
    return G.ChannelAttention(c, ratio=4)


class _LuuuyiBlock(nn.Module):
    """A ResNet BasicBlock in the CBAM.PyTorch layout: the gates return maps, the block's forward
    multiplies (`order` "cs": channel gate first, "sc": spatial first, "c": channel only, "s":
    spatial only)."""

    def __init__(self, cin, c, order="cs", stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.ca = _LuuuyiChannel(c) if "c" in order else None
        self.sa = _GateSpatial(3) if "s" in order else None
        self.order = order
        self.downsample = None if cin == c and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.order == "s":
            out = self.sa(out) * out
        elif self.order == "sc":
            out = out * self.sa(out)
            out = self.ca(out) * out
        else:
            out = self.ca(out) * out
            if self.sa is not None:
                out = self.sa(out) * out
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


def _luuuyi_net():
    return randomize_(nn.Sequential(_LuuuyiBlock(8, 16, "cs", 2), _LuuuyiBlock(16, 16, "sc"),
                                    _LuuuyiBlock(16, 16, "c"), _LuuuyiBlock(16, 16, "s"))).double()


def test_gate_only_modules_fused_through_their_caller():
    """The gates return maps and the caller multiplies (`out = self.ca(out) * out`): the
    caller's forward is rewritten so each chain runs as one fused block, in either order and
    channel-only; outputs, every gradient and the BatchNorm statistics match the original, the
    state_dict keeps its keys and tensors, and the conversion pickles, copies and undoes."""
    ref = _luuuyi_net()
    model = copy.deepcopy(ref)
    model[1].bn1.eval()  # a frozen BatchNorm keeps its mode through the conversion's traces
    ref[1].bn1.eval()
    params = {n: p for n, p in model.named_parameters()}
    rep = cbam_fused.convert(model)
    assert model.training and not model[1].bn1.training
    assert rep.converted_names == ["0.ca+0.sa", "1.sa+1.ca", "2.ca", "3.sa"] and not rep.skipped, \
        str(rep)
    specs = [c.spec for c in rep.converted]
    assert [s.arrangement for s in specs[:2]] == ["channel_first", "spatial_first"]
    assert specs[2].conv is None and specs[3].fc1 is None  # channel only, spatial only
    assert all(c.verified_error < 1e-8 for c in rep.converted)
    # each chain's first gate runs the fused block; the second is reached from it
    heads = [model[0].ca, model[1].sa, model[2].ca, model[3].sa]
    assert [is_converted(m) for m in model.modules()].count(True) == 4
    assert all(is_converted(h) for h in heads)
    assert dict(model.named_parameters()) == params  # the same tensor objects
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64)
    for _ in range(2):  # two steps: the running statistics advance alike
        y0, g0 = _train_step(ref, x)
        y1, g1 = _train_step(model, x)
        assert rel_err(y1, y0) < 1e-12
        assert g1.keys() == g0.keys()
        for n in g0:
            assert rel_err(g1[n], g0[n]) < 1e-10, n
    for (n, b0), (_, b1) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.allclose(b1, b0, rtol=0, atol=1e-12), n
    ref.eval()
    model.eval()
    with torch.no_grad():
        y0 = ref(x)
        assert rel_err(model(x), y0) < 1e-12
        assert model.state_dict().keys() == ref.state_dict().keys()
        model.load_state_dict(ref.state_dict(), strict=True)
        for m in (copy.deepcopy(model), _pickled(model)):
            assert is_converted(m[0].ca) and is_converted(m[1].sa) and is_converted(m[2].ca)
            assert m[0].ca.__dict__["_cbam_pair_next"] is m[0].sa  # not a stale original
            assert rel_err(m(x), y0) < 1e-12
        with cbam_fused.record_attention(model) as maps:  # under each chain's head gate
            model(x)
        assert sorted(maps) == ["0.ca", "1.sa", "2.ca", "3.sa"]
        assert maps["2.ca"][1] is None and maps["3.sa"][0] is None
        gm = torch.fx.symbolic_trace(model)
        assert sum(n.target is cbam_fused.functional.cbam for n in gm.graph.nodes) == 4
        assert rel_err(gm(x), y0) < 1e-12
    assert cbam_fused.unconvert(model) == 4
    assert not any(is_converted(m) for m in model.modules())
    assert type(model[0]) is _LuuuyiBlock and "_cbam_pair_next" not in model[0].ca.__dict__
    with torch.no_grad():
        assert torch.equal(model(x), y0)


def _pickled(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_gate_only_fused_caller_compiles():
    """torch.compile(fullgraph=True) traces the rewritten callers: inference and a training
    step (gradients of every parameter) match the original network."""
    model = _luuuyi_net().float()
    ref = copy.deepcopy(model)
    cbam_fused.convert(model)
    x = torch.randn(2, 8, 10, 9)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(compiled, x)
    assert rel_err(y1, y0) < 1e-5
    assert g1.keys() == {"_orig_mod." + n for n in g0}
    for n in g0:
        assert rel_err(g1["_orig_mod." + n], g0[n]) < 1e-4, n
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), ref(x)) < 1e-5


def test_gate_only_caller_verified_whole_with_an_example_input(monkeypatch):
    """With an example input the rewritten caller is checked as a whole against its original
    forward (float64, train and eval, gradients); a wrong rewrite is caught there."""
    model, x = _luuuyi_net(), torch.randn(2, 8, 10, 9, dtype=torch.float64)
    rep = cbam_fused.convert(copy.deepcopy(model), example_input=x)
    assert len(rep.converted) == 4 and all(c.verified_error < 1e-8 for c in rep.converted)

    def wrong(graph, nodes):  # keeps the first product: the chain's output times x again
        nodes[-1].replace_all_uses_with(nodes[1])
        for n in reversed(nodes[2:]):
            graph.erase_node(n)
    from cbam_fused import _gate_pairs
    monkeypatch.setattr(_gate_pairs, "rewrite", wrong)
    m = copy.deepcopy(model)
    with pytest.raises(cbam_fused.ConversionError, match="block '0'.*differs"):
        cbam_fused.convert(m, example_input=x)
    assert not any(is_converted(b) for b in m.modules()) and type(m[0]) is _LuuuyiBlock


def test_gate_only_resnet_converts():
    """A whole ResNet-18 in the CBAM.PyTorch layout (benchmarks/gate_only_resnet.py): every
    block's gates fused through its forward, each caller verified whole with the example input;
    a training step matches the original."""
    ref = randomize_(G.resnet18_cbam(10)).double()
    model = copy.deepcopy(ref)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rep = cbam_fused.convert(model, example_input=x)
    assert len(rep.converted) == 8 and not rep.skipped, str(rep)
    assert all(n.endswith(".ca+" + n.split("+")[0][:-3] + ".sa") for n in rep.converted_names)
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(model, x)
    assert rel_err(y1, y0) < 1e-10
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-8, n


class _AliasingCaller(nn.Module):
    """`b` aliases `a`, then `a += 1` changes both: the rewritten forward must mutate in place
    too (a trace that turned `a += 1` into `a = a + 1` would feed ca the old values)."""

    def __init__(self):
        super().__init__()
        self.conv, self.ca = nn.Conv2d(16, 16, 1), _LuuuyiChannel(16)

    def forward(self, x):
        a = self.conv(x)
        b = a
        a += 1
        return self.ca(b) * b


def test_gate_only_caller_keeps_in_place_semantics():
    m = randomize_(_AliasingCaller()).double()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        before = m(x)
        rep = cbam_fused.convert(m)
        assert rep.converted_names == ["ca"], str(rep)
        assert "+=" in type(m)._cbam_src
        assert rel_err(m(x), before) < 1e-12


class _ListCaller(nn.Module):
    """Gate-only modules held in ModuleLists, called by index in a loop (`self.ca[i](x) * x`):
    their caller is the lists' owner; a product through expand_as is one too."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(16, 16, 3, padding=1) for _ in range(2)])
        self.ca = nn.ModuleList([_LuuuyiChannel(16) for _ in range(2)])
        self.sa = nn.ModuleList([_GateSpatial(3) for _ in range(2)])

    def forward(self, x):
        for i in range(2):
            x = self.convs[i](x)
            x = self.ca[i](x) * x
            x = x * self.sa[i](x).expand_as(x)  # (the older broadcasting idiom)
        return x


def test_gate_only_modules_in_module_lists():
    ref = randomize_(_ListCaller()).double()
    m = copy.deepcopy(ref)
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    rep = cbam_fused.convert(m, example_input=x)
    assert rep.converted_names == ["ca.0+sa.0", "ca.1+sa.1"] and not rep.skipped, str(rep)
    y0, g0 = _train_step(ref, x)
    y1, g1 = _train_step(m, x)
    assert rel_err(y1, y0) < 1e-12
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-10, n
    assert cbam_fused.unconvert(m) == 2 and type(m) is _ListCaller


class _Caller(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.ca, self.sa, self.how = _GateChannel(16), _GateSpatial(), how
        self.conv = nn.Conv2d(16, 16, 1)  # (a module with only gate children is a CBAM block)

    def forward(self, x):
        x = self.conv(x)
        if self.how == "tensor branch":
            if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
                x = -x
            return self.sa(self.ca(x) * x) * x
        if self.how == "mode branch":
            x = self.ca(x) * x
            return self.sa(x) * x * (2.0 if self.training else 1.0)
        if self.how == "sum":
            return x + self.ca(x) + self.sa(x)
        if self.how == "twice":
            x = self.ca(x) * x
            return self.ca(x) * x
        if self.how == "mutated between":
            g = self.ca(x)
            x.mul_(2)  # the product reads the changed x; a fused block at ca would not
            return g * x
        if self.how == "hooked":
            return self.ca(x) * x
        raise AssertionError(self.how)


@pytest.mark.parametrize("how, reason", [
    ("tensor branch", "torch.fx cannot trace the caller's forward"),
    ("mode branch", "differs between train and eval mode"),
    ("sum", "does not multiply its input by it"),
    ("twice", "does not call it exactly once"),
    ("mutated between", "uses the gate's input between the gate call and the product"),
    ("hooked", "ca has forward hooks"),
])
def test_gate_only_modules_left_alone_with_reason(how, reason):
    m = randomize_(_Caller(how)).double()
    if how == "hooked":
        m.ca.register_forward_hook(lambda mod, args, out: None)
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    before = m(x)
    rep = cbam_fused.convert(m)
    assert not rep.converted and "ca" in rep.skipped_names, str(rep)
    for s in rep.skipped:
        assert "returns the attention map" in s.reason and "cbam_fused.CBAM" in s.reason
    assert reason in next(s.reason for s in rep.skipped if s.name == "ca"), str(rep)
    assert not any(is_converted(b) for b in m.modules()) and type(m) is _Caller
    assert torch.equal(m(x), before)


class _MultiplyingCBAM(nn.Module):
    """A CBAM whose own forward multiplies by gate-only children (a common community layout):
    the block as a whole is convertible."""

    def __init__(self, c):
        super().__init__()
        self.channel_attention, self.spatial_attention = _GateChannel(c), _GateSpatial()

    def forward(self, x):
        out = self.channel_attention(x) * x
        return self.spatial_attention(out) * out


def test_block_that_multiplies_gate_only_children_converts():
    m = randomize_(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), _MultiplyingCBAM(16))).double()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    before = m(x)
    rep = cbam_fused.convert(m)
    assert rep.converted_names == ["1"] and not rep.skipped
    assert rep.converted[0].spec.spatial_pools == "mean,max"
    assert rel_err(m(x), before) < 1e-12
