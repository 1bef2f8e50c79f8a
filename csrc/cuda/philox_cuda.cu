// CUDA kernels of the philox family. The arithmetic is the shared header's (philox.h): the device
// pass uses the _rn intrinsics and the build passes -fmad=false, so every number equals the CPU's.
#include "kernels.h"
#include "subspace_ext/normal_icdf_table.h"
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
// A block's `per` outputs are 16 bytes; where `out` is 16-byte aligned (Vec) every whole block is
// one vector store (and load, when adding), and only the last, partial block checks each index.
template <typename T> struct Vec16;
template <> struct Vec16<float> { using type = float4; };
template <> struct Vec16<double> { using type = double2; };

template <typename T, bool Add, bool Vec>
__global__ void normal_kernel(T* out, int64_t n, uint64_t seed, uint64_t stream, T eps) {
  constexpr int per = philox::PerBlock<T>::value;
  using V = typename Vec16<T>::type;
  static_assert(sizeof(V) == per * sizeof(T), "one Philox block of normals is 16 bytes");
  const int64_t blocks = (n + per - 1) / per, whole = n / per;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T z[per];
    philox::normals_of_block(seed, stream, static_cast<uint64_t>(b), z);
    T* o = out + b * per;
    if (Vec && b < whole) {
      V v;
      T* w = reinterpret_cast<T*>(&v);
      if (Add) v = *reinterpret_cast<const V*>(o);
#pragma unroll
      for (int j = 0; j < per; ++j) w[j] = Add ? philox::add(w[j], philox::mul(eps, z[j])) : z[j];
      *reinterpret_cast<V*>(o) = v;
    } else {
#pragma unroll
      for (int j = 0; j < per; ++j)
        if (b < whole || b * per + j < n) o[j] = Add ? philox::add(o[j], philox::mul(eps, z[j])) : z[j];
    }
  }
}

template <typename T>
void launch_normal(T* out, int64_t n, uint64_t seed, uint64_t stream, T eps, bool add, cudaStream_t s) {
  const int grid = grid_for((n + philox::PerBlock<T>::value - 1) / philox::PerBlock<T>::value);
  const bool vec = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (add && vec) normal_kernel<T, true, true><<<grid, kThreads, 0, s>>>(out, n, seed, stream, eps);
  else if (add) normal_kernel<T, true, false><<<grid, kThreads, 0, s>>>(out, n, seed, stream, eps);
  else if (vec) normal_kernel<T, false, true><<<grid, kThreads, 0, s>>>(out, n, seed, stream, eps);
  else normal_kernel<T, false, false><<<grid, kThreads, 0, s>>>(out, n, seed, stream, eps);
}

// The icdf transform: one thread per Philox block, 4 words -> 4 normals, one 16-byte store where
// `out` is aligned. The 4 KB coefficient table is copied to shared memory once per thread block:
// each number reads its segment's 6 coefficients there (two vector loads).
constexpr int kIcdfFloats = SUBSPACE_EXT_NORMAL_ICDF_SEGMENTS * SUBSPACE_EXT_NORMAL_ICDF_STRIDE;
__align__(16) __constant__ float kIcdfTable[kIcdfFloats] = {SUBSPACE_EXT_NORMAL_ICDF_COEFFS};

template <bool Vec>
__global__ void normal_icdf_kernel(float* out, int64_t n, uint64_t seed, uint64_t stream) {
  __shared__ float4 tab4[kIcdfFloats / 4];  // float4: 16-byte aligned for the vector loads
  for (int i = threadIdx.x; i < kIcdfFloats / 4; i += blockDim.x)
    tab4[i] = reinterpret_cast<const float4*>(kIcdfTable)[i];
  __syncthreads();
  const float* tab = reinterpret_cast<const float*>(tab4);
  const int64_t blocks = (n + 3) / 4, whole = n / 4;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::U32x4 x = philox::block_bits(seed, stream, static_cast<uint64_t>(b));
    float z[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) z[j] = philox::icdf_normal(x.v[j], tab);
    if (Vec && b < whole) {
      reinterpret_cast<float4*>(out)[b] = make_float4(z[0], z[1], z[2], z[3]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (4 * b + j < n) out[4 * b + j] = z[j];
    }
  }
}

}  // namespace

void philox_uint32(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, cudaStream_t s) {
  if (n == 0) return;
  philox_uint32_kernel<<<grid_for((n + 3) / 4), kThreads, 0, s>>>(out, n, seed, stream);
}

void philox_normal_icdf(float* out, int64_t n, uint64_t seed, uint64_t stream, cudaStream_t s) {
  if (n == 0) return;
  const int grid = grid_for((n + 3) / 4);
  if (reinterpret_cast<uintptr_t>(out) % 16 == 0)
    normal_icdf_kernel<true><<<grid, kThreads, 0, s>>>(out, n, seed, stream);
  else
    normal_icdf_kernel<false><<<grid, kThreads, 0, s>>>(out, n, seed, stream);
}

void philox_normal(void* out, DType dt, int64_t n, uint64_t seed, uint64_t stream, double eps,
                   bool add, cudaStream_t s) {
  if (n == 0) return;
  if (dt == DType::F32)
    launch_normal(static_cast<float*>(out), n, seed, stream, static_cast<float>(eps), add, s);
  else
    launch_normal(static_cast<double*>(out), n, seed, stream, eps, add, s);
}

}  // namespace cuda
}  // namespace subspace_ext
