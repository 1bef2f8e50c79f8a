// CPU kernels of the rsvd family: randomized truncated SVD (single, batched, many shapes) and the
// SVD of a product given by its factors.
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <map>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "subspace_ext/gram_orth.h"
#include "subspace_ext/small_svd.h"
#include "utils.h"

namespace subspace_ext {
namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The shape of a per-matrix result of A (..., m, n): A's leading dimensions, then `tail`.
std::vector<int64_t> batch_shape(const at::Tensor& A, std::initializer_list<int64_t> tail) {
  auto s = A.sizes().slice(0, A.dim() - 2).vec();
  s.insert(s.end(), tail);
  return s;
}

// The sketch's column count min(k + p, m, n), for k <= min(m, n) (checked) and any p >= 0: k + p
// itself may overflow (oversample = 2^63 - 1).
int64_t sketch_cols(int64_t k, int64_t p, int64_t m, int64_t n) { return k + std::min(p, std::min(m, n) - k); }

// Halko-Martinsson-Tropp randomized SVD of one matrix A (m x n): Gaussian test matrix from
// Philox (seed, stream 0), l = min(k + p, m, n) columns, `niter` power iterations with
// re-orthonormalisation after every product, then the SVD of the small projected matrix.
// The GEMMs with A run in A's dtype (a bfloat16/float16 A in a float32 copy made here, one matrix
// at a time); the thin QRs and the small SVD in float64.
// `what` names the matrix in error messages ("rsvd: A", "rsvd_many: mats[3]").
SVDResult rsvd_one(const at::Tensor& A_in, int64_t k, int64_t p, int64_t niter, int64_t seed,
                   const std::string& what) {
  at::Tensor A = A_in.to(compute_dtype(A_in));
  const int64_t m = A.size(0), n = A.size(1);
  const int64_t l = sketch_cols(k, p, m, n);
  const auto dt = A.scalar_type();
  at::Tensor omega = at::empty({n, l}, A.options().memory_format(at::MemoryFormat::Contiguous));
  philox_normal_fill(omega, seed, 0);
  at::Tensor Y = at::mm(A, omega);
  // Any NaN/Inf in A reaches Y (m x l): a cheap check instead of a pass over A; a matrix out of
  // the compute dtype's comfortable range is decomposed as 2^e A (range_exponents).
  const std::vector<int64_t> e = range_exponents(A, Y, what);
  if (any_scaled(e)) {
    A = scale_pow2(A, e, 1, false);
    Y = at::mm(A, omega);
  }
  // Inside the subspace iteration one Cholesky-QR pass keeps the basis well conditioned; the
  // basis that leaves the loop gets the full two passes.
  at::Tensor Q = orthonormalize_columns(Y, niter > 0 ? 1 : 2).first;
  for (int64_t it = 0; it < niter; ++it) {
    const at::Tensor Z = orthonormalize_columns(at::mm(A.t(), Q), 1).first;
    Q = orthonormalize_columns(at::mm(A, Z), it + 1 < niter ? 1 : 2).first;
  }
  // B = Q^T A; with B^T = Qb Rb, A ~ Q Rb^T Qb^T.
  auto [Qb, Rb] = orthonormalize_columns(at::mm(A.t(), Q));
  SVDResult r = svd_of_core(Q, Rb.t(), Qb, k, dt);
  if (any_scaled(e)) r.S = scale_pow2(r.S, e, -1, false);
  return r;
}

void check_rsvd_args(const at::Tensor& A, int64_t k, int64_t p, int64_t niter, const char* op) {
  check_weight(A, op, "A");
  TORCH_CHECK_VALUE(A.dim() >= 2, op, ": A must have at least 2 dimensions, got ", A.dim());
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min(A.size(-2), A.size(-1)), op, ": rank must be in [1, ",
              std::min(A.size(-2), A.size(-1)), "], got ", k);
  TORCH_CHECK_VALUE(p >= 0 && niter >= 0, op, ": oversample and niter must be >= 0");
}

