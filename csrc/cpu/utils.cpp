#include "utils.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace subspace_ext {

namespace {

// One tensor of a call, for the overlap check below.
struct Span {
  const at::Tensor* t;
  size_t layer;
  const char* name;
  bool written;
};

// A strided view of at most 2 dimensions as `rows` runs of `cols` elements: element (i, j) at
// byte offset i * outer + j * inner from its first one (inner <= outer; size-1 dimensions dropped,
// so a transposed view has the same form as its original).
struct Grid {
  int64_t rows = 1, cols = 1, outer = 0, inner = 0;
};

bool as_grid(const at::Tensor& t, Grid& g) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride in bytes, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.push_back({t.stride(d) * t.element_size(), t.size(d)});
  if (dims.size() > 2) return false;
  std::sort(dims.begin(), dims.end());
  if (dims.size() == 2) g = {dims[1].second, dims[0].second, dims[1].first, dims[0].first};
  if (dims.size() == 1) g = {1, dims[0].second, 0, dims[0].first};
  return true;
}

// A single run of b that steps by a's row pitch is a column: the form a's lattice has for it.
void as_column_of(Grid& b, const Grid& a) {
  if (b.rows == 1 && b.cols > 1 && a.rows > 1 && b.inner == a.outer) b = {b.cols, 1, b.inner, a.inner};
}

// Whether a and b, whose address ranges overlap, may share a byte. Exact for two views of at most
// 2 dimensions with one element size and the same strides, or where one is a single row or column
// of the other's lattice (slices of one weight, with or without a step, a view and its transpose:
// the cases the ops meet). Their elements are then i L + j c bytes from a's first, and b's first is
// d bytes on: they share a byte iff some row difference t and column difference u put
// |t L + u c - d| < e. Any other pair whose ranges overlap counts as sharing.
bool may_share(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense()) return true;
  Grid ga, gb;
  if (a.element_size() != b.element_size() || !as_grid(a, ga) || !as_grid(b, gb)) return true;
  const int64_t e = a.element_size();
  const int64_t d = reinterpret_cast<intptr_t>(b.data_ptr()) - reinterpret_cast<intptr_t>(a.data_ptr());
  as_column_of(ga, gb);
  as_column_of(gb, ga);
  if (ga.rows == 1 && gb.rows == 1 && ga.inner != gb.inner) gb = {gb.cols, 1, gb.inner, ga.inner};  // 1-D, 1-D
  if (ga.cols > 1 && gb.cols > 1 && ga.inner != gb.inner) return true;
  if (ga.rows > 1 && gb.rows > 1 && ga.outer != gb.outer) return true;
  const int64_t c = ga.cols > 1 ? ga.inner : gb.cols > 1 ? gb.inner : e;
  const int64_t L = ga.rows > 1 ? ga.outer : gb.outer;
  if (c < e || ((ga.rows > 1 || gb.rows > 1) && L < e)) return true;  // a stride of 0: repeated elements
  if (ga.rows + gb.rows > (int64_t{1} << 24)) return true;            // too many rows to walk
  for (int64_t t = 1 - gb.rows; t < ga.rows; ++t) {
    const int64_t x = d - t * L;  // u c must come within e of x, for u in (-gb.cols, ga.cols)
    const int64_t u0 = x >= 0 ? x / c : -((-x + c - 1) / c);  // floor(x / c)
    for (int64_t u = u0; u <= u0 + 1; ++u)
      if (u > -gb.cols && u < ga.cols && u * c - x < e && x - u * c < e) return true;
  }
  return false;
}

// The bytes [lo, hi) a non-empty tensor's elements lie in.
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {lo, lo + static_cast<uintptr_t>(extent) * t.element_size()};
}

// Whether a and b share a byte (exactly where may_share is exact; else whether their ranges meet).
bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [alo, ahi] = byte_range(a);
  const auto [blo, bhi] = byte_range(b);
  return alo < bhi && blo < ahi && may_share(a, b);
}

