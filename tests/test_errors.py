"""Every bad argument raises TypeError / ValueError whose message names the argument, both through
subspace_ext.ops and (for the kernels' own checks) through torch.ops.subspace_ext directly."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import subspace_ext
from subspace_ext import ops

NAN, INF = float("nan"), float("inf")


def f32(*shape):
    return torch.randn(*shape)


# ---------------------------------------------------------------------------------------------
# philox


@pytest.mark.parametrize("seed,exc,match", [(2**64, ValueError, "seed"), (-(2**63) - 1, ValueError, "seed"),
                                            (1.0, TypeError, "seed"), ("3", TypeError, "seed"),
                                            (True, TypeError, "seed"),
                                            # torch's own message named no argument for these
                                            (torch.tensor(1.5), TypeError,
                                             r"seed must be an integer, got a float32 tensor of shape \(\)"),
                                            (torch.tensor([1, 2]), TypeError,
                                             r"seed must be an integer, got a int64 tensor of shape \(2,\)")])
def test_philox_bad_seed(seed, exc, match):
    with pytest.raises(exc, match=match):
        ops.philox_normal((3,), seed)
    with pytest.raises(exc, match=match):
        ops.philox_uint32((3,), seed)


@pytest.mark.parametrize("stream,exc", [(2**64, ValueError), (0.5, TypeError)])
def test_philox_bad_stream(stream, exc):
    with pytest.raises(exc, match="stream"):
        ops.philox_normal((3,), 0, stream)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bfloat16, torch.float16])
def test_philox_normal_bad_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        ops.philox_normal((3,), 0, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_philox_normal_icdf_float32_only(dtype):
    with pytest.raises(TypeError, match="float32"):
        ops.philox_normal((3,), 0, dtype=dtype, method="icdf")


@pytest.mark.parametrize("method", ["ICDF", "ziggurat", "", None])
def test_philox_normal_bad_method(method):
    with pytest.raises(ValueError, match="method"):
        ops.philox_normal((3,), 0, method=method)


@pytest.mark.parametrize("eps", [NAN, INF, -INF, "0.1", None])
def test_perturbed_basis_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        ops.perturbed_basis(f32(5, 2), eps, 0)


def test_perturbed_basis_bad_U():
    with pytest.raises(ValueError, match="U"):
        ops.perturbed_basis(f32(5), 0.1, 0)
    with pytest.raises(TypeError, match="U"):
        ops.perturbed_basis(torch.ones(5, 2, dtype=torch.int64), 0.1, 0)
    with pytest.raises(TypeError, match="U"):
        ops.perturbed_basis([[1.0, 2.0]], 0.1, 0)


def test_perturbed_basis_orthonormalize_wide_U():
    """More columns than rows cannot be orthonormalised: a clear ValueError naming U is expected."""
    with pytest.raises(ValueError, match="U"):
        ops.perturbed_basis(f32(3, 7), 0.1, 0, orthonormalize=True)


# ---------------------------------------------------------------------------------------------
# rsvd / rsvd_many / factored_svd


@pytest.mark.parametrize("rank", [0, -1, 6, 100])
def test_rsvd_rank_out_of_range(rank):
    with pytest.raises(ValueError, match="rank"):
        ops.rsvd(f32(8, 5), rank)


@pytest.mark.parametrize("rank", [2.0, "2", None, True, torch.tensor(2)])
def test_rsvd_rank_not_int(rank):
    with pytest.raises(TypeError, match="rank"):
        ops.rsvd(f32(8, 5), rank)


@pytest.mark.parametrize("kw,match", [({"oversample": -1}, "oversample"), ({"niter": -2}, "niter"),
                                      ({"oversample": 1.5}, "oversample"), ({"niter": "2"}, "niter"),
                                      ({"seed": 2**64}, "seed")])
def test_rsvd_bad_options(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rsvd(f32(8, 5), 2, **kw)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rsvd_many([f32(8, 5)], 2, **kw)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rsvd_non_finite(bad, dtype):
    A = torch.randn(10, 6, dtype=dtype)
    A[3, 4] = bad
    with pytest.raises(ValueError, match=r"\bA\b.*(NaN|Inf)"):
        ops.rsvd(A, 2)
    B = torch.randn(2, 10, 6, dtype=dtype)
    B[1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"\bA\b.*(NaN|Inf)"):
        ops.rsvd(B, 2)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_rsvd_many_non_finite(bad):
    mats = [f32(10, 6), f32(7, 9), f32(5, 5)]
    mats[1][2, 2] = bad
    with pytest.raises(ValueError, match=r"(mats|\bA\b).*(NaN|Inf)"):
        ops.rsvd_many(mats, 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_rsvd_bad_dtype(dtype):
    A = torch.ones(6, 4).to(dtype)
    with pytest.raises(TypeError, match=r"\bA\b"):
        ops.rsvd(A, 2)
    with pytest.raises(TypeError, match=r"mats\[1\]"):
        ops.rsvd_many([f32(6, 4), A], 2)


def test_rsvd_bad_dims_and_types():
    with pytest.raises(ValueError, match=r"\bA\b"):
        ops.rsvd(f32(7), 1)
    with pytest.raises(ValueError, match=r"\bA\b"):
        ops.rsvd(torch.tensor(1.0), 1)
    with pytest.raises(TypeError, match=r"\bA\b"):
        ops.rsvd([[1.0, 2.0], [3.0, 4.0]], 1)
    with pytest.raises(ValueError, match=r"mats\[0\]"):
        ops.rsvd_many([f32(2, 6, 4)], 2)
    with pytest.raises(TypeError, match="mats"):
        ops.rsvd_many(f32(6, 4), 2)
    with pytest.raises(TypeError, match=r"mats\[1\]"):
        ops.rsvd_many([f32(6, 4), "x"], 2)


def test_rsvd_many_rank_names_matrix():
    with pytest.raises(ValueError, match=r"rank.*mats\[2\]"):
        ops.rsvd_many([f32(6, 4), f32(9, 9), f32(2, 8)], 3)


def test_factored_svd_errors():
    B, A = f32(6, 3), f32(3, 5)
    with pytest.raises(ValueError, match=r"\bB\b.*\bA\b"):
        ops.factored_svd(B, f32(4, 5))  # r mismatch
    with pytest.raises(ValueError, match="rank"):
        ops.factored_svd(B, A, 4)  # > min(m, n, r) = 3
    with pytest.raises(ValueError, match="rank"):
        ops.factored_svd(B, A, 0)
    with pytest.raises(TypeError, match="rank"):
        ops.factored_svd(B, A, 2.0)
    with pytest.raises(ValueError, match=r"\bB\b"):
        ops.factored_svd(f32(6), A)
    with pytest.raises(ValueError, match=r"B and A must be 2-D"):
        ops.factored_svd(f32(2, 6, 3), A)
    with pytest.raises(TypeError, match=r"\bA\b"):
        ops.factored_svd(B, torch.ones(3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="rank"):
        ops.factored_svd(f32(3, 5), f32(5, 9), 4)  # r > m: full rank is 3


@pytest.mark.parametrize("which", ["B", "A"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_factored_svd_non_finite(which, bad):
    B, A = f32(6, 3), f32(3, 5)
    (B if which == "B" else A)[1, 1] = bad
    with pytest.raises(ValueError, match=rf"\b{which}\b.*(NaN|Inf)"):
        ops.factored_svd(B, A)


# ---------------------------------------------------------------------------------------------
# project / project_dense / reconstruct


def test_project_shape_mismatch():
    U, V, B, A = f32(8, 2), f32(5, 3), f32(8, 4), f32(4, 5)
    ops.project(U, V, B, A)  # valid
    for args in [(f32(7, 2), V, B, A), (U, f32(6, 3), B, A), (U, V, f32(8, 3), A), (U, V, B, f32(4, 6))]:
        with pytest.raises(ValueError, match="shapes do not chain"):
            ops.project(*args)


@pytest.mark.parametrize("which", ["B", "A"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_project_non_finite(which, bad):
    U, V, B, A = f32(8, 2), f32(5, 3), f32(8, 4), f32(4, 5)
    (B if which == "B" else A)[0, 0] = bad
    with pytest.raises(ValueError, match=rf"\b{which}\b.*(NaN|Inf)"):
        ops.project(U, V, B, A)


@pytest.mark.parametrize("which", ["U", "V", "B", "A"])
def test_project_bad_dtype_and_dims(which):
    args = {"U": f32(8, 2), "V": f32(5, 3), "B": f32(8, 4), "A": f32(4, 5)}
    bad = dict(args)
    bad[which] = args[which].to(torch.int64)
    with pytest.raises(TypeError, match=rf"\b{which}\b"):
        ops.project(bad["U"], bad["V"], bad["B"], bad["A"])
    bad = dict(args)
    bad[which] = args[which][0]
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        ops.project(bad["U"], bad["V"], bad["B"], bad["A"])


def test_project_mixed_float_dtypes():
    """float64 U with float32 factors: rejected with a TypeError/ValueError (not a matmul error)."""
    with pytest.raises((TypeError, ValueError), match=r"\b(U|V|B|A)\b"):
        ops.project(f32(8, 2).double(), f32(5, 3), f32(8, 4), f32(4, 5))


def test_project_dense_and_reconstruct_errors():
    U, V, D = f32(8, 2), f32(5, 3), f32(8, 5)
    with pytest.raises(ValueError, match="shapes do not chain"):
        ops.project_dense(U, V, f32(8, 6))
    with pytest.raises(ValueError, match="shapes do not chain"):
        ops.project_dense(f32(7, 2), V, D)
    with pytest.raises(TypeError, match=r"\bD\b"):
        ops.project_dense(U, V, D.to(torch.int32))
    with pytest.raises(ValueError, match=r"\bD\b"):
        ops.project_dense(U, V, f32(5))
    C = f32(2, 3)
    with pytest.raises(ValueError, match="shapes do not chain"):
        ops.reconstruct(U, f32(3, 3), V)
    with pytest.raises(ValueError, match="shapes do not chain"):
        ops.reconstruct(U, C, f32(5, 2))
    with pytest.raises(TypeError, match=r"\bC\b"):
        ops.reconstruct(U, C.to(torch.int64), V)
    with pytest.raises(ValueError, match=r"\bC\b"):
        ops.reconstruct(U, f32(3), V)


def test_mixed_devices_named():
    U, V, B = f32(8, 2), f32(5, 3), f32(8, 4)
    A = torch.empty(4, 5, device="meta")
    with pytest.raises(ValueError, match=r"one device.*A on meta"):
        ops.project(U, V, B, A)
    with pytest.raises(ValueError, match=r"one device.*A on meta"):
        ops.factored_svd(B, A)


class _FakeCuda(torch.Tensor):
    """A CPU tensor that claims to be a CUDA tensor (to reach the 'no CUDA kernels' message)."""

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False


def _fake_cuda(t):
    return torch.Tensor._make_subclass(_FakeCuda, t)


@pytest.mark.parametrize("call,name", [
    (lambda x: ops.rsvd(x, 2), "A"),
    (lambda x: ops.rsvd_many([f32(6, 4), x], 2), r"mats\[1\]"),
    (lambda x: ops.factored_svd(f32(6, 4), x), "A"),
    (lambda x: ops.project(x, f32(4, 2), f32(6, 3), f32(3, 4)), "U"),
    (lambda x: ops.perturbed_basis(x, 0.1, 0), "U"),
    (lambda x: ops.fuse_pairs_(x, f32(6, 2), f32(2, 4), torch.tensor([0])), r"W\[0\]"),
])
def test_cuda_tensor_to_cpu_only_build(monkeypatch, call, name):
    monkeypatch.setattr(ops, "_CUDA_ENABLED", False)
    x = _fake_cuda(torch.randn(6, 4))
    assert x.is_cuda
    with pytest.raises(ValueError, match=rf"{name} is a CUDA tensor.*no CUDA kernels"):
        call(x)


@pytest.mark.parametrize("call,name,op", [
    (lambda x: ops.rsvd(x, 2), "A", "rsvd"),
    (lambda x: ops.rsvd_many([x], 2), r"mats\[0\]", "rsvd_many"),
    (lambda x: ops.factored_svd(x, f32(4, 3)), "B", "factored_svd"),
    (lambda x: ops.project_dense(x, f32(4, 2), f32(6, 4)), "U", "project_dense"),
    (lambda x: ops.reconstruct(x, f32(4, 2), f32(3, 2)), "U", "reconstruct"),
    (lambda x: ops.solar_basis(x, 0), "W0", "solar_basis"),
])
def test_cuda_tensor_to_op_without_cuda_implementation(monkeypatch, call, name, op):
    """An op left out of ops.CUDA_OPS says so for CUDA tensors instead of a dispatcher error."""
    monkeypatch.setattr(ops, "_CUDA_ENABLED", True)
    monkeypatch.setattr(ops, "CUDA_OPS", ops.CUDA_OPS - {op})
    with pytest.raises(ValueError, match=rf"{name} is a CUDA tensor, but {op} has no CUDA implementation yet"):
        call(_fake_cuda(torch.randn(6, 4)))


@pytest.mark.skipif(not torch.cuda.is_available() or subspace_ext.cuda_enabled(),
                    reason="needs a GPU and a build without CUDA kernels")
def test_real_cuda_tensor_to_cpu_only_build():
    with pytest.raises(ValueError, match="CUDA"):
        ops.rsvd(torch.randn(6, 4, device="cuda"), 2)


# ---------------------------------------------------------------------------------------------
# importance / fusion


def _imp_args(L=2):
    A = [f32(3, 7) for _ in range(L)]
    B = [f32(5, 3) for _ in range(L)]
    gA = [f32(3, 7) for _ in range(L)]
    gB = [f32(5, 3) for _ in range(L)]
    return [A, B, gA, gB, *ops.importance_state(A, B)]


NAMES = ["A", "B", "grad_A", "grad_B", "ipt_A", "ipt_B", "unc_A", "unc_B"]


@pytest.mark.parametrize("pos", range(8))
def test_pair_importance_list_lengths(pos):
    args = _imp_args()
    args[pos] = args[pos][:1]
    with pytest.raises(ValueError, match=rf"{NAMES[pos]}|\bA\b"):
        ops.pair_importance(*args)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, NAN])
@pytest.mark.parametrize("name", ["beta1", "beta2"])
def test_pair_importance_beta_out_of_range(beta, name):
    with pytest.raises(ValueError, match=name):
        ops.pair_importance(*_imp_args(), **{name: beta})


def test_pair_importance_bad_layers():
    args = _imp_args()
    args[2][1] = None  # no gradient
    with pytest.raises(ValueError, match=r"grad_A\[1\]"):
        ops.pair_importance(*args)
    args = _imp_args()
    args[1][0] = f32(5, 4)  # B (m x r) does not match A (r x n)
    with pytest.raises(ValueError, match="layer 0"):
        ops.pair_importance(*args)
    args = _imp_args()
    args[4][1] = torch.zeros(7, 3).t()  # non-contiguous state
    with pytest.raises(ValueError, match=r"ipt_A\[1\]"):
        ops.pair_importance(*args)
    args = _imp_args()
    args[6][0] = torch.zeros(3, 7, dtype=torch.bfloat16)  # bf16 state not allowed
    with pytest.raises(TypeError, match=r"unc_A\[0\]"):
        ops.pair_importance(*args)
    args = _imp_args()
    args[0][0] = torch.ones(3, 7, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"A\[0\]"):
        ops.pair_importance(*args)
    with pytest.raises(TypeError, match=r"\bB\b"):
        args = _imp_args()
        args[1] = {"not": "a list"}
        ops.pair_importance(*args)


def _fuse_args():
    W = [f32(6, 4), f32(5, 9)]
    B = [f32(6, 3), f32(5, 2)]
    A = [f32(3, 4), f32(2, 9)]
    idx = [torch.tensor([0, 2]), torch.tensor([1])]
    return W, B, A, idx


@pytest.mark.parametrize("op", ["fuse", "reinit"])
def test_fuse_reinit_idx_errors(op):
    def call(idx):
        W, B, A, _ = _fuse_args()
        if op == "fuse":
            ops.fuse_pairs_(W, B, A, idx)
        else:
            ops.reinit_pairs_(W, B, A, idx, [f32(6, len(idx[0])), f32(5, len(idx[1]))],
                              [f32(len(idx[0]), 4), f32(len(idx[1]), 9)])

    with pytest.raises(ValueError, match=r"(idx\[0\]|layer 0: idx).*(outside|out of range)"):
        call([torch.tensor([0, 3]), torch.tensor([1])])
    with pytest.raises(ValueError, match=r"(idx\[1\]|layer 1: idx).*(outside|out of range)"):
        call([torch.tensor([0]), torch.tensor([-1])])
    with pytest.raises(ValueError, match=r"(idx\[0\]|layer 0: idx).*repeated"):
        call([torch.tensor([2, 2]), torch.tensor([1])])
    with pytest.raises(TypeError, match=r"idx\[1\]"):
        call([torch.tensor([0]), torch.tensor([1.0])])
    with pytest.raises(ValueError, match=r"one device.*idx\[1\] on meta"):  # host or W's device only
        call([torch.tensor([0]), torch.tensor([1], device="meta")])


def test_fuse_errors():
    W, B, A, idx = _fuse_args()
    snapshot = [t.clone() for t in W + B + A]
    with pytest.raises(ValueError, match=r"\bB\b has 1 layers"):
        ops.fuse_pairs_(W, B[:1], A, idx)
    with pytest.raises(ValueError, match=r"idx has 1 layers"):
        ops.fuse_pairs_(W, B, A, idx[:1])
    with pytest.raises(ValueError, match=r"scaling has 3 layers"):
        ops.fuse_pairs_(W, B, A, idx, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="layer 1"):
        ops.fuse_pairs_(W, [B[0], f32(5, 3)], A, idx)  # B[1] r mismatch with A[1]
    with pytest.raises(ValueError, match="layer 0"):
        ops.fuse_pairs_(W, [f32(7, 3), B[1]], A, idx)  # B[0] m mismatch with W[0]
    with pytest.raises(ValueError, match="layer 1"):
        ops.fuse_pairs_(W, B, [A[0], f32(2, 8)], idx)  # A[1] n mismatch with W[1]
    with pytest.raises(ValueError, match="layer 0"):
        ops.fuse_pairs_([f32(2, 6, 4), W[1]], B, A, idx)
    with pytest.raises(TypeError, match=r"W\[1\]"):
        ops.fuse_pairs_([W[0], W[1].to(torch.int32)], B, A, idx)
    with pytest.raises(TypeError, match=r"\bW\b"):
        ops.fuse_pairs_("W", B, A, idx)
    # nothing was modified by any failed call
    for t, s in zip(W + B + A, snapshot):
        assert torch.equal(t, s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_reinit_new_pairs_non_finite_in_every_dtype(dtype, value):
    """The host check of B_new / A_new (a plain loop per dtype) sees NaN and +-Inf in every weight
    dtype, at any position, and nothing is modified."""
    W = [torch.randn(6, 4, dtype=dtype) for _ in range(2)]
    B = [torch.randn(6, 3, dtype=dtype) for _ in range(2)]
    A = [torch.randn(3, 4, dtype=dtype) for _ in range(2)]
    idx = [torch.tensor([0, 2]), torch.tensor([1])]
    snapshot = [t.clone() for t in W + B + A]
    for which, layer, pos in [("B_new", 0, (5, 1)), ("A_new", 1, (0, 3)), ("B_new", 1, (0, 0))]:
        Bn = [torch.randn(6, len(i), dtype=dtype) for i in idx]
        An = [torch.randn(len(i), 4, dtype=dtype) for i in idx]
        (Bn if which == "B_new" else An)[layer][pos] = value
        with pytest.raises(ValueError, match=rf"layer {layer}: {which} contains NaN or Inf"):
            ops.reinit_pairs_(W, B, A, idx, Bn, An)
    for t, s in zip(W + B + A, snapshot):
        assert torch.equal(t, s)


def test_reinit_errors():
    W, B, A, idx = _fuse_args()
    Bn = [f32(6, 2), f32(5, 1)]
    An = [f32(2, 4), f32(1, 9)]
    snapshot = [t.clone() for t in W + B + A]
    with pytest.raises(ValueError, match=r"B_new.*layer 0|layer 0.*B_new"):
        ops.reinit_pairs_(W, B, A, idx, [f32(6, 3), Bn[1]], An)
    with pytest.raises(ValueError, match=r"layer 1.*A_new"):
        ops.reinit_pairs_(W, B, A, idx, Bn, [An[0], f32(1, 8)])
    with pytest.raises(ValueError, match=r"B_new and A_new"):
        ops.reinit_pairs_(W, B, A, idx, Bn[:1], An)
    bad = f32(6, 2)
    bad[0, 0] = NAN
    with pytest.raises(ValueError, match=r"layer 0: B_new contains NaN"):
        ops.reinit_pairs_(W, B, A, idx, [bad, Bn[1]], An)
    bad = f32(1, 9)
    bad[0, 3] = INF
    with pytest.raises(ValueError, match=r"layer 1: A_new contains NaN or Inf"):
        ops.reinit_pairs_(W, B, A, idx, Bn, [An[0], bad])
    with pytest.raises(TypeError, match=r"B_new\[1\]"):
        ops.reinit_pairs_(W, B, A, idx, [Bn[0], Bn[1].to(torch.int64)], An)
    # finite float32 pairs beyond a float16 B's range: the overflow of the cast is named, not "NaN or Inf" alone
    Wh, Bh, Ah = [w.half() for w in W], [b.half() for b in B], [a.half() for a in A]
    with pytest.raises(ValueError, match=r"layer 1: B_new contains NaN or Inf in B's dtype Half \(where values "
                                         r"beyond its range become Inf\)"):
        ops.reinit_pairs_(Wh, Bh, Ah, idx, [Bn[0], Bn[1] * 0 + 1e5], An)
    with pytest.raises(ValueError, match=r"layer 0: B_new contains NaN or Inf$"):
        ops.reinit_pairs_(Wh, Bh, Ah, idx, [Bn[0].half() * float("nan"), Bn[1].half()], [a.half() for a in An])
    for t, s in zip(W + B + A, snapshot):
        assert torch.equal(t, s)


def test_empty_layer_lists_are_no_ops():
    """A model without LoRA layers: the list ops accept empty lists."""
    assert ops.pair_importance([], [], [], [], [], [], [], []) == []
    ops.fuse_pairs_([], [], [], [])
    ops.reinit_pairs_([], [], [], [], [], [])


# ---------------------------------------------------------------------------------------------
# the kernels' own checks, through torch.ops directly

_o = torch.ops.subspace_ext


def _z(*s, dtype=torch.float32):
    return torch.zeros(*s, dtype=dtype)


def _imp_direct(**over):
    args = dict(A=[f32(2, 3)], B=[f32(4, 2)], grad_A=[f32(2, 3)], grad_B=[f32(4, 2)],
                ipt_A=[_z(2, 3)], ipt_B=[_z(4, 2)], unc_A=[_z(2, 3)], unc_B=[_z(4, 2)],
                scores=[_z(2)], beta1=0.8, beta2=0.8)
    args.update(over)
    return lambda: _o.pair_importance_(*args.values())


DIRECT = {
    "philox_uint32_ float out": (lambda: _o.philox_uint32_(torch.empty(4), 0, 0), TypeError, "out"),
    "philox_uint32_ non-contiguous": (lambda: _o.philox_uint32_(torch.empty(4, 4, dtype=torch.int32).t(), 0, 0),
                                      (TypeError, ValueError), "out"),
    "philox_normal_ int out": (lambda: _o.philox_normal_(torch.empty(4, dtype=torch.int32), 0, 0), TypeError, "out"),
    "philox_normal_ non-contiguous": (lambda: _o.philox_normal_(torch.empty(4, 4).t(), 0, 0), ValueError, "out"),
    "philox_normal_icdf_ float64 out": (lambda: _o.philox_normal_icdf_(torch.empty(4, dtype=torch.float64), 0, 0),
                                        TypeError, "float32"),
    "philox_normal_icdf_ non-contiguous": (lambda: _o.philox_normal_icdf_(torch.empty(4, 4).t(), 0, 0),
                                           ValueError, "contiguous"),
    "perturbed_basis int U": (lambda: _o.perturbed_basis(torch.ones(4, 2, dtype=torch.int32), 0.1, 0, 0, False),
                              TypeError, "U"),
    "perturbed_basis 1-D U": (lambda: _o.perturbed_basis(f32(3), 0.1, 0, 0, False), ValueError, "U"),
    "rsvd rank 0": (lambda: _o.rsvd(f32(4, 3), 0, 8, 2, 0), ValueError, "rank"),
    "rsvd rank > min": (lambda: _o.rsvd(f32(4, 3), 4, 8, 2, 0), ValueError, "rank"),
    "rsvd int A": (lambda: _o.rsvd(torch.ones(4, 3, dtype=torch.int32), 1, 8, 2, 0), TypeError, "A"),
    "rsvd 1-D A": (lambda: _o.rsvd(f32(3), 1, 8, 2, 0), ValueError, "A"),
    "rsvd NaN": (lambda: _o.rsvd(torch.full((4, 3), NAN), 1, 8, 2, 0), ValueError, "NaN"),
    "rsvd oversample < 0": (lambda: _o.rsvd(f32(4, 3), 1, -1, 2, 0), ValueError, "oversample"),
    "rsvd niter < 0": (lambda: _o.rsvd(f32(4, 3), 1, 1, -1, 0), ValueError, "niter"),
    "rsvd_many Inf": (lambda: _o.rsvd_many([f32(4, 3), torch.full((4, 3), INF)], 1, 8, 2, 0), ValueError, "Inf"),
    "rsvd_many 3-D": (lambda: _o.rsvd_many([f32(2, 4, 3)], 1, 8, 2, 0), ValueError, "2-D"),
    "rsvd_many rank": (lambda: _o.rsvd_many([f32(4, 3), f32(2, 5)], 3, 8, 2, 0), ValueError, "rank"),
    "factored_svd shapes": (lambda: _o.factored_svd(f32(4, 2), f32(3, 5), 1), ValueError, "B"),
    "factored_svd NaN": (lambda: _o.factored_svd(f32(4, 2), torch.full((2, 5), NAN), 1), ValueError, "A"),
    "factored_svd rank": (lambda: _o.factored_svd(f32(4, 2), f32(2, 5), 3), ValueError, "rank"),
    "factored_svd int": (lambda: _o.factored_svd(torch.ones(4, 2, dtype=torch.int64), f32(2, 5), 1), TypeError, "B"),
    "project shapes": (lambda: _o.project(f32(4, 2), f32(5, 2), f32(4, 3), f32(2, 5), 1.0), ValueError, "shapes"),
    "project int": (lambda: _o.project(torch.ones(4, 2, dtype=torch.int64), f32(5, 2), f32(4, 3), f32(3, 5), 1.0),
                    TypeError, "U"),
    "project_dense shapes": (lambda: _o.project_dense(f32(4, 2), f32(5, 2), f32(4, 6)), ValueError, "shapes"),
    "reconstruct shapes": (lambda: _o.reconstruct(f32(4, 2), f32(3, 2), f32(5, 2)), ValueError, "shapes"),
    "pair_importance lengths": (_imp_direct(B=[]), ValueError, "length"),
    "pair_importance shapes": (_imp_direct(B=[f32(4, 3)], grad_B=[f32(4, 3)], ipt_B=[_z(4, 3)], unc_B=[_z(4, 3)]),
                               ValueError, "layer 0"),
    "pair_importance int states": (_imp_direct(ipt_A=[_z(2, 3, dtype=torch.int32)]), TypeError, "states"),
    "pair_importance int params": (_imp_direct(A=[torch.ones(2, 3, dtype=torch.int32)], B=[torch.ones(4, 2, dtype=torch.int32)],
                                               grad_A=[torch.ones(2, 3, dtype=torch.int32)],
                                               grad_B=[torch.ones(4, 2, dtype=torch.int32)]), TypeError, "A"),
    "pair_importance beta1 > 1": (_imp_direct(beta1=1.5), ValueError, "beta1"),
    "pair_importance beta2 < 0": (_imp_direct(beta2=-0.5), ValueError, "beta2"),
    "fuse_pairs_ idx range": (lambda: _o.fuse_pairs_([f32(4, 5)], [f32(4, 2)], [f32(2, 5)], [torch.tensor([2])], [1.0]),
                              ValueError, "idx"),
    "fuse_pairs_ idx repeated": (lambda: _o.fuse_pairs_([f32(4, 5)], [f32(4, 2)], [f32(2, 5)], [torch.tensor([1, 1])],
                                                        [1.0]), ValueError, "idx"),
    "fuse_pairs_ float idx": (lambda: _o.fuse_pairs_([f32(4, 5)], [f32(4, 2)], [f32(2, 5)], [torch.tensor([1.0])],
                                                     [1.0]), TypeError, "idx"),
    "fuse_pairs_ shapes": (lambda: _o.fuse_pairs_([f32(4, 5)], [f32(4, 2)], [f32(3, 5)], [torch.tensor([1])], [1.0]),
                           ValueError, "layer 0"),
    "fuse_pairs_ lengths": (lambda: _o.fuse_pairs_([f32(4, 5)], [f32(4, 2)], [f32(2, 5)], [torch.tensor([1])],
                                                   [1.0, 2.0]), ValueError, "scaling"),
    "fuse_pairs_ int W": (lambda: _o.fuse_pairs_([torch.ones(4, 5, dtype=torch.int32)], [f32(4, 2)], [f32(2, 5)],
                                                 [torch.tensor([1])], [1.0]), TypeError, "W"),
    "fuse_pairs_ B/A dtypes": (lambda: _o.fuse_pairs_([f32(4, 5)], [f32(4, 2)], [f32(2, 5).double()],
                                                      [torch.tensor([1])], [1.0]), TypeError, "B and A"),
    "reinit_pairs_ B_new shape": (lambda: _o.reinit_pairs_([f32(4, 5)], [f32(4, 2)], [f32(2, 5)], [torch.tensor([1])],
                                                           [f32(4, 2)], [f32(1, 5)], [1.0]), ValueError, "B_new"),
    "reinit_pairs_ lengths": (lambda: _o.reinit_pairs_([f32(4, 5)], [f32(4, 2)], [f32(2, 5)], [torch.tensor([1])],
                                                       [], [], [1.0]), ValueError, "B_new"),
    "reinit_pairs_ NaN B_new": (lambda: _o.reinit_pairs_([f32(4, 5)], [f32(4, 2)], [f32(2, 5)], [torch.tensor([1])],
                                                         [torch.full((4, 1), NAN)], [f32(1, 5)], [1.0]),
                                ValueError, "B_new"),
}


@pytest.mark.parametrize("case", list(DIRECT))
def test_direct_op_checks(case):
    fn, exc, match = DIRECT[case]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("bad", ["meta grad_B", "strided unc_A", "int ipt_B", "B shape", "None grad_A", "1-D A"])
def test_pair_importance_names_a_bad_later_layer(bad):
    """The wrapper's one-pass check of the common case must send every bad layer, here the last of
    three, to the checks that name it (not let it through to the kernel)."""
    A = [torch.randn(4, 6) for _ in range(3)]
    B = [torch.randn(5, 4) for _ in range(3)]
    gA, gB = [torch.randn_like(a) for a in A], [torch.randn_like(b) for b in B]
    iA, iB, uA, uB = ops.importance_state(A, B)
    match = {"meta grad_B": r"one device.*grad_B\[2\] on meta", "strided unc_A": r"unc_A\[2\] must be contiguous",
             "int ipt_B": r"ipt_B\[2\] must have dtype", "B shape": r"layer 2: expected A \(r x n\) and B \(m x r\)",
             "None grad_A": r"grad_A\[2\] is None", "1-D A": r"A\[2\] must have at least 2 dimensions"}[bad]
    if bad == "meta grad_B":
        gB[2] = gB[2].to("meta")
    elif bad == "strided unc_A":
        uA[2] = torch.zeros(6, 4).t()
    elif bad == "int ipt_B":
        iB[2] = iB[2].to(torch.int32)
    elif bad == "B shape":
        B[2], gB[2], iB[2], uB[2] = (torch.randn(5, 3) for _ in range(4))
    elif bad == "None grad_A":
        gA[2] = None
    else:
        A[2] = torch.randn(24)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.pair_importance(A, B, gA, gB, iA, iB, uA, uB)


@pytest.mark.parametrize("bad", ["meta W", "3-D W", "B rows", "float idx", "int8 B"])
def test_fuse_pairs_names_a_bad_later_layer(bad):
    W = [torch.randn(5, 6) for _ in range(3)]
    B, A = [torch.randn(5, 4) for _ in range(3)], [torch.randn(4, 6) for _ in range(3)]
    idx = [torch.tensor([0]) for _ in range(3)]
    match = {"meta W": r"one device.*W\[2\] on meta", "3-D W": r"layer 2: expected W \(m x n\)",
             "B rows": r"layer 2: expected W \(m x n\)", "float idx": r"idx\[2\] must be an integer tensor",
             "int8 B": r"B\[2\] must have dtype"}[bad]
    if bad == "meta W":
        W[2] = W[2].to("meta")
    elif bad == "3-D W":
        W[2] = torch.randn(1, 5, 6)
    elif bad == "B rows":
        B[2] = torch.randn(4, 4)
    elif bad == "float idx":
        idx[2] = torch.tensor([0.0])
    else:
        B[2] = B[2].to(torch.int8)
    before = [t.clone() for t in W[:2] + B[:2]]
    with pytest.raises((ValueError, TypeError), match=match):
        ops.fuse_pairs_(W, B, A, idx)
    assert all(torch.equal(x, y) for x, y in zip(W[:2] + B[:2], before))



@pytest.mark.parametrize("idx,match", [
    ([[0], [False, True]], r"idx\[1\] must hold integers \(pair numbers\), got bool \(a boolean mask: pass its "
                           r"indices, mask.nonzero\(\).flatten\(\)\)"),
    ([[0], [1.7]], r"idx\[1\] must hold integers \(pair numbers\), got float32"),
    ([[0], np.array([1.0])], r"idx\[1\] must hold integers \(pair numbers\), got float64"),
    ([[0], np.array([True, False])], r"idx\[1\] must hold integers.*got bool \(a boolean mask"),
], ids=["bools", "floats", "numpy-floats", "numpy-bools"])
def test_recompose_idx_lists_of_bools_or_floats_are_refused(idx, match):
    """A per-layer idx given as a list or numpy array was cast to int64 before the integer check: the mask
    [False, True] fused pairs 0 and 1, and [1.7] fused pair 1, where the same values as a tensor were refused
    (edge-case review). Nothing is written."""
    W, B, A = [torch.randn(5, 6) for _ in range(2)], [torch.randn(5, 3) for _ in range(2)], [torch.randn(3, 6)
                                                                                            for _ in range(2)]
    before = [t.clone() for t in W + B]
    with pytest.raises(TypeError, match=match):
        ops.fuse_pairs_(W, B, A, idx)
    with pytest.raises(TypeError, match=match):
        ops.reinit_pairs_(W, B, A, idx, [torch.randn(5, len(i)) for i in idx], [torch.randn(len(i), 6) for i in idx])
    assert all(torch.equal(x, y) for x, y in zip(W + B, before))


@pytest.mark.parametrize("idx,dtype", [([True, False, True], "bool"), ([0.0, 2.0], "float32"),
                                       ((np.float64(1.0),), "float64")])
def test_recompose_one_layers_idx_of_bools_or_floats_is_refused(idx, dtype):
    """One layer's idx as a plain list of bools or floats was read as one index list per layer ("idx has 3
    layers but W has 1")."""
    W, B, A = torch.randn(5, 6), torch.randn(5, 3), torch.randn(3, 6)
    W0 = W.clone()
    with pytest.raises(TypeError, match=rf"idx\[0\] must hold integers \(pair numbers\), got {dtype}"):
        ops.fuse_pairs_(W, B, A, idx)
    assert torch.equal(W, W0)
    ops.fuse_pairs_(W, B, A, [np.int64(2), 0])   # integers of any kind, an empty list too
    ops.fuse_pairs_(W, B, A, [])
    assert not B[:, [0, 2]].any() and B[:, 1].all()


