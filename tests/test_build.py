"""The build's toolkit discovery (setup.py): a wrapper nvcc on PATH, CUDA_HOME, version checks;
its environment switches."""
import importlib.util
import os
import stat
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_mod():
    spec = importlib.util.spec_from_file_location("cbam_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() only runs as __main__
    return mod


def _fake_toolkit(root):
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "include"))
    nvcc = os.path.join(root, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.99'\n")
    os.chmod(nvcc, os.stat(nvcc).st_mode | stat.S_IEXEC)
    open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    return nvcc


def test_wrapper_script_on_path_leads_to_the_real_toolkit(setup_mod, tmp_path, monkeypatch):
    real = tmp_path / "opt" / "cuda-12.4"
    nvcc = _fake_toolkit(str(real))
    wrapper_dir = tmp_path / "usr" / "local" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    monkeypatch.setattr(setup_mod.glob, "glob", lambda *a, **k: [])
    monkeypatch.setattr(setup_mod, "_is_toolkit_root",
                        lambda p: bool(p) and os.path.isfile(os.path.join(p, "bin", "nvcc"))
                        and os.path.isfile(os.path.join(p, "include", "cuda_runtime.h"))
                        and str(tmp_path) in os.path.realpath(p))
    assert setup_mod.find_cuda_home() == os.path.realpath(str(real))
    assert setup_mod.nvcc_version(str(real)) == (12, 4)


def test_bad_cuda_home_is_named(setup_mod, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        setup_mod.find_cuda_home()
    assert f"CUDA_HOME={tmp_path} is not a CUDA toolkit root" in capsys.readouterr().err


def test_major_version_mismatch_names_both(setup_mod, tmp_path, monkeypatch, capsys):
    root = tmp_path / "cuda"
    _fake_toolkit(str(root))
    monkeypatch.setenv("CUDA_HOME", str(root))
    monkeypatch.delenv("CBAM_FUSED_BUILD_CUDA", raising=False)
    import torch

    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch never looks for nvcc")
    if torch.version.cuda.startswith("12."):
        pytest.skip("the fake toolkit is CUDA 12, like this torch")
    with pytest.raises(SystemExit):
        setup_mod.want_cuda()
    err = capsys.readouterr().err
    assert "CUDA 12.4" in err and f"built for CUDA {torch.version.cuda}" in err


def test_forced_off_and_bad_values(setup_mod, monkeypatch, capsys):
    monkeypatch.setenv("CBAM_FUSED_BUILD_CUDA", "0")
    assert setup_mod.want_cuda() is None
    monkeypatch.setenv("CBAM_FUSED_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit):
        setup_mod.want_cuda()
    assert "CBAM_FUSED_BUILD_CUDA must be 0 or 1" in capsys.readouterr().err


def test_the_simulator_can_be_left_out(setup_mod, monkeypatch, capsys):
    """CBAM_FUSED_BUILD_SIM=0 builds _C alone (the GPU protocol's build when no later step runs
    the whole suite); the default builds the simulator too; other values are refused."""
    monkeypatch.setenv("CBAM_FUSED_BUILD_CUDA", "0")
    monkeypatch.setattr(setup_mod, "write_build_info", lambda cuda_home: None)  # (in the tree)
    names = {}
    for flag in (None, "1", "0"):
        if flag is None:
            monkeypatch.delenv("CBAM_FUSED_BUILD_SIM", raising=False)
        else:
            monkeypatch.setenv("CBAM_FUSED_BUILD_SIM", flag)
        names[flag] = [e.name for e in setup_mod.extensions()]
    assert names[None] == names["1"] == ["cbam_fused._C", "cbam_fused._sim"], names
    assert names["0"] == ["cbam_fused._C"], names
    monkeypatch.setenv("CBAM_FUSED_BUILD_SIM", "no")
    with pytest.raises(SystemExit):
        setup_mod.extensions()
    assert "CBAM_FUSED_BUILD_SIM must be 0 or 1, got 'no'" in capsys.readouterr().err


def test_pip_include_dirs_carry_the_headers_torch_needs(setup_mod):
    import torch

    if torch.version.cuda is None:
        pytest.skip("CPU-only torch")
    dirs = setup_mod.nvidia_pip_include_dirs()
    assert setup_mod.header_dirs("cusparse.h", dirs), dirs
    assert sys.modules.get("cbam_setup") is None


def test_needs_cuda_tests_are_gpu_tests():
    """Every test that needs a CUDA device carries the `gpu` marker (conftest), so that the GPU
    run's `pytest -m gpu` selects it: the spatial head's CUDA comparisons included."""
    import subprocess
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                          "-p", "no:cacheprovider", "tests/test_spatial_head.py",
                          "tests/test_spatial_head_backward.py"],
                         cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert any("test_cuda_kernel_matches_the_cpu_kernel" in i for i in ids), out.stdout[-2000:]
    assert any("test_cuda_kernels_match_the_cpu_kernel" in i for i in ids), out.stdout[-2000:]
    assert all("cuda" in i for i in ids), [i for i in ids if "cuda" not in i][:5]
