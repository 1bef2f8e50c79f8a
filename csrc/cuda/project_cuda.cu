// CUDA kernels of project_perturbed and reconstruct_perturbed; the perturbation U + eps N is
// generated in shared memory as it is loaded and never stored in global memory.
//
// perturbed_tn: partial[c] = (U + eps N)^T Y over one chunk of rows. Grid: (row chunk, range of
// 256 output entries); each thread owns one entry (j, t) of the k x r product and accumulates the
// chunk's rows in order, as the CPU kernel does (so each partial has its bits). The tile loader
// computes each Philox block the tile needs once (a block gives 4 float / 2 double normals).
//
// perturbed_nt: out = X (U + eps N)^T. Grid: (strip of tq rows of U, split of X's rows). A block
// builds its strip of perturbed rows once (one Philox block per thread: every normal of the strip
// is computed once per split, not once per output tile) and then streams its split of X's rows
// through it; each thread owns one strip row j and kNtRows rows of X per tile.
#include "kernels.h"
#include "smem.h"
#include "subspace_ext/philox.h"

#include <algorithm>

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
  constexpr int per = philox::PerBlock<T>::value;
  const int64_t nb = (ncol + 2 * per - 2) / per;  // most Philox blocks a row's ncol entries touch
  T acc = T(0);
  for (int64_t t0 = row0; t0 < row1; t0 += kTile) {
    const int64_t rows = min(static_cast<int64_t>(kTile), row1 - t0);
    if (eps == T(0)) {
      for (int64_t x = threadIdx.x; x < rows * ncol; x += blockDim.x)
        tu[x] = U[(t0 + x / ncol) * us0 + (j0 + x % ncol) * us1];
    } else {
      // perturbed_basis's element u + eps * z, rounded as there. Row i of the tile needs normals
      // [i k + j0, i k + j0 + ncol): thread x takes Philox block x % nb of row x / nb and stores
      // every element of that block the tile needs (each block computed once per tile).
      for (int64_t x = threadIdx.x; x < rows * nb; x += blockDim.x) {
        const int64_t row = x / nb, i = t0 + row, g0 = i * k + j0;
        const int64_t b = g0 / per + x % nb;
        if (b * per >= g0 + ncol) continue;
        T z[per];
        philox::normals_of_block(seed, stream, static_cast<uint64_t>(b), z);
#pragma unroll
        for (int c = 0; c < per; ++c) {
          const int64_t g = b * per + c - g0;  // position in the row's segment
          if (g < 0 || g >= ncol) continue;
          tu[row * ncol + g] = philox::add(U[i * us0 + (j0 + g) * us1], philox::mul(eps, z[c]));
        }
      }
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
cudaError_t launch(const void* U, int64_t us0, int64_t us1, int64_t m, int64_t k, const void* Y, int64_t ys0,
                   int64_t ys1, int64_t r, double eps, uint64_t seed, uint64_t stream, int64_t rows_per_chunk,
                   void* partial, cudaStream_t st) {
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t ranges = (k * r + kThreads - 1) / kThreads;
  const size_t smem = perturbed_tn_smem_bytes(r, sizeof(T));
  if (const cudaError_t err = allow_smem(perturbed_tn_kernel<T>, smem); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(ranges));
  perturbed_tn_kernel<T><<<grid, kThreads, smem, st>>>(
      static_cast<const T*>(U), us0, us1, m, k, static_cast<const T*>(Y), ys0, ys1, r, static_cast<T>(eps),
      seed, stream, rows_per_chunk, static_cast<T*>(partial));
  return cudaSuccess;
}

constexpr int kNtRows = 4;  // rows of X per thread and tile in perturbed_nt

template <typename T>
__global__ void perturbed_nt_kernel(const T* X, int64_t xs0, int64_t xs1, int64_t p, int64_t k,
                                    const T* U, int64_t us0, int64_t us1, int64_t q, T eps,
                                    uint64_t seed, uint64_t stream, int tq, int64_t rows_per_split,
                                    T* out, int64_t os0, int64_t os1) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // tq x ks, ks = k | 1: an odd row stride (k, or k + 1 when k is even), so that a warp's lanes, which
  // read the same column t of different rows, hit distinct banks (k + 1 for odd k was an even stride:
  // k = 31 read 32-way conflicted in float32, 16-way in float64)
  T* strip = reinterpret_cast<T*>(smem_raw);
  const int64_t ks = nt_row_stride(k);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * tq;
  const int64_t nj = min(static_cast<int64_t>(tq), q - j0);
  // The strip: rows j0 .. j0 + nj of U, plus eps * z at their row-major positions (perturbed_basis's
  // element and rounding); thread b handles Philox block b of the strip's index range.
  constexpr int per = philox::PerBlock<T>::value;
  const int64_t i0 = j0 * k, i1 = (j0 + nj) * k;
  for (int64_t b = i0 / per + threadIdx.x; b * per < i1; b += blockDim.x) {
    T z[per];
    if (eps != T(0)) philox::normals_of_block(seed, stream, static_cast<uint64_t>(b), z);
#pragma unroll
    for (int c = 0; c < per; ++c) {
      const int64_t i = b * per + c;
      if (i < i0 || i >= i1) continue;
      const int64_t row = i / k - j0, col = i % k;
      T u = U[(j0 + row) * us0 + col * us1];
      if (eps != T(0)) u = philox::add(u, philox::mul(eps, z[c]));
      strip[row * ks + col] = u;
    }
  }
  __syncthreads();  // the only barrier: below, threads read the strip and write disjoint outputs
  const int jl = threadIdx.x % tq;
  if (jl >= nj) return;
  const int lanes = blockDim.x / tq;  // threads per strip row
  const int64_t tile_rows = static_cast<int64_t>(lanes) * kNtRows;
  const int64_t split0 = blockIdx.y * rows_per_split, split1 = min(p, split0 + rows_per_split);
  const T* u = strip + jl * ks;
  T* o = out + (j0 + jl) * os1;
  for (int64_t base = split0 + threadIdx.x / tq; base < split1; base += tile_rows) {
    T acc[kNtRows];
#pragma unroll
    for (int r = 0; r < kNtRows; ++r) acc[r] = T(0);
    for (int64_t t = 0; t < k; ++t) {
      const T ut = u[t];
#pragma unroll
      for (int r = 0; r < kNtRows; ++r) {
        const int64_t i = base + static_cast<int64_t>(r) * lanes;
        if (i < split1) acc[r] = fma(X[i * xs0 + t * xs1], ut, acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < kNtRows; ++r) {
      const int64_t i = base + static_cast<int64_t>(r) * lanes;
      if (i < split1) o[i * os0] = acc[r];
    }
  }
}

template <typename T>
cudaError_t launch_nt(const void* X, int64_t xs0, int64_t xs1, int64_t p, int64_t k, const void* U,
                      int64_t us0, int64_t us1, int64_t q, double eps, uint64_t seed, uint64_t stream,
                      const NtPlan& plan, void* out, int64_t os0, int64_t os1, cudaStream_t st) {
  if (const cudaError_t err = allow_smem(perturbed_nt_kernel<T>, plan.smem); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(plan.strips), static_cast<unsigned>(plan.splits));
  perturbed_nt_kernel<T><<<grid, kThreads, plan.smem, st>>>(
      static_cast<const T*>(X), xs0, xs1, p, k, static_cast<const T*>(U), us0, us1, q, static_cast<T>(eps),
      seed, stream, plan.tq, plan.rows_per_split, static_cast<T*>(out), os0, os1);
  return cudaSuccess;
}

}  // namespace

NtPlan perturbed_nt_plan(int64_t p, int64_t k, int64_t q, size_t elem, size_t smem_limit, int sms) {
  NtPlan plan;
  // The widest strip (at most 64 rows, a power of two dividing the block) that fits the default
  // 48 KiB; beyond, the widest that fits the device's opt-in limit.
  for (const size_t limit : {std::min<size_t>(48 * 1024, smem_limit), smem_limit}) {
    for (int tq = 64; tq >= 1 && plan.tq == 0; tq /= 2) {
      const size_t bytes = static_cast<size_t>(tq) * static_cast<size_t>(nt_row_stride(k)) * elem;
      if (bytes <= limit) {
        plan.tq = tq;
        plan.smem = bytes;
      }
    }
  }
  if (plan.tq == 0) return plan;
  plan.strips = (q + plan.tq - 1) / plan.tq;
  // Split X's rows until the grid has ~4 blocks per SM (each split recomputes its strip's noise).
  const int64_t tile_rows = static_cast<int64_t>(kThreads / plan.tq) * kNtRows;
  const int64_t tiles = std::max<int64_t>((p + tile_rows - 1) / tile_rows, 1);
  const int64_t want = std::max<int64_t>((4 * static_cast<int64_t>(sms) + plan.strips - 1) / plan.strips, 1);
  const int64_t splits = std::min<int64_t>(std::min<int64_t>(want, tiles), 65535);
  plan.rows_per_split = (tiles + splits - 1) / splits * tile_rows;
  plan.splits = (p + plan.rows_per_split - 1) / plan.rows_per_split;
  if (plan.splits < 1) plan.splits = 1;
  return plan;
}

cudaError_t perturbed_nt(const void* X, int64_t xs0, int64_t xs1, int64_t p, int64_t k, const void* U,
                         int64_t us0, int64_t us1, int64_t q, DType dt, double eps, uint64_t seed,
                         uint64_t stream, const NtPlan& plan, void* out, int64_t os0, int64_t os1,
                         cudaStream_t st) {
  if (p == 0 || q == 0 || k == 0) return cudaSuccess;
  if (dt == DType::F32)
    return launch_nt<float>(X, xs0, xs1, p, k, U, us0, us1, q, eps, seed, stream, plan, out, os0, os1, st);
  return launch_nt<double>(X, xs0, xs1, p, k, U, us0, us1, q, eps, seed, stream, plan, out, os0, os1, st);
}

size_t perturbed_tn_smem_bytes(int64_t r, size_t elem) {
  const int64_t ncol = (kThreads - 1) / r + 2;  // most columns a range of kThreads entries touches
  return static_cast<size_t>(kTile * (ncol + r)) * elem;
}

cudaError_t perturbed_tn(const void* U, int64_t us0, int64_t us1, int64_t m, int64_t k, const void* Y,
                         int64_t ys0, int64_t ys1, int64_t r, DType dt, double eps, uint64_t seed,
                         uint64_t stream, int64_t rows_per_chunk, void* partial, cudaStream_t st) {
  if (m == 0 || k == 0 || r == 0) return cudaSuccess;
  if (dt == DType::F32)
    return launch<float>(U, us0, us1, m, k, Y, ys0, ys1, r, eps, seed, stream, rows_per_chunk, partial, st);
  return launch<double>(U, us0, us1, m, k, Y, ys0, ys1, r, eps, seed, stream, rows_per_chunk, partial, st);
}

}  // namespace cuda
}  // namespace subspace_ext