@pytest.mark.parametrize("call", [
    lambda s: ops.project(f32(6, 2), f32(4, 3), f32(6, 5), f32(5, 4), s),
    lambda s: ops.project_perturbed(f32(6, 2), f32(4, 3), f32(6, 5), f32(5, 4), s, eps=0.1, seed=0),
    lambda s: ops.fuse_pairs_(f32(6, 4), f32(6, 2), f32(2, 4), torch.tensor([0]), s),
], ids=["project", "project_perturbed", "fuse_pairs_"])
@pytest.mark.parametrize("scaling,error,match", [
    (float("nan"), ValueError, "scaling must be finite, got nan"), (float("inf"), ValueError, "must be finite"),
    ("2", TypeError, "scaling must be a number, got str '2'"), (True, TypeError, "scaling must be a number")])
def test_scaling_must_be_a_finite_number(call, scaling, error, match):
    """project blamed a NaN/Inf scaling on its tensors ("U, V, B or A contains NaN or Inf"), and strings
    passed as numbers through float() (edge-case review)."""
    with pytest.raises(error, match=match):
        call(scaling)


def test_numbers_and_indices_in_the_forms_numpy_and_torch_give_them():
    """What the stricter checks must still take: per-layer scalings as a numpy array, a one-element tensor or numpy
    array as one scaling, idx as numpy arrays of any integer dtype, a 0-dim tensor as a size."""
    W, B, A = [torch.randn(5, 6) for _ in range(2)], [torch.randn(5, 3) for _ in range(2)], [torch.randn(3, 6)
                                                                                            for _ in range(2)]
    W0 = [w.clone() for w in W]
    ops.fuse_pairs_(W, [b.clone() for b in B], A, [np.array([0], dtype=np.uint8), np.array([2], dtype=np.int16)],
                    np.array([0.5, 2.0]))
    for w, w0, b, a, (j, s) in zip(W, W0, B, A, ((0, 0.5), (2, 2.0))):
        torch.testing.assert_close(w, w0 + s * b[:, j:j + 1] @ a[j:j + 1])
    U, V, Bp, Ap = f32(6, 2), f32(4, 3), f32(6, 5), f32(5, 4)
    want = ops.project(U, V, Bp, Ap, 2.0)
    for s in (torch.tensor([2.0]), np.array(2.0), np.float32(2.0), torch.tensor(2)):
        assert torch.equal(ops.project(U, V, Bp, Ap, s), want)
    assert ops.philox_normal((torch.tensor(3), 2), 0).shape == (3, 2)


