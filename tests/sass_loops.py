"""The loops of a kernel's SASS (nvdisasm) and the 16-byte global loads in them, for
test_codegen's check that the kernels with several rows of loads in flight issue them together.

ptxas schedules the loads, not nvcc: the PTX of a kernel can have all its loads first while the
SASS waits for each load's value before it issues the next (a load guarded by a branch and
converted inside it; or, to save registers, a load sunk to just before its use). Only the SASS
says how many loads a thread has in flight."""
import os
import re
import shutil
import subprocess
import sys

_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def nvdisasm_path(cuda_home=None):
    """nvdisasm from PATH, the toolkit, or the nvidia-cuda-nvdisasm wheel; None if none."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    cands = [os.path.join(cuda_home, "bin", "nvdisasm")] if cuda_home else []
    for base in sys.path:
        cands.append(os.path.join(base, "nvidia", "cu13", "bin", "nvdisasm"))
        cands.append(os.path.join(base, "nvidia", "cuda_nvdisasm", "bin", "nvdisasm"))
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def sass_of(cubin_path, nvdisasm):
    """nvdisasm -c of a cubin: its kernels' SASS."""
    return subprocess.run([nvdisasm, "-c", cubin_path], capture_output=True, text=True,
                          check=True).stdout


def functions(sass_text):
    """{mangled kernel name: [instruction text, ...]} of nvdisasm -c output: predicates kept,
    addresses and encodings dropped, each branch's target label replaced by the index of the
    instruction it labels ("BRA @12")."""
    out = {}
    for part in re.split(r"^\.text\.", sass_text, flags=re.M)[1:]:
        name, _, body = part.partition(":\n")
        ins, labels = [], {}
        for line in body.splitlines():
            m = re.match(r"\s*(\.L_x_\d+):", line)
            if m:
                labels[m.group(1)] = len(ins)
                continue
            m = _INS.search(line)
            if m:
                ins.append(" ".join(m.group(2).split()))
        def target(m, labels=labels):
            return f"@{labels.get(m.group(1), -1)}"
        out[name.strip()] = [re.sub(r"`\((\.L_x_\d+)\)", target, t) for t in ins]
    return out


def loops(ins):
    """(first, last) instruction indices of each loop: a branch back to an earlier
    instruction."""
    out = []
    for k, t in enumerate(ins):
        m = re.search(r"\bBRA @(\d+)", t)
        if m and int(m.group(1)) < k:
            out.append((int(m.group(1)), k))
    return out


def _dest_and_sources(t):
    """(destination registers, source registers) of one instruction (a 64-bit address [Rn.64]
    reads Rn and Rn+1; a 128-bit load writes four registers)."""
    t = re.sub(r"^@!?U?P\w+ ", "", t)
    op, _, rest = t.partition(" ")
    ops = [o.strip() for o in rest.split(",")] if rest else []

    def regs(text):
        out = set()
        for m in re.finditer(r"\bR(\d+)(\.64)?", text):
            out.add(int(m.group(1)))
            if m.group(2):
                out.add(int(m.group(1)) + 1)
        return out

    if not ops or op.startswith(("ST", "RED", "BRA", "BAR", "EXIT", "BSYNC", "BSSY")):
        return set(), set().union(*[regs(o) for o in ops]) if ops else set()
    dest = set()
    m = re.match(r"R(\d+)", ops[0])
    if m:
        width = 4 if ".128" in op else 2 if ".64" in op else 1
        dest = set(range(int(m.group(1)), int(m.group(1)) + width))
    return dest, set().union(*[regs(o) for o in ops[1:]]) if len(ops) > 1 else set()


def vector_loads_in_flight(ins):
    """The most 16-byte global loads (LDG.E.128) that some loop of `ins` issues before the first
    instruction that reads a register loaded by the first of them, each into registers of its
    own: the loads one thread has in flight at once in that loop."""
    best = 0
    for first, last in loops(ins):
        body = ins[first:last + 1]
        idx = [j for j, t in enumerate(body) if "LDG" in t and ".128" in t]
        for a, j0 in enumerate(idx):
            d0, _ = _dest_and_sources(body[j0])
            seen, count = set(d0), 1
            for j in range(j0 + 1, len(body)):
                dest, src = _dest_and_sources(body[j])
                if src & d0:
                    break
                if j in idx[a + 1:]:
                    if dest & seen:
                        break
                    seen |= dest
                    count += 1
            best = max(best, count)
    return best


def loads_issued_together(body):
    """(global loads, LDG of any width, that `body` issues before its first instruction that
    reads a register one of them loaded; all of its global loads): equal where a thread has
    every load of the body in flight at once."""
    loaded, count = set(), 0
    for t in body:
        dest, src = _dest_and_sources(t)
        if src & loaded:
            break
        if "LDG" in t:
            loaded |= dest
            count += 1
    return count, sum("LDG" in t for t in body)


def hot_loop(ins):
    """(instructions, 16-byte global loads) of the innermost loop of `ins` with the most 16-byte
    global loads (its main loop; of several such, the longest); (0, 0) if none loads 16
    bytes."""
    def loads(first, last):
        return sum("LDG" in t and ".128" in t for t in ins[first:last + 1])

    spans = loops(ins)
    inner = [(first, last) for first, last in spans
             if not any(f >= first and l <= last and (f, l) != (first, last) and loads(f, l)
                        for f, l in spans)]
    return max(((loads(f, l), l - f + 1) for f, l in inner if loads(f, l)),
               default=(0, 0))[::-1]
