// CUDA kernels of the philox family. The arithmetic is the shared header's (philox.h): the device
// pass uses the _rn intrinsics and the build passes -fmad=false, so every number equals the CPU's.
#include "kernels.h"
#include "subspace_ext/philox.h"

namespace subspace_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline int grid_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);  // grid-stride beyond
}

__global__ void philox_uint32_kernel(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::U32x4 x = philox::block_bits(seed, stream, static_cast<uint64_t>(b));
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (4 * b + j < n) out[4 * b + j] = x.v[j];
  }
}

// One thread per Philox block: out[i] = z (or out[i] + eps * z, rounded as the CPU rounds it).
template <typename T>
__global__ void normal_kernel(T* out, int64_t n, uint64_t seed, uint64_t stream, T eps, bool add) {
  constexpr int per = philox::PerBlock<T>::value;
  const int64_t blocks = (n + per - 1) / per;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T z[per];
    philox::normals_of_block(seed, stream, static_cast<uint64_t>(b), z);
#pragma unroll
    for (int j = 0; j < per; ++j) {
      const int64_t i = b * per + j;
      if (i < n) out[i] = add ? philox::add(out[i], philox::mul(eps, z[j])) : z[j];
    }
  }
}

}  // namespace

void philox_uint32(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, cudaStream_t s) {
  if (n == 0) return;
  philox_uint32_kernel<<<grid_for((n + 3) / 4), kThreads, 0, s>>>(out, n, seed, stream);
}

void philox_normal(void* out, DType dt, int64_t n, uint64_t seed, uint64_t stream, double eps,
                   bool add, cudaStream_t s) {
  if (n == 0) return;
  if (dt == DType::F32) {
    normal_kernel<float><<<grid_for((n + 3) / 4), kThreads, 0, s>>>(
        static_cast<float*>(out), n, seed, stream, static_cast<float>(eps), add);
  } else {
    normal_kernel<double><<<grid_for((n + 1) / 2), kThreads, 0, s>>>(
        static_cast<double*>(out), n, seed, stream, eps, add);
  }
}

}  // namespace cuda
}  // namespace subspace_ext
