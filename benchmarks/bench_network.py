#!/usr/bin/env python
"""Network benchmark: ResNet-50 with CBAM in every bottleneck, eager vs cbam_fused (issue 5).

Models (both with a CBAM block in each of the 16 bottlenecks, 1000 classes):
  timm       timm.create_model('resnet50', block_args=dict(attn_layer='cbam'))
  official   ResidualNet('ImageNet', 50, 1000, 'CBAM') (benchmarks/official_cbam.py)
  gates      resnet50_cbam() in the CBAM.PyTorch layout (benchmarks/gate_only_resnet.py): the
             gates return maps, each block multiplies; fused through the blocks' forwards
             (opt-in: --models timm,official,gates)
Variants of each, all with the same weights:
  eager           the model as built
  fused           its CBAM blocks converted to cbam_fused (cbam_fused.convert, verified)
  compile         torch.compile(eager)
  compile+fused   torch.compile(fused): the fused CBAM op inside the compiled graph
Modes: `train` (one SGD step: forward, cross-entropy, backward, optimizer step) and `infer`
(eval(), no_grad forward). On CUDA: bfloat16 autocast, channels-last, batch 64 and 128, 224x224
images. On the CPU (or --quick on the CPU): float32, batch 2, 64x64 images, a few steps; the
torch.compile variants are skipped there unless --variants names them (minutes to compile).

Figures per configuration: median step time (CUDA events / perf_counter) over the timed steps
after warm-up, images per second (batch / median), the peak memory allocated during the timed
steps (CUDA only: torch.cuda.max_memory_allocated after a reset, weights and optimizer state
included), the first call's time (which includes compilation for the compiled variants), and
speed-ups: fused over eager, compile+fused over compile.

JSON schema ("cbam_fused.bench_network/1"), top level:
  schema, schema_doc, meta (as in bench_cbam.py: device, versions, date, git commit, whether
  cbam_fused runs its own CUDA kernels), settings, conversion{model: {method, blocks_converted,
  max_rel_diff_vs_eager, error}}, results[] one per (model, mode, batch, variant):
      {id, model, mode, batch, image_size, precision, channels_last, variant, median_ms, p10_ms,
       p90_ms, steps, images_per_s, peak_mem_bytes, first_call_s, speedup_vs_eager,
       speedup_vs_compile, error, skipped},
  finished (false while running; the file is rewritten after every configuration).
With --resume, results taken from the earlier run carry resumed_from (that run's date and
commit).
"""
import argparse
import copy
import os
import sys
import time
import traceback
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util as bu  # noqa: E402
import gate_only_resnet  # noqa: E402
import official_cbam  # noqa: E402

