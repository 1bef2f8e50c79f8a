#include "utils.h"

#include <cmath>

namespace subspace_ext {

void check_float(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", arg,
              " must be float32 or float64, got ", t.scalar_type());
}

namespace {

// Upper Cholesky factor of a small SPD matrix G (l x l, float64, contiguous) in place of R.
// Returns false when a pivot is not safely positive (relative to the largest diagonal).
bool cholesky_upper(const at::Tensor& G, at::Tensor& R) {
  const int64_t l = G.size(0);
  R = at::zeros_like(G);
  const double* g = G.data_ptr<double>();
  double* r = R.data_ptr<double>();
  double dmax = 0.0;
  for (int64_t i = 0; i < l; ++i) dmax = std::max(dmax, g[i * l + i]);
  if (!(dmax > 0.0) || !std::isfinite(dmax)) return false;
  // A pivot below this means cond(Y) beyond ~1e6: Cholesky-QR2 would lose orthogonality.
  const double tol = 1e-12 * dmax;
  for (int64_t j = 0; j < l; ++j) {
    double d = g[j * l + j];
    for (int64_t k = 0; k < j; ++k) d -= r[k * l + j] * r[k * l + j];
    if (!(d > tol)) return false;
    const double rjj = std::sqrt(d);
    r[j * l + j] = rjj;
    for (int64_t i = j + 1; i < l; ++i) {
      double v = g[j * l + i];
      for (int64_t k = 0; k < j; ++k) v -= r[k * l + j] * r[k * l + i];
      r[j * l + i] = v / rjj;
    }
  }
  return true;
}

// Inverse of an upper-triangular l x l matrix (float64, contiguous), by back substitution.
at::Tensor inverse_upper(const at::Tensor& R) {
  const int64_t l = R.size(0);
  at::Tensor X = at::zeros_like(R);
  const double* r = R.data_ptr<double>();
  double* x = X.data_ptr<double>();
  for (int64_t j = 0; j < l; ++j) {
    x[j * l + j] = 1.0 / r[j * l + j];
    for (int64_t i = j - 1; i >= 0; --i) {
      double v = 0.0;
      for (int64_t k = i + 1; k <= j; ++k) v += r[i * l + k] * x[k * l + j];
      x[i * l + j] = -v / r[i * l + i];
    }
  }
  return X;
}

// One Cholesky-QR pass: Y = Q R, the Gram matrix and its Cholesky factor in float64, the tall
// product Y R^-1 in Y's dtype. False if the Gram matrix is not safely positive definite.
bool cholesky_qr(const at::Tensor& Y, at::Tensor& Q, at::Tensor& R) {
  const at::Tensor Yd = Y.to(at::kDouble);
  const at::Tensor G = at::mm(Yd.t(), Yd).contiguous();
  if (!cholesky_upper(G, R)) return false;
  Q = at::mm(Y, inverse_upper(R).to(Y.scalar_type()));
  return true;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> orthonormalize_columns(const at::Tensor& Y, int passes) {
  const int64_t p = Y.size(0), l = Y.size(1);
  if (p >= l && l > 0) {
    at::Tensor Q1, R1, Q2, R2;
    if (cholesky_qr(Y, Q1, R1)) {
      if (passes == 1) return {Q1, R1};
      if (cholesky_qr(Q1, Q2, R2)) return {Q2, at::mm(R2, R1)};
    }
  }
  auto qr = at::linalg_qr(Y.to(at::kDouble), "reduced");
  return {std::get<0>(qr).to(Y.scalar_type()), std::get<1>(qr)};
}

void canonicalize_signs_(at::Tensor& U, at::Tensor& V) {
  if (U.size(-1) == 0 || U.size(-2) == 0) return;
  const at::Tensor idx = U.abs().argmax(-2, /*keepdim=*/true);
  const at::Tensor sign = U.gather(-2, idx).sign();
  const at::Tensor flip = at::where(sign < 0, -at::ones_like(sign), at::ones_like(sign));
  U.mul_(flip);
  V.mul_(flip);
}

SVDResult svd_of_core(const at::Tensor& Qa, const at::Tensor& core, const at::Tensor& Qb,
                      int64_t rank, at::ScalarType dtype) {
  auto svd = at::linalg_svd(core.to(at::kDouble), /*full_matrices=*/false);
  const int64_t k = std::min<int64_t>(rank, std::get<1>(svd).size(0));
  at::Tensor U = at::mm(Qa.to(dtype), std::get<0>(svd).narrow(1, 0, k).to(dtype));
  at::Tensor V = at::mm(Qb.to(dtype), std::get<2>(svd).narrow(0, 0, k).t().to(dtype));
  canonicalize_signs_(U, V);
  return {U, std::get<1>(svd).narrow(0, 0, k).to(dtype), V};
}

}  // namespace subspace_ext

#include <ATen/Parallel.h>

#include <exception>
#include <mutex>

namespace subspace_ext {

void parallel_tasks(int64_t n, const std::vector<int64_t>& order,
                    const std::function<void(int64_t)>& body) {
  if (n <= 0) return;
  if (n == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < n; ++t) body(order.empty() ? t : order[t]);
    return;
  }
  std::exception_ptr error;
  std::mutex mu;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t t = 0; t < n; ++t) {
    try {
      body(order.empty() ? t : order[t]);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace subspace_ext
