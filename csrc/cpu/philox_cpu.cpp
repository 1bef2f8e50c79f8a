// CPU kernels of the philox family: raw Philox bits, standard normals, perturbed bases.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "subspace_ext/philox.h"
#include "utils.h"

namespace subspace_ext {
namespace {

void philox_uint32_cpu_(const at::Tensor& out, int64_t seed, int64_t stream) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kInt && out.is_contiguous(),
              "philox_uint32_: out must be a contiguous int32 tensor");
  auto* p = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int64_t n = out.numel();
  const auto s = static_cast<uint64_t>(seed), st = static_cast<uint64_t>(stream);
  at::parallel_for(0, (n + 3) / 4, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto x = philox::block_bits(s, st, static_cast<uint64_t>(b));
      for (int j = 0; j < 4 && 4 * b + j < n; ++j) p[4 * b + j] = x.v[j];
    }
  });
}

}  // namespace

void philox_normal_fill(const at::Tensor& out, int64_t seed, int64_t stream) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
                   "philox_normal_: out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "philox_normal_: out must be contiguous");
  if (out.is_cuda()) {
#ifdef SUBSPACE_EXT_WITH_CUDA
    return philox_normal_fill_cuda(out, seed, stream);
#else
    TORCH_CHECK_VALUE(false, "philox_normal_: a CUDA tensor, but this build has no CUDA kernels");
#endif
  }
  const int64_t n = out.numel();
  const auto s = static_cast<uint64_t>(seed), st = static_cast<uint64_t>(stream);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_", [&] {
    auto* p = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 8192, [&](int64_t i0, int64_t i1) {
      philox::for_each_normal<scalar_t>(s, st, i0, i1, [&](int64_t i, scalar_t z) { p[i] = z; });
    });
  });
}

namespace {

// U + eps * N(seed, stream), N indexed by the row-major position in U's (..., m, k) shape.
// The noise is generated inside the loop and never stored.
at::Tensor perturbed_basis_cpu(const at::Tensor& U, double eps, int64_t seed, int64_t stream,
                               bool orthonormalize) {
  check_float(U, "perturbed_basis", "U");
  TORCH_CHECK_VALUE(U.dim() >= 2, "perturbed_basis: U must have at least 2 dimensions");
  at::Tensor out = U.contiguous().clone();
  const int64_t n = out.numel();
  const auto s = static_cast<uint64_t>(seed), st = static_cast<uint64_t>(stream);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "perturbed_basis", [&] {
    auto* p = out.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    at::parallel_for(0, n, 8192, [&](int64_t i0, int64_t i1) {
      philox::for_each_normal<scalar_t>(s, st, i0, i1, [&](int64_t i, scalar_t z) { p[i] += e * z; });
    });
  });
  if (!orthonormalize) return out;
  TORCH_CHECK_VALUE(U.size(-2) >= U.size(-1), "perturbed_basis: orthonormalize needs U with at least as many rows as columns, got ",
                    U.sizes());
  auto flat = out.reshape({-1, out.size(-2), out.size(-1)});
  for (int64_t b = 0; b < flat.size(0); ++b) flat[b].copy_(orthonormalize_columns(flat[b]).first);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(subspace_ext, CPU, m) {
  m.impl("philox_uint32_", &philox_uint32_cpu_);
  m.impl("philox_normal_", &philox_normal_fill);
  m.impl("perturbed_basis", &perturbed_basis_cpu);
}

}  // namespace subspace_ext
