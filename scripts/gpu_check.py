#!/usr/bin/env python3
"""The GPU protocol (issue 7, DESIGN.md section 8): verify and measure everything in one run.

    bash scripts/gpu_check.sh [--dry-run] [--part lease|extra|verify|measure|all]
                              [--steps a,b] [--budget-min M] [DIR]

Steps, in order (each with its own timeout inside one overall budget):
  env          device, driver, CUDA, torch, nvcc, compute-sanitizer versions
  wheels       installs .whl/*.whl (scripts/fetch_gpu_wheels.sh) into /tmp/site, on PYTHONPATH
               for every later step; says which packages are missing and which steps need them
  build        setup.py build_ext --inplace for this device's architecture only
               (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability), MAX_JOBS=nproc;
               skipped when build/.gpu_check_stamp says the same sources, torch and arch were
               built already (a warm machine between two parts)
  tests        the test suite (pytest; xdist when available): the GPU tests only (-m gpu) in
               `lease`, the whole suite, GPU tests included, in `verify` and `all` (`extra`,
               `measure` and `grid` run no tests); only the whole suite needs the simulator, so
               the build step leaves it out (CBAM_FUSED_BUILD_SIM=0) where no later step runs it
  sanitizer    compute-sanitizer over a small kernel test selection (GPU_CHECK_SANITIZE_FILE,
               default the first of tests/test_kernels_gpu.py, tests/test_kernels_cuda.py that
               exists; GPU_CHECK_SANITIZE_K, a pytest -k expression, default for
               test_kernels_cuda.py: the per-op comparisons in float32 NCHW and bfloat16
               channels-last); only kernels whose name holds GPU_CHECK_KERNEL_FILTER (default
               "cbam") are checked (initcheck instruments every kernel, to see PyTorch's writes,
               and counts the reports in those); fails on any report. Tools: memcheck and
               racecheck in `lease`, initcheck and synccheck in `extra`, all four in the others
  bandwidth    the device-to-device copy bandwidth
  sweep        benchmarks/bench_kernels.py --sweep -> sweep.json (launcher tuning; `extra` only)
  profile      Nsight Compute (ncu) over benchmarks/profile_kernels.py -> ncu.csv: each op and
               head once at the largest and smallest ResNet-50 site, the hardware counters of
               every kernel (DRAM throughput, occupancy, waves, registers); `extra`, `measure`,
               `all`; in `lease`, the 12 cases of profile_kernels.LEASE_CASES
  bench_cbam   benchmarks/bench_cbam.py   -> bench_cbam.json, bench_cbam.png
  bench_network benchmarks/bench_network.py -> bench_network.json, bench_network.png

Parts: the device tool lends a GPU for 15 minutes of device time, the machine's start included,
at most 10 minutes a command. So the default part, `lease` (8 minutes), runs every step once at
reduced sizes: the GPU tests, memcheck and racecheck, the layer benchmark at batch 64 in issue
4's two configurations (with the per-op section), ncu over the few cases that lag furthest and
the channel heads, and the network benchmark's quick run. If at
least 6 minutes of device time are left after it, `--part extra` (5 minutes) runs the rest:
the tuning sweep, the kernel profile, initcheck and synccheck, the wider layer grid (other
batches, float16, MobileNet sites, max-autotune). `verify` and `measure` (9.5 minutes each) and
`all` (20 minutes) are for longer leases. `merge` joins the folders of the parts (the
layer benchmark's cases of several parts are joined into one JSON and PNG):
    python scripts/gpu_check.py merge PART1_DIR PART2_DIR -o benchmarks/results/DATE-DEVICE
`grid` (9.5 minutes) runs the two benchmarks' whole grids (issue 5: every layer case with every
peer, both networks at both batches with the compiled variants), which take longer than one
lease: `--resume-from DIR` makes each run go on from an earlier run's folder (the benchmarks'
--resume: cases measured on the same device, torch and package sources are kept), so the grid
completes over several leases while the code stays the same:
    bash scripts/gpu_check.sh --part grid --resume-from benchmarks/results/DATE-DEVICE-grid

The folder (argument, else $OUT, else out/gpu_check-DATE) receives at most 8 files:
gpu_check.log, tests.log, steps.json, summary.md, and per part bench_cbam.json, bench_cbam.png,
bench_network.json, bench_network.png, or sweep.json and ncu.csv. A short summary table is printed last.

--dry-run (a machine without a GPU): runs every step it can on the CPU (versions, the wheels'
install into a scratch folder, a CPU-only build into a scratch folder, the whole test suite,
collection of the sanitizer selection, CPU copy bandwidth, CPU --quick benchmarks) and says
which steps it skipped and why.

This file imports nothing beyond the standard library: every step runs in a subprocess, so a
broken torch or build is reported, not fatal.
"""
import argparse
import datetime
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "wheels", "build", "tests", "sanitizer", "bandwidth", "sweep", "profile",
         "bench_cbam",
         "bench_network")
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
# A lease of the device tool is 15 minutes of device time, the machine's start included, at most
# 10 minutes a command. So the protocol is sized as two commands: `lease` (about 8 minutes:
# everything the open issues need once, at reduced sizes) and, while enough time is left,
# `extra` (the rest: the other two sanitizer tools, the tuning sweep, the kernel profile, the
# wider benchmark grid; not the whole test suite, which never finished inside it, and whose CPU
# side CI runs on the GPU machines' torch, tests/test_gpu_machine_torch.py). `verify` + `measure` (9.5 minutes each) and `all` (20 minutes) are the
# same protocol for longer leases.
PARTS = {
    "lease": ("env", "wheels", "build", "tests", "sanitizer", "bandwidth", "bench_cbam",
              "profile", "bench_network"),
    "extra": ("env", "wheels", "build", "sweep", "profile", "sanitizer", "bench_cbam"),
    "verify": ("env", "wheels", "build", "tests", "sanitizer"),
    "measure": ("env", "wheels", "build", "bandwidth", "profile", "bench_cbam", "bench_network"),
    # issue 5's whole grid (every shape, batch, dtype and peer of the layer benchmark; both
    # networks at both batches with the compiled variants): longer than a lease, so each run
    # goes on from the last one's results (--resume-from) until the grid is complete
    "grid": ("env", "wheels", "build", "bandwidth", "bench_cbam", "bench_network"),
    "all": tuple(s for s in STEPS if s != "sweep"),
}
PART_BUDGET_MIN = {"lease": 8.0, "extra": 5.0, "verify": 9.5, "measure": 9.5, "all": 20.0,
                   "grid": 9.5}
# what a step does in each part (the default: the whole suite, all four tools, the benchmarks'
# own defaults under the part's budget)
PART_OPTIONS = {
    "lease": dict(
        tests="gpu",  # pytest -m gpu: the GPU tests only (CI runs the rest on every commit)
        sanitizer=("memcheck", "racecheck"),
        # issue 4's two configurations at batch 64, the peers that compile in seconds
        # (--pass-order both: cbam_fused's graph time again with every pass from its first
        # tile, to time the alternating tile order, launchers/common.h next_pass_reversed;
        # --tiles-also 32: again with 32 tiles an SM for every op, the default before each op's
        # own (csrc/launchers/op_tuning.h: 4 to 16 for some ops, timed faster alone, whose
        # fewer waves the reversed order meets less of, by the simulator's L2 model); --pdl-also:
        # again with programmatic dependent launch, off by default until this times it)
        bench_cbam=["--quick", "--dtype", "bfloat16,float32",
                    "--peers", "official,timm,compile,cbam_fused", "--pass-order", "both",
                    "--tiles-also", "32", "--pdl-also", "--kernels-previous"],
        bench_network=["--quick"],
        # Nsight Compute over the few cases furthest from a copy and the channel heads
        # (profile_kernels.LEASE_CASES: 12 cases, about 16 kernels), to say why they lag
        profile="lease"),
    "extra": dict(
        sanitizer=("initcheck", "synccheck"),
        # the rest of the grid (batches and dtypes the lease did not run; the per-op section it
        # did), every peer; `merge` joins it to the lease's cases
        bench_cbam=["--dtype", "bfloat16,float16,float32", "--batch", "128,32",
                    "--shapes", "resnet50,mobilenet", "--kernels", "off"]),
    # the benchmarks' own full defaults (the per-op section is the lease's and extra's)
    "grid": dict(bench_cbam=["--kernels", "off"], bench_network=[]),
}
# nominal timeouts (seconds) on a GPU machine; the overall budget may cut them
NOMINAL = {"env": 90, "wheels": 120, "build": 480, "tests": 480, "sanitizer": 480,
           "bandwidth": 90, "sweep": 150, "profile": 150, "bench_cbam": 480,
           "bench_network": 420}
# the least each later step needs, kept in reserve when an earlier step's timeout is computed
RESERVE = {"env": 15, "wheels": 10, "build": 20, "tests": 45, "sanitizer": 45, "bandwidth": 15,
           "sweep": 60, "profile": 45, "bench_cbam": 75, "bench_network": 60}
