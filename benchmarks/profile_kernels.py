#!/usr/bin/env python
"""Hardware counters of each cbam_fused kernel, through Nsight Compute (ncu): the per-op
benchmark (bench_kernels.py) says how far an op is from the copy bandwidth; this says why (the
DRAM throughput it reached, its achieved occupancy against the theoretical one, waves per SM,
registers, cycles per issued instruction).

    python benchmarks/profile_kernels.py --manifest          the cases, one line each (no GPU)
    ncu --clock-control none --profile-from-start off --kernel-name regex:cbam \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --csv --page details python benchmarks/profile_kernels.py > ncu.csv
    python benchmarks/profile_kernels.py --summarize ncu.csv  a table: one row per kernel, its case

Each case (op x site x configuration, batch 64 as in issue 4; the reductions also under the
launcher settings before 2026-11-26's changes, BEFORE, so that the counters show what the new
defaults changed) runs once after a warm-up, between
cudaProfilerStart and cudaProfilerStop, in the manifest's order. A case launches one kernel (a
reduction split over tiles finishes in the same launch: kernels/combine_partials.cuh), so the
summary gives the kernels their cases in that order. scripts/gpu_check.py runs this as its `profile` step.
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OPS = ("pool_over_s", "pool_over_c", "apply_gates", "backward_reduce",
       "pool_over_c_backward_scale", "pool_over_s_backward_scale", "grad_input")
SITES = ((256, 56, 56), (2048, 7, 7))  # the largest and the smallest ResNet-50 CBAM sites
CONFIGS = ("fp32-nchw", "bf16-cl")
BATCH = 64
# the reductions (the ops the 2026-11-26 settings changed: reduce_k's vectors and rows in flight
# and tile rows, reduce_r's rows in flight and lanes of short rows) again under the settings
# before them (bench_kernels' knobs)
REDUCTIONS = ("pool_over_s", "pool_over_c", "pool_over_c_backward_scale",
              "pool_over_s_backward_scale")
BEFORE = (8, 4, 1, 2, 1, 0)
# the rows of the summary: (label, section metric name in ncu's details page)
METRICS = (("time", "Duration"), ("DRAM %", "DRAM Throughput"), ("SM %", "Compute (SM) Throughput"),
           ("occ. achieved", "Achieved Occupancy"), ("occ. theor.", "Theoretical Occupancy"),
           ("waves/SM", "Waves Per SM"), ("regs", "Registers Per Thread"),
           ("grid", "Grid Size"), ("block", "Block Size"),
           ("cycles/issue", "Warp Cycles Per Issued Instruction"))


def cases():
    """(op, site, config, tuning or None for the defaults), in launch order."""
    out = [(op, site, cfg, None) for cfg in CONFIGS for site in SITES for op in OPS]
    return out + [(op, site, cfg, BEFORE) for cfg in CONFIGS for site in SITES
                  for op in REDUCTIONS]


def case_id(op, site, cfg, tuning=None):
    tag = "" if tuning is None else "-t" + "/".join(map(str, tuning))
    return f"{op}-{'x'.join(map(str, site))}-b{BATCH}-{cfg}{tag}"


def run_cases(device):
    import torch

    import cbam_fused  # noqa: F401
    import bench_kernels as bk

    torch.ops.cbam_fused_debug.set_debug(False, 0)  # no poisoning fills between the kernels
    gen = torch.Generator(device=device).manual_seed(0)
    set_tuning = torch.ops.cbam_fused_debug.set_tuning
    calls = []
    try:
        for op, (c, h, w), cfg, tuning in cases():
            dtype, fmt = bk.CONFIGS[cfg]
            xs, gs, small, _ = bk._buffers(BATCH, c, h, w, dtype, fmt, device, 0, gen, nb=1)
            args = bk._args(op, xs[0], gs[0], small)
            fn = getattr(torch.ops.cbam_fused, op)
            set_tuning(*(tuning or bk.DEFAULT_TUNING))
            fn(*args)  # warm-up, outside the profiled range
            calls.append((fn, args, tuning or bk.DEFAULT_TUNING))
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for fn, args, tuning in calls:
            set_tuning(*tuning)  # host only: no kernel
            fn(*args)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    finally:
        set_tuning(*bk.DEFAULT_TUNING)


def read_ncu_csv(path):
    """{kernel ID: {"name": ..., metric name: "value unit"}} in launch order, from ncu's
    `--csv --page details` output (lines before the CSV header, ncu's own messages, skipped)."""
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return {}
    kernels = {}
    for row in csv.DictReader(lines[start:]):
        k = kernels.setdefault(row["ID"], {"name": row.get("Kernel Name", "")})
        unit = row.get("Metric Unit") or ""
        k[row.get("Metric Name", "")] = f"{row.get('Metric Value', '')} {unit}".strip()
    return kernels


def short_name(name):
    """`void cbam::reduce_k_kernel<float, 4, 4, cbam::PoolPolicy<...>>(...)` ->
    `reduce_k<float, 4, 4>`: the element type and the numbers after it (vector width, rows or
    vectors in flight)."""
    base = name.split("(")[0].replace("void ", "").replace("cbam::", "")
    kernel, _, targs = base.partition("<")
    parts = [p.strip() for p in targs.rstrip(">").split(",")] if targs else []
    n = 1
    while n < len(parts) and n < 4 and parts[n].isdigit():
        n += 1
    keep = parts[:n]
    return kernel.replace("_kernel", "") + (f"<{', '.join(keep)}>" if keep else "")


def attribute(kernels):
    """[(case id, kernel record)] in launch order, one kernel a case ("?" past the manifest)."""
    ids = [case_id(*c) for c in cases()]
    return [(ids[i] if i < len(ids) else "?", k) for i, k in enumerate(kernels.values())]


def summary_rows(path):
    rows = []
    for cid, k in attribute(read_ncu_csv(path)):
        rows.append([cid, short_name(k["name"])] + [k.get(m, "") for _, m in METRICS])
    return rows


def summarize(path, out=sys.stdout):
    rows = summary_rows(path)
    head = ["case", "kernel"] + [label for label, _ in METRICS]
    out.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for r in rows:
        out.write("| " + " | ".join(r) + " |\n")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", action="store_true", help="print the cases and exit")
    p.add_argument("--summarize", metavar="NCU_CSV", help="a markdown table from ncu's CSV")
    args = p.parse_args(argv)
    if args.manifest:
        for c in cases():
            print(case_id(*c))
        return 0
    if args.summarize:
        summarize(args.summarize)
        return 0
    import torch
    if not torch.cuda.is_available():
        print("profile_kernels: needs a CUDA device (run under ncu on a GPU)", file=sys.stderr)
        return 2
    run_cases("cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
