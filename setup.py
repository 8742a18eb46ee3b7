"""Build of cbam_fused: two torch C++ extensions.

cbam_fused._C     the op schemas (always) and, in a CUDA build, the CUDA kernels compiled by nvcc.
cbam_fused._sim   the SIMT simulator: the same kernel and launcher sources compiled by g++ and run
                  on the CPU (test-only, built everywhere unless CBAM_FUSED_BUILD_SIM=0).

Environment:
  CBAM_FUSED_BUILD_CUDA=0|1  force the CUDA build off or on (default: on when torch is a CUDA build
                             and a CUDA toolkit is found, with or without a visible GPU).
  TORCH_CUDA_ARCH_LIST       the architectures to build for; with no GPU visible and none set,
                             sm_80 and sm_90 plus PTX.
  CBAM_FUSED_BUILD_SIM=0     leave the simulator out (default 1): a GPU build that runs only the
                             CUDA tests and benchmarks (scripts/gpu_check.py's lease) is done
                             sooner, since the two extensions build one after the other.
  MAX_JOBS                   parallel compile jobs (ninja).
  CUDA_HOME / CUDA_PATH      the toolkit root, when the search below should not guess.

Install with `pip install --no-build-isolation -e .` (build isolation would install a second torch).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _fail(msg):
    sys.stderr.write(f"\ncbam_fused build error: {msg}\n\n")
    raise SystemExit(1)


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _real_nvcc_roots():
    """Toolkit roots behind the nvcc on PATH: the binary itself, or the one a wrapper script execs."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return []
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):  # a wrapper script: look for the nvcc path it runs
            for m in re.finditer(rb"(/[^\s\"']+/bin/nvcc)\b", head):
                roots.append(os.path.dirname(os.path.dirname(m.group(1).decode())))
    except OSError:
        pass
    return roots


def find_cuda_home():
    """A toolkit root with bin/nvcc and include/cuda_runtime.h, or None.

    torch guesses from `which nvcc`, which on these machines is a wrapper in /usr/local/bin and
    gives /usr/local; so look for a real root first and hand it to torch through CUDA_HOME."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if not _is_toolkit_root(root):
                _fail(f"{var}={root} is not a CUDA toolkit root (no bin/nvcc or "
                      f"include/cuda_runtime.h there)")
            return root
    candidates = _real_nvcc_roots() + ["/usr/local/cuda"] + sorted(
        glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _is_toolkit_root(root):
            return os.path.realpath(root)
    return None


def nvcc_version(cuda_home):
    out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        _fail(f"cannot read the CUDA version from `nvcc --version`:\n{out}")
    return int(m.group(1)), int(m.group(2))


def nvidia_pip_include_dirs():
    """Include folders of the nvidia-* pip packages that come with a CUDA build of torch.

    The toolkit on these machines lacks headers (cusparse.h, cublas_v2.h, ...) that torch's CUDA
    headers include; the pip packages carry them."""
    dirs = []
    for sp in sys.path:
        base = os.path.join(sp, "nvidia")
        if not os.path.isdir(base):
            continue
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def header_dirs(name, dirs):
    return [d for d in dirs if os.path.isfile(os.path.join(d, name))]


def want_cuda():
    import torch

    forced = os.environ.get("CBAM_FUSED_BUILD_CUDA")
    if forced not in (None, "", "0", "1"):
        _fail(f"CBAM_FUSED_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return None
    if torch.version.cuda is None:
        if forced == "1":
            _fail(f"CBAM_FUSED_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        return None
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if forced == "1":
            _fail("CBAM_FUSED_BUILD_CUDA=1 but no CUDA toolkit found: set CUDA_HOME to a folder "
                  "with bin/nvcc and include/cuda_runtime.h")
        print("cbam_fused: no CUDA toolkit found, building the CPU-only package", file=sys.stderr)
        return None
    major, minor = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if major != torch_major:
        _fail(f"nvcc in {cuda_home} is CUDA {major}.{minor} but torch {torch.__version__} was built "
              f"for CUDA {torch.version.cuda}: the major versions must match (set CUDA_HOME to a "
              f"matching toolkit, or CBAM_FUSED_BUILD_CUDA=0 for a CPU-only build)")
    return cuda_home


def arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return  # torch's cpp_extension reads it
    import torch

    if torch.cuda.is_available():  # the visible GPUs, PTX for the newest (as torch would)
        caps = sorted({torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        archs = [f"{a}.{b}" for a, b in caps]
        archs[-1] += "+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


BUILD_INFO = os.path.join(HERE, "cbam_fused", "_build_info.py")


def write_build_info(cuda_home):
    """cbam_fused/_build_info.py (not in git): what this build compiled, for
    `python -m cbam_fused` and for the check that the kernels cover the GPU at hand."""
    import datetime

    import torch

    info = dict(cuda=bool(cuda_home), torch=torch.__version__, torch_cuda=torch.version.cuda,
                nvcc="%d.%d" % nvcc_version(cuda_home) if cuda_home else None,
                cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda_home else None,
                simulator=want_sim(),
                built_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"))
    text = ("# Written by setup.py when the extension is built (not in git).\n"
            f"BUILD = {info!r}\n")
    old = open(BUILD_INFO).read() if os.path.exists(BUILD_INFO) else None
    if old is None or old.split("built_utc")[0] != text.split("built_utc")[0]:
        with open(BUILD_INFO, "w") as f:
            f.write(text)


# The sources of the two extensions. _C: the op schemas and CPU kernels (every build), plus the
# CUDA registration and the launchers (a CUDA build); _sim: the simulator, which compiles the
# launchers itself (csrc/sim/kernels_sim.cpp includes them).
C_SOURCES = ["csrc/ops.cpp", "csrc/block_forward.cpp", "csrc/block_backward.cpp",
             "csrc/cpu/pool_rows.cpp"]
C_CUDA_SOURCES = ["csrc/register_cuda.cpp"]


def _sources(folder, pattern):
    """The files of csrc/<folder> matching pattern, as paths relative to this folder (setuptools'
    form), whatever the working directory."""
    found = glob.glob(os.path.join(HERE, "csrc", folder, pattern))
    return sorted(os.path.relpath(p, HERE) for p in found)


def launcher_sources():
    return _sources("launchers", "*.cu")


def sim_sources():
    return _sources("sim", "*.cpp")


def want_sim():
    """Whether to build the simulator extension (CBAM_FUSED_BUILD_SIM, default 1)."""
    flag = os.environ.get("CBAM_FUSED_BUILD_SIM", "1")
    if flag not in ("0", "1"):
        _fail(f"CBAM_FUSED_BUILD_SIM must be 0 or 1, got {flag!r}")
    return flag == "1"


def opt_flags():
    return ["-O0", "-g"] if os.environ.get("CBAM_FUSED_DEBUG") == "1" else ["-O3"]


def cxx_flags():
    """g++'s flags for the host sources (both extensions)."""
    # C++20 for the host sources whatever torch's own default is: the simulator needs it
    # (std::source_location), torch >= 2.14 asks for it anyway, and older torch (2.11 on the GPU
    # machines) would add -std=c++17, which cpp_extension leaves out when a -std flag is given.
    # nvcc keeps torch's choice.
    flags = opt_flags() + ["-std=c++20", "-Wall"]
    if os.environ.get("CBAM_FUSED_WERROR") == "1":  # CI (scripts/dev.sh): host warnings fail
        flags.append("-Werror")
    return flags


