"""Benchmarks of the native ops against the plain-PyTorch code they replace (``subspace-ext bench``).

``run()`` times every op (median of repeated ``time.perf_counter`` timings after a warm-up) next to
its baseline and prints a markdown table. The workload builders and baselines below are shared with
the pytest-benchmark suite in ``bench/``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Optional, Sequence

import torch

from . import __version__, ops
from .models import linear_weights, minilm_dir

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (U m x k, S k, V n x k)

OVERSAMPLE, NITER = 8, 2  # rsvd settings, the same for ours and torch.svd_lowrank
LORA_RANK = 8
# (out, in) of the Linear layers of one MiniLM block: q, k, v, attention output, intermediate, output.
MINILM_SHAPES = ((384, 384),) * 4 + ((1536, 384), (384, 1536))


# ---------------------------------------------------------------------------------------------
# workloads

@lru_cache(maxsize=None)
def _minilm_weights() -> tuple[torch.Tensor, ...]:
    return tuple(w.float().contiguous() for w in linear_weights(minilm_dir()).values())


def minilm_matrices(limit: Optional[int] = None) -> list[torch.Tensor]:
    """The (first ``limit``) 37 Linear weights of the bundled MiniLM-L6, as float32."""
    return list(_minilm_weights()[:limit])


@dataclass
class LoraLayers:
    """LoRA factors of ``L`` layers (peft layout) with base weights and gradients."""
    W: list[torch.Tensor]       # m x n
    A: list[torch.Tensor]       # r x n
    B: list[torch.Tensor]       # m x r
    grad_A: list[torch.Tensor]
    grad_B: list[torch.Tensor]

    def clone(self, dtype: Optional[torch.dtype] = None) -> "LoraLayers":
        """A deep copy (optionally cast), so an in-place op can run on fresh data."""
        return LoraLayers(*([t.to(dtype or t.dtype, copy=True) for t in ts] for ts in
                            (self.W, self.A, self.B, self.grad_A, self.grad_B)))

    def to(self, device) -> "LoraLayers":
        return LoraLayers(*([t.to(device) for t in ts] for ts in (self.W, self.A, self.B, self.grad_A, self.grad_B)))


def lora_layers(num: int, rank: int = LORA_RANK, seed: int = 0) -> LoraLayers:
    """``num`` random LoRA layers cycling through the MiniLM Linear shapes."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    shapes = [MINILM_SHAPES[i % len(MINILM_SHAPES)] for i in range(num)]
    return LoraLayers(W=[rnd(m, n) for m, n in shapes], A=[rnd(rank, n) for _, n in shapes],
                      B=[rnd(m, rank) for m, _ in shapes], grad_A=[rnd(rank, n) for _, n in shapes],
                      grad_B=[rnd(m, rank) for m, _ in shapes])


def qwen3_moe(device: str = "cpu", layers: int = 2, experts: int = 32):
    """A Qwen3-MoE-shaped causal LM with random weights (``layers`` layers, ``experts`` experts of 512 x 512 gate_up
    and 512 x 256 down, top 4, hidden 512), or None where transformers has no Qwen3-MoE or keeps its experts as
    Linear layers: the MoE workload of the training-step benchmarks."""
    import transformers
    if not hasattr(transformers, "Qwen3MoeConfig"):
        return None
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=512, intermediate_size=1024,
                                      moe_intermediate_size=256,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                      head_dim=64, num_experts=experts, num_experts_per_tok=4,
                                      max_position_embeddings=256)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(device)
    return model if isinstance(getattr(model.model.layers[0].mlp.experts, "gate_up_proj", None),
                               torch.nn.Parameter) else None


def lm_training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Sequence[torch.Tensor],
                     device: str, after: Optional[Callable[[], object]] = None) -> Callable[[], None]:
    """One causal-LM training step per call (the next of ``batches``, labels = inputs), then ``after()`` (e.g.
    ``SRLoRA.step``); on CUDA it waits for the GPU, so a timer measures the step."""
    it = [0]

    def step():
        x = batches[it[0] % len(batches)]
        it[0] += 1
        opt.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        opt.step()
        if after is not None:
            after()
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def pair_indices(layers: LoraLayers, pairs: int = 2) -> list[torch.Tensor]:
    """``pairs`` distinct pair indices per layer (varying between layers)."""
    r = layers.A[0].shape[0]
    return [torch.tensor([(l + 3 * j) % r for j in range(pairs)]) for l in range(len(layers.W))]


