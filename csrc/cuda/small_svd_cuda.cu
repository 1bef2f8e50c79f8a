// CUDA kernel of the batched small SVD (csrc/include/subspace_ext/small_svd.h): one block per
// matrix, one half warp (small_svd::kParts threads) per column pair of a round-robin step, a
// barrier between steps. Each thread of a pair's group keeps one of the header's partial sums and
// the group adds them in the header's tree by shuffles, so the result has the CPU kernel's bits
// (-fmad=false).
#include "kernels.h"
#include "subspace_ext/small_svd.h"

namespace subspace_ext {
namespace cuda {
namespace {

constexpr int kParts = small_svd::kParts;
static_assert(kParts == 16, "a rotation's group is a half warp");

struct BlockSync {
  __device__ void operator()() const { __syncthreads(); }
};
struct BlockAny {
  __device__ bool operator()(bool x) const { return __syncthreads_or(x) != 0; }
};

// This thread as partial `part` of its half warp's group (lanes `mask`).
struct HalfWarp {
  int part;
  unsigned mask;
  static constexpr int stride = kParts;
  __device__ void dot3(const double* x, const double* y, int p, double& alpha, double& beta,
                       double& gamma) const {
    double sa = 0.0, sb = 0.0, sg = 0.0;
    for (int r = part; r < p; r += kParts) {
      const double xr = x[r], yr = y[r];
      sa = sa + xr * xr;
      sb = sb + yr * yr;
      sg = sg + xr * yr;
    }
    for (int h = kParts / 2; h >= 1; h /= 2) {  // the header's tree, lane j adding lane j ^ h
      sa = sa + __shfl_xor_sync(mask, sa, h, kParts);
      sb = sb + __shfl_xor_sync(mask, sb, h, kParts);
      sg = sg + __shfl_xor_sync(mask, sg, h, kParts);
    }
    alpha = sa;
    beta = sb;
    gamma = sg;
  }
};

__global__ void __launch_bounds__(1024) small_svd_kernel(double* a, double* v, double* norms, double* u, double* s,
                                 double* vout, int p, int q) {
  const long long b = blockIdx.x;
  const int t = static_cast<int>(threadIdx.x), lanes = static_cast<int>(blockDim.x);
  const HalfWarp g{t % kParts, 0xFFFFu << (t & 16)};
  __shared__ int e;
  small_svd::svd(a + b * p * q, v + b * q * q, norms + b * q, u + b * p * q, s + b * q, vout + b * q * q,
                 p, q, t, lanes, t / kParts, lanes / kParts, g, e, BlockSync{}, BlockAny{});
}

}  // namespace

// Threads: a half warp per pair of a step, at most 64 pairs at once (1024 threads), in whole warps.
void small_svd(double* a, double* v, double* norms, double* u, double* s, double* vout,
               int64_t batch, int p, int q, cudaStream_t st) {
  if (batch == 0 || q == 0) return;
  const int pairs = (q + 1) / 2;
  const int groups = pairs >= 64 ? 64 : (pairs + 1) / 2 * 2;
  small_svd_kernel<<<static_cast<unsigned>(batch), groups * kParts, 0, st>>>(a, v, norms, u, s, vout, p, q);
}

}  // namespace cuda
}  // namespace subspace_ext