def nvcc_flags():
    """nvcc's flags for the launchers, besides torch's own (its -std and -D flags)."""
    return opt_flags() + ["--expt-relaxed-constexpr", "-lineinfo",
                          "-Xcompiler", "-Wall", "-Werror=all-warnings"]


def extensions():
    cuda_home = want_cuda()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension computes its own guess
        arch_list()
    write_build_info(cuda_home)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include = [os.path.join(HERE, "csrc")]
    exts = []
    if cuda_home:
        pip_inc = nvidia_pip_include_dirs()
        toolkit_inc = os.path.join(cuda_home, "include")
        for needed in ("cusparse.h", "cublas_v2.h"):
            if not header_dirs(needed, [toolkit_inc] + pip_inc):
                _fail(f"{needed} is in neither {toolkit_inc} nor the nvidia pip packages' include "
                      f"folders ({pip_inc or 'none found'}); torch's CUDA headers need it. Install "
                      f"the matching nvidia-* wheels (they come with the CUDA build of torch)")
        exts.append(CUDAExtension(
            "cbam_fused._C", sources=C_SOURCES + C_CUDA_SOURCES + launcher_sources(),
            include_dirs=include + [toolkit_inc] + pip_inc,
            define_macros=[("CBAM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
        ))
    else:
        exts.append(CppExtension("cbam_fused._C", sources=C_SOURCES, include_dirs=include,
                                 extra_compile_args={"cxx": cxx_flags()}))

    stale = glob.glob(os.path.join(HERE, "cbam_fused", "_sim*.so"))
    if not want_sim() and stale:
        sys.stderr.write(f"cbam_fused build: CBAM_FUSED_BUILD_SIM=0 leaves {stale[0]} from an "
                         "earlier build as it is (its kernels may be older than these sources)\n")
    if sim_sources() and want_sim():
        exts.append(CppExtension(
            "cbam_fused._sim", sources=sim_sources(), include_dirs=include,
            define_macros=[("CBAM_SIMULATOR", "1")],
            extra_compile_args={"cxx": cxx_flags()}))
    return exts


def main():
    exts = extensions()  # first: it sets CUDA_HOME before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="cbam_fused",
        version="0.1.0",
        description="Fused CUDA kernels for CBAM (Convolutional Block Attention Module)",
        packages=find_packages(include=["cbam_fused", "cbam_fused.*"]),
        package_data={"cbam_fused": ["py.typed"]},  # PEP 561: the package ships its type hints
        ext_modules=exts,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        python_requires=">=3.10",
        install_requires=["torch>=2.6", "numpy"],
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
