"""torch.export of models with fused blocks, the ATen decompositions of the ops
(cbam_fused.export), and ONNX export through them, run with onnxruntime."""
import io

import pytest
import torch
from torch import nn

import cbam_fused
from cbam_fused import _cpu_kernels, _ops
from cbam_fused.export import decompositions
from conftest import randomize_, rel_err

OPS = torch.ops.cbam_fused


def _targets(ep):
    """The call_function targets of the program's graph and of its subgraphs (the autocast
    region of functional.cbam is a higher-order op with a graph of its own)."""
    return {str(n.target) for gm in ep.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
            for n in gm.graph.nodes if n.op == "call_function"}


def _cbam_ops(ep):
    return {t for t in _targets(ep) if t.startswith("cbam_fused.")}


def _make(arrangement="channel_first", **kw):
    return randomize_(cbam_fused.CBAM(16, 4, arrangement=arrangement, **kw))


def _x(layout, shape=(3, 16, 5, 6), dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("arrangement", ["channel_first", "spatial_first", "parallel"])
def test_export_eval_matches_and_round_trips(arrangement, layout):
    m = _make(arrangement).eval()
    x = _x(layout)
    ep = torch.export.export(m, (x,))
    assert "cbam_fused.cbam_block.default" in _cbam_ops(ep)  # one node for the block
    assert rel_err(ep.module()(x), m(x)) == 0.0
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    assert rel_err(torch.export.load(buf).module()(x), m(x)) == 0.0


# bn_momentum=None: the cumulative average 1 / num_batches_tracked, computed on the device (an
# nn.BatchNorm reads the count on the host and does not export in training mode)
@pytest.mark.parametrize("bn_momentum", [0.01, None], ids=["momentum", "cumulative"])
def test_export_train_updates_buffers_like_the_module(bn_momentum):
    eager = _make(bn_momentum=bn_momentum).train()
    exported = torch.export.export(_make(bn_momentum=bn_momentum).train(),
                                   (_x("contiguous"),)).module()
    for i in range(3):
        x = _x("contiguous")
        assert rel_err(exported(x), eager(x)) == 0.0, i
        got = dict(exported.named_buffers())
        for k, v in eager.named_buffers():
            assert torch.equal(got[k], v), (i, k)
    assert int(eager.SpatialGate.spatial.bn.num_batches_tracked) == 3


def test_export_dynamic_batch_and_size():
    m = _make().eval()
    n, h, w = (torch.export.Dim(k, min=2, max=64) for k in "nhw")
    ep = torch.export.export(m, (_x("contiguous"),), dynamic_shapes={"x": {0: n, 2: h, 3: w}})
    for shape in [(2, 16, 7, 9), (5, 16, 3, 4)]:
        x = _x("contiguous", shape)
        assert rel_err(ep.module()(x), m(x)) == 0.0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arrangement", ["channel_first", "spatial_first", "parallel"])
def test_decomposed_program_has_no_cbam_op_and_matches(arrangement, train):
    m = _make(arrangement).train(train)
    ref = _make(arrangement).train(train)
    x = _x("channels_last")
    ep = torch.export.export(m, (x,)).run_decompositions(decompositions())
    assert not _cbam_ops(ep), _cbam_ops(ep)
    mod = ep.module()
    for _ in range(2):
        x = _x("channels_last")
        assert rel_err(mod(x), ref(x)) < 1e-6
    got = dict(mod.named_buffers())
    for k, v in ref.named_buffers():
        assert rel_err(got[k], v) < 1e-6, k


def test_decompositions_only_the_package_ops():
    table = decompositions(include_default=False)
    assert set(table) == {OPS.cbam_block.default} | {getattr(OPS, n).default for n in _ops.ALL_OPS}


def _op_inputs(name, layout):
    """Random arguments for op `name` on x [2, 6, 3, 5] (float64)."""
    x = _x(layout, (2, 6, 3, 5), torch.float64)
    n, c, s = 2, 6, 15
    g = torch.rand
    idx_s, idx_c = torch.randint(0, s, (n, c)), torch.randint(0, c, (n, s))
    gc, gs = g(n, c, dtype=torch.float64), g(n, s, dtype=torch.float64)
    return {
        "pool_over_s": (x, gs),
        "pool_over_c": (x, gc),
        "apply_gates": (x, gc, gs),
        "backward_reduce": (_x(layout, (2, 6, 3, 5), torch.float64), x, gc, gs, True, True),
        "pool_over_c_backward_scale": (x, g(n, s, dtype=torch.float64),
                                       g(n, s, dtype=torch.float64), idx_c),
        "pool_over_s_backward_scale": (x, g(n, c, dtype=torch.float64),
                                       g(n, c, dtype=torch.float64), idx_s),
        "grad_input": (_x(layout, (2, 6, 3, 5), torch.float64), gc, gs,
                       g(n, c, dtype=torch.float64), g(n, c, dtype=torch.float64), idx_s,
                       g(n, s, dtype=torch.float64), g(n, s, dtype=torch.float64), idx_c, 0),
        "pool_over_s_lp_lse": (x, gs),
        "pool_over_s_backward_scale_lp_lse": (x, g(n, c, dtype=torch.float64),
                                              g(n, c, dtype=torch.float64), idx_s, gs,
                                              g(n, c, dtype=torch.float64),
                                              g(n, c, dtype=torch.float64) + 1,
                                              g(n, c, dtype=torch.float64),
                                              g(n, c, dtype=torch.float64) + 4),
        "grad_input_lp_lse": (_x(layout, (2, 6, 3, 5), torch.float64), x, gc, gs,
                              g(n, c, dtype=torch.float64), g(n, c, dtype=torch.float64), idx_s,
                              g(n, s, dtype=torch.float64), g(n, s, dtype=torch.float64), idx_c,
                              g(n, c, dtype=torch.float64), g(n, c, dtype=torch.float64) + 1,
                              g(n, c, dtype=torch.float64), g(n, c, dtype=torch.float64) + 4, 0),
    }[name]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", sorted(_cpu_kernels.MATH))
def test_each_op_decomposition_equals_the_op(name, layout):
    """Each decomposition, traced into an ATen graph, computes the oracle's outputs bit for bit
    (the same math) with the op's shape, dtype and memory format, and the op's values (its CPU
    kernel, cbam_fused._cpu_fast, sums in another order) to float64 rounding."""
    from torch.fx.experimental.proxy_tensor import make_fx
    op = getattr(OPS, name).default
    args = _op_inputs(name, layout)
    gm = make_fx(lambda *a: op(*a), decomposition_table=decompositions(False))(*args)
    assert not any(str(n.target).startswith("cbam_fused.") for n in gm.graph.nodes)

    def listed(out):
        return list(out) if isinstance(out, (tuple, list)) else [out]

    want, got = listed(op(*args)), listed(gm(*args))
    oracle = listed(_cpu_kernels.ORACLE[name](*args))
    assert len(got) == len(want) == len(oracle)
    for a, b, o in zip(got, want, oracle):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a, o)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.cbam = cbam_fused.CBAM(16, 4)
        self.ultra = cbam_fused.UltralyticsCBAM(16, 3)
        self.all_pools = cbam_fused.CBAM(16, 4, ["avg", "max", "lp", "lse"])  # official lp / lse
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.all_pools(self.ultra(self.cbam(torch.relu(self.conv(x)))))
        return self.head(y.mean((2, 3)))