SCHEMA = "cbam_fused.bench_network/1"
SCHEMA_DOC = {
    "results[].median_ms": "median time of one step (train: forward + loss + backward + SGD "
                           "step; infer: no_grad forward), milliseconds",
    "results[].images_per_s": "batch / median step time",
    "results[].peak_mem_bytes": "torch.cuda.max_memory_allocated over the timed steps (weights, "
                                "gradients and optimizer state included); null on the CPU",
    "results[].first_call_s": "the first step's wall time (includes torch.compile's compilation)",
    "results[].speedup_vs_eager": "eager median_ms / this variant's median_ms (same model, mode, "
                                  "batch)",
    "results[].speedup_vs_compile": "compile median_ms / this variant's (compile+fused only)",
    "conversion[model].max_rel_diff_vs_eager": "max |logits_fused - logits_eager| / max "
                                               "|logits_eager|, float32, eval mode, one input",
    "results[].skipped": "why the configuration was not run (e.g. the time budget)",
}
MODELS = ("timm", "official", "gates")
VARIANTS = ("eager", "fused", "compile", "compile+fused")
MODES = ("train", "infer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cuda, cuda:N or cpu")
    p.add_argument("--models", default="timm,official",
                   help="comma list of timm,official,gates (default timm,official)")
    p.add_argument("--variants", default=None,
                   help="comma list of eager,fused,compile,compile+fused or 'all' (default: all "
                        "on CUDA, eager,fused on the CPU)")
    p.add_argument("--modes", default="train,infer", help="comma list of train,infer")
    p.add_argument("--batch", default=None,
                   help="comma list (default 128,64 on CUDA, 64 with --quick; 2 on the CPU)")
    p.add_argument("--image-size", type=int, default=None,
                   help="default 224 on CUDA, 64 on the CPU")
    p.add_argument("--precision", default=None, choices=("bf16", "fp16", "fp32"),
                   help="autocast dtype (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="keep NCHW (default: channels-last on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20, CPU 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps after the first (default 5, CPU 1)")
    p.add_argument("--quick", action="store_true", help="one batch size, fewer steps")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget: compile variants are skipped once 75%% is spent, "
                        "everything once all is")
    p.add_argument("--json", default=None, help="write the results here (schema in --help)")
    p.add_argument("--plot", default=None, help="write a PNG of images/s and peak memory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, metavar="JSON",
                   help="an earlier run's results on a GPU of the same name, with the same torch "
                        "and cbam_fused sources (meta.sources_sha256): each (model, mode, batch) "
                        "whose variants it all measured (none skipped) at the same image size, "
                        "precision and layout is kept, not run again (so speed-ups still compare "
                        "figures of one run); the rest is measured and the JSON holds both. "
                        "Another device, torch or source tree: the file is ignored (with a notice)")
    return p.parse_args(argv)


def _csv(s):
    return [t.strip() for t in s.split(",") if t.strip()]


def settings_from(args, device):
    cuda = device.type == "cuda"
    models = _csv(args.models)
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown model {m!r} (expected {', '.join(MODELS)})")
    models = bu.drop_missing(models, {"timm": "timm"}, "model")
    if not models:
        raise SystemExit("--models: none of the models can run here (see the notes above)")
    if args.variants in (None, ""):
        variants = list(VARIANTS) if cuda else ["eager", "fused"]
    elif args.variants == "all":
        variants = list(VARIANTS)
    else:
        variants = _csv(args.variants)
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r} (expected {', '.join(VARIANTS)})")
    variants = [v for v in VARIANTS if v in variants]
    modes = _csv(args.modes)
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r} (expected {', '.join(MODES)})")
    if args.batch:
        batches = [int(b) for b in _csv(args.batch)]
    else:
        batches = ([64] if args.quick else [128, 64]) if cuda else [2]
    precision = args.precision or ("bf16" if cuda else "fp32")
    return dict(device=str(device), models=models, variants=variants, modes=modes,
                batches=batches, image_size=args.image_size or (224 if cuda else 64),
                precision=precision, channels_last=cuda and not args.no_channels_last,
                steps=args.steps or (20 if cuda and not args.quick else 10 if cuda else 2),
                warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
                max_minutes=args.max_minutes,
                timing="cuda_events" if cuda else "perf_counter")


def build_model(name, seed=0):
    """The model with its BatchNorm affine parameters drawn at random (weights in [0.5, 1.5],
    biases in [-0.1, 0.1]): both libraries initialise some of them to constants (timm zeroes
    each bottleneck's last BN weight, so every CBAM input would be 0; the official code zeroes
    the spatial gate's BN weight), which would make the CBAM blocks and the equality check
    trivial."""
    if name == "timm":
        import timm
        m = timm.create_model("resnet50", block_args=dict(attn_layer="cbam"), num_classes=1000)
    elif name == "gates":
        m = gate_only_resnet.resnet50_cbam(1000)
    else:
        m = official_cbam.ResidualNet("ImageNet", 50, 1000, "CBAM")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.rand(mod.bias.shape, generator=g) - 0.1)
    return m


