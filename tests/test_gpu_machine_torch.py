"""The package on the GPU machines' torch (2.11; gpu_machine_torch.py says why and how it is had):
a copy of the sources built CPU-only against it (the op schemas, the CPU kernels, the simulator:
what the GPU machines build besides the CUDA kernels, whose sources test_codegen.py compiles
against the same headers), then, with that torch first on the path, the package's self-test and
the tests of its torch-facing code (custom ops and opcheck, torch.compile, torch.export and ONNX,
torch.fx, the modules, conversion of timm and official networks, argument checks, the dispatched
ops of a block). A torch API used here but newer than the GPU machines' fails here, not in a GPU
session. Skipped, saying why, where that torch cannot be had."""
import os
import shutil
import subprocess
import sys

import pytest

import gpu_machine_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tests of the torch-facing code, run with the GPU machines' torch (about 2 minutes)
TORCH_FACING = ("test_ops.py", "test_compile.py", "test_export.py", "test_fx.py",
                "test_functional.py", "test_convert.py", "test_interop.py", "test_errors.py",
                "test_host_work.py")


def _copy_sources(dest):
    """What a build and those tests need, without this checkout's built extensions."""
    skip = shutil.ignore_patterns("*.so", "_build_info.py", "__pycache__", "build", "results")
    for d in ("cbam_fused", "csrc", "tests", "benchmarks"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(dest, d), ignore=skip)
    for f in ("setup.py", "pyproject.toml"):
        shutil.copy2(os.path.join(ROOT, f), dest)


@pytest.fixture(scope="module")
def built_copy(tmp_path_factory):
    """(the copy's folder, the environment that runs it on the GPU machines' torch)."""
    site, why = gpu_machine_torch.site_or_reason()
    if site is None:
        pytest.skip(why)
    dest = str(tmp_path_factory.mktemp("gpu_machine_torch"))
    _copy_sources(dest)
    env = dict(os.environ, CBAM_FUSED_BUILD_CUDA="0",
               PYTHONPATH=os.pathsep.join([site] + [p for p in [os.environ.get("PYTHONPATH")]
                                                    if p]))
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                          env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, (f"the build against torch {gpu_machine_torch.VERSION} failed:\n"
                                  f"{(proc.stdout + proc.stderr)[-6000:]}")
    return dest, env


def _run(args, built, timeout):
    dest, env = built
    return subprocess.run([sys.executable, *args], cwd=dest, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_copy_runs_on_the_gpu_machines_torch(built_copy):
    proc = _run(["-c", "import torch, cbam_fused, cbam_fused._sim as sim; "
                 "print(torch.__version__, cbam_fused.__file__, sim.__file__)"], built_copy, 300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    version, package, sim = proc.stdout.split()
    assert version.startswith(gpu_machine_torch.VERSION), version
    assert package.startswith(built_copy[0]) and sim.startswith(built_copy[0]), (package, sim)


def test_self_test_passes_on_the_gpu_machines_torch(built_copy):
    proc = _run(["-m", "cbam_fused"], built_copy, 600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # its report names the torch it runs on and the one it was built against, and the simulator
    assert proc.stdout.count(f"torch {gpu_machine_torch.VERSION}") == 2, proc.stdout[-4000:]
    assert "SIMT simulator (tests): built" in proc.stdout, proc.stdout[-4000:]
    assert "self-test on cpu: PASS" in proc.stdout, proc.stdout[-4000:]


def test_torch_facing_tests_pass_on_the_gpu_machines_torch(built_copy):
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                 *[os.path.join("tests", t) for t in TORCH_FACING]], built_copy, 2400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