def new_pairs(layers: LoraLayers, idx: Sequence[torch.Tensor], seed: int = 1):
    """Fresh ``(B_new, A_new)`` per layer for ``reinit_pairs_``."""
    g = torch.Generator().manual_seed(seed)
    B_new = [torch.randn(W.shape[0], len(i), generator=g) for W, i in zip(layers.W, idx)]
    A_new = [torch.randn(len(i), W.shape[1], generator=g) for W, i in zip(layers.W, idx)]
    return B_new, A_new


def project_inputs(m: int, n: int, r: int = LORA_RANK, k: int = 32, seed: int = 0):
    """Orthonormal bases ``U`` (m x k), ``V`` (n x k) and LoRA factors ``B`` (m x r), ``A`` (r x n)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return U, V, torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)


# ---------------------------------------------------------------------------------------------
# baselines: what one writes in plain PyTorch

PERTURB_EPS = 0.1


def project_unfused(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``project_perturbed``'s result the plain way: materialise both perturbed bases, then project
    (in ``dtype``, e.g. float64 for a reference; the noise stays that of the inputs' dtype)."""
    Ut, Vt = ops.perturbed_basis(U, PERTURB_EPS, 0, 0), ops.perturbed_basis(V, PERTURB_EPS, 0, 1)
    dt = dtype or U.dtype
    return ops.project(Ut.to(dt), Vt.to(dt), B.to(dt), A.to(dt))