# the kernel tests the sanitizers run: the first of these files that exists, with its default
# -k selection (small shapes, every op, both layouts: float32 NCHW and bfloat16 channels-last,
# the two configurations of issue 4; rows folded into whole vectors, staged whole or shifted
# against 16-byte vectors, every dtype; and every head op at each debug launch shape: 58 tests,
# each run four times under the sanitizers)
SANITIZE_FILES = ("tests/test_kernels_gpu.py", "tests/test_kernels_cuda.py")
SANITIZE_K = {"test_kernels_cuda.py":
              "(test_op_matches_cpu_kernel_on_gpu and ((float32 and cf) or (bfloat16 and cl))) "
              "or test_folded_rows_on_gpu or test_head_op_matches_cpu_kernel_on_gpu"}
FILES = ("gpu_check.log", "tests.log", "steps.json", "summary.md", "bench_cbam.json",
         "bench_cbam.png", "bench_network.json", "bench_network.png", "sweep.json", "ncu.csv")
# Nsight Compute's sections for the profile step (names as `ncu --list-sections` gives them)
NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats")


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
class Log:
    """Prints to stdout and appends to gpu_check.log."""

    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg="", console=True):
        if console:
            print(msg, flush=True)
        self.f.write(msg + "\n")

    def raw(self, text):
        self.f.write(text)


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


def run_cmd(cmd, *, timeout, env=None, logs=(), echo="all", cwd=ROOT, shell=False):
    """Runs cmd in its own process group; streams its output to the files in `logs` and, per
    `echo` ('all', 'none' or a predicate on the line), to stdout. Returns (rc, output, timed_out).
    On timeout the process group (only ours) gets SIGTERM, then SIGKILL."""
    out_lines = []
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace", bufsize=1, start_new_session=True,
                         shell=shell)
    deadline = time.monotonic() + timeout
    timed_out = False
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    buf = ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        events = sel.select(timeout=min(left, 1.0))
        if events:
            chunk = os.read(p.stdout.fileno(), 65536).decode("utf-8", "replace")
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                _emit(line, out_lines, logs, echo)
        elif p.poll() is not None:
            # drain what is left
            rest = p.stdout.read()
            if rest:
                buf += rest
            break
    if buf:
        for line in buf.split("\n"):
            if line:
                _emit(line, out_lines, logs, echo)
    if timed_out:
        _kill_group(p)
        msg = f"[gpu_check] TIMEOUT after {timeout:.0f} s: {_cmd_str(cmd)}"
        _emit(msg, out_lines, logs, "all")
    rc = p.wait()
    return (124 if timed_out else rc), "\n".join(out_lines), timed_out


def _kill_group(p):
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _emit(line, out_lines, logs, echo):
    line = line.rstrip("\r")
    if "\r" in line:  # progress bars: keep the last state
        line = line.split("\r")[-1]
    out_lines.append(line)
    for lg in logs:
        lg.write(line + "\n")
        lg.flush()
    if echo == "all" or (callable(echo) and echo(line)):
        print(line, flush=True)


def _cmd_str(cmd):
    return cmd if isinstance(cmd, str) else " ".join(shlex.quote(str(c)) for c in cmd)


# ---------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------

