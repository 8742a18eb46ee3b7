"""The GPU protocol (scripts/gpu_check.py, issue 7) on the CPU: a dry run of its steps (all but
the build and the whole test suite, which would rebuild and rerun this very suite; the `lease`
part's GPU-test selection runs, its tests skipped here), the `extra` part's steps, and the merge
of the parts' folders. Checks the files, the step records and the summary, never a time."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _run(args, timeout=600):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _steps(d):
    return {s["step"]: s for s in json.loads((d / "steps.json").read_text())["steps"]}


def test_dry_run_parts_and_merge(tmp_path):
    a, b, c = tmp_path / "verify", tmp_path / "measure", tmp_path / "extra"
    merged = tmp_path / "merged"
    out = _run(["--dry-run", "--python", sys.executable, "--steps",
                "env,wheels,tests,sanitizer,profile", str(a)])
    assert "GPU protocol summary (DRY RUN" in out
    steps = _steps(a)
    assert steps["env"]["status"] == "PASS" and steps["wheels"]["status"] == "PASS"
    # the default part (lease) runs the GPU tests only: here they are all skipped
    assert steps["tests"]["status"] == "PASS", steps["tests"]
    assert steps["tests"]["note"].startswith("GPU tests (-m gpu)"), steps["tests"]
    assert "skipped" in steps["tests"]["note"] and "passed" not in steps["tests"]["note"]
    assert steps["sanitizer"]["status"] == "SKIP"  # no GPU; the kernel test selection collects
    assert "collects" in steps["sanitizer"]["note"] and "rc 0" in steps["sanitizer"]["note"]
    assert "memcheck, racecheck" in (a / "gpu_check.log").read_text()  # the lease's two tools
    # the lease's profile: its few cases (profile_kernels.LEASE_CASES), not the extra part's 52
    assert steps["profile"]["status"] == "SKIP" and "12 cases (rc 0)" in steps["profile"]["note"]

    _run(["--dry-run", "--python", sys.executable, "--steps",
          "env,bandwidth,bench_cbam,bench_network", str(b)])
    steps = _steps(b)
    for s in ("bandwidth", "bench_cbam", "bench_network"):
        assert steps[s]["status"] == "PASS", steps[s]
    bc = json.loads((b / "bench_cbam.json").read_text())
    assert bc["finished"] and bc["kernels"]["cases"]  # the per-op section ran

    # the grid part goes on from an earlier folder: the benchmarks keep its cases (same
    # device, torch and sources here) and measure none again
    g = tmp_path / "grid"
    out = _run(["--dry-run", "--python", sys.executable, "--part", "grid", "--steps",
                "env,bench_cbam,bench_network", "--resume-from", str(b), str(g)])
    assert f"--resume {b / 'bench_cbam.json'}" in out, out[-3000:]
    gc = json.loads((g / "bench_cbam.json").read_text())
    assert gc["resumed_cases"] == sorted(c["id"] for c in bc["cases"])
    gn = json.loads((g / "bench_network.json").read_text())
    assert gn["results"] and all("resumed_from" in r for r in gn["results"])

    # the second command of a lease: no sweep without a GPU; its layer benchmark on the CPU
    _run(["--dry-run", "--python", sys.executable, "--part", "extra", "--steps",
          "env,sweep,profile,bench_cbam", "--cpu-peers", "timm,cbam_fused", str(c)])
    steps = _steps(c)
    assert steps["sweep"]["status"] == "SKIP" and "needs a GPU" in steps["sweep"]["note"]
    assert steps["profile"]["status"] == "SKIP" and "52 cases (rc 0)" in steps["profile"]["note"]
    assert steps["bench_cbam"]["status"] == "PASS", steps["bench_cbam"]

    out = _run(["merge", str(a), str(b), str(c), "-o", str(merged)])
    files = sorted(p.name for p in merged.iterdir())
    assert len(files) <= 8, files
    assert {"steps.json", "summary.md", "bench_cbam.json", "bench_cbam.png",
            "bench_network.json", "bench_network.png"} <= set(files)
    steps = json.loads((merged / "steps.json").read_text())["steps"]
    assert {s["step"] for s in steps} >= {"env", "wheels", "tests", "sanitizer", "bandwidth",
                                         "sweep", "bench_cbam", "bench_network"}
    # the two parts' layer benchmarks are joined: every case of both, the union of the peers
    bm = json.loads((merged / "bench_cbam.json").read_text())
    parts = [json.loads((d / "bench_cbam.json").read_text()) for d in (b, c)]
    assert len(bm["merged_from"]) == 2
    assert {x["id"] for x in bm["cases"]} == {x["id"] for p in parts for x in p["cases"]}
    assert set(bm["settings"]["peers"]) == set(parts[0]["settings"]["peers"]) | set(
        parts[1]["settings"]["peers"])
    assert bm["kernels"]["cases"] and bm["summary"]
    summary = (merged / "summary.md").read_text()
    assert "DRY RUN" in summary and "## Steps" in summary
    assert "## Layer benchmark" in summary and "### Each op alone" in summary
    assert "## Network benchmark" in summary


def test_initcheck_reports_are_attributed_by_device_frames():
    """initcheck runs unfiltered (to see PyTorch's writes) and counts only the reports whose
    device frames are in our kernels; a PyTorch kernel's report with our launcher on its host
    stack is not ours."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_check

    ours = """========= Uninitialized __global__ memory read of size 4 bytes
=========     at T1 cbam::ld<float>(const T1 *)+0x18b0 in dialect.cuh:67
=========     by thread (16,0,0) in block (33,0,0)
=========         Device Frame: void cbam::backward_reduce_kernel<float, 1, 4, float>(...)
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: cbam::backward_reduce(at::Tensor const&) in _C.so
"""
    theirs = """========= Uninitialized __global__ memory read of size 2 bytes
=========     at void at::native::elementwise_kernel<128, 4>(int, F)+0x90
=========     by thread (0,0,0) in block (0,0,0)
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: cbam::backward_reduce(at::Tensor const&) in _C.so
"""
    out = ("========= COMPUTE-SANITIZER\n" + ours + "=========\n" + theirs + ".. [ 50%]\n" + ours
           + "========= ERROR SUMMARY: 3 errors\n")
    assert gpu_check.attribute_reports(out, "cbam") == (2, 1)
    assert gpu_check.attribute_reports("========= ERROR SUMMARY: 0 errors\n", "cbam") == (0, 0)


def test_kernel_profile_attributes_each_kernel_to_its_case(tmp_path):
    """The profile step's table from ncu's CSV (details page): ncu's own messages skipped, one
    row per kernel, one kernel a case in the manifest's order ("?" past its end)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_kernels as pk

    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
            '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"')

    def row(i, name, metric, unit, value):
        return (f'"{i}","1","python3","h","{name}","1","7","(16, 16, 1)","(1344, 1, 1)","0",'
                f'"9.0","S","{metric}","{unit}","{value}"')

    k0 = "void cbam::reduce_k_kernel<float, 4, 4, cbam::PoolPolicy<float>>(const T1 *, cbam::Geom)"
    k1 = "void cbam::reduce_r_kernel<float, 4, 1, cbam::PoolPolicy<float>>(const T1 *)"
    lines = ["==PROF== Connected to process 1", "==PROF== Profiling reduce_k_kernel", head,
             row(0, k0, "Duration", "us", "77.5"), row(0, k0, "DRAM Throughput", "%", "61.2"),
             row(0, k0, "Registers Per Thread", "register/thread", "40"),
             row(1, k1, "Duration", "us", "70,1")]
    p = tmp_path / "ncu.csv"
    p.write_text("\n".join(lines) + "\n")
    rows = pk.summary_rows(str(p))
    ids = [pk.case_id(*c) for c in pk.cases()]
    assert [r[0] for r in rows] == [ids[0], ids[1]]
    assert rows[0][1] == "reduce_k<float, 4, 4>" and rows[1][1] == "reduce_r<float, 4, 1>"
    # the reductions again under the settings before each op had its own (bench_kernels'
    # PREVIOUS_TUNING, which this module keeps as a literal), after the default cases
    before = [c for c in pk.cases() if c[3] is not None]
    assert {c[0] for c in before} == set(pk.REDUCTIONS) and len(before) == 16
    import bench_kernels
    assert pk.BEFORE == bench_kernels.PREVIOUS_TUNING
    assert pk.case_id(*before[0]).endswith("-t32/4/0/3/4/0/16/32")
    assert rows[0][2] == "77.5 us" and rows[0][3] == "61.2 %" and rows[1][2] == "70,1 us"
    (tmp_path / "empty.csv").write_text("==PROF== no kernel profiled\n")
    assert pk.summary_rows(str(tmp_path / "empty.csv")) == []

    # the lease's selection (ncu.csv's first line): the channel head's gate layer belongs to
    # the case its hidden layer starts, the next pool starts the next case
    lease = [pk.case_id(*c) for c in pk.cases("lease")]
    assert sorted(lease) == sorted(pk.LEASE_CASES)
    first_head = lease.index("channel_head-256x56x56-b64-fp32-heads")
    hid = "void cbam::channel_head_hidden_kernel<float, false>(cbam::ChannelHeadArgs<T1>)"
    gate = "void cbam::channel_head_gate_kernel<float, true>(cbam::ChannelHeadArgs<T1>)"
    lines = [head] + [row(i, k0, "Duration", "us", "5") for i in range(first_head)] + [
        row(first_head, hid, "Duration", "us", "9"), row(first_head + 1, gate, "Duration", "us", "4"),
        row(first_head + 2, hid, "Duration", "us", "8")]
    p.write_text("# cases: lease\n" + "\n".join(lines) + "\n")
    rows = pk.summary_rows(str(p))
    assert [r[0] for r in rows] == lease[:first_head] + [lease[first_head]] * 2 + [
        lease[first_head + 1]]
    assert rows[-2][1] == "channel_head_gate<float>" and rows[-1][2] == "8 us"
    with pytest.raises(ValueError, match="selection must be one of all, lease"):
        pk.cases("weakest")


def test_kernel_profile_cases_run_on_the_cpu():
    """profile_kernels builds and makes every call of its lease cases on the CPU (the calls it
    profiles on a GPU, without the profiler's range)."""
    import torch

    import cbam_fused  # noqa: F401  (registers the ops)
    if not hasattr(torch.ops.cbam_fused_debug, "set_tuning"):
        pytest.skip("needs the CUDA extension's tuning knobs (a build with the CUDA kernels)")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import profile_kernels as pk
    assert pk.run_cases("cpu", "lease") == len(pk.LEASE_CASES)


def test_summary_sweep_and_per_op_tables(tmp_path):
    """summary.md's sweep table sets today's default against the earlier defaults
    (bench_kernels.REFERENCE_TUNINGS), its per-op table shows the same-size copy columns, and
    the spatial head's kernel is set against the ATen ops it replaced; a
    folder written before those fields existed (2026-11-26-h200) still gives both tables, with
    dashes."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_kernels as bk
    import gpu_check

    cases = []
    for op in bk.OPS:
        sweep = {bk.tuning_key(st): 0.5 + 0.01 * i for i, st in enumerate(bk.SWEEP)}
        cases.append(dict(id=f"{op}-x", op=op, sweep=sweep, site="7x7", dtype="float32",
                          layout="nchw", error=None, median_ms=0.01, gb_per_s=1000.0,
                          frac_copy_bw=0.25, meets_target=False, copy_same_ms=0.008,
                          frac_same_size_copy=0.8))
    heads = [dict(site="2048x7x7", maps=[64, 1, 7, 7], fused_ms=0.003, aten_ms=0.012, speedup=4.0,
                  error=None), dict(site="256x56x56", maps=[64, 1, 56, 56], error="RuntimeError")]
    rec = dict(schema=bk.SCHEMA, batch=64, target_frac=0.8, launch_floor_ms=0.002, cases=cases,
               summary=bk.summarize(cases), sweep=bk.summarize_sweep(cases), heads=heads)
    (tmp_path / "sweep.json").write_text(json.dumps(rec))
    src = os.path.join(ROOT, "benchmarks", "results", "2026-11-26-h200")
    with open(os.path.join(src, "bench_cbam.json")) as f:
        layer = json.load(f)
    (tmp_path / "bench_cbam.json").write_text(json.dumps(dict(layer, kernels=rec)))
    gpu_check.write_summary(str(tmp_path), [str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    refs = "".join(f" {lb} |" for lb in bk.REFERENCE_TUNINGS)
    assert "| op | best | best %copy | default %copy |" + refs in text
    i = bk.SWEEP.index(bk.REFERENCE_TUNINGS["defaults before 2026-11-26"])
    assert f" {100 * (0.5 + 0.01 * i):.3g}% |" in text.split("## Launcher tuning sweep")[1]
    assert "a launch alone (one-element clone) takes 2.0 us" in text
    assert "| pool_over_s | 7x7 | float32 nchw | 10.0 us | 1000 | 25% | 8.0 us | 80% |" in text
    assert "| float32/nchw | 0/7 | 25% (pool_over_s-x) | 25% | 7/7 | 80%, 80% |" in text
    # the spatial head (a record from before heads had an op: the forward)
    assert "| spatial_head | 2048x7x7 | 64x1x7x7 | 3.0 us | 12.0 us | 4.00x |" in text
    assert "| spatial_head | 256x56x56 | 64x1x56x56 | ERR | - | - |" in text
    assert "%copy today / before" not in text  # (no --kernels-previous)

    # bench_cbam --kernels-previous: each op again under today's defaults and the previous ones
    pair = [bk.tuning_key(bk.DEFAULT_TUNING), bk.tuning_key(bk.PREVIOUS_TUNING)]
    for i, c in enumerate(cases):
        c["sweep"] = {pair[0]: 0.3 + 0.01 * i, pair[1]: 0.2}
    kern = dict(rec, cases=cases, sweep=bk.summarize_sweep(cases), tuning_pair=pair)
    (tmp_path / "bench_cbam.json").write_text(json.dumps(dict(layer, kernels=kern)))
    gpu_check.write_summary(str(tmp_path), [str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert (f"Each op again under today's defaults ({pair[0]}) and the defaults before each op "
            f"had its own ({pair[1]}, the same for every op;") in text
    assert "today's against before: pool_over_s 30% vs 20%; pool_over_c 31% vs 20%;" in text
    assert "| pool_over_s | 7x7 | float32 nchw | 10.0 us | 1000 | 25% | 8.0 us | 80% | 30% / 20% |" \
        in text

    old = tmp_path / "old"
    old.mkdir()
    for name in ("steps.json", "bench_cbam.json", "sweep.json"):
        (old / name).write_text(open(os.path.join(src, name)).read())
    gpu_check.write_summary(str(old), [str(old)])
    text = (old / "summary.md").read_text()
    assert "## Launcher tuning sweep" in text and "### Each op alone" in text
    assert "| pool_over_s | 256x56x56 | float32 nchw | 77.7 us | 2647 | 62.2% | - | - |" in text


def test_summary_compares_the_tile_orders(tmp_path):
    """bench_cbam --pass-order both: cbam_fused's graph time with every pass forward over its
    time with alternating tile orders, as a geometric mean per mode and dtype in bench_cbam's
    summary and a line of summary.md; --tiles-also 32 the same for 32 tiles an SM over the
    default's (each op's own), --pdl-also for programmatic dependent launch over none; a run without them has
    none of these."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_cbam as bc
    import gpu_check

    src = os.path.join(ROOT, "benchmarks", "results", "2026-11-26-h200", "bench_cbam.json")
    with open(src) as f:
        layer = json.load(f)
    ratios = {}
    for i, c in enumerate(layer["cases"]):
        f = c["peers"]["cbam_fused"]
        f["graph_ms"] = 0.1 + 0.01 * i
        if c["mode"] == "fwd" and c["dtype"] == "bfloat16":
            r = 1.0 + 0.02 * (i % 5)
            f["graph_ms_forward_order"] = f["graph_ms"] * r
            f["graph_ms_tiles_also"] = f["graph_ms"] * r * r
            f["graph_ms_pdl"] = f["graph_ms"] / r
            ratios.setdefault(c["batch"], []).append(r)
    layer["settings"].update(tiles_also=32, tiles_per_sm=0)
    layer["summary"] = bc.summarize(layer["cases"], layer["settings"]["peers"])
    want = math.exp(sum(math.log(r) for rs in ratios.values() for r in rs) /
                    sum(len(rs) for rs in ratios.values()))
    got = layer["summary"]["fwd/bfloat16"]["geomean_forward_over_alternate"]
    assert abs(got - want) < 1e-12 and got > 1
    assert all("geomean_forward_over_alternate" not in s for k, s in layer["summary"].items()
               if k != "fwd/bfloat16")
    (tmp_path / "bench_cbam.json").write_text(json.dumps(layer))
    gpu_check.write_summary(str(tmp_path), [str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert f"(geometric mean; > 1: alternating is faster): fwd/bfloat16 {want:.3f}x." in text
    # --tiles-also 32: the same for the graph time at 32 tiles an SM over the default's (each
    # op's own, tiles_per_sm 0)
    got = layer["summary"]["fwd/bfloat16"]["geomean_tiles_also_over_default"]
    assert abs(got - want ** 2) < 1e-12
    assert ("Tiles an SM (--tiles-also 32): cbam_fused's graph time with 32 tiles an SM over its "
            "time with each op's own, the default (`csrc/launchers/op_tuning.h`; geometric mean; "
            f"> 1: the default is faster): fwd/bfloat16 {want ** 2:.3f}x.") in text
    # a run of a build with one grid sizing for every op names it
    layer["settings"].update(tiles_also=8, tiles_per_sm=32)
    (tmp_path / "bench_cbam.json").write_text(json.dumps(layer))
    gpu_check.write_summary(str(tmp_path), [str(tmp_path)])
    assert ("Tiles an SM (--tiles-also 8): cbam_fused's graph time with 8 tiles an SM over its "
            "time with the default 32 (geometric mean; > 1: the default is faster): "
            f"fwd/bfloat16 {want ** 2:.3f}x.") in (tmp_path / "summary.md").read_text()
    # --pdl-also: the graph time with programmatic dependent launch over without
    got = layer["summary"]["fwd/bfloat16"]["geomean_pdl_over_default"]
    assert abs(got - 1 / want) < 1e-12
    assert ("Programmatic dependent launch (--pdl-also): cbam_fused's graph time with it over "
            "its time without (geometric mean; < 1: it is faster, and set_pdl(1) should become "
            f"the default): fwd/bfloat16 {1 / want:.3f}x.") in text

    old = tmp_path / "old"
    old.mkdir()
    (old / "bench_cbam.json").write_text(open(src).read())
    gpu_check.write_summary(str(old), [str(old)])
    assert "Tile order of the passes" not in (old / "summary.md").read_text()
    assert "Tiles an SM" not in (old / "summary.md").read_text()
    assert "Programmatic dependent launch" not in (old / "summary.md").read_text()


def test_env_step_says_when_the_ci_torch_pin_is_stale():
    """The env step's summary line names the pin of tests/gpu_machine_torch.py (the torch CI
    builds and tests against as the GPU machines') when the machine's torch is another."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_check
    import gpu_machine_torch

    pin = gpu_machine_torch.VERSION
    assert gpu_check.ci_torch_pin() == pin
    assert gpu_check.torch_pin_note(f"{pin}+cu130") == ""
    assert gpu_check.torch_pin_note(None) == ""
    assert gpu_check.torch_pin_note("2.99.1+cu130") == (
        f"; CI checks the build against torch {pin} (tests/gpu_machine_torch.py VERSION), this "
        "machine has 2.99.1: update the pin")


def test_the_build_leaves_the_simulator_out_unless_the_whole_suite_runs():
    """The parts whose later steps run no simulator test (the GPU tests alone, the sanitizer's
    kernel tests, the benchmarks) build without it (CBAM_FUSED_BUILD_SIM=0): the lease's build
    is that much shorter. The parts that run the whole suite build it."""
    import types

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_check

    need = {}
    for part, steps in gpu_check.PARTS.items():
        fake = types.SimpleNamespace(
            opt=lambda step, default=None, part=part: gpu_check.PART_OPTIONS.get(
                part, {}).get(step, default))
        later = list(steps[steps.index("build") + 1:])
        need[part] = gpu_check.Protocol._needs_sim(fake, later)
    assert need == {"lease": False, "extra": False, "verify": True, "measure": False,
                    "grid": False, "all": True}, need


def test_the_build_step_names_its_slowest_compiles(tmp_path, monkeypatch):
    """The build step reports the compile steps a build added to ninja's logs, longest first (the
    files on its critical path), and nothing from earlier builds."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_check

    log = tmp_path / "build" / "temp.linux-x86_64-cpython-312" / ".ninja_log"
    log.parent.mkdir(parents=True)
    old = ["# ninja log v7", "0\t90000\t1\t/b/old_slow.o\th"]
    log.write_text("\n".join(old) + "\n")
    monkeypatch.setattr(gpu_check, "ROOT", str(tmp_path))
    before = gpu_check.ninja_lines()
    log.write_text("\n".join(old + ["5\t21000\t1\t/b/csrc/launchers/pool.o\th",
                                    "5\t34400\t1\t/b/csrc/launchers/pool_lp_lse.o\th",
                                    "7\t9000\t1\t/b/csrc/ops.o\th", "# ninja log v7",
                                    "0\t30000\t1\t/b/csrc/sim/kernels_sim.o\th", "garbled"]) + "\n")
    assert gpu_check.slowest_compiles(before, gpu_check.ninja_lines()) == [
        "pool_lp_lse.o 34 s", "kernels_sim.o 30 s", "pool.o 21 s"]
    assert gpu_check.slowest_compiles({}, {}) == []
