// C++-only check of the native library (no Python): the ops are found in the dispatcher under
// subspace_ext::*, Philox matches the Random123 known-answer vector, and rsvd / factored_svd
// reconstruct a low-rank matrix. Exit code 0 = pass.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

int main() {
  using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

  // Philox4x32-10, counter 0, key 0 (Random123 kat_vectors).
  auto bits = torch::empty({4}, torch::kInt32);
  op<void(const at::Tensor&, int64_t, int64_t)>("subspace_ext::philox_uint32_").call(bits, 0, 0);
  const uint32_t kat[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  bool same = true;
  for (int i = 0; i < 4; ++i) same &= static_cast<uint32_t>(bits[i].item<int32_t>()) == kat[i];
  expect(same, "philox_uint32_ matches the Random123 known-answer vector");

  auto z = torch::empty({1 << 16}, torch::kFloat32);
  op<void(const at::Tensor&, int64_t, int64_t)>("subspace_ext::philox_normal_").call(z, 7, 0);
  expect(std::abs(z.mean().item<float>()) < 0.02f && std::abs(z.std().item<float>() - 1.f) < 0.02f,
         "philox_normal_ has mean 0 and std 1");

  // A rank-5 matrix: rsvd with rank 5 must reconstruct it to rounding.
  torch::manual_seed(0);
  auto A = torch::randn({70, 5}, torch::kFloat64).mm(torch::randn({5, 40}, torch::kFloat64));
  auto [U, S, V] = op<Triple(const at::Tensor&, int64_t, int64_t, int64_t, int64_t)>(
                       "subspace_ext::rsvd").call(A, 5, 4, 2, 0);
  const double err = (A - U.mm(torch::diag(S)).mm(V.t())).norm().item<double>() / A.norm().item<double>();
  expect(err < 1e-10, "rsvd reconstructs a rank-5 matrix");
  expect((U.t().mm(U) - torch::eye(5, torch::kFloat64)).abs().max().item<double>() < 1e-12,
         "rsvd U is orthonormal");

  auto B = torch::randn({50, 3}, torch::kFloat64), Af = torch::randn({3, 30}, torch::kFloat64);
  auto [U2, S2, V2] = op<Triple(const at::Tensor&, const at::Tensor&, int64_t)>(
                          "subspace_ext::factored_svd").call(B, Af, 3);
  const auto ref = torch::linalg_svdvals(B.mm(Af)).narrow(0, 0, 3);
  expect(torch::allclose(S2, ref, 1e-10, 1e-10), "factored_svd singular values match linalg");

  std::printf("%d passed, %d failed\n", 5 - failures, failures);
  return failures == 0 ? 0 : 1;
}
