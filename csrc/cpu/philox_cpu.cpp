// CPU kernels of the philox family: raw Philox bits, standard normals, perturbed bases.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "subspace_ext/normal_icdf_table.h"
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
  parallel_for(0, (n + 3) / 4, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto x = philox::block_bits(s, st, static_cast<uint64_t>(b));
      for (int j = 0; j < 4 && 4 * b + j < n; ++j) p[4 * b + j] = x.v[j];
    }
  });
}

// ---- lane-parallel generation: kLanes consecutive Philox blocks per call, every step a loop over
// the lanes so that the compiler vectorises it (cloned for AVX-512 / AVX2, picked at load time).
// Each lane does exactly philox::normals_of_block's arithmetic (IEEE ops, no contraction), so the
// numbers are the same bits as the scalar path and the CUDA kernel.

constexpr int kLanes = 16;

inline void philox_lanes(uint64_t seed, uint64_t stream, uint64_t block0, uint32_t* x0, uint32_t* x1,
                         uint32_t* x2, uint32_t* x3) {
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t b = block0 + static_cast<uint64_t>(j);
    x0[j] = static_cast<uint32_t>(b);
    x1[j] = static_cast<uint32_t>(b >> 32);
    x2[j] = static_cast<uint32_t>(stream);
    x3[j] = static_cast<uint32_t>(stream >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    for (int j = 0; j < kLanes; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(philox::kM0) * x0[j];
      const uint64_t p1 = static_cast<uint64_t>(philox::kM1) * x2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ x1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ x3[j] ^ k1;
      x0[j] = n0;
      x1[j] = static_cast<uint32_t>(p1);
      x2[j] = n2;
      x3[j] = static_cast<uint32_t>(p0);
    }
  }
}

// r = sqrt(-2 log u1), (c, s) = (cos, sin)(2 pi u2) over n lanes; out[j] pairs as box_muller does.
template <typename T>
inline void box_muller_lanes(const T* u1, const T* u2, T* r, T* c, T* s, int n) {
  for (int j = 0; j < n; ++j) r[j] = philox::sqrt_rn(philox::mul(T(-2), philox::det_log(u1[j])));
  for (int j = 0; j < n; ++j) philox::sincos_2pi(u2[j], c[j], s[j]);
}

SE_TARGET_CLONES void normals_lanes(uint64_t seed, uint64_t stream, uint64_t block0, float* out) {
  uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  philox_lanes(seed, stream, block0, x0, x1, x2, x3);
  float u1[2 * kLanes], u2[2 * kLanes], r[2 * kLanes], c[2 * kLanes], s[2 * kLanes];
  for (int j = 0; j < kLanes; ++j) {  // pair 0 = words (0, 1), pair 1 = words (2, 3)
    u1[j] = static_cast<float>((x0[j] >> 8) + 1u) * 5.9604644775390625e-8f;
    u2[j] = static_cast<float>(x1[j] >> 8) * 5.9604644775390625e-8f;
    u1[kLanes + j] = static_cast<float>((x2[j] >> 8) + 1u) * 5.9604644775390625e-8f;
    u2[kLanes + j] = static_cast<float>(x3[j] >> 8) * 5.9604644775390625e-8f;
  }
  box_muller_lanes(u1, u2, r, c, s, 2 * kLanes);
  for (int j = 0; j < kLanes; ++j) {
    out[4 * j + 0] = r[j] * c[j];
    out[4 * j + 1] = r[j] * s[j];
    out[4 * j + 2] = r[kLanes + j] * c[kLanes + j];
    out[4 * j + 3] = r[kLanes + j] * s[kLanes + j];
  }
}

SE_TARGET_CLONES void normals_lanes(uint64_t seed, uint64_t stream, uint64_t block0, double* out) {
  uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
  philox_lanes(seed, stream, block0, x0, x1, x2, x3);
  double u1[kLanes], u2[kLanes], r[kLanes], c[kLanes], s[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t a = (static_cast<uint64_t>(x0[j]) << 21) | (x1[j] >> 11);
    const uint64_t b = (static_cast<uint64_t>(x2[j]) << 21) | (x3[j] >> 11);
    u1[j] = static_cast<double>(a + 1u) * 1.1102230246251565404e-16;
    u2[j] = static_cast<double>(b) * 1.1102230246251565404e-16;
  }
  box_muller_lanes(u1, u2, r, c, s, kLanes);
  for (int j = 0; j < kLanes; ++j) {
    out[2 * j + 0] = r[j] * c[j];
    out[2 * j + 1] = r[j] * s[j];
  }
}

