"""float64 torch.autograd.gradcheck of cbam_fused.functional.cbam for x and every parameter,
every variant, train and eval (the pure-PyTorch CPU kernels; test_kernels_sim.py repeats it
through the simulator)."""
import pytest
import torch
from torch.autograd import gradcheck

from cbam_fused import functional
from conftest import randomize_
from variants import VARIANTS, make

PARAM_ARGS = ("mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2", "conv_w", "conv_b", "bn_weight", "bn_bias")


def gradcheck_module(m, x, **kw):
    """gradcheck over x and every parameter the module passes to functional.cbam."""
    fkw = m.functional_kwargs()
    if fkw.get("bn_running_mean") is not None:  # gradcheck runs many forwards: keep BN unchanged
        fkw["bn_running_mean"] = fkw["bn_running_mean"].clone()
        fkw["bn_running_var"] = fkw["bn_running_var"].clone()
    names = [k for k in PARAM_ARGS if fkw.get(k) is not None]
    leaves = [fkw[k].detach().clone().requires_grad_() for k in names]
    rest = {k: v for k, v in fkw.items() if k not in names}

    def f(x_, *params):
        return functional.cbam(x_, **dict(zip(names, params)), **rest)

    kw.setdefault("fast_mode", True)  # a random projection of the Jacobian: same bugs, far faster
    return gradcheck(f, (x.detach().clone().requires_grad_(), *leaves), **kw)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradcheck_2d(variant, train):
    m = randomize_(make(variant, 6, hidden=3)).double().train(train)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    assert gradcheck_module(m, x)


@pytest.mark.parametrize("layout", ["channels_last", "1d", "3d"])
def test_gradcheck_layouts(layout):
    dim = {"channels_last": 2, "1d": 1, "3d": 3}[layout]
    m = randomize_(make("official", 4, dim=dim, hidden=2)).double().train()
    shape = {1: (2, 4, 5), 2: (2, 4, 3, 3), 3: (2, 4, 2, 3, 2)}[dim]
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    assert gradcheck_module(m, x)


@pytest.mark.parametrize("loss", ["square", "sum"])
def test_backward_is_once_differentiable(loss):
    """A double backward raises naming the reason, whether or not the incoming gradient
    requires grad itself (y.sum() gives a constant one)."""
    m = randomize_(make("official", 4, hidden=2)).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    y = m(x)
    (gx,) = torch.autograd.grad(y.square().sum() if loss == "square" else y.sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        gx.sum().backward()
