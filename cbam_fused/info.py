"""`python -m cbam_fused`: what this installation is and whether it works here.

Reports the versions, what the build compiled (cbam_fused/_build_info.py, written by setup.py:
CUDA or not, the GPU architectures), which ops run their own CUDA kernels, whether the simulator
is built, and for each visible GPU whether the compiled architectures cover it. Then a self-test
on every device: a CBAM forward and backward against the float64 reference on the CPU. Exit
status 1 when a check fails (a GPU the build does not cover, a self-test out of tolerance, or a
GPU while the CUDA kernels are missing), so scripts can rely on it.

    python -m cbam_fused            a report
    python -m cbam_fused --json     the same as JSON
"""
import argparse
import json
import platform
import sys
from typing import Dict, List, Optional, Tuple

import torch

# float32 on a device against float64 on the CPU: a few ulps of the largest gradient
SELF_TEST_TOL = 1e-4


def build_info() -> Optional[dict]:
    try:
        from ._build_info import BUILD
    except ImportError:
        return None
    return dict(BUILD)


def parse_arch_list(arch_list: str) -> List[Tuple[int, int, bool]]:
    """'8.0;9.0+PTX' (TORCH_CUDA_ARCH_LIST syntax, ';' or ' ' separated) as [(8, 0, False),
    (9, 0, True)]: (major, minor, also PTX). Names such as 'Hopper' are not resolved."""
    out = []
    for item in arch_list.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item[:-4] if ptx else item
        major, _, minor = num.partition(".")
        minor = "".join(ch for ch in minor if ch.isdigit())  # '9.0a' -> 0
        out.append((int(major), int(minor or 0), ptx))
    return out


def arch_covers(arch_list: str, capability: Tuple[int, int]) -> Optional[str]:
    """How a build for arch_list runs on a GPU of this compute capability: 'sm_XY' (machine code
    for it, or for a lower minor of the same major), 'PTX compute_XY' (JIT-compiled from PTX of
    an older or equal architecture), or None (no kernel image: every launch would fail)."""
    major, minor = capability
    archs = parse_arch_list(arch_list)
    sass = [(a, b) for a, b, _ in archs if a == major and b <= minor]
    if sass:
        a, b = max(sass)
        return f"sm_{a}{b}"
    ptx = [(a, b) for a, b, p in archs if p and (a, b) <= (major, minor)]
    if ptx:
        a, b = max(ptx)
        return f"PTX compute_{a}{b}"
    return None


def _ops_native() -> Dict[str, bool]:
    from . import _ops
    return {op: _ops.has_cuda_kernel(op) for op in _ops.ALL_OPS}


def _sim_built() -> bool:
    try:
        from . import _sim  # noqa: F401
    except ImportError:
        return False
    return True


def _self_test_net():
    """Three CBAM blocks (with BatchNorm) that between them run every op: the official block
    (channel first), spatial first, and spatial first with the lp / lse pools too."""
    from . import CBAM
    return torch.nn.Sequential(
        CBAM(32, hidden_channels=8),
        CBAM(32, hidden_channels=8, arrangement="spatial_first"),
        CBAM(32, 4, ["avg", "max", "lp", "lse"], hidden_channels=8,
             arrangement="spatial_first"))