def test_betas_must_be_numbers():
    A, B = [f32(3, 7)], [f32(5, 3)]
    for kw in ({"beta1": "0.5"}, {"beta2": float("nan")}):
        with pytest.raises((TypeError, ValueError), match=f"{next(iter(kw))} must be"):
            ops.pair_importance(A, B, [f32(3, 7)], [f32(5, 3)], *ops.importance_state(A, B), **kw)


def test_a_result_that_overflows_is_named_as_such():
    big = torch.full((6, 4), 1e20)
    message = r"project: the result is not finite: .*or the result or an intermediate product \(U\^T B, A V\) overflows"
    with pytest.raises(ValueError, match=message):
        ops.project(f32(6, 2), f32(5, 3), big, torch.full((4, 5), 1e20))
    with pytest.raises(ValueError, match=message):   # U^T B overflows, the result would not (~1e20)
        ops.project(torch.randn(5, 2) * 1e25, torch.randn(4, 3), torch.randn(5, 2) * 1e25, torch.randn(2, 4) * 1e-30)


def test_sparse_tensors_are_refused_by_name():
    """Sparse tensors reached the dispatcher ("Could not run 'subspace_ext::rsvd' with arguments from the
    'SparseCPU' backend"; pair_importance: "unsupported memory format option Contiguous")."""
    sparse = f32(10, 6).to_sparse()
    with pytest.raises(TypeError, match=r"A must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        ops.rsvd(sparse, 2)
    A, B = [f32(6, 10)], [f32(5, 6)]
    with pytest.raises(TypeError, match=r"grad_A\[0\] must be a dense \(strided\) tensor"):
        ops.pair_importance(A, B, [sparse.t().coalesce()], [f32(5, 6)], *ops.importance_state(A, B))


def test_numpy_integer_sizes_are_ints_and_rank_is_checked_on_an_empty_list():
    U, S, V = ops.rsvd(f32(8, 5), np.int64(2), oversample=np.int32(3), niter=np.int64(1))
    assert U.shape == (8, 2)
    assert ops.factored_svd(f32(8, 3), f32(3, 5), np.int64(2))[1].shape == (2,)
    assert ops.rsvd_many([f32(8, 5)], np.int64(2))[0][0].shape == (8, 2)
    with pytest.raises(TypeError, match="rank must be an int, got str"):
        ops.rsvd_many([], "x")
    assert ops.philox_normal(np.int64(3), 0).shape == (3,)
    with pytest.raises(ValueError, match=r"shape \(4, -1\): a size must be >= 0, got -1"):
        ops.philox_normal((4, -1), 0)


def test_solar_decode_names_a_non_finite_basis():
    """A NaN in U was reported as "factored_svd: B contains NaN or Inf" (an argument the caller never passed)."""
    U, V = ops.solar_basis(torch.randn(6, 4), 1)
    U[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"solar_decode: the bases U and V contain NaN or Inf"):
        ops.solar_decode(U, V, torch.randn(3), torch.tensor([0, 1, 5]), 2, 1.0, 1)

def test_exception_probe_sees_each_error_arrive_as_a_python_exception():
    # bench/probe_exceptions.py (run by bench/gpu_run.sh) forks a child per case; here, the CPU cases.
    probe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "probe_exceptions.py")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, probe], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {l.split()[0]: l for l in out.stdout.splitlines() if l and not l.startswith(" ")}
    assert "ok: RuntimeError" in lines["torch-cpu"]
    assert "ok: ValueError: fuse_pairs_: layer 0's W and layer 1's W share memory" in lines["ours-cpu"]


