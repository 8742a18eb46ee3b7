"""Test helpers: run the package's CUDA kernel sources in the SIMT simulator on the CPU.

The simulator (`cbam_fused._sim`, DESIGN.md section 5) is the very same kernel and launcher
sources that nvcc compiles, compiled by g++ against a CPU runtime in which every CUDA thread is a
fiber. It is test-only and thousands of times slower than a GPU: use small shapes.

    from cbam_fused.testing import use_simulator, simulator_stats

    with use_simulator(schedule="reverse"):
        y = torch.ops.cbam_fused.apply_gates(x, gc, gs)   # CPU tensors: runs the CUDA kernel
        launches = simulator_stats()                      # what it launched, bytes moved

Importing this module never needs the simulator; `use_simulator()` raises RuntimeError when the
extension was built without it.
"""
from contextlib import contextmanager
from typing import Dict, List

from . import _sim_hook

SCHEDULES = ("forward", "reverse", "shuffle")

# Start index (into the simulator's launch log) of each active use_simulator() context.
_starts: List[int] = []


def _sim_module():
    try:
        from . import _sim
    except ImportError as e:  # pragma: no cover - a build without it, or a broken one
        raise RuntimeError(
            "cbam_fused._sim (the SIMT simulator) is not built; rebuild the package "
            "(`pip install --no-build-isolation -e .`, without CBAM_FUSED_BUILD_SIM=0)") from e
    return _sim


def simulator_available() -> bool:
    """Whether the simulator extension can be imported."""
    try:
        from . import _sim  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def use_simulator(schedule: str = "forward", seed: int = 0):
    """Run the custom ops' CUDA kernel sources in the simulator while the context is active.

    Under the context, each `torch.ops.cbam_fused.*` op called on CPU tensors runs the simulator
    build of its CUDA kernels (`torch.ops.cbam_fused_sim.*`) instead of the pure-PyTorch CPU
    kernel, for the ops whose kernels exist.

    schedule: the order in which the threads (fibers) of a block run between two synchronisation
        points: "forward" (thread 0 first), "reverse", or "shuffle" (a permutation drawn from a
        generator seeded with `seed`, deterministic for a given seed and sequence of launches).
        A kernel whose result depends on the schedule has a race.

    On entry the schedule is set and the generator reseeded; the outermost context also clears the
    simulator's launch log. On exit the previous state (hook flag, schedule) is restored. Contexts
    nest: an inner context's simulator_stats() sees only its own launches.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"use_simulator: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"use_simulator: seed must be a non-negative int, got {seed!r}")
    sim = _sim_module()
    prev_active = _sim_hook.active
    prev_kind, prev_seed = sim.get_schedule()
    if not _starts:
        sim.clear_launch_stats()
    sim.set_schedule(schedule, seed)
    _starts.append(sim.num_launch_stats())
    _sim_hook.active = True
    try:
        yield
    finally:
        _sim_hook.active = prev_active
        sim.set_schedule(prev_kind, prev_seed)
        _starts.pop()


def simulator_stats() -> List[Dict]:
    """The simulator launches since entering the innermost active use_simulator() context.

    Outside any context: the launches since the outermost context was last entered (so the log of
    a `with use_simulator(): ...` block can be read after it). Each launch is a dict:
        name           the kernel name given to cbam::launch
        kernel         an id of the kernel function (its address): which template instance ran
        grid, block    (x, y, z)
        smem_bytes     dynamic shared memory of the launch
        bytes_read     global-memory bytes read through cbam::ld / ld_vec
        bytes_written  global-memory bytes written through cbam::st / st_vec
        bytes_vec      of those read and written, the bytes of 16-byte accesses (ld_vec /
                       st_vec of a 16-byte vector): the vector path's share
        bytes_vec8     and the bytes of 8-byte vector accesses (ld_vec / st_vec of 8 bytes; a
                       scalar 8-byte load is not counted): no kernel issues them now, rows that
                       are not whole 16-byte vectors take 16-byte loads shifted against them
        regions        the memory of the launch's tensors, a (lo, hi, first) tuple of
                       addresses each: [lo, hi) and the launch's first access to it in the order
                       the blocks ran (0: none), where a pass over it started
        l2_miss_bytes  under l2_model(): the bytes the launch's loads fetched from DRAM through
                       the modelled L2 (32 per sector a load missed); None outside it
        pdl            launched under set_pdl(1) (programmatic dependent launch in the CUDA
                       build): the knob as the launch read it
    Only launches that completed are listed (a launch that raised is not).
    """
    sim = _sim_module()
    stats = sim.launch_stats()
    start = _starts[-1] if _starts else 0
    return [dict(s) for s in stats[start:]]


@contextmanager
def l2_model(capacity_bytes: int, sms: int = 132, threads_per_sm: int = 2048):
    """Count DRAM reads through a model of a GPU's L2 while the context is active.

    A model of traffic, not of time: a fully associative, least-recently-used cache of
    `capacity_bytes` in 32-byte sectors (a GPU's L2 fetches from DRAM in sectors); a load that
    finds its sector absent fetches it (each launch's `l2_miss_bytes`), a store allocates its
    sector without a fetch. The simulator runs a launch's blocks one after another; the model
    replays their accesses as a GPU interleaves them: as many blocks as `sms` SMs of
    `threads_per_sm` threads hold (at most 32 an SM, fewer where their shared memory does not
    fit 228 KiB; registers are not modelled) start together in the order the blocks ran, take one
    access each in turn, and a block that ends hands its place to the next; the launchers size
    their grids for those `sms` SMs meanwhile (cbam::num_sms), so a case scaled down with its
    batch, its L2 and its SMs keeps the waves of its passes. The cache starts
    empty and its contents last across launches, so consecutive passes over a tensor meet what
    the ones before them left there (the tile order of the passes, launchers/common.h). The
    defaults are an H100's or H200's SMs; their L2s hold 50 and 60 MiB. On exit the model is
    off again. The contexts do not nest (an inner one would empty the outer one's cache).
    """
    if not isinstance(capacity_bytes, int) or capacity_bytes < 32:
        raise ValueError(f"l2_model: capacity_bytes must be an int of at least 32, "
                         f"got {capacity_bytes!r}")
    sim = _sim_module()
    if sim.l2_model_capacity():
        raise RuntimeError("l2_model: the L2 model is already on (its contexts do not nest)")
    sim.set_l2_model(capacity_bytes, sms, threads_per_sm)
    try:
        yield
    finally:
        sim.set_l2_model(0)


def rel_err_max(got, want) -> float:
    """The largest norm-wise relative error max |a - b| / max |b| over pairs of tensors (compared
    on the CPU in float64; a zero reference counts as scale 1). NaN where the NaN patterns differ
    or a pair's shapes differ."""
    import torch
    worst = 0.0
    for a, b in zip(got, want):
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        if a.shape != b.shape or not torch.equal(torch.isnan(a), torch.isnan(b)):
            return float("nan")
        a, b = torch.nan_to_num(a), torch.nan_to_num(b)
        scale = b.abs().max().item() if b.numel() else 0.0
        err = (a - b).abs().max().item() if b.numel() else 0.0
        worst = max(worst, err / (scale if scale > 0 else 1.0))
    return worst
