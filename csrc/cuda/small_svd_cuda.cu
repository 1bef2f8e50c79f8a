// CUDA kernels of rsvd's batched small problems: the Gram-Cholesky transform of every
// orthonormalisation (csrc/include/subspace_ext/gram_orth.h, at the end of this file) and the
// batched small SVD of the cores (csrc/include/subspace_ext/small_svd.h): one block per
// matrix, one half warp (small_svd::kParts threads) per column pair of a round-robin step, a
// barrier between steps. Each thread of a pair's group keeps one of the header's partial sums and
// the group adds them in the header's tree by shuffles, so the result has the CPU kernel's bits
// (-fmad=false).
//
// Where the matrix, V and the norms fit the block's shared memory (square up to 120 x 120 on an H100/H200's
// 227 KiB, 101 x 101 on an A100's 163 KiB), the block works on them there: a step is a chain of
// dependent loads, rotation and barrier, and on the H200 (2026-12-04) the global-memory version
// took ~3 us a step (2.1 ms for 96 matrices of 72 x 72, 10 sweeps of 71 steps), which we take to
// be mostly memory latency (not profiled). Larger (tall) matrices stay in global memory. Same
// arithmetic, same bits either way.
#include "kernels.h"
#include "smem.h"
#include "subspace_ext/gram_orth.h"
#include "subspace_ext/small_svd.h"

namespace subspace_ext {
namespace cuda {
namespace {

constexpr int kParts = small_svd::kParts;
// The kernel's static shared memory (`e`) and alignment, kept free below the opt-in limit.
constexpr size_t kStaticSmemReserve = 1024;
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

// The block's dynamic shared memory as doubles, its first n filled from `from` by all the block's
// threads (a barrier follows): the staged kernels' working copy.
__device__ __forceinline__ double* stage(const double* from, long long n) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* to = reinterpret_cast<double*>(smem_raw);
  for (long long i = threadIdx.x; i < n; i += blockDim.x) to[i] = from[i];
  __syncthreads();
  return to;
}

// Staged: a (p x q), v (q x q) and norms (q) of this block's matrix live in dynamic shared memory
// (a copied in first); the global a, v, norms are then untouched scratch.
template <bool Staged>
__global__ void __launch_bounds__(1024) small_svd_kernel(double* a, double* v, double* norms, double* u, double* s,
                                                         double* vout, int p, int q) {
  const long long b = blockIdx.x, pq = static_cast<long long>(p) * q;
  const int t = static_cast<int>(threadIdx.x), lanes = static_cast<int>(blockDim.x);
  const HalfWarp g{t % kParts, 0xFFFFu << (t & 16)};
  __shared__ int e;
  double *ab = a + b * pq, *vb = v + b * q * q, *nb = norms + b * q;
  if (Staged) {
    ab = stage(ab, pq);
    vb = ab + pq;
    nb = vb + static_cast<long long>(q) * q;
  }
  small_svd::svd(ab, vb, nb, u + b * pq, s + b * q, vout + b * q * q, p, q, t, lanes, t / kParts, lanes / kParts,
                 g, e, BlockSync{}, BlockAny{});
}

size_t smem_bytes(int p, int q) {  // a, v and norms of one matrix
  return sizeof(double) * (static_cast<size_t>(p) * q + static_cast<size_t>(q) * q + q);
}

// The Gram-Cholesky transform: one block of kGramThreads per matrix, the trailing update as a warp
// along the rows by the block's 8 warps along the columns. Staged: the work copy g (q x q) and d
// (q) in dynamic shared memory (to q = 76 in the default 48 KiB, 167 on 227 KiB); else in the
// global work tensors. Same arithmetic, same bits either way.
constexpr int kGramThreads = 256;

template <bool Staged>
__global__ void __launch_bounds__(kGramThreads) gram_orth_kernel(double* g, double* d, double* t, bool* complete,
                                                                 int q) {
  const long long b = blockIdx.x, qq = static_cast<long long>(q) * q;
  const int lane = static_cast<int>(threadIdx.x), lanes = static_cast<int>(blockDim.x);
  double *gb = g + b * qq, *db = d + b * q;
  if (Staged) {
    gb = stage(gb, qq);
    db = gb + qq;
  }
  const bool ok = gram_orth::transform(gb, db, t + b * qq, q, lane, lanes, 32, BlockSync{});
  if (lane == 0) complete[b] = ok;
}

}  // namespace

// Threads: a half warp per pair of a step, at most 64 pairs at once (1024 threads), in whole warps.
cudaError_t small_svd(double* a, double* v, double* norms, double* u, double* s, double* vout, int64_t batch, int p,
                      int q, size_t smem_limit, cudaStream_t st) {
  if (batch == 0 || q == 0) return cudaSuccess;
  const int pairs = (q + 1) / 2;
  const int groups = pairs >= 64 ? 64 : (pairs + 1) / 2 * 2;
  const size_t bytes = smem_bytes(p, q);
  const auto grid = static_cast<unsigned>(batch);
  if (bytes + kStaticSmemReserve <= smem_limit) {
    if (const cudaError_t err = allow_smem(small_svd_kernel<true>, bytes); err != cudaSuccess) return err;
    small_svd_kernel<true><<<grid, groups * kParts, bytes, st>>>(a, v, norms, u, s, vout, p, q);
  } else {
    small_svd_kernel<false><<<grid, groups * kParts, 0, st>>>(a, v, norms, u, s, vout, p, q);
  }
  return cudaSuccess;
}

cudaError_t gram_orth(double* g, double* d, double* t, bool* complete, int64_t batch, int q, size_t smem_limit,
                      cudaStream_t st) {
  if (batch == 0 || q == 0) return cudaSuccess;
  const size_t bytes = sizeof(double) * (static_cast<size_t>(q) * q + q);
  const auto grid = static_cast<unsigned>(batch);
  if (bytes + kStaticSmemReserve <= smem_limit) {
    if (const cudaError_t err = allow_smem(gram_orth_kernel<true>, bytes); err != cudaSuccess) return err;
    gram_orth_kernel<true><<<grid, kGramThreads, bytes, st>>>(g, d, t, complete, q);
  } else {
    gram_orth_kernel<false><<<grid, kGramThreads, 0, st>>>(g, d, t, complete, q);
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace subspace_ext