def fuse(model):
    """(fused copy of model, conversion record)."""
    import cbam_fused
    fused = copy.deepcopy(model)
    report = cbam_fused.convert(fused, verify=True)
    n = len(report.converted)
    rec = dict(method="cbam_fused.convert(verify=True)", blocks_converted=n,
               blocks_skipped=[str(s) for s in report.skipped][:20])
    if n == 0:
        raise RuntimeError("no CBAM block was converted")
    return fused, rec


def check_equal(eager, fused, device, image_size):
    """max relative logit difference, float32, eval mode, one random batch of 2."""
    e, f = copy.deepcopy(eager).to(device).eval(), copy.deepcopy(fused).to(device).eval()
    x = torch.randn(2, 3, image_size, image_size, device=device)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            ye, yf = e(x).float(), f(x).float()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    del e, f
    return float((yf - ye).abs().max() / ye.abs().max().clamp_min(1e-30))


def make_step(model, mode, xs, ys, precision, device):
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    nb = len(xs)

    def ctx():
        if amp is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=amp)

    if mode == "infer":
        model.eval()

        def step(i):
            with torch.no_grad(), ctx():
                return model(xs[i % nb])
        return step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    lossf = nn.CrossEntropyLoss()

    def step(i):
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = lossf(model(xs[i % nb]), ys[i % nb])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss
    return step


def run_config(model, cfg, st, device, seed):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if st["channels_last"] else torch.contiguous_format
    b, s = cfg["batch"], st["image_size"]
    xs = [torch.randn(b, 3, s, s, generator=g).to(device).contiguous(memory_format=fmt)
          for _ in range(2)]
    ys = [torch.randint(0, 1000, (b,), generator=g).to(device) for _ in range(2)]
    step = make_step(model, cfg["mode"], xs, ys, st["precision"], device)
    t0 = time.perf_counter()
    step(0)
    bu.sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = bu.time_runs(step, device, warmup=st["warmup"], reps=st["steps"])
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    med = bu.median(times)
    return dict(median_ms=med, p10_ms=bu.quantile(times, 0.1), p90_ms=bu.quantile(times, 0.9),
                steps=len(times), images_per_s=b / (med * 1e-3), peak_mem_bytes=peak,
                first_call_s=round(first, 2))


