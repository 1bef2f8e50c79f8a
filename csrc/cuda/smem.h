// Dynamic shared memory above the 48 KiB default, for the .cu files (CUDA runtime only).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace subspace_ext {
namespace cuda {

// Raise `kernel`'s dynamic shared-memory limit to `bytes` on the current device (a no-op up to the
// default 48 KiB; the caller checked `bytes` against the device's opt-in limit). Returns
// cudaFuncSetAttribute's error. The attribute is one value per kernel and device, shared by every
// host thread: it is only ever raised (under a lock), so a call with a smaller need cannot lower it
// between another thread's set and launch.
template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, size_t> raised;
  const std::lock_guard<std::mutex> hold(lock);
  size_t& now = raised[{reinterpret_cast<const void*>(kernel), dev}];
  if (bytes <= now) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) now = bytes;
  return err;
}

}  // namespace cuda
}  // namespace subspace_ext
