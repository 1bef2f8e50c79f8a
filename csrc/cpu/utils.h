// Shared CPU helpers: input checks and the small dense linear algebra the op families share.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

// Hot loops cloned for AVX-512 / AVX2 and picked at load time (the build targets baseline x86-64).
// FMA contraction stays off (-ffp-contract=off), so every clone computes the same bits.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SE_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// For loops that call philox::fma_rn: GCC's avx2 target has no FMA (std::fma would be a libm
// call), its fma target has AVX + FMA; avx512f includes FMA.
#define SE_TARGET_CLONES_FMA __attribute__((target_clones("avx512f", "fma", "default")))
#else
#define SE_TARGET_CLONES
#define SE_TARGET_CLONES_FMA
#endif

namespace subspace_ext {

// TORCH_CHECK that t is a float32/float64 tensor (names op and argument in the message).
void check_float(const at::Tensor& t, const char* op, const char* arg);

// Every element of a small tensor finite (an op's result)? On the CPU a plain loop (ATen's
// isfinite().all().item() took ~10 us of project's ~30); elsewhere that, one host sync.
bool all_finite(const at::Tensor& t);

// The dtypes model weights may have: float32/float64, or bfloat16/float16 (computed in float32).
inline bool is_weight_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
}
// TORCH_CHECK that t has a weight dtype (names op and argument in the message).
void check_weight(const at::Tensor& t, const char* op, const char* arg);
// The dtype a weight is computed in: float64 stays float64, everything else is float32.
inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Orthonormal basis of the columns of Y (p x l) and the triangular factor: Y = Q R, R's diagonal
// >= 0 (so Q is the same, to rounding, whichever path runs). Cholesky-QR (Gram matrix and Cholesky
// in float64 on Y's device: plain loops for l <= 64 on the CPU, LAPACK / cuSOLVER otherwise; Q =
// Y R^-1 in Y's dtype), falling back to Householder QR (LAPACK / cuSOLVER, float64) when Y is
// ill-conditioned or rank-deficient, so Q is orthonormal in every case; a CPU Y with l > 64 and
// `passes` = 2 goes to Householder QR directly (fewer flops, faster there). Returns Q
// (p x min(p,l), Y's dtype) and R (min(p,l) x l, float64).
// `passes` = 2 gives orthonormality to rounding (Cholesky-QR2); 1 is enough to keep a subspace
// iteration well conditioned, where the next product is orthonormalised again anyway.
// `with_r` = false: a caller that needs only Q may get an undefined R (Cholesky-QR2 then skips the
// l x l product R2 R1: 2 l^3 flops, a quarter of its work; it matters on CUDA, where SOLAR's wide
// bases take Cholesky-QR2, since the CPU takes Householder QR for them).
std::pair<at::Tensor, at::Tensor> orthonormalize_columns(const at::Tensor& Y, int passes = 2, bool with_r = true);

// Runs `call`, an ATen LAPACK call on `t`'s device: on the CPU one at a time and, inside an
// OpenMP parallel region (parallel_tasks' bodies), on a thread of its own, where MKL's LAPACK
// does not spin (see utils.cpp). Elsewhere it just calls.
void run_lapack(const at::Tensor& t, const std::function<void()>& call);

// Flip each column pair (U[:, j], V[:, j]) so that the largest-magnitude entry of U[:, j] is
// positive (entries within a relative 1e-10 of it count as tied: the first of them decides, so an exact
// tie that rounding breaks either way gives the same sign). Makes the factors unique up to rounding.
void canonicalize_signs_(at::Tensor& U, at::Tensor& V);

