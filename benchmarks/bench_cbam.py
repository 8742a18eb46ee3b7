#!/usr/bin/env python
"""Layer benchmark: cbam_fused.CBAM against eager PyTorch and torch.compile (issue 5, DESIGN.md 7).

Peers, all in one process and one run, all with the same weights where the structure allows:
  official               the official code's structure (benchmarks/official_cbam.py), eager
  timm                   timm.layers.cbam.CbamModule (same hidden size), eager
  compile                torch.compile(official), default mode
  compile-max-autotune   torch.compile(official, mode="max-autotune-no-cudagraphs")
  cbam_fused             cbam_fused.CBAM loaded from the official module's state_dict

Modes: `fwd` (inference forward: eval(), no_grad) and `train` (training forward + backward:
train(), y = m(x), torch.autograd.grad(y, [x, *params], g), so dx and every parameter gradient
are computed and nothing accumulates between runs).

Shapes: the CBAM sites of ResNet-50 (C = 256, 512, 1024, 2048 at 56, 28, 14, 7) and
MobileNet-sized maps (C = 24, 32, 96, 320 at 56, 28, 14, 7), batches 32..256; float32 NCHW,
bfloat16 and float16 channels-last. Inputs are random normal, rotating among enough buffers that
together they are at least 3x the L2 cache.

Figures per case and peer: median time (CUDA events; perf_counter on the CPU), effective
bandwidth = pass-floor bytes / median time, where the floor (DESIGN.md section 3) is
  fwd:   2 x-sized passes (read x, write y)
  train: 5 x-sized passes (forward floor 2 + backward floor 3: read g, read x, write dx),
its fraction of the device-to-device copy bandwidth measured at the start of the same run, the
speed-up of cbam_fused over the peer (peer time / cbam_fused time), and the peak memory one step
allocates beyond its inputs (CUDA only).

JSON schema ("cbam_fused.bench_cbam/1"), top level:
  schema, schema_doc                 this schema's name and a description of every field
  meta                               date_utc, git_commit, git_dirty, host, python, torch, cuda,
                                     cudnn, timm, cbam_fused, device{type, name, capability,
                                     multiprocessors, total_memory_bytes, l2_cache_bytes, driver},
                                     cbam_fused_cuda_kernels{op: bool}, cbam_fused_native, argv
  settings                           device, dtypes, modes, batches, shape sets, peers, timing
  copy_bandwidth                     bytes_copied, bytes_moved, median_ms, gb_per_s, reps, method
  cases[]                            one per (shape, batch, dtype, mode):
      id, site, shape [N, C, H, W], batch, channels, height, width, dtype, layout, mode,
      x_bytes, floor_passes, floor_bytes, n_buffers, check{max_abs_diff_vs_official},
      peers{name: {median_ms, p10_ms, p90_ms, reps, eff_gb_per_s, frac_copy_bw,
                   peak_mem_bytes, speedup_of_fused, host_ms, graph_ms, graph_frac_copy_bw,
                   speedup_of_fused_graph, graph_error, error, skipped}}
  summary                            geomean speed-up of cbam_fused over each peer and its mean
                                     fraction of copy bandwidth, per (mode, dtype); the same
                                     from the CUDA-graph times (geomean_speedup_of_fused_graph,
                                     mean_graph_frac_copy_bw)
  kernels                            each cbam_fused op alone at the ResNet-50 sites, batch 64,
                                     fp32 NCHW and bf16 channels-last: bytes / time against the
                                     copy bandwidth (schema in benchmarks/bench_kernels.py); null
                                     when not run (--kernels off, the CPU's default)
  finished                           false while the run is going (the file is rewritten after
                                     every case), true at the end
  merged_from                        only in a --merge or --resume result: argv, date, commit,
                                     copy bandwidth and case count of each run joined
  resumed_cases                      only in a --resume result: the ids of the cases taken from
                                     the earlier run
"""
import argparse
import copy
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels  # noqa: E402
import bench_util as bu  # noqa: E402  (puts the repository root on sys.path)
import official_cbam  # noqa: E402

