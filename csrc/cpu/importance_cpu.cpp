// CPU kernels of the importance family (SRLoRA / AdaLoRA): per-pair importance scores for all
// LoRA layers in one call, and in-place, function-preserving fusion / re-initialisation of pairs.
//
// Layout (peft): W is the base weight (m x n, any strides), B = lora_B.weight (m x r),
// A = lora_A.weight (r x n); the update is s * B A. "Pair" j = (column j of B, row j of A).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "utils.h"

namespace subspace_ext {
namespace {

template <typename T> using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elementwise AdaLoRA update over one parameter p (with gradient g, states ipt/unc, same shape):
//   I = |p g|;  ipt <- b1 ipt + c1 I;  unc <- b2 unc + c2 |I - ipt|;  score = ipt * unc,
// with c = 1 - beta rounded from double (1 - b in the state dtype was 1.3% off at beta = 0.999999 in float32).
// Adds the score of element (i, j) into sums[i * row_w + j * col_w] so a caller can reduce over
// rows (A: per row) or columns (B: per column).
template <typename P, typename S>
void update_states(const P* p, const P* g, S* ipt, S* unc, int64_t rows, int64_t cols, S b1, S c1,
                   S b2, S c2, S* sums, int64_t row_w, int64_t col_w) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t e = i * cols + j;
      const S I = std::abs(static_cast<S>(p[e]) * static_cast<S>(g[e]));
      const S mean = b1 * ipt[e] + c1 * I;
      const S u = b2 * unc[e] + c2 * std::abs(I - mean);
      ipt[e] = mean;
      unc[e] = u;
      sums[i * row_w + j * col_w] += mean * u;
    }
  }
}

void pair_importance_cpu_(at::TensorList A, at::TensorList B, at::TensorList grad_A,
                          at::TensorList grad_B, at::TensorList ipt_A, at::TensorList ipt_B,
                          at::TensorList unc_A, at::TensorList unc_B, at::TensorList scores,
                          double beta1, double beta2) {
  check_pair_importance_args(A, B, grad_A, grad_B, ipt_A, ipt_B, unc_A, unc_B, scores, beta1, beta2);
  const int64_t L = static_cast<int64_t>(A.size());
  parallel_tasks(L, {}, [&](int64_t l) {
    const int64_t r = A[l].size(0), n = A[l].size(1), m = B[l].size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A[l].scalar_type(), "pair_importance", [&] {
      using P = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(ipt_A[l].scalar_type(), "pair_importance_state", [&] {
        using S = scalar_t;
        const S b1 = static_cast<S>(beta1), b2 = static_cast<S>(beta2);
        const S c1 = static_cast<S>(1.0 - beta1), c2 = static_cast<S>(1.0 - beta2);
        std::vector<S> sum_a(r, S(0)), sum_b(r, S(0));
        update_states<P, S>(A[l].data_ptr<P>(), grad_A[l].data_ptr<P>(), ipt_A[l].data_ptr<S>(),
                            unc_A[l].data_ptr<S>(), r, n, b1, c1, b2, c2, sum_a.data(), 1, 0);
        update_states<P, S>(B[l].data_ptr<P>(), grad_B[l].data_ptr<P>(), ipt_B[l].data_ptr<S>(),
                            unc_B[l].data_ptr<S>(), m, r, b1, c1, b2, c2, sum_b.data(), 0, 1);
        S* out = scores[l].data_ptr<S>();
        for (int64_t j = 0; j < r; ++j)
          out[j] = sum_a[j] / static_cast<S>(n) + sum_b[j] / static_cast<S>(m);
      });
    });
  });
}

// W += s * (B[:, idx] A[idx, :] - Bn An), then B[:, idx] = Bn and A[idx, :] = An; without Bn/An
// this is plain fusion with B[:, idx] = 0. One pass over W, no m x n temporary: the rank-2q update
// is accumulated row by row in float (double for float64 W) and rounded once into W's dtype.
struct LayerUpdate {
  at::Tensor W, B, A, Bn, An;
  std::vector<int64_t> idx;
  double s = 1.0;
  std::vector<double> rows;  // packed rows of the update: old A[idx] (q x n), then An (q x n)
};

