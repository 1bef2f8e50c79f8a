// Batched SVD of small matrices (the l x l cores of rsvd, l = rank + oversample): one-sided
// (Hestenes) Jacobi with the round-robin parallel ordering.
//
// Written once for host and device, like philox.h. One sweep is q' - 1 steps (q' = q rounded up to
// even); a step rotates q'/2 disjoint column pairs, so the pairs of a step can run in any order or
// all at once: the CPU runs them one after the other, the CUDA kernel gives each pair a thread.
// Every number depends only on the input (IEEE +, -, *, /, sqrt, all correctly rounded; no FMA:
// -ffp-contract=off on the host, -fmad=false for nvcc), so CPU and GPU give the same bits.
//
// Work layout: column-major, column j of the p x q matrix at a + j * p (p >= q); V is q x q.
// Result: A V = U diag(S), S descending, U (p x q) and V orthonormal columns.
#pragma once
#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#define SE_SVD_HD __host__ __device__ __forceinline__
#else
#define SE_SVD_HD inline
#endif

namespace subspace_ext {
namespace small_svd {

// Sweeps at most; Jacobi converges quadratically, typically in 6-10 sweeps for l <= 128.
constexpr int kMaxSweeps = 40;

SE_SVD_HD double dot(const double* x, const double* y, int n) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) s = s + x[i] * y[i];
  return s;
}

// Pair `i` (of q'/2) of step `t` (of q' - 1) in the round-robin tournament over q' players:
// player q' - 1 stays, the others rotate; every pair of players meets once per sweep.
SE_SVD_HD void pair_of(int t, int i, int qe, int& a, int& b) {
  int x, y;
  if (i == 0) {
    x = t;
    y = qe - 1;
  } else {
    x = (t + i) % (qe - 1);
    y = (t - i + qe - 1) % (qe - 1);
  }
  a = x < y ? x : y;
  b = x < y ? y : x;
}

// Orthogonalise columns ca < cb of a (p rows) by one plane rotation, applied to v (q rows) too.
// Returns whether the pair was rotated (false: already orthogonal to the tolerance).
SE_SVD_HD bool rotate(double* a, double* v, int p, int q, int ca, int cb) {
  double* x = a + static_cast<long long>(ca) * p;
  double* y = a + static_cast<long long>(cb) * p;
  double alpha = 0.0, beta = 0.0, gamma = 0.0;  // one pass; each sum in dot()'s order
  for (int r = 0; r < p; ++r) {
    alpha = alpha + x[r] * x[r];
    beta = beta + y[r] * y[r];
    gamma = gamma + x[r] * y[r];
  }
  const double tol = static_cast<double>(p) * DBL_EPSILON;
  if (gamma == 0.0 || fabs(gamma) <= tol * (sqrt(alpha) * sqrt(beta))) return false;
  // t = tan(theta) zeroes the off-diagonal of [[alpha, gamma], [gamma, beta]] (the smaller root).
  const double zeta = (beta - alpha) / (2.0 * gamma);
  const double t = fabs(zeta) > 1e150 ? 0.5 / zeta
                                      : copysign(1.0, zeta) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
  const double c = 1.0 / sqrt(1.0 + t * t), s = c * t;
  for (int r = 0; r < p; ++r) {
    const double xr = x[r], yr = y[r];
    x[r] = c * xr - s * yr;
    y[r] = s * xr + c * yr;
  }
  double* vx = v + static_cast<long long>(ca) * q;
  double* vy = v + static_cast<long long>(cb) * q;
  for (int r = 0; r < q; ++r) {
    const double xr = vx[r], yr = vy[r];
    vx[r] = c * xr - s * yr;
    vy[r] = s * xr + c * yr;
  }
  return true;
}

// The pairs of step t with index i = lane, lane + lanes, ... (lanes = 1: all of them).
SE_SVD_HD bool step(double* a, double* v, int p, int q, int t, int lane, int lanes) {
  const int qe = q + (q & 1);
  bool rotated = false;
  for (int i = lane; i < qe / 2; i += lanes) {
    int ca, cb;
    pair_of(t, i, qe, ca, cb);
    if (cb < q && rotate(a, v, p, q, ca, cb)) rotated = true;
  }
  return rotated;
}

// Binary exponent e of max |a| over n entries (0 for a zero matrix), clamped so that 2^-e is finite:
// the kernels work on a * 2^-e (exact) so that the squared norms neither overflow nor underflow,
// and scale S back by 2^e.
SE_SVD_HD int scale_exponent(const double* a, long long n) {
  double m = 0.0;
  for (long long i = 0; i < n; ++i) m = fmax(m, fabs(a[i]));
  int e = 0;
  if (m > 0.0) frexp(m, &e);
  return e < -1000 ? -1000 : e;
}