def configs(st):
    """Cheap variants (eager, fused) for every model / mode / batch first, then the compiled
    ones in the same order, so a time budget cuts compiled configurations last-first."""
    out = []
    for group in (("eager", "fused"), ("compile", "compile+fused")):
        for model in st["models"]:
            for mode in st["modes"]:
                for batch in st["batches"]:
                    for v in st["variants"]:
                        if v in group:
                            out.append(dict(model=model, mode=mode, batch=batch, variant=v))
    return out


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in res["results"] if r.get("images_per_s")]
    groups = []
    for r in res["results"]:
        key = (r["model"], r["mode"], r["batch"])
        if key not in groups:
            groups.append(key)
    variants = res["settings"]["variants"]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(groups) + 4), 4.5), squeeze=False)
    bw = 0.8 / max(1, len(variants))
    for col, (field, label, scale) in enumerate((("images_per_s", "images / s", 1.0),
                                                 ("peak_mem_bytes", "peak memory (GiB)",
                                                  1 / 2 ** 30))):
        ax = axes[0][col]
        for k, v in enumerate(variants):
            vals = []
            for key in groups:
                hit = [r for r in rs if (r["model"], r["mode"], r["batch"]) == key
                       and r["variant"] == v]
                vals.append((hit[0][field] or 0) * scale if hit and hit[0][field] else 0)
            ax.bar([i + (k - (len(variants) - 1) / 2) * bw for i in range(len(groups))], vals,
                   bw, label=v, color=f"C{k}")
        if col == 1 and not any(r.get("peak_mem_bytes") for r in rs):
            ax.text(0.5, 0.5, "peak memory: measured on CUDA only", ha="center",
                    transform=ax.transAxes)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{m}\n{mode} b{b}" for m, mode, b in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(label + (" (higher is better)" if col == 0 else " (lower is better)"),
                     fontsize=9)
        ax.legend(fontsize=7)
    meta, st = res["meta"], res["settings"]
    note = "" if meta["cbam_fused_native"] else \
        ("  [CPU: not the product's purpose]" if meta["device"]["type"] == "cpu"
         else "  [cbam_fused: PyTorch fallback, no CUDA kernels]")
    fig.suptitle(f"ResNet-50 + CBAM - {meta['device'].get('name')} - {st['precision']} "
                 f"{'channels-last' if st['channels_last'] else 'NCHW'} {st['image_size']}px - "
                 f"torch {meta['torch']} - {meta['date_utc'][:10]}{note}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_results(res):
    rows = []
    for r in res["results"]:
        if r.get("error"):
            rows.append([r["id"], "ERROR", "-", "-", "-", "-"])
            continue
        if r.get("skipped"):
            rows.append([r["id"], "skipped", "-", "-", "-", "-"])
            continue
        sp = r.get("speedup_vs_compile") if r["variant"] == "compile+fused" else \
            r.get("speedup_vs_eager")
        rows.append([r["id"], bu.fmt_ms(r["median_ms"]), f"{r['images_per_s']:.1f}",
                     bu.fmt_bytes(r["peak_mem_bytes"]), f"{r['first_call_s']:.1f}s",
                     f"{sp:.2f}x" if sp else "-"])
    bu.print_table(["config", "median step", "images/s", "peak mem", "first call",
                    "speed-up"], rows,
                   title="ResNet-50 + CBAM; speed-up: fused over eager, compile over eager, "
                         "compile+fused over compile")
    for m, c in res["conversion"].items():
        print(f"  {m}: {c.get('method')}: {c.get('blocks_converted')} CBAM blocks converted, "
              f"max rel logit diff vs eager {c.get('max_rel_diff_vs_eager')}"
              + (f", ERROR {c['error']}" if c.get("error") else ""))
    for r in res["results"]:
        if r.get("error"):
            print(f"  ERROR {r['id']}: {r['error']}")


def main(argv=None):
    args = parse_args(argv)
    device = bu.pick_device(args.device)
    st = settings_from(args, device)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
    meta = bu.run_metadata(device, sys.argv if argv is None else ["bench_network.py"] + list(argv))
    print(f"bench_network: {meta['device'].get('name')} ({device}), torch {meta['torch']}, "
          f"{st['precision']}, {'channels-last' if st['channels_last'] else 'NCHW'}, "
          f"{st['image_size']}px, batches {st['batches']}")
    if device.type == "cpu":
        print(bu.CPU_NOTICE)
    warn = bu.fallback_warning(meta)
    if warn:
        print(warn)
    res = dict(schema=SCHEMA, schema_doc=SCHEMA_DOC, meta=meta, settings=st, conversion={},
               results=[], finished=False)
    budget = bu.Budget(args.max_minutes)
    base, fused = {}, {}
    for name in st["models"]:
        torch.manual_seed(args.seed)
        base[name] = build_model(name, args.seed)
        conv = {}
        if any("fused" in v for v in st["variants"]):
            try:
                fused[name], conv = fuse(base[name])
                conv["max_rel_diff_vs_eager"] = check_equal(base[name], fused[name], device,
                                                            min(st["image_size"], 64))
            except Exception as e:  # noqa: BLE001
                conv["error"] = f"{type(e).__name__}: {e}"[:500]
                sys.stderr.write(traceback.format_exc(limit=8))
        res["conversion"][name] = conv
    todo = configs(st)
    earlier = bu.load_resume(args.resume, SCHEMA, meta) if args.resume else None
    kept = kept_results(earlier, st) if earlier else {}
    if earlier:
        print(f"--resume {args.resume}: {len(kept)} of the {len(todo)} configurations kept from "
              f"the run of {earlier['meta'].get('date_utc')}")
    bar = bu.progress(len(todo), "bench_network", not args.no_progress)
    compiled = {}
    for i, cfg in enumerate(todo):
        rid = f"{cfg['model']}-{cfg['mode']}-b{cfg['batch']}-{cfg['variant']}"
        rec = dict(id=rid, **cfg, image_size=st["image_size"], precision=st["precision"],
                   channels_last=st["channels_last"], median_ms=None, images_per_s=None,
                   peak_mem_bytes=None, first_call_s=None, speedup_vs_eager=None,
                   speedup_vs_compile=None, error=None, skipped=None)
        bar.set_postfix_str(rid, refresh=False)
        v = cfg["variant"]
        if rid in kept:
            rec = dict(kept[rid], resumed_from=dict(date_utc=earlier["meta"].get("date_utc"),
                                                    git_commit=earlier["meta"].get("git_commit")))
        elif budget.spent() or (v.startswith("compile") and budget.tight()):
            rec["skipped"] = "time budget (--max-minutes)"
        elif "fused" in v and cfg["model"] not in fused:
            rec["skipped"] = "conversion failed: " + str(res["conversion"][cfg["model"]].get("error"))
        else:
            try:
                src = fused[cfg["model"]] if "fused" in v else base[cfg["model"]]
                key = (cfg["model"], cfg["mode"], v)
                if key not in compiled:  # a fresh copy per (model, mode, variant): own weights
                    m = copy.deepcopy(src).to(device)
                    if st["channels_last"]:
                        m = m.to(memory_format=torch.channels_last)
                    if v.startswith("compile"):
                        torch._dynamo.reset()
                        m = torch.compile(m, dynamic=False)
                    compiled.clear()  # keep one model on the device at a time
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    compiled[key] = m
                rec.update(run_config(compiled[key], cfg, st, device, args.seed + i))
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
                sys.stderr.write(f"\n[bench_network] {rid} failed:\n"
                                 f"{traceback.format_exc(limit=8)}\n")
                compiled.clear()
        res["results"].append(rec)
        bar.update(1)
        _speedups(res["results"])
        if args.json:
            bu.write_json(args.json, res)
    bar.close()
    bu.finish(res, args, device, warn, budget, print_results, plot)
    return 0


def kept_results(earlier, st):
    """{id: result} of the earlier run's results that --resume keeps: those of each (model, mode,
    batch) of this run whose every variant of this run the earlier run measured or saw fail (none
    skipped), with this run's image size, precision and layout."""
    same = all(earlier.get("settings", {}).get(k) == st[k]
               for k in ("image_size", "precision", "channels_last"))
    if not same:
        print("--resume: the earlier run used another image size, precision or layout; "
              "measuring everything")
        return {}
    by_id = {r["id"]: r for r in earlier.get("results", [])}
    kept = {}
    for m in st["models"]:
        for mode in st["modes"]:
            for b in st["batches"]:
                ids = [f"{m}-{mode}-b{b}-{v}" for v in st["variants"]]
                recs = [by_id.get(i) for i in ids]
                if all(r is not None and not r.get("skipped") and (r.get("median_ms") or
                                                                     r.get("error"))
                       for r in recs):
                    kept.update(zip(ids, recs))
    return kept


def _speedups(results):
    idx = {(r["model"], r["mode"], r["batch"], r["variant"]): r for r in results}
    for r in results:
        if not r.get("median_ms"):
            continue
        e = idx.get((r["model"], r["mode"], r["batch"], "eager"))
        if e and e.get("median_ms"):
            r["speedup_vs_eager"] = e["median_ms"] / r["median_ms"]
        c = idx.get((r["model"], r["mode"], r["batch"], "compile"))
        if r["variant"] == "compile+fused" and c and c.get("median_ms"):
            r["speedup_vs_compile"] = c["median_ms"] / r["median_ms"]


if __name__ == "__main__":
    sys.exit(main())
