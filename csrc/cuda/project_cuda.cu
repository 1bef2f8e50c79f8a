// CUDA kernel of project_perturbed: partial[c] = (U + eps N)^T Y over one chunk of rows, the
// perturbation generated inside the tile loader (never stored in global memory). Grid: (row
// chunk, range of 256 output entries); each thread owns one entry (j, t) of the k x r product and
// accumulates the chunk's rows in order, as the CPU kernel does (so each partial has its bits).
#include "kernels.h"
#include "subspace_ext/philox.h"

namespace subspace_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // output entries per block
constexpr int kTile = 16;      // rows per shared-memory tile

template <typename T>
__global__ void perturbed_tn_kernel(const T* U, int64_t us0, int64_t us1, int64_t m, int64_t k,
                                    const T* Y, int64_t ys0, int64_t ys1, int64_t r, T eps,
                                    uint64_t seed, uint64_t stream, int64_t rows_per_chunk,
                                    T* partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t chunk = blockIdx.x;
  const int64_t e_first = static_cast<int64_t>(blockIdx.y) * kThreads;
  const int64_t e_end = min(k * r, e_first + kThreads);
  const int64_t e = e_first + threadIdx.x;
  const int64_t j0 = e_first / r, ncol = (e_end - 1) / r + 1 - j0;  // the columns of U needed here
  T* tu = smem;                // kTile x ncol
  T* ty = smem + kTile * ncol;  // kTile x r
  const int64_t row0 = chunk * rows_per_chunk, row1 = min(m, row0 + rows_per_chunk);
  T acc = T(0);
  for (int64_t t0 = row0; t0 < row1; t0 += kTile) {
    const int64_t rows = min(static_cast<int64_t>(kTile), row1 - t0);
    for (int64_t x = threadIdx.x; x < rows * ncol; x += blockDim.x) {
      const int64_t i = t0 + x / ncol, j = j0 + x % ncol;
      T u = U[i * us0 + j * us1];
      if (eps != T(0))  // perturbed_basis's element: u + eps * z, rounded as there
        u = philox::add(u, philox::mul(eps, philox::normal_at<T>(seed, stream, static_cast<uint64_t>(i * k + j))));
      tu[x] = u;
    }
    for (int64_t x = threadIdx.x; x < rows * r; x += blockDim.x)
      ty[x] = Y[(t0 + x / r) * ys0 + (x % r) * ys1];
    __syncthreads();
    if (e < e_end) {
      const int64_t j = e / r - j0, t = e % r;
      for (int64_t i = 0; i < rows; ++i) acc = philox::add(acc, philox::mul(tu[i * ncol + j], ty[i * r + t]));
    }
    __syncthreads();
  }
  if (e < e_end) partial[chunk * k * r + e] = acc;
}

template <typename T>
void launch(const void* U, int64_t us0, int64_t us1, int64_t m, int64_t k, const void* Y, int64_t ys0,
            int64_t ys1, int64_t r, double eps, uint64_t seed, uint64_t stream, int64_t rows_per_chunk,
            void* partial, cudaStream_t st) {
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t ranges = (k * r + kThreads - 1) / kThreads;
  const size_t smem = perturbed_tn_smem_bytes(r, sizeof(T));
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(ranges));
  perturbed_tn_kernel<T><<<grid, kThreads, smem, st>>>(
      static_cast<const T*>(U), us0, us1, m, k, static_cast<const T*>(Y), ys0, ys1, r, static_cast<T>(eps),
      seed, stream, rows_per_chunk, static_cast<T*>(partial));
}

}  // namespace

size_t perturbed_tn_smem_bytes(int64_t r, size_t elem) {
  const int64_t ncol = (kThreads - 1) / r + 2;  // most columns a range of kThreads entries touches
  return static_cast<size_t>(kTile * (ncol + r)) * elem;
}

void perturbed_tn(const void* U, int64_t us0, int64_t us1, int64_t m, int64_t k, const void* Y,
                  int64_t ys0, int64_t ys1, int64_t r, DType dt, double eps, uint64_t seed,
                  uint64_t stream, int64_t rows_per_chunk, void* partial, cudaStream_t st) {
  if (m == 0 || k == 0 || r == 0) return;
  if (dt == DType::F32)
    launch<float>(U, us0, us1, m, k, Y, ys0, ys1, r, eps, seed, stream, rows_per_chunk, partial, st);
  else
    launch<double>(U, us0, us1, m, k, Y, ys0, ys1, r, eps, seed, stream, rows_per_chunk, partial, st);
}

}  // namespace cuda
}  // namespace subspace_ext
