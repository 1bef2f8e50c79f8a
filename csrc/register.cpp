// The one registration file: every op's schema, in the `subspace_ext` namespace.
// Kernels are registered per dispatch key next to their code: csrc/cpu/*_cpu.cpp (CPU) and
// csrc/cuda/*_cuda.cu (CUDA). Python-side fake (meta) kernels live in subspace_ext/ops.py.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <vector>

TORCH_LIBRARY(subspace_ext, m) {
  // philox: counter-based Philox4x32-10 numbers, identical on every device and thread count.
  m.def("philox_uint32_(Tensor(a!) out, SymInt seed, SymInt stream) -> ()");
  m.def("philox_normal_(Tensor(a!) out, SymInt seed, SymInt stream) -> ()");
  // float32 normals by the piecewise-polynomial inverse CDF, one per Philox word (other numbers
  // than philox_normal_'s Box-Muller; faster on GPUs).
  m.def("philox_normal_icdf_(Tensor(a!) out, SymInt seed, SymInt stream) -> ()");
  m.def("perturbed_basis(Tensor U, float eps, SymInt seed, SymInt stream, bool orthonormalize) -> Tensor");
  // rsvd: randomized truncated SVD; factored SVD of a product B A from its factors.
  m.def("rsvd(Tensor A, int rank, int oversample, int niter, SymInt seed) -> (Tensor, Tensor, Tensor)");
  m.def("rsvd_many(Tensor[] mats, int rank, int oversample, int niter, SymInt seed)"
        " -> (Tensor[], Tensor[], Tensor[])");
  m.def("factored_svd(Tensor B, Tensor A, int rank) -> (Tensor, Tensor, Tensor)");
  // The same randomized SVD as rsvd, batched over equal shapes (Gram orthonormalisation and the
  // batched small SVD; two host syncs): the CUDA path of rsvd / rsvd_many; on CPU for tests.
  m.def("_rsvd_batched(Tensor A, int rank, int oversample, int niter, SymInt seed) -> (Tensor, Tensor, Tensor)");
  // Batched SVD of small matrices (..., p, q) -> U (..., p, k), S (..., k), V (..., q, k): one-sided
  // Jacobi, one thread block per matrix on CUDA, the same bits on CPU and CUDA (rsvd's l x l cores).
  m.def("_small_svd(Tensor A) -> (Tensor U, Tensor S, Tensor V)");
  // rsvd_batched's orthonormalising transform: Gram matrices G (..., q, q) of columns Y -> T (..., q,
  // q) upper triangular with Y T orthonormal (Cholesky, T = R^-1; a column in the span of the ones
  // before it gets a zero column) and complete (...): no column dropped. Float64 inside, the same
  // bits on CPU and CUDA.
  m.def("_gram_orth(Tensor G) -> (Tensor T, Tensor complete)");
  // project: coefficients on a basis without forming the update, and reconstruction.
  m.def("project(Tensor U, Tensor V, Tensor B, Tensor A, float scaling) -> Tensor");
  // project on the perturbed bases perturbed_basis(U, eps, seed, stream_u) / (V, ..., stream_v)
  // without storing the noise: generated per tile inside the product (one layer, 2-D inputs).
  m.def("project_perturbed(Tensor U, Tensor V, Tensor B, Tensor A, float scaling, float eps, SymInt seed,"
        " SymInt stream_u, SymInt stream_v) -> Tensor");
  m.def("project_dense(Tensor U, Tensor V, Tensor D) -> Tensor");
  m.def("reconstruct(Tensor U, Tensor C, Tensor V) -> Tensor");
  // reconstruct on the same perturbed bases, the noise again generated per tile (one layer).
  m.def("reconstruct_perturbed(Tensor U, Tensor C, Tensor V, float eps, SymInt seed, SymInt stream_u,"
        " SymInt stream_v) -> Tensor");
  // importance: AdaLoRA-style pair scores over all layers; in-place fusion / re-initialisation.
  // Scores are written into `scores` (one (r,) tensor per layer): a list return next to mutated
  // list arguments cannot be functionalised for torch.compile.
  m.def("pair_importance_(Tensor[] A, Tensor[] B, Tensor[] grad_A, Tensor[] grad_B,"
        " Tensor(a!)[] ipt_A, Tensor(b!)[] ipt_B, Tensor(c!)[] unc_A, Tensor(d!)[] unc_B,"
        " Tensor(e!)[] scores, float beta1, float beta2) -> ()");
  m.def("fuse_pairs_(Tensor(a!)[] W, Tensor(b!)[] B, Tensor[] A, Tensor[] idx, float[] scaling)"
        " -> ()");
  m.def("reinit_pairs_(Tensor(a!)[] W, Tensor(b!)[] B, Tensor(c!)[] A, Tensor[] idx,"
        " Tensor[] B_new, Tensor[] A_new, float[] scaling) -> ()");
  // solar: the basis a base weight defines, its checksum, and decoding of one layer.
  m.def("solar_basis(Tensor W0, SymInt seed, SymInt stream, float eps) -> (Tensor U, Tensor V)");
  m.def("solar_checksum(Tensor UI, Tensor VJ, SymInt seed, SymInt stream) -> Tensor");
  m.def("solar_decode(Tensor U, Tensor V, Tensor values, Tensor indices, int rank, float scaling,"
        " SymInt seed, SymInt stream) -> (Tensor B, Tensor A, Tensor checksum)");
}

