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
launcher settings before each op had its own, BEFORE, so that the counters show what the
defaults changed; the channel and spatial heads, float32) runs once after a warm-up, between
cudaProfilerStart and cudaProfilerStop, in the manifest's order. A case's first kernel starts it;
the kernels that only follow another (CONTINUED: the second launch of a long split, the channel
head's gate layer and parameter tiles, the spatial head's combine) belong to the case before,
so the summary gives each kernel its case. `--cases lease` (the lease part of
scripts/gpu_check.py) profiles the cases that lag furthest behind a copy and the channel heads
(LEASE_CASES) instead of all of them. scripts/gpu_check.py runs this as its `profile` step and
writes the selection as ncu.csv's first line ("# cases: lease"), which the summary reads.
"""
import argparse
import csv
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OPS = ("pool_over_s", "pool_over_c", "apply_gates", "backward_reduce",
       "pool_over_c_backward_scale", "pool_over_s_backward_scale", "grad_input")
SITES = ((256, 56, 56), (2048, 7, 7))  # the largest and the smallest ResNet-50 CBAM sites
CONFIGS = ("fp32-nchw", "bf16-cl")
BATCH = 64
# the reductions again under the settings before each op had its own (csrc/launchers/
# op_tuning.h), every op alike: bench_kernels.PREVIOUS_TUNING (here as a literal: this module
# imports no torch until it runs the cases; tests/test_gpu_check.py checks the two agree)
REDUCTIONS = ("pool_over_s", "pool_over_c", "pool_over_c_backward_scale",
              "pool_over_s_backward_scale")
BEFORE = (32, 4, 0, 3, 4, 0, 16, 32)
# the head ops (float32 maps, as the block gives them; bench_kernels._head_calls' inputs)
HEADS = ("channel_head", "channel_head_backward", "spatial_head", "spatial_head_backward")
HEAD_CONFIG = "fp32-heads"
# kernels that only follow another of the same case (see the docstring)
CONTINUED = ("combine_groups_kernel", "channel_head_gate_kernel", "channel_head_bwd_params_kernel",
             "spatial_head_backward_combine_kernel")
# --cases lease: the per-op cases furthest from a copy of the same bytes at the last GPU run
# (2026-11-28: 20-46% of it) and the channel heads (about 2 us a 32-column chunk there)
LEASE_CASES = (
    "pool_over_s-2048x7x7-b64-bf16-cl", "pool_over_c-2048x7x7-b64-bf16-cl",
    "pool_over_s_backward_scale-2048x7x7-b64-bf16-cl", "backward_reduce-2048x7x7-b64-bf16-cl",
    "pool_over_s-256x56x56-b64-bf16-cl", "pool_over_c_backward_scale-256x56x56-b64-bf16-cl",
    "pool_over_c-2048x7x7-b64-fp32-nchw", "pool_over_s_backward_scale-2048x7x7-b64-fp32-nchw",
    "channel_head-2048x7x7-b64-fp32-heads", "channel_head_backward-2048x7x7-b64-fp32-heads",
    "channel_head-256x56x56-b64-fp32-heads", "channel_head_backward-256x56x56-b64-fp32-heads")
SELECTIONS = ("all", "lease")
# the rows of the summary: (label, section metric name in ncu's details page)
METRICS = (("time", "Duration"), ("DRAM %", "DRAM Throughput"), ("SM %", "Compute (SM) Throughput"),
           ("occ. achieved", "Achieved Occupancy"), ("occ. theor.", "Theoretical Occupancy"),
           ("waves/SM", "Waves Per SM"), ("regs", "Registers Per Thread"),
           ("grid", "Grid Size"), ("block", "Block Size"),
           ("cycles/issue", "Warp Cycles Per Issued Instruction"))


def cases(selection="all"):
    """(op, site, config, tuning or None for the defaults), in launch order: every case, or
    (selection "lease") LEASE_CASES."""
    if selection not in SELECTIONS:
        raise ValueError(f"cases: selection must be one of {', '.join(SELECTIONS)}, got "
                         f"{selection!r}")
    out = [(op, site, cfg, None) for cfg in CONFIGS for site in SITES for op in OPS]
    out += [(op, site, cfg, BEFORE) for cfg in CONFIGS for site in SITES for op in REDUCTIONS]
    out += [(op, site, HEAD_CONFIG, None) for site in SITES for op in HEADS]
    if selection == "lease":
        out = [c for c in out if case_id(*c) in LEASE_CASES]
    return out


def case_id(op, site, cfg, tuning=None):
    tag = "" if tuning is None else "-t" + "/".join(map(str, tuning))
    return f"{op}-{'x'.join(map(str, site))}-b{BATCH}-{cfg}{tag}"


def run_cases(device, selection="all"):
    import torch

    import cbam_fused  # noqa: F401
    import bench_kernels as bk

    torch.ops.cbam_fused_debug.set_debug(False, 0)  # no poisoning fills between the kernels
    gen = torch.Generator(device=device).manual_seed(0)
    set_tuning = torch.ops.cbam_fused_debug.set_tuning
    calls = []
    try:
        for op, (c, h, w), cfg, tuning in cases(selection):
            if cfg == HEAD_CONFIG:
                fused, _ = bk._head_calls(op, device, BATCH, h, w, gen, 1, c)
                call = functools.partial(fused, 0)
            else:
                dtype, fmt = bk.CONFIGS[cfg]
                xs, gs, small, _ = bk._buffers(BATCH, c, h, w, dtype, fmt, device, 0, gen, nb=1)
                call = functools.partial(getattr(torch.ops.cbam_fused, op),
                                         *bk._args(op, xs[0], gs[0], small))
            set_tuning(*(tuning or bk.DEFAULT_TUNING))
            call()  # warm-up, outside the profiled range
            calls.append((call, tuning or bk.DEFAULT_TUNING))
        cuda = torch.device(device).type == "cuda"  # (elsewhere: the calls alone, a dry run)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
        for call, tuning in calls:
            set_tuning(*tuning)  # host only: no kernel
            call()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
    finally:
        set_tuning(*bk.DEFAULT_TUNING)
    return len(calls)


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


def _split_name(name):
    """`void cbam::reduce_k_kernel<float, 4>(...)` -> ("reduce_k_kernel", "float, 4>")."""
    kernel, _, targs = name.split("(")[0].replace("void ", "").replace("cbam::", "").partition("<")
    return kernel, targs


def short_name(name):
    """`void cbam::reduce_k_kernel<float, 4, 4, cbam::PoolPolicy<...>>(...)` ->
    `reduce_k<float, 4, 4>`: the element type and the numbers after it (vector width, rows or
    vectors in flight)."""
    kernel, targs = _split_name(name)
    parts = [p.strip() for p in targs.rstrip(">").split(",")] if targs else []
    n = 1
    while n < len(parts) and n < 4 and parts[n].isdigit():
        n += 1
    keep = parts[:n]
    return kernel.replace("_kernel", "") + (f"<{', '.join(keep)}>" if keep else "")


def attribute(kernels, selection="all"):
    """[(case id, kernel record)] in launch order: a kernel not in CONTINUED starts the next
    case of the manifest, one in CONTINUED belongs to the case before ("?" past the manifest)."""
    ids = [case_id(*c) for c in cases(selection)]
    out, i = [], -1
    for k in kernels.values():
        if _split_name(k["name"])[0] not in CONTINUED or i < 0:
            i += 1
        out.append((ids[i] if i < len(ids) else "?", k))
    return out


def selection_of(path):
    """The case selection an ncu.csv was made with: its first line "# cases: NAME" (written by
    scripts/gpu_check.py), else "all"."""
    with open(path, errors="replace") as f:
        first = f.readline().strip()
    name = first[len("# cases:"):].strip() if first.startswith("# cases:") else "all"
    return name if name in SELECTIONS else "all"


def summary_rows(path):
    rows = []
    for cid, k in attribute(read_ncu_csv(path), selection_of(path)):
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
    p.add_argument("--cases", default="all", choices=SELECTIONS,
                   help="every case, or the lease part's few (LEASE_CASES)")
    p.add_argument("--summarize", metavar="NCU_CSV", help="a markdown table from ncu's CSV")
    args = p.parse_args(argv)
    if args.manifest:
        for c in cases(args.cases):
            print(case_id(*c))
        return 0
    if args.summarize:
        summarize(args.summarize)
        return 0
    import torch
    if not torch.cuda.is_available():
        print("profile_kernels: needs a CUDA device (run under ncu on a GPU)", file=sys.stderr)
        return 2
    run_cases("cuda", args.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
