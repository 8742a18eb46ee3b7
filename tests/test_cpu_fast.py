"""The CPU kernels of the x-sized ops (cbam_fused._cpu_fast) against the oracle's math
(cbam_fused._cpu_kernels): every op with a fast kernel, every dtype, both memory layouts and a
non-dense input, 1-D / 2-D / 3-D, every variant of the optional arguments, non-finite values and
ties; the cases that go back to the oracle; the registered CPU kernel is the fast one; and its
x-sized passes (counted with a dispatch mode, never timed) stay few."""
import collections
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cbam_fused  # noqa: F401  registers the ops
from cbam_fused import _cpu_fast as fast
from cbam_fused import _cpu_kernels as cpu
from test_kernels_sim import (DTYPES, acc, op_args, rand_x, ties_nan_inf_x, to_layout,
                              tolerances)

FAST_OPS = sorted(fast.FAST)
SHAPES = [
    (2, 5, (7,)),          # 1-D, odd
    (1, 1, (3, 5)),        # C = 1, N = 1
    (3, 6, (1, 1)),        # S = 1
    (2, 9, (5, 6)),        # 2-D, odd C
    (2, 4, (3, 2, 3)),     # 3-D
    (0, 4, (3, 3)),        # empty batch
]
LAYOUTS = ["cf", "cl", "strided"]