SCHEMA = "cbam_fused.bench_cbam/1"
SCHEMA_DOC = {
    "meta": "where and when: device, versions, git commit, whether cbam_fused runs its own CUDA "
            "kernels (cbam_fused_native) or the PyTorch fallback",
    "settings.tiles_also": "--tiles-also N: cbam_fused's CUDA-graph time again with the "
                           "launchers' tiles_per_sm at N (graph_ms_tiles_also); null without it",
    "settings.tiles_per_sm": "with --tiles-also: the launchers' tiles_per_sm of graph_ms (the "
                             "build's default; 0: each op's own, csrc/launchers/op_tuning.h); "
                             "null without it or without the CUDA kernels",
    "settings.kernels_previous": "--kernels-previous (on CUDA with the per-op section): each "
                                 "op timed again under today's defaults and under "
                                 "bench_kernels.PREVIOUS_TUNING (kernels.cases[].sweep, keyed by "
                                 "kernels.tuning_pair: [today's, before])",
    "settings.pdl_also": "--pdl-also: cbam_fused's CUDA-graph time again with programmatic "
                         "dependent launch (graph_ms_pdl); false without it",
    "settings.pass_order": "the tile order of cbam_fused's x-sized CUDA passes: 'alternate' "
                           "(by the pass before on the stream: launchers/common.h "
                           "next_pass_reversed), 'forward', or 'both' (graph_ms_forward_order)",
    "copy_bandwidth.gb_per_s": "device-to-device copy bandwidth of this run, bytes read + "
                               "written per second / 1e9",
    "cases[].floor_passes": "x-sized passes of the pass floor (DESIGN.md section 3): fwd 2 "
                            "(read x, write y); train 5 (fwd 2 + bwd 3: read g, read x, write dx)",
    "cases[].floor_bytes": "floor_passes * x_bytes",
    "cases[].peers[].median_ms": "median time of one run (fwd: forward; train: forward + "
                                 "backward), milliseconds",
    "cases[].peers[].eff_gb_per_s": "floor_bytes / median time / 1e9",
    "cases[].peers[].frac_copy_bw": "eff_gb_per_s / copy_bandwidth.gb_per_s",
    "cases[].peers[].speedup_of_fused": "this peer's median_ms / cbam_fused's median_ms "
                                        "(> 1: cbam_fused is faster)",
    "cases[].peers[].peak_mem_bytes": "peak memory allocated by one run beyond its inputs "
                                      "(CUDA only; null on the CPU)",
    "cases[].peers[].host_ms": "host (CPU) time one run takes to return without waiting for "
                               "the GPU (CUDA only): a peer whose host_ms is near its median_ms "
                               "is bound by its launches, not by the GPU",
    "cases[].peers[].graph_ms": "CUDA only, eager peers (official, timm, cbam_fused): the time "
                                "of one run from a CUDA graph of several runs, replayed (no host "
                                "work: what a GPU-bound program, or one captured in a graph, "
                                "sees); null for the torch.compile peers and on the CPU",
    "cases[].peers[].graph_frac_copy_bw": "floor_bytes / graph_ms / copy bandwidth",
    "cases[].peers[].speedup_of_fused_graph": "this peer's graph_ms / cbam_fused's graph_ms",
    "cases[].peers[].graph_ms_forward_order": "cbam_fused under --pass-order both: graph_ms "
                                              "with every x-sized pass from its first tile "
                                              "(graph_ms: alternating)",
    "summary.*.geomean_forward_over_alternate": "--pass-order both: the geometric mean over the "
                                                "cases of graph_ms_forward_order / graph_ms "
                                                "(> 1: alternating is faster)",
    "cases[].peers[].graph_ms_tiles_also": "cbam_fused under --tiles-also N: graph_ms with "
                                           "tiles_per_sm N (graph_ms: settings.tiles_per_sm)",
    "summary.*.geomean_tiles_also_over_default": "--tiles-also N: the geometric mean over the "
                                                 "cases of graph_ms_tiles_also / graph_ms "
                                                 "(> 1: the default tiling is faster)",
    "cases[].peers[].graph_ms_pdl": "cbam_fused under --pdl-also: graph_ms with programmatic "
                                    "dependent launch (the set_pdl debug op; graph_ms: without)",
    "summary.*.geomean_pdl_over_default": "--pdl-also: the geometric mean over the cases of "
                                          "graph_ms_pdl / graph_ms (< 1: programmatic dependent "
                                          "launch is faster)",
    "cases[].peers[].graph_error": "why the graph timing failed, if it did (median_ms stands)",
    "cases[].peers[].error": "why the peer failed, if it did",
    "cases[].peers[].skipped": "why the peer was not run, if it was not (e.g. time budget)",
    "cases[].check.max_abs_diff_vs_official": "fwd only: max |y_peer - y_official| on one input "
                                              "(timm is a different module and not compared)",
}

PEERS = ("official", "timm", "compile", "compile-max-autotune", "cbam_fused")
FUSED = "cbam_fused"
SHAPE_SETS = {
    "resnet50": [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)],
    "mobilenet": [(24, 56, 56), (32, 28, 28), (96, 14, 14), (320, 7, 7)],
    # CPU: small maps of the same kinds (CPU figures only check the benchmark works)
    "cpu": [(64, 14, 14), (256, 7, 7), (24, 28, 28)],
    "tiny": [(32, 8, 8), (64, 4, 4)],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default=None,
                   help="comma list of float32,bfloat16,float16 or 'all' (default: all on CUDA, "
                        "float32 on the CPU). float32 runs NCHW, the 16-bit dtypes channels-last")
    p.add_argument("--modes", default="fwd,train", help="comma list of fwd,train")
    p.add_argument("--batch", default=None,
                   help="comma list of batch sizes (default: 128,32,256 on CUDA, 64 with --quick; "
                        "2 on the CPU)")
    p.add_argument("--shapes", default=None,
                   help="comma list of shape sets (resnet50, mobilenet, cpu, tiny) or C:H:W "
                        "items (default: resnet50,mobilenet on CUDA, resnet50 with --quick; "
                        "cpu on the CPU, tiny with --quick)")
    p.add_argument("--peers", default=None,
                   help=f"comma list of {','.join(PEERS)} or 'all' (default: all on CUDA; on the "
                        "CPU all but the torch.compile peers, which take ~10-30 s per case to "
                        "compile there)")
    p.add_argument("--quick", action="store_true",
                   help="few shapes, one batch, fewer runs (CUDA: resnet50 sites, batch 64, "
                        "bfloat16; CPU: two tiny shapes)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per peer (default: adaptive)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per peer")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget: once 40%% is spent the max-autotune peer is skipped, once "
                        "75%% is the default torch.compile peer, once all is the remaining cases "
                        "(all recorded as skipped)")
    p.add_argument("--kernels", default="auto", choices=("auto", "on", "off"),
                   help="also time each cbam_fused op alone (benchmarks/bench_kernels.py): "
                        "auto = on CUDA (ResNet-50 sites, batch 64), off on the CPU (on: tiny "
                        "shapes there)")
    p.add_argument("--pool-types", default="avg,max",
                   help="the channel gate's pools, comma list of avg,max,lp,lse (the official "
                        "code's pool_types; default avg,max). With lp or lse the timm peer is "
                        "left out (timm has neither)")
    p.add_argument("--pass-order", default="alternate", choices=("alternate", "forward", "both"),
                   help="the tile order of cbam_fused's x-sized passes on CUDA (the "
                        "set_pass_order debug op): 'alternate' (the default: a pass over the "
                        "tensors of the pass before it on the stream in the reverse order of "
                        "that one, so that it starts on what is still in L2, a pass over other "
                        "tensors from its last tile), 'forward' (every pass from its first "
                        "tile), or 'both' (alternate, and cbam_fused's CUDA-graph time again "
                        "with every pass forward: graph_ms_forward_order)")
    p.add_argument("--tiles-also", type=int, default=None, metavar="N",
                   help="also time cbam_fused's CUDA graph with the launchers' tiles_per_sm at N "
                        "for every op (set_tuning; the default is each op's own, "
                        "csrc/launchers/op_tuning.h, else 32: a pass over x in a few waves, so the "
                        "next one, in the reverse order, meets in L2 what it touched last; 8, "
                        "the default before 2026-11-27, ran one wave over all of x): "
                        "graph_ms_tiles_also")
    p.add_argument("--kernels-previous", action="store_true",
                   help="in the per-op section (--kernels), also time each op under the "
                        "launchers' defaults before each op had its own "
                        "(bench_kernels.PREVIOUS_TUNING, the same for every op) and again under "
                        "today's, in the same graphs: kernels.cases[].sweep, kernels.sweep, "
                        "kernels.tuning_pair (CUDA kernels only)")
    p.add_argument("--pdl-also", action="store_true",
                   help="also time cbam_fused's CUDA graph with programmatic dependent launch "
                        "(the set_pdl debug op: each kernel launches while the one before it "
                        "runs its last wave and waits for its end at its first statement; "
                        "sm_90+, off by default): graph_ms_pdl")
    p.add_argument("--json", default=None, help="write the results here (schema in --help)")
    p.add_argument("--plot", default=None, help="write a PNG of speed-ups and bandwidth fractions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: join the results of earlier runs (e.g. the GPU protocol's "
                        "two parts) into one, a case measured twice taken from the later file, "
                        "and write it with --json / --plot")
    p.add_argument("--resume", default=None, metavar="JSON",
                   help="an earlier run's results on a GPU of the same name, with the same torch "
                        "and cbam_fused sources (meta.sources_sha256): its cases whose peers "
                        "were all measured (none skipped) are kept, not run again, and the rest "
                        "of the grid is measured; the JSON written holds both. A grid too long "
                        "for one lease of the GPU accumulates over several. Another device, "
                        "torch or source tree: the file is ignored (with a notice)")
    return p.parse_args(argv)


