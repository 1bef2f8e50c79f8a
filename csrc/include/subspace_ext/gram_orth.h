// The orthonormalising transform of a Gram matrix, for the orthonormalisations inside rsvd's
// batched path (csrc/cpu/rsvd_cpu.cpp, orth_gram): given G = Y^T Y (q x q, float64, symmetric), an
// upper-triangular T such that Y T has orthonormal columns, by Cholesky (G = R^T R, T = R^-1) with
// dropped pivots: a column of Y that lies in the span of the ones before it, to rounding, gets a
// zero column in T, and the matrix is flagged incomplete.
//
// Written once for host and device, like small_svd.h, and in one order of operations, so CPU and
// GPU give the same bits (IEEE +, -, *, /, sqrt only; -ffp-contract=off / -fmad=false):
//   tol = q * DBL_EPSILON * max_i G[i][i] (the Gram small SVD's test, lambda <= l eps lambda_max,
//   with the largest diagonal entry for lambda_max);
//   for j = 0, 1, ..., q - 1 (right-looking, in place in G's upper triangle):
//     d = G[j][j] (as updated by the columns before j); column j is kept iff d > tol;
//     R[j][j] = sqrt(d) (0 for a dropped column), R[j][i] = G[j][i] / R[j][j] for i > j (0 when
//     dropped);
//     G[i][k] = G[i][k] - R[j][i] * R[j][k] for j < i <= k;
//   then each column of T: T[j][j] = 1 / R[j][j], and for i = j - 1, ..., 0:
//     T[i][j] = -(sum over m = i + 1 .. j, in that order from 0.0, of R[i][m] T[m][j]) / R[i][i]
//   (0 where column i or j was dropped).
// Against a q x q Jacobi SVD of G (about 10 sweeps of q - 1 dependent steps) this is q steps of two
// barriers each and one back-substitution per column: microseconds rather than milliseconds.
//
// Layout: column-major, element (r, c) of a q x q matrix at [c * q + r]. G's upper triangle
// (r <= c) is read and its strict part overwritten by R's; the strict lower triangle holds R's
// strict upper triangle mirrored (R[j][i] also at [j * q + i], i > j: row j contiguous for the
// trailing update), then T's strict upper triangle transposed (T[i][j] at [i * q + j], i < j);
// `d` (q) holds R's diagonal; `t` receives T. G's lower triangle is never read as input (G need
// not be exactly symmetric).
#pragma once
#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#define SE_GO_HD __host__ __device__ __forceinline__
#else
#define SE_GO_HD inline
#endif

namespace subspace_ext {
namespace gram_orth {

// T of one matrix by `lanes` cooperating threads, this one being `lane`; in the trailing update
// the lanes form a grid of row_lanes (along i, consecutive addresses) x lanes / row_lanes (along
// k). The CPU calls it with one lane and no-op barriers, the CUDA kernel with a thread block and
// `sync` = __syncthreads. Returns (in every lane) whether no column was dropped.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Sync>
SE_GO_HD bool transform(double* g, double* d, double* t, int q, int lane, int lanes, int row_lanes, Sync sync) {
  double top = 0.0;
  for (int i = 0; i < q; ++i) top = fmax(top, g[static_cast<long long>(i) * q + i]);
  const double tol = static_cast<double>(q) * DBL_EPSILON * top;
  const int rl = lane % row_lanes, cl = lane / row_lanes, cols = lanes / row_lanes;
  bool complete = true;  // (the first barrier below comes before any diagonal entry changes)
  for (int j = 0; j < q; ++j) {
    // G[j][j], final since step j - 1; every lane reads it, so all decide alike. It stays in place
    // (nothing writes it again); R[j][j] goes to d[j].
    const double dj = g[static_cast<long long>(j) * q + j];
    const bool kept = dj > tol;
    complete = complete && kept;
    const double rjj = kept ? sqrt(dj) : 0.0;
    if (lane == 0) d[j] = rjj;
    double* rj = g + static_cast<long long>(j) * q;  // column j: R's row j mirrored below the diagonal
    for (int i = j + 1 + lane; i < q; i += lanes) {  // row j of R: G[j][i] lives at column i, row j
      double& x = g[static_cast<long long>(i) * q + j];
      x = kept ? x / rjj : 0.0;
      rj[i] = x;
    }
    sync();
    // The update reads row j of R from its contiguous mirror: the row lanes read consecutive
    // addresses (the row itself is strided by q: bank conflicts on the GPU for every even q)
    for (int k = j + 1 + cl; k < q; k += cols) {
      const double rk = rj[k];
      double* gk = g + static_cast<long long>(k) * q;
      for (int i = j + 1 + rl; i <= k; i += row_lanes) gk[i] = gk[i] - rj[i] * rk;
    }
    sync();
  }
  // T column by column (lane-parallel), each a back-substitution that keeps its partial column in
  // the free strict lower triangle of g (row j): no lane reads another's.
  for (int j = lane; j < q; j += lanes) {
    const double tjj = d[j] > 0.0 ? 1.0 / d[j] : 0.0;
    for (int i = j - 1; i >= 0; --i) {
      double s = 0.0;
      for (int m = i + 1; m <= j; ++m) {
        const double tmj = m == j ? tjj : g[static_cast<long long>(m) * q + j];
        s = s + g[static_cast<long long>(m) * q + i] * tmj;
      }
      g[static_cast<long long>(i) * q + j] = d[i] > 0.0 && tjj != 0.0 ? -s / d[i] : 0.0;
    }
  }
  sync();
  for (long long x = lane; x < static_cast<long long>(q) * q; x += lanes) {
    const int r = static_cast<int>(x % q), c = static_cast<int>(x / q);
    t[x] = r < c ? g[static_cast<long long>(r) * q + c] : (r == c && d[c] > 0.0 ? 1.0 / d[c] : 0.0);
  }
  return complete;
}

}  // namespace gram_orth
}  // namespace subspace_ext