// Refuses two tensors of a call sharing memory when the call writes one of them (a weight passed for
// two layers, a B shared by two adapters, one state passed as both ipt and unc): the layers are
// updated concurrently (threads, CUDA blocks) and reads would see half-written values. Tensors whose
// address ranges overlap are compared by may_share: dense ones always share; strided views of one
// buffer (row or column slices of one weight, interleaved or not) only if an element is in both.
// O(n log n) in the number of tensors, plus the pairs whose ranges overlap.
void check_disjoint(const char* op, std::vector<Span> in) {
  struct Range {
    uintptr_t lo, hi;
    const Span* s;
  };
  std::vector<Range> spans;
  for (const Span& s : in)
    if (s.t->numel() > 0) {
      const auto [lo, hi] = byte_range(*s.t);
      spans.push_back({lo, hi, &s});
    }
  std::sort(spans.begin(), spans.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
  for (size_t i = 0; i < spans.size(); ++i)
    for (size_t j = i + 1; j < spans.size() && spans[j].lo < spans[i].hi; ++j) {
      const Span &a = *spans[i].s, &b = *spans[j].s;
      if (!a.written && !b.written) continue;
      const bool overlap = may_share(*a.t, *b.t);
      const auto [first, second] = a.layer < b.layer || (a.layer == b.layer && std::string(a.name) > b.name)
                                       ? std::pair{&a, &b} : std::pair{&b, &a};
      TORCH_CHECK_VALUE(!overlap, op, ": layer ", first->layer, "'s ", first->name, " and layer ", second->layer,
                        "'s ", second->name, " share memory (the same tensor passed twice?), or are views of one ",
                        "buffer interleaved in a way this check does not follow element by element; the call updates ",
                        "tensors in place, so each tensor it writes must be passed once, with memory of its own");
    }
}

}  // namespace

void check_float(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", arg,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_weight(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(is_weight_dtype(t.scalar_type()), op, ": ", arg, " must be float32, float64, bfloat16 or float16, got ",
                   t.scalar_type());
}

void check_pair_importance_args(at::TensorList A, at::TensorList B, at::TensorList grad_A,
                                at::TensorList grad_B, at::TensorList ipt_A, at::TensorList ipt_B,
                                at::TensorList unc_A, at::TensorList unc_B, at::TensorList scores,
                                double beta1, double beta2) {
  const int64_t L = static_cast<int64_t>(A.size());
  TORCH_CHECK_VALUE(B.size() == A.size() && grad_A.size() == A.size() && grad_B.size() == A.size() &&
                  ipt_A.size() == A.size() && ipt_B.size() == A.size() &&
                  unc_A.size() == A.size() && unc_B.size() == A.size() && scores.size() == A.size(),
              "pair_importance_: all lists must have the same length");
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
                    "pair_importance_: beta1 and beta2 must be in [0, 1), got ", beta1, " and ", beta2);
  for (int64_t l = 0; l < L; ++l) {
    const auto pt = A[l].scalar_type();
    TORCH_CHECK_TYPE(is_weight_dtype(pt), "pair_importance_: layer ", l, ": A and B must be floating point, got ", pt);
    TORCH_CHECK_VALUE(A[l].dim() == 2 && B[l].dim() == 2 && B[l].size(1) == A[l].size(0),
                "pair_importance: layer ", l, ": expected A (r x n) and B (m x r)");
    for (const auto* t : {&A[l], &B[l], &grad_A[l], &grad_B[l], &ipt_A[l], &ipt_B[l],
                          &unc_A[l], &unc_B[l]})
      TORCH_CHECK_VALUE(t->is_contiguous(), "pair_importance: layer ", l, ": tensors must be contiguous");
    TORCH_CHECK_VALUE(grad_A[l].sizes() == A[l].sizes() && ipt_A[l].sizes() == A[l].sizes() &&
                    unc_A[l].sizes() == A[l].sizes() && grad_B[l].sizes() == B[l].sizes() &&
                    ipt_B[l].sizes() == B[l].sizes() && unc_B[l].sizes() == B[l].sizes(),
                "pair_importance: layer ", l, ": gradients and states must match A and B");
    TORCH_CHECK_TYPE(grad_A[l].scalar_type() == A[l].scalar_type() &&
                    grad_B[l].scalar_type() == B[l].scalar_type() &&
                    A[l].scalar_type() == B[l].scalar_type(),
                "pair_importance: layer ", l, ": A, B and their gradients must share a dtype");
    const auto st = ipt_A[l].scalar_type();
    TORCH_CHECK_TYPE((st == at::kFloat || st == at::kDouble) && ipt_B[l].scalar_type() == st &&
                    unc_A[l].scalar_type() == st && unc_B[l].scalar_type() == st,
                "pair_importance: layer ", l, ": states must all be float32 or all float64");
    TORCH_CHECK_VALUE(scores[l].dim() == 1 && scores[l].size(0) == A[l].size(0) &&
                          scores[l].scalar_type() == st && scores[l].is_contiguous(),
                      "pair_importance_: layer ", l, ": scores must be a contiguous (r,) tensor of the states' dtype");
    TORCH_CHECK_VALUE(A[l].numel() > 0 && B[l].numel() > 0, "pair_importance_: layer ", l,
                      ": A and B must not be empty (a pair's score is a mean over its entries), got ", A[l].sizes(),
                      " and ", B[l].sizes());
  }
  std::vector<Span> spans;
  for (size_t l = 0; l < A.size(); ++l) {
    for (auto [t, name] : {std::pair{&A[l], "A"}, std::pair{&B[l], "B"}, std::pair{&grad_A[l], "grad_A"},
                           std::pair{&grad_B[l], "grad_B"}})
      spans.push_back({t, l, name, false});
    for (auto [t, name] : {std::pair{&ipt_A[l], "ipt_A"}, std::pair{&ipt_B[l], "ipt_B"},
                           std::pair{&unc_A[l], "unc_A"}, std::pair{&unc_B[l], "unc_B"},
                           std::pair{&scores[l], "scores"}})
      spans.push_back({t, l, name, true});
  }
  check_disjoint("pair_importance_", std::move(spans));
}

