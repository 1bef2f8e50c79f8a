// CPU kernels of the project family: coefficients of an update on a basis, and the way back.
// The update is never formed as an m x n matrix when it is given by LoRA factors.
#include <torch/library.h>

#include "utils.h"

namespace subspace_ext {
namespace {

void check_matrix(const at::Tensor& t, const char* op, const char* arg) {
  check_float(t, op, arg);
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

at::Tensor project_cpu(const at::Tensor& U, const at::Tensor& V, const at::Tensor& B,
                       const at::Tensor& A, double scaling) {
  check_matrix(U, "project", "U");
  check_matrix(V, "project", "V");
  check_matrix(B, "project", "B");
  check_matrix(A, "project", "A");
  check_same_dtype({{"U", &U}, {"V", &V}, {"B", &B}, {"A", &A}}, "project");
  TORCH_CHECK_VALUE(U.size(-2) == B.size(-2) && B.size(-1) == A.size(-2) && A.size(-1) == V.size(-2),
              "project: shapes do not chain: U ", U.sizes(), ", B ", B.sizes(), ", A ", A.sizes(),
              ", V ", V.sizes(), " (need U m x k1, B m x r, A r x n, V n x k2)");
  at::Tensor left = at::matmul(U.mT(), B);   // k1 x r
  at::Tensor right = at::matmul(A, V);       // r x k2
  at::Tensor C = at::matmul(left, right);
  if (scaling != 1.0) C.mul_(scaling);
  // NaN/Inf in B or A reach C (k1 x k2): checked here rather than by a pass over the inputs.
  TORCH_CHECK_VALUE(C.isfinite().all().item<bool>(),
                    "project: the result is not finite: B or A contains NaN or Inf");
  return C;
}

// C = U^T D V, in the cheaper association order.
at::Tensor project_dense_cpu(const at::Tensor& U, const at::Tensor& V, const at::Tensor& D) {
  check_matrix(U, "project_dense", "U");
  check_matrix(V, "project_dense", "V");
  check_matrix(D, "project_dense", "D");
  check_same_dtype({{"U", &U}, {"V", &V}, {"D", &D}}, "project_dense");
  TORCH_CHECK_VALUE(U.size(-2) == D.size(-2) && D.size(-1) == V.size(-2),
              "project_dense: shapes do not chain: U ", U.sizes(), ", D ", D.sizes(), ", V ",
              V.sizes());
  if (U.size(-1) <= V.size(-1)) return at::matmul(at::matmul(U.mT(), D), V);
  return at::matmul(U.mT(), at::matmul(D, V));
}

// Delta W = U C V^T.
at::Tensor reconstruct_cpu(const at::Tensor& U, const at::Tensor& C, const at::Tensor& V) {
  check_matrix(U, "reconstruct", "U");
  check_matrix(C, "reconstruct", "C");
  check_matrix(V, "reconstruct", "V");
  check_same_dtype({{"U", &U}, {"C", &C}, {"V", &V}}, "reconstruct");
  TORCH_CHECK_VALUE(U.size(-1) == C.size(-2) && C.size(-1) == V.size(-1),
              "reconstruct: shapes do not chain: U ", U.sizes(), ", C ", C.sizes(), ", V ",
              V.sizes(), " (need U m x k1, C k1 x k2, V n x k2)");
  return at::matmul(at::matmul(U, C), V.mT());
}

}  // namespace

TORCH_LIBRARY_IMPL(subspace_ext, CPU, m) {
  m.impl("project", &project_cpu);
  m.impl("project_dense", &project_dense_cpu);
  m.impl("reconstruct", &reconstruct_cpu);
}

#ifdef SUBSPACE_EXT_WITH_CUDA
// Three GEMMs: cuBLAS through ATen is the floor on CUDA, so the same composition is registered.
TORCH_LIBRARY_IMPL(subspace_ext, CUDA, m) {
  m.impl("project", &project_cpu);
  m.impl("project_dense", &project_dense_cpu);
  m.impl("reconstruct", &reconstruct_cpu);
}
#endif

}  // namespace subspace_ext
