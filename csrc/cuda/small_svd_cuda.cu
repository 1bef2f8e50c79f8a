// CUDA kernel of the batched small SVD (csrc/include/subspace_ext/small_svd.h): one block per
// matrix, one thread per column pair of a round-robin step, a barrier between steps. Every
// pair's arithmetic is the header's, so the result has the CPU kernel's bits (-fmad=false).
#include "kernels.h"
#include "subspace_ext/small_svd.h"

namespace subspace_ext {
namespace cuda {
namespace {

struct BlockSync {
  __device__ void operator()() const { __syncthreads(); }
};
struct BlockAny {
  __device__ bool operator()(bool x) const { return __syncthreads_or(x) != 0; }
};

__global__ void __launch_bounds__(1024) small_svd_kernel(double* a, double* v, double* norms, double* u, double* s,
                                 double* vout, int p, int q) {
  const long long b = blockIdx.x;
  __shared__ int e;
  small_svd::svd(a + b * p * q, v + b * q * q, norms + b * q, u + b * p * q, s + b * q, vout + b * q * q,
                 p, q, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), e, BlockSync{}, BlockAny{});
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
