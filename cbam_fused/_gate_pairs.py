"""Gate-only modules fused through their caller (used by convert.py).

Much CBAM code (the widely copied CBAM.PyTorch layout among it) keeps the products in the
caller's forward:

    out = self.ca(out) * out        # ca returns gc, [N, C, 1, 1]
    out = self.sa(out) * out        # sa returns gs, [N, 1, H, W]

A swap of `ca` or `sa` alone cannot fuse that. Here the caller's forward is traced with torch.fx,
every child module a leaf (so the graph is the caller's own code, one level deep), in train and
in eval mode (the two must agree: a forward that branches on `self.training` is left alone).
A chain `a = g1(t); b = a * t [; c = g2(b); d = c * b]`, where g1 and g2 are the gate-only
modules (children, or items of a ModuleList / ModuleDict child), each called once, the
intermediate values used nowhere else and t used by nothing else between a and the last product,
is the CBAM block `t -> d` (g1 the channel gate: channel-first; g1 the spatial gate:
spatial-first; g1 alone: channel-only or spatial-only). A product is `*`, torch.mul or .mul,
either order, optionally through `.expand_as(t)`. The chain is recognised, probed and verified
like any block (as `_GatePair(g1, g2)`, whose forward is exactly that chain), then:

  * g1 becomes the block's head: its class is swapped (convert's mechanism) to run the whole
    fused block, with g2 reached through a plain attribute `_cbam_pair_next` (not a submodule:
    state_dict keys and values do not change);
  * the caller's graph calls g1 on t and uses its result where d was used (the products and the
    g2 call are gone); the caller's class is swapped to a subclass whose forward is that graph's
    code (`_RewrittenCaller`), so it keeps its object, parameters, buffers, hooks and state_dict.

The trace records augmented assignments (`out += residual`) as in-place operations, so the
rewritten forward mutates where the original did. convert(verify=True) verifies each chain as a
block; given an example input it also runs the rewritten caller as a whole against its original
forward (float64, train and eval, gradients and buffers).

Limits (the report says which applied): the caller's forward must trace with torch.fx (no
control flow on tensor values) and not depend on train / eval mode; gates with forward hooks or
used at several places are left alone. Not checked, so not kept: Python side effects in the
caller's forward (prints, appends, counters); and the traced forward is the one of the caller's
current structure (e.g. `downsample is None` is fixed at conversion).
"""
import operator
import types
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

_MULS = (operator.mul, torch.mul)
NEXT = "_cbam_pair_next"  # the head gate's plain attribute holding the second gate


class _GatePair(nn.Module):
    """The chain `for g in gates: x = g(x) * x`: what convert recognises, probes and verifies."""

    def __init__(self, gates: List[nn.Module]):
        super().__init__()
        for i, g in enumerate(gates):
            self.add_module(f"g{i}", g)

    def forward(self, x):
        for g in self.children():
            x = g(x) * x
        return x


class _InplaceProxy(fx.Proxy):
    """A Proxy that records `a += b` (and the other augmented assignments) as operator.iadd,
    which fx's code generator writes back as `a += b`: the rewritten forward mutates in place
    where the original did (a plain Proxy falls back to `a = a + b`, a new tensor, which would
    differ where another name aliases `a`)."""


def _inplace_method(fn):
    def method(self, other):
        return self.tracer.create_proxy("call_function", fn, (self, other), {})
    return method


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
            "xor", "lshift", "rshift"):
    setattr(_InplaceProxy, f"__i{_op}__", _inplace_method(getattr(operator, f"i{_op}")))


class _LeafTracer(fx.Tracer):
    """Every child module a leaf: the graph is the caller's own forward, one level deep."""

    def is_leaf_module(self, m, qualname):
        return True

    def proxy(self, node):
        return _InplaceProxy(node, self)


def _trace(caller: nn.Module) -> fx.Graph:
    """The caller's graph (one level deep); raises when its train and eval traces differ. Every
    module's training flag is restored afterwards (a frozen BatchNorm inside stays in eval)."""
    modes = {m: m.training for m in caller.modules()}
    try:
        graphs = []
        for mode in (True, False):
            caller.train(mode)
            graphs.append(_LeafTracer().trace(caller))
    finally:
        for m, t in modes.items():
            m.training = t
    srcs = [g.python_code(root_module="self").src for g in graphs]
    if srcs[0] != srcs[1]:
        raise ValueError("its forward differs between train and eval mode")
    return graphs[0]


def _product_with(node: fx.Node, t: fx.Node) -> Optional[List[fx.Node]]:
    """[the nodes from `node` to its product with t]: its single user if that is `node * t` (or
    `t * node`, torch.mul, .mul), optionally through `node.expand_as(t)` first; else None."""
    if len(node.users) != 1 or node is t:
        return None
    (u,) = node.users
    via = []
    if u.op == "call_method" and u.target == "expand_as" and tuple(u.args) == (node, t) \
            and not u.kwargs and len(u.users) == 1:
        via, node = [u], u
        (u,) = u.users
    is_mul = (u.op == "call_function" and u.target in _MULS) or \
        (u.op == "call_method" and u.target == "mul")
    if not is_mul or u.kwargs or len(u.args) != 2 or set(u.args) != {node, t}:
        return None
    return via + [u]


