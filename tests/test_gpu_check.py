"""The GPU protocol (scripts/gpu_check.py, issue 7) on the CPU: a dry run of its two parts (all
steps but the build and the test suite, which would rebuild and rerun this very suite) and the
merge of their folders. Checks the files, the step records and the summary, never a time."""
import json
import os
import subprocess
import sys

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
    a, b, merged = tmp_path / "verify", tmp_path / "measure", tmp_path / "merged"
    out = _run(["--dry-run", "--python", sys.executable, "--steps", "env,wheels,sanitizer",
                str(a)])
    assert "GPU protocol summary (DRY RUN" in out
    steps = _steps(a)
    assert steps["env"]["status"] == "PASS" and steps["wheels"]["status"] == "PASS"
    assert steps["sanitizer"]["status"] == "SKIP"  # no GPU; the kernel test selection collects
    assert "collects" in steps["sanitizer"]["note"] and "rc 0" in steps["sanitizer"]["note"]

    _run(["--dry-run", "--python", sys.executable, "--steps",
          "env,bandwidth,bench_cbam,bench_network", str(b)])
    steps = _steps(b)
    for s in ("bandwidth", "bench_cbam", "bench_network"):
        assert steps[s]["status"] == "PASS", steps[s]
    bc = json.loads((b / "bench_cbam.json").read_text())
    assert bc["finished"] and bc["kernels"]["cases"]  # the per-op section ran

    out = _run(["merge", str(a), str(b), "-o", str(merged)])
    files = sorted(p.name for p in merged.iterdir())
    assert len(files) <= 8, files
    assert {"steps.json", "summary.md", "bench_cbam.json", "bench_cbam.png",
            "bench_network.json", "bench_network.png"} <= set(files)
    steps = json.loads((merged / "steps.json").read_text())["steps"]
    assert {s["step"] for s in steps} >= {"env", "wheels", "sanitizer", "bandwidth",
                                         "bench_cbam", "bench_network"}
    summary = (merged / "summary.md").read_text()
    assert "DRY RUN" in summary and "## Steps" in summary
    assert "## Layer benchmark" in summary and "### Each op alone" in summary
    assert "## Network benchmark" in summary
