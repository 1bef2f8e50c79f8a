"""torch.library.opcheck on every op: schema (incl. mutation annotations), fake kernels vs real
outputs, autograd registration and AOT dispatch."""
import pytest
import torch

import subspace_ext  # noqa: F401  (registers the ops and the fake kernels)
from subspace_ext import ops

_o = torch.ops.subspace_ext


def _cases(device):
    def r(*s, dtype=torch.float32):
        return torch.randn(*s, dtype=dtype, device=device)

    def imp(sdtype=torch.float32, pdtype=torch.float32):
        A = [r(3, 7).to(pdtype), r(1, 4).to(pdtype)]
        B = [r(5, 3).to(pdtype), r(6, 1).to(pdtype)]
        gA = [torch.randn_like(a) for a in A]
        gB = [torch.randn_like(b) for b in B]
        st = [[torch.rand(t.shape, dtype=sdtype, device=device) for t in ts] for ts in (A, B, A, B)]
        scores = [torch.empty(a.shape[0], dtype=sdtype, device=device) for a in A]
        return (A, B, gA, gB, *st, scores, 0.85, 0.9)

    idx = lambda *v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return {
        "philox_uint32_": (_o.philox_uint32_, (torch.empty(3, 5, dtype=torch.int32, device=device), 7, 2)),
        "philox_normal_ f32": (_o.philox_normal_, (torch.empty(11, device=device), 2**40, 1)),
        "philox_normal_ f64": (_o.philox_normal_, (torch.empty(2, 3, dtype=torch.float64, device=device), -5, 0)),
        "philox_normal_icdf_": (_o.philox_normal_icdf_, (torch.empty(3, 7, device=device), -(2**62) - 1, 4)),
        "perturbed_basis": (_o.perturbed_basis, (r(9, 4), 0.1, 3, 1, False)),
        "perturbed_basis orth": (_o.perturbed_basis, (r(2, 9, 4, dtype=torch.float64), 0.1, 3, 1, True)),
        "rsvd": (_o.rsvd, (r(12, 9), 3, 4, 1, 0)),
        "rsvd batched": (_o.rsvd, (r(2, 7, 10, dtype=torch.float64), 2, 2, 1, 5)),
        "_rsvd_batched": (_o._rsvd_batched, (r(3, 12, 9), 3, 4, 1, 0)),
        "_small_svd": (_o._small_svd, (r(3, 9, 7),)),
        "_small_svd wide f64": (_o._small_svd, (r(2, 4, 6, dtype=torch.float64),)),
        "_gram_orth": (_o._gram_orth, ((lambda y: y.mT @ y)(r(3, 11, 6, dtype=torch.float64)),)),
        "_gram_orth f32 2-D": (_o._gram_orth, ((lambda y: y.mT @ y)(r(9, 4)),)),
        "rsvd_many": (_o.rsvd_many, ([r(12, 9), r(5, 8), r(6, 6)], 2, 3, 1, 0)),
        "rsvd bf16": (_o.rsvd, (r(12, 9).bfloat16(), 3, 4, 1, 0)),
        "rsvd_many mixed dtypes": (_o.rsvd_many, ([r(12, 9).half(), r(5, 8, dtype=torch.float64), r(12, 9)], 2, 3, 1, 0)),
        "factored_svd": (_o.factored_svd, (r(10, 4), r(4, 7), 3)),
        "factored_svd mixed": (_o.factored_svd, (r(10, 4), r(4, 7, dtype=torch.float64), 4)),
        "project": (_o.project, (r(10, 3), r(8, 2), r(10, 4), r(4, 8), 0.5)),
        "project batched": (_o.project, (r(2, 10, 3), r(2, 8, 2), r(2, 10, 4), r(2, 4, 8), 1.0)),
        "project_perturbed": (_o.project_perturbed, (r(10, 3), r(8, 2), r(10, 4), r(4, 8), 0.5, 0.1, 3, 0, 1)),
        "project_perturbed f64 eps0": (_o.project_perturbed, (r(130, 5, dtype=torch.float64), r(8, 2, dtype=torch.float64),
                                       r(130, 4, dtype=torch.float64), r(4, 8, dtype=torch.float64), 1.0, 0.0, 0, 2, 3)),
        "project_dense": (_o.project_dense, (r(10, 3), r(8, 5), r(10, 8))),
        "factored_svd bf16": (_o.factored_svd, (r(10, 4).bfloat16(), r(4, 7).bfloat16(), 3)),
        "project bf16 factors": (_o.project, (r(10, 3), r(8, 2), r(10, 4).bfloat16(), r(4, 8).bfloat16(), 0.5)),
        "project_perturbed f16 factors": (_o.project_perturbed, (r(10, 3), r(8, 2), r(10, 4).half(), r(4, 8).half(),
                                          0.5, 0.1, 3, 0, 1)),
        "project_dense f16": (_o.project_dense, (r(10, 3, dtype=torch.float64), r(8, 5, dtype=torch.float64),
                                                 r(10, 8).half())),
        "reconstruct": (_o.reconstruct, (r(10, 3), r(3, 2), r(8, 2))),
        "reconstruct_perturbed": (_o.reconstruct_perturbed, (r(130, 3), r(3, 2), r(8, 2), 0.2, 7, 0, 1)),
        "reconstruct_perturbed f64 eps0": (_o.reconstruct_perturbed, (r(10, 3, dtype=torch.float64),
                                           r(3, 2, dtype=torch.float64), r(8, 2, dtype=torch.float64), 0.0, 7, 0, 1)),
        "pair_importance_": (_o.pair_importance_, imp()),
        "pair_importance_ bf16/f64": (_o.pair_importance_, imp(torch.float64, torch.bfloat16)),
        "fuse_pairs_": (_o.fuse_pairs_, ([r(6, 5), r(4, 9)], [r(6, 3), r(4, 2)], [r(3, 5), r(2, 9)],
                                        [idx(0, 2), idx(1)], [1.0, 0.5])),
        "fuse_pairs_ empty idx": (_o.fuse_pairs_, ([r(6, 5)], [r(6, 3)], [r(3, 5)], [idx()], [2.0])),
        "solar_basis": (_o.solar_basis, (r(9, 6), 3, 1, 0.0)),
        "solar_basis perturbed": (_o.solar_basis, (r(6, 9, dtype=torch.float64), 3, 2, 0.2)),
        "solar_checksum": (_o.solar_checksum, (r(9, 3, dtype=torch.float64), r(6, 2, dtype=torch.float64), 5, 1)),
        "solar_decode": (_o.solar_decode, (*torch.linalg.qr(r(9, 9, dtype=torch.float64))[:1],
                                           torch.linalg.qr(r(6, 6, dtype=torch.float64))[0],
                                           r(5), idx(0, 7, 13, 30, 53), 2, 0.5, 3, 1)),
        "reinit_pairs_": (_o.reinit_pairs_, ([r(6, 5), r(4, 9)], [r(6, 3), r(4, 2)], [r(3, 5), r(2, 9)],
                                            [idx(0, 2), idx(1)], [r(6, 2), r(4, 1)], [r(2, 5), r(1, 9)],
                                            [1.0, 0.5])),
    }


