"""Code generation of the CUDA kernels, checked on the CPU: every launcher source compiled by nvcc
for sm_90 (the H100 / H200) with `ptxas -v`, keeping the PTX.

Register budget: ptxas's report gives each kernel's registers, its stack frame (arrays the
compiler could not keep in registers) and the bytes it spills to local memory. Local memory costs
memory instructions in the inner loop, so the kernels of the hot paths must use none; the few
variants that do (outside the two configurations of issue 4) are listed with the most bytes they
may use, so a change that makes any kernel use more fails here, in CI, without a GPU.

Vector width: the simulator checks that a kernel calls ld_vec / st_vec on aligned addresses,
not what nvcc makes of them. nvcc 13.0 split the 16-byte stores of apply_gates and grad_input
into four 4-byte stores (the dialect now writes them as PTX); these tests read the PTX of every
kernel instance on the vector path (VEC * sizeof(T) == 16) and require 16-byte global loads, and
16-byte global stores in the kernels that write x-sized outputs.

The build on the GPU machines: their torch is older than the one pinned here (2.11, which gives
nvcc -std=c++17; 2.14 gives C++20), and a source that builds here can fail there, costing a GPU
session its kernels. So nvcc compiles the launchers against that torch's headers and -std
(gpu_machine_torch.py fetches them once), with the build's flags (setup.py nvcc_flags,
-Werror=all-warnings included), and g++ checks the host sources of both extensions against them
too. Where those headers cannot be had, nvcc compiles against the installed torch at its -std, and
the two tests of the GPU machines' build skip, saying why.

Skipped without an nvcc (a CPU-only setup)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

import gpu_machine_torch
import sass_loops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what torch's extension build adds to nvcc's flags (its COMMON_NVCC_FLAGS' macros and the
# extension's name)
TORCH_NVCC_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr", "-DTORCH_API_INCLUDE_EXTENSION_H",
                      "-DTORCH_EXTENSION_NAME=_C")

# (kernel name pattern, most local-memory bytes allowed: stack frame, spill stores or loads),
# first match wins; every other kernel: 0. grad_input at float64 with one vector row in flight:
# 8 bytes measured with nvcc 13.0. (The lp / lse variant with 16-bit types spilled up to 28
# bytes until its k sides were staged lane-fastest; now none.)
ALLOWED = [
    (r"grad_input_kernel<double, 2, 1, false, (false|true), -?\d, double>", 16),
    # the folded rows of 16-bit channels-first maps of odd size (7x7: 8 rows of 49 a vector
    # row), at 80 registers: measured stack frames of 8 bytes at U = 1, 24 at U = 2 (32 with
    # lp / lse), spill loads up to 44
    (r"grad_input_kernel<(c10::)?(Half|BFloat16), 8, [12], (false|true), true, -1, float>", 48),
    # the float64 spatial head: the registers saved around the calls of double division's and
    # exp's slow paths, once per position (measured: 40 bytes staged, 72 unstaged)
    (r"spatial_head_kernel<double, (true|false)>", 72),
    # its backward's unstaged path (a wide map's taps read global memory; float32 and float64):
    # registers saved around the division's slow-path call (measured: 28 bytes)
    (r"spatial_head_backward_kernel<(float|double), false>", 28),
]


def _torch_nvcc_std():
    """The -std flag torch.utils.cpp_extension passes to nvcc."""
    import inspect

    import torch.utils.cpp_extension as ext
    m = re.search(r"cuda_cflags = \['(-std=c\+\+\d+)'\]", inspect.getsource(ext))
    return m.group(1) if m else "-std=c++17"


def _setup_mod():
    spec = importlib.util.spec_from_file_location("cbam_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# every launcher source the CUDA build compiles
SOURCES = tuple(os.path.basename(p) for p in _setup_mod().launcher_sources())


def _demangle(names):
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                          check=True).stdout.splitlines()


def _torch_for_nvcc():
    """(include dirs, -std flag, what they are) of the torch the launchers are compiled against:
    the GPU machines' (gpu_machine_torch.py) where its headers can be had, since that is where
    the kernels run; else the installed one."""
    got, why = gpu_machine_torch.headers_or_reason()
    if got is not None:
        return got[0], got[1], f"torch {gpu_machine_torch.VERSION} (the GPU machines')"
    from torch.utils.cpp_extension import include_paths
    return include_paths(device_type="cpu"), _torch_nvcc_std(), f"the installed torch ({why})"


@pytest.fixture(scope="module")
def nvcc_sm90(tmp_path_factory):
    """[(ptxas -v log, PTX text, SASS text or None without an nvdisasm)] of each launcher
    source, compiled once for the module with the build's nvcc flags (setup.py), against
    _torch_for_nvcc()'s headers and -std."""
    setup = _setup_mod()
    cuda_home = setup.find_cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc) found")
    if shutil.which("c++filt") is None:
        pytest.skip("no c++filt (binutils) to demangle the kernel names")
    torch_incs, std, _ = _torch_for_nvcc()
    incs = [os.path.join(ROOT, "csrc"), os.path.join(cuda_home, "include"), *torch_incs,
            *setup.nvidia_pip_include_dirs(), sysconfig.get_paths()["include"]]
    # the build's flags, -Werror=all-warnings included (-lineinfo's .loc lines left out of the
    # PTX the tests read)
    flags = [f for f in setup.nvcc_flags() if f != "-lineinfo"]
    out_dir = tmp_path_factory.mktemp("ptxas")
    nvdisasm = sass_loops.nvdisasm_path(cuda_home)

    def compile_one(src):
        keep = out_dir / src.replace(".cu", "")
        keep.mkdir()
        cmd = [os.path.join(cuda_home, "bin", "nvcc"), "-c",
               os.path.join(ROOT, "csrc", "launchers", src), "-o", str(out_dir / (src + ".o")),
               "--keep", "--keep-dir", str(keep), *flags, "-DCBAM_WITH_CUDA=1", *TORCH_NVCC_DEFINES,
               "--compiler-options", "-fPIC", "-gencode=arch=compute_90,code=sm_90", std,
               "-Xptxas", "-v", *[f"-I{d}" for d in incs]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"nvcc {src} failed:\n{proc.stderr[-4000:]}"
        ptx = sorted(keep.glob("*.ptx"))
        assert len(ptx) == 1, (src, sorted(p.name for p in keep.iterdir()))
        cubin = sorted(keep.glob("*.cubin"))
        assert len(cubin) == 1, (src, sorted(p.name for p in keep.iterdir()))
        sass = sass_loops.sass_of(str(cubin[0]), nvdisasm) if nvdisasm else None
        return proc.stderr, ptx[0].read_text(), sass

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(compile_one, SOURCES))