// rsvd's range guard. The sketch, the power iteration and Q = Y R^-1 run in the compute dtype
// (float32 for float32/bfloat16/float16 weights): a matrix whose values are all tiny (float32
// subnormals) put R^-1 beyond float32's range (LAPACK then failed on "non-finite values"), and a
// finite one whose sketch A @ Omega overflows was refused. Such a matrix is decomposed as 2^e A,
// which is exact and commutes with every step; S is scaled back by 2^-e. range_exponents gives e
// per matrix of A (m x n: one; b x m x n: b) from its sketch Y's largest magnitude (on the host:
// the op's one sync for this check, which also refuses NaN/Inf), and where a sketch is not finite,
// from A's own (a pass over A, only then). e = 0 for every ordinary matrix: 2^-40 <= max |Y| <= 2^40
// in float32, 2^-400 .. 2^400 in float64. `what` names A in the NaN/Inf error.
std::vector<int64_t> range_exponents(const at::Tensor& A, const at::Tensor& Y, const std::string& what);
// t * 2^(sign * e[i]): t one matrix/vector when e has one entry and t no batch dimension, else
// t's leading dimension indexes e.
at::Tensor scale_pow2(const at::Tensor& t, const std::vector<int64_t>& e, int sign, bool batched);
inline bool any_scaled(const std::vector<int64_t>& e) {
  for (int64_t x : e)
    if (x != 0) return true;
  return false;
}

struct SVDResult {
  at::Tensor U, S, V;  // U (m x k), S (k), V (n x k), descending S
};

// SVD of the product Qa * core * Qb^T where Qa (m x p) and Qb (n x q) have orthonormal
// columns and core is small (p x q); truncated to `rank` and cast to `dtype`, canonical signs.
SVDResult svd_of_core(const at::Tensor& Qa, const at::Tensor& core, const at::Tensor& Qb,
                      int64_t rank, at::ScalarType dtype);

}  // namespace subspace_ext

namespace subspace_ext {

// SVD of B A (B m x r, A r x n) from its factors, never forming the product; rank < 0 keeps
// min(m, n, r). Defined in rsvd_cpu.cpp (the factored_svd op).
SVDResult factored_svd(const at::Tensor& B, const at::Tensor& A, int64_t rank);

// Fill a contiguous float32/float64 tensor (CPU, or CUDA in a CUDA build) with Philox normals of
// (seed, stream), element i of its row-major order being normal number i of the stream.
// Defined in philox_cpu.cpp.
void philox_normal_fill(const at::Tensor& out, int64_t seed, int64_t stream);
void philox_normal_icdf_fill(const at::Tensor& out, int64_t seed, int64_t stream);

// Argument checks shared by the CPU and CUDA kernels of pair_importance_ (every layer: shapes,
// dtypes, contiguity, beta ranges), with the same messages on both devices.
void check_pair_importance_args(at::TensorList A, at::TensorList B, at::TensorList grad_A,
                                at::TensorList grad_B, at::TensorList ipt_A, at::TensorList ipt_B,
                                at::TensorList unc_A, at::TensorList unc_B, at::TensorList scores,
                                double beta1, double beta2);

// Checked arguments of fuse_pairs_ / reinit_pairs_: the indices of every layer on the host
// (validated: in range, no repeats; a device-to-host copy for CUDA idx), B_new / A_new in B's dtype
// (empty lists for fusion). Also refuses a tensor the call writes overlapping another of its tensors.
struct RecomposeArgs {
  std::vector<std::vector<int64_t>> idx;
  std::vector<at::Tensor> B_new, A_new;
};
RecomposeArgs check_recompose_args(const char* op, at::TensorList W, at::TensorList B,
                                   at::TensorList A, at::TensorList idx,
                                   at::ArrayRef<double> scaling, at::TensorList Bn,
                                   at::TensorList An);

// Run body(i) for i in [0, n) over the OpenMP threads, largest-cost-first when `order` is given,
// dynamically scheduled; the first exception thrown by any body is rethrown on the caller.
void parallel_tasks(int64_t n, const std::vector<int64_t>& order,
                    const std::function<void(int64_t)>& body);

// Whether this process is the child of a fork() (after the extension was loaded). OpenMP's threads do not
// survive a fork: the child's first parallel region waits for them for ever, even for two tiny layers.
bool forked_child();

// at::parallel_for, run serially in a forked child (the ops' results do not depend on the thread count).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (forked_child()) {
    if (begin < end) f(begin, end);
    return;
  }
  at::parallel_for(begin, end, grain, f);
}

