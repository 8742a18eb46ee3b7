"""Host work per call: how many ops (each a kernel launch on a GPU) a CBAM forward and backward
dispatch, counted on the CPU with a dispatch mode, views excluded. At small sizes a GPU run of the
block is bound by its launches and Python, not by bandwidth: these budgets keep that work from
growing unnoticed, and below the official eager module's."""
import collections
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cbam_fused
from cbam_fused import functional
from conftest import ROOT

sys.path.insert(0, f"{ROOT}/benchmarks")
import official_cbam  # noqa: E402

# ops that only make views (no kernel, no allocation)
VIEWS = {"view", "reshape", "t", "select", "slice", "detach", "unsqueeze", "expand", "permute",
         "_unsafe_view", "alias", "squeeze", "transpose", "as_strided", "split", "unbind"}
# ops that only allocate (no kernel): the empty placeholders the block returns for the outputs a
# mode has not got (mean, invstd, var of a BatchNorm in eval mode), counted on their own
ALLOCS = {"empty"}
ALLOC_BUDGET = 3
# the composites themselves (C++ kernels): their ops are counted inside
BLOCK_OPS = ("cbam_fused.cbam_block.default", "cbam_fused.cbam_block_backward.default")

# launching ops at most: eval forward, training forward, the backward of each (measured: 5, 8,
# 5, 6). History: 7 and 10 forward (the eval count held two empty placeholders, now counted
# apart: ALLOCS) and 7 backward in training before the BatchNorm with batch statistics and its
# sigmoid became one op each way (batch_norm_gate: native_batch_norm, sigmoid and the var_mean of
# the running variance before; batch_norm_gate_backward: sigmoid_backward and
# native_batch_norm_backward). Before that: 13 and 19 forward before the spatial head became
# one op, then 18 in training before the BatchNorm's running statistics took one _foreach_lerp_
# for both buffers (a mul_ and an add_ on each before); 18 backward in both modes before its
# backward became one op too (spatial_head_backward: two launches on a GPU,
# where sigmoid_backward, batch_norm_backward, cuDNN's convolution_backward and the copy that
# split the map's gradient made five to seven; with batch statistics, ATen's sigmoid_backward
# and batch_norm_backward still run before it), then 15 and 17 before Q2's store took the add of
# rc and the channel gate's sigmoid_backward. The split's copy itself replaced four copies of
# strided views inside the launchers, unseen by this count
# (test_small_arguments_of_the_ops_are_contiguous). Then 13 and 15 in the backward before the
# channel head saved its relu's output (the backward recomputed it). Then 12 and 15 forward before
# the channel gate's head became one op (channel_head: two launches on a GPU, where
# ATen's cat, two addmm, relu, sum and sigmoid made six), and 12 and 14 backward before its
# backward did (channel_head_backward: one or two launches, where ATen's repeat, four mm, two
# sums and threshold_backward made eight).
BUDGET = {"eval": 5, "train": 8, "backward_eval": 5, "backward_train": 6}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.allocs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in BLOCK_OPS:
            # the block's C++ kernels, with this mode back on so that their own calls are counted
            # (a mode is off while it handles an op)
            with self:
                return func.redispatch(_KERNEL_KEYS, *args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ALLOCS:
            self.allocs += 1
        elif func.overloadpacket.__name__ not in VIEWS:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


_KERNEL_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)  # the tests' tensors: CPU