namespace {

// The defined tensors of argument i (a tensor or a list of them) of the op's arguments on the stack.
std::vector<at::Tensor> argument_tensors(const c10::OperatorHandle& op, const torch::jit::Stack& stack, size_t i) {
  const c10::IValue& v = stack[stack.size() - op.schema().arguments().size() + i];
  std::vector<at::Tensor> out;
  if (v.isTensor()) {
    if (v.toTensor().defined()) out.push_back(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList())
      if (t.defined()) out.push_back(t);
  }
  return out;
}

bool is_written(const c10::Argument& arg) { return arg.alias_info() && arg.alias_info()->isWrite(); }

// The tensors an in-place op writes (its arguments marked (a!) in the schema), before the kernel runs.
std::vector<at::Tensor> written_tensors(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i)
    if (is_written(args[i]))
      for (const at::Tensor& t : argument_tensors(op, stack, i)) written.push_back(t);
  return written;
}

// Autograd kernel of the in-place ops: they have no derivative, so while grad mode is on no tensor
// they take may require grad: not one they write (a leaf is refused with torch's own message), nor one
// they only read, on which what they write would depend without recording it (torch's own in-place
// ops record that history; fuse_pairs_ with an A that requires grad left W with none). Nor may one
// carry a forward-mode tangent (torch.autograd.forward_ad), in grad mode or not: it would be dropped.
void inplace_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const bool grad_mode = at::GradMode::is_enabled();
  const auto& args = op.schema().arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    for (const at::Tensor& t : argument_tensors(op, *stack, i)) {
      TORCH_CHECK(!t._fw_grad(/*level=*/0).defined(), op.schema().name(), ": its argument ", args[i].name(),
                  " carries a forward-mode tangent, and the op has no derivative (the tangent would be dropped)");
      if (grad_mode && t.requires_grad()) {
        TORCH_CHECK(is_written(args[i]), op.schema().name(), ": its argument ", args[i].name(), " requires grad, "
                    "and the op has no derivative (what it writes would not record that it depends on ",
                    args[i].name(), "): call it under torch.no_grad()");
        TORCH_CHECK(!t.is_leaf(), op.schema().name(), ": a leaf Variable that requires grad is being used in an "
                    "in-place operation (call it under torch.no_grad())");
        TORCH_CHECK(false, op.schema().name(), ": writes in place into a tensor that requires grad, and has no "
                    "derivative: call it under torch.no_grad()");
      }
    }
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

// ADInplaceOrView kernel of the in-place ops: after the kernel, every written tensor's version counter
// is bumped, so autograd refuses a backward that saved one, as for torch's own in-place ops. Here and
// not in the Autograd kernel: torch.inference_mode skips the Autograd keys but not this one for normal
// tensors (an inference tensor has no version counter: bump_version is a no-op for it in inference
// mode). Outside inference mode an inference tensor is refused, as torch refuses it, but before
// anything is written (torch's own ops write first, then raise).
void inplace_bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const std::vector<at::Tensor> written = written_tensors(op, *stack);
  if (!c10::InferenceMode::is_enabled())
    for (const at::Tensor& t : written)
      TORCH_CHECK(!t.is_inference(), op.schema().name(), ": an in-place update of an inference tensor outside "
                  "torch.inference_mode is not allowed (torch's rule); nothing was written. Call it inside "
                  "inference_mode, or clone the tensor first to get a normal one");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

// ---- derivatives of the two linear ops, from the factors (no m x n product) ----------------------
// In C++ rather than through torch.library.register_autograd: the Python autograd layer cost ~10 us a
// call, more than project's whole kernel at SOLAR's sizes (~15 us at 384 x 384, k = 32). Each
// gradient is in the output gradient's dtype, summed over broadcast batch dimensions, then cast to its
// input's dtype (a bfloat16 B gets a bfloat16 gradient). The backward formulas are ATen ops, so a
// second derivative and torch.compile's tracing (AOTAutograd) go through them.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TensorArg = const at::Tensor&;

// The handle of op `name` with signature Sig: the forwards call the op again through it below the
// autograd keys (at::AutoDispatchBelowADInplaceOrView), which reaches its device kernel; each looks it
// up once (a static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The gradient g of input t: nothing where t needs none, else g summed to t's shape, in t's dtype.
at::Tensor grad_for(const AutogradContext* ctx, size_t i, const at::Tensor& g, const at::Tensor& t) {
  if (!ctx->needs_input_grad(i)) return at::Tensor();
  return at::sum_to(g, t.sym_sizes()).to(t.scalar_type());
}

