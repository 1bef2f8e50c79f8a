// CUDA kernel of the batched small SVD (csrc/include/subspace_ext/small_svd.h): one block per
// matrix, one thread per column pair of a round-robin step, a barrier between steps. Every
// pair's arithmetic is the header's, so the result has the CPU kernel's bits (-fmad=false).
#include "kernels.h"
#include "subspace_ext/small_svd.h"

namespace subspace_ext {
namespace cuda {
namespace {

__global__ void small_svd_kernel(double* a, double* v, double* norms, double* u, double* s,
                                 double* vout, int p, int q) {
  const long long b = blockIdx.x;
  double* A = a + b * p * q;
  double* V = v + b * q * q;
  double* N = norms + b * q;
  const int lane = threadIdx.x, lanes = blockDim.x;
  __shared__ int e;
  if (lane == 0) e = small_svd::scale_exponent(A, static_cast<long long>(p) * q);
  __syncthreads();
  small_svd::scale(A, static_cast<long long>(p) * q, ldexp(1.0, -e), lane, lanes);
  for (int j = lane; j < q * q; j += lanes) V[j] = (j / q == j % q) ? 1.0 : 0.0;
  __syncthreads();
  const int qe = q + (q & 1);
  for (int sweep = 0; sweep < small_svd::kMaxSweeps; ++sweep) {
    int rotated = 0;
    for (int t = 0; t < qe - 1; ++t) {
      if (small_svd::step(A, V, p, q, t, lane, lanes)) rotated = 1;
      __syncthreads();
    }
    if (!__syncthreads_or(rotated)) break;  // the same decision in every thread
  }
  for (int j = lane; j < q; j += lanes)
    N[j] = sqrt(small_svd::dot(A + static_cast<long long>(j) * p, A + static_cast<long long>(j) * p, p));
  __syncthreads();
  double* U = u + b * p * q;
  double* S = s + b * q;
  for (int j = lane; j < q; j += lanes) small_svd::emit(A, V, N, U, S, vout + b * q * q, p, q, j, e);
  __syncthreads();
  if (lane == 0) small_svd::complete(U, S, p, q);
}

}  // namespace

void small_svd(double* a, double* v, double* norms, double* u, double* s, double* vout,
               int64_t batch, int p, int q, cudaStream_t st) {
  if (batch == 0 || q == 0) return;
  const int pairs = (q + 1) / 2;
  const int threads = pairs >= 1024 ? 1024 : (pairs + 31) / 32 * 32;
  small_svd_kernel<<<static_cast<unsigned>(batch), threads, 0, st>>>(a, v, norms, u, s, vout, p, q);
}

}  // namespace cuda
}  // namespace subspace_ext
