#!/usr/bin/env python
"""Kernel benchmark: each cbam_fused op alone, its bytes over its time against the copy
bandwidth (issue 4's performance target: at least 80% of the device's copy bandwidth on the
ResNet-50 CBAM sites at batch 64, float32 NCHW and bfloat16 channels-last).

Each op runs with the arguments the channel-first block gives it (pool_over_s_backward_scale with
the spatial-first block's):
  pool_over_s(x)                       pool_over_c(x, gc)               apply_gates(x, gc, gs)
  backward_reduce(g, x, gc, gs)        pool_over_c_backward_scale(x, du, dv, ic)
  pool_over_s_backward_scale(x, da, dm, is)                             grad_input(g, ..., 0)
Bytes of an op = the bytes of every tensor it takes and returns (x-sized ones and the small [N, C]
/ [N, S] ones): what it must move at the least. Effective bandwidth = those bytes / the median
time per call. Timing on CUDA: the calls, over inputs rotating among enough buffers to exceed 3x
the L2 cache (at least 8 calls), are captured in one CUDA graph and replayed; time per call =
replay time / calls (CUDA events), so the host's launch cost, which a Python-level call of a
10-microsecond kernel would otherwise measure, is left out, as in a GPU-bound program. Random
normal data, outputs not poisoned. frac_copy_bw = that bandwidth / the copy bandwidth measured in
the same run. Partial buffers of two-stage reductions are not counted: they are the kernel's own
cost.

The same bytes copied: the device's copy bandwidth is measured on a 1 GiB copy, where the fixed
cost of a launch (its start, the first wave's ramp, the last wave's tail: a few microseconds) is
lost in the time; an op at a 7x7 site moves 10-50 MB, a few microseconds of transfer. So each
case is also timed against PyTorch's own copy of the same bytes (clone() of a tensor of the op's
x dtype holding half its bytes: read + written = the op's bytes), timed the same way over as
many rotating sources: frac_same_size_copy = that copy's time / the op's time, the op's share
of what one launch of the best-tuned kernel PyTorch has reaches at that size. launch_floor_ms is
the time of a one-element clone() timed so: the fixed cost of a launch in a graph.

Runs standalone (python benchmarks/bench_kernels.py [--json PATH]) and as part of bench_cbam.py,
whose JSON holds the same record under "kernels".

JSON record ("cbam_fused.bench_kernels/1"): schema, batch, target_frac, copy_gb_per_s, timing,
cases[] {id, op, site, shape [N, C, H, W], dtype, layout, bytes, x_bytes, median_ms, p10_ms,
p90_ms, reps, n_buffers, gb_per_s, frac_copy_bw, meets_target, copy_same_ms,
frac_same_size_copy, error, graph_error (a CUDA-graph capture that failed: that op was then timed
call by call)}, launch_floor_ms,
summary{dtype/layout: {cases, min_frac, mean_frac, meeting_target, weakest, min_frac_same_size,
mean_frac_same_size, meeting_target_same_size}}, heads[] {site, op (a key of HEAD_OPS), maps
([N, C] or [N, 1, H, W]), fused_ms (the op), aten_ms (the ATen ops it replaced
in the block: HEAD_OPS), speedup, error, graph_error}; with --sweep, each
case also has sweep{tuning_key(setting): frac_copy_bw} (keys "tiles/rows/vec_rows/reduce_k_mode/
k_vectors/reduce_r_mode/side_share/k_tile_vectors"; or sweep_skipped, past
--max-minutes) and the record sweep{settings, gmean_frac, per_op{op: {best, best_gmean, default_gmean}},
best_per_case, cases_swept, cases}.
"""
import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util as bu  # noqa: E402

SCHEMA = "cbam_fused.bench_kernels/1"
TARGET = 0.8
OPS = ("pool_over_s", "pool_over_c", "apply_gates", "backward_reduce",
       "pool_over_c_backward_scale", "pool_over_s_backward_scale", "grad_input")
# the ops of the official code's lp / lse pools (--ops all)
LP_LSE_OPS = ("pool_over_s_lp_lse", "pool_over_s_backward_scale_lp_lse", "grad_input_lp_lse")
OP_SETS = {"issue4": OPS, "all": OPS + LP_LSE_OPS}
SITES = {"resnet50": [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)],
         "tiny": [(32, 8, 8), (64, 5, 5)],
         # odd maps, whose channels-first rows are not whole vectors: Inception-v3's 35x35 and
         # 17x17, a DeepLab 65x65 (513 input, stride 8), YOLOv3-608's 19x19 (the reductions
         # along them staged or shifted, across them folded or shifted)
         "odd": [(288, 35, 35), (768, 17, 17), (256, 65, 65), (1024, 19, 19)]}
