#!/usr/bin/env python
"""Modelled DRAM traffic of a CBAM block: its CUDA kernels run in the SIMT simulator on the CPU
with the simulator's L2 model (cbam_fused.testing.l2_model). A model of bytes, not a timing:
what each pass over x would fetch from DRAM through an idealised L2 (fully associative, least
recently used, 32-byte sectors, stores allocated without a fetch) when the GPU's SMs run its
blocks in blockIdx order, as many at once as they hold. It shows how the tile order of the passes
(launchers/common.h next_pass_reversed) and the grid sizing (tiles_per_sm) let a pass meet in L2
what the pass before it touched last. Speed is measured on a GPU (bench_cbam.py --pass-order both).

    python benchmarks/model_l2.py                       ResNet-50's 56x56 and 28x28 sites, batch 64
    python benchmarks/model_l2.py --sites 256x56x56 --configs bf16-cl --modes fwd --json m.json
    python benchmarks/model_l2.py --sites 256x56x56 --configs fp32-nchw --modes train \
        --arrangements spatial_first,parallel --batch 2 --l2-mib 1.875 --sms 4   (scaled down)

Each case runs a `cbam_fused.CBAM` (channel-first unless --arrangements says otherwise, eval-mode
BatchNorm) once per pass order (forward: every pass from its first tile; alternate: the default)
and tiles_per_sm setting, the L2 emptied before each: `fwd` an inference forward, `train` a forward
and a backward (the incoming gradient new to the L2, as if its writer's bytes had left it).
Reported per case: the DRAM bytes the loads fetched over the bytes of x, in all and per x-sized
pass. A full-size site takes 5 to 30 seconds a run on one core (the simulator runs every thread).
The launchers size their grids for the modelled SMs (--sms), so a case scales down whole: --batch,
--l2-mib and --sms by the same factor keep its waves and the ratio of x to the L2 (batch 8 of 64,
7.5 MiB, 16 SMs).

JSON record ("cbam_fused.model_l2/1", --json PATH): schema, l2_bytes, sms, threads_per_sm, cases[]
{site [C, H, W], batch, config, arrangement, mode, tiles_per_sm, pass_order, x_bytes, dram_over_x
(all loads' DRAM bytes / x bytes), passes[] {name, grid, dram_over_x}}.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util as bu  # noqa: E402

SCHEMA = "cbam_fused.model_l2/1"
CONFIGS = {"fp32-nchw": (torch.float32, torch.contiguous_format),
           "bf16-cl": (torch.bfloat16, torch.channels_last)}
X_PASSES = ("pool_over_s", "pool_over_c", "apply_gates", "backward_reduce",
            "pool_over_c_backward_scale", "pool_over_s_backward_scale", "grad_input")
ARRANGEMENTS = ("channel_first", "spatial_first", "parallel")
ORDERS = {"forward": 0, "alternate": 1}


def parse_sites(text):
    try:
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]
    except ValueError:
        raise SystemExit(f"--sites: expected CxHxW,... got {text!r}") from None


def run_case(site, batch, config, mode, tiles, order, l2_bytes, sms, threads_per_sm,
             arrangement="channel_first", seed=0):
    from cbam_fused.testing import l2_model, simulator_stats, use_simulator
    import cbam_fused

    dtype, fmt = CONFIGS[config]
    sim = torch.ops.cbam_fused_sim
    old_tuning = bu.set_tiles_per_sm(sim.set_tuning, tiles)
    old_order = sim.set_pass_order(ORDERS[order])
    try:
        gen = torch.Generator().manual_seed(seed)
        c = site[0]
        m = cbam_fused.CBAM(c, arrangement=arrangement).eval().to(dtype)
        x = torch.randn((batch,) + tuple(site), generator=gen).to(dtype).contiguous(
            memory_format=fmt)
        x.requires_grad_(mode == "train")
        g = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
        with use_simulator(), l2_model(l2_bytes, sms=sms, threads_per_sm=threads_per_sm):
            if mode == "train":
                m(x).backward(g)
            else:
                with torch.no_grad():
                    m(x)
            stats = simulator_stats()
    finally:
        sim.set_pass_order(old_order)
        sim.set_tuning(*old_tuning)
    xb = x.numel() * x.element_size()
    return dict(site=list(site), batch=batch, config=config, arrangement=arrangement, mode=mode,
                tiles_per_sm=tiles, pass_order=order, x_bytes=xb,
                dram_over_x=sum(s["l2_miss_bytes"] for s in stats) / xb,
                passes=[dict(name=s["name"], grid=s["grid"][0], dram_over_x=s["l2_miss_bytes"] / xb)
                        for s in stats if s["name"] in X_PASSES])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", default="256x56x56,512x28x28",
                   help="CxHxW,... (default: ResNet-50's two sites where x is 1 to 4 L2s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--configs", default="fp32-nchw,bf16-cl", help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--modes", default="fwd,train", help="fwd, train or both (comma-separated)")
    p.add_argument("--arrangements", default="channel_first",
                   help=f"the block's arrangements, of {', '.join(ARRANGEMENTS)}")
    p.add_argument("--tiles-per-sm", default="0,32",
                   help="the launchers' tiles_per_sm settings to model (comma-separated; 0: each "
                        "op's own, csrc/launchers/op_tuning.h, the default; N: N for every op)")
    p.add_argument("--l2-mib", type=float, default=60.0, help="the L2 (H200: 60; H100: 50)")
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--threads-per-sm", type=int, default=2048)
    p.add_argument("--json", default=None, help="write the record here")
    args = p.parse_args(argv)
    from cbam_fused.testing import simulator_available
    if not simulator_available():
        raise SystemExit("model_l2: needs the simulator build (cbam_fused._sim)")
    from cbam_fused import _sim  # noqa: F401  (registers torch.ops.cbam_fused_sim)

    sites = parse_sites(args.sites)
    configs = [c for c in args.configs.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    arrangements = [a for a in args.arrangements.split(",") if a]
    try:
        tiles = [int(t) for t in args.tiles_per_sm.split(",") if t]
    except ValueError:
        raise SystemExit(f"model_l2: --tiles-per-sm: expected integers, got "
                         f"{args.tiles_per_sm!r}") from None
    if not tiles or not all(0 <= t <= 64 for t in tiles):
        raise SystemExit(f"model_l2: --tiles-per-sm: expected values in [0, 64] (0: each op's "
                         f"own), got {tiles}")
    bad = ([c for c in configs if c not in CONFIGS] + [m for m in modes if m not in ("fwd", "train")]
           + [a for a in arrangements if a not in ARRANGEMENTS])
    if bad or not (sites and configs and modes and arrangements):
        raise SystemExit(f"model_l2: unknown or missing --configs / --modes / --arrangements: "
                         f"{bad}")
    l2_bytes = int(args.l2_mib * 2**20)
    print(f"model_l2: simulated L2 {args.l2_mib:g} MiB, {args.sms} SMs of {args.threads_per_sm} "
          "threads; DRAM bytes fetched / bytes of x (a model, not a timing)")
    cases, rows = [], []
    t0 = time.time()
    for site in sites:
        for config in configs:
            for arr in arrangements:
                for mode in modes:
                    for t in tiles:
                        got = {o: run_case(site, args.batch, config, mode, t, o, l2_bytes,
                                           args.sms, args.threads_per_sm, arr) for o in ORDERS}
                        cases += got.values()
                        f, a = got["forward"], got["alternate"]
                        rows.append(["x".join(map(str, site)), config, arr, mode, str(t),
                                     f"{f['x_bytes'] / l2_bytes:.2f}", f"{f['dram_over_x']:.3f}",
                                     f"{a['dram_over_x']:.3f}",
                                     " ".join(f"{q['name']}:{q['dram_over_x']:.2f}"
                                              for q in a["passes"])])
    bu.print_table(["site", "config", "arrangement", "mode", "tiles/SM", "x/L2",
                    "forward order", "alternate", "alternate, per pass"], rows,
                   title=f"batch {args.batch} ({time.time() - t0:.0f} s)")
    if args.json:
        bu.write_json(args.json, dict(schema=SCHEMA, l2_bytes=l2_bytes, sms=args.sms,
                                      threads_per_sm=args.threads_per_sm, cases=cases))
    return cases


if __name__ == "__main__":
    main()
