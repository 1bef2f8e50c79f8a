"""Zero-size inputs on every device: empty batches, zero ranks, zero rows. Each op returns the
result of the same math on the float64 reference (an empty tensor, or zeros where a sum over an
empty dimension is taken) and launches nothing it cannot (a CUDA grid of 0 blocks is an error)."""
import pytest
import torch

from subspace_ext import ops

import reference as ref


def r(*shape, device):
    return torch.randn(*shape, device=device)


CASES = {  # name: the call on a device
    "project r=0": lambda dv: ops.project(r(6, 3, device=dv), r(5, 2, device=dv), r(6, 0, device=dv),
                                          r(0, 5, device=dv)),
    "project k1=0": lambda dv: ops.project(r(6, 0, device=dv), r(5, 2, device=dv), r(6, 3, device=dv),
                                           r(3, 5, device=dv)),
    "project m=0": lambda dv: ops.project(r(0, 3, device=dv), r(5, 2, device=dv), r(0, 3, device=dv),
                                          r(3, 5, device=dv)),
    "project batch 0": lambda dv: ops.project(r(0, 6, 3, device=dv), r(0, 5, 2, device=dv), r(0, 6, 4, device=dv),
                                              r(0, 4, 5, device=dv)),
    "project_dense m=0": lambda dv: ops.project_dense(r(0, 3, device=dv), r(5, 2, device=dv), r(0, 5, device=dv)),
    "reconstruct k=0": lambda dv: ops.reconstruct(r(6, 0, device=dv), r(0, 2, device=dv), r(5, 2, device=dv)),
    "project_perturbed r=0": lambda dv: ops.project_perturbed(r(6, 3, device=dv), r(5, 2, device=dv),
                                                              r(6, 0, device=dv), r(0, 5, device=dv),
                                                              eps=0.1, seed=1),
    "project_perturbed m=0": lambda dv: ops.project_perturbed(r(0, 3, device=dv), r(5, 2, device=dv),
                                                              r(0, 2, device=dv), r(2, 5, device=dv),
                                                              eps=0.1, seed=1),
    "reconstruct_perturbed k=0": lambda dv: ops.reconstruct_perturbed(r(6, 0, device=dv), r(0, 2, device=dv),
                                                                      r(5, 2, device=dv), eps=0.1, seed=1),
    "reconstruct_perturbed m=0": lambda dv: ops.reconstruct_perturbed(r(0, 3, device=dv), r(3, 2, device=dv),
                                                                      r(5, 2, device=dv), eps=0.1, seed=1),
    "perturbed_basis 0 rows": lambda dv: ops.perturbed_basis(r(0, 3, device=dv), 0.1, 1),
    # orthonormalize=True on no columns (or no matrices) failed in an internal reshape
    "perturbed_basis orthonormal 0 columns": lambda dv: ops.perturbed_basis(r(5, 0, device=dv), 0.1, 1,
                                                                            orthonormalize=True),
    "perturbed_basis orthonormal batch 0": lambda dv: ops.perturbed_basis(r(0, 5, 3, device=dv), 0.1, 1,
                                                                          orthonormalize=True),
    "philox_normal 0": lambda dv: ops.philox_normal((0, 3), seed=1, device=dv),
    "rsvd batch 0": lambda dv: ops.rsvd(r(0, 6, 5, device=dv), 2),
    "small_svd batch 0": lambda dv: ops.small_svd(r(0, 4, 3, device=dv)),
    "_gram_orth batch 0": lambda dv: torch.ops.subspace_ext._gram_orth(r(0, 4, 4, device=dv).double()),
}


SHAPES = {"project r=0": [(3, 2)],
          "project k1=0": [(0, 2)],
          "project m=0": [(3, 2)],
          "project batch 0": [(0, 3, 2)],
          "project_dense m=0": [(3, 2)],
          "reconstruct k=0": [(6, 5)],
          "project_perturbed r=0": [(3, 2)],
          "project_perturbed m=0": [(3, 2)],
          "reconstruct_perturbed k=0": [(6, 5)],
          "reconstruct_perturbed m=0": [(0, 5)],
          "perturbed_basis 0 rows": [(0, 3)],
          "perturbed_basis orthonormal 0 columns": [(5, 0)],
          "perturbed_basis orthonormal batch 0": [(0, 5, 3)],
          "philox_normal 0": [(0, 3)],
          "rsvd batch 0": [(0, 6, 2), (0, 2), (0, 5, 2)],
          "small_svd batch 0": [(0, 4, 3), (0, 3), (0, 3, 3)],
          "_gram_orth batch 0": [(0, 4, 4), (0,)]}


@pytest.mark.parametrize("name", list(CASES))
def test_zero_size_inputs(name, device):
    out = CASES[name](device)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert [tuple(t.shape) for t in outs] == SHAPES[name]
    for got in outs:
        assert got.device.type == device and got.dtype in (torch.float32, torch.float64, torch.bool)
        # what the math gives: a product over an empty dimension is zero, an empty result is empty
        assert not got.any(), name


def test_zero_size_results_match_the_float64_reference():
    z = torch.zeros
    U, V = torch.randn(6, 3), torch.randn(5, 2)
    assert torch.equal(ops.project(U, V, z(6, 0), z(0, 5)).double(), ref.project_ref(U, V, z(6, 0), z(0, 5)))
    assert torch.equal(ops.reconstruct(z(6, 0), z(0, 2), V).double(), ref.reconstruct_ref(z(6, 0), z(0, 2), V))
    assert torch.equal(ops.project_dense(z(0, 3), V, z(0, 5)).double(), ref.project_dense_ref(z(0, 3), V, z(0, 5)))


def test_fuse_and_reinit_with_zero_rows(device):
    W, B, A = r(0, 5, device=device), r(0, 3, device=device), r(3, 5, device=device)
    A0 = A.clone()
    ops.fuse_pairs_([W], [B], [A], [torch.tensor([1])])
    assert torch.equal(A, A0)
    An = r(1, 5, device=device)
    ops.reinit_pairs_([W], [B], [A], [torch.tensor([1])], [r(0, 1, device=device)], [An])
    assert torch.equal(A[1], An[0]) and torch.equal(A[[0, 2]], A0[[0, 2]])
