// Host-side settings of a kernel for the .cu files (CUDA runtime only): a value cached per kernel
// and device, and dynamic shared memory above a kernel's default limit.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace subspace_ext {
namespace cuda {

// Calls f(slot) under a lock, with the value cached for `kernel` on the current device (0 until f
// sets it): a query made once per kernel and device, shared by every host thread. Each call site
// (f's type) has its own cache, so two queries about one kernel never share a slot. Returns f's error.
template <typename K, typename F>
cudaError_t with_kernel_slot(K kernel, F&& f) {
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, long long> slots;
  const std::lock_guard<std::mutex> hold(lock);
  return f(slots[{reinterpret_cast<const void*>(kernel), dev}]);
}

// Raise `kernel`'s dynamic shared-memory limit to `bytes` on the current device, where its limit is
// lower (the caller checked `bytes` plus the kernel's static shared memory against the device's
// opt-in limit). A kernel's limit starts at 48 KiB minus its static shared memory (cudaFuncGetAttributes
// says how much), so a kernel with any `__shared__` variable cannot take a full 48 KiB without the
// attribute. Returns the first failing call's error. The cached limit is only ever raised (under the
// lock), so a call with a smaller need cannot lower it between another thread's set and launch.
template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  return with_kernel_slot(kernel, [&](long long& limit) {
    if (limit == 0) {  // never 0 once known: 48 KiB less the static shared memory
      cudaFuncAttributes attr{};
      if (const cudaError_t err = cudaFuncGetAttributes(&attr, kernel); err != cudaSuccess) return err;
      limit = attr.maxDynamicSharedSizeBytes;
    }
    if (static_cast<long long>(bytes) <= limit) return cudaSuccess;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err == cudaSuccess) limit = static_cast<long long>(bytes);
    return err;
  });
}

}  // namespace cuda
}  // namespace subspace_ext
