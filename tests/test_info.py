"""`python -m cbam_fused` (cbam_fused/info.py): the installation report, the architecture check
and the self-test, on this machine and with a made-up GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import cbam_fused
from cbam_fused import info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("archs,cap,want", [
    ("8.0;9.0+PTX", (8, 0), "sm_80"),
    ("8.0;9.0+PTX", (8, 6), "sm_80"),       # same major, newer minor: the sm_80 machine code
    ("8.0;9.0+PTX", (9, 0), "sm_90"),
    ("8.0;9.0+PTX", (10, 0), "PTX compute_90"),   # newer major: JIT from the PTX
    ("8.0;9.0+PTX", (12, 0), "PTX compute_90"),
    ("8.0;9.0+PTX", (7, 5), None),          # older than everything compiled
    ("8.0 9.0", (10, 0), None),             # no PTX: nothing for a newer major
    ("7.5;8.6", (8, 0), None),              # sm_86 code does not run on sm_80
    ("9.0a", (9, 0), "sm_90"),
    ("7.0+PTX;9.0", (8, 9), "PTX compute_70"),
])
def test_arch_covers(archs, cap, want):
    assert info.arch_covers(archs, cap) == want


def test_report_and_self_test_here():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "cbam_fused", "--json"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(proc.stdout)
    assert rep["cbam_fused"] == cbam_fused.__version__ and rep["torch"] == torch.__version__
    b = rep["build"]
    assert b is not None and b["torch"] == torch.__version__  # written by this build's setup.py
    assert set(rep["ops_native_cuda"]) == set(cbam_fused._ops.ALL_OPS)
    assert rep["gpus"] == [] and rep["problems"] == []
    (t,) = rep["self_tests"]
    assert t["device"] == "cpu" and t["passed"] and t["max_rel_err"] < info.SELF_TEST_TOL
    text = subprocess.run([sys.executable, "-m", "cbam_fused"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT).stdout
    assert "self-test on cpu: PASS" in text and "GPUs: none visible" in text


def test_self_test_runs_every_op():
    """The self-test's network launches every op's kernel (here in the simulator), so on a GPU it
    checks all of them."""
    from cbam_fused import testing
    try:
        from cbam_fused import _sim  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.skip("the simulator build (cbam_fused._sim) is missing")
    with testing.use_simulator():
        res = info.self_test(torch.device("cpu"))
        names = {s["name"] if isinstance(s, dict) else s.name for s in testing.simulator_stats()}
    assert res["passed"], res
    assert names == set(cbam_fused._ops.ALL_OPS), set(cbam_fused._ops.ALL_OPS) ^ names


def test_failed_self_test_sets_the_exit_status(monkeypatch, capsys):
    monkeypatch.setattr(info, "SELF_TEST_TOL", 0.0)  # nothing passes
    assert info.main([]) == 1
    out = capsys.readouterr().out
    assert "self-test on cpu: FAIL" in out and "PROBLEM: self-test on cpu failed" in out


def test_a_gpu_the_build_does_not_cover_is_a_problem(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Made-up T4")
    monkeypatch.setattr(info, "build_info", lambda: dict(
        cuda=True, torch=torch.__version__, torch_cuda="13.0", nvcc="13.0",
        cuda_arch_list="8.0;9.0+PTX", built_utc="-"))
    monkeypatch.setattr(info, "_ops_native", lambda: {op: True for op in cbam_fused._ops.ALL_OPS})
    rep = info.collect(run_self_test=False)
    (g,) = rep["gpus"]
    assert g["capability"] == "7.5" and g["runs_as"] is None
    (p,) = rep["problems"]
    assert "not covered" in p and "TORCH_CUDA_ARCH_LIST=7.5" in p
    assert "NOT covered by the build" in info.report(rep)
    # the same GPU with the kernels missing altogether: the fallback is the problem named
    monkeypatch.setattr(info, "_ops_native", lambda: {op: False for op in cbam_fused._ops.ALL_OPS})
    (p,) = info.collect(run_self_test=False)["problems"]
    assert "without its CUDA kernels" in p


def test_a_simulator_the_last_build_left_out_is_a_problem(monkeypatch):
    """CBAM_FUSED_BUILD_SIM=0 builds no simulator; one left from an earlier build may run older
    kernels than _C, so the report says so (and that a build without one is no problem)."""
    built = dict(cuda=False, torch=torch.__version__, torch_cuda=None, nvcc=None,
                 cuda_arch_list=None, simulator=False, built_utc="-")
    monkeypatch.setattr(info, "build_info", lambda: built)
    monkeypatch.setattr(info, "_sim_built", lambda: True)
    rep = info.collect(run_self_test=False)
    (p,) = rep["problems"]
    assert "CBAM_FUSED_BUILD_SIM=0" in p and "earlier build" in p
    monkeypatch.setattr(info, "_sim_built", lambda: False)
    rep = info.collect(run_self_test=False)
    assert rep["problems"] == []
    assert "not built (left out: CBAM_FUSED_BUILD_SIM=0)" in info.report(rep)