Triple rsvd_cpu(const at::Tensor& A, int64_t k, int64_t p, int64_t niter, int64_t seed) {
  check_rsvd_args(A, k, p, niter, "rsvd");
  const int64_t m = A.size(-2), n = A.size(-1);
  const at::Tensor flat = A.reshape({-1, m, n});
  const int64_t batch = flat.size(0);
  std::vector<SVDResult> out(batch);
  parallel_tasks(batch, {}, [&](int64_t b) { out[b] = rsvd_one(flat[b], k, p, niter, seed, "rsvd: A"); });
  auto stack = [&](auto get, std::initializer_list<int64_t> tail) {
    std::vector<at::Tensor> parts;
    parts.reserve(batch);
    for (auto& r : out) parts.push_back(get(r));
    const auto shape = batch_shape(A, tail);
    return batch ? at::stack(parts).reshape(shape) : at::empty(shape, A.options().dtype(compute_dtype(A)));
  };
  return {stack([](SVDResult& r) { return r.U; }, {m, k}),
          stack([](SVDResult& r) { return r.S; }, {k}),
          stack([](SVDResult& r) { return r.V; }, {n, k})};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
rsvd_many_cpu(at::TensorList mats, int64_t k, int64_t p, int64_t niter, int64_t seed) {
  const int64_t count = static_cast<int64_t>(mats.size());
  for (const auto& A : mats) {
    check_rsvd_args(A, k, p, niter, "rsvd_many");
    TORCH_CHECK_VALUE(A.dim() == 2, "rsvd_many: every matrix must be 2-D, got ", A.sizes());
  }
  // Largest first, so the dynamic schedule ends balanced.
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return mats[a].numel() > mats[b].numel();
  });
  std::vector<SVDResult> out(count);
  parallel_tasks(count, order, [&](int64_t i) {
    out[i] = rsvd_one(mats[i], k, p, niter, seed, "rsvd_many: mats[" + std::to_string(i) + "]");
  });
  std::vector<at::Tensor> U, S, V;
  for (auto& r : out) {
    U.push_back(r.U);
    S.push_back(r.S);
    V.push_back(r.V);
  }
  return {U, S, V};
}

// The _small_svd op: checked arguments, (..., p, q) batches, results in A's dtype.
Triple small_svd_op(const at::Tensor& A) {
  check_float(A, "small_svd", "A");
  TORCH_CHECK_VALUE(A.dim() >= 2, "small_svd: A must have at least 2 dimensions, got ", A.dim());
  TORCH_CHECK_VALUE(A.size(-1) <= 4096 && A.size(-2) <= 4096, "small_svd: matrices of at most 4096 x 4096 (",
                    "Jacobi is meant for small ones; use torch.linalg.svd), got ", A.sizes());
  TORCH_CHECK_VALUE(A.isfinite().all().item<bool>(), "small_svd: A contains NaN or Inf");
  const int64_t p = A.size(-2), q = A.size(-1), k = std::min(p, q);
  const int64_t batch = c10::multiply_integers(A.sizes().slice(0, A.dim() - 2));
  const SVDResult r = small_svd_batched(A.reshape({batch, p, q}));
  const auto dt = A.scalar_type();
  return {r.U.to(dt).contiguous().reshape(batch_shape(A, {p, k})),
          r.S.to(dt).contiguous().reshape(batch_shape(A, {k})),
          r.V.to(dt).contiguous().reshape(batch_shape(A, {q, k}))};
}