def find_chains(graph: fx.Graph, gates: Dict[str, nn.Module]
                ) -> Tuple[List[Tuple[List[str], List[fx.Node]]], Dict[str, str]]:
    """The chains of gate-only modules in the caller's graph: ([gate names], [nodes: first
    gate call, ..., last product]) each, and why the other gates are in none. Gate names are
    paths from the caller ("ca", or "attn.0" for one held in a ModuleList)."""
    def gate_of(target: str) -> Optional[str]:  # the gate a module / attribute path is in
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in gates:
                return ".".join(parts[:i])
        return None
    calls: Dict[str, List[fx.Node]] = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and gate_of(n.target) is not None:
            calls.setdefault(gate_of(n.target), []).append(n)
    chains, why, used = [], {}, set()
    for name in gates:
        ns = calls.get(name, [])
        if len(ns) != 1 or ns[0].op != "call_module" or ns[0].target != name:
            why[name] = ("its caller's forward does not call it exactly once" if ns else
                         "its caller's forward does not call it")
    for name, ns in calls.items():
        if name in why or name in used:
            continue
        a = ns[0]
        if len(a.args) != 1 or a.kwargs or not isinstance(a.args[0], fx.Node):
            why[name] = "its caller calls it with other than one tensor"
            continue
        prod = _product_with(a, a.args[0])
        if prod is None:
            continue  # the second gate of a chain, or not multiplied: decided below
        names, nodes, b = [name], [a] + prod, prod[-1]
        users = [u for u in b.users if u.op == "call_module" and u.target in gates
                 and u.target not in why and u.target != name and len(u.args) == 1
                 and not u.kwargs]
        if len(users) == 1:
            prod = _product_with(users[0], b)
            # b may feed only the second gate and its product (nothing outside the chain)
            if prod is not None and set(b.users) <= {users[0], *prod}:
                names.append(users[0].target)
                nodes += [users[0]] + prod
        # the fused block reads t where the first gate did: nothing between that call and the
        # chain's last product may use t (an in-place `t.add_(1)` there would change what the
        # original products read)
        order = {n: i for i, n in enumerate(graph.nodes)}
        t = a.args[0]
        if any(order[a] < order[u] < order[nodes[-1]] for u in t.users if u not in nodes):
            for n in names:
                why[n] = "its caller uses the gate's input between the gate call and the product"
            used.update(names)
            continue
        chains.append((names, nodes))
        used.update(names)
    for name in gates:
        if name not in why and name not in used:
            why[name] = ("its caller does not multiply its input by it right away "
                         "(`out = self.gate(out) * out`)")
    return chains, why


def rewrite(graph: fx.Graph, nodes: List[fx.Node]) -> None:
    """The chain's last product replaced by its first gate call (which, swapped, runs the whole
    fused block); the other nodes of the chain removed."""
    first, last = nodes[0], nodes[-1]
    last.replace_all_uses_with(first)
    for n in reversed(nodes[1:]):
        graph.erase_node(n)


# ------------------------------------------------------------------------ the rewritten caller
class _RewrittenCaller:
    """Mixin placed in front of a caller's class: its forward is the rewritten graph's code."""
    _cbam_rewritten_from: type
    _cbam_src: str

    def __reduce_ex__(self, protocol):
        return (_rebuild_caller, (type(self)._cbam_rewritten_from, type(self)._cbam_src,
                                  type(self)._cbam_globals), self.__getstate__())

    def _get_name(self):
        return self._cbam_rewritten_from.__name__


_CALLER_CLASSES: Dict[Tuple[type, str], type] = {}


def _picklable_globals(glb: dict) -> tuple:
    return tuple((k, ("module", v.__name__) if isinstance(v, types.ModuleType) else ("obj", v))
                 for k, v in glb.items() if k != "__builtins__")


def _caller_class(cls: type, src: str, glb: tuple) -> type:
    key = (cls, src)
    if key not in _CALLER_CLASSES:
        import importlib
        env = {k: importlib.import_module(v) if kind == "module" else v for k, (kind, v) in glb}
        exec(compile(src, f"<cbam_fused rewritten {cls.__qualname__}.forward>", "exec"), env)
        _CALLER_CLASSES[key] = type(cls.__name__, (_RewrittenCaller, cls), {
            "forward": env["forward"], "_cbam_rewritten_from": cls, "_cbam_src": src,
            "_cbam_globals": glb, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CALLER_CLASSES[key]


def _rebuild_caller(cls: type, src: str, glb: tuple) -> nn.Module:
    return object.__new__(_caller_class(cls, src, glb))


def swap_in_caller(caller: nn.Module, graph: fx.Graph) -> None:
    graph.lint()
    code = graph.python_code(root_module="self")
    caller.__class__ = _caller_class(type(caller), code.src, _picklable_globals(code.globals))


def swap_out_caller(caller: nn.Module) -> None:
    caller.__class__ = type(caller)._cbam_rewritten_from


def is_rewritten(m: nn.Module) -> bool:
    return isinstance(m, _RewrittenCaller)
