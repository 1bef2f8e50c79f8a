"""The ops under the caller's thread-local modes: torch.autocast must not reach the ATen GEMMs inside
the kernels (results in the inputs' dtype, the same numbers as without autocast, as the registered
fakes say), and the worker threads of the batched ops run in the caller's modes (inference tensors
out of inference_mode, from every thread)."""
import os
import subprocess
import sys

import pytest
import torch

from subspace_ext import ops


def _autocast(device):
    # CPU autocast takes bfloat16; CUDA autocast float16 (its default)
    return torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16)


def test_autocast_does_not_reach_inside_the_ops(device):
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(60, 37, generator=g).to(device) for _ in range(4)] + [torch.randn(23, 50).to(device)]
    U, V = torch.linalg.qr(torch.randn(60, 9, generator=g)).Q.to(device), \
        torch.linalg.qr(torch.randn(37, 7, generator=g)).Q.to(device)
    B, A = torch.randn(60, 4, generator=g).to(device), torch.randn(4, 37, generator=g).to(device)
    calls = {
        "rsvd": lambda: ops.rsvd(mats[0], 5, seed=3),
        "rsvd_many": lambda: ops.rsvd_many(mats, 5, seed=3),
        "factored_svd": lambda: ops.factored_svd(B, A, 3),
        "project": lambda: ops.project(U, V, B, A, 0.5),
        "project_perturbed": lambda: ops.project_perturbed(U, V, B, A, 0.5, eps=0.1, seed=7),
        "reconstruct": lambda: ops.reconstruct(U, torch.randn(9, 7, generator=g).to(device), V),
        "solar_basis": lambda: ops.solar_basis(mats[4], 5, 1, 0.1),
    }
    for name, call in calls.items():
        torch.manual_seed(0)
        g.manual_seed(1)
        want = call()
        g.manual_seed(1)
        with _autocast(device):
            got = call()
        flat_want, flat_got = torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)
        assert [t.dtype for t in flat_got] == [t.dtype for t in flat_want], name
        for a, b in zip(flat_want, flat_got):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_batched_ops_run_their_workers_in_the_callers_modes():
    """Which results a worker thread makes depends on scheduling: several calls, with more matrices
    than threads, so the workers take some."""
    mats = [torch.randn(200, 100 + i) for i in range(12)]
    for _ in range(4):
        with torch.inference_mode():
            many = torch.utils._pytree.tree_leaves(ops.rsvd_many(mats, 4))
            one = ops.rsvd(torch.stack(mats[:1] * 6), 4)
        assert len(many) == 36 and all(t.is_inference() for t in many), \
            "results of worker threads left inference mode"
        assert all(t.is_inference() for t in one)


_FORK_CHILD = r"""
import os, sys, time, torch
from subspace_ext import ops
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
A = [torch.randn(4, 10, generator=g) for _ in range(12)]
B = [torch.randn(12, 4, generator=g) for _ in range(12)]
W = [torch.randn(12, 10, generator=g) for _ in range(12)]
U, V = torch.linalg.qr(torch.randn(120, 40, generator=g)).Q, torch.linalg.qr(torch.randn(100, 30, generator=g)).Q
Bp, Ap = torch.randn(120, 4, generator=g), torch.randn(4, 100, generator=g)
big = [torch.randn(600, 400, generator=g) for _ in range(3)]
def fused(Ws):
    ops.fuse_pairs_(Ws, [b.clone() for b in B], A, [torch.tensor([0, 2])] * 12, 0.5)
    return Ws
calls = {
    "pair_importance": lambda: ops.pair_importance(A, B, A, B, *ops.importance_state(A, B)),
    "fuse_pairs_": lambda: fused([w.clone() for w in W]),
    "rsvd_many": lambda: ops.rsvd_many(W, 3, seed=1),
    "rsvd batched": lambda: ops.rsvd(torch.stack(W), 3, seed=1),
    "project_perturbed": lambda: ops.project_perturbed(U, V, Bp, Ap, 0.5, eps=0.1, seed=7),
    "philox_normal": lambda: ops.philox_normal((1 << 14,), seed=3),
}
large = {   # MKL's and torch's own threads too: the child must call torch.set_num_threads(1) first
    "rsvd_many 600x400": lambda: ops.rsvd_many(big, 8, seed=1),
    "philox_normal 2^20": lambda: ops.philox_normal((1 << 20,), seed=3),
}
one_thread = sys.argv[1] == "one thread"
calls.update(large if one_thread else {})
flat = lambda out: [t for t in (out if isinstance(out, (list, tuple)) else [out]) for t in (t if isinstance(t, (list, tuple)) else [t])]
parent = {k: flat(f()) for k, f in calls.items()}   # 2 threads: OpenMP's team exists now
pid = os.fork()
if pid == 0:
    if one_thread:
        torch.set_num_threads(1)
    bad = [k for k, f in calls.items() if not all(torch.equal(a, b) for a, b in zip(flat(f()), parent[k]))]
    print("differ:", bad, flush=True)
    os._exit(1 if bad else 0)
t0 = time.time()
while time.time() - t0 < 60:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.05)
os.kill(pid, 9)
print("the forked child hung", flush=True)
sys.exit(3)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
@pytest.mark.parametrize("child", ["as forked", "one thread"])
def test_ops_in_a_forked_child_return_the_parents_bits(child):
    """OpenMP's threads do not survive fork(): a raw-forked child (multiprocessing's fork start method) hung in
    its first parallel region, even for two tiny layers of pair_importance / fuse_pairs_ / rsvd_many (threads
    review). The extension's own loops now run serially in a forked child, with the same bits as the parent's
    two threads. Larger calls reach MKL's and torch's own threads, which hang there as well: a child that calls
    torch.set_num_threads(1) first (as a DataLoader's workers do) runs every op at any size."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", _FORK_CHILD, child], capture_output=True, text=True, timeout=180,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr


_LAPACK_IN_TASKS = r"""
import torch
from subspace_ext import ops
g = torch.Generator().manual_seed(0)
mats = [torch.randn(300, 200, generator=g), torch.randn(200, 300, generator=g)]
out = {}
for threads in (1, 2):
    torch.set_num_threads(threads)
    with torch.inference_mode():
        out[threads] = [t for U, S, V in ops.rsvd_many(mats, 60, seed=1) for t in (U, S, V)] + \
            list(ops.rsvd(torch.stack(mats[:1] * 3), 60, seed=1))
assert all(t.is_inference() for t in out[2]), "a result left inference mode"
assert all(torch.equal(a, b) for a, b in zip(out[1], out[2])), "2 threads gave other bits than 1"
print("ok")
"""


def test_lapack_calls_of_parallel_tasks_do_not_spin():
    """MKL's LAPACK spins in its thread team when called from inside an OpenMP region (or from two threads at
    once): rsvd_many over two 300 x 200 matrices at rank 60, whose 68-column sketches take Householder QR, ran
    for minutes on 2 threads (0.03 s on 1). The ops now run their CPU LAPACK calls one at a time, from inside a
    region on a thread of its own: seconds at most, with the bits of 1 thread, in inference mode too."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", _LAPACK_IN_TASKS], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