// T (b x q x q, upper triangular, float64) with Y[b] T[b] orthonormal columns from each Gram matrix
// G[b] = Y[b]^T Y[b] (b x q x q, any float dtype and strides), and complete (b, bool): no column of
// Y[b] was dropped as dependent (csrc/include/subspace_ext/gram_orth.h: Cholesky with dropped
// pivots, the same bits on CPU and CUDA). One launch for the batch on CUDA; no NaN/Inf check (a NaN
// in G's upper triangle always drops a column, so it clears the flag), no host sync.
std::pair<at::Tensor, at::Tensor> gram_orth_batched(const at::Tensor& G) {
  const int64_t b = G.size(0), q = G.size(1);
  TORCH_CHECK_VALUE(b < (int64_t{1} << 31), "gram_orth: at most 2^31 - 1 matrices in one batch");
  const auto opt = G.options().dtype(at::kDouble);
  at::Tensor g = at::empty({b, q, q}, opt);
  g.copy_(G.mT());  // column-major work copy (G symmetric: only its upper triangle is read)
  at::Tensor d = at::empty({b, q}, opt), t = at::empty({b, q, q}, opt);
  at::Tensor complete = at::empty({b}, opt.dtype(at::kBool));
  if (b > 0 && q > 0) {
#ifdef SUBSPACE_EXT_WITH_CUDA
    if (g.is_cuda())
      gram_orth_into_cuda(g, d, t, complete);
    else
#endif
    {
      TORCH_CHECK_VALUE(g.is_cpu(), "gram_orth: unsupported device ", g.device());
      double *pg = g.data_ptr<double>(), *pd = d.data_ptr<double>(), *pt = t.data_ptr<double>();
      bool* pc = complete.data_ptr<bool>();
      parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          pc[i] = gram_orth::transform(pg + i * q * q, pd + i * q, pt + i * q * q, static_cast<int>(q), 0, 1, 1,
                                       [] {});
      });
    }
  } else {
    complete.fill_(true);
  }
  return {t.mT(), complete};
}

// The _gram_orth op: checked arguments, (..., q, q) batches, T in G's dtype.
std::tuple<at::Tensor, at::Tensor> gram_orth_op(const at::Tensor& G) {
  check_float(G, "_gram_orth", "G");
  TORCH_CHECK_VALUE(G.dim() >= 2 && G.size(-1) == G.size(-2),
                    "_gram_orth: G must be (..., q, q) Gram matrices, got ", G.sizes());
  TORCH_CHECK_VALUE(G.size(-1) <= 4096, "_gram_orth: matrices of at most 4096 x 4096, got ", G.sizes());
  TORCH_CHECK_VALUE(G.isfinite().all().item<bool>(), "_gram_orth: G contains NaN or Inf");
  const int64_t q = G.size(-1);
  const auto lead = G.sizes().slice(0, G.dim() - 2);
  auto [T, complete] = gram_orth_batched(G.reshape({c10::multiply_integers(lead), q, q}));
  return {T.to(G.scalar_type()).contiguous().reshape(G.sizes()), complete.reshape(lead)};
}

// Orthonormal basis of the columns of each Y[b] (Householder QR in float64, batched; sign-free:
// the final factors get canonical signs). On CUDA ATen runs it as one cuSOLVER geqrf + orgqr per
// matrix (tall matrices take no batched path), so rsvd_batched keeps it for rank-deficient inputs.
at::Tensor orth_batched(const at::Tensor& Y) {
  at::Tensor Q;
  run_lapack(Y, [&] { Q = std::get<0>(at::linalg_qr(Y.to(at::kDouble), "reduced")); });
  return Q.to(Y.scalar_type());
}

// Orthonormal columns spanning each Y[b] (b x p x l) from its Gram matrix G = Y^T Y (float64):
// Q = Y T with T from gram_orth_batched (Cholesky of G, T = R^-1), `passes` times (a second pass
// restores orthonormality to rounding: Cholesky-QR2). Batched GEMMs and one small launch per pass,
// no host sync and no cuSOLVER loop over the batch. A column of Y in the span of the ones before it
// (pivot <= l * eps * max diag G) becomes a zero column: harmless inside the power iteration.
// `complete` (when given) receives a device bool: no column of any Y[b] was dropped, i.e. Q has l
// orthonormal columns.
at::Tensor orth_gram(const at::Tensor& Y, int passes, at::Tensor* complete = nullptr) {
  at::Tensor Q = Y;
  for (int pass = 0; pass < passes; ++pass) {
    const at::Tensor Yd = Q.to(at::kDouble);
    auto [T, kept] = gram_orth_batched(at::matmul(Yd.mT(), Yd));
    if (complete != nullptr) *complete = pass == 0 ? kept.all() : at::logical_and(*complete, kept.all());
    Q = at::matmul(Q, T.to(Y.scalar_type()));
  }
  return Q;
}