CASE_NAMES = list(_cases("cpu"))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_opcheck(name, device):
    op, args = _cases(device)[name]
    if device == "cuda" and op._qualified_op_name.split("::")[1] not in ops.CUDA_OPS:
        pytest.skip(f"no CUDA implementation yet for {op._qualified_op_name}")
    torch.library.opcheck(op, args)


def test_every_op_is_covered():
    """Every op in the namespace's schema list has at least one opcheck case."""
    covered = {name.split()[0] for name in CASE_NAMES}
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas()
               if s.name.startswith("subspace_ext::")}
    assert schemas, "no subspace_ext ops registered"
    assert schemas <= covered, schemas - covered


def test_fake_kernels_trace_under_fake_mode():
    """Output metadata of the registered fakes for the ops.py entry points (FakeTensorMode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        A = torch.empty(3, 20, 12)
        U, S, V = ops.rsvd(A, 4)
        assert U.shape == (3, 20, 4) and S.shape == (3, 4) and V.shape == (3, 12, 4)
        U, S, V = ops.factored_svd(torch.empty(20, 5), torch.empty(5, 12, dtype=torch.float64), 2)
        assert U.shape == (20, 2) and V.shape == (12, 2) and U.dtype == torch.float64
        C = ops.project(torch.empty(20, 3), torch.empty(12, 2), torch.empty(20, 5), torch.empty(5, 12))
        assert C.shape == (3, 2)


def test_torch_compile_fullgraph_smoke():
    """The ops trace in a compiled graph (no graph breaks) and give the eager result."""
    def f(U, V, B, A):
        return torch.ops.subspace_ext.project(U, V, B, A, 2.0) + 1

    args = (torch.randn(10, 3), torch.randn(8, 2), torch.randn(10, 4), torch.randn(4, 8))
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    out = compiled(*args)
    torch.testing.assert_close(out, f(*args))


@pytest.mark.parametrize("op", ["pair_importance", "fuse_pairs_", "reinit_pairs_"])
def test_list_op_wrappers_compile_without_graph_breaks(op):
    """The subspace_ext.ops wrappers of the multi-layer ops trace whole (fullgraph=True: no graph break in a
    compiled training step) and write what eager does."""
    g = torch.Generator().manual_seed(0)

    def inputs():
        A, B = [torch.randn(4, 10, generator=g)], [torch.randn(8, 4, generator=g)]
        return A, B, [torch.randn(4, 10, generator=g)], [torch.randn(8, 4, generator=g)], torch.randn(8, 10, generator=g)

    def step(A, B, gA, gB, W):
        if op == "pair_importance":
            state = ops.importance_state(A, B)
            return ops.pair_importance(A, B, gA, gB, *state)[0]
        if op == "fuse_pairs_":
            ops.fuse_pairs_(W, B[0], A[0], torch.tensor([1, 3]), 0.5)
        else:
            ops.reinit_pairs_(W, B[0], A[0], torch.tensor([1, 3]), gB[0][:, :2], gA[0][:2], 0.5)
        return W + B[0].sum()

    def flat(args):
        return [t for a in args for t in (a if isinstance(a, list) else [a])]

    args = inputs()
    eager_args = [[t.clone() for t in a] if isinstance(a, list) else a.clone() for a in args]
    torch._dynamo.reset()
    got = torch.compile(step, backend="eager", fullgraph=True)(*args)
    assert torch.equal(got, step(*eager_args))
    assert all(torch.equal(a, b) for a, b in zip(flat(args), flat(eager_args)))


def test_a_new_seed_does_not_recompile():
    """Seeds and streams are SymInts in the schemas: under torch.compile a step whose noise seed changes
    every call compiles twice (the first value, then symbolic; with `int` every new seed recompiled, and
    after 8 the frame fell back to eager), and each call gets its own seed's numbers."""
    from torch._dynamo.utils import counters

    U, W = torch.randn(40, 6), torch.randn(30, 20)

    def step(seed, stream):
        return (ops.perturbed_basis(U, 0.1, seed, stream), ops.philox_normal((7,), seed, stream),
                ops.rsvd(W, 3, seed=seed)[1],
                ops.project_perturbed(U, W.T[:, :4], U[:, :2], W[:2], eps=0.1, seed=seed, stream_u=stream,
                                      stream_v=stream + 1))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="eager")
    for seed in range(12):
        assert all(torch.equal(a, b) for a, b in zip(compiled(seed, seed % 3), step(seed, seed % 3)))
    assert counters["stats"]["unique_graphs"] <= 3