def _product(compiled):
    """nvcc_sm90's results of the product's launchers: the simulator's self-test kernels
    (selftest.cu) are compiled, since the build compiles them, but not held to the product's
    budgets."""
    return [c for src, c in zip(SOURCES, compiled) if src != "selftest.cu"]


@pytest.fixture(scope="module")
def ptxas_report(nvcc_sm90):
    """{demangled kernel name: (registers, stack frame, spill store bytes, spill load bytes,
    static shared memory bytes)}."""
    report, mangled = {}, []
    for log, *_ in _product(nvcc_sm90):
        name = spill = None
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '([^']+)'", line)
            if m:
                name = m.group(1)
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                          r"spill loads", line)
            if m and name:
                spill = tuple(int(v) for v in m.groups())
            m = re.search(r"Used (\d+) registers", line)
            if m and name and spill is not None:
                smem = re.search(r"(\d+) bytes smem", line)
                mangled.append(name)
                report[name] = (int(m.group(1)),) + spill + (int(smem.group(1)) if smem else 0,)
                name = spill = None
    return {d: report[m] for m, d in zip(mangled, _demangle(mangled))}


@pytest.fixture(scope="module")
def ptx_kernels(nvcc_sm90):
    """{demangled kernel name: its PTX body}."""
    names, bodies = [], []
    for _, ptx, _ in _product(nvcc_sm90):
        for part in re.split(r"^\.(?:visible|weak)?\s*\.entry\s+", ptx, flags=re.M)[1:]:
            names.append(re.match(r"(\w+)\(", part).group(1))
            bodies.append(part)
    return dict(zip(_demangle(names), bodies))


def test_every_kernel_was_reported(ptxas_report):
    for kernel in ("grad_input_kernel<", "apply_gates_kernel<", "reduce_k_kernel<",
                   "reduce_r_kernel<", "reduce_r_rows_kernel<", "backward_reduce_kernel<",
                   "spatial_head_kernel<", "spatial_head_backward_kernel<",
                   "spatial_head_backward_combine_kernel<", "channel_head_hidden_kernel<",
                   "channel_head_gate_kernel<", "channel_head_bwd_hidden_kernel<",
                   "channel_head_bwd_params_kernel<", "batch_norm_gate_partials_kernel<",
                   "batch_norm_gate_apply_kernel<", "batch_norm_gate_backward_partials_kernel<",
                   "batch_norm_gate_backward_apply_kernel<",
                   "backward_reduce_folded_kernel<", "reduce_k_shifted_kernel<"):
        assert any(kernel in n for n in ptxas_report), (kernel, sorted(ptxas_report)[:5])
    assert len(ptxas_report) > 100, len(ptxas_report)


def test_no_kernel_spills_more_than_allowed(ptxas_report):
    over = {}
    for name, (regs, stack, stores, loads, _) in ptxas_report.items():
        short = name.replace("cbam::", "")
        limit = next((b for pat, b in ALLOWED if re.search(pat, short)), 0)
        if max(stack, stores, loads) > limit:
            over[short[:160]] = (regs, stack, stores, loads, limit)
    assert not over, ("kernels using local memory (regs, stack, spill store bytes, spill load "
                      "bytes, allowed):\n" + "\n".join(f"  {k}: {v}" for k, v in over.items()))


def test_issue4_configurations_never_spill(ptxas_report):
    """float32 (4-wide vectors) and 16-bit (8-wide) grad_input, the heaviest kernel on the
    register file, at both vector rows in flight and in each form of dx (MODE 0, 1, 2): no local
    memory at all. (Rows folded into vectors, kernels/common.cuh Fold: float32 none as well; the
    16-bit ones, which serve the channels-first maps of odd size, not issue 4's channels-last
    16-bit case, are in ALLOWED.)"""
    hot = [n for n in ptxas_report if re.search(
        r"grad_input_kernel<(float, 4, [12], false, (false|true)|"
        r"(c10::)?(Half|BFloat16), 8, [12], false, false)", n)]
    # float32: 2 U x 3 forms x (whole rows, folded); 16-bit: 2 types x 2 U x 3 forms
    assert len(hot) == 24, hot
    assert all(ptxas_report[n][1:4] == (0, 0, 0) for n in hot), {n: ptxas_report[n] for n in hot}


