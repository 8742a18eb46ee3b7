"""Export: models with fused CBAM blocks through torch.export, and on to ONNX or any backend that
takes ATen graphs.

torch.export.export(model, args) works as it is: each block stays one `cbam_fused::cbam_block`
node, the exported program runs the package's kernels, and saves and loads with
torch.export.save / load where cbam_fused is installed. A consumer without cbam_fused (ONNX,
ExecuTorch, TensorRT, another runtime) needs plain ATen ops instead; `decompositions()` gives
them:

    ep = torch.export.export(model.eval(), (x,))
    ep = ep.run_decompositions(cbam_fused.export.decompositions())
    torch.onnx.export(ep, (x,), "model.onnx")      # or hand ep to any other backend

Each cbam_fused op becomes the functional ATen composition of its math (the pure-PyTorch
kernels', cbam_fused/_cpu_kernels.py), so the graph computes what the op computes, with eager
PyTorch's speed: use it to leave the package behind, not to run fast.
"""
from typing import Callable, MutableMapping

import torch

from . import _cpu_kernels, functional

__all__ = ["decompositions"]


def _op_decomposition(name: str) -> Callable:
    math = _cpu_kernels.MATH[name]
    if name not in _cpu_kernels.X_SHAPED:
        return math

    def decomposed(*args):  # [N, C, S] back to the first argument's shape, dtype and layout
        like = args[0]
        out = math(*args).reshape(like.shape).to(like.dtype)
        return out.contiguous(memory_format=functional._memory_format(like))

    return decomposed


def decompositions(include_default: bool = True) -> MutableMapping[torch._ops.OpOverload, Callable]:
    """A decomposition table for ExportedProgram.run_decompositions that turns every cbam_fused
    op into ATen ops. include_default: merged into torch.export.default_decompositions() (the core
    ATen set, what run_decompositions uses when given no table); else the cbam_fused entries
    alone."""
    table = torch.export.default_decompositions() if include_default else {}
    ops = torch.ops.cbam_fused
    # the block: its fake kernel's composite (every output a fresh tensor; what the graph does
    # not use, dead-code elimination drops), whose ops the entries below decompose in turn
    table[ops.cbam_block.default] = functional._cbam_block_fake
    for name in _cpu_kernels.MATH:
        table[getattr(ops, name).default] = _op_decomposition(name)
    for name, math in _cpu_kernels.HEAD_MATH.items():  # ATen ops already, in the acc dtype
        table[getattr(ops, name).default] = math
    return table
