"""Attention maps: record_attention (gates from the ordinary forward, none of it outside the
context) and cbam_fused.viz PNGs."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import cbam_fused
from cbam_fused import viz

from conftest import randomize_, rel_err

import official_cbam as oc
import ultralytics_modules as U


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), oc.CBAM(16, 4),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1), U.CBAM(16, 3),
                         oc.ChannelGate(16, 4), cbam_fused.CBAM(16, 4),
                         cbam_fused.CbamModule(16)).double()


def _expected_gates(block, x):
    """The gates from the reference implementation with the block's own options."""
    from cbam_fused.convert import _spec_kwargs
    kw = _spec_kwargs(block, block._cbam_spec)
    for k in ("bn_running_mean", "bn_running_var"):  # eval: running statistics are only read
        if kw.get(k) is not None:
            kw[k] = kw[k].clone()
    _, gc, gs = cbam_fused.reference.cbam(x, **kw, return_gates=True)
    return gc, gs


def test_record_attention():
    model = _net()
    randomize_(model)
    cbam_fused.convert(model)
    model.eval()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    inputs = {}
    for i in (1, 3, 4, 6):
        model[i].register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
    y_plain = model(x)
    with cbam_fused.record_attention(model) as maps:
        y = model(x)
    assert torch.equal(y, y_plain)  # the same forward, nothing else
    assert set(maps) == {"1", "3", "4", "5", "6"}
    assert maps["1"][0].shape == (2, 16) and maps["1"][1].shape == (2, 1, 12, 10)
    assert maps["3"][1].shape == (2, 1, 6, 5)
    assert maps["4"][1] is None and maps["4"][0].shape == (2, 16)  # channel gate only
    assert all(not t.requires_grad for gc, gs in maps.values() for t in (gc, gs)
               if t is not None)
    for i in (1, 3, 4, 6):
        gc, gs = _expected_gates(model[i], inputs[i])
        assert rel_err(maps[str(i)][0], gc) < 1e-12
        if gs is not None:
            assert rel_err(maps[str(i)][1], gs) < 1e-12
    # the native module went back to its own class, nothing left behind
    assert type(model[5]) is cbam_fused.CBAM
    assert not any("_cbam_record" in m.__dict__ for m in model.modules())
    before = dict(maps)
    model(x)
    assert maps.keys() == before.keys() and all(maps[k] is before[k] for k in maps)


def test_record_attention_in_training_matches_and_counts_batches():
    model = _net()
    randomize_(model)
    cbam_fused.convert(model)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    with cbam_fused.record_attention(model, names=["5"]) as maps:
        y = model(x)
    y0 = ref(x)
    assert list(maps) == ["5"]
    assert rel_err(y, y0) < 1e-12
    for (n, b0), (_, b1) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(b0, b1), n


def test_viz_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = _net()
    randomize_(model)
    cbam_fused.convert(model)
    model.eval()
    img = torch.rand(1, 3, 48, 40, dtype=torch.float64)
    x = torch.nn.functional.interpolate(img, size=(12, 10))
    with cbam_fused.record_attention(model) as maps:
        model(x)
    p = tmp_path / "one.png"
    viz.save_overlay(p, img[0], maps["1"][1], title="block 1")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p2 = tmp_path / "grid.png"
    n = viz.save_grid(p2, img, maps, ncols=3)
    assert n == 4  # "4" has no spatial gate
    assert p2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ov = viz.overlay(img[0], maps["3"][1][0])
    assert ov.shape == (48, 40, 3) and 0 <= ov.min() and ov.max() <= 1
    # upsampling: a constant gate stays constant; shapes and bad input
    assert np.allclose(viz.upsample_gate(torch.full((1, 1, 3, 3), 0.25), (9, 7)), 0.25)
    with pytest.raises(ValueError, match="gate"):
        viz.upsample_gate(torch.rand(2, 3, 3), (4, 4))
    with pytest.raises(ValueError, match="no 2-d spatial gate"):
        viz.save_grid(tmp_path / "none.png", img, {"a": (torch.rand(1, 3), None)})
    # images as numpy uint8 HWC and as grey [H, W]
    viz.save_overlay(tmp_path / "u8.png", (np.random.rand(20, 30, 3) * 255).astype(np.uint8),
                     torch.rand(1, 1, 5, 6))
    viz.save_overlay(tmp_path / "grey.png", torch.randn(20, 30), torch.rand(5, 6))


def test_save_model_attention(tmp_path):
    model = _net().eval()
    cbam_fused.convert(model)
    x = torch.rand(2, 3, 12, 10, dtype=torch.float64)
    out, maps = viz.save_model_attention(tmp_path / "m.png", model, x, sample=1)
    assert out.shape[0] == 2 and len(maps) == 5
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
