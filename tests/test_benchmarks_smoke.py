"""CPU smoke tests of the benchmark scripts (issue 5): they run with tiny shapes and --quick, and
write a JSON with the documented schema and a well-formed PNG. Never a time is checked."""
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import cbam_fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
HAVE_TIMM = importlib.util.find_spec("timm") is not None

# Put on PYTHONPATH, it makes `import timm` fail as on a machine without it.
HIDE_TIMM = """import sys
class _HideTimm:
    def find_spec(self, name, path=None, target=None):
        if name == "timm" or name.startswith("timm."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
sys.meta_path.insert(0, _HideTimm())
"""


def _run(script, args, tmp_path, timeout=240, hide_timm=False):
    # one thread: the CPU smoke runs are tiny, and threads only contend on a loaded machine
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    path = [ROOT]
    if hide_timm:
        site = tmp_path / "hide_timm"
        site.mkdir()
        (site / "sitecustomize.py").write_text(HIDE_TIMM)
        path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--device", "cpu",
                           "--quick", "--no-progress", "--json", str(js), "--plot", str(png),
                           *args], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "not the product" in proc.stdout or "say nothing about the product" in proc.stdout, \
        "the CPU notice is missing"
    return json.loads(js.read_text()), png, proc.stdout + proc.stderr


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert w >= 300 and h >= 200, (w, h)
    assert len(data) > 5000, f"PNG suspiciously small ({len(data)} bytes)"
    assert data[-8:-4] == b"IEND"


def _check_meta(meta):
    for k in ("date_utc", "git_commit", "torch", "cuda", "python", "device",
              "cbam_fused_cuda_kernels", "cbam_fused_native"):
        assert k in meta, k
    assert meta["device"]["type"] == "cpu"
    assert meta["cbam_fused_native"] is False


def test_bench_cbam_cpu_quick(tmp_path):
    res, png, out = _run("bench_cbam.py", ["--shapes", "tiny", "--modes", "fwd,train", "--reps", "3",
                                                 "--warmup", "1", "--kernels", "on",
                                                 "--pass-order", "both", "--tiles-also", "8",
                                                 "--pdl-also", "--kernels-previous"],
                            tmp_path)
    assert res["schema"] == "cbam_fused.bench_cbam/1" and res["finished"] is True
    for k in ("schema_doc", "meta", "settings", "copy_bandwidth", "cases", "summary"):
        assert k in res, k
    _check_meta(res["meta"])
    assert res["copy_bandwidth"]["gb_per_s"] > 0
    assert len(res["cases"]) == 4  # two tiny shapes x two modes
    for c in res["cases"]:
        for k in ("id", "shape", "dtype", "layout", "mode", "x_bytes", "floor_passes",
                  "floor_bytes", "n_buffers", "peers"):
            assert k in c, k
        assert c["floor_passes"] == (2 if c["mode"] == "fwd" else 5)
        assert c["floor_bytes"] == c["floor_passes"] * c["x_bytes"]
        assert set(c["peers"]) == {"official", "cbam_fused"} | ({"timm"} if HAVE_TIMM else set())
        for name, r in c["peers"].items():
            assert r["error"] is None, (c["id"], name, r["error"])
            for k in ("median_ms", "eff_gb_per_s", "frac_copy_bw", "speedup_of_fused",
                      "peak_mem_bytes", "reps", "graph_ms", "graph_frac_copy_bw",
                      "speedup_of_fused_graph", "graph_error"):
                assert k in r, k
            assert r["median_ms"] > 0 and r["speedup_of_fused"] > 0
            # CUDA-graph timing: GPU only, and not an error on the CPU (nor the second
            # tile order's)
            assert r["graph_ms"] is None and r["graph_error"] is None, r
            assert not {"graph_ms_forward_order", "graph_ms_tiles_also", "graph_ms_pdl"} & set(r)
        if c["mode"] == "fwd":
            assert c["check"]["max_abs_diff_vs_official[cbam_fused]"] < 1e-4
    assert res["settings"]["pass_order"] == "both" and res["settings"]["tiles_also"] == 8
    assert res["settings"]["pdl_also"] is True
    # --kernels-previous: CUDA only, said so, and no per-op sweep
    assert res["settings"]["kernels_previous"] is False and "--kernels-previous" in out
    assert "sweep" not in res["kernels"]
    # 0: each op's own (csrc/launchers/op_tuning.h); None: no CUDA kernels built
    assert res["settings"]["tiles_per_sm"] in (0, None)
    for s in res["summary"].values():
        assert "geomean_speedup_of_fused_graph" in s and "mean_graph_frac_copy_bw" in s
        assert "geomean_forward_over_alternate" not in s
    _check_kernels(res["kernels"])
    assert "each op alone" in out
    _check_png(png)


