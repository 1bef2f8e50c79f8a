// Dynamic shared memory above the 48 KiB default, for the .cu files (CUDA runtime only).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace subspace_ext {
namespace cuda {

// Raise `kernel`'s dynamic shared-memory limit to `bytes` on the current device, where its limit is
// lower (the caller checked `bytes` plus the kernel's static shared memory against the device's
// opt-in limit). A kernel's limit starts at 48 KiB minus its static shared memory (cudaFuncGetAttributes
// says how much), so a kernel with any `__shared__` variable cannot take a full 48 KiB without the
// attribute. Returns the first failing call's error. The attribute is one value per kernel and
// device, shared by every host thread: it is only ever raised (under a lock), so a call with a
// smaller need cannot lower it between another thread's set and launch.
template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, size_t> limit;  // the kernel's dynamic limit now
  const std::lock_guard<std::mutex> hold(lock);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  auto it = limit.find(key);
  if (it == limit.end()) {
    cudaFuncAttributes attr{};
    if (const cudaError_t err = cudaFuncGetAttributes(&attr, kernel); err != cudaSuccess) return err;
    it = limit.emplace(key, static_cast<size_t>(attr.maxDynamicSharedSizeBytes)).first;
  }
  if (bytes <= it->second) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) it->second = bytes;
  return err;
}

}  // namespace cuda
}  // namespace subspace_ext
