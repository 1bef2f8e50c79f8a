// CUDA dispatch of the ops that have CUDA kernels (csrc/cuda/*.cu): argument checks (shared with
// the CPU kernels), device guard, the current stream, descriptor tables for the multi-tensor
// launches, and a check of every launch. Compiled only in a CUDA build (csrc/sources.txt [cuda]).
//
// Host syncs: fuse_pairs_ / reinit_pairs_ copy every layer's `idx` to the host to validate it
// (range, repeats) together with B_new / A_new's NaN/Inf flags, in one transfer for all layers
// (none for idx given on the host);
// perturbed_basis(orthonormalize=True) (csrc/cpu/philox_cpu.cpp) reads one scalar per Cholesky-QR
// pass and matrix (the pivot test, csrc/cpu/utils.cpp; the factorisation runs on the device).
// Nothing else synchronises here. The ops composed in csrc/cpu/ that also run on CUDA tensors have
// their own: a NaN/Inf check (an .item()) in project, project_perturbed, small_svd and _gram_orth,
// one per factor in factored_svd (with its range), several in solar_decode, two per shape group in
// rsvd and rsvd_many, and solar_basis' copy of W0's singular values (the README's CUDA section).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "../cpu/utils.h"
#include "kernels.h"

namespace subspace_ext {
namespace {

// The current device's SMs (ATen caches the device properties).
int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::F32;
    case at::kDouble: return cuda::DType::F64;
    case at::kBFloat16: return cuda::DType::BF16;
    case at::kHalf: return cuda::DType::F16;
    default: TORCH_CHECK_TYPE(false, "subspace_ext CUDA: unsupported dtype ", t);
  }
}

// A kernel with one block per item (pair, row tile) takes at most 2^31 - 1 of them (gridDim.x).
void check_grid_x(const char* op, int64_t blocks, const char* what) {
  TORCH_CHECK_VALUE(blocks < (int64_t{1} << 31), op, ": ", blocks, " ", what, " in one dtype group is more than one "
                    "CUDA launch takes (2^31 - 1); split the layers over calls");
}

// pair_importance_, fuse_pairs_ and reinit_pairs_ copy a per-layer table from a pinned host buffer
// that goes back to the allocator after the call (a CUDA graph replaying the copy would read freed
// memory), and fuse/reinit read `idx` and the finite flags of the new pairs on the host: capture is
// refused with this error, before any of that, instead of failing inside the capture.
void refuse_capture(const at::Device& dev) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(dev.index()), &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "subspace_ext: pair_importance_, fuse_pairs_ and reinit_pairs_ cannot be captured in a CUDA graph "
              "(their per-layer table is copied from the host on every call); run them outside the graph");
}

// Copies `items` (trivially copyable structs) and `offsets` to the device, in one pinned buffer
// copied asynchronously on the current stream; the caching host allocator keeps the pinned
// buffer alive until the copy has run.
template <typename T>
std::pair<at::Tensor, const T*> device_table(const std::vector<T>& items, const std::vector<int64_t>& offsets,
                                             const at::Device& dev, const int64_t** offsets_dev) {
  refuse_capture(dev);
  const size_t item_bytes = items.size() * sizeof(T);
  const size_t pad = (item_bytes + 15) / 16 * 16;
  const size_t bytes = pad + offsets.size() * sizeof(int64_t);
  at::Tensor host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), items.data(), item_bytes);
  std::memcpy(host.data_ptr<uint8_t>() + pad, offsets.data(), offsets.size() * sizeof(int64_t));
  at::Tensor table = host.to(dev, /*non_blocking=*/true);
  *offsets_dev = reinterpret_cast<const int64_t*>(table.data_ptr<uint8_t>() + pad);
  return {table, reinterpret_cast<const T*>(table.data_ptr<uint8_t>())};
}

// ---- philox -------------------------------------------------------------------------------------

