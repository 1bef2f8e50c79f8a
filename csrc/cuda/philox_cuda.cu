// CUDA kernels of the philox family. The arithmetic is the shared header's (philox.h): the device
// pass uses the _rn intrinsics and the build passes -fmad=false, so every number equals the CPU's.
//
// Shape of every kernel here: one Philox block (4 words) per step, 16 bytes of output. The grid is
// one wave of resident thread blocks (the kernel's occupancy x the SMs), each thread stepping over
// the Philox blocks by the grid's thread count, two per iteration (independent chains to overlap,
// one loop test per two). So the fixed start of a thread (the 20 round keys, the icdf table copy)
// is paid once per thread, not once per block, and the loop carries no tail tests: the whole
// blocks are the loop, the partial last block (n not a multiple of 4 numbers) is the grid's first
// thread's, after it.
#include <algorithm>

#include "kernels.h"
#include "smem.h"
#include "subspace_ext/normal_icdf_table.h"
#include "subspace_ext/philox.h"

namespace subspace_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Thread blocks of `kernel` (kThreads each, no dynamic shared memory) resident on one SM of the
// current device, asked once per kernel and device.
template <typename K>
cudaError_t resident_per_sm(K kernel, int* per_sm) {
  return with_kernel_slot(kernel, [&](long long& known) {
    if (known == 0) {
      int n = 0;
      if (const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0);
          err != cudaSuccess)
        return err;
      known = n;
    }
    *per_sm = static_cast<int>(std::max<long long>(known, 1));
    return cudaSuccess;
  });
}

// Launch `kernel` for `blocks` Philox blocks: one thread each, at most one resident wave.
template <typename K, typename... A>
cudaError_t launch_wave(K kernel, int64_t blocks, int sms, cudaStream_t s, A... args) {
  int per_sm = 1;
  if (const cudaError_t err = resident_per_sm(kernel, &per_sm); err != cudaSuccess) return err;
  const int64_t wave = static_cast<int64_t>(std::max(sms, 1)) * per_sm;
  const int64_t need = std::max<int64_t>((blocks + kThreads - 1) / kThreads, 1);
  kernel<<<static_cast<int>(std::min(need, wave)), kThreads, 0, s>>>(args...);
  return cudaSuccess;
}

// f(b, count) for this thread's Philox blocks: each whole block b < whole with count = Per (its
// output elements), two per iteration; then, on the grid's first thread, the partial block `whole`
// with count = rest (none when rest is 0).
template <int Per, typename F>
__device__ __forceinline__ void for_my_blocks(int64_t whole, int rest, F&& f) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; b + step < whole; b += 2 * step) {
    f(b, Per);
    f(b + step, Per);
  }
  if (b < whole) f(b, Per);
  if (rest != 0 && blockIdx.x == 0 && threadIdx.x == 0) f(whole, rest);
}

// Write (or, with Add, add eps times) the `count` values z of a block to o: one 16-byte access for a
// whole block where `o` is aligned (Vec), else element by element.
template <typename V> struct Vec16;
template <> struct Vec16<float> { using type = float4; };
template <> struct Vec16<double> { using type = double2; };
template <> struct Vec16<uint32_t> { using type = uint4; };

template <bool Add, bool Vec, int Per, typename T>
__device__ __forceinline__ void put(T* o, const T (&z)[Per], int count, T eps) {
  using V = typename Vec16<T>::type;
  static_assert(sizeof(V) == Per * sizeof(T), "one Philox block of output is 16 bytes");
  if (Vec && count == Per) {
    V v;
    T* w = reinterpret_cast<T*>(&v);
    if constexpr (Add) v = *reinterpret_cast<const V*>(o);
#pragma unroll
    for (int j = 0; j < Per; ++j) {
      if constexpr (Add) w[j] = philox::add(w[j], philox::mul(eps, z[j]));
      else w[j] = z[j];
    }
    *reinterpret_cast<V*>(o) = v;
  } else {
#pragma unroll
    for (int j = 0; j < Per; ++j) {
      if (j < count) {
        if constexpr (Add) o[j] = philox::add(o[j], philox::mul(eps, z[j]));
        else o[j] = z[j];
      }
    }
  }
}