namespace {

// Copies of `parts` on the host: those already there as they are, the others with one
// device-to-host transfer when they share a device (the per-layer idx lists and finiteness flags of
// fuse/reinit: one sync for all layers, not one each; none when every idx is on the host).
std::vector<at::Tensor> to_host(const std::vector<at::Tensor>& parts) {
  std::vector<at::Tensor> out(parts.size());
  std::vector<size_t> away;  // parts not on the host
  for (size_t i = 0; i < parts.size(); ++i) {
    if (parts[i].is_cpu())
      out[i] = parts[i].contiguous();
    else
      away.push_back(i);
  }
  if (away.empty()) return out;
  bool one_device = true;
  for (size_t i : away) one_device = one_device && parts[i].device() == parts[away[0]].device();
  if (!one_device) {
    for (size_t i : away) out[i] = parts[i].to(at::kCPU).contiguous();
    return out;
  }
  std::vector<at::Tensor> flat;
  for (size_t i : away) flat.push_back(parts[i].reshape(-1));
  const at::Tensor all = at::cat(flat).to(at::kCPU);
  int64_t at = 0;
  for (size_t i : away) {
    out[i] = all.narrow(0, at, parts[i].numel()).reshape(parts[i].sizes());
    at += parts[i].numel();
  }
  return out;
}

// Refuses tensors that the recomposition writes (W and B; A too for reinit) overlapping any other
// tensor of the call (check_disjoint), the new pairs of every layer included: layers run in
// parallel, so one layer's A_new must not be another layer's A either. Only layers with pairs to
// move take part.
void check_no_overlap(const char* op, at::TensorList W, at::TensorList B, at::TensorList A,
                      const RecomposeArgs& args, bool A_written) {
  std::vector<Span> spans;
  for (size_t l = 0; l < W.size(); ++l) {
    if (args.idx[l].empty()) continue;
    spans.push_back({&W[l], l, "W", true});
    spans.push_back({&B[l], l, "B", true});
    spans.push_back({&A[l], l, "A", A_written});
    if (l < args.B_new.size()) {
      spans.push_back({&args.B_new[l], l, "B_new", false});
      spans.push_back({&args.A_new[l], l, "A_new", false});
    }
  }
  check_disjoint(op, std::move(spans));
}

// Any of n IEEE numbers (their bits as Bits) NaN or Inf, i.e. with an all-ones exponent field
// `mask`? An OR over the whole array without branches, which the compiler vectorises.
template <typename Bits>
bool any_non_finite(const void* data, int64_t n, Bits mask) {
  const auto* p = static_cast<const unsigned char*>(data);
  Bits bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, p + i * static_cast<int64_t>(sizeof(Bits)), sizeof(Bits));  // the bits, without aliasing
    bad |= static_cast<Bits>((b & mask) == mask);
  }
  return bad != 0;
}

