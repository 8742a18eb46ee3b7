"""The probe and the verification of convert.py: a block's own forward, run on float64 copies
with random weights, picks the fused variant that reproduces it (_probe) or shows it returns its
gate (_returns_gate); _verify compares a converted copy with the original (eval and train, output,
gradients, buffers) and raises ConversionError naming the block on a difference."""
import copy
import itertools
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from ._recognize import _cls, _dense, _Match
from ._spec import BlockSpec, _ConvertedBlock, _get, _spec_kwargs, _swap_in, _swap_out


class ConversionError(RuntimeError):
    """A converted block does not reproduce its original forward (raised by verify=True)."""


def _randomize_(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial weights and statistics (official init zeroes the spatial BN weight, which
    makes every spatial map give the same gate: a probe with such weights decides nothing)."""
    with torch.no_grad():
        for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t)
            if name.endswith("running_var"):
                t.copy_(0.5 + r)
            elif name.endswith("running_mean"):
                t.copy_(r - 0.5)
            else:
                fan = max(1, t[0].numel()) if t.dim() > 1 else 1
                t.copy_((r - 0.5) * 2 / fan ** 0.5 + (0.5 if name.endswith("bn.weight") else 0))


def _plain_copy(block: nn.Module) -> nn.Module:
    """A float64 copy without hooks, with the block's original class."""
    c = copy.deepcopy(block)
    for m in c.modules():
        for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            h = getattr(m, d, None)
            if h is not None:
                h.clear()
    if isinstance(c, _ConvertedBlock):
        _swap_out(c)
    return c.double()


def _probe_input(channels: Optional[int], dim: int, shape, gen, device):
    if shape is None:
        shape = (2, channels or 4) + (5, 6, 4)[:dim]
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device)


def _rel(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|, with max |b| floored at 1e-6: a gradient that is zero in exact
    arithmetic (a conv bias before a train-mode BatchNorm) is rounding noise on both sides."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if not b.numel():
        return 0.0
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    a, b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)


def _device(block: nn.Module):
    for t in itertools.chain(block.parameters(), block.buffers()):
        return t.device
    return torch.device("cpu")


def _run(block: nn.Module, x: Tensor, grad: bool):
    """The block's forward on x; with grad, also the gradients of x and of every parameter for
    a fixed random output gradient."""
    x = x.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = block.forward(x)
    if not grad:
        return y, {}
    params = dict(block.named_parameters())
    for p in params.values():
        p.grad = None
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(y)
    y.backward(g)
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in params.items()})
    return y, grads


_PROBE_TOL = 1e-6
_VERIFY_TOL = 1e-8


def _probe_forward(block: nn.Module, match: _Match, gen):
    """(ref, x, y): a float64 copy of the block with random weights in eval mode, a random
    input and the copy's output on it (no grad); None when its forward does not take the input."""
    ref = _plain_copy(block)
    _randomize_(ref, gen)
    ref.eval()
    x = _probe_input(match.channels, match.base.get("dim", 2), None, gen, _device(block))
    with torch.no_grad():
        try:
            return ref, x, ref.forward(x)
        except Exception:  # noqa: BLE001  its forward does not take this input
            return None


def _probe(block: nn.Module, match: _Match, gen) -> Tuple[Optional[BlockSpec], float]:
    """The candidate that reproduces the block's forward (eval, random weights), if any."""
    if _device(block).type == "meta":
        return BlockSpec(**match.base, **match.candidates[0]), 0.0
    run = _probe_forward(block, match, gen)
    if run is None:
        return None, float("inf")
    ref, x, y = run
    best = float("inf")
    with torch.no_grad():
        for cand in match.candidates:
            spec = BlockSpec(**match.base, **cand)
            try:
                yf = F.cbam(x, **_spec_kwargs(ref, spec))
            except (ValueError, RuntimeError, TypeError):
                continue
            err = _rel(yf, y)
            best = min(best, err)
            if err < _PROBE_TOL:
                return spec, err
    return None, best


