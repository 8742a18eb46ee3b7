"""The switch between the pure-PyTorch CPU kernels and the SIMT simulator.

cbam_fused.testing.use_simulator() sets `active`; while it is set, the CPU kernel of each custom op
hands its call to the simulator's build of the CUDA kernel (torch.ops.cbam_fused_sim.<op>, same
schema) when the simulator has one."""
active = False


def sim_op(name):
    """The simulator's kernel for op `name` while use_simulator() is active, else None."""
    if not active:
        return None
    import torch

    try:
        from . import _sim  # noqa: F401  registers torch.ops.cbam_fused_sim.*
    except ImportError:
        return None
    try:
        return getattr(torch.ops.cbam_fused_sim, name)
    except (AttributeError, RuntimeError):
        return None