// Every element of a CPU tensor finite? A plain loop: the ATen isfinite().all() it replaces cost
// ~8 us per tensor, ~3 ms for the 400 small B_new / A_new of a 200-layer reinit_pairs_.
bool all_finite_host(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const void* p = c.const_data_ptr();
  const int64_t n = c.numel();
  switch (c.scalar_type()) {
    case at::kFloat: return !any_non_finite<uint32_t>(p, n, 0x7f800000u);
    case at::kDouble: return !any_non_finite<uint64_t>(p, n, 0x7ff0000000000000ull);
    case at::kHalf: return !any_non_finite<uint16_t>(p, n, 0x7c00u);
    case at::kBFloat16: return !any_non_finite<uint16_t>(p, n, 0x7f80u);
    default: break;
  }
  TORCH_CHECK(false, "all_finite: a float tensor was expected, got ", c.scalar_type());
}

}  // namespace

bool all_finite(const at::Tensor& t) {
  return t.is_cpu() ? all_finite_host(t) : t.isfinite().all().item<bool>();
}

// Per tensor of `ts` (not on the host): are all its elements finite? One bool tensor, from a few
// multi-tensor launches whatever the count (a per-tensor isfinite().all() was two launches each:
// 800 for 200 layers of new pairs, 34 ms on an H200). sum |x * 0| is 0 for finite entries and NaN
// for any Inf or NaN, and cannot overflow. Tensors on several devices are checked one by one.
static at::Tensor all_finite_flags(const std::vector<at::Tensor>& ts) {
  bool one_device = true;
  for (const at::Tensor& t : ts) one_device = one_device && t.device() == ts[0].device();
  if (!one_device) {
    std::vector<at::Tensor> flags;
    for (const at::Tensor& t : ts) flags.push_back(t.isfinite().all().to(at::kCPU).reshape({1}));
    return at::cat(flags);
  }
  return at::stack(at::_foreach_norm(at::_foreach_mul(ts, 0.0), 1)).isfinite();  // stack promotes dtypes
}

