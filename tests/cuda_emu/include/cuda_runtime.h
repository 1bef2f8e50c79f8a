// Host emulation of the slice of the CUDA runtime and language the kernels in csrc/cuda use, so
// their index arithmetic, barriers and launch configurations run (and fail) on a machine without a
// GPU (tests/test_cuda_emulation.py). Each block runs as blockDim real threads with a std::barrier
// for __syncthreads; blocks run one after another; __shared__ variables are statics (shared by a
// block's threads); dynamic shared memory is filled with 0xFF bytes (NaN) before each block, so a
// read of an entry no thread wrote shows. Launch limits are checked as CUDA checks them. The
// emulation cannot see a kernel's static __shared__ size, so it takes every kernel to have
// kStaticSmem bytes of it: the default dynamic limit is 48 KiB less that, as on a GPU for a kernel
// with that much, so a launcher that takes a kernel's limit to be a flat 48 KiB fails here.
// __shfl_xor_sync exchanges values within an aligned segment of `width` lanes of a warp (the
// masks the kernels use: the whole segment; any other mask is reported as an error).
// Not emulated: device arithmetic (FMA contraction, intrinsics' rounding), warp scheduling,
// memory spaces.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__

using std::fabs;
using std::fma;
using std::max;
using std::min;
using std::sqrt;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
struct alignas(16) float4 { float x, y, z, w; };  // CUDA's 16-byte vector types
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(16) double2 { double x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kOptinSmem = 227 * 1024;  // H100 / H200: sharedMemPerBlockOptin
constexpr size_t kStaticSmem = 64;         // taken as every kernel's static __shared__ bytes

inline std::string& last_error() { static std::string e; return e; }
inline std::map<const void*, size_t>& smem_optin() { static std::map<const void*, size_t> m; return m; }
inline std::vector<unsigned char>& dyn() { static std::vector<unsigned char> d; return d; }
inline unsigned char* dyn_smem() { return dyn().data(); }
inline long& launches() { static long n = 0; return n; }
inline size_t& last_smem() { static size_t n = 0; return n; }  // dynamic smem of the latest launch

// The lanes of one shuffle segment: a barrier for them and a slot per lane.
struct Segment {
  std::barrier<> bar;
  unsigned char slot[32][8];
  explicit Segment(std::ptrdiff_t width) : bar(width) {}
};

struct BlockState {
  std::barrier<>* bar;
  unsigned long threads;
  std::atomic<int> flag{0};
  std::mutex m;
  std::map<std::pair<int, unsigned long>, std::unique_ptr<Segment>> segments;  // (width, index)
  Segment& segment(int width, unsigned long index) {
    std::lock_guard<std::mutex> lock(m);
    auto& s = segments[{width, index}];
    if (!s) s = std::make_unique<Segment>(width);
    return *s;
  }
};

inline void fail(const std::string& what) {
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  if (last_error().empty()) last_error() = what;
}
inline thread_local BlockState* block = nullptr;

struct Launch {
  dim3 grid, threads;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), threads(b), smem(s) {}
  template <class F, class... A> void operator()(F f, A... args) {
    ++launches();
    last_smem() = smem;
    const unsigned long n = static_cast<unsigned long>(threads.x) * threads.y * threads.z;
    const auto limit = smem_optin().count(reinterpret_cast<const void*>(f)) ? smem_optin()[reinterpret_cast<const void*>(f)]
                                                                            : kDefaultSmem - kStaticSmem;
    if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
        smem > limit) {
      last_error() = "invalid launch: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                     std::to_string(grid.z) + "), block " + std::to_string(n) + ", dynamic smem " +
                     std::to_string(smem) + " (limit " + std::to_string(limit) + ")";
      return;
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          dyn().assign(smem + 16, 0xFF);
          std::barrier<> bar(static_cast<std::ptrdiff_t>(n));
          BlockState st{&bar, n};
          std::vector<std::thread> ts;
          ts.reserve(n);
          for (unsigned long t = 0; t < n; ++t)
            ts.emplace_back([&, t] {
              threadIdx = dim3(t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y));
              blockIdx = dim3(bx, by, bz);
              blockDim = threads;
              gridDim = grid;
              block = &st;
              f(args...);
              bar.arrive_and_drop();  // an exited thread no longer takes part in barriers
            });
          for (auto& t : ts) t.join();
        }
  }
};

}  // namespace emu

inline void __syncthreads() { emu::block->bar->arrive_and_wait(); }
inline int __syncthreads_or(int pred) {
  emu::BlockState& b = *emu::block;
  b.bar->arrive_and_wait();
  if (pred) b.flag.store(1);
  b.bar->arrive_and_wait();
  const int r = b.flag.load();
  b.bar->arrive_and_wait();
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) b.flag.store(0);
  return r;
}

// Lane l of a `width`-lane segment gets `var` of lane l ^ lane_mask; every lane of the segment
// must call it (mask: exactly the segment's lanes), as CUDA requires.
template <class T> T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  emu::BlockState& b = *emu::block;
  const unsigned long t = threadIdx.x + blockDim.x * (threadIdx.y + static_cast<unsigned long>(blockDim.y) * threadIdx.z);
  const unsigned lane = static_cast<unsigned>(t % 32);
  const bool shape = width >= 1 && width <= 32 && (width & (width - 1)) == 0 && lane_mask >= 0 && lane_mask < width;
  const unsigned base = shape ? lane / width * width : 0;
  const unsigned want = width == 32 ? 0xFFFFFFFFu : ((1u << (shape ? width : 1)) - 1u) << base;
  if (!shape || mask != want || t - lane + base + width > b.threads) {
    emu::fail("__shfl_xor_sync: mask " + std::to_string(mask) + ", width " + std::to_string(width) + ", lane_mask " +
              std::to_string(lane_mask) + " (the emulator takes whole segments of a full warp)");
    return var;
  }
  emu::Segment& seg = b.segment(width, t / width);
  const unsigned me = static_cast<unsigned>(t % width);
  std::memcpy(seg.slot[me], &var, sizeof(T));
  seg.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, seg.slot[me ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  seg.bar.arrive_and_wait();
  return r;
}

inline cudaError_t cudaGetDevice(int* dev) { *dev = 0; return cudaSuccess; }  // one emulated device
// One resident thread block per SM whatever the kernel: the launches run their blocks one by one.
template <class F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int threads, size_t smem) {
  if (threads <= 0 || threads > 1024 || smem > emu::kOptinSmem) return cudaErrorInvalidValue;
  *n = 1;
  return cudaSuccess;
}
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxDynamicSharedSizeBytes;
};
template <class F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F f) {
  const auto it = emu::smem_optin().find(reinterpret_cast<const void*>(f));
  attr->sharedSizeBytes = emu::kStaticSmem;
  attr->maxDynamicSharedSizeBytes =
      static_cast<int>(it != emu::smem_optin().end() ? it->second : emu::kDefaultSmem - emu::kStaticSmem);
  return cudaSuccess;
}
template <class F> cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int value) {
  if (value < 0 || static_cast<size_t>(value) + emu::kStaticSmem > emu::kOptinSmem) return cudaErrorInvalidValue;
  emu::smem_optin()[reinterpret_cast<const void*>(f)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// IEEE round-to-nearest intrinsics: plain host arithmetic (the host build has no FMA contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