def test_no_raises_mode_skips_only_the_tests_that_expect_an_exception():
    # gpu_run.sh sets SUBSPACE_EXT_NO_RAISES=1 where the probe saw a C++ exception crash the process.
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SUBSPACE_EXT_NO_RAISES="1")
    env.pop("SUBSPACE_EXT_TEST_TRACE", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          os.path.join(here, "test_importance.py"), "-k",
                          "cpu and (recompose_refuses_tensors_written_twice or fuse_pairs_transposed_and_strided_w)"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=os.path.dirname(here))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed, 7 skipped" in out.stdout and "a C++ exception crashes the process" in out.stdout, out.stdout


# ---------------------------------------------------------------------------------------------
# peft adapter configs a reader must refuse with a clear FormatError

@pytest.mark.parametrize("config,rank,match", [
    ({"alpha_pattern": {"[": 3}}, 2, r"alpha_pattern key '\[' is not a regular expression"),
    ({"alpha_pattern": [1]}, 2, "alpha_pattern must be an object"),
    ({"alpha_pattern": {"q": "x"}}, 2, r"alpha_pattern\['q'\] must be a number"),
    ({"lora_alpha": 0}, 2, r"scaling \(from lora_alpha\) is 0.0; it must be a finite number > 0"),
    ({"lora_alpha": -8}, 2, "must be a finite number > 0"),
    ({}, 0, "rank 0"),
    ({"r": "four"}, 2, "adapter_config.json: r must be a number, got 'four'"),
])
def test_adapter_config_errors(config, rank, match):
    from subspace_ext.io import FormatError, PeftAdapter
    tensors = {"base_model.model.q.lora_A.weight": torch.randn(rank, 6),
               "base_model.model.q.lora_B.weight": torch.randn(5, rank)}
    ad = PeftAdapter({"peft_type": "LORA", "r": rank, "lora_alpha": 8, **config}, tensors, source="some/adapter")
    with pytest.raises(FormatError, match=match) as e:
        ad.updates()
    assert str(e.value).startswith("some/adapter: ")  # names the folder