// philox::for_each_normal, with the whole runs of kLanes blocks done lane-parallel.
template <typename T, typename F>
void for_each_normal_fast(uint64_t seed, uint64_t stream, int64_t i0, int64_t i1, F&& f) {
  constexpr int per = philox::PerBlock<T>::value;
  const int64_t b0 = (i0 + per - 1) / per, b1 = i1 / per;  // the blocks wholly inside [i0, i1)
  if (b1 - b0 < kLanes) return philox::for_each_normal<T>(seed, stream, i0, i1, f);
  philox::for_each_normal<T>(seed, stream, i0, b0 * per, f);
  T buf[kLanes * per];
  int64_t b = b0;
  for (; b + kLanes <= b1; b += kLanes) {
    normals_lanes(seed, stream, static_cast<uint64_t>(b), buf);
    for (int t = 0; t < kLanes * per; ++t) f(b * per + t, buf[t]);
  }
  philox::for_each_normal<T>(seed, stream, b * per, i1, f);
}

// ---- the "icdf" transform: one float32 normal per Philox word (philox::icdf_normal) --------------

alignas(64) constexpr float kIcdfTable[] = {SUBSPACE_EXT_NORMAL_ICDF_COEFFS};
static_assert(sizeof(kIcdfTable) == SUBSPACE_EXT_NORMAL_ICDF_SEGMENTS * SUBSPACE_EXT_NORMAL_ICDF_STRIDE * sizeof(float),
              "normal_icdf_table.h: 128 segments of 8 floats");

// Blocks [b, b + kLanes) of (seed, stream) -> out[4b .. 4b + 4 kLanes). philox::icdf_normal's steps,
// each a loop over the lanes: the table lookups are staged by scalar loads (GCC's generic tuning
// does not emit gathers), so the integer and polynomial loops vectorise.
SE_TARGET_CLONES_FMA void icdf_lanes(uint64_t seed, uint64_t stream, uint64_t b, float* out) {
  constexpr int kN = 4 * kLanes;
  uint32_t x[4][kLanes], w[kN], seg[kN];
  philox_lanes(seed, stream, b, x[0], x[1], x[2], x[3]);
  for (int j = 0; j < kLanes; ++j)
    for (int q = 0; q < 4; ++q) w[4 * j + q] = x[q][j];
  float v[kN], c[6][kN];
  for (int i = 0; i < kN; ++i) philox::icdf_reduce(w[i], seg[i], v[i]);
  for (int i = 0; i < kN; ++i)
    for (int k = 0; k < 6; ++k) c[k][i] = kIcdfTable[8 * seg[i] + k];
  for (int i = 0; i < kN; ++i)
    out[i] = philox::icdf_sign(philox::icdf_poly(v[i], [&](int k) { return c[k][i]; }), w[i]);
}

void philox_normal_icdf_cpu(float* p, int64_t n, uint64_t seed, uint64_t stream) {
  parallel_for(0, (n + 3) / 4, 2048, [&](int64_t b0, int64_t b1) {
    int64_t b = b0;
    for (; b + kLanes <= b1 && 4 * (b + kLanes) <= n; b += kLanes)
      icdf_lanes(seed, stream, static_cast<uint64_t>(b), p + 4 * b);
    for (; b < b1; ++b) {  // the chunk's last blocks, and the tensor's partial one
      const auto x = philox::block_bits(seed, stream, static_cast<uint64_t>(b));
      for (int j = 0; j < 4 && 4 * b + j < n; ++j) p[4 * b + j] = philox::icdf_normal(x.v[j], kIcdfTable);
    }
  });
}

}  // namespace

