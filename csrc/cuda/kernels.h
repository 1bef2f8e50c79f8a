// Launchers of the CUDA kernels, in plain C++ types: the .cu files include only the CUDA runtime
// (fast nvcc builds); the torch glue (checks, dispatch, streams) is csrc/cuda/cuda_ops.cpp.
// Every launcher enqueues on `stream` and returns without synchronising; the caller checks the
// launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace subspace_ext {
namespace cuda {

enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

// ---- philox (bit-identical to the CPU kernels: csrc/include/subspace_ext/philox.h) -----------
// sms: the device's streaming multiprocessors (the grid is at most one resident wave of them).
// Each returns the error of the occupancy query it makes once per kernel and device.
cudaError_t philox_uint32(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, int sms, cudaStream_t s);
// out[i] = z_i, or out[i] += eps * z_i when add (z_i: normal number i of (seed, stream)).
cudaError_t philox_normal(void* out, DType dt, int64_t n, uint64_t seed, uint64_t stream, double eps,
                          bool add, int sms, cudaStream_t s);
// out[i] = philox::icdf_normal(word i of (seed, stream)), float32.
cudaError_t philox_normal_icdf(float* out, int64_t n, uint64_t seed, uint64_t stream, int sms, cudaStream_t s);

// ---- importance: all layers of one (parameter dtype, state dtype) group in one launch --------
struct ImportanceLayer {
  const void* A;   // r x n, contiguous
  const void* B;   // m x r, contiguous
  const void* gA;
  const void* gB;
  void* iA;        // states: float32 or float64, shapes of A / B
  void* iB;
  void* uA;
  void* uB;
  void* scores;    // (r,), state dtype
  int64_t r, n, m;
};
// `layers` and `pair_offsets` (L + 1 prefix sums of r) are device arrays; one block per pair.
void pair_importance(const ImportanceLayer* layers, const int64_t* pair_offsets, int L,
                     int64_t total_pairs, DType param, DType state, double beta1, double beta2,
                     cudaStream_t s);

// ---- recomposition: W += s (B[:, idx] A[idx] - Bn An), then B[:, idx] = Bn (or 0), A[idx] = An --
struct RecomposeLayer {
  void* W;
  int64_t ws0, ws1, m, n;
  void* B;           // m x r (old values read by the W pass, overwritten by the factor pass)
  int64_t bs0, bs1;
  void* A;           // r x n
  int64_t as0, as1;
  const void* Bn;    // m x q or null (fusion: new pairs are zero)
  int64_t bns0, bns1;
  const void* An;    // q x n or null
  int64_t ans0, ans1;
  int64_t q;         // pairs; their indices are idx_all[pair_offsets[l] .. + q)
  double s;
};
// Two launches for all layers of one (W dtype, factor dtype) group: the W pass (row tiles of
// every layer; arithmetic in the CPU kernel's order, so the same bits) and the factor pass.
// `row_tiles` / `pair_offsets`: device prefix sums (L + 1) of each layer's row tiles / q;
// `idx_all`: every layer's pair indices, concatenated (device; layer l's at pair_offsets[l]).
void recompose(const RecomposeLayer* layers, const int64_t* row_tiles, const int64_t* pair_offsets,
               const int64_t* idx_all, int L, int64_t total_tiles, int64_t total_pairs, int rows_per_tile,
               DType w, DType f, cudaStream_t s);

// ---- batched small SVD (csrc/include/subspace_ext/small_svd.h): one block per matrix ----------
// a: batch x (p x q) column-major inputs (overwritten), v: batch x q x q and norms: batch x q
// scratch; u (batch x p x q), s (batch x q), vout (batch x q x q) column-major results; p >= q.
// Where a matrix, its V and norms (8 (p q + q^2 + q) bytes) fit `smem_limit` (the device's opt-in
// shared memory per block) the blocks work in shared memory. Returns the error of raising the
// kernel's shared-memory limit.
cudaError_t small_svd(double* a, double* v, double* norms, double* u, double* s, double* vout,
                      int64_t batch, int p, int q, size_t smem_limit, cudaStream_t st);

// ---- Gram-Cholesky transform (csrc/include/subspace_ext/gram_orth.h): one block per matrix -------
// g: batch x q x q column-major Gram matrices (upper triangles read; overwritten), d: batch x q
// scratch; t: batch x q x q column-major T (Y T orthonormal for G = Y^T Y), complete: batch flags
// (no pivot dropped). Where g and d of a matrix (8 (q^2 + q) bytes) fit `smem_limit` the blocks
// work in shared memory. Returns the error of raising the kernel's shared-memory limit.
cudaError_t gram_orth(double* g, double* d, double* t, bool* complete, int64_t batch, int q, size_t smem_limit,
                      cudaStream_t st);

// ---- project_perturbed (csrc/cuda/project_cuda.cu) ----------------------------------------------
// partial[c] (k x r, chunks x k x r contiguous) = (U + eps N)^T Y over rows [c * rows_per_chunk,
// ...) of U (m x k, strides us0/us1) and Y (m x r, strides ys0/ys1); N: Philox normals of (seed,
// stream) at U's row-major positions, generated in the tile loader. float32 / float64 only.
// Returns the error of raising the kernel's shared-memory limit (ranks needing over 48 KiB).
cudaError_t perturbed_tn(const void* U, int64_t us0, int64_t us1, int64_t m, int64_t k, const void* Y,
                         int64_t ys0, int64_t ys1, int64_t r, DType dt, double eps, uint64_t seed,
                         uint64_t stream, int64_t rows_per_chunk, void* partial, cudaStream_t st);
// Dynamic shared memory the kernel takes for rank r and element size `elem` (at most the device's
// opt-in limit: 227 KiB on H100/H200).
size_t perturbed_tn_smem_bytes(int64_t r, size_t elem);

// ---- reconstruct_perturbed (csrc/cuda/project_cuda.cu) ------------------------------------------
// out (p x q, strides os0/os1) = X (p x k) (U + eps N)^T, U q x k, N as for perturbed_tn. A block
// holds a strip of tq perturbed rows of U (tq * nt_row_stride(k) elements of shared memory) and runs over
// rows_per_split rows of X; grid (strips, splits). float32 / float64 only.
// The strip's row stride: odd (k | 1), so that lanes reading one column of different rows miss bank conflicts.
constexpr int64_t nt_row_stride(int64_t k) { return k | 1; }
struct NtPlan {
  int tq = 0;                // strip rows; 0: a single row of U does not fit smem_limit
  size_t smem = 0;           // dynamic shared memory bytes
  int64_t strips = 0, splits = 0, rows_per_split = 0;
};
NtPlan perturbed_nt_plan(int64_t p, int64_t k, int64_t q, size_t elem, size_t smem_limit, int sms);
// Returns the error of raising the kernel's shared-memory limit (plans above 48 KiB); the launch
// itself is checked by the caller.
cudaError_t perturbed_nt(const void* X, int64_t xs0, int64_t xs1, int64_t p, int64_t k, const void* U,
                         int64_t us0, int64_t us1, int64_t q, DType dt, double eps, uint64_t seed,
                         uint64_t stream, const NtPlan& plan, void* out, int64_t os0, int64_t os1,
                         cudaStream_t st);

}  // namespace cuda
}  // namespace subspace_ext