def ci_torch_pin():
    """The torch version CI builds and tests against as the GPU machines' (the VERSION of
    tests/gpu_machine_torch.py), or None where that file cannot be read."""
    try:
        with open(os.path.join(ROOT, "tests", "gpu_machine_torch.py")) as f:
            m = re.search(r'^VERSION = "([^"]+)"', f.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def torch_pin_note(torch_version):
    """'' where this GPU machine's torch is the one CI checks the build against; else a note
    (for the env step's summary line) saying which pin to change."""
    pin = ci_torch_pin()
    if not torch_version or not pin or torch_version.split("+")[0] == pin:
        return ""
    return (f"; CI checks the build against torch {pin} (tests/gpu_machine_torch.py VERSION), "
            f"this machine has {torch_version.split('+')[0]}: update the pin")


class Protocol:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.dir = os.path.abspath(args.dir)
        os.makedirs(self.dir, exist_ok=True)
        self.log = Log(os.path.join(self.dir, "gpu_check.log"))
        self.tests_log = open(os.path.join(self.dir, "tests.log"), "a", buffering=1)
        self.t0 = time.monotonic()
        self.budget = args.budget_min * 60.0
        self.results = []  # step records
        self.info = {}  # versions etc. from the env step
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        pp = [ROOT] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env["PYTHONPATH"] = os.pathsep.join(pp)
        self.py = args.python
        self.has_gpu = False
        self.nproc = os.cpu_count() or 1
        self.missing = {}  # package -> steps that need it

    # -- helpers -----------------------------------------------------------------------------
    def left(self):
        return self.budget - (time.monotonic() - self.t0)

    def timeout_for(self, step, later):
        reserve = sum(RESERVE[s] for s in later)
        return max(10.0, min(NOMINAL[step] if not self.dry else NOMINAL[step] * 2,
                             self.left() - reserve))

    def record(self, step, status, seconds, note="", **extra):
        rec = dict(step=step, status=status, seconds=round(seconds, 1), note=note, **extra)
        self.results.append(rec)
        self.log(f"[gpu_check] {step}: {status} ({seconds:.0f} s){' - ' + note if note else ''}")
        self.write_steps()
        return rec

    def header(self, step, what):
        self.log("")
        self.log("=" * 100)
        self.log(f"[gpu_check] {step}: {what}   (t+{time.monotonic() - self.t0:.0f} s, "
                 f"{self.left():.0f} s of the budget left)")
        self.log("=" * 100)

    def opt(self, step, default=None):
        """What `step` does in this part (PART_OPTIONS), else `default`."""
        return PART_OPTIONS.get(self.args.part, {}).get(step, default)

    def pyrun(self, code, timeout=120):
        rc, out, _ = run_cmd([self.py, "-c", code], timeout=timeout, env=self.env, echo="none")
        return rc, out

    # -- steps -------------------------------------------------------------------------------
    def step_env(self, later):
        self.header("env", "device, driver, CUDA, torch, nvcc and sanitizer versions")
        t = time.monotonic()
        info = {"date_utc": now_utc().isoformat(timespec="seconds"), "dry_run": self.dry,
                "nproc": self.nproc, "python_exe": self.py}
        try:
            info["git_commit"] = subprocess.check_output(
                ["git", "-C", ROOT, "rev-parse", "HEAD"], text=True).strip()
            info["git_dirty"] = bool(subprocess.check_output(
                ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                text=True).strip())
        except (OSError, subprocess.CalledProcessError):
            info["git_commit"] = None
        smi = shutil.which("nvidia-smi")
        if smi:
            rc, out, _ = run_cmd([smi, "--query-gpu=name,driver_version,memory.total,"
                                  "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                                 timeout=30, echo="none")
            info["nvidia_smi"] = out.strip() if rc == 0 else f"rc {rc}: {out.strip()[:200]}"
            rc, out, _ = run_cmd([smi], timeout=30, logs=[self.log.f], echo="none")
            m = re.search(r"CUDA Version:\s*([\d.]+)", out)
            info["driver_cuda"] = m.group(1) if m else None
        else:
            info["nvidia_smi"] = "not found"
        code = r"""
import json, platform, sys
d = {"python": platform.python_version()}
try:
    import torch
    d.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
             cuda_available=torch.cuda.is_available(),
             cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                 memory_gib=round(p.total_memory / 2**30, 1),
                 l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                 device_count=torch.cuda.device_count())
except Exception as e:
    d["torch_error"] = f"{type(e).__name__}: {e}"
sys.path.insert(0, %r)
try:
    import setup as s
    home = s.find_cuda_home()
    d["cuda_home"] = home
    if home:
        import subprocess, os
        d["nvcc"] = subprocess.check_output([os.path.join(home, "bin", "nvcc"), "--version"],
                                            text=True).strip().splitlines()[-1]
except BaseException as e:
    d["nvcc_error"] = f"{type(e).__name__}: {e}"
print("JSON:" + json.dumps(d))
""" % ROOT
        rc, out = self.pyrun(code, timeout=self.timeout_for("env", later))
        m = re.search(r"^JSON:(.*)$", out, re.M)
        if m:
            info.update(json.loads(m.group(1)))
        else:
            info["python_error"] = out[-500:]
        san = find_sanitizer(info.get("cuda_home"))
        info["compute_sanitizer"] = san
        if san:
            rc2, out2, _ = run_cmd([san, "--version"], timeout=30, echo="none")
            info["compute_sanitizer_version"] = (out2.strip().splitlines() or [""])[-1]
        self.info = info
        self.has_gpu = bool(info.get("cuda_available"))
        for k in ("date_utc", "git_commit", "python", "python_exe", "torch", "torch_cuda",
                  "cudnn", "cuda_available", "device", "capability", "sms", "memory_gib",
                  "l2_mib", "nvidia_smi", "driver_cuda", "cuda_home", "nvcc", "nvcc_error",
                  "compute_sanitizer", "compute_sanitizer_version", "nproc", "torch_error"):
            if k in info:
                self.log(f"  {k:26s} {info[k]}")
        if "torch_error" in info or "torch" not in info:
            return self.record("env", "FAIL", time.monotonic() - t, "torch does not import")
        if not self.has_gpu:
            if self.dry:
                return self.record("env", "PASS", time.monotonic() - t,
                                   "no GPU: dry-run on the CPU")
            return self.record("env", "FAIL", time.monotonic() - t,
                               "torch sees no CUDA device: the GPU steps are skipped "
                               "(use --dry-run on a machine without a GPU)")
        return self.record("env", "PASS", time.monotonic() - t,
                           f"{info.get('device')} sm_{info.get('capability', '').replace('.', '')}"
                           f", torch {info.get('torch')}, CUDA {info.get('torch_cuda')}"
                           + torch_pin_note(info.get("torch")))

    def step_wheels(self, later):
        self.header("wheels", "Python packages carried as wheels in .whl/")
        t = time.monotonic()
        wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
        note = []
        if wheels:
            target = tempfile.mkdtemp(prefix="gpu_check_site_") if self.dry else \
                self.args.site
            cmd = [self.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                   "--no-compile", "--no-cache-dir", "--upgrade", "--target", target] + wheels
            self.log("  " + _cmd_str(cmd))
            rc, out, _ = run_cmd(cmd, timeout=self.timeout_for("wheels", later), env=self.env,
                                 logs=[self.log.f], echo="none")
            if rc != 0:
                self.log(out[-2000:])
                note.append(f"pip install of {len(wheels)} wheels failed (rc {rc})")
            elif self.dry:
                note.append(f"{len(wheels)} wheels install cleanly (into a scratch folder: "
                            f"dry-run keeps this environment's packages)")
                shutil.rmtree(target, ignore_errors=True)
            else:
                self.env["PYTHONPATH"] = os.pathsep.join([ROOT, target] + [
                    p for p in self.env["PYTHONPATH"].split(os.pathsep)[1:] if p != target])
                note.append(f"{len(wheels)} wheels installed into {target} (on PYTHONPATH)")
            self.log("  wheels: " + ", ".join(os.path.basename(w) for w in wheels))
        else:
            note.append("no .whl/ folder (run scripts/fetch_gpu_wheels.sh and carry .whl)")
        needs = {"timm": "bench_cbam (timm peer), bench_network (timm model), timm tests",
                 "pytorch_grad_cam": "grad-cam interop tests", "matplotlib": "--plot PNGs",
                 "tqdm": "progress bars", "pytest": "tests, sanitizer",
                 "xdist": "parallel tests (optional)", "rich": "terminal tables (optional)"}
        code = ("import importlib.util as u, json; print('JSON:' + json.dumps({n: "
                "u.find_spec(n) is not None for n in %r}))" % list(needs))
        rc, out = self.pyrun(code)
        m = re.search(r"^JSON:(.*)$", out, re.M)
        have = json.loads(m.group(1)) if m else {}
        self.info["packages"] = have
        for n, ok in have.items():
            self.log(f"  {n:18s} {'found' if ok else 'MISSING -> ' + needs[n]}")
            if not ok:
                self.missing[n] = needs[n]
        if self.missing:
            note.append("missing: " + ", ".join(self.missing))
        status = "FAIL" if any("failed" in n for n in note) else "PASS"
        return self.record("wheels", status, time.monotonic() - t, "; ".join(note))

    def _stamp(self, arch):
        import hashlib
        h = hashlib.sha1()
        files = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)) + \
            [os.path.join(ROOT, "setup.py")]
        for f in files:
            if os.path.isfile(f):
                h.update(f.encode())
                with open(f, "rb") as fh:
                    h.update(fh.read())
        return f"{h.hexdigest()} torch={self.info.get('torch')} arch={arch} py={self.py}"

    def _needs_sim(self, later):
        """Whether a later step runs tests that use the simulator: the whole suite does; the GPU
        tests alone (lease), the sanitizer's kernel tests and the benchmarks do not. Without it
        the build skips the simulator extension (CBAM_FUSED_BUILD_SIM=0, setup.py): the two
        extensions build one after the other, and the simulator's took about 40 of the 97 s of
        the H200's build."""
        return "tests" in later and self.opt("tests", "all") != "gpu"

    def step_build(self, later):
        t = time.monotonic()
        timeout = self.timeout_for("build", later)
        benv = dict(self.env, MAX_JOBS=str(self.nproc))
        sim = self._needs_sim(later)
        benv["CBAM_FUSED_BUILD_SIM"] = "1" if sim else "0"
        sim_note = "" if sim else "; no simulator (no later step needs it)"
        if self.dry or not self.has_gpu:
            self.header("build", "CPU-only build into a scratch folder (dry-run)")
            scratch = tempfile.mkdtemp(prefix="gpu_check_build_")
            benv["CBAM_FUSED_BUILD_CUDA"] = "0"
            cmd = [self.py, "setup.py", "-q", "build_ext", "--build-lib",
                   os.path.join(scratch, "lib"), "--build-temp", os.path.join(scratch, "tmp")]
            if shutil.which("flock"):
                cmd = ["flock", "/tmp/cbam_build.lock"] + cmd
            self.log("  would run on the GPU: TORCH_CUDA_ARCH_LIST=<major.minor of the device> "
                     f"MAX_JOBS={self.nproc} CBAM_FUSED_BUILD_SIM={benv['CBAM_FUSED_BUILD_SIM']} "
                     f"{self.py} setup.py build_ext --inplace")
            self.log("  dry-run: " + _cmd_str(cmd))
            # setup.py writes cbam_fused/_build_info.py in the checkout, which describes the
            # checkout's own build: kept as it was
            info_path = os.path.join(ROOT, "cbam_fused", "_build_info.py")
            info_before = open(info_path).read() if os.path.exists(info_path) else None
            try:
                rc, out, to = run_cmd(cmd, timeout=timeout, env=benv, logs=[self.log.f],
                                      echo=lambda l: "error" in l.lower())
            finally:
                if info_before is not None:
                    with open(info_path, "w") as f:
                        f.write(info_before)
                elif os.path.exists(info_path):
                    os.remove(info_path)
            built = glob.glob(os.path.join(scratch, "lib", "cbam_fused", "_C*.so"))
            shutil.rmtree(scratch, ignore_errors=True)
            if rc == 0 and built:
                return self.record("build", "PASS", time.monotonic() - t,
                                   "dry-run: CPU-only build (CBAM_FUSED_BUILD_CUDA=0) into a "
                                   "scratch folder; the tests use this checkout's build"
                                   + sim_note)
            return self.record("build", "TIMEOUT" if to else "FAIL", time.monotonic() - t,
                               f"CPU-only build failed (rc {rc}); see gpu_check.log")
        self.header("build", "the extension for this device's architecture")
        arch = self.info.get("capability")
        benv["TORCH_CUDA_ARCH_LIST"] = arch
        stamp_path = os.path.join(ROOT, "build", ".gpu_check_stamp")
        stamp = self._stamp(arch)
        # the stamp's last word: whether that build had the simulator (one with it serves both)
        done = open(stamp_path).read() if os.path.exists(stamp_path) else ""
        if done in (stamp + " sim=1", stamp + f" sim={int(sim)}") and self._import_ok():
            return self.record("build", "PASS", time.monotonic() - t,
                               f"already built for sm_{arch.replace('.', '')} from these sources "
                               f"(build/.gpu_check_stamp){sim_note}")
        # In place, with the build folder kept (build/temp.*): a later part, or a rerun after a
        # fix, compiles only what changed (pip install -e builds in a new temporary folder each
        # time); the checkout is on every step's PYTHONPATH, so nothing needs installing.
        cmd = [self.py, "setup.py", "build_ext", "--inplace"]
        if not sim:  # no simulator of older sources left beside the new _C
            for stale in glob.glob(os.path.join(ROOT, "cbam_fused", "_sim*.so")):
                os.remove(stale)
        self.log(f"  TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS={self.nproc} "
                 f"CBAM_FUSED_BUILD_SIM={benv['CBAM_FUSED_BUILD_SIM']} " + _cmd_str(cmd))
        logged = ninja_lines()
        rc, out, to = run_cmd(cmd, timeout=timeout, env=benv, logs=[self.log.f],
                              echo=lambda l: bool(re.search(r"error|warning:|FAILED", l, re.I)))
        # the files on the build's critical path (MAX_JOBS of them compile at once)
        compiled = slowest_compiles(logged, ninja_lines())
        slowest = "; " + ("slowest compiles: " + ", ".join(compiled) if compiled else
                          "nothing recompiled")
        self.log("  " + slowest[2:])
        if rc != 0:
            tail = "\n".join(out.splitlines()[-40:])
            print(tail)
            return self.record("build", "TIMEOUT" if to else "FAIL", time.monotonic() - t,
                               f"setup.py build_ext --inplace failed (rc {rc}); see "
                               f"gpu_check.log")
        ok, kernels = self._import_ok(report=True)
        if not ok:
            return self.record("build", "FAIL", time.monotonic() - t,
                               "built, but `import cbam_fused` fails: " + kernels)
        os.makedirs(os.path.dirname(stamp_path), exist_ok=True)
        with open(stamp_path, "w") as f:
            f.write(stamp + f" sim={int(sim)}")
        # the installation report and its self-test on every device (python -m cbam_fused)
        rc, out, _ = run_cmd([self.py, "-m", "cbam_fused"], timeout=120, env=self.env,
                             logs=[self.log.f], echo=lambda l: True)
        selftest = "; ".join(l for l in out.splitlines() if l.startswith(("self-test",
                                                                            "PROBLEM")))
        return self.record("build", "PASS", time.monotonic() - t,
                           f"sm_{arch.replace('.', '')}, MAX_JOBS={self.nproc}{sim_note}"
                           f"{slowest}; {kernels}; python -m cbam_fused: "
                           f"{selftest or f'rc {rc}'}")

    def _import_ok(self, report=False):
        code = ("import cbam_fused, json; from cbam_fused import _ops; "
                "print('JSON:' + json.dumps({o: bool(_ops.has_cuda_kernel(o)) for o in _ops.ALL_OPS}))")
        rc, out = self.pyrun(code)
        m = re.search(r"^JSON:(.*)$", out, re.M)
        if rc != 0 or not m:
            return (False, out.strip().splitlines()[-1] if out.strip() else f"rc {rc}") \
                if report else False
        k = json.loads(m.group(1))
        self.info["cuda_kernels"] = k
        native = [o for o, v in k.items() if v]
        desc = (f"CUDA kernels registered for {len(native)}/{len(k)} ops"
                + ("" if len(native) == len(k) else
                   f" (PyTorch fallback for {', '.join(o for o, v in k.items() if not v)})"))
        self.log("  " + desc)
        return (True, desc) if report else True

    def step_tests(self, later):
        scope = self.opt("tests", "all")
        self.header("tests", ("the GPU tests (pytest -m gpu)" if scope == "gpu" else
                              "the whole test suite" + ("" if self.dry else
                                                        ", GPU tests included")))
        t = time.monotonic()
        cmd = [self.py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
        if scope == "gpu" and not self.args.pytest_args:
            cmd += ["-m", "gpu"]
        n = self.args.xdist
        if n is None:
            n = 0 if self.dry else min(8, self.nproc)
        if n and self.info.get("packages", {}).get("xdist", True):
            # loadgroup: the tests marked xdist_group (the >2^31-element ones, ~25 GB of GPU
            # memory each) run one after the other on one worker
            cmd += ["-n", str(n), "--dist", "loadgroup"]
        cmd += self.args.pytest_args or ["tests"]
        self.log("  " + _cmd_str(cmd))
        self.tests_log.write(f"\n===== tests: {_cmd_str(cmd)}\n")
        env = dict(self.env)
        if self.dry:
            env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        elif "-n" in cmd:  # xdist workers share the cores: no thread oversubscription
            env.setdefault("OMP_NUM_THREADS", str(max(1, self.nproc // max(1, n))))

        def echo(line):
            return bool(re.match(r"(FAILED|ERROR)\b", line)) or bool(
                re.search(r"\d+ (passed|failed|error)", line))

        rc, out, to = run_cmd(cmd, timeout=self.timeout_for("tests", later), env=env,
                              logs=[self.tests_log], echo=echo)
        summary = _pytest_summary(out)
        skipped_gpu = len(re.findall(r"SKIPPED.*(CUDA|GPU|cuda|gpu)", out))
        note = ("GPU tests (-m gpu): " if "gpu" in cmd else "") + summary + (
            f"; {skipped_gpu} skips mention CUDA/GPU" if skipped_gpu else "")
        if to:
            return self.record("tests", "TIMEOUT", time.monotonic() - t, note)
        status = "PASS" if rc == 0 else "FAIL"
        return self.record("tests", status, time.monotonic() - t, note or f"rc {rc}")

    def step_sanitizer(self, later):
        tools = self.opt("sanitizer", SANITIZER_TOOLS)
        self.header("sanitizer", "compute-sanitizer " + ", ".join(tools))
        t = time.monotonic()
        f = self.args.sanitize_file
        sel = self.args.sanitize_k
        path = os.path.join(ROOT, f)
        if not os.path.exists(path):
            return self.record("sanitizer", "SKIP", time.monotonic() - t,
                               f"SKIPPED: no {f} (set GPU_CHECK_SANITIZE_FILE to a kernel test "
                               f"file)")
        base = [self.py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                f] + (["-k", sel] if sel else [])
        san = self.info.get("compute_sanitizer")
        if self.dry or not self.has_gpu or not san:
            rc, out, _ = run_cmd(base[:4] + ["--collect-only"] + base[4:], timeout=120,
                                 env=self.env, logs=[self.tests_log], echo="none")
            m = re.search(r"(\d+)(?:/\d+)? tests? collected|(\d+) selected", out)
            cnt = (m.group(1) or m.group(2)) if m else "?"
            why = "dry-run, no GPU" if (self.dry or not self.has_gpu) else \
                "compute-sanitizer not found"
            status = "SKIP" if (self.dry or not self.has_gpu) else "FAIL"
            return self.record("sanitizer", status, time.monotonic() - t,
                               f"{why}; the selection ({f}{' -k ' + repr(sel) if sel else ''}) "
                               f"collects {cnt} tests (rc {rc})")
        helptext = run_cmd([san, "--help"], timeout=30, echo="none")[1]
        filt = []
        if self.args.kernel_filter:
            opt = "--kernel-name" if "--kernel-name" in helptext else "--filter"
            filt = [opt, f"kns={self.args.kernel_filter}"]
        per_tool = {"memcheck": ["--leak-check", "no"], "racecheck": [], "initcheck": [],
                    "synccheck": []}
        # initcheck sees a write only from an instrumented kernel: under the kernel filter, an
        # input that a PyTorch kernel wrote (a .contiguous() copy) reads as uninitialized in ours
        # (the H200 run of 2026-11-26: 80 such reports in backward_reduce). So initcheck
        # instruments every kernel, and only the reports inside the filter's kernels count.
        no_filter = {"initcheck"}
        notes, failed = [], False
        for i, tool in enumerate(tools):
            remaining_tools = len(tools) - i
            budget = (self.timeout_for("sanitizer", later) - 5) / remaining_tools
            if budget < 20:
                notes.append(f"{tool}: TIMEOUT (no budget left)")
                failed = True
                continue
            cmd = [san, "--tool", tool, "--error-exitcode", "17", "--report-api-errors", "no",
                   *([] if tool in no_filter else filt), *per_tool[tool], *base]
            self.log(f"  {_cmd_str(cmd)}  (timeout {budget:.0f} s)")
            self.tests_log.write(f"\n===== sanitizer {tool}: {_cmd_str(cmd)}\n")
            tt = time.monotonic()
            rc, out, to = run_cmd(cmd, timeout=budget, env=self.env, logs=[self.tests_log],
                                  echo=lambda l: bool(re.search(
                                      r"ERROR SUMMARY|HAZARD|Invalid|========= (Error|Race)"
                                      r"|\d+ (passed|failed)", l)))
            m = re.search(r"ERROR SUMMARY: (\d+) error", out)
            nerr = int(m.group(1)) if m else None
            hz = re.search(r"RACECHECK SUMMARY: (\d+) hazard", out)
            if hz:
                nerr = (nerr or 0) + int(hz.group(1))
            others = 0
            if tool in no_filter and self.args.kernel_filter and nerr:
                ours, others = attribute_reports(out, self.args.kernel_filter)
                nerr = ours
                if rc == 17 and ours == 0:
                    rc = 0
            dt = time.monotonic() - tt
            extra = f"; {others} in other kernels, not counted" if others else ""
            if to:
                notes.append(f"{tool}: TIMEOUT after {dt:.0f} s")
                failed = True
            elif rc == 5:
                notes.append(f"{tool}: no test selected")
                failed = True
            elif rc == 17 or (nerr or 0) > 0:
                notes.append(f"{tool}: {nerr} reports{extra}")
                failed = True
            elif rc != 0:
                notes.append(f"{tool}: tests failed under the sanitizer (rc {rc})")
                failed = True
            else:
                notes.append(f"{tool}: 0 errors ({dt:.0f} s){extra}")
        return self.record("sanitizer", "FAIL" if failed else "PASS", time.monotonic() - t,
                           "; ".join(notes))

    def step_bandwidth(self, later):
        self.header("bandwidth", "device-to-device copy bandwidth")
        t = time.monotonic()
        dev = "cuda" if self.has_gpu and not self.dry else "cpu"
        code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); "
                f"import json, torch, bench_util as bu; "
                f"r = bu.copy_bandwidth(torch.device({dev!r})); print('JSON:' + json.dumps(r))")
        rc, out = self.pyrun(code, timeout=self.timeout_for("bandwidth", later))
        m = re.search(r"^JSON:(.*)$", out, re.M)
        if rc != 0 or not m:
            self.log(out[-2000:])
            return self.record("bandwidth", "FAIL", time.monotonic() - t, f"rc {rc}")
        r = json.loads(m.group(1))
        self.info["copy_gb_per_s"] = r["gb_per_s"]
        self.log(f"  {dev}: {r['gb_per_s']:.1f} GB/s (read + write; "
                 f"{r['bytes_copied'] / 2**20:.0f} MiB copied, median of {r['reps']})")
        return self.record("bandwidth", "PASS", time.monotonic() - t,
                           f"{r['gb_per_s']:.0f} GB/s ({dev}, read + write)")

    def _bench(self, step, script, later, extra_gpu, extra_cpu):
        self.header(step, f"benchmarks/{script}")
        t = time.monotonic()
        timeout = self.timeout_for(step, later)
        if step == "bench_cbam" and "bench_network" in later:
            # share what is left with the network benchmark: 55% here, 45% there
            timeout = min(timeout, max(60.0, 0.55 * (self.left() - sum(
                RESERVE[s] for s in later if s != "bench_network"))))
        name = step
        js, png = os.path.join(self.dir, f"{name}.json"), os.path.join(self.dir, f"{name}.png")
        cmd = [self.py, os.path.join(ROOT, "benchmarks", script), "--json", js, "--plot", png]
        env = dict(self.env)
        if self.dry or not self.has_gpu:
            cmd += ["--device", "cpu", "--quick"] + extra_cpu
            env.setdefault("OMP_NUM_THREADS", "1")
        else:
            # the benchmark's own budget: its timeout less start-up, plotting and a margin
            cmd += ["--max-minutes", f"{max(0.5, (timeout - 45) / 60):.1f}"] + extra_gpu
        earlier = os.path.join(self.args.resume_from, f"{name}.json") \
            if self.args.resume_from else None
        if earlier and os.path.exists(earlier):
            # the benchmark keeps what that run measured on this device, torch and sources (else
            # it says why not and measures everything)
            cmd += ["--resume", earlier]
        self.log("  " + _cmd_str(cmd))
        rc, out, to = run_cmd(cmd, timeout=timeout, env=env, logs=[self.log.f], echo="all")
        ok = os.path.exists(js) and os.path.exists(png)
        note = f"{'wrote' if ok else 'MISSING'} {name}.json, {name}.png"
        try:
            with open(js) as f:
                res = json.load(f)
            errs = _bench_errors(res)
            if errs:
                note += f"; {errs} peer/variant errors (see the JSON)"
            if not res.get("finished"):
                note += "; run did not finish (partial JSON)"
        except (OSError, ValueError):
            errs = 0
        if self.missing.get("timm"):
            note += "; timm missing: its peer/model skipped"
        status = "TIMEOUT" if to else ("PASS" if rc == 0 and ok and not errs else "FAIL")
        return self.record(step, status, time.monotonic() - t, note)

    def step_bench_cbam(self, later):
        return self._bench("bench_cbam", "bench_cbam.py", later, self.opt("bench_cbam", []),
                           ["--kernels", "on"] +
                           (["--peers", self.args.cpu_peers] if self.args.cpu_peers else []))

    def step_bench_network(self, later):
        return self._bench("bench_network", "bench_network.py", later,
                           self.opt("bench_network", []), [])

    def step_sweep(self, later):
        """The launchers' tuning sweep: every op at the ResNet-50 sites under every setting of
        bench_kernels.SWEEP; its per_op table says which knobs to set in op_tuning.h."""
        self.header("sweep", "benchmarks/bench_kernels.py --sweep (launcher tuning)")
        t = time.monotonic()
        if self.dry or not self.has_gpu:
            return self.record("sweep", "SKIP", time.monotonic() - t,
                               "SKIPPED: needs a GPU and the CUDA kernels (dry run / no GPU)")
        js = os.path.join(self.dir, "sweep.json")
        timeout = self.timeout_for("sweep", later)
        # its own budget: the timeout less start-up (torch, CUDA, copy bandwidth) and the cases
        # measured at the defaults after the budget
        cmd = [self.py, os.path.join(ROOT, "benchmarks", "bench_kernels.py"), "--sweep",
               "--no-progress", "--json", js, "--max-minutes",
               f"{max(0.25, (timeout - 40) / 60):.2f}"]
        self.log("  " + _cmd_str(cmd))
        rc, out, to = run_cmd(cmd, timeout=timeout, env=self.env, logs=[self.log.f], echo="all")
        res = _load(js) or {}
        sw = res.get("sweep") or {}
        per_op = sw.get("per_op") or {}
        note = "; ".join(f"{op} {r['best']} ({100 * r['best_gmean']:.0f}% vs default "
                         f"{100 * (r['default_gmean'] or 0):.0f}%)" for op, r in per_op.items())
        if sw:
            note = f"{sw.get('cases_swept')}/{sw.get('cases')} cases swept: {note}"
        status = "TIMEOUT" if to else ("PASS" if rc == 0 and per_op else "FAIL")
        return self.record("sweep", status, time.monotonic() - t,
                           note or f"rc {rc}, no per_op table in sweep.json")

    def step_profile(self, later):
        """Nsight Compute over each op once at the largest and the smallest ResNet-50 site
        (benchmarks/profile_kernels.py; the lease part: its LEASE_CASES only): DRAM throughput,
        occupancy, waves, registers, cycles per issued instruction of every kernel -> ncu.csv
        (its first line the selection, "# cases: NAME"), a table in summary.md."""
        self.header("profile", "ncu over benchmarks/profile_kernels.py (hardware counters)")
        t = time.monotonic()
        script = os.path.join(ROOT, "benchmarks", "profile_kernels.py")
        selection = self.opt("profile", "all")
        if self.dry or not self.has_gpu:
            rc, out, _ = run_cmd([self.py, script, "--manifest", "--cases", selection],
                                 timeout=60, env=self.env, logs=[self.log.f], echo="none")
            n = len(out.split()) if rc == 0 else "?"
            return self.record("profile", "SKIP", time.monotonic() - t,
                               f"SKIPPED: needs a GPU (dry run / no GPU); {n} cases (rc {rc})")
        ncu = find_ncu(self.info.get("cuda_home"))
        if not ncu:
            return self.record("profile", "FAIL", time.monotonic() - t, "ncu not found")
        csv_path = os.path.join(self.dir, "ncu.csv")
        cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off",
               "--kernel-name", "regex:cbam"]
        for sec in NCU_SECTIONS:
            cmd += ["--section", sec]
        cmd += ["--csv", "--page", "details", "--log-file", csv_path, self.py, script,
                "--cases", selection]
        self.log("  " + _cmd_str(cmd))
        rc, out, to = run_cmd(cmd, timeout=self.timeout_for("profile", later), env=self.env,
                              logs=[self.log.f], echo="all")
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import profile_kernels  # standard library only at import
        report = ""
        if os.path.exists(csv_path):
            with open(csv_path, errors="replace") as f:
                report = f.read()
        if '"ID"' not in report and '"ID"' in out:  # an ncu that printed its report instead
            report = out
        with open(csv_path, "w") as f:  # the selection first: the summary reads it
            f.write(f"# cases: {selection}\n" + report)
        rows = profile_kernels.summary_rows(csv_path)
        status = "TIMEOUT" if to else ("PASS" if rc == 0 and rows else "FAIL")
        return self.record("profile", status, time.monotonic() - t,
                           f"{len(rows)} kernels profiled (ncu.csv), rc {rc}")

    # -- driver ------------------------------------------------------------------------------
    def run(self, steps):
        self.log(f"[gpu_check] {now_utc().isoformat(timespec='seconds')} part={self.args.part} "
                 f"steps={','.join(steps)} dry_run={self.dry} dir={self.dir} "
                 f"budget={self.budget / 60:.1f} min python={self.py}")
        for i, step in enumerate(steps):
            later = steps[i + 1:]
            if self.left() < 10:
                self.record(step, "SKIP", 0, "SKIPPED: the overall time budget is spent")
                continue
            if step not in ("env", "wheels") and not self.has_gpu and not self.dry and \
                    "env" in [r["step"] for r in self.results]:
                self.record(step, "SKIP", 0, "SKIPPED: no GPU (see env)")
                continue
            # (a dry run's build goes to a scratch folder: the later steps use this checkout's
            # own build, so they still run)
            if step in ("tests", "sanitizer", "bandwidth", "sweep", "profile", "bench_cbam",
                        "bench_network") and \
                    not self.dry and any(r["step"] == "build" and r["status"] in
                                         ("FAIL", "TIMEOUT") for r in self.results):
                self.record(step, "SKIP", 0, "SKIPPED: the build failed")
                continue
            try:
                getattr(self, f"step_{step}")(later)
            except Exception as e:  # noqa: BLE001  (a bug here must not lose the other steps)
                import traceback
                self.log(traceback.format_exc())
                self.record(step, "FAIL", 0, f"gpu_check error: {type(e).__name__}: {e}")
        self.finish()
        return 0 if all(r["status"] in ("PASS", "SKIP") for r in self.results) else 1

    def write_steps(self):
        with open(os.path.join(self.dir, "steps.json"), "w") as f:
            json.dump({"part": self.args.part, "dry_run": self.dry, "info": self.info,
                       "steps": self.results,
                       "elapsed_s": round(time.monotonic() - self.t0, 1)}, f, indent=1)

    def finish(self):
        self.write_steps()
        write_summary(self.dir, [self.dir])
        self.tests_log.close()
        cap_files(self.dir)
        print_table(self.results, self.log, self.dir, time.monotonic() - self.t0, self.dry)


# ---------------------------------------------------------------------------------------------
# helpers used by the protocol and by `merge`
# ---------------------------------------------------------------------------------------------
def attribute_reports(out, kernel_filter):
    """(reports in kernels whose device frames name `kernel_filter`, reports elsewhere) in
    compute-sanitizer output. A report starts at a '========= X' line (not the banner or the
    summary) and runs to the next; it is ours when one of its device lines ('=========  at ...',
    '=========  Device Frame: ...') holds the filter (host frames do not count: a PyTorch
    kernel launched from our launcher has our functions on its host stack)."""
    ours = others = 0
    block = None
    for line in out.splitlines() + ["========= END"]:
        i = line.find("=========")
        if i < 0:
            continue
        body = line[i:]
        if re.match(r"========= \S", body) and not re.match(
                r"========= (ERROR SUMMARY|COMPUTE-SANITIZER|RACECHECK SUMMARY)", body):
            if block is not None:
                if any(kernel_filter in ln for ln in block
                       if re.match(r"=========\s+(at |Device Frame:)", ln)):
                    ours += 1
                else:
                    others += 1
            block = [body]
        elif block is not None:
            block.append(body)
    return ours, others


def find_ncu(cuda_home):
    cands = [shutil.which("ncu")]
    for home in [cuda_home, os.environ.get("CUDA_HOME"), "/usr/local/cuda"] + sorted(
            glob.glob("/usr/local/cuda-*"), reverse=True):
        if home:
            cands.append(os.path.join(home, "bin", "ncu"))
    cands += sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_sanitizer(cuda_home):
    cands = [shutil.which("compute-sanitizer")]
    for home in [cuda_home, os.environ.get("CUDA_HOME"), "/usr/local/cuda"] + sorted(
            glob.glob("/usr/local/cuda-*"), reverse=True):
        if home:
            cands += [os.path.join(home, "bin", "compute-sanitizer"),
                      os.path.join(home, "compute-sanitizer", "compute-sanitizer")]
    cands += sorted(glob.glob("/opt/nvidia/*/compute-sanitizer/compute-sanitizer"))
    for sp in sys.path + glob.glob("/opt/*/.venv/lib/python3*/site-packages"):
        cands += glob.glob(os.path.join(sp, "nvidia", "*", "bin", "compute-sanitizer"))
        cands += glob.glob(os.path.join(sp, "nvidia", "*", "compute-sanitizer",
                                        "compute-sanitizer"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def ninja_lines():
    """The lines of the build's ninja logs (build/temp.*/.ninja_log), per log file."""
    out = {}
    for f in glob.glob(os.path.join(ROOT, "build", "temp.*", ".ninja_log")):
        with open(f) as fh:
            out[f] = fh.read().splitlines()
    return out


def slowest_compiles(before, after, n=3):
    """The n longest compile steps a build added to the ninja logs (ninja_lines() before and
    after it), as "name seconds" strings, longest first: ninja logs each step as start and end
    in milliseconds, then the output's path."""
    steps = []
    for f, lines in after.items():
        for line in lines[len(before.get(f, [])):]:
            parts = line.split("\t")
            if line.startswith("#") or len(parts) < 4:
                continue
            try:
                steps.append(((int(parts[1]) - int(parts[0])) / 1000.0,
                              os.path.basename(parts[3])))
            except ValueError:
                continue
    steps.sort(reverse=True)
    return [f"{name} {sec:.0f} s" for sec, name in steps[:n]]


def _pytest_summary(out):
    lines = [l for l in out.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", l)]
    return lines[-1].strip("= ").strip() if lines else ""


def _bench_errors(res):
    n = 0
    for c in res.get("cases", []):
        n += sum(1 for r in c.get("peers", {}).values() if r.get("error"))
    n += sum(1 for r in res.get("results", []) if r.get("error"))
    n += sum(1 for c in res.get("conversion", {}).values() if c.get("error"))
    return n


def cap_files(d, limit=12 << 20):
    """Keeps every log under the device tool's per-file limit (16 MiB): head and tail."""
    for name in ("gpu_check.log", "tests.log"):
        p = os.path.join(d, name)
        if os.path.exists(p) and os.path.getsize(p) > limit:
            with open(p, "rb") as f:
                data = f.read()
            cut = b"\n\n[gpu_check] ... %d bytes cut ...\n\n" % (len(data) - limit)
            with open(p, "wb") as f:
                f.write(data[:2 << 20] + cut + data[-(limit - (2 << 20)):])


def print_table(results, log, d, elapsed, dry):
    log("")
    log("=" * 100)
    title = "GPU protocol summary" + (" (DRY RUN on the CPU)" if dry else "")
    log(f"{title} - {elapsed / 60:.1f} min - results in {d}")
    log(f"{'step':14s} {'status':8s} {'time':>7s}  note")
    for r in results:
        log(f"{r['step']:14s} {r['status']:8s} {r['seconds']:6.0f}s  {r['note']}")
    files = sorted(os.listdir(d))
    log(f"files ({len(files)}): {', '.join(files)}")
    if len(files) > 8:
        log("WARNING: more than 8 files in the results folder")


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3g} ms"


def write_summary(d, part_dirs):
    """summary.md from the steps.json of the parts and the benchmark JSONs in d."""
    steps, info, dry = [], {}, False
    for pd in part_dirs:
        s = _load(os.path.join(pd, "steps.json"))
        if s:
            steps += [dict(r, part=r.get("part") or s.get("part")) for r in s["steps"]]
            info.update({k: v for k, v in s.get("info", {}).items() if v is not None})
            dry = dry or s.get("dry_run", False)
    L = []
    dev = info.get("device") or ("CPU (dry run)" if dry else "?")
    L.append(f"# GPU protocol results: {dev}, {str(info.get('date_utc', ''))[:10]}")
    L.append("")
    if dry:
        L.append("**DRY RUN on a machine without a GPU**: CPU figures only show the scripts "
                 "work; they say nothing about cbam_fused's speed.")
        L.append("")
    L.append(f"- commit `{info.get('git_commit')}`{' (dirty tree)' if info.get('git_dirty') else ''}")
    L.append(f"- nvidia-smi: {info.get('nvidia_smi', '-')}; capability {info.get('capability', '-')}, "
             f"{info.get('sms', '-')} SMs, L2 {info.get('l2_mib', '-')} MiB")
    L.append(f"- torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), Python "
             f"{info.get('python')}, nvcc: {info.get('nvcc', info.get('nvcc_error', '-'))}")
    L.append(f"- compute-sanitizer: {info.get('compute_sanitizer_version') or info.get('compute_sanitizer') or 'not found'}")
    if info.get("cuda_kernels"):
        k = info["cuda_kernels"]
        L.append(f"- cbam_fused CUDA kernels: {sum(k.values())}/{len(k)} ops"
                 + ("" if all(k.values()) else " (the rest: PyTorch fallback)"))
    if info.get("copy_gb_per_s"):
        L.append(f"- copy bandwidth: {info['copy_gb_per_s']:.0f} GB/s (read + write)")
    L.append("")
    L.append("## Steps")
    L.append("")
    L.append("| step | part | status | time | note |")
    L.append("|---|---|---|---|---|")
    for r in steps:
        note = str(r.get("note", "")).replace("|", "/")
        L.append(f"| {r['step']} | {r.get('part', '')} | {r['status']} | {r['seconds']:.0f} s | "
                 f"{note} |")
    L.append("")
    bc = _load(os.path.join(d, "bench_cbam.json"))
    if bc:
        L.append("## Layer benchmark (bench_cbam.json, bench_cbam.png)")
        L.append("")
        cb = bc.get("copy_bandwidth", {})
        L.append(f"Copy bandwidth in the same run: {cb.get('gb_per_s', 0):.0f} GB/s. "
                 "Speed-up = peer time / cbam_fused time (geometric mean over the cases); "
                 "%copy = cbam_fused's pass-floor bytes / time as a fraction of the copy "
                 "bandwidth (floor: fwd 2, train 5 x-sized passes).")
        if not bc["meta"].get("cbam_fused_native"):
            L.append("")
            L.append("**cbam_fused ran without its own CUDA kernels (CPU, or PyTorch fallback): "
                     "not the product's figures.**")
        L.append("")
        peers = [p for p in bc["settings"]["peers"] if p != "cbam_fused"]
        L.append("| mode/dtype | cases | " + " | ".join(f"vs {p}" for p in peers) +
                 " | cbam_fused %copy |")
        L.append("|---|---|" + "---|" * len(peers) + "---|")
        for k, s in bc.get("summary", {}).items():
            sp = [s["geomean_speedup_of_fused"].get(p) for p in peers]
            fr = s["mean_frac_copy_bw"].get("cbam_fused")
            cells = [f"{v:.2f}x" if v else "-" for v in sp]
            L.append(f"| {k} | {s['cases']} | " + " | ".join(cells) +
                     (f" | {100 * fr:.2g}% |" if fr else " | - |"))
        L.append("")
        gsum = {k: s for k, s in bc.get("summary", {}).items()
                if any((s.get("geomean_speedup_of_fused_graph") or {}).values())}
        if gsum:
            L.append("The same inside CUDA graphs (each eager module's runs captured and "
                     "replayed: the GPU's time without the host's):")
            L.append("")
            gpeers = [p for p in peers if not p.startswith("compile")]
            L.append("| mode/dtype | " + " | ".join(f"vs {p}" for p in gpeers) +
                     " | cbam_fused %copy |")
            L.append("|---|" + "---|" * len(gpeers) + "---|")
            for k, s in gsum.items():
                cells = [f"{v:.2f}x" if v else "-" for v in
                         (s["geomean_speedup_of_fused_graph"].get(p) for p in gpeers)]
                fr = (s.get("mean_graph_frac_copy_bw") or {}).get("cbam_fused")
                L.append(f"| {k} | " + " | ".join(cells) +
                         (f" | {100 * fr:.2g}% |" if fr else " | - |"))
            L.append("")
        st = bc.get("settings") or {}
        n, tps = st.get("tiles_also"), st.get("tiles_per_sm")
        # (0: each op's own grid sizing, csrc/launchers/op_tuning.h, else 32)
        default = (" each op's own, the default (`csrc/launchers/op_tuning.h`; " if tps == 0 else
                   f" the default {'?' if tps is None else tps} (")
        # cbam_fused's graph time under another setting over its time under the default, per
        # mode and dtype (bench_cbam's summary): a line each where the run timed it
        for key, text in (
                ("geomean_forward_over_alternate",
                 "Tile order of the passes (--pass-order both): cbam_fused's graph time with "
                 "every pass from its first tile over its time with alternating orders "
                 "(geometric mean; > 1: alternating is faster): "),
                ("geomean_tiles_also_over_default",
                 f"Tiles an SM (--tiles-also {n}): cbam_fused's graph time with {n} tiles an SM "
                 f"over its time with{default}geometric mean; > 1: the default "
                 "is faster): "),
                ("geomean_pdl_over_default",
                 "Programmatic dependent launch (--pdl-also): cbam_fused's graph time with it "
                 "over its time without (geometric mean; < 1: it is faster, and set_pdl(1) "
                 "should become the default): ")):
            ratios = {k: s[key] for k, s in bc.get("summary", {}).items() if s.get(key)}
            if ratios:
                L.append(text + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()) + ".")
                L.append("")
        L.append("| case | " + " | ".join(bc["settings"]["peers"]) + " | fused host | "
                 "fused graph | fused GB/s | fused %copy | fused peak mem |")
        L.append("|---|" + "---|" * (len(bc["settings"]["peers"]) + 5))
        for c in bc.get("cases", [])[:80]:
            pr = c["peers"]
            f = pr.get("cbam_fused", {})
            cells = []
            for p in bc["settings"]["peers"]:
                r = pr.get(p, {})
                cells.append("ERR" if r.get("error") else "skip" if r.get("skipped") else
                             _fmt_ms(r.get("median_ms")))
            mem = f.get("peak_mem_bytes")
            L.append(f"| {c['id']} | " + " | ".join(cells) +
                     f" | {_fmt_ms(f.get('host_ms'))} | {_fmt_ms(f.get('graph_ms'))} | "
                     f"{f.get('eff_gb_per_s') or 0:.3g} | "
                     f"{100 * (f.get('frac_copy_bw') or 0):.2g}% | "
                     f"{'-' if mem is None else f'{mem / 2**20:.0f} MiB'} |")
        if len(bc.get("cases", [])) > 80:
            L.append(f"| ... {len(bc['cases']) - 80} more in the JSON | |")
        L.append("")
        kr = bc.get("kernels")
        if kr:
            L.append(f"### Each op alone (issue 4's target: >= {int(100 * kr['target_frac'])}% "
                     f"of copy bandwidth at batch {kr['batch']})")
            L.append("")
            L.append("Bytes = every tensor the op takes and returns; %copy = bytes / median "
                     "time / copy bandwidth; %same-size = the time of PyTorch's copy of the same "
                     "bytes (clone(), timed the same way) / the op's time"
                     + (f"; a launch alone (one-element clone) takes "
                        f"{_fmt_ms(kr['launch_floor_ms'])}" if kr.get("launch_floor_ms") else "")
                     + ".")
            L.append("")

            def pct(v):
                return "-" if v is None else f"{100 * v:.3g}%"
            L.append("| dtype/layout | ops at target | min %copy (weakest) | mean %copy | "
                     "at 80% of a same-size copy | min, mean %same-size |")
            L.append("|---|---|---|---|---|---|")
            for k, s in kr.get("summary", {}).items():
                L.append(f"| {k} | {s['meeting_target']}/{s['cases']} | "
                         f"{100 * s['min_frac']:.3g}% ({s['weakest']}) | "
                         f"{100 * s['mean_frac']:.3g}% | "
                         f"{s.get('meeting_target_same_size', '-')}/{s['cases']} | "
                         f"{pct(s.get('min_frac_same_size'))}, "
                         f"{pct(s.get('mean_frac_same_size'))} |")
            L.append("")
            # bench_cbam --kernels-previous: each op again under today's defaults and the
            # previous ones (kernels.tuning_pair: their keys in cases[].sweep)
            pair = kr.get("tuning_pair") or []
            per_op = {}
            for c in kr.get("cases", []) if len(pair) == 2 else []:
                sw = c.get("sweep") or {}
                if sw.get(pair[0]) and sw.get(pair[1]):
                    per_op.setdefault(c["op"], []).append((sw[pair[0]], sw[pair[1]]))
            if per_op:
                def gm(v):
                    return math.exp(sum(math.log(x) for x in v) / len(v))
                L.append(f"Each op again under today's defaults ({pair[0]}) and the defaults "
                         f"before each op had its own ({pair[1]}, the same for every op; "
                         "`bench_cbam.py --kernels-previous`), in the same graphs: per op, the "
                         "geometric mean of %copy over the cases, today's against before: "
                         + "; ".join(f"{op} {pct(gm([a for a, _ in v]))} vs "
                                     f"{pct(gm([b for _, b in v]))}" for op, v in per_op.items())
                         + ".")
                L.append("")
            extra = len(pair) == 2
            L.append("| op | site | dtype layout | median | GB/s | %copy | same-size copy | "
                     "%same-size |" + (" %copy today / before |" if extra else ""))
            L.append("|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
            for c in kr.get("cases", []):
                tb = "-"
                if extra and c.get("sweep"):
                    a, b = c["sweep"].get(pair[0]), c["sweep"].get(pair[1])
                    tb = f"{pct(a)} / {pct(b)}" if a and b else "-"
                L.append(f"| {c['op']} | {c['site']} | {c['dtype']} {c['layout']} | "
                         + ("ERR | - | - | - | - |" if c.get("error") else
                            f"{_fmt_ms(c['median_ms'])} | {c['gb_per_s']:.4g} | "
                            f"{100 * c['frac_copy_bw']:.3g}% | "
                            f"{_fmt_ms(c.get('copy_same_ms'))} | "
                            f"{pct(c.get('frac_same_size_copy'))} |")
                         + (f" {tb} |" if extra else ""))
            L.append("")
            if kr.get("heads"):
                L.append("The heads against the ATen ops each replaced in the block: the channel "
                         "gate's forward (channel_head, two or three kernels; cat, linear, relu, "
                         "linear, sum, sigmoid) and backward (channel_head_backward, two or three; "
                         "repeat, four mm, two sums, threshold_backward), the spatial gate's "
                         "forward (spatial_head, one kernel; "
                         "cat, convolution, batch_norm, sigmoid) and backward "
                         "(spatial_head_backward, two; sigmoid_backward, batch_norm_backward, "
                         "convolution_backward, a copy), and its BatchNorm with batch "
                         "statistics (batch_norm_gate, two; native_batch_norm, sigmoid, var_mean; "
                         "batch_norm_gate_backward, two; sigmoid_backward, "
                         "native_batch_norm_backward):")
                L.append("")
                L.append("| op | site | maps | fused | ATen ops | speed-up |")
                L.append("|---|---|---|---|---|---|")
                for h in kr["heads"]:
                    L.append(f"| {h.get('op', 'spatial_head')} | {h['site']} | "
                             f"{'x'.join(map(str, h['maps']))} | "
                             + ("ERR | - | - |" if h.get("error") else
                                f"{_fmt_ms(h['fused_ms'])} | {_fmt_ms(h['aten_ms'])} | "
                                f"{h['speedup']:.2f}x |"))
                L.append("")
    sw = (_load(os.path.join(d, "sweep.json")) or {}).get("sweep")
    if sw and sw.get("per_op"):
        L.append("## Launcher tuning sweep (sweep.json)")
        L.append("")
        L.append("Settings tiles_per_sm/min_rows_per_thread/vec_rows_in_flight/"
                 "reduce_k_mode/k_vectors_in_flight/reduce_r_mode/side_share/k_tile_vectors "
                 "(older runs: the first four to six); the geometric "
                 "mean over the cases of each op's fraction of copy bandwidth. Set the best as "
                 "the op's own in `csrc/launchers/op_tuning.h` (or, for every op, the defaults "
                 "in `csrc/launchers/launchers.h`).")
        L.append("")
        labels = list(next(iter(sw["per_op"].values())).get("reference_gmean") or {})
        L.append("| op | best | best %copy | default %copy |"
                 + "".join(f" {lb} |" for lb in labels))
        L.append("|---|---|---|---|" + "---|" * len(labels))
        for op, r in sw["per_op"].items():
            refs = r.get("reference_gmean") or {}
            L.append(f"| {op} | {r['best']} | {100 * (r.get('best_gmean') or 0):.3g}% | "
                     f"{100 * (r.get('default_gmean') or 0):.3g}% |"
                     + "".join(" - |" if refs.get(lb) is None else f" {100 * refs[lb]:.3g}% |"
                               for lb in labels))
        L.append("")
    ncu_csv = os.path.join(d, "ncu.csv")
    if os.path.exists(ncu_csv):
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import io
        import profile_kernels
        buf = io.StringIO()
        rows = profile_kernels.summarize(ncu_csv, buf)
        L.append("## Kernel profile (ncu.csv)")
        L.append("")
        L.append(f"Nsight Compute, one call of each op at batch 64 (`benchmarks/profile_kernels.py`), "
                 f"{len(rows)} kernels; DRAM % and SM % of their peaks, occupancy in % of the "
                 f"warps an SM holds.")
        L.append("")
        L.append(buf.getvalue())
    bn = _load(os.path.join(d, "bench_network.json"))
    if bn:
        st = bn["settings"]
        L.append("## Network benchmark (bench_network.json, bench_network.png)")
        L.append("")
        L.append(f"ResNet-50 with CBAM in every bottleneck; {st['precision']} "
                 f"{'autocast, channels-last' if st['channels_last'] else ''}, "
                 f"{st['image_size']}px images.")
        for m, c in bn.get("conversion", {}).items():
            L.append(f"- {m}: {c.get('method')}: {c.get('blocks_converted')} blocks, max rel "
                     f"logit diff vs eager {c.get('max_rel_diff_vs_eager')}"
                     + (f", ERROR {c['error']}" if c.get("error") else ""))
        L.append("")
        L.append("| model | mode | batch | variant | images/s | median step | peak mem | "
                 "speed-up |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in bn.get("results", []):
            if r.get("error") or r.get("skipped"):
                L.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['variant']} | "
                         f"{'ERROR' if r.get('error') else 'skipped'} | | | |")
                continue
            sp = r.get("speedup_vs_compile") if r["variant"] == "compile+fused" else \
                r.get("speedup_vs_eager")
            mem = r.get("peak_mem_bytes")
            L.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['variant']} | "
                     f"{r['images_per_s']:.1f} | {_fmt_ms(r['median_ms'])} | "
                     f"{'-' if mem is None else f'{mem / 2**30:.2f} GiB'} | "
                     f"{f'{sp:.2f}x' if sp else '-'} |")
        L.append("")
        L.append("speed-up: over eager (fused, compile), over compile (compile+fused).")
        L.append("")
    L.append("## Files")
    L.append("")
    for name, what in (("gpu_check.log", "everything the protocol printed: versions, build, "
                        "bandwidth, the benchmarks' tables"),
                       ("tests.log", "the test suite's and the sanitizer runs' full output"),
                       ("steps.json", "each step's status, time and note, and the versions"),
                       ("bench_cbam.json", "layer benchmark records (schema in "
                        "benchmarks/bench_cbam.py)"),
                       ("bench_cbam.png", "speed-ups and bandwidth fractions per shape"),
                       ("bench_network.json", "network benchmark records"),
                       ("bench_network.png", "images/s and peak memory"),
                       ("sweep.json", "the launcher tuning sweep (schema in "
                        "benchmarks/bench_kernels.py)")):
        if os.path.exists(os.path.join(d, name)):
            L.append(f"- `{name}`: {what}")
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write("\n".join(L) + "\n")


def merge(args):
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    steps, info, parts, dry = [], {}, [], False
    for i, pd in enumerate(args.dirs):
        s = _load(os.path.join(pd, "steps.json"))
        if not s:
            raise SystemExit(f"merge: {pd} has no steps.json")
        parts.append(s.get("part"))
        steps += [dict(r, part=f"{i + 1}:{s.get('part')}") for r in s["steps"]]
        info.update({k: v for k, v in s.get("info", {}).items() if v is not None})
        dry = dry or s.get("dry_run", False)
        for name in ("bench_cbam.json", "bench_cbam.png", "bench_network.json",
                     "bench_network.png", "sweep.json", "ncu.csv"):
            if os.path.exists(os.path.join(pd, name)):
                shutil.copyfile(os.path.join(pd, name), os.path.join(out, name))
    # the layer benchmark ran in several parts (lease, extra): join their cases
    bcs = [os.path.join(pd, "bench_cbam.json") for pd in args.dirs
           if os.path.exists(os.path.join(pd, "bench_cbam.json"))]
    if len(bcs) > 1:
        cmd = [args.python, os.path.join(ROOT, "benchmarks", "bench_cbam.py"), "--merge", *bcs,
               "--json", os.path.join(out, "bench_cbam.json"),
               "--plot", os.path.join(out, "bench_cbam.png")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"merge: joining the layer benchmark runs failed: {_cmd_str(cmd)}\n"
                             f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    for name in ("gpu_check.log", "tests.log"):
        with open(os.path.join(out, name), "w") as fo:
            for pd in args.dirs:
                p = os.path.join(pd, name)
                if os.path.exists(p):
                    fo.write(f"\n######## {pd} ########\n")
                    with open(p, errors="replace") as fi:
                        fo.write(fi.read())
    with open(os.path.join(out, "steps.json"), "w") as f:
        json.dump({"part": "+".join(str(p) for p in parts), "dry_run": dry, "info": info,
                   "steps": steps}, f, indent=1)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "steps.json"), "w") as f:
        json.dump({"part": "+".join(str(p) for p in parts), "dry_run": dry, "info": info,
                   "steps": steps}, f)
    write_summary(out, [tmp])
    shutil.rmtree(tmp, ignore_errors=True)
    cap_files(out)
    print(f"merged {len(args.dirs)} folders into {out}: {', '.join(sorted(os.listdir(out)))}")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        p = argparse.ArgumentParser(prog="gpu_check.py merge")
        p.add_argument("dirs", nargs="+")
        p.add_argument("-o", "--output", required=True)
        p.add_argument("--python", default=None,
                       help="the interpreter that joins the layer benchmark's runs (needs torch "
                            "and matplotlib; default .venv/bin/python when present, else "
                            "this one)")
        margs = p.parse_args(argv[1:])
        if margs.python is None:
            venv = os.path.join(ROOT, ".venv", "bin", "python")
            margs.python = venv if os.path.exists(venv) else sys.executable
        return merge(margs)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("dir", nargs="?", default=None,
                   help="results folder (default: $OUT, else out/gpu_check-DATE)")
    p.add_argument("--dry-run", action="store_true",
                   help="on a machine without a GPU: run what can run on the CPU")
    p.add_argument("--part", default="lease", choices=tuple(PARTS),
                   help="lease (default, ~7 min), then extra (~5 min) if device time is left; "
                        "verify + measure (9.5 min each) or all (20 min) for longer leases; "
                        "grid (9.5 min): the benchmarks' whole grid, with --resume-from")
    p.add_argument("--steps", default=None, help=f"comma list of {','.join(STEPS)} "
                                                 "(overrides --part)")
    p.add_argument("--budget-min", type=float, default=None,
                   help="overall time budget in minutes (default: lease 7, extra 5, verify and "
                        "measure 9.5, all 20; dry-run: 30)")
    p.add_argument("--python", default=None,
                   help="the interpreter (default: $PYTHON, else .venv/bin/python when present, "
                        "else python3)")
    p.add_argument("--xdist", type=int, default=None,
                   help="pytest -n for the test suite (default min(8, nproc) on a GPU machine, "
                        "0 in a dry run)")
    p.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=None,
                   help="replace the test step's pytest arguments (default: tests); must be last")
    p.add_argument("--site", default="/tmp/site", help="where the wheels are installed")
    p.add_argument("--resume-from", default=None, metavar="DIR",
                   help="an earlier run's folder (e.g. benchmarks/results/DATE-DEVICE): the "
                        "benchmarks go on from its bench_cbam.json / bench_network.json "
                        "(--resume: what it measured on the same device, torch and sources is "
                        "kept, the rest measured); for the `grid` part")
    p.add_argument("--cpu-peers", default=None,
                   help="dry run: bench_cbam --peers (e.g. 'all' to include the slow-to-compile "
                        "torch.compile peers on the CPU)")
    args = p.parse_args(argv)
    default_file = next((f for f in SANITIZE_FILES if os.path.exists(os.path.join(ROOT, f))),
                        SANITIZE_FILES[0])
    args.sanitize_file = os.environ.get("GPU_CHECK_SANITIZE_FILE", default_file)
    args.sanitize_k = os.environ.get(
        "GPU_CHECK_SANITIZE_K", SANITIZE_K.get(os.path.basename(args.sanitize_file), ""))
    args.kernel_filter = os.environ.get("GPU_CHECK_KERNEL_FILTER", "cbam")
    if args.dir is None:
        args.dir = os.environ.get("OUT") or os.path.join(
            ROOT, "out", "gpu_check-" + now_utc().strftime("%Y%m%d-%H%M%S"))
    if args.python is None:
        venv = os.path.join(ROOT, ".venv", "bin", "python")
        args.python = os.environ.get("PYTHON") or (venv if os.path.exists(venv) else "python3")
    steps = [s.strip() for s in args.steps.split(",")] if args.steps else list(PARTS[args.part])
    for s in steps:
        if s not in STEPS:
            raise SystemExit(f"--steps: unknown step {s!r} (expected {', '.join(STEPS)})")
    if "env" not in steps:
        steps.insert(0, "env")  # every later step needs what it finds
    if args.budget_min is None:
        args.budget_min = 30.0 if args.dry_run else PART_BUDGET_MIN[args.part]
    return Protocol(args).run(steps)


if __name__ == "__main__":
    sys.exit(main())