def _listed(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check(op, got, want, x):
    got, want = _listed(got), _listed(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (op, g.dtype, w.dtype, g.shape, w.shape)
        if op in cpu.X_SHAPED:
            assert g.stride() == w.stride(), (op, g.stride(), w.stride())  # x's memory format
        torch.testing.assert_close(g, w, equal_nan=True, **tolerances(op, x.dtype))


def _expects_fallback(op, args):
    """The calls FAST hands back to the oracle: a Q2 op without d_avg."""
    return op.endswith("_backward_scale") and args[1] is None


@pytest.mark.parametrize("variant", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", FAST_OPS)
def test_fast_kernel_matches_the_oracle(op, dtype, layout, shape, variant):
    n, c, sp = shape
    case = repr((op, dtype, layout, shape, variant)).encode()
    gen = torch.Generator().manual_seed(zlib.crc32(case))
    x = rand_x((n, c) + sp, dtype, layout, gen)
    args = op_args(op, x, gen, variant)
    out = fast.FAST[op](*args)
    assert (out is None) == _expects_fallback(op, args)
    want = cpu.ORACLE[op](*args)
    _check(op, out if out is not None else fast.KERNELS[op](*args), want, x)
    _check(op, fast.KERNELS[op](*args), want, x)


def _with_non_finite(t, gen):
    """A copy of t with NaN, inf and -inf at random positions (a few of each)."""
    t = t.clone()
    flat = t.view(-1) if t.is_contiguous() else None
    if flat is None:
        return t
    for v in (float("nan"), float("inf"), float("-inf")):
        pos = torch.randint(0, flat.numel(), (2,), generator=gen)
        flat[pos] = v
    return t


@pytest.mark.parametrize("variant", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", FAST_OPS)
def test_non_finite_values_propagate_as_in_the_oracle(op, dtype, variant):
    """NaN / inf / -inf in x and in every gradient and gate argument (the gates are NaN, never
    infinite: they are sigmoids): the same NaN and inf positions as the oracle, the finite
    values to rounding."""
    gen = torch.Generator().manual_seed(7 + variant)
    x = _with_non_finite(rand_x((2, 6, 4, 5), dtype, "cf", gen), gen)
    args = list(op_args(op, x, gen, variant))
    for i, a in enumerate(args[1:], 1):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            is_gate = (op, i) in {("apply_gates", 1), ("apply_gates", 2), ("grad_input", 1),
                                  ("grad_input", 2), ("backward_reduce", 2),
                                  ("backward_reduce", 3)} or i == 5 and "scale" in op
            if is_gate:
                a = a.clone()
                a.view(-1)[torch.randint(0, a.numel(), (1,), generator=gen)] = float("nan")
            else:
                a = _with_non_finite(a, gen)
            args[i] = a
    got, want = _listed(fast.KERNELS[op](*args)), _listed(cpu.ORACLE[op](*args))
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()), (op, g, w)
        assert torch.equal(g.isinf(), w.isinf()), (op, g, w)
        fin = w.isfinite()
        torch.testing.assert_close(g[fin], w[fin], **tolerances(op, dtype))


@pytest.mark.parametrize("op", ["grad_input", "pool_over_c_backward_scale",
                                "pool_over_s_backward_scale"])
def test_ties_and_repeated_argmax(op):
    """Integer-valued x (ties everywhere) and argmax indices that repeat along the scattered
    axis (every position of a row the same channel): the scatter adds each row's value once."""
    gen = torch.Generator().manual_seed(3)
    x = rand_x((2, 5, 4, 3), torch.float32, "cl", gen, kind="ties")
    args = list(op_args(op, x, gen, 0))
    if op == "grad_input":
        args[5] = torch.zeros_like(args[5])  # every channel's argmax at s = 0
        args[8] = torch.full_like(args[8], 4)  # every position's argmax at c = 4
    else:
        args[3] = torch.zeros_like(args[3])
    _check(op, fast.KERNELS[op](*args), cpu.ORACLE[op](*args), x)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["pool_over_s", "pool_over_c"])
def test_pools_ties_nan_inf(op, dtype, layout):
    """Max pooling as torch.max (the oracle): the first of tied maxima, a NaN wins (the first
    NaN), inf, rows of -inf; argmax bit for bit, max exactly, mean to rounding. The layouts take
    both loops of csrc/cpu/pool_rows.cpp (along the kept or the reduced axis)."""
    gen = torch.Generator().manual_seed(17)
    x = ties_nan_inf_x((2, 8, 5, 6), dtype, layout, gen)
    for scale in (None, op_args(op, x, gen, 0)[1]):
        got = fast.FAST[op](x, scale)
        want = cpu.ORACLE[op](x, scale)
        assert torch.equal(got[2], want[2]), (got[2], want[2])
        assert torch.equal(got[1].isnan(), want[1].isnan())
        assert torch.equal(got[1].nan_to_num(), want[1].nan_to_num())
        torch.testing.assert_close(got[0], want[0], equal_nan=True, **tolerances(op, dtype))


@pytest.mark.parametrize("extent", [1, 15, 16, 17, 255, 256, 257, 600])
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("op", ["pool_over_s", "pool_over_c"])
def test_pools_lane_and_chunk_edges(op, layout, extent):
    """Reduced extents around the kernel's 16 lanes, its 256-element chunks and its 64-row sum
    chunks, and kept extents over one block of 256 outputs, ties everywhere (the first index
    must survive the lanes' combination and the chunks), against the oracle."""
    gen = torch.Generator().manual_seed(extent)
    shape = (2, extent, 3, 1) if op == "pool_over_c" else (2, 300, extent, 1)
    x = rand_x(shape, torch.float32, layout, gen, kind="ties")
    for scale in (None, op_args(op, x, gen, 0)[1]):
        got, want = fast.FAST[op](x, scale), cpu.ORACLE[op](x, scale)
        assert torch.equal(got[2], want[2]) and torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_pool_rows_refuses_bad_arguments():
    op = torch.ops.cbam_fused_cpu.pool_rows
    x = torch.randn(2, 3, 4)
    for args, message in [((x.view(2, 12), None, 2), "shape"), ((x, None, 0), "dim"),
                          ((x[:, :0], None, 1), "empty"),
                          ((x, torch.rand(2, 5), 2), "scale"),
                          ((x, torch.rand(2, 4, dtype=torch.float64), 2), "scale")]:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def test_registered_cpu_kernel_is_the_fast_one_and_deterministic():
    """torch.ops.cbam_fused.<op> on CPU tensors runs _cpu_fast (bit for bit), and gives the same
    bits on a second run, on sizes that spread the ATen ops over threads."""
    gen = torch.Generator().manual_seed(11)
    x = rand_x((4, 64, 40, 40), torch.float32, "cl", gen)
    for op in FAST_OPS:
        args = op_args(op, x, gen, 0)
        got = _listed(getattr(torch.ops.cbam_fused, op)(*args))
        for a, b, again in zip(got, _listed(fast.FAST[op](*args)),
                               _listed(getattr(torch.ops.cbam_fused, op)(*args))):
            assert torch.equal(a, b) and torch.equal(a, again), op


class _XSized(TorchDispatchMode):
    """Counts the dispatched ops whose output has `numel` elements (x-sized passes), and the
    oracle's mask ops."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        name = func.overloadpacket.__name__
        if isinstance(first, torch.Tensor) and first.numel() == self.numel and name not in (
                "view", "_unsafe_view", "reshape", "permute", "alias", "unflatten", "empty_like",
                "empty", "empty_strided", "new_empty"):  # views and allocations: no pass
            self.ops[name] += 1
        return out


# x-sized ops at most, float32 with every optional argument (the oracle's counts in brackets)
PASSES = {"pool_over_s": 0,                # one pass in C++: [N, K] outputs (the oracle: 3)
          "pool_over_c": 0,
          "apply_gates": 2,                 # x gc, then gs in place (4: two products, a copy)
          "grad_input": 6,                  # g gc gs (2), 2 broadcast terms, 2 scatters (~18)
          "backward_reduce": 3,             # g x, and one product per sum (3)
          "pool_over_c_backward_scale": 1,  # x times d_avg / C (~6)
          "pool_over_s_backward_scale": 1}


@pytest.mark.parametrize("op", FAST_OPS)
def test_x_sized_passes(op):
    gen = torch.Generator().manual_seed(5)
    x = rand_x((2, 6, 5, 7), torch.float32, "cf", gen)
    args = op_args(op, x, gen, 0)
    with _XSized(x.numel()) as mode:
        fast.KERNELS[op](*args)
    with _XSized(x.numel()) as oracle_mode:
        cpu.ORACLE[op](*args)
    n_fast, n_oracle = sum(mode.ops.values()), sum(oracle_mode.ops.values())
    assert n_fast <= PASSES[op], sorted(mode.ops.items())
    assert not {"where", "eq", "zeros_like"} & set(mode.ops), sorted(mode.ops.items())
    assert n_fast <= n_oracle, (sorted(mode.ops.items()), sorted(oracle_mode.ops.items()))


def test_outputs_whose_spatial_dimensions_do_not_merge_take_the_oracle():
    """An x-sized output keeps the first argument's memory format; where that format's spatial
    dimensions cannot be viewed as one axis (a dense permutation that puts C between them), the
    fast kernel hands the call back and the oracle's kernel gives the result."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 5, generator=gen).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert x.is_contiguous() is False and x.stride() == (60, 5, 15, 1)
    gc, gs = torch.rand(2, 3, generator=gen), torch.rand(2, 20, generator=gen)
    assert fast.FAST["apply_gates"](x, gc, gs) is None
    got, want = fast.KERNELS["apply_gates"](x, gc, gs), cpu.ORACLE["apply_gates"](x, gc, gs)
    assert got.stride() == want.stride() and torch.equal(got, want)


def test_half_outputs_are_rounded_once():
    """float16 / bfloat16: the product is taken in float32 and rounded once to the output dtype,
    bit for bit the oracle's result (same float32 arithmetic, same order)."""
    gen = torch.Generator().manual_seed(13)
    for dtype in (torch.float16, torch.bfloat16):
        x = rand_x((2, 8, 6, 6), dtype, "cl", gen)
        gc, gs = torch.rand(2, 8, generator=gen), torch.rand(2, 36, generator=gen)
        got, want = fast.KERNELS["apply_gates"](x, gc, gs), cpu.ORACLE["apply_gates"](x, gc, gs)
        assert got.dtype == dtype and torch.equal(got, want)
        assert got.stride() == to_layout(torch.empty(2, 8, 6, 6), "cl").stride()
        assert acc(dtype) == torch.float32


def test_module_under_deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) (what a user chasing reproducibility turns on)
    lets a CPU training step run (scatter_add_ on the CPU is deterministic) with the same
    results as without it."""
    m = cbam_fused.CBAM(16, 4).train()
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
    state = {k: v.clone() for k, v in m.state_dict().items()}

    def step():
        m.load_state_dict(state)
        y = m(x)
        return [y] + list(torch.autograd.grad(y.square().sum(), [x, *m.parameters()]))

    want = step()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = step()
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
