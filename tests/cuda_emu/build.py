"""Build the host emulation of csrc/cuda (see include/cuda_runtime.h) as a shared library.

The .cu sources are compiled unchanged but for two rewrites CUDA C++ needs and C++ lacks: a
kernel launch ``k<<<grid, block, smem, stream>>>(args)`` becomes ``emu::Launch(grid, block, smem,
stream)(k, args)``, and the dynamic shared-memory declaration becomes a pointer to the emulator's
per-block buffer.
"""
import hashlib
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>();]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?unsigned\s+char\s+(\w+)\[\];")


def rewrite(text: str) -> str:
    text, launches = _LAUNCH.subn(lambda m: f"::emu::Launch({m.group(2)})({m.group(1)}, ", text)
    text = _DYN_SMEM.sub(lambda m: f"unsigned char* {m.group(1)} = ::emu::dyn_smem();", text)
    return text


def build(out_dir: Path) -> Path:
    """Compile (cached by the sources' hash) and return the library's path."""
    inputs = SOURCES + [HERE / "capi.cpp", *sorted((ROOT / "csrc" / "cuda").glob("*.h")), *sorted((HERE / "include").glob("*.h")),
                        *sorted((ROOT / "csrc" / "include" / "subspace_ext").glob("*.h")), Path(__file__)]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"libcuda_emu-{digest}.so"
    if lib.exists():
        return lib
    srcs = []
    for cu in SOURCES:
        dst = out_dir / (cu.stem + ".emu.cpp")
        dst.write_text(f'#line 1 "{cu.name}"\n' + rewrite(cu.read_text()))
        srcs.append(dst)
    cmd = ["g++", "-std=c++20", "-O1", "-g0", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-w",
           f"-I{HERE / 'include'}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}",
           *map(str, srcs), str(HERE / "capi.cpp"), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{done.stderr[-8000:]}")
    return lib
