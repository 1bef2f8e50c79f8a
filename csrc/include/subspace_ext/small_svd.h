// Batched SVD of small matrices (the l x l cores of rsvd, l = rank + oversample): one-sided
// (Hestenes) Jacobi with the round-robin parallel ordering.
//
// Written once for host and device, like philox.h. One sweep is q' - 1 steps (q' = q rounded up to
// even); a step rotates q'/2 disjoint column pairs, so the pairs of a step can run in any order or
// all at once: the CPU runs them one after the other, the CUDA kernel gives each pair a group of
// kParts threads (a half warp).
// Every number depends only on the input (IEEE +, -, *, /, sqrt, all correctly rounded; no FMA:
// -ffp-contract=off on the host, -fmad=false for nvcc), so CPU and GPU give the same bits. The
// rotations' dot products are summed in one fixed order on both (see kParts).
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

// The order of a rotation's dot products: row r of a column goes to partial sum r % kParts (each
// partial adds its rows in increasing order, starting from 0.0), and the partials combine in a
// fixed tree: for h = kParts / 2, ..., 2, 1: s[j] = s[j] + s[j + h] for j < h; the sum is s[0].
// The CPU keeps all kParts partials in one thread (SerialGroup), the CUDA kernel gives each partial
// one thread of a kParts-thread group and runs the tree as a shuffle butterfly (lane j adds lane
// j ^ h: the same additions, as x + y == y + x in IEEE arithmetic); tests/reference.py spells the
// order out in plain loops.
constexpr int kParts = 16;

#if !defined(__CUDACC__)
// A rotation's team on the CPU: one thread that does all rows (part 0, stride 1) and all partials.
// dot3: alpha = x.x, beta = y.y, gamma = x.y in one pass over the columns, the 16 partials of each
// as 8 two-lane vectors (SSE2, the x86-64 baseline; the compiler's vectorisation of plain loops
// over 16 partials keeps them on the stack): lane pair k (partials 2k, 2k + 1) walks the blocks of
// 16 rows for all three sums at once, the last block's missing rows read as 0 (0 * 0 = +0.0 leaves
// a partial unchanged: a partial is never -0.0, as it starts at +0.0 and a sum is -0.0 only if both
// terms are). The tree runs on vectors: s[j] + s[j + h] for h = 8, 4, 2 is vector k plus vector
// k + h / 2, then the two lanes.
struct SerialGroup {
  static constexpr int part = 0, stride = 1;
  void dot3(const double* x, const double* y, int p, double& alpha, double& beta, double& gamma) const {
    typedef double v2 __attribute__((vector_size(16)));
    static_assert(kParts == 16, "the vector layout below holds 16 partials");
    v2 sa[8], sb[8], sg[8];
    for (int k = 0; k < 8; ++k) {
      v2 a{0.0, 0.0}, b{0.0, 0.0}, g{0.0, 0.0};
      for (int r = 2 * k; r < p; r += kParts) {
        const bool two = r + 1 < p;
        const v2 xv{x[r], two ? x[r + 1] : 0.0}, yv{y[r], two ? y[r + 1] : 0.0};
        a = a + xv * xv;
        b = b + yv * yv;
        g = g + xv * yv;
      }
      sa[k] = a;
      sb[k] = b;
      sg[k] = g;
    }
    for (int h = 4; h >= 1; h /= 2)
      for (int k = 0; k < h; ++k) {
        sa[k] = sa[k] + sa[k + h];
        sb[k] = sb[k] + sb[k + h];
        sg[k] = sg[k] + sg[k + h];
      }
    alpha = sa[0][0] + sa[0][1];
    beta = sb[0][0] + sb[0][1];
    gamma = sg[0][0] + sg[0][1];
  }
};
#endif

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

