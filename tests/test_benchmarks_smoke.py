"""CPU smoke tests of the benchmark scripts (issue 5): they run with tiny shapes and --quick, and
write a JSON with the documented schema and a well-formed PNG. Never a time is checked."""
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(script, args, tmp_path, timeout=240):
    # one thread: the CPU smoke runs are tiny, and threads only contend on a loaded machine
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--device", "cpu",
                           "--quick", "--no-progress", "--json", str(js), "--plot", str(png),
                           *args], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "not the product" in proc.stdout or "say nothing about the product" in proc.stdout, \
        "the CPU notice is missing"
    return json.loads(js.read_text()), png, proc.stdout


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
                                                 "--warmup", "1"], tmp_path)
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
        assert set(c["peers"]) == {"official", "timm", "cbam_fused"}
        for name, r in c["peers"].items():
            assert r["error"] is None, (c["id"], name, r["error"])
            for k in ("median_ms", "eff_gb_per_s", "frac_copy_bw", "speedup_of_fused",
                      "peak_mem_bytes", "reps"):
                assert k in r, k
            assert r["median_ms"] > 0 and r["speedup_of_fused"] > 0
        if c["mode"] == "fwd":
            assert c["check"]["max_abs_diff_vs_official[cbam_fused]"] < 1e-4
    _check_png(png)


def test_bench_network_cpu_quick(tmp_path):
    res, png, out = _run("bench_network.py",
                         ["--models", "timm,official", "--image-size", "32", "--steps", "1",
                          "--warmup", "0", "--batch", "2"], tmp_path)
    assert res["schema"] == "cbam_fused.bench_network/1" and res["finished"] is True
    _check_meta(res["meta"])
    for m in ("timm", "official"):
        conv = res["conversion"][m]
        assert conv.get("error") is None, conv
        assert conv["blocks_converted"] == 16
        assert conv["max_rel_diff_vs_eager"] < 1e-4
    assert len(res["results"]) == 8  # 2 models x 2 modes x (eager, fused)
    for r in res["results"]:
        for k in ("id", "model", "mode", "batch", "variant", "median_ms", "images_per_s",
                  "peak_mem_bytes", "speedup_vs_eager", "error", "skipped"):
            assert k in r, k
        assert r["error"] is None and r["skipped"] is None, r
        assert r["images_per_s"] > 0
    _check_png(png)


@pytest.mark.parametrize("script", ["bench_cbam.py", "bench_network.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and "--json" in proc.stdout and "--device" in proc.stdout