def blocks_per_sm(regs, smem, threads=256):
    """Resident blocks of `threads` threads on one sm_90 multiprocessor (H100 / H200): 64K
    registers allocated per warp in units of 256, 228 KiB of shared memory with 1 KiB reserved
    per block, 2048 threads, 32 blocks."""
    warps = threads // 32
    by_regs = 65536 // (-(-regs * 32 // 256) * 256) // warps
    by_smem = (228 * 1024) // (smem + 1024)
    return min(by_regs, by_smem, 2048 // threads, 32)


# The instances for rows that are not whole 16-byte vectors, loaded shifted (launchers/reduction.h,
# backward_reduce.cu): reduce_k_shifted, and reduce_r's and backward_reduce's SHIFT (their last
# template argument). They serve odd maps, never the whole-vector rows of issue 4's sites.
SHIFTED_ROWS = r"cbam::(reduce_k_shifted_kernel<|(reduce_r|backward_reduce)_kernel<.*, true>\()"


def test_issue4_configurations_keep_half_the_sm_busy(ptxas_report):
    """Occupancy of the kernels of issue 4's configurations (float32 4-wide and 16-bit 8-wide
    vectors, without the lp / lse pools): registers and shared memory leave room for at least
    4 blocks of 256 threads per SM (half of its 2048 threads), 3 for the variants that keep two
    vector rows in flight (U = 2 or 4: more loads in flight per thread). Memory-bound kernels
    need that many loads in flight; a change that grows a kernel past it fails here. (reduce_k's
    third and fourth arguments are its vectors and rows in flight: 1, 1 and 4, 1 keep 4 blocks;
    4, 2, the small grids' instance (reduce_k_mode 3), 3. The instances for rows that are not
    whole vectors, SHIFTED_ROWS, have a test of their own below.)"""
    # (the lp / lse variants: PoolPolicy / WeightedSumPolicy<float, true>, grad_input's LPLSE)
    hot = {n: r for n, r in ptxas_report.items()
           if re.search(r"_kernel<(float, 4|(c10::)?(Half|BFloat16), 8)[,>]", n)
           and not re.search(r"Policy<float, true[,>]", n)
           and not re.search(r"grad_input_kernel<[\w:]+, \d+, \d+, true,", n)
           and not re.search(SHIFTED_ROWS, n)}
    kinds = {re.search(r"cbam::(\w+_kernel)<", n).group(1) for n in hot}
    assert kinds == {"reduce_k_kernel", "reduce_r_kernel", "reduce_r_rows_kernel",
                     "apply_gates_kernel", "backward_reduce_kernel", "grad_input_kernel",
                     "reduce_k_rows_kernel", "backward_reduce_folded_kernel"}, kinds
    low = {}
    for name, (regs, *_, smem) in hot.items():
        # rows in flight U = 2 or 4 (reduce_r: 16-bit x takes 72 registers at U = 4, which
        # spills when capped at 64); reduce_k's vectors in flight keep 4 blocks
        need = 3 if re.search(r"_kernel<[\w:]+, \d+, [24],", name) and \
            "reduce_k_kernel" not in name else 4
        if re.search(r"reduce_k_kernel<[\w:]+, \d+, 4, 2,", name):  # 2 rows of 4 vectors
            need = 3
        if re.search(r"grad_input_kernel<[\w:]+, 8, 1, false, true,", name):  # 16-bit folded
            need = 3                                                         # rows: 80 registers
        threads = 256
        if "reduce_k_rows_kernel" in name:  # blocks of 128 threads (kShortRows) and 33 KB of
            threads, need = 128, 6              # staged rows: 6 blocks, 768 threads; medium
            if re.search(r"reduce_k_rows_kernel<[\w:]+, \d+, true,", name):  # rows' up to 12 KB
                need = 4                                                     # of weights: 4
        if blocks_per_sm(regs, smem, threads) < need:
            low[name[:150]] = (regs, smem, blocks_per_sm(regs, smem, threads), need)
    assert not low, "(registers, shared bytes, blocks per SM, needed):\n" + "\n".join(
        f"  {k}: {v}" for k, v in low.items())


@pytest.fixture(scope="module")
def sass_kernels(nvcc_sm90):
    """{demangled kernel name: its SASS instructions} (nvdisasm of each cubin)."""
    if any(sass is None for *_, sass in nvcc_sm90):
        pytest.skip("no nvdisasm (the CUDA toolkit's, or the nvidia-cuda-nvdisasm wheel of "
                    "requirements-dev.txt) to read the kernels' SASS")
    names, bodies = [], []
    for *_, sass in _product(nvcc_sm90):
        for name, ins in sass_loops.functions(sass).items():
            names.append(name)
            bodies.append(ins)
    return dict(zip(_demangle(names), bodies))


VEC_T = r"(?:float, 4|double, 2|(?:c10::)?(?:Half|BFloat16), 8)"
# (kernel instance, the 16-byte loads one thread of it is meant to have in flight in its main
# loop): reduce_r's U rows; reduce_k's KV = 4 vectors of each of UR rows; the apply's two rows;
# backward_reduce's g and x of two rows; grad_input's g (and x with lp / lse) of two rows;
# reduce_k_rows' span copy and reduce_k_shifted's row, four vectors.
IN_FLIGHT = [
    (rf"reduce_r_rows_kernel<{VEC_T}, ([24]),", lambda m: int(m.group(1))),
    (rf"reduce_k_kernel<{VEC_T}, 4, ([12]),", lambda m: 4 * int(m.group(1))),
    (rf"apply_gates_kernel<{VEC_T}, 2,", lambda m: 2),
    (rf"backward_reduce_kernel<{VEC_T}, 2, \w+, false>", lambda m: 4),
    (rf"backward_reduce_folded_kernel<{VEC_T}, 2,", lambda m: 4),
    (rf"grad_input_kernel<{VEC_T}, 2, (true|false),", lambda m: 4 if m.group(1) == "true" else 2),
    # the staged rows' span copy (kSpanVectors) and the shifted rows' vectors of a row
    (rf"reduce_k_rows_kernel<{VEC_T},", lambda m: 4),
    (rf"reduce_k_shifted_kernel<{VEC_T},", lambda m: 4),
]


# Instances that keep fewer, as measured with nvcc 13.0 (at most this many): the folded rows of
# 16-bit channels-first maps of odd size at U = 4 (80 registers, the fold's positions taking the
# rest), and the shifted rows of the 16-bit scale gradients; none of issue 4's configurations.
IN_FLIGHT_FEWER = [
    (r"reduce_r_rows_kernel<(?:c10::)?(?:Half|BFloat16), 8, 4, true, cbam::PoolPolicy", 3),
    (r"reduce_r_rows_kernel<(?:c10::)?(?:Half|BFloat16), 8, 4, true, cbam::WeightedSumPolicy", 2),
    (r"reduce_k_shifted_kernel<(?:c10::)?(?:Half|BFloat16), 8, cbam::WeightedSumPolicy", 3),
]


def test_rows_in_flight_issue_their_loads_together(sass_kernels):
    """The kernels with several rows (or vectors) of loads in flight per thread issue them
    before the first of them is used, into registers of their own, in the SASS: what ptxas
    makes of them, not the source's order. The 16-bit reduce_r, apply and backward_reduce
    instances had one load in flight for any U (each row's load converted inside its guard), and
    ptxas sank reduce_r's U = 4 loads to their folds to save registers until the kernel had
    __launch_bounds__ (tests/sass_loops.py)."""
    seen, short = 0, {}
    for name, ins in sass_kernels.items():
        for pat, want in IN_FLIGHT:
            m = re.search(pat, name)
            if m:
                seen += 1
                need = next((n for p, n in IN_FLIGHT_FEWER if re.search(p, name)), want(m))
                got = sass_loops.vector_loads_in_flight(ins)
                if got < need:
                    short[name.replace("cbam::", "")[:150]] = (got, need)
                break
    assert seen >= 100, seen
    assert not short, "(16-byte loads in flight, meant):\n" + "\n".join(
        f"  {k}: {v}" for k, v in short.items())


_16 = r"(?:c10::)?(?:Half|BFloat16)"
_POOL = "cbam::PoolPolicy<float, false, true>"  # the pool of x times a scale
_POOL1 = "cbam::PoolPolicy<float, false, false>"  # of x itself (no weights)
# (instance of issue 4's configurations, the most instructions its hot loop may take: the
# innermost loop with the most 16-byte loads, as tests/sass_loops.py finds it), about 10% over
# what nvcc 13.0 gives (in the comments; before the loads-in-flight change, where known).
# reduce_k's hot loop, a group of a row's vectors (reduce_k_groups), holds two copies of the loads
# and of the fold: a whole group's unguarded and unrolled, and the guarded loads and the fold
# loop of a row's last group in a tile (fold_vectors): a static size, not one trip's.
HOT_LOOP_MAX = [
    (rf"reduce_r_kernel<{_16}, 8, false, {_POOL}, false>", 80),  # 68-72 (93)
    (rf"reduce_r_kernel<{_16}, 8, false, {_POOL1}, false>", 68),  # 58-62
    (rf"reduce_r_kernel<float, 4, false, {_POOL}, false>", 40),  # 36 (49)
    (rf"reduce_r_kernel<float, 4, false, {_POOL1}, false>", 33),  # 30
    (rf"reduce_r_rows_kernel<{_16}, 8, 2, false, {_POOL} >", 158),  # 135-143 (233)
    (rf"reduce_r_rows_kernel<{_16}, 8, 2, false, {_POOL1} >", 138),  # 116-125
    (rf"reduce_r_rows_kernel<{_16}, 8, 4, false, {_POOL} >", 306),  # 262-278 (469)
    (rf"reduce_r_rows_kernel<{_16}, 8, 4, false, {_POOL1} >", 260),  # 219-236
    (rf"reduce_r_rows_kernel<float, 4, 2, false, {_POOL} >", 80),  # 72 (136)
    (rf"reduce_r_rows_kernel<float, 4, 2, false, {_POOL1} >", 66),  # 60
    (rf"reduce_r_rows_kernel<float, 4, 4, false, {_POOL} >", 148),  # 134 (269)
    (rf"reduce_r_rows_kernel<float, 4, 4, false, {_POOL1} >", 120),  # 109
    (rf"reduce_r_kernel<{_16}, 8, false, cbam::WeightedSumPolicy<float, false>, false>",
     62),  # 50-56
    (r"reduce_r_kernel<float, 4, false, cbam::WeightedSumPolicy<float, false>, false>", 31),  # 28
    (rf"reduce_k_kernel<{_16}, 8, 4, 1, {_POOL} >", 610),  # 504-552
    (rf"reduce_k_kernel<{_16}, 8, 4, 1, {_POOL1} >", 455),  # 375-412
    (rf"reduce_k_kernel<float, 4, 4, 1, {_POOL} >", 275),  # 248
    (rf"reduce_k_kernel<float, 4, 4, 1, {_POOL1} >", 195),  # 176
    (rf"apply_gates_kernel<{_16}, 8, 1, false, float>", 55),  # 42-50 (69)
    (rf"apply_gates_kernel<{_16}, 8, 2, false, float>", 100),  # 83-91
    (r"apply_gates_kernel<float, 4, 1, false, float>", 25),  # 22 (35)
    (r"apply_gates_kernel<float, 4, 2, false, float>", 44),  # 40
    # (the row sum's xor tree unrolled and the row's offset stepped: 127-135 and 89-91 before)
    (rf"backward_reduce_kernel<{_16}, 8, 1, float, false>", 138),  # 118-125
    (r"backward_reduce_kernel<float, 4, 1, float, false>", 88),  # 79
    # Q3 in each form of dx (grad_input_combine; 2: the parallel arrangement's third FMA), whole
    # rows without lp / lse (before the forms: about 150 and 80 a row on the executed path)
    (rf"grad_input_kernel<{_16}, 8, 1, false, false, [01], float>", 96),  # 87
    (rf"grad_input_kernel<{_16}, 8, 1, false, false, 2, float>", 105),  # 95
    (rf"grad_input_kernel<{_16}, 8, 2, false, false, [01], float>", 246),  # 223-224
    (rf"grad_input_kernel<{_16}, 8, 2, false, false, 2, float>", 263),  # 239
    (r"grad_input_kernel<float, 4, 1, false, false, [01], float>", 52),  # 47
    (r"grad_input_kernel<float, 4, 1, false, false, 2, float>", 56),  # 51
    (r"grad_input_kernel<float, 4, 2, false, false, [01], float>", 128),  # 116
    (r"grad_input_kernel<float, 4, 2, false, false, 2, float>", 136),  # 124
    # and on float32 folded rows (7x7 channels-first; before: 204 and 430 static, several paths)
    (r"grad_input_kernel<float, 4, 1, false, true, [01], float>", 82),  # 74
    (r"grad_input_kernel<float, 4, 1, false, true, 2, float>", 86),  # 78
    (r"grad_input_kernel<float, 4, 2, false, true, [01], float>", 198),  # 180
    (r"grad_input_kernel<float, 4, 2, false, true, 2, float>", 207),  # 188
]


def test_hot_loops_keep_their_instruction_counts(sass_kernels):
    """The main loops of the reductions, the apply, Q1 and Q3 in issue 4's configurations take at
    most the instructions above: a 16-bit pool folds 8 elements a 16-byte vector, and at the
    H200's bandwidth an SM must take in 8 of them a cycle, a budget of 16 thread instructions an
    element, so a loop that grows eats the bandwidth's headroom (a static count, not a time)."""
    seen, over = {}, {}
    for name, ins in sass_kernels.items():
        for pat, most in HOT_LOOP_MAX:
            if re.search(pat, name):
                got, loads = sass_loops.hot_loop(ins)
                seen[pat] = seen.get(pat, 0) + 1
                if not loads or got > most:
                    over[name.replace("cbam::", "")[:140]] = (got, loads, most)
    assert len(seen) == len(HOT_LOOP_MAX), sorted(set(p for p, _ in HOT_LOOP_MAX) - set(seen))
    assert not over, "(hot loop instructions, its 16-byte loads, most):\n" + "\n".join(
        f"  {k}: {v}" for k, v in over.items())


def test_pools_of_x_itself_fold_without_weights(sass_kernels):
    """The pools without a scale (PoolPolicy<..., false>: the first pool of every arrangement)
    fold x itself: no weight read from shared memory and no multiply in the hot loop of any of
    their reductions over either axis, where the scaled instances have both (LDS, FMUL / HMUL /
    DMUL)."""
    seen = {}
    for name, ins in sass_kernels.items():
        m = re.search(r"cbam::(reduce_k|reduce_r|reduce_r_rows)_kernel<(float, 4|"
                      r"(?:c10::)?(?:Half|BFloat16), 8)[,>].*cbam::PoolPolicy<float, false, "
                      r"(true|false)>", name)
        if not m:
            continue
        first, last = _hot_loop_span(ins)
        body = ins[first:last + 1]
        shared = sum(bool(re.match(r"(@!?P\d+ )?LDS\b", t)) for t in body)
        muls = sum(bool(re.match(r"(@!?P\d+ )?[FHD]MUL\b", t)) for t in body)
        seen.setdefault(m.group(3), []).append((name[:120], shared, muls))
    assert len(seen.get("true", [])) >= 8 and len(seen.get("false", [])) >= 8, seen
    assert all(sh == 0 and mu == 0 for _, sh, mu in seen["false"]), seen["false"]
    # reduce_r reads a row's weight once a row, reduce_k a column's for every element
    assert all(mu > 0 for _, _, mu in seen["true"]), seen["true"]
    assert all(sh > 0 for n, sh, _ in seen["true"] if "reduce_k_kernel" in n), seen["true"]


# The channel head's tiled products (kernels/head_gemm.cuh): the hidden layer and its gradient
# (grids of a block or two an SM, their next chunk's loads issued before a chunk is summed), the
# gate's layer (the same), the backward's parameter tiles (many blocks: loaded, then staged).
HEAD_PRODUCTS = r"cbam::channel_head_(hidden|bwd_hidden|bwd_params|gate)_kernel<(float|double), "
HEAD_PREFETCH = ("hidden", "bwd_hidden", "gate")


def _head_product_kernels(sass_kernels):
    found = {}
    for name, ins in sass_kernels.items():
        m = re.search(HEAD_PRODUCTS + r"(true|false)>", name)
        if m and not (m.group(1) == "gate" and m.group(3) == "false"):  # (one layer: no product)
            found[name] = (m.group(1), ins)
    # 4 kernels x 2 types x 2 instances (FINISH or split; MLP or one layer), less the one-layer
    # gates
    assert len(found) == 14, sorted(found)
    return found


def test_head_products_read_shared_memory_in_vectors(sass_kernels):
    """The channel head's chunk sums read each staged row 4 kk at a time (one 16-byte LDS of B's
    row and one of each of a thread's 4 A rows per 4 kk: 5 reads for 16 FMAs, where element
    reads took 20; a float64 vector is two such reads): every shared-memory read of their FMA
    loops is 128 bits wide."""
    for name, (_, ins) in _head_product_kernels(sass_kernels).items():
        per_read = 3 if "<float, " in name else 1.5  # FMAs a 16-byte read: 3.2 and 1.6
        widths, fmas = [], 0
        for first, last in sass_loops.loops(ins):
            body = ins[first:last + 1]
            if any("BAR" in t for t in body):
                continue  # a chunk loop (staging, barriers); the sums are the loops inside
            f = sum(bool(re.search(r"\b[FD]FMA\b", t)) for t in body)
            lds = [m.group(0) for m in (re.search(r"\bLDS(\.\w+)?", t) for t in body) if m]
            if f and lds:
                fmas += f
                widths += lds
        assert widths and fmas >= per_read * len(widths), (name[:120], fmas, len(widths))
        assert set(widths) == {"LDS.128"}, (name[:120], sorted(set(widths)))


def test_head_products_prefetch_their_next_chunk(sass_kernels):
    """In the products whose grids hold a block or two an SM (head_tile_gemm's PREFETCH, and the
    gate's layer), a chunk loop loads the next chunk from global memory after the barrier that
    publishes this one and before its first FMA, so the loads' latency hides behind the sums;
    the parameter tiles of the backward (many blocks) load a chunk before staging it."""
    for name, (kind, ins) in _head_product_kernels(sass_kernels).items():
        chunk_loops = []
        for first, last in sass_loops.loops(ins):
            body = ins[first:last + 1]
            bars = [i for i, t in enumerate(body) if "BAR.SYNC" in t]
            if len(bars) == 2 and any(re.search(r"\b[FD]FMA\b", t) for t in body):
                chunk_loops.append(body[bars[1]:])
        assert chunk_loops, name[:120]
        after = [any("LDG" in t for t in tail[:next(
            (i for i, t in enumerate(tail) if re.search(r"\b[FD]FMA\b", t)), len(tail))])
            for tail in chunk_loops]
        if kind in HEAD_PREFETCH:
            assert all(after), (name[:120], after)
        else:
            assert not any(after), (name[:120], after)


def test_head_chunk_loads_are_issued_together(sass_kernels):
    """A head product's chunk loop issues every global load of a chunk before it reads any of
    them (tests/sass_loops.py loads_issued_together): one trip to L2 a chunk, not one a load.
    The forward's hidden layer wrote P from its loader and waited for each of P's loads before
    the next (2 of 12 issued together), its blend added max to avg as it loaded, the gate's
    layer applied the activation as it loaded (5 of 20); they do it at staging now
    (head_gemm.cuh head_tile_gemm's extra). Left as they are: the parameter tiles of dW2, whose
    loader sums the pools' act(h) (a switch on the activation; relu's saved act(h) skips it at
    run time; many blocks an SM hide the latency)."""
    seen, short = 0, {}
    for name, (kind, ins) in _head_product_kernels(sass_kernels).items():
        for first, last in sass_loops.loops(ins):
            body = ins[first:last + 1]
            if sum("BAR.SYNC" in t for t in body) != 2 or \
                    not any(re.search(r"\b[FD]FMA\b", t) for t in body):
                continue  # not a chunk loop
            if kind == "bwd_params" and any("BRX" in t for t in body):
                continue  # dW2's tiles (above)
            seen += 1
            got, total = sass_loops.loads_issued_together(body)
            if got < total:
                short.setdefault(name[:120], []).append((got, total))
    # hidden (2 types x 2 instances), its gradient (the same), the gate (2 types, MLP), the
    # parameter tiles' dW1 and dP (2 types x 2 instances x 2)
    assert seen == 18, seen
    assert not short, short


# Instructions of a head product's chunk loop (staging, the next chunk's loads, the loop around
# the sums; not the sums' own loop), where no activation is applied to the loads: measured
# 208 to 346 (the one-layer parameter tiles find r's sample by subtraction; the forward's hidden
# layer also loads the blend's max and writes P at staging, head_tile_gemm's extra: 346 in
# float64). The forward's hidden layer took 925 to 961 when each load found its row's pool with a
# 64-bit division, the one-layer parameter tiles 375 to 418 with a 64-bit remainder.
HEAD_CHUNK_MAX = 380


def test_head_chunk_loops_keep_their_instruction_counts(sass_kernels):
    """Each staged row's pointer and pool are worked out once, before the chunk loop
    (head_gemm.cuh head_rows): a chunk's loads stay a multiply-add and a load each."""
    seen, over = 0, {}
    for name, (_, ins) in _head_product_kernels(sass_kernels).items():
        for first, last in sass_loops.loops(ins):
            body = ins[first:last + 1]
            if sum("BAR.SYNC" in t for t in body) != 2 or \
                    any("BRX" in t or "MUFU" in t for t in body):
                continue  # not a chunk loop; or one with the activation (a switch, exp, erf)
            seen += 1
            if last - first + 1 > HEAD_CHUNK_MAX:
                over.setdefault(name[:120], []).append(last - first + 1)
    # the hidden layer and its gradient: 2 types x 2 instances each; the parameter tiles: 2
    # types x 2 instances x (dW1, dP; dW2 applies the activation)
    assert seen == 16, seen
    assert not over, over


def test_folded_row_sums_do_not_divide_per_lane(sass_kernels):
    """backward_reduce_folded_kernel adds each original row's lanes through shared memory, a few
    threads of the block while the rest wait at the barrier: a lane's side of the row is found
    by a comparison, not by an integer division (l VEC / K0 == jq took about 20 instructions a
    lane: 98 a loop of lanes, now about 30). No innermost loop of shared-memory reads in it
    divides."""
    seen = 0
    for name, ins in sass_kernels.items():
        if "backward_reduce_folded_kernel<" not in name:
            continue
        loops = sass_loops.loops(ins)
        for first, last in loops:
            body = ins[first:last + 1]
            if any("BAR" in t or "LDG" in t for t in body) or not any("LDS" in t for t in body):
                continue
            if any(first <= a and b <= last and (a, b) != (first, last) for a, b in loops):
                continue  # (the loop over the rows to sum, which holds the loop over lanes)
            seen += 1
            assert not any("I2F" in t or "MUFU.RCP" in t for t in body), (name[:100], body)
    assert seen >= 8, seen  # 4 element types x U = 1, 2


def _hot_loop_span(ins):
    """(first, last) instruction of sass_loops.hot_loop's loop."""
    got, loads = sass_loops.hot_loop(ins)
    for first, last in sass_loops.loops(ins):
        if last - first + 1 == got and sum(
                "LDG" in t and ".128" in t for t in ins[first:last + 1]) == loads:
            return first, last
    raise AssertionError("no hot loop")


def test_reduce_r_rows_in_flight_keep_the_blocks_the_launcher_counts_on(ptxas_report):
    """reduce_r's instances with 2 or 4 vector rows in flight: where the whole grid is resident
    at once with their blocks an SM, the launcher takes them (launchers/reduction.h,
    with_reduce_r_rows), counting reduce_r_min_blocks (kernels/reduce_r.cuh) blocks an SM: 3 at
    U = 4, 4 at U = 2, 2 for both where the policy's state or weight is over 12 bytes (the lp /
    lse policies, <acc_t, true>; every float64 policy). A kernel with fewer would leave part of
    such a grid to a second wave."""
    seen = 0
    low = {}
    for name, (regs, *_, smem) in ptxas_report.items():
        m = re.search(r"reduce_r_rows_kernel<([\w:]+), (\d+), ([24]), (?:true|false), "
                      r"cbam::(\w+)<(\w+), (true|false)(?:, (?:true|false))?>", name)
        if not m or m.group(2) == "1":  # (the scalar path's U is its own, 4)
            continue
        seen += 1
        big = m.group(6) == "true" or m.group(5) == "double"
        need = 2 if big else 3 if m.group(3) == "4" else 4
        if blocks_per_sm(regs, smem) < need:
            low[name[:150]] = (regs, smem, blocks_per_sm(regs, smem), need)
    # 4 element types x U = 2, 4 x folded or not x 6 policies (the pools with and without a
    # scale)
    assert seen == 96, seen
    assert not low, "(registers, shared bytes, blocks per SM, counted on):\n" + "\n".join(
        f"  {k}: {v}" for k, v in low.items())


def test_blocks_per_sm_model():
    assert blocks_per_sm(32, 0) == 8  # the thread limit
    assert blocks_per_sm(64, 8192) == 4 and blocks_per_sm(80, 0) == 3  # registers
    assert blocks_per_sm(40, 41984) == 5  # shared memory


# Sizes of the element types as the demangled names spell them.
ELEM_BYTES = {"double": 8, "float": 4, "c10::Half": 2, "c10::BFloat16": 2}
# 16-byte global accesses in PTX: four 32-bit or two 64-bit lanes (ld.global.nc: read-only path).
LOAD_16B = re.compile(r"\bld\.global(?:\.nc)?\.v4\.(?:[fbu]32)\b|\bld\.global(?:\.nc)?\.v2\.(?:[fbu]64)\b")
STORE_16B = re.compile(r"\bst\.global\.v4\.(?:[fbu]32)\b|\bst\.global\.v2\.(?:[fbu]64)\b")
# Kernels whose output is x-sized (y, dx): every element is written through st_vec.
WRITES_X_SIZED = ("apply_gates_kernel<", "grad_input_kernel<")


def _vector_path(ptx_kernels):
    """{name: body} of the kernel instances whose template arguments <T, VEC, ...> make one
    16-byte vector (the others are the scalar path, VEC == 1)."""
    out = {}
    for name, body in ptx_kernels.items():
        m = re.search(r"cbam::\w+_kernel<([\w:]+), (\d+)[,>]", name)
        if m and m.group(1) in ELEM_BYTES and ELEM_BYTES[m.group(1)] * int(m.group(2)) == 16:
            out[name] = body
    return out


def test_vector_path_kernels_load_16_bytes_at_a_time(ptx_kernels):
    vec = _vector_path(ptx_kernels)
    # 4 dtypes of every row-walking kernel at least (reduce_k, reduce_r, apply_gates,
    # backward_reduce and its folded-rows kernel, grad_input)
    for kernel in ("reduce_k_kernel<", "reduce_r_kernel<", "reduce_r_rows_kernel<",
                   "apply_gates_kernel<", "backward_reduce_kernel<",
                   "backward_reduce_folded_kernel<", "grad_input_kernel<"):
        assert sum(kernel in n for n in vec) >= 4, (kernel, len(vec))
    missing = [n[:160] for n, body in vec.items() if not LOAD_16B.search(body)]
    assert not missing, "vector-path kernels without a 16-byte global load:\n" + "\n".join(missing)


def test_x_sized_outputs_are_stored_16_bytes_at_a_time(ptx_kernels):
    """apply_gates' y and grad_input's dx: 16-byte stores, and no narrower global store of T
    (the small outputs these kernels write are none)."""
    vec = {n: b for n, b in _vector_path(ptx_kernels).items()
           if n.startswith(tuple("void cbam::" + k for k in WRITES_X_SIZED))}
    assert len(vec) >= 8, len(vec)
    bad = {}
    for name, body in vec.items():
        stores = set(re.findall(r"\bst\.global(?:\.v\d)?\.\w+", body))
        narrow = {s for s in stores if not STORE_16B.fullmatch(s)}
        if not any(STORE_16B.fullmatch(s) for s in stores) or narrow:
            bad[name[:160]] = sorted(stores)
    assert not bad, "x-sized outputs not stored 16 bytes at a time:\n" + "\n".join(
        f"  {k}: {v}" for k, v in bad.items())


def test_shifted_row_reductions_keep_their_blocks(ptx_kernels, ptxas_report):
    """The shifted instances: every dtype and policy, each with a 16-byte global load of x, and
    at least the blocks of 256 threads an SM of the plain instances' scalar path: reduce_k_shifted
    those of reduce_k with 4 vectors in flight (4; 3 for float64, its __launch_bounds__);
    reduce_r's and backward_reduce's (one row in flight, its window and the next lane's in
    registers: 16-bit backward_reduce holds four 8-element windows of g and x, 77 registers) 3,
    shared memory included."""
    found = {}
    for name, body in ptx_kernels.items():
        m = re.search(SHIFTED_ROWS, name)
        if m:
            regs, *_, smem = ptxas_report[name]
            k_shifted = m.group(1) == "reduce_k_shifted_kernel<"
            need = 3 if not k_shifted or "<double," in name else 4
            found[name[:150]] = (bool(LOAD_16B.search(body)), blocks_per_sm(regs, smem) >= need)
    # 4 element types x 6 policies (reduce_k_shifted, reduce_r) + 4 (backward_reduce)
    assert len(found) == 52, sorted(found)
    bad = {k: v for k, v in found.items() if v != (True, True)}
    assert not bad, "(16-byte load, blocks an SM):\n" + "\n".join(
        f"  {k}: {v}" for k, v in bad.items())


# The reductions that may split over tiles, and finish in the same launch (combine_partials.cuh).
SPLIT_REDUCTIONS = re.compile(
    r"cbam::(reduce_k_kernel|reduce_k_shifted_kernel|reduce_r_kernel|reduce_r_rows_kernel|"
    r"backward_reduce_kernel|backward_reduce_folded_kernel)<")
FENCE = re.compile(r"\b(?:membar\.gl|fence\.(?:sc|acq_rel)\.gpu)\b")
TICKET = re.compile(r"\batom\.global\.add\.[us]32\b")
LOAD_L2 = re.compile(r"\bld\.global\.cg\.")
FLOAT_ATOMIC = re.compile(r"\b(?:atom|red)\.[\w.]*?\.(?:f16|bf16|f16x2|bf16x2|f32|f64)\b")


def test_split_reductions_finish_in_their_launch(ptx_kernels):
    """Every instance of the reductions that may split over tiles has the last-block combine:
    a device-wide fence, an integer atomicAdd (the group's ticket) and the partials loaded from
    L2 (ld.global.cg). No kernel of the project has a floating-point atomic: the reductions'
    results do not depend on the order the blocks finish in (issue 4; DESIGN.md section 3)."""
    split = {n: b for n, b in ptx_kernels.items() if SPLIT_REDUCTIONS.search(n)}
    assert len(split) > 100, len(split)
    bad = {n[:150]: (bool(FENCE.search(b)), bool(TICKET.search(b)), bool(LOAD_L2.search(b)))
           for n, b in split.items()}
    bad = {n: v for n, v in bad.items() if v != (True, True, True)}
    assert not bad, "(fence, ticket, L2 load) missing:\n" + "\n".join(
        f"  {k}: {v}" for k, v in bad.items())
    floats = [n[:150] for n, b in ptx_kernels.items() if FLOAT_ATOMIC.search(b)]
    assert not floats, floats
    assert FLOAT_ATOMIC.search("atom.global.add.f32 %f1, [%rd1], %f2;")  # the pattern bites
    assert not FLOAT_ATOMIC.search("atom.global.add.u32 %r1, [%rd1], 1;")


def test_the_scalar_path_is_not_mistaken_for_the_vector_path(ptx_kernels):
    """The name parsing above finds the scalar instances too (VEC == 1), and they have no
    16-byte store: so the checks above are reading the right kernels."""
    scalar = [b for n, b in ptx_kernels.items() if re.search(
        r"cbam::(apply_gates|grad_input)_kernel<[\w:]+, 1,", n)]
    assert len(scalar) >= 8
    assert not any(STORE_16B.search(b) for b in scalar)


# A PTX instruction that may touch global memory: ld / st / atom / red of the global state space
# or generic addressing (any but .param, .shared, .local, .const), ldu, cp.async, prefetch.
GLOBAL_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?"  # (a predicate)
                           r"(?:(?:ld|st|atom|red)(?!\.(?:param|shared|local|const)\b)\."
                           r"|ldu\.|cp\.async|prefetch\.)", re.M)