def test_bench_cbam_lp_lse_pools(tmp_path):
    """--pool-types with the official code's lp / lse pools: official and cbam_fused share the
    weights and agree; timm (no such pools) is left out with a note."""
    res, png, out = _run("bench_cbam.py", ["--shapes", "16:6:5", "--modes", "fwd,train", "--reps",
                                           "2", "--warmup", "0", "--kernels", "off",
                                           "--pool-types", "avg,max,lp,lse"], tmp_path)
    assert res["settings"]["pool_types"] == ["avg", "max", "lp", "lse"]
    assert len(res["cases"]) == 2
    for c in res["cases"]:
        assert set(c["peers"]) == {"official", "cbam_fused"}
        assert all(r["error"] is None for r in c["peers"].values()), c["peers"]
        if c["mode"] == "fwd":
            assert c["check"]["max_abs_diff_vs_official[cbam_fused]"] < 1e-4
    if HAVE_TIMM:
        assert "timm's CBAM has no" in out
    _check_png(png)


def test_bench_cbam_merge_joins_runs(tmp_path):
    """--merge joins runs of different batches and peers (the GPU protocol's two parts): every
    case of both, a case measured twice from the later run, the peers' union with the missing
    ones recorded as skipped, the summary recomputed, the per-op section kept, a PNG."""
    common = ["--shapes", "16:6:5", "--modes", "fwd", "--reps", "2", "--warmup", "0"]
    runs = []
    for i, extra in enumerate((["--batch", "2,3", "--peers", "official,cbam_fused",
                                "--kernels", "on"],
                               ["--batch", "3,4", "--peers", "cbam_fused"])):
        d = tmp_path / f"run{i}"
        d.mkdir()
        res, _, _ = _run("bench_cbam.py", common + extra, d)
        runs.append((d / "out.json", res))
    js, png = tmp_path / "merged.json", tmp_path / "merged.png"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_cbam.py"), "--merge",
                           str(runs[0][0]), str(runs[1][0]), "--json", str(js), "--plot",
                           str(png)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads(js.read_text())
    first, second = runs[0][1], runs[1][1]
    assert [c["batch"] for c in m["cases"]] == [2, 3, 4]
    assert m["settings"]["batches"] == [2, 3, 4]
    assert m["settings"]["peers"] == ["official", "cbam_fused"]
    b3 = next(c for c in m["cases"] if c["batch"] == 3)
    assert b3["peers"]["cbam_fused"] == next(c for c in second["cases"]
                                             if c["batch"] == 3)["peers"]["cbam_fused"]
    assert b3["peers"]["official"]["median_ms"] is None and b3["peers"]["official"]["skipped"]
    b2 = next(c for c in m["cases"] if c["batch"] == 2)
    assert b2["peers"]["official"]["median_ms"] > 0
    assert m["summary"]["fwd/float32"]["cases"] == 3
    assert m["kernels"] == first["kernels"] and len(m["merged_from"]) == 2
    _check_png(png)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something/else"}))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_cbam.py"), "--merge",
                           str(runs[0][0]), str(bad)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode != 0 and "schema" in proc.stderr