template <typename F_t>
void pack_rows(LayerUpdate& u) {
  const int64_t n = u.W.size(1), q = static_cast<int64_t>(u.idx.size());
  const bool has_new = u.Bn.defined();
  u.rows.assign((has_new ? 2 : 1) * q * n, 0.0);
  const F_t* a = u.A.data_ptr<F_t>();
  const int64_t as0 = u.A.stride(0), as1 = u.A.stride(1);
  for (int64_t t = 0; t < q; ++t)
    for (int64_t j = 0; j < n; ++j) u.rows[t * n + j] = static_cast<double>(a[u.idx[t] * as0 + j * as1]);
  if (!has_new) return;
  const F_t* an = u.An.data_ptr<F_t>();
  const int64_t ans0 = u.An.stride(0), ans1 = u.An.stride(1);
  F_t* aw = u.A.data_ptr<F_t>();
  for (int64_t t = 0; t < q; ++t)
    for (int64_t j = 0; j < n; ++j) {
      const F_t v = an[t * ans0 + j * ans1];
      u.rows[(q + t) * n + j] = static_cast<double>(v);
      aw[u.idx[t] * as0 + j * as1] = v;  // the old row is already packed
    }
}

// acc[j] += sum_t coef[t] * rows[t * n + j]: the hot loop, cloned for AVX-512 / AVX2 and picked at
// load time (the build itself targets baseline x86-64). FMA contraction stays off (-ffp-contract).

template <typename Acc>
inline void add_rows_impl(Acc* acc, const Acc* rows, const Acc* coef, int64_t terms, int64_t n) {
  for (int64_t t = 0; t < terms; ++t) {
    const Acc c = coef[t];
    const Acc* r = rows + t * n;
    for (int64_t j = 0; j < n; ++j) acc[j] += c * r[j];
  }
}
SE_TARGET_CLONES void add_rows(float* acc, const float* rows, const float* coef, int64_t terms,
                               int64_t n) {
  add_rows_impl(acc, rows, coef, terms, n);
}
SE_TARGET_CLONES void add_rows(double* acc, const double* rows, const double* coef, int64_t terms,
                               int64_t n) {
  add_rows_impl(acc, rows, coef, terms, n);
}

template <typename W_t, typename F_t>
void recompose_rows(LayerUpdate& u, int64_t row0, int64_t row1) {
  using Acc = Acc<W_t>;
  const int64_t n = u.W.size(1), q = static_cast<int64_t>(u.idx.size());
  const bool has_new = u.Bn.defined();
  const int64_t terms = has_new ? 2 * q : q;
  std::vector<Acc> rows(u.rows.begin(), u.rows.end()), acc(n), coef(terms);
  W_t* w = u.W.data_ptr<W_t>();
  const int64_t ws0 = u.W.stride(0), ws1 = u.W.stride(1);
  F_t* b = u.B.data_ptr<F_t>();
  const int64_t bs0 = u.B.stride(0), bs1 = u.B.stride(1);
  const F_t* bn = has_new ? u.Bn.data_ptr<F_t>() : nullptr;
  const int64_t bns0 = has_new ? u.Bn.stride(0) : 0, bns1 = has_new ? u.Bn.stride(1) : 0;
  const Acc s = static_cast<Acc>(u.s);
  for (int64_t i = row0; i < row1; ++i) {
    for (int64_t t = 0; t < q; ++t) {
      F_t& b_it = b[i * bs0 + u.idx[t] * bs1];
      coef[t] = s * static_cast<Acc>(b_it);
      if (has_new) {
        const F_t v = bn[i * bns0 + t * bns1];
        coef[q + t] = -s * static_cast<Acc>(v);
        b_it = v;
      } else {
        b_it = F_t(0);
      }
    }
    W_t* wr = w + i * ws0;
    if constexpr (std::is_same_v<W_t, Acc>) {
      if (ws1 == 1) {  // float32 / float64 rows in place
        add_rows(wr, rows.data(), coef.data(), terms, n);
        continue;
      }
    }
    for (int64_t j = 0; j < n; ++j) acc[j] = static_cast<Acc>(wr[j * ws1]);
    add_rows(acc.data(), rows.data(), coef.data(), terms, n);
    for (int64_t j = 0; j < n; ++j) wr[j * ws1] = static_cast<W_t>(acc[j]);
  }
}