def test_onnx_export_runs_in_onnxruntime():
    pytest.importorskip("onnxscript", reason="onnxscript is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    model = randomize_(_Net()).eval()
    x = torch.randn(2, 3, 12, 10)
    ep = torch.export.export(model, (x,)).run_decompositions(decompositions())
    onnx_program = torch.onnx.export(ep, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert rel_err(torch.from_numpy(got), want) < 1e-5


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.save / load are deprecated
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_jit_trace_for_inference(layout):
    """torch.jit.trace (older deployment flows): the block is one cbam_fused::cbam_block call;
    the trace generalises over batch and spatial size and survives save / load."""
    model = randomize_(_Net()).eval()
    x = _x(layout, (2, 3, 12, 10))
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
    assert "cbam_fused::cbam_block" in str(traced.inlined_graph)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    for shape in [(2, 3, 12, 10), (5, 3, 7, 9)]:
        x = _x(layout, shape)
        with torch.no_grad():
            want = model(x)
            assert rel_err(traced(x), want) == 0.0
            assert rel_err(loaded(x), want) == 0.0


def test_export_gate_only_network_converted_through_callers():
    """A ResNet in the CBAM.PyTorch layout (gates return maps, each block multiplies) converted
    through its blocks' rewritten forwards exports with one cbam_block per block, and its ATen
    decomposition (the ONNX path) computes the same."""
    import copy

    import gate_only_resnet as G
    ref = randomize_(G.resnet18_cbam(10)).eval()
    m = copy.deepcopy(ref)
    assert len(cbam_fused.convert(m).converted) == 8
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(m, (x,))
    n_blocks = sum(str(n.target) == "cbam_fused.cbam_block.default"
                   for gm in ep.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
                   for n in gm.graph.nodes)
    assert n_blocks == 8
    with torch.no_grad():
        y = ref(x)
        assert rel_err(ep.module()(x), y) < 1e-5
        dec = ep.run_decompositions(decompositions())
        assert not _cbam_ops(dec)
        assert rel_err(dec.module()(x), y) < 1e-5
