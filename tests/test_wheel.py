"""A non-editable install: `pip wheel` from the tracked sources (CPU-only build, for time), the
wheel installed into a folder of its own, and the package used from there, away from the
checkout: the extension modules, the build record and the type-hint marker are in the wheel,
`python -m cbam_fused` passes its self-test, and the simulator runs."""
import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_sources(dst):
    try:
        proc = subprocess.run(["git", "ls-files", "setup.py", "pyproject.toml", "README.md",
                               "cbam_fused", "csrc"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        proc = None
    if proc is None or proc.returncode != 0 or not proc.stdout.strip():
        pytest.skip("not a git checkout: the tracked sources are unknown")
    files = proc.stdout.split()
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def test_wheel_builds_installs_and_runs(tmp_path):
    src, whl, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    _tracked_sources(src)
    env = dict(os.environ, CBAM_FUSED_BUILD_CUDA="0", MAX_JOBS="2", CBAM_FUSED_WERROR="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                           "--no-deps", "-q", "-w", str(whl), str(src)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = glob.glob(str(whl / "cbam_fused-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("cbam_fused/_C.", "cbam_fused/_sim.", "cbam_fused/_build_info.py",
                 "cbam_fused/py.typed", "cbam_fused/info.py"):
        assert any(n.startswith(want) for n in names), (want, names)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-index", "--target", str(site), wheel], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_env = dict(os.environ, PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES="")
    code = ("import json, torch, cbam_fused\n"
            "from cbam_fused.testing import use_simulator\n"
            "x = torch.randn(2, 8, 3, 3)\n"
            "m = cbam_fused.CBAM(8, 2)\n"
            "with use_simulator():\n"
            "    y = m(x)\n"
            "print(json.dumps(dict(file=cbam_fused.__file__, err=float((y - m(x)).abs().max()))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=run_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(site)) and res["err"] < 1e-5  # the installed copy
    rep = subprocess.run([sys.executable, "-m", "cbam_fused", "--json"], cwd=str(tmp_path),
                         env=run_env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    info = json.loads(rep.stdout)
    assert info["build"]["cuda"] is False and info["self_tests"][0]["passed"]