// C = s U^T B A V: dU = B (A V) G^T, dV = A^T (U^T B)^T G, dB = U G (A V)^T, dA = (U^T B)^T G V^T.
struct ProjectFunction : public torch::autograd::Function<ProjectFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& U, const at::Tensor& V, const at::Tensor& B,
                            const at::Tensor& A, double scaling) {
    ctx->save_for_backward({U, V, B, A});
    ctx->saved_data["scaling"] = scaling;
    static const auto op =
        op_handle<at::Tensor(TensorArg, TensorArg, TensorArg, TensorArg, double)>("subspace_ext::project");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(U, V, B, A, scaling);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor G = grads[0] * ctx->saved_data["scaling"].toDouble();
    const auto dt = G.scalar_type();
    const at::Tensor U = saved[0].to(dt), V = saved[1].to(dt), B = saved[2].to(dt), A = saved[3].to(dt);
    const at::Tensor AV = at::matmul(A, V), UtB = at::matmul(U.mT(), B);  // r x k2, k1 x r
    const at::Tensor UtBt_G = at::matmul(UtB.mT(), G);                    // r x k2
    return {grad_for(ctx, 0, at::matmul(B, at::matmul(AV, G.mT())), saved[0]),
            grad_for(ctx, 1, at::matmul(A.mT(), UtBt_G), saved[1]),
            grad_for(ctx, 2, at::matmul(U, at::matmul(G, AV.mT())), saved[2]),
            grad_for(ctx, 3, at::matmul(UtBt_G, V.mT()), saved[3]), at::Tensor()};
  }
};

// D = U C V^T: dU = (G V) C^T, dC = U^T (G V), dV = G^T (U C).
struct ReconstructFunction : public torch::autograd::Function<ReconstructFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& U, const at::Tensor& C, const at::Tensor& V) {
    ctx->save_for_backward({U, C, V});
    static const auto op = op_handle<at::Tensor(TensorArg, TensorArg, TensorArg)>("subspace_ext::reconstruct");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(U, C, V);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& G = grads[0];
    const auto dt = G.scalar_type();
    const at::Tensor U = saved[0].to(dt), C = saved[1].to(dt), V = saved[2].to(dt);
    const at::Tensor GV = at::matmul(G, V);  // m x k2
    return {grad_for(ctx, 0, at::matmul(GV, C.mT()), saved[0]), grad_for(ctx, 1, at::matmul(U.mT(), GV), saved[1]),
            grad_for(ctx, 2, at::matmul(G.mT(), at::matmul(U, C)), saved[2])};
  }
};

at::Tensor project_autograd(const at::Tensor& U, const at::Tensor& V, const at::Tensor& B, const at::Tensor& A,
                            double scaling) {
  return ProjectFunction::apply(U, V, B, A, scaling);
}

at::Tensor reconstruct_autograd(const at::Tensor& U, const at::Tensor& C, const at::Tensor& V) {
  return ReconstructFunction::apply(U, C, V);
}

// The ops by how autograd treats them: derivatives (above), none, or in place (written arguments) and
// none.
constexpr const char* kWithDerivative[] = {"project", "reconstruct"};
constexpr const char* kNoDerivative[] = {"perturbed_basis", "rsvd", "rsvd_many", "factored_svd", "_rsvd_batched",
                                         "_small_svd", "_gram_orth", "project_perturbed", "project_dense",
                                         "reconstruct_perturbed", "solar_basis", "solar_checksum", "solar_decode"};
constexpr const char* kInPlace[] = {"philox_uint32_", "philox_normal_", "philox_normal_icdf_", "pair_importance_",
                                    "fuse_pairs_", "reinit_pairs_"};

// Autocast kernel of every op: the kernels compute in their inputs' dtypes (documented per op),
// partly through ATen GEMMs, which torch.autocast would otherwise run in bfloat16/float16 (results
// of another dtype than the registered fakes say, and lost precision: rsvd's S off by 1e-2).
// Autocast is switched off for everything below; the inputs are not cast.
void autocast_off(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.redispatchBoxed(ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::AutocastCPU), stack);
}

void register_autocast_off(torch::Library& m) {
  for (const char* op : kWithDerivative) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_off>());
  for (const char* op : kNoDerivative) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_off>());
  for (const char* op : kInPlace) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&autocast_off>());
}

}  // namespace

// Under autograd the out-of-place ops without a derivative raise a clear "not implemented" error on
// backward (instead of recording their internal ATen calls, which gave wrong gradients through rsvd),
// and the in-place ops refuse tensors that require grad; their ADInplaceOrView kernels (below) bump
// the version counters of what they write, as torch's own in-place ops do, in inference mode too.
TORCH_LIBRARY_IMPL(subspace_ext, Autograd, m) {
  m.impl("project", &project_autograd);
  m.impl("reconstruct", &reconstruct_autograd);
  for (const char* op : kNoDerivative) m.impl(op, torch::autograd::autogradNotImplementedFallback());
  for (const char* op : kInPlace) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
}

TORCH_LIBRARY_IMPL(subspace_ext, ADInplaceOrView, m) {
  for (const char* op : kInPlace) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&inplace_bump_versions>());
}

TORCH_LIBRARY_IMPL(subspace_ext, AutocastCPU, m) { register_autocast_off(m); }
TORCH_LIBRARY_IMPL(subspace_ext, AutocastCUDA, m) { register_autocast_off(m); }