// rsvd_one's algorithm for a batch of equal-shape matrices A (b x m x n): the same Philox test
// matrix for every b, batched GEMMs, Gram-based orthonormalisation (orth_gram) for every basis, one
// batched SVD of the l x l cores. The two bases that leave the iteration must keep all l columns:
// where the Gram passes dropped a direction (a rank-deficient A) the group is redone with
// Householder QR for those two bases, which completes them. Host syncs: the NaN/Inf and range check
// of A @ Omega (range_exponents: a matrix out of range is decomposed scaled by a power of two) and
// the one completeness flag of both bases. A bfloat16/float16 A is computed in a float32 copy.
Triple rsvd_batched(const at::Tensor& A_in, int64_t k, int64_t p, int64_t niter, int64_t seed) {
  check_rsvd_args(A_in, k, p, niter, "_rsvd_batched");
  TORCH_CHECK_VALUE(A_in.dim() == 3, "_rsvd_batched: A must be b x m x n, got ", A_in.sizes());
  at::Tensor A = A_in.to(compute_dtype(A_in));
  const int64_t m = A.size(1), n = A.size(2), l = sketch_cols(k, p, m, n);
  const auto dt = A.scalar_type();
  at::Tensor omega = at::empty({n, l}, A.options().memory_format(at::MemoryFormat::Contiguous));
  philox_normal_fill(omega, seed, 0);
  at::Tensor Y = at::matmul(A, omega);
  const std::vector<int64_t> e = range_exponents(A, Y, "rsvd: A");  // host sync 1 (NaN/Inf, range)
  if (any_scaled(e)) {
    A = scale_pow2(A, e, 1, true);
    Y = at::matmul(A, omega);
  }
  // The last product of the iteration (Y itself when niter = 0), still to be orthonormalised.
  // Inside the iteration one pass per basis keeps it well conditioned, as in rsvd_one: only its span
  // matters there (4 of the 12 orth_gram passes of niter = 2 saved); the bases leaving it get two.
  at::Tensor last = Y;
  if (niter > 0) {
    at::Tensor Q = orth_gram(Y, 1);
    for (int64_t it = 0; it < niter; ++it) {
      last = at::matmul(A, orth_gram(at::matmul(A.mT(), Q), 1));
      if (it + 1 < niter) Q = orth_gram(last, 1);
    }
  }
  // A ~ Q Q^T A = Q Bt^T with Bt = A^T Q = Qb Rb, so A ~ Q Rb^T Qb^T.
  at::Tensor complete_q, complete_b;
  at::Tensor Q = orth_gram(last, 2, &complete_q);
  at::Tensor Bt = at::matmul(A.mT(), Q);
  at::Tensor Qb = orth_gram(Bt, 2, &complete_b);
  if (!at::logical_and(complete_q, complete_b).item<bool>()) {  // host sync 2
    Q = orth_batched(last);
    Bt = at::matmul(A.mT(), Q);
    Qb = orth_batched(Bt);
  }
  const at::Tensor Rb = at::matmul(Qb.mT().to(at::kDouble), Bt.to(at::kDouble));  // Bt = Qb Rb
  const SVDResult core = small_svd_batched(Rb.mT());  // all l x l cores in one launch
  at::Tensor U = at::matmul(Q, core.U.narrow(-1, 0, k).to(dt));
  at::Tensor V = at::matmul(Qb, core.V.narrow(-1, 0, k).to(dt));
  at::Tensor S = core.S.narrow(-1, 0, k).to(dt);
  if (any_scaled(e)) S = scale_pow2(S, e, -1, true);
  canonicalize_signs_(U, V);
  return {U.contiguous(), S.contiguous(), V.contiguous()};
}

Triple factored_svd_cpu(const at::Tensor& B, const at::Tensor& A, int64_t rank) {
  auto r = factored_svd(B, A, rank);
  return {r.U, r.S, r.V};
}

}  // namespace