def _returns_gate(block: nn.Module, match: _Match, gen) -> bool:
    """Whether the block's forward returns its attention map (gc as [N, C, 1, ...] or gs as
    [N, 1, *spatial]) rather than x times it: the gate modules of code that multiplies in the
    caller (`out = self.ca(out) * out`), which a module swap cannot fuse."""
    if _device(block).type == "meta":
        return False
    run = _probe_forward(block, match, gen)
    if run is None:
        return False
    ref, x, y = run
    if not isinstance(y, Tensor) or y.shape == x.shape:
        return False
    with torch.no_grad():
        for cand in match.candidates:
            try:
                _, gc, gs = F.cbam(x, **_spec_kwargs(ref, BlockSpec(**match.base, **cand)),
                                   return_gates=True)
            except (ValueError, RuntimeError, TypeError):
                continue
            gate = gs if gc is None else gc.reshape(gc.shape + (1,) * (x.dim() - 2))
            if gate.shape == y.shape and _rel(gate, y) < _PROBE_TOL:
                return True
    return False


def _signature(block: nn.Module, spec: BlockSpec) -> tuple:
    """Blocks with equal signatures run the same code on tensors of the same shapes: a check
    with random weights of one of them holds for all."""
    shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in
                   itertools.chain(block.named_parameters(), block.named_buffers()))
    return type(block), spec, shapes, repr(block)


def _verify(name: str, block: nn.Module, spec: BlockSpec, shape, gen,
            random_weights: bool = True) -> float:
    """Compare the converted block with its original forward on float64 copies; raise
    ConversionError naming the block on a difference. Returns the largest relative error.
    Eval and train mode, with its own weights and (once per signature) with random ones: the
    output, the gradients of the input and of every parameter, and the buffers after the step."""
    device = _device(block)
    worst = 0.0
    runs = [("its own weights", False, True), ("its own weights", True, True)]
    if random_weights:
        runs += [("random weights", False, True), ("random weights", True, True)]
    x, base, prev_weights = None, None, None
    for weights, train, grad in runs:
        if base is None or weights != prev_weights:
            base = _plain_copy(block)
            if weights == "random weights":
                _randomize_(base, gen)
            prev_weights = weights
        orig, fused = copy.deepcopy(base), copy.deepcopy(base)
        orig.train(train)
        fused.train(train)
        if x is None:
            x = _probe_input(None if spec.fc1 is None else _dense(_get(block, spec.fc1))[0],
                             spec.dim, shape, gen, device)
        _swap_in(fused, spec)
        mode = f"{'train' if train else 'eval'} mode, {weights}, input {tuple(x.shape)}"
        worst = max(worst, _check_same(name, block, orig, fused, x, grad, mode))
    return worst


def _check_same(name, block, orig, fused, x, grad, mode) -> float:
    """Runs both on x (and backward with grad); raises ConversionError naming the block on a
    difference of the output, a gradient or a buffer; the largest relative error."""
    y0, g0 = _run(orig, x, grad)
    y1, g1 = _run(fused, x, grad)
    checks = [("output", y1, y0)] + [(f"grad of {k}", g1.get(k), g0[k]) for k in g0
                                     if g0[k] is not None or g1.get(k) is not None]
    checks += [(f"buffer {k}", b1, b0) for (k, b0), (_, b1) in
               zip(orig.named_buffers(), fused.named_buffers())]
    worst = 0.0
    for what, a, b in checks:
        if a is None or b is None:
            raise ConversionError(f"cbam_fused.convert: block {name!r} ({_cls(block)}): "
                                  f"{what} is None on one side only ({mode})")
        err = _rel(a, b)
        worst = max(worst, err)
        if not err < _VERIFY_TOL:
            raise ConversionError(
                f"cbam_fused.convert: block {name!r} ({_cls(block)}) differs from its "
                f"original forward: {what}, relative error {err:.3g} ({mode})")
    return worst
