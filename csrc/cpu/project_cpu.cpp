// CPU kernels of the project family: coefficients of an update on a basis, and the way back.
// The update is never formed as an m x n matrix when it is given by LoRA factors.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "utils.h"

namespace subspace_ext {
namespace {

// weight: the argument may also be bfloat16/float16 (a model weight: see in_basis_dtype).
void check_matrix(const at::Tensor& t, const char* op, const char* arg, bool weight = false) {
  if (weight) check_weight(t, op, arg);
  else check_float(t, op, arg);
  TORCH_CHECK_VALUE(t.dim() >= 2, op, ": ", arg, " must have at least 2 dimensions, got ", t.dim());
}

// C = s * U^T (B A) V = s * (U^T B) (A V): two skinny GEMMs and a tiny one.
void check_same_dtype(std::initializer_list<std::pair<const char*, const at::Tensor*>> args,
                      const char* op) {
  const auto dt = args.begin()->second->scalar_type();
  for (const auto& [name, t] : args)
    TORCH_CHECK_TYPE(t->scalar_type() == dt, op, ": all inputs must share a dtype; ", name, " is ",
                     t->scalar_type(), ", ", args.begin()->first, " is ", dt);
}

// An update's factors or dense matrix (model weights: B, A, D) may be bfloat16/float16; they are
// computed in the bases' dtype (U: float32 or float64, checked first), so the result has the
// bases' dtype. Other dtypes are left to check_same_dtype's message.
at::Tensor in_basis_dtype(const at::Tensor& t, const at::Tensor& U, const char* op, const char* arg) {
  check_matrix(t, op, arg, /*weight=*/true);
  const bool half = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
  return half ? t.to(U.scalar_type()) : t;
}

// Checks of project / project_perturbed: float bases, factors of the bases' dtype (or half
// precision, converted: see in_basis_dtype), shapes that chain. Returns B and A as computed.
std::pair<at::Tensor, at::Tensor> check_project_args(const at::Tensor& U, const at::Tensor& V, const at::Tensor& B_in,
                                                     const at::Tensor& A_in, const char* op) {
  check_matrix(U, op, "U");
  check_matrix(V, op, "V");
  const at::Tensor B = in_basis_dtype(B_in, U, op, "B"), A = in_basis_dtype(A_in, U, op, "A");
  check_same_dtype({{"U", &U}, {"V", &V}, {"B", &B}, {"A", &A}}, op);
  TORCH_CHECK_VALUE(U.size(-2) == B.size(-2) && B.size(-1) == A.size(-2) && A.size(-1) == V.size(-2),
              op, ": shapes do not chain: U ", U.sizes(), ", B ", B.sizes(), ", A ", A.sizes(),
              ", V ", V.sizes(), " (need U m x k1, B m x r, A r x n, V n x k2)");
  return {B, A};
}

// The one-layer arguments of the perturbed ops: matrices on the first one's device, eps finite >= 0.
void check_perturbed_layer(std::initializer_list<const at::Tensor*> ts, const char* names, double eps, const char* op) {
  const at::Device dev = (*ts.begin())->device();
  for (const auto* t : ts) {
    TORCH_CHECK_VALUE(t->dim() == 2, op, ": ", names, " must be matrices (one layer), got ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == dev, op, ": all inputs must be on ", dev);
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
}

at::Tensor project_cpu(const at::Tensor& U, const at::Tensor& V, const at::Tensor& B_in,
                       const at::Tensor& A_in, double scaling) {
  const auto [B, A] = check_project_args(U, V, B_in, A_in, "project");
  at::Tensor left = at::matmul(U.mT(), B);   // k1 x r
  at::Tensor right = at::matmul(A, V);       // r x k2
  at::Tensor C = at::matmul(left, right);
  if (scaling != 1.0) C.mul_(scaling);
  // NaN/Inf in any input reach C (k1 x k2): checked here rather than by a pass over the inputs.
  TORCH_CHECK_VALUE(all_finite(C), "project: the result is not finite: U, V, B or A contains NaN "
                    "or Inf, or the result or an intermediate product (U^T B, A V) overflows its dtype");
  return C;
}

// C = U^T D V, in the cheaper association order.
at::Tensor project_dense_cpu(const at::Tensor& U, const at::Tensor& V, const at::Tensor& D_in) {
  check_matrix(U, "project_dense", "U");
  check_matrix(V, "project_dense", "V");
  const at::Tensor D = in_basis_dtype(D_in, U, "project_dense", "D");
  check_same_dtype({{"U", &U}, {"V", &V}, {"D", &D}}, "project_dense");
  TORCH_CHECK_VALUE(U.size(-2) == D.size(-2) && D.size(-1) == V.size(-2),
              "project_dense: shapes do not chain: U ", U.sizes(), ", D ", D.sizes(), ", V ",
              V.sizes());
  if (U.size(-1) <= V.size(-1)) return at::matmul(at::matmul(U.mT(), D), V);
  return at::matmul(U.mT(), at::matmul(D, V));
}

// Checks of reconstruct / reconstruct_perturbed: float matrices of one dtype whose shapes chain.
void check_reconstruct_args(const at::Tensor& U, const at::Tensor& C, const at::Tensor& V, const char* op) {
  check_matrix(U, op, "U");
  check_matrix(C, op, "C");
  check_matrix(V, op, "V");
  check_same_dtype({{"U", &U}, {"C", &C}, {"V", &V}}, op);
  TORCH_CHECK_VALUE(U.size(-1) == C.size(-2) && C.size(-1) == V.size(-1), op, ": shapes do not chain: U ",
                    U.sizes(), ", C ", C.sizes(), ", V ", V.sizes(), " (need U m x k1, C k1 x k2, V n x k2)");
}

// Delta W = U C V^T.
at::Tensor reconstruct_cpu(const at::Tensor& U, const at::Tensor& C, const at::Tensor& V) {
  check_reconstruct_args(U, C, V, "reconstruct");
  return at::matmul(at::matmul(U, C), V.mT());
}

// One block of kTnJ x kTnT entries (fewer at the edges: Full = false) of acc (k x r) = u^T y over `rows`
// rows of u (rows x k) and y (rows x r), kept in registers across the rows. Every entry is summed
// over the rows in order from zero, as the CUDA kernel's threads sum a chunk (the same bits).
constexpr int64_t kTnJ = 4;                                  // block rows (entries j of u^T y)
template <typename T> constexpr int64_t kTnT = 32 / sizeof(T);  // block columns: 8 floats or 4 doubles

template <typename T, bool Full>
inline void tn_block(const T* u, const T* y, int64_t rows, int64_t k, int64_t r, int64_t j0, int64_t t0,
                     int64_t nj, int64_t nt, T* acc) {
  T a[kTnJ][kTnT<T>] = {};
  const int64_t J = Full ? kTnJ : nj, TT = Full ? kTnT<T> : nt;
  for (int64_t i = 0; i < rows; ++i) {
    const T* ui = u + i * k + j0;
    const T* yi = y + i * r + t0;
    for (int64_t jj = 0; jj < J; ++jj) {
      const T uj = ui[jj];
      for (int64_t tt = 0; tt < TT; ++tt) a[jj][tt] += uj * yi[tt];
    }
  }
  for (int64_t jj = 0; jj < J; ++jj)
    for (int64_t tt = 0; tt < TT; ++tt) acc[(j0 + jj) * r + t0 + tt] = a[jj][tt];
}

// acc (k x r, contiguous) = u^T y for one chunk (u: rows x k, y: rows x r, contiguous), by blocks.
template <typename T>
void tn_partial(const T* u, const T* y, int64_t rows, int64_t k, int64_t r, T* acc) {
  for (int64_t j0 = 0; j0 < k; j0 += kTnJ)
    for (int64_t t0 = 0; t0 < r; t0 += kTnT<T>) {
      const int64_t nj = std::min(kTnJ, k - j0), nt = std::min(kTnT<T>, r - t0);
      if (nj == kTnJ && nt == kTnT<T>)
        tn_block<T, true>(u, y, rows, k, r, j0, t0, nj, nt, acc);
      else
        tn_block<T, false>(u, y, rows, k, r, j0, t0, nj, nt, acc);
    }
}

// (U + eps N)^T Y for U (m x k) and Y (m x r), any strides; N = the Philox normals of (seed,
// stream) indexed by the row-major position in U (perturbed_basis's noise, same rounding). The
// noise is generated per chunk of kPerturbRows rows and never stored beyond a chunk (a GPU thread
// block's tile on CUDA). Each chunk's partial product accumulates row by row, the chunks are then
// summed: the result does not depend on the thread count.
at::Tensor perturbed_tn(const at::Tensor& U, const at::Tensor& Y, double eps, int64_t seed, int64_t stream) {
  const int64_t m = U.size(0), k = U.size(1), r = Y.size(1);
  const int64_t chunks = std::max<int64_t>((m + kPerturbRows - 1) / kPerturbRows, 1);
  if (m == 0 || k == 0 || r == 0) return at::zeros({k, r}, U.options());
  at::Tensor partial = at::empty({chunks, k, r}, U.options());  // every entry written below
#ifdef SUBSPACE_EXT_WITH_CUDA
  if (U.is_cuda())
    perturbed_tn_cuda(U, Y, eps, seed, stream, partial);
  else
#endif
    AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "project_perturbed", [&] {
      const auto Ua = U.accessor<scalar_t, 2>();
      const auto Ya = Y.accessor<scalar_t, 2>();
      scalar_t* P = partial.data_ptr<scalar_t>();
      const auto e = static_cast<scalar_t>(eps);
      const auto s = static_cast<uint64_t>(seed), st = static_cast<uint64_t>(stream);
      parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<scalar_t> tile(kPerturbRows * k), y(kPerturbRows * r);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * kPerturbRows, r1 = std::min(m, r0 + kPerturbRows);
          for (int64_t i = r0; i < r1; ++i) {
            for (int64_t j = 0; j < k; ++j) tile[(i - r0) * k + j] = Ua[i][j];
            for (int64_t t = 0; t < r; ++t) y[(i - r0) * r + t] = Ya[i][t];
          }
          if (e != scalar_t(0))  // eps as rounded to the dtype, as the CUDA kernels test it
            philox_add_normals_range<scalar_t>(tile.data(), r0 * k, r1 * k, s, st, e);
          tn_partial(tile.data(), y.data(), r1 - r0, k, r, P + c * k * r);
        }
      });
    });
  return partial.sum(0);
}

