"""Does a C++ exception reach Python on this machine, from torch's code and from ours?

The first GPU run (bench/results/h200-2026-12-04.md) died with a segfault at the first test that
makes one of our kernels throw (a TORCH_CHECK_VALUE in fuse_pairs_'s CPU argument check), after 349
tests that throw nothing had passed. Each case below throws one exception, in a forked child, so a
crash is reported instead of ending the probe. The cases tell apart what is at fault:

  torch-cpu / ours-cpu              a fresh process: ATen's own error vs one thrown by our build
  cuda-init + ...                   the same after CUDA is initialised
  our-cuda-kernels + ours-cpu       the same after our CUDA kernels ran (what the test suite did)
  ours-cuda / torch-cuda            our CUDA op's own argument check / ATen's on CUDA tensors

Run: python bench/probe_exceptions.py            (every case; exit status 1 if any crashed)
     python bench/probe_exceptions.py CASE       (one case in this process, e.g. under a debugger)
"""
import os
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # an in-place build in the checkout (bench/gpu_run.sh), not an installed one
    sys.path.insert(0, ROOT)

import subspace_ext  # noqa: E402

OPS = torch.ops.subspace_ext


def _cuda_init():
    torch.zeros(1, device="cuda").add_(1)
    torch.cuda.synchronize()


def _our_cuda_kernels():
    """Roughly what tests/test_philox.py and the first importance tests ran before the crash."""
    subspace_ext.ops.philox_normal((257, 33), seed=7, device="cuda")
    W = [torch.randn(40, 30, device="cuda") for _ in range(3)]
    B = [torch.randn(40, 8, device="cuda") for _ in range(3)]
    A = [torch.randn(8, 30, device="cuda") for _ in range(3)]
    subspace_ext.ops.fuse_pairs_(W, B, A, [[0, 2], [1], [3, 4, 5]], 0.5)
    torch.cuda.synchronize()


def _torch_throws(device="cpu"):
    torch.ones(2, device=device) @ torch.ones(3, device=device)  # ATen: size mismatch


def _ours_throws(device="cpu"):
    # The failing test's call, straight to the kernel: layer 1's W is layer 0's (check_disjoint).
    w = torch.randn(8, 6, device=device)
    B = [torch.randn(8, 3, device=device) for _ in range(2)]
    A = [torch.randn(3, 6, device=device) for _ in range(2)]
    idx = [torch.tensor([0]), torch.tensor([1])]
    OPS.fuse_pairs_([w, w], B, A, idx, [1.0, 1.0])


CASES = {
    "torch-cpu": [_torch_throws],
    "ours-cpu": [_ours_throws],
    "cuda-init+torch-cpu": [_cuda_init, _torch_throws],
    "cuda-init+ours-cpu": [_cuda_init, _ours_throws],
    "our-cuda-kernels+ours-cpu": [_our_cuda_kernels, _ours_throws],
    "ours-cuda": [_cuda_init, lambda: _ours_throws("cuda")],
    "torch-cuda": [_cuda_init, lambda: _torch_throws("cuda")],
}
CPU_ONLY = ("torch-cpu", "ours-cpu")


def run_case(name) -> str:
    *setup, throw = CASES[name]
    for step in setup:
        step()
    try:
        throw()
    except Exception as e:  # the point: it arrived as a Python exception
        return f"ok: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
    return "NO EXCEPTION (the call was expected to raise)"


def _in_child(fn) -> tuple:
    """fn() in a forked child: (its string result, crashed?). The parent never touches CUDA, so each
    child initialises it afresh (the CUDA driver does not survive a fork once initialised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            msg = fn()
        except BaseException as e:  # noqa: BLE001 - report anything the setup raised
            msg = f"setup failed: {type(e).__name__}: {e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"CRASH: {signal.Signals(os.WTERMSIG(status)).name}", True
    return msg, False


def main(argv) -> int:
    if argv:
        print(run_case(argv[0]))
        return 0
    has_cuda, _ = _in_child(lambda: str(torch.cuda.is_available() and subspace_ext.cuda_enabled()))
    names = list(CASES) if has_cuda == "True" else list(CPU_ONLY)
    with open("/proc/self/maps") as f:  # which runtime libraries the process really uses
        libs = sorted({line.split()[-1] for line in f if any(k in line for k in ("libgcc_s", "libstdc++", "libgomp"))})
    print("runtime libraries:", *libs, sep="\n  ")
    print(f"CUDA cases: {has_cuda == 'True'} ({has_cuda})")
    bad = 0
    for name in names:
        msg, crashed = _in_child(lambda: run_case(name))
        bad += crashed
        print(f"{name:28s} {msg}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