PASS_ORDERS = ("forward", "alternate")  # the set_pass_order debug op's modes 0 and 1


def set_pass_order(order):
    """Sets the tile order of cbam_fused's CUDA passes (set_pass_order debug op of the CUDA
    build); returns the order before, or None where the build has no CUDA kernels (its passes
    are the PyTorch fallback's)."""
    try:
        op = torch.ops.cbam_fused_debug.set_pass_order
    except (AttributeError, RuntimeError):
        print(f"note: --pass-order {order}: this build has no CUDA kernels", file=sys.stderr)
        return None
    return PASS_ORDERS[op(PASS_ORDERS.index(order))]


def current_tiles_per_sm():
    """The launchers' tiles_per_sm now (set_tuning debug op of the CUDA build; None without)."""
    old = set_tiles_per_sm(1, quiet=True)
    if old is not None:
        set_tiles_per_sm(old, quiet=True)
    return old


def set_tiles_per_sm(tiles, quiet=False):
    """Sets the launchers' tiles_per_sm (set_tuning debug op of the CUDA build, the other knobs
    kept); returns the previous value, or None where the build has no CUDA kernels."""
    if tiles is None:
        return None
    try:
        op = torch.ops.cbam_fused_debug.set_tuning
    except (AttributeError, RuntimeError):
        if not quiet:
            print(f"note: --tiles-also {tiles}: this build has no CUDA kernels", file=sys.stderr)
        return None
    return bu.set_tiles_per_sm(op, tiles)[0]


def set_pdl(mode):
    """Sets programmatic dependent launch (set_pdl debug op of the CUDA build); returns the
    previous mode, or None where the build has no CUDA kernels."""
    try:
        op = torch.ops.cbam_fused_debug.set_pdl
    except (AttributeError, RuntimeError):
        print("note: --pdl-also: this build has no CUDA kernels", file=sys.stderr)
        return None
    return op(mode)


# cbam_fused's graph timed again under another setting: (its record key, the summary's key of
# the geometric mean of that time over graph_ms)
ALSO_KEYS = (("graph_ms_forward_order", "geomean_forward_over_alternate"),
             ("graph_ms_tiles_also", "geomean_tiles_also_over_default"),
             ("graph_ms_pdl", "geomean_pdl_over_default"))


def also_settings(st):
    """(record key, setter, value) of each other setting the run times cbam_fused's graph under
    (--pass-order both, --tiles-also N, --pdl-also); a setter returns the value before, or None
    where the build has no CUDA kernels."""
    out = []
    if st.get("pass_order") == "both":
        out.append(("graph_ms_forward_order", set_pass_order, "forward"))
    if st.get("tiles_also"):
        out.append(("graph_ms_tiles_also", set_tiles_per_sm, st["tiles_also"]))
    if st.get("pdl_also"):
        out.append(("graph_ms_pdl", set_pdl, 1))
    return out


def _csv(s):
    return [t.strip() for t in s.split(",") if t.strip()]