def reconstruct_unfused(U: torch.Tensor, C: torch.Tensor, V: torch.Tensor,
                        dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``reconstruct_perturbed``'s result the plain way: materialise both perturbed bases, then
    ``reconstruct`` (in ``dtype`` when given, as ``project_unfused``)."""
    Ut, Vt = ops.perturbed_basis(U, PERTURB_EPS, 0, 0), ops.perturbed_basis(V, PERTURB_EPS, 0, 1)
    dt = dtype or U.dtype
    return ops.reconstruct(Ut.to(dt), C.to(dt), Vt.to(dt))


def rsvd_ours(mats: Sequence[torch.Tensor], rank: int) -> list[Factors]:
    """``ops.rsvd_many`` with the shared settings (oversample, niter)."""
    return ops.rsvd_many(mats, rank, oversample=OVERSAMPLE, niter=NITER)


def svd_lowrank_loop(mats: Sequence[torch.Tensor], rank: int) -> list[Factors]:
    """``torch.svd_lowrank`` per matrix (q = rank + oversample), truncated to ``rank``."""
    out = []
    for W in mats:
        U, S, V = torch.svd_lowrank(W, q=rank + OVERSAMPLE, niter=NITER)
        out.append((U[:, :rank], S[:rank], V[:, :rank]))
    return out


def svd_loop(mats: Sequence[torch.Tensor]) -> list[Factors]:
    """Thin ``torch.linalg.svd`` per matrix, as ``(U, S, V)``."""
    return [(U, S, Vh.mT) for U, S, Vh in (torch.linalg.svd(W, full_matrices=False) for W in mats)]


def svd_truncated_loop(mats: Sequence[torch.Tensor], rank: int) -> list[Factors]:
    """Thin ``torch.linalg.svd`` per matrix, truncated to ``rank``."""
    return truncate(svd_loop(mats), rank)


def truncate(factors: Sequence[Factors], rank: int) -> list[Factors]:
    """Keep the leading ``rank`` singular triplets of every factorisation."""
    return [(U[:, :rank], S[:rank], V[:, :rank]) for U, S, V in factors]


def frob_error(mats: Sequence[torch.Tensor], factors: Sequence[Factors]) -> float:
    """Sum over matrices of ``||W - U diag(S) V^T||_F``."""
    return sum(float(torch.linalg.matrix_norm(W - (U * S) @ V.mT)) for W, (U, S, V) in zip(mats, factors))


def project_dense(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                  scaling: float = 1.0) -> torch.Tensor:
    """``U^T (scaling B A) V`` forming the m x n update."""
    return U.mT @ (scaling * B @ A) @ V


def project_floor(U: torch.Tensor, V: torch.Tensor, B: torch.Tensor, A: torch.Tensor):
    """Just the two skinny GEMMs ``U^T B`` and ``A V`` (a lower bound for ``project``)."""
    return U.mT @ B, A @ V


def importance_loop(A, B, grad_A, grad_B, ipt_A, ipt_B, unc_A, unc_B, *, beta1: float = 0.85,
                    beta2: float = 0.85) -> list[torch.Tensor]:
    """AdaLoRA's importance update, one layer at a time (same math as ``ops.pair_importance``)."""
    scores = []
    for l in range(len(A)):
        for p, g, ipt, unc in ((A[l], grad_A[l], ipt_A[l], unc_A[l]), (B[l], grad_B[l], ipt_B[l], unc_B[l])):
            I = (p * g).abs()
            ipt.mul_(beta1).add_(I, alpha=1 - beta1)
            unc.mul_(beta2).add_((I - ipt).abs(), alpha=1 - beta2)
        scores.append((ipt_A[l] * unc_A[l]).mean(1) + (ipt_B[l] * unc_B[l]).mean(0))
    return scores


def fuse_loop(W, B, A, idx, scaling: float = 1.0) -> None:
    """``W += scaling B[:, idx] A[idx]``, ``B[:, idx] = 0``, one layer at a time."""
    for w, b, a, i in zip(W, B, A, idx):
        w.addmm_(b[:, i], a[i], alpha=scaling)
        b[:, i] = 0


def reinit_loop(W, B, A, idx, B_new, A_new, scaling: float = 1.0) -> None:
    """``W += scaling (B[:, idx] A[idx] - B_new A_new)`` and swap in the new pairs, per layer."""
    for w, b, a, i, bn, an in zip(W, B, A, idx, B_new, A_new):
        w.addmm_(b[:, i], a[i], alpha=scaling).addmm_(bn, an, alpha=-scaling)
        b[:, i] = bn
        a[i] = an


PAIR_SCALING = 2.0
# name -> (ours, Python-loop baseline, whether it takes new pairs (B_new, A_new))
PAIR_OPS = {"fuse_pairs_": (ops.fuse_pairs_, fuse_loop, False),
            "reinit_pairs_": (ops.reinit_pairs_, reinit_loop, True)}


def apply_pairs(fn: Callable, layers: LoraLayers, idx: Sequence[torch.Tensor], new: Sequence = (),
                scaling: float = PAIR_SCALING) -> list[torch.Tensor]:
    """Run a fuse/reinit implementation in place on ``layers``; returns the updated ``W``."""
    fn(layers.W, layers.B, layers.A, idx, *new, scaling)
    return layers.W


def importance_scores(fn: Callable, layers: LoraLayers, steps: int = 2) -> list[torch.Tensor]:
    """Pair scores after ``steps`` importance updates from zero states (for error checks)."""
    states = ops.importance_state(layers.A, layers.B, dtype=layers.A[0].dtype)
    scores: list[torch.Tensor] = []
    for _ in range(steps):
        scores = fn(layers.A, layers.B, layers.grad_A, layers.grad_B, *states)
    return scores


def rel_error(x: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """``||x - ref|| / ||ref||`` over a list of tensors (computed in float64)."""
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(x, ref))
    den = sum(float(b.double().square().sum()) for b in ref)
    return math.sqrt(num / den) if den else math.sqrt(num)


# ---------------------------------------------------------------------------------------------
# timing and the report

@dataclass(frozen=True)
class Config:
    """Workload sizes and the time spent per measurement."""
    minilm_limit: Optional[int]  # None: all 37 MiniLM weights
    num_layers: int
    project_shapes: tuple[tuple[int, int], ...]
    philox_log2: int
    target_s: float              # keep repeating until this much time is spent ...
    min_repeats: int             # ... but at least this many and ...
    max_repeats: int             # ... at most this many timed calls
    device: str = "cpu"          # where the workloads live (CUDA: timings synchronise the device)
    large_rsvd: bool = False     # also rsvd_many over a 7B-shaped layer set (GPU-sized)


FULL = Config(None, 200, ((1536, 1536), (384, 384), (1536, 384)), 24, 1.0, 5, 1000)
QUICK = Config(6, 20, ((384, 384), (768, 384)), 18, 0.02, 2, 20)   # the last shape (solar_basis) not square
# (out, in) of one 7B-style decoder block's Linear weights: q, k, v, o (4096²), up/gate, down.
LARGE_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
CUDA_PHILOX_LOG2 = 28


def median_ms(fn: Callable[[], object], cfg: Config, warmup: int = 1) -> float:
    """Median time of ``fn()`` in ms (``time.perf_counter``; on CUDA, device events around the call),
    after ``warmup`` untimed calls."""
    cuda = cfg.device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < cfg.max_repeats and (len(times) < cfg.min_repeats
                                            or time.perf_counter() - start < cfg.target_s):
        if cuda:  # device time between two events: no host-sync latency in short kernels' times
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@dataclass
class Row:
    """One line of the table: our op against one baseline."""
    op: str
    case: str
    ours_ms: float
    baseline: str
    baseline_ms: float
    err_ours: Optional[float] = None
    err_baseline: Optional[float] = None

    def cells(self) -> list[str]:
        err = ("—" if self.err_ours is None else f"{self.err_ours:.4g} / "
               + ("reference" if self.err_baseline is None else f"{self.err_baseline:.4g}"))
        return [self.op, self.case, _ms(self.ours_ms), self.baseline, _ms(self.baseline_ms),
                _ratio(self.baseline_ms / self.ours_ms), err]


COLUMNS = ["op", "case", "ours (ms)", "baseline", "baseline (ms)", "speed-up (×)",
           "error ours / error baseline"]


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _ratio(x: float) -> str:
    """Two decimals; two significant digits below 0.1 (a timing disturbed by a busy machine printed 0.00)."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gemm_floor(mats: Sequence[torch.Tensor], rank: int) -> None:
    """Only the 2 + 2·NITER GEMMs with each W that the randomized SVD needs (its floor)."""
    l = rank + OVERSAMPLE
    for W in mats:
        Q = W[:, :l]  # any m x l block: the cost is the products
        Z = W.mT @ Q
        for _ in range(NITER):
            Q = W @ Z
            Z = W.mT @ Q
        W @ Z


def _rsvd_rows(cfg: Config) -> Iterator[Row]:
    try:
        mats, name = minilm_matrices(cfg.minilm_limit), "MiniLM-L6"
    except FileNotFoundError:  # e.g. a GPU machine without the model package: the same shapes
        g = torch.Generator().manual_seed(0)
        shapes = ([*MINILM_SHAPES] * 6 + [(384, 384)])[:cfg.minilm_limit]
        mats, name = [torch.randn(m, n, generator=g) for m, n in shapes], "MiniLM-L6 shapes (random)"
    mats = [W.to(cfg.device) for W in mats]
    yield from _rsvd_set_rows(cfg, mats, f"{name}, {len(mats)} weights", (8, 32), with_full=True)
    if cfg.large_rsvd:
        g = torch.Generator(device=cfg.device).manual_seed(0)
        large = [torch.randn(m, n, generator=g, device=cfg.device) for _ in range(32) for m, n in LARGE_SHAPES]
        name = "7B-shaped, 32 x {4096², 4096×11008, 11008×4096}"
        yield from _rsvd_set_rows(cfg, large, name, (16, 64), with_full=False)
        if cfg.device.startswith("cuda"):
            # The same rows with TF32 GEMMs on both sides (torch's allow_tf32; off by default). In
            # float32 the svd_lowrank loop is only ~6x its GEMM floor (H200, 2026-12-04), so 10x it
            # needs a cheaper floor: these rows show how far TF32 gets, with both sides' errors.
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                rows = list(_rsvd_set_rows(cfg, large, name + ", TF32 GEMMs (both sides)", (16, 64), with_full=False))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
            yield from rows


def _rsvd_set_rows(cfg: Config, mats, name: str, ranks, with_full: bool) -> Iterator[Row]:
    if with_full:
        full, t_full = svd_loop(mats), median_ms(lambda: svd_loop(mats), cfg)
    for rank in ranks:
        ours, t_ours = rsvd_ours(mats, rank), median_ms(lambda: rsvd_ours(mats, rank), cfg)
        low, t_low = svd_lowrank_loop(mats, rank), median_ms(lambda: svd_lowrank_loop(mats, rank), cfg)
        e_ours = frob_error(mats, ours)
        case = f"{name}, rank {rank}"
        yield Row("rsvd_many", case, t_ours, f"svd_lowrank loop (q={rank + OVERSAMPLE}, niter={NITER})",
                  t_low, e_ours, frob_error(mats, low))
        if with_full:
            yield Row("rsvd_many", case, t_ours, "linalg.svd loop, truncated", t_full, e_ours,
                      frob_error(mats, truncate(full, rank)))
        yield Row("rsvd_many", case, t_ours, "floor: its GEMMs with W only", median_ms(lambda: gemm_floor(mats, rank), cfg))


# rsvd's l x l cores (l = rank + oversample) for a 96-weight set at rank 16 and 64
SMALL_SVD_CASES = ((96, 24), (96, 72))


def small_svd_inputs(batch: int, l: int, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, l, l, generator=g, dtype=torch.float64).to(device)


def linalg_svd_batched(A: torch.Tensor):
    return torch.linalg.svd(A, full_matrices=False)


def _small_svd_rows(cfg: Config) -> Iterator[Row]:
    for batch, l in SMALL_SVD_CASES[:1] if cfg.minilm_limit else SMALL_SVD_CASES:
        A = small_svd_inputs(batch, l, cfg.device)
        S_ref = torch.linalg.svdvals(A.cpu())
        err = lambda S: rel_error([S.cpu()], [S_ref])  # noqa: E731
        ours, t_ours = ops.small_svd(A), median_ms(lambda: ops.small_svd(A), cfg)
        theirs, t_theirs = linalg_svd_batched(A), median_ms(lambda: linalg_svd_batched(A), cfg)
        yield Row("small_svd", f"{batch} x ({l}×{l}) float64", t_ours, "torch.linalg.svd (batched)",
                  t_theirs, err(ours[1]), err(theirs[1]))


def gram_inputs(batch: int, l: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """Gram matrices Y^T Y of Gaussian Y (2 l x l): rsvd's orthonormalisation problems."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(batch, 2 * l, l, generator=g, dtype=torch.float64)
    return (Y.mT @ Y).to(device)


def cholesky_inverse_batched(G: torch.Tensor) -> torch.Tensor:
    """torch's way to the same T: batched Cholesky, then a triangular solve against I."""
    R = torch.linalg.cholesky(G).mT
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(G)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def _gram_orth_rows(cfg: Config) -> Iterator[Row]:
    """_gram_orth (every orthonormalisation of rsvd's batched path) against torch's batched Cholesky
    + triangular solve, and against the small SVD of G that it replaced there."""
    for batch, l in SMALL_SVD_CASES[:1] if cfg.minilm_limit else SMALL_SVD_CASES:
        G = gram_inputs(batch, l, cfg.device)
        T_ref = cholesky_inverse_batched(G.cpu())
        err = lambda T: rel_error([T.cpu()], [T_ref])  # noqa: E731
        gram_orth = torch.ops.subspace_ext._gram_orth
        ours, t_ours = gram_orth(G)[0], median_ms(lambda: gram_orth(G), cfg)
        theirs, t_theirs = cholesky_inverse_batched(G), median_ms(lambda: cholesky_inverse_batched(G), cfg)
        case = f"{batch} x ({l}×{l}) float64"
        # on the CPU the baseline is the reference itself (error 0 by construction): shown as "reference"
        yield Row("gram_orth", case, t_ours, "linalg.cholesky + solve_triangular (batched)", t_theirs, err(ours),
                  None if G.is_cpu else err(theirs))
        yield Row("gram_orth", case, t_ours, "small_svd of G (what it replaced)", median_ms(lambda: ops.small_svd(G), cfg))


def _project_rows(cfg: Config) -> Iterator[Row]:
    for m, n in cfg.project_shapes:
        U, V, B, A = x = [t.to(cfg.device) for t in project_inputs(m, n)]
        ref = [project_dense(*(t.double() for t in x))]
        ours = ops.project(U, V, B, A)
        t_ours = median_ms(lambda: ops.project(U, V, B, A), cfg)
        case = f"{m}×{n}, r={B.shape[1]}, k={U.shape[1]}"
        yield Row("project", case, t_ours, "U.T @ (s*B @ A) @ V", median_ms(lambda: project_dense(*x), cfg),
                  rel_error([ours], ref), rel_error([project_dense(*x)], ref))
        yield Row("project", case, t_ours, "floor: U.T@B and A@V only", median_ms(lambda: project_floor(*x), cfg))
        fused = lambda: ops.project_perturbed(U, V, B, A, eps=PERTURB_EPS, seed=0)  # noqa: E731
        yield Row("project_perturbed", f"{case}, eps={PERTURB_EPS}", median_ms(fused, cfg),
                  "perturbed_basis ×2 + project", median_ms(lambda: project_unfused(U, V, B, A), cfg),
                  *(rel_error([y], [project_unfused(U, V, B, A, torch.float64)])
                    for y in (fused(), project_unfused(U, V, B, A))))
        C = torch.randn(U.shape[1], V.shape[1], generator=torch.Generator().manual_seed(1)).to(U)
        back = lambda: ops.reconstruct_perturbed(U, C, V, eps=PERTURB_EPS, seed=0)  # noqa: E731
        case = f"{m}×{n}, k={U.shape[1]}, eps={PERTURB_EPS}"
        t_back = median_ms(back, cfg)   # one measurement for both rows
        yield Row("reconstruct_perturbed", case, t_back, "perturbed_basis ×2 + reconstruct",
                  median_ms(lambda: reconstruct_unfused(U, C, V), cfg),
                  *(rel_error([y], [reconstruct_unfused(U, C, V, torch.float64)])
                    for y in (back(), reconstruct_unfused(U, C, V))))
        yield Row("reconstruct_perturbed", case, t_back, "floor: reconstruct (eps = 0)",
                  median_ms(lambda: ops.reconstruct(U, C, V), cfg))


def solar_basis_torch(W: torch.Tensor, eps: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SOLAR-style complete bases in plain torch: W's reduced SVD in float64, completed by Householder
    QR of ``torch.randn`` directions projected off the singular vectors (twice), then for eps > 0
    perturbed and QR'd again. The same work as ``ops.solar_basis`` but not reproducible elsewhere
    (torch.randn's bits depend on the device, LAPACK's signs and tied vectors on the library)."""
    g = torch.Generator(device=W.device).manual_seed(seed)
    normals = lambda *shape: torch.randn(*shape, dtype=torch.float64, device=W.device, generator=g)  # noqa: E731
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)

    def basis(Q: torch.Tensor) -> torch.Tensor:
        d, k = Q.shape
        if k < d:
            N = normals(d, d - k)
            for _ in range(2):
                N = N - Q @ (Q.T @ N)
            Q = torch.cat([Q, torch.linalg.qr(N).Q], 1)
        return torch.linalg.qr(Q + eps / math.sqrt(d) * normals(d, d)).Q if eps else Q

    return basis(U), basis(Vh.mT)


def orthonormality_error(bases: Sequence[torch.Tensor]) -> float:
    """The largest |QᵀQ − I| entry over the given square bases."""
    return max(float((Q.T @ Q - torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)).abs().max()) for Q in bases)


def _solar_rows(cfg: Config) -> Iterator[Row]:
    """solar_basis (what compress and both decoders spend their time in) against the same bases in
    plain torch (Householder QR, torch.randn: not reproducible on another machine)."""
    m, n = cfg.project_shapes[-1]
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(3)).to(cfg.device)
    for eps in (0.0, PERTURB_EPS):
        ours = lambda: ops.solar_basis(W, 0, 0, eps)  # noqa: E731
        theirs = lambda: solar_basis_torch(W, eps)  # noqa: E731
        yield Row("solar_basis", f"{m}×{n} float32, eps={eps:g} (bases {m}² + {n}², float64)", median_ms(ours, cfg),
                  "torch: linalg.svd + randn + linalg.qr", median_ms(theirs, cfg),
                  orthonormality_error(ours()), orthonormality_error(theirs()))


def _importance_rows(cfg: Config) -> Iterator[Row]:
    layers = lora_layers(cfg.num_layers).to(cfg.device)
    case = f"{cfg.num_layers} layers, LoRA r={LORA_RANK}"
    ref = importance_scores(importance_loop, layers.clone(torch.float64))
    states_ours, states_loop = ops.importance_state(layers.A, layers.B), ops.importance_state(layers.A, layers.B)
    args = (layers.A, layers.B, layers.grad_A, layers.grad_B)
    yield Row("pair_importance", case, median_ms(lambda: ops.pair_importance(*args, *states_ours), cfg),
              "Python loop (AdaLoRA update)", median_ms(lambda: importance_loop(*args, *states_loop), cfg),
              rel_error(importance_scores(ops.pair_importance, layers), ref),
              rel_error(importance_scores(importance_loop, layers), ref))

    idx = [i.to(cfg.device) for i in pair_indices(layers)]
    case = f"{cfg.num_layers} layers, {len(idx[0])} pairs each"
    for name, (ours_fn, loop_fn, takes_new) in PAIR_OPS.items():
        new = [[t.to(cfg.device) for t in ts] for ts in new_pairs(layers, idx)] if takes_new else ()
        ref = apply_pairs(loop_fn, layers.clone(torch.float64), idx, [[t.double() for t in ts] for ts in new])
        err_ours = rel_error(apply_pairs(ours_fn, layers.clone(), idx, new), ref)
        err_loop = rel_error(apply_pairs(loop_fn, layers.clone(), idx, new), ref)
        L_ours, L_loop = layers.clone(), layers.clone()
        yield Row(name, case, median_ms(lambda: apply_pairs(ours_fn, L_ours, idx, new), cfg),
                  "Python loop (addmm_ + index)", median_ms(lambda: apply_pairs(loop_fn, L_loop, idx, new), cfg),
                  err_ours, err_loop)


def _philox_rows(cfg: Config) -> Iterator[Row]:
    numel = 2 ** cfg.philox_log2
    gbps = lambda ms: numel * 4 / (ms * 1e-3) / 1e9  # noqa: E731
    t_randn = median_ms(lambda: torch.randn(numel, device=cfg.device), cfg)
    if cfg.device.startswith("cuda"):  # the bandwidth floor: writing the same bytes
        buf = torch.empty(numel, device=cfg.device)
        src = torch.randn(numel, device=cfg.device)  # real data: never time on zeros
        t_copy = median_ms(lambda: buf.copy_(src), cfg)
    for method in ("box_muller", "icdf"):
        t_ours = median_ms(lambda: ops.philox_normal((numel,), seed=0, device=cfg.device, method=method), cfg)
        name = "philox_normal" + ("" if method == "box_muller" else " icdf")
        case = f"2^{cfg.philox_log2} float32 (ours {gbps(t_ours):.2f} GB/s, randn {gbps(t_randn):.2f} GB/s)"
        yield Row(name, case, t_ours, "torch.randn", t_randn)
        if cfg.device.startswith("cuda"):
            yield Row(name, f"2^{cfg.philox_log2} float32 (copy {2 * gbps(t_copy):.0f} GB/s read+write)",
                      t_ours, "floor: device copy of the same size", t_copy)


def _probe_rows(cfg: Config) -> Iterator[Row]:
    """With ``large`` only (the GPU run's table): the cases a static review of the CUDA kernels (2026-12-07) asked
    to time, each against the neighbour it should match. An odd basis width in reconstruct_perturbed (the strip's
    row stride, odd since; k + 1 was even for odd k: bank conflicts), an odd Gram size in _gram_orth (R's row read
    contiguously since; strided by q before), an all-zero small_svd (every column completed, on one lane)."""
    if not cfg.large_rsvd:
        return
    m = cfg.project_shapes[0][0]
    g = torch.Generator().manual_seed(2)
    t_rec = {}
    for k in (31, 32):
        U, V, C = (torch.randn(*s, generator=g).to(cfg.device) for s in ((m, k), (m, k), (k, k)))
        t_rec[k] = median_ms(lambda: ops.reconstruct_perturbed(U, C, V, eps=PERTURB_EPS, seed=0), cfg)
    yield Row("reconstruct_perturbed", f"{m}×{m}, k=31, eps={PERTURB_EPS} (odd k)", t_rec[31], "the same at k=32",
              t_rec[32])
    batch, l = SMALL_SVD_CASES[0] if cfg.minilm_limit else SMALL_SVD_CASES[-1]
    gram_orth = torch.ops.subspace_ext._gram_orth
    t_gram = {}
    for q in (l + 1, l):
        G = gram_inputs(batch, q, cfg.device)
        t_gram[q] = median_ms(lambda: gram_orth(G), cfg)
    yield Row("gram_orth", f"{batch} x ({l + 1}×{l + 1}) float64 (odd q)", t_gram[l + 1], f"the same at {l}×{l}",
              t_gram[l])
    Z, A = torch.zeros(batch, l, l, dtype=torch.float64, device=cfg.device), small_svd_inputs(batch, l, cfg.device)
    yield Row("small_svd", f"{batch} x ({l}×{l}) zeros (every column completed)",
              median_ms(lambda: ops.small_svd(Z), cfg), "the same, Gaussian", median_ms(lambda: ops.small_svd(A), cfg))


SECTIONS = (_rsvd_rows, _small_svd_rows, _gram_orth_rows, _project_rows, _solar_rows, _importance_rows, _philox_rows,
            _probe_rows)


def run(quick: bool = False, threads: Optional[int] = None, out: Callable[[str], object] = print,
        device: str = "cpu", large: bool = False) -> str:
    """Benchmark every op against its baseline; ``out`` each markdown line, return the whole report.

    ``threads`` sets ``torch.set_num_threads`` for the run (restored afterwards); ``quick`` uses
    small workloads and few repeats (a few seconds; for tests, not for numbers). ``device``:
    "cpu" or "cuda" (timed by CUDA events; philox_normal at 2^28 numbers); ``large`` adds rsvd_many over a
    7B-shaped layer set (about 14 GB of float32 weights: for a GPU).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not (torch.cuda.is_available() and ops.cuda_enabled()):
        raise ValueError("device 'cuda' needs a GPU and a CUDA build of subspace_ext "
                         f"(torch.cuda.is_available() = {torch.cuda.is_available()}, "
                         f"subspace_ext.cuda_enabled() = {ops.cuda_enabled()})")
    if large and device == "cpu":   # the set alone is ~14 GB, the two sides' workspaces as much again
        need = 2 * 32 * sum(m * n for m, n in LARGE_SHAPES) * 4   # float32, 32 blocks
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):   # unknown here (e.g. Windows): not checked
            have = None
        if have is not None and have < need:
            raise ValueError(f"large on the CPU needs about {need / 2**30:.0f} GiB of memory (the 7B-shaped set "
                             f"and both sides' workspaces), this machine has {have / 2**30:.0f} GiB in total: run "
                             "it with device 'cuda'")
    cfg = dataclasses.replace(QUICK if quick else FULL, device=device, large_rsvd=large)
    if device == "cuda" and not quick:  # 1 GiB of output, far past the L2, so the kernel fills the chip
        cfg = dataclasses.replace(cfg, philox_log2=CUDA_PHILOX_LOG2)
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        out(line)

    old_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        emit(f"## subspace_ext {__version__} benchmark{' (quick)' if quick else ''}")
        emit("")
        emit(f"- torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
        emit(f"- CPU: {cpu_model()}")
        if device == "cuda":
            emit(f"- device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
        clock = "CUDA event pairs around each call" if device == "cuda" else "time.perf_counter"
        emit(f"- times: median of repeated timings ({clock}) after a warm-up call; speed-up = baseline / ours")
        emit("- error: rsvd_many = Σ over weights of ‖W − U S Vᵀ‖_F; small_svd = relative error of S "
             "against LAPACK's (CPU); gram_orth = relative error of T against torch's Cholesky route "
             "on the CPU; solar_basis = largest |QᵀQ − I| of its bases; other ops = relative error against "
             "the same math in float64")
        emit("")
        emit(_md_line(COLUMNS))
        emit(_md_line(["---"] * len(COLUMNS)))
        for section in SECTIONS:
            for row in section(cfg):
                emit(_md_line(row.cells()))
    finally:
        torch.set_num_threads(old_threads)
    return "\n".join(lines) + "\n"
