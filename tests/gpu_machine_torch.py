"""The torch of the GPU machines, for the tests that compile the sources against it.

The GPU machines (the device tool's H100 and H200; /work/.library/device/KINDS.md) have their own
torch, older than the one pinned here: 2.11.0+cu130 on Python 3.12, which gives nvcc -std=c++17
(torch 2.14 gives C++20) and lacks what later releases added to ATen's headers. A source that
builds here can fail to build there, and a failed build costs a GPU session its kernels. So the
tests compile the sources against that torch's headers too (test_codegen.py, test_gpu_build.py).

The headers come from the package index: `pip download` of that version's wheel for that Python
(about 530 MB, PyPI's torch 2.11.0 is the CUDA 13.0 build, as on the GPU machines), of which
torch/include and torch/utils/cpp_extension.py are kept in a cache folder (CBAM_GPU_TORCH_CACHE,
default ~/.cache/cbam_fused), so it is fetched once per machine. Where it cannot be had (no
registry), the tests that need it skip and say why."""
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

VERSION = "2.11.0"  # torch on the GPU machines (2.11.0+cu130)
PYTHON = "3.12"  # their Python
_KEEP = ("torch/include/", "torch/utils/cpp_extension.py")


def cache_dir():
    """Where this torch's headers are kept: CBAM_GPU_TORCH_CACHE, else ~/.cache/cbam_fused."""
    base = os.environ.get("CBAM_GPU_TORCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cbam_fused")
    return os.path.join(base, f"torch-{VERSION}-py{PYTHON}")


def _download(dest):
    """The wheel's kept files, extracted into dest (a new folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"torch=={VERSION}", "--no-deps",
               "--only-binary=:all:", "--python-version", PYTHON,
               "--platform", "manylinux_2_28_x86_64", "--quiet", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"pip download torch=={VERSION} failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            z.extractall(dest, [n for n in z.namelist() if n.startswith(_KEEP)])


def headers():
    """(include dirs as torch's include_paths gives them, the -std flag its extension build gives
    nvcc) of the GPU machines' torch; fetched on the first call of a machine. Raises RuntimeError
    with the reason when it cannot be had."""
    root = cache_dir()
    if not os.path.isdir(os.path.join(root, "torch", "include")):
        os.makedirs(os.path.dirname(root), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", dir=os.path.dirname(root))
        try:
            _download(tmp)
            os.replace(tmp, root)  # whole or not at all (another process may have won: fine)
        except OSError:
            if not os.path.isdir(os.path.join(root, "torch", "include")):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(root, "torch", "utils", "cpp_extension.py")) as f:
        m = re.search(r"cuda_cflags = \['(-std=c\+\+\d+)'\]", f.read())
    if m is None:
        raise RuntimeError(f"no nvcc -std flag found in torch {VERSION}'s cpp_extension.py")
    inc = os.path.join(root, "torch", "include")
    return [inc, os.path.join(inc, "torch", "csrc", "api", "include")], m.group(1)


@functools.lru_cache(maxsize=None)
def headers_or_reason():
    """headers(), or (None, why they cannot be had); asked once a process."""
    try:
        return headers(), None
    except (RuntimeError, OSError, subprocess.TimeoutExpired, zipfile.BadZipFile) as e:
        return None, f"torch {VERSION}'s headers (the GPU machines' torch) not available: {e}"