RecomposeArgs check_recompose_args(const char* op, at::TensorList W, at::TensorList B,
                                   at::TensorList A, at::TensorList idx,
                                   at::ArrayRef<double> scaling, at::TensorList Bn,
                                   at::TensorList An) {
  const size_t L = W.size();
  TORCH_CHECK_VALUE(B.size() == L && A.size() == L && idx.size() == L && scaling.size() == L, op,
              ": W, B, A, idx and scaling must have the same length");
  RecomposeArgs out;
  out.idx.resize(L);
  // Shapes, dtypes and devices first (no host sync), then idx and the new pairs' finiteness flags
  // of every layer come to the host together.
  std::vector<at::Tensor> host_parts;  // every layer's idx, then the device tensors' finiteness flags
  std::vector<char> new_finite;        // per layer with new pairs: B_new, A_new all finite?
  std::vector<char> new_cast;          // ... and whether each was cast to B's dtype (overflow names it)
  std::vector<at::Tensor> on_device;   // the new pairs not on the host, checked together below
  std::vector<size_t> flag_slot;       // new_finite's entry of each of them
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor &Wl = W[l], &Bl = B[l], &Al = A[l];
    TORCH_CHECK_VALUE(Wl.dim() == 2 && Bl.dim() == 2 && Al.dim() == 2 && Bl.size(0) == Wl.size(0) &&
                    Al.size(1) == Wl.size(1) && Bl.size(1) == Al.size(0),
                op, ": layer ", l, ": expected W (m x n), B (m x r), A (r x n), got ", Wl.sizes(),
                ", ", Bl.sizes(), ", ", Al.sizes());
    for (const auto* t : {&Wl, &Bl}) {
      const auto dt = t->scalar_type();
      TORCH_CHECK_TYPE(is_weight_dtype(dt), op, ": layer ", l, ": W, B and A must be floating point, got ", dt);
    }
    TORCH_CHECK_TYPE(Bl.scalar_type() == Al.scalar_type(), op, ": layer ", l,
                ": B and A must share a dtype");
    TORCH_CHECK_VALUE(std::isfinite(scaling[l]), op, ": layer ", l, ": scaling must be finite, got ", scaling[l]);
    for (auto [t, name] : {std::pair{&Wl, "W"}, std::pair{&Bl, "B"}, std::pair{&Al, "A"}}) {
      if (name[0] == 'A' && Bn.empty()) continue;  // fusion only reads A
      TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, op, ": layer ", l, ": ", name,
                        " has elements sharing memory (an expanded tensor?); it is written in place: pass a "
                        "tensor with its own memory (.contiguous())");
    }
    TORCH_CHECK_TYPE(idx[l].scalar_type() == at::kLong && idx[l].dim() == 1, op, ": layer ", l,
                     ": idx must be a 1-D int64 tensor");
    TORCH_CHECK_VALUE(idx[l].device() == Wl.device() || idx[l].is_cpu(), op, ": layer ", l,
                      ": idx must be on W's device or on the CPU");
    host_parts.push_back(idx[l]);
    if (!Bn.empty()) {
      const at::Tensor Bnl = Bn[l].to(Bl.scalar_type()), Anl = An[l].to(Bl.scalar_type());  // no copy if equal
      const int64_t q = idx[l].numel();
      TORCH_CHECK_VALUE(Bnl.device() == Wl.device() && Anl.device() == Wl.device(), op, ": layer ", l,
                        ": B_new and A_new must be on W's device");
      TORCH_CHECK_VALUE(Bnl.dim() == 2 && Bnl.size(0) == Wl.size(0) && Bnl.size(1) == q &&
                      Anl.dim() == 2 && Anl.size(0) == q && Anl.size(1) == Wl.size(1),
                  op, ": layer ", l, ": B_new must be (m x len(idx)) and A_new (len(idx) x n), got ",
                  Bnl.sizes(), " and ", Anl.sizes());
      for (auto [nt, nname] : {std::pair{&Bnl, "B_new"}, std::pair{&Anl, "A_new"}})
        for (auto [t, name] : {std::pair{&Wl, "W"}, std::pair{&Bl, "B"}, std::pair{&Al, "A"}})
          TORCH_CHECK_VALUE(!shares_memory(*nt, *t), op, ": layer ", l, ": ", nname, " shares memory with ", name,
                            ", which the call overwrites while reading it: pass a copy (", nname, ".clone())");
      for (const at::Tensor* given : {&Bn[l], &An[l]}) new_cast.push_back(given->scalar_type() != Bl.scalar_type());
      for (const at::Tensor* nt : {&Bnl, &Anl}) {
        if (nt->is_cpu()) {
          new_finite.push_back(all_finite_host(*nt));
        } else {
          flag_slot.push_back(new_finite.size());
          on_device.push_back(*nt);
          new_finite.push_back(1);
        }
      }
      out.B_new.push_back(Bnl);
      out.A_new.push_back(Anl);
    }
  }
  // The device tensors' flags are read with idx, in one transfer for all layers.
  if (!on_device.empty()) host_parts.push_back(all_finite_flags(on_device));
  const std::vector<at::Tensor> host = to_host(host_parts);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& ix = host[l];
    const int64_t* p = ix.data_ptr<int64_t>();
    const int64_t r = A[l].size(0);
    std::vector<char> seen(r, 0);
    for (int64_t t = 0; t < ix.numel(); ++t) {
      TORCH_CHECK_VALUE(p[t] >= 0 && p[t] < r, op, ": layer ", l, ": idx entry ", p[t],
                        " out of range [0, ", r, ")");
      TORCH_CHECK_VALUE(!seen[p[t]], op, ": layer ", l, ": idx has repeated entry ", p[t]);
      seen[p[t]] = 1;
      out.idx[l].push_back(p[t]);
    }
  }
  if (!on_device.empty()) {
    const at::Tensor flags = host[L].to(at::kBool).contiguous();
    for (size_t f = 0; f < flag_slot.size(); ++f) new_finite[flag_slot[f]] = flags.data_ptr<bool>()[f];
  }
  for (size_t f = 0; f < new_finite.size(); ++f)
    TORCH_CHECK_VALUE(new_finite[f], op, ": layer ", f / 2, ": ", f % 2 ? "A_new" : "B_new", " contains NaN or Inf",
                      new_cast[f] ? std::string(" in B's dtype ") + c10::toString(B[f / 2].scalar_type()) +
                                        " (where values beyond its range become Inf)"
                                  : std::string());
  check_no_overlap(op, W, B, A, out, /*A_written=*/!Bn.empty());
  return out;
}