// C = s * (U + eps N_u)^T (B A) (V + eps N_v): project on the bases perturbed_basis(U, eps, seed,
// stream_u) and perturbed_basis(V, eps, seed, stream_v) without forming them (or B A).
at::Tensor project_perturbed_cpu(const at::Tensor& U, const at::Tensor& V, const at::Tensor& B_in,
                                 const at::Tensor& A_in, double scaling, double eps, int64_t seed,
                                 int64_t stream_u, int64_t stream_v) {
  const char* op = "project_perturbed";
  const auto [B, A] = check_project_args(U, V, B_in, A_in, op);
  check_perturbed_layer({&U, &V, &B, &A}, "U, V, B and A", eps, op);
  const at::Tensor left = perturbed_tn(U, B, eps, seed, stream_u);       // k1 x r
  const at::Tensor right = perturbed_tn(V, A.t(), eps, seed, stream_v);  // k2 x r
  at::Tensor C = at::mm(left, right.t());
  if (scaling != 1.0) C.mul_(scaling);
  TORCH_CHECK_VALUE(all_finite(C), op,
                    ": the result is not finite: an input contains NaN or Inf, or the result or an intermediate "
                    "product (U~^T B, A V~) overflows its dtype");
  return C;
}

// out (p x q) = X (p x k) (U + eps N)^T for U (q x k), out any strided view: the way back of
// perturbed_tn. The noise (perturbed_basis's, same rounding) exists one chunk of rows of U at a
// time on the CPU (each chunk's columns of out are one BLAS GEMM), one block's strip in shared
// memory on CUDA.
void perturbed_nt(const at::Tensor& X, const at::Tensor& U, double eps, int64_t seed, int64_t stream,
                  const at::Tensor& out) {
  const int64_t q = U.size(0), k = U.size(1);
  if (out.numel() == 0) return;
  if (k == 0) {
    out.zero_();
    return;
  }
#ifdef SUBSPACE_EXT_WITH_CUDA
  if (U.is_cuda()) {
    perturbed_nt_cuda(X, U, eps, seed, stream, out);
    return;
  }
#endif
  // Chunks of 1 MiB of U~ or 8 x kPerturbRows rows, whichever is more: each chunk's columns of out are
  // one GEMM, and splitting the product costs BLAS time (1536^2 out, k = 32: 0.67 ms in 1024-row chunks,
  // 0.58 ms whole); the chunk's noise on all threads.
  const int64_t row_bytes = k * static_cast<int64_t>(U.element_size());
  const int64_t chunk = std::max<int64_t>(8 * kPerturbRows, (int64_t{1} << 20) / row_bytes);
  for (int64_t r0 = 0; r0 < q; r0 += chunk) {
    const int64_t rows = std::min(chunk, q - r0);
    at::Tensor tile = U.narrow(0, r0, rows).clone(at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "reconstruct_perturbed", [&] {
      const auto e = static_cast<scalar_t>(eps);
      if (e == scalar_t(0)) return;  // eps as rounded to the dtype, as the CUDA kernels test it
      scalar_t* t = tile.data_ptr<scalar_t>();
      parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
        philox_add_normals_range<scalar_t>(t + lo * k, (r0 + lo) * k, (r0 + hi) * k, static_cast<uint64_t>(seed),
                                           static_cast<uint64_t>(stream), e);
      });
    });
    at::Tensor part = out.narrow(1, r0, rows);
    at::mm_out(part, X, tile.t());
  }
}