def test_eps_as_numpy_float_or_0_dim_tensor_is_a_number():
    """np.float32 (not a float subclass) and a 0-dim tensor were refused as 'eps must be a finite number'."""
    np = pytest.importorskip("numpy")
    U = f32(9, 3)
    want = ops.perturbed_basis(U, 0.25, 4)
    for eps in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)):
        assert torch.equal(ops.perturbed_basis(U, eps, 4), want), type(eps)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got str '0.1'"):
        ops.perturbed_basis(U, "0.1", 4)


def test_one_layers_idx_as_numpy_ints_or_0_dim_tensors():
    """A list like list(np.argsort(s)[:2]) is one layer's indices (it was read as two layers), and so is a numpy
    array (np.argsort(s)[:2] itself was refused: "idx must be a tensor or a list of tensors, got ndarray")."""
    np = pytest.importorskip("numpy")
    W, B, A = f32(6, 5), f32(6, 3), f32(3, 5)
    want = W.clone()
    ops.fuse_pairs_(want, B.clone(), A, [0, 2], 0.5)
    for idx in ([np.int64(0), np.int64(2)], [torch.tensor(0), torch.tensor(2)], (np.int32(0), 2),
                np.array([0, 2]), np.array([0, 2], dtype=np.int32), np.array([0, 2], dtype=np.uint8)):
        got = W.clone()
        ops.fuse_pairs_(got, B.clone(), A, idx, 0.5)
        assert torch.equal(got, want), idx
    reversed_view = np.array([2, 0])[::-1]   # negative strides (np.argsort(s)[::-1][:2]): torch.as_tensor refuses
    read_only = np.array([0, 2])
    read_only.flags.writeable = False
    for idx in (reversed_view, read_only, [reversed_view]):
        got = W.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops.fuse_pairs_(got, B.clone(), A, idx, 0.5)
        assert torch.equal(got, want), idx
    got, Bn, An = W.clone(), B.clone(), A.clone()
    ops.reinit_pairs_(got, Bn, An, np.array([2]), torch.ones(6, 1), torch.ones(1, 5), 0.5)
    assert torch.equal(Bn[:, 2], torch.ones(6)) and torch.equal(Bn[:, :2], B[:, :2])
    with pytest.raises(TypeError, match=r"idx\[0\] must hold integers \(pair numbers\), got float64"):
        ops.fuse_pairs_(W.clone(), B.clone(), A, np.array([0.0, 2.0]))


@pytest.mark.parametrize("call", [
    lambda: ops.project(f32(2, 6, 2), f32(3, 5, 2), f32(6, 3), f32(3, 5)),
    lambda: ops.project_dense(f32(2, 6, 2), f32(5, 2), f32(3, 6, 5)),
    lambda: ops.reconstruct(f32(3, 6, 2), f32(2, 2, 4), f32(5, 4)),
], ids=["project", "project_dense", "reconstruct"])
def test_batch_dimensions_that_do_not_broadcast_are_named(call):
    with pytest.raises(ValueError, match=r"batch dimensions \(all but the last two\) do not broadcast: U \((2|3), 6, 2\)"):
        call()
