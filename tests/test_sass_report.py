"""bench/sass_report.py: its parsers on fixed compiler output, and (where nvcc is installed, as in
CI) a real compile of the Philox kernels: no kernel may spill or use a stack frame."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import sass_report  # noqa: E402

PTXAS = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers
ptxas info    : Function properties for _Z6calleed
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z3barPd' for 'sm_90'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
"""

SASS = """
	code for sm_90
		Function : _Z3fooPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD.WIDE.U32 R2, R0, 0x4, R2 ;
        /*0020*/                   FADD R4, R4, 1 ;
        /*0030*/               @P0 FMUL R4, R4, 0.5 ;
        /*0040*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0050*/                   ISETP.GE.AND P0, PT, R0, UR6, PT ;
        /*0060*/              @!P0 BRA 0x10 ;
        /*0070*/                   EXIT ;
		Function : _Z3barPd
        /*0000*/                   DADD R2, R2, R4 ;
        /*0010*/                   EXIT ;
"""


def test_ptxas_report_parses_registers_stack_and_spills():
    # the callee's block after _Z3fooPf's must not overwrite the kernel's stack and spill numbers
    got = sass_report.ptxas_report(PTXAS)
    assert got == {"_Z3fooPf": {"stack": 8, "spill": 8, "regs": 26},
                   "_Z3barPd": {"stack": 0, "spill": 0, "regs": 40}}


def test_loop_span_and_mix():
    funcs = sass_report.sass_functions(SASS)
    assert list(funcs) == ["_Z3fooPf", "_Z3barPd"]
    loop = sass_report.loop_span(funcs["_Z3fooPf"])
    assert [a for a, _ in loop] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x60]  # the backward branch's span
    mix = sass_report.mix(loop)
    assert mix == {"int": 2, "fp32": 2, "global mem": 1, "control": 1}
    assert sass_report.loop_span(funcs["_Z3barPd"]) == funcs["_Z3barPd"]  # no loop: the whole kernel
    assert sass_report.mix(funcs["_Z3barPd"]) == {"fp64": 1, "control": 1}


def test_flags_are_setup_pys():
    flags = sass_report.nvcc_flags()
    assert "-fmad=false" in flags and "-O3" in flags  # the bit identity depends on -fmad=false


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CI has it)")
def test_philox_kernels_compile_without_spills():
    done = subprocess.run([sys.executable, os.path.join(BENCH, "sass_report.py"), "--only", "philox",
                           "--cuobjdump", ""], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| `")]
    names = [r[0] for r in rows]  # demangled where c++filt is installed, mangled otherwise
    assert sum("philox_uint32_kernel" in n for n in names) == 2  # vector store or not
    assert sum("normal_icdf_kernel" in n for n in names) == 2
    assert sum("normal_kernel" in n and "icdf" not in n for n in names) == 8  # 2 dtypes x add x vector store
    for r in rows:
        assert r[2].strip() == "0" and r[3].strip() == "0", r  # no stack frame, no spills