// out = N (add = false) or out += eps * N (add = true), N the Philox normals of (seed, stream) by
// row-major position; out contiguous float32/float64 on the CPU or (CUDA build) a GPU.
// Defined in philox_cpu.cpp; philox_normal_fill is the add = false case.
void philox_normals_into(const at::Tensor& out, int64_t seed, int64_t stream, double eps, bool add);

// buf[t] += eps * z_{i0 + t} for t in [0, i1 - i0), z the Philox normals of (seed, stream): the
// arithmetic of philox_normals_into(add = true) on a slice of the index range (T float or double).
// Defined in philox_cpu.cpp.
template <typename T>
void philox_add_normals_range(T* buf, int64_t i0, int64_t i1, uint64_t seed, uint64_t stream, T eps);

// Rows per chunk of project_perturbed's (U + eps N)^T Y: one chunk's noise is all that exists at
// a time (a CUDA block's tile); chunks are reduced in a fixed order.
constexpr int64_t kPerturbRows = 128;

// SVD of every matrix of A (b x p x q, any float dtype, any strides) on A's device by the batched
// one-sided Jacobi kernel (csrc/include/subspace_ext/small_svd.h; the same bits on CPU and CUDA),
// in float64: U (b x p x k), S (b x k, descending), V (b x q x k), k = min(p, q), A = U diag(S) V^T.
// No argument checks and no host sync (NaN in, NaN out); defined in rsvd_cpu.cpp.
SVDResult small_svd_batched(const at::Tensor& A);

#ifdef SUBSPACE_EXT_WITH_CUDA
// philox_normals_into for a CUDA tensor (csrc/cuda/cuda_ops.cpp).
void philox_normals_into_cuda(const at::Tensor& out, int64_t seed, int64_t stream, double eps, bool add);
// philox_normal_icdf_fill for a CUDA tensor (csrc/cuda/cuda_ops.cpp).
void philox_normal_icdf_into_cuda(const at::Tensor& out, int64_t seed, int64_t stream);
// The CUDA launch of small_svd_batched on its work tensors (float64, contiguous, column-major
// matrices: a b x q x p, v b x q x q, norms b x q; results u b x q x p, s b x q, vout b x q x q).
void small_svd_into_cuda(const at::Tensor& a, const at::Tensor& v, const at::Tensor& norms,
                         const at::Tensor& u, const at::Tensor& s, const at::Tensor& vout);
// The CUDA launch of rsvd_cpu.cpp's gram_orth_batched on its work tensors (float64, contiguous:
// g b x q x q, overwritten; d b x q scratch; t b x q x q, column-major T; complete b, bool).
void gram_orth_into_cuda(const at::Tensor& g, const at::Tensor& d, const at::Tensor& t, const at::Tensor& complete);
// partial[c] = (U + eps N)^T Y over rows [c * kPerturbRows, ...) of U (m x k) and Y (m x r), any
// strides, U's dtype (float32/float64); N = Philox normals of (seed, stream) at row-major
// positions of U. partial: chunks x k x r, contiguous (csrc/cuda/cuda_ops.cpp).
void perturbed_tn_cuda(const at::Tensor& U, const at::Tensor& Y, double eps, int64_t seed, int64_t stream,
                       const at::Tensor& partial);
// out (p x q, any strides) = X (p x k) (U + eps N)^T for U (q x k), any strides, one dtype
// (float32/float64); N as above. The perturbed rows live in a thread block's shared-memory strip.
void perturbed_nt_cuda(const at::Tensor& X, const at::Tensor& U, double eps, int64_t seed, int64_t stream,
                       const at::Tensor& out);
#endif

}  // namespace subspace_ext
