// CUDA kernels of the importance family: AdaLoRA pair importance for every layer in one launch
// (multi-tensor: a device array of per-layer pointers and sizes), and the in-place recomposition
// of LoRA pairs (W pass + factor pass: two launches for any number of layers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels.h"

namespace subspace_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Exact conversions (the CPU kernels' static_casts; round-to-nearest-even on narrowing). The one
// difference: a NaN narrowed to bf16/fp16 gets CUDA's canonical payload (0x7FFF), c10's keeps the
// quiet bit (0x7FC0 / 0x7E00): same bits for every finite or infinite value, not for NaN.
template <typename To, typename From> __device__ __forceinline__ To cvt(From x) {
  if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return static_cast<To>(__bfloat162float(x));
  } else if constexpr (std::is_same_v<From, __half>) {
    return static_cast<To>(__half2float(x));
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));  // x is float here (Acc of a bf16 W)
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

__device__ __forceinline__ float fadd(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double fadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double fmul(double a, double b) { return __dmul_rn(a, b); }

// Index of the segment that holds item g: the largest l with offsets[l] <= g.
__device__ __forceinline__ int segment_of(const int64_t* offsets, int L, int64_t g) {
  int lo = 0, hi = L - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= g) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Block-wide sum of v (deterministic tree order); the result is valid in thread 0.
template <typename S> __device__ S block_sum(S v, S* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) shared[threadIdx.x] = shared[threadIdx.x] + shared[threadIdx.x + w];
    __syncthreads();
  }
  return shared[0];
}

// One block per (layer, pair j): row j of A and column j of B, states updated element by element
// (I = |p g|, ipt <- b1 ipt + c1 I, unc <- b2 unc + c2 |I - ipt|, c = 1 - beta rounded from double; the CPU
// formula), then
// score_j = mean(ipt * unc over row j of A) + mean(over column j of B).
template <typename P, typename S>
__global__ void pair_importance_kernel(const ImportanceLayer* layers, const int64_t* offsets, int L,
                                       S b1, S c1, S b2, S c2) {
  __shared__ S shared[kThreads];
  const int l = segment_of(offsets, L, blockIdx.x);
  const ImportanceLayer& ly = layers[l];
  const int64_t j = blockIdx.x - offsets[l], r = ly.r, n = ly.n, m = ly.m;
  auto update = [&](const void* p_, const void* g_, void* ipt_, void* unc_, int64_t e) {
    const P* p = static_cast<const P*>(p_);
    const P* g = static_cast<const P*>(g_);
    S* ipt = static_cast<S*>(ipt_);
    S* unc = static_cast<S*>(unc_);
    const S I = fabs(cvt<S>(p[e]) * cvt<S>(g[e]));
    const S mean = b1 * ipt[e] + c1 * I;
    const S u = b2 * unc[e] + c2 * fabs(I - mean);
    ipt[e] = mean;
    unc[e] = u;
    return mean * u;
  };
  S sa = 0, sb = 0;
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) sa += update(ly.A, ly.gA, ly.iA, ly.uA, j * n + c);
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) sb += update(ly.B, ly.gB, ly.iB, ly.uB, i * r + j);
  sa = block_sum(sa, shared);
  __syncthreads();
  sb = block_sum(sb, shared);
  if (threadIdx.x == 0) static_cast<S*>(ly.scores)[j] = sa / static_cast<S>(n) + sb / static_cast<S>(m);
}