def test_bench_cbam_resume_keeps_the_measured_cases(tmp_path):
    """--resume: the cases an earlier run measured completely (same device name, torch and
    sources) are kept as they were, only the rest of the grid runs, and the JSON holds both; an
    earlier file of other sources is ignored with a notice, and everything is measured."""
    common = ["--shapes", "16:6:5", "--reps", "2", "--warmup", "0", "--peers",
              "official,cbam_fused", "--kernels", "off"]
    d0, d1, d2 = (tmp_path / n for n in ("first", "resumed", "stale"))
    for d in (d0, d1, d2):
        d.mkdir()
    first, _, _ = _run("bench_cbam.py", common + ["--modes", "fwd"], d0)
    assert first["meta"]["sources_sha256"] == first["meta"]["sources_sha256"].lower()
    assert len(first["meta"]["sources_sha256"]) == 64
    res, png, out = _run("bench_cbam.py", common + ["--modes", "fwd,train", "--resume",
                                                    str(d0 / "out.json")], d1)
    assert "1 of the 2 cases kept" in out, out[-2000:]
    assert res["resumed_cases"] == [first["cases"][0]["id"]]
    assert [c["mode"] for c in res["cases"]] == ["fwd", "train"]
    assert res["cases"][0] == first["cases"][0]  # as measured then, not run again
    assert res["cases"][1]["peers"]["cbam_fused"]["median_ms"] > 0
    assert res["finished"] is True and len(res["merged_from"]) == 2
    _check_png(png)
    stale = json.loads((d0 / "out.json").read_text())
    stale["meta"]["sources_sha256"] = "0" * 64
    (d2 / "old.json").write_text(json.dumps(stale))
    res, _, out = _run("bench_cbam.py", common + ["--modes", "fwd", "--resume",
                                                  str(d2 / "old.json")], d2)
    assert "not used: other cbam_fused sources" in out, out[-2000:]
    assert "resumed_cases" not in res and len(res["cases"]) == 1
    assert res["cases"][0]["peers"]["official"]["median_ms"] > 0


def test_bench_network_resume_keeps_whole_groups(tmp_path):
    """--resume in the network benchmark: a (model, mode, batch) whose variants the earlier run
    all measured is kept (resumed_from says whence), the others are measured."""
    common = ["--models", "official", "--image-size", "32", "--steps", "1", "--warmup", "0",
              "--batch", "2"]
    d0, d1 = tmp_path / "first", tmp_path / "resumed"
    d0.mkdir()
    d1.mkdir()
    first, _, _ = _run("bench_network.py", common + ["--modes", "infer"], d0)
    res, png, out = _run("bench_network.py", common + ["--modes", "train,infer", "--resume",
                                                       str(d0 / "out.json")], d1)
    assert "2 of the 4 configurations kept" in out, out[-2000:]
    by_id = {r["id"]: r for r in res["results"]}
    for r in first["results"]:
        kept = by_id[r["id"]]
        assert kept["resumed_from"]["date_utc"] == first["meta"]["date_utc"]
        assert kept["median_ms"] == r["median_ms"]
    trained = [r for r in res["results"] if r["mode"] == "train"]
    assert len(trained) == 2 and all(r["median_ms"] > 0 and "resumed_from" not in r
                                     for r in trained)
    _check_png(png)