void philox_uint32_cuda_(const at::Tensor& out, int64_t seed, int64_t stream) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kInt && out.is_contiguous(),
                   "philox_uint32_: out must be a contiguous int32 tensor");
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::philox_uint32(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), out.numel(),
                                     static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), sm_count(),
                                     at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The CUDA branch of philox_normals_into (csrc/cpu/philox_cpu.cpp checks dtype and layout).
void philox_normals_into_cuda(const at::Tensor& out, int64_t seed, int64_t stream, double eps, bool add) {
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::philox_normal(out.data_ptr(), dtype_of(out.scalar_type()), out.numel(),
                                     static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), eps, add, sm_count(),
                                     at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CUDA branch of philox_normal_icdf_fill (csrc/cpu/philox_cpu.cpp checks dtype and layout).
void philox_normal_icdf_into_cuda(const at::Tensor& out, int64_t seed, int64_t stream) {
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::philox_normal_icdf(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed),
                                          static_cast<uint64_t>(stream), sm_count(), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void small_svd_into_cuda(const at::Tensor& a, const at::Tensor& v, const at::Tensor& norms,
                         const at::Tensor& u, const at::Tensor& s, const at::Tensor& vout) {
  const c10::cuda::CUDAGuard guard(a.device());
  C10_CUDA_CHECK(cuda::small_svd(a.data_ptr<double>(), v.data_ptr<double>(), norms.data_ptr<double>(),
                                 u.data_ptr<double>(), s.data_ptr<double>(), vout.data_ptr<double>(), a.size(0),
                                 static_cast<int>(a.size(2)), static_cast<int>(a.size(1)),
                                 at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin,
                                 at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gram_orth_into_cuda(const at::Tensor& g, const at::Tensor& d, const at::Tensor& t, const at::Tensor& complete) {
  const c10::cuda::CUDAGuard guard(g.device());
  C10_CUDA_CHECK(cuda::gram_orth(g.data_ptr<double>(), d.data_ptr<double>(), t.data_ptr<double>(),
                                 complete.data_ptr<bool>(), g.size(0), static_cast<int>(g.size(1)),
                                 at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin,
                                 at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturbed_tn_cuda(const at::Tensor& U, const at::Tensor& Y, double eps, int64_t seed, int64_t stream,
                       const at::Tensor& partial) {
  const c10::cuda::CUDAGuard guard(U.device());
  const size_t smem = cuda::perturbed_tn_smem_bytes(Y.size(1), U.element_size());
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK_VALUE(smem <= limit, "project_perturbed: on CUDA the rank r = ", Y.size(1), " (B's columns) needs ",
                    smem, " bytes of shared memory per block for ", U.scalar_type(), ", more than this GPU's ",
                    limit);
  TORCH_CHECK_VALUE((U.size(0) + kPerturbRows - 1) / kPerturbRows < (int64_t{1} << 31) &&
                        (U.size(1) * Y.size(1) + 255) / 256 < 65536,
                    "project_perturbed: U or the k x r product is too large for one launch");
  C10_CUDA_CHECK(cuda::perturbed_tn(U.data_ptr(), U.stride(0), U.stride(1), U.size(0), U.size(1), Y.data_ptr(),
                                    Y.stride(0), Y.stride(1), Y.size(1), dtype_of(U.scalar_type()), eps,
                                    static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), kPerturbRows,
                                    partial.data_ptr(), at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturbed_nt_cuda(const at::Tensor& X, const at::Tensor& U, double eps, int64_t seed, int64_t stream,
                       const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(U.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const cuda::NtPlan plan = cuda::perturbed_nt_plan(X.size(0), U.size(1), U.size(0), U.element_size(),
                                                    prop->sharedMemPerBlockOptin, prop->multiProcessorCount);
  TORCH_CHECK_VALUE(plan.tq > 0, "reconstruct_perturbed: on CUDA one row of the basis (", U.size(1), " x ",
                    U.scalar_type(), ") must fit the block's shared memory (", prop->sharedMemPerBlockOptin,
                    " bytes); got k = ", U.size(1));
  TORCH_CHECK_VALUE(plan.strips < (int64_t{1} << 31), "reconstruct_perturbed: the basis is too large for one launch");
  C10_CUDA_CHECK(cuda::perturbed_nt(X.data_ptr(), X.stride(0), X.stride(1), X.size(0), U.size(1), U.data_ptr(),
                                    U.stride(0), U.stride(1), U.size(0), dtype_of(U.scalar_type()), eps,
                                    static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), plan,
                                    out.data_ptr(), out.stride(0), out.stride(1),
                                    at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// ---- importance ---------------------------------------------------------------------------------

void pair_importance_cuda_(at::TensorList A, at::TensorList B, at::TensorList grad_A,
                           at::TensorList grad_B, at::TensorList ipt_A, at::TensorList ipt_B,
                           at::TensorList unc_A, at::TensorList unc_B, at::TensorList scores,
                           double beta1, double beta2) {
  check_pair_importance_args(A, B, grad_A, grad_B, ipt_A, ipt_B, unc_A, unc_B, scores, beta1, beta2);
  if (A.empty()) return;
  const at::Device dev = A[0].device();
  for (size_t l = 0; l < A.size(); ++l)
    for (const auto* t : {&A[l], &B[l], &grad_A[l], &grad_B[l], &ipt_A[l], &ipt_B[l], &unc_A[l], &unc_B[l], &scores[l]})
      TORCH_CHECK_VALUE(t->is_cuda() && t->device() == dev, "pair_importance_: layer ", l,
                        ": every tensor must be on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  // One launch per (parameter dtype, state dtype) group: one launch in the usual case.
  std::map<std::pair<int, int>, std::vector<size_t>> groups;
  for (size_t l = 0; l < A.size(); ++l)
    groups[{static_cast<int>(A[l].scalar_type()), static_cast<int>(ipt_A[l].scalar_type())}].push_back(l);
  for (const auto& [key, members] : groups) {
    std::vector<cuda::ImportanceLayer> table;
    std::vector<int64_t> offsets{0};
    for (size_t l : members) {
      table.push_back({A[l].data_ptr(), B[l].data_ptr(), grad_A[l].data_ptr(), grad_B[l].data_ptr(),
                       ipt_A[l].data_ptr(), ipt_B[l].data_ptr(), unc_A[l].data_ptr(), unc_B[l].data_ptr(),
                       scores[l].data_ptr(), A[l].size(0), A[l].size(1), B[l].size(0)});
      offsets.push_back(offsets.back() + A[l].size(0));
    }
    check_grid_x("pair_importance_", offsets.back(), "pairs");
    const int64_t* offsets_dev = nullptr;
    auto [keep, table_dev] = device_table(table, offsets, dev, &offsets_dev);
    cuda::pair_importance(table_dev, offsets_dev, static_cast<int>(table.size()), offsets.back(),
                          dtype_of(static_cast<at::ScalarType>(key.first)),
                          dtype_of(static_cast<at::ScalarType>(key.second)), beta1, beta2,
                          at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- fuse / re-initialise -----------------------------------------------------------------------

constexpr int kRowsPerTile = 4;

void recompose_cuda(const char* op, at::TensorList W, at::TensorList B, at::TensorList A,
                    at::TensorList idx, at::ArrayRef<double> scaling, at::TensorList Bn, at::TensorList An) {
  if (!W.empty() && W[0].is_cuda()) refuse_capture(W[0].device());  // before the argument checks' host reads
  const RecomposeArgs args = check_recompose_args(op, W, B, A, idx, scaling, Bn, An);
  if (W.empty()) return;
  const at::Device dev = W[0].device();
  for (size_t l = 0; l < W.size(); ++l)
    for (const auto* t : {&W[l], &B[l], &A[l]})
      TORCH_CHECK_VALUE(t->is_cuda() && t->device() == dev, op, ": layer ", l, ": every tensor must be on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  std::vector<at::Tensor> keep;  // device copies that must outlive the launches
  std::map<std::pair<int, int>, std::vector<size_t>> groups;
  for (size_t l = 0; l < W.size(); ++l)
    if (!args.idx[l].empty())
      groups[{static_cast<int>(W[l].scalar_type()), static_cast<int>(B[l].scalar_type())}].push_back(l);
  for (const auto& [key, members] : groups) {
    std::vector<cuda::RecomposeLayer> table;
    std::vector<int64_t> tiles{0}, pairs{0}, idx_all;
    for (size_t l : members) {
      idx_all.insert(idx_all.end(), args.idx[l].begin(), args.idx[l].end());
      cuda::RecomposeLayer u{};
      u.W = W[l].data_ptr();
      u.ws0 = W[l].stride(0); u.ws1 = W[l].stride(1); u.m = W[l].size(0); u.n = W[l].size(1);
      u.B = B[l].data_ptr(); u.bs0 = B[l].stride(0); u.bs1 = B[l].stride(1);
      u.A = A[l].data_ptr(); u.as0 = A[l].stride(0); u.as1 = A[l].stride(1);
      if (!args.B_new.empty()) {
        keep.push_back(args.B_new[l]);
        keep.push_back(args.A_new[l]);
        u.Bn = args.B_new[l].data_ptr(); u.bns0 = args.B_new[l].stride(0); u.bns1 = args.B_new[l].stride(1);
        u.An = args.A_new[l].data_ptr(); u.ans0 = args.A_new[l].stride(0); u.ans1 = args.A_new[l].stride(1);
      }
      u.q = static_cast<int64_t>(args.idx[l].size());
      u.s = scaling[l];
      table.push_back(u);
      tiles.push_back(tiles.back() + (u.m + kRowsPerTile - 1) / kRowsPerTile);
      pairs.push_back(pairs.back() + u.q);
    }
    check_grid_x(op, tiles.back(), "row tiles");
    check_grid_x(op, pairs.back(), "pairs");
    // One host-to-device copy for the group: the layer table, then row-tile offsets, pair offsets
    // and every layer's pair indices.
    std::vector<int64_t> offsets(tiles);
    offsets.insert(offsets.end(), pairs.begin(), pairs.end());
    offsets.insert(offsets.end(), idx_all.begin(), idx_all.end());
    const int64_t* offsets_dev = nullptr;
    auto [table_keep, table_dev] = device_table(table, offsets, dev, &offsets_dev);
    keep.push_back(table_keep);
    cuda::recompose(table_dev, offsets_dev, offsets_dev + tiles.size(), offsets_dev + tiles.size() + pairs.size(),
                    static_cast<int>(table.size()), tiles.back(), pairs.back(), kRowsPerTile,
                    dtype_of(static_cast<at::ScalarType>(key.first)),
                    dtype_of(static_cast<at::ScalarType>(key.second)), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The device copies in `keep` are freed to the caching allocator, which orders reuse on the
  // current stream after the launches above.
}

void fuse_pairs_cuda_(at::TensorList W, at::TensorList B, at::TensorList A, at::TensorList idx,
                      at::ArrayRef<double> scaling) {
  recompose_cuda("fuse_pairs_", W, B, A, idx, scaling, {}, {});
}

void reinit_pairs_cuda_(at::TensorList W, at::TensorList B, at::TensorList A, at::TensorList idx,
                        at::TensorList B_new, at::TensorList A_new, at::ArrayRef<double> scaling) {
  TORCH_CHECK_VALUE(B_new.size() == W.size() && A_new.size() == W.size(),
                    "reinit_pairs_: B_new and A_new must have one entry per layer");
  recompose_cuda("reinit_pairs_", W, B, A, idx, scaling, B_new, A_new);
}

}  // namespace

TORCH_LIBRARY_IMPL(subspace_ext, CUDA, m) {
  m.impl("philox_uint32_", &philox_uint32_cuda_);
  m.impl("philox_normal_", &philox_normal_fill);
  m.impl("philox_normal_icdf_", &philox_normal_icdf_fill);
  m.impl("pair_importance_", &pair_importance_cuda_);
  m.impl("fuse_pairs_", &fuse_pairs_cuda_);
  m.impl("reinit_pairs_", &reinit_pairs_cuda_);
}

}  // namespace subspace_ext