# The launchers' tuning knobs (csrc/launchers/launchers.h, cbam::debug): tiles per SM (0: each op's
# own, csrc/launchers/op_tuning.h, else 32), min rows per thread, rows of 16-byte vectors in flight
# per thread (-1: the op's own, else as 0; 0: 2 for float32, else 1; 4: reduce_r only, the other
# kernels take 2), the reductions over the contiguous axis (reduce_k_mode: 0 reduce_k with
# one lane per vector up to 32, 1 with the fewest lanes that cover a row, 2 as 1 but short rows take
# reduce_k_rows, one thread a row, 3 as 2 but where reduce_k's grid is resident at once, 2 rows'
# vectors loaded before the fold), reduce_k's 16-byte loads in flight per thread (1 or 4), and the
# lanes of reduce_r's short rows (reduce_r_mode: 0 a power of two up to 32, 1 one per vector of a
# row of at most 128 vectors), the side traffic a tile may cost (side_share: staged values 1 / share
# of its x bytes, partials half that; smaller shares allow tiles of fewer rows; 0: the op's own,
# else 16) and reduce_k's
# vectors a lane per column tile (k_tile_vectors: 1, 2 or 4, fewer make more column tiles; 8, 16 or
# 32, up to 2, 4 or 8 groups of 4 where the grid stays large enough); keyed
# "tiles/rows/vec_rows/reduce_k_mode/k_vectors/reduce_r_mode/side_share/k_tile_vectors". The sweep
# crosses the first three and tries the others once each at the default grid sizing (they change the
# reductions only), then the small sites' knobs with fewer rows per thread, 64 tiles an SM, plus the
# defaults before 2026-11-26's sweep (8/4/1/2/1/0), those of the session after it (8/4/0/2/4/0) and
# those before 2026-11-27's 32 tiles an SM (8/4/0/3/4/0), for a before / after.
TUNING_KNOBS = ("tiles_per_sm", "min_rows_per_thread", "vec_rows_in_flight", "reduce_k_mode",
                "k_vectors_in_flight", "reduce_r_mode", "side_share", "k_tile_vectors")
# The defaults: tiles_per_sm 0, vec_rows_in_flight -1 and side_share 0, each op's own where
# csrc/launchers/op_tuning.h names them (from the sweep of 2026-11-28), else 32, by element size
# and 16; reduce_r_mode 1 (span lanes, from the same sweep); every other value of a knob is set
# for every op. PREVIOUS_TUNING: the defaults before that sweep, the same for every op.
DEFAULT_TUNING = (0, 4, -1, 3, 4, 1, 0, 32)
PREVIOUS_TUNING = (32, 4, 0, 3, 4, 0, 16, 32)
_T = PREVIOUS_TUNING[0]  # the base grid sizing, at which the other knobs are tried
SWEEP = [(t, r, u, 3, 4, 0, 16, 32) for t in (4, 8, 16, 32) for r in (1, 2, 4) for u in (1, 2)] + [
    DEFAULT_TUNING, PREVIOUS_TUNING, (64, 4, 0, 3, 4, 0, 16, 32), (64, 1, 0, 3, 4, 0, 16, 32),
    (_T, 4, 0, 3, 1, 0, 16, 32), (_T, 4, 0, 3, 4, 1, 16, 32),
    (_T, 4, 0, 2, 4, 0, 16, 32), (_T, 4, 0, 0, 4, 0, 16, 32), (_T, 4, 0, 1, 4, 0, 16, 32),
    (8, 4, 0, 3, 4, 0, 16, 4), (8, 4, 0, 2, 4, 0, 16, 4), (8, 4, 1, 2, 1, 0, 16, 4),  # earlier
    (16, 1, 0, 3, 4, 1, 16, 32)] + [
    (t, r, 4, 3, 4, 0, 16, 32) for t in (4, 8, 32) for r in (1, 4)] + [  # reduce_r, 4 rows
    (t, r, 0, 3, 4, 0, share, ktv) for t, r in ((_T, 4), (16, 1)) for share, ktv in (
        (4, 32), (8, 32), (16, 1), (16, 2), (4, 1), (4, 2))] + [  # the small sites' grids
    (_T, 4, 0, 3, 4, 0, 16, ktv) for ktv in (4, 8, 16)] + [  # reduce_k's groups: none, 2, 4
    # each op's own with the power-of-two lanes of before, and the float32 rows' 4 tiles an SM
    # and 4 rows in flight with span lanes (not timed together by the sweep that chose them)
    (0, 4, -1, 3, 4, 0, 0, 32), (4, 4, 4, 3, 4, 1, 16, 32)]