def _count(module, x, train, calls=1, grad=True):
    """(forward ops, backward ops) of the last of `calls` calls, on the eager path a plain call
    takes (functional._eager_direct: a dispatch mode would otherwise send it through the op's
    Python autograd kernel); each Counter's allocs attribute: its ALLOCS ops."""
    module.train(train)
    x = x.clone().requires_grad_(grad)
    orig = functional.EAGER_DIRECT
    functional.EAGER_DIRECT = "always"
    try:
        for _ in range(calls - 1):
            module(x)
        with _Count() as fwd:
            y = module(x)
    finally:
        functional.EAGER_DIRECT = orig
    fwd.ops.allocs = fwd.allocs
    if not grad:
        return fwd.ops, collections.Counter()
    g = torch.ones_like(y)
    with _Count() as bwd:
        torch.autograd.grad(y, [x, *module.parameters()], g)
    bwd.ops.allocs = bwd.allocs
    return fwd.ops, bwd.ops


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_launch_budget_and_fewer_than_eager(train):
    x = torch.randn(2, 16, 5, 4)
    fwd, bwd = _count(cbam_fused.CBAM(16, 4), x, train)
    efwd, ebwd = _count(official_cbam.CBAM(16, 4), x, train)
    n_fwd, n_bwd = sum(fwd.values()), sum(bwd.values())
    assert n_fwd <= BUDGET["train" if train else "eval"], sorted(fwd.items())
    assert n_bwd <= BUDGET["backward_train" if train else "backward_eval"], sorted(bwd.items())
    assert fwd.allocs <= (0 if train else ALLOC_BUDGET) and bwd.allocs == 0
    assert n_fwd < sum(efwd.values()) and n_bwd < sum(ebwd.values())
    # the x-sized work is the package's ops, one call each (DESIGN.md section 3), the channel
    # gate's head one op (no ATen linear), the spatial gate's head one op, forward and backward
    # (no ATen convolution), its BatchNorm with batch statistics one op each way (no ATen
    # batch_norm)
    gate = {"cbam_fused.batch_norm_gate.default": 1} if train else {}
    assert {k: v for k, v in fwd.items() if k.startswith("cbam_fused.")} == {
        "cbam_fused.pool_over_s.default": 1, "cbam_fused.pool_over_c.default": 1,
        "cbam_fused.apply_gates.default": 1, "cbam_fused.channel_head.default": 1,
        "cbam_fused.spatial_head.default": 1, **gate}
    aten = [k for k in fwd if k.startswith("aten.")]
    assert not any(w in k for k in aten for w in ("convolution", "linear", "addmm", "batch_norm",
                                                  "sigmoid", "var_mean")), aten
    gate = {"cbam_fused.batch_norm_gate_backward.default": 1} if train else {}
    assert {k: v for k, v in bwd.items() if k.startswith("cbam_fused.")} == {
        "cbam_fused.backward_reduce.default": 1,
        "cbam_fused.pool_over_c_backward_scale.default": 1, "cbam_fused.grad_input.default": 1,
        "cbam_fused.channel_head_backward.default": 1,
        "cbam_fused.spatial_head_backward.default": 1, **gate}
    aten = [k for k in bwd if k.startswith("aten.")]
    assert not any(w in k for k in aten for w in ("convolution", "mm", "batch_norm", "sigmoid")), \
        aten
    # Q2's store adds Q1's rc and takes the channel gate's sigmoid backward
    assert "aten.add.Tensor" not in bwd, sorted(bwd)
    # the forward saved the hidden layer after its relu: nothing to recompute
    assert "aten.relu.default" not in bwd, sorted(bwd)


