// Dynamic shared memory above the 48 KiB default, for the .cu files (CUDA runtime only).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace subspace_ext {
namespace cuda {

// Raise `kernel`'s dynamic shared-memory limit to `bytes` on the current device (once per kernel,
// device and size; a no-op up to 48 KiB). Returns cudaFuncSetAttribute's error.
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