// Orthogonalise columns ca < cb of a (p rows) by one plane rotation, applied to v (q rows) too, by
// the threads of group g (rows g.part, g.part + g.stride, ...; every thread of g gets the same
// dot products, so the same decision and the same rotation).
// Returns whether the pair was rotated (false: already orthogonal to the tolerance).
template <typename Group>
SE_SVD_HD bool rotate(double* a, double* v, int p, int q, int ca, int cb, const Group& g) {
  double* x = a + static_cast<long long>(ca) * p;
  double* y = a + static_cast<long long>(cb) * p;
  double alpha, beta, gamma;
  g.dot3(x, y, p, alpha, beta, gamma);
  const double tol = static_cast<double>(p) * DBL_EPSILON;
  if (gamma == 0.0 || fabs(gamma) <= tol * (sqrt(alpha) * sqrt(beta))) return false;
  // t = tan(theta) zeroes the off-diagonal of [[alpha, gamma], [gamma, beta]] (the smaller root).
  const double zeta = (beta - alpha) / (2.0 * gamma);
  const double t = fabs(zeta) > 1e150 ? 0.5 / zeta
                                      : copysign(1.0, zeta) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
  const double c = 1.0 / sqrt(1.0 + t * t), s = c * t;
  for (int r = g.part; r < p; r += g.stride) {
    const double xr = x[r], yr = y[r];
    x[r] = c * xr - s * yr;
    y[r] = s * xr + c * yr;
  }
  double* vx = v + static_cast<long long>(ca) * q;
  double* vy = v + static_cast<long long>(cb) * q;
  for (int r = g.part; r < q; r += g.stride) {
    const double xr = vx[r], yr = vy[r];
    vx[r] = c * xr - s * yr;
    vy[r] = s * xr + c * yr;
  }
  return true;
}

// The pairs of step t with index i = group, group + groups, ... (groups = 1: all of them).
template <typename Group>
SE_SVD_HD bool step(double* a, double* v, int p, int q, int t, int group, int groups, const Group& g) {
  const int qe = q + (q & 1);
  bool rotated = false;
  for (int i = group; i < qe / 2; i += groups) {
    int ca, cb;
    pair_of(t, i, qe, ca, cb);
    if (cb < q && rotate(a, v, p, q, ca, cb, g)) rotated = true;
  }
  return rotated;
}

// Binary exponent e of max |a| over n entries (0 for a zero matrix; NaN entries are skipped), clamped
// so that 2^-e is finite: the kernels work on a * 2^-e (exact) so that the squared norms neither
// overflow nor underflow, and scale S back by 2^e. Each lane takes the entries i = lane (mod lanes);
// the lanes' exponents meet by a binary search over `any` (a dozen barriers), the largest being the
// exponent of the largest entry (frexp's exponent does not decrease with the magnitude): the same
// e for any number of lanes. One lane used to scan the whole matrix while the others waited.
constexpr int kNoExponent = -2048;  // a lane whose entries are all 0 (below every clamped exponent)
template <typename Any>
SE_SVD_HD int scale_exponent(const double* a, long long n, int lane, int lanes, Any any) {
  double m = 0.0;
  for (long long i = lane; i < n; i += lanes) m = fmax(m, fabs(a[i]));
  // An Inf entry (rsvd's internal calls are unchecked; the op refuses it): e = 0, what a scan of the whole
  // matrix gave (frexp(Inf) stores 0), whichever lane holds it
  if (any(m > DBL_MAX)) return 0;
  int mine = kNoExponent;
  if (m > 0.0) {
    frexp(m, &mine);
    mine = mine < -1000 ? -1000 : mine;
  }
  int lo = kNoExponent, hi = 1025;  // any(mine >= lo) holds, any(mine >= hi) does not (frexp's e <= 1024)
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (any(mine >= mid)) lo = mid;
    else hi = mid;
  }
  return lo == kNoExponent ? 0 : lo;
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

// The whole SVD of one matrix by `lanes` cooperating threads, this one being `lane`; the rotations
// by `groups` teams, this thread being in team `group` as g (see rotate). The CPU kernel calls it
// with one lane, one group (SerialGroup) and no-op barriers, the CUDA kernel with a thread block in
// half-warp groups, `sync` = __syncthreads and `any` = __syncthreads_or, so both run this one
// sequence of steps. a (p x q, column-major) is overwritten; v (q x q) and norms (q) are scratch;
// u (p x q), s (q), vout (q x q) the result; `e` must be one variable shared by the lanes (shared
// memory on CUDA).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Group, typename Sync, typename Any>
SE_SVD_HD void svd(double* a, double* v, double* norms, double* u, double* s, double* vout, int p,
                   int q, int lane, int lanes, int group, int groups, const Group& g, int& e, Sync sync,
                   Any any) {
  const long long n = static_cast<long long>(p) * q;
  const int exponent = scale_exponent(a, n, lane, lanes, any);
  if (lane == 0) e = exponent;
  sync();
  scale(a, n, ldexp(1.0, -e), lane, lanes);
  for (long long j = lane; j < static_cast<long long>(q) * q; j += lanes) v[j] = (j / q == j % q) ? 1.0 : 0.0;
  sync();
  const int qe = q + (q & 1);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    bool rotated = false;
    for (int t = 0; t < qe - 1; ++t) {
      if (step(a, v, p, q, t, group, groups, g)) rotated = true;
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
