"""What the compiler made of the CUDA kernels, without a GPU: registers, stack and spills from
ptxas, and the instruction mix of each kernel's main loop from the SASS (the checks that cost no
device time).

    python bench/sass_report.py                      # every csrc/cuda/*.cu for sm_90, markdown
    python bench/sass_report.py --only philox --arch 80
    CUOBJDUMP=/path/to/cuobjdump python bench/sass_report.py

Needs nvcc; the SASS columns need cuobjdump (on the GPU machines' image; elsewhere the one in
Triton's wheel, triton/backends/nvidia/bin/cuobjdump, works: `pip install triton` into any venv, as
`make cuda-build`'s .venv-cuda leaves triton out). The nvcc flags are setup.py's.

"loop" is the span of the kernel's longest backward branch (its grid-stride or row loop), counted
statically: it includes the rarely taken slow paths of IEEE division/square root and tail
handling, so it is an upper bound on the instructions one iteration issues. bench/cuda_notes.md
turns these counts into predicted rates.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# SASS opcode -> class (the first dotted part of the opcode)
CLASSES = {
    "fp32": {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD"},
    "fp64": {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX"},
    "int": {"IADD3", "IMAD", "LOP3", "SHF", "LEA", "ISETP", "SEL", "IABS", "IMNMX", "VIADD", "PRMT",
            "PLOP3", "FLO", "POPC", "BMSK", "IDP"},
    "convert": {"I2F", "F2I", "I2FP", "F2F", "F2FP", "FRND"},
    "special": {"MUFU"},
    "global mem": {"LDG", "STG", "LD", "ST", "ATOMG", "RED"},
    "shared mem": {"LDS", "STS", "ATOMS"},
    "local mem": {"LDL", "STL"},
    "control": {"BRA", "BSSY", "BSYNC", "CALL", "RET", "EXIT", "BAR", "WARPSYNC", "BMOV"},
}


def nvcc_flags() -> list[str]:
    """setup.py's nvcc flag list (the `nvcc = [...]` literal), without the -gencode entries."""
    src = (ROOT / "setup.py").read_text()
    m = re.search(r"^\s*nvcc = (\[.*\])$", src, re.M)
    if not m:
        sys.exit("sass_report: cannot find the `nvcc = [...]` flag list in setup.py")
    return ast.literal_eval(m.group(1))


def ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """kernel mangled name -> registers, stack, spill bytes (from nvcc -Xptxas -v)."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            out[name] = {}
            continue
        # a called (non-entry) function's block follows its caller's: its numbers are not the kernel's
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1) if m.group(1) in out else None
            continue
        if name is None:
            continue
        if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            out[name].update(stack=int(m.group(1)), spill=int(m.group(2)) + int(m.group(3)))
        if m := re.search(r"Used (\d+) registers", line):
            out[name]["regs"] = int(m.group(1))
    return out


def sass_functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """mangled name -> [(address, instruction text)]."""
    funcs = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        funcs[name] = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", part)]
    return funcs


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[0-9T]\s+", "", text).split()[0].split(".")[0]


def loop_span(ins: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The instructions of the longest backward branch's span (the whole kernel if none)."""
    best = None
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            span = (int(m.group(1), 16), addr)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    return ins if best is None else [(a, t) for a, t in ins if best[0] <= a <= best[1]]


def mix(ins: list[tuple[int, str]]) -> Counter:
    counts = Counter()
    for _, text in ins:
        op = opcode(text)
        counts[next((c for c, ops in CLASSES.items() if op in ops), "other")] += 1
    return counts


def demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    full = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name
    full = re.sub(r"subspace_ext::cuda::\(anonymous namespace\)::", "", full)
    return re.sub(r"\(.*\)$", "", full)  # drop the parameter list


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90", help="compute capability to compile for (default 90)")
    ap.add_argument("--only", default="", help="only the .cu files whose name contains this")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "nvcc", help="the nvcc to compile with (default: PATH's)")
    ap.add_argument("--cuobjdump", default=os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump"),
                    help="cuobjdump for the SASS columns (default: $CUOBJDUMP, then PATH's); '' skips them")
    args = ap.parse_args(argv)
    flags = nvcc_flags() + [f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}", "-Xptxas", "-v",
                            "-I", str(ROOT / "csrc" / "include")]
    sources = sorted(p for p in (ROOT / "csrc" / "cuda").glob("*.cu") if args.only in p.name)
    if not sources:
        sys.exit(f"sass_report: no csrc/cuda/*.cu matches {args.only!r}")
    cols = ["kernel", "regs", "stack B", "spill B"]
    if args.cuobjdump:
        cols += ["instr", "loop"] + [f"loop {c}" for c in CLASSES] + ["loop other"]
    print(f"sm_{args.arch}, nvcc flags: {' '.join(nvcc_flags())}\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            obj = Path(tmp) / (src.stem + ".o")
            run = subprocess.run([args.nvcc, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
            if run.returncode:
                sys.stderr.write(run.stdout + run.stderr)
                sys.exit(f"sass_report: nvcc failed on {src.name}")
            regs = ptxas_report(run.stdout + run.stderr)
            funcs = {}
            if args.cuobjdump:
                dump = subprocess.run([args.cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True)
                if dump.returncode:
                    sys.exit(f"sass_report: {args.cuobjdump} failed: {dump.stderr.strip()}")
                funcs = sass_functions(dump.stdout)
            for name in sorted(regs, key=demangle):
                r = regs[name]
                row = [f"`{demangle(name)}`", r.get("regs", "?"), r.get("stack", "?"), r.get("spill", "?")]
                if args.cuobjdump:
                    ins = funcs.get(name, [])
                    loop = loop_span(ins)
                    m = mix(loop)
                    row += [len(ins), len(loop)] + [m.get(c, 0) for c in CLASSES] + [m.get("other", 0)]
                print("| " + " | ".join(str(x) for x in row) + " |")
    if not args.cuobjdump:
        print("\n(no cuobjdump: set CUOBJDUMP or put it on PATH for the SASS columns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
