"""The ops under the caller's thread-local modes: torch.autocast must not reach the ATen GEMMs inside
the kernels (results in the inputs' dtype, the same numbers as without autocast, as the registered
fakes say), and the worker threads of the batched ops run in the caller's modes (inference tensors
out of inference_mode, from every thread)."""
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
