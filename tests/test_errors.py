"""Bad input gets an error naming the argument and what was expected."""
import pytest
import torch

import cbam_fused
from cbam_fused import functional


@pytest.fixture
def m():
    return cbam_fused.CBAM(8, hidden_channels=2)


def test_wrong_rank(m):
    with pytest.raises(ValueError, match=r"x: .*rank 4"):
        m(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match=r"x: .*rank"):
        functional.cbam(torch.randn(8, 5), conv_w=torch.randn(1, 2, 3))


def test_channels_not_matching(m):
    with pytest.raises(ValueError, match=r"x: CBAM expects 8 channels.*got 6"):
        m(torch.randn(2, 6, 4, 4))
    kw = m.functional_kwargs()
    with pytest.raises(ValueError, match=r"mlp_w1: expects 8 input channels but x has C=6"):
        functional.cbam(torch.randn(2, 6, 4, 4), **kw)


def test_integer_and_unsupported_dtypes(m):
    with pytest.raises(TypeError, match=r"x: expected float16, bfloat16, float32 or float64"):
        m(torch.randint(0, 5, (2, 8, 4, 4)))
    with pytest.raises(TypeError, match=r"x: expected float16.*complex"):
        functional.cbam(torch.randn(2, 8, 4, 4, dtype=torch.complex64),
                        conv_w=torch.randn(1, 2, 3, 3))


def test_mixed_devices():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"conv_w: expected a tensor on cpu"):
        functional.cbam(x, conv_w=torch.randn(1, 2, 3, 3, device="meta"))


def test_even_and_bad_kernel_sizes():
    with pytest.raises(ValueError, match=r"kernel_size: expected an odd"):
        cbam_fused.CBAM(8, hidden_channels=2, kernel_size=4)
    with pytest.raises(ValueError, match=r"conv_w: expected an odd"):
        functional.cbam(torch.randn(2, 4, 5, 5), conv_w=torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"conv_w: expected \[1, 2, k, k\]"):
        functional.cbam(torch.randn(2, 4, 5, 5), conv_w=torch.randn(1, 2, 3))


def test_bad_options():
    with pytest.raises(ValueError, match=r"pool_types: \['median'\] not supported"):
        cbam_fused.CBAM(8, pool_types=["avg", "median"])
    with pytest.raises(ValueError, match=r"pool_types: expected distinct names"):
        cbam_fused.CBAM(8, 2, pool_types=["avg", "avg"])
    with pytest.raises(ValueError, match=r"pools: expected 'blend' or distinct names"):
        functional.cbam(torch.randn(2, 4, 5, 5), torch.randn(4, 4), pools="avg+avg")
    with pytest.raises(ValueError, match=r"pools: expected 'blend' or distinct names"):
        functional.cbam(torch.randn(2, 4, 5, 5), torch.randn(4, 4), pools="avg+blend")
    with pytest.raises(ValueError, match=r"arrangement: expected one of"):
        cbam_fused.CBAM(8, arrangement="sideways")
    with pytest.raises(ValueError, match=r"reduction_ratio: .*empty hidden layer"):
        cbam_fused.CBAM(8, 16)
    with pytest.raises(ValueError, match=r"no_spatial and no_channel"):
        cbam_fused.CBAM(8, no_spatial=True, no_channel=True)
    with pytest.raises(ValueError, match=r"spatial_pools: expected one of"):
        functional.cbam(torch.randn(2, 4, 3, 3), conv_w=torch.randn(1, 2, 3, 3),
                        spatial_pools="sum")
    with pytest.raises(ValueError, match=r"mlp_w1 and conv_w: at least one gate"):
        functional.cbam(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"mlp_w2: expected \[C, hidden\]"):
        functional.cbam(torch.randn(2, 4, 3, 3), mlp_w1=torch.randn(2, 4),
                        mlp_w2=torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"bn_weight: given but batch_norm=False"):
        functional.cbam(torch.randn(2, 4, 3, 3), conv_w=torch.randn(1, 2, 3, 3),
                        bn_weight=torch.ones(1))


def test_empty_spatial_dims_rejected_empty_batch_accepted(m):
    with pytest.raises(ValueError, match=r"x: expected non-empty channel and spatial dims"):
        m(torch.randn(2, 8, 0, 4))
    assert m(torch.randn(0, 8, 4, 4)).shape == (0, 8, 4, 4)


def test_bn_training_with_single_value_is_rejected_like_eager():
    m = cbam_fused.CBAM(4, hidden_channels=2).train()
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))


def test_validation_is_cached_by_signature_only(monkeypatch):
    """cbam checks an argument set once per signature (types, dtypes, devices, shapes but the
    batch, options): a repeated call skips the checks, and a call that differs in any of those
    is checked again, so a bad argument after good calls still raises."""
    calls = []
    real = functional._validate
    monkeypatch.setattr(functional, "_validate", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(functional, "_VALIDATED", set())
    m = cbam_fused.CBAM(32, reduction_ratio=8).eval()
    kw = m.functional_kwargs()
    x = torch.randn(2, 32, 5, 6)
    for batch in (2, 3, 2):  # the batch is not part of the signature
        functional.cbam(x[:1].expand(batch, -1, -1, -1).contiguous(), **kw)
    assert len(calls) == 1
    functional.cbam(x.to(memory_format=torch.channels_last), **kw)  # same signature
    functional.cbam(torch.randn(2, 32, 7, 7), **kw)  # another map size: checked
    assert len(calls) == 2
    for bad, match in ((dict(kw, conv_w=torch.randn(1, 2, 6, 6)), "conv_w"),
                       (dict(kw, mlp_b1=torch.randn(3)), "mlp_b1"),
                       (dict(kw, mlp_w1=kw["mlp_w1"].int()), "mlp_w1"),
                       (dict(kw, pools="avg+nope"), "pools")):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            functional.cbam(x, **bad)
    with pytest.raises(ValueError, match="spatial_pools"):  # a refused set is not remembered
        functional.cbam(x, **dict(kw, spatial_pools="max"))
    with pytest.raises(ValueError, match="spatial_pools"):
        functional.cbam(x, **dict(kw, spatial_pools="max"))
    with pytest.raises(TypeError, match="mlp_b2"):  # not a tensor: no signature, checked
        functional.cbam(x, **dict(kw, mlp_b2=1.0))
    with pytest.raises(TypeError, match="mlp_b2"):
        functional.cbam(x, **dict(kw, mlp_b2=1.0))