// Delta W = (U + eps N_u) C (V + eps N_v)^T: reconstruct on the bases perturbed_basis(U, eps, seed,
// stream_u) and perturbed_basis(V, eps, seed, stream_v), formed a chunk of rows at a time. Two passes: T = U~ C
// (m x k2, written as T^T = C^T U~^T), then Delta W = T V~^T.
at::Tensor reconstruct_perturbed_cpu(const at::Tensor& U, const at::Tensor& C, const at::Tensor& V, double eps,
                                     int64_t seed, int64_t stream_u, int64_t stream_v) {
  const char* op = "reconstruct_perturbed";
  check_reconstruct_args(U, C, V, op);
  check_perturbed_layer({&U, &C, &V}, "U, C and V", eps, op);
  const int64_t m = U.size(0), n = V.size(0), k2 = V.size(1);
  at::Tensor T = at::empty({m, k2}, U.options());
  perturbed_nt(C.t(), U, eps, seed, stream_u, T.t());
  at::Tensor D = at::empty({m, n}, U.options());
  perturbed_nt(T, V, eps, seed, stream_v, D);
  return D;
}

}  // namespace

// One list of kernels for both devices: each runs on its inputs' device (CPU loops or CUDA kernels/ATen).
static void register_project_ops(torch::Library& m) {
  m.impl("reconstruct_perturbed", &reconstruct_perturbed_cpu);
  m.impl("project_perturbed", &project_perturbed_cpu);
  m.impl("project", &project_cpu);
  m.impl("project_dense", &project_dense_cpu);
  m.impl("reconstruct", &reconstruct_cpu);
}

TORCH_LIBRARY_IMPL(subspace_ext, CPU, m) { register_project_ops(m); }

#ifdef SUBSPACE_EXT_WITH_CUDA
// Three GEMMs: cuBLAS through ATen is the floor on CUDA, so the same composition is registered.
// project_perturbed / reconstruct_perturbed: the hand-written kernels for (U + eps N)^T Y and
// X (U + eps N)^T (csrc/cuda/project_cuda.cu).
TORCH_LIBRARY_IMPL(subspace_ext, CUDA, m) { register_project_ops(m); }
#endif

}  // namespace subspace_ext
