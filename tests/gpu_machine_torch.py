"""The torch of the GPU machines, for the tests that build and run the package against it.

The GPU machines (the device tool's H100 and H200; /work/.library/device/KINDS.md) have their own
torch, older than the one pinned here: 2.11.0+cu130 with torchvision 0.26.0 on Python 3.12. Its
extension build gives nvcc -std=c++17 (torch 2.14 gives C++20), its headers lack what later
releases added to ATen, and its Python API lacks what they added to torch.library, torch.compile
and torch.export. A source that builds and passes here can fail there, and a failed build or
import costs a GPU session everything it was lent for. So the tests build and run against that
torch too: test_codegen.py compiles the launchers and host sources against its headers,
test_gpu_machine_torch.py builds the package (CPU-only) against it and runs its self-test and
the tests of the torch-facing code with it.

That torch comes from the package index: `pip install --no-deps --target` of those two versions
for the running interpreter (PyPI's torch 2.11.0 is the CUDA 13.0 build, as on the GPU machines;
about 530 MB to download, 1.2 GB installed; its headers are the same for every Python), into a
cache folder (CBAM_GPU_TORCH_CACHE, default ~/.cache/cbam_fused), so it is fetched once per
machine. Put first on PYTHONPATH, it shadows the pinned torch; its CUDA libraries are the pinned
torch's nvidia packages (the same CUDA 13). Where it cannot be had (no registry), the tests that
need it skip and say why."""
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile

VERSION = "2.11.0"  # torch on the GPU machines (2.11.0+cu130)
TORCHVISION = "0.26.0"  # theirs, built for it (the pinned 0.29 needs torch 2.14)


def cache_dir():
    """Where that torch is kept: CBAM_GPU_TORCH_CACHE, else ~/.cache/cbam_fused."""
    return os.environ.get("CBAM_GPU_TORCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cbam_fused")


def _install(dest):
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
           "--no-compile", "--quiet", "--disable-pip-version-check", "--target", dest,
           f"torch=={VERSION}", f"torchvision=={TORCHVISION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install torch=={VERSION} torchvision=={TORCHVISION} failed (exit "
                           f"{proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")


def site():
    """A folder holding the GPU machines' torch and torchvision for this interpreter (first on
    PYTHONPATH, they shadow the pinned ones); installed on the first call of a machine. Raises
    RuntimeError or OSError with the reason when it cannot be had."""
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    root = os.path.join(cache_dir(), f"torch-{VERSION}-{py}")
    done = os.path.join(root, "torch", "version.py")
    if not os.path.isfile(done):
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", dir=cache_dir())
        try:
            _install(tmp)
            shutil.rmtree(root, ignore_errors=True)  # (a partial folder of an older layout)
            os.replace(tmp, root)  # whole or not at all
        except OSError:
            if not os.path.isfile(done):  # (else another process installed it meanwhile)
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with open(done) as f:
        got = re.search(r"__version__ = '([^']+)'", f.read())
    if got is None or not got.group(1).startswith(VERSION):
        raise RuntimeError(f"{root} holds torch {got and got.group(1)}, not {VERSION}")
    return root


@functools.lru_cache(maxsize=None)
def site_or_reason():
    """(site(), None), or (None, why it cannot be had); asked once a process."""
    try:
        return site(), None
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return None, f"torch {VERSION} (the GPU machines' torch) not available: {e}"


def headers_or_reason():
    """((include dirs as that torch's include_paths gives them, the -std flag its extension build
    gives nvcc), None), or (None, why they cannot be had)."""
    root, why = site_or_reason()
    if root is None:
        return None, why
    with open(os.path.join(root, "torch", "utils", "cpp_extension.py")) as f:
        m = re.search(r"cuda_cflags = \['(-std=c\+\+\d+)'\]", f.read())
    if m is None:
        return None, f"no nvcc -std flag found in torch {VERSION}'s cpp_extension.py"
    inc = os.path.join(root, "torch", "include")
    return ([inc, os.path.join(inc, "torch", "csrc", "api", "include")], m.group(1)), None
