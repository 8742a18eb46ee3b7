"""cbam_fused.convert: run the CBAM blocks of an existing network through the fused path.

    report = cbam_fused.convert(model)          # in place; returns a ConversionReport
    print(report)                               # what was converted, what was left alone and why
    report.undo()                               # or cbam_fused.unconvert(model)

Recognition is by structure, not by class name: a block is a module whose children have the layout
of one of the known implementations (DESIGN.md section 2):

    official code (Jongchan/attention-module)  CBAM{ChannelGate{mlp=Sequential(Flatten, Linear,
        act, Linear)} + pool_types, SpatialGate{compress, spatial=BasicConv{conv, bn}}}
    timm CbamModule / LightCbamModule           {channel{fc1, act, fc2, gate},
        spatial{conv{conv, bn}, gate}} (1x1 convs, BatchNormAct2d)
    ultralytics CBAM                            {channel_attention{pool, fc, act},
        spatial_attention{cv1, act}}

and the gates alone (a ChannelGate, a timm ChannelAttn, an ultralytics SpatialAttention ... used
without their parent). A user's own copy of any of these is found the same way, whatever its class
is called; so are other layouts of the same maths under any attribute names (a gate module with
two dense layers (Linear or 1x1 conv) and an activation between them, adaptive pools, a sigmoid;
a spatial gate module with one conv to a single map, an optional BatchNorm(1), a sigmoid), and a
module whose one or two children are such gates. A look-alike that computes something else (a
squeeze-excitation block: avg pool only; a sum of per-branch sigmoids) is left alone. What the structure leaves open (the order of the pools of the spatial map, avg + max
against the 'light' blend, channel gate first or spatial first) is settled by a probe: the block's
own forward runs once on a float64 copy with random weights and a small random input, and the
fused variant that reproduces it is chosen. A block that no fused variant reproduces (a pool the
fused path lacks, a hard-sigmoid gate, an activation the fused path lacks, a forward that does
something else) is left alone, and the report says why.

Mechanism (why a class swap). A converted block keeps its object, its parameters and buffers
(the same tensor objects: an optimizer built before keeps working; state_dict keys and values are
unchanged) and its hooks; only its class changes, to a subclass of its own class, made once per
class, whose forward calls cbam_fused.functional.cbam with the block's own tensors, read through
fixed attribute paths at every call (so load_state_dict, .to(), .half() keep working). Compared
with assigning an instance `forward`:
  * torch.compile(fullgraph=True) traces it like any module (a plain class method, no bound
    method stored in the instance dict);
  * pickling (torch.save(model), copy.deepcopy) works: the swapped class pickles as "the original
    class, converted" (see _ConvertedBlock.__reduce_ex__), where a bound method in the instance
    dict would unpickle as the *original* forward, silently unconverted;
  * isinstance(block, OriginalClass) stays true, and repr shows the original class name plus a
    `[cbam_fused]` mark.
The gate sub-modules of a converted composite block keep their classes: the parent's forward
no longer calls them, so forward hooks on the gates themselves (not on the block) stop firing;
use cbam_fused.record_attention for the gates.

Gate-only modules (a gate whose forward returns its map, the caller doing the products:
`out = self.ca(out) * out; out = self.sa(out) * out`, as in the widely copied CBAM.PyTorch) are
fused through their caller (_gate_pairs.py): the caller's forward is traced with torch.fx one
level deep, each chain of such gates it multiplies right away is probed and verified as one
block, the chain's first gate is swapped to run the whole fused block (the second gate reached
through a plain attribute), and the caller's class is swapped to one whose forward is the traced
code with the products removed (with example_input, verify=True also checks that caller as a
whole). state_dict, parameters and hooks stay as they were; undo() restores both classes. A
caller whose forward torch.fx cannot trace, or that branches on train / eval mode, is left
alone and the report says why.

Max-pool ties: where several elements share a maximum (a channel constant over space, e.g. a
dead channel), the fused path sends the gradient to one of them, as max_pool2d / torch.max do (the
official code, ultralytics); timm's amax splits it among them. Both are valid subgradients; the
outputs are the same.

verify=True checks each converted block against its original forward on float64 copies (the
model itself is not touched): with its own weights and with random ones (once per group of
identical blocks), in eval and in train mode: the output, the gradient of the input and of every
parameter, and the running statistics after the step; a mismatch raises ConversionError naming the
block. Nothing is swapped unless every block passes.

Files: _spec.py (BlockSpec, the class swap), _recognize.py (the structures), _verify.py (probe
and verification), _gate_pairs.py (gate-only modules through their caller); this one: the API,
the report, the walk and record_attention.
"""
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _gate_pairs as GP
from ._recognize import _act_name, _is_sigmoid  # noqa: F401  (re-exported: compat.py)
from ._recognize import _cls, _match, _Match, _prefix, _Unsupported
from ._spec import (BlockSpec, _ConvertedBlock, _SpecForward, _swap_in, _swap_out,
                    is_converted)