template <bool Vec>
__global__ void philox_uint32_kernel(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream) {
  for_my_blocks<4>(n / 4, static_cast<int>(n % 4), [&](int64_t b, int count) {
    const philox::U32x4 x = philox::block_bits(seed, stream, static_cast<uint64_t>(b));
    const uint32_t z[4] = {x.v[0], x.v[1], x.v[2], x.v[3]};
    put<false, Vec>(out + 4 * b, z, count, 0u);
  });
}

// out[i] = z (or out[i] + eps * z, rounded as the CPU rounds it).
template <typename T, bool Add, bool Vec>
__global__ void normal_kernel(T* out, int64_t n, uint64_t seed, uint64_t stream, T eps) {
  constexpr int per = philox::PerBlock<T>::value;
  for_my_blocks<per>(n / per, static_cast<int>(n % per), [&](int64_t b, int count) {
    T z[per];
    philox::normals_of_block(seed, stream, static_cast<uint64_t>(b), z);
    put<Add, Vec>(out + b * per, z, count, eps);
  });
}

template <typename T>
cudaError_t launch_normal(T* out, int64_t n, uint64_t seed, uint64_t stream, T eps, bool add, int sms,
                          cudaStream_t s) {
  const int64_t blocks = (n + philox::PerBlock<T>::value - 1) / philox::PerBlock<T>::value;
  const bool vec = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (add && vec) return launch_wave(normal_kernel<T, true, true>, blocks, sms, s, out, n, seed, stream, eps);
  if (add) return launch_wave(normal_kernel<T, true, false>, blocks, sms, s, out, n, seed, stream, eps);
  if (vec) return launch_wave(normal_kernel<T, false, true>, blocks, sms, s, out, n, seed, stream, eps);
  return launch_wave(normal_kernel<T, false, false>, blocks, sms, s, out, n, seed, stream, eps);
}

// The icdf transform: 4 words -> 4 normals. The 4 KB coefficient table is copied to shared memory
// once per thread block: each number reads its segment's 6 coefficients there (two vector loads).
constexpr int kIcdfFloats = SUBSPACE_EXT_NORMAL_ICDF_SEGMENTS * SUBSPACE_EXT_NORMAL_ICDF_STRIDE;
__align__(16) __constant__ float kIcdfTable[kIcdfFloats] = {SUBSPACE_EXT_NORMAL_ICDF_COEFFS};

template <bool Vec>
__global__ void normal_icdf_kernel(float* out, int64_t n, uint64_t seed, uint64_t stream) {
  __shared__ float4 tab4[kIcdfFloats / 4];  // float4: 16-byte aligned for the vector loads
  for (int i = threadIdx.x; i < kIcdfFloats / 4; i += blockDim.x)
    tab4[i] = reinterpret_cast<const float4*>(kIcdfTable)[i];
  __syncthreads();
  const float* tab = reinterpret_cast<const float*>(tab4);
  for_my_blocks<4>(n / 4, static_cast<int>(n % 4), [&](int64_t b, int count) {
    const philox::U32x4 x = philox::block_bits(seed, stream, static_cast<uint64_t>(b));
    float z[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) z[j] = philox::icdf_normal(x.v[j], tab);
    put<false, Vec>(out + 4 * b, z, count, 0.0f);
  });
}

}  // namespace

cudaError_t philox_uint32(uint32_t* out, int64_t n, uint64_t seed, uint64_t stream, int sms, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(out) % 16 == 0)
    return launch_wave(philox_uint32_kernel<true>, (n + 3) / 4, sms, s, out, n, seed, stream);
  return launch_wave(philox_uint32_kernel<false>, (n + 3) / 4, sms, s, out, n, seed, stream);
}

cudaError_t philox_normal_icdf(float* out, int64_t n, uint64_t seed, uint64_t stream, int sms, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  if (reinterpret_cast<uintptr_t>(out) % 16 == 0)
    return launch_wave(normal_icdf_kernel<true>, (n + 3) / 4, sms, s, out, n, seed, stream);
  return launch_wave(normal_icdf_kernel<false>, (n + 3) / 4, sms, s, out, n, seed, stream);
}

cudaError_t philox_normal(void* out, DType dt, int64_t n, uint64_t seed, uint64_t stream, double eps, bool add,
                          int sms, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  if (dt == DType::F32)
    return launch_normal(static_cast<float*>(out), n, seed, stream, static_cast<float>(eps), add, sms, s);
  return launch_normal(static_cast<double*>(out), n, seed, stream, eps, add, sms, s);
}

}  // namespace cuda
}  // namespace subspace_ext