void recompose(std::vector<LayerUpdate>& layers) {
  const int64_t L = static_cast<int64_t>(layers.size());
  // Phase 1 (per layer): pack the rows the update needs, then write the new A rows.
  parallel_tasks(L, {}, [&](int64_t l) {
    if (layers[l].idx.empty()) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, layers[l].B.scalar_type(), "pack_rows",
                                    [&] { pack_rows<scalar_t>(layers[l]); });
  });
  // Phase 2: row blocks of every layer, so 1 huge layer and 200 small ones both spread.
  constexpr int64_t kRows = 64;
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t l = 0; l < L; ++l)
    if (!layers[l].idx.empty())
      for (int64_t r0 = 0; r0 < layers[l].W.size(0); r0 += kRows) tasks.emplace_back(l, r0);
  parallel_tasks(static_cast<int64_t>(tasks.size()), {}, [&](int64_t t) {
    auto& u = layers[tasks[t].first];
    const int64_t r0 = tasks[t].second, r1 = std::min(r0 + kRows, u.W.size(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.W.scalar_type(), "recompose_W", [&] {
      using W_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.B.scalar_type(), "recompose_F", [&] {
        recompose_rows<W_t, scalar_t>(u, r0, r1);
      });
    });
  });
}

std::vector<LayerUpdate> collect(const char* op, at::TensorList W, at::TensorList B,
                                 at::TensorList A, at::TensorList idx, at::ArrayRef<double> scaling,
                                 at::TensorList Bn, at::TensorList An) {
  const auto checked = check_recompose_args(op, W, B, A, idx, scaling, Bn, An);
  std::vector<LayerUpdate> layers(W.size());
  for (size_t l = 0; l < W.size(); ++l) {
    auto& u = layers[l];
    u.W = W[l];
    u.B = B[l];
    u.A = A[l];
    u.s = scaling[l];
    u.idx = checked.idx[l];
    if (!Bn.empty()) {
      u.Bn = checked.B_new[l];
      u.An = checked.A_new[l];
    }
  }
  return layers;
}

void fuse_pairs_cpu_(at::TensorList W, at::TensorList B, at::TensorList A, at::TensorList idx,
                     at::ArrayRef<double> scaling) {
  auto layers = collect("fuse_pairs_", W, B, A, idx, scaling, {}, {});
  recompose(layers);
}

void reinit_pairs_cpu_(at::TensorList W, at::TensorList B, at::TensorList A, at::TensorList idx,
                       at::TensorList B_new, at::TensorList A_new, at::ArrayRef<double> scaling) {
  TORCH_CHECK_VALUE(B_new.size() == W.size() && A_new.size() == W.size(),
              "reinit_pairs_: B_new and A_new must have one entry per layer");
  auto layers = collect("reinit_pairs_", W, B, A, idx, scaling, B_new, A_new);
  recompose(layers);
}

}  // namespace

TORCH_LIBRARY_IMPL(subspace_ext, CPU, m) {
  m.impl("pair_importance_", &pair_importance_cpu_);
  m.impl("fuse_pairs_", &fuse_pairs_cpu_);
  m.impl("reinit_pairs_", &reinit_pairs_cpu_);
}

}  // namespace subspace_ext