# Earlier defaults, set against today's in the sweep's per-op table (summarize_sweep)
REFERENCE_TUNINGS = {"defaults of 2026-11-28 (every op alike)": PREVIOUS_TUNING,
                     "defaults of 2026-11-27 (one group a lane)": (32, 4, 0, 3, 4, 0, 16, 4),
                     "defaults of 2026-11-27 (8 tiles an SM)": (8, 4, 0, 3, 4, 0, 16, 4),
                     "defaults of 2026-11-26 (session 7)": (8, 4, 0, 2, 4, 0, 16, 4),
                     "defaults before 2026-11-26": (8, 4, 1, 2, 1, 0, 16, 4)}


def tuning_key(setting) -> str:
    return "/".join(str(v) for v in setting)
CONFIGS = {"fp32-nchw": (torch.float32, torch.contiguous_format),
           "bf16-cl": (torch.bfloat16, torch.channels_last),
           # 16-bit NCHW, as under autocast without channels_last (its 14x14 maps' rows of 196
           # are not whole 16-byte vectors: the reductions along them are staged whole)
           "bf16-nchw": (torch.bfloat16, torch.contiguous_format),
           "fp16-nchw": (torch.float16, torch.contiguous_format)}
ISSUE4_CONFIGS = ("fp32-nchw", "bf16-cl")  # issue 4's target; the default of --configs