def test_sources_digest_follows_the_package_sources(tmp_path):
    """sources_sha256 (what --resume compares): by content and relative path, the same for a copy
    elsewhere, changed by an edit of any package source, blind to caches and other files."""
    sys.path.insert(0, BENCH)
    import bench_util as bu
    trees = []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "csrc" / "kernels").mkdir(parents=True)
        (root / "cbam_fused" / "__pycache__").mkdir(parents=True)
        (root / "setup.py").write_text("setup()\n")
        (root / "csrc" / "kernels" / "k.cuh").write_text("// kernel\n")
        (root / "cbam_fused" / "f.py").write_text("x = 1\n")
        trees.append(root)
    a, b = (bu.sources_sha256(str(r)) for r in trees)
    assert a == b
    (trees[1] / "cbam_fused" / "__pycache__" / "f.pyc").write_bytes(b"junk")
    (trees[1] / "README.md").write_text("docs\n")
    assert bu.sources_sha256(str(trees[1])) == a
    (trees[1] / "csrc" / "kernels" / "k.cuh").write_text("// kernel, changed\n")
    assert bu.sources_sha256(str(trees[1])) != a
    assert bu.sources_sha256() == bu.sources_sha256(ROOT) != a


def _check_kernels(k, n_ops=7):
    assert k["schema"] == "cbam_fused.bench_kernels/1" and k["target_frac"] == 0.8
    assert len(k["cases"]) == 2 * 2 * n_ops  # two tiny sites x (fp32 NCHW, bf16 CL) x the ops
    for c in k["cases"]:
        assert c["error"] is None, c
        assert c["median_ms"] > 0 and c["frac_copy_bw"] > 0
        # at least the x-sized tensors the op reads and writes
        x_passes = {"pool_over_s": 1, "pool_over_c": 1, "apply_gates": 2, "backward_reduce": 2,
                    "pool_over_c_backward_scale": 1, "pool_over_s_backward_scale": 1,
                    "grad_input": 2, "pool_over_s_lp_lse": 1,
                    "pool_over_s_backward_scale_lp_lse": 1, "grad_input_lp_lse": 3}[c["op"]]
        assert x_passes * c["x_bytes"] < c["bytes"] < (x_passes + 1) * c["x_bytes"], c
        assert c["copy_same_ms"] > 0
        assert c["frac_same_size_copy"] == pytest.approx(c["copy_same_ms"] / c["median_ms"])
    assert k["launch_floor_ms"] > 0
    # the head ops (channel_head, spatial_head and their backward ops) against the ATen ops
    # they replaced, per site
    import bench_kernels as bk
    sites = list(dict.fromkeys(h["site"] for h in k["heads"]))
    assert len(sites) == 2
    assert [(h["site"], h["op"]) for h in k["heads"]] == [(s, op) for s in sites
                                                          for op in bk.HEAD_OPS]
    for h in k["heads"]:
        assert h["error"] is None and h["fused_ms"] > 0 and h["aten_ms"] > 0, h
        assert len(h["maps"]) == (2 if h["op"].startswith("channel_head") else 4), h
        assert h["speedup"] == pytest.approx(h["aten_ms"] / h["fused_ms"])
    assert set(k["summary"]) == {"float32/nchw", "bfloat16/channels_last"}
    for s in k["summary"].values():
        assert 0 < s["min_frac_same_size"] <= s["mean_frac_same_size"]
        assert 0 <= s["meeting_target_same_size"] <= s["cases"]


def test_same_size_copy_moves_the_ops_bytes(monkeypatch):
    """The same-size reference copies half the op's bytes (read + written = the op's bytes),
    of the op's dtype, rotating over as many sources as the op's buffers."""
    sys.path.insert(0, BENCH)
    import bench_kernels as bk
    seen = []

    def fake_time(call, nb, device, timing, rec):
        outs = [call(i) for i in range(2 * nb)]
        seen.append((nb, outs))
        return [1.0, 2.0, 3.0], 3
    monkeypatch.setattr(bk, "_time", fake_time)
    gen = torch.Generator().manual_seed(0)
    for nbytes, dtype, nb in ((1000, torch.float32, 3), (1001, torch.bfloat16, 2),
                              (2, torch.float32, 1)):
        assert bk._copy_same_bytes_ms(nbytes, dtype, nb, torch.device("cpu"), {}, gen) == 2.0
        n, outs = seen.pop()
        assert n == nb and all(o.dtype == dtype for o in outs)
        moved = 2 * outs[0].numel() * outs[0].element_size()
        assert nbytes <= moved < nbytes + 2 * outs[0].element_size()
        # distinct sources in rotation, each copied (not aliased)
        assert len({o.data_ptr() for o in outs}) == len(outs)
        assert all(torch.equal(outs[i], outs[i + nb]) for i in range(nb))
        if nb > 1:
            assert not torch.equal(outs[0], outs[1])