namespace {

// Pivots at or below this fraction of the Gram matrix's largest diagonal entry mean cond(Y) beyond
// ~1e6, where Cholesky-QR2 would lose orthogonality: such (or NaN) Gram matrices take Householder QR.
constexpr double kPivotTol = 1e-12;
// Gram matrices up to this size are factored by the plain loops below on the host (a CPU Y: no
// library-call overhead, which dominates at rsvd's l = k + p); larger ones, and every one of a CUDA
// Y, through LAPACK / cuSOLVER (blocked and threaded: SOLAR's d x d bases, d in the thousands).
constexpr int64_t kHostCholeskyMax = 64;

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
  const double tol = kPivotTol * dmax;
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

// One Cholesky-QR pass: Y = Q R, the Gram matrix and its upper Cholesky factor in float64, the tall
// factor Q in Y's dtype. False if the Gram matrix is not safely positive definite. Through ATen the
// pivot test is the one host sync (a scalar), and Q = Y R^-1 is one triangular solve (p l^2 flops;
// R's inverse and a product took l^3 + 2 p l^2).
bool cholesky_qr(const at::Tensor& Y, at::Tensor& Q, at::Tensor& R) {
  const at::Tensor Yd = Y.to(at::kDouble);
  const at::Tensor G = at::mm(Yd.t(), Yd);
  if (Y.is_cpu() && G.size(0) <= kHostCholeskyMax) {
    if (!cholesky_upper(G.contiguous(), R)) return false;
    Q = at::mm(Y, inverse_upper(R).to(Y.scalar_type()));
    return true;
  }
  at::Tensor U, info;
  run_lapack(G, [&] { std::tie(U, info) = at::linalg_cholesky_ex(G, /*upper=*/true, /*check_errors=*/false); });
  const at::Tensor d = U.diagonal();
  if (!at::logical_and(info == 0, (d * d).min() > G.diagonal().max() * kPivotTol).item<bool>()) return false;
  R = U;
  Q = at::linalg_solve_triangular(U.to(Y.scalar_type()), Y, /*upper=*/true, /*left=*/false);
  return true;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> orthonormalize_columns(const at::Tensor& Y, int passes, bool with_r) {
  const int64_t p = Y.size(0), l = Y.size(1);
  // On the CPU, beyond the host loops' size, LAPACK's blocked Householder QR takes fewer flops than
  // Cholesky-QR2 (4pl^2 - 4l^3/3 against about 6pl^2) and measured 1.2-1.45x faster on 2 cores for
  // l from 128 to 1536 (SOLAR's bases); one Cholesky-QR pass (a subspace iteration's) stays cheaper.
  // On a GPU Cholesky-QR's GEMMs are the fast path.
  const bool householder = Y.is_cpu() && l > kHostCholeskyMax && passes >= 2;
  if (p >= l && l > 0 && !householder) {
    at::Tensor Q1, R1, Q2, R2;
    if (cholesky_qr(Y, Q1, R1)) {
      if (passes == 1) return {Q1, R1};
      if (cholesky_qr(Q1, Q2, R2)) return {Q2, with_r ? at::mm(R2, R1) : at::Tensor()};
    }
  }
  // Householder QR, with the signs of Cholesky-QR's result (R's diagonal >= 0), which LAPACK and
  // cuSOLVER leave to their reflectors: the columns keep their orientation whichever path ran. Also
  // the fallback when Y is ill-conditioned or rank-deficient.
  at::Tensor Q, R;
  run_lapack(Y, [&] { std::tie(Q, R) = at::linalg_qr(Y.to(at::kDouble), "reduced"); });
  const at::Tensor d = R.diagonal();
  const at::Tensor flip = at::where(d < 0, -at::ones_like(d), at::ones_like(d));
  return {(Q * flip).to(Y.scalar_type()), R * flip.unsqueeze(-1)};
}

namespace {

// max |t| of each matrix of t (..., m, n), on the host; NaN propagates.
std::vector<double> host_amax(const at::Tensor& t) {
  const at::Tensor m = t.abs().amax({-2, -1}).to(at::kDouble).cpu().contiguous().reshape({-1});
  return std::vector<double>(m.data_ptr<double>(), m.data_ptr<double>() + m.numel());
}

}  // namespace

std::vector<int64_t> range_exponents(const at::Tensor& A, const at::Tensor& Y, const std::string& what) {
  const bool dbl = Y.scalar_type() == at::kDouble;
  const int lim = dbl ? 400 : 40, cap = dbl ? 1022 : 126;  // cap: 2^+-cap is a normal number
  const std::vector<double> ymax = host_amax(Y);
  std::vector<double> amax;
  std::vector<int64_t> e(ymax.size(), 0);
  for (size_t i = 0; i < ymax.size(); ++i) {
    double v = ymax[i];
    if (!std::isfinite(v)) {  // NaN/Inf in A, or a finite A whose sketch overflowed
      if (amax.empty()) amax = host_amax(A);
      TORCH_CHECK_VALUE(std::isfinite(amax[i]), what, " contains NaN or Inf");
      v = amax[i];
    }
    if (v == 0) continue;
    const int b = std::ilogb(v);
    if (b < -lim || b > lim) e[i] = std::clamp(-b, -cap, cap);
  }
  return e;
}

at::Tensor scale_pow2(const at::Tensor& t, const std::vector<int64_t>& e, int sign, bool batched) {
  if (!batched) return t * std::ldexp(1.0, static_cast<int>(sign * e.at(0)));
  std::vector<double> f(e.size());
  for (size_t i = 0; i < e.size(); ++i) f[i] = std::ldexp(1.0, static_cast<int>(sign * e[i]));
  std::vector<int64_t> shape(static_cast<size_t>(t.dim()), 1);
  shape[0] = static_cast<int64_t>(e.size());
  const at::Tensor factors = at::tensor(f, at::TensorOptions().dtype(at::kDouble)).to(t.options()).view(shape);
  return t * factors;
}

void canonicalize_signs_(at::Tensor& U, at::Tensor& V) {
  if (U.size(-1) == 0 || U.size(-2) == 0) return;
  // The entry that decides a column's sign: the first (lowest row) of those within a relative kSignTol of
  // its largest magnitude. The plain largest one was chosen by rounding where structure makes two entries
  // equal and opposite (a mirrored [W; -W], a Hadamard-like W0: every singular vector), so another thread
  // count or CPU flipped columns and a receiver with the sender's exact base was refused.
  constexpr double kSignTol = 1e-10;
  const at::Tensor mag = U.abs();
  const at::Tensor near = mag >= mag.amax(-2, /*keepdim=*/true) * (1.0 - kSignTol);
  const at::Tensor idx = near.to(at::kByte).argmax(-2, /*keepdim=*/true);  // the first of the maxima
  const at::Tensor sign = U.gather(-2, idx).sign();
  const at::Tensor flip = at::where(sign < 0, -at::ones_like(sign), at::ones_like(sign));
  U.mul_(flip);
  V.mul_(flip);
}

SVDResult svd_of_core(const at::Tensor& Qa, const at::Tensor& core, const at::Tensor& Qb,
                      int64_t rank, at::ScalarType dtype) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> svd;
  run_lapack(core, [&] { svd = at::linalg_svd(core.to(at::kDouble), /*full_matrices=*/false); });
  const int64_t k = std::min<int64_t>(rank, std::get<1>(svd).size(0));
  at::Tensor U = at::mm(Qa.to(dtype), std::get<0>(svd).narrow(1, 0, k).to(dtype));
  at::Tensor V = at::mm(Qb.to(dtype), std::get<2>(svd).narrow(0, 0, k).t().to(dtype));
  canonicalize_signs_(U, V);
  return {U, std::get<1>(svd).narrow(0, 0, k).to(dtype), V};
}

}  // namespace subspace_ext

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <thread>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifndef _WIN32
#include <pthread.h>
#endif

