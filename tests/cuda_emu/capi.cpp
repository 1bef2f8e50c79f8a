// C entry points (for ctypes) to the launchers of csrc/cuda, compiled for the host emulation in
// include/cuda_runtime.h. Pointers are host memory standing in for device memory; each call
// returns 0, or 1 with emu_last_error() describing a launch CUDA would have rejected.
#include <cuda_runtime.h>

#include "kernels.h"

namespace cu = subspace_ext::cuda;

namespace {
int status() { return emu::last_error().empty() ? 0 : 1; }
// status() after a launcher that returns a CUDA runtime call's error (`what` names the call).
int status(cudaError_t err, const char* what) {
  if (err != cudaSuccess) emu::last_error() = what;
  return status();
}

__global__ void count_threads(int* n) {
  __syncthreads();
  if (threadIdx.x == 0) n[blockIdx.y * gridDim.x + blockIdx.x] = static_cast<int>(blockDim.x);
}
}  // namespace

extern "C" {

const char* emu_last_error() { return emu::last_error().c_str(); }
void emu_reset() {
  emu::last_error().clear();
  emu::launches() = 0;
}
long emu_launches() { return emu::launches(); }
size_t emu_last_smem() { return emu::last_smem(); }

// The emulator's own launch checks: a trivial kernel on (grid_x, grid_y) blocks of `threads`.
int emu_selftest_launch(int* out, unsigned grid_x, unsigned grid_y, int threads, size_t smem) {
  ::emu::Launch(dim3(grid_x, grid_y), threads, smem, nullptr)(count_threads, out);
  return status();
}

// sms: the emulated device's SMs; each holds one thread block of a philox kernel
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor's emulation), so the grid is at most sms blocks.

int emu_philox_uint32(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, int sms) {
  return status(cu::philox_uint32(out, n, seed, stream, sms, nullptr), "occupancy query failed");
}

int emu_philox_normal(void* out, int dt, int64_t n, uint64_t seed, uint64_t stream, double eps, int add, int sms) {
  return status(cu::philox_normal(out, static_cast<cu::DType>(dt), n, seed, stream, eps, add != 0, sms, nullptr),
                "occupancy query failed");
}

int emu_philox_normal_icdf(float* out, int64_t n, uint64_t seed, uint64_t stream, int sms) {
  return status(cu::philox_normal_icdf(out, n, seed, stream, sms, nullptr), "occupancy query failed");
}

int emu_perturbed_tn(const void* U, int64_t us0, int64_t us1, int64_t m, int64_t k, const void* Y, int64_t ys0,
                     int64_t ys1, int64_t r, int dt, double eps, uint64_t seed, uint64_t stream,
                     int64_t rows_per_chunk, void* partial) {
  return status(cu::perturbed_tn(U, us0, us1, m, k, Y, ys0, ys1, r, static_cast<cu::DType>(dt), eps, seed, stream,
                                 rows_per_chunk, partial, nullptr),
                "cudaFuncSetAttribute failed");
}

// sms: the streaming multiprocessors the plan spreads the grid over (132 on an H100 SXM).
int emu_perturbed_nt(const void* X, int64_t xs0, int64_t xs1, int64_t p, int64_t k, const void* U, int64_t us0,
                     int64_t us1, int64_t q, int dt, double eps, uint64_t seed, uint64_t stream, void* out,
                     int64_t os0, int64_t os1, int sms, int* tq, int64_t* splits) {
  const cu::NtPlan plan = cu::perturbed_nt_plan(p, k, q, dt == 0 ? 4 : 8, emu::kOptinSmem, sms);
  *tq = plan.tq;
  *splits = plan.splits;
  if (plan.tq == 0) {
    emu::last_error() = "perturbed_nt: no plan";
    return 1;
  }
  return status(cu::perturbed_nt(X, xs0, xs1, p, k, U, us0, us1, q, static_cast<cu::DType>(dt), eps, seed, stream, plan,
                                 out, os0, os1, nullptr),
                "cudaFuncSetAttribute failed");
}

int emu_small_svd(double* a, double* v, double* norms, double* u, double* s, double* vout, int64_t batch, int p,
                  int q, int64_t smem_limit) {
  return status(cu::small_svd(a, v, norms, u, s, vout, batch, p, q, static_cast<size_t>(smem_limit), nullptr),
                "cudaFuncSetAttribute failed");
}

int emu_gram_orth(double* g, double* d, double* t, bool* complete, int64_t batch, int q, int64_t smem_limit) {
  return status(cu::gram_orth(g, d, t, complete, batch, q, static_cast<size_t>(smem_limit), nullptr),
                "cudaFuncSetAttribute failed");
}

int emu_pair_importance(const cu::ImportanceLayer* layers, const int64_t* offsets, int L, int64_t total, int param,
                        int state, double beta1, double beta2) {
  cu::pair_importance(layers, offsets, L, total, static_cast<cu::DType>(param), static_cast<cu::DType>(state), beta1,
                      beta2, nullptr);
  return status();
}

int emu_recompose(const cu::RecomposeLayer* layers, const int64_t* tiles, const int64_t* pairs, const int64_t* idx,
                  int L, int64_t total_tiles, int64_t total_pairs, int rows_per_tile, int w, int f) {
  cu::recompose(layers, tiles, pairs, idx, L, total_tiles, total_pairs, rows_per_tile, static_cast<cu::DType>(w),
                static_cast<cu::DType>(f), nullptr);
  return status();
}

}  // extern "C"