def test_a_changing_float_argument_compiles_whole():
    """scaling and beta become SymFloats under torch.compile when they change between calls (or with dynamic=True);
    the argument checks' finiteness test once used math.isfinite, which does not trace: fullgraph failed, else a
    graph break (review of the checks). Each call gets its own value's result."""
    U, V, B, A = torch.randn(10, 3), torch.randn(8, 2), torch.randn(10, 4), torch.randn(4, 8)
    W, Bf, Af = torch.randn(6, 5), torch.randn(6, 3), torch.randn(3, 5)

    def step(s, beta):
        st = ops.importance_state([Af], [Bf])
        score = ops.pair_importance([Af], [Bf], [Af], [Bf], *st, beta1=beta, beta2=beta)[0]
        return ops.project(U, V, B, A, s), ops.project_perturbed(U, V, B, A, s, eps=0.1, seed=0), score

    torch._dynamo.reset()
    for dynamic in (None, True):
        compiled = torch.compile(step, backend="eager", fullgraph=True, dynamic=dynamic)
        for s, beta in ((2.0, 0.5), (3.0, 0.85), (-1.5, 0.6)):
            for got, want in zip(compiled(s, beta), step(s, beta)):
                torch.testing.assert_close(got, want)


def test_a_symbolic_shape_stays_symbolic():
    """philox_normal(x.shape, ...) under torch.export with a dynamic dimension: the shape check specialised the
    symbolic size to its example value ("Constraints violated")."""
    from torch.export import Dim, export

    class Noise(torch.nn.Module):
        def forward(self, x):
            return ops.philox_normal(x.shape, 0) + x

    program = export(Noise(), (torch.randn(5, 3),), dynamic_shapes={"x": {0: Dim("n", min=2)}})
    x = torch.randn(9, 3)
    assert torch.equal(program.module()(x), ops.philox_normal((9, 3), 0) + x)