def _nbytes(t) -> int:
    if isinstance(t, (tuple, list)):
        return sum(_nbytes(v) for v in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _buffers(n, c, h, w, dtype, fmt, device, l2_bytes, gen, nb=None):
    """x and g buffers (rotating; nb of each, else enough to exceed the L2 cache), and the small
    tensors of the ops (one set, [N, C] / [N, S])."""
    x_bytes = n * c * h * w * torch.tensor([], dtype=dtype).element_size()
    if nb is None:
        nb = bu.n_rotating_buffers(device, x_bytes, 2 * x_bytes, l2_bytes, cap=32, mem_share=6)

    def big():
        return torch.randn((n, c, h, w), generator=gen, device=device,
                           dtype=dtype).contiguous(memory_format=fmt)
    xs = [big() for _ in range(nb)]
    gs = [big() for _ in range(nb)]
    s = h * w

    def rnd(l, lo=0.1, hi=1.0):
        return torch.rand((n, l), generator=gen, device=device) * (hi - lo) + lo

    small = dict(gc=rnd(c), gs=rnd(s), da=rnd(c, -1, 1), dm=rnd(c, -1, 1), du=rnd(s, -1, 1),
                 dv=rnd(s, -1, 1), i_s=torch.randint(0, s, (n, c), generator=gen, device=device),
                 i_c=torch.randint(0, c, (n, s), generator=gen, device=device),
                 dlp=rnd(c, -1, 1), lp=rnd(c, 1, 2), dlse=rnd(c, -1, 1), lse=rnd(c, 4, 5))
    if dtype == torch.float64:
        small = {k: v.double() if v.is_floating_point() else v for k, v in small.items()}
    return xs, gs, small, x_bytes


def _args(op, x, g, t):
    return {
        "pool_over_s": (x, None),
        "pool_over_c": (x, t["gc"]),
        "apply_gates": (x, t["gc"], t["gs"]),
        "backward_reduce": (g, x, t["gc"], t["gs"], True, True),
        "pool_over_c_backward_scale": (x, t["du"], t["dv"], t["i_c"]),
        "pool_over_s_backward_scale": (x, t["da"], t["dm"], t["i_s"]),
        "grad_input": (g, t["gc"], t["gs"], t["da"], t["dm"], t["i_s"], t["du"], t["dv"],
                       t["i_c"], 0),
        "pool_over_s_lp_lse": (x, None),
        "pool_over_s_backward_scale_lp_lse": (x, t["da"], t["dm"], t["i_s"], t["gs"], t["dlp"],
                                              t["lp"], t["dlse"], t["lse"]),
        "grad_input_lp_lse": (g, x, t["gc"], t["gs"], t["da"], t["dm"], t["i_s"], t["du"],
                              t["dv"], t["i_c"], t["dlp"], t["lp"], t["dlse"], t["lse"], 0),
    }[op]


def _time(call, nb, device, timing, rec):
    """(times in ms, reps) of call(i) over the nb rotating buffers (see the module docstring)."""
    if device.type == "cuda":
        calls = nb * max(1, -(-8 // nb))  # every buffer at least once, >= 8 launches a replay
        try:
            return bu.time_graph(call, device, calls=calls, reps=timing["graph_reps"]), \
                timing["graph_reps"]
        except Exception as e:  # noqa: BLE001  a capture bug: say so, time call by call
            rec["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.synchronize(device)
    reps = bu.reps_for(call, device, timing["target_s"], timing["min_reps"], timing["max_reps"])
    return bu.time_runs(call, device, warmup=timing["warmup"], reps=reps), reps


def _copy_same_bytes_ms(nbytes, dtype, nb, device, timing, gen):
    """Median time of PyTorch's clone() of nbytes / 2 bytes (of dtype; read + written = nbytes),
    over nb rotating sources, timed as the ops are (_time)."""
    esize = torch.tensor([], dtype=dtype).element_size()
    n = max(1, -(-nbytes // (2 * esize)))
    srcs = [torch.randn(n, generator=gen, device=device, dtype=dtype) for _ in range(nb)]
    times, _ = _time(lambda i: srcs[i % nb].clone(), nb, device, timing, {})
    return bu.median(times)  # (srcs freed on return)


def _sweep(call, nb, device, timing, rec, sweep, copy_gbps):
    """frac_copy_bw of the op under each tuning setting (TUNING_KNOBS) of `sweep`, keyed by
    tuning_key; the defaults are restored afterwards."""
    set_tuning = torch.ops.cbam_fused_debug.set_tuning
    out = {}
    try:
        for setting in sweep:
            set_tuning(*setting)
            times, _ = _time(call, nb, device, timing, rec)
            out[tuning_key(setting)] = rec["bytes"] / (bu.median(times) * 1e-3) / 1e9 / copy_gbps
    finally:
        set_tuning(*DEFAULT_TUNING)
    return out


def run(device, *, sites="resnet50", batch=64, configs=ISSUE4_CONFIGS, ops=OPS, copy_gbps=None,
        l2_bytes=None, timing=None, seed=0, bar=None, sweep=None, sweep_max_s=None) -> dict:
    """Measures every (site, config, op), site by site; returns the JSON record (see the module
    docstring). sweep: settings (TUNING_KNOBS) to time each op under as well (CUDA kernels only), until sweep_max_s seconds have passed (the cases
    after that are measured at the defaults only and marked sweep_skipped)."""
    import time
    t0 = time.monotonic()
    timing = timing or dict(warmup=5, target_s=0.1, min_reps=10, max_reps=200, graph_reps=25)
    if copy_gbps is None:
        copy_gbps = bu.copy_bandwidth(device)["gb_per_s"]
    if device.type == "cuda":
        torch.ops.cbam_fused_debug.set_debug(False, 0)  # no poisoning fill in the timings
    gen = torch.Generator(device=device).manual_seed(seed)
    cases = []
    for (c, h, w) in SITES[sites]:
        for cfg in configs:
            dtype, fmt = CONFIGS[cfg]
            xs, gs, small, x_bytes = _buffers(batch, c, h, w, dtype, fmt, device, l2_bytes, gen)
            nb = len(xs)
            for op in ops:
                rec = dict(id=f"{op}-{c}x{h}x{w}-b{batch}-{cfg}", op=op, site=f"{c}x{h}x{w}",
                           shape=[batch, c, h, w], dtype=str(dtype).replace("torch.", ""),
                           layout="channels_last" if fmt == torch.channels_last else "nchw",
                           bytes=None, x_bytes=x_bytes, median_ms=None, p10_ms=None,
                           p90_ms=None, reps=0, n_buffers=nb, gb_per_s=None, frac_copy_bw=None,
                           meets_target=None, copy_same_ms=None, frac_same_size_copy=None,
                           error=None, graph_error=None)
                if bar is not None:
                    bar.set_postfix_str(rec["id"], refresh=False)
                try:
                    fn = getattr(torch.ops.cbam_fused, op)
                    args0 = _args(op, xs[0], gs[0], small)
                    rec["bytes"] = _nbytes(args0) + _nbytes(fn(*args0))

                    def call(i, fn=fn, op=op, xs=xs, gs=gs, small=small, nb=nb):
                        return fn(*_args(op, xs[i % nb], gs[i % nb], small))
                    times, reps = _time(call, nb, device, timing, rec)
                    med = bu.median(times)
                    rec.update(median_ms=med, p10_ms=bu.quantile(times, 0.1),
                               p90_ms=bu.quantile(times, 0.9), reps=reps)
                    rec["gb_per_s"] = rec["bytes"] / (med * 1e-3) / 1e9
                    rec["frac_copy_bw"] = rec["gb_per_s"] / copy_gbps if copy_gbps else None
                    rec["meets_target"] = rec["frac_copy_bw"] is not None and \
                        rec["frac_copy_bw"] >= TARGET
                    rec["copy_same_ms"] = _copy_same_bytes_ms(rec["bytes"], dtype, nb, device,
                                                              timing, gen)
                    rec["frac_same_size_copy"] = rec["copy_same_ms"] / med
                    if sweep and (sweep_max_s is None or time.monotonic() - t0 < sweep_max_s):
                        rec["sweep"] = _sweep(call, nb, device, dict(timing, graph_reps=10),
                                              rec, sweep, copy_gbps)
                    elif sweep:
                        rec["sweep_skipped"] = "time budget (--max-minutes)"
                except Exception as e:  # noqa: BLE001  one op failing must not end the run
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    sys.stderr.write(f"\n[bench_kernels] {rec['id']} failed:\n"
                                     f"{traceback.format_exc(limit=6)}\n")
                cases.append(rec)
                if bar is not None:
                    bar.update(1)
            del xs, gs, small
            if device.type == "cuda":
                torch.cuda.empty_cache()
    heads = _heads(device, sites, batch, timing, gen)
    launch_floor_ms = _copy_same_bytes_ms(2, torch.float32, 1, device, timing, gen)
    method = ("cuda_graph: the calls captured in one CUDA graph over the rotating buffers, "
              "replayed `reps` times; time per call = replay time / calls (CUDA events)"
              if device.type == "cuda" else "perf_counter around each call")
    return dict(schema=SCHEMA, batch=batch, target_frac=TARGET, copy_gb_per_s=copy_gbps,
                timing=method, launch_floor_ms=launch_floor_ms, cases=cases,
                summary=summarize(cases), heads=heads)


HEAD_OPS = {  # op -> the ATen ops its pure-PyTorch kernel runs (what the block ran before it)
    "channel_head": "cat, linear, relu, linear, sum, sigmoid",
    "channel_head_backward": "repeat, four mm, two sums, threshold_backward",
    "spatial_head": "cat, convolution, batch_norm, sigmoid",
    "spatial_head_backward": "sigmoid_backward, batch_norm_backward, convolution_backward, "
                             "the split of the map's gradient",
    "batch_norm_gate": "native_batch_norm (batch statistics), sigmoid, var_mean",
    "batch_norm_gate_backward": "sigmoid_backward, native_batch_norm_backward",
}


def _head_calls(op, device, batch, h, w, gen, nb, c=None):
    """(fused(i), aten(i)) of one head op on nb rotating sets of random float32 inputs: the
    channel gate of the official block (avg and max pools [batch, c], an MLP of c / 16 hidden
    units with biases, relu; the backward from a random dzc and that forward's P and h), the
    spatial gate of a block with BatchNorm in eval mode, maps [batch, 1, h, w], 7x7 kernel, or
    that gate's BatchNorm with batch statistics on a conv output [batch, 1, h, w]."""
    from cbam_fused import _cpu_kernels as cpu

    def rnd(*shape, lo=-1.0, hi=1.0):
        return torch.rand(shape, generator=gen, device=device) * (hi - lo) + lo
    fused_op, math = getattr(torch.ops.cbam_fused, op), cpu.HEAD_MATH[op]
    if op.startswith("channel_head"):
        hid = max(1, c // 16)
        mlp = (rnd(hid, c, lo=-0.1, hi=0.1), rnd(hid), rnd(c, hid, lo=-0.3, hi=0.3), rnd(c))
        pools = [(rnd(batch, c), rnd(batch, c, lo=0.0, hi=2.0)) for _ in range(nb)]
        fwd = [(*pools[i], None, None, *mlp, "avg+max", "relu") for i in range(nb)]
        if op == "channel_head_backward":  # dzc, and the forward's P and h
            saved = [cpu.channel_head(*f)[1:] for f in fwd]
            fwd = [(rnd(batch, c), *saved[i], mlp[0], mlp[2], True, True, "avg+max", "relu")
                   for i in range(nb)]
        return (lambda i: fused_op(*fwd[i % nb])), (lambda i: math(*fwd[i % nb]))
    if op.startswith("batch_norm_gate"):  # the conv output [batch, 1, h, w], affine BatchNorm
        bn = (rnd(1, lo=0.5, hi=1.5), rnd(1))
        gate = [(rnd(batch, 1, h, w, lo=-3.0, hi=3.0), *bn, 1e-5) for _ in range(nb)]
        if op == "batch_norm_gate_backward":  # d gs, and the forward's gs, mean and invstd
            fwd = [cpu.batch_norm_gate(*g) for g in gate]
            gate = [(rnd(batch, h * w), fwd[i][0], gate[i][0], fwd[i][1], fwd[i][2], bn[0], True)
                    for i in range(nb)]
        return (lambda i: fused_op(*gate[i % nb])), (lambda i: math(*gate[i % nb]))
    params = (rnd(1, 2, 7, 7, lo=-0.1, hi=0.1), None, rnd(1, lo=0.5, hi=1.5), rnd(1),
              rnd(1, lo=-0.1, hi=0.1), rnd(1, lo=0.5, hi=1.5))
    if op == "spatial_head":
        ins = [(rnd(batch, 1, h, w), rnd(batch, 1, h, w, lo=0.0, hi=2.0)) for _ in range(nb)]
        tail = (*params, 1e-5, "max,mean", True)
    else:  # grad, gs, smap, zconv
        ins = [(rnd(batch, h * w), rnd(batch, h * w, lo=0.0, hi=1.0), rnd(batch, 2, h, w),
                rnd(batch, 1, h, w)) for _ in range(nb)]
        tail = ()

    def args(i):
        if op == "spatial_head":
            return (*ins[i % nb], *tail)
        grad, gs, smap, zconv = ins[i % nb]
        return (grad, gs, smap, zconv, *params, 1e-5, "max,mean")
    return (lambda i: fused_op(*args(i))), (lambda i: math(*args(i)))


def _heads(device, sites, batch, timing, gen):
    """The head ops (HEAD_OPS: channel_head, two or three kernels, and its backward, two or three;
    spatial_head, one; spatial_head_backward, two; batch_norm_gate and its backward, two each),
    each against the ATen ops it replaced in the block (its pure-PyTorch kernel, which on CUDA
    tensors runs exactly those), per site. Timed as the ops are (_time)."""
    out = []
    for (c, h, w) in SITES[sites]:
        for op in HEAD_OPS:
            maps = [batch, c] if op.startswith("channel_head") else [batch, 1, h, w]
            rec = dict(site=f"{c}x{h}x{w}", op=op, maps=maps, fused_ms=None,
                       aten_ms=None, speedup=None, error=None, graph_error=None)
            try:
                nb = 4
                fused, aten = _head_calls(op, device, batch, h, w, gen, nb, c)
                tf, _ = _time(fused, nb, device, timing, rec)
                ta, _ = _time(aten, nb, device, timing, rec)
                rec.update(fused_ms=bu.median(tf), aten_ms=bu.median(ta))
                rec["speedup"] = rec["aten_ms"] / rec["fused_ms"]
            except Exception as e:  # noqa: BLE001  a failing head must not end the run
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                sys.stderr.write(f"\n[bench_kernels] {op} {rec['site']} failed:\n"
                                 f"{traceback.format_exc(limit=6)}\n")
            out.append(rec)
    return out


def count(sites="resnet50", configs=ISSUE4_CONFIGS, ops=OPS) -> int:
    return len(SITES[sites]) * len(configs) * len(ops)


def summarize(cases):
    out = {}
    for key in sorted({f"{c['dtype']}/{c['layout']}" for c in cases}):
        sel = [c for c in cases if f"{c['dtype']}/{c['layout']}" == key and c["frac_copy_bw"]]
        if not sel:
            continue
        fr = [c["frac_copy_bw"] for c in sel]
        weakest = min(sel, key=lambda c: c["frac_copy_bw"])
        ss = [c["frac_same_size_copy"] for c in sel if c.get("frac_same_size_copy")]
        out[key] = dict(cases=len(sel), min_frac=min(fr), mean_frac=sum(fr) / len(fr),
                        meeting_target=sum(1 for c in sel if c["meets_target"]),
                        weakest=weakest["id"],
                        min_frac_same_size=min(ss) if ss else None,
                        mean_frac_same_size=sum(ss) / len(ss) if ss else None,
                        meeting_target_same_size=sum(1 for v in ss if v >= TARGET))
    return out


def print_results(rec):
    rows = []
    for c in rec["cases"]:
        rows.append([c["op"], c["site"], f"{c['dtype']} {c['layout']}",
                     "ERR" if c["error"] else bu.fmt_ms(c["median_ms"]),
                     bu.fmt_bytes(c["bytes"]) if c["bytes"] else "-",
                     f"{c['gb_per_s']:.4g}" if c["gb_per_s"] else "-",
                     f"{100 * c['frac_copy_bw']:.3g}%" if c["frac_copy_bw"] else "-",
                     "" if c["meets_target"] is None else ("ok" if c["meets_target"] else "BELOW"),
                     bu.fmt_ms(c.get("copy_same_ms")),
                     f"{100 * c['frac_same_size_copy']:.3g}%" if c.get("frac_same_size_copy")
                     else "-"])
    floor = rec.get("launch_floor_ms")
    bu.print_table(["op", "site", "dtype layout", "median", "bytes", "GB/s", "%copy",
                    f">={int(100 * TARGET)}%", "copy same bytes", "%same-size copy"], rows,
                   title=f"each op alone, batch {rec['batch']}: its bytes / median time "
                         f"(copy bandwidth {rec['copy_gb_per_s']:.0f} GB/s; a launch alone "
                         f"{bu.fmt_ms(floor)})")
    heads = rec.get("heads") or []
    if heads:
        bu.print_table(["op", "site", "maps", "fused", "ATen ops", "speed-up"],
                       [[h.get("op", "spatial_head"), h["site"], "x".join(map(str, h["maps"])),
                         "ERR" if h["error"] else bu.fmt_ms(h["fused_ms"]),
                         "-" if h["error"] else bu.fmt_ms(h["aten_ms"]),
                         "-" if h["error"] else f"{h['speedup']:.2f}x"] for h in heads],
                       title="the heads (channel gate; spatial gate, forward and backward): the "
                             "fused kernels against the ATen ops they replaced")
    for k, s in rec["summary"].items():
        same = "" if s.get("mean_frac_same_size") is None else (
            f"; {s['meeting_target_same_size']}/{s['cases']} at >= {int(100 * TARGET)}% of a "
            f"same-size copy (mean {100 * s['mean_frac_same_size']:.3g}%)")
        print(f"  {k:22s} {s['meeting_target']}/{s['cases']} ops at >= {int(100 * TARGET)}% of "
              f"copy bw; min {100 * s['min_frac']:.3g}% ({s['weakest']}), "
              f"mean {100 * s['mean_frac']:.3g}%{same}")


def summarize_sweep(cases):
    """Per setting: the geometric mean of frac_copy_bw over the cases, and per op the best
    setting by that mean, the default's and each REFERENCE_TUNINGS setting's (reference_gmean,
    by label; None where the sweep lacks it); per case the best setting."""
    import math
    swept = [c for c in cases if c.get("sweep")]
    if not swept:
        return None
    keys = list(swept[0]["sweep"])

    def gmean(v):
        v = [x for x in v if x and x > 0]
        return math.exp(sum(map(math.log, v)) / len(v)) if v else None
    overall = {k: gmean([c["sweep"].get(k) for c in swept]) for k in keys}
    per_op = {}
    for op in OP_SETS["all"]:
        sel = [c for c in swept if c["op"] == op]
        if sel:
            means = {k: gmean([c["sweep"].get(k) for c in sel]) for k in keys}
            best = max(means, key=lambda k: means[k] or 0)
            per_op[op] = dict(best=best, best_gmean=means[best], default_gmean=means.get(
                tuning_key(DEFAULT_TUNING)), reference_gmean={
                    label: means.get(tuning_key(st)) for label, st in REFERENCE_TUNINGS.items()})
    per_case = {c["id"]: max(c["sweep"], key=lambda k: c["sweep"][k] or 0) for c in swept}
    return dict(settings=keys, gmean_frac=overall, per_op=per_op, best_per_case=per_case,
                cases_swept=len(swept), cases=len(cases))


def print_sweep(sw):
    default = tuning_key(DEFAULT_TUNING)
    print(f"\ntuning sweep ({'/'.join(TUNING_KNOBS)}; default {default}): geometric "
          f"mean of %copy over all cases")
    for k, v in sorted(sw["gmean_frac"].items(), key=lambda kv: -(kv[1] or 0)):
        print(f"  {k:>11s}  {100 * (v or 0):.3g}%{'   (default)' if k == default else ''}")
    print("per op, the best setting by that mean:")
    for op, r in sw["per_op"].items():
        refs = "".join(f", {label} {100 * v:.3g}%" for label, v in
                       (r.get("reference_gmean") or {}).items() if v)
        print(f"  {op:28s} {r['best']:>11s} {100 * r['best_gmean']:.3g}% (default "
              f"{100 * (r['default_gmean'] or 0):.3g}%{refs})")


def plot_axes(ax, rec):
    """Bars of frac_copy_bw per (site, config), one per op, and the target line."""
    groups = []
    for c in rec["cases"]:
        key = (c["site"], f"{c['dtype']} {c['layout']}")
        if key not in groups:
            groups.append(key)
    ops = [op for op in OP_SETS["all"] if any(c["op"] == op for c in rec["cases"])]
    bw = 0.8 / len(ops)
    for k, op in enumerate(ops):
        v = []
        for key in groups:
            m = [c for c in rec["cases"] if c["op"] == op and (c["site"], f"{c['dtype']} "
                                                                          f"{c['layout']}") == key]
            v.append(m[0]["frac_copy_bw"] or 0 if m else 0)
        ax.bar([i + (k - (len(ops) - 1) / 2) * bw for i in range(len(groups))], v, bw, label=op,
               color=f"C{k}")
    ax.axhline(TARGET, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{d}" for s, d in groups], fontsize=7)
    ax.set_ylabel("fraction of copy bw")
    ax.set_title(f"each op alone, batch {rec['batch']}: bytes / time as a fraction of the copy "
                 f"bandwidth (dashed: the {int(100 * TARGET)}% target)", fontsize=10)
    ax.legend(fontsize=7, ncol=4)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cuda, cuda:N or cpu")
    p.add_argument("--batch", type=int, default=None, help="default 64 (2 on the CPU)")
    p.add_argument("--sites", default=None, choices=sorted(SITES),
                   help="default resnet50 (tiny on the CPU)")
    p.add_argument("--sweep", action="store_true",
                   help="also time each op under every tuning setting of SWEEP "
                        "(torch.ops.cbam_fused_debug.set_tuning; needs the CUDA kernels): "
                        "the data to choose the launchers' defaults from")
    p.add_argument("--ops", default="issue4", choices=sorted(OP_SETS),
                   help="issue4: the 7 ops of the avg / max pools (default); all: also the lp / "
                        "lse pools' ops")
    p.add_argument("--configs", default=",".join(ISSUE4_CONFIGS),
                   help="dtype / layout configurations, comma-separated, of "
                        f"{', '.join(CONFIGS)}, or all (default: issue 4's, %(default)s)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="with --sweep: sweep the cases (site by site) until this much time has "
                        "passed, then measure the rest at the defaults only")
    p.add_argument("--json", default=None, help="write the record here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    ops = OP_SETS[args.ops]
    configs = tuple(CONFIGS) if args.configs == "all" else tuple(
        c.strip() for c in args.configs.split(",") if c.strip())
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        p.error(f"--configs: expected names of {', '.join(CONFIGS)} or all, got {args.configs!r}")
    device = bu.pick_device(args.device)
    cuda = device.type == "cuda"
    sites = args.sites or ("resnet50" if cuda else "tiny")
    batch = args.batch or (64 if cuda else 2)
    meta = bu.run_metadata(device, sys.argv if argv is None else ["bench_kernels.py"] + list(argv))
    print(f"bench_kernels: {meta['device'].get('name')} ({device}), torch {meta['torch']}")
    if not cuda:
        print(bu.CPU_NOTICE)
    warn = bu.fallback_warning(meta)
    if warn:
        print(warn)
    bar = bu.progress(count(sites, configs, ops), "bench_kernels", not args.no_progress)
    timing = None if cuda else dict(warmup=1, target_s=0.05, min_reps=2, max_reps=3)
    sweep = None
    if args.sweep:
        if not (cuda and meta.get("cbam_fused_native")):
            raise SystemExit("--sweep: needs a GPU and cbam_fused's own CUDA kernels")
        sweep = SWEEP
    rec = run(device, sites=sites, batch=batch, configs=configs, timing=timing, ops=ops,
              l2_bytes=meta["device"].get("l2_cache_bytes"), bar=bar, sweep=sweep,
              sweep_max_s=None if args.max_minutes is None else 60 * args.max_minutes)
    bar.close()
    rec["meta"] = meta
    if sweep:
        rec["sweep"] = summarize_sweep(rec["cases"])
    print()
    print_results(rec)
    if rec.get("sweep"):
        print_sweep(rec["sweep"])
    if args.json:
        bu.write_json(args.json, rec)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