// W pass: one block per tile of `rows` rows of one layer, threads over columns. For W[i, j]:
//   acc = W[i, j]; acc += (s B[i, idx_t]) * A[idx_t, j] for t < q; acc += (-s Bn[i, t]) * An[t, j];
// in that order with exact rounding, as the CPU kernel does (csrc/cpu/importance_cpu.cpp).
template <typename W_t, typename F_t>
__global__ void recompose_w_kernel(const RecomposeLayer* layers, const int64_t* tiles, const int64_t* pairs,
                                   const int64_t* idx_all, int L, int rows) {
  using A_t = typename Acc<W_t>::type;
  const int l = segment_of(tiles, L, blockIdx.x);
  const RecomposeLayer& ly = layers[l];
  const int64_t i0 = (blockIdx.x - tiles[l]) * rows;
  const int64_t* idx = idx_all + pairs[l];
  W_t* W = static_cast<W_t*>(ly.W);
  const F_t* B = static_cast<const F_t*>(ly.B);
  const F_t* A = static_cast<const F_t*>(ly.A);
  const F_t* Bn = static_cast<const F_t*>(ly.Bn);
  const F_t* An = static_cast<const F_t*>(ly.An);
  const A_t s = static_cast<A_t>(ly.s);
  for (int64_t i = i0; i < i0 + rows && i < ly.m; ++i) {
    for (int64_t j = threadIdx.x; j < ly.n; j += blockDim.x) {
      W_t& w = W[i * ly.ws0 + j * ly.ws1];
      A_t acc = cvt<A_t>(w);
      for (int64_t t = 0; t < ly.q; ++t) {
        const int64_t k = idx[t];
        const A_t coef = fmul(s, cvt<A_t>(B[i * ly.bs0 + k * ly.bs1]));
        const A_t row = static_cast<A_t>(cvt<double>(A[k * ly.as0 + j * ly.as1]));
        acc = fadd(acc, fmul(coef, row));
      }
      if (Bn != nullptr) {
        for (int64_t t = 0; t < ly.q; ++t) {
          const A_t coef = fmul(-s, cvt<A_t>(Bn[i * ly.bns0 + t * ly.bns1]));
          const A_t row = static_cast<A_t>(cvt<double>(An[t * ly.ans0 + j * ly.ans1]));
          acc = fadd(acc, fmul(coef, row));
        }
      }
      w = cvt<W_t>(acc);
    }
  }
}

// Factor pass: one block per (layer, t): B[:, idx_t] = Bn[:, t] (or 0), A[idx_t, :] = An[t, :].
template <typename F_t>
__global__ void recompose_factors_kernel(const RecomposeLayer* layers, const int64_t* pairs, const int64_t* idx_all,
                                         int L) {
  const int l = segment_of(pairs, L, blockIdx.x);
  const RecomposeLayer& ly = layers[l];
  const int64_t t = blockIdx.x - pairs[l], k = idx_all[blockIdx.x];
  F_t* B = static_cast<F_t*>(ly.B);
  F_t* A = static_cast<F_t*>(ly.A);
  const F_t* Bn = static_cast<const F_t*>(ly.Bn);
  const F_t* An = static_cast<const F_t*>(ly.An);
  for (int64_t i = threadIdx.x; i < ly.m; i += blockDim.x)
    B[i * ly.bs0 + k * ly.bs1] = Bn != nullptr ? Bn[i * ly.bns0 + t * ly.bns1] : cvt<F_t>(0.0f);
  if (An != nullptr)
    for (int64_t j = threadIdx.x; j < ly.n; j += blockDim.x) A[k * ly.as0 + j * ly.as1] = An[t * ly.ans0 + j * ly.ans1];
}

template <typename F> void with_type(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F64: f(double{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
    case DType::F16: f(__half{}); break;
  }
}

}  // namespace

void pair_importance(const ImportanceLayer* layers, const int64_t* pair_offsets, int L,
                     int64_t total_pairs, DType param, DType state, double beta1, double beta2,
                     cudaStream_t s) {
  if (total_pairs == 0) return;
  with_type(param, [&](auto p) {
    using P = decltype(p);
    if (state == DType::F64) {
      pair_importance_kernel<P, double><<<total_pairs, kThreads, 0, s>>>(layers, pair_offsets, L, beta1, 1.0 - beta1,
                                                                          beta2, 1.0 - beta2);
    } else {
      pair_importance_kernel<P, float><<<total_pairs, kThreads, 0, s>>>(
          layers, pair_offsets, L, static_cast<float>(beta1), static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2), static_cast<float>(1.0 - beta2));
    }
  });
}

void recompose(const RecomposeLayer* layers, const int64_t* row_tiles, const int64_t* pair_offsets,
               const int64_t* idx_all, int L, int64_t total_tiles, int64_t total_pairs, int rows_per_tile,
               DType w, DType f, cudaStream_t s) {
  if (total_pairs == 0) return;
  if (total_tiles > 0)  // zero when every layer of the group has m == 0: nothing to add to W
    with_type(w, [&](auto wv) {
      with_type(f, [&](auto fv) {
        using W_t = decltype(wv);
        using F_t = decltype(fv);
        recompose_w_kernel<W_t, F_t><<<total_tiles, kThreads, 0, s>>>(layers, row_tiles, pair_offsets, idx_all,
                                                                          L, rows_per_tile);
      });
    });
  with_type(f, [&](auto fv) {
    using F_t = decltype(fv);
    recompose_factors_kernel<F_t><<<total_pairs, kThreads, 0, s>>>(layers, pair_offsets, idx_all, L);
  });
}

}  // namespace cuda
}  // namespace subspace_ext