def test_every_kernel_waits_for_its_grid_dependency_first(ptx_kernels):
    """Programmatic dependent launch (set_pdl, dialect.cuh launch) lets a kernel start while the
    kernel before it in the stream is still running: each kernel's first statement,
    grid_dependency_sync, waits for that one's completion (griddepcontrol.wait) before any of
    its global loads or stores, then lets the next one launch (launch_dependents). In every
    kernel's PTX both come before the first instruction that may touch global memory (the
    simulator refuses an access before it in every kernel it runs)."""
    late = {}
    for name, body in ptx_kernels.items():
        wait = body.find("griddepcontrol.wait;")
        trigger = body.find("griddepcontrol.launch_dependents;")
        first = GLOBAL_ACCESS.search(body)
        first_at = first.start() if first else len(body)
        if not (0 <= wait < first_at and 0 <= trigger < first_at):
            late[name[:160]] = (wait, trigger, first and first.group(0).strip())
    assert len(ptx_kernels) > 100
    assert not late, late


def test_launchers_build_with_the_gpu_machines_torch(nvcc_sm90):
    """nvcc_sm90 compiled every launcher against the GPU machines' torch: its headers, at the
    -std its extension build gives nvcc (C++17), with the build's flags. A launcher that needs
    C++20, an ATen header or function newer than that torch, or that warns there, failed that
    compile (the fixture's error names the source and gives nvcc's message)."""
    _, std, what = _torch_for_nvcc()
    if not what.startswith(f"torch {gpu_machine_torch.VERSION}"):
        pytest.skip(what)
    assert std == "-std=c++17", std
    assert len(nvcc_sm90) == len(SOURCES) and "selftest.cu" in SOURCES, SOURCES