namespace subspace_ext {

namespace {
std::atomic<bool> g_forked{false};
#ifndef _WIN32
const int g_atfork = pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
#endif
}  // namespace

bool forked_child() { return g_forked.load(std::memory_order_relaxed); }

// MKL's LAPACK (torch's x86 builds; dgeqrf seen) spins in its thread team
// (mkl_thread_team_ctxt_get_task_internal, sched_yield) when called from a thread of an active
// OpenMP region, or from two threads at once. rsvd_many over a 300 x 200 and a 200 x 300 matrix at
// rank 60 (a 68-column sketch: Householder QR per pass), 2 threads, ran for minutes at over 90%
// system time, against 0.03 s on 1 thread; plain torch.linalg.qr from two Python threads took
// 4-33 s for 0.1-0.3 s of work. MKL's thread-local thread count (1) did not stop it, nor did one
// call at a time inside the region; one call at a time on a thread outside any OpenMP region does.
// The LAPACK calls are a small share of the ops' work (their GEMMs run concurrently), and a thread
// start costs tens of microseconds.
#ifndef _WIN32
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // MKL's C entry point
#endif

void run_lapack(const at::Tensor& t, const std::function<void()>& call) {
  // a forked child runs its tasks serially, and the lock may have been held by a parent's thread
  if (!t.is_cpu() || forked_child()) return call();
  static std::mutex mu;
  const std::lock_guard<std::mutex> lock(mu);
#ifdef _OPENMP
  if (omp_in_parallel()) {
    std::exception_ptr error;
    const at::ThreadLocalState caller;  // grad mode, excluded dispatch keys (see parallel_tasks)
    std::thread worker([&] {
      try {
        // one thread: the caller's team already uses the others, and a team made for each call
        // cost ~7 ms (rsvd_many over three 300 x 200 matrices at rank 60: 156 ms, 9 ms serially)
        at::internal::lazy_init_num_threads();  // (torch's own once-per-thread setup comes first)
        omp_set_num_threads(1);
#ifndef _WIN32
        if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(1);
#endif
        const at::ThreadLocalStateGuard same_state(caller);
        call();
      } catch (...) {
        error = std::current_exception();
      }
    });
    worker.join();
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  call();
}

void parallel_tasks(int64_t n, const std::vector<int64_t>& order,
                    const std::function<void(int64_t)>& body) {
  if (n <= 0) return;
  if (n == 1 || at::get_num_threads() == 1 || at::in_parallel_region() || forked_child()) {
    for (int64_t t = 0; t < n; ++t) body(order.empty() ? t : order[t]);
    return;
  }
  std::exception_ptr error;
  std::mutex mu;
  // The bodies call ATen ops: the workers take the caller's thread-local state (grad and inference
  // mode, the dispatch keys excluded, as by autocast_off in csrc/register.cpp), which OpenMP threads
  // do not inherit.
  const at::ThreadLocalState caller;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t t = 0; t < n; ++t) {
    try {
      at::ThreadLocalStateGuard same_state(caller);
      body(order.empty() ? t : order[t]);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace subspace_ext
