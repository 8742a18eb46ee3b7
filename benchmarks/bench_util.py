"""Shared pieces of the benchmarks: run metadata, timing, copy bandwidth, time budget, tables.

Timing (DESIGN.md section 7): on CUDA, one pair of CUDA events around every run, all recorded
before a single synchronisation, median over the runs after a warm-up; on the CPU,
time.perf_counter around every run. The caller rotates input buffers (the run function gets the
run's index), so x is not L2-resident between runs.
"""
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CPU_NOTICE = ("CPU run: these figures only show that the benchmark works. cbam_fused exists for "
              "CUDA GPUs; on the CPU it runs pure-PyTorch reference kernels, so CPU times say "
              "nothing about the product's speed.")


def _git(*args) -> Optional[str]:
    try:
        return subprocess.check_output(["git", "-C", ROOT, *args], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


SOURCE_DIRS = ("csrc", "cbam_fused")
SOURCE_EXTS = (".py", ".cpp", ".cu", ".cuh", ".h")


def sources_sha256(root: str = ROOT) -> str:
    """A digest of the package's sources (csrc/ and cbam_fused/, plus setup.py: every file that
    decides what cbam_fused computes and how fast), by content, so that a copy without git (the
    GPU machine's) gives the same digest as the checkout it came from."""
    h = hashlib.sha256()
    files = [os.path.join(root, "setup.py")]
    for d in SOURCE_DIRS:
        for dirpath, dirnames, names in os.walk(os.path.join(root, d)):
            dirnames[:] = sorted(n for n in dirnames if n != "__pycache__")
            files += [os.path.join(dirpath, n) for n in names if n.endswith(SOURCE_EXTS)]
    for path in sorted(files):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def load_resume(path: str, schema: str, meta: dict):
    """An earlier run's results to resume from (--resume): the JSON at `path` when it was written
    by this benchmark (schema) on a device of the same name, with the same torch and the same
    package sources (sources_sha256) as this run; else None, and the reason is printed (a resumed
    grid must not mix figures of other code or hardware; a GPU run must not be lost to a stale
    file, so this is never fatal)."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        print(f"--resume {path}: not read ({type(e).__name__}: {e}); measuring everything")
        return None
    om = old.get("meta") or {}
    why = None
    if old.get("schema") != schema:
        why = f"schema {old.get('schema')!r}, expected {schema!r}"
    elif (om.get("device") or {}).get("name") != meta["device"].get("name"):
        why = f"device {(om.get('device') or {}).get('name')!r}, this run's is " \
              f"{meta['device'].get('name')!r}"
    elif om.get("torch") != meta["torch"]:
        why = f"torch {om.get('torch')}, this run's is {meta['torch']}"
    elif om.get("sources_sha256") != meta["sources_sha256"]:
        why = "other cbam_fused sources (sources_sha256 differs: the code changed since)"
    if why:
        print(f"--resume {path}: not used: {why}; measuring everything")
        return None
    return old


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    return dev


def native_kernels() -> Dict[str, bool]:
    """op -> whether cbam_fused runs a hand-written CUDA kernel for it (not the PyTorch one)."""
    try:
        from cbam_fused import _ops
        return {op: bool(_ops.has_cuda_kernel(op)) for op in _ops.ALL_OPS}
    except Exception as e:  # noqa: BLE001  (an old build; recorded, never fatal)
        return {"error": f"{type(e).__name__}: {e}"}


def run_metadata(device: torch.device, argv: List[str]) -> dict:
    dev = {"type": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev.update(name=p.name, capability=f"{p.major}.{p.minor}",
                   multiprocessors=p.multi_processor_count, total_memory_bytes=p.total_memory,
                   l2_cache_bytes=getattr(p, "L2_cache_size", None))
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                dev["driver"] = subprocess.check_output(
                    [smi, "--query-gpu=driver_version", "--format=csv,noheader"], text=True,
                    timeout=20).strip().splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                pass
    else:
        dev.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        import cbam_fused
        cbam_version = getattr(cbam_fused, "__version__", None)
    except Exception as e:  # noqa: BLE001
        cbam_version = f"import failed: {e}"
    try:
        import timm
        timm_version = timm.__version__
    except Exception:  # noqa: BLE001
        timm_version = None
    kernels = native_kernels()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timm": timm_version,
        "cbam_fused": cbam_version,
        "device": dev,
        "cbam_fused_cuda_kernels": kernels,
        "cbam_fused_native": device.type == "cuda" and bool(kernels) and all(
            v is True for v in kernels.values()),
        "sources_sha256": sources_sha256(),
        "argv": argv,
    }


def fallback_warning(meta: dict) -> Optional[str]:
    if meta["device"]["type"] != "cuda":
        return None
    if meta["cbam_fused_native"]:
        return None
    missing = [k for k, v in meta["cbam_fused_cuda_kernels"].items() if v is not True]
    return ("WARNING: this cbam_fused build has no hand-written CUDA kernel for "
            f"{', '.join(missing)}: the 'cbam_fused' figures below are the pure-PyTorch fallback, "
            "NOT the product. Rebuild with a CUDA toolkit (pip install --no-build-isolation -e .).")


def n_rotating_buffers(device: torch.device, x_bytes: int, bytes_per_buffer: int,
                       l2_bytes: Optional[int], cap: int, mem_share: int) -> int:
    """How many input buffers to rotate among: enough that together they exceed 3x the L2 cache
    (so x is not L2-resident between runs), at most `cap`, and using at most 1/mem_share of the
    free device memory. 2 on the CPU."""
    if device.type != "cuda":
        return 2
    free, _ = torch.cuda.mem_get_info(device)
    want = max(2, -(-3 * (l2_bytes or 50 << 20) // x_bytes) + 1)
    return int(max(1, min(want, cap, (free // mem_share) // bytes_per_buffer)))


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[int], object], device: torch.device, *, warmup: int, reps: int,
              min_warmup_s: float = 0.0) -> List[float]:
    """Times of `reps` calls fn(i) in milliseconds, after `warmup` calls (and at least
    min_warmup_s seconds of them)."""
    t0 = time.perf_counter()
    i = 0
    while i < warmup or time.perf_counter() - t0 < min_warmup_s:
        fn(i)
        i += 1
        if device.type == "cuda" and i % 8 == 0:
            sync(device)
    sync(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for r in range(reps):
            starts[r].record()
            fn(i + r)
            ends[r].record()
        sync(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for r in range(reps):
        t = time.perf_counter()
        fn(i + r)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def time_graph(fn: Callable[[int], object], device: torch.device, *, calls: int, reps: int,
               warmup: int = 3) -> List[float]:
    """Per-call times in milliseconds of fn(0) .. fn(calls - 1) captured once in a CUDA graph and
    replayed `reps` times (CUDA events around each replay, divided by `calls`). A short kernel
    timed alone measures the host's launch cost more than the kernel; a graph replay issues the
    captured kernels back to back, as a GPU-bound program would. The outputs of the captured
    calls stay allocated until the graph is released."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy init)
        for i in range(min(calls, 2)):
            fn(i)
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(i) for i in range(calls)]
    for _ in range(warmup):
        graph.replay()
    sync(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        starts[r].record()
        graph.replay()
        ends[r].record()
    sync(device)
    times = [s.elapsed_time(e) / calls for s, e in zip(starts, ends)]
    del outs, graph
    return times


def median(v: List[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def quantile(v: List[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def reps_for(fn: Callable[[int], object], device: torch.device, target_s: float, lo: int,
             hi: int) -> int:
    """How many timed runs fit in about target_s seconds (from two probe runs)."""
    sync(device)
    t = time.perf_counter()
    fn(0)
    fn(1)
    sync(device)
    per = max((time.perf_counter() - t) / 2, 1e-6)
    return int(min(hi, max(lo, target_s / per)))


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth (bytes read + bytes written, per second)."""
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = int(min(1 << 30, free // 8))
        else:
            nbytes = 64 << 20
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = time_runs(lambda i, dst=dst, src=src: dst.copy_(src), device, warmup=3, reps=reps)
    med = median(times)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes_copied": n * 4, "bytes_moved": 2 * n * 4, "median_ms": med,
            "gb_per_s": 2 * n * 4 / (med * 1e-3) / 1e9, "reps": reps,
            "method": "dst.copy_(src), float32, bytes read + bytes written over the median time"}


class Budget:
    """A wall-clock budget: benchmarks skip the costly peers (torch.compile) once `reserve` of it
    is left, and stop once it is spent, recording what they skipped."""

    def __init__(self, minutes: Optional[float], reserve: float = 0.25):
        self.t0 = time.monotonic()
        self.limit = None if minutes is None else minutes * 60.0
        self.reserve = reserve

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def spent(self) -> bool:
        return self.limit is not None and self.elapsed() >= self.limit

    def tight(self, used: float = None) -> bool:
        """Whether `used` (default 1 - reserve) of the budget is spent."""
        used = 1 - self.reserve if used is None else used
        return self.limit is not None and self.elapsed() >= self.limit * used


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (updated rarely when stderr is not a terminal, e.g. in a log)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s, refresh=True):
                pass

            def close(self):
                pass
        return _Null()
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=tty,
                mininterval=0.5 if tty else 20.0)


def print_table(headers: List[str], rows: List[List[str]], title: Optional[str] = None):
    """A table on stdout: rich when installed, else aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None and sys.stdout.isatty():
        t = Table(title=title)
        for h in headers:
            t.add_column(h, justify="right" if h not in (headers[0],) else "left")
        for r in rows:
            t.add_row(*r)
        Console().print(t)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                    for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))
    sys.stdout.flush()


def write_json(path: str, obj: dict):
    """Atomic write, so a run killed mid-way leaves the last complete file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f}us"
    if ms < 1000:
        return f"{ms:.3g}ms"
    return f"{ms / 1e3:.3g}s"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f}{unit}" if unit == "B" else f"{b:.1f}{unit}"
        b /= 1024.0
    return str(b)


def drop_missing(names: List[str], packages: Dict[str, str], what: str) -> List[str]:
    """names without those whose Python package (packages: name -> importable module) is not
    installed, each dropped one announced on stderr: a benchmark runs what it can."""
    import importlib.util
    kept = []
    for n in names:
        mod = packages.get(n)
        try:
            missing = mod is not None and importlib.util.find_spec(mod) is None
        except (ImportError, ValueError):
            missing = True
        if missing:
            print(f"note: {what} {n!r} skipped: the Python package {mod!r} is not installed",
                  file=sys.stderr)
            continue
        kept.append(n)
    return kept


def set_tiles_per_sm(set_tuning, tiles: int) -> List[int]:
    """Sets the launchers' tiles_per_sm through a set_tuning op (cbam_fused_debug's or
    cbam_fused_sim's), the other knobs kept; returns every knob's previous value, for
    set_tuning(*previous) to restore."""
    old = set_tuning(tiles, 4)
    set_tuning(tiles, *old[1:])
    return old


def geomean(v: List[float]) -> Optional[float]:
    import math
    v = [x for x in v if x and x > 0]
    if not v:
        return None
    return math.exp(sum(math.log(x) for x in v) / len(v))


def finish(res, args, device, warn, budget, print_results, plot):
    """The end of a benchmark run: mark the results finished, print the table and notices, write
    the JSON and the PNG when asked for."""
    res["elapsed_s"] = round(budget.elapsed(), 1)
    res["finished"] = True
    print()
    print_results(res)
    if device.type == "cpu":
        print("\n" + CPU_NOTICE)
    if warn:
        print(warn)
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    if args.plot:
        plot(res, args.plot)
        print(f"wrote {args.plot}")