SE_SVD_HD void scale(double* a, long long n, double f, int lane, int lanes) {
  for (long long i = lane; i < n; i += lanes) a[i] = a[i] * f;
}

// Position of column j in the descending order of the norms (ties: lower index first; NaN, from
// NaN input, ranks above every number): a total order, so the positions are a permutation and
// every output column is written exactly once.
SE_SVD_HD bool before(double x, int i, double y, int j) {
  const bool xn = x != x, yn = y != y;
  if (xn || yn) return xn && (!yn || i < j);
  return x > y || (x == y && i < j);
}
SE_SVD_HD int rank_of(const double* norms, int q, int j) {
  int pos = 0;
  for (int i = 0; i < q; ++i)
    if (before(norms[i], i, norms[j], j)) ++pos;
  return pos;
}

// Output column pos = rank_of(j): S[pos] = |a_j| * 2^e, U[:, pos] = a_j / |a_j| (zero when |a_j|
// is 0 or subnormal: completed below; NaN stays NaN), Vout[:, pos] = v_j. Column-major outputs.
SE_SVD_HD void emit(const double* a, const double* v, const double* norms, double* u, double* s,
                    double* vout, int p, int q, int j, int e) {
  const int pos = rank_of(norms, q, j);
  const double nj = norms[j];
  const bool zero = nj < DBL_MIN;
  s[pos] = zero ? 0.0 : ldexp(nj, e);  // not nj * 2^e: 2^1024 overflows where the product does not
  for (int r = 0; r < p; ++r)
    u[static_cast<long long>(pos) * p + r] = zero ? 0.0 : a[static_cast<long long>(j) * p + r] / nj;
  for (int r = 0; r < q; ++r) vout[static_cast<long long>(pos) * q + r] = v[static_cast<long long>(j) * q + r];
}

// Give every zero column of U (S == 0: rank-deficient input) a unit vector orthogonal to all
// other columns: the first coordinate vector that survives two Gram-Schmidt passes with more
// than half its length. Zero columns are the trailing ones (S is descending). One thread.
SE_SVD_HD void complete(double* u, const double* s, int p, int q) {
  int first_zero = q;
  for (int j = q - 1; j >= 0 && s[j] == 0.0; --j) first_zero = j;
  for (int j = first_zero; j < q; ++j) {
    double* w = u + static_cast<long long>(j) * p;
    for (int e = 0; e < p; ++e) {
      for (int r = 0; r < p; ++r) w[r] = r == e ? 1.0 : 0.0;
      for (int pass = 0; pass < 2; ++pass)
        for (int c = 0; c < j; ++c) {
          const double* uc = u + static_cast<long long>(c) * p;
          const double h = dot(uc, w, p);
          for (int r = 0; r < p; ++r) w[r] = w[r] - h * uc[r];
        }
      const double nw = sqrt(dot(w, w, p));
      if (nw > 0.5) {
        for (int r = 0; r < p; ++r) w[r] = w[r] / nw;
        break;
      }
    }
  }
}

// The whole SVD of one matrix by `lanes` cooperating threads, this one being `lane`: the CPU kernel
// calls it with one lane and no-op barriers, the CUDA kernel with a thread block, `sync` =
// __syncthreads and `any` = __syncthreads_or, so both run this one sequence of steps. a (p x q,
// column-major) is overwritten; v (q x q) and norms (q) are scratch; u (p x q), s (q), vout (q x q)
// the result; `e` must be one variable shared by the lanes (shared memory on CUDA).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Sync, typename Any>
SE_SVD_HD void svd(double* a, double* v, double* norms, double* u, double* s, double* vout, int p,
                   int q, int lane, int lanes, int& e, Sync sync, Any any) {
  const long long n = static_cast<long long>(p) * q;
  if (lane == 0) e = scale_exponent(a, n);
  sync();
  scale(a, n, ldexp(1.0, -e), lane, lanes);
  for (int j = lane; j < q * q; j += lanes) v[j] = (j / q == j % q) ? 1.0 : 0.0;
  sync();
  const int qe = q + (q & 1);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    bool rotated = false;
    for (int t = 0; t < qe - 1; ++t) {
      if (step(a, v, p, q, t, lane, lanes)) rotated = true;
      sync();
    }
    if (!any(rotated)) break;  // the same decision in every lane
  }
  for (int j = lane; j < q; j += lanes)
    norms[j] = sqrt(dot(a + static_cast<long long>(j) * p, a + static_cast<long long>(j) * p, p));
  sync();
  for (int j = lane; j < q; j += lanes) emit(a, v, norms, u, s, vout, p, q, j, e);
  sync();
  if (lane == 0) complete(u, s, p, q);
}

}  // namespace small_svd
}  // namespace subspace_ext