from ._spec import _rebuild_converted, _spec_kwargs  # noqa: F401  (pickles of converted blocks)
from ._verify import (ConversionError, _check_same, _device, _plain_copy, _probe, _returns_gate,
                      _signature, _verify)

__all__ = ["convert", "unconvert", "ConversionReport", "ConversionError", "record_attention",
           "is_converted"]

_GATE_ONLY = ("not converted: its forward returns the attention map and the caller multiplies "
              "x by it (`out = self.ca(out) * out`), and the caller's forward could not be "
              "rewritten to fuse the products ({why}); build the caller with cbam_fused.CBAM "
              "(or ChannelGate / SpatialGate), which returns x times the map")


# ---------------------------------------------------------------------------------- report
@dataclass
class ConvertedBlock:
    name: str
    cls: str
    kind: str
    spec: BlockSpec
    verified_error: Optional[float] = None

    def __str__(self):
        opts = ", ".join(f"{k}={v}" for k, v in self.spec.describe().items())
        v = "" if self.verified_error is None else f"; verified (max rel. error " \
            f"{self.verified_error:.1e})"
        return f"{self.name or '<model>'} ({self.cls}): {self.kind}, {opts}{v}"


@dataclass
class SkippedBlock:
    name: str
    cls: str
    reason: str

    def __str__(self):
        return f"{self.name or '<model>'} ({self.cls}): {self.reason}"


@dataclass
class ConversionReport:
    """What convert() did: `converted` (name, class, kind, options), `skipped` (name, class,
    reason), and `already_fused` (cbam_fused modules found). `undo()` restores every converted
    block."""
    converted: List[ConvertedBlock] = field(default_factory=list)
    skipped: List[SkippedBlock] = field(default_factory=list)
    already_fused: List[str] = field(default_factory=list)
    _blocks: list = field(default_factory=list, repr=False)

    @property
    def converted_names(self) -> List[str]:
        return [c.name for c in self.converted]

    @property
    def skipped_names(self) -> List[str]:
        return [s.name for s in self.skipped]

    def undo(self) -> int:
        n = 0
        for b in self._blocks:
            if isinstance(b, _ConvertedBlock):
                _swap_out(b)
                n += 1
            elif GP.is_rewritten(b):
                GP.swap_out_caller(b)
        self._blocks = []
        return n

    def __str__(self):
        lines = [f"cbam_fused.convert: {len(self.converted)} block(s) converted, "
                 f"{len(self.skipped)} left unconverted"]
        lines += [f"  converted  {c}" for c in self.converted]
        lines += [f"  left alone {s}" for s in self.skipped]
        if self.already_fused:
            names = ", ".join(n or "<model>" for n in self.already_fused)
            lines.append(f"  already fused: {names}")
        return "\n".join(lines)


def _native_classes() -> tuple:
    from . import modules
    classes = (modules.CBAM, modules.ChannelGate, modules.SpatialGate, _SpecForward)
    return classes