def settings_from(args, device):
    cuda = device.type == "cuda"
    if args.dtype in (None, ""):
        dtypes = (["bfloat16"] if args.quick else ["bfloat16", "float32", "float16"]) if cuda \
            else ["float32"]
    elif args.dtype == "all":
        dtypes = ["bfloat16", "float32", "float16"]
    else:
        dtypes = _csv(args.dtype)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: unknown dtype {d!r} (expected {', '.join(DTYPES)})")
    modes = _csv(args.modes)
    for m in modes:
        if m not in ("fwd", "train"):
            raise SystemExit(f"--modes: unknown mode {m!r} (expected fwd, train)")
    if args.tiles_also is not None and not 1 <= args.tiles_also <= 64:
        raise SystemExit(f"--tiles-also: expected tiles per SM in [1, 64], got {args.tiles_also}")
    if args.batch:
        batches = [int(b) for b in _csv(args.batch)]
    else:
        batches = ([64] if args.quick else [128, 32, 256]) if cuda else [2]
    if args.shapes:
        shape_items = _csv(args.shapes)
    else:
        shape_items = (["resnet50"] if args.quick else ["resnet50", "mobilenet"]) if cuda else \
            (["tiny"] if args.quick else ["cpu"])
    shapes = []  # (site label, C, H, W)
    for item in shape_items:
        if item in SHAPE_SETS:
            shapes += [(item, *s) for s in SHAPE_SETS[item]]
        else:
            try:
                c, h, w = (int(v) for v in item.split(":"))
            except ValueError:
                raise SystemExit(f"--shapes: {item!r} is neither a shape set "
                                 f"({', '.join(SHAPE_SETS)}) nor C:H:W") from None
            shapes.append(("custom", c, h, w))
    if args.peers in (None, ""):
        peers = list(PEERS) if cuda else [p for p in PEERS if not p.startswith("compile")]
    elif args.peers == "all":
        peers = list(PEERS)
    else:
        peers = _csv(args.peers)
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"--peers: unknown peer {p!r} (expected {', '.join(PEERS)})")
    if FUSED not in peers:
        peers.append(FUSED)
    peers = [p for p in PEERS if p in peers]  # fixed order, cbam_fused last
    peers = bu.drop_missing(peers, {"timm": "timm"}, "peer")
    pool_types = _csv(args.pool_types)
    import cbam_fused
    try:
        cbam_fused.pools_from_types(pool_types)
    except ValueError as e:
        raise SystemExit(f"--pool-types: {e}") from None
    if set(pool_types) - {"avg", "max"} and "timm" in peers:
        print(f"note: peer 'timm' skipped: timm's CBAM has no {'/'.join(pool_types)} pools",
              file=sys.stderr)
        peers.remove("timm")
    if cuda:
        timing = dict(method="cuda_events", warmup=3 if args.quick else 10,
                      target_s=0.15 if args.quick else 0.25, min_reps=args.reps or 10,
                      max_reps=args.reps or (50 if args.quick else 200),
                      graph_reps=5 if args.quick else 10)
    else:
        timing = dict(method="perf_counter", warmup=3, target_s=0.3,
                      min_reps=args.reps or 3, max_reps=args.reps or (5 if args.quick else 20))
    if args.warmup is not None:
        timing["warmup"] = args.warmup
    kernels = args.kernels == "on" or (args.kernels == "auto" and cuda)
    if args.kernels_previous and not (kernels and cuda):
        print("note: --kernels-previous: the per-op section's other tuning is timed on CUDA "
              "only (with the CUDA kernels); not timed here", file=sys.stderr)
    return dict(device=str(device), dtypes=dtypes, modes=modes, batches=batches, shapes=shapes,
                peers=peers, timing=timing, quick=args.quick, max_minutes=args.max_minutes,
                kernels=kernels, pool_types=pool_types, pass_order=args.pass_order,
                tiles_also=args.tiles_also,
                tiles_per_sm=current_tiles_per_sm() if args.tiles_also else None,
                pdl_also=args.pdl_also,
                kernels_previous=bool(args.kernels_previous and kernels and cuda))


def make_cases(st):
    """(batch, dtype, shape, mode), most informative first: the first batch, the first dtype,
    ResNet-50 sites, then the rest, so a time budget cuts the least important cases."""
    cases = []
    for batch in st["batches"]:
        for dt in st["dtypes"]:
            for site, c, h, w in st["shapes"]:
                for mode in st["modes"]:
                    cases.append(dict(site=site, batch=batch, channels=c, height=h, width=w,
                                      dtype=dt, mode=mode))
    return cases