SVDResult small_svd_batched(const at::Tensor& A) {
  const int64_t b = A.size(0), p = A.size(1), q = A.size(2);
  if (p < q) {  // A^T = V S U^T
    const SVDResult t = small_svd_batched(A.mT());
    return {t.V, t.S, t.U};
  }
  TORCH_CHECK_VALUE(b < (int64_t{1} << 31), "small SVD: at most 2^31 - 1 matrices in one batch");
  const auto opt = A.options().dtype(at::kDouble);
  // Column-major work copies: row j of a[b] is column j of A[b].
  at::Tensor a = at::empty({b, q, p}, opt);
  a.copy_(A.mT());
  at::Tensor v = at::empty({b, q, q}, opt), norms = at::empty({b, q}, opt);
  at::Tensor u = at::empty({b, q, p}, opt), s = at::empty({b, q}, opt), vout = at::empty({b, q, q}, opt);
  if (b > 0 && q > 0) {
#ifdef SUBSPACE_EXT_WITH_CUDA
    if (a.is_cuda())
      small_svd_into_cuda(a, v, norms, u, s, vout);
    else
#endif
    {
      TORCH_CHECK_VALUE(a.is_cpu(), "small SVD: unsupported device ", a.device());
      double *pa = a.data_ptr<double>(), *pv = v.data_ptr<double>(), *pn = norms.data_ptr<double>();
      double *pu = u.data_ptr<double>(), *ps = s.data_ptr<double>(), *pvo = vout.data_ptr<double>();
      parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          int e = 0;
          small_svd::svd(pa + i * p * q, pv + i * q * q, pn + i * q, pu + i * p * q, ps + i * q, pvo + i * q * q,
                         static_cast<int>(p), static_cast<int>(q), 0, 1, 0, 1, small_svd::SerialGroup{}, e, [] {},
                         [](bool x) { return x; });
        }
      });
    }
  }
  return {u.mT(), s, vout.mT()};
}

// SVD of B A (B: m x r, A: r x n) without forming it: B = Qb Rb, A^T = Qa Ra,
// B A = Qb (Rb Ra^T) Qa^T, then the SVD of the small core. rank < 0: min(m, n, r). Half-precision
// factors are computed in float32 (compute_dtype), as rsvd's weights.
SVDResult factored_svd(const at::Tensor& B, const at::Tensor& A, int64_t rank) {
  check_weight(B, "factored_svd", "B");
  check_weight(A, "factored_svd", "A");
  TORCH_CHECK_VALUE(B.dim() == 2 && A.dim() == 2 && B.size(1) == A.size(0),
              "factored_svd: expected B (m x r) and A (r x n), got ", B.sizes(), " and ", A.sizes());
  const int64_t full = std::min({B.size(0), A.size(1), B.size(1)});
  const int64_t k = rank < 0 ? full : rank;
  TORCH_CHECK_VALUE(k >= 1 && k <= full, "factored_svd: rank must be in [1, ", full, "], got ", rank);
  const auto dt = at::promote_types(compute_dtype(B), compute_dtype(A));
  // Each factor's largest magnitude: the NaN/Inf check, and factors out of dt's comfortable range
  // are scaled by powers of two (as rsvd's matrices, range_exponents), S scaled back.
  const at::Tensor Bd = B.to(dt), Ad = A.to(dt);
  const int64_t e = range_exponents(Bd, Bd, "factored_svd: B")[0], f = range_exponents(Ad, Ad, "factored_svd: A")[0];
  auto [Qb, Rb] = orthonormalize_columns(e ? scale_pow2(Bd, {e}, 1, false) : Bd);
  auto [Qa, Ra] = orthonormalize_columns((f ? scale_pow2(Ad, {f}, 1, false) : Ad).t());
  SVDResult r = svd_of_core(Qb, at::mm(Rb, Ra.t()), Qa, k, dt);
  if (e + f != 0) r.S = scale_pow2(r.S, {e + f}, -1, false);
  return r;
}

TORCH_LIBRARY_IMPL(subspace_ext, CPU, m) {
  m.impl("rsvd", &rsvd_cpu);
  m.impl("rsvd_many", &rsvd_many_cpu);
  m.impl("factored_svd", &factored_svd_cpu);
  m.impl("_rsvd_batched", &rsvd_batched);
  m.impl("_small_svd", &small_svd_op);
  m.impl("_gram_orth", &gram_orth_op);
}

