// The one registration file: every op's schema, in the `subspace_ext` namespace.
// Kernels are registered per dispatch key next to their code: csrc/cpu/*_cpu.cpp (CPU) and
// csrc/cuda/*_cuda.cu (CUDA). Python-side fake (meta) kernels live in subspace_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(subspace_ext, m) {
  // philox: counter-based Philox4x32-10 numbers, identical on every device and thread count.
  m.def("philox_uint32_(Tensor(a!) out, int seed, int stream) -> ()");
  m.def("philox_normal_(Tensor(a!) out, int seed, int stream) -> ()");
  m.def("perturbed_basis(Tensor U, float eps, int seed, int stream, bool orthonormalize) -> Tensor");
  // rsvd: randomized truncated SVD; factored SVD of a product B A from its factors.
  m.def("rsvd(Tensor A, int rank, int oversample, int niter, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("rsvd_many(Tensor[] mats, int rank, int oversample, int niter, int seed)"
        " -> (Tensor[], Tensor[], Tensor[])");
  m.def("factored_svd(Tensor B, Tensor A, int rank) -> (Tensor, Tensor, Tensor)");
  // The same randomized SVD as rsvd, batched over equal shapes with no host sync but one finite
  // check (Householder QR, batched small SVD): the CUDA path of rsvd / rsvd_many; on CPU for tests.
  m.def("_rsvd_batched(Tensor A, int rank, int oversample, int niter, int seed) -> (Tensor, Tensor, Tensor)");
  // Batched SVD of small matrices (..., p, q) -> U (..., p, k), S (..., k), V (..., q, k): one-sided
  // Jacobi, one thread block per matrix on CUDA, the same bits on CPU and CUDA (rsvd's l x l cores).
  m.def("_small_svd(Tensor A) -> (Tensor U, Tensor S, Tensor V)");
  // project: coefficients on a basis without forming the update, and reconstruction.
  m.def("project(Tensor U, Tensor V, Tensor B, Tensor A, float scaling) -> Tensor");
  // project on the perturbed bases perturbed_basis(U, eps, seed, stream_u) / (V, ..., stream_v)
  // without storing the noise: generated per tile inside the product (one layer, 2-D inputs).
  m.def("project_perturbed(Tensor U, Tensor V, Tensor B, Tensor A, float scaling, float eps, int seed,"
        " int stream_u, int stream_v) -> Tensor");
  m.def("project_dense(Tensor U, Tensor V, Tensor D) -> Tensor");
  m.def("reconstruct(Tensor U, Tensor C, Tensor V) -> Tensor");
  // reconstruct on the same perturbed bases, the noise again generated per tile (one layer).
  m.def("reconstruct_perturbed(Tensor U, Tensor C, Tensor V, float eps, int seed, int stream_u,"
        " int stream_v) -> Tensor");
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
  m.def("solar_basis(Tensor W0, int seed, int stream, float eps) -> (Tensor U, Tensor V)");
  m.def("solar_checksum(Tensor UI, Tensor VJ, int seed, int stream) -> Tensor");
  m.def("solar_decode(Tensor U, Tensor V, Tensor values, Tensor indices, int rank, float scaling,"
        " int seed, int stream) -> (Tensor B, Tensor A, Tensor checksum)");
}