def build_peers(names, c, device, dtype, pool_types=("avg", "max")):
    """The peer modules for one case, sharing the official module's weights where the structure
    allows (official, compile peers, cbam_fused); timm gets its own random weights."""
    torch._dynamo.reset()  # fresh compile caches: recompiles per case never hit the limit
    official = official_cbam.CBAM(c, 16, list(pool_types)).to(device=device, dtype=dtype)
    mods = {}
    for name in names:
        if name == "official":
            mods[name] = official
        elif name == "timm":
            from timm.layers.cbam import CbamModule
            mods[name] = CbamModule(c, rd_channels=c // 16).to(device=device, dtype=dtype)
        elif name == "compile":
            mods[name] = torch.compile(copy.deepcopy(official))
        elif name == "compile-max-autotune":
            mods[name] = torch.compile(copy.deepcopy(official), mode="max-autotune-no-cudagraphs")
        elif name == FUSED:
            import cbam_fused
            m = cbam_fused.CBAM(c, 16, list(pool_types))
            m.load_state_dict(official.state_dict())
            mods[name] = m.to(device=device, dtype=dtype)
    return mods


def make_inputs(case, device, dtype, l2_bytes, seed):
    n, c, h, w = case["batch"], case["channels"], case["height"], case["width"]
    layout = torch.contiguous_format if dtype == torch.float32 else torch.channels_last
    elem = torch.tensor([], dtype=dtype).element_size()
    x_bytes = n * c * h * w * elem
    n_buf = bu.n_rotating_buffers(device, x_bytes, x_bytes * (2 if case["mode"] == "train" else 1),
                                  l2_bytes, cap=64, mem_share=4)
    g = torch.Generator(device=device).manual_seed(seed)  # random data, drawn on the device
    xs, gs = [], []
    for _ in range(n_buf):
        x = torch.randn((n, c, h, w), generator=g, device=device, dtype=dtype)
        xs.append(x.contiguous(memory_format=layout))
        if case["mode"] == "train":
            gr = torch.randn((n, c, h, w), generator=g, device=device, dtype=dtype)
            gs.append(gr.contiguous(memory_format=layout))
            xs[-1].requires_grad_(True)
    return xs, gs, x_bytes, "nchw" if dtype == torch.float32 else "channels_last"


def step_fn(mod, mode, xs, gs):
    params = [p for p in mod.parameters() if p.requires_grad]
    nb = len(xs)
    if mode == "fwd":
        mod.eval()

        def run(i):
            with torch.no_grad():
                return mod(xs[i % nb])
    else:
        mod.train()

        def run(i):
            x = xs[i % nb]
            y = mod(x)
            return torch.autograd.grad(y, [x] + params, gs[i % nb])
    return run


def host_time(run, device, n=10):
    """Host milliseconds per run, the GPU left to catch up afterwards (CUDA only)."""
    if device.type != "cuda":
        return None
    bu.sync(device)
    t = time.perf_counter()
    for i in range(n):
        run(i)
    host = (time.perf_counter() - t) / n * 1e3
    bu.sync(device)
    return host


def graph_time(run, device, name, n_buffers, reps):
    """Median milliseconds of one run inside a CUDA graph of min(n_buffers, 8) runs over the
    rotating inputs, replayed `reps` times (bench_util.time_graph): the GPU's time without the
    host's. None on the CPU and for the torch.compile peers (a compiled function is not captured
    here: it may recompile or sync on its first captured call)."""
    if device.type != "cuda" or name.startswith("compile"):
        return None
    return bu.median(bu.time_graph(run, device, calls=min(n_buffers, 8), reps=reps))


def peak_memory(run, device):
    if device.type != "cuda":
        return None
    bu.sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = run(0)
    bu.sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def case_id(case) -> str:
    return (f"{case['site']}-{case['channels']}x{case['height']}x{case['width']}-"
            f"b{case['batch']}-{SHORT[case['dtype']]}-{case['mode']}")


def complete_cases(res, peers):
    """{id: case} of the cases in an earlier result whose every peer in `peers` was measured or
    failed (none skipped or absent): what --resume keeps."""
    out = {}
    for c in res.get("cases", []):
        ps = c.get("peers", {})
        if all(p in ps and not ps[p].get("skipped") and (ps[p].get("median_ms") or
                                                          ps[p].get("error")) for p in peers):
            out[c["id"]] = c
    return out


def bench_case(case, st, device, copy_gbps, l2_bytes, budget, bar, seed):
    dtype = DTYPES[case["dtype"]]
    xs, gs, x_bytes, layout = make_inputs(case, device, dtype, l2_bytes, seed)
    passes = 2 if case["mode"] == "fwd" else 5
    rec = dict(id=case_id(case),
               site=case["site"], shape=[case["batch"], case["channels"], case["height"],
                                        case["width"]],
               batch=case["batch"], channels=case["channels"], height=case["height"],
               width=case["width"], dtype=case["dtype"], layout=layout, mode=case["mode"],
               x_bytes=x_bytes, floor_passes=passes, floor_bytes=passes * x_bytes,
               n_buffers=len(xs), check={}, peers={})
    mods = build_peers(st["peers"], case["channels"], device, dtype, st["pool_types"])
    tm = st["timing"]
    ref_y = None
    for name in st["peers"]:
        r = empty_peer()
        rec["peers"][name] = r
        bar.set_postfix_str(f"{rec['id']} {name}", refresh=False)
        # max-autotune compiles slowest: it runs while 40% of the budget is left unspent, the
        # default compile while 25% is; the cases come most informative first
        if (name == "compile-max-autotune" and budget.tight(0.4)) or \
                (name == "compile" and budget.tight(0.75)):
            r["skipped"] = "time budget (--max-minutes): torch.compile peers skipped"
            bar.update(1)
            continue
        try:
            run = step_fn(mods[name], case["mode"], xs, gs)
            t0 = time.perf_counter()
            out = run(0)  # first call: compiles the torch.compile peers
            bu.sync(device)
            r["first_call_s"] = round(time.perf_counter() - t0, 3)
            if case["mode"] == "fwd" and name != "timm":
                if name == "official":
                    ref_y = out.float()
                elif ref_y is not None:
                    rec["check"][f"max_abs_diff_vs_official[{name}]"] = float(
                        (out.float() - ref_y).abs().max())
            del out
            reps = bu.reps_for(run, device, tm["target_s"], tm["min_reps"], tm["max_reps"])
            times = bu.time_runs(run, device, warmup=tm["warmup"], reps=reps,
                                 min_warmup_s=0.02 if device.type == "cuda" else 0.05)
            med = bu.median(times)
            r.update(median_ms=med, p10_ms=bu.quantile(times, 0.1),
                     p90_ms=bu.quantile(times, 0.9), reps=reps)
            r["eff_gb_per_s"] = rec["floor_bytes"] / (med * 1e-3) / 1e9
            r["frac_copy_bw"] = r["eff_gb_per_s"] / copy_gbps if copy_gbps else None
            r["peak_mem_bytes"] = peak_memory(run, device)
            r["host_ms"] = host_time(run, device)
            try:
                r["graph_ms"] = graph_time(run, device, name, len(xs), tm.get("graph_reps", 10))
            except Exception as e:  # noqa: BLE001  (the eager timing stands)
                msg = str(e).splitlines()[0] if str(e) else ""
                r["graph_error"] = f"{type(e).__name__}: {msg}"[:300]
            if r["graph_ms"]:
                r["graph_frac_copy_bw"] = (rec["floor_bytes"] / (r["graph_ms"] * 1e-3) / 1e9
                                           / copy_gbps if copy_gbps else None)
                for key, setter, value in also_settings(st) if name == FUSED else ():
                    old = setter(value)
                    if old is None:  # (no CUDA kernels: no such setting)
                        continue
                    try:
                        r[key] = graph_time(run, device, name, len(xs), tm.get("graph_reps", 10))
                    finally:
                        setter(old)
        except Exception as e:  # noqa: BLE001  (one peer failing must not end the run)
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            sys.stderr.write(f"\n[bench_cbam] {rec['id']} {name} failed:\n"
                             f"{traceback.format_exc(limit=6)}\n")
        bar.update(1)
    fused = rec["peers"][FUSED]["median_ms"]
    fused_graph = rec["peers"][FUSED].get("graph_ms")
    for r in rec["peers"].values():
        if fused and r["median_ms"]:
            r["speedup_of_fused"] = r["median_ms"] / fused
        if fused_graph and r.get("graph_ms"):
            r["speedup_of_fused_graph"] = r["graph_ms"] / fused_graph
    del mods, xs, gs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def summarize(cases, peers):
    out = {}
    for mode in sorted({c["mode"] for c in cases}):
        for dt in sorted({c["dtype"] for c in cases}):
            sel = [c for c in cases if c["mode"] == mode and c["dtype"] == dt]
            if not sel:
                continue
            s = {"cases": len(sel), "geomean_speedup_of_fused": {}, "mean_frac_copy_bw": {},
                 "geomean_speedup_of_fused_graph": {}, "mean_graph_frac_copy_bw": {}}
            for p in peers:
                for sk, fk, key in (("speedup_of_fused", "frac_copy_bw", ""),
                                    ("speedup_of_fused_graph", "graph_frac_copy_bw", "_graph")):
                    sp = [c["peers"][p].get(sk) for c in sel if p in c["peers"]]
                    fr = [c["peers"][p].get(fk) for c in sel if p in c["peers"]
                          and c["peers"][p].get(fk) is not None]
                    if p != FUSED:
                        s[f"geomean_speedup_of_fused{key}"][p] = bu.geomean(
                            [v for v in sp if v])
                    s["mean_graph_frac_copy_bw" if key else "mean_frac_copy_bw"][p] = \
                        sum(fr) / len(fr) if fr else None
            for key, skey in ALSO_KEYS:
                ratios = [f[key] / f["graph_ms"] for f in (c["peers"].get(FUSED, {}) for c in sel)
                          if f.get(key) and f.get("graph_ms")]
                if ratios:
                    s[skey] = bu.geomean(ratios)
            out[f"{mode}/{dt}"] = s
    return out


def empty_peer(skipped=None):
    return dict(median_ms=None, p10_ms=None, p90_ms=None, reps=0, eff_gb_per_s=None,
                frac_copy_bw=None, peak_mem_bytes=None, speedup_of_fused=None, host_ms=None,
                graph_ms=None, graph_frac_copy_bw=None, speedup_of_fused_graph=None,
                graph_error=None, error=None, skipped=skipped)


def merge_runs(runs):
    """One result from several runs' results (same schema): the union of their cases (a case id
    measured twice is taken from the later run), peers a run did not have recorded as skipped,
    the settings' lists joined, the per-op section from the last run that has one, the summary
    recomputed. Each case keeps the figures of its own run (its speed-ups and copy-bandwidth
    fraction come from one process); `merged_from` lists the runs."""
    if not runs:
        raise ValueError("merge_runs: no runs")
    for r in runs:
        if r.get("schema") != SCHEMA:
            raise ValueError(f"merge_runs: schema {r.get('schema')!r}, expected {SCHEMA!r}")
    out = copy.deepcopy(runs[-1])
    st = out["settings"]
    peers = [p for p in PEERS if any(p in r["settings"]["peers"] for r in runs)]
    cases = {}
    for r in runs:
        for c in r["cases"]:
            cases.pop(c["id"], None)
            cases[c["id"]] = copy.deepcopy(c)
    for c in cases.values():
        for p in peers:
            c["peers"].setdefault(p, empty_peer("not a peer of the run that measured this case"))
    st["peers"] = peers
    for key in ("dtypes", "modes", "batches", "shapes"):
        seen = []
        for r in runs:
            for v in r["settings"].get(key, []):
                if v not in seen:
                    seen.append(v)
        st[key] = seen
    out["cases"] = list(cases.values())
    out["summary"] = summarize(out["cases"], peers)
    out["kernels"] = next((r["kernels"] for r in reversed(runs) if r.get("kernels")), None)
    out["cases_skipped"] = sum(r.get("cases_skipped") or 0 for r in runs)
    out["finished"] = all(r.get("finished") for r in runs)
    out["meta"]["cbam_fused_native"] = all(r["meta"].get("cbam_fused_native") for r in runs)
    out["merged_from"] = [dict(argv=r["meta"].get("argv"), date_utc=r["meta"].get("date_utc"),
                               git_commit=r["meta"].get("git_commit"),
                               copy_gb_per_s=r["copy_bandwidth"].get("gb_per_s"),
                               cases=len(r["cases"])) for r in runs]
    return out


def print_results(res):
    peers = res["settings"]["peers"]
    others = [p for p in peers if p != FUSED]
    headers = ["case"] + [f"{p} " for p in peers] + ["fused host", "fused graph", "fused GB/s",
                                                     "fused %copy"] + [f"x{p}" for p in others]
    rows = []
    for c in res["cases"]:
        pr = c["peers"]
        row = [c["id"]]
        for p in peers:
            r = pr[p]
            row.append("ERR" if r["error"] else "skip" if r["skipped"] else bu.fmt_ms(r["median_ms"]))
        f = pr[FUSED]
        row.append(bu.fmt_ms(f["host_ms"]) if f.get("host_ms") else "-")
        row.append(bu.fmt_ms(f["graph_ms"]) if f.get("graph_ms") else "-")
        row.append(f"{f['eff_gb_per_s']:.3g}" if f["eff_gb_per_s"] else "-")
        row.append(f"{100 * f['frac_copy_bw']:.2g}%" if f["frac_copy_bw"] else "-")
        for p in others:
            s = pr[p]["speedup_of_fused"]
            row.append(f"{s:.2f}x" if s else "-")
        rows.append(row)
    bu.print_table(headers, rows, title="median time per run; fused host = its host time per "
                                        "run (launch-bound when near its median); fused graph "
                                        "= its time inside a CUDA graph (no host work); "
                                        "xPEER = speed-up of cbam_fused "
                                        "over PEER (PEER time / cbam_fused time)")
    mem_rows = []
    for c in res["cases"]:
        if c["mode"] == "train" and any(r["peak_mem_bytes"] for r in c["peers"].values()):
            mem_rows.append([c["id"]] + [bu.fmt_bytes(c["peers"][p]["peak_mem_bytes"])
                                         for p in peers])
    if mem_rows:
        bu.print_table(["case"] + peers, mem_rows,
                       title="peak memory of one training step beyond its inputs")
    print("\nsummary (geomean speed-up of cbam_fused over each peer; cbam_fused mean fraction "
          "of copy bandwidth):")
    for k, s in res["summary"].items():
        sp = ", ".join(f"{p} {v:.2f}x" for p, v in s["geomean_speedup_of_fused"].items() if v)
        fr = s["mean_frac_copy_bw"].get(FUSED)
        print(f"  {k:16s} {sp or '-'}; cbam_fused {100 * fr:.2g}% of copy bw" if fr else
              f"  {k:16s} {sp or '-'}")
        gsp = ", ".join(f"{p} {v:.2f}x" for p, v in
                        (s.get("geomean_speedup_of_fused_graph") or {}).items() if v)
        gfr = (s.get("mean_graph_frac_copy_bw") or {}).get(FUSED)
        if gsp or gfr:
            print(f"  {k:16s} in CUDA graphs: {gsp or '-'}"
                  + (f"; cbam_fused {100 * gfr:.2g}% of copy bw" if gfr else ""))
        if s.get("geomean_forward_over_alternate"):
            print(f"  {k:16s} cbam_fused in CUDA graphs, every pass forward / alternating: "
                  f"{s['geomean_forward_over_alternate']:.3f}x the time")
    errs = [(c["id"], p, r["error"]) for c in res["cases"] for p, r in c["peers"].items()
            if r["error"]]
    for cid, p, e in errs[:20]:
        print(f"  ERROR {cid} {p}: {e}")
    skipped = sum(1 for c in res["cases"] for r in c["peers"].values() if r["skipped"])
    if skipped:
        print(f"  {skipped} peer runs skipped (time budget)")
    if res.get("cases_skipped"):
        print(f"  {res['cases_skipped']} cases skipped (time budget)")
    if res.get("kernels"):
        print()
        bench_kernels.print_results(res["kernels"])


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = res["settings"]["peers"]
    others = [p for p in peers if p != FUSED]
    modes = [m for m in ("fwd", "train") if any(c["mode"] == m for c in res["cases"])] or ["fwd"]
    ncase = max(1, max(sum(1 for c in res["cases"] if c["mode"] == m) for m in modes))
    width = min(48.0, max(10.0, 0.3 * ncase * max(1.0, len(peers) / 3) + 3))
    rotate = 90 if ncase > 14 else 0
    kern = res.get("kernels")
    nrows = 2 * len(modes) + (1 if kern else 0)
    fig, axes = plt.subplots(nrows, 1, figsize=(width, 4.4 * nrows), squeeze=False)
    if kern:
        bench_kernels.plot_axes(axes[-1][0], kern)
    colors = {p: f"C{i}" for i, p in enumerate(PEERS)}
    for row, mode in enumerate(modes):
        cs = [c for c in res["cases"] if c["mode"] == mode]
        labels = [f"{c['channels']}x{c['height']}x{c['width']}" +
                  (" " if rotate else "\n") + f"b{c['batch']} {SHORT[c['dtype']]}" for c in cs]
        xs = range(len(cs))
        ax = axes[2 * row][0]
        bw = 0.8 / max(1, len(others))
        for k, p in enumerate(others):
            v = [c["peers"][p]["speedup_of_fused"] or float("nan") for c in cs]
            ax.bar([x + (k - (len(others) - 1) / 2) * bw for x in xs], v, bw, label=p,
                   color=colors[p])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{mode}: speed-up of cbam_fused over each peer (peer time / cbam_fused "
                     f"time; > 1: cbam_fused faster)", fontsize=10)
        ax.set_ylabel("speed-up (x, log)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7, rotation=rotate)
        ax.set_xlim(-0.6, len(cs) - 0.4)
        ax.legend(fontsize=8)
        ax = axes[2 * row + 1][0]
        bw = 0.8 / max(1, len(peers))
        for k, p in enumerate(peers):
            v = [c["peers"][p]["frac_copy_bw"] or 0 for c in cs]
            ax.bar([x + (k - (len(peers) - 1) / 2) * bw for x in xs], v, bw, label=p,
                   color=colors[p])
        if max([c["peers"][p]["frac_copy_bw"] or 0 for c in cs for p in peers] + [0]) > 0.4:
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(f"{mode}: pass-floor bytes / time as a fraction of the copy bandwidth "
                     f"({res['copy_bandwidth']['gb_per_s']:.0f} GB/s measured in this run)",
                     fontsize=10)
        ax.set_ylabel("fraction of copy bw")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7, rotation=rotate)
        ax.set_xlim(-0.6, len(cs) - 0.4)
        ax.legend(fontsize=8)
    meta = res["meta"]
    note = "" if meta["cbam_fused_native"] else \
        ("  [CPU: not the product's purpose]" if meta["device"]["type"] == "cpu"
         else "  [cbam_fused: PyTorch fallback, no CUDA kernels]")
    fig.suptitle(f"cbam_fused layer benchmark - {meta['device'].get('name')} - torch "
                 f"{meta['torch']} - {meta['date_utc'][:10]} - {str(meta['git_commit'])[:10]}"
                 f"{note}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / fig.get_figheight()))
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        import json
        runs = []
        for path in args.merge:
            with open(path) as f:
                runs.append(json.load(f))
        try:
            res = merge_runs(runs)
        except ValueError as e:
            raise SystemExit(f"--merge: {e}") from None
        print_results(res)
        if args.json:
            bu.write_json(args.json, res)
            print(f"wrote {args.json}")
        if args.plot:
            plot(res, args.plot)
            print(f"wrote {args.plot}")
        return 0
    device = bu.pick_device(args.device)
    st = settings_from(args, device)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
    meta = bu.run_metadata(device, sys.argv if argv is None else ["bench_cbam.py"] + list(argv))
    print(f"bench_cbam: {meta['device'].get('name')} ({device}), torch {meta['torch']}, "
          f"CUDA {meta['cuda']}, commit {str(meta['git_commit'])[:12]}")
    if device.type == "cpu":
        print(bu.CPU_NOTICE)
    warn = bu.fallback_warning(meta)
    if warn:
        print(warn)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        set_pass_order("forward" if st["pass_order"] == "forward" else "alternate")
    cb = bu.copy_bandwidth(device)
    print(f"copy bandwidth: {cb['gb_per_s']:.1f} GB/s (read + write, {bu.fmt_bytes(cb['bytes_copied'])} "
          f"copied, median of {cb['reps']})")
    l2 = meta["device"].get("l2_cache_bytes")
    cases = make_cases(st)
    res = dict(schema=SCHEMA, schema_doc=SCHEMA_DOC, meta=meta,
               settings={**st, "shapes": [list(s) for s in st["shapes"]]},
               copy_bandwidth=cb, cases=[], summary={}, cases_skipped=0, kernels=None,
               finished=False)
    budget = bu.Budget(args.max_minutes)
    earlier = bu.load_resume(args.resume, SCHEMA, meta) if args.resume else None
    grid_ids = {case_id(k) for k in cases}
    kept = {cid: c for cid, c in (complete_cases(earlier, st["peers"]) if earlier else {}).items()
            if cid in grid_ids}
    if args.resume and earlier:
        print(f"--resume {args.resume}: {len(kept)} of the {len(cases)} cases kept from the run "
              f"of {earlier['meta'].get('date_utc')}; measuring the other {len(cases) - len(kept)}")
        cases = [k for k in cases if case_id(k) not in kept]

    def result():  # what is written: this run, joined to the cases kept from the earlier one
        if not kept:
            return res
        old = dict(earlier, cases=list(kept.values()))
        out = merge_runs([old, res])
        out["resumed_cases"] = sorted(kept)
        out["cases_skipped"] = res["cases_skipped"]  # the earlier run's skips are measured now
        return out

    cuda = device.type == "cuda"
    ksites = "resnet50" if cuda else "tiny"
    nk = bench_kernels.count(ksites) if st["kernels"] else 0
    bar = bu.progress(nk + len(cases) * len(st["peers"]), "bench_cbam", not args.no_progress)
    if st["kernels"]:  # first: a time budget cuts the layer cases, not these
        previous = st.get("kernels_previous")
        res["kernels"] = bench_kernels.run(
            device, sites=ksites, batch=64 if cuda else 2, copy_gbps=cb["gb_per_s"], l2_bytes=l2,
            timing=None if cuda else dict(warmup=1, target_s=0.02, min_reps=2, max_reps=3),
            seed=args.seed, bar=bar,
            sweep=(bench_kernels.DEFAULT_TUNING, bench_kernels.PREVIOUS_TUNING) if previous
            else None)
        if previous:
            res["kernels"]["sweep"] = bench_kernels.summarize_sweep(res["kernels"]["cases"])
            res["kernels"]["tuning_pair"] = [bench_kernels.tuning_key(bench_kernels.DEFAULT_TUNING),
                                             bench_kernels.tuning_key(bench_kernels.PREVIOUS_TUNING)]
        if args.json:
            bu.write_json(args.json, result())
    for i, case in enumerate(cases):
        if budget.spent():
            res["cases_skipped"] = len(cases) - i
            bar.update(len(st["peers"]) * (len(cases) - i))
            break
        res["cases"].append(bench_case(case, st, device, cb["gb_per_s"], l2, budget, bar,
                                       args.seed + i))
        res["summary"] = summarize(res["cases"], st["peers"])
        if args.json:
            bu.write_json(args.json, result())
    bar.close()
    res["elapsed_s"], res["finished"] = round(budget.elapsed(), 1), True
    bu.finish(result(), args, device, warn, budget, print_results, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