def convert(model: nn.Module, verify: bool = True, *, example_input: Optional[Tensor] = None,
            include: Optional[List[str]] = None, exclude: Optional[List[str]] = None,
            seed: int = 0) -> ConversionReport:
    """Run every CBAM block recognised in `model` through cbam_fused's fused path, in place.

    model          any nn.Module (the model itself may be a block).
    verify         check each converted block against its original forward (float64 copies of
                   the block; eval and train; output, input / parameter gradients, running
                   statistics; its own and random weights) and raise ConversionError naming the
                   block on a difference.
    example_input  a model input; when given, one forward (eval mode, no grad, model state
                   restored) records each block's input shape, used by the verification instead
                   of a small default shape [2, C, 5, 6].
    include / exclude  module names (as in named_modules) to convert only / to leave alone.
    Returns a ConversionReport; report.undo() (or unconvert(model)) restores the original
    classes. Parameters, buffers, state_dict and hooks of the model are untouched."""
    report = ConversionReport()
    gen = torch.Generator().manual_seed(seed)
    native = _native_classes()
    found: List[Tuple[str, nn.Module, BlockSpec, str]] = []
    gate_only: List[Tuple[str, nn.Module]] = []

    def walk(name: str, m: nn.Module):
        if isinstance(m, native):
            report.already_fused.append(name)
            return
        if exclude is not None and name in exclude:
            return
        try:
            match = _match(m)
        except _Unsupported as e:
            report.skipped.append(SkippedBlock(name, _cls(m), f"not converted: {e}"))
            return
        if match is not None and (include is None or name in include):
            spec, err = _probe(m, match, gen)
            if spec is not None:
                found.append((name, m, spec, match.kind))
                return
            if not match.kind.endswith("CBAM") and _returns_gate(m, match, gen):
                gate_only.append((name, m))
                return
            if match.kind.startswith("generic ") and not match.kind.endswith("CBAM"):
                pass  # a layout like a gate's that computes something else: not a CBAM block
            else:
                why = match.note or ("its forward matches no fused variant (best relative "
                                     f"error {err:.2g} on a random probe)")
                report.skipped.append(SkippedBlock(name, _cls(m), f"not converted: {why}"))
                if match.note or not match.kind.endswith("CBAM"):
                    return  # explained (e.g. a non-sigmoid gate), or a gate: nothing inside
        for cname, child in m.named_children():
            walk(f"{name}.{cname}" if name else cname, child)

    walk("", model)

    callers = {_caller_of(model, n)[0] for n, _ in gate_only}
    callers = [model.get_submodule(n) for n in callers if n in dict(model.named_modules())]
    shapes = _record_shapes(model, [b for _, b, _, _ in found] + callers, example_input) \
        if example_input is not None else {}
    checked = set()
    for name, m, spec, kind in found:
        err = None
        if verify:
            sig = _signature(m, spec)
            err = _verify(name, m, spec, shapes.get(id(m)), gen, random_weights=sig not in checked)
            checked.add(sig)
        report.converted.append(ConvertedBlock(name, _cls(m), kind, spec, err))
    plans = _plan_gate_chains(model, gate_only, report, gen, verify, checked, shapes)
    for _, m, spec, _ in found:  # swap only after every block verified
        _swap_in(m, spec)
        report._blocks.append(m)
    for caller, chains in plans:
        report._blocks += _apply_gate_chains(caller, chains)
    return report


def _apply_gate_chains(caller: nn.Module, chains) -> List[nn.Module]:
    """Rewrites the caller's forward for `chains` ([(gate names, head spec)], as planned) and
    swaps the heads and the caller; returns the swapped modules."""
    graph = GP._trace(caller)
    gates = {n: caller.get_submodule(n) for names, _ in chains for n in names}
    want = {tuple(names) for names, _ in chains}
    found, _ = GP.find_chains(graph, gates)
    done = [names for names, _ in found if tuple(names) in want]
    if len(done) != len(want):  # the planning traced the same forward: cannot happen
        raise RuntimeError(f"cbam_fused.convert: the chains {sorted(want)} of "
                           f"{_cls(caller)} were not found again")
    for names, nodes in found:
        if tuple(names) in want:
            GP.rewrite(graph, nodes)
    swapped = []
    for names, spec in chains:
        head = gates[names[0]]
        if len(names) > 1:
            head.__dict__[GP.NEXT] = gates[names[1]]  # a plain attribute: not a submodule
        _swap_in(head, spec)
        swapped.append(head)
    GP.swap_in_caller(caller, graph)
    return swapped + [caller]


