"""The cbam_fused custom ops: torch.library.opcheck (schema, fake kernel, autograd registration,
AOT dispatch) over shapes, dtypes and both layouts; and the pure-PyTorch kernels' semantics
against explicit loops (argmax rules, NaN)."""
import re

import pytest
import torch
from torch.library import opcheck

import cbam_fused  # noqa: F401
from cbam_fused import _cpu_kernels as K
from cbam_fused import functional
from cbam_fused._cpu_kernels import acc_dtype
from conftest import sim_has

ops = torch.ops.cbam_fused
SHAPES = [(2, 5, 3, 4), (1, 3, 1, 1), (3, 8, 7)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _x(shape, dtype, layout):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    return x


def _small(n, k, dtype):
    return torch.rand(n, k, dtype=torch.float64).to(acc_dtype(dtype)) + 0.25


def op_args(shape, dtype, layout):
    """One argument tuple per op (optional tensors present)."""
    x = _x(shape, dtype, layout)
    g = _x(shape, dtype, layout)
    n, c = shape[:2]
    s = x[0, 0].numel()
    gc, gs = _small(n, c, dtype), _small(n, s, dtype)
    da, dm, du, dv = _small(n, c, dtype), _small(n, c, dtype), _small(n, s, dtype), \
        _small(n, s, dtype)
    idx_s = torch.randint(0, s, (n, c))
    idx_c = torch.randint(0, c, (n, s))
    return {
        "pool_over_s": [(x, None), (x, gs)],
        "pool_over_c": [(x, None), (x, gc)],
        "apply_gates": [(x, gc, gs), (x, None, gs), (x, gc, None)],
        "backward_reduce": [(g, x, gc, gs, True, True), (g, x, None, gs, True, False),
                            (g, x, gc, None, False, True)],
        "pool_over_c_backward_scale": [(x, du, dv, idx_c), (x, du, None, None),
                                       (x, du, dv, idx_c, da, gc)],
        "pool_over_s_backward_scale": [(x, da, dm, idx_s), (x, None, dm, idx_s),
                                       (x, da, dm, idx_s, du, None)],
        "grad_input": [(g, gc, gs, da, dm, idx_s, du, dv, idx_c, a) for a in (0, 1, 2)]
        + [(g, gc, None, da, None, None, None, None, None, 0)],
        # the lp / lse pools (lp > 0 and lse above the values: the pools of some real input)
        "pool_over_s_lp_lse": [(x, None), (x, gs)],
        "pool_over_s_backward_scale_lp_lse": [
            (x, da, dm, idx_s, gs, da, gc, dm, gc + 3), (x, None, None, None, None, None, None,
                                                         dm, gc + 3),
            (x, da, dm, idx_s, gs, da, gc, dm, gc + 3, du, gs.clamp(max=0.9))],
        "grad_input_lp_lse": [(g, x, gc, gs, da, dm, idx_s, du, dv, idx_c, da, gc, dm, gc + 3, a)
                              for a in (0, 1, 2)]
        + [(g, x, gc, None, None, None, None, None, None, None, da, gc, None, None, 0)],
    }


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_every_op(shape, dtype, layout):
    for name, arg_list in op_args(shape, dtype, layout).items():
        for args in arg_list:
            opcheck(getattr(ops, name), args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pools", ["avg+max", "avg+max+lp+lse"])
@pytest.mark.parametrize("arrangement", [0, 1, 2])
def test_opcheck_cbam_block(arrangement, layout, pools):
    x = _x((2, 6, 3, 4), torch.float32, layout).requires_grad_()
    w1 = torch.randn(3, 6, requires_grad=True)
    b1 = torch.randn(3, requires_grad=True)
    w2 = torch.randn(6, 3, requires_grad=True)
    b2 = torch.randn(6, requires_grad=True)
    cw = torch.randn(1, 2, 3, 3, requires_grad=True)
    bw = torch.rand(1, requires_grad=True)
    bb = torch.randn(1, requires_grad=True)
    rm, rv = torch.zeros(1), torch.ones(1)
    for training in (True, False):
        args = (x, w1, b1, w2, b2, cw, None, bw, bb, rm, rv, pools, "relu", "max,mean",
                arrangement, True, training, 1e-5)
        opcheck(ops.cbam_block, args)
        # the backward op, from what the forward saved (no running statistics in training)
        with torch.no_grad():
            out = ops.cbam_block(*args)
        saved = [t.detach() if isinstance(t, torch.Tensor) else t for t in args[:11]]
        if training:
            saved[9] = saved[10] = None
        bargs = (torch.randn_like(x).detach(), *saved, *out[1:functional._VAR], *args[11:])
        opcheck(ops.cbam_block_backward, bargs)


@pytest.mark.parametrize("missing", ["mean", "invstd", "smap", "zconv", "p", "h"])
def test_block_backward_names_a_missing_saved_tensor(missing):
    """A direct call of cbam_block_backward without a saved tensor its gates need is refused
    with the tensor's name (the C++ kernel would otherwise dereference an absent optional)."""
    x = torch.randn(2, 6, 3, 4)
    w1, b1, w2, b2 = torch.randn(3, 6), torch.randn(3), torch.randn(6, 3), torch.randn(6)
    cw, bw, bb = torch.randn(1, 2, 3, 3), torch.rand(1), torch.randn(1)
    args = (x, w1, b1, w2, b2, cw, None, bw, bb, torch.zeros(1), torch.ones(1), "avg+max",
            "relu", "max,mean", 0, True, True, 1e-5)
    with torch.no_grad():
        out = ops.cbam_block(*args)
    saved = list(out[1:functional._VAR])
    saved[functional._SAVED.index(missing)] = None
    bargs = (torch.randn_like(x), *args[:9], None, None, *saved, *args[11:])
    with pytest.raises(RuntimeError, match=f"cbam_block_backward: {missing} is required"):
        ops.cbam_block_backward(*bargs)


# ----------------------------------------------------------------- semantics against loops
def test_pool_over_s_matches_loops_and_torch_max_rules():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    x[0, 1, 1] = x[0, 1, 3] = 9.0  # a tie: the first occurrence wins
    x[1, 2, 2] = float("nan")  # NaN wins over everything, its index is reported
    x[1, 2, 4] = float("nan")
    scale = torch.rand(2, 5, dtype=torch.float64) + 0.5
    scale[0, 3] = scale[0, 1]
    a, m, i = ops.pool_over_s(x, scale)
    for n in range(2):
        for c in range(3):
            vals = [x[n, c, s] * scale[n, s] for s in range(5)]
            assert torch.allclose(a[n, c], sum(vals) / 5, equal_nan=True)
            if n == 1 and c == 2:
                assert torch.isnan(m[n, c]) and i[n, c] == 2
            else:
                best = max(range(5), key=lambda s: (vals[s].item(), -s))
                assert m[n, c] == vals[best] and i[n, c] == best


def test_pool_over_c_and_backward_scales_match_loops():
    n_, c_, s_ = 2, 4, 6
    x = torch.randn(n_, c_, s_, dtype=torch.float64)
    scale = torch.rand(n_, c_, dtype=torch.float64) + 0.5
    u, v, ic = ops.pool_over_c(x, scale)
    assert torch.allclose(u, (x * scale[:, :, None]).mean(1))
    assert torch.equal(ic, (x * scale[:, :, None]).argmax(1))
    du, dv = torch.randn(n_, s_, dtype=torch.float64), torch.randn(n_, s_, dtype=torch.float64)
    out = ops.pool_over_c_backward_scale(x, du, dv, ic)
    for n in range(n_):
        for c in range(c_):
            ref = sum(x[n, c, s] * (du[n, s] / c_ + (dv[n, s] if ic[n, s] == c else 0))
                      for s in range(s_))
            assert torch.allclose(out[n, c], ref)
    da, dm = torch.randn(n_, c_, dtype=torch.float64), torch.randn(n_, c_, dtype=torch.float64)
    _, _, is_ = ops.pool_over_s(x, None)
    out = ops.pool_over_s_backward_scale(x, da, dm, is_)
    for n in range(n_):
        for s in range(s_):
            ref = sum(x[n, c, s] * (da[n, c] / s_ + (dm[n, c] if is_[n, c] == s else 0))
                      for c in range(c_))
            assert torch.allclose(out[n, s], ref)


@pytest.mark.parametrize("op", ["pool_over_c_backward_scale", "pool_over_s_backward_scale",
                                "pool_over_s_backward_scale_lp_lse"])
def test_backward_scales_take_base_and_gate_in_their_store(op):
    """base and gate: out = (base + the scale's gradient) gate (1 - gate), the two steps the
    block's backward takes next (Q1's part and the sigmoid's backward)."""
    n_, c_, s_ = 2, 4, 6
    x = torch.randn(n_, c_, s_, dtype=torch.float64)
    over_c = op == "pool_over_c_backward_scale"
    kept, red = (s_, c_) if over_c else (c_, s_)
    d_avg, d_max = torch.randn(n_, kept, dtype=torch.float64), torch.randn(n_, kept,
                                                                           dtype=torch.float64)
    idx = torch.randint(0, red, (n_, kept))
    args = [x, d_avg, d_max, idx]
    if op.endswith("lp_lse"):
        lp = x.square().sum(2).sqrt()
        args += [None, d_avg, lp, d_max, torch.logsumexp(x, 2)]
    plain = getattr(ops, op)(*args)
    base = torch.randn(n_, red, dtype=torch.float64)
    gate = torch.rand(n_, red, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(getattr(ops, op)(*args, base), base + plain)
    torch.testing.assert_close(getattr(ops, op)(*args, base, gate),
                               (base + plain) * gate * (1 - gate))
    torch.testing.assert_close(getattr(ops, op)(*args, None, gate), plain * gate * (1 - gate))
    shape = "[N, C]" if over_c else "[N, S]"
    for where in ("cpu", "fake", "sim"):  # a base of the wrong shape: named, on every kernel
        if where == "sim" and not sim_has(op):
            continue
        want = f"{op}: base must have shape {shape} = [2, {red}], got [1, {red}]"
        with pytest.raises(RuntimeError, match=re.escape(want)):
            if where == "fake":
                from torch._subclasses.fake_tensor import FakeTensorMode
                with FakeTensorMode(allow_non_fake_inputs=True):
                    getattr(ops, op)(*args, base[:1])
            elif where == "sim":
                getattr(torch.ops.cbam_fused_sim, op)(*args, base[:1], None)
            else:
                getattr(ops, op)(*args, base[:1])


def test_grad_input_matches_formula_per_arrangement():
    n_, c_, s_ = 2, 3, 4
    g = torch.randn(n_, c_, s_, dtype=torch.float64)
    gc, gs = torch.rand(n_, c_, dtype=torch.float64), torch.rand(n_, s_, dtype=torch.float64)
    da, dm = torch.randn(n_, c_, dtype=torch.float64), torch.randn(n_, c_, dtype=torch.float64)
    du, dv = torch.randn(n_, s_, dtype=torch.float64), torch.randn(n_, s_, dtype=torch.float64)
    is_, ic = torch.randint(0, s_, (n_, c_)), torch.randint(0, c_, (n_, s_))
    for arr in (0, 1, 2):
        dx = ops.grad_input(g, gc, gs, da, dm, is_, du, dv, ic, arr)
        for n in range(n_):
            for c in range(c_):
                for s in range(s_):
                    ts = da[n, c] / s_ + (dm[n, c] if is_[n, c] == s else 0)
                    tc = du[n, s] / c_ + (dv[n, s] if ic[n, s] == c else 0)
                    kc = gs[n, s] if arr == 1 else 1
                    ks = gc[n, c] if arr == 0 else 1
                    ref = g[n, c, s] * gc[n, c] * gs[n, s] + kc * ts + ks * tc
                    assert torch.allclose(dx[n, c, s], ref)


def test_backward_reduce_matches_formula():
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    gc, gs = torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 20, dtype=torch.float64)
    rc, rs = ops.backward_reduce(g, x, gc, gs, True, True)
    gx = (g * x).flatten(2)
    assert torch.allclose(rc, (gx * gs[:, None]).sum(2))
    assert torch.allclose(rs, (gx * gc[:, :, None]).sum(1))
    rc2, rs2 = ops.backward_reduce(g, x, gc, gs, True, False)
    assert rs2.numel() == 0 and torch.equal(rc2, rc)


def test_outputs_keep_memory_format_and_accumulation_dtype():
    x = _x((2, 4, 3, 5), torch.bfloat16, "channels_last")
    gc, gs = _small(2, 4, torch.bfloat16), _small(2, 15, torch.bfloat16)
    y = ops.apply_gates(x, gc, gs)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    a, m, i = ops.pool_over_s(x, None)
    assert a.dtype == m.dtype == torch.float32 and i.dtype == torch.int64
    assert K.acc_dtype(torch.float64) == torch.float64


def _wrong_dtype_cases():
    """(op, args, wrong argument) with one argument of a wrong dtype: an accumulation-dtype
    argument in the dtype of x (what autocast's bfloat16 matmuls produced inside a compiled
    backward), an index in int32, an x-sized argument in another dtype."""
    x = _x((2, 4, 3, 3), torch.bfloat16, "contiguous")
    n, c, s = 2, 4, 9
    low = torch.rand(n, c, dtype=torch.bfloat16)
    low_s = torch.rand(n, s, dtype=torch.bfloat16)
    return [
        ("pool_over_s", (x, low_s), "scale"),
        ("apply_gates", (x, low, None), "gc"),
        ("backward_reduce", (x, x, None, low_s, True, True), "gs"),
        ("backward_reduce", (x.float(), x, None, None, True, True), "grad"),
        ("pool_over_s_backward_scale", (x, low, None, None), "d_avg"),
        ("pool_over_c_backward_scale", (x, None, _small(n, s, x.dtype),
                                        torch.randint(0, c, (n, s), dtype=torch.int32)), "argmax"),
        ("grad_input", (x, None, None, low, None, None, None, None, None, 0), "da"),
        ("grad_input_lp_lse", (x, x.float(), *[None] * 12, 0), "x"),
    ]


@pytest.mark.parametrize("case", range(len(_wrong_dtype_cases())))
def test_wrong_dtypes_raise_the_same_error_on_cpu_fake_and_cuda_kernels(case):
    """The CPU and fake kernels check dtypes as the CUDA launchers do, with the same message: a
    fake kernel that accepted a wrong dtype let torch.compile trace a graph (autocast in a compiled
    backward) that failed only when it ran on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from cbam_fused import testing

    op, args, arg = _wrong_dtype_cases()[case]
    messages = []
    with pytest.raises(RuntimeError, match=rf"{op}: {arg} must have( the)? dtype") as cpu:
        getattr(ops, op)(*args)
    messages.append(str(cpu.value))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=rf"{op}: {arg} must have") as fk:
            getattr(ops, op)(*fake)
    messages.append(str(fk.value))
    if testing.simulator_available():
        with testing.use_simulator(), pytest.raises(RuntimeError) as sim:
            getattr(ops, op)(*args)
        messages.append(str(sim.value).splitlines()[0])
    assert len(set(messages)) == 1, messages


def test_backward_scale_store_steps_over_an_empty_extent():
    """Nothing to reduce (S = 0 for the pool over C's scale): the output is the store's steps on
    zeros, the same on the CPU kernel and the simulator's launcher (which takes them in ATen)."""
    from cbam_fused import testing
    if not sim_has("pool_over_c_backward_scale"):
        pytest.skip("the simulator build is missing")
    x, d_avg = torch.randn(2, 4, 0), torch.randn(2, 0)
    base, gate = torch.randn(2, 4), torch.rand(2, 4)
    for b, g in ((None, None), (base, None), (base, gate), (None, gate)):
        want = ops.pool_over_c_backward_scale(x, d_avg, None, None, b, g)
        with testing.use_simulator():
            got = ops.pool_over_c_backward_scale(x, d_avg, None, None, b, g)
        assert torch.equal(got, want)
        expect = torch.zeros(2, 4) if b is None else b
        assert torch.equal(want, expect if g is None else expect * (1 - g) * g)