void philox_normal_icdf_fill(const at::Tensor& out, int64_t seed, int64_t stream) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat,
                   "philox_normal_icdf_: out must be float32 (the icdf transform has no float64 table), got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "philox_normal_icdf_: out must be contiguous");
  if (out.is_cuda()) {
#ifdef SUBSPACE_EXT_WITH_CUDA
    return philox_normal_icdf_into_cuda(out, seed, stream);
#else
    TORCH_CHECK_VALUE(false, "philox_normal_icdf_: a CUDA tensor, but this build has no CUDA kernels");
#endif
  }
  philox_normal_icdf_cpu(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed),
                         static_cast<uint64_t>(stream));
}

void philox_normals_into(const at::Tensor& out, int64_t seed, int64_t stream, double eps, bool add) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
                   "philox_normal_: out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "philox_normal_: out must be contiguous");
  if (out.is_cuda()) {
#ifdef SUBSPACE_EXT_WITH_CUDA
    return philox_normals_into_cuda(out, seed, stream, eps, add);
#else
    TORCH_CHECK_VALUE(false, "philox_normal_: a CUDA tensor, but this build has no CUDA kernels");
#endif
  }
  const int64_t n = out.numel();
  const auto s = static_cast<uint64_t>(seed), st = static_cast<uint64_t>(stream);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_", [&] {
    auto* p = out.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    parallel_for(0, n, 8192, [&](int64_t i0, int64_t i1) {
      if (add)  // the noise is generated inside the loop and never stored
        for_each_normal_fast<scalar_t>(s, st, i0, i1, [&](int64_t i, scalar_t z) { p[i] += e * z; });
      else
        for_each_normal_fast<scalar_t>(s, st, i0, i1, [&](int64_t i, scalar_t z) { p[i] = z; });
    });
  });
}

template <typename T>
void philox_add_normals_range(T* buf, int64_t i0, int64_t i1, uint64_t seed, uint64_t stream, T eps) {
  for_each_normal_fast<T>(seed, stream, i0, i1, [&](int64_t i, T z) { buf[i - i0] += eps * z; });
}
template void philox_add_normals_range<float>(float*, int64_t, int64_t, uint64_t, uint64_t, float);
template void philox_add_normals_range<double>(double*, int64_t, int64_t, uint64_t, uint64_t, double);

void philox_normal_fill(const at::Tensor& out, int64_t seed, int64_t stream) {
  philox_normals_into(out, seed, stream, 0.0, false);
}

namespace {

// U + eps * N(seed, stream), N indexed by the row-major position in U's (..., m, k) shape; on
// the CPU or a GPU (the noise by our Philox kernels, the orthonormalisation through ATen).
at::Tensor perturbed_basis(const at::Tensor& U, double eps, int64_t seed, int64_t stream,
                           bool orthonormalize) {
  check_float(U, "perturbed_basis", "U");
  TORCH_CHECK_VALUE(U.dim() >= 2, "perturbed_basis: U must have at least 2 dimensions");
  at::Tensor out = U.clone(at::MemoryFormat::Contiguous);
  philox_normals_into(out, seed, stream, eps, /*add=*/true);
  if (!orthonormalize) return out;
  TORCH_CHECK_VALUE(U.size(-2) >= U.size(-1), "perturbed_basis: orthonormalize needs U with at least as many rows as columns, got ",
                    U.sizes());
  if (out.numel() == 0) return out;  // no columns (or no matrices): nothing to orthonormalise
  auto flat = out.reshape({-1, out.size(-2), out.size(-1)});
  for (int64_t b = 0; b < flat.size(0); ++b)
    flat[b].copy_(orthonormalize_columns(flat[b], 2, /*with_r=*/false).first);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(subspace_ext, CPU, m) {
  m.impl("philox_uint32_", &philox_uint32_cpu_);
  m.impl("philox_normal_", &philox_normal_fill);
  m.impl("philox_normal_icdf_", &philox_normal_icdf_fill);
  m.impl("perturbed_basis", &perturbed_basis);
}

#ifdef SUBSPACE_EXT_WITH_CUDA
// The same function on CUDA tensors; philox_normals_into launches the CUDA kernel there.
TORCH_LIBRARY_IMPL(subspace_ext, CUDA, m) {
  m.impl("perturbed_basis", &perturbed_basis);
}
#endif

}  // namespace subspace_ext