def _verify_caller(name: str, caller: nn.Module, chains, shape, gen) -> float:
    """The rewritten caller against its original forward on float64 copies, on an input of the
    shape the example input gave it: eval and train mode, output, gradients, buffers."""
    base = _plain_copy(caller)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(_device(caller))
    worst = 0.0
    for train in (False, True):
        orig, fused = copy.deepcopy(base), copy.deepcopy(base)
        orig.train(train)
        fused.train(train)
        _apply_gate_chains(fused, chains)
        worst = max(worst, _check_same(name, caller, orig, fused, x, True,
                                       f"{'train' if train else 'eval'} mode, the caller's "
                                       f"forward, input {tuple(x.shape)}"))
    return worst


def _head_spec(spec: BlockSpec) -> BlockSpec:
    """A _GatePair's spec with its paths relative to the chain's first gate (g0), the second
    (g1) reached through the first's plain attribute GP.NEXT."""
    def move(path):
        if path is None:
            return None
        return path[1:] if path[0] == "g0" else (GP.NEXT,) + path[1:]
    return BlockSpec(**{k: move(v) if k in ("fc1", "fc2", "conv", "bn") else v
                        for k, v in spec.__dict__.items()})


def _caller_of(model: nn.Module, name: str) -> Tuple[str, str]:
    """(caller name, gate path from the caller) of a gate-only module: its nearest ancestor that
    is not a ModuleList / ModuleDict (which have no forward: their owner calls `self.ca[i]`)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        anc = model.get_submodule(".".join(parts[:i]))
        if not isinstance(anc, (nn.ModuleList, nn.ModuleDict)):
            return ".".join(parts[:i]), ".".join(parts[i:])
    return "", name


def _plan_gate_chains(model, gate_only, report, gen, verify, checked, shapes):
    """Gate-only modules (their forward returns the map) fused through their caller's forward
    (_gate_pairs.py): each chain of them the caller multiplies right away is recognised,
    probed and verified as one block; the rest are reported as skipped with the reason. Returns
    [(caller, [([gate names], head spec)])]; nothing is swapped here. With an example input
    (`shapes` holds the caller's input shape) the rewritten caller as a whole is verified too."""
    by_caller: Dict[str, Dict[str, nn.Module]] = {}
    for name, m in gate_only:
        cname, attr = _caller_of(model, name)
        by_caller.setdefault(cname, {})[attr] = m
    uses: Dict[int, int] = {}
    for m in model.modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    plans = []
    for cname, gates in by_caller.items():
        def skip(attr, why, cname=cname, gates=gates):
            full = f"{cname}.{attr}" if cname else attr
            report.skipped.append(SkippedBlock(full, _cls(gates[attr]),
                                               _GATE_ONLY.format(why=why)))
        if not gates or "" in gates:  # the model itself is a gate: no caller to rewrite
            for attr in gates:
                skip(attr, "it has no caller inside the model")
            continue
        caller = model.get_submodule(cname) if cname else model
        try:
            graph = GP._trace(caller)
        except Exception as e:  # noqa: BLE001  any tracing failure: leave it alone, say why
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            for attr in gates:
                skip(attr, f"torch.fx cannot trace the caller's forward: {msg[:200]}")
            continue
        chains, why = GP.find_chains(graph, gates)
        accepted = []
        for names, _ in chains:
            label = "+".join(f"{cname}.{n}" if cname else n for n in names)
            if any(uses[id(gates[n])] > 1 for n in names):
                for n in names:
                    why[n] = "the same module object is used at several places of the model"
                continue
            hooked = [n for n in names if gates[n]._forward_hooks or gates[n]._forward_pre_hooks]
            if hooked:  # they would see the fused block's output, or not fire at all
                for n in names:
                    why[n] = f"{', '.join(hooked)} has forward hooks"
                continue
            pair = GP._GatePair([gates[n] for n in names])
            try:
                match = _match(pair)
                if match is None and len(names) == 1:  # one gate (a spatial one, say) alone
                    m1 = _match(gates[names[0]])
                    if m1 is not None:
                        match = _Match(m1.kind, _prefix(m1.base, "g0"), m1.candidates, m1.note,
                                       m1.channels)
            except _Unsupported as e:
                match, err = None, str(e)
            spec = None
            if match is not None:
                spec, err = _probe(pair, match, gen)
            if spec is None:
                for n in names:
                    why[n] = (f"the chain {label} matches no fused variant" +
                              ("" if match is None else
                               f" (best relative error {err:.2g} on a random probe)"))
                continue
            verr = None
            if verify:
                sig = _signature(pair, spec)
                verr = _verify(label, pair, spec, None, gen, random_weights=sig not in checked)
                checked.add(sig)
            kind = f"{match.kind} (gate-only modules, products fused through the caller)"
            accepted.append((ConvertedBlock(label, "/".join(_cls(gates[n]) for n in names),
                                            kind, spec, verr), (names, _head_spec(spec))))
        for attr, w in why.items():
            skip(attr, w)
        if not accepted:
            continue
        chains = [c for _, c in accepted]
        if verify and id(caller) in shapes:
            err = _verify_caller(cname or "<model>", caller, chains, shapes[id(caller)], gen)
            for blk, _ in accepted:
                blk.verified_error = max(blk.verified_error or 0.0, err)
        report.converted += [blk for blk, _ in accepted]
        plans.append((caller, chains))
    return plans


def _record_shapes(model, blocks, example_input) -> dict:
    shapes, handles = {}, []
    for b in blocks:
        def hook(mod, args):
            shapes.setdefault(id(mod), tuple(args[0].shape))  # returns None: args unchanged
        handles.append(b.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return shapes


def unconvert(model: nn.Module) -> int:
    """Restore the original class of every block convert() swapped in `model` (and of the
    callers of gate-only modules whose forward it rewrote); the number of blocks."""
    n = 0
    for m in model.modules():
        if isinstance(m, _ConvertedBlock):
            _swap_out(m)
            n += 1
        elif GP.is_rewritten(m):
            GP.swap_out_caller(m)
    return n


# ---------------------------------------------------------------------------- attention maps
def _native_spec(m: nn.Module) -> Optional[BlockSpec]:
    """The spec of a cbam_fused.CBAM / ChannelGate / SpatialGate (for record_attention)."""
    from . import modules
    if isinstance(m, modules.CBAM):
        f = {}
        if not m.no_channel:
            f.update(_prefix(_native_spec(m.ChannelGate).__dict__, "ChannelGate"))
        if not m.no_spatial:
            s = _prefix(_native_spec(m.SpatialGate).__dict__, "SpatialGate")
            f.update({k: s[k] for k in ("conv", "bn", "spatial_pools")})
        f.update(arrangement=m.arrangement, dim=m.dim)
        return BlockSpec(**f)
    if isinstance(m, modules.ChannelGate):
        return BlockSpec(fc1=("mlp", "1"), fc2=("mlp", "3") if m.head == "mlp" else None,
                         pools=m.pools, act=m.act, dim=m.dim)
    if isinstance(m, modules.SpatialGate):
        return BlockSpec(conv=("spatial", "conv"),
                         bn=("spatial", "bn") if m.spatial.bn is not None else None,
                         spatial_pools=m.spatial_pools, dim=m.dim)
    return None


@contextmanager
def record_attention(model: nn.Module, names: Optional[List[str]] = None):
    """Within the context, every forward of `model` stores each CBAM block's gates, detached:
    `maps[name] = (gc [N, C] or None, gs [N, 1, *spatial] or None)` (the last call of a block
    wins). The gates come out of the same fused forward (return_gates), no second pass; outside
    the context the blocks run as before, at no cost.

        with cbam_fused.record_attention(model) as maps:
            logits = model(images)
        gc, gs = maps["layer4.2.se"]

    Covers converted blocks, the drop-in classes and cbam_fused.CBAM / ChannelGate / SpatialGate
    (those are switched to the recording path for the duration of the context)."""
    maps: Dict[str, Tuple[Optional[Tensor], Optional[Tensor]]] = {}
    from . import modules
    native = (modules.CBAM, modules.ChannelGate, modules.SpatialGate)
    recorded, swapped = [], []
    skip_under = []
    for name, m in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in skip_under):
            continue  # the gates of a block recorded as a whole
        if names is not None and name not in names:
            continue
        if isinstance(m, _SpecForward):
            recorded.append(m)
        elif isinstance(m, native):
            _swap_in(m, _native_spec(m))
            swapped.append(m)
            recorded.append(m)
        else:
            continue
        m.__dict__["_cbam_record"] = (maps, name)
        skip_under.append(name)
    try:
        yield maps
    finally:
        for m in recorded:
            m.__dict__.pop("_cbam_record", None)
        for m in swapped:
            _swap_out(m)