def test_inference_reuses_the_cast_parameters_of_a_low_precision_module():
    """A bfloat16 module's parameters are cast to float32 once, not on every inference call
    (ten launches a call otherwise): from the second call on, an eval forward under no_grad
    dispatches the float32 module's ops and no copy. An in-place update of a parameter (what an
    optimizer step does) is seen by the next call."""
    m = cbam_fused.CBAM(16, 4).to(torch.bfloat16).eval()
    x = torch.randn(2, 16, 5, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        fwd, _ = _count(m, x, train=False, calls=2, grad=False)
        ref, _ = _count(cbam_fused.CBAM(16, 4).eval(), x.float(), train=False, calls=2,
                        grad=False)
        assert "aten._to_copy.default" not in fwd, sorted(fwd.items())
        assert sum(fwd.values()) == sum(ref.values()) <= BUDGET["eval"], sorted(fwd.items())
        y = m(x)
        w = m.ChannelGate.mlp[1].weight
        w.mul_(-1)
        y_new = m(x)
        functional._CAST_CACHE.clear()
        assert torch.equal(y_new, m(x))  # the updated weight, not the cached cast
        assert not torch.equal(y_new, y)


def _by_getattr(m):
    """CBAM.functional_kwargs' parameters read the plain way (module attributes, Sequential
    indexing): what the dict reads of cbam_fused.modules._dict_member must equal."""
    cg, sp = m.ChannelGate, m.SpatialGate
    return dict(mlp_w1=cg.mlp[1].weight, mlp_b1=cg.mlp[1].bias, mlp_w2=cg.mlp[3].weight,
                mlp_b2=cg.mlp[3].bias, conv_w=sp.spatial.conv.weight,
                conv_b=sp.spatial.conv.bias, bn_weight=sp.spatial.bn.weight,
                bn_bias=sp.spatial.bn.bias, bn_running_mean=sp.spatial.bn.running_mean,
                bn_running_var=sp.spatial.bn.running_var)


def test_module_reads_its_current_parameters():
    """The modules read their parameters from the modules' own dicts (no nn.Module.__getattr__
    call): after a swapped layer, a replaced parameter, a parametrization and a loaded state
    dict they are still the ones the attributes give, and the forward follows them."""
    from torch.nn.utils import parametrize

    m = cbam_fused.CBAM(32, reduction_ratio=4).train()
    x = torch.randn(2, 32, 5, 6)

    def same():
        kw = m.functional_kwargs()
        for k, v in _by_getattr(m).items():
            assert kw[k] is v or torch.equal(kw[k], v), k
        assert m.SpatialGate.spatial.bn.num_batches_tracked is not None

    same()
    m.ChannelGate.mlp[1] = torch.nn.Linear(32, 8)  # a swapped layer
    m.ChannelGate.mlp[3].bias = torch.nn.Parameter(torch.randn(32))  # a replaced parameter
    same()
    assert m.functional_kwargs()["mlp_w1"] is m.ChannelGate.mlp[1].weight

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(m.SpatialGate.spatial.conv, "weight", Doubled())
    conv = m.SpatialGate.spatial.conv
    assert torch.equal(m.functional_kwargs()["conv_w"], 2 * conv.parametrizations.weight.original)
    same()
    count = int(m.SpatialGate.spatial.bn.num_batches_tracked)
    y = m(x)  # the forward with those parameters, and it counts the batch
    assert int(m.SpatialGate.spatial.bn.num_batches_tracked) == count + 1
    from cbam_fused import reference
    want = reference.cbam(x, **{**m.functional_kwargs(), "bn_momentum": 0.01})
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-6)

    m2 = cbam_fused.CBAM(32, reduction_ratio=4)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v
          for k, v in m2.state_dict().items()}
    m2.load_state_dict(sd)
    kw = m2.functional_kwargs()
    assert torch.equal(kw["mlp_w1"], sd["ChannelGate.mlp.1.weight"])
    assert torch.equal(kw["bn_running_var"], sd["SpatialGate.spatial.bn.running_var"])


class _SmallArgs(_Count):
    """Records, for each cbam_fused op, its [N, L] tensor arguments that are not contiguous (a
    CUDA launcher copies each such argument before its kernel runs: a launch the counts above do
    not see)."""

    def __init__(self):
        super().__init__()
        self.strided = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("cbam_fused.") and name not in BLOCK_OPS:
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.dim() == 2 and not a.is_contiguous():
                    self.strided.append((name, i, tuple(a.stride())))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _small_args_cases():
    grid = [dict(spatial_pools=sp, arrangement=ar) for sp in ("max,mean", "mean,max", "blend")
            for ar in ("channel_first", "spatial_first", "parallel")]
    return grid + ["official_lp_lse", "spatial_first_lp_lse", "timm_light", "ultralytics"]


@pytest.mark.parametrize("case", _small_args_cases(), ids=str)
def test_small_arguments_of_the_ops_are_contiguous(case):
    """The backward hands the ops contiguous du and dv (one copy splits the map's gradient), not
    strided views of it that pool_over_c_backward_scale and grad_input would each copy; the
    same for every other [N, L] argument, lp / lse pools included."""
    from variants import make
    m = (make(case, 16) if isinstance(case, str) else cbam_fused.CBAM(16, 4, **case)).train()
    x = torch.randn(2, 16, 5, 4, requires_grad=True)
    orig = functional.EAGER_DIRECT
    functional.EAGER_DIRECT = "always"
    try:
        with _SmallArgs() as fwd:
            y = m(x)
        with _SmallArgs() as bwd:
            torch.autograd.grad(y, [x, *m.parameters()], torch.ones_like(y))
    finally:
        functional.EAGER_DIRECT = orig
    assert fwd.strided == [] and bwd.strided == [], (fwd.strided, bwd.strided)
    assert bwd.ops["cbam_fused.grad_input.default"] + \
        bwd.ops["cbam_fused.grad_input_lp_lse.default"] == 1