def self_test(device: torch.device) -> dict:
    """_self_test_net in training mode on `device` in float32, forward and the gradients of x
    and every parameter, against the same network in float64 on the CPU."""
    from .testing import rel_err_max

    gen = torch.Generator().manual_seed(0)
    ref = _self_test_net().double().train()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) - 0.5)
    mod = _self_test_net().to(device).train()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(4, 32, 9, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    res = dict(device=str(device), passed=False, max_rel_err=None, error=None)
    try:
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        want = [yr, *torch.autograd.grad(yr, [xr, *ref.parameters()], g)]
        xd = x.float().to(device).requires_grad_()
        yd = mod(xd)
        got = [yd, *torch.autograd.grad(yd, [xd, *mod.parameters()], g.float().to(device))]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        err = rel_err_max(got, want)
        res.update(max_rel_err=err, passed=err < SELF_TEST_TOL)
    except Exception as e:  # noqa: BLE001  reported, not raised: this is a diagnostic
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return res


def collect(run_self_test: bool = True) -> dict:
    from . import __version__
    build = build_info()
    native = _ops_native()
    info = dict(
        cbam_fused=__version__, python=platform.python_version(), torch=torch.__version__,
        torch_cuda=torch.version.cuda, build=build, ops_native_cuda=native,
        simulator_built=_sim_built(), gpus=[], self_tests=[], problems=[])
    if (build or {}).get("simulator") is False and info["simulator_built"]:
        info["problems"].append(
            "the last build left the simulator out (CBAM_FUSED_BUILD_SIM=0), but a cbam_fused._sim "
            "from an earlier build is present: its kernels may be older than _C's; rebuild "
            "without CBAM_FUSED_BUILD_SIM=0 or delete it")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            archs = (build or {}).get("cuda_arch_list")
            runs_as = arch_covers(archs, cap) if archs else None
            info["gpus"].append(dict(index=i, name=torch.cuda.get_device_name(i),
                                     capability=f"{cap[0]}.{cap[1]}", runs_as=runs_as))
            if not all(native.values()):
                info["problems"].append(
                    f"GPU {i} present but cbam_fused was built without its CUDA kernels "
                    f"(missing: {[k for k, v in native.items() if not v]}): CUDA tensors run the "
                    f"slow PyTorch fallback; rebuild with a CUDA toolkit")
            elif archs and runs_as is None:
                info["problems"].append(
                    f"GPU {i} ({info['gpus'][-1]['name']}, sm_{cap[0]}{cap[1]}) is not covered by "
                    f"the compiled architectures {archs}: rebuild with "
                    f"TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")
    if run_self_test:
        devices = [torch.device("cpu")] + [torch.device("cuda", g["index"]) for g in info["gpus"]]
        for d in devices:
            r = self_test(d)
            info["self_tests"].append(r)
            if not r["passed"]:
                info["problems"].append(
                    f"self-test on {d} failed: " + (r["error"] or
                                                   f"max rel. error {r['max_rel_err']:.2g} "
                                                   f">= {SELF_TEST_TOL}"))
    return info


def report(info: dict) -> str:
    b = info["build"]
    native = info["ops_native_cuda"]
    lines = [
        f"cbam_fused {info['cbam_fused']}  (Python {info['python']}, torch {info['torch']}, "
        f"torch CUDA {info['torch_cuda'] or '-'})",
        "build: " + ("unknown (no cbam_fused/_build_info.py)" if b is None else
                     f"CUDA kernels for {b['cuda_arch_list']} (nvcc {b['nvcc']}), against torch "
                     f"{b['torch']}, {b['built_utc']}" if b["cuda"] else
                     f"CPU only, against torch {b['torch']}, {b['built_utc']}"),
        f"ops with their own CUDA kernel: {sum(native.values())}/{len(native)}",
        "SIMT simulator (tests): " + ("built" if info["simulator_built"] else "not built") + (
            " (left out: CBAM_FUSED_BUILD_SIM=0)" if (b or {}).get("simulator") is False else ""),
    ]
    if not info["gpus"]:
        lines.append("GPUs: none visible")
    for g in info["gpus"]:
        lines.append(f"GPU {g['index']}: {g['name']}, compute capability {g['capability']}: "
                     + (f"runs as {g['runs_as']}" if g["runs_as"] else "NOT covered by the build"))
    for t in info["self_tests"]:
        lines.append(f"self-test on {t['device']}: " + (
            f"PASS (max rel. error {t['max_rel_err']:.1e})" if t["passed"] else
            f"FAIL ({t['error'] or 'max rel. error %.2g' % t['max_rel_err']})"))
    for p in info["problems"]:
        lines.append(f"PROBLEM: {p}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cbam_fused", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-self-test", action="store_true", help="skip the self-tests")
    args = p.parse_args(argv)
    info = collect(run_self_test=not args.no_self_test)
    print(json.dumps(info, indent=2) if args.json else report(info))
    return 1 if info["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