def test_bench_kernels_standalone(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    js = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_kernels.py"), "--device",
                           "cpu", "--no-progress", "--ops", "all", "--json", str(js)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    k = json.loads(js.read_text())
    _check_kernels(k, n_ops=10)
    assert {c["op"] for c in k["cases"]} == set(cbam_fused._ops.OPS)
    assert k["meta"]["device"]["type"] == "cpu"


def test_bench_kernels_configs(tmp_path):
    """--configs picks the dtype / layout configurations (16-bit NCHW here, as under autocast
    without channels_last); a name it does not know is refused, naming the flag."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    js = tmp_path / "k.json"
    cmd = [sys.executable, os.path.join(BENCH, "bench_kernels.py"), "--device", "cpu",
           "--no-progress"]
    proc = subprocess.run(cmd + ["--configs", "bf16-nchw, fp16-nchw", "--json", str(js)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads(js.read_text())["cases"]
    assert len(cases) == 2 * 2 * 7  # two tiny sites x two configurations x the ops
    assert {(c["dtype"], c["layout"]) for c in cases} == {("bfloat16", "nchw"),
                                                          ("float16", "nchw")}
    assert all(c["error"] is None and c["median_ms"] > 0 for c in cases)
    bad = subprocess.run(cmd + ["--configs", "fp32-nchw,fp8"], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--configs" in bad.stderr and "fp8" in bad.stderr, bad.stderr


def test_bench_kernels_odd_sites(tmp_path):
    """--sites odd: the odd maps whose channels-first rows are not whole vectors, every op at
    batch 1 (the CPU kernels here), each case timed without error."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    js = tmp_path / "k.json"
    cmd = [sys.executable, os.path.join(BENCH, "bench_kernels.py"), "--device", "cpu",
           "--no-progress", "--sites", "odd", "--batch", "1", "--configs", "fp32-nchw",
           "--json", str(js)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads(js.read_text())["cases"]
    assert len(cases) == 4 * 7  # four odd sites x the ops
    assert {c["site"] for c in cases} == {"288x35x35", "768x17x17", "256x65x65", "1024x19x19"}
    assert all(c["error"] is None and c["median_ms"] > 0 for c in cases)


def test_bench_network_cpu_quick(tmp_path):
    res, png, out = _run("bench_network.py",
                         ["--models", "timm,official,gates", "--image-size", "32", "--steps",
                          "1", "--warmup", "0", "--batch", "2"], tmp_path)
    assert res["schema"] == "cbam_fused.bench_network/1" and res["finished"] is True
    _check_meta(res["meta"])
    # gates: the CBAM.PyTorch layout, fused through each bottleneck's forward
    models = (["timm"] if HAVE_TIMM else []) + ["official", "gates"]
    for m in models:
        conv = res["conversion"][m]
        assert conv.get("error") is None, conv
        assert conv["blocks_converted"] == 16
        assert conv["max_rel_diff_vs_eager"] < 1e-4
    assert len(res["results"]) == 4 * len(models)  # models x 2 modes x (eager, fused)
    for r in res["results"]:
        for k in ("id", "model", "mode", "batch", "variant", "median_ms", "images_per_s",
                  "peak_mem_bytes", "speedup_vs_eager", "error", "skipped"):
            assert k in r, k
        assert r["error"] is None and r["skipped"] is None, r
        assert r["images_per_s"] > 0
    _check_png(png)


def test_bench_cbam_without_timm_skips_that_peer(tmp_path):
    """A missing optional package (timm, on a GPU machine without the carried wheels) drops its
    peer with a note; the rest still runs."""
    res, _, out = _run("bench_cbam.py", ["--shapes", "tiny", "--modes", "fwd", "--reps", "1",
                                         "--warmup", "0"], tmp_path, hide_timm=True)
    assert "peer 'timm' skipped" in out
    assert res["settings"]["peers"] == ["official", "cbam_fused"]
    assert all(set(c["peers"]) == {"official", "cbam_fused"} for c in res["cases"])


def test_bench_network_without_timm_runs_the_official_model(tmp_path):
    res, _, out = _run("bench_network.py", ["--models", "timm,official", "--modes", "infer",
                                            "--image-size", "32", "--steps", "1", "--warmup", "0",
                                            "--batch", "1"], tmp_path, hide_timm=True)
    assert "model 'timm' skipped" in out
    assert {r["model"] for r in res["results"]} == {"official"}


@pytest.mark.parametrize("script", ["bench_cbam.py", "bench_network.py", "bench_kernels.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and "--json" in proc.stdout and "--device" in proc.stdout


def test_bench_kernels_sweep_summary(capsys):
    """The sweep's summary (the GPU-only part of bench_kernels --sweep) on made-up figures."""
    sys.path.insert(0, BENCH)
    import bench_kernels as bk
    cases = []
    for op in bk.OPS:
        for site, scale in (("a", 1.0), ("b", 0.5)):
            sweep = {bk.tuning_key(st): scale * (
                0.9 if st == (16, 1, 2, 3, 4, 0, 16, 32) and op == "grad_input" else
                0.7 if st == bk.DEFAULT_TUNING else 0.6) for st in bk.SWEEP}
            cases.append(dict(id=f"{op}-{site}", op=op, sweep=sweep))
    # past --max-minutes: measured at the defaults only, left out of the summary
    cases.append(dict(id="grad_input-c", op="grad_input", sweep_skipped="time budget"))
    sw = bk.summarize_sweep(cases)
    assert sw["cases_swept"] == 2 * len(bk.OPS) and sw["cases"] == 2 * len(bk.OPS) + 1
    assert sw["per_op"]["grad_input"]["best"] == "16/1/2/3/4/0/16/32"
    assert sw["per_op"]["pool_over_s"]["best"] == bk.tuning_key(bk.DEFAULT_TUNING)
    assert abs(sw["per_op"]["pool_over_s"]["default_gmean"] - 0.7 * 0.5 ** 0.5) < 1e-12
    # the earlier defaults, each in the sweep, against today's
    assert all(st in bk.SWEEP for st in bk.REFERENCE_TUNINGS.values())
    refs = sw["per_op"]["pool_over_s"]["reference_gmean"]
    assert set(refs) == set(bk.REFERENCE_TUNINGS)
    assert all(abs(v - 0.6 * 0.5 ** 0.5) < 1e-12 for v in refs.values())
    assert sw["best_per_case"]["grad_input-b"] == "16/1/2/3/4/0/16/32"
    assert max(sw["gmean_frac"], key=sw["gmean_frac"].get) == bk.tuning_key(bk.DEFAULT_TUNING)
    bk.print_sweep(sw)
    assert "tuning sweep" in capsys.readouterr().out
    assert bk.summarize_sweep([dict(id="x", op="apply_gates")]) is None


def _tuning_ops():
    """The set_tuning ops built here: the simulator's, and the CUDA build's debug op (registered
    whenever the CUDA kernels are compiled in, with or without a GPU)."""
    import torch
    found = {}
    for ns, module in (("cbam_fused_sim", "cbam_fused._sim"), ("cbam_fused_debug", None)):
        try:
            if module:
                importlib.import_module(module)
            found[ns] = getattr(torch.ops, ns).set_tuning
        except (ImportError, AttributeError, RuntimeError):
            pass
    return found


def test_every_sweep_setting_is_accepted_by_the_launchers():
    """What bench_kernels --sweep will set on the GPU, checked here first (a refused setting
    would end the sweep of a scarce GPU run): every setting of SWEEP passes set_tuning, which
    gives back the previous values in the order of DEFAULT_TUNING; the defaults of both agree."""
    sys.path.insert(0, BENCH)
    import bench_kernels as bk
    ops = _tuning_ops()
    if not ops:
        pytest.skip("neither the simulator nor the CUDA kernels are built")
    assert len(set(bk.SWEEP)) == len(bk.SWEEP) and bk.DEFAULT_TUNING in bk.SWEEP
    for ns, set_tuning in ops.items():
        assert tuple(set_tuning(*bk.DEFAULT_TUNING)) == bk.DEFAULT_TUNING, ns
        try:
            prev = bk.DEFAULT_TUNING
            for setting in bk.SWEEP:
                assert tuple(set_tuning(*setting)) == prev, (ns, setting)
                prev = setting
        finally:
            set_tuning(*bk.DEFAULT_TUNING)


def test_bench_kernels_sweep_needs_the_cuda_kernels():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_kernels.py"), "--device",
                           "cpu", "--sweep", "--no-progress"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0 and "--sweep: needs a GPU" in proc.stderr


def test_model_l2_writes_its_record(tmp_path):
    """benchmarks/model_l2.py on a tiny case scaled down with its L2 and SMs: one record per
    configuration, arrangement, mode, tiles_per_sm and pass order, each pass over x listed in
    the block's order (the first fetches all of x: the L2 starts empty), and the simulator's knobs as they
    were afterwards. Traffic only, never a time."""
    from cbam_fused.testing import simulator_available
    if not simulator_available():
        pytest.skip("the simulator build (cbam_fused._sim) is missing")
    sys.path.insert(0, BENCH)
    import model_l2

    js = tmp_path / "m.json"
    model_l2.main(["--sites", "64x16x16", "--batch", "2", "--tiles-per-sm", "8,32",
                   "--l2-mib", "0.125", "--sms", "2", "--json", str(js),
                   "--arrangements", "channel_first,spatial_first,parallel"])
    rec = json.loads(js.read_text())
    assert rec["schema"] == "cbam_fused.model_l2/1"
    assert (rec["l2_bytes"], rec["sms"], rec["threads_per_sm"]) == (2**17, 2, 2048)
    # the x-sized passes of each arrangement: forward, then the backward's (the parallel
    # arrangement's Q1 gives both reductions, no Q2)
    passes = {"channel_first": (["pool_over_s", "pool_over_c", "apply_gates"],
                                ["backward_reduce", "pool_over_c_backward_scale", "grad_input"]),
              "spatial_first": (["pool_over_c", "pool_over_s", "apply_gates"],
                                ["backward_reduce", "pool_over_s_backward_scale", "grad_input"]),
              "parallel": (["pool_over_s", "pool_over_c", "apply_gates"],
                           ["backward_reduce", "grad_input"])}
    keys = set()
    for c in rec["cases"]:
        keys.add((c["config"], c["arrangement"], c["mode"], c["tiles_per_sm"], c["pass_order"]))
        assert c["site"] == [64, 16, 16] and c["batch"] == 2
        assert c["x_bytes"] == 2 * 64 * 256 * (4 if c["config"] == "fp32-nchw" else 2)
        fwd, bwd = passes[c["arrangement"]]
        assert [p["name"] for p in c["passes"]] == (fwd if c["mode"] == "fwd" else fwd + bwd)
        assert all(p["grid"] >= 1 for p in c["passes"])
        assert c["passes"][0]["dram_over_x"] > 0.99, c
        # the heads' and partials' reads are a small part of the whole
        assert 0.8 * c["dram_over_x"] < sum(p["dram_over_x"] for p in c["passes"]), c
    assert keys == {(cf, a, m, t, o) for cf in ("fp32-nchw", "bf16-cl") for a in passes
                    for m in ("fwd", "train") for t in (8, 32) for o in ("forward", "alternate")}
    sim = torch.ops.cbam_fused_sim
    assert sim.set_pass_order(1) == 1
    sys.path.insert(0, BENCH)
    import bench_kernels as bk
    assert tuple(sim.set_tuning(*bk.DEFAULT_TUNING)) == bk.DEFAULT_TUNING  # (left as found)
    with pytest.raises(SystemExit, match="unknown or missing"):
        model_l2.main(["--modes", "backward"])
    with pytest.raises(SystemExit, match="unknown or missing .*'sideways'"):
        model_l2.main(["--arrangements", "sideways"])
    with pytest.raises(SystemExit, match="--tiles-per-sm: expected values in"):
        model_l2.main(["--tiles-per-sm", "8,65"])


def test_bench_cbam_sets_the_tiles_per_sm_and_back():
    """--tiles-also: set_tiles_per_sm changes only tiles_per_sm and gives back the value before
    (the CUDA build's debug op, which a machine without a GPU has too)."""
    sys.path.insert(0, BENCH)
    import bench_cbam as bc
    import bench_kernels as bk
    try:
        op = torch.ops.cbam_fused_debug.set_tuning
    except (AttributeError, RuntimeError):
        pytest.skip("the CUDA kernels are not built")
    # the default 0: each op's own grid sizing (csrc/launchers/op_tuning.h)
    assert bc.current_tiles_per_sm() == 0
    assert bc.set_tiles_per_sm(8) == 0
    try:
        assert tuple(op(32, 4)) == (8,) + bk.DEFAULT_TUNING[1:]
        op(8, 4)
    finally:
        assert bc.set_tiles_per_sm(0) == 8
    assert tuple(op(0, 4)) == bk.DEFAULT_TUNING
    assert bc.current_tiles_per_sm() == 0 and bc.set_tiles_per_sm(None) is None


def test_bench_cbam_sets_pdl_and_back():
    """--pdl-also: set_pdl turns programmatic dependent launch on and gives back the mode before
    (the CUDA build's debug op; its launches read it only on a GPU of sm_90 or later)."""
    sys.path.insert(0, BENCH)
    import bench_cbam as bc
    try:
        op = torch.ops.cbam_fused_debug.set_pdl
    except (AttributeError, RuntimeError):
        pytest.skip("the CUDA kernels are not built")
    assert bc.set_pdl(1) == 0
    try:
        assert op(1) == 1
    finally:
        assert bc.set_pdl(0) == 1
    with pytest.raises(RuntimeError, match="set_pdl: mode must be 0"):
        op(-1)
    assert op(0) == 0


def test_bench_cbam_times_the_other_settings_by_their_setters():
    """The settings cbam_fused's graph is timed again under: each setter sets its knob (the CUDA
    build's debug ops) and returns the value before, which sets it back."""
    sys.path.insert(0, BENCH)
    import bench_cbam as bc
    if not hasattr(torch.ops.cbam_fused_debug, "set_pass_order"):
        pytest.skip("the CUDA kernels are not built")
    also = bc.also_settings(dict(pass_order="both", tiles_also=8, pdl_also=True))
    assert [k for k, _, _ in also] == [k for k, _ in bc.ALSO_KEYS]
    assert bc.also_settings(dict(pass_order="alternate", tiles_also=None, pdl_also=False)) == []
    for _, setter, value in also:
        old = setter(value)
        assert setter(old) == value
    assert (bc.set_pass_order("alternate"), bc.current_tiles_per_sm(), bc.set_pdl(0)) == \
        ("alternate", 0, 0)