#ifdef SUBSPACE_EXT_WITH_CUDA
namespace {

// rsvd on CUDA: (..., m, n) as one batch.
Triple rsvd_cuda(const at::Tensor& A, int64_t k, int64_t p, int64_t niter, int64_t seed) {
  check_rsvd_args(A, k, p, niter, "rsvd");
  const int64_t m = A.size(-2), n = A.size(-1);
  // Contiguous, as rsvd_many's groups are: the same GEMM layouts for both ops.
  auto [U, S, V] = rsvd_batched(A.reshape({-1, m, n}).contiguous(), k, p, niter, seed);
  return {U.reshape(batch_shape(A, {m, k})), S.reshape(batch_shape(A, {k})), V.reshape(batch_shape(A, {n, k}))};
}

// At most this many bytes of matrices go into one batched rsvd: a group is copied into its compute dtype, and
// a 7B model's 64 gate/up weights (11008 x 4096) took 10.75 GiB of float32 at once (plus the batch's
// sketches); matrices that large fill the GPU in batches of a few anyway. Each chunk uses the same Omega.
constexpr int64_t kBatchBytes = int64_t(1) << 30;

// rsvd_many on CUDA: one batched rsvd per distinct (shape, compute dtype) (MiniLM: 3 groups for
// 37 weights), in chunks of at most kBatchBytes; each chunk is one copy of its matrices in the compute
// dtype (bfloat16/float16 weights become float32 there, no second copy).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
rsvd_many_cuda(at::TensorList mats, int64_t k, int64_t p, int64_t niter, int64_t seed) {
  for (const auto& A : mats) {
    check_rsvd_args(A, k, p, niter, "rsvd_many");
    TORCH_CHECK_VALUE(A.dim() == 2, "rsvd_many: every matrix must be 2-D, got ", A.sizes());
  }
  // Key: shape, compute dtype and device (a list may span devices; each group stays on its own).
  std::map<std::tuple<int64_t, int64_t, int, std::string>, std::vector<size_t>> groups;
  for (size_t i = 0; i < mats.size(); ++i)
    groups[{mats[i].size(0), mats[i].size(1), static_cast<int>(compute_dtype(mats[i])), mats[i].device().str()}]
        .push_back(i);
  std::vector<at::Tensor> U(mats.size()), S(mats.size()), V(mats.size());
  for (const auto& [key, all] : groups) {
    const at::Tensor& first = mats[all[0]];
    const auto dtype = compute_dtype(first);
    const int64_t bytes = std::max<int64_t>(1, first.size(0) * first.size(1) * int64_t(c10::elementSize(dtype)));
    const size_t per = static_cast<size_t>(std::max<int64_t>(1, kBatchBytes / bytes));
    for (size_t start = 0; start < all.size(); start += per) {
      const std::vector<size_t> members(all.begin() + start, all.begin() + std::min(all.size(), start + per));
      at::Tensor group = at::empty({static_cast<int64_t>(members.size()), first.size(0), first.size(1)},
                                   first.options().dtype(dtype));
      for (size_t j = 0; j < members.size(); ++j) group[j].copy_(mats[members[j]]);
      auto [Ub, Sb, Vb] = rsvd_batched(group, k, p, niter, seed);
      for (size_t j = 0; j < members.size(); ++j) {  // own storage: outputs must not alias (opcheck)
        U[members[j]] = Ub[j].clone();
        S[members[j]] = Sb[j].clone();
        V[members[j]] = Vb[j].clone();
      }
    }
  }
  return {U, S, V};
}

}  // namespace

// CUDA: batched over equal shapes through ATen (cuBLAS batched GEMMs) and our kernels (Philox, the
// Gram-Cholesky transform of every orthonormalisation, the batched small SVD of the cores); two
// host syncs per group (the finite check, the completeness of the two final bases; cuSOLVER QR
// only for rank-deficient groups).
// factored_svd runs the CPU path's composition (Cholesky-QR by cuSOLVER, a scalar sync per pass).
TORCH_LIBRARY_IMPL(subspace_ext, CUDA, m) {
  m.impl("rsvd", &rsvd_cuda);
  m.impl("rsvd_many", &rsvd_many_cuda);
  m.impl("factored_svd", &factored_svd_cpu);
  m.impl("_rsvd_batched", &rsvd_batched);
  m.impl("_small_svd", &small_svd_op);
  m.impl("_gram_orth", &gram_orth_op);
}
#endif


}  // namespace subspace_ext