def _host_sources():
    """(source, the extension's macro, its name) of every host source the build compiles."""
    setup = _setup_mod()
    return ([(s, "CBAM_WITH_CUDA", "_C") for s in setup.C_SOURCES + setup.C_CUDA_SOURCES] +
            [(s, "CBAM_SIMULATOR", "_sim") for s in setup.sim_sources()])


@pytest.fixture(scope="module")
def host_syntax_gpu_torch():
    """{source: (exit status, g++'s messages)}: g++ -fsyntax-only of each host source with the
    build's flags (setup.py cxx_flags: C++20 whatever the torch) against the GPU machines'
    torch's headers."""
    got, why = gpu_machine_torch.headers_or_reason()
    if got is None:
        pytest.skip(why)
    setup = _setup_mod()
    cuda_home = setup.find_cuda_home()
    cuda_incs = ([os.path.join(cuda_home, "include"), *setup.nvidia_pip_include_dirs()]
                 if cuda_home else [])
    base = [os.environ.get("CXX") or "g++", "-fsyntax-only", "-fPIC", *setup.cxx_flags(),
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{os.path.join(ROOT, 'csrc')}",
            *[f"-I{d}" for d in got[0]], f"-I{sysconfig.get_paths()['include']}"]

    def check(entry):
        src, macro, name = entry
        if macro == "CBAM_WITH_CUDA" and not cuda_home:
            return src, (None, "no CUDA toolkit: the CUDA build's sources are not checked")
        cmd = [*base, f"-D{macro}=1", f"-DTORCH_EXTENSION_NAME={name}",
               *([f"-I{d}" for d in cuda_incs] if macro == "CBAM_WITH_CUDA" else []),
               os.path.join(ROOT, src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return src, (proc.returncode, proc.stderr[-4000:])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(check, _host_sources()))


@pytest.mark.parametrize("src", [s for s, _, _ in _host_sources()])
def test_host_sources_build_with_the_gpu_machines_torch(host_syntax_gpu_torch, src):
    """The host sources of _C (its CUDA build's) and of the simulator, which the GPU machines
    build too, parse and type-check against their torch's headers: no ATen function or header
    newer than that torch, and no warning where the build turns them into errors."""
    rc, err = host_syntax_gpu_torch[src]
    if rc is None:
        pytest.skip(err)
    assert rc == 0, f"g++ {src} against torch {gpu_machine_torch.VERSION}'s headers:\n{err}"
